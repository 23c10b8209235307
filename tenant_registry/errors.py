"""Typed errors of the control plane.

Why a hierarchy and no HTTP codes: the CLI maps these to exit codes and the
handler maps them to HTTP statuses, each in exactly one place. Code here only
says *what* went wrong; callers decide what that means for their user.

Every error is safe to show to an operator. Messages never echo unbounded
caller input (tenant ids are shortened with `shorten()`).
"""
from __future__ import annotations

# ConfigError lives with the one config (both the worker and the control plane raise it); re-exported
# here for the control plane's raisers (validate.py: a bad base model dir; registry.py: a bad redis_url).
# It is not a RegistryError: callers that map errors (tenantctl's exit codes) name it on its own.
from loraplex_common.config import ConfigError  # noqa: F401


def shorten(value: object, limit: int = 40) -> str:
    """repr() of untrusted input, cut to `limit` characters so a 10 KB id cannot flood a log."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class RegistryError(Exception):
    """Base of every error raised by `tenant_registry`."""


class InvalidTenantId(RegistryError):
    """A tenant id does not match `^[a-z0-9][a-z0-9_-]{0,62}$` (or is not a string)."""


class InvalidTaskName(RegistryError, ValueError):
    """A task name does not match `^[a-z0-9][a-z0-9_-]{0,31}$` (or is not a string)."""


class PolicyInvalid(RegistryError, ValueError):
    """A tenant policy (A/B splits, fallback chain, router, examples; schema.TenantPolicy) or one of its
    parts (a chain link's spelling, a split arm) is malformed, or names a task/version the tenant does
    not have. The message names the part (400 on HTTP, exit 2 from tenantctl)."""


class TenantNotFound(RegistryError):
    """No current record for this tenant."""

    def __init__(self, tenant: str) -> None:
        super().__init__(f"tenant {tenant!r} is not registered")
        self.tenant = tenant


class TaskNotFound(TenantNotFound):
    """The tenant has no task of this name (no current record for that line). A TenantNotFound, so
    callers that ask for a tenant's default line and catch TenantNotFound keep working."""

    def __init__(self, tenant: str, task: str) -> None:
        RegistryError.__init__(self, f"tenant {tenant!r} has no task {task!r}")
        self.tenant = tenant
        self.task = task


class TenantExists(RegistryError):
    """A write would overwrite an existing version of a tenant."""


class VersionConflict(RegistryError):
    """A concurrent change won: e.g. a newer version was registered while this one was being copied."""


class TenantDisabled(RegistryError):
    """The tenant exists but its status is `disabled`. Raised by callers that serve, not by the registry."""

    def __init__(self, tenant: str) -> None:
        super().__init__(f"tenant {tenant!r} is disabled")
        self.tenant = tenant


class VersionNotFound(RegistryError):
    """The requested version is not in the tenant's history (or there is nothing to roll back to)."""


class AdapterInvalid(RegistryError):
    """An adapter was refused (at onboarding) or failed verification (at load).

    `code` is a stable machine-readable reason (e.g. "pickle_file", "shape_mismatch",
    "sha256_mismatch"); `file` is the offending file name when there is one;
    `reason` is the human sentence. str(err) names both the problem and the file.
    """

    def __init__(self, reason: str, *, code: str = "invalid", file: str | None = None) -> None:
        msg = f"{file}: {reason}" if file else reason
        super().__init__(f"adapter refused: {msg}")
        self.reason = reason
        self.code = code
        self.file = file


class RegistryUnavailable(RegistryError):
    """Redis is down, unreachable or timed out. The original redis exception is the __cause__."""
