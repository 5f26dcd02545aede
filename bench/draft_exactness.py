"""Does a verification pass compute what single-token steps compute, per lane? (typing-through and
speculative decoding keep greedy output exactly only where it does: engine/speculative.py)

For held-out FIM holes (standard-library files) on the bundled model, each lane generates 16 tokens
greedily twice: one token a step, and with its own output as the draft (verified in one pass). It
prints the largest difference of a chosen token's logprob between the two, per hole.

    python bench/draft_exactness.py [--holes 6] [--quant-materialize auto|on|off]
"""
from __future__ import annotations

import argparse
import pathlib
import random
import sys
import sysconfig

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from serve_app.config import AppConfig, EngineConfig  # noqa: E402
from serve_app.embedded import load_served_model  # noqa: E402
from serve_app.engine import EngineCore, SamplingParams  # noqa: E402
from serve_app.tokenizer import CodeTokenizer  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--holes", type=int, default=6)
    p.add_argument("--quant-materialize", choices=["auto", "on", "off"], default="auto")
    args = p.parse_args()
    cfg = AppConfig(quant_materialize={"auto": "auto", "off": False, "on": True}[args.quant_materialize])
    model, tok = load_served_model(cfg), CodeTokenizer.from_dir(cfg.model)
    text = pathlib.Path(sysconfig.get_paths()["stdlib"], "shutil.py").read_text()
    rng = random.Random(1)
    cuts = [rng.randrange(2000, len(text) - 1000) for _ in range(args.holes)]
    for precision in model.precisions:
        diffs = []
        for cut in cuts:
            ids = tok.build_fim_prompt(text[cut - 1500:cut], text[cut:cut + 400], None).ids

            def run(draft):
                # The activation dtype the served lane computes in (engine.lanes.Lanes).
                dtype = None if precision == "full" else model.reduced_dtype
                engine = EngineCore(model, EngineConfig(speculative_tokens=0), tok, dtype=dtype)
                params = SamplingParams(max_tokens=16, temperature=0, draft_token_ids=draft, logprobs=0)
                engine.add_request("r", ids, params, precision=precision)
                out = engine.run_until_done()["r"].outputs[0]
                return out.token_ids, [lp.logprob for lp in out.logprobs]
            tokens, single = run(())
            _, verified = run(tuple(tokens))
            diffs.append(max(abs(a - b) for a, b in zip(single, verified)))
        print(f"{precision:>5} (materialize {args.quant_materialize}): max |logprob difference| per hole "
              + " ".join(f"{d:.1e}" for d in diffs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
