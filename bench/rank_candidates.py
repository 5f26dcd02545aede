"""Which best-of-3 ranking picks the better completion on held-out FIM holes?

The complex tier generates 3 full-precision candidates (temperature 0.4) and returns one. Ranking
by raw mean token logprob favours a candidate that repeats itself: once a line is repeated the
model is confident about the repeat, so the loop's tokens lift the mean. Here, on the project's
held-out FIM cases (serve_app/train/evaluate.py), 3 candidates per hole with the complex tier's
settings and the checkpoint's sampling defaults; each ranker (serve_app/api/ranking.py) picks one,
and the pick is scored like the evaluation (exact match, file parses with a non-empty middle,
edit similarity). "first" (no ranking) and "oracle" (the best of the 3 by edit similarity) bound
what ranking can do.

    python bench/rank_candidates.py [MODEL_DIR] [--cases 200] [--files-cache FILE]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:              # run as a script: the repository's packages
    sys.path.insert(0, str(ROOT))

from bench.heldout import load_heldout_fim  # noqa: E402
from serve_app.api.ranking import RANKERS  # noqa: E402
from serve_app.api.settings import GenerationDefaults  # noqa: E402
from serve_app.config import default_model_dir  # noqa: E402
from serve_app.engine import LLM, SamplingParams  # noqa: E402
from serve_app.train.evaluate import _parses, edit_similarity, fim_prompt_parts  # noqa: E402
from serve_app.train.spans import split_at_span  # noqa: E402

MAX_TOKENS = 64
CANDIDATES = 3
TEMPERATURE = 0.4       # the complex tier's (api/tiers.py)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", nargs="?", type=Path, default=Path(default_model_dir()))
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frequency-penalty", type=float, help="instead of the checkpoint's default")
    parser.add_argument("--files-cache", type=Path, help="held-out files as JSON (evaluate.py's --files-cache)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    h = load_heldout_fim(args.model_dir, args.cases, args.files_cache)
    model, window, code_tok, budget, files, cases = h.model, h.window, h.code_tok, h.budget, h.files, h.cases
    prompts = [code_tok.build_fim_prompt_ids(*fim_prompt_parts(budget, c.prefix, c.suffix, window - MAX_TOKENS - 8),
                                             order=code_tok.fim_order) for c in cases]
    defaults = GenerationDefaults.from_model_dir(args.model_dir)
    if args.frequency_penalty is not None:
        defaults = GenerationDefaults(args.frequency_penalty, defaults.presence_penalty, defaults.penalty_skips_structural)
    params = SamplingParams(n=CANDIDATES, temperature=TEMPERATURE, max_tokens=MAX_TOKENS, seed=args.seed, logprobs=0,
                            frequency_penalty=defaults.frequency_penalty, presence_penalty=defaults.presence_penalty,
                            penalty_skips_structural=defaults.penalty_skips_structural)
    llm = LLM(model, tokenizer=code_tok, enable_prefix_caching=False)
    started = time.perf_counter()
    outputs = []
    for i in range(0, len(prompts), 16):
        outputs += llm.generate(prompts[i:i + 16], params)
    generated = time.perf_counter() - started
    scores = {name: [0, 0, 0.0] for name in [*RANKERS, "first", "oracle"]}
    for case, out in zip(cases, outputs):
        full = split_at_span(files[case.rel_name], case.span)

        def score(text: str) -> tuple[int, int, float]:
            exact = text.rstrip("\n") == case.middle.rstrip("\n")
            parses = bool(text.strip()) and _parses(full.prefix + text + full.suffix)
            return exact, parses, edit_similarity(text, case.middle)
        picks = {name: rank(out.outputs)[0] for name, rank in RANKERS.items()}
        picks["first"] = out.outputs[0]
        picks["oracle"] = max(out.outputs, key=lambda c: score(c.text)[2])
        for name, pick in picks.items():
            for k, v in enumerate(score(pick.text)):
                scores[name][k] += v
    n = max(1, len(cases))
    print(f"\n{len(cases)} held-out FIM cases ({args.model_dir.name}), {CANDIDATES} candidates at temperature "
          f"{TEMPERATURE}, max_tokens {MAX_TOKENS}, penalties {defaults}; generated in {generated:.0f} s")
    print(f"{'ranker':<34}{'exact':>8}{'parses, non-empty':>19}{'edit sim':>10}")
    for name, (exact, parses, sim) in scores.items():
        print(f"{name:<34}{exact / n:>8.1%}{parses / n:>19.1%}{sim / n:>10.3f}")


if __name__ == "__main__":
    main()
