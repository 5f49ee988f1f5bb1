"""The cluster scheduler: where an accelerator job runs (issue 15).

Every host keeps a load table of all hosts (:mod:`scheduler.table`) and,
when one of its guests submits a job, asks one decision function
(:func:`scheduler.decide.decide`) whether to run it here or ship it to
another host. The same code is driven by the daemon (later) and by the
discrete-event simulator ``python -m bench.sched_sim``.

- :mod:`scheduler.errors`: the package's error base and its subclasses;
- :mod:`scheduler.table`: load-table rows, the table (expiry after
  :data:`~scheduler.table.DROP_AFTER_PERIODS` silent periods) and a host's
  own sends since each peer's last update; pure, ``now`` passed in;
- :mod:`scheduler.decide`: the policies (``seed``, ``local``, ``random``,
  ``p2c``, ``probe``, each optionally with own-send accounting, and the
  ``oracle`` reference) and the explainable :class:`~scheduler.decide.Decision`.

No I/O anywhere in this package: dissemination (datagrams, Redis, RDMA
READs) is the daemon's, and reaches these modules as rows and callables.
"""
