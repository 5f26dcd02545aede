"""Plain PSM against PSM with the cursor's line after <MID> (serve_app/fim.py), cursor mid-line.

The evaluation's FIM cases (serve_app/train/evaluate.py) start their hole at a line start, where the
two layouts are the same prompt. Editors ask mid-line. Here each case's cursor moves into the first
line of its middle: past the indentation and half of the rest of that line, which joins the prefix;
the completion must produce the rest of the middle. Greedy, no penalty, same cases and trimming as
the evaluation; both layouts run on the same engine, one after the other.

    python bench/fim_cursor_line.py [MODEL_DIR] [--cases 200] [--threads 1]
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
from serve_app.config import default_model_dir  # noqa: E402
from serve_app.engine import SamplingParams  # noqa: E402
from serve_app.train.evaluate import Generator, _parses, edit_similarity, fim_prompt_parts  # noqa: E402
from serve_app.train.spans import split_at_span  # noqa: E402

MAX_TOKENS = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", nargs="?", type=Path, default=Path(default_model_dir()))
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--files-cache", type=Path, help="held-out files as JSON (evaluate.py's --files-cache)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    h = load_heldout_fim(args.model_dir, args.cases, args.files_cache)
    model, window, code_tok, budget, files, cases = h.model, h.window, h.code_tok, h.budget, h.files, h.cases
    moved = []                                    # (case, prefix with the cursor mid-line, target)
    for case in cases:
        first = case.middle.split("\n", 1)[0]
        body = first.lstrip(" \t")
        k = len(first) - len(body) + max(1, len(body) // 2)
        if len(body) >= 2:
            moved.append((case, case.prefix + first[:k], case.middle[k:]))
    llm = Generator(model, code_tok)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    rows = []
    for name, after_mid in (("plain PSM", False), ("cursor line after <MID>", True)):
        prompts = [code_tok.build_fim_prompt_ids(*fim_prompt_parts(budget, prefix, case.suffix,
                                                                    window - MAX_TOKENS - 8),
                                                 order="psm", cursor_line_after_middle=after_mid)
                   for case, prefix, _ in moved]
        started = time.perf_counter()
        texts = llm.texts(prompts, params)
        exact = parses = line_exact = 0
        similarity = 0.0
        for (case, prefix, target), text in zip(moved, texts):
            text = text or ""
            full = split_at_span(files[case.rel_name], case.span)
            cursor = full.prefix + case.middle[:len(prefix) - len(case.prefix)]
            exact += text.rstrip("\n") == target.rstrip("\n")
            line_exact += text.split("\n", 1)[0] == target.split("\n", 1)[0]
            parses += _parses(cursor + text + full.suffix)
            similarity += edit_similarity(text, target)
        n = max(1, len(moved))
        rows.append((name, exact / n, line_exact / n, parses / n, similarity / n, time.perf_counter() - started))
    print(f"\n{len(moved)} FIM cases with the cursor mid-line ({args.model_dir.name}), greedy, max_tokens {MAX_TOKENS}")
    print(f"{'layout':<26}{'exact':>8}{'rest of line':>14}{'parses':>8}{'edit sim':>10}{'s':>7}")
    for name, exact, line_exact, parses, similarity, seconds in rows:
        print(f"{name:<26}{exact:>8.1%}{line_exact:>14.1%}{parses:>8.1%}{similarity:>10.3f}{seconds:>7.0f}")


if __name__ == "__main__":
    main()
