"""The worker's gRPC service: a thin translation onto :class:`JobRunner`."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from jobgate import model
from jobgate.errors import ResourceExhausted
from jobgate.jobstate import JobState
from jobgate.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from worker.limits import NAMES as LIMIT_NAMES
from worker.runner import JobRecord, JobRunner


def _proto_field(f: model.Field) -> Callable[[Any], object]:
    """How one field of the model's Job goes from a record into the message."""
    if f.type in model.SHAPES:
        message = getattr(common_pb2, f.type)  # e.g. Limits, from a dict
        return lambda v: message(**v)
    if f.type in ("JobState", "ExitReason"):  # jobgate.jobstate's enums
        return lambda v: v.to_proto()
    return lambda v: v


# A wait for a job's end or an idle worker looks this often whether its caller
# is still there.
WAIT_SLICE_S = 1.0

# The model's Job, field by field: what the worker knows of it (not worker_id).
_PROTO_FIELDS = [(f.name, _proto_field(f)) for f in model.JOB.fields if f.wire]


def job_to_proto(r: JobRecord) -> common_pb2.Job:
    """A job's record as the gRPC message; None leaves a field unset."""
    return common_pb2.Job(
        **{
            name: convert(value)
            for name, convert in _PROTO_FIELDS
            if (value := getattr(r, name)) is not None
        }
    )


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(
        self,
        runner: JobRunner,
        keepalive_s: float | None = None,
        max_streams: int = 448,
    ):
        self.runner = runner
        self.keepalive_s = keepalive_s
        self.max_streams = max_streams
        self._streams = threading.BoundedSemaphore(max_streams)

    def StartJob(self, request, context):
        record, existing = self.runner.start(
            request.command,
            request.path,
            list(request.args),
            timeout_s=request.timeout_s,
            idempotency_key=request.idempotency_key,
            limits={
                name: getattr(request.limits, name)
                for name in LIMIT_NAMES
                if getattr(request.limits, name)
            },
        )
        return worker_pb2.StartJobResponse(job=job_to_proto(record), existing=existing)

    def StopJob(self, request, context):
        return job_to_proto(
            self.runner.stop(
                request.job_id, request.grace_s, requested_by=request.requested_by
            )
        )

    def WaitJob(self, request, context):
        job_id = request.job_id
        record = self.runner.get(job_id)  # NotFound at once
        if record.state == JobState.RUNNING:
            self._wait_while_asked(
                context,
                request.timeout_s,
                lambda s: self.runner.wait(job_id, s).state != JobState.RUNNING,
            )
            record = self.runner.get(job_id)
        return job_to_proto(record)

    def SetDrain(self, request, context):
        self.runner.set_drain(request.enable, request.requested_by)
        if request.enable and request.wait_s > 0:
            self._wait_while_asked(
                context, request.wait_s, lambda s: self.runner.wait_idle(s) == 0
            )
        state = self.runner.drain.state
        return worker_pb2.DrainState(
            draining=state is not None,
            requested_by=state.requested_by if state else "",
            since=state.since if state else 0.0,
            degraded=self.runner.degraded(),
            running_jobs=self.runner.running_count(),
        )

    def _wait_while_asked(
        self, context, timeout_s: float, wait: Callable[[float], bool]
    ) -> None:
        """``wait(seconds)`` (True when what is waited for happened) a slice
        at a time, for at most ``timeout_s`` (capped by ``[jobs].max_wait_s``)
        and only while the caller is still there: a caller that gave up
        frees its thread of the server within a slice, not after the wait."""
        deadline = time.monotonic() + min(
            max(timeout_s, 0.0), self.runner.cfg.max_wait_s
        )
        while context.is_active():
            left = deadline - time.monotonic()
            if left <= 0 or wait(min(left, WAIT_SLICE_S)):
                return

    def GetJob(self, request, context):
        return job_to_proto(self.runner.get(request.job_id))

    def ListJobs(self, request, context):
        return worker_pb2.ListJobsResponse(
            jobs=[job_to_proto(r) for r in self.runner.list()]
        )

    def StreamOutput(self, request, context):
        if not self._streams.acquire(blocking=False):
            raise ResourceExhausted(
                f"this worker already serves {self.max_streams} output streams "
                "([grpc].max_streams); retry later"
            )
        try:
            yield from self._stream(request, context)
        finally:
            self._streams.release()

    def _stream(self, request, context):
        job_id = request.job_id
        cancelled = lambda: not context.is_active()  # noqa: E731
        # Wake this follower when the client goes away, so it never waits on
        # a job that produces no more output.
        context.add_callback(lambda: self.runner.wake(job_id))
        for offset, data, skipped in self.runner.read_output(
            job_id, request.offset, request.follow, cancelled, self.keepalive_s
        ):
            yield worker_pb2.OutputChunk(
                offset=offset, data=data, timestamp=time.time(), skipped=skipped
            )
        if not cancelled():
            final = self.runner.get(job_id)
            yield worker_pb2.OutputChunk(
                offset=final.output_bytes,
                timestamp=time.time(),
                final=job_to_proto(final),
            )
