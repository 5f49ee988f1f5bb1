#!/usr/bin/env bash
# One command installs everything vrdma needs on a fresh Debian 12 machine:
# system packages (QEMU 7.2 + qemu-storage-daemon, tshark, iproute2, iptables,
# pyverbs, the pieces of the kernel-rxe test guest, mmdebstrap), QEMU 11.1 from
# trixie-backports in a trixie root made with mmdebstrap (for `vrdma vm run
# --qemu 11.1`; cached, rebuilt only if missing) and a virtualenv in .venv with
# the Python dependencies and the Cython extensions built in place.
# Run as root (or with sudo). Idempotent.
set -euo pipefail
cd "$(dirname "$0")"

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

export DEBIAN_FRONTEND=noninteractive
APT_PACKAGES=(
  build-essential python3-dev python3-venv libssl-dev
  qemu-system-x86 qemu-system-common qemu-utils
  tshark iproute2 iptables
  python3-pyverbs ibverbs-utils rdma-core
  busybox-static cpio zstd xz-utils kmod
  redis-server
  mmdebstrap
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "wireshark-common wireshark-common/install-setuid boolean false" | $SUDO debconf-set-selections
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# QEMU 11.1 (Debian trixie-backports) in its own trixie root: ~255 MB, ~15-30 s.
# vrdma runs it with the root's loader and libraries, no chroot (vrdma/image/vm.py);
# VRDMA_QEMU11_ROOT overrides the place.  Built into a temporary directory and
# renamed, so an interrupted run leaves nothing half made.
QEMU11_ROOT="${VRDMA_QEMU11_ROOT:-/var/tmp/vrdma-qemu11/root}"
if [ ! -x "$QEMU11_ROOT/usr/bin/qemu-system-x86_64" ]; then
  $SUDO mkdir -p "$(dirname "$QEMU11_ROOT")"
  $SUDO rm -rf "$QEMU11_ROOT.tmp"
  $SUDO mmdebstrap --variant=apt --aptopt='APT::Default-Release "trixie-backports";' \
    --include=qemu-system-x86 trixie "$QEMU11_ROOT.tmp" \
    "deb http://deb.debian.org/debian trixie main" \
    "deb http://deb.debian.org/debian trixie-backports main"
  $SUDO mv "$QEMU11_ROOT.tmp" "$QEMU11_ROOT"
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv/bin/python -m pip install -q "Cython>=3.0" "numpy>=1.26"
.venv/bin/python -m pip install -q --no-build-isolation -e '.[test,bench]'

# Debian's pyverbs (rdma-core 44) lives in the system dist-packages; expose it
# (and only it) to the venv through a .pth file appended after site-packages.
SITE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "/usr/lib/python3/dist-packages" > "$SITE/zz_debian_dist_packages.pth"
echo "install.sh: done. Run the tests with: .venv/bin/pytest"
