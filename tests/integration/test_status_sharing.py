"""Many clients polling one running job: answers stay right, and the end a
follower saw is what a status asked for after it reports."""

from __future__ import annotations

import contextlib
import threading


@contextlib.contextmanager
def polling(api, path: str, clients: int):
    """``clients`` threads asking for ``path`` until the block ends; yields
    the (status, job_id, state) of every answer."""
    stop, seen = threading.Event(), []

    def poll():
        while not stop.is_set():
            status, _, data = api.get(path)
            seen.append((status, data.get("job_id"), data.get("state")))

    threads = [threading.Thread(target=poll) for _ in range(clients)]
    for t in threads:
        t.start()
    try:
        yield seen
    finally:
        stop.set()
        for t in threads:
            t.join(30)


def test_concurrent_polls_of_a_running_job_all_get_its_status(api):
    job = api.start("worker-1", "count.sh", ["5", "0.2"])
    path = f"/v1/workers/worker-1/jobs/{job['job_id']}"
    with polling(api, path, 12) as seen:
        final = api.output("worker-1", job["job_id"])  # follows to the end
    assert final == b"1\n2\n3\n4\n5\n"
    assert len(seen) > 24
    assert {s for s, _, _ in seen} == {200}
    assert {j for _, j, _ in seen} == {job["job_id"]}
    assert {state for _, _, state in seen} <= {"running", "succeeded"}
    status, _, data = api.get(path)
    assert status == 200 and data["state"] == "succeeded"


def test_after_a_follow_ends_the_status_is_the_end_even_while_others_poll(api):
    for _ in range(5):
        job = api.start("worker-2", "count.sh", ["2", "0.05"])
        path = f"/v1/workers/worker-2/jobs/{job['job_id']}"
        with polling(api, path, 4):
            assert api.output("worker-2", job["job_id"]) == b"1\n2\n"
            status, _, data = api.get(path)
        assert status == 200
        assert data["state"] == "succeeded", data
