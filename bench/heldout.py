"""The held-out FIM cases and what scoring them needs, for the benchmarks that generate on them
(bench/fim_cursor_line.py, bench/rank_candidates.py): the same cases and trimming as the evaluation."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from serve_app.tokenizer import CodeTokenizer
from serve_app.train.data import EvalConfig, FimCase, build_eval_set
from serve_app.train.evaluate import Budget, heldout_files


@dataclass
class HeldoutFim:
    model: torch.nn.Module          # the checkpoint, float32
    window: int                     # its context length
    code_tok: CodeTokenizer
    budget: Budget                  # trims prefix/suffix to a token budget at line starts
    files: dict[str, str]           # held-out file name → its whole text
    cases: list[FimCase]


def load_heldout_fim(model_dir: Path, num_cases: int, files_cache: Path | None) -> HeldoutFim:
    from serve_app.model import load_model
    model = load_model(model_dir, dtype=torch.float32)
    heldout = heldout_files(files_cache)
    return HeldoutFim(model, model.config.max_position_embeddings, CodeTokenizer.from_dir(model_dir),
                      Budget(Tokenizer.from_file(str(model_dir / "tokenizer.json"))),
                      {f.rel_name: f.text for f in heldout},
                      build_eval_set(heldout, EvalConfig(num_next_line=0, num_fim=num_cases)).fim)
