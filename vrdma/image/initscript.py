"""The image's /init (busybox sh, PID 1) and the serial-console lines it prints.

/init mounts proc, sysfs, devtmpfs, tmpfs on /tmp, /run and /dev/shm, and hugetlbfs on
/dev/hugepages (the pages themselves come from the kernel command line,
``hugepages=N``); loads the modules listed in /etc/vrdma/modules (uio and
uio_pci_generic, in modules.dep order) for the userspace virtio-pci driver; brings up lo;
then runs the one application as its only job, with the arguments the kernel passed to
init (everything after ``--`` on the kernel command line, minus the
``virtio_mmio.device=`` entries QEMU's microvm appends there), and prints on the serial
console::

    VRDMA-IMAGE-INIT                   /init started (boot timing)
    VRDMA-APP-START                    the application is about to start
    VRDMA-APP-EXIT status=N            its exit status (128+signal if killed)

then powers off.  ``parse_exit`` reads the last line back; nothing else is parsed.
"""
from __future__ import annotations

import re

INIT_MARKER = "VRDMA-IMAGE-INIT"
START_MARKER = "VRDMA-APP-START"
EXIT_RE = re.compile(rb"VRDMA-APP-EXIT status=(\d{1,3})\r?\n")

#: where the image keeps the application and the repository's packages
APP_DIR = "/app"
PYTHONPATH = "/opt/vrdma"

INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /sbin /usr/sbin
/bin/busybox --install -s /bin
export PATH=/usr/bin:/bin:/usr/sbin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo VRDMA-IMAGE-INIT
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /dev/shm /dev/hugepages
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t hugetlbfs -o mode=1770 hugetlbfs /dev/hugepages || echo "VRDMA-HUGETLBFS-FAIL"
while read -r m; do
    [ -n "$m" ] && { insmod "/lib/modules/$m" || echo "VRDMA-INSMOD-FAIL $m"; }
done < /etc/vrdma/modules
ip link set lo up
# microvm: QEMU appends virtio_mmio.device=SIZE@ADDR:IRQ to the kernel command line,
# after our "--", so the kernel hands it to init: it is not the application's.
n=$#; i=0
while [ $i -lt $n ]; do
    a=$1; shift; i=$((i+1))
    case "$a" in virtio_mmio.device=*) ;; *) set -- "$@" "$a" ;; esac
done
echo VRDMA-APP-START
cd /app
env -i PATH=/usr/bin:/bin:/usr/sbin:/sbin HOME=/root LANG=C.UTF-8 TERM=dumb \
    PYTHONPATH=/opt/vrdma PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    /app/run "$@" 2>&1
echo "VRDMA-APP-EXIT status=$?"
sync
poweroff -f
echo o > /proc/sysrq-trigger
"""


def run_script(app_name: str) -> str:
    """/app/run: how the application file is started (a .py file with Debian's python3)."""
    if app_name.endswith(".py"):
        return f'#!/bin/sh\nexec /usr/bin/python3 /app/{app_name} "$@"\n'
    return f'#!/bin/sh\nexec /app/{app_name} "$@"\n'


def parse_exit(serial: bytes) -> int | None:
    """The application's exit status from the serial output, or None if it never ended."""
    found = EXIT_RE.findall(serial)
    if not found or int(found[-1]) > 255:  # /init prints $?, 0..255; anything else is not its line
        return None
    return int(found[-1])
