"""`python -m serve_app.model.cpu_kernels` (make install): build the kernels once, so no server start pays for it."""
import logging

from serve_app.model.cpu_kernels import ops

logging.basicConfig(level=logging.INFO)
print("moe-serve CPU kernels:", "built" if ops() is not None else "unavailable (the pure-torch path runs)")
