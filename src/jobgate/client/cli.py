"""``jobgate``: the command-line client of the scheduler's HTTP API.

    jobgate workers
    jobgate run worker-1 backup.sh --wait      # exits with the job's exit code
    jobgate logs worker-1 JOB --follow

The scheduler's URL and an API token come from flags, else the environment
(``JOBGATE_URL``, ``JOBGATE_TOKEN``), else ``~/.config/jobgate/client.toml``.
See :data:`EXIT_CODES` for what the exit status means.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from jobgate import __version__
from jobgate.client.commands import (
    cmd_drain,
    cmd_fanout,
    cmd_group,
    cmd_jobs,
    cmd_logs,
    cmd_run,
    cmd_status,
    cmd_stop,
    cmd_undrain,
    cmd_worker,
    cmd_workers,
)
from jobgate.client.errors import ApiError, ConnectionFailed, SettingsError
from jobgate.client.exits import (
    EXIT_API,
    EXIT_BROKEN_PIPE,
    EXIT_CODES,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    PROG,
    UNAVAILABLE_STATUSES,
    UsageError,
)
from jobgate.client.output import Output
from jobgate.client.settings import (
    ENV_CONFIG,
    Settings,
    default_config_path,
    resolve_settings,
)

# Options every command takes, before or after the command's name.
SETTING_FLAGS = ("url", "token", "token_file", "ca_file", "cert_file", "key_file")


# -- the command line -------------------------------------------------------------


def _common_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Options every command takes. ``suppress`` (for a command's own parser)
    keeps one not given after the command's name from overwriting the value
    given before it."""
    title = "connection (flags > JOBGATE_* > config file; before or after COMMAND)"
    g = parser.add_argument_group(title)
    added = [
        g.add_argument(
            "--url",
            help="scheduler URL, http(s)://host:port; several schedulers: "
            "their URLs separated by commas [JOBGATE_URL]",
        ),
        g.add_argument(
            "--token",
            help="API token [JOBGATE_TOKEN]; other users can see it in the process "
            "list, so prefer --token-file or the environment",
        ),
        g.add_argument("--token-file", help="file holding the API token"),
        g.add_argument("--ca-file", help="CA certificate(s) to verify an https:// URL"),
        g.add_argument("--cert-file", help="client certificate for https://"),
        g.add_argument("--key-file", help="key of --cert-file"),
        g.add_argument(
            "--config",
            help=f"client config file [{ENV_CONFIG}] "
            "(default: ~/.config/jobgate/client.toml)",
        ),
        g.add_argument(
            "--http-timeout",
            type=float,
            metavar="S",
            help="seconds to wait for an ordinary answer (default 30; waits and "
            "streams are not limited)",
        ),
        parser.add_argument("--json", action="store_true", help="print JSON"),
    ]
    if suppress:
        for action in added:
            action.default = argparse.SUPPRESS
            if action.dest != "json":  # listed once, in 'jobgate --help'
                action.help = argparse.SUPPRESS


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


def _job_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("script", help="script path, relative to the scripts directory")
    p.add_argument(
        "args",
        nargs="*",
        help="arguments of the script (put -- before any that starts with -)",
    )
    p.add_argument(
        "--command",
        default="bash",
        help="interpreter, by its name on the worker (default: bash)",
    )
    p.add_argument(
        "--timeout",
        type=_positive_int,
        metavar="S",
        help="stop the job after S seconds (exit status 124)",
    )
    p.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="start at most one job per KEY; again, it answers for that job",
    )
    p.add_argument(
        "--memory",
        type=_megabytes,
        metavar="SIZE",
        help="memory limit, e.g. 256M or 2G (default: the worker's)",
    )
    p.add_argument(
        "--cpu",
        type=_positive_int,
        metavar="PERCENT",
        help="CPU limit in percent of one CPU, e.g. 50 or 200 (default: the worker's)",
    )
    p.add_argument(
        "--tasks",
        type=_positive_int,
        metavar="N",
        help="most processes and threads at once (default: the worker's)",
    )


def _megabytes(text: str) -> int:
    """``256M``, ``2G`` or a number of MiB, in MiB."""
    units = {"M": 1, "G": 1024, "T": 1024 * 1024}
    number, unit = text[:-1], text[-1:].upper()
    if unit not in units:
        number, unit = text, "M"
    try:
        value = int(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size: give MiB, or a number with M, G or T"
        ) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run scripts on jobgate workers through the scheduler's HTTP API.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    _common_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND", required=True)

    def add(name: str, func: Callable[..., int] | None, help_text: str):
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if func is not None:
            _common_options(p, suppress=True)
            p.set_defaults(func=func)
        return p

    p = add("workers", cmd_workers, "list the workers")
    p.add_argument("-q", "--quiet", action="store_true", help="only the names")
    p = add("worker", cmd_worker, "show one worker")
    p.add_argument("worker", help="worker name or id")

    p = add(
        "drain",
        cmd_drain,
        "take a worker out of service: it starts no new jobs, running ones go on",
    )
    p.add_argument("worker", help="worker name or id")
    p.add_argument(
        "--wait", action="store_true", help="wait until the worker runs no job"
    )
    p = add("undrain", cmd_undrain, "lift a worker's drain: it starts jobs again")
    p.add_argument("worker", help="worker name or id")

    p = add("run", cmd_run, "start a script on a worker")
    p.add_argument("worker", help="worker name or id")
    _job_options(p)
    how = p.add_mutually_exclusive_group()
    how.add_argument(
        "--follow",
        action="store_true",
        help="print the job's output as it runs; exit with the job's status",
    )
    how.add_argument(
        "--wait",
        action="store_true",
        help="wait for the job to end, print its status and exit with it",
    )

    p = add("status", cmd_status, "show a job's status")
    p.add_argument("worker", help="worker name or id")
    p.add_argument("job", help="job id")
    p = add("jobs", cmd_jobs, "list a worker's jobs, newest first")
    p.add_argument("worker", help="worker name or id")
    p = add("logs", cmd_logs, "print a job's output (raw bytes)")
    p.add_argument("worker", help="worker name or id")
    p.add_argument("job", help="job id")
    p.add_argument(
        "-f", "--follow", action="store_true", help="keep printing until the job ends"
    )
    p.add_argument(
        "--offset", type=_positive_int, default=0, metavar="N", help="start at byte N"
    )
    p = add("stop", cmd_stop, "stop a job and show its final status")
    p.add_argument("worker", help="worker name or id")
    p.add_argument("job", help="job id")

    p = add("fanout", cmd_fanout, "start a script on several workers (a group)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--workers", metavar="A,B", help="these workers, by name or id")
    which.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="workers with this label (repeat: all of them must match)",
    )
    which.add_argument("--all", action="store_true", help="every online worker")
    _job_options(p)
    p.add_argument(
        "--wait", action="store_true", help="wait for every job and show the group"
    )

    p = add("group", cmd_group, "show a group of jobs started by fanout")
    p.add_argument("group", help="group id")
    p.add_argument("--wait", action="store_true", help="wait until every job ended")

    p = add("completion", None, "print a shell completion script")
    p.add_argument("shell", choices=["bash"])
    return parser


# -- completion --------------------------------------------------------------------


def completion_script(parser: argparse.ArgumentParser, shell: str = "bash") -> str:
    """A bash completion script for ``jobgate`` (source it, or put it in
    ``/etc/bash_completion.d/``). Worker names come from ``jobgate workers -q``."""
    subparsers = next(
        a for a in parser._actions if isinstance(a, argparse._SubParsersAction)
    )
    global_opts = sorted(s for a in parser._actions for s in a.option_strings)
    valued = sorted(
        {
            s
            for p in [parser, *subparsers.choices.values()]
            for a in p._actions
            if a.nargs != 0
            for s in a.option_strings
        }
    )
    files = ["--token-file", "--ca-file", "--cert-file", "--key-file", "--config"]
    cases = []
    for name, p in subparsers.choices.items():
        opts = sorted(s for a in p._actions for s in a.option_strings)
        first = [a.dest for a in p._actions if not a.option_strings]
        takes_worker = bool(first) and first[0] == "worker"
        cases.append(
            f'        {name}) opts="{" ".join(opts)}"; '
            f"worker_first={1 if takes_worker else 0} ;;"
        )
    case_text = "\n".join(cases)
    return f"""# bash completion for {PROG}: source <({PROG} completion bash)
_{PROG}() {{
    local cur prev cmd="" cmd_at=0 i n opts="" worker_first=0
    COMPREPLY=()
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    case "$prev" in
        {"|".join(files)})
            COMPREPLY=($(compgen -f -- "$cur")); return ;;
        {"|".join(o for o in valued if o not in files)})
            return ;;
    esac
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${{COMP_WORDS[i]}}" in
            {"|".join(valued)}) ((i++)) ;;
            -*) ;;
            *) cmd="${{COMP_WORDS[i]}}"; cmd_at=$i; break ;;
        esac
    done
    if [[ -z "$cmd" ]]; then
        if [[ "$cur" == -* ]]; then
            COMPREPLY=($(compgen -W "{" ".join(global_opts)}" -- "$cur"))
        else
            COMPREPLY=($(compgen -W "{" ".join(subparsers.choices)}" -- "$cur"))
        fi
        return
    fi
    case "$cmd" in
{case_text}
    esac
    if [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
        return
    fi
    n=0
    for ((i = cmd_at + 1; i < COMP_CWORD; i++)); do
        case "${{COMP_WORDS[i]}}" in
            {"|".join(valued)}) ((i++)) ;;
            -*) ;;
            *) ((n++)) ;;
        esac
    done
    if [[ $worker_first == 1 && $n == 0 ]]; then
        COMPREPLY=($(compgen -W "$("${{COMP_WORDS[0]}}" workers -q 2>/dev/null)" \\
            -- "$cur"))
    fi
}}
complete -o default -F _{PROG} {PROG}
"""


# -- main ------------------------------------------------------------------------


def _config_hint(settings_error: str, config: str | None) -> str:
    path = config or os.environ.get(ENV_CONFIG) or default_config_path(os.environ)
    if settings_error == "no scheduler URL":
        return (
            "no scheduler URL: give --url, set JOBGATE_URL (after 'make run': "
            f"source run/local.env) or set url in {path}"
        )
    if settings_error == "no API token":
        return (
            "no API token: give --token-file, set JOBGATE_TOKEN or set token or "
            f"token_file in {path} (or, over https://, a client certificate with "
            "--cert-file)"
        )
    return settings_error


def _api_error_text(exc: ApiError, settings: Settings) -> str:
    text = f"{exc.status} {exc.title}"
    if exc.description:
        text += f": {exc.description}"
    if exc.status == 401 and "token" in settings.sources:
        text += f" (the token came from {settings.sources['token']})"
    if exc.retry_after and exc.status in UNAVAILABLE_STATUSES | {429}:
        text += f"; retry after {exc.retry_after}s"
    return text


def parse_command_line(
    parser: argparse.ArgumentParser, argv: Sequence[str]
) -> argparse.Namespace:
    """Parse ``argv``; everything after the first ``--`` is the script's.

    argparse alone cannot take script arguments after options
    (``run w s.sh --wait -- -v``), so they are split off first.
    """
    argv = list(argv)
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1 :]
    args = parser.parse_args(argv)
    if extra:
        if not hasattr(args, "args"):
            parser.error(f"{args.cmd}: takes no arguments after --")
        args.args = [*args.args, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the ``jobgate`` command; returns its exit status."""
    parser = build_parser()
    try:
        args = parse_command_line(parser, sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # --help, --version or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.cmd == "completion":
        sys.stdout.write(completion_script(parser, args.shell))
        return EXIT_OK
    o = Output(args.json, sys.stdout, sys.stderr)
    if args.cmd == "run" and args.follow and args.json:
        o.note("run: --json and --follow: choose one (--follow prints the output)")
        return EXIT_USAGE
    settings = Settings()
    try:
        flags = {k: getattr(args, k, None) for k in SETTING_FLAGS}
        settings = resolve_settings(flags, os.environ, args.config)
        timeout = args.http_timeout if args.http_timeout else 30.0
        client = settings.client(timeout=timeout)
        return args.func(client, args, o)
    except SettingsError as exc:
        o.note(_config_hint(str(exc), args.config))
        return EXIT_USAGE
    except UsageError as exc:
        o.note(f"{args.cmd}: {exc}")
        return EXIT_USAGE
    except ApiError as exc:
        o.note(_api_error_text(exc, settings))
        return EXIT_UNAVAILABLE if exc.status in UNAVAILABLE_STATUSES else EXIT_API
    except ConnectionFailed as exc:
        o.note(str(exc))
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (| head): stop quietly, like other tools.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
