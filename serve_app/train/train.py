"""Train the bundled default model (a small Mixtral-layout MoE) on the stdlib corpus.

    python -m serve_app.train.train --run-dir /tmp/moe-run --export serve_app/default_model \
        --time-budget-min 60
    python -m serve_app.train.train --run-dir /tmp/moe-run --resume   # continue after a crash
    python -m serve_app.train.train --run-dir /tmp/moe-run2 --init-from /tmp/moe-run/checkpoint.pt \
        --lr 1e-3 --time-budget-min 90                                 # more training: a new schedule

The run dir (never the repo) holds the pre-tokenized samples (``samples.pt``: tokenized once,
keyed by tokenizer + data config; cache and batch order live in ``serve_app.train.samples``),
``checkpoint.pt`` (model, optimizer, step, data cursor, RNG; written atomically every
``--checkpoint-every`` steps) and ``log.jsonl`` (one line per log step).

Recipe: next-token cross-entropy on real tokens only (positions >= ``num_tokens`` are padding)
plus the Switch/Mixtral load-balancing loss ``E * sum_i f_i * P_i`` over real tokens, AdamW,
linear warmup then cosine decay to ``min_lr_ratio * lr``, global-norm gradient clipping. Sample
order is a seeded permutation per epoch, so (epoch, cursor) is the whole data position.

``--time-budget-min`` fixes the step count after a few probe steps (mean step time → steps that
fit); the count is stored in the checkpoint, so the schedule, and a resumed run, stay
deterministic afterwards. Probe steps sit inside the warmup, which does not depend on it.

Legend: B=batch, S=sequence length (max_len), V=vocab, E=experts, K=top-k, N=samples.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from serve_app.model.saver import save_model
from serve_app.model.kernels import has_bf16_units
from serve_app.model.transformer import MoeForCausalLM
from serve_app.train.checkpoints import load_checkpoint, save_checkpoint, warm_start, warm_start_config
from serve_app.train.data import DataConfig
from serve_app.train.recipe import TrainConfig, TrainState
from serve_app.train.samples import SampleTensors, next_batch, prepare_samples, samples_key
from serve_app.train.tokenizer_rules import EOS

DEFAULT_TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "default_model"


# --- model -----------------------------------------------------------------------------------


def init_weights(model: MoeForCausalLM, std: float = 0.02) -> None:
    """Every matrix normal(std), residual output projections std/sqrt(2L) (GPT-2), norms 1.

    Needed: ``MoeForCausalLM`` creates the expert weights with ``torch.empty``."""
    out_std = std / math.sqrt(2 * model.config.num_layers)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() < 2:
                param.fill_(1.0)  # RMSNorm weights: the only vectors in a Mixtral layout
            elif name.endswith(("o_proj.weight", ".down")):
                param.normal_(0.0, out_std)
            else:
                param.normal_(0.0, std)


def build_model(cfg: TrainConfig, eos_id: int) -> MoeForCausalLM:
    torch.manual_seed(cfg.seed)
    model = MoeForCausalLM(cfg.model_config(eos_id))
    init_weights(model)
    return model


def count_params(model: MoeForCausalLM) -> dict[str, int]:
    """Total and per-token active parameters (top-k of E experts; the tied embedding counted once)."""
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for p in model.local_experts.parameters())
    active = total - experts + experts * cfg.top_k // cfg.num_experts
    return {"total": total, "active": active, "embedding": model.embed_tokens.weight.numel()}


def load_exported_weights(model: MoeForCausalLM, model_dir: Path) -> None:
    """Copy an exported checkpoint's weights (read in float32) into ``model``; shapes must match."""
    from serve_app.model.loader import load_model

    try:
        model.load_state_dict(load_model(model_dir, dtype=torch.float32).state_dict())
    except RuntimeError as exc:          # missing, unexpected or differently shaped tensors
        raise SystemExit(f"--init-weights {model_dir}: the checkpoint's shape differs from the recipe's: "
                         f"{str(exc)[:300]}") from exc


# --- loss ------------------------------------------------------------------------------------


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over targets that are real tokens (pad targets ignored)."""
    targets = input_ids[:, 1:].clone()                                   # [B, S-1]
    positions = torch.arange(1, input_ids.shape[1], device=input_ids.device)
    targets[positions[None, :] >= num_tokens[:, None]] = -100
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


def load_balance_loss(router_logits: list[torch.Tensor], real: torch.Tensor, top_k: int) -> torch.Tensor:
    """E * sum_i f_i * P_i averaged over layers; f_i = share of the T*K slots routed to expert i,
    P_i = mean router probability of i, both over real tokens only. 1.0 when perfectly balanced."""
    losses = []
    for logits in router_logits:                                         # [B*S, E]
        probs = torch.softmax(logits[real].float(), dim=-1)              # [T, E]
        num_experts = probs.shape[-1]
        chosen = torch.topk(probs, top_k, dim=-1).indices                # [T, K]
        f = torch.bincount(chosen.flatten(), minlength=num_experts).float() / chosen.numel()  # [E]
        losses.append(num_experts * (f * probs.mean(0)).sum())
    return torch.stack(losses).mean()


@dataclass
class StepLosses:
    total: torch.Tensor   # what backward runs on
    lm: float             # next-token cross-entropy (nats/token)
    aux: float            # load-balancing loss (1.0 = balanced)


def resolve_autocast(autocast: str, device: str) -> str:
    """TrainConfig.autocast with "auto" read off the device: "bfloat16" where it has bf16 units
    (CUDA with bf16; CPUs with AVX512-BF16 or AMX), else "" (float32). Why not bf16 everywhere:
    bench/train_step.py measured 1.2-1.33x float32's tokens/s on a Zen 4 (AVX512-BF16) and 0.08x
    on a Zen 3 (AVX2 only: 149 vs 1,806 tokens/s), where every bf16 matmul is emulated."""
    if autocast != "auto":
        return autocast
    if device == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else ""
    return "bfloat16" if has_bf16_units() else ""


def autocast_to(dtype: str, device: str):
    """The forward's autocast context for a resolved TrainConfig.autocast ("" = none: float32)."""
    return torch.autocast(device, dtype=getattr(torch, dtype)) if dtype else contextlib.nullcontext()


def compute_loss(model: MoeForCausalLM, input_ids: torch.Tensor, num_tokens: torch.Tensor,
                 aux_coef: float, autocast: str = "") -> StepLosses:
    with autocast_to(autocast, input_ids.device.type):
        out = model.forward_train(input_ids)                             # logits [B, S, V]
    lm = lm_loss(out.logits, input_ids, num_tokens)
    real = (torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
            < num_tokens[:, None]).flatten()                             # [B*S]
    aux = load_balance_loss(out.router_logits, real, model.config.top_k)
    return StepLosses(lm + aux_coef * aux, lm.item(), aux.item())


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warmup to cfg.lr, then cosine to cfg.min_lr_ratio * cfg.lr at total_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: MoeForCausalLM, cfg: TrainConfig) -> torch.optim.AdamW:
    """Weight decay on matrices only (not norms); the tied embedding is one parameter."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


# --- the loop --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunOptions:
    """How one invocation runs (not part of the recipe; may differ between resumes)."""

    run_dir: Path
    resume: bool = False
    time_budget_s: float | None = None   # fix total_steps from probe steps so the run fits this
    # "wall", or "cpu" (process time): equal-compute comparisons on a machine shared with other jobs
    budget_clock: str = "wall"
    probe_steps: int = 5
    checkpoint_every: int = 50
    log_every: int = 10
    eval_rows: int = 32                  # held-out rows scored at each log step (0 = none)
    stop_after: int | None = None        # stop (checkpointed) at this step: tests interrupt runs here
    init_from: Path | None = None        # a finished run's checkpoint.pt to warm-start from
    # An exported model dir (config.json + model.safetensors) to start from: weights only (the
    # repository holds no optimizer state), so a fresh AdamW under the recipe's warmup.
    init_weights: Path | None = None


@torch.no_grad()
def heldout_loss(model: MoeForCausalLM, data: SampleTensors, rows: int, batch: int = 8) -> float:
    """Token-weighted mean next-token loss over the first ``rows`` held-out samples."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, min(rows, len(data)), batch):
        ids, n = data.input_ids[start:start + batch], data.num_tokens[start:start + batch]
        ids = ids[:, :int(n.max())].to(model.embed_tokens.weight.device)
        tokens = int((n - 1).clamp(min=0).sum())
        total += lm_loss(model(ids), ids, n.to(ids.device)).item() * tokens
        count += tokens
    model.train()
    return total / max(count, 1)


def fit_to_budget(state: TrainState, opts: RunOptions, timed_from: tuple[int, float]) -> None:
    """Set total_steps so the run ends at the time budget, from the mean step time since
    ``timed_from`` (step, train_seconds): after the first step, which pays one-off costs.

    First set after the probe steps (inside the warmup, which does not depend on it), then revised
    at every log step: a machine shared with other jobs changes speed, and a cosine that ends late
    would overrun the budget. A revision bends the cosine slightly; it never ends before this step."""
    timed = state.step - timed_from[0]
    if timed < opts.probe_steps or (timed != opts.probe_steps and state.step % opts.log_every):
        return
    per_step = (state.train_seconds - timed_from[1]) / timed
    state.total_steps = max(state.step + 1, state.step + int((opts.time_budget_s - state.train_seconds) / per_step))


def train(cfg: TrainConfig, opts: RunOptions, data: SampleTensors, eos_id: int,
          heldout: SampleTensors | None = None) -> tuple[MoeForCausalLM, TrainState, list[float]]:
    """Train (or resume) in ``opts.run_dir``; returns the model, final state and each step's lm loss."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    autocast = resolve_autocast(cfg.autocast, device)
    print(f"training on {device}, autocast {cfg.autocast!r} -> {autocast or 'float32'}", flush=True)
    model = build_model(cfg, eos_id).to(device)
    opt = make_optimizer(model, cfg)
    ckpt_path = opts.run_dir / "checkpoint.pt"
    state = TrainState(total_steps=cfg.max_steps)
    if opts.resume and ckpt_path.is_file():
        state = load_checkpoint(ckpt_path, model, opt)
    elif opts.init_from is not None:
        state = warm_start(opts.init_from, model, opt, cfg.max_steps)
    elif opts.init_weights is not None:
        load_exported_weights(model, opts.init_weights)
    model.train()
    losses: list[float] = []
    started = time.perf_counter()
    timed_from = (state.step, state.train_seconds) if state.step else None  # fresh: set after step 1
    log = (opts.run_dir / "log.jsonl").open("a")
    clock = time.process_time if opts.budget_clock == "cpu" else time.perf_counter
    while state.step < state.total_steps and state.step != opts.stop_after:
        t0 = clock()
        ids, num_tokens = next_batch(data, state, cfg)
        for group in opt.param_groups:
            group["lr"] = lr_at(state.step, cfg, state.total_steps)
        step_losses = compute_loss(model, ids.to(device), num_tokens.to(device), cfg.aux_loss_coef, autocast)
        opt.zero_grad(set_to_none=True)
        step_losses.total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
        opt.step()
        state.step += 1
        state.tokens_seen += int((num_tokens - 1).clamp(min=0).sum())
        losses.append(step_losses.lm)
        if state.step % opts.log_every == 0 or state.step == state.total_steps:
            record = {"step": state.step, "total_steps": state.total_steps, "lm": round(step_losses.lm, 4),
                      "aux": round(step_losses.aux, 4), "grad_norm": round(grad_norm, 3),
                      "lr": opt.param_groups[0]["lr"], "tokens": state.tokens_seen,
                      "train_s": round(state.train_seconds, 1), "wall_s": round(time.perf_counter() - started, 1),
                      "cpu_s": round(time.process_time(), 1)}
            if heldout is not None and opts.eval_rows:
                record["heldout_lm"] = round(heldout_loss(model, heldout, opts.eval_rows), 4)
            log.write(json.dumps(record) + "\n")
            log.flush()
        if state.step % opts.checkpoint_every == 0:
            save_checkpoint(ckpt_path, model, opt, state, cfg)
        # Wall time of the whole iteration (logging and checkpoints included): the budget is wall time.
        state.train_seconds += clock() - t0
        timed_from = timed_from or (state.step, state.train_seconds)
        if opts.time_budget_s:
            fit_to_budget(state, opts, timed_from)
    save_checkpoint(ckpt_path, model, opt, state, cfg)
    log.close()
    return model, state, losses


def export(model: MoeForCausalLM, out_dir: Path, tokenizer_dir: Path, fim_order: str | None = None) -> Path:
    """bf16 HF checkpoint (config.json + model.safetensors) with the tokenizer files beside it;
    ``fim_order`` "spm" declares SPM training in tokenizer_config.json (serve_app/fim.py)."""
    save_model(model.cpu(), out_dir, dtype="bfloat16")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        src, dst = tokenizer_dir / name, out_dir / name
        if src.is_file() and not dst.exists():
            shutil.copyfile(src, dst)
    config_path = out_dir / "tokenizer_config.json"
    if fim_order and config_path.is_file():
        config = json.loads(config_path.read_text())
        config["fim_order"] = fim_order
        config_path.write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


# --- command line ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="checkpoint, log, sample cache")
    parser.add_argument("--data-dir", type=Path, help="where the tokenized sample cache lives (default: run dir)")
    parser.add_argument("--tokenizer-dir", type=Path, default=DEFAULT_TOKENIZER_DIR)
    parser.add_argument("--export", type=Path, help="write the bf16 HF checkpoint here when done")
    parser.add_argument("--resume", action="store_true", help="continue from the run dir's checkpoint")
    parser.add_argument("--init-weights", type=Path,
                        help="start from an exported model dir's weights (fresh optimizer and schedule)")
    parser.add_argument("--init-from", type=Path,
                        help="warm-start from another run's checkpoint.pt (same model shape; new schedule)")
    parser.add_argument("--time-budget-min", type=float, help="fit the step count to this training time")
    parser.add_argument("--budget-clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: count process time, for equal-compute comparisons on a shared machine")
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-rows", type=int, default=32, help="held-out rows scored at each log step")
    for field, default in asdict(TrainConfig()).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(default), default=None,
                            help=f"TrainConfig.{field} (default {default})")
    return parser.parse_args(argv)


def training_files(corpus: str):
    """(train files, held-out files, corpus id for the sample cache key, package manifest)."""
    from serve_app.train.corpus import load_split  # heavy: only on a sample-cache miss
    from serve_app.train.mixture import load_mixture

    if corpus == "stdlib":
        split = load_split()
        return split.train, split.heldout, []
    if corpus == "stdlib+packages":
        mix = load_mixture()
        return mix.train, mix.heldout, mix.packages
    raise SystemExit(f"unknown corpus {corpus!r}: stdlib or stdlib+packages")


def corpus_id(corpus: str) -> str:
    """What the corpus is on this machine, cheaply: the installed distributions for packages."""
    if corpus == "stdlib":
        return corpus
    import importlib.metadata as md
    from serve_app.train.packages import PackageConfig

    dists = sorted(f"{d.metadata['Name']}=={d.version}" for d in md.distributions())
    return json.dumps([corpus, dists, asdict(PackageConfig())])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = args.run_dir / "checkpoint.pt"
    overrides = {k: getattr(args, k) for k in asdict(TrainConfig()) if getattr(args, k) is not None}
    if args.resume and ckpt.is_file():  # the recipe of a resumed run is the checkpoint's
        cfg = TrainConfig(**torch.load(ckpt, weights_only=False)["config"])
    elif args.init_from:  # the shape and data recipe are the old run's; optimisation may change
        cfg = warm_start_config(TrainConfig(**torch.load(args.init_from, weights_only=False)["config"]), overrides)
    else:
        cfg = replace(TrainConfig(), **overrides)
    tok_path = args.tokenizer_dir / "tokenizer.json"
    eos_id = Tokenizer.from_file(str(tok_path)).token_to_id(EOS)
    data_cfg = DataConfig(max_len=cfg.max_len, fim_rate=cfg.fim_rate, spm_rate=cfg.spm_rate, seed=cfg.seed)
    # The held-out probe keeps the earlier releases' PSM-only samples: one curve across releases.
    heldout_cfg = replace(data_cfg, spm_rate=0.0)
    files = functools.cache(lambda: training_files(cfg.corpus))
    data_dir = args.data_dir or args.run_dir
    t0 = time.perf_counter()
    data = prepare_samples(data_dir / "train_samples.pt", lambda: files()[0], tok_path, data_cfg,
                           samples_key(tok_path, data_cfg, "train", None, corpus_id(cfg.corpus)))
    heldout = prepare_samples(data_dir / "heldout_samples.pt", lambda: files()[1], tok_path, heldout_cfg,
                              samples_key(tok_path, heldout_cfg, "heldout", 256), max_samples=256)
    print(f"samples: train {len(data)} heldout {len(heldout)} ({time.perf_counter() - t0:.0f}s)", flush=True)
    if cfg.corpus != "stdlib" and not (args.run_dir / "packages.json").is_file():
        manifest = [asdict(p) for p in files()[2]]
        (args.run_dir / "packages.json").write_text(json.dumps(manifest, indent=1) + "\n")
    opts = RunOptions(args.run_dir, resume=args.resume, init_from=args.init_from, init_weights=args.init_weights,
                      checkpoint_every=args.checkpoint_every, log_every=args.log_every, eval_rows=args.eval_rows,
                      budget_clock=args.budget_clock,
                      time_budget_s=args.time_budget_min * 60 if args.time_budget_min else None)
    model, state, _ = train(cfg, opts, data, eos_id, heldout)
    summary = {"config": asdict(cfg), "params": count_params(model), "state": asdict(state),
               "train_samples": len(data), "train_tokens_available": int(data.num_tokens.sum()),
               "heldout_lm": heldout_loss(model, heldout, 32), "heldout_rows": 32}
    (args.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary), flush=True)
    if args.export:
        export(model, args.export, args.tokenizer_dir, fim_order="spm" if cfg.spm_rate > 0 else None)


if __name__ == "__main__":
    main()
