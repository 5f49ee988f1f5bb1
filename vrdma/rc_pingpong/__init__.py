"""ibv_rc_pingpong, for guests of the vrdma back-end.

rdma-core's ``libibverbs/examples/rc_pingpong.c`` connects two RC QPs over a
TCP side channel and bounces one SEND back and forth. This package does the
same over :mod:`guest_lib`, compatibly enough that an unmodified
``ibv_rc_pingpong`` on the other end (e.g. a host with kernel rxe) can be
either peer:

- :mod:`.exchange`: the 52-byte ``LID:QPN:PSN:GID`` message (pure codec);
- :mod:`.oob`: the blocking TCP exchange (port 18515, server and client);
- :mod:`.pingpong`: the verbs resources, the QP connection and the ping-pong
  loop with rc_pingpong's work-request scheduling;
- :mod:`.errors`: the errors, each carrying the line rc_pingpong prints.

The command line is :mod:`vrdma.commands.rc_pingpong` (``vrdma rc-pingpong``).
"""
