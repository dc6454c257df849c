"""A real scheduler keeping its state in PostgreSQL ([state].url).

The same calls as on SQLite: workers register, jobs start and end, a
fan-out group is read back, and a restarted scheduler still knows them. The
server is the test session's (``postgres`` in ``tests/conftest.py``).
"""

from __future__ import annotations

import psycopg
import pytest
from conftest import Api, cluster_of_its_own
from test_lifecycle import wait_for


@pytest.fixture(scope="module")
def pg_cluster(postgres, scripts_dir):
    """One scheduler on a database of its own, over TCP with a password
    file, and workers pg-1 and pg-2."""
    url = postgres.create_database()
    name = url.rsplit("/", 1)[1]
    with cluster_of_its_own(
        "postgres",
        scripts_dir,
        workers=("pg-1", "pg-2"),
        store_url=postgres.url(name, tcp=True),
        store_password_file=postgres.password_file,
    ) as c:
        c.database_url = url
        yield c
    postgres.drop_database(name)


def test_a_scheduler_on_postgresql_serves_jobs_and_groups(pg_cluster):
    api = Api(pg_cluster)
    status, _, data = api.get("/v1/workers")
    workers = data["workers"]
    assert status == 200
    assert {w["name"]: w["state"] for w in workers} == {
        "pg-1": "online",
        "pg-2": "online",
    }
    job = api.start("pg-1", "hello.sh")
    api.output("pg-1", job["job_id"])  # follows it to its end
    status, _, done = api.get(f"/v1/workers/pg-1/jobs/{job['job_id']}")
    assert (status, done["state"]) == (200, "succeeded")

    status, _, group = api.post(
        "/v1/jobs", {"all": True, "command": "bash", "path": "hello.sh"}
    )
    assert status == 201, group
    status, _, read = api.get(f"/v1/groups/{group['group_id']}?wait=true")
    assert status == 200
    assert read["summary"]["states"] == {"succeeded": 2}

    # It is all in the database: the rows a second scheduler would read.
    with psycopg.connect(pg_cluster.database_url) as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM workers")}
        jobs = conn.execute("SELECT count(*) FROM jobs").fetchone()[0]
        groups = conn.execute("SELECT count(*) FROM groups").fetchone()[0]
    assert names == {"pg-1", "pg-2"}
    assert (jobs, groups) == (3, 1)

    status, _, ready = api.get("/readyz")
    assert status == 200, ready


def test_a_restarted_scheduler_on_postgresql_knows_its_workers_and_jobs(pg_cluster):
    api = Api(pg_cluster)
    job = api.start("pg-2", "hello.sh")
    api.output("pg-2", job["job_id"])

    def workers():
        return api.get("/v1/workers")[2]["workers"]

    ids = {w["name"]: w["id"] for w in workers()}
    pg_cluster.restart_scheduler()
    assert wait_for(lambda: all(w["state"] == "online" for w in workers()), 15)
    assert {w["name"]: w["id"] for w in workers()} == ids
    status, _, known = api.get(f"/v1/workers/pg-2/jobs/{job['job_id']}")
    assert (status, known["state"]) == (200, "succeeded")
