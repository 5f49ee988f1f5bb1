"""The operator's view of a running daemon: its admin socket and protocol
(:mod:`vrdma.ops.wire`, :mod:`vrdma.ops.admin`), what the daemon's objects
say when asked (:mod:`vrdma.ops.view`), and Prometheus export
(:mod:`vrdma.ops.prom`). docs/operations.md describes them for operators."""
