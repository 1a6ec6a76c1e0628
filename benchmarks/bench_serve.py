"""`blipkit serve` under load, on loopback: requests/s and latency with request batching on and off.

    python benchmarks/bench_serve.py                         # 1, 4, 16, 64 concurrent clients on /api/match
    python benchmarks/bench_serve.py --clients 16 --seconds 10 --threads 2
    python benchmarks/bench_serve.py --load-client httpx     # drive with httpx instead of the lean client
    python benchmarks/bench_serve.py --server-args=--no-model-process   # the model calls in the server's process
    python benchmarks/bench_serve.py --clients 16 --compare-gather 0     # also a batched server with --gather 0

Starts two `blipkit serve` (the shipped scenes-blip) subprocesses on free 127.0.0.1 ports, one with batching
(--max-batch 64 --max-wait-ms 5 unless told otherwise) and one without (--max-batch 1), and drives them with N
concurrent clients, each sending one image and three texts to /api/match again and again. The two servers are
measured in alternating rounds (batched, unbatched, unbatched, batched, ...), so other work on the machine slows
both alike; each server gets --seconds seconds per level (split into the rounds), or fewer with --requests. Rounds
of equal time rather than of equal requests: the batched server's rounds would otherwise last a third as long, and
each round starts with its clients arriving together and ends with its last batches half empty.
Prints p50 / p99 latency, requests/s, errors, requests per model call, each server's CPU time per request and that
of its model process (Linux), and the ratio of batched to unbatched requests/s; then how fast bad inputs (a
decompression bomb, a non-image, an oversized body) are refused. `--compare-gather F` adds a third server, batched
with `--gather F` (e.g. 0: the rule before the gathering one), in the same alternating rounds.

The load generator runs on the same cores as the servers. By default it is a lean keep-alive HTTP/1.1 client (one
connection per client, the request bytes built once) so that it takes little of them; `--load-client httpx` uses
httpx.AsyncClient, which costs the machine a few milliseconds of CPU per request. Its CPU time per request is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
import uuid
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


def start(max_batch: int, max_wait_ms: float, threads: int | None, extra: list[str]) -> tuple[subprocess.Popen, str]:
    """`blipkit serve` in a subprocess; returns it and its base URL once /api/health answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "blipkit.cli", "serve", "--port", str(port), "--max-batch", str(max_batch),
           "--max-wait-ms", str(max_wait_ms), "--quiet"] + (["--threads", str(threads)] if threads else []) + extra
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


def match_request(host: str, port: int) -> bytes:
    """The bytes of one multipart POST /api/match: the image and the three texts."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="scene.png"\r\n'
             f"Content-Type: image/png\r\n\r\n".encode() + IMAGE + b"\r\n"]
    parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="texts"\r\n\r\n{t}\r\n'.encode() for t in TEXTS]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    head = (f"POST /api/match HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: multipart/form-data; "
            f"boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


class Connection:
    """One keep-alive HTTP/1.1 connection that sends prepared request bytes and reads back status and body."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def send(self, request: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(request)
        status = int((await self.reader.readline()).split()[1])
        length, close = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        body = await self.reader.readexactly(length)
        if close:
            await self.close()
        return status, body

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = self.reader = None


def ok(status: int, body: bytes) -> bool:
    return status == 200 and len(json.loads(body)["results"][0]["matches"]) == len(TEXTS)


async def load(url: str, clients: int, requests: int | None, seconds: float, lean: bool) -> dict:
    """`clients` concurrent loops of /api/match until `seconds` have passed (or `requests` are done)."""
    latencies: list[float] = []
    errors = sent = 0
    stop = time.monotonic() + seconds
    host, port = url.removeprefix("http://").split(":")
    prepared = match_request(host, int(port))
    files = [("image", ("scene.png", IMAGE, "image/png"))]

    async def client(http: httpx.AsyncClient | None) -> None:
        nonlocal errors, sent
        conn = Connection(host, int(port))
        while (requests is None or sent < requests) and time.monotonic() < stop:
            sent += 1
            t = time.perf_counter()
            try:
                if lean:
                    good = ok(*await conn.send(prepared))
                else:
                    r = await http.post(url + "/api/match", files=files, data={"texts": TEXTS})
                    good = ok(r.status_code, r.content)
            except (httpx.HTTPError, OSError, asyncio.IncompleteReadError, ValueError, KeyError, IndexError):
                good = False
                await conn.close()
            latencies.append(time.perf_counter() - t)
            errors += not good
        await conn.close()

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    cpu = time.process_time()
    async with httpx.AsyncClient(limits=limits, timeout=120) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - start
    return {"latencies": latencies, "errors": errors, "wall": wall, "cpu": time.process_time() - cpu}


def batches(url: str) -> tuple[int, float]:
    """(model calls, requests in them) of /api/match so far, from /metrics."""
    text = httpx.get(url + "/metrics", timeout=30).text
    calls = re.search(r'blipkit_batch_size_count\{kind="match"\} (\d+)', text)
    total = re.search(r'blipkit_batch_size_sum\{kind="match"\} ([\d.]+)', text)
    return (int(calls.group(1)), float(total.group(1))) if calls else (0, 0.0)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far (Linux; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """The processes `pid` started (its model process), from /proc (Linux; none elsewhere)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            pass
    return found


def level(servers: dict[str, tuple[subprocess.Popen, str]], clients: int, args: argparse.Namespace) -> dict:
    """Both servers at one client count, in alternating rounds; latencies, errors and times summed per server."""
    keys = ("latencies", "errors", "wall", "cpu", "server_cpu", "model_cpu")
    out = {m: {k: [] if k == "latencies" else 0 for k in keys} for m in servers}
    before = {m: batches(url) for m, (_, url) in servers.items()}
    requests = args.requests // args.rounds if args.requests else None
    for r in range(args.rounds):
        for mode in (list(servers) if r % 2 == 0 else list(servers)[::-1]):
            proc, url = servers[mode]
            kids = children(proc.pid)
            start, model_start = cpu_seconds(proc.pid), sum(map(cpu_seconds, kids))
            got = asyncio.run(load(url, clients, requests, args.seconds / args.rounds, args.load_client == "lean"))
            got["server_cpu"] = cpu_seconds(proc.pid) - start
            got["model_cpu"] = sum(map(cpu_seconds, kids)) - model_start
            for key in keys:
                out[mode][key] += got[key]
    for mode, stats in out.items():
        lat, n = sorted(stats["latencies"]), max(len(stats["latencies"]), 1)
        calls, total = (a - b for a, b in zip(batches(servers[mode][1]), before[mode], strict=True))
        stats.update(n=len(lat), rps=len(lat) / stats["wall"], p50=lat[len(lat) // 2],
                     p99=lat[min(len(lat) - 1, int(0.99 * len(lat)))], per_call=total / max(calls, 1),
                     client_ms=stats["cpu"] / n * 1000, server_ms=stats["server_cpu"] / n * 1000,
                     model_ms=stats["model_cpu"] / n * 1000)
    return out


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
    parser.add_argument("--requests", type=int, default=None,
                        help="most requests per level and server (default: as many as --seconds allows)")
    parser.add_argument("--seconds", type=float, default=20, help="time per level and server (default 20)")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds per level (default 4)")
    parser.add_argument("--threads", type=int, default=None, help="--threads of both servers (default: torch's)")
    parser.add_argument("--max-batch", type=int, default=64, help="--max-batch of the batched server (default 64)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="its --max-wait-ms (default 5)")
    parser.add_argument("--server-args", default="", help="more options of both servers, e.g. '--no-model-process'")
    parser.add_argument("--load-client", choices=["lean", "httpx"], default="lean", help="the load generator")
    parser.add_argument("--compare-gather", type=float, default=None, metavar="F",
                        help="also measure a batched server with --gather F, alternating with the other two")
    args = parser.parse_args()

    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    try:
        modes = {"batched": (args.max_batch, args.max_wait_ms, []), "unbatched": (1, 0.0, [])}
        if args.compare_gather is not None:
            modes[f"gather {args.compare_gather:g}"] = (args.max_batch, args.max_wait_ms,
                                                        [f"--gather={args.compare_gather}"])
        for mode, (batch, wait, own) in modes.items():
            servers[mode] = start(batch, wait, args.threads, args.server_args.split() + own)
            asyncio.run(load(servers[mode][1], 4, 20, 30, args.load_client == "lean"))  # warm-up
        results = {}
        for c in args.clients:
            results[c] = got = level(servers, c, args)
            for mode, r in got.items():
                print(f"{mode:<10} {c:>3} clients: {r['n']:4d} requests  {r['rps']:7.1f} req/s  p50 "
                      f"{r['p50'] * 1000:7.1f} ms  p99 {r['p99'] * 1000:7.1f} ms  errors {r['errors']}  "
                      f"{r['per_call']:4.1f} requests/call  CPU per request: server {r['server_ms']:.1f} ms, "
                      f"model process {r['model_ms']:.1f} ms, client {r['client_ms']:.1f} ms", flush=True)
        print("refusals:")
        refusals(servers["batched"][1])
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)

    threads = args.threads or "torch's default"
    print(f"\n/api/match, one image + 3 texts per request, scenes-blip, loopback, threads: {threads}, "
          f"batched: --max-batch {args.max_batch} --max-wait-ms {args.max_wait_ms:g} (other options: the server's "
          f"defaults{', ' + args.server_args if args.server_args else ''}), load client: {args.load_client}")
    print(f"{'clients':>7}  {'batched req/s':>13}  {'p50 / p99 ms':>15}  {'unbatched req/s':>15}  "
          f"{'p50 / p99 ms':>15}  {'ratio':>6}  req/call  CPU ms/req (b / u): server   model  errors")
    for c, got in results.items():
        b, u = got["batched"], got["unbatched"]
        print(f"{c:>7}  {b['rps']:13.1f}  {b['p50'] * 1000:6.0f} / {b['p99'] * 1000:6.0f}  {u['rps']:15.1f}  "
              f"{u['p50'] * 1000:6.0f} / {u['p99'] * 1000:6.0f}  {b['rps'] / u['rps']:5.2f}x  {b['per_call']:8.1f}  "
              f"{b['server_ms']:11.1f} / {u['server_ms']:<4.1f} {b['model_ms']:5.1f} / {u['model_ms']:<4.1f} "
              f"{b['errors'] + u['errors']:>6}")
        if args.compare_gather is not None:
            g = got[f"gather {args.compare_gather:g}"]
            print(f"{'':>7}  --gather {args.compare_gather:g}: {g['rps']:.1f} req/s, p50 / p99 {g['p50'] * 1000:.0f} / "
                  f"{g['p99'] * 1000:.0f} ms, {g['rps'] / u['rps']:.2f}x unbatched, {g['per_call']:.1f} req/call, "
                  f"CPU ms/req server {g['server_ms']:.1f}, model {g['model_ms']:.1f}, errors {g['errors']}; "
                  f"batched / this: {b['rps'] / g['rps']:.2f}x")


if __name__ == "__main__":
    main()
