"""A random-weight checkpoint with the default model's shape, for latency work before (or
without) the trained weights: serving speed depends on the shape, not on the values.

    python loadtests/random_model.py OUT_DIR

The shape is the training recipe's (serve_app.train.train.TrainConfig), initialised and exported
exactly as training does (bf16 safetensors + the shipped tokenizer files), so the server cannot
tell it from the trained model except by its answers.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tokenizers import Tokenizer

from serve_app.config import default_model_dir
from serve_app.train.tokenizer_rules import EOS
from serve_app.train.train import TrainConfig, build_model, export


def build_random_default_model(out_dir: Path, seed: int = 0) -> Path:
    tokenizer_dir = Path(default_model_dir())
    eos_id = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).token_to_id(EOS)
    model = build_model(TrainConfig(seed=seed), eos_id)
    return export(model, Path(out_dir), tokenizer_dir)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    path = build_random_default_model(args.out_dir, args.seed)
    print(f"random-weight default-shape model in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
