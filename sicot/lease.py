"""A lease: one holder at a time among processes and machines that share nothing but a store.

The lease is a small JSON object (owner, expiry, a nonce) written with `storage.swap`'s
compare-and-swap (S3 conditional writes, a file lock locally), so of two contenders only one write
lands. The holder renews it every third of `ttl_s` from a background thread; a holder that dies stops
renewing, and once the expiry has passed the next contender takes the lease over, swapping against
the dead holder's token. Release writes a "released" state, again by swap, so it only ever frees a
lease that is still ours (the store has no conditional delete). Expiry times are wall-clock: machines
sharing a lease need clocks that agree to well within `ttl_s`.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator

from sicot import storage


class LeaseTimeout(TimeoutError):
    """Gave up waiting: another owner held the lease throughout."""


class LeaseLost(RuntimeError):
    """The lease expired and was taken over while we believed we held it."""


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Lease:
    def __init__(self, uri: str, owner: str, ttl_s: float):
        self.uri, self.owner, self.ttl_s = uri, owner, ttl_s
        self.holder: dict | None = None  # the other owner's state, seen while waiting
        self._token: str | None = None
        self._lost: str | None = None
        self._mutex = threading.Lock()  # the renewing thread and the owner's thread share the token
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _state(self, held: bool) -> bytes:
        # The nonce makes every write's bytes unique, so a token can never match a later, equal-looking state.
        return json.dumps({"owner": self.owner, "held": held, "expires": time.time() + self.ttl_s if held else 0,
                           "nonce": uuid.uuid4().hex}).encode()

    def _write(self, held: bool, expected: str | None) -> bool:
        data = self._state(held)
        if not storage.swap(self.uri, data, expected):
            return False
        current, token = storage.read_versioned(self.uri)
        if current != data:  # overwritten between our write and the read: not ours any more
            return False
        self._token = token
        return True

    def _read(self) -> tuple[dict | None, str | None]:
        data, token = storage.read_versioned(self.uri)
        if data is None:
            return None, None
        try:
            state = json.loads(data)
            lease = {"owner": str(state["owner"]), "held": bool(state["held"]), "expires": float(state["expires"])}
            return lease, token
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{self.uri}: not a lease (expected JSON with owner, held, expires)") from None

    def try_acquire(self) -> bool:
        state, token = self._read()
        if state is not None and state["held"] and state["expires"] > time.time():
            self.holder = state
            return False
        return self._write(True, token)

    def acquire(self, wait_s: float, poll_s: float = 1.0) -> None:
        deadline = time.monotonic() + wait_s
        while not self.try_acquire():
            left = deadline - time.monotonic()
            if left <= 0:
                holder = self.holder or {"owner": "another owner", "expires": time.time()}
                raise LeaseTimeout(f"{self.uri}: held by {holder['owner']} (expires in "
                                   f"{holder['expires'] - time.time():.0f} s unless renewed); gave up after "
                                   f"waiting {wait_s:.0f} s")
            time.sleep(min(poll_s, left))
        self._renewer = threading.Thread(target=self._renew_until_stopped, name=f"lease {self.uri}", daemon=True)
        self._renewer.start()

    def renew(self) -> None:
        """Extend the expiry; LeaseLost when another owner took the lease over."""
        with self._mutex:
            if self._lost is None and not self._write(True, self._token):
                self._lost = f"{self.uri}: lease of {self.owner} expired and was taken over"
            if self._lost is not None:
                raise LeaseLost(self._lost)

    def _renew_until_stopped(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except LeaseLost:
                return
            except Exception:  # a store hiccup (network, throttling): try again before the expiry
                continue

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        with self._mutex:
            if self._lost is None and self._token is not None:
                self._write(False, self._token)
            self._token = None


@contextlib.contextmanager
def lease(uri: str, owner: str | None = None, ttl_s: float = 120.0, wait_s: float = 600.0,
          poll_s: float = 1.0) -> Iterator[Lease]:
    """Hold the lease at `uri` for the block, waiting up to `wait_s` for another owner to let go.

    Call `renew()` on the yielded lease right before a step that must not happen without it: it
    raises LeaseLost if the lease was taken over (a pause longer than `ttl_s`)."""
    held = Lease(uri, owner or default_owner(), ttl_s)
    held.acquire(wait_s, poll_s)
    try:
        yield held
    finally:
        held.release()
