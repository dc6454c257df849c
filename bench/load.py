"""A small keep-alive HTTP load generator and output followers (http.client).

Clients run as threads spread over several processes (forked), so the
client's interpreter lock does not throttle the server; each thread keeps one
connection open for all its requests. Every function returns raw latencies
(seconds) or per-follower results, and the CPU time the client processes
used, so a report can show how much of the machine the client itself took.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

HOST = "127.0.0.1"
MAX_PROCESSES = 4


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    body: dict | None = None
    expect: int = 200

    def encoded(self, token: str) -> tuple[bytes | None, dict[str, str]]:
        headers = {"Authorization": f"Bearer {token}"}
        data = None
        if self.body is not None:
            data = json.dumps(self.body).encode()
            headers["Content-Type"] = "application/json"
        return data, headers


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    duration: float = 0.0
    client_cpu_s: float = 0.0

    def merge(self, other: LoadResult) -> None:
        self.latencies += other.latencies
        self.errors += other.errors
        self.error_samples = (self.error_samples + other.error_samples)[:5]
        self.client_cpu_s += other.client_cpu_s


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def latency_figures(latencies: list[float], prefix: str = "") -> dict[str, float]:
    """p50, p90, p99 and max in milliseconds."""
    out = {}
    for name, q in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100)):
        out[f"{prefix}{name}_ms"] = round(percentile(latencies, q) * 1000, 3)
    return out


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _connect(port: int, timeout: float = 60.0) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    conn.connect()
    return conn


def _one(conn: http.client.HTTPConnection, req: Request, data, headers) -> str | None:
    """Send ``req``; None when it got the expected status, else what went wrong."""
    conn.request(req.method, req.path, body=data, headers=headers)
    resp = conn.getresponse()
    body = resp.read()
    if resp.status != req.expect:
        return f"{req.method} {req.path}: {resp.status} {body[:200]!r}"
    return None


def sequential(port: int, token: str, req: Request, count: int) -> LoadResult:
    """``count`` requests one after the other on one keep-alive connection."""
    data, headers = req.encoded(token)
    result = LoadResult()
    conn = _connect(port)
    cpu0, t0 = _cpu(), time.perf_counter()
    try:
        for _ in range(count):
            start = time.perf_counter()
            error = _one(conn, req, data, headers)
            result.latencies.append(time.perf_counter() - start)
            if error:
                result.errors += 1
                if len(result.error_samples) < 5:
                    result.error_samples.append(error)
    finally:
        conn.close()
    result.duration = time.perf_counter() - t0
    result.client_cpu_s = _cpu() - cpu0
    return result


def _client_thread(port, token, req, start_at, t_from, t_to, out: LoadResult):
    data, headers = req.encoded(token)
    conn = _connect(port)
    time.sleep(max(0.0, start_at - time.time()))
    try:
        while True:
            begin = time.time()
            if begin >= t_to:
                break
            try:
                error = _one(conn, req, data, headers)
            except (OSError, http.client.HTTPException) as exc:
                error = f"{type(exc).__name__}: {exc}"
                conn.close()
                conn = _connect(port)
            end = time.time()
            if t_from <= end < t_to:
                out.latencies.append(end - begin)
                if error:
                    out.errors += 1
                    if len(out.error_samples) < 5:
                        out.error_samples.append(error)
    finally:
        conn.close()


def _load_process(ports, token, req, start_at, t_from, t_to) -> LoadResult:
    """One client thread per entry of ``ports`` (the port it sends to)."""
    # Short GIL switch interval: a thread whose answer arrived gets to run
    # soon, so the client adds little to the latencies it measures.
    sys.setswitchinterval(0.0005)
    cpu0 = _cpu()
    results = [LoadResult() for _ in ports]
    workers = [
        threading.Thread(
            target=_client_thread,
            args=(port, token, req, start_at, t_from, t_to, r),
            daemon=True,
        )
        for port, r in zip(ports, results, strict=True)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    total = LoadResult()
    for r in results:
        total.merge(r)
    total.client_cpu_s = _cpu() - cpu0
    return total


def _split(clients: int) -> list[int]:
    procs = min(clients, MAX_PROCESSES)
    return [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]


def closed_loop(
    port: int | Sequence[int],
    token: str,
    req: Request,
    clients: int,
    duration: float,
    warmup: float = 1.0,
) -> LoadResult:
    """``clients`` keep-alive clients, each sending ``req`` again as soon as
    the answer is in, for ``warmup`` + ``duration`` seconds; the figures cover
    the requests that completed within the last ``duration`` seconds.

    ``port`` may be several (schedulers): the clients take them in turn.
    """
    ports = [port] if isinstance(port, int) else list(port)
    ctx = multiprocessing.get_context("fork")
    split = _split(clients)
    start_at = time.time() + 0.3 + 0.01 * clients
    t_from = start_at + warmup
    t_to = t_from + duration
    # Each process's clients' ports: client k (of all) sends to port k mod n.
    firsts = [sum(split[:i]) for i in range(len(split))]
    process_ports = [
        [ports[(first + i) % len(ports)] for i in range(n)]
        for first, n in zip(firsts, split, strict=True)
    ]
    with ctx.Pool(len(split)) as pool:
        parts = pool.starmap(
            _load_process,
            [(p, token, req, start_at, t_from, t_to) for p in process_ports],
        )
    result = LoadResult(duration=duration)
    for part in parts:
        result.merge(part)
    return result


def throughput_figures(result: LoadResult, prefix: str = "") -> dict[str, float]:
    figures = {
        f"{prefix}rps": round(len(result.latencies) / result.duration, 1),
        **latency_figures(result.latencies, prefix),
        f"{prefix}errors": result.errors,
        # Share of one core the client processes used while measuring.
        f"{prefix}client_cpu_pct": round(100 * result.client_cpu_s / result.duration),
    }
    figures.pop(f"{prefix}p90_ms")
    figures.pop(f"{prefix}max_ms")
    return figures


# -- followers ------------------------------------------------------------------


def open_follow(
    port: int, token: str, path: str, timeout: float = 600.0
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
    return conn, conn.getresponse()


@dataclass
class Followed:
    status: int = 0
    nbytes: int = 0
    sha256: str = ""
    first_byte_at: float = 0.0  # time.time() of the first byte
    ended_at: float = 0.0
    error: str = ""


def follow(port: int, token: str, path: str, hash_output: bool = True) -> Followed:
    """Read a whole output stream, hashing it unless told not to."""
    out = Followed()
    digest = hashlib.sha256()
    try:
        conn, resp = open_follow(port, token, path)
        out.status = resp.status
        if resp.status != 200:
            out.error = f"{resp.status}: {resp.read(300).decode(errors='replace')}"
        try:
            while chunk := resp.read1(262144):
                if not out.nbytes:
                    out.first_byte_at = time.time()
                out.nbytes += len(chunk)
                if hash_output:
                    digest.update(chunk)
        finally:
            conn.close()
    except (OSError, http.client.HTTPException) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    out.sha256 = digest.hexdigest()
    out.ended_at = time.time()
    return out


def _followers_process(port, token, path, count, start_at) -> tuple[list, float]:
    sys.setswitchinterval(0.0005)
    cpu0 = _cpu()
    results: list[Followed | None] = [None] * count
    # Small stacks: hundreds of threads per process.
    threading.stack_size(256 * 1024)

    def run(i: int) -> None:
        time.sleep(max(0.0, start_at - time.time()))
        results[i] = follow(port, token, path)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r.__dict__ for r in results if r is not None], _cpu() - cpu0


def many_followers(
    port: int, token: str, path: str, count: int
) -> tuple[list[Followed], float]:
    """``count`` concurrent followers of ``path``; their results and client CPU."""
    ctx = multiprocessing.get_context("fork")
    split = _split(count)
    start_at = time.time() + 0.5
    with ctx.Pool(len(split)) as pool:
        parts = pool.starmap(
            _followers_process, [(port, token, path, n, start_at) for n in split]
        )
    followed = [Followed(**d) for part, _ in parts for d in part]
    return followed, sum(cpu for _, cpu in parts)
