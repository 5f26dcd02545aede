"""Factories for engine tests: a tiny model dir (weights + tokenizer) and engines over it."""
from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

import torch

from serve_app.config import EngineConfig
from serve_app.engine import EngineCore, SamplingParams
from serve_app.model import kernels, load_model
from serve_app.tokenizer import CodeTokenizer
from tests.helpers.checkpoints import build_checkpoint
from tests.helpers.factories import build_tokenizer


def build_model_dir(out_dir: str | Path, family: str = "mixtral", fim_order: str | None = None,
                    **overrides) -> Path:
    """`fim_order`: what the tokenizer config declares (None: nothing, i.e. PSM)."""
    # The test tokenizer's <|endoftext|> is id 0; transformers' default eos (2) would be <fim_suffix>.
    ckpt = build_checkpoint(out_dir, family, **{"eos_token_id": 0, **overrides})
    build_tokenizer(out_dir, fim_order=fim_order)
    return ckpt.path


def create_engine(model_dir: Path, **options) -> EngineCore:
    defaults = dict(block_size=4, num_kv_blocks=256, max_num_batched_tokens=64, long_prefill_chunk=16)
    cfg = EngineConfig(**{**defaults, **options})
    return EngineCore(load_model(model_dir), cfg, CodeTokenizer.from_dir(model_dir))


def greedy(max_tokens: int = 8, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def run(engine: EngineCore, prompts: dict[str, list[int]], params: SamplingParams) -> dict[str, list[int]]:
    for request_id, prompt in prompts.items():
        engine.add_request(request_id, prompt, params)
    final = engine.run_until_done(prompts)
    return {rid: out.outputs[0].token_ids for rid, out in final.items()}


@contextlib.contextmanager
def fixed_kernels():
    """The kernel table instead of measurements (serve_app/model/kernels.py), in this process and in
    servers started meanwhile, for tests that compare two processes token for token: each measuring
    on its own could pick a different dtype or kernel path on a loaded machine (seen in the suite)."""
    before = os.environ.get("MOE_SERVE_KERNELS")
    os.environ["MOE_SERVE_KERNELS"] = "fixed"
    kernels.forget_choices()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MOE_SERVE_KERNELS")
        else:
            os.environ["MOE_SERVE_KERNELS"] = before
        kernels.forget_choices()


@contextlib.contextmanager
def threads_of_a_new_thread():
    """This thread computes with the intra-op thread count a thread started now gets (OpenMP's
    default: OMP_NUM_THREADS, else one per core) for the test's duration. Tests that compare float
    sums bit for bit with threads they start (shard servers, an engine thread) need both sides to
    split GEMMs alike, whatever an earlier test set here with torch.set_num_threads (measured: a
    thread started after set_num_threads(1) still splits over every core)."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count()))
    try:
        yield
    finally:
        torch.set_num_threads(before)
