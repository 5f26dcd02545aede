"""One local Ray cluster per test session (Ray takes seconds to start on 2 cores); Serve apps are
deployed per module by the tests that need them."""
from __future__ import annotations

import os

import pytest

from serve_app.cli import wait_healthy


@pytest.fixture(scope="session")
def ray_cluster():
    import ray
    from ray import serve

    from serve_app.cli import start_serve

    # Fractional CPU asks let router, ingress and several shards share 2 real cores.
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    start_serve("127.0.0.1")
    yield ray
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def base_url() -> str:
    return f"http://127.0.0.1:{os.environ['MOE_SERVE_TEST_PORT']}"


def wait_for_health(url: str, timeout_s: float = 120.0) -> None:
    wait_healthy(url, timeout_s)
