"""Host transports: how a guest QP reaches its peer QP.

:mod:`fabric.base` declares the interfaces (the :class:`~fabric.base.Fabric`
a device core is given, the message shapes of the local path, and the
:class:`~fabric.base.WireQp` protocol of an engine that runs one QP);
:mod:`fabric.local` connects the QPs of one host, :mod:`fabric.roce` adds
the userspace RoCEv2 transport (:mod:`fabric.roce_qp` runs one QP on
:mod:`roce.rc`), :mod:`fabric.hca` a host RDMA device through pyverbs
(:mod:`fabric.uverbs`: the one raw uverbs command it needs).
"""
