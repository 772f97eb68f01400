"""The agent's tools over MCP: a real MCP client talks to `oppen mcp` over stdio."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import yaml

from tests.conftest import ROOT


def test_mcp_client_lists_the_tools_calls_one_and_gets_refusals(tmp_path):
    from mcp.client.session import ClientSession
    from mcp.client.stdio import StdioServerParameters, stdio_client

    config = tmp_path / "platform.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data")}))
    params = StdioServerParameters(command=sys.executable, args=["-m", "ray_apps.cli", "--config", str(config), "mcp"],
                                   cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)})

    async def session_run():
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            tools = {t.name: t for t in (await session.list_tools()).tools}
            status = await session.call_tool("get_job_queue_status", {})
            refused = await session.call_tool("trigger_training_job", {"trainer": "probe"})
            shell = await session.call_tool("run_shell", {"cmd": "id"})
            misplaced = await session.call_tool("queue_training_job", {"trainer": "mnist", "epochs": "lots"})
            mistyped = await session.call_tool("queue_training_job", {"trainer": "mnist", "params": {"epochs": "lots"}})
            unknown = await session.call_tool("validate_job_resources", {"trainer": "mnist",
                                                                         "params": {"gpu_count": 8}})
            return tools, status, refused, shell, misplaced, mistyped, unknown

    tools, status, refused, shell, misplaced, mistyped, unknown = asyncio.run(asyncio.wait_for(session_run(), 60))
    assert len(tools) == 21 and "why_is_job_waiting" in tools and tools["trigger_training_job"].input_schema["required"] == ["trainer"]
    assert not status.is_error and json.loads(status.content[0].text) == {"by_state": {}, "jobs": [], "total": 0}
    assert refused.is_error and "'mnist' or 'llm'" in refused.content[0].text
    assert shell.is_error and "run_shell" in shell.content[0].text
    # The schema is the catalog's: each parameter typed, bounded and described, nothing else accepted.
    schema = tools["queue_training_job"].input_schema
    params = schema["$defs"]["TrainerParams"]
    assert schema["additionalProperties"] is False and params["additionalProperties"] is False
    assert params["properties"]["epochs"]["anyOf"][0] == {"type": "integer", "minimum": 1}
    assert params["properties"]["num_workers"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 1024}
    # lr: the widest of the trainers' bounds in the schema, each trainer's own in the description.
    assert params["properties"]["lr"]["anyOf"][0] == {"type": "number", "exclusiveMinimum": 0, "maximum": 10}
    assert "mnist: in (0, 10]" in params["properties"]["lr"]["description"]
    assert params["properties"]["model"]["anyOf"][0]["enum"] == ["distilgpt2", "tiny"]
    assert schema["properties"]["trainer"]["enum"] == ["mnist", "llm"]
    # Nothing queued with defaults behind the caller's back: each refusal is the REST API's problem
    # (kind, field, status), naming the argument.
    texts = [r.content[0].text for r in (misplaced, mistyped, unknown)]  # after MCP's "Error executing ...: "
    problems = [json.loads(text[text.index("{"):]) for text in texts]
    assert all(r.is_error for r in (misplaced, mistyped, unknown))
    assert [(p["kind"], p["field"], p["status"]) for p in problems] == [
        ("refused", "epochs", 422), ("refused", "params.epochs", 422), ("refused", "params.gpu_count", 422)]
    assert "Input should be a valid integer" in problems[1]["reason"]
