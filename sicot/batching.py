"""Dynamic batching across threads: the items of concurrent callers go through one call of a function.

A web server runs each request in a thread of its own; a `Batcher` lets those threads share one model
call instead of making one each. The callers themselves take turns running a batch, one batch at a
time: a caller whose items are still waiting when no batch runs gathers the waiting items (first giving
other callers until `max_wait_s` after the oldest of them arrived to join, unless `max_batch` are
already waiting), runs the function on up to `max_batch` of them, hands every caller its results, and
leads again if its own items were not among them. While one batch runs the next one fills, so under
load batches grow without any waiting. The batcher has no thread of its own: there is nothing to start
or stop, and a server's graceful shutdown (finish the requests in flight) is all it needs.
"""
from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Sequence
from time import monotonic
from typing import Any


class BatchError(RuntimeError):
    """The batch a caller's items ran in failed; raised in every caller whose items were in it."""


class _Slot:
    """One item on its way through a batch, and what came of it."""
    __slots__ = ("item", "arrived", "done", "result", "error")

    def __init__(self, item: Any, arrived: float):
        self.item, self.arrived = item, arrived
        self.done, self.result, self.error = False, None, None


class Batcher:
    """`batcher(items)` returns `fn(items)` as if called alone, but runs together with the items of other
    threads calling at the same time. `fn` maps a list of items to a list of results, one per item, each
    independent of the other items in the list (a model's forward pass in eval mode)."""

    def __init__(self, fn: Callable[[list], Sequence], max_batch: int, max_wait_s: float):
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait_s >= 0, got {max_batch} and {max_wait_s}")
        self.fn, self.max_batch, self.max_wait_s = fn, max_batch, max_wait_s
        self._changed = threading.Condition()  # guards everything below; notified when any of it changes
        self._waiting: collections.deque[_Slot] = collections.deque()
        self._running = False

    def __call__(self, items: Sequence) -> list:
        now = monotonic()
        slots = [_Slot(item, now) for item in items]
        with self._changed:
            self._waiting.extend(slots)
            self._changed.notify_all()  # a caller gathering a batch may now have enough
            while not all(slot.done for slot in slots):
                if self._running:
                    self._changed.wait()
                else:
                    self._lead()
        failed = next((slot.error for slot in slots if slot.error is not None), None)
        if failed is not None:
            raise BatchError(f"the batch these items ran in failed: {failed}") from failed
        return [slot.result for slot in slots]

    def _lead(self) -> None:
        """Gather and run one batch. Called holding the lock, while no batch runs."""
        self._running = True
        try:
            deadline = self._waiting[0].arrived + self.max_wait_s
            while len(self._waiting) < self.max_batch and (left := deadline - monotonic()) > 0:
                self._changed.wait(left)
            batch = [self._waiting.popleft() for _ in range(min(self.max_batch, len(self._waiting)))]
            self._changed.release()  # others queue up for the next batch meanwhile
            try:
                self._run(batch)
            finally:
                self._changed.acquire()
        finally:
            self._running = False
            self._changed.notify_all()

    def _run(self, batch: list[_Slot]) -> None:
        try:
            results = list(self.fn([slot.item for slot in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"{len(results)} results for {len(batch)} items")
        except BaseException as exc:  # every caller in the batch hears of it; the next batch runs as usual
            for slot in batch:
                slot.error, slot.done = exc, True
            if not isinstance(exc, Exception):
                raise  # an interrupt still ends this thread, once the callers it leaves are told
            return
        for slot, result in zip(batch, results):
            slot.result, slot.done = result, True
