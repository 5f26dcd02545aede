"""Offline API in vLLM's shape: `LLM(model_dir).generate(prompts, SamplingParams(...))`."""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Sequence

import torch

from serve_app.config import EngineConfig
from serve_app.engine.core import EngineCore
from serve_app.engine.sampling_params import SamplingParams
from serve_app.engine.sequence import EngineOverloadedError, RequestOutput
from serve_app.model import MoeForCausalLM, load_model

# Text, token ids, or vLLM's TokensPrompt dict {"prompt_token_ids": [...]} (also {"prompt": "..."}).
PromptLike = str | Sequence[int] | dict


class LLM:
    """One engine in this process. `model` is a checkpoint directory (model + tokenizer) or an
    already loaded model (then pass `tokenizer` if text prompts are wanted)."""

    def __init__(self, model: str | Path | MoeForCausalLM, tokenizer=None,
                 dtype: torch.dtype | str = "auto", **engine_options):
        """dtype "auto" (as vLLM): the checkpoint's own where this device computes in it fast (the server's
        full precision); float32 for the parity oracle."""
        if isinstance(model, (str, Path)):
            model_dir = Path(model)
            model = load_model(model_dir, dtype=dtype)
            if tokenizer is None and (model_dir / "tokenizer.json").is_file():
                from serve_app.tokenizer import CodeTokenizer
                tokenizer = CodeTokenizer.from_dir(model_dir)
        self.model, self.tokenizer = model, tokenizer
        # Offline work has no latency to protect: no load shedding by queue delay or predicted
        # latency unless asked.
        engine_options.setdefault("max_queue_delay_s", None)
        engine_options.setdefault("max_predicted_latency_s", None)
        self.engine = EngineCore(model, EngineConfig(**engine_options), tokenizer)
        self._ids = itertools.count()

    def _prompt_ids(self, prompt: PromptLike) -> list[int]:
        if isinstance(prompt, dict):
            unknown = set(prompt) - {"prompt_token_ids", "prompt"}
            if unknown or len(prompt) != 1:
                raise ValueError(f"a prompt dict holds exactly one of 'prompt_token_ids' or 'prompt', got "
                                 f"{sorted(prompt)}")
            prompt = prompt.get("prompt_token_ids", prompt.get("prompt"))
            if not isinstance(prompt, (str, list, tuple)):
                raise ValueError(f"prompt_token_ids must be a list of ints, got {type(prompt).__name__}")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass token id lists instead")
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        return [int(t) for t in prompt]

    def generate(self, prompts: PromptLike | Sequence[PromptLike],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion; one RequestOutput per prompt, in order."""
        single = isinstance(prompts, (str, dict)) or (len(prompts) > 0 and isinstance(prompts[0], int))
        batch = [prompts] if single else list(prompts)
        params = sampling_params or SamplingParams()
        per_prompt = [params] * len(batch) if isinstance(params, SamplingParams) else list(params)
        if len(per_prompt) != len(batch):
            raise ValueError(f"{len(per_prompt)} sampling params for {len(batch)} prompts")
        ids: list[str] = []
        final: dict[str, RequestOutput] = {}
        for prompt, p in zip(batch, per_prompt):
            request_id = f"llm-{next(self._ids)}"
            token_ids = self._prompt_ids(prompt)
            while True:
                try:
                    self.engine.add_request(request_id, token_ids, p)
                    break
                except EngineOverloadedError:
                    # Offline: make room instead of failing; requests may finish in these steps.
                    final.update((o.request_id, o) for o in self.engine.step() if o.finished)
            ids.append(request_id)
        final.update(self.engine.run_until_done([i for i in ids if i not in final]))
        return [final[i] for i in ids]
