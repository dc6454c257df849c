"""Mutual TLS and role rules, checked against the real processes of a local cluster.

Every call here carries a real certificate: the cluster's own, one from another
CA, an expired one, one of the right CA for another cluster name, or none at
all. Each refusal is checked for its gRPC status and for having changed
nothing: no job started or stopped, no worker registered, moved or removed.
Those checks are made over channels built like the refused ones, so a broken
test set-up fails them instead of passing as a refusal.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from conftest import Api, cluster_of_its_own, devca

from jobgate import identity
from jobgate.dev.cluster import DevCluster
from jobgate.v1 import scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc

TIMEOUT = 5

CertPair = tuple[Path, Path]  # (certificate, key)

START_HELLO = worker_pb2.StartJobRequest(command="bash", path="hello.sh")


# -- channels -----------------------------------------------------------------------


def pair(directory: Path, stem: str) -> CertPair:
    return directory / f"{stem}.pem", directory / f"{stem}.key"


@contextmanager
def dial(
    port: int, ca_file: Path, peer_dns: str, cert: CertPair | None
) -> Iterator[grpc.Channel]:
    """A TLS channel to 127.0.0.1:``port`` that verifies the peer holds ``peer_dns``.

    ``cert`` is the client certificate and key to present, or None for none.
    """
    ca = ca_file.read_bytes()
    if cert is None:
        creds = grpc.ssl_channel_credentials(root_certificates=ca)
    else:
        creds = grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=cert[1].read_bytes(),
            certificate_chain=cert[0].read_bytes(),
        )
    channel = grpc.secure_channel(
        f"127.0.0.1:{port}",
        creds,
        options=[("grpc.ssl_target_name_override", peer_dns)],
    )
    try:
        yield channel
    finally:
        channel.close()


@contextmanager
def worker_stub(
    cluster: DevCluster, name: str, cert: CertPair | None
) -> Iterator[worker_pb2_grpc.WorkerStub]:
    peer = identity.dns_name(cluster.cluster, identity.WORKER, name)
    port = cluster.worker_info[name]["grpc_port"]
    with dial(port, cluster.pki / "ca.pem", peer, cert) as channel:
        yield worker_pb2_grpc.WorkerStub(channel)


@contextmanager
def scheduler_stub(
    cluster: DevCluster, cert: CertPair | None
) -> Iterator[scheduler_pb2_grpc.SchedulerStub]:
    peer = identity.dns_name(cluster.cluster, identity.SCHEDULER)
    port = cluster.scheduler_info["grpc_port"]
    with dial(port, cluster.pki / "ca.pem", peer, cert) as channel:
        yield scheduler_pb2_grpc.SchedulerStub(channel)


def refusal(rpc, request) -> grpc.RpcError:
    """The error ``rpc(request)`` fails with; a call that succeeds fails the test."""
    with pytest.raises(grpc.RpcError) as info:
        result = rpc(request, timeout=TIMEOUT)
        if isinstance(result, Iterator):  # server streaming: errors come on reading
            list(result)
    return info.value


# -- cluster state ------------------------------------------------------------------


def workers(api: Api) -> dict[str, dict]:
    status, _, data = api.get("/v1/workers")
    assert status == 200, (status, data)
    return {w["name"]: w for w in data["workers"]}


def registration(api: Api, name: str) -> tuple[str, str, str, str]:
    """What registering or deregistering ``name`` again would change."""
    w = workers(api)[name]
    return w["id"], w["address"], w["registered_at"], w["state"]


def job_ids(cluster: DevCluster, name: str) -> set[str]:
    """The jobs worker ``name`` knows, asked with the scheduler's certificate."""
    with worker_stub(cluster, name, pair(cluster.pki, "scheduler")) as stub:
        resp = stub.ListJobs(worker_pb2.ListJobsRequest(), timeout=TIMEOUT)
    return {j.job_id for j in resp.jobs}


def register_request(cluster: DevCluster, name: str) -> scheduler_pb2.RegisterRequest:
    """A Register for ``name`` at worker-1's real address.

    Should it wrongly be accepted, the cluster keeps working and the refreshed
    registration time shows it.
    """
    return scheduler_pb2.RegisterRequest(
        name=name, address=cluster.worker_info["worker-1"]["address"], capacity=1
    )


# -- certificates -------------------------------------------------------------------


@pytest.fixture(scope="module")
def foreign(cluster: DevCluster, tmp_path_factory) -> Path:
    """A second CA for the same cluster name, with a scheduler and a worker-1."""
    directory = tmp_path_factory.mktemp("foreign-ca")
    devca("init", "--dir", str(directory), "--cluster", cluster.cluster)
    devca("issue", "--dir", str(directory), "--role", "scheduler")
    devca("issue", "--dir", str(directory), "--role", "worker", "--name", "worker-1")
    return directory


@pytest.fixture(scope="module")
def issued(cluster: DevCluster, tmp_path_factory) -> Path:
    """Certificates of the cluster's own CA that the cluster does not hand out:

    expired ``scheduler`` and ``worker-1``, and client ``ops`` (``client-ops``).
    """
    out = tmp_path_factory.mktemp("issued")
    ca = ("issue", "--dir", str(cluster.pki), "--out")
    devca(*ca, str(out / "expired"), "--role", "scheduler", "--expired")
    devca(
        *ca, str(out / "expired"), "--role", "worker", "--name", "worker-1", "--expired"
    )
    devca(*ca, str(out), "--role", "client", "--name", "ops")
    return out


@pytest.fixture(scope="module")
def other_cluster(cluster: DevCluster, tmp_path_factory) -> Path:
    """The cluster's own CA key, issuing for cluster name ``other``."""
    directory = tmp_path_factory.mktemp("other-cluster")
    for f in ("ca.pem", "ca.key"):
        shutil.copy(cluster.pki / f, directory / f)
    (directory / "cluster").write_text("other\n")
    devca("issue", "--dir", str(directory), "--role", "scheduler")
    devca("issue", "--dir", str(directory), "--role", "worker", "--name", "worker-1")
    return directory


# -- refused at the TLS handshake ---------------------------------------------------


def test_worker_refuses_callers_without_client_certificate(cluster):
    before = job_ids(cluster, "worker-1")
    with worker_stub(cluster, "worker-1", None) as stub:
        calls = [
            (stub.ListJobs, worker_pb2.ListJobsRequest()),
            (stub.GetJob, worker_pb2.GetJobRequest(job_id="anything")),
            (stub.StartJob, START_HELLO),
        ]
        for rpc, request in calls:
            err = refusal(rpc, request)
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err
    assert job_ids(cluster, "worker-1") - before == set()


def test_scheduler_refuses_register_without_client_certificate(cluster, api):
    before = registration(api, "worker-1")
    with scheduler_stub(cluster, None) as stub:
        err = refusal(stub.Register, register_request(cluster, "worker-1"))
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err
    assert registration(api, "worker-1") == before


def test_worker_refuses_certificate_of_another_ca(cluster, foreign):
    before = job_ids(cluster, "worker-1")
    with worker_stub(cluster, "worker-1", pair(foreign, "scheduler")) as stub:
        for rpc, request in [
            (stub.ListJobs, worker_pb2.ListJobsRequest()),
            (stub.StartJob, START_HELLO),
        ]:
            err = refusal(rpc, request)
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err
    assert job_ids(cluster, "worker-1") - before == set()


def test_scheduler_refuses_certificate_of_another_ca(cluster, api, foreign):
    before = registration(api, "worker-1")
    with scheduler_stub(cluster, pair(foreign, "worker-1")) as stub:
        err = refusal(stub.Register, register_request(cluster, "worker-1"))
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err
    assert registration(api, "worker-1") == before


def test_worker_refuses_expired_certificate(cluster, issued):
    before = job_ids(cluster, "worker-1")
    with worker_stub(
        cluster, "worker-1", pair(issued / "expired", "scheduler")
    ) as stub:
        for rpc, request in [
            (stub.ListJobs, worker_pb2.ListJobsRequest()),
            (stub.StartJob, START_HELLO),
        ]:
            err = refusal(rpc, request)
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err
    assert job_ids(cluster, "worker-1") - before == set()


def test_scheduler_refuses_expired_certificate(cluster, api, issued):
    before = registration(api, "worker-1")
    with scheduler_stub(cluster, pair(issued / "expired", "worker-1")) as stub:
        err = refusal(stub.Register, register_request(cluster, "worker-1"))
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err
    assert registration(api, "worker-1") == before


# -- refused by the guard: another cluster's name -----------------------------------


def test_worker_refuses_same_ca_certificate_of_another_cluster(cluster, other_cluster):
    before = job_ids(cluster, "worker-1")
    with worker_stub(cluster, "worker-1", pair(other_cluster, "scheduler")) as stub:
        for rpc, request in [
            (stub.ListJobs, worker_pb2.ListJobsRequest()),
            (stub.StartJob, START_HELLO),
            (stub.StreamOutput, worker_pb2.StreamOutputRequest(job_id="anything")),
        ]:
            err = refusal(rpc, request)
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err
    assert job_ids(cluster, "worker-1") - before == set()


def test_scheduler_refuses_same_ca_certificate_of_another_cluster(
    cluster, api, other_cluster
):
    w1 = workers(api)["worker-1"]
    with scheduler_stub(cluster, pair(other_cluster, "worker-1")) as stub:
        err = refusal(stub.Register, register_request(cluster, "worker-1"))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err
        err = refusal(
            stub.Deregister, scheduler_pb2.DeregisterRequest(worker_id=w1["id"])
        )
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err
    after = workers(api)["worker-1"]
    assert after["state"] == "online"
    assert after["registered_at"] == w1["registered_at"]


# -- refused by the guard: the role may not call the service ------------------------


@pytest.mark.parametrize("caller", ["worker-2", "worker-1"])
def test_worker_refuses_start_job_from_workers(cluster, caller):
    before = job_ids(cluster, "worker-1")
    with worker_stub(cluster, "worker-1", pair(cluster.pki, caller)) as stub:
        err = refusal(stub.StartJob, START_HELLO)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err
    assert job_ids(cluster, "worker-1") - before == set()


def test_worker_refuses_reading_and_stopping_jobs_from_another_worker(cluster, api):
    job_id = api.start("worker-1", "sleep.sh", ["60"])["job_id"]
    try:
        with worker_stub(cluster, "worker-1", pair(cluster.pki, "worker-2")) as stub:
            for rpc, request in [
                (stub.GetJob, worker_pb2.GetJobRequest(job_id=job_id)),
                (stub.ListJobs, worker_pb2.ListJobsRequest()),
                (stub.StreamOutput, worker_pb2.StreamOutputRequest(job_id=job_id)),
                (stub.StopJob, worker_pb2.StopJobRequest(job_id=job_id)),
            ]:
                err = refusal(rpc, request)
                assert err.code() == grpc.StatusCode.PERMISSION_DENIED, (rpc, err)
        status, _, data = api.get(f"/v1/workers/worker-1/jobs/{job_id}")
        assert status == 200, (status, data)
        assert data["state"] == "running"
    finally:
        api.post(f"/v1/workers/worker-1/jobs/{job_id}/stop")


@pytest.mark.parametrize("caller", ["worker-2", "client-ops"])
def test_worker_refuses_a_drain_from_anyone_but_the_scheduler(
    cluster, api, issued, caller
):
    certs = cluster.pki if caller.startswith("worker") else issued
    with worker_stub(cluster, "worker-1", pair(certs, caller)) as stub:
        for enable in (True, False):
            request = worker_pb2.SetDrainRequest(enable=enable, requested_by="me")
            err = refusal(stub.SetDrain, request)
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err
    worker = workers(api)["worker-1"]
    assert (worker["draining"], worker["degraded"]) == (False, None)


def test_worker_refuses_client_certificate(cluster, issued):
    before = job_ids(cluster, "worker-1")
    with worker_stub(cluster, "worker-1", pair(issued, "client-ops")) as stub:
        for rpc, request in [
            (stub.ListJobs, worker_pb2.ListJobsRequest()),
            (stub.StartJob, START_HELLO),
        ]:
            err = refusal(rpc, request)
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err
    assert job_ids(cluster, "worker-1") - before == set()


@pytest.mark.parametrize("caller", ["scheduler", "client-ops"])
def test_scheduler_membership_refuses_non_worker_roles(cluster, api, issued, caller):
    cert = pair(issued if caller.startswith("client-") else cluster.pki, caller)
    w1 = workers(api)["worker-1"]
    with scheduler_stub(cluster, cert) as stub:
        for rpc, request in [
            (stub.Register, register_request(cluster, "worker-1")),
            (stub.Heartbeat, scheduler_pb2.HeartbeatRequest(worker_id=w1["id"])),
            (stub.Deregister, scheduler_pb2.DeregisterRequest(worker_id=w1["id"])),
        ]:
            err = refusal(rpc, request)
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, (rpc, err)
    after = workers(api)["worker-1"]
    assert after["state"] == "online"
    assert after["registered_at"] == w1["registered_at"]


# -- refused by membership: a worker acts only on itself ----------------------------


def test_worker_cannot_deregister_another_worker(cluster, api):
    w1 = workers(api)["worker-1"]
    with scheduler_stub(cluster, pair(cluster.pki, "worker-2")) as stub:
        err = refusal(
            stub.Deregister, scheduler_pb2.DeregisterRequest(worker_id=w1["id"])
        )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err
    assert workers(api)["worker-1"]["state"] == "online"


def test_worker_cannot_heartbeat_for_another_worker(cluster, api):
    w1 = workers(api)["worker-1"]
    with scheduler_stub(cluster, pair(cluster.pki, "worker-2")) as stub:
        err = refusal(
            stub.Heartbeat,
            scheduler_pb2.HeartbeatRequest(worker_id=w1["id"], running_jobs=4242),
        )
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err
        # The control: worker-2 may heartbeat for itself on the same channel.
        w2 = workers(api)["worker-2"]
        resp = stub.Heartbeat(
            scheduler_pb2.HeartbeatRequest(
                worker_id=w2["id"], running_jobs=w2["running_jobs"]
            ),
            timeout=TIMEOUT,
        )
        assert not resp.reregister
    assert workers(api)["worker-1"]["running_jobs"] != 4242


def test_worker_cannot_register_under_another_workers_name(cluster, api):
    before = registration(api, "worker-1")
    with scheduler_stub(cluster, pair(cluster.pki, "worker-2")) as stub:
        err = refusal(stub.Register, register_request(cluster, "worker-1"))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err
    assert registration(api, "worker-1") == before


# -- the scheduler verifies whom it dials -------------------------------------------


@pytest.fixture(scope="module")
def own_cluster(scripts_dir) -> Iterator[DevCluster]:
    """A cluster of its own: the impostor's entry must not outlive its test."""
    with cluster_of_its_own("mtls", scripts_dir, http_processes=1) as c:
        yield c


def test_scheduler_dials_workers_verifying_their_name(own_cluster):
    c, api = own_cluster, Api(own_cluster)
    devca("issue", "--dir", str(c.pki), "--role", "worker", "--name", "impostor")
    marker = f"mtls-{uuid.uuid4().hex}"
    with scheduler_stub(c, pair(c.pki, "impostor")) as stub:
        resp = stub.Register(register_request(c, "impostor"), timeout=TIMEOUT)
        try:
            # Fresh heartbeat: the refusal below must not be the scheduler
            # finding the impostor silent.
            hb = stub.Heartbeat(
                scheduler_pb2.HeartbeatRequest(worker_id=resp.worker_id),
                timeout=TIMEOUT,
            )
            assert not hb.reregister
            assert workers(api)["impostor"]["state"] == "online"

            status, _, data = api.get("/v1/workers/impostor/jobs")
            assert status == 503, (status, data)
            assert "cannot be reached" in data["description"], data

            status, _, data = api.post(
                "/v1/workers/impostor/jobs",
                {"command": "bash", "path": "hello.sh", "args": [marker]},
            )
            assert status == 503, (status, data)
            assert "cannot be reached" in data["description"], data
        finally:
            stub.Deregister(
                scheduler_pb2.DeregisterRequest(worker_id=resp.worker_id),
                timeout=TIMEOUT,
            )
    # The control: the same address, dialled under its real name, answers.
    status, _, data = api.get("/v1/workers/worker-1/jobs")
    assert status == 200, (status, data)
    assert not any(marker in j["args"] for j in data["jobs"]), data
