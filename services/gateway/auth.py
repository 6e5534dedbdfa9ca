"""API keys in the `authorization` metadata (`Bearer <key>` or the bare key), mapped to roles, and
the gateway's first line of defence against hostile input.

Configuration holds only sha256 hashes of keys. Health checks and server reflection need no key;
everything else is denied unless the caller's role is allowed for that service.

The interceptor also
- labels every denied call with a method from a fixed set (`unknown` for paths the gateway does not
  serve): a label taken from the free-text RPC path would let anyone add series to `/metrics` for ever;
- turns a request body that does not decode into INVALID_ARGUMENT. grpc.aio deserialises before any
  servicer code runs and would answer UNKNOWN with a traceback in the log per request; a generic
  handler cannot take over the generated per-method handlers, so the handler each method resolves to
  is wrapped with a deserializer that hands a marker to the method instead of raising.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence

import grpc

from vitrine.services.gateway.metrics import UNKNOWN_METHOD
from vitrine.services.throttled_log import ThrottledLog
from vitrine.settings import ApiKey
from vitrine.v1 import recommender_pb2 as pb

log = logging.getLogger(__name__)
ROLES_FOR_SERVICE: dict[str, frozenset[str]] = {
    "vitrine.v1.Recommender": frozenset({"storefront", "admin"}),
    "vitrine.v1.ExperimentAdmin": frozenset({"experimenter", "admin"}),
}
OPEN_SERVICES = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"})
KNOWN_METHODS: dict[str, str] = {
    f"/{service.full_name}/{method.name}": method.name
    for service in pb.DESCRIPTOR.services_by_name.values() for method in service.methods
} | {"/grpc.health.v1.Health/Check": "Check", "/grpc.health.v1.Health/Watch": "Watch"}
"""RPC path → the `method` label: the only values that label takes besides `unknown`."""


def method_label(path: str) -> str:
    return KNOWN_METHODS.get(path, UNKNOWN_METHOD)


def identify(metadata: Sequence[tuple[str, str | bytes]] | None, keys: dict[str, ApiKey]) -> ApiKey | None:
    for name, value in metadata or ():
        if name == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            token = text.removeprefix("Bearer ").strip()
            return keys.get(hashlib.sha256(token.encode()).hexdigest())
    return None


def _deny(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    async def abort(_request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    return grpc.unary_unary_rpc_method_handler(abort)


class _Malformed:
    """What a method receives instead of a request whose bytes did not decode."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: dict[str, ApiKey], on_denied: Callable[[str, grpc.StatusCode], None] | None = None,
                 on_malformed: Callable[[str], None] | None = None, error_log_interval_s: float = 10.0) -> None:
        self.keys = keys
        self.on_denied = on_denied
        self.on_malformed = on_malformed
        self._errors = ThrottledLog(log, error_log_interval_s)
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        path = details.method
        service, _, _ = path.lstrip("/").partition("/")
        if service not in OPEN_SERVICES:
            allowed = ROLES_FOR_SERVICE.get(service)
            caller = identify(details.invocation_metadata, self.keys)
            if caller is None:
                return self._denied(path, grpc.StatusCode.UNAUTHENTICATED, "missing or unknown API key in the 'authorization' metadata")
            if allowed is None or caller.role not in allowed:
                return self._denied(path, grpc.StatusCode.PERMISSION_DENIED, f"role {caller.role!r} may not call {service[:100]}")
        wrapped = self._wrapped.get(path)
        if wrapped is None:
            handler = await continuation(details)
            wrapped = self._tolerant(path, handler)
            if path in KNOWN_METHODS and wrapped is not None:
                self._wrapped[path] = wrapped  # handlers are static; the cache is bounded by KNOWN_METHODS
        return wrapped

    def _denied(self, path: str, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
        if self.on_denied:
            self.on_denied(method_label(path), code)
        return _deny(code, message)

    def _tolerant(self, path: str, handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
        if handler is None or handler.unary_unary is None or handler.request_deserializer is None:
            return handler
        decode, inner, method = handler.request_deserializer, handler.unary_unary, method_label(path)

        def deserialize(data: bytes) -> object:
            try:
                return decode(data)
            except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and whatever a decoder raises
                return _Malformed(exc)

        async def behaviour(request: object, context: grpc.aio.ServicerContext) -> object:
            if isinstance(request, _Malformed):
                if self.on_malformed:
                    self.on_malformed(method)
                self._errors.log(logging.WARNING, f"malformed:{method}", "malformed %s request body: %s", method, request.error)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request body is not a valid {method} request message")
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(behaviour, request_deserializer=deserialize,
                                                   response_serializer=handler.response_serializer)
