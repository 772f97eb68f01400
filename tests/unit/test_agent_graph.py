"""The agent's graph without Ray: memory across instances, the model path with a scripted
chat model (a thin fake: no LLM runs here), and the guards every tool call passes."""

from __future__ import annotations

import json

import pytest
from langchain_core.messages import AIMessage, ToolMessage

from ray_apps.agent.graph import Agent
from ray_apps.agent.tools import PlatformTools
from ray_apps.config import Settings
from ray_apps.scheduler.api import Queue
from ray_apps.scheduler.config import QueueConfig
from trainers.errors import NotFound, OppenError


@pytest.fixture()
def tools(tmp_path):
    settings = Settings(data_dir=tmp_path / "data")
    queue = Queue.from_settings(settings, QueueConfig())
    return PlatformTools(settings, queue=queue)


def add_job(tools, job_id, tenant="default"):
    return tools.queue.store.add(id=job_id, trainer="mnist", params={"epochs": 1}, tenant=tenant, priority="normal",
                                 workers=1, cpus_per_worker=2.0, gpus_per_worker=0.0)


class ScriptedModel:
    """Returns the given AIMessages in turn and records what it was shown."""

    def __init__(self, *replies: AIMessage):
        self.replies = list(replies)
        self.seen: list[list] = []

    def invoke(self, messages, tools):
        self.seen.append(list(messages))
        assert {t["function"]["name"] for t in tools} >= {"trigger_training_job", "get_job_queue_status"}
        return self.replies.pop(0)


def test_a_thread_remembers_its_job_across_agent_instances(tools, tmp_path):
    add_job(tools, "mnist-20261130-000000-aaaaaa")
    db = tmp_path / "threads.db"
    first = Agent(tools, db_path=db).ask("status of mnist-20261130-000000-aaaaaa", thread_id="t1")
    assert first.tool_calls[0]["name"] == "get_training_status" and "QUEUED" in first.answer
    # A new process would build a new Agent on the same file: "it" is still that job.
    second = Agent(tools, db_path=db).ask("cancel it", thread_id="t1")
    assert second.tool_calls == [{"name": "cancel_job", "args": {"job_id": "mnist-20261130-000000-aaaaaa"},
                                  "result": {"cancelled": ["mnist-20261130-000000-aaaaaa"], "refused": []}}]
    assert tools.queue.get("mnist-20261130-000000-aaaaaa").state.value == "CANCELLED"
    # Another thread knows nothing of it.
    other = Agent(tools, db_path=db).ask("cancel it", thread_id="t2")
    assert other.tool_calls == [] and other.answer.endswith("?")


def test_a_question_and_its_answer_span_two_turns(tools, tmp_path):
    agent = Agent(tools, db_path=tmp_path / "threads.db")
    assert agent.ask("cancel", thread_id="t").answer.startswith("Which job")
    add_job(tools, "mnist-20261130-000000-bbbbbb")
    reply = agent.ask("mnist-20261130-000000-bbbbbb", thread_id="t")
    assert reply.tool_calls[0]["name"] == "cancel_job" and reply.tool_calls[0]["result"]["cancelled"]


def test_the_model_path_runs_the_tools_it_calls_and_answers_with_their_results(tools):
    add_job(tools, "mnist-20261130-000000-cccccc")
    model = ScriptedModel(
        AIMessage("", tool_calls=[{"name": "get_job_queue_status", "args": {}, "id": "c1"}]),
        AIMessage("You have 1 queued job: mnist-20261130-000000-cccccc."))
    reply = Agent(tools, model=model).ask("what's waiting?")
    assert reply.answer == "You have 1 queued job: mnist-20261130-000000-cccccc."
    assert reply.tool_calls[0]["result"]["by_state"] == {"QUEUED": 1}
    tool_message = model.seen[1][-1]  # the model saw the tool's real result before answering
    assert isinstance(tool_message, ToolMessage) and "mnist-20261130-000000-cccccc" in tool_message.content


@pytest.mark.parametrize("name,args,refusal,field", [
    # The tool schemas are the catalog's: user trainers only, typed parameters, no other keys.
    ("trigger_training_job", {"trainer": "probe"}, "trainer: Input should be 'mnist' or 'llm'", "trainer"),
    ("trigger_training_job", {"trainer": "mnist", "params": {"command": "rm -rf /"}},
     "params.command: Extra inputs are not permitted", "params.command"),
    ("trigger_training_job", {"trainer": "../../bin/sh"}, "trainer: Input should be 'mnist' or 'llm'", "trainer"),
    ("start_hyperparameter_search", {"trainer": "mnist", "params": {"epochs": "2; curl evil"}},
     "params.epochs: Input should be a valid integer", "params.epochs"),
    ("queue_training_job", {"trainer": "mnist", "epochs": "lots"}, "epochs: Extra inputs are not permitted", "epochs"),
    ("validate_job_resources", {"trainer": "llm", "params": {"width": 8}}, "unknown parameter(s) for llm: width",
     "params.width"),
    ("run_shell", {"cmd": "id"}, "there is no tool 'run_shell'", "tool"),
    ("cancel_job", {"job_id": "x", "extra": 1}, "Extra inputs are not permitted", "extra"),
])
def test_tool_calls_outside_the_catalog_are_refused(tools, name, args, refusal, field):
    with pytest.raises(OppenError) as err:
        tools.call(name, args)
    assert refusal in str(err.value) and err.value.field == field
    # The same call from a model: refused, reported with the REST API's kind and field, nothing queued.
    model = ScriptedModel(AIMessage("", tool_calls=[{"name": name, "args": args, "id": "c1"}]),
                          AIMessage("I can't do that."))
    reply = Agent(tools, model=model).ask("do it")
    call = reply.tool_calls[0]
    assert refusal in call["error"] and call["problem"]["field"] == field and tools.queue.list() == []
    assert json.loads(model.seen[1][-1].content)["error"]["status"] == err.value.status


def test_a_model_that_keeps_calling_tools_is_stopped(tools):
    loop = [AIMessage("", tool_calls=[{"name": "get_job_queue_status", "args": {}, "id": f"c{i}"}])
            for i in range(10)]
    reply = Agent(tools, model=ScriptedModel(*loop)).ask("loop forever")
    assert 1 <= len(reply.tool_calls) <= 5 and "ran out of steps" in reply.answer


def test_tenants_see_only_their_jobs(tools):
    add_job(tools, "mnist-20261130-000000-dddddd", tenant="team-a")
    mine = tools.for_caller("team-b", admin=False).call("get_job_queue_status", {})
    assert mine["total"] == 0
    with pytest.raises(NotFound, match="no job 'mnist-20261130-000000-dddddd' of yours"):
        tools.for_caller("team-b", admin=False).call("cancel_job", {"job_id": "mnist-20261130-000000-dddddd"})


def _checkpoints(db, thread_id=None):
    import sqlite3

    with sqlite3.connect(db) as conn:
        if thread_id is None:
            return conn.execute("SELECT COUNT(*), COUNT(DISTINCT thread_id) FROM checkpoints").fetchone()
        return conn.execute("SELECT COUNT(*) FROM checkpoints WHERE thread_id = ?", (thread_id,)).fetchone()[0]


def test_a_long_thread_keeps_a_bounded_number_of_checkpoints_and_its_context(tools, tmp_path):
    add_job(tools, "mnist-20261130-000000-eeeeee")
    db = tmp_path / "threads.db"
    agent = Agent(tools, db_path=db, checkpoints_per_thread=5)
    first = agent.ask("status of mnist-20261130-000000-eeeeee", thread_id="t")
    assert first.tool_calls[0]["name"] == "get_training_status"
    for i in range(48):
        agent.ask("show me the queue" if i % 2 else "hello", thread_id="t")
    assert _checkpoints(db, "t") <= 5
    # 50 turns in: "it" is still the job of the first turn, in this process and in a new one.
    later = Agent(tools, db_path=db, checkpoints_per_thread=5).ask("cancel it", thread_id="t")
    assert later.tool_calls[0]["args"] == {"job_id": "mnist-20261130-000000-eeeeee"}
    assert later.tool_calls[0]["result"]["cancelled"] == ["mnist-20261130-000000-eeeeee"]
    state = agent.graph.get_state({"configurable": {"thread_id": "t"}}).values
    assert state["messages"][-1].content == later.answer and len(state["messages"]) >= 50  # the last 60 kept
    assert _checkpoints(db, "t") <= 5


def test_a_question_survives_pruning_down_to_one_checkpoint(tools, tmp_path):
    db = tmp_path / "threads.db"
    agent = Agent(tools, db_path=db, checkpoints_per_thread=1)
    for _ in range(3):
        agent.ask("hello", thread_id="t")
    assert agent.ask("cancel", thread_id="t").answer.startswith("Which job")
    assert _checkpoints(db, "t") == 1
    add_job(tools, "mnist-20261130-000000-ffffff")
    reply = agent.ask("mnist-20261130-000000-ffffff", thread_id="t")
    assert reply.tool_calls[0]["name"] == "cancel_job" and reply.tool_calls[0]["result"]["cancelled"]


def test_past_the_thread_bound_the_least_recently_used_threads_go(tools, tmp_path):
    add_job(tools, "mnist-20261130-000000-abcdef")
    db = tmp_path / "threads.db"
    agent = Agent(tools, db_path=db, max_threads=3)
    agent.ask("status of mnist-20261130-000000-abcdef", thread_id="old")
    for name in ("a", "b", "c"):
        agent.ask("hello", thread_id=name)
    assert _checkpoints(db) == (3, 3) and _checkpoints(db, "old") == 0
    agent.ask("hello", thread_id="a")  # used again: now "b" is the oldest
    agent.ask("hello", thread_id="d")
    assert _checkpoints(db, "b") == 0 and all(_checkpoints(db, t) for t in ("a", "c", "d"))
    # A dropped thread starts afresh: it no longer knows which job "it" is.
    assert agent.ask("cancel it", thread_id="old").tool_calls == []


def test_the_bound_comes_from_settings(tmp_path):
    from ray_apps.agent.graph import agent_from_settings

    settings = Settings(data_dir=tmp_path / "data", agent={"checkpoints_per_thread": 3})
    agent = agent_from_settings(settings)
    assert agent.checkpoints_per_thread == 3
    for _ in range(6):
        agent.ask("hello", thread_id="t")
    assert _checkpoints(tmp_path / "data" / "agent" / "threads.db", "t") == 3


def test_the_answer_says_when_a_long_message_was_cut(tools):
    reply = Agent(tools).ask("show me the queue " + "please " * 1000)
    assert reply.tool_calls[0]["name"] == "get_job_queue_status" and "I read only the first" in reply.answer
    refusal = Agent(tools).ask("train mnist for 1e999 epochs")
    assert refusal.tool_calls == [] and "1e999" in refusal.answer and tools.queue.list() == []
