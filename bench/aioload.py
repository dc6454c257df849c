"""Asynchronous load: thousands of followers, idle and slow connections.

A thread per connection cannot hold ten thousand connections on this
machine, so these clients run on an asyncio loop, in forked processes so
that their parsing and hashing spread over the cores like the servers'.
"""

from __future__ import annotations

import asyncio
import hashlib
import multiprocessing
import resource
import time

from bench.load import HOST, Followed, _cpu


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class _Chunked:
    """Decodes a chunked body as it arrives, hashing what it carries."""

    def __init__(self) -> None:
        self.buf = b""
        self.digest = hashlib.sha256()
        self.nbytes = 0
        self.done = False

    def feed(self, data: bytes) -> None:
        self.buf += data
        while not self.done:
            end = self.buf.find(b"\r\n")
            if end < 0:
                return
            size = int(self.buf[:end].split(b";")[0], 16)
            if len(self.buf) < end + 2 + size + 2:
                return
            chunk = self.buf[end + 2 : end + 2 + size]
            self.buf = self.buf[end + 2 + size + 2 :]
            if size == 0:
                self.done = True
                return
            self.digest.update(chunk)
            self.nbytes += size


async def _follow(port: int, token: str, path: str) -> Followed:
    out = Followed()
    try:
        reader, writer = await asyncio.open_connection(HOST, port)
    except OSError as exc:
        out.error = f"connect: {exc}"
        out.ended_at = time.time()
        return out
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n"
            f"Authorization: Bearer {token}\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        out.status = int(head.split(b" ", 2)[1])
        if out.status != 200:
            out.error = f"{out.status}: {(await reader.read(300)).decode('replace')}"
            return out
        body = _Chunked()
        while not body.done:
            data = await reader.read(262144)
            if not data:
                out.error = "the stream ended before its last chunk"
                break
            if not out.first_byte_at:
                out.first_byte_at = time.time()
            body.feed(data)
        out.nbytes, out.sha256 = body.nbytes, body.digest.hexdigest()
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    finally:
        out.ended_at = time.time()
        writer.close()
    return out


def _followers_process(port, token, path, count, start_at) -> tuple[list, float]:
    _raise_nofile()
    cpu0 = _cpu()

    async def main() -> list[Followed]:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        return await asyncio.gather(*(_follow(port, token, path) for _ in range(count)))

    results = asyncio.run(main())
    return [r.__dict__ for r in results], _cpu() - cpu0


def many_followers(
    port: int, token: str, path: str, count: int, processes: int = 2
) -> tuple[list[Followed], float]:
    """``count`` concurrent followers of ``path``; their results and client CPU."""
    ctx = multiprocessing.get_context("fork")
    n = max(1, min(processes, count))
    split = [count // n + (i < count % n) for i in range(n)]
    start_at = time.time() + 0.5
    with ctx.Pool(len(split)) as pool:
        parts = pool.starmap(
            _followers_process, [(port, token, path, n, start_at) for n in split]
        )
    followed = [Followed(**d) for part, _ in parts for d in part]
    return followed, sum(cpu for _, cpu in parts)


# -- idle and slow connections ------------------------------------------------------


async def _hold(port: int, partial: bool, opened: list, closed: list) -> None:
    """One connection: idle, or holding a partial request line, until the
    server closes it; what the server said (408 or nothing) and when."""
    try:
        reader, writer = await asyncio.open_connection(HOST, port)
    except OSError as exc:
        closed.append(("connect-error", str(exc), 0.0))
        return
    t0 = time.monotonic()
    opened.append(t0)
    if partial:
        writer.write(b"GET /v1/wor")
    try:
        answer = await reader.read()
        status = answer.split(b" ", 2)[1].decode() if answer else "closed"
    except OSError:
        status = "reset"
    closed.append(("partial" if partial else "idle", status, time.monotonic() - t0))
    writer.close()


def _slow_process(port: int, idle: int, partial: int, ready, results) -> None:
    _raise_nofile()

    async def main() -> None:
        opened: list = []
        closed: list = []
        tasks = [
            asyncio.create_task(_hold(port, i < partial, opened, closed))
            for i in range(idle + partial)
        ]
        while len(opened) + sum(1 for c in closed if c[0] == "connect-error") < len(
            tasks
        ):
            await asyncio.sleep(0.05)
        ready.set()
        await asyncio.gather(*tasks)
        results.put(closed)

    asyncio.run(main())


class SlowClients:
    """Idle connections and partial requests held open in a forked process.

    ``with SlowClients(...) as slow:`` returns once every connection is
    open; :meth:`result` waits for the server to close them all and returns
    what each got: ``(kind, "408" | "closed" | "reset" | ..., seconds)``.
    """

    def __init__(self, port: int, idle: int, partial: int):
        ctx = multiprocessing.get_context("fork")
        self._ready = ctx.Event()
        self._results = ctx.Queue()
        self._proc = ctx.Process(
            target=_slow_process,
            args=(port, idle, partial, self._ready, self._results),
            daemon=True,
        )

    def __enter__(self) -> SlowClients:
        self._proc.start()
        if not self._ready.wait(120):
            raise RuntimeError("the slow connections did not open within 120 s")
        return self

    def result(self, timeout: float = 300.0) -> list[tuple[str, str, float]]:
        return self._results.get(timeout=timeout)

    def __exit__(self, *exc) -> None:
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
