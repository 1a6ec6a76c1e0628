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

A `gather` batcher (a fraction, e.g. 0.5) goes further for clients that take turns: closed-loop clients (each sends
its next request when its answer comes back) split into halves, one half's requests queueing while the model runs
the other's, so every call takes about half of them and pays the call's fixed cost twice. When the model becomes
free, a gather batcher waits for as many requests of the kind as its last call had in flight (the call's own, plus
those that queued or were on their way while it ran), capped by `max_batch`, counting the requests on their way now;
a call starts once that many are queued, or when `gather` times the kind's last call (at least `max_wait_ms`) has
passed since the model became free. A lone client's last call had one request in flight, so its next one starts at
once; when clients leave, the count falls with the next call. The rule is `gather_wait`.
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


def gather_wait(queued: int, coming: int, limit: int, recent: int, free: float, first: float, last: float,
                gather: float, max_wait: float, now: float) -> float:
    """Seconds a gathering batch still waits once the model is free (<= 0: start it now).

    Args:
        queued: the batch's requests already queued; coming: requests on their way (of any kind).
        limit: the most the batch takes; recent: requests its kind had in flight during its last call.
        free: when the model became free; first: when the batch's first request arrived; last: the seconds of the
            kind's last call; gather: the fraction of `last` the model may wait; max_wait: the least it may wait.
        now: the clock (the same one as `free` and `first`).
    """
    want = min(limit, max(recent, queued + coming))
    if queued >= want:
        return 0.0
    return max(free, first) + max(max_wait, gather * last) - now


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
        gather: when above 0, the gathering rule instead (`gather_wait`): a free model waits for as many items as
            the kind's last call had in flight, at most this fraction of that call (and at least `max_wait_ms`).
        clock: the time in seconds (tests pass a fake one).
    """

    def __init__(self, max_batch: int = 16, max_wait_ms: float = 5.0,
                 on_batch: Callable[[str, int, float], None] | None = None, eager: bool = False,
                 gather: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        if max_batch < 1 or max_wait_ms < 0 or gather < 0:
            raise ValueError(f"max_batch={max_batch}, max_wait_ms={max_wait_ms}, gather={gather}: use max_batch >= 1, "
                             "max_wait_ms >= 0, gather >= 0")
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000
        self.on_batch, self.eager, self.gather, self.clock = on_batch, eager, gather, clock
        self._coming = 0  # requests announced by coming() that have not submitted yet
        self._last: dict[str, int] = {}  # size of each kind's last batch
        self._recent: dict[str, tuple[int, float]] = {}  # each kind's last call: requests in flight, seconds
        self._free = clock()  # when the model last became free
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
                group = self._groups[key] = _Group(kind, run, self.max_batch if batch else 1, self.clock())
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
                now = self.clock()
                if self.gather > 0:
                    recent, last = self._recent.get(group.kind, (1, 0.0))
                    left = gather_wait(len(group.items), self._coming, group.limit, recent, self._free, group.first,
                                       last, self.gather, self.max_wait, now)
                    alone = False
                else:
                    left = group.first + self.max_wait - now
                    # a lone request of sequential traffic (its kind's last batch was one request too, and nothing
                    # else is on its way) runs at once; clients that came together wait for each other
                    alone = self.eager and self._coming == 0 and self._last.get(group.kind, 1) <= 1
                if len(group.items) >= group.limit or left <= 0 or self._closed or alone:
                    taken, group.items = group.items[: group.limit], group.items[group.limit :]
                    self._last[group.kind] = len(taken)
                    if group.items:  # the rest waits as a new batch, behind the other keys
                        del self._groups[key]
                        group.first = now
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
            start = self.clock()
            self._run(group.run, live)
            end = self.clock()
            seconds = end - start
            with self._cond:
                # in flight during the call: its own requests, and those that queued or were on their way meanwhile
                waiting = sum(len(g.items) for g in self._groups.values() if g.kind == group.kind)
                self._recent[group.kind] = (len(live) + waiting + self._coming, seconds)
                self._free = end
            if self.on_batch is not None:
                self.on_batch(group.kind, len(live), seconds)

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
