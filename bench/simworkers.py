"""Simulated workers: register and heartbeat like real ones, over real gRPC.

Each simulated worker has its own certificate (``sim-NNNNN``, issued once by
:func:`bench.cluster.sim_worker_certs`) and its own mutual-TLS channel, and
registers under its own name, exactly as the scheduler demands of a worker.
It never serves jobs: the address it registers is not dialled unless a
request names it. One process runs many of them on one asyncio loop:

    python -m bench.simworkers --target HOST:PORT --first 0 --count 2500 \
        --stats FILE

It prints one JSON line once all have registered, then heartbeats on the
interval the scheduler hands out (at registration, then with every
heartbeat's answer, as a real worker does) until SIGTERM, when it writes
every heartbeat's (time, latency, failure) and its CPU time to ``--stats``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import grpc

from bench.cluster import CACHE, CLUSTER, sim_worker_name
from jobgate import identity
from jobgate.tls import CHANNEL_OPTIONS
from jobgate.v1 import scheduler_pb2, scheduler_pb2_grpc


class Sim:
    def __init__(self, target: str, certs: Path, ca: bytes, stop: asyncio.Event):
        self.target = target
        self.certs = certs
        self.ca = ca
        self.stop = stop
        self.registered = 0
        self.register_errors: dict[str, int] = {}
        # (time, latency, "" or the gRPC status code of a failed heartbeat)
        self.beats: list[tuple[float, float, str]] = []
        self.last_error = ""
        self.error_details: dict[str, str] = {}  # one example per status code

    async def register(
        self, stub, name: str, slots: asyncio.Semaphore
    ) -> tuple[float, str]:
        """Register until it works; (heartbeat interval, worker id)."""
        request = scheduler_pb2.RegisterRequest(
            name=name,
            address="127.0.0.1:9",  # never dialled: no request names this worker
            capacity=64,
            version="sim",
            labels={"sim": "true"},
        )
        while not self.stop.is_set():
            try:
                async with slots:
                    resp = await stub.Register(request, timeout=30)
                return resp.heartbeat_interval_s or 5.0, resp.worker_id
            except grpc.RpcError as exc:
                code = exc.code().name
                self.register_errors[code] = self.register_errors.get(code, 0) + 1
                self.last_error = f"Register: {exc.code().name}: {exc.details()}"
                await asyncio.sleep(random.uniform(0.5, 1.5))  # noqa: S311
        return 0.0, ""

    async def run(self, i: int, slots: asyncio.Semaphore, all_registered) -> None:
        name = sim_worker_name(i)
        creds = grpc.ssl_channel_credentials(
            self.ca,
            (self.certs / f"{name}.key").read_bytes(),
            (self.certs / f"{name}.pem").read_bytes(),
        )
        options = list(CHANNEL_OPTIONS) + [
            (
                "grpc.ssl_target_name_override",
                identity.dns_name(CLUSTER, identity.SCHEDULER),
            )
        ]
        async with grpc.aio.secure_channel(self.target, creds, options) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            interval, worker_id = await self.register(stub, name, slots)
            if not interval:
                return
            self.registered += 1
            if self.registered == all_registered[0]:
                all_registered[1].set()
            next_beat = time.monotonic() + random.uniform(0, interval)  # noqa: S311
            while not self.stop.is_set():
                delay = next_beat - time.monotonic()
                if delay > 0:
                    try:
                        await asyncio.wait_for(self.stop.wait(), delay)
                        return
                    except TimeoutError:
                        pass
                start = time.monotonic()
                failed = ""
                try:
                    resp = await stub.Heartbeat(
                        scheduler_pb2.HeartbeatRequest(
                            worker_id=worker_id, running_jobs=0
                        ),
                        timeout=10,
                    )
                    if resp.reregister:
                        interval, worker_id = await self.register(stub, name, slots)
                    elif resp.heartbeat_interval_s > 0:
                        interval = resp.heartbeat_interval_s
                except grpc.RpcError as exc:
                    failed = exc.code().name
                    self.error_details.setdefault(failed, str(exc.details()))
                self.beats.append((time.time(), time.monotonic() - start, failed))
                # Like a real worker: the next heartbeat one interval after
                # this one's answer.
                next_beat = time.monotonic() + (interval or 5.0)


async def main_async(args) -> dict:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    certs = Path(args.certs)
    sim = Sim(args.target, certs, (certs.parent / "ca.pem").read_bytes(), stop)
    slots = asyncio.Semaphore(args.concurrency)
    done = asyncio.Event()
    t0 = time.monotonic()
    tasks = [
        asyncio.create_task(sim.run(i, slots, (args.count, done)))
        for i in range(args.first, args.first + args.count)
    ]
    waiter = asyncio.create_task(done.wait())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    print(
        json.dumps(
            {
                "registered": sim.registered,
                "register_s": round(time.monotonic() - t0, 3),
                "register_errors": sim.register_errors,
                "last_error": sim.last_error,
            }
        ),
        flush=True,
    )
    await stop.wait()
    await asyncio.gather(*tasks, return_exceptions=True)
    t = os.times()
    return {
        "registered": sim.registered,
        "register_errors": sim.register_errors,
        "beats": sim.beats,
        "cpu_s": t.user + t.system,
        "last_error": sim.last_error,
        "error_details": sim.error_details,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.simworkers")
    parser.add_argument(
        "--target", required=True, help="the scheduler's gRPC host:port"
    )
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--certs", default=str(CACHE / "pki" / "sim"))
    parser.add_argument(
        "--concurrency", type=int, default=16, help="registrations in flight"
    )
    parser.add_argument("--stats", required=True)
    args = parser.parse_args(argv)
    stats = asyncio.run(main_async(args))
    Path(args.stats).write_text(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
