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
  ``oracle`` reference) and the explainable :class:`~scheduler.decide.Decision`;
- :mod:`scheduler.wire`: the load datagram (HMAC-SHA256) and the seqlocked
  counters region for one-sided READs; pure codecs;
- :mod:`scheduler.gossip`: the announcer and listener (sans-I/O) and the UDP
  backend (:data:`~scheduler.gossip.LOAD_PORT`, broadcast or unicast peers);
- :mod:`scheduler.redis_table`: the Redis backend (rows as keys with a TTL,
  pub/sub, reconnecting);
- :mod:`scheduler.exchange`: :class:`~scheduler.exchange.LoadExchange`, what
  the daemon builds: the advertisement timer and the table fed from either
  backend.

The table and the policies do no I/O: ``now`` is passed in. Only the
backends' thin asyncio adapters (gossip, redis_table, exchange) touch sockets.
"""
