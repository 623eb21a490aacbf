"""Bearer-token authentication: a grpc.aio server interceptor (serve/rest.py's middleware shares the check).

Every call must carry the metadata `authorization: Bearer <token>` with one of the configured tokens,
else it is answered UNAUTHENTICATED before any handler runs. grpc.health.v1.Health is exempt, so load
balancers and orchestrators can probe the server without a secret. Tokens are compared with
hmac.compare_digest (constant time), against every configured token, so rotation can list two.
"""
from __future__ import annotations

import hmac
import os
from pathlib import Path

import grpc

ENV_VAR = "GEN_AUTH_TOKEN"
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)
EXEMPT_HTTP_PREFIXES = ("/v2/health/",)  # REST's liveness and readiness probes, as grpc.health.v1 on gRPC
UNAUTHENTICATED_MESSAGE = ("authorization: missing or wrong bearer token; send the header "
                           "'authorization: Bearer <token>' (gen CLI: --token or --token-file)")


def load_tokens(token_file: str | Path | None = None, env: dict | None = None) -> list[str]:
    """Tokens from FILE (one per line, blank lines ignored) and/or $GEN_AUTH_TOKEN; [] means auth is off.

    Raises ValueError with a message for people when the file cannot be read or holds no token.
    """
    env = os.environ if env is None else env
    tokens = []
    if token_file is not None:
        try:
            text = Path(token_file).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--auth-token-file {token_file}: cannot read it ({e})") from None
        tokens = [line.strip() for line in text.splitlines() if line.strip()]
        if not tokens:
            raise ValueError(f"--auth-token-file {token_file}: holds no token")
    if env.get(ENV_VAR, "").strip():
        tokens.append(env[ENV_VAR].strip())
    return tokens


def token_allowed(header: str | bytes | None, tokens: list[bytes]) -> bool:
    """Whether an authorization header/metadata value is 'Bearer <one of tokens>'."""
    if not isinstance(header, str) or not header.startswith("Bearer "):
        return False
    presented = header[len("Bearer "):].strip().encode()
    ok = False
    for token in tokens:  # no early exit: the time taken does not say which token was close
        ok |= hmac.compare_digest(presented, token)
    return ok


class BearerTokenAuth(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: list[str]):
        if not tokens:
            raise ValueError("BearerTokenAuth needs at least one token")
        self._tokens = [t.encode() for t in tokens]

    def _allowed(self, metadata) -> bool:
        return token_allowed(dict(metadata or ()).get("authorization"), self._tokens)

    async def intercept_service(self, continuation, details):
        if details.method.startswith(EXEMPT_PREFIXES) or self._allowed(details.invocation_metadata):
            return await continuation(details)
        handler = await continuation(details)
        return None if handler is None else _denied(handler)


async def _deny(request_or_iterator, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)


def _denied(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind (unary/stream) that answers UNAUTHENTICATED without parsing the request."""
    kw = dict(request_deserializer=None, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(_deny, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(_deny, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(_deny, **kw)
    return grpc.stream_stream_rpc_method_handler(_deny, **kw)
