"""API keys: random, shown once, stored only as a SHA-256 hash next to a short visible id.

A key looks like `sk-maas-<8 id chars>-<43 secret chars>`; its `key_id`
(`sk-maas-<8 id chars>`) is what operators and logs see.  256 random bits make a
plain SHA-256 safe to store (no slow KDF is needed for keys nobody chose).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import string
import time
from typing import Any

from billing.records import KeyRecord
from common.errors import AuthenticationError, InvalidRequestError

PREFIX = "sk-maas-"
_ID_ALPHABET = string.ascii_lowercase + string.digits
# A tenant name: it names invoice files and appears in URLs and logs, so no path separators or spaces.
TENANT_PATTERN = r"^[A-Za-z0-9_.@-]{1,128}$"


def check_tenant(tenant: str) -> str:
    """`tenant` when it is a valid tenant name, else a 400 naming the rule."""
    if not isinstance(tenant, str) or not re.fullmatch(TENANT_PATTERN, tenant) or tenant in (".", ".."):
        raise InvalidRequestError("A tenant name is 1-128 characters of letters, digits and _ . @ - (and not `.` or `..`).", param="tenant")
    return tenant


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id_of(key: str) -> str:
    """The visible part of a key (safe to log and show)."""
    return key[: len(PREFIX) + 8]


def new_key(tenant: str, role: str, seq: int, *, expires_in_s: float | None = None, name: str = "", now: float | None = None, **policy: Any) -> tuple[str, KeyRecord]:
    """A fresh key (the only time it exists in clear) and the record to store; `policy`: KeyRecord's models, limits and metadata."""
    now = time.time() if now is None else now
    key = PREFIX + "".join(secrets.choice(_ID_ALPHABET) for _ in range(8)) + "-" + secrets.token_urlsafe(32)
    record = KeyRecord(
        key_id=key_id_of(key),
        key_hash=hash_key(key),
        tenant=tenant,
        role=role,
        created_at=now,
        expires_at=None if expires_in_s is None else now + expires_in_s,
        seq=seq,
        name=name,
        **policy,
    )
    return key, record


def bearer_token(authorization: str | None) -> str:
    """The key in an `Authorization: Bearer <key>` header, or a 401."""
    if not authorization:
        raise AuthenticationError("You didn't provide an API key. Send it as `Authorization: Bearer <key>`.")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("Malformed Authorization header; expected `Bearer <key>`.")
    return token.strip()


def check_key(keys_by_hash: dict[str, KeyRecord], authorization: str | None, now: float) -> KeyRecord:
    """The valid key record behind an Authorization header, or a 401 that names only the key's visible id."""
    token = bearer_token(authorization)
    record = keys_by_hash.get(hash_key(token))
    shown = key_id_of(token) + "…" if token.startswith(PREFIX) else "provided"
    if record is None:
        raise AuthenticationError(f"Incorrect API key ({shown}).")
    if record.revoked_at is not None:
        raise AuthenticationError(f"The API key {record.key_id}… has been revoked.", code="revoked_api_key")
    if record.expires_at is not None and now >= record.expires_at:
        raise AuthenticationError(f"The API key {record.key_id}… has expired.", code="expired_api_key")
    return record
