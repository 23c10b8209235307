"""Tenant, task and adapter identifiers: the one validator, shared by registry, CLI and handler.

Why so strict: a tenant id becomes a Redis key suffix, a directory name in the
adapter store and a PEFT adapter name. Restricting it to lower-case ASCII
letters, digits, '_' and '-' (max 63 chars, first char alphanumeric) makes
path traversal ('../', '/'), NUL bytes, unicode look-alikes and key injection
impossible by construction. A task name (one of a tenant's adapter lines) follows
the same alphabet, max 32 characters; neither may hold ':' or '@', so
"<tenant>:<task>@v<N>" parses one way only. Pure functions; safe from any thread.

Adapter ids: "acme@v3" for the tenant's `default` task (unchanged from before tasks),
"acme:summarize@v2" for a named task. The part before "@v" is the adapter's *line*
(`adapter_line`): versions of one line replace each other; different lines (tasks) of
one tenant live side by side. Version numbers are handed out per tenant across all its
tasks (one counter), so (tenant, version) names one set of weights and one store directory.
"""
from __future__ import annotations

import re

from typing import TYPE_CHECKING

from .errors import InvalidTaskName, InvalidTenantId, PolicyInvalid, shorten

if TYPE_CHECKING:  # schema.py imports this module; parse_link imports ChainLink when called
    from .schema import ChainLink

TENANT_ID_PATTERN = r"[a-z0-9][a-z0-9_-]{0,62}"
TASK_PATTERN = r"[a-z0-9][a-z0-9_-]{0,31}"
DEFAULT_TASK = "default"
BASE_LINK = "base"  # a chain link (and a compare entry) naming the plain base model
_TENANT_RE = re.compile(TENANT_ID_PATTERN)
_TASK_RE = re.compile(TASK_PATTERN)
_LINK_RE = re.compile(rf"({TASK_PATTERN})(?:@v([1-9][0-9]{{0,8}}))?")
_ADAPTER_RE = re.compile(rf"({TENANT_ID_PATTERN})(?::({TASK_PATTERN}))?@v([1-9][0-9]{{0,8}})")


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


def is_valid_task(value: object) -> bool:
    """True if `value` is a str matching `^[a-z0-9][a-z0-9_-]{0,31}$`."""
    return isinstance(value, str) and len(value) <= 32 and _TASK_RE.fullmatch(value) is not None


def validate_task(value: object) -> str:
    """Return `value` unchanged if it is a valid task name, else raise InvalidTaskName (400 on HTTP)."""
    if not is_valid_task(value):
        raise InvalidTaskName(
            f"invalid task name {shorten(value)}: expected 1-32 characters of a-z, 0-9, '_' or '-', "
            "starting with a letter or digit")
    return value  # type: ignore[return-value]


def adapter_line(tenant: str, task: str = DEFAULT_TASK) -> str:
    """The adapter id without its version: 'acme' (default task) or 'acme:summarize'."""
    t, k = validate_tenant_id(tenant), validate_task(task)
    return t if k == DEFAULT_TASK else f"{t}:{k}"


def line_of(adapter_id: str) -> str:
    """The line of an adapter id: 'acme:summarize@v2' -> 'acme:summarize', 'acme@v3' -> 'acme'."""
    return adapter_id.rpartition("@v")[0]


def adapter_id(tenant: str, version: int, task: str = DEFAULT_TASK) -> str:
    """The adapter's stable name, e.g. 'acme@v3' or 'acme:summarize@v2'. Also the engine's adapter name."""
    return f"{adapter_line(tenant, task)}@v{int(version)}"


def parse_task_adapter_id(value: object) -> tuple[str, str, int]:
    """'acme@v3' -> ('acme', 'default', 3); 'acme:summarize@v2' -> ('acme', 'summarize', 2);
    anything else raises InvalidTenantId. ('acme:default@v3' is not a spelling of 'acme@v3'.)"""
    m = _ADAPTER_RE.fullmatch(value) if isinstance(value, str) else None
    if m is None or m.group(2) == DEFAULT_TASK:
        raise InvalidTenantId(f"invalid adapter id {shorten(value)}: expected '<tenant>@v<version>' "
                              "or '<tenant>:<task>@v<version>'")
    return m.group(1), m.group(2) or DEFAULT_TASK, int(m.group(3))


def parse_adapter_id(value: object) -> tuple[str, int]:
    """'acme@v3' -> ('acme', 3) (default-task ids only); anything else raises InvalidTenantId."""
    m = _ADAPTER_RE.fullmatch(value) if isinstance(value, str) else None
    if m is None or m.group(2) is not None:
        raise InvalidTenantId(f"invalid adapter id {shorten(value)}: expected '<tenant>@v<version>'")
    return m.group(1), int(m.group(3))


def parse_link(text: object) -> "ChainLink":
    """One link of a fallback chain as an operator spells it: "base" (the plain base model),
    "summarize" (the task's current version), "summarize@v3" or "default@v2" (a version of the task).
    "base" always means the base model; a task that happens to be named "base" is linked with an
    explicit version ("base@v4"). Raises InvalidTaskName (a bad task part) or PolicyInvalid; both
    are ValueErrors (400 on HTTP)."""
    from .schema import ChainLink

    if text == BASE_LINK:
        return ChainLink(base=True)
    m = _LINK_RE.fullmatch(text) if isinstance(text, str) and len(text) <= 48 else None
    if m is None:
        if isinstance(text, str) and "@" in text and is_valid_task(text.partition("@")[0]):
            raise PolicyInvalid(f"invalid link {shorten(text)}: the version part must be '@v<N>' (N >= 1)")
        if isinstance(text, str) and "@" not in text:
            validate_task(text)  # InvalidTaskName naming the rule
        raise PolicyInvalid(f"invalid link {shorten(text)}: expected 'base', '<task>' or '<task>@v<N>'")
    return ChainLink(task=m.group(1), version=None if m.group(2) is None else int(m.group(2)))


def format_link(link: "ChainLink") -> str:
    """The inverse of parse_link: "base", "<task>" or "<task>@v<N>"."""
    if link.base:
        return BASE_LINK
    return link.task if link.version is None else f"{link.task}@v{link.version}"
