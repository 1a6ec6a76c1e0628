"""Timing helpers shared by the benchmark scripts."""

from __future__ import annotations

import time

import torch


def compare(*fns, repeat: int = 3) -> list[float]:
    """Best wall time of each function over `repeat` interleaved rounds after one warm-up (fair under load)."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return best


def timed(fn, repeat: int = 3) -> float:
    """Best wall time of `repeat` runs after one warm-up."""
    return compare(fn, repeat=repeat)[0]


def row(name: str, ours: float, ref: float, unit: str = "s", higher_is_better: bool = False, width: int = 46) -> None:
    """Print one measurement; the ratio is always blipkit's advantage (> 1 means blipkit is better)."""
    ratio = ours / ref if higher_is_better else ref / ours
    print(f"{name:<{width}} blipkit {ours:9.4f} {unit}   transformers {ref:9.4f} {unit}   ratio {ratio:6.2f}x")


def memory_bandwidth(megabytes: int = 1200) -> float:
    """Bytes/s that one-row matrix products stream from memory (weights far larger than the caches).

    Decoding one token multiplies one row by every weight matrix, so this rate bounds how fast any implementation
    can decode with weights of a given size.
    """
    weights = [torch.randn(3072, 768) for _ in range(megabytes * 2**20 // (3072 * 768 * 4))]
    x = torch.randn(1, 768)

    def run() -> None:
        for w in weights:
            torch.nn.functional.linear(x, w)

    return sum(w.numel() * 4 for w in weights) / timed(run, 2)


def streamed_bytes(module: torch.nn.Module, skip: tuple[str, ...] = ("position", "token_type")) -> int:
    """Bytes of `module`'s weights one decoding step reads (tied weights once; looked-up tables skipped)."""
    seen, total = set(), 0
    for name, p in module.named_parameters():
        if p.data_ptr() in seen or any(s in name for s in skip):
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total
