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

from ray_apps.agent.tools import PlatformTools, ToolError


def build_server(tools: PlatformTools) -> MCPServer:
    server = MCPServer(name="oppen", instructions="Tools of Oppen, an ML training platform on Ray: train and "
                                                  "queue jobs, status, costs, forecasts, GPUs, searches.")
    for name, tool in tools.catalog().items():
        server.add_tool(_through_guards(tools, name, tool.fn), name=name, description=tool.description)
    return server


def _through_guards(tools: PlatformTools, name: str, fn):
    @functools.wraps(fn)  # the typed signature MCP builds the tool's input schema from
    def call(**kwargs) -> dict:
        try:
            return tools.call(name, {k: v for k, v in kwargs.items() if v is not None})
        except ToolError as exc:  # MCP shows its own ToolError's message to the client's model
            raise McpToolError(str(exc)) from None

    return call


def main(settings, tenant: str | None = None) -> None:
    build_server(PlatformTools(settings, tenant)).run("stdio")
