"""Per-tenant API keys: issue, digest, verify.

A tenant key is a random secret handed to the tenant once (at first onboarding or on rotation) and
presented by the tenant on every request (`X-Tenant-Key`). Only a salted digest (`KeyDigest`) is
stored in Redis; the key itself is never stored anywhere.

Why a fast hash is enough here: keys are 256-bit random secrets (`secrets.token_urlsafe(32)`), not
human-chosen passwords, so there is nothing for a dictionary or brute-force attack to enumerate and a
slow KDF (bcrypt/scrypt/argon2) would add no security. We use HMAC-SHA256 keyed with a random
16-byte per-digest salt, which also means two tenants (or two rotations) never share a digest. A
worker verifies a key per request in about a microsecond.

`verify_key` never raises: anything that is not a plausible key (not a str, longer than
`MAX_KEY_CHARS`, not encodable) is simply "not the key". Comparison is constant-time
(`hmac.compare_digest`).

Pure functions and an immutable dataclass; safe to share between threads.
"""
from __future__ import annotations

import hmac
import json
import math
import re
import secrets
import time
from dataclasses import dataclass
from hashlib import sha256
from typing import Any

from .schema import RecordError

KEY_PREFIX = "lpx_"
KEY_BYTES = 32            # 256 bits of entropy
SALT_BYTES = 16
MAX_KEY_CHARS = 256       # a presented key longer than this is refused without hashing it
_SALT_RE = re.compile(r"[0-9a-f]{%d}" % (2 * SALT_BYTES))
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
_FIELDS = ("salt", "digest", "created_at")


class KeyDigestError(RecordError):
    """A stored key digest (or its JSON) violates the schema."""


def generate_key() -> str:
    """A new tenant key: "lpx_" + 43 URL-safe characters (256 random bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)


@dataclass(frozen=True)
class KeyDigest:
    """The stored form of a tenant key: hex salt, hex HMAC-SHA256(salt, key), creation time (epoch s)."""

    salt: str
    digest: str
    created_at: float

    def __post_init__(self) -> None:
        if not isinstance(self.salt, str) or not _SALT_RE.fullmatch(self.salt):
            raise KeyDigestError(f"invalid key digest: salt must be {2 * SALT_BYTES} lower-case hex digits")
        if not isinstance(self.digest, str) or not _DIGEST_RE.fullmatch(self.digest):
            raise KeyDigestError("invalid key digest: digest must be 64 lower-case hex digits")
        ca = self.created_at
        if isinstance(ca, bool) or not isinstance(ca, (int, float)) or not math.isfinite(ca) or ca < 0:
            raise KeyDigestError("invalid key digest: created_at must be epoch seconds")
        object.__setattr__(self, "created_at", float(ca))

    def to_dict(self) -> dict[str, Any]:
        return {"salt": self.salt, "digest": self.digest, "created_at": self.created_at}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Any) -> "KeyDigest":
        """Strict: exactly the fields salt, digest, created_at, with valid values."""
        if not isinstance(data, dict):
            raise KeyDigestError("key digest must be a JSON object")
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise KeyDigestError(f"unknown key digest field(s): {', '.join(map(repr, unknown))}")
        missing = [f for f in _FIELDS if f not in data]
        if missing:
            raise KeyDigestError(f"missing key digest field(s): {', '.join(missing)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str | bytes) -> "KeyDigest":
        try:
            data = json.loads(text)
        except (TypeError, ValueError, UnicodeDecodeError) as e:
            raise KeyDigestError(f"key digest is not valid JSON: {e}") from None
        return cls.from_dict(data)


def _mac(salt_hex: str, key: str) -> str:
    return hmac.new(bytes.fromhex(salt_hex), key.encode("utf-8"), sha256).hexdigest()


def digest_key(key: str, salt: str | None = None) -> KeyDigest:
    """The KeyDigest of `key`, with a fresh random 16-byte salt unless `salt` (hex) is given.

    Raises TypeError if `key` is not a str, ValueError if it is empty or longer than MAX_KEY_CHARS,
    KeyDigestError if `salt` is malformed.
    """
    if not isinstance(key, str):
        raise TypeError(f"key must be a str, got {type(key).__name__}")
    if not key or len(key) > MAX_KEY_CHARS:
        raise ValueError(f"key must be 1-{MAX_KEY_CHARS} characters")
    salt_hex = secrets.token_hex(SALT_BYTES) if salt is None else salt
    if not isinstance(salt_hex, str) or not _SALT_RE.fullmatch(salt_hex):
        raise KeyDigestError(f"salt must be {2 * SALT_BYTES} lower-case hex digits")
    return KeyDigest(salt=salt_hex, digest=_mac(salt_hex, key), created_at=time.time())


def verify_key(digest: KeyDigest, presented: object) -> bool:
    """True iff `presented` is the key `digest` was made from. Constant-time; never raises."""
    try:
        if not isinstance(digest, KeyDigest) or not isinstance(presented, str):
            return False
        if not presented or len(presented) > MAX_KEY_CHARS:
            return False
        return hmac.compare_digest(_mac(digest.salt, presented), digest.digest)
    except Exception:  # e.g. a lone surrogate that cannot be UTF-8 encoded
        return False
