"""API keys: random tokens shown once, stored only as SHA-256 digests (a 256-bit random token needs no
slow hash: there is nothing to guess)."""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3

from app.jobs.store import ApiKey, JobStore
from pipelines.errors import UsageError

KEY_PREFIX = "tsk_"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


def hash_key(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_key(store: JobStore, name: str) -> str:
    """A new key for ``name``; the token is returned here and never again."""
    if not _NAME.match(name):
        raise UsageError("BAD_KEY_NAME", f"key names are 1-64 letters, digits, '.', '_', '@' or '-'; got {name!r}")
    token = KEY_PREFIX + secrets.token_urlsafe(32)
    try:
        store.add_key(secrets.token_hex(6), name, hash_key(token))
    except sqlite3.IntegrityError as exc:
        raise UsageError("KEY_EXISTS", f"a key named {name!r} exists already (revoke it or pick another name)") from exc
    return token


def authenticate(store: JobStore, token: str) -> ApiKey | None:
    """The live key behind ``token``, or ``None``."""
    if not token.startswith(KEY_PREFIX) or len(token) > 128:
        return None
    return store.key_for_hash(hash_key(token))
