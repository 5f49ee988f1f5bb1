"""Stubs for roce._auth (see _auth.pyx)."""

class MacKey:
    def __init__(self, key: bytes) -> None: ...
    def tag(self, pseudo: bytes, packet: bytes, counter: int) -> bytes: ...

class Window:
    def accept(self, c: int) -> bool: ...

class RxAuth:
    key: MacKey
    version: int
    plain: frozenset[bytes]
    windows: dict
    opened: int
    failed: int
    replayed: int
    short: int
    plaintext: int
    def __init__(self, mac_key: bytes, local_ip: str, local_port: int, plain=...) -> None: ...

class TxAuth:
    key: MacKey
    counter: int
    sealed: int
    def __init__(self, mac_key: bytes, counter: int) -> None: ...
    def take(self) -> int: ...
