"""Where the jobgate client takes its settings from, and what it makes of them.

No network: settings are resolved from flag dicts, environment dicts and
files in a temporary directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from jobgate.client import (
    Client,
    Settings,
    SettingsError,
    cli,
    commands,
    default_config_path,
    exits,
    output,
    resolve_settings,
)

NO_FLAGS: dict[str, str | None] = {}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """An empty home directory, so no real config file takes part."""
    path = tmp_path / "home"
    path.mkdir()
    return path


def env_for(home: Path, **extra: str) -> dict[str, str]:
    return {"HOME": str(home), **extra}


def default_file(home: Path, text: str) -> Path:
    return write(home / ".config" / "jobgate" / "client.toml", text)


# -- precedence ---------------------------------------------------------------


def test_flag_beats_environment_beats_file_for_url(home):
    default_file(home, 'url = "http://file:1"\ntoken = "from-file-token-0123"\n')
    env = env_for(home, JOBGATE_URL="http://env:2")

    assert resolve_settings(NO_FLAGS, env_for(home)).url == "http://file:1"
    assert resolve_settings(NO_FLAGS, env).url == "http://env:2"
    flags = {"url": "http://flag:3"}
    settings = resolve_settings(flags, env)
    assert settings.url == "http://flag:3"
    assert settings.sources["url"] == "--url"


def test_each_setting_comes_from_the_highest_layer_that_gives_it(home):
    default_file(home, 'url = "http://file:1"\ntoken = "from-file-token-0123"\n')
    settings = resolve_settings(NO_FLAGS, env_for(home, JOBGATE_URL="http://env:2"))
    assert settings.url == "http://env:2"
    assert settings.token == "from-file-token-0123"
    assert settings.sources["token"].endswith(": token")


def test_environment_token_beats_file_token(home):
    default_file(home, 'token = "from-file-token-0123"\n')
    env = env_for(home, JOBGATE_TOKEN="from-env-token-4567")
    assert resolve_settings(NO_FLAGS, env).token == "from-env-token-4567"


def test_token_file_flag_beats_token_in_environment(home, tmp_path):
    token_file = write(tmp_path / "tok", "from-flag-file-token\n")
    env = env_for(home, JOBGATE_TOKEN="from-env-token-4567")
    settings = resolve_settings({"token_file": str(token_file)}, env)
    assert settings.token == "from-flag-file-token"  # stripped of the newline
    assert settings.sources["token"].startswith("--token-file")


def test_token_flag_beats_token_file_in_environment(home, tmp_path):
    token_file = write(tmp_path / "tok", "from-env-file-token\n")
    env = env_for(home, JOBGATE_TOKEN_FILE=str(token_file))
    assert resolve_settings(NO_FLAGS, env).token == "from-env-file-token"
    settings = resolve_settings({"token": "from-flag-token-890"}, env)
    assert settings.token == "from-flag-token-890"


def test_token_file_of_a_lower_layer_is_not_read_when_a_higher_one_wins(home):
    default_file(home, 'token_file = "missing-token-file"\n')
    env = env_for(home, JOBGATE_TOKEN="from-env-token-4567")
    assert resolve_settings(NO_FLAGS, env).token == "from-env-token-4567"
    with pytest.raises(SettingsError, match="token_file: cannot read"):
        resolve_settings(NO_FLAGS, env_for(home))


def test_token_and_token_file_in_one_layer_is_an_error(home, tmp_path):
    token_file = write(tmp_path / "tok", "x" * 20)
    with pytest.raises(SettingsError, match="--token and --token-file"):
        resolve_settings({"token": "y" * 20, "token_file": str(token_file)}, {})
    default_file(home, f'token = "{"y" * 20}"\ntoken_file = "{token_file}"\n')
    with pytest.raises(SettingsError, match="give one or the other"):
        resolve_settings(NO_FLAGS, env_for(home))


# -- the config file ----------------------------------------------------------


def test_paths_in_the_file_are_relative_to_its_directory(home):
    conf = default_file(
        home,
        'url = "https://jobs.example:8443"\n'
        'token_file = "secret/token"\n'
        'ca_file = "pki/ca.pem"\n'
        'cert_file = "pki/me.pem"\n'
        'key_file = "/abs/me.key"\n',
    )
    write(conf.parent / "secret" / "token", "file-token-relative\n")
    settings = resolve_settings(NO_FLAGS, env_for(home))
    assert settings.token == "file-token-relative"
    assert settings.ca_file == conf.parent / "pki" / "ca.pem"
    assert settings.cert_file == conf.parent / "pki" / "me.pem"
    assert settings.key_file == Path("/abs/me.key")


def test_config_flag_beats_jobgate_config_beats_default_path(home, tmp_path):
    default_file(home, 'url = "http://default:1"\n')
    named = write(tmp_path / "named.toml", 'url = "http://named:2"\n')
    by_flag = write(tmp_path / "flag.toml", 'url = "http://flag:3"\n')
    env = env_for(home, JOBGATE_CONFIG=str(named))

    assert resolve_settings(NO_FLAGS, env_for(home)).url == "http://default:1"
    assert resolve_settings(NO_FLAGS, env).url == "http://named:2"
    assert resolve_settings(NO_FLAGS, env, config=by_flag).url == "http://flag:3"


def test_xdg_config_home_moves_the_default_file(home, tmp_path):
    xdg = tmp_path / "xdg"
    write(xdg / "jobgate" / "client.toml", 'url = "http://xdg:1"\n')
    env = env_for(home, XDG_CONFIG_HOME=str(xdg))
    assert default_config_path(env) == xdg / "jobgate" / "client.toml"
    assert resolve_settings(NO_FLAGS, env).url == "http://xdg:1"


def test_missing_default_file_is_fine_but_missing_named_file_is_an_error(
    home, tmp_path
):
    assert resolve_settings(NO_FLAGS, env_for(home)) == Settings()
    with pytest.raises(SettingsError, match="no such config file"):
        resolve_settings(NO_FLAGS, env_for(home), config=tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('url = "http://x:1"\ncolour = "red"\n', "colour: unknown key"),
        ("url = 8080\n", "url: must be a non-empty string"),
        ('token = ""\n', "token: must be a non-empty string"),
        ("url = http://x\n", "not valid TOML"),
    ],
)
def test_bad_config_file_is_an_error_naming_file_and_key(home, text, message):
    conf = default_file(home, text)
    with pytest.raises(SettingsError, match=message) as info:
        resolve_settings(NO_FLAGS, env_for(home))
    assert str(conf) in str(info.value)


def test_config_file_that_is_not_utf8_is_an_error(home):
    default_file(home, "")
    (home / ".config" / "jobgate" / "client.toml").write_bytes(b'url = "caf\xe9"\n')
    with pytest.raises(SettingsError, match="not valid TOML"):
        resolve_settings(NO_FLAGS, env_for(home))


def test_unreadable_or_empty_token_file_is_an_error(home, tmp_path):
    empty = write(tmp_path / "empty", "\n")
    with pytest.raises(SettingsError, match="is empty"):
        resolve_settings({"token_file": str(empty)}, env_for(home))
    with pytest.raises(SettingsError, match="JOBGATE_TOKEN_FILE: cannot read"):
        resolve_settings(
            NO_FLAGS, env_for(home, JOBGATE_TOKEN_FILE=str(tmp_path / "missing"))
        )


# -- what the settings make ----------------------------------------------------


@pytest.mark.parametrize(
    "url", ["127.0.0.1:8080", "ftp://host:21", "http://", "http://host:port"]
)
def test_url_that_is_not_http_or_https_is_refused(url):
    with pytest.raises(SettingsError, match="url"):
        Client(url, "t" * 20)


def test_client_certificate_needs_https():
    with pytest.raises(SettingsError, match="https"):
        Client("http://127.0.0.1:1", "t" * 20, cert_file="me.pem")


def test_missing_ca_file_is_a_config_error(tmp_path):
    with pytest.raises(SettingsError, match="ca_file: cannot load"):
        Client("https://127.0.0.1:1", "t" * 20, ca_file=tmp_path / "none.pem")


def test_url_path_prefix_is_kept_for_a_proxy():
    client = Client("https://proxy.example/jobgate/", "t" * 20)
    assert (client.host, client.port, client.prefix) == (
        "proxy.example",
        None,
        "/jobgate",
    )


def test_settings_without_url_or_token_cannot_make_a_client():
    with pytest.raises(SettingsError, match="no scheduler URL"):
        Settings(token="t" * 20).client()
    with pytest.raises(SettingsError, match="no API token"):
        Settings(url="http://127.0.0.1:1").client()


def test_client_certificate_over_https_stands_in_for_the_token(tmp_path):
    cert = tmp_path / "me.pem"
    with pytest.raises(SettingsError, match="no API token"):
        Settings(url="http://127.0.0.1:1", cert_file=cert).client()
    # Over https the token is not asked for; the (missing) certificate is.
    with pytest.raises(SettingsError, match="cert_file: cannot load"):
        Settings(url="https://127.0.0.1:1", cert_file=cert).client()


# -- the command, without a scheduler --------------------------------------------


def run_main(monkeypatch, capsys, home, argv, **env):
    for key in list(os.environ):
        if key.startswith("JOBGATE_") or key == "XDG_CONFIG_HOME":
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(home))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_missing_url_exits_2_with_a_hint(monkeypatch, capsys, home):
    code, out, err = run_main(monkeypatch, capsys, home, ["workers"])
    assert code == 2
    assert "no scheduler URL" in err
    assert "JOBGATE_URL" in err and "--url" in err
    assert out == ""


def test_missing_token_exits_2_with_a_hint(monkeypatch, capsys, home):
    code, _, err = run_main(
        monkeypatch, capsys, home, ["workers"], JOBGATE_URL="http://127.0.0.1:1"
    )
    assert code == 2
    assert "no API token" in err and "JOBGATE_TOKEN" in err


def test_bad_config_file_exits_2_naming_the_key(monkeypatch, capsys, home):
    default_file(home, 'url = "http://x:1"\nproxy = "y"\n')
    code, _, err = run_main(monkeypatch, capsys, home, ["workers"])
    assert code == 2
    assert "proxy: unknown key" in err


def test_usage_errors_exit_2(monkeypatch, capsys, home):
    env = {"JOBGATE_URL": "http://127.0.0.1:1", "JOBGATE_TOKEN": "t" * 20}
    for argv in (
        ["nope"],
        ["run", "worker-1"],
        ["run", "worker-1", "a.sh", "--wait", "--follow"],
        ["run", "worker-1", "a.sh", "--follow", "--json"],
        ["fanout", "a.sh"],
        ["fanout", "--label", "novalue", "a.sh"],
        ["logs", "w", "j", "--offset", "-1"],
        ["status", "w", "j", "--", "x"],
    ):
        code, _, err = run_main(monkeypatch, capsys, home, argv, **env)
        assert code == 2, (argv, err)
        assert "Traceback" not in err


def test_common_options_work_before_and_after_the_command():
    parser = cli.build_parser()
    before = parser.parse_args(["--json", "--url", "http://a:1", "workers"])
    after = parser.parse_args(["workers", "--json", "--url", "http://a:1"])
    neither = parser.parse_args(["--url", "http://a:1", "workers"])
    assert (before.json, before.url) == (True, "http://a:1")
    assert (after.json, after.url) == (True, "http://a:1")
    assert neither.json is False and neither.url == "http://a:1"


def test_script_arguments_after_double_dash_may_start_with_a_dash():
    parser = cli.build_parser()
    args = cli.parse_command_line(
        parser, ["run", "w", "s.sh", "a", "--wait", "--", "-v", "--", "--x"]
    )
    assert (args.script, args.args, args.wait) == (
        "s.sh",
        ["a", "-v", "--", "--x"],
        True,
    )
    args = cli.parse_command_line(parser, ["fanout", "--all", "s.sh", "--", "-n"])
    assert (args.script, args.args, args.all) == ("s.sh", ["-n"], True)


# -- exit status of a job, and output formats -------------------------------------


@pytest.mark.parametrize(
    ("job", "code"),
    [
        ({"state": "succeeded", "exit_code": 0}, 0),
        ({"state": "failed", "exit_code": 3, "exit_reason": "failed"}, 3),
        ({"state": "failed", "signal": 9, "exit_reason": "killed"}, 137),
        ({"state": "timed_out", "signal": 15, "exit_reason": "timed_out"}, 124),
        ({"state": "stopped", "signal": 15, "exit_reason": "stopped"}, 125),
        ({"state": "failed", "exit_code": 127, "exit_reason": "start_failed"}, 126),
        ({"state": "lost", "exit_reason": "lost"}, 127),
    ],
)
def test_job_exit_status(job, code):
    assert exits.job_exit_status(job) == code


def test_table_columns_are_aligned_and_missing_values_dashed():
    text = output.format_table(
        ("NAME", "STATE", "LABELS"),
        [("worker-1", "online", {"role": "web"}), ("w2", None, {})],
    )
    assert text.splitlines() == [
        "NAME      STATE   LABELS",
        "worker-1  online  role=web",
        "w2        -       -",
    ]


def test_object_lines_put_known_keys_first_and_name_signals():
    text = output.format_object(
        {"extra": 1, "signal": 9, "job_id": "j", "args": ["a b", "c"]},
        ("job_id", "signal"),
    )
    assert text.splitlines() == [
        "job_id: j",
        "signal: 9 (SIGKILL)",
        "extra:  1",
        "args:   'a b' c",
    ]


@pytest.mark.parametrize(
    ("argv", "limits"),
    [
        ([], {}),
        (["--memory", "256M"], {"memory_mb": 256}),
        (["--memory", "2g", "--cpu", "50"], {"memory_mb": 2048, "cpu_percent": 50}),
        (["--memory", "300", "--tasks", "20"], {"memory_mb": 300, "tasks": 20}),
    ],
)
def test_run_and_fanout_take_limits(argv, limits):
    parser = cli.build_parser()
    run = parser.parse_args(["run", "w1", "x.sh", *argv])
    fan = parser.parse_args(["fanout", "--all", "x.sh", *argv])
    assert commands._limits(run) == commands._limits(fan) == limits


@pytest.mark.parametrize(
    ("size", "error"),
    [
        ("lots", "'lots' is not a size"),
        ("1.5G", "'1.5G' is not a size"),
        ("0", "'0' must be positive"),
        ("-5M", "'-5M' must be positive"),
    ],
)
def test_a_memory_size_that_is_not_one_is_refused(size, error, capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["run", "w1", "x.sh", f"--memory={size}"])
    assert error in capsys.readouterr().err
