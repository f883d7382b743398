"""Tools for the agent examples (`environment.type: python`, `environment.module: examples/tools_weather.py`).

Every public function defined here is a tool, called by name with the arguments the
model wrote; it answers like NeMo Gym's `example_single_tool_call` resources server.
"""


def get_weather(city: str) -> dict:
    """Get the current weather in a city."""
    return {"city": city, "weather_description": f"The weather in {city} is cold."}
