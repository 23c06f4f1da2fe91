"""API keys: org-scoped credentials of the HTTP lookup service (`media-retention serve`).

A key is shown once, at creation, as `mrk_<key id>_<secret>`. The key id is public (listings,
revocation, logs); the secret is 32 random bytes and only its SHA-256 is stored.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

import structlog
from sqlalchemy import select

from worker import validation
from worker.db import Database, db_now
from config.errors import BadInput, NotFound
from worker.models import ApiKey, AuditEvent, Organization
from worker.store.keys import validate_id

log = structlog.get_logger("worker.catalog")

TOKEN_PREFIX = "mrk"
# 32 random bytes: 256 bits, so guessing a secret is hopeless and no slow hash is needed (see _digest).
SECRET_BYTES = 32
_KEY_ID = re.compile(r"k[0-9a-f]{16}")
_TOKEN = re.compile(rf"{TOKEN_PREFIX}_(k[0-9a-f]{{16}})_([A-Za-z0-9_-]{{43}})")
NAME_LENGTH = ApiKey.__table__.c.name.type.length
# Compared against when a token names no live key, so an unknown key id costs the same work as a wrong secret.
_NO_KEY_DIGEST = "0" * 64


def _digest(secret: str) -> str:
    """SHA-256 of the secret. Password hashes (bcrypt, argon2) are slow on purpose because passwords are
    guessable; a 256-bit random secret is not, so a fast hash loses nothing and keeps each request cheap
    (GitHub, Stripe and PyPI store their API tokens the same way)."""
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


@dataclass(frozen=True)
class ApiKeyView:
    """An API key as listings show it: never its secret."""

    id: str
    org: str
    name: str | None
    created_at: datetime
    created_by: str
    revoked_at: datetime | None

    @classmethod
    def from_row(cls, row: ApiKey) -> "ApiKeyView":
        return cls(id=row.id, org=row.org_id, name=row.name, created_at=row.created_at, created_by=row.created_by,
                   revoked_at=row.revoked_at)

    def to_dict(self) -> dict:
        return {"id": self.id, "org": self.org, "name": self.name, "created_at": self.created_at.isoformat(),
                "created_by": self.created_by, "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
                "active": self.revoked_at is None}


@dataclass(frozen=True)
class CreatedApiKey:
    """A new key with its token: the only time the secret exists outside the caller's hands."""

    key: ApiKeyView
    token: str

    def to_dict(self) -> dict:
        return {**self.key.to_dict(), "token": self.token}


class ApiKeys:
    def __init__(self, db: Database):
        self.db = db

    def create(self, org: str, *, name: str | None = None, actor: str) -> CreatedApiKey:
        """A new key for `org`; the returned token is never shown again."""
        validate_id(org, "organization id")
        if name is not None:
            validation.text(name, "--name", NAME_LENGTH)
        actor = validation.actor(actor)
        key_id = "k" + secrets.token_hex(8)
        secret = secrets.token_urlsafe(SECRET_BYTES)
        with self.db.transaction() as session:
            if session.get(Organization, org) is None:
                raise NotFound(f"organization {org!r} does not exist; no key was created.")
            session.add(ApiKey(id=key_id, org_id=org, name=name, secret_sha256=_digest(secret), created_by=actor))
            session.add(AuditEvent(action="apikey_create", actor=actor, org_id=org, details={"key_id": key_id, "name": name}))
            session.flush()
            row = session.get(ApiKey, key_id)
            session.refresh(row)
            view = ApiKeyView.from_row(row)
        log.info("apikey.created", key_id=key_id, org=org, actor=actor)
        return CreatedApiKey(key=view, token=f"{TOKEN_PREFIX}_{key_id}_{secret}")

    def list(self, org: str | None = None) -> list[ApiKeyView]:
        """Every key (of `org`), oldest first; revoked ones included and marked."""
        query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
        if org is not None:
            validate_id(org, "organization id")
            query = query.where(ApiKey.org_id == org)
        with self.db.transaction() as session:
            return [ApiKeyView.from_row(row) for row in session.scalars(query)]

    def revoke(self, key_id: str, *, actor: str) -> ApiKeyView:
        """Revoke a key; the next request that presents it is refused."""
        if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
            raise BadInput(f"{key_id!r} is not an API key id (k followed by 16 hex digits, as `apikey list` shows).")
        actor = validation.actor(actor)
        with self.db.transaction() as session:
            row = session.get(ApiKey, key_id, with_for_update=True)
            if row is None:
                raise NotFound(f"API key {key_id!r} does not exist; nothing was revoked.")
            if row.revoked_at is None:
                row.revoked_at, row.revoked_by = session.scalar(select(db_now())), actor
                session.add(AuditEvent(action="apikey_revoke", actor=actor, org_id=row.org_id, details={"key_id": key_id}))
            session.flush()
            view = ApiKeyView.from_row(row)
        log.info("apikey.revoked", key_id=key_id, org=view.org, actor=actor)
        return view

    def authenticate(self, token: str | None) -> str | None:
        """The org a presented token belongs to, or None for a malformed, unknown, wrong or revoked one.
        Read from the database on every request, so a revocation takes effect at once."""
        presented = parse_token(token)
        if presented is None:
            return None
        key_id, digest = presented
        with self.db.transaction() as session:
            row = session.execute(
                select(ApiKey.org_id, ApiKey.secret_sha256).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
            ).first()
        return row.org_id if secret_matches(row.secret_sha256 if row else None, digest) else None


def parse_token(token: str | None) -> tuple[str, str] | None:
    """The key id and the SHA-256 of the secret (hex) of a presented token, or None for a malformed one: no
    database is asked about a token that cannot be a key."""
    match = _TOKEN.fullmatch(token or "")
    if match is None:
        return None
    key_id, secret = match.groups()
    return key_id, _digest(secret)


def secret_matches(stored_digest: str | None, presented_digest: str) -> bool:
    """Whether a presented secret's digest is the stored one (None: no live key of that id). Constant-time: how
    long it takes must not tell an attacker how much of a digest matched."""
    return hmac.compare_digest(stored_digest or _NO_KEY_DIGEST, presented_digest) and stored_digest is not None
