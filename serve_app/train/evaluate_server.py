"""FIM on held-out functions *through a running server*: the share of completions that parse.

    moe-serve &                                    # the bundled default model
    python -m serve_app.train.evaluate_server --url http://127.0.0.1:8000 --out /tmp/fim_server.json

The same FIM cases as ``evaluate.py`` (held-out stdlib files, one statement or block cut out of a
function), each sent as an editor would: ``POST /v1/fim/completions`` with the prefix and suffix
trimmed at line starts to the model's window, greedy, ``precision`` left to the server (``auto``:
the complexity classifier picks the tier and INT4/INT8/full), one request at a time. A completion
counts as valid when the *whole* file (untrimmed prefix + completion + suffix) parses; deleting the
hole instead is the reference point, as in ``evaluate.py``, which also defines the other measures
(``parse_rate_nonempty``, ``edit_similarity``). Per tier and precision the counts and
latencies are reported too, since each tier runs different numerics.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
from tokenizers import Tokenizer

from serve_app.config import default_model_dir
from serve_app.model import ModelConfig
from serve_app.train.data import EvalConfig, FimCase, build_eval_set
from serve_app.train.evaluate import Budget, _parses, edit_similarity, fim_prompt_parts, heldout_files
from serve_app.train.spans import split_at_span


@dataclass(frozen=True)
class FimCases:
    """Held-out FIM cases with the prompt parts an editor would send (trimmed to the window)."""

    cases: list[FimCase]
    prompts: list[tuple[str, str]]      # (prefix, suffix) per case
    files: dict[str, str]               # rel_name -> whole file text, for the parse check


def load_cases(model_dir: Path, num_fim: int, max_tokens: int, files_cache: Path | None = None,
               limit: int | None = None) -> FimCases:
    heldout = heldout_files(files_cache)
    cases = build_eval_set(heldout, EvalConfig(num_fim=num_fim)).fim[:limit]
    budget = Budget(Tokenizer.from_file(str(model_dir / "tokenizer.json")))
    prompt_tokens = ModelConfig.from_dir(model_dir).max_position_embeddings - max_tokens - 8  # 3 FIM tokens + slack
    prompts = [fim_prompt_parts(budget, c.prefix, c.suffix, prompt_tokens) for c in cases]
    return FimCases(cases, prompts, {f.rel_name: f.text for f in heldout})


def run(url: str, fim: FimCases, max_tokens: int, precision: str = "auto", timeout_s: float = 120.0,
        frequency_penalty: float | None = None) -> dict:
    """``frequency_penalty`` None: requests leave it out, so the server applies the checkpoint's
    default (``generation_config.json``), as an editor's requests would."""
    parses = nonempty_parses = empty_parses = exact = 0
    similarity = 0.0
    statuses, tiers, latencies = Counter(), Counter(), []
    completions: list[str | None] = []
    with httpx.Client(timeout=timeout_s) as client:
        for case, (prefix, suffix) in zip(fim.cases, fim.prompts):
            body = {"prefix": prefix, "suffix": suffix, "max_tokens": max_tokens, "temperature": 0.0,
                    "precision": precision}
            if frequency_penalty is not None:
                body["frequency_penalty"] = frequency_penalty
            started = time.perf_counter()
            resp = client.post(f"{url}/v1/fim/completions", json=body)
            latencies.append(time.perf_counter() - started)
            statuses[resp.status_code] += 1
            full = split_at_span(fim.files[case.rel_name], case.span)   # untrimmed: the whole file
            empty_parses += _parses(full.prefix + full.suffix)
            if resp.status_code != 200:
                completions.append(None)
                continue
            out = resp.json()
            text = out["completion"]
            completions.append(text)
            tiers[f"{out['tier']}/{out['precision']}"] += 1
            parsed = _parses(full.prefix + text + full.suffix)
            parses += parsed
            nonempty_parses += parsed and bool(text.strip())
            exact += text.rstrip("\n") == case.middle.rstrip("\n")
            similarity += edit_similarity(text, case.middle)
    n = max(len(fim.cases), 1)
    ms = sorted(1000 * s for s in latencies) or [0.0]
    return {"url": url, "cases": len(fim.cases), "parse_rate": round(parses / n, 4),
            "parse_rate_nonempty": round(nonempty_parses / n, 4),
            "parse_rate_empty_middle": round(empty_parses / n, 4), "exact_match": round(exact / n, 4),
            "edit_similarity": round(similarity / n, 4),
            "statuses": dict(statuses), "tier_precision": dict(tiers), "max_tokens": max_tokens,
            "precision": precision, "frequency_penalty": frequency_penalty,
            "latency_ms": {"p50": round(statistics.median(ms), 1), "p80": round(ms[int(0.8 * (len(ms) - 1))], 1),
                           "max": round(ms[-1], 1)},
            "completions": completions}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--model-dir", type=Path, default=Path(default_model_dir()),
                        help="the served checkpoint's directory (its tokenizer trims the prompts)")
    parser.add_argument("--num-fim", type=int, default=EvalConfig.num_fim, help="cases drawn (same draw as evaluate.py)")
    parser.add_argument("--limit", type=int, help="send only the first N cases")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--precision", default="auto", choices=("auto", "full", "int8", "int4"))
    parser.add_argument("--frequency-penalty", type=float,
                        help="sent with every request; default: left out (the server applies the model's default)")
    parser.add_argument("--files-cache", type=Path, help="JSON cache of the held-out files")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    fim = load_cases(args.model_dir, args.num_fim, args.max_tokens, args.files_cache, args.limit)
    report = run(args.url.rstrip("/"), fim, args.max_tokens, args.precision,
                 frequency_penalty=args.frequency_penalty)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "completions"}))


if __name__ == "__main__":
    main()
