"""Tenant and adapter identifiers: the one validator, shared by registry, CLI and handler.

Why so strict: a tenant id becomes a Redis key suffix, a directory name in the
adapter store and a PEFT adapter name. Restricting it to lower-case ASCII
letters, digits, '_' and '-' (max 63 chars, first char alphanumeric) makes
path traversal ('../', '/'), NUL bytes, unicode look-alikes and key injection
impossible by construction. Pure functions; safe from any thread.
"""
from __future__ import annotations

import re

from .errors import InvalidTenantId, shorten

TENANT_ID_PATTERN = r"[a-z0-9][a-z0-9_-]{0,62}"
_TENANT_RE = re.compile(TENANT_ID_PATTERN)
_ADAPTER_RE = re.compile(rf"({TENANT_ID_PATTERN})@v([1-9][0-9]{{0,8}})")


def is_valid_tenant_id(value: object) -> bool:
    """True if `value` is a str matching `^[a-z0-9][a-z0-9_-]{0,62}$` (fullmatch: no trailing newline)."""
    return isinstance(value, str) and len(value) <= 63 and _TENANT_RE.fullmatch(value) is not None


def validate_tenant_id(value: object) -> str:
    """Return `value` unchanged if it is a valid tenant id, else raise InvalidTenantId.

    The error message shows at most ~40 characters of the input.
    """
    if not is_valid_tenant_id(value):
        raise InvalidTenantId(
            f"invalid tenant id {shorten(value)}: expected 1-63 characters of a-z, 0-9, '_' or '-', "
            "starting with a letter or digit")
    return value  # type: ignore[return-value]


def adapter_id(tenant: str, version: int) -> str:
    """The adapter's stable name, e.g. 'acme@v3'. Also the PEFT adapter name used by workers."""
    return f"{validate_tenant_id(tenant)}@v{int(version)}"


def parse_adapter_id(value: object) -> tuple[str, int]:
    """'acme@v3' -> ('acme', 3); anything else raises InvalidTenantId."""
    m = _ADAPTER_RE.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        raise InvalidTenantId(f"invalid adapter id {shorten(value)}: expected '<tenant>@v<version>'")
    return m.group(1), int(m.group(2))
