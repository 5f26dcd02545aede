"""Session-wide test set-up.

Ray Serve reads its direct-ingress settings from the environment when its modules are imported,
in every Ray process; the test session starts its own local Ray cluster, whose processes inherit
this environment. So the port is chosen and the variables are set here, before any test module
imports Ray.
"""
from __future__ import annotations

import os
import socket


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if "MOE_SERVE_TEST_PORT" not in os.environ:
    os.environ["MOE_SERVE_TEST_PORT"] = str(_free_port())
    from serve_app.cli import direct_ingress_env

    os.environ.update(direct_ingress_env(int(os.environ["MOE_SERVE_TEST_PORT"])))
