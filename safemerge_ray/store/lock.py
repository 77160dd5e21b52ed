"""The run lock: one run per output at a time.

The lock is an object created only if absent (`Dir.create_exclusive`: S3 `If-None-Match: *`, locally a
whole file linked into place). It names its owner and carries a lease that the running job renews; a lock
whose lease has expired (its run died without releasing it) is taken over by a conditional replace
(`Dir.replace_if_match` on the stale lock's tag), so of two runs taking it over at once only one wins.
Where the bytes live is the `Dir`'s business: nothing here knows S3 from a local disk.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

from .. import __version__
from ..errors import EnvironmentFailure, ExitStatus, SafeMergeError, first_line
from ..io import Dir, json_bytes
from .layout import LOCK, key_uri, utc_now

LEASE_S = 300.0


class LockHeld(EnvironmentFailure):
    """Another run holds the output's lock (exit status 5: nothing was done, try later)."""

    exit_code = ExitStatus.LOCKED


@dataclass
class RunLock:
    out: Dir
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)
    lease_s: float = LEASE_S
    _tag: str | None = None  # the tag of our lock object, for conditional renewals
    _stop: threading.Event = field(default_factory=threading.Event)
    _renewer: threading.Thread | None = None
    lost: str | None = None  # why a renewal failed: the run must not commit

    def _body(self) -> bytes:
        return json_bytes({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "acquired_at": utc_now(), "lease_until": time.time() + self.lease_s,
                           "tool_version": __version__})

    def acquire(self, break_lock: bool = False) -> RunLock:
        if self._write(self.out.create_exclusive, LOCK, self._body()):
            return self._start_renewing()
        held, tag = self._read()
        if held is not None and held.get("owner") == self.owner:
            # Our create reached the store but its answer was lost, and botocore's retry found our own lock.
            self._tag = tag
            return self._start_renewing()
        expired = held is None or float(held.get("lease_until", 0)) < time.time()
        if (break_lock or expired) and self._take_over(tag):
            return self._start_renewing()
        who = held or {}
        raise LockHeld(f"output {self.out.uri} is locked by another run (host {who.get('host', '?')}, pid "
                       f"{who.get('pid', '?')}, since {who.get('acquired_at', '?')}, lease until "
                       f"{_dt.datetime.fromtimestamp(float(who.get('lease_until', 0)), _dt.UTC):%H:%M:%SZ}); "
                       "nothing was done. If that run is dead, its lease expires by itself; or rerun with --break-lock")

    def release(self) -> None:
        """Never raises: a lock that cannot be removed (the store is down) expires with its lease."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=30)
        try:
            held, _ = self._read()
            if held is not None and held.get("owner") == self.owner:
                self.out.delete([LOCK])
        except Exception as exc:  # noqa: BLE001  # botocore's errors included
            print(f"warning: could not release the run lock {key_uri(self.out, LOCK)} ({first_line(exc)}); it expires "
                  f"by itself within {self.lease_s:.0f} s", file=sys.stderr, flush=True)

    def confirm(self) -> None:
        """Raise unless this run still holds the lock: checked from the store itself, not from the renewals'
        last word, just before any pointer moves (a short run may end between two renewals)."""
        if self.lost:
            raise LockHeld(f"{self.lost}; this run committed nothing")
        held, _ = self._read()
        if held is None or held.get("owner") != self.owner:
            raise LockHeld(f"the run lock on {self.out.uri} was taken over by another run; this run committed nothing")

    def _take_over(self, tag: str | None) -> bool:
        """Replace the lock we read (by its tag), or create it if it vanished meanwhile: exclusive either way."""
        if tag is None:
            return self._write(self.out.create_exclusive, LOCK, self._body())
        return self._write(self.out.replace_if_match, LOCK, self._body(), tag)

    def _renew(self) -> None:
        held, _ = self._read()
        if held is None or held.get("owner") != self.owner:
            raise LockHeld(f"the run lock on {self.out.uri} was taken over by another run")
        if self._tag is None or not self._write(self.out.replace_if_match, LOCK, self._body(), self._tag):
            held, tag = self._read()  # a lost answer to our own renewal changed the tag under us
            if held is None or held.get("owner") != self.owner:
                raise LockHeld(f"the run lock on {self.out.uri} was taken over by another run")
            self._tag = tag

    def _read(self) -> tuple[dict | None, str | None]:
        """The lock's body and tag; (None, tag) for a damaged lock (it is expired), (None, None) for none."""
        try:
            found = self.out.read_tagged(LOCK)
        except SafeMergeError as exc:
            raise EnvironmentFailure(f"cannot read the run lock {key_uri(self.out, LOCK)}: {exc}") from None
        if found is None:
            return None, None
        try:
            body = json.loads(found[0])
        except ValueError:
            return None, found[1]
        return (body if isinstance(body, dict) else None), found[1]

    def _write(self, conditional, *args) -> bool:
        """A conditional write of the lock; keeps the new tag when it wins."""
        try:
            tag = conditional(*args)
        except (SafeMergeError, OSError) as exc:
            raise EnvironmentFailure(f"cannot write the run lock {key_uri(self.out, LOCK)}: {exc}") from None
        if tag is None:
            return False
        self._tag = tag
        return True

    def _start_renewing(self) -> RunLock:
        def renew() -> None:
            while not self._stop.wait(self.lease_s / 3):
                try:
                    self._renew()
                except SafeMergeError as exc:
                    self.lost = str(exc)
                    return

        self._renewer = threading.Thread(target=renew, name="safemerge-lock-lease", daemon=True)
        self._renewer.start()
        return self
