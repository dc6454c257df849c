"""The original API's /start with [http].original_path_prefix.

Old clients' paths work; what is left after the prefix is confined as always.
"""

from __future__ import annotations

import time

import pytest
from conftest import Api, cluster_of_its_own

PREFIX = "worker/scripts/"


@pytest.fixture(scope="module")
def api(scripts_dir):
    with cluster_of_its_own(
        "original-paths",
        scripts_dir,
        http_processes=1,
        http_extra=f'original_path_prefix = "{PREFIX}"\n',
    ) as c:
        yield Api(c)


def start(api: Api, path: str):
    return api.post(
        "/start", {"worker_id": "worker-1", "path": path, "command": "bash"}
    )


def test_a_path_from_the_workers_directory_starts_the_script(api):
    status, _, data = start(api, PREFIX + "hello.sh")
    assert status == 201, data
    path = f"/v1/workers/worker-1/jobs/{data['job_id']}"
    deadline = time.monotonic() + 10
    while (job := api.get(path)[2])["state"] == "running":
        assert time.monotonic() < deadline, job
        time.sleep(0.02)
    assert (job["path"], job["state"]) == ("hello.sh", "succeeded")
    # A path without the prefix is taken as it is.
    status, _, data = start(api, "hello.sh")
    assert status == 201, data


def test_what_is_left_after_the_prefix_is_confined_as_always(api):
    status, _, data = start(api, PREFIX + "../../etc/passwd")
    assert status == 403, data
    assert "outside the scripts directory" in data["description"]
    status, _, data = start(api, PREFIX + "/etc/passwd")
    assert status == 403, data
    assert "absolute" in data["description"]


def test_the_v1_routes_take_paths_as_given(api):
    status, _, data = api.post(
        "/v1/workers/worker-1/jobs", {"command": "bash", "path": PREFIX + "hello.sh"}
    )
    assert status == 400, data
    assert "no script 'worker/scripts/hello.sh'" in data["description"]
