"""Role checks for gRPC servers, done once in an interceptor.

gRPC's server interceptors see only the method name, not the TLS session, so
the interceptor wraps each handler: the wrapper reads the caller's identity
from the certificate and refuses callers whose role the policy does not allow
for that method. Servicers that need the caller's name (a worker may only act
on itself) read it again with :func:`jobgate.identity.peer_identity`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import grpc

from jobgate import identity
from jobgate.identity import Identity

log = logging.getLogger(__name__)

# Health checks carry no data and are open to any certificate of the cluster.
HEALTH_PREFIX = "/grpc.health.v1.Health/"



class RoleInterceptor(grpc.ServerInterceptor):
    """Allow a method only to callers whose certificate role the policy names.

    ``policy`` maps a service prefix (``/jobgate.v1.Worker/``) or a full method
    name to the roles allowed; methods it does not cover are refused.
    """

    def __init__(self, cluster: str, policy: Mapping[str, Iterable[str]]):
        self.cluster = cluster
        self.policy = {k: frozenset(v) for k, v in policy.items()}

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
        roles = self.allowed_roles(handler_call_details.method)
        return _wrap(handler, self.cluster, roles, handler_call_details.method)


def _check(context, cluster: str, roles: frozenset[str], method: str) -> Identity:
    ident = identity.peer_identity(context, cluster)
    if ident is None:
        log.warning("refused %s: caller has no identity of cluster %s", method, cluster)
        context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            f"a certificate of cluster {cluster!r} with a spiffe:// identity is required",
        )
    if ident.role not in roles:
        log.warning("refused %s to %s: role not allowed", method, ident)
        context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{ident} may not call {method}",
        )
    return ident


def _wrap(handler, cluster, roles, method):
    if handler.unary_unary:
        inner = handler.unary_unary

        def unary_unary(request, context):
            _check(context, cluster, roles, method)
            return inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream:
        inner_stream = handler.unary_stream

        def unary_stream(request, context):
            _check(context, cluster, roles, method)
            yield from inner_stream(request, context)

        return grpc.unary_stream_rpc_method_handler(
            unary_stream,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    # No client-streaming methods exist in the contract; refuse rather than
    # serve one unchecked if one is ever added without updating this.
    raise RuntimeError(f"RoleInterceptor cannot guard streaming-request method {method}")
