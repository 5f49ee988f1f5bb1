"""Host programs inside the kernel-rxe guest: our venv's Python, the repo and pyverbs on rxe0.

``RxeGuest(host_root=True)`` shares the host's / read-only over virtio-9p and runs the command
chrooted into it; ``RxeGuest.python_script`` runs a script file there (carried in the initrd,
so it may live in the host's /tmp, which the guest does not see).  The boot tests prove what
a verbs transport needs: pyverbs opens rxe0 and creates PD/MR/CQ/RC QP on it, and our stack
(its Cython extensions included, rebuilt for a CPU TCG emulates) imports, on the same guest.
They skip only when a capability is missing (apt download, QEMU, root/netns).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from qemu_tests.rxe_guest import GUEST_FILES_DIR, REPO_ROOT, RxeGuest, TapNetdev, _hidden_roots

GUEST_IP = "198.51.100.9"

# Printed lines are "key=value"; the test parses them.
VERBS_SCRIPT = textwrap.dedent('''\
    import os, sys, time
    t0 = time.monotonic()
    print("first-line", flush=True)
    import pyverbs.device as d, pyverbs.enums as e
    from pyverbs.addr import GID
    from pyverbs.cq import CQ
    from pyverbs.mr import MR
    from pyverbs.pd import PD
    from pyverbs.qp import QP, QPCap, QPInitAttr
    t1 = time.monotonic()
    print(f"import_pyverbs_s={t1 - t0:.3f}")
    print("executable=" + sys.executable)
    print("cwd=" + os.getcwd())
    print("uverbs=" + ",".join(sorted(os.listdir("/dev/infiniband"))))
    print("devices=" + ",".join(sorted(x.name.decode() for x in d.get_device_list())))
    with d.Context(name="rxe0") as ctx:
        port = ctx.query_port(1)
        print(f"port_state={port.state} active={int(port.state == e.IBV_PORT_ACTIVE)}")
        print(f"gid1={ctx.query_gid(1, 1).gid}")
        with PD(ctx) as pd:
            mr = MR(pd, 1 << 16, e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE
                    | e.IBV_ACCESS_REMOTE_READ)
            print(f"mr_len={mr.length} lkey_set={int(mr.lkey != 0)} rkey_set={int(mr.rkey != 0)}")
            cq = CQ(ctx, 64)
            attr = QPInitAttr(qp_type=e.IBV_QPT_RC, scq=cq, rcq=cq,
                              cap=QPCap(max_send_wr=16, max_recv_wr=16))
            qp = QP(pd, attr)
            print(f"qp_type={qp.qp_type} qpn_set={int(qp.qp_num > 0)}")
            qp.close(); cq.close(); mr.close()
    t2 = time.monotonic()
    import vrdma.cli, virtio_rdma.core, virtio_rdma._datapath
    t3 = time.monotonic()
    print(f"import_stack_s={t3 - t2:.3f}")
    print("stack=" + os.path.dirname(os.path.dirname(virtio_rdma.core.__file__)))
    print("carried=" + open(os.path.join(os.path.dirname(__file__), "data.txt")).read().strip())
    print(f"host_tmp_visible={int(os.path.exists(sys.argv[1]))}")
    print("args=" + "|".join(sys.argv[2:]))
    print("MemAvailable_kB=" + [l.split()[1] for l in open("/proc/meminfo")
                                if l.startswith("MemAvailable")][0])
''')


def _kv(output: str) -> dict[str, str]:
    out = {}
    for line in output.splitlines():
        for item in line.split(" "):
            key, sep, value = item.partition("=")
            if sep:
                out[key] = value
    return out


# --- pure parts ---------------------------------------------------------------------------

def test_host_root_argument_validation():
    with pytest.raises(ValueError, match="ninep_cache 'bogus'"):
        RxeGuest(host_root=True, ninep_cache="bogus")
    with pytest.raises(ValueError, match="ninep_msize 100"):
        RxeGuest(host_root=True, ninep_msize=100)
    with pytest.raises(ValueError, match=r"file name '\.\./x'"):
        RxeGuest(files={"../x": b""})
    with pytest.raises(ValueError, match="content must be bytes"):
        RxeGuest(files={"x": "text"})
    with pytest.raises(ValueError, match="need host_root"):
        RxeGuest(host_binds={"/a": "/b"})
    with pytest.raises(ValueError, match="need host_root"):
        RxeGuest(env={"A": "b"})
    with pytest.raises(ValueError, match="name 'A-B'"):
        RxeGuest(host_root=True, env={"A-B": "b"})
    with pytest.raises(ValueError, match="bind path 'a b'"):
        RxeGuest(host_root=True, host_binds={"a b": "/b"})
    with pytest.raises(ValueError, match="memory_mib 8"):
        RxeGuest(memory_mib=8)


def test_default_guest_has_no_host_root():
    guest = RxeGuest()
    assert guest.qemu_fs_args() == [] and "vrdma.hostroot" not in guest.kernel_append()
    assert guest.prepare() == ({}, {})


def test_host_root_qemu_and_kernel_arguments():
    guest = RxeGuest(host_root=True, ninep_msize=262144, ninep_cache="none")
    fs = guest.qemu_fs_args()
    assert fs[0] == "-fsdev" and "path=/," in fs[1] and "readonly=on" in fs[1]
    assert fs[3] == "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot"
    assert ("vrdma.hostroot=trans=virtio,version=9p2000.L,msize=262144,cache=none,ro"
            in guest.kernel_append().split())


def test_hidden_roots_bound_back():
    """A clone or venv under /tmp (which the guest covers with a tmpfs) is bound back once,
    the outermost directory only; paths elsewhere need nothing."""
    assert _hidden_roots(["/work/repo", "/work/repo/.venv", "/usr"]) == []
    assert _hidden_roots(["/tmp/ci/repo", "/tmp/ci/repo/.venv"]) == ["/tmp/ci/repo"]
    assert _hidden_roots(["/tmp/ci/repo", "/var/tmp/venv/", "/tmp/ci/repo"]) == \
        ["/tmp/ci/repo", "/var/tmp/venv"]
    assert _hidden_roots(["/tmp", "/tmpx/repo", "/run/user/0/r"]) == ["/run/user/0/r"]
    guest = RxeGuest(host_root=True, portable_ext=False, pyc_prefix=False,
                     python="/tmp/ci/venv/bin/python")
    binds, _ = guest.prepare()
    assert binds.get("/tmp/ci/venv") == "/tmp/ci/venv"


def test_python_script_command(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("print(1)\n")
    guest = RxeGuest.python_script(script, "a b", 3, files={"x": b"1"}, ip="192.0.2.5/24")
    assert guest.host_root and guest.ip == "192.0.2.5/24" and guest.python == sys.executable
    assert set(guest.files) == {"x", "script-s.py"} and guest.files["script-s.py"] == b"print(1)\n"
    assert guest.cmd.startswith(f"cd {REPO_ROOT} && PYTHONUNBUFFERED=1 exec {sys.executable} ")
    assert guest.cmd.endswith(f"{GUEST_FILES_DIR}/script-s.py 'a b' 3")
    with pytest.raises(ValueError, match="sets cmd"):
        RxeGuest.python_script(script, cmd="true")


# --- real boots -----------------------------------------------------------------------------

@pytest.mark.qemu
def test_venv_python_with_pyverbs_on_rxe0(host_root_image, tmp_path):
    """The venv's Python in the guest: pyverbs on rxe0 (PD, MR, CQ, RC QP), our stack imports."""
    script = tmp_path / "verbs_probe.py"
    script.write_text(VERBS_SCRIPT)
    guest = RxeGuest.python_script(script, str(script), "x", "y", ip=f"{GUEST_IP}/24",
                                   files={"data.txt": b"carried\n"}, image=host_root_image)
    run = guest.run(timeout=180)
    assert run.returncode == 0, run.serial
    kv = _kv(run.output)
    assert kv["executable"] == sys.executable and kv["cwd"] == REPO_ROOT
    # /dev/infiniband: the verbs device, and rdma_cm (rdma_ucm is loaded for RDMA CM)
    assert kv["uverbs"] == "rdma_cm,uverbs0" and kv["devices"] == "rxe0"
    assert kv["active"] == "1", run.output
    # GID 1 is the IPv4-mapped GID of eth0's address (198.51.100.9 = c633:6409)
    assert kv["gid1"] == "0000:0000:0000:0000:0000:ffff:c633:6409", run.output
    assert kv["mr_len"] == str(1 << 16) and kv["lkey_set"] == kv["rkey_set"] == "1"
    assert kv["qp_type"] == "2" and kv["qpn_set"] == "1"  # IBV_QPT_RC
    assert kv["stack"] == REPO_ROOT
    assert kv["carried"] == "carried"
    assert kv["host_tmp_visible"] == "0"  # the guest's /tmp is its own tmpfs
    assert kv["args"] == "x|y"
    print(f"\ntimings {run.timings} import_pyverbs_s={kv['import_pyverbs_s']} "
          f"import_stack_s={kv['import_stack_s']} MemAvailable_kB={kv['MemAvailable_kB']}")


@pytest.mark.qemu
def test_host_root_read_only_binds_and_env(host_root_image, tmp_path):
    """The shared root is read-only; the portable extensions, the .pyc prefix and a host
    directory under /tmp are bound in; ``env`` reaches the command, quoted."""
    (tmp_path / "hello.txt").write_text("from the host\n")
    guest = RxeGuest(host_root=True, image=host_root_image,
                     host_binds={str(tmp_path): str(tmp_path)}, env={"VRDMA_PROBE": "a b'c"})
    binds, env = guest.prepare()
    ext = sorted(b for b in binds if b.endswith(".so"))
    assert ext and all(b.startswith(REPO_ROOT + "/") for b in ext)
    guest.cmd = (f"touch {REPO_ROOT}/.vrdma-guest-write 2>/dev/null && echo writable || echo read-only\n"
                 f"grep -c ' {REPO_ROOT}/[^ ]*\\.so ' /proc/self/mountinfo\n"
                 f"cat {tmp_path}/hello.txt\n"
                 'echo "probe=$VRDMA_PROBE"\n'
                 'test -d "$PYTHONPYCACHEPREFIX" && echo prefix-visible\n'
                 "echo tmp-writable > /tmp/x && cat /tmp/x\n")
    run = guest.run(timeout=90)
    assert run.returncode == 0, run.serial
    assert run.output.splitlines() == ["read-only", str(len(ext)), "from the host", "probe=a b'c",
                                       "prefix-visible", "tmp-writable"], run.output


@pytest.fixture
def guest_tap(tap_netns):
    """A fresh network namespace holding tap device vrtap2 (203.0.113.1/24) for the guest NIC."""
    return tap_netns("203.0.113.1/24", "vrtap2")


ECHO_CLIENT = textwrap.dedent('''\
    import socket, sys
    host, port = sys.argv[1], int(sys.argv[2])
    for _ in range(100):
        try:
            s = socket.create_connection((host, port), timeout=5)
            break
        except OSError:
            import time; time.sleep(0.2)
    s.sendall(b"hello from the guest\\n")
    print("reply=" + s.makefile().readline().strip())
''')


@pytest.mark.qemu
@pytest.mark.netns
def test_python_script_on_tap_in_netns(host_root_image, guest_tap, tmp_path):
    """The ready-made path for a host-side peer: a guest script on a tap talks to the netns."""
    ns, tap = guest_tap
    server = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c",
         "import socket\n"
         "l = socket.create_server(('203.0.113.1', 0)); print(l.getsockname()[1], flush=True)\n"
         "c, _ = l.accept(); c.settimeout(60)\n"
         "c.sendall(b'echo ' + c.makefile('rb').readline())\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        port = server.stdout.readline().strip()
        assert port.isdigit(), port
        script = tmp_path / "echo_client.py"
        script.write_text(ECHO_CLIENT)
        guest = RxeGuest.python_script(script, "203.0.113.1", port, ip="203.0.113.2/24",
                                       tap=TapNetdev(tap, netns=ns), image=host_root_image)
        run = guest.run(timeout=120)
        assert run.returncode == 0, run.serial
        assert "reply=echo hello from the guest" in run.output
        assert server.wait(10) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
