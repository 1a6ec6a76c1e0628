"""`blipkit serve` under load, on loopback: requests/s and latency with request batching on and off.

    python benchmarks/bench_serve.py                  # 1, 4, 16, 64 concurrent clients on /api/match
    python benchmarks/bench_serve.py --clients 16 --seconds 10

Starts `blipkit serve` (the shipped scenes-blip) twice in a subprocess on a free 127.0.0.1 port, once with
batching (--max-batch 64 --max-wait-ms 5) and once without (--max-batch 1), and drives each with N concurrent
clients, each sending one image and three texts to /api/match again and again; every level stops after --requests
requests or --seconds seconds, whichever comes first. Prints p50 / p99 latency, requests/s, errors, and the ratio of
batched to unbatched requests/s; then how fast bad inputs (a decompression bomb, a non-image, an oversized body) are
refused.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
IMAGE = (ROOT / "examples" / "red-circle-blue-square.png").read_bytes()
TEXTS = ["a red circle left of a blue square", "a green triangle", "a yellow star"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(max_batch: int, max_wait_ms: float) -> tuple[subprocess.Popen, str]:
    """`blipkit serve` in a subprocess; returns it and its base URL once /api/health answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "blipkit.cli", "serve", "--port", str(port), "--max-batch", str(max_batch),
           "--max-wait-ms", str(max_wait_ms), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"blipkit serve exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/api/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("blipkit serve did not start in 120 s")


async def load(url: str, clients: int, requests: int, seconds: float) -> dict:
    """`clients` concurrent loops of /api/match until `requests` are done or `seconds` have passed."""
    latencies: list[float] = []
    errors = 0
    sent = 0
    stop = time.monotonic() + seconds
    files = [("image", ("scene.png", IMAGE, "image/png"))]

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors, sent
        while sent < requests and time.monotonic() < stop:
            sent += 1
            t = time.perf_counter()
            try:
                r = await http.post(url + "/api/match", files=files, data={"texts": TEXTS})
                ok = r.status_code == 200 and len(r.json()["results"][0]["matches"]) == len(TEXTS)
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - t)
            errors += not ok

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=120) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - start
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))]

    return {"n": len(latencies), "errors": errors, "rps": len(latencies) / wall, "p50": pct(0.5), "p99": pct(0.99)}


def bomb_png() -> bytes:
    """A PNG whose header claims 100000 x 100000 pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND",
                                                                                                           b"")


def refusals(url: str) -> None:
    """How fast bad inputs are refused (best of 5)."""
    cases = {
        "decompression bomb (100000x100000 PNG)": dict(files=[("image", ("b.png", bomb_png(), "image/png"))],
                                                       data={"texts": TEXTS}),
        "not an image": dict(files=[("image", ("x.png", b"hello" * 100, "image/png"))], data={"texts": TEXTS}),
        "truncated PNG": dict(files=[("image", ("t.png", IMAGE[:400], "image/png"))], data={"texts": TEXTS}),
        "25 MB body (over the 20 MB limit)": dict(content=b"x" * (25 << 20),
                                                  headers={"content-type": "application/json"}),
    }
    with httpx.Client(timeout=60) as http:
        for name, kwargs in cases.items():
            best, status = float("inf"), None
            for _ in range(5):
                t = time.perf_counter()
                status = http.post(url + "/api/match", **kwargs).status_code
                best = min(best, time.perf_counter() - t)
            print(f"  {name:<40} HTTP {status}  {best * 1000:7.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--requests", type=int, default=400, help="most requests per level (default 400)")
    parser.add_argument("--seconds", type=float, default=20, help="longest time per level (default 20)")
    args = parser.parse_args()

    results: dict[str, dict[int, dict]] = {}
    for mode, (batch, wait) in {"batched": (64, 5.0), "unbatched": (1, 0.0)}.items():
        proc, url = start(batch, wait)
        try:
            asyncio.run(load(url, 4, 20, 30))  # warm-up
            results[mode] = {}
            for c in args.clients:
                results[mode][c] = r = asyncio.run(load(url, c, args.requests, args.seconds))
                print(f"{mode:<10} {c:>3} clients: {r['n']:4d} requests  {r['rps']:7.1f} req/s  p50 "
                      f"{r['p50'] * 1000:7.1f} ms  p99 {r['p99'] * 1000:7.1f} ms  errors {r['errors']}", flush=True)
            if mode == "batched":
                print("refusals:")
                refusals(url)
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    print("\n/api/match, one image + 3 texts per request, scenes-blip, loopback")
    print(f"{'clients':>7}  {'batched req/s':>13}  {'p50 / p99 ms':>15}  {'unbatched req/s':>15}  "
          f"{'p50 / p99 ms':>15}  {'ratio':>6}  errors")
    for c in args.clients:
        b, u = results["batched"][c], results["unbatched"][c]
        print(f"{c:>7}  {b['rps']:13.1f}  {b['p50'] * 1000:6.0f} / {b['p99'] * 1000:6.0f}  {u['rps']:15.1f}  "
              f"{u['p50'] * 1000:6.0f} / {u['p99'] * 1000:6.0f}  {b['rps'] / u['rps']:5.2f}x  "
              f"{b['errors'] + u['errors']}")


if __name__ == "__main__":
    main()
