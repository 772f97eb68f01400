"""The agent as a LangGraph graph with memory.

    understand ──(tool calls)──> act ──(router)──> respond ──> END
        ^  └──(a question / an answer)──> END       │
        └──────────────(a model: it reads the results and goes on)┘

`understand` is the intent router, or the configured tool-calling model; `act`
runs the tool calls through `PlatformTools.call` (schema-checked, catalogued
trainers only, as the caller's tenant); `respond` words the router's results.
Threads persist in a SQLite checkpointer in the data dir, with a small context
(the job and run of the last turn, a question awaiting its answer), so "and what
did it cost?" refers to the job just discussed. The file stays bounded: after each
turn a thread keeps only its newest checkpoints (the latest holds the whole state:
messages, context), and past MAX_THREADS the least recently used threads are dropped.
Across threads, the tools' long-term memory (memory.py: job outcomes, failure fingerprints,
notes, per tenant) answers recall; "forget that" is the memory this thread last named.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypedDict

from langchain_core.messages import AIMessage, AnyMessage, HumanMessage, RemoveMessage, SystemMessage, ToolMessage
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages

from ray_apps.agent.answers import answer
from ray_apps.agent.llm_client import ChatModel, ModelError
from ray_apps.agent.router import Router
from ray_apps.agent.tools import REFERENCES, PlatformTools, tool_problem
from trainers.errors import OppenError

MAX_MODEL_ROUNDS = 4
HISTORY_FOR_MODEL = 20  # messages of the thread a model sees
KEEP_MESSAGES = 60      # a thread keeps its last messages: each turn's checkpoint must not grow forever
MAX_THREADS = 1000      # threads kept in the SQLite file; the least recently used go first
SYSTEM = ("You operate Oppen, an ML training platform on Ray. Use the tools to act; never invent job ids, "
          "costs or metrics. Trainers: mnist, llm. Answer briefly with the figures the tools returned. For what "
          "happened before (past failures, settings that worked, what the user asked you to remember) use "
          "recall, and cite the job and run ids it returns.")


class AgentState(TypedDict, total=False):
    messages: Annotated[list[AnyMessage], add_messages]
    context: dict[str, Any]
    calls: list[dict]
    rounds: int
    note: str  # the router's remark on this turn's message (it was cut), said with the answer


@dataclass
class Reply:
    answer: str
    tool_calls: list[dict] = field(default_factory=list)
    thread_id: str = ""


def _remember(context: dict, result: Any) -> dict:
    """The job and run a result is about: what "it" means next turn."""
    context = dict(context)
    if isinstance(result, dict):
        for key in ("job_id", "run_id"):
            if isinstance(result.get(key), str) and result[key] not in ("last", "latest"):
                context[key] = result[key]
        if isinstance(result.get("id"), str) and "state" in result:  # a job view
            context["job_id"] = result["id"]
        if result.get("mlflow_run_id"):
            context["run_id"] = result["mlflow_run_id"]
        if isinstance(result.get("memory_id"), str):  # what "forget that" means
            context["memory_id"] = result["memory_id"]
        if isinstance(result.get("forgotten"), dict) and result["forgotten"].get("id") == context.get("memory_id"):
            context.pop("memory_id")
    return context


def _resolve(call: dict, context: dict) -> dict:
    """A memory named "that" is the one this thread last recalled or remembered."""
    args = call["args"] or {}
    if call["name"] == "forget" and str(args.get("item_id", "")).lower() in REFERENCES and context.get("memory_id"):
        return {**args, "item_id": context["memory_id"]}
    return args


class Agent:
    def __init__(self, tools: PlatformTools, *, model: ChatModel | None = None, db_path: Path | None = None,
                 checkpoints_per_thread: int = 20, max_threads: int = MAX_THREADS):
        self.tools = tools
        self.model = model
        self.router = Router()
        self._local = threading.local()
        self.checkpoints_per_thread = max(1, checkpoints_per_thread)  # the newest holds the thread's state
        self.max_threads = max(1, max_threads)
        self._on_disk = db_path is not None
        if db_path is not None:
            from langgraph.checkpoint.sqlite import SqliteSaver

            db_path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(db_path), check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL: durable across crashes of the process, fsync per checkpoint spared
            self.checkpointer = SqliteSaver(conn)
        else:
            from langgraph.checkpoint.memory import InMemorySaver

            self.checkpointer = InMemorySaver()
        self.graph = self._build().compile(checkpointer=self.checkpointer)

    # ------------------------------------------------------------------ nodes

    def _understand(self, state: AgentState, config) -> dict:
        out = self._decide(state)
        excess = len(state["messages"]) - KEEP_MESSAGES
        if excess > 0:  # the context dict, not old messages, carries what later turns refer to
            out["messages"] = [RemoveMessage(id=m.id) for m in state["messages"][:excess]] + out["messages"]
        return out

    def _decide(self, state: AgentState) -> dict:
        context = dict(state.get("context") or {})
        if self.model is not None:
            history = [SystemMessage(SYSTEM), *state["messages"][-HISTORY_FOR_MODEL:]]
            try:
                msg = self.model.invoke(history, [t.schema() for t in self.tools.catalog().values()])
            except ModelError as exc:
                return {"messages": [AIMessage(f"The language model is unavailable: {exc}")]}
            return {"messages": [msg], "rounds": state.get("rounds", 0) + 1}
        decision = self.router.route(state["messages"][-1].content, context)
        if decision.kind == "call":
            context.pop("pending", None)
            call = {"name": decision.tool, "args": decision.args, "id": uuid.uuid4().hex}
            return {"messages": [AIMessage("", tool_calls=[call])], "context": context, "note": decision.note or ""}
        if decision.kind == "ask":
            context["pending"] = {"tool": decision.tool, "args": decision.args, "missing": decision.missing,
                                  "question": decision.text}
        else:
            context.pop("pending", None)
        text = f"{decision.text} {decision.note}" if decision.note else decision.text
        return {"messages": [AIMessage(text)], "context": context}

    def _act(self, state: AgentState, config) -> dict:
        tenant, admin = config["configurable"].get("tenant"), config["configurable"].get("admin", True)
        key = config["configurable"].get("request_key")
        same = (tenant, admin, key) == (self.tools.tenant, self.tools.admin, None)
        tools = self.tools if same else self.tools.for_caller(tenant, admin, key)
        context = dict(state.get("context") or {})
        out, calls = [], list(state.get("calls") or [])
        for call in state["messages"][-1].tool_calls:
            record = {"name": call["name"], "args": _resolve(call, context)}
            try:
                result = tools.call(call["name"], record["args"])
                record["result"] = result
                context = _remember(context, result)
                content = json.dumps(result, default=str)
            except OppenError as exc:  # any refusal, the tools' own or the platform's
                record["error"], record["problem"] = str(exc), exc.problem()
                content = json.dumps({"error": tool_problem(exc)})
            calls.append(record)
            out.append(ToolMessage(content, tool_call_id=call["id"], name=call["name"]))
        return {"messages": out, "calls": calls, "context": context}

    def _respond(self, state: AgentState, config) -> dict:
        lines = []
        for record in state.get("calls") or []:
            if "error" in record:
                lines.append(f"I couldn't do that: {record['error']}")
            else:
                lines.append(answer(record["name"], record["result"]))
        if state.get("note"):
            lines.append(state["note"])
        return {"messages": [AIMessage(" ".join(lines))]}

    # ------------------------------------------------------------------ wiring

    def _build(self) -> StateGraph:
        g = StateGraph(AgentState)
        g.add_node("understand", self._understand)
        g.add_node("act", self._act)
        g.add_node("respond", self._respond)
        g.add_edge(START, "understand")
        g.add_conditional_edges("understand", self._after_understand, ["act", END])
        g.add_conditional_edges("act", lambda s: "understand" if self.model is not None else "respond",
                                ["understand", "respond"])
        g.add_edge("respond", END)
        return g

    def _after_understand(self, state: AgentState) -> str:
        last = state["messages"][-1]
        if isinstance(last, AIMessage) and last.tool_calls and state.get("rounds", 0) <= MAX_MODEL_ROUNDS:
            return "act"
        return END

    # ------------------------------------------------------------------ entry point

    def ask(self, message: str, *, thread_id: str | None = None, tenant: str | None = None,
            admin: bool = True, request_key: str | None = None) -> Reply:
        """`request_key`: the client's Idempotency-Key; asked again with it, a job this turn queued
        the first time is returned, not queued twice."""
        thread_id = thread_id or uuid.uuid4().hex
        config = {"configurable": {"thread_id": thread_id, "tenant": tenant, "admin": admin,
                                   "request_key": request_key}}
        # One checkpoint per turn, written at its end: a turn cut short by a crash is asked again;
        # what its tools did is already in the queue store.
        state = self.graph.invoke({"messages": [HumanMessage(message)], "calls": [], "rounds": 0, "note": ""},
                                  config, durability="exit")
        self._prune(thread_id)
        last = state["messages"][-1]
        text = last.content if isinstance(last, AIMessage) and last.content else \
            "I ran out of steps before I could answer."
        return Reply(answer=text, tool_calls=state.get("calls") or [], thread_id=thread_id)

    def _prune(self, thread_id: str) -> None:
        """Keep the thread's newest checkpoints and the most recently used threads; drop the rest.

        Each SqliteSaver checkpoint holds every channel's full value (this graph has no delta
        channels), so the newest alone restores the thread: older ones only serve time travel,
        which the agent does not offer. SqliteSaver has no prune of its own (only delete_thread),
        hence the SQL on its tables, under its lock. Checkpoint ids are uuid6, ordered by time.
        """
        if not self._on_disk:
            return  # the in-memory saver (no data dir) lives and dies with the process
        with self.checkpointer.cursor() as cur:
            cur.execute(
                "DELETE FROM checkpoints WHERE thread_id = ? AND checkpoint_id NOT IN ("
                " SELECT c.checkpoint_id FROM checkpoints AS c WHERE c.thread_id = checkpoints.thread_id"
                " AND c.checkpoint_ns = checkpoints.checkpoint_ns ORDER BY c.checkpoint_id DESC LIMIT ?)",
                (thread_id, self.checkpoints_per_thread))
            cur.execute(
                "DELETE FROM writes WHERE thread_id = ? AND NOT EXISTS (SELECT 1 FROM checkpoints AS c"
                " WHERE c.thread_id = writes.thread_id AND c.checkpoint_ns = writes.checkpoint_ns"
                " AND c.checkpoint_id = writes.checkpoint_id)", (thread_id,))
            excess = cur.execute("SELECT COUNT(DISTINCT thread_id) FROM checkpoints").fetchone()[0] - self.max_threads
            if excess > 0:
                old = [row[0] for row in cur.execute(
                    "SELECT thread_id FROM checkpoints GROUP BY thread_id ORDER BY MAX(checkpoint_id) LIMIT ?",
                    (excess,))]
                cur.executemany("DELETE FROM checkpoints WHERE thread_id = ?", [(t,) for t in old])
                cur.executemany("DELETE FROM writes WHERE thread_id = ?", [(t,) for t in old])


def agent_from_settings(settings, model: ChatModel | None = None) -> Agent:
    """The platform's agent: the configured model if any, else the router; memory in the data dir."""
    if model is None and settings.agent.llm_base_url and settings.agent.llm_model:
        from ray_apps.agent.llm_client import OpenAICompatibleChat

        model = OpenAICompatibleChat(settings.agent.llm_base_url, settings.agent.llm_model,
                                     settings.agent.llm_api_key_env)
    return Agent(PlatformTools(settings), model=model, db_path=settings.data_dir / "agent" / "threads.db",
                 checkpoints_per_thread=settings.agent.checkpoints_per_thread)
