"""Errors raised on the request path, and the one table that maps every error
the worker can meet (request, registry, residency, engine) to an HTTP status.

Why one table: a tenant must get the same status for the same problem whether
it was found by the parser, the registry or the engine, and a reviewer must be
able to read every status the product returns in one place (README lists them).
"""
from __future__ import annotations

from tenant_registry.errors import (
    AdapterInvalid,
    InvalidTaskName,
    InvalidTenantId,
    RegistryError,
    RegistryUnavailable,
    TaskNotFound,
    TenantDisabled,
    TenantNotFound,
)

from .engine.errors import EngineError


class RequestError(Exception):
    """A problem with one request; the rest of the batch is served."""


class InvalidRequest(RequestError):
    """Body is not JSON, has wrong types, unknown fields or out-of-range values."""


class PromptTooLong(RequestError):
    """The prompt has more tokens than `max_prompt_tokens`."""


class TenantRequired(RequestError):
    """No tenant named while `require_tenant` is on."""


class TenantConflict(RequestError):
    """Header and body name different tenants."""


class TenantUnauthorized(RequestError):
    """`require_tenant_key` is on and X-Tenant-Key is missing or wrong (or the tenant is unknown)."""


class AdapterNotAllowed(RequestError):
    """The `adapter` field names something other than `base` or the caller's own versions."""


class UnknownEndpoint(RequestError):
    """The path after /predictions/<model>/<version>/ names no endpoint of this server."""


class RequestTooLarge(RequestError):
    """Prompt + max_new_tokens can never fit in one KV row (`kv_max_len`): no wait would help."""


class QueueFull(Exception):
    """Continuous scheduling: `kv_rows` requests run and `max_waiting` wait; the client retries
    after `retry_after_s` (the reply's Retry-After header)."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTimedOut(Exception):
    """The request did not finish within `request_timeout_s` of its arrival (its KV row is freed)."""


class WorkerStopping(Exception):
    """The worker is shutting down; the request was not (fully) served. Retry elsewhere."""


class RequestCancelled(Exception):
    """The client went away or cancelled (`Ticket.cancel`); nobody reads the reply."""


class AdapterLoadFailed(Exception):
    """The tenant's adapter could not be made resident (verify or load failed, or quarantined)."""

    def __init__(self, adapter_id: str, reason: str) -> None:
        super().__init__(f"adapter {adapter_id} cannot be served: {reason}")
        self.adapter_id = adapter_id
        self.reason = reason


# Ordered most specific first; the first isinstance match wins.
_STATUS: list[tuple[type[BaseException], int, str]] = [
    (PromptTooLong, 413, "Prompt Too Long"),
    (RequestTooLarge, 413, "Request Too Large"),
    (TenantRequired, 400, "Tenant Required"),
    (TenantConflict, 400, "Tenant Conflict"),
    (TenantUnauthorized, 401, "Unauthorized"),
    (AdapterNotAllowed, 403, "Adapter Not Allowed"),
    (UnknownEndpoint, 404, "Not Found"),
    (InvalidRequest, 400, "Bad Request"),
    (InvalidTenantId, 400, "Invalid Tenant Id"),
    (InvalidTaskName, 400, "Invalid Task Name"),
    (TaskNotFound, 404, "Unknown Task"),
    (TenantNotFound, 404, "Unknown Tenant"),
    (TenantDisabled, 403, "Tenant Disabled"),
    (RegistryUnavailable, 503, "Registry Unavailable"),
    (AdapterLoadFailed, 503, "Adapter Unavailable"),
    (AdapterInvalid, 503, "Adapter Unavailable"),
    (QueueFull, 503, "Queue Full"),
    (WorkerStopping, 503, "Worker Stopping"),
    (RequestTimedOut, 504, "Request Timed Out"),
    (RequestCancelled, 499, "Client Closed Request"),
    (RegistryError, 500, "Registry Error"),
    (EngineError, 500, "Engine Error"),
]


def http_status(exc: BaseException) -> tuple[int, str]:
    """(status code, reason phrase) for any exception; unknown ones are 500."""
    for kind, code, phrase in _STATUS:
        if isinstance(exc, kind):
            return code, phrase
    return 500, "Internal Server Error"


def error_body(exc: BaseException) -> dict:
    """The JSON body a client gets for a failed request: a stable `type` and a message.
    A 4xx message names the client's own mistake; a 5xx one is a plain sentence (the
    exception, with its addresses and paths, goes to the worker log only)."""
    code, _ = http_status(exc)
    return {"error": str(exc) if code < 500 else public_message(exc), "type": type(exc).__name__, "status": code}


def public_message(exc: BaseException) -> str:
    """What a tenant may be told about a server-side failure."""
    if isinstance(exc, AdapterLoadFailed):
        return f"adapter {exc.adapter_id} cannot be served right now; try again later"
    if isinstance(exc, RegistryUnavailable):
        return "the tenant registry is unavailable; try again later"
    if isinstance(exc, (QueueFull, RequestTimedOut, WorkerStopping)):
        return str(exc)  # our own sentence, no addresses or paths
    return "internal error; see the worker log"
