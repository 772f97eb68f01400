"""Who is calling: per-user tokens that carry a tenant and a role.

    oppen users add ana --tenant team-a --role member    # prints the token once

Tokens are kept as SHA-256 hashes in `<data_dir>/users.json` (0600); a token is 32 random
bytes, so a fast hash is enough. Tokens can also come from the environment
(`OPPEN_TENANT_TOKENS`, JSON `{token: tenant}` or `{token: {"tenant", "role"}}`), as on
Kubernetes where a Secret holds them. With no token anywhere, the platform is in local mode:
loopback only (`oppen up` refuses any other host), every caller acts as a local admin.

Roles: `viewer` reads its tenant's jobs, costs and models; `member` also submits, cancels,
predicts and asks the agent; `admin` also changes what is served, moves aliases and sees
every tenant.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from trainers import errors
from trainers.errors import OppenError


class Role(str, Enum):
    VIEWER = "viewer"
    MEMBER = "member"
    ADMIN = "admin"

    def at_least(self, other: Role) -> bool:
        order = [Role.VIEWER, Role.MEMBER, Role.ADMIN]
        return order.index(self) >= order.index(other)


class AuthError(OppenError):
    """A token is missing or unknown (401), or its role may not do this (403)."""

    def __init__(self, reason: str):
        super().__init__(reason, field="Authorization")


class Unauthenticated(AuthError, errors.Unauthenticated):
    pass


class Forbidden(AuthError, errors.Forbidden):
    pass


@dataclass(frozen=True)
class Caller:
    user: str
    tenant: str | None   # None only for the local admin of a platform without tokens
    role: Role

    @property
    def scope(self) -> str | None:
        """The tenant whose data this caller sees; None: every tenant (admins)."""
        return None if self.role is Role.ADMIN else self.tenant

    def require(self, role: Role, action: str) -> None:
        if not self.role.at_least(role):
            raise Forbidden(f"{action} needs the {role.value} role; {self.user} is {self.role.value}")


LOCAL_ADMIN = Caller(user="local", tenant=None, role=Role.ADMIN)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Users:
    """Known tokens (by hash) and whom they belong to; re-read when users.json changes."""

    def __init__(self, path: Path | None, env_tokens: dict[str, Any] | None = None):
        self.path = path
        self._env = {token_hash(t): _grant(t, v) for t, v in (env_tokens or {}).items()}
        self._file: dict[str, Caller] = {}
        self._stamp: tuple[int, int] | None = None

    @classmethod
    def from_settings(cls, settings) -> Users:
        return cls(settings.data_dir / "users.json", settings.tenant_tokens)

    def _known(self) -> dict[str, Caller]:
        try:
            stat = self.path.stat() if self.path else None
        except OSError:
            stat = None
        stamp = (stat.st_mtime_ns, stat.st_size) if stat else None
        if stamp != self._stamp:
            self._file, self._stamp = {u["token_sha256"]: _caller(u) for u in self._entries()}, stamp
        return {**self._file, **self._env}

    @property
    def configured(self) -> bool:
        return bool(self._known())

    def authenticate(self, authorization: str | None) -> Caller:
        """The caller of a request's `Authorization` header (AuthError 401 when unknown)."""
        known = self._known()
        if not known:
            return LOCAL_ADMIN
        scheme, _, token = (authorization or "").partition(" ")
        digest = token_hash(token.strip()) if scheme.lower() == "bearer" and token.strip() else ""
        for stored, caller in known.items():
            if secrets.compare_digest(digest, stored):
                return caller
        raise Unauthenticated("a valid `Authorization: Bearer <token>` is required")

    # ------------------------------------------------------------------ the users file

    def add(self, name: str, tenant: str, role: Role) -> str:
        """A new user with a fresh token; the token is returned once and only its hash is kept."""
        for what, value in (("name", name), ("tenant", tenant)):
            if not NAME.fullmatch(value):
                raise ValueError(f"{what} {value!r}: use 1-64 letters, digits or _.- (starting with one)")
        users = self._entries()
        if any(u["name"] == name for u in users):
            raise ValueError(f"user {name!r} exists; remove it first to issue a new token")
        token = secrets.token_urlsafe(32)
        users.append({"name": name, "tenant": tenant, "role": role.value, "token_sha256": token_hash(token)})
        self._write(users)
        return token

    def remove(self, name: str) -> bool:
        users = self._entries()
        kept = [u for u in users if u["name"] != name]
        self._write(kept)
        return len(kept) < len(users)

    def list(self) -> list[Caller]:
        return [_caller(u) for u in self._entries()]

    def _entries(self) -> list[dict]:
        if self.path is None or not self.path.exists():
            return []
        return json.loads(self.path.read_text()).get("users", [])

    def _write(self, users: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump({"users": users}, out, indent=1)
        os.replace(tmp, self.path)


def _caller(entry: dict) -> Caller:
    return Caller(entry["name"], entry["tenant"], Role(entry["role"]))


def _grant(token: str, value: Any) -> Caller:
    """An environment token: `"team-a"` (a member of team-a) or `{"tenant": ..., "role": ...}`."""
    if isinstance(value, str):
        return Caller(user=value, tenant=value, role=Role.MEMBER)
    return Caller(user=value.get("user") or value["tenant"], tenant=value["tenant"], role=Role(value.get("role", "member")))
