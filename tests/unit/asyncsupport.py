"""What the unit tests of the scheduler's event-loop code share."""

from __future__ import annotations

import asyncio
import functools

import grpc


def run_async(test):
    """Run an ``async def`` test on a loop of its own, for at most 5 s."""

    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), 5))

    return wrapper


async def settle() -> None:
    """Let every task that can run, run (the fakes never wait on time)."""
    for _ in range(50):
        await asyncio.sleep(0)


class FakeError(grpc.RpcError):
    """An error from a worker call, with its status code."""

    def __init__(self, code: grpc.StatusCode):
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._code.name
