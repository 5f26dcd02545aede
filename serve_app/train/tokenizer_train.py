"""Train the default model's code tokenizer on the stdlib corpus and measure it against a baseline.

    python -m serve_app.train.tokenizer_train --out serve_app/default_model --vocab-size 8192

Steps: load the corpus and its held-out split (``corpus.py``); train the **code** tokenizer
(``tokenizer_rules.py``: code pre-tokenizer, then seeded pieces) and a **general** byte-level BPE
(GPT-2 pre-tokenizer, nothing seeded) on the *training* files only, with the same vocabulary size
and trainer settings, so the only difference is the pre-tokenization rules; count tokens per
character of both on the *held-out* files; write ``tokenizer.json`` + ``tokenizer_config.json``
of the code tokenizer to ``--out`` and the numbers to ``tokenizer_report.json`` next to this file.

Fewer tokens per character means more code per context window and fewer decode steps per
completion, which is the serving latency budget (DESIGN.md §3), so the number is measured, not
assumed. A third tokenizer, ``code_gpt2_whitespace`` (our rules without the 4-space indent unit),
is trained as an ablation so the report can say what each part of the design costs; on CPython
3.11.7 the shipped tokenizer spends more tokens than the general one (see the report and the
``tokenizer_rules`` docstring for why and why we keep it). Training all three takes ~1-3 minutes
on two cores.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tokenizers import Tokenizer, pre_tokenizers, trainers

from serve_app.train.corpus import CorpusConfig, load_split
from serve_app.train.tokenizer_rules import (
    EOS,
    SPECIAL_TOKENS,
    force_whole_pieces,
    new_code_tokenizer,
    new_general_tokenizer,
    required_pieces,
)

_NEW_TOKENIZER = {
    "code": new_code_tokenizer,
    "general": new_general_tokenizer,
    "code_gpt2_whitespace": lambda: new_code_tokenizer(indent_units=False),
}
REPORT_PATH = Path(__file__).with_name("tokenizer_report.json")
# 8192 fits a small default model: the embedding + LM head stay a modest share of its weights,
# and on the stdlib the curve of tokens/char flattens well before 16k.
DEFAULT_VOCAB_SIZE = 8192


@dataclass(frozen=True)
class TokenRate:
    """How many tokens a tokenizer spends on a set of texts."""

    name: str  # "code" or "general"
    num_chars: int  # Unicode code points in the texts
    num_tokens: int  # tokens produced (no special tokens added)

    @property
    def tokens_per_char(self) -> float:
        return self.num_tokens / max(self.num_chars, 1)


@dataclass(frozen=True)
class TokenizerReport:
    """What tokenizer_report.json holds: the comparison on held-out files, and how it was made."""

    vocab_size: int  # every tokenizer compared
    python_version: str  # the stdlib version the corpus came from
    num_train_files: int  # tokenizers are trained on these only
    num_heldout_files: int  # and measured on these
    rates: list[TokenRate]  # "code" (shipped), "general" (baseline), "code_gpt2_whitespace" (ablation)
    saving: float  # 1 - code tokens / general tokens; negative means the code tokenizer spends more
    indent_rule_cost: float  # code tokens / code_gpt2_whitespace tokens - 1: the price of rule 4
    seeded_pieces: list[str]  # required pieces BPE did not learn by itself, added by seeding

    def to_json(self) -> dict:
        out = asdict(self)
        out["rates"] = [{**asdict(r), "tokens_per_char": round(r.tokens_per_char, 5)} for r in self.rates]
        return out


def train_bpe(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, kind: str = "code",
              min_frequency: int = 2) -> Tokenizer:
    """Plain BPE training, no seeding. ``kind``: "code" (our pre-tokenizer), "general" (GPT-2's), or
    "code_gpt2_whitespace" (ours with GPT-2's whitespace rule: the ablation that prices the indent rule).

    Special tokens get ids 0..4 in ``SPECIAL_TOKENS`` order. Both kinds use identical trainer
    settings, so a comparison between them measures the pre-tokenization rules alone.
    """
    if kind not in _NEW_TOKENIZER:
        raise ValueError(f"tokenizer kind must be one of {sorted(_NEW_TOKENIZER)}, got {kind!r}")
    floor = len(SPECIAL_TOKENS) + 256 + len(required_pieces())
    if vocab_size < floor:
        raise ValueError(f"vocab_size {vocab_size} is too small; need at least {floor}")
    tok = _NEW_TOKENIZER[kind]()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for i, special in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(special) != i:
            raise RuntimeError(f"special token {special!r} got id {tok.token_to_id(special)}, expected {i}")
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """The code tokenizer: ``train_bpe(kind="code")``, then every ``required_pieces()`` entry seeded
    to a single token (``force_whole_pieces``) at the same vocabulary size."""
    return force_whole_pieces(train_bpe(texts, vocab_size, kind="code"), required_pieces(), vocab_size)


def unseeded_pieces(tok: Tokenizer) -> list[str]:
    """Required pieces that ``tok`` does not encode as one token (empty after seeding)."""
    return [p for p in required_pieces() if len(tok.encode(p).ids) != 1]


def measure(tok: Tokenizer, texts: Sequence[str], name: str) -> TokenRate:
    """Tokens spent on ``texts`` (special-token strings inside them count as plain text)."""
    tok.encode_special_tokens = True
    try:
        encodings = tok.encode_batch_fast(list(texts), add_special_tokens=False)
    finally:
        tok.encode_special_tokens = False
    return TokenRate(name=name, num_chars=sum(len(t) for t in texts),
                     num_tokens=sum(len(e.ids) for e in encodings))


def write_tokenizer(tok: Tokenizer, out_dir: Path) -> None:
    """Write ``tokenizer.json`` and a ``tokenizer_config.json`` that transformers can load too."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"), pretty=False)  # one line: ~half the size of pretty
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS,
        "pad_token": EOS,  # no separate pad token: padding is masked out anyway
        "unk_token": None,  # byte-level: every input is representable
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "add_bos_token": False,
        "add_eos_token": False,
        # transformers would otherwise "clean up" spaces before punctuation and break round trips.
        "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def run(out_dir: Path, vocab_size: int, report_path: Path, corpus: CorpusConfig) -> TokenizerReport:
    """The whole pipeline of the module docstring; returns what it wrote to ``report_path``."""
    split = load_split(corpus)
    train_texts = [f.text for f in split.train]
    heldout_texts = [f.text for f in split.heldout]
    started = time.perf_counter()
    raw = train_bpe(train_texts, vocab_size, kind="code")
    seeded = unseeded_pieces(raw)
    tokenizers = {
        "code": force_whole_pieces(raw, required_pieces(), vocab_size),
        "general": train_bpe(train_texts, vocab_size, kind="general"),
        "code_gpt2_whitespace": train_bpe(train_texts, vocab_size, kind="code_gpt2_whitespace"),
    }
    print(f"trained {len(tokenizers)} tokenizers in {time.perf_counter() - started:.0f}s "
          f"on {len(train_texts)} files; seeded {len(seeded)} pieces: {seeded}")
    rates = {name: measure(tok, heldout_texts, name) for name, tok in tokenizers.items()}
    report = TokenizerReport(
        vocab_size=vocab_size,
        python_version=platform.python_version(),
        num_train_files=len(train_texts),
        num_heldout_files=len(heldout_texts),
        rates=list(rates.values()),
        saving=round(1 - rates["code"].num_tokens / rates["general"].num_tokens, 4),
        indent_rule_cost=round(rates["code"].num_tokens / rates["code_gpt2_whitespace"].num_tokens - 1, 4),
        seeded_pieces=seeded,
    )
    write_tokenizer(tokenizers["code"], out_dir)
    report_path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    _print_table(report)
    return report


def _print_table(report: TokenizerReport) -> None:
    print(f"{'tokenizer':22s} {'chars':>10s} {'tokens':>10s} {'tokens/char':>12s}")
    for rate in report.rates:
        print(f"{rate.name:22s} {rate.num_chars:10d} {rate.num_tokens:10d} {rate.tokens_per_char:12.4f}")
    print(f"code vs general: saving {report.saving:+.1%} of tokens on held-out files; "
          f"the 4-space indent rule costs {report.indent_rule_cost:+.1%}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for tokenizer.json")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument("--report", type=Path, default=REPORT_PATH, help="where the JSON report goes")
    parser.add_argument("--no-tests", action="store_true", help="exclude stdlib test/ directories")
    args = parser.parse_args(argv)
    run(args.out, args.vocab_size, args.report, CorpusConfig(include_tests=not args.no_tests))


if __name__ == "__main__":
    main()
