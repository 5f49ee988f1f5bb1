"""perftest as the peer: ib_send_lat / ib_write_lat / ib_read_lat /
ib_send_bw / ib_write_bw / ib_read_bw for guests of the vrdma back-end.

linux-rdma/perftest's tests connect one RC QP per side over a TCP side
channel and measure latency or bandwidth. This package speaks the same side
channel and runs the same loops over :mod:`guest_lib`, so an unmodified
perftest program (Debian 12's ``perftest``, e.g. on a host with kernel rxe)
can be either peer (docs/perftest.md):

- :mod:`.exchange`: the messages (version, system data, MTU, the
  ``KEY_PRINT_FMT_GID`` address, bandwidth reports, ``done``) and the order
  each test exchanges them in (pure);
- :mod:`.oob`: the blocking TCP channel (server and client);
- :mod:`.engine`: the verbs side: resources, the connection, and each test's
  measured loop, after perftest_resources.c's ``run_iter_*``;
- :mod:`.report`: perftest's output (the header block, the result rows) and
  the ``--plot`` PNG;
- :mod:`.errors`: the errors.

The command line is :mod:`vrdma.commands.perftest` (``vrdma perftest``).
"""
