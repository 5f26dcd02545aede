"""What the engine reports about itself after every step, for whoever records metrics.

The engine knows no metrics library: it hands an `EngineObserver` one `StepStats` per step and the
observer (the Router deployment, or the embedded server) records it with `serve_app.metrics`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from serve_app.engine.sequence import RequestOutput
from serve_app.engine.speculative import SpecStats


@dataclass
class TokenTiming:
    tag: str                        # the request's tag (e.g. its tier), opaque to the engine
    first: bool                     # the request's first token: `seconds` is its TTFT
    seconds: float                  # since arrival (first) or since the previous token


@dataclass
class StepStats:
    duration_s: float               # schedule + forward + sample + update
    num_seqs: int                   # sequences in this step's batch
    num_tokens: int                 # tokens in this step's batch
    num_running: int                # after the step
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_queries: int             # prompt tokens looked up in the prefix cache during this step
    prefix_hits: int                # of those, served from it
    token_timings: list[TokenTiming] = field(default_factory=list)
    finished: list[RequestOutput] = field(default_factory=list)
    expert_tokens: torch.Tensor | None = None   # [layers, E] routed this step, when tracked
    speculative: SpecStats | None = None        # drafts verified this step (engine/speculative.py)


class EngineObserver(Protocol):
    def on_step(self, stats: StepStats) -> None: ...
