"""The pre-tokenized sample cache and the batch order, shared by training and evaluation.

``prepare_samples`` tokenizes the corpus once into ``SampleTensors`` and caches them in a file keyed
by ``samples_key`` (tokenizer + data config + split + corpus version); ``epoch_order`` and
``next_batch`` turn the data position (epoch, cursor) of a ``TrainState`` into batches.

Legend: B=batch, S=sequence length (max_len), N=samples.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from tokenizers import Tokenizer

from serve_app.train.corpus import stdlib_root
from serve_app.train.data import DataConfig, TrainingSample, iter_training_samples

if TYPE_CHECKING:  # train.py imports this module
    from serve_app.train.recipe import TrainConfig, TrainState


@dataclass
class SampleTensors:
    """Pre-tokenized samples: what ``samples.pt`` holds."""

    input_ids: torch.Tensor   # [N, S] int64
    num_tokens: torch.Tensor  # [N] real tokens per row; positions >= num_tokens are padding
    is_fim: torch.Tensor      # [N] bool

    @classmethod
    def from_samples(cls, samples: list[TrainingSample]) -> "SampleTensors":
        return cls(torch.tensor([s.input_ids for s in samples], dtype=torch.long),
                   torch.tensor([s.num_tokens for s in samples], dtype=torch.long),
                   torch.tensor([s.is_fim for s in samples], dtype=torch.bool))

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def samples_key(tokenizer_path: Path, data_cfg: DataConfig, split: str, max_samples: int | None,
                corpus_id: str = "stdlib") -> str:
    """What the cached samples depend on: tokenizer, data config, which split, corpus version
    (this stdlib, and ``corpus_id``: what else the corpus holds, e.g. the installed packages)."""
    digest = hashlib.sha256(tokenizer_path.read_bytes())
    corpus = [split, str(stdlib_root()), platform.python_version()]
    if corpus_id != "stdlib":                # the stdlib-only key stays that of earlier releases
        corpus.append(corpus_id)
    digest.update(json.dumps([asdict(data_cfg), max_samples, corpus]).encode())
    return digest.hexdigest()


def prepare_samples(cache: Path, load_files: Callable[[], list], tokenizer_path: Path, data_cfg: DataConfig,
                    key: str, max_samples: int | None = None) -> SampleTensors:
    """Tokenize once; reuse ``cache`` while ``key`` matches. ``load_files`` runs only on a miss
    (reading and parsing the corpus costs minutes of CPU on a shared machine)."""
    if cache.is_file():
        saved = torch.load(cache, weights_only=True)
        if saved["key"] == key:
            return SampleTensors(saved["input_ids"].long(), saved["num_tokens"].long(), saved["is_fim"])
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    samples = []
    for sample in iter_training_samples(load_files(), tokenizer, data_cfg):
        samples.append(sample)
        if max_samples is not None and len(samples) >= max_samples:
            break
    data = SampleTensors.from_samples(samples)
    atomic_save({"key": key, "input_ids": data.input_ids.int(), "num_tokens": data.num_tokens.int(),
                 "is_fim": data.is_fim}, cache)
    return data


def epoch_order(num_rows: int, seed: int, epoch: int) -> torch.Tensor:
    """The row order of one epoch: a permutation seeded by (seed, epoch), independent of history."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_rows, generator=gen)


def next_batch(data: SampleTensors, state: TrainState, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows at the data cursor (advancing it, across epochs); trailing all-pad columns dropped."""
    rows: list[torch.Tensor] = []
    need = cfg.batch_size
    while need:
        take = epoch_order(len(data), cfg.seed, state.epoch)[state.cursor:state.cursor + need]
        rows.append(take)
        need -= len(take)
        state.cursor += len(take)
        if state.cursor >= len(data):
            state.epoch, state.cursor = state.epoch + 1, 0
    idx = torch.cat(rows)
    num_tokens = data.num_tokens[idx]                                   # [B]
    return data.input_ids[idx, :int(num_tokens.max())], num_tokens     # [B, S'], [B]


def atomic_save(payload: dict, path: Path) -> None:
    """Write to a temporary file in the same directory, then rename: a crash leaves the old file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
