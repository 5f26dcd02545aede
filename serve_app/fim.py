"""Fill-in-the-middle prompts: the order of the parts, and fitting a long file into the context.

Order. PSM (prefix, suffix, middle) is what every FIM code model knows:
    <PRE> prefix <SUF> suffix <MID>
SPM puts the suffix first, in the variant of Bavarian et al. 2022 ("Efficient Training of
Language Models to Fill in the Middle", §3; bigcode's and CodeLlama's `suffix_first`) whose
prefix runs straight into the middle:
    <PRE> <SUF> suffix <MID> prefix
Why it matters to a server: an editor resends the same file on every keystroke, and the text
that changes is the end of the prefix. In PSM the suffix comes after that change, so every
keystroke recomputes the whole suffix; in SPM everything before the cursor's last few tokens is
a prefix-cache hit. A checkpoint trained on SPM says so in `tokenizer_config.json`:
    "fim_order": "spm"          ("psm" or absent: PSM, the only order most families know)
and the ingress then builds SPM prompts. StarCoder, Qwen-Coder and DeepSeek-Coder checkpoints
declare nothing and stay on PSM.

The cursor's line. In PSM the text of the cursor's line before the cursor goes after <MID>, as
llama.cpp's /infill places its `prompt` (llama.vim sends that line there):
    <PRE> prefix up to the cursor's line <SUF> suffix <MID> cursor's line up to the cursor
so that typing within a line changes only the tokens after <MID>: prefix and suffix stay a
prefix-cache hit until the cursor leaves the line, where plain PSM recomputes the whole suffix
on every keystroke. The model sees a middle that starts at a line start, which is where the
spans of line-aligned FIM training (serve_app/train/spans.py) start too. A prefix that ends at a
line start (the evaluation's cases, training samples) gives the plain PSM prompt. SPM needs no
split: its prefix already runs into the middle.

Fitting. Editors send the whole file around the cursor; dense files exceed a small model's
context. Instead of refusing (400), an FIM prompt is trimmed at its far ends, as editor-facing
servers do (llama.cpp's /infill keeps 3/4 of its budget for the prefix): the suffix keeps at most a
quarter of the room unless the prefix leaves it more, whole lines are dropped from the prefix's
start and from the suffix's end, and the response's usage says how many prompt tokens were
dropped (`prompt_tokens_details.dropped_tokens`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

FimOrder = Literal["psm", "spm"]
FIM_ORDERS: tuple[str, ...] = ("psm", "spm")
# The suffix's share of the room when both parts are too long (llama.cpp /infill: n_batch / 4).
SUFFIX_SHARE = 0.25


@dataclass(frozen=True)
class FimFormat:
    name: str                  # style name: starcoder | qwen | deepseek | codellama
    prefix_token: str          # goes before the prefix text (DeepSeek calls it "begin")
    suffix_token: str          # goes before the suffix text (DeepSeek: "hole")
    middle_token: str          # ends the prompt; the model generates the middle after it (DeepSeek: "end")
    space_before_prefix: bool = False  # CodeLlama was trained with " " + prefix (SentencePiece dummy prefix)

    @property
    def tokens(self) -> tuple[str, str, str]:
        return (self.prefix_token, self.suffix_token, self.middle_token)


# Checked in order; the first whose three tokens are all in the vocabulary wins. Real CodeLlama
# vocabularies spell the tokens "▁<PRE>" etc.; the bare spelling is kept for byte-level ports.
FIM_FORMATS: tuple[FimFormat, ...] = (
    FimFormat("starcoder", "<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    FimFormat("qwen", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    FimFormat("deepseek", "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),
    FimFormat("codellama", "▁<PRE>", "▁<SUF>", "▁<MID>", space_before_prefix=True),
    FimFormat("codellama", "<PRE>", "<SUF>", "<MID>", space_before_prefix=True),
)


def assemble(order: str, lead: list[int], ids: tuple[int, int, int], prefix: list[int],
             suffix: list[int], cursor_line: list[int] = ()) -> list[int]:
    """The prompt ids in `order`; ids = (prefix, suffix, middle) special token ids; `cursor_line`:
    PSM's text after <MID> (see "The cursor's line" above; SPM takes the whole prefix as `prefix`)."""
    pre, suf, mid = ids
    if order == "spm":
        return [*lead, pre, suf, *suffix, mid, *prefix, *cursor_line]
    return [*lead, pre, *prefix, suf, *suffix, mid, *cursor_line]


def split_cursor_line(prefix: str) -> tuple[str, str]:
    """(the prefix up to the start of its last line, that last line): "a\n  b" → ("a\n", "  b")."""
    start = prefix.rfind("\n") + 1
    return prefix[:start], prefix[start:]


@dataclass(frozen=True)
class ContextFile:
    """Another file an FIM prompt carries before the one being edited (llama.cpp's `input_extra`:
    editor plugins send the chunks of recently seen files)."""
    filename: str
    text: str


# Repo-level FIM tokens (Qwen2.5-Coder's and StarCoder2's pretraining format). With both in the
# vocabulary other files go in as <repo> name \n (<sep> path \n text)* <sep> path \n before <PRE>, as
# llama.cpp's /infill builds it (with its placeholder names: the client sends neither); without
# them each file is plain text under a "--- snippet ---" line, as llama.cpp does too.
REPO_TOKENS: tuple[tuple[str, str], ...] = (("<|repo_name|>", "<|file_sep|>"), ("<repo_name>", "<file_sep>"))


def context_ids(files: Sequence[ContextFile], repo: tuple[int, int] | None, encode: Callable[[str], list[int]],
                room: int | None) -> tuple[list[int], int]:
    """(the ids of `files` that fit in `room` tokens, tokens left out): whole files are dropped
    from the first on, since editors send the most recent chunks last."""
    if not files:
        return [], 0
    if repo is not None:
        head, tail = [repo[0], *encode("myproject\n")], [repo[1], *encode("filename\n")]
        pieces = [[repo[1], *encode(f"{f.filename}\n{f.text}")] for f in files]
    else:
        head, tail = [], []
        pieces = [encode(f"\n\n--- snippet ---\n\n{f.text}") for f in files]
    total = sum(map(len, pieces))
    while pieces and room is not None and len(head) + len(tail) + sum(map(len, pieces)) > room:
        pieces.pop(0)
    kept = [i for piece in pieces for i in piece]
    return ([*head, *kept, *tail] if pieces else []), total - len(kept)


@dataclass(frozen=True)
class FimParts:
    """The text that goes into the prompt, after fitting."""
    prefix: str
    suffix: str
    dropped_tokens: int         # prompt tokens left out (0: the file fitted whole)


def fit(prefix: str, suffix: str, room: int, count: Callable[[str], int],
        count_prefix: Callable[[str], int] | None = None) -> FimParts:
    """Trim prefix (from its start) and suffix (from its end) at line boundaries until their token
    counts sum to at most `room`; `count(text)` is the number of tokens a part encodes to
    (`count_prefix` for the prefix, when it encodes differently: PSM's cursor line)."""
    count_prefix = count_prefix or count
    room = max(0, room)
    p, s = count_prefix(prefix), count(suffix)
    if p + s <= room:
        return FimParts(prefix, suffix, 0)
    suffix_room = min(s, max(int(room * SUFFIX_SHARE), room - p))
    kept_prefix = keep_end(prefix, room - suffix_room, count_prefix)
    kept_suffix = keep_start(suffix, room - count_prefix(kept_prefix), count)
    return FimParts(kept_prefix, kept_suffix, p + s - count_prefix(kept_prefix) - count(kept_suffix))


def keep_end(text: str, room: int, count: Callable[[str], int]) -> str:
    """The longest tail of `text` that starts at a line start and counts at most `room` tokens
    (characters of its last line only when that line alone is too long)."""
    lines = text.splitlines(keepends=True)
    starts = [0]
    for line in lines[:-1]:
        starts.append(starts[-1] + len(line))
    first = _first_fitting([text[i:] for i in starts], room, count)
    if first is not None:
        return text[starts[first]:]
    tail = text[starts[-1]:] if starts else text
    cut = _first_fitting_index(len(tail), lambda i: count(tail[i:]) <= room)
    return tail[cut:]


def keep_start(text: str, room: int, count: Callable[[str], int]) -> str:
    """The longest head of `text` that ends at a line end and counts at most `room` tokens."""
    lines = text.splitlines(keepends=True)
    ends, total = [], 0
    for line in lines:
        total += len(line)
        ends.append(total)
    # candidates from the longest head to the shortest, so the first that fits is the longest
    heads = [text[:e] for e in reversed(ends)]
    first = _first_fitting(heads, room, count)
    if first is not None:
        return heads[first]
    head = text[:ends[0]] if ends else text
    keep = len(head) - _first_fitting_index(len(head), lambda i: count(head[:len(head) - i]) <= room)
    return head[:keep]


def _first_fitting(candidates: list[str], room: int, count) -> int | None:
    """Index of the first candidate (they shrink as the index grows) that fits; binary search."""
    if not candidates or count(candidates[-1]) > room:
        return None
    return _first_fitting_index(len(candidates) - 1, lambda i: count(candidates[i]) <= room)


def _first_fitting_index(last: int, fits: Callable[[int], bool]) -> int:
    """Smallest i in [0, last] with fits(i), given fits is monotone and fits(last) holds."""
    lo, hi = 0, last
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo
