"""The platform's one error model: every refusal names the offending input and its HTTP status.

Every domain error (a bad trainer parameter, an unknown job, a queue that refuses, MLflow
away) derives from one of these kinds, so each front-end answers it one way: the CLI with
`error: ...` and exit code 2, the HTTP apps with `{"detail": {"kind", "field", "reason"}}`
and the kind's status, the agent and MCP with the same three fields as a tool error.
It lives in `trainers` because the trainers raise it too and import nothing of the platform.
"""

from __future__ import annotations

from typing import Any, ClassVar


class OppenError(Exception):
    """A request the platform refuses or cannot serve now; `field` names the input at fault."""

    status: ClassVar[int] = 500
    kind: ClassVar[str] = "error"

    def __init__(self, message: str, field: str | None = None, *, retry_after: int | None = None):
        super().__init__(message)
        self.field = field
        self.retry_after = retry_after  # seconds, for the kinds a client may simply retry

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else self.kind

    def problem(self) -> dict[str, Any]:
        """The body every front-end shows: the same three fields everywhere."""
        return {"kind": self.kind, "field": self.field, "reason": str(self)}

    def as_dict(self) -> dict[str, Any]:
        """What crosses a process boundary (a Serve handle call): `from_dict` makes it an error again."""
        return {**self.problem(), "status": self.status, "retry_after": self.retry_after}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> OppenError:
        cls = KINDS.get(data.get("kind"), OppenError)
        return cls(data.get("reason", ""), data.get("field"), retry_after=data.get("retry_after"))


class Refused(OppenError):
    """The input is wrong: a bad value, an unknown name, a rule it breaks."""

    status, kind = 422, "refused"


class Infeasible(Refused):
    """The request is well-formed but can never run here (no node or quota could ever hold it)."""

    kind = "infeasible"


class TooLarge(Refused):
    """More than a request may carry (a body, a message, a batch of images)."""

    status, kind = 413, "too_large"


class NotFound(OppenError):
    """No such thing, or not one the caller may see (another tenant's job does not exist for you)."""

    status, kind = 404, "not_found"


class Conflict(OppenError):
    """The thing's state does not allow this now (already finished, changed under the request)."""

    status, kind = 409, "conflict"


class RateLimited(OppenError):
    """Too many requests; retry after `retry_after` seconds."""

    status, kind = 429, "rate_limited"


class Unavailable(OppenError):
    """Something the request needs (Ray, MLflow, a model version) does not answer now; retry later."""

    status, kind = 503, "unavailable"


class Unauthenticated(OppenError):
    """No token, or one the platform does not know."""

    status, kind = 401, "unauthenticated"


class Forbidden(OppenError):
    """The caller's role or tenant may not do this."""

    status, kind = 403, "forbidden"


KINDS: dict[str, type[OppenError]] = {cls.kind: cls for cls in (
    Refused, Infeasible, TooLarge, NotFound, Conflict, RateLimited, Unavailable, Unauthenticated, Forbidden)}
