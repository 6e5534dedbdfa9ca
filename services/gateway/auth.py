"""API keys in the `authorization` metadata (`Bearer <key>` or the bare key), mapped to roles.

Configuration holds only sha256 hashes of keys. Health checks and server reflection need no key;
everything else is denied unless the caller's role is allowed for that service.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Sequence

import grpc

from vitrine.settings import ApiKey

ROLES_FOR_SERVICE: dict[str, frozenset[str]] = {
    "vitrine.v1.Recommender": frozenset({"storefront", "admin"}),
    "vitrine.v1.ExperimentAdmin": frozenset({"experimenter", "admin"}),
}
OPEN_SERVICES = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"})


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


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: dict[str, ApiKey], on_denied: Callable[[str, grpc.StatusCode], None] | None = None) -> None:
        self.keys = keys
        self.on_denied = on_denied

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        service, _, method = details.method.lstrip("/").partition("/")
        if service in OPEN_SERVICES:
            return await continuation(details)
        allowed = ROLES_FOR_SERVICE.get(service)
        caller = identify(details.invocation_metadata, self.keys)
        if caller is None:
            return self._denied(method, grpc.StatusCode.UNAUTHENTICATED, "missing or unknown API key in the 'authorization' metadata")
        if allowed is None or caller.role not in allowed:
            return self._denied(method, grpc.StatusCode.PERMISSION_DENIED, f"role {caller.role!r} may not call {service}")
        return await continuation(details)

    def _denied(self, method: str, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
        if self.on_denied:
            self.on_denied(method, code)
        return _deny(code, message)
