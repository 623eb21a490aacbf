"""gRPC status codes for the serving core's errors, mapped once: the `rpc` decorator every servicer wears.

Servicer methods raise serve.errors.ServeError subclasses; `rpc` turns them into the matching
grpc.StatusCode with the error's message. Anything else is a bug, logged with its traceback and answered
INTERNAL. Works for unary, server-streaming and bidirectional-streaming handlers alike.
"""
from __future__ import annotations

import functools
import inspect
import logging
import time

import grpc

from serve.errors import ServeError

log = logging.getLogger("gen.serve")
MAX_DETAILS = 1024  # characters of an error message


def deadline_of(context) -> float | None:
    """The call's deadline as an absolute time.monotonic() value, as the runtime takes it."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def status_of(error: ServeError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, error.code, grpc.StatusCode.INTERNAL)


def _brief(message: str) -> str:
    """Messages echo request values; the status travels in a trailer, which gRPC caps at 16 KiB."""
    return message if len(message) <= MAX_DETAILS else message[:MAX_DETAILS - 16] + " ... (truncated)"


async def _abort_for(error: Exception, method, context) -> None:
    if isinstance(error, ServeError):
        await context.abort(status_of(error), _brief(str(error)))
    log.error("%s failed unexpectedly", method.__qualname__, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, _brief(f"internal error: {type(error).__name__}: {error}"))


def rpc(method):
    """Map ServeError to its status code, for unary and streaming handlers alike."""
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self, request, context):
            try:
                async for item in method(self, request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as e:  # noqa: BLE001 - every failure gets a status; unexpected ones are logged
                await _abort_for(e, method, context)
        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # noqa: BLE001
            await _abort_for(e, method, context)
    return unary
