"""Tessera's one error tree, mapped to gRPC status codes in one place.

    TesseraError
    ├── InvalidArgumentError      INVALID_ARGUMENT  (bad input: names the field and why)
    ├── NotFoundError             NOT_FOUND
    ├── AlreadyExistsError        ALREADY_EXISTS
    ├── PermissionDeniedError     PERMISSION_DENIED
    ├── UnauthenticatedError      UNAUTHENTICATED
    ├── FailedPreconditionError   FAILED_PRECONDITION
    ├── ConfigError               startup error (missing pepper, schema not at head, port in use)
    └── StorageError              UNAVAILABLE when transient, INTERNAL otherwise

A policy outcome (a denied request, an over-limit answer) is a response, never an error.
"""

from __future__ import annotations

import grpc


class TesseraError(Exception):
    """Base of every error Tessera raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgumentError(TesseraError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field


class NotFoundError(TesseraError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(TesseraError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDeniedError(TesseraError):
    code = grpc.StatusCode.PERMISSION_DENIED


class UnauthenticatedError(TesseraError):
    code = grpc.StatusCode.UNAUTHENTICATED


class FailedPreconditionError(TesseraError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ConfigError(TesseraError):
    """Invalid or missing configuration found at startup; the process must not start."""


class StorageError(TesseraError):
    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient
        self.code = grpc.StatusCode.UNAVAILABLE if transient else grpc.StatusCode.INTERNAL
