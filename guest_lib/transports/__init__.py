"""Implementations of :class:`guest_lib.transport.VirtioTransport`.

* :mod:`guest_lib.transports.vhost_user`: a process guest as its own
  vhost-user front-end (the transport ``Context(path)`` opens).
"""
