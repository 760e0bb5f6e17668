"""kvpack performance suite: each figure is a ratio to a peer or limit measured in the same run."""
