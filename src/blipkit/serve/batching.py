"""Request batching: concurrent calls of one kind are gathered into one model call and their results split back.

    batcher = Batcher(max_batch=16, max_wait_ms=5)
    result = await batcher.submit("caption", image, run, key=options)   # run(list of items) -> list of results

Calls of the same kind and key wait together, up to `max_batch` items or `max_wait_ms` after the first of them arrived,
then `run` gets the whole list on the batcher's one worker thread. Every model call of the server goes through that
thread, one at a time: the model's CPU-bound kernels would only fight over the cores if several ran at once, and no
two calls ever share the model's state. A batch that fails with a BlipkitError is run again item by item, so one bad
request gets its own error and the others their results. Waiting is on a thread, not on an event loop, so the
batcher serves any loop (uvicorn's, or TestClient's one per request).

An `eager` batcher does not make sequential traffic wait: when the last batch of a kind was a single item and no
request announced by `coming()` is on its way (being received and decoded), a lone item runs at once instead of
waiting out `max_wait_ms` for company that will not come. Clients that came together (the last batch had several)
still wait for each other.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ..errors import BlipkitError

Run = Callable[[list[Any]], list[Any]]


@dataclass
class _Group:
    """Items waiting under one key, with the function that runs them and the time the first arrived."""

    kind: str
    run: Run
    limit: int
    first: float
    items: list[tuple[Any, Future]] = field(default_factory=list)


class Batcher:
    """Gathers concurrent items of one key into one `run` call (at most `max_batch`, waiting at most `max_wait_ms`).

    Args:
        max_batch: most items per call; 1 turns batching off (every item runs alone).
        max_wait_ms: longest an item waits for others after the first of its batch arrived.
        on_batch: called after each batch as `on_batch(kind, size, seconds)` (metrics).
        eager: run a lone item at once when its kind's last batch was one item and no request announced by
            `coming()` is on its way.
    """

    def __init__(self, max_batch: int = 16, max_wait_ms: float = 5.0,
                 on_batch: Callable[[str, int, float], None] | None = None, eager: bool = False) -> None:
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch={max_batch}, max_wait_ms={max_wait_ms}: use max_batch >= 1, max_wait_ms >= 0")
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000
        self.on_batch, self.eager = on_batch, eager
        self._coming = 0  # requests announced by coming() that have not submitted yet
        self._last: dict[str, int] = {}  # size of each kind's last batch
        self._groups: dict[Hashable, _Group] = {}  # insertion order: the oldest key first
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit_future(self, kind: str, item: Any, run: Run, key: Hashable = (), batch: bool = True) -> Future:
        """Queue `item` with the others of its `kind` and `key`; the Future gets `run([..., item, ...])`'s result
        for it (or its error). Items batch together only when their key (e.g. their options) is equal.

        `batch=False` runs the item alone (still on the worker thread, in turn with the others).
        """
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="blipkit-batcher", daemon=True)
                self._thread.start()
            key = (kind, key if batch else object())  # an item that does not batch gets a key of its own
            group = self._groups.get(key)
            if group is None:
                group = self._groups[key] = _Group(kind, run, self.max_batch if batch else 1, time.monotonic())
            group.items.append((item, future))
            self._cond.notify()
        return future

    @contextmanager
    def coming(self) -> Iterator[Callable[[], None]]:
        """Announce a request that is on its way (its body being read and decoded) until it calls the function this
        yields, right after submitting, or leaves the block (e.g. refused): an eager batcher waits only for these."""
        with self._cond:
            self._coming += 1
        pending = [True]

        def arrived() -> None:
            with self._cond:
                if pending[0]:
                    pending[0] = False
                    self._coming -= 1
                    self._cond.notify()

        try:
            yield arrived
        finally:
            arrived()

    def queued(self) -> int:
        """How many items wait for their batch to start."""
        with self._cond:
            return sum(len(group.items) for group in self._groups.values())

    async def submit(self, kind: str, item: Any, run: Run, key: Hashable = (), batch: bool = True,
                     arrived: Callable[[], None] | None = None) -> Any:
        """`submit_future` awaited on the running event loop; `arrived` (from `coming()`) is called once the item is
        queued, so that an eager batcher need not wait for it any more."""
        future = self.submit_future(kind, item, run, key, batch)
        if arrived is not None:
            arrived()
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        """Finish the queued items, then stop the worker thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join()

    # ------------------------------------------------------------------ worker thread
    def _next(self) -> tuple[_Group, list[tuple[Any, Future]]] | None:
        """Wait for the oldest key's batch to fill or time out, and take it (None once closed and drained)."""
        with self._cond:
            while True:
                if not self._groups:
                    if self._closed:
                        return None
                    self._cond.wait()
                    continue
                key, group = next(iter(self._groups.items()))
                left = group.first + self.max_wait - time.monotonic()
                # a lone request of sequential traffic (its kind's last batch was one request too, and nothing else
                # is on its way) runs at once; clients that came together wait for each other, as they did before
                alone = self.eager and self._coming == 0 and self._last.get(group.kind, 1) <= 1
                if len(group.items) >= group.limit or left <= 0 or self._closed or alone:
                    taken, group.items = group.items[: group.limit], group.items[group.limit :]
                    self._last[group.kind] = len(taken)
                    if group.items:  # the rest waits as a new batch, behind the other keys
                        del self._groups[key]
                        group.first = time.monotonic()
                        self._groups[key] = group
                    else:
                        del self._groups[key]
                    return group, taken
                self._cond.wait(left)

    def _work(self) -> None:
        while (nxt := self._next()) is not None:
            group, taken = nxt
            live = [(item, fut) for item, fut in taken if fut.set_running_or_notify_cancel()]
            if not live:
                continue
            start = time.perf_counter()
            self._run(group.run, live)
            if self.on_batch is not None:
                self.on_batch(group.kind, len(live), time.perf_counter() - start)

    @staticmethod
    def _run(run: Run, live: list[tuple[Any, Future]]) -> None:
        """Run a batch; after a BlipkitError in a batch of several, each item alone (its own result or error)."""
        try:
            results = run([item for item, _ in live])
            if len(results) != len(live):
                raise RuntimeError(f"a batch of {len(live)} items gave {len(results)} results")
        except BlipkitError as e:
            if len(live) == 1:
                live[0][1].set_exception(e)
                return
            for item, fut in live:
                try:
                    fut.set_result(run([item])[0])
                except Exception as one:  # noqa: BLE001 - each caller gets its own error
                    fut.set_exception(one)
            return
        except Exception as e:  # noqa: BLE001 - a bug: every caller of the batch sees it, the worker goes on
            for _, fut in live:
                fut.set_exception(e)
            return
        for (_, fut), result in zip(live, results, strict=True):
            fut.set_result(result)
