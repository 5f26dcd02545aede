"""Held-out evaluation of a checkpoint directory (model + tokenizer), written to ``eval_report.json``.

    python -m serve_app.train.evaluate serve_app/default_model --out serve_app/default_model/eval_report.json

What is measured, all on the held-out files of ``corpus.load_split`` (never trained on):

* **loss / perplexity**: next-token cross-entropy on held-out training-style samples (plain windows
  and FIM samples, reported together and apart), real tokens only;
* **next-line exact match**: ``data.build_eval_set`` next-line cases, greedy, stop at "\\n";
  the completion must equal the target line character for character;
* **FIM exact match** on its FIM cases (PSM prompt from ``CodeTokenizer.build_fim_prompt_ids``,
  greedy, stop at eos; part ``fim_spm``: the same cases with SPM prompts, for checkpoints trained
  on both orders; ``fim_defaults`` uses the checkpoint's own ``fim_order``, as the server does) and **syntactic validity**: share of completions with which the *whole file*
  (untrimmed prefix + completion + suffix) parses. Deleting the hole is the reference point:
  ``parse_rate_empty_middle`` says how often that alone parses, and ``parse_rate_nonempty`` counts
  only completions with code in them (an empty completion cannot pass for a fill);
* **edit similarity** (next line and FIM): ``difflib`` ratio between completion and target, 0..1
  (the graded measure code-completion benchmarks report beside exact match: it moves long before
  exact match does);
* FIM again **with the checkpoint's sampling defaults** (``generation_config.json`` penalties, as
  the server applies them) and over a **frequency-penalty sweep** (parts ``fim_defaults`` and
  ``fim_sweep``);
* **expert load**: share of the top-k routing slots each expert gets per layer, on held-out text;
* **latency** on this machine, batch 1 through the engine: a cold (no prefix cache) prefill of
  ``latency_prompt_tokens`` tokens and the mean time per decoded token after it.

Generation goes through ``serve_app.LLM`` (the serving engine), so these are the served numbers.
Prompts are trimmed at line starts to fit the model's window (as an editor plugin would), keeping
at least three quarters of the budget for the prefix, as in training.
"""
from __future__ import annotations

import argparse
import ast
import difflib
import functools
import itertools
import json
import math
import os
import platform
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from serve_app.api.settings import GenerationDefaults
from serve_app.engine.llm import LLM
from serve_app.engine.sampling_params import SamplingParams
from serve_app.model import load_model
from serve_app.tokenizer import CodeTokenizer
from serve_app.train.corpus import SourceFile, load_split
from serve_app.train.data import DataConfig, EvalConfig, build_eval_set, iter_training_samples
from serve_app.train.spans import split_at_span
from serve_app.train.samples import SampleTensors
from serve_app.train.train import count_params, lm_loss


@dataclass(frozen=True)
class EvalOptions:
    """How much to evaluate; defaults take a few minutes on 2 CPU cores for the default model."""

    num_next_line: int = 200
    num_fim: int = 200
    heldout_rows: int = 128            # held-out samples for loss and expert load
    next_line_max_tokens: int = 48     # one line of code
    fim_max_tokens: int = 128          # = DataConfig.max_middle_tokens: longer holes were never trained
    latency_prompt_tokens: int = 700
    latency_decode_tokens: int = 32
    latency_repeats: int = 5
    num_examples: int = 3              # FIM completions copied into the report for a reader
    fim_frequency_penalty: float = 0.0  # OpenAI frequency_penalty for the FIM completions (0 = plain greedy)
    # frequency penalties of the ``fim_sweep`` part; "0.5s": the same penalty skipping whitespace and
    # punctuation tokens (SamplingParams.penalty_skips_structural)
    fim_penalty_sweep: str = "0.5,1.0,1.5,2.0,0.5s,1.0s,1.5s,2.0s"


# --- prompt fitting --------------------------------------------------------------------------


class Budget:
    """Counts tokens per line (batch-encoded once) to trim text at line starts."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer

    def line_counts(self, text: str) -> tuple[list[str], list[int]]:
        lines = text.splitlines(keepends=True)
        return lines, [len(e.ids) for e in self.tok.encode_batch(lines, add_special_tokens=False)] if lines else []

    def tail(self, text: str, budget: int) -> str:
        """The last whole lines of ``text`` whose tokens fit ``budget``."""
        lines, counts = self.line_counts(text)
        used, keep = 0, len(lines)
        while keep and used + counts[keep - 1] <= budget:
            keep, used = keep - 1, used + counts[keep - 1]
        return "".join(lines[keep:])

    def head(self, text: str, budget: int) -> str:
        """The first whole lines of ``text`` whose tokens fit ``budget``."""
        lines, counts = self.line_counts(text)
        used, keep = 0, 0
        while keep < len(lines) and used + counts[keep] <= budget:
            used, keep = used + counts[keep], keep + 1
        return "".join(lines[:keep])

    def count(self, text: str) -> int:
        return sum(self.line_counts(text)[1])


def fim_prompt_parts(budget: Budget, prefix: str, suffix: str, tokens: int) -> tuple[str, str]:
    """Prefix/suffix trimmed to ``tokens`` together; the prefix keeps >= 3/4 when both do not fit."""
    suffix_tokens = budget.count(budget.head(suffix, tokens))
    prefix_budget = max(tokens - suffix_tokens, tokens * 3 // 4)
    kept_prefix = budget.tail(prefix, prefix_budget)
    return kept_prefix, budget.head(suffix, tokens - budget.count(kept_prefix))


def _parses(source: str) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ast.parse(source)
        return True
    except (SyntaxError, ValueError):
        return False


def edit_similarity(completion: str | None, target: str) -> float:
    """0..1, 1 = equal: difflib's 2*matches/total over characters (no completion scores 0)."""
    if completion is None:
        return 0.0
    return difflib.SequenceMatcher(None, completion, target, autojunk=False).ratio()


# --- the measurements ------------------------------------------------------------------------


@torch.no_grad()
def heldout_metrics(model, data: SampleTensors, tok: Tokenizer, batch: int = 8) -> dict:
    """Loss/perplexity (all, plain, FIM), loss per character, and per-layer expert shares on
    held-out samples. Loss per token depends on the tokenizer; loss per character (nats over the
    characters of the predicted tokens) compares models whose tokenizers differ."""
    cfg = model.config
    sums = {"all": [0.0, 0], "plain": [0.0, 0], "fim": [0.0, 0]}
    chars = 0
    counts = torch.zeros(len(cfg.moe_layers), cfg.num_experts)          # [layers, E]
    for start in range(0, len(data), batch):
        ids, n = data.input_ids[start:start + batch], data.num_tokens[start:start + batch]
        fim = data.is_fim[start:start + batch]
        ids = ids[:, :int(n.max())]
        out = model.forward_train(ids)
        for row in range(ids.shape[0]):
            loss = lm_loss(out.logits[row:row + 1], ids[row:row + 1], n[row:row + 1]).item()
            tokens = int(n[row]) - 1
            chars += len(tok.decode(ids[row, 1:int(n[row])].tolist(), skip_special_tokens=True))
            for key in ("all", "fim" if fim[row] else "plain"):
                sums[key][0] += loss * tokens
                sums[key][1] += tokens
        real = (torch.arange(ids.shape[1])[None, :] < n[:, None]).flatten()  # [B*S]
        for layer, logits in enumerate(out.router_logits):             # [B*S, E]
            chosen = torch.topk(logits[real], cfg.top_k, dim=-1).indices
            counts[layer] += torch.bincount(chosen.flatten(), minlength=cfg.num_experts).float()
    losses = {k: s / c if c else None for k, (s, c) in sums.items()}
    shares = counts / counts.sum(-1, keepdim=True)                      # [layers, E]
    return {
        "loss": round(losses["all"], 4), "perplexity": round(math.exp(losses["all"]), 3),
        "loss_plain": losses["plain"] and round(losses["plain"], 4),
        "loss_fim": losses["fim"] and round(losses["fim"], 4),
        "nats_per_char": round(sums["all"][0] / max(chars, 1), 4),
        "rows": len(data), "tokens": sums["all"][1], "chars": chars,
        "expert_load": {
            "share_per_layer": [[round(x, 4) for x in row] for row in shares.tolist()],
            # 1.0 = perfectly even; E = every token to one expert
            "max_share_times_experts": round(float(shares.max() * cfg.num_experts), 3),
            "min_share_times_experts": round(float(shares.min() * cfg.num_experts), 3),
        },
    }


class Generator:
    """Greedy generation through the engine in chunks. A chunk the engine cannot finish (seen:
    "engine made no progress" on a large offline batch) is retried one prompt at a time on a fresh
    engine; a prompt that still fails yields no completion and is counted in ``engine_errors``."""

    def __init__(self, model, tokenizer: CodeTokenizer, chunk: int = 16):
        self.model, self.tokenizer, self.chunk = model, tokenizer, chunk
        self.engine_errors = 0
        self.llm = self._new_llm()

    def _new_llm(self) -> LLM:
        return LLM(self.model, tokenizer=self.tokenizer, enable_prefix_caching=False)

    def texts(self, prompts: list, params: SamplingParams) -> list[str | None]:
        out: list[str | None] = []
        for start in range(0, len(prompts), self.chunk):
            part = prompts[start:start + self.chunk]
            try:
                out.extend(o.outputs[0].text for o in self.llm.generate(part, params))
            except RuntimeError:
                self.llm = self._new_llm()
                out.extend(self._one_by_one(part, params))
        return out

    def _one_by_one(self, prompts: list, params: SamplingParams) -> list[str | None]:
        out: list[str | None] = []
        for prompt in prompts:
            try:
                out.append(self.llm.generate([prompt], params)[0].outputs[0].text)
            except RuntimeError:
                self.engine_errors += 1
                self.llm = self._new_llm()
                out.append(None)
        return out


def next_line_metrics(llm: "Generator", budget: Budget, cases, window: int, opts: EvalOptions) -> dict:
    prompts = [budget.tail(c.prefix, window - opts.next_line_max_tokens - 8) for c in cases]
    params = SamplingParams(temperature=0.0, max_tokens=opts.next_line_max_tokens, stop=["\n"])
    errors_before = llm.engine_errors
    texts = llm.texts(prompts, params)
    exact = sum(t == c.target for t, c in zip(texts, cases))
    loose = sum(t is not None and t.rstrip() == c.target.rstrip() for t, c in zip(texts, cases))
    similarity = sum(edit_similarity(t, c.target) for t, c in zip(texts, cases))
    return {"cases": len(cases), "exact_match": round(exact / max(len(cases), 1), 4),
            "exact_match_ignoring_trailing_space": round(loose / max(len(cases), 1), 4),
            "edit_similarity": round(similarity / max(len(cases), 1), 4),
            "engine_errors": llm.engine_errors - errors_before}


def fim_metrics(llm: "Generator", code_tok: CodeTokenizer, budget: Budget, cases, files: dict, window: int,
                opts: EvalOptions, penalties: GenerationDefaults, order: str | None = None) -> dict:
    """FIM scores with prompts in ``order`` ("psm"/"spm"; None: the checkpoint's ``fim_order``)."""
    order = order or code_tok.fim_order
    prompt_tokens = window - opts.fim_max_tokens - 8                    # 3 FIM tokens + slack
    prompts = [code_tok.build_fim_prompt_ids(*fim_prompt_parts(budget, c.prefix, c.suffix, prompt_tokens),
                                             order=order)
               for c in cases]
    errors_before = llm.engine_errors
    texts = llm.texts(prompts, SamplingParams(temperature=0.0, max_tokens=opts.fim_max_tokens,
                                              frequency_penalty=penalties.frequency_penalty,
                                              presence_penalty=penalties.presence_penalty,
                                              penalty_skips_structural=penalties.penalty_skips_structural))
    exact = parses = nonempty_parses = empty_parses = 0
    similarity = 0.0
    examples = []
    for case, text in zip(cases, texts):
        full = split_at_span(files[case.rel_name], case.span)          # untrimmed: the whole file
        empty_parses += _parses(full.prefix + full.suffix)
        similarity += edit_similarity(text, case.middle)
        if text is None:                                                # the engine failed it: a miss
            continue
        exact += text.rstrip("\n") == case.middle.rstrip("\n")
        parsed = _parses(full.prefix + text + full.suffix)
        parses += parsed
        nonempty_parses += parsed and bool(text.strip())
        if len(examples) < opts.num_examples and case.span.num_lines <= 3:
            examples.append({"file": case.rel_name, "line": case.span.start_line + 1,
                             "expected": case.middle, "completion": text})
    n = max(len(cases), 1)
    return {"cases": len(cases), "order": order, "frequency_penalty": penalties.frequency_penalty,
            "penalty_skips_structural": penalties.penalty_skips_structural,
            "presence_penalty": penalties.presence_penalty,
            "exact_match": round(exact / n, 4), "edit_similarity": round(similarity / n, 4),
            "parse_rate": round(parses / n, 4), "parse_rate_nonempty": round(nonempty_parses / n, 4),
            "parse_rate_empty_middle": round(empty_parses / n, 4), "engine_errors": llm.engine_errors - errors_before,
            "examples": examples}


def latency_metrics(llm: LLM, prompt_ids: list[int], opts: EvalOptions) -> dict:
    """Batch 1, no prefix cache: prefill = time to the first token; decode = extra time per token.

    Wall time and this process's CPU time are both reported: on a machine shared with other jobs
    wall time mostly measures the neighbours; CPU time / threads is what an idle machine would show."""
    first = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    more = SamplingParams(temperature=0.0, max_tokens=1 + opts.latency_decode_tokens, ignore_eos=True)
    llm.generate([prompt_ids], more)                                    # warm-up
    samples: dict[str, list[float]] = {"prefill": [], "decode": [], "prefill_cpu": [], "decode_cpu": []}
    for _ in range(opts.latency_repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        llm.generate([prompt_ids], first)
        w1, c1 = time.perf_counter(), time.process_time()
        llm.generate([prompt_ids], more)
        w2, c2 = time.perf_counter(), time.process_time()
        samples["prefill"].append(w1 - w0)
        samples["prefill_cpu"].append(c1 - c0)
        samples["decode"].append(((w2 - w1) - (w1 - w0)) / opts.latency_decode_tokens)
        samples["decode_cpu"].append(((c2 - c1) - (c1 - c0)) / opts.latency_decode_tokens)
    ms = {k: 1000 * statistics.median(v) for k, v in samples.items()}
    return {"prompt_tokens": len(prompt_ids), "prefill_ms": round(ms["prefill"], 1),
            "decode_ms_per_token": round(ms["decode"], 2), "prefill_cpu_ms": round(ms["prefill_cpu"], 1),
            "decode_cpu_ms_per_token": round(ms["decode_cpu"], 2), "threads": torch.get_num_threads(),
            "load_average_1min": round(os.getloadavg()[0], 1), "dtype": "float32",
            "repeats": opts.latency_repeats}


def latency_only(model_dir: Path, opts: EvalOptions) -> dict:
    """Just the latency numbers (no corpus parsing): for size comparisons."""
    model = load_model(model_dir, dtype=torch.float32)
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    text = (Path(__file__).resolve().parent / "data.py").read_text() * 4  # any long Python source
    prompt = tok.encode(text, add_special_tokens=False).ids[:opts.latency_prompt_tokens]
    llm = LLM(model, tokenizer=CodeTokenizer.from_dir(model_dir), enable_prefix_caching=False)
    return {"params": count_params(model), "latency": latency_metrics(llm, prompt, opts)}


PARTS = ("heldout", "next_line", "fim", "fim_spm", "fim_defaults", "fim_sweep", "latency")


def heldout_files(cache: Path | None) -> list[SourceFile]:
    """The held-out split; ``cache`` (JSON) spares re-reading and parsing the whole stdlib
    (minutes of CPU on a shared machine) when several evaluations run."""
    if cache is not None and cache.is_file():
        return [SourceFile(Path(f["rel_name"]), f["rel_name"], f["text"]) for f in json.loads(cache.read_text())]
    files = load_split().heldout
    if cache is not None:
        cache.write_text(json.dumps([{"rel_name": f.rel_name, "text": f.text} for f in files]))
    return files


def evaluate(model_dir: Path, opts: EvalOptions, parts: tuple[str, ...] = PARTS,
             files_cache: Path | None = None) -> dict:
    """The measurements named in ``parts`` (separate processes can each run some, then ``--merge``)."""
    started = time.perf_counter()
    model = load_model(model_dir, dtype=torch.float32)
    window = model.config.max_position_embeddings
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    code_tok, budget = CodeTokenizer.from_dir(model_dir), Budget(tok)
    heldout = heldout_files(files_cache)
    report: dict = {"model_dir": model_dir.name, "params": count_params(model)}
    if "heldout" in parts:
        samples = list(itertools.islice(iter_training_samples(heldout, tok, DataConfig(max_len=window, seed=0)),
                                        opts.heldout_rows))
        report["heldout"] = heldout_metrics(model, SampleTensors.from_samples(samples), tok)
    eval_set = build_eval_set(heldout, EvalConfig(num_next_line=opts.num_next_line, num_fim=opts.num_fim))
    llm = Generator(model, code_tok)
    if "next_line" in parts:
        report["next_line"] = next_line_metrics(llm, budget, eval_set.next_line, window, opts)
    files = {f.rel_name: f.text for f in heldout}
    fim = functools.partial(fim_metrics, llm, code_tok, budget, eval_set.fim, files, window, opts)
    if "fim" in parts:                                                  # PSM: comparable across releases
        report["fim"] = fim(GenerationDefaults(frequency_penalty=opts.fim_frequency_penalty), "psm")
    if "fim_spm" in parts:
        report["fim_spm"] = fim(GenerationDefaults(frequency_penalty=opts.fim_frequency_penalty), "spm")
    if "fim_defaults" in parts:                                         # what the server does by default
        report["fim_with_shipped_defaults"] = fim(GenerationDefaults.from_model_dir(model_dir))
    if "fim_sweep" in parts:
        report["fim_frequency_penalty_sweep"] = {
            p: {k: v for k, v in fim(GenerationDefaults(frequency_penalty=float(p.rstrip("s")),
                                                       penalty_skips_structural=p.endswith("s"))).items()
                if k != "examples"}
            for p in opts.fim_penalty_sweep.split(",") if p}
    if "latency" in parts:
        longest = max(heldout, key=lambda f: len(f.text))
        prompt = tok.encode(longest.text, add_special_tokens=False).ids[:opts.latency_prompt_tokens]
        report["latency"] = latency_metrics(LLM(model, tokenizer=code_tok, enable_prefix_caching=False), prompt, opts)
    report["setup"] = {"heldout_files": len(heldout), "python": platform.python_version(),
                       "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
                       "torch": torch.__version__, "options": asdict(opts),
                       "eval_seconds": {"+".join(parts): round(time.perf_counter() - started, 1)}}
    return report


def merge_reports(paths: list[Path]) -> dict:
    """One report from partial ones (each ran some parts); setup.eval_seconds keeps every part's time."""
    merged: dict = {}
    for path in paths:
        part = json.loads(path.read_text())
        seconds = {**merged.get("setup", {}).get("eval_seconds", {}), **part["setup"]["eval_seconds"]}
        merged.update(part)
        merged["setup"]["eval_seconds"] = seconds
    return merged


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--out", type=Path, help="default: <model_dir>/eval_report.json")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    parser.add_argument("--files-cache", type=Path, help="JSON cache of the held-out files")
    parser.add_argument("--merge", type=Path, nargs="+", help="merge these partial reports into --out")
    parser.add_argument("--latency-only", action="store_true", help="skip quality metrics (size comparisons)")
    for field, default in asdict(EvalOptions()).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(default), default=default)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    opts = EvalOptions(**{k: getattr(args, k) for k in asdict(EvalOptions())})
    parts = tuple(p for p in args.parts.split(",") if p)
    if unknown := set(parts) - set(PARTS):
        raise SystemExit(f"--parts: unknown {sorted(unknown)}; choose from {PARTS}")
    if args.merge:
        report = merge_reports(args.merge)
    elif args.latency_only:
        report = latency_only(args.model_dir, opts)
    else:
        report = evaluate(args.model_dir, opts, parts, args.files_cache)
    out = args.out or args.model_dir / "eval_report.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "fim"}, indent=1)[:3000])
    if "fim" in report:
        print(json.dumps({k: v for k, v in report["fim"].items() if k != "examples"}))


if __name__ == "__main__":
    main()
