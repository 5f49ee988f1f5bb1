"""Daemon-to-daemon links: accelerator jobs shipped to another host over RDMA
(docs/peering.md).

- :mod:`peering.wire`: the connect datagram and the link messages (pure codecs);
- :mod:`peering.link`: one RC link to one peer daemon (connection, liveness,
  message buffers, the windows the peer may access), sans-I/O;
- :mod:`peering.remote`: :class:`~peering.remote.PeerTarget`, the peer as a
  target of the accelerator router and this host as the peer's server;
- :mod:`peering.service`: all links of a daemon and their asyncio adapter.
"""
