"""netlab: a small network lab for multi-host tests and benchmarks.

Network namespaces joined by veth pairs (:mod:`netlab.ns`), random loss with
iptables (:mod:`netlab.loss`), a userspace L2 relay that reorders, duplicates
and drops frames without touching their bytes (:mod:`netlab.relay`), and
packet capture decoded by tshark (:mod:`netlab.capture`). Everything here
needs root and real kernel namespaces; every namespace, rule and process it
creates has one owner that releases it.
"""
from .errors import NetlabError

__all__ = ["NetlabError"]
