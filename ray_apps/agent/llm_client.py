"""A tool-calling chat model over any OpenAI-compatible endpoint (OpenAI, vLLM, Ollama's /v1).

One small client instead of a provider SDK per vendor: `invoke(messages, tools)`
returns a LangChain AIMessage whose `tool_calls` the graph executes. Tests use a
scripted model with the same `invoke`.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Protocol

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage

from trainers.errors import Unavailable


class ChatModel(Protocol):
    def invoke(self, messages: list[BaseMessage], tools: list[dict]) -> AIMessage: ...


class ModelError(Unavailable):
    """The configured LLM did not answer, or answered nothing usable."""


def to_openai(messages: list[BaseMessage]) -> list[dict]:
    out = []
    for m in messages:
        if isinstance(m, SystemMessage):
            out.append({"role": "system", "content": m.content})
        elif isinstance(m, HumanMessage):
            out.append({"role": "user", "content": m.content})
        elif isinstance(m, ToolMessage):
            out.append({"role": "tool", "tool_call_id": m.tool_call_id, "content": m.content})
        elif isinstance(m, AIMessage):
            msg = {"role": "assistant", "content": m.content or ""}
            if m.tool_calls:
                msg["tool_calls"] = [{"id": c["id"], "type": "function", "function": {
                    "name": c["name"], "arguments": json.dumps(c["args"])}} for c in m.tool_calls]
            out.append(msg)
    return out


class OpenAICompatibleChat:
    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 60.0):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = os.environ.get(api_key_env, "")
        self.timeout_s = timeout_s

    def invoke(self, messages: list[BaseMessage], tools: list[dict]) -> AIMessage:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        body = {"model": self.model, "messages": to_openai(messages), "tools": tools, "temperature": 0}
        try:
            resp = httpx.post(self.url, json=body, headers=headers, timeout=self.timeout_s)
            resp.raise_for_status()
            choice = resp.json()["choices"][0]["message"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
            raise ModelError(f"the chat model at {self.url} failed: {exc}") from None
        calls = []
        for c in choice.get("tool_calls") or []:
            try:
                args = json.loads(c["function"].get("arguments") or "{}")
            except json.JSONDecodeError:
                args = {"__unparsed__": c["function"].get("arguments")}
            calls.append({"name": c["function"]["name"], "args": args, "id": c.get("id") or uuid.uuid4().hex})
        return AIMessage(content=choice.get("content") or "", tool_calls=calls)
