"""Editor-like request bodies cut from real Python source (no Locust, no HTTP here).

Why real source: latency depends on prompt length and on how much of a prompt the prefix cache
already holds, and both follow from how editors send code. An inline-completion plugin sends the
text before the cursor (a window of it) and some text after it on every pause in typing; the next
request repeats the same file with a few more characters typed. Synthetic prompts ("x" * n) get
neither the token statistics of code nor the keystroke-to-keystroke reuse right.

The source is CPython's standard library of the interpreter running the test (found through
`sysconfig`), so nothing is downloaded and every machine has it.
"""
from __future__ import annotations

import functools
import math
import os
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# Request names as they appear in Locust's statistics. INLINE is what the SLO is about: the
# completions an editor shows while the user types (streamed ones measured to their last token).
FIM = "fim"
COMPLETIONS_FIM = "completions-fim"
FIM_STREAM = "fim-stream"
TTFT_FIM_STREAM = "TTFT fim-stream"
CHAT = "chat"
INLINE = (FIM, COMPLETIONS_FIM, FIM_STREAM)


@dataclass(frozen=True)
class WorkloadConfig:
    """Shapes of the requests. Read from MOE_LT_* environment variables, so the runner (a separate
    process that starts Locust) can set them without Locust-specific flags."""
    # An editor sends a window around the cursor, not the whole file: 1500 characters before it
    # and 400 after, as the plugins the fast-path issue measured. Dense files then exceed the
    # bundled model's 1024 tokens; the server trims such FIM prompts at their far ends.
    max_prefix_chars: int = 1500
    max_suffix_chars: int = 400
    # Optional client-side cut, counted in a tokenizer.json's tokens: the prefix is cut from the
    # left (whole lines) until prefix + suffix fit max_prompt_tokens. "" (default) = the editor
    # counts characters only and leaves fitting to the server.
    tokenizer: str = ""
    max_prompt_tokens: int = 768
    # Inline completions are a line or two: 16-32 tokens, near-greedy.
    min_tokens: int = 16
    max_tokens: int = 32
    temperature: float = 0.1
    chat_max_tokens: int = 64
    # A session fills one hole: the user types 1-6 characters between requests (the text the file
    # really has there), pausing 0.2-0.5 s (editors debounce ~100-300 ms), 8-20 requests, while
    # the text after the hole (the suffix) stays as it is. Then a new hole in another file.
    min_session_requests: int = 8
    max_session_requests: int = 20
    max_chars_per_keystroke: int = 6
    min_think_s: float = 0.2
    max_think_s: float = 0.5
    # Chat-panel users next to the editors (0: editors only, the SLO's workload).
    chat_users: int = 0
    # Share of editor requests sent with "precision": "full". The classifier puts most inline
    # completions on the router's quantized lane, which never leaves the router; the chaos soak
    # needs some requests to cross the expert shards so that killing one is seen.
    full_precision_share: float = 0.0
    # Client-side limit on one request (connect, send, receive): a request that takes longer is
    # recorded as failed, so a hang shows up as a timeout rather than as a missing line.
    timeout_s: float = 60.0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "WorkloadConfig":
        env = os.environ if env is None else env
        fields = {}
        for name, default in cls.__dataclass_fields__.items():
            raw = env.get(f"MOE_LT_{name.upper()}")
            if raw is not None:
                kind = type(getattr(cls, name))
                try:
                    fields[name] = kind(raw)
                except ValueError as exc:
                    raise ValueError(f"MOE_LT_{name.upper()}={raw!r} is not a {kind.__name__}") from exc
        return cls(**fields)

    def to_env(self) -> dict[str, str]:
        return {f"MOE_LT_{name.upper()}": str(getattr(self, name)) for name in self.__dataclass_fields__}


@dataclass(frozen=True)
class FimCut:
    prefix: str          # text before the cursor (a window of it, starting at a line start)
    suffix: str          # text after the cursor (a window of it)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


class SourcePool:
    """Python files to cut requests from; files are read lazily and cached."""

    def __init__(self, root: Path | None = None, min_chars: int = 400, max_files: int = 2000, seed: int = 0):
        root = root or stdlib_dir()
        files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
        if not files:
            raise FileNotFoundError(f"no Python files under {root}")
        random.Random(seed).shuffle(files)
        self.files = files[:max_files]
        self.min_chars = min_chars
        self._cache: dict[Path, str] = {}

    def text(self, rng: random.Random) -> str:
        """A random file's text with at least min_chars characters."""
        for _ in range(50):
            path = rng.choice(self.files)
            if path not in self._cache:
                try:
                    self._cache[path] = path.read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError):
                    self._cache[path] = ""
            if len(self._cache[path]) >= self.min_chars:
                return self._cache[path]
        raise FileNotFoundError(f"no readable file of >= {self.min_chars} characters found")


def _window_start(text: str, cursor: int, max_chars: int) -> int:
    """Start of a prefix window that ends at cursor, at a line start where possible."""
    start = max(0, cursor - max_chars)
    if start == 0:
        return 0
    newline = text.find("\n", start, cursor)
    return newline + 1 if newline >= 0 else start


def _cursor(text: str, rng: random.Random) -> int:
    """A cursor somewhere inside a non-blank line (after its indent), as if the user paused there."""
    starts, pos = [], 0
    for line in text.splitlines(keepends=True):
        if line.strip():
            starts.append((pos, line))
        pos += len(line)
    offset, line = rng.choice(starts)
    indent = len(line) - len(line.lstrip())
    return offset + rng.randint(indent, max(indent, len(line.rstrip("\n"))))


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


def _window(text: str, cursor: int, cfg: WorkloadConfig) -> tuple[int, int]:
    """(start, end) of the text an editor sends for this cursor: character windows first, then,
    with a tokenizer, the suffix halved until it takes at most a third of the token budget and the
    prefix cut from the left (at line starts) until both fit."""
    start, end = _window_start(text, cursor, cfg.max_prefix_chars), min(len(text), cursor + cfg.max_suffix_chars)
    if not cfg.tokenizer:
        return start, end
    tok = _tokenizer(cfg.tokenizer)

    def tokens(a: int, b: int) -> int:
        return len(tok.encode(text[a:b]).ids)

    while end > cursor and tokens(cursor, end) > cfg.max_prompt_tokens // 3:
        end = cursor + (end - cursor) // 2
    while start < cursor and tokens(start, cursor) + tokens(cursor, end) > cfg.max_prompt_tokens:
        step = max(1, (cursor - start) // 8)
        newline = text.find("\n", start + step, cursor)
        start = newline + 1 if newline >= 0 else start + step
    return start, end


def fim_cut(text: str, rng: random.Random, cfg: WorkloadConfig) -> FimCut:
    cursor = _cursor(text, rng)
    start, end = _window(text, cursor, cfg)
    prefix = text[start:cursor] or text[:1]             # the server refuses empty prompts
    return FimCut(prefix, text[cursor:end])


def hole_session(text: str, rng: random.Random, cfg: WorkloadConfig) -> list[FimCut]:
    """The requests of one user filling a hole: the cursor starts inside a line, the user types the
    file's real next characters 1..max_chars_per_keystroke at a time, and every request sends the
    prefix typed so far and the same suffix — the text after the hole, which typing never moves.
    The prefix window keeps its start for the session (editors slide it only now and then), so a
    request shares all but its last few tokens with the previous one: what the prefix cache and
    SPM prompts are for."""
    num = rng.randint(cfg.min_session_requests, cfg.max_session_requests)
    cursor = _cursor(text, rng)
    typed = [rng.randint(1, cfg.max_chars_per_keystroke) for _ in range(num - 1)]
    hole_end = min(len(text), cursor + sum(typed))
    start, end = _window(text, cursor, cfg)
    suffix = text[hole_end:hole_end + (end - cursor)]
    cuts, pos = [], cursor
    for step in [0, *typed]:
        pos = min(hole_end, pos + step)
        if pos > start:
            cuts.append(FimCut(text[start:pos], suffix))
        if pos >= hole_end and cuts:
            break                                  # ran out of file: the session ends early
    return cuts or [fim_cut(text, rng, cfg)]


def think_time(rng: random.Random, cfg: WorkloadConfig) -> float:
    return rng.uniform(cfg.min_think_s, cfg.max_think_s)


def chat_messages(text: str, rng: random.Random, cfg: WorkloadConfig) -> list[dict]:
    """A question about a snippet of the file, as an editor's chat panel would send it."""
    cut = fim_cut(text, rng, cfg)
    snippet = cut.prefix[-min(len(cut.prefix), cfg.max_prefix_chars // 2):]
    question = rng.choice(["Explain what this code does.", "Is there a bug here?",
                           "Write a docstring for the last function.", "How can I make this faster?"])
    return [{"role": "user", "content": f"{question}\n\n```python\n{snippet}\n```"}]


def max_tokens(rng: random.Random, cfg: WorkloadConfig) -> int:
    return rng.randint(cfg.min_tokens, cfg.max_tokens)


def nearest_rank(sorted_ms: list[float], q: float) -> float:
    if not sorted_ms:
        return math.nan
    return sorted_ms[max(0, math.ceil(q * len(sorted_ms)) - 1)]
