"""Training samples and evaluation cases built from corpus files.

Training (``iter_training_samples``): every file is, by a per-file coin with probability
``fim_rate``, either

* **plain**: its tokens + ``<|endoftext|>`` go into one stream that is cut into ``max_len``
  windows. Packing wastes no compute on padding; files are shuffled (seeded) first so a window
  does not always pair the same neighbours. ``<file_sep>`` is not used here: it is reserved for
  multi-file prompts, which the stdlib (no repository structure worth teaching) cannot supply;
* **FIM**: ``ceil(file tokens / max_len)`` holes (so FIM and plain get comparable token shares), each
  one statement or block cut at line boundaries (``spans.py``), each its own sample in PSM order,
  ``<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>{middle}<|endoftext|>``, or, with
  probability ``spm_rate``, SPM: ``<fim_prefix><fim_suffix>{suffix}<fim_middle>{prefix}{middle}<|endoftext|>``. Prefix and suffix
  are trimmed to the token budget left around the middle, at line starts, nearest lines kept;
  the prefix gets at least three quarters of the budget when both do not fit, because the code
  before the cursor predicts the middle best. A FIM sample is padded to ``max_len``;
  ``num_tokens`` says where padding starts so the loss can skip it.

Every random choice comes from ``random.Random`` seeded with the config seed (and, per file, the
file's relative name), so the same files, tokenizer and config give the same samples in any
process. File contents are encoded with special-token matching off: a stdlib string that happens
to read ``<fim_middle>`` stays text.

Evaluation (``build_eval_set``), on held-out files only: next-line exact match (prefix up to a line
start → that line) and FIM holes that are one statement or block inside a function. Cases are text,
not ids, so any tokenizer or served model can be scored on the same cases.
"""
from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from tokenizers import Encoding, Tokenizer

from serve_app.fim import assemble
from serve_app.train.corpus import SourceFile
from serve_app.train.spans import (
    FimParts,
    LineSpan,
    middle_parses,
    split_at_span,
    split_lines,
    statement_spans,
)
from serve_app.train.tokenizer_rules import EOS, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX


@dataclass(frozen=True)
class DataConfig:
    """How files become training samples."""

    max_len: int = 512  # tokens per sample; the small default model's context
    fim_rate: float = 0.5  # share of files turned into FIM samples (FIM paper: 0.5 costs no L2R skill)
    # Share of FIM samples in SPM order (suffix first, the prefix running into the middle; see
    # serve_app/fim.py): 0 for the first two releases; the FIM paper trains both orders jointly.
    spm_rate: float = 0.0
    # None: a quarter of max_len; a longer hole leaves too little context around it.
    max_middle_tokens: int | None = None
    max_middle_lines: int = 30  # candidate filter before tokenizing: whole classes are not completions
    seed: int = 0

    def __post_init__(self) -> None:
        if self.middle_limit < 1 or self.middle_limit + 4 >= self.max_len:  # 4 specials frame a FIM sample
            raise ValueError(f"max_middle_tokens {self.middle_limit} does not fit max_len {self.max_len}")
        for name in ("fim_rate", "spm_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")

    @property
    def middle_limit(self) -> int:
        """The most tokens a FIM middle may have."""
        return self.max_len // 4 if self.max_middle_tokens is None else self.max_middle_tokens


@dataclass(frozen=True)
class TrainingSample:
    """One row of a training batch."""

    input_ids: tuple[int, ...]  # exactly max_len ids; positions >= num_tokens are padding (eos id)
    num_tokens: int  # real tokens; the loss must ignore positions >= num_tokens
    is_fim: bool  # a FIM sample (PSM or SPM), or a window of the plain stream
    rel_name: str  # FIM: the file holding the hole; plain: the file the window starts in


@dataclass(frozen=True)
class FimIds:
    """Token ids of the three FIM parts after trimming, before the special tokens are added."""

    prefix: list[int]  # ends at a line end (trimmed from the left at a line start)
    suffix: list[int]  # starts at a line start (trimmed from the right at a line start)
    middle: list[int]  # the whole hole; never trimmed


def _encode_source(tokenizer: Tokenizer, text: str) -> Encoding:
    tokenizer.encode_special_tokens = True  # "<fim_middle>" inside a source file is just text
    try:
        return tokenizer.encode(text, add_special_tokens=False)
    finally:
        tokenizer.encode_special_tokens = False


def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """Ids of source text, with special-token strings inside it treated as plain text."""
    return _encode_source(tokenizer, text).ids


def _line_start_tokens(tokenizer: Tokenizer, text: str) -> tuple[list[int], list[bool]]:
    """Ids of ``text`` and, per token, whether it begins a line (a safe place to cut)."""
    enc = _encode_source(tokenizer, text)
    return enc.ids, [s == 0 or text[s - 1] == "\n" for s, _ in enc.offsets]


def _keep_tail(ids: list[int], starts: list[bool], budget: int) -> list[int]:
    """The last <= budget ids, beginning at a line start when one is available."""
    first = max(len(ids) - budget, 0)
    cut = next((i for i in range(first, len(ids)) if starts[i]), first)
    return ids[cut:]


def _keep_head(ids: list[int], starts: list[bool], budget: int) -> list[int]:
    """The first <= budget ids, ending before a line start when one is available."""
    if len(ids) <= budget:
        return ids
    cut = next((i for i in range(budget, 0, -1) if starts[i]), budget)
    return ids[:cut]


def fim_ids(tokenizer: Tokenizer, parts: FimParts, config: DataConfig) -> FimIds | None:
    """Trimmed ids for one hole, or None when the middle alone exceeds ``config.middle_limit``."""
    middle = encode_text(tokenizer, parts.middle)
    if not middle or len(middle) > config.middle_limit:
        return None
    budget = config.max_len - 4 - len(middle)  # 4 = <fim_prefix> <fim_suffix> <fim_middle> <eos>
    # Only text that could fit is tokenized: 8 chars per token is far above any code's average.
    chars = budget * 8
    prefix_text = parts.prefix[-chars:]
    if len(prefix_text) < len(parts.prefix):
        prefix_text = prefix_text[prefix_text.find("\n") + 1:]  # begin at a whole line
    pre_ids, pre_starts = _line_start_tokens(tokenizer, prefix_text)
    suffix_text = parts.suffix[:chars]
    if len(suffix_text) < len(parts.suffix):
        suffix_text = suffix_text[: suffix_text.rfind("\n") + 1]  # end with a whole line
    suf_ids, suf_starts = _line_start_tokens(tokenizer, suffix_text)
    pre_budget = min(len(pre_ids), max(budget - len(suf_ids), budget * 3 // 4))
    prefix = _keep_tail(pre_ids, pre_starts, pre_budget)
    suffix = _keep_head(suf_ids, suf_starts, budget - len(prefix))
    return FimIds(prefix=prefix, suffix=suffix, middle=middle)


def format_fim(tokenizer: Tokenizer, ids: FimIds, max_len: int, rel_name: str = "",
               order: str = "psm") -> TrainingSample:
    """PSM or SPM layout (the one the server builds: ``fim.assemble``), padded with eos to ``max_len``."""
    special = {t: tokenizer.token_to_id(t) for t in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE, EOS)}
    marks = (special[FIM_PREFIX], special[FIM_SUFFIX], special[FIM_MIDDLE])
    row = [*assemble(order, [], marks, ids.prefix, ids.suffix), *ids.middle, special[EOS]]
    if len(row) > max_len:
        raise ValueError(f"FIM sample of {len(row)} tokens exceeds max_len {max_len}")
    return TrainingSample(input_ids=tuple(row + [special[EOS]] * (max_len - len(row))),
                          num_tokens=len(row), is_fim=True, rel_name=rel_name)


def _fim_samples(file: SourceFile, tokenizer: Tokenizer, config: DataConfig, rng: random.Random,
                 count: int) -> list[TrainingSample]:
    spans = [s for s in statement_spans(file.text) if s.num_lines <= config.max_middle_lines]
    rng.shuffle(spans)
    out: list[TrainingSample] = []
    for span in spans[: 4 * count]:  # a few spare draws for holes that fail the checks
        if len(out) == count:
            break
        parts = split_at_span(file.text, span)
        if not middle_parses(parts.middle):
            continue
        ids = fim_ids(tokenizer, parts, config)
        if ids is not None:
            # Drawn only when SPM is on, so spm_rate 0 reproduces the earlier releases' samples.
            order = "spm" if config.spm_rate and rng.random() < config.spm_rate else "psm"
            out.append(format_fim(tokenizer, ids, config.max_len, file.rel_name, order))
    return out


def iter_training_samples(files: Sequence[SourceFile], tokenizer: Tokenizer,
                          config: DataConfig | None = None) -> Iterator[TrainingSample]:
    """Plain windows and FIM samples, mixed per file (see module docstring); lazy, deterministic."""
    config = config or DataConfig()
    eos = tokenizer.token_to_id(EOS)
    order = sorted(files, key=lambda f: f.rel_name)
    random.Random(config.seed).shuffle(order)
    stream: list[int] = []  # plain tokens not yet cut into a window (< max_len between files)
    owner = ""  # the file that stream[0] belongs to
    for file in order:
        rng = random.Random(f"{config.seed}:{file.rel_name}")
        ids = encode_text(tokenizer, file.text)
        if rng.random() < config.fim_rate:
            fim = _fim_samples(file, tokenizer, config, rng, math.ceil(len(ids) / config.max_len))
            if fim:
                yield from fim
                continue
        owner = owner if stream else file.rel_name
        stream.extend(ids + [eos])
        while len(stream) >= config.max_len:
            yield _plain_window(stream[: config.max_len], config.max_len, eos, owner)
            del stream[: config.max_len]
            owner = file.rel_name  # the leftover was shorter than a window: the rest is this file
    if stream:
        yield _plain_window(stream, config.max_len, eos, owner)


def _plain_window(ids: list[int], max_len: int, eos: int, rel_name: str) -> TrainingSample:
    return TrainingSample(input_ids=tuple(ids + [eos] * (max_len - len(ids))), num_tokens=len(ids),
                          is_fim=False, rel_name=rel_name)


# --- evaluation cases (held-out files only) -------------------------------------------------


@dataclass(frozen=True)
class EvalConfig:
    """How many evaluation cases to draw and how much context each keeps."""

    num_next_line: int = 200
    num_fim: int = 200
    # Context is kept as text, trimmed at line boundaries; ~4k chars is ~1.3k tokens, more than a
    # 512-token model can read, so the scorer trims further to its own window.
    max_context_chars: int = 4096
    max_middle_lines: int = 8  # an inline completion, not a whole function
    min_prefix_lines: int = 3  # a target with no context before it is a guess, not a completion
    seed: int = 0


@dataclass(frozen=True)
class NextLineCase:
    """Given the code up to a line start, produce exactly the next line."""

    rel_name: str  # held-out file
    line_index: int  # 0-based line number of the target in the file
    prefix: str  # file text before the target line (ends with "\n"), trimmed at a line start
    target: str  # the target line with its indentation, without "\n"; never blank or comment-only


@dataclass(frozen=True)
class FimCase:
    """Given prefix and suffix, produce the middle: one statement or block of a function."""

    rel_name: str  # held-out file
    span: LineSpan  # where the middle sits in the file (line numbers, ast node kind)
    prefix: str  # text before the hole, trimmed from the left at a line start
    suffix: str  # text after the hole, trimmed from the right at a line end
    middle: str  # the expected completion: whole lines, ending with "\n"


@dataclass(frozen=True)
class EvalSet:
    """All evaluation cases, each list sorted by (file, line)."""

    next_line: list[NextLineCase]
    fim: list[FimCase]


def _trim_prefix(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    tail = text[-max_chars:]
    return tail[tail.find("\n") + 1:]


def _trim_suffix(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    return text[: text.rfind("\n", 0, max_chars) + 1]


def _is_target_line(line: str) -> bool:
    stripped = line.strip()
    return bool(stripped) and not stripped.startswith("#")


def next_line_cases(files: Sequence[SourceFile], config: EvalConfig) -> list[NextLineCase]:
    """``config.num_next_line`` targets drawn uniformly over the eligible lines of ``files``."""
    files = sorted(files, key=lambda f: f.rel_name)
    pool = [
        (fi, li)
        for fi, file in enumerate(files)
        for li, line in enumerate(split_lines(file.text))
        if li >= config.min_prefix_lines and _is_target_line(line)
    ]
    rng = random.Random(f"{config.seed}:next_line")
    picked = sorted(rng.sample(pool, min(config.num_next_line, len(pool))))
    cases = []
    for fi, li in picked:
        lines = split_lines(files[fi].text)
        cases.append(NextLineCase(
            rel_name=files[fi].rel_name,
            line_index=li,
            prefix=_trim_prefix("".join(lines[:li]), config.max_context_chars),
            target=lines[li].rstrip("\n"),
        ))
    return cases


def fim_cases(files: Sequence[SourceFile], config: EvalConfig) -> list[FimCase]:
    """``config.num_fim`` holes, each one statement or block inside a function of ``files``."""
    files = sorted(files, key=lambda f: f.rel_name)
    pool = [
        (fi, span)
        for fi, file in enumerate(files)
        for span in statement_spans(file.text)
        if span.in_function and span.num_lines <= config.max_middle_lines
    ]
    random.Random(f"{config.seed}:fim").shuffle(pool)
    chosen: list[tuple[int, LineSpan, FimParts]] = []
    for fi, span in pool:
        if len(chosen) == config.num_fim:
            break
        parts = split_at_span(files[fi].text, span)
        if middle_parses(parts.middle):
            chosen.append((fi, span, parts))
    chosen.sort(key=lambda c: (c[0], c[1].start_line, c[1].end_line))
    return [
        FimCase(
            rel_name=files[fi].rel_name,
            span=span,
            prefix=_trim_prefix(parts.prefix, config.max_context_chars),
            suffix=_trim_suffix(parts.suffix, config.max_context_chars),
            middle=parts.middle,
        )
        for fi, span, parts in chosen
    ]


def build_eval_set(heldout: Sequence[SourceFile], config: EvalConfig | None = None) -> EvalSet:
    """Next-line and FIM cases from held-out files; same files and config give the same cases."""
    config = config or EvalConfig()
    return EvalSet(next_line=next_line_cases(heldout, config), fim=fim_cases(heldout, config))
