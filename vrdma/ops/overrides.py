"""Live tenant overrides kept on disk (``vrdma backend --state-dir DIR``).

``vrdma ctl tenant set`` changes a tenant's class, weight or quotas live
(:meth:`vhost_user.tenancy.TenantLedger.set_tenant`); the ledger keeps them
across SIGHUP reloads until ``vrdma ctl tenant reset``. This module keeps them
across daemon restarts too: :class:`OverrideStore` writes the ledger's
:meth:`~vhost_user.tenancy.TenantLedger.live_state` to
``DIR/tenant-overrides.json`` after every change (a temporary file renamed into
place, mode 0600: a crash leaves the old file or the new one, never half of
one) and a restarted daemon restores them. A file that cannot be read, is not
JSON or holds an invalid override is logged and ignored (the file's entries
apply): never fatal.

File format: one JSON object, ``{"version": 1, "tenants": {NAME: {FIELD: VALUE}}}``
where FIELD is ``class`` (``low``/``normal``/``high``), ``weight`` or a quota name.
"""
from __future__ import annotations

import json
import logging
import os

log = logging.getLogger(__name__)

FILE_NAME = "tenant-overrides.json"
VERSION = 1
#: a larger file is not read (a few thousand tenants' overrides fit)
MAX_BYTES = 4 << 20


class OverrideStore:
    """The overrides file of one daemon; ``attach(ledger)`` restores and then saves on change."""

    def __init__(self, state_dir: str):
        self.path = os.path.join(state_dir, FILE_NAME)
        self.saves = 0
        self.save_errors = 0
        self.ledger = None

    def attach(self, ledger) -> dict:
        """Restore the saved overrides into ``ledger`` (logged; a bad file is logged and
        ignored) and save them after each of its changes. Returns what was restored."""
        restored: dict = {}
        state = self._read()
        if state:
            from vhost_user.tenancy import PolicyError

            try:
                restored = ledger.restore_live(state)
            except PolicyError as e:
                log.error("tenant overrides %s ignored: %s", self.path, e)
        for name, fields in restored.items():
            log.warning("tenant %s: live overrides restored from %s: %s", name, self.path,
                        ", ".join(f"{k}={v}" for k, v in sorted(fields.items())))
        self.ledger = ledger
        ledger.on_change.append(self.save)
        return restored

    def _read(self) -> dict | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as e:
            log.error("tenant overrides %s ignored: %s", self.path, e)
            return None
        if len(data) > MAX_BYTES:
            log.error("tenant overrides %s ignored: larger than %d bytes", self.path, MAX_BYTES)
            return None
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            log.error("tenant overrides %s ignored: not JSON: %s", self.path, e)
            return None
        ok = isinstance(doc, dict) and doc.get("version") == VERSION and isinstance(doc.get("tenants"), dict)
        if not ok:
            log.error("tenant overrides %s ignored: not a version %d overrides file", self.path, VERSION)
            return None
        return doc["tenants"]

    def save(self) -> None:
        """Write the ledger's overrides now (on its loop; a few hundred bytes)."""
        if self.ledger is None:
            return
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"version": VERSION, "tenants": self.ledger.live_state()}, f,
                          indent=1, sort_keys=True)
            os.replace(tmp, self.path)
            self.saves += 1
        except OSError as e:
            self.save_errors += 1
            log.error("tenant overrides not saved to %s: %s", self.path, e)
            try:
                os.unlink(tmp)
            except OSError:
                pass
