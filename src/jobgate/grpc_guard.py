"""The one door into every gRPC servicer: role checks and error mapping.

gRPC's server interceptors see only the method name, not the TLS session, so
:class:`ServerGuard` wraps each handler. The wrapper reads the caller's identity
from the certificate and refuses callers whose role the policy does not allow
for that method. Servicers that need the caller's name (a worker may only act
on itself) get the identity the guard checked with :func:`caller`, without
reading the certificate again.

The wrapper is also the one place errors become gRPC statuses: a
:class:`~jobgate.errors.JobgateError`, raised by a servicer or by the guard's
own checks, aborts the call with its code and message, and an unexpected
exception with a bare INTERNAL after its traceback was logged once.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Iterable, Mapping

import grpc

from jobgate import identity, logs
from jobgate.errors import JobgateError, PermissionDenied, Unauthenticated
from jobgate.identity import Identity

log = logging.getLogger(__name__)

# Health checks carry no data and are open to any certificate of the cluster.
HEALTH_PREFIX = "/grpc.health.v1.Health/"

# The call being served on this thread and its caller, as checked by the guard.
_CALLER: contextvars.ContextVar[tuple[object, Identity] | None] = (
    contextvars.ContextVar("jobgate_caller", default=None)
)


def caller(context, cluster: str) -> Identity | None:
    """The identity of the caller of the call ``context`` belongs to.

    Inside a guarded handler this is the identity the guard already checked;
    elsewhere it is read from the certificate.
    """
    current = _CALLER.get()
    if current is not None and current[0] is context:
        return current[1]
    return identity.peer_identity(context, cluster)


class ServerGuard(grpc.ServerInterceptor):
    """Allow a method only to callers whose certificate role the policy names.

    ``policy`` maps a service prefix (``/jobgate.v1.Worker/``) or a full method
    name to the roles allowed; methods it does not cover are refused.
    """

    def __init__(self, cluster: str, policy: Mapping[str, Iterable[str]]):
        self.cluster = cluster
        self.policy = {k: frozenset(v) for k, v in policy.items()}
        # gRPC asks the interceptor on every call; a method's guarded handler
        # is made once, for the handler object the server resolves it to.
        self._guarded: dict[str, tuple[object, object]] = {}

    def allowed_roles(self, method: str) -> frozenset[str]:
        if method in self.policy:
            return self.policy[method]
        if method.startswith(HEALTH_PREFIX):
            return frozenset({identity.SCHEDULER, identity.WORKER, identity.CLIENT})
        service = method.rsplit("/", 1)[0] + "/"
        return self.policy.get(service, frozenset())

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._guarded.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        guarded = _wrap(handler, self.cluster, self.allowed_roles(method), method)
        self._guarded[method] = (handler, guarded)
        return guarded


def _check(context, cluster: str, roles: frozenset[str], method: str) -> Identity:
    ident = identity.peer_identity(context, cluster)
    if ident is None:
        log.warning("refused %s: caller has no identity of cluster %s", method, cluster)
        raise Unauthenticated(
            f"a certificate of cluster {cluster!r} with a spiffe:// identity "
            "is required"
        )
    if ident.role not in roles:
        log.warning("refused %s to %s: role not allowed", method, ident)
        raise PermissionDenied(f"{ident} may not call {method}")
    return ident


def _abort(context, exc: Exception, method: str):
    if isinstance(exc, JobgateError):
        context.abort(exc.code, exc.message)
    if _is_abort(exc):
        raise exc  # the servicer aborted on its own: keep its status
    log.exception("%s failed unexpectedly", method)
    context.abort(grpc.StatusCode.INTERNAL, "internal error; see the service's log")


def _is_abort(exc: Exception) -> bool:
    # grpc raises a bare Exception from context.abort(); recognise it by the
    # status the context already holds.
    return type(exc) is Exception


REQUEST_ID_KEY = "x-request-id"


def _bind_request_id(context) -> object:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and len(value) <= 64:
            return logs.bind(REQUEST_ID=value)
    return None


def _wrap(handler, cluster, roles, method):
    if handler.unary_unary:
        inner = handler.unary_unary

        def unary_unary(request, context):
            checked = token = None
            try:
                ident = _check(context, cluster, roles, method)
                checked = _CALLER.set((context, ident))
                token = _bind_request_id(context)
                return inner(request, context)
            except Exception as exc:  # noqa: BLE001 - mapped below, never lost
                _abort(context, exc, method)
            finally:
                if token is not None:
                    logs.unbind(token)
                if checked is not None:
                    _CALLER.reset(checked)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream:
        inner_stream = handler.unary_stream

        def unary_stream(request, context):
            token = None
            try:
                _check(context, cluster, roles, method)
                token = _bind_request_id(context)
                yield from inner_stream(request, context)
            except Exception as exc:  # noqa: BLE001 - mapped below, never lost
                _abort(context, exc, method)
            finally:
                if token is not None:
                    logs.unbind(token)

        return grpc.unary_stream_rpc_method_handler(
            unary_stream,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    # No client-streaming methods exist in the contract; refuse rather than
    # serve one unchecked if one is ever added without updating this.
    raise RuntimeError(f"ServerGuard cannot guard streaming-request method {method}")
