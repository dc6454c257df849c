"""The TOML config loader and the worker and scheduler schemas.

Every refusal must name the file and the key, so an operator running
``check-config`` knows exactly what to fix.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from jobgate import config
from jobgate.config import ConfigError, Invalid, parse_hostport, setting
from scheduler import config as scheduler_config
from worker import config as worker_config

# -- helpers -------------------------------------------------------------------


def _toml_value(value) -> str:
    if isinstance(value, dict):
        items = [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()]
        return "{ " + ", ".join(items) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)  # strings, integers, floats and booleans


def to_toml(doc: dict) -> str:
    """TOML text for a document of tables of scalars (enough for these schemas)."""
    lines = []
    for section, values in doc.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(v)}" for key, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def worker_doc() -> dict:
    return {
        "worker": {"name": "worker-1", "cluster": "dev"},
        "scheduler": {"address": "127.0.0.1:7443"},
        "tls": {
            "ca_file": "ca.pem",
            "cert_file": "worker-1.pem",
            "key_file": "worker-1.key",
        },
        "jobs": {"scripts_dir": "scripts", "state_dir": "state"},
    }


def scheduler_doc() -> dict:
    return {
        "cluster": {"name": "dev"},
        "tls": {
            "ca_file": "ca.pem",
            "cert_file": "scheduler.pem",
            "key_file": "scheduler.key",
        },
        "auth": {"tokens_file": "tokens"},
        "http.tls": {"cert_file": "http.pem", "key_file": "http.key"},
    }


@pytest.fixture
def confdir(tmp_path: Path) -> Path:
    """A directory with the files the sample configs name (contents do not matter)."""
    d = tmp_path / "conf"
    d.mkdir()
    for name in (
        "ca.pem",
        "worker-1.pem",
        "worker-1.key",
        "scheduler.pem",
        "scheduler.key",
        "tokens",
        "http.pem",
        "http.key",
    ):
        (d / name).write_text("placeholder\n")
    (d / "scripts").mkdir()
    return d


def write(directory: Path, doc: dict | str, name: str = "test.toml") -> Path:
    path = directory / name
    path.write_text(doc if isinstance(doc, str) else to_toml(doc))
    return path


def worker_error(confdir: Path, doc: dict | str) -> tuple[Path, str]:
    path = write(confdir, doc, "worker.toml")
    with pytest.raises(ConfigError) as exc:
        worker_config.load(path)
    return path, str(exc.value)


def scheduler_error(confdir: Path, doc: dict | str) -> tuple[Path, str]:
    path = write(confdir, doc, "scheduler.toml")
    with pytest.raises(ConfigError) as exc:
        scheduler_config.load(path)
    return path, str(exc.value)


# -- the generic loader, with a schema of its own ------------------------------


@dataclasses.dataclass(frozen=True)
class Inner:
    count: int = setting(3, min=1, max=10)
    ratio: float = setting(0.5, min=0, max=1)
    enabled: bool = setting(False)
    mode: str = setting("fast", choices=("fast", "slow"))
    tag: str = setting("abc", pattern=r"[a-z]+")
    names: list[str] = setting(default_factory=list)
    env: dict[str, str] = setting(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Outer:
    title: str = setting()
    data_dir: Path = setting(exists="dir")
    log_file: Path = setting(Path("out.log"))
    inner: Inner = dataclasses.field(default_factory=Inner)


def load_outer(tmp_path: Path, text: str) -> Outer:
    path = tmp_path / "app.toml"
    path.write_text(text)
    return config.load(path, Outer)


def outer_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as exc:
        load_outer(tmp_path, text)
    message = str(exc.value)
    assert message.startswith(f"{tmp_path / 'app.toml'}: "), message
    return message


def test_loader_builds_frozen_dataclasses_with_defaults(tmp_path):
    (tmp_path / "data").mkdir()
    cfg = load_outer(tmp_path, 'title = "t"\ndata_dir = "data"\n')
    assert cfg.title == "t"
    assert cfg.inner == Inner()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.title = "other"


def test_loader_converts_arrays_tables_and_integer_floats(tmp_path):
    (tmp_path / "data").mkdir()
    cfg = load_outer(
        tmp_path,
        'title = "t"\ndata_dir = "data"\n[inner]\nratio = 1\n'
        'names = ["a", "b"]\nenv = { K = "v" }\n',
    )
    assert cfg.inner.ratio == 1.0 and isinstance(cfg.inner.ratio, float)
    assert cfg.inner.names == ("a", "b")
    assert dict(cfg.inner.env) == {"K": "v"}
    with pytest.raises(TypeError):
        cfg.inner.env["K"] = "changed"  # a read-only mapping


@pytest.mark.parametrize(
    ("inner", "expected"),
    [
        ("colour = 1", "[inner].colour: unknown key (known keys: count, enabled, env,"),
        ('count = "3"', "[inner].count: expected an integer, got string '3'"),
        ("count = 3.0", "[inner].count: expected an integer, got number 3.0"),
        ("count = true", "[inner].count: expected an integer, got boolean true"),
        ("count = 0", "[inner].count: 0 is below the minimum 1"),
        ("count = 11", "[inner].count: 11 is above the maximum 10"),
        ("ratio = true", "[inner].ratio: expected a number, got boolean true"),
        ("ratio = 1.5", "[inner].ratio: 1.5 is above the maximum 1"),
        ("enabled = 1", "[inner].enabled: expected true or false, got integer 1"),
        ('enabled = "y"', "[inner].enabled: expected true or false, got string 'y'"),
        ('mode = "medium"', "[inner].mode: 'medium' is not one of 'fast', 'slow'"),
        ('tag = "ABC"', "[inner].tag: 'ABC' does not match [a-z]+"),
        ('names = "a"', "[inner].names: expected an array, got string 'a'"),
        ('names = ["a", 2]', "[inner].names[1]: expected a string, got integer 2"),
        ('env = ["a"]', "[inner].env: expected a table, got an array"),
        ("env = { K = 1 }", "[inner].env.K: expected a string, got integer 1"),
    ],
)
def test_loader_error_names_file_key_and_problem(tmp_path, inner, expected):
    (tmp_path / "data").mkdir()
    text = f'title = "t"\ndata_dir = "data"\n[inner]\n{inner}\n'
    assert expected in outer_error(tmp_path, text)


def test_loader_refuses_unknown_top_level_key(tmp_path):
    (tmp_path / "data").mkdir()
    message = outer_error(tmp_path, 'title = "t"\ndata_dir = "data"\ntitel = "x"\n')
    assert ": titel: unknown key" in message


def test_loader_refuses_scalar_where_a_table_is_expected(tmp_path):
    (tmp_path / "data").mkdir()
    message = outer_error(tmp_path, 'title = "t"\ndata_dir = "data"\ninner = 5\n')
    assert ": inner: expected a table, got integer 5" in message


def test_loader_reports_missing_required_key(tmp_path):
    (tmp_path / "data").mkdir()
    message = outer_error(tmp_path, 'data_dir = "data"\n')
    assert ": title: required key is missing" in message


def test_loader_reports_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="no such file") as exc:
        config.load(path, Outer)
    assert str(path) in str(exc.value)


def test_loader_reports_directory_instead_of_file(tmp_path):
    with pytest.raises(ConfigError, match="is a directory") as exc:
        config.load(tmp_path, Outer)
    assert str(tmp_path) in str(exc.value)


def test_loader_reports_invalid_toml_with_file_name(tmp_path):
    message = outer_error(tmp_path, 'title = "unterminated\n')
    assert "invalid TOML" in message


def test_loader_reports_non_utf8_file_as_config_error(tmp_path):
    # A config saved in Latin-1 must be refused with a message, not a traceback.
    path = tmp_path / "app.toml"
    path.write_bytes(b'title = "caf\xe9"\ndata_dir = "."\n')
    with pytest.raises(ConfigError) as exc:
        config.load(path, Outer)
    assert str(path) in str(exc.value)


def test_loader_refuses_nan_for_a_bounded_number(tmp_path):
    # nan compares false with every bound, so it must be refused explicitly.
    (tmp_path / "data").mkdir()
    message = outer_error(
        tmp_path, 'title = "t"\ndata_dir = "data"\n[inner]\nratio = nan\n'
    )
    assert "[inner].ratio" in message


def test_loader_resolves_relative_paths_against_config_directory(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_outer(tmp_path, 'title = "t"\ndata_dir = "data"\n')
    assert cfg.data_dir == tmp_path / "data"
    assert cfg.log_file == Path("out.log")  # defaults are left as written


def test_loader_keeps_absolute_paths(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    cfg = load_outer(tmp_path, f'title = "t"\ndata_dir = {json.dumps(str(data))}\n')
    assert cfg.data_dir == data


def test_loader_reports_missing_directory_and_file_instead_of_directory(tmp_path):
    message = outer_error(tmp_path, 'title = "t"\ndata_dir = "data"\n')
    assert f"data_dir: no such directory '{tmp_path / 'data'}'" in message
    (tmp_path / "data").write_text("")
    message = outer_error(tmp_path, 'title = "t"\ndata_dir = "data"\n')
    assert f"data_dir: '{tmp_path / 'data'}' is not a directory" in message


def test_loader_skips_existence_checks_when_asked(tmp_path):
    path = tmp_path / "app.toml"
    path.write_text('title = "t"\ndata_dir = "missing"\n')
    cfg = config.load(path, Outer, check_files=False)
    assert cfg.data_dir == tmp_path / "missing"


def test_loads_names_the_given_source_in_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"^inline: title: required key is missing"):
        config.loads('data_dir = "."', Outer, name="inline", base=tmp_path)


def test_describe_lists_nested_keys_with_types():
    rows = config.describe(worker_config.WorkerConfig)
    rows = {key: (tp, text) for key, tp, text in rows}
    assert rows["[jobs].max_concurrent"] == ("integer", "jobs running at once")
    assert rows["[jobs].scripts_dir"][0] == "path"
    assert rows["[worker].labels"][0] == "table of strings"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:80", ("127.0.0.1", 80)),
        ("[::1]:7443", ("::1", 7443)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
    ],
)
def test_parse_hostport_accepts(value, expected):
    assert parse_hostport(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("localhost", "'localhost' is not host:port"),
        (":80", "':80' is not host:port"),
        ("host:", "the port must be a number"),
        ("host:http", "the port must be a number"),
        ("host:65536", "the port must be a number from 0 to 65535"),
    ],
)
def test_parse_hostport_refuses(value, message):
    with pytest.raises(Invalid, match=message) as exc:
        parse_hostport(value, "bind")
    assert exc.value.key == ("bind",)


# -- worker.toml ---------------------------------------------------------------


def test_worker_config_loads_with_defaults(confdir):
    cfg = worker_config.load(write(confdir, worker_doc(), "worker.toml"))
    assert cfg.worker.name == "worker-1"
    assert cfg.tls.ca_file == confdir / "ca.pem"
    assert cfg.jobs.scripts_dir == confdir / "scripts"
    assert cfg.jobs.state_dir == confdir / "state"  # need not exist yet
    assert dict(cfg.jobs.interpreters) == {"bash": "/bin/bash", "sh": "/bin/sh"}
    assert cfg.jobs.max_concurrent == 64
    assert cfg.grpc.bind == "0.0.0.0:7444"
    assert cfg.log.level == "info"


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("jobs", "max_concurrent", "8", "expected an integer, got string '8'"),
        ("jobs", "max_concurrent", True, "expected an integer, got boolean true"),
        ("jobs", "max_concurrent", 0, "0 is below the minimum 1"),
        ("jobs", "stop_grace_s", -1, "-1 is below the minimum 0"),
        ("jobs", "colour", "red", "unknown key"),
        ("grpc", "max_threads", 9000, "9000 is above the maximum 8192"),
        ("grpc", "bind", "localhost", "'localhost' is not host:port"),
        ("scheduler", "address", "s:99999", "'s:99999': the port must be a number"),
        ("worker", "name", "Worker_1", "'Worker_1' does not match"),
        ("worker", "cluster", "dev.evil", "'dev.evil' does not match"),
        ("log", "level", "verbose", "'verbose' is not one of"),
    ],
)
def test_worker_config_error_names_file_and_key(confdir, section, key, value, expected):
    doc = worker_doc()
    doc.setdefault(section, {})[key] = value
    path, message = worker_error(confdir, doc)
    assert message.startswith(f"{path}: [{section}].{key}: {expected}"), message


def test_worker_config_error_names_the_label_key(confdir):
    doc = worker_doc()
    doc["worker"]["labels"] = {"rack": 1}
    path, message = worker_error(confdir, doc)
    assert message == (
        f"{path}: [worker].labels.rack: expected a string, got integer 1"
    )


def test_worker_config_reports_missing_required_key(confdir):
    doc = worker_doc()
    del doc["worker"]["name"]
    path, message = worker_error(confdir, doc)
    assert message == f"{path}: [worker].name: required key is missing"


def test_worker_config_reports_missing_section_by_its_first_key(confdir):
    doc = worker_doc()
    del doc["scheduler"]
    path, message = worker_error(confdir, doc)
    assert message == (
        f"{path}: [scheduler].address: set either address (one scheduler) or "
        "addresses (several), not both and not neither"
    )


def test_worker_config_takes_one_scheduler_address_or_several(confdir):
    doc = worker_doc()
    address = doc["scheduler"].pop("address")
    doc["scheduler"]["addresses"] = [address, "scheduler-2.example:7443"]
    cfg = worker_config.load(write(confdir, doc, "worker.toml"))
    assert cfg.scheduler.all == (address, "scheduler-2.example:7443")
    doc["scheduler"]["address"] = address
    path, message = worker_error(confdir, doc)
    assert "set either address (one scheduler) or addresses (several)" in message
    del doc["scheduler"]["address"]
    doc["scheduler"]["addresses"] = [address, address]
    path, message = worker_error(confdir, doc)
    assert message == f"{path}: [scheduler].addresses: lists an address twice"
    doc["scheduler"]["addresses"] = [address, "no-port"]
    path, message = worker_error(confdir, doc)
    assert message.startswith(f"{path}: [scheduler].addresses[1]: ")


def test_worker_config_reports_missing_tls_file(confdir):
    (confdir / "ca.pem").unlink()
    path, message = worker_error(confdir, worker_doc())
    assert message == f"{path}: [tls].ca_file: no such file '{confdir / 'ca.pem'}'"


def test_worker_config_reports_missing_scripts_dir(confdir):
    doc = worker_doc()
    doc["jobs"]["scripts_dir"] = "no-scripts"
    path, message = worker_error(confdir, doc)
    assert message == (
        f"{path}: [jobs].scripts_dir: no such directory '{confdir / 'no-scripts'}'"
    )


def test_worker_config_refuses_default_timeout_above_max(confdir):
    doc = worker_doc()
    doc["jobs"].update(default_timeout_s=100, max_timeout_s=10)
    path, message = worker_error(confdir, doc)
    assert message == (
        f"{path}: [jobs].default_timeout_s: 100 is above [jobs].max_timeout_s (10)"
    )


def test_worker_config_refuses_relative_interpreter(confdir):
    doc = worker_doc()
    doc["jobs"]["interpreters"] = {"bash": "bash"}
    path, message = worker_error(confdir, doc)
    assert message == (
        f"{path}: [jobs].interpreters.bash: 'bash' must be an absolute path"
    )


@pytest.mark.parametrize(
    ("jobs", "message"),
    [
        (
            {"uid_min": 70000, "uid_max": 60000},
            "[jobs].uid_min: 70000 is above uid_max (60000); give a range low to high",
        ),
        (
            {"uid_min": 60000, "uid_max": 60009, "max_concurrent": 64},
            "[jobs].uid_max: uid_min-uid_max holds 10 user ids, fewer than "
            "max_concurrent (64): widen the range or lower max_concurrent",
        ),
        (
            {"default_memory_mb": 1024, "max_memory_mb": 512},
            "[jobs].default_memory_mb: 1024 is above max_memory_mb (512)",
        ),
        ({"user_mode": "shared"}, "[jobs].user_mode: "),
        ({"min_free_bytes": -1}, "[jobs].min_free_bytes: "),
    ],
)
def test_worker_config_refuses_bad_job_accounts_and_limits(confdir, jobs, message):
    doc = worker_doc()
    doc["jobs"].update(jobs)
    path, error = worker_error(confdir, doc)
    assert error.startswith(f"{path}: {message}"), error


def test_worker_config_reports_invalid_toml(confdir):
    path, message = worker_error(confdir, "[worker\nname = 1\n")
    assert message.startswith(f"{path}: invalid TOML: ")


# -- scheduler.toml ------------------------------------------------------------


def test_scheduler_config_loads_with_defaults(confdir):
    cfg = scheduler_config.load(write(confdir, scheduler_doc(), "scheduler.toml"))
    assert cfg.cluster.name == "dev"
    assert cfg.auth.tokens_file == confdir / "tokens"
    assert cfg.http.bind == "127.0.0.1:8080"
    assert cfg.http.access_log is True
    assert cfg.workers.heartbeat_timeout_s > cfg.workers.heartbeat_interval_s


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("http", "processes", "2", "expected an integer, got string '2'"),
        ("http", "max_body_bytes", 100, "100 is below the minimum 1024"),
        ("http", "access_log", "yes", "expected true or false, got string 'yes'"),
        ("http", "bind", "8080", "'8080' is not host:port"),
        ("grpc", "bind", "[::1]:x", "'[::1]:x': the port must be a number"),
        ("cluster", "name", "", "'' does not match"),
        ("state", "busy_timeout_s", 0, "0 is below the minimum 0.1"),
        ("workers", "retry_after_s", 1.5, "expected an integer, got number 1.5"),
        ("workers", "max_heartbeats_per_s", 0, "0 is below the minimum 0.01"),
        ("workers", "heartbeat_jitter", 1.5, "1.5 is above the maximum 1.0"),
    ],
)
def test_scheduler_config_error_names_file_and_key(
    confdir, section, key, value, expected
):
    doc = scheduler_doc()
    doc.setdefault(section, {})[key] = value
    path, message = scheduler_error(confdir, doc)
    assert message.startswith(f"{path}: [{section}].{key}: {expected}"), message


@pytest.mark.parametrize(("interval", "timeout"), [(5.0, 5.0), (10.0, 2.0)])
def test_scheduler_config_requires_heartbeat_timeout_above_interval(
    confdir, interval, timeout
):
    doc = scheduler_doc()
    doc["workers"] = {"heartbeat_interval_s": interval, "heartbeat_timeout_s": timeout}
    path, message = scheduler_error(confdir, doc)
    assert message == (
        f"{path}: [workers].heartbeat_timeout_s: {timeout} must be greater than "
        f"heartbeat_interval_s ({interval})"
    )


def test_scheduler_config_serves_https_with_the_given_certificate(confdir):
    cfg = scheduler_config.load(write(confdir, scheduler_doc(), "scheduler.toml"))
    assert cfg.http.scheme == "https"
    assert cfg.http.tls.cert_file == confdir / "http.pem"
    assert cfg.http.tls.client_ca_file is None


def test_scheduler_config_requires_a_certificate_for_https(confdir):
    doc = scheduler_doc()
    del doc["http.tls"]
    path, message = scheduler_error(confdir, doc)
    assert message.startswith(f"{path}: [http.tls].cert_file: required for HTTPS")


def test_scheduler_config_allows_plain_http_on_loopback(confdir):
    doc = scheduler_doc()
    del doc["http.tls"]
    doc["http"] = {"scheme": "http", "bind": "127.0.0.1:8080"}
    cfg = scheduler_config.load(write(confdir, doc, "scheduler.toml"))
    assert cfg.http.scheme == "http"


def test_scheduler_config_refuses_plain_http_off_loopback(confdir):
    doc = scheduler_doc()
    doc["http"] = {"scheme": "http", "bind": "0.0.0.0:8080"}
    path, message = scheduler_error(confdir, doc)
    assert message.startswith(
        f"{path}: [http].bind: plain HTTP on '0.0.0.0' would send tokens in the clear"
    )
    doc["http"]["allow_plain_http_off_loopback"] = True
    cfg = scheduler_config.load(write(confdir, doc, "scheduler.toml"))
    assert cfg.http.bind == "0.0.0.0:8080"


def test_scheduler_config_names_a_postgresql_database_and_its_password_file(confdir):
    (confdir / "db-password").write_text("s3cret\n")
    doc = scheduler_doc()
    url = "postgresql://jobgate@db.example:5432/jobgate?sslmode=verify-full"
    doc["state"] = {"url": url, "password_file": "db-password", "pool_max": 4}
    cfg = scheduler_config.load(write(confdir, doc, "scheduler.toml"))
    assert (cfg.state.url, cfg.state.password_file) == (url, confdir / "db-password")
    assert (cfg.state.pool_min, cfg.state.pool_max) == (1, 4)


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (
            {"url": "postgresql://jobgate:s3cret@db.example/jobgate?sslmode=require"},
            "[state].url: the URL holds a password, which the config file must not: "
            "remove it and put it in a file named by [state].password_file",
        ),
        (
            {"url": "postgresql://jobgate@db.example/jobgate?sslmode=prefer"},
            "[state].url: sslmode=prefer could send the connection to db.example "
            "unencrypted; add sslmode=verify-full&sslrootcert=<CA file> to the URL "
            "(or sslmode=require), or connect over a unix socket or loopback",
        ),
        (
            {"url": "sqlite:///var/lib/jobgate/scheduler.db"},
            "[state].url: not a PostgreSQL URL (postgresql://user@host:port/dbname",
        ),
        (
            {"url": "postgresql:///jobgate", "password_file": "missing"},
            "[state].password_file: no such file",
        ),
        (
            {"url": "postgresql:///jobgate", "pool_min": 5, "pool_max": 4},
            "[state].pool_max: 4 is less than pool_min (5)",
        ),
    ],
)
def test_scheduler_config_refuses_a_state_database_it_cannot_use_safely(
    confdir, state, expected
):
    doc = scheduler_doc()
    doc["state"] = state
    path, message = scheduler_error(confdir, doc)
    assert message.startswith(f"{path}: {expected}"), message
    assert "s3cret" not in message


@pytest.mark.parametrize(
    "prefix", ["worker/scripts", "/srv/scripts/", "a/../b/", "./a/", "a//b/", "../"]
)
def test_scheduler_config_refuses_an_original_path_prefix_that_is_not_plain(
    confdir, prefix
):
    doc = scheduler_doc()
    doc["http"] = {"original_path_prefix": prefix}
    path, message = scheduler_error(confdir, doc)
    assert message.startswith(
        f"{path}: [http].original_path_prefix: {prefix!r} must be a relative "
        "directory path ending in '/'"
    )
    doc["http"] = {"original_path_prefix": "worker/scripts/"}
    cfg = scheduler_config.load(write(confdir, doc, "scheduler.toml"))
    assert cfg.http.original_path_prefix == "worker/scripts/"


def test_scheduler_config_refuses_client_certificates_without_https(confdir):
    doc = scheduler_doc()
    doc["http"] = {"scheme": "http"}
    doc["http.tls"] = {"client_ca_file": "ca.pem"}
    path, message = scheduler_error(confdir, doc)
    assert message == (
        f"{path}: [http.tls].client_ca_file: client certificates need "
        '[http].scheme = "https"'
    )


def test_scheduler_config_refuses_an_unknown_client_scope(confdir):
    doc = scheduler_doc()
    doc["http.tls"]["client_scopes"] = {"ops": "admin"}
    path, message = scheduler_error(confdir, doc)
    assert message == (
        f"{path}: [http.tls].client_scopes.ops: 'admin' is not one of 'read', 'run'"
    )


def test_scheduler_config_reports_missing_tokens_file(confdir):
    (confdir / "tokens").unlink()
    path, message = scheduler_error(confdir, scheduler_doc())
    assert message == f"{path}: [auth].tokens_file: no such file '{confdir / 'tokens'}'"


def test_scheduler_config_reports_tls_key_that_is_a_directory(confdir):
    doc = scheduler_doc()
    doc["tls"]["key_file"] = "scripts"
    path, message = scheduler_error(confdir, doc)
    assert message == (
        f"{path}: [tls].key_file: '{confdir / 'scripts'}' is not a regular file"
    )


def test_scheduler_config_reports_missing_auth_section(confdir):
    doc = scheduler_doc()
    del doc["auth"]
    path, message = scheduler_error(confdir, doc)
    assert message == f"{path}: [auth].tokens_file: required key is missing"


# -- check-config on the command line ------------------------------------------


def cli(program: str, module: str, *args: str) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name(program)
    argv = [str(script)] if script.exists() else [sys.executable, "-m", module]
    return subprocess.run(
        [*argv, *args], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize(
    ("program", "module", "doc"),
    [
        ("jobgate-worker", "worker.cli", worker_doc),
        ("jobgate-scheduler", "scheduler.cli", scheduler_doc),
    ],
)
def test_check_config_accepts_good_file(confdir, program, module, doc):
    path = write(confdir, doc(), "good.toml")
    result = cli(program, module, "check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{path}: OK"
    assert result.stderr == ""


def test_worker_check_config_refuses_bad_file_with_exit_code_2(confdir):
    doc = worker_doc()
    doc["jobs"]["max_concurrent"] = 0
    path = write(confdir, doc, "bad.toml")
    result = cli("jobgate-worker", "worker.cli", "check-config", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip() == (
        f"jobgate-worker: {path}: [jobs].max_concurrent: 0 is below the minimum 1"
    )


def test_scheduler_check_config_refuses_bad_file_with_exit_code_2(confdir):
    doc = scheduler_doc()
    doc["workers"] = {"heartbeat_interval_s": 5, "heartbeat_timeout_s": 5}
    path = write(confdir, doc, "bad.toml")
    result = cli("jobgate-scheduler", "scheduler.cli", "check-config", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    expected = f"jobgate-scheduler: {path}: [workers].heartbeat_timeout_s: "
    assert result.stderr.startswith(expected)


def test_check_config_reports_missing_file_with_exit_code_2(tmp_path):
    path = tmp_path / "absent.toml"
    result = cli("jobgate-worker", "worker.cli", "check-config", str(path))
    assert result.returncode == 2
    assert result.stderr.strip() == f"jobgate-worker: {path}: no such file"


def test_retired_http_keys_load_with_a_warning_naming_them(confdir, caplog):
    doc = scheduler_doc()
    doc["http"] = {"threads": 16, "linger_ms": 5}
    path = write(confdir, doc)
    with caplog.at_level("WARNING"):
        cfg = scheduler_config.load(path)
    assert cfg.http.request_timeout_s == 10
    assert f"{path}: [http].threads: no longer used" in caplog.text
    assert f"{path}: [http].linger_ms: no longer used" in caplog.text


def test_retired_keys_are_only_retired_where_declared(confdir):
    doc = scheduler_doc()
    doc["grpc"] = {"threads": 16}
    _, message = scheduler_error(confdir, doc)
    assert "[grpc].threads: unknown key" in message
