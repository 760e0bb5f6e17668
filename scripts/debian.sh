# Sourced by setup.sh and wheel.sh: installs the Debian packages given that are missing
# (apt-get, as root or through sudo), saying which under the caller's name.
install_debian_packages() {
  local caller=$1 package sudo=""
  shift
  local missing=()
  for package in "$@"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
  done
  ((${#missing[@]})) || return 0
  [[ "$(id -u)" != 0 ]] && sudo=sudo
  echo "$caller: installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
}
