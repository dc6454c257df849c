"""Checks a start request against the worker's settings before anything runs.

Every refusal is an error a client can act on: it names the field and says
what this worker allows.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
from pathlib import Path

from jobgate import model
from jobgate.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from worker.config import JobsSection
from worker.limits import NAMES, Enforcer, Limits

MAX_IDEMPOTENCY_KEY = model.START["idempotency_key"].max_length


@dataclasses.dataclass(frozen=True)
class StartRequest:
    """A start request that passed every check."""

    command: str
    path: str
    args: list[str]
    argv: list[str]  # interpreter, the script's real path, args
    timeout_s: int
    idempotency_key: str
    limits: Limits = Limits()


class Validator:
    def __init__(self, cfg: JobsSection):
        self.cfg = cfg
        self.scripts_dir = cfg.scripts_dir.resolve()
        self._scripts = str(self.scripts_dir)
        # Inside it means below it: the directory itself is no script.
        self._scripts_prefix = self._scripts.rstrip("/") + "/"

    def start(
        self,
        command: str,
        path: str,
        args: list[str],
        timeout_s: int,
        idempotency_key: str,
        limits: dict[str, int] | None = None,
        enforcer: Enforcer | None = None,
    ) -> StartRequest:
        exe = self.interpreter(command)
        script = self.resolve_script(path)
        self.check_args(args)
        timeout = self.timeout(timeout_s)
        if len(idempotency_key) > MAX_IDEMPOTENCY_KEY:
            raise InvalidArgument(
                f"idempotency_key is longer than {MAX_IDEMPOTENCY_KEY} characters"
            )
        return StartRequest(
            command,
            path,
            args,
            [exe, str(script), *args],
            timeout,
            idempotency_key,
            self.limits(limits or {}, enforcer),
        )

    def limits(self, requested: dict[str, int], enforcer: Enforcer | None) -> Limits:
        """The job's limits: as asked (within the maxima), else the defaults.

        Where a maximum is set and neither the job nor a default sets the
        limit, the job gets the maximum: no job runs above it.
        """
        unknown = set(requested) - set(NAMES)
        if unknown:
            raise InvalidArgument(
                f"limits.{sorted(unknown)[0]} is not a limit; known: {', '.join(NAMES)}"
            )
        values = {}
        for name in NAMES:
            asked = requested.get(name, 0)
            top = getattr(self.cfg, f"max_{name}")
            if asked < 0:
                raise InvalidArgument(f"limits.{name} must be 0 (none) or positive")
            if top and asked > top:
                raise InvalidArgument(
                    f"limits.{name} {asked} is above this worker's maximum {top} "
                    f"([jobs].max_{name})"
                )
            value = asked or getattr(self.cfg, f"default_{name}") or top
            if value and (enforcer is None or not enforcer.how(name)):
                why = enforcer.why_not(name) if enforcer else "no cgroups"
                raise FailedPrecondition(
                    f"limits.{name}: this worker cannot enforce it on its host "
                    f"({why}); start the job without it or on another worker"
                )
            values[name] = value
        return Limits(**values)

    def resolve_script(self, path: str) -> Path:
        """The real path of ``path`` inside the scripts directory, or an error."""
        if not path:
            raise InvalidArgument("path is required: a script in the scripts directory")
        if "\0" in path:
            raise InvalidArgument("path must not contain NUL characters")
        if os.path.isabs(path):
            raise PermissionDenied(
                f"path {path!r} is absolute; give it relative to the scripts directory"
            )
        try:
            real = os.path.realpath(os.path.join(self._scripts, path))
            if real != self._scripts and not real.startswith(self._scripts_prefix):
                raise PermissionDenied(
                    f"path {path!r} is outside the scripts directory"
                )
            try:
                mode = os.stat(real).st_mode
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    raise
                mode = 0  # nothing there
            if stat.S_ISDIR(mode):
                raise InvalidArgument(f"path {path!r} is a directory, not a script")
            if not stat.S_ISREG(mode):
                raise InvalidArgument(f"no script {path!r} in the scripts directory")
        except OSError as exc:  # e.g. a name longer than the filesystem allows
            raise InvalidArgument(f"path {path!r}: {exc.strerror}") from None
        return Path(real)

    def interpreter(self, command: str) -> str:
        exe = self.cfg.interpreters.get(command)
        if exe is None:
            allowed = ", ".join(sorted(self.cfg.interpreters)) or "none"
            raise PermissionDenied(
                f"command {command!r} is not allowed on this worker "
                f"(allowed: {allowed})"
            )
        return exe

    def check_args(self, args: list[str]) -> None:
        if len(args) > self.cfg.max_args:
            raise InvalidArgument(
                f"args has {len(args)} items; this worker allows {self.cfg.max_args}"
            )
        size = 0
        for i, a in enumerate(args):
            if "\0" in a:
                raise InvalidArgument(f"args[{i}] must not contain NUL characters")
            size += len(a.encode())
        if size > self.cfg.max_arg_bytes:
            raise InvalidArgument(
                f"args total {size} bytes; this worker allows {self.cfg.max_arg_bytes}"
            )

    def timeout(self, requested: int) -> int:
        if requested < 0:
            raise InvalidArgument("timeout_s must be 0 (the default) or positive")
        if requested > self.cfg.max_timeout_s:
            raise InvalidArgument(
                f"timeout_s {requested} is above this worker's maximum "
                f"{self.cfg.max_timeout_s}"
            )
        return requested or self.cfg.default_timeout_s
