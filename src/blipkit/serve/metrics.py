"""Counters and histograms of the server in Prometheus' text format: requests, their latency, batch sizes."""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += 1

    def lines(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{edge:g}"}} {n}' for edge, n in zip(self.buckets, self.counts,
                                                                                    strict=True)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        out.append(f"{name}_sum{{{labels}}} {self.sum:.6f}")
        out.append(f"{name}_count{{{labels}}} {self.count}")
        return out


class Metrics:
    """What `/metrics` shows; safe to update from the event loop and the model thread at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self._latency: dict[str, _Histogram] = {}
        self._batches: dict[str, _Histogram] = {}
        self._batch_seconds: dict[str, _Histogram] = {}

    def request(self, path: str, method: str, status: int, seconds: float) -> None:
        """Count one finished request and its latency."""
        with self._lock:
            self._requests[(path, method, status)] += 1
            self._latency.setdefault(path, _Histogram(LATENCY_BUCKETS)).observe(seconds)

    def batch(self, kind: str, size: int, seconds: float) -> None:
        """Count one model call of `size` requests that took `seconds`."""
        with self._lock:
            self._batches.setdefault(kind, _Histogram(BATCH_BUCKETS)).observe(size)
            self._batch_seconds.setdefault(kind, _Histogram(LATENCY_BUCKETS)).observe(seconds)

    def render(self) -> str:
        """The Prometheus text exposition (version 0.0.4)."""
        with self._lock:
            lines = ["# HELP blipkit_requests_total HTTP requests by path, method and status.",
                     "# TYPE blipkit_requests_total counter"]
            lines += [f'blipkit_requests_total{{path="{p}",method="{m}",status="{s}"}} {n}'
                      for (p, m, s), n in sorted(self._requests.items())]
            for name, help_, table in (
                ("blipkit_request_seconds", "Request latency in seconds, by path.", self._latency),
                ("blipkit_batch_size", "Requests per model call, by kind.", self._batches),
                ("blipkit_batch_seconds", "Duration of a model call in seconds, by kind.", self._batch_seconds),
            ):
                lines += [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
                key = "path" if table is self._latency else "kind"
                for label, hist in sorted(table.items()):
                    lines += hist.lines(name, f'{key}="{label}"')
        return "\n".join(lines) + "\n"
