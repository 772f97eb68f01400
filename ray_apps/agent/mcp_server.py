"""The agent's tools over MCP (Model Context Protocol), for any MCP client's model.

    oppen mcp            # stdio transport, as MCP clients launch servers

The same `PlatformTools` catalogue, guards and tenancy as the HTTP agent: each MCP
tool call goes through `PlatformTools.call` (schema-checked, catalogued trainers
only). The tenant is fixed per server (`--tenant`), as a client launches one per user.
"""

from __future__ import annotations

import functools

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError as McpToolError
from mcp.server.mcpserver.utilities.func_metadata import ArgModelBase
from pydantic import BaseModel, ConfigDict

from ray_apps.agent.tools import PlatformTools, ToolError


def build_server(tools: PlatformTools) -> MCPServer:
    server = MCPServer(name="oppen", instructions="Tools of Oppen, an ML training platform on Ray: train and "
                                                  "queue jobs, status, costs, forecasts, GPUs, searches.")
    for name, tool in tools.catalog().items():
        server.add_tool(_through_guards(tools, name, tool.fn), name=name, description=tool.description)
        _strict_schema(server, name, tool.args)
    return server


def _strict_schema(server: MCPServer, name: str, args: type[BaseModel]) -> None:
    """Advertise and enforce the tool's own argument model (typed trainer parameters from the catalog,
    no extra keys): MCP's model, built from the Python signature, would drop unknown arguments."""
    registered = server._tool_manager.get_tool(name)
    strict = type(f"{name}_arguments", (args, ArgModelBase),
                  {"model_config": ConfigDict(extra="forbid", arbitrary_types_allowed=True)})
    registered.parameters = args.model_json_schema()
    registered.fn_metadata.arg_model = strict


def _through_guards(tools: PlatformTools, name: str, fn):
    @functools.wraps(fn)  # the typed signature MCP builds the tool's input schema from
    def call(**kwargs) -> dict:
        try:
            return tools.call(name, {k: (v.model_dump(exclude_unset=True) if isinstance(v, BaseModel) else v)
                                     for k, v in kwargs.items() if v is not None})
        except ToolError as exc:  # MCP shows its own ToolError's message to the client's model
            raise McpToolError(str(exc)) from None

    return call


def main(settings, tenant: str | None = None) -> None:
    build_server(PlatformTools(settings, tenant)).run("stdio")
