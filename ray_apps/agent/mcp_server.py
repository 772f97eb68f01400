"""The agent's tools over MCP (Model Context Protocol), for any MCP client's model.

    oppen mcp            # stdio transport, as MCP clients launch servers

The same `PlatformTools` catalogue, guards and tenancy as the HTTP agent: each MCP
tool call goes through `PlatformTools.call` (schema-checked, catalogued trainers
only). The tenant is fixed per server (`--tenant`), as a client launches one per user.
"""

from __future__ import annotations

import functools
import json

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError as McpToolError
from mcp.server.mcpserver.utilities.func_metadata import ArgModelBase
from pydantic import BaseModel, ConfigDict

from ray_apps.agent.tools import PlatformTools, tool_problem
from trainers.errors import OppenError


def build_server(tools: PlatformTools) -> MCPServer:
    server = MCPServer(name="oppen", instructions="Tools of Oppen, an ML training platform on Ray: train and "
                                                  "queue jobs, status, costs, forecasts, GPUs, searches.")
    for name, tool in tools.catalog().items():
        server.add_tool(_through_guards(tools, name, tool.fn), name=name, description=tool.description)
        _strict_schema(server, name, tool.args)
    return server


class _CheckedByTheTool(ArgModelBase):
    """MCP's own argument check would refuse in its own words (and its default model drops unknown
    arguments): the arguments pass through as sent to `PlatformTools.call`, which checks them against
    the tool's model and refuses in the platform's shape (kind, field, reason, status)."""

    model_config = ConfigDict(extra="allow")

    def model_dump_one_level(self) -> dict:
        return dict(self.__pydantic_extra__ or {})


def _strict_schema(server: MCPServer, name: str, args: type[BaseModel]) -> None:
    """Advertise the tool's own argument model (typed trainer parameters from the catalog, no extra
    keys); the tool enforces it."""
    registered = server._tool_manager.get_tool(name)
    registered.parameters = args.model_json_schema()
    registered.fn_metadata.arg_model = _CheckedByTheTool


def _through_guards(tools: PlatformTools, name: str, fn):
    @functools.wraps(fn)  # the typed signature MCP builds the tool's input schema from
    def call(**kwargs) -> dict:
        try:
            return tools.call(name, {k: v for k, v in kwargs.items() if v is not None})
        except OppenError as exc:  # MCP shows its own ToolError's message to the client's model
            raise McpToolError(json.dumps(tool_problem(exc))) from None

    return call


def main(settings, tenant: str | None = None) -> None:
    build_server(PlatformTools(settings, tenant, front_end="mcp")).run("stdio")
