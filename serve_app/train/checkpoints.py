"""Training checkpoints: save and resume exactly, or warm-start a finished run under a new schedule."""
from __future__ import annotations

import random
from dataclasses import asdict, replace
from pathlib import Path

import torch

from serve_app.model.transformer import MoeForCausalLM
from serve_app.train.recipe import TrainConfig, TrainState
from serve_app.train.samples import atomic_save


def save_checkpoint(path: Path, model: MoeForCausalLM, opt: torch.optim.Optimizer, state: TrainState,
                    cfg: TrainConfig) -> None:
    atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "state": asdict(state),
                 "config": asdict(cfg), "torch_rng": torch.get_rng_state(),
                 "python_rng": random.getstate()}, path)


def load_checkpoint(path: Path, model: MoeForCausalLM, opt: torch.optim.Optimizer) -> TrainState:
    ckpt = torch.load(path, weights_only=False)  # our own file: holds Python RNG state
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["torch_rng"])
    random.setstate(ckpt["python_rng"])
    return TrainState(**ckpt["state"])


def warm_start(path: Path, model: MoeForCausalLM, opt: torch.optim.Optimizer, total_steps: int) -> TrainState:
    """Continue a finished run under a new schedule (a warm restart: warmup, then a new cosine).

    Weights and Adam moments carry over, and so do the data position and token count, so the new
    run reads the samples the old one had not reached yet instead of starting the epoch-0 order
    again; the step count, schedule length and clock start from zero. The optimizer's settings are
    the new recipe's (loading its state would bring back the old weight decay)."""
    settings = [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
    old = load_checkpoint(path, model, opt)
    for group, new in zip(opt.param_groups, settings):
        group.update(new)
    return TrainState(epoch=old.epoch, cursor=old.cursor, tokens_seen=old.tokens_seen, total_steps=total_steps)


# Fields a warm start may change: those of the optimisation, not of the model or the data.
WARM_START_FIELDS = frozenset({"batch_size", "lr", "min_lr_ratio", "warmup_steps", "max_steps", "weight_decay",
                               "grad_clip", "aux_loss_coef", "autocast"})


def warm_start_config(old: TrainConfig, overrides: dict) -> TrainConfig:
    """The old run's recipe with new optimisation settings; changing anything else is refused
    (the weights would not fit a new shape, and a new data recipe would invalidate the cursor)."""
    fixed = {k: v for k, v in overrides.items() if k not in WARM_START_FIELDS and v != getattr(old, k)}
    if fixed:
        raise SystemExit(f"--init-from keeps the old run's {', '.join(sorted(fixed))}; drop those options")
    return replace(old, **overrides)
