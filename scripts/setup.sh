#!/usr/bin/env bash
# Get a Debian 12 machine, as root, ready for hpcckpt and its test suite.
#
# Idempotent: a second run only checks what is there, so it takes seconds.
#   - system packages: CRIU build deps, Slurm, munge, OpenMPI, PostgreSQL
#   - a CRIU that passes `criu check` on the running kernel (system one if it
#     passes, else CRIU >= 4.2 built from Debian sid's source into /usr/local)
#   - file capabilities on criu so ordinary users can checkpoint (--unprivileged)
#   - a virtualenv at $HPCCKPT_VENV (default: ./.venv) with hpcckpt installed
#
# Usage: sudo scripts/setup.sh [--no-venv] [--extras test,mpi,postgres,report]
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${HPCCKPT_VENV:-$REPO/.venv}
EXTRAS=${HPCCKPT_EXTRAS:-test,mpi,postgres,report}
CACHE=${HPCCKPT_CACHE:-/var/cache/hpcckpt}
MIN_CRIU=4.2
WANT_VENV=1
while [ $# -gt 0 ]; do
  case "$1" in
    --no-venv) WANT_VENV=0 ;;
    --extras) EXTRAS=$2; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

log() { printf '[setup] %s\n' "$*" >&2; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (it installs system packages and criu's capabilities)"

APT_PKGS=(
  # toolchain and Python
  build-essential pkg-config git python3 python3-venv python3-dev libcap2-bin xz-utils curl ca-certificates
  # CRIU build dependencies (bookworm)
  libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler protobuf-compiler python3-protobuf libnl-3-dev libnet1-dev
  libcap-dev libbsd-dev libaio-dev libgnutls28-dev libnftables-dev uuid-dev iproute2 nftables
  # a job's own network namespace reaches the outside through slirp4netns (policy job.network)
  slirp4netns util-linux
  # Slurm test cluster, MPI, PostgreSQL catalog
  slurmctld slurmd slurm-client munge openmpi-bin libopenmpi-dev postgresql procps
  # tests: a store whose reads fail (EIO) through a FUSE filesystem (fusepy needs libfuse2)
  fuse libfuse2
)

missing_pkgs() {
  local p
  for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
  done
}

install_packages() {
  local missing
  missing=$(missing_pkgs)
  if [ -z "$missing" ]; then log "system packages: present"; return; fi
  log "installing system packages: ${missing//$'\n'/ }"
  # Package postinst scripts would start munge, slurmd and postgres with their
  # default configuration; the test suite starts its own, so keep them down.
  local prc=/usr/sbin/policy-rc.d had_prc=0
  [ -e $prc ] && had_prc=1
  if [ $had_prc = 0 ]; then
    printf '#!/bin/sh\nexit 101\n' > $prc; chmod 755 $prc
    # Left behind by a failed install, it would stop every service on this
    # machine from ever starting again.
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $missing >/dev/null
  if [ $had_prc = 0 ]; then rm -f $prc; trap - EXIT; fi
  log "system packages: installed"
}

version_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]; }

criu_ok() {  # criu_ok BINARY: passes `criu check` and is new enough
  local bin=$1 ver
  [ -x "$bin" ] || return 1
  ver=$("$bin" --version 2>/dev/null | sed -n 's/^Version: *//p')
  [ -n "$ver" ] && version_ge "$ver" "$MIN_CRIU" || return 1
  "$bin" check >/dev/null 2>&1
}

# The Debian mirror this machine already uses, from its own apt sources.
debian_mirror() {
  local uri
  # deb822 stanzas, read whole: fields come in any order, and an inline
  # Signed-By key block can put URIs many lines after Types.
  uri=$(awk 'function flush() { if (types ~ /(^| )deb(-src)?( |$)/ && enabled != "no") print uris; types = uris = enabled = "" }
             /^[ \t]*$/ { flush(); next }
             /^Types:/ { sub(/^Types:[ \t]*/, ""); types = $0 }
             /^URIs:/ { sub(/^URIs:[ \t]*/, ""); uris = $0 }
             /^Enabled:/ { sub(/^Enabled:[ \t]*/, ""); enabled = tolower($0) }
             END { flush() }' /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | tr -s '[:blank:]' '\n' | grep -v -- '-security' | grep -i debian | head -n1 || true)
  if [ -z "$uri" ]; then
    uri=$(grep -hsE '^deb(-src)? ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
          | awk '{for(i=2;i<=NF;i++) if ($i ~ /^[a-z]+:\/\//) {print $i; break}}' | grep -v -- '-security' | head -n1 || true)
  fi
  [ -n "$uri" ] || die "cannot find a Debian mirror in /etc/apt/sources.list*; add one and rerun"
  echo "${uri%/}"
}

build_criu() {
  local src="$CACHE/criu-src" apt_dir="$CACHE/apt-sid" mirror
  mkdir -p "$src" "$apt_dir/lists/partial" "$apt_dir/archives/partial"
  if ! ls "$src"/criu_*.orig.tar.* >/dev/null 2>&1; then
    mirror=$(debian_mirror)
    log "fetching CRIU source from sid on $mirror"
    echo "deb-src $mirror sid main" > "$apt_dir/sources.list"
    # A private list, so the machine's own apt state is untouched.
    local aopts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=-"
                 -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache::Archives=$apt_dir/archives"
                 -o "APT::Sandbox::User=root")
    local out
    if ! out=$(apt-get "${aopts[@]}" update -qq 2>&1); then
      # Snapshot and frozen site mirrors serve a sid whose Release file is past
      # its Valid-Until (7 days for sid); so does a node whose clock is off.
      # apt still verifies the signature, and the version is checked below, so
      # only the freshness check is waived, and only for this private list.
      grep -q 'is expired' <<<"$out" \
        || die "apt-get update of sid's sources on $mirror failed: $out"
      log "warning: sid's Release file on $mirror has expired (a snapshot mirror, or a wrong clock);" \
          "using it anyway, signature still checked"
      aopts+=(-o "Acquire::Check-Valid-Until=false")
      apt-get "${aopts[@]}" update -qq || die "apt-get update of sid's sources on $mirror failed"
    fi
    # The Debian tarball has been seen to 404 while the orig tarball is there;
    # the orig tarball is all that is needed, so apt's errors only matter when
    # it is missing.
    local got
    got=$(cd "$src" && apt-get "${aopts[@]}" source --download-only -qq criu 2>&1) || true
    ls "$src"/criu_*.orig.tar.* >/dev/null 2>&1 || die "could not download CRIU's source from $mirror (sid): $got"
  fi
  local tarball ver tree
  tarball=$(printf '%s\n' "$src"/criu_*.orig.tar.* | sort -V | tail -n1)
  ver=$(basename "$tarball" | sed -E 's/^criu_([0-9.]+)\.orig.*/\1/')
  version_ge "$ver" "$MIN_CRIU" || die "sid has CRIU $ver, older than $MIN_CRIU"
  tree="$src/criu-$ver"
  if [ ! -x "$tree/criu/criu" ]; then
    rm -rf "$tree"; mkdir -p "$tree"
    tar -xf "$tarball" -C "$tree" --strip-components=1
    log "building CRIU $ver (about a minute)"
    make -C "$tree" -j"$(nproc)" criu >"$CACHE/criu-build.log" 2>&1 \
      || die "CRIU build failed; see $CACHE/criu-build.log"
  fi
  install -m 0755 "$tree/criu/criu" /usr/local/sbin/criu
  log "installed CRIU $ver at /usr/local/sbin/criu"
}

setup_criu() {
  local cand
  for cand in /usr/local/sbin/criu "$(command -v criu 2>/dev/null || true)"; do
    if [ -n "$cand" ] && criu_ok "$cand"; then
      log "criu: $cand ($("$cand" --version | sed -n 's/^Version: *//p')) passes criu check"
      CRIU_BIN=$cand; return
    fi
  done
  build_criu
  if ! criu_ok /usr/local/sbin/criu; then
    local why hint=""
    why=$(/usr/local/sbin/criu check 2>&1 | grep -m3 'Error' | tr '\n' ' ' | sed 's/ *$//' || true)
    # In a chroot (say, a diskless node image being built) whose root is not
    # a mount point, criu cannot place the mounts it sees ("No parent found
    # for mountpoint"); the same binary can pass on the booted node.
    mountpoint -q / || hint="; / is not a mount point (a chroot?): bind-mount the chroot onto itself, or run 'criu check' on the booted node"
    die "the built criu fails 'criu check' on kernel $(uname -r): ${why:-see 'criu check -v4'}$hint"
  fi
  CRIU_BIN=/usr/local/sbin/criu
}

setup_caps() {
  # Lets ordinary users checkpoint their own processes with criu --unprivileged.
  local want="cap_sys_ptrace,cap_checkpoint_restore=eip"
  if ! getcap "$CRIU_BIN" | grep -q checkpoint_restore; then
    setcap "$want" "$CRIU_BIN" || log "warning: setcap failed; only root can checkpoint"
  fi
}

setup_tun() {
  # slirp4netns opens /dev/net/tun inside an ordinary user's namespace. udev makes it 0666 on a
  # booted Debian node; a container or a minimal VM may leave the kernel node root-only.
  if [ -c /dev/net/tun ] && [ "$(stat -c %a /dev/net/tun)" != 666 ]; then
    chmod 0666 /dev/net/tun && log "/dev/net/tun: made 0666, as udev does"
  fi
}

setup_venv() {
  [ $WANT_VENV = 1 ] || return 0
  local stamp="$VENV/.hpcckpt-stamp" sum
  sum=$(sha256sum <"$REPO/pyproject.toml" | cut -c1-16)-$EXTRAS
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$sum" ] && "$VENV/bin/python" -c 'import hpcckpt' 2>/dev/null; then
    log "virtualenv: $VENV up to date"; return
  fi
  [ -x "$VENV/bin/python" ] || /usr/bin/python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -e "${REPO}[$EXTRAS]"
  echo "$sum" > "$stamp"
  log "virtualenv: $VENV ready"
}

install_packages
setup_criu
setup_caps
setup_tun
setup_venv
log "done. Try: ${VENV}/bin/hpcckpt doctor"
