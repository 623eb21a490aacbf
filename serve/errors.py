"""Errors of the serving core, one class per gRPC status code.

The gRPC layer maps `ServeError.code` to grpc.StatusCode in one place; nothing here imports grpc.
Messages are for people: one line naming the field, what was wrong and what to do.
"""
from __future__ import annotations


class ServeError(Exception):
    """Base class; `code` is the name of a grpc.StatusCode member."""

    code = "UNKNOWN"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(ServeError):
    code = "INVALID_ARGUMENT"


class NotFound(ServeError):
    code = "NOT_FOUND"


class ResourceExhausted(ServeError):
    code = "RESOURCE_EXHAUSTED"


class Unavailable(ServeError):
    code = "UNAVAILABLE"


class DeadlineExceeded(ServeError):
    code = "DEADLINE_EXCEEDED"


class Cancelled(ServeError):
    code = "CANCELLED"


class FailedPrecondition(ServeError):
    code = "FAILED_PRECONDITION"


class Internal(ServeError):
    code = "INTERNAL"
