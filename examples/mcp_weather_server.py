"""A small MCP server for examples/agent-mcp.yaml, written with the official MCP SDK (`pip install 'sft-ray[mcp]'`).

It offers one tool, `get_weather`, answering like examples/tools_weather.py (and NeMo Gym's
`example_single_tool_call` resources server), and speaks MCP over stdio: sft-ray starts it as
`python examples/mcp_weather_server.py`. `python examples/mcp_weather_server.py http 8001` serves
it over Streamable HTTP at http://127.0.0.1:8001/mcp instead (`environment.url`).
"""

from __future__ import annotations

import sys
from typing import TypedDict

from mcp.server.mcpserver import MCPServer

server = MCPServer("weather")


class Weather(TypedDict):
    city: str
    weather_description: str


@server.tool()
def get_weather(city: str) -> Weather:
    """Get the current weather in a city."""
    return {"city": city, "weather_description": f"The weather in {city} is cold."}


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "http":
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run()
