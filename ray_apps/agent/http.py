"""The agent over HTTP: POST /v1/agent. One FastAPI app, served by Ray Serve
(`ray_apps.serve.agent_app`) or, for comparison, by plain uvicorn.

    {"message": "train mnist for 3 epochs", "thread_id": "t1"}
 -> {"answer": "...", "tool_calls": [{"name", "args", "result" | "error"}], "thread_id": "t1"}

Callers as in the queue API (ray_apps/auth.py): with tokens configured each request
carries `Authorization: Bearer <token>` of a member or admin, acts as its tenant,
and its thread ids live in that tenant's own space. Bodies over 64 KB and messages over the configured
length are refused.
"""

# No `from __future__ import annotations`: FastAPI under Serve's ingress needs real types.
import threading
from typing import Any

from fastapi import FastAPI, Header, Request
from pydantic import BaseModel, ConfigDict, Field

from ray_apps.agent.tools import REQUEST_ACTOR
from ray_apps.auth import Role, Users
from ray_apps.config import load_settings
from ray_apps.serve.http_common import (ProblemDetail, actor_of, answers_errors_as_problems, caller_of,
                                        limit_body_size, loopback_hosts_only, require_token, root_without_slash)
from trainers.errors import TooLarge

THREAD_ID = r"^[A-Za-z0-9_.:-]{1,64}$"

app = FastAPI(title="Oppen agent", version="1", description="Plain-language control of the platform.")
_state: dict[str, Any] = {"agent": None, "settings": None, "users": None}
_lock = threading.Lock()


class AgentRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message: str = Field(min_length=1, description="what you want, in plain English")
    thread_id: str | None = Field(None, pattern=THREAD_ID,
                                  description="continue this conversation (1-64 letters, digits, _.:-)")


class ToolCall(BaseModel):
    name: str
    args: dict[str, Any]
    result: Any = None
    error: str | None = None
    problem: ProblemDetail | None = Field(None, description="the refusal as the REST API gives it")


class AgentResponse(BaseModel):
    answer: str
    tool_calls: list[ToolCall]
    thread_id: str


def configure(agent, settings) -> None:
    """Install the agent this app answers with (Serve's replica constructor, or a test)."""
    _state["agent"], _state["settings"], _state["users"] = agent, settings, Users.from_settings(settings)


def _agent():
    if _state["agent"] is None:
        with _lock:
            if _state["agent"] is None:  # plain uvicorn: built on the first request
                from ray_apps.agent.graph import agent_from_settings
                from ray_apps.config import load_settings

                settings = load_settings()
                configure(agent_from_settings(settings), settings)
    return _state["agent"], _state["settings"]


def users() -> Users:
    _agent()
    return _state["users"]


limit_body_size(app)
answers_errors_as_problems(app, public=("/health",))
loopback_hosts_only(app, load_settings().host)
root_without_slash(app)
require_token(app, users, public=("/health",))


@app.post("/", response_model=AgentResponse)
def ask(body: AgentRequest, request: Request, authorization: str | None = Header(None),
        idempotency_key: str | None = Header(None, max_length=128, pattern=r"^[\x21-\x7e]+$", description=(
            "retrying with the same key queues no second job"))) -> AgentResponse:
    agent, settings = _agent()
    caller = caller_of(users(), authorization, role=Role.MEMBER, action="asking the agent")
    tenant = caller.scope
    if len(body.message) > settings.agent.max_message_chars:
        raise TooLarge(f"message over {settings.agent.max_message_chars} characters", "message")
    # Threads live in the tenant's own space: another tenant's thread id opens a fresh thread.
    thread = f"{tenant or '-'}/{body.thread_id}" if body.thread_id else None
    key = f"{caller.user}:{idempotency_key}" if idempotency_key else None
    acting = REQUEST_ACTOR.set(actor_of(caller, request, "agent"))  # what its tools change is audited as theirs
    try:
        reply = agent.ask(body.message, thread_id=thread, tenant=tenant, admin=caller.role is Role.ADMIN,
                          request_key=key)
    finally:
        REQUEST_ACTOR.reset(acting)
    return AgentResponse(answer=reply.answer, tool_calls=[ToolCall(**c) for c in reply.tool_calls],
                         thread_id=reply.thread_id.split("/", 1)[-1])


@app.get("/health")
def health() -> dict:
    return {"status": "ok"}
