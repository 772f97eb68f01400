"""The agent's Serve application: the FastAPI app of `ray_apps.agent.http` as an ingress.

Its own application (route prefix /v1/agent in configs/serve.yaml), one deployment,
so a request goes proxy -> replica with no handle hop behind it.
"""

from typing import Any

from ray import serve

from ray_apps.agent import http
from ray_apps.serve.http_common import ON_HEAD_NODE


@serve.deployment(num_replicas=1, ray_actor_options=ON_HEAD_NODE, max_ongoing_requests=64)
@serve.ingress(http.app)
class AgentAPI:
    def __init__(self):
        from ray_apps.agent.graph import agent_from_settings
        from ray_apps.config import load_settings

        settings = load_settings()
        http.configure(agent_from_settings(settings), settings)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """`import_path: ray_apps.serve.agent_app:app_builder` in configs/serve.yaml."""
    return AgentAPI.bind()
