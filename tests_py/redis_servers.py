"""Real Redis servers for the remote tier's tests and reliability runs: one server, or a
Redis Cluster of six nodes (3 masters, 3 replicas) on loopback ports, each a redis-server
process started here and stopped by its pid. A small RESP client gives the tests their own
hands on the values the store keeps (binary-safe, following MOVED in a cluster)."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

REDIS = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")


def _bindable(port: int) -> bool:
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False


def free_port(bus: bool = False) -> int:
    """A free loopback port; with ``bus``, one whose cluster bus port (+10000) is free too,
    both below the ephemeral range (32768 on), where no outgoing connection takes them
    between this check and the server's start."""
    if not bus:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    for port in random.Random().sample(range(20000, 22768), 200):
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair found")


def _read_reply(stream):
    line = stream.readline()
    if not line:
        raise ConnectionError("the server closed the connection")
    kind, body = line[:1], line[1:-2]
    if kind in (b"+", b"-"):
        return body.decode()
    if kind == b":":
        return int(body)
    if kind == b"$":
        length = int(body)
        if length < 0:
            return None
        data = stream.read(length + 2)
        return data[:length]
    if kind == b"*":
        count = int(body)
        return None if count < 0 else [_read_reply(stream) for _ in range(count)]
    raise ConnectionError(f"unexpected reply {line!r}")


def _request(args) -> bytes:
    parts = [a if isinstance(a, bytes) else str(a).encode() for a in args]
    return f"*{len(parts)}\r\n".encode() + b"".join(
        f"${len(p)}\r\n".encode() + p + b"\r\n" for p in parts
    )


def pipeline(port: int, commands, timeout: float = 30.0) -> list:
    """The replies to ``commands`` (each a sequence of arguments) sent in one go."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"".join(_request(c) for c in commands))
        stream = s.makefile("rb")
        return [_read_reply(stream) for _ in commands]


def command(port: int, *args, timeout: float = 5.0):
    """One command: bytes for a bulk string, None for nil, int, str for status and errors
    (errors start with their code, e.g. ``MOVED 42 127.0.0.1:7001``), lists for arrays."""
    return pipeline(port, [args], timeout)[0]


def _wait_listening(port: int, proc: subprocess.Popen, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server on port {port} exited ({proc.returncode})")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"redis-server on port {port} did not start")


def start_redis(port: int, *extra: str, directory: Path | None = None) -> subprocess.Popen:
    args = [REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    if directory is not None:
        args += ["--dir", str(directory)]
    proc = subprocess.Popen([*args, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_listening(port, proc)
    except RuntimeError:
        proc.kill()
        proc.wait()
        raise
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


class Server:
    """One redis-server on a loopback port."""

    def __init__(self):
        self.port = free_port()
        self.proc = start_redis(self.port)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def command(self, *args):
        return command(self.port, *args)

    def stop(self) -> None:
        stop(self.proc)


class Cluster:
    """Six redis-server processes in cluster mode (3 masters with a replica each) on
    loopback ports, created with ``redis-cli --cluster create``; ``node_timeout`` (ms) is
    how long a master may be unreachable before its replica takes over."""

    def __init__(self, directory: Path, node_timeout: int = 1000, nodes: int = 6):
        if REDIS_CLI is None:
            raise RuntimeError("redis-cli not found (scripts/setup.sh installs redis-server)")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.node_timeout = node_timeout
        self.procs: dict[int, subprocess.Popen] = {}
        try:
            for _ in range(nodes):
                self.start_node(free_port(bus=True))
            subprocess.run(
                [REDIS_CLI, "--cluster", "create"]
                + [f"127.0.0.1:{p}" for p in self.procs]
                + ["--cluster-replicas", "1", "--cluster-yes"],
                check=True,
                capture_output=True,
                timeout=60,
            )
            self.wait_ok()
        except BaseException:
            self.stop()
            raise

    def start_node(self, port: int) -> None:
        self.procs[port] = start_redis(
            port,
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            f"nodes-{port}.conf",
            "--cluster-node-timeout",
            str(self.node_timeout),
            # A failed master stops only its own slots, not the whole cluster.
            "--cluster-require-full-coverage",
            "no",
            directory=self.directory,
        )

    @property
    def url(self) -> str:
        return "redis-cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.procs)

    def live_ports(self) -> list[int]:
        return [p for p, proc in self.procs.items() if proc.poll() is None]

    def wait_ok(self, seconds: float = 60.0) -> float:
        """Waits until every live node says cluster_state:ok with all slots served by live
        masters, and every replica is in sync with its master (only then can it take over);
        the seconds it took."""
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            try:
                if (
                    all(self._ok(p) for p in self.live_ports())
                    and self._masters_live()
                    and all(self._synced(p) for p in self.live_ports())
                ):
                    return time.monotonic() - start
            except (OSError, ConnectionError):
                pass
            time.sleep(0.05)
        raise RuntimeError("the cluster did not reach cluster_state:ok")

    def _ok(self, port: int) -> bool:
        info = command(port, "CLUSTER", "INFO", timeout=1.0)
        return b"cluster_state:ok" in info and b"cluster_slots_ok:16384" in info

    def _synced(self, port: int) -> bool:
        info = command(port, "INFO", "replication", timeout=1.0)
        return b"role:master" in info or b"master_link_status:up" in info

    def wait_replicated(self, port: int, seconds: float = 30.0) -> None:
        """Waits until every replica of the master at ``port`` has all its writes: Redis
        replicates asynchronously, so a write acknowledged just before a master dies can
        be lost (a miss, by design) unless its replica had it."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            info = command(port, "INFO", "replication", timeout=1.0).decode()
            head = int(info.split("master_repl_offset:")[1].split()[0])
            offsets = [
                int(line.rsplit("offset=", 1)[1].split(",")[0])
                for line in info.splitlines()
                if line.startswith("slave")
            ]
            if offsets and min(offsets) >= head:
                return
            time.sleep(0.05)
        raise TimeoutError(f"the replicas of {port} did not catch up in {seconds} s")

    def _masters_live(self) -> bool:
        live = set(self.live_ports())
        return all(port in live for port, _, _ in self.masters())

    def nodes(self) -> list[tuple[int, str, str, list[tuple[int, int]]]]:
        """(port, id, flags, slot ranges) of every node, as a live node sees them."""
        text = command(self.live_ports()[0], "CLUSTER", "NODES").decode()
        out = []
        for line in text.splitlines():
            fields = line.split()
            port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
            ranges = []
            for item in fields[8:]:
                if item.startswith("["):
                    continue  # a slot being migrated
                first, _, last = item.partition("-")
                ranges.append((int(first), int(last or first)))
            out.append((port, fields[0], fields[2], ranges))
        return out

    def masters(self) -> list[tuple[int, str, list[tuple[int, int]]]]:
        return [
            (port, node_id, ranges)
            for port, node_id, flags, ranges in self.nodes()
            if "master" in flags.split(",") and "fail" not in flags and ranges
        ]

    def master_of(self, slot: int) -> tuple[int, str]:
        for port, node_id, ranges in self.masters():
            if any(first <= slot <= last for first, last in ranges):
                return port, node_id
        raise KeyError(slot)

    def command(self, *args):
        """A command about the key args[1], sent to a node and following MOVED."""
        port = self.live_ports()[0]
        for _ in range(5):
            reply = command(port, *args)
            if isinstance(reply, str) and reply.startswith(("MOVED ", "ASK ")):
                port = int(reply.rsplit(":", 1)[1])
                if reply.startswith("ASK "):
                    return pipeline(port, [("ASKING",), args])[1]
                continue
            return reply
        raise RuntimeError(f"too many redirections for {args!r}")

    def flush(self) -> None:
        for port, _, _ in self.masters():
            command(port, "FLUSHALL")

    def stop(self) -> None:
        for proc in self.procs.values():
            stop(proc)
