"""HTTP API: OpenAI-compatible completions and chat, the FIM endpoint, models and health.

The only package that knows HTTP (FastAPI); it knows nothing of Ray. `create_app(client, settings)`
builds the app over any `EngineClient`; `LocalEngineClient` runs it over an engine in this process,
and `deployments/` wraps the same app in Ray Serve with a client that reaches the router.
"""
from serve_app.api.app import create_app
from serve_app.api.client import EngineClient, LocalEngineClient
from serve_app.api.errors import ApiError, BackendUnavailableError
from serve_app.api.settings import ApiSettings

__all__ = ["create_app", "EngineClient", "LocalEngineClient", "ApiError", "BackendUnavailableError", "ApiSettings"]
