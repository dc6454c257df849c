"""The worker's gRPC service: a thin translation onto :class:`JobRunner`."""

from __future__ import annotations

import threading
import time

from jobgate.errors import ResourceExhausted
from jobgate.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from worker.limits import NAMES as LIMIT_NAMES
from worker.runner import JobRecord, JobRunner


def job_to_proto(r: JobRecord) -> common_pb2.Job:
    msg = common_pb2.Job(
        exit_reason=r.exit_reason.to_proto() if r.exit_reason else 0,
        stopped_by=r.stopped_by,
        output_dropped_bytes=r.output_dropped_bytes,
        job_id=r.job_id,
        command=r.command,
        path=r.path,
        args=r.args,
        state=r.state.to_proto(),
        pid=r.pid,
        started_at=r.started_at,
        reason=r.reason,
        output_bytes=r.output_bytes,
        timeout_s=r.timeout_s,
        idempotency_key=r.idempotency_key,
        limits=common_pb2.Limits(**r.limits),
    )
    if r.exit_code is not None:
        msg.exit_code = r.exit_code
    if r.signal is not None:
        msg.signal = r.signal
    if r.ended_at is not None:
        msg.ended_at = r.ended_at
    if r.stopped_at is not None:
        msg.stopped_at = r.stopped_at
    return msg


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
        return job_to_proto(self.runner.wait(request.job_id, request.timeout_s))

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
