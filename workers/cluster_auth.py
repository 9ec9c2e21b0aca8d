"""Who may call a worker: a shared cluster token on every gRPC call, and optional mutual TLS.

Workers take requests from the orchestrator and from each other (transfer metadata, Release).
Both carry the cluster's token in an ``authorization: Bearer <token>`` header; a worker started
with a token refuses any call without it (``UNAUTHENTICATED``) and counts the refusal. The token
comes from a file (``--cluster-token-file`` or ``TANDEM_CLUSTER_TOKEN_FILE``) or from
``TANDEM_CLUSTER_TOKEN``. With ``--tls-cert/--tls-key/--tls-ca`` the gRPC server speaks TLS and
requires a client certificate signed by the CA; the orchestrator and peers present theirs.

The token is a bearer secret, so over plain TCP it is only as private as the network: use it
with TLS, or on a cluster network nobody else reaches.
"""
from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

TOKEN_ENV = "TANDEM_CLUSTER_TOKEN"
TOKEN_FILE_ENV = "TANDEM_CLUSTER_TOKEN_FILE"
_HEADER = "authorization"


class ClusterAuthError(ValueError):
    """A token or certificate setting that cannot work; the message says which."""


@dataclass(frozen=True, slots=True)
class TLSFiles:
    """PEM files: this process's certificate and key, and the CA that signs every member's."""

    cert: Path
    key: Path
    ca: Path

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())], root_certificates=self.ca.read_bytes(),
            require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(), private_key=self.key.read_bytes(),
            certificate_chain=self.cert.read_bytes())


@dataclass(frozen=True, slots=True)
class ClusterAuth:
    """What one process needs to call workers and to be called: token and TLS, each optional."""

    token: str | None = None
    tls: TLSFiles | None = None

    def channel(self, address: str, options: list[tuple[str, Any]] | None = None) -> grpc.aio.Channel:
        """An asyncio channel to a worker that sends the token on every call."""
        interceptors = [_UnaryTokenSender(self.token), _StreamTokenSender(self.token)] if self.token else None
        if self.tls is not None:
            return grpc.aio.secure_channel(address, self.tls.channel_credentials(), options, interceptors=interceptors)
        return grpc.aio.insecure_channel(address, options, interceptors=interceptors)

    def add_port(self, server: grpc.aio.Server, address: str) -> int:
        if self.tls is not None:
            return server.add_secure_port(address, self.tls.server_credentials())
        return server.add_insecure_port(address)


def load_cluster_auth(token_file: str | None = None, tls_cert: str | None = None, tls_key: str | None = None,
                      tls_ca: str | None = None) -> ClusterAuth:
    """The settings from flags, then the environment. Raises ClusterAuthError on a setting that
    cannot work (an empty token, a missing file, TLS with one of its three files missing)."""
    token_file = token_file or os.environ.get(TOKEN_FILE_ENV)
    token = os.environ.get(TOKEN_ENV)
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as error:
            raise ClusterAuthError(f"cannot read the cluster token file {token_file}: {error}") from error
    if token is not None and not token:
        raise ClusterAuthError(f"the cluster token is empty (from {token_file or TOKEN_ENV})")
    tls_paths = (tls_cert, tls_key, tls_ca)
    if any(tls_paths) and not all(tls_paths):
        raise ClusterAuthError("TLS needs all three of --tls-cert, --tls-key and --tls-ca")
    tls = TLSFiles(*(Path(p) for p in tls_paths)) if all(tls_paths) else None  # type: ignore[arg-type]
    for path in (tls.cert, tls.key, tls.ca) if tls else ():
        if not path.is_file():
            raise ClusterAuthError(f"TLS file {path} does not exist")
    return ClusterAuth(token, tls)


class TokenChecker(grpc.aio.ServerInterceptor):
    """Refuses a call without the cluster token before it reaches the servicer, and counts it."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()
        self.num_refused = 0

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        sent = dict(details.invocation_metadata or ()).get(_HEADER, "")
        if hmac.compare_digest(sent.encode() if isinstance(sent, str) else sent, self._expected):
            return await continuation(details)
        self.num_refused += 1
        handler = await continuation(details)
        return _refusal(handler)


def _refusal(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
    """A handler of the same shape as the method's that only says UNAUTHENTICATED."""
    message = "missing or wrong cluster token (see --cluster-token-file)"

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # an async generator, as a server-streaming handler must be

    deserializer = handler.request_deserializer if handler is not None else None
    serializer = handler.response_serializer if handler is not None else None
    if handler is not None and handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(stream, deserializer, serializer)
    return grpc.unary_unary_rpc_method_handler(unary, deserializer, serializer)


def _with_token(details: grpc.aio.ClientCallDetails, token: str) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()), (_HEADER, f"Bearer {token}"))
    return details._replace(metadata=metadata)


# One class per call shape: a channel files each interceptor under the first shape it matches.
class _UnaryTokenSender(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return await continuation(_with_token(details, self._token), request)


class _StreamTokenSender(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return await continuation(_with_token(details, self._token), request)
