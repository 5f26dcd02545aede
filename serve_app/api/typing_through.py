"""Typing-through drafts: when the user types what the server just suggested, the rest of that
suggestion is a free draft.

An editor asks for a completion at the cursor and shows it as ghost text; the user types it, or
accepts it word by word, and every keystroke sends a new request: the text before the cursor is the
previous one plus the characters just typed, the text after it unchanged. When those characters
begin the previous suggestion, its rest is what the model will most likely generate again: it goes
to the engine as the request's draft tokens (`SamplingParams.draft_token_ids`), which the
speculative machinery verifies in one step (engine/speculative.py). What comes out is exactly what
the request produces without them (greedy; sampled requests keep their distribution), in fewer
steps. Editor plugins (Cody, llama.vim) cache suggestions on the client; this is the server's side.

What is kept: per hole — the request kind and context files, the text after the cursor and the
first characters of the text before it — the last few suggestions, in this process's memory,
bounded, expiring after `ttl_s`; never logged (the code is the user's). Only single-candidate
requests are remembered and drafted (n = 1, no best_of).
"""
from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Callable

from serve_app.engine import RequestOutput
from serve_app.tokenizer import CodeTokenizer


@dataclass(frozen=True)
class Hole:
    """Where an editor is typing: everything in the request but the text before the cursor."""
    scope: str                   # request kind and a digest of its context files (llama.cpp's input_extra)
    prompt: str                  # the text before the cursor (a completion's prompt, an FIM prefix)
    suffix: str                  # the text after it ("" for a plain completion)


class SuggestionMemory:
    """The last suggestions per hole, to turn into drafts when the user types them."""

    def __init__(self, tokenizer: CodeTokenizer, max_holes: int = 4096, per_hole: int = 4, ttl_s: float = 120.0,
                 anchor_chars: int = 32, max_draft_tokens: int = 64, clock: Callable[[], float] = time.monotonic):
        """anchor_chars: holes are told apart by this many leading characters of the prompt (and the
        suffix), so a growing prompt stays in its hole; shorter prompts are not remembered."""
        self.tokenizer = tokenizer
        self.max_holes, self.per_hole, self.ttl_s = max_holes, per_hole, ttl_s
        self.anchor_chars, self.max_draft_tokens, self.clock = anchor_chars, max_draft_tokens, clock
        # per hole: (when, prompt length, prompt digest, suggestion text, its token ids), oldest first
        self._holes: OrderedDict[tuple, deque[tuple[float, int, bytes, str, tuple[int, ...]]]] = OrderedDict()
        self._lock = threading.Lock()           # the batch path and the llama.cpp path share one memory

    def draft(self, hole: Hole) -> list[int]:
        """Token ids of the rest of a recent suggestion whose prompt plus the start of its text is
        this prompt; [] when there is none."""
        key = self._key(hole)
        if key is None:
            return []
        now = self.clock()
        with self._lock:
            entries = list(self._holes.get(key, ()))
        for at, length, digest, text, token_ids in reversed(entries):   # the newest first
            if now - at > self.ttl_s or length > len(hole.prompt) or _digest(hole.prompt[:length]) != digest:
                continue
            typed = hole.prompt[length:]
            if len(typed) < len(text) and text.startswith(typed):
                return self._rest(token_ids, text, typed)[:self.max_draft_tokens]
        return []

    def _rest(self, token_ids: tuple[int, ...], text: str, typed: str) -> list[int]:
        """The suggestion's tokens after the typed characters: its own ids where the typed text ends
        on one of its token boundaries (a word accepted, the same cursor asked again), else the
        rest of its text tokenized."""
        for j in range(len(token_ids) + 1 if token_ids else 0):
            decoded = self.tokenizer.decode(list(token_ids[:j]))
            if decoded == typed:
                return list(token_ids[j:])
            if len(decoded) > len(typed):
                break
        return self.tokenizer.encode_fragment(text[len(typed):])

    def remember(self, hole: Hole, text: str, token_ids: tuple[int, ...] = ()) -> None:
        key = self._key(hole)
        if key is None or not text:
            return
        now = self.clock()
        entry = (now, len(hole.prompt), _digest(hole.prompt), text, tuple(token_ids))
        with self._lock:
            entries = self._holes.pop(key, None) or deque(maxlen=self.per_hole)
            while entries and now - entries[0][0] > self.ttl_s:
                entries.popleft()
            entries.append(entry)
            self._holes[key] = entries                       # most recently written last
            # Holes are in write order: the oldest first, so expired ones go from the front.
            while self._holes and (len(self._holes) > self.max_holes
                                   or now - next(iter(self._holes.values()))[-1][0] > self.ttl_s):
                self._holes.popitem(last=False)

    def on_finished(self, hole: Hole) -> Callable[[RequestOutput], None]:
        """The hook a prepared request calls with its final output (api/streaming.start_generation)."""
        def remember(final: RequestOutput) -> None:
            if final.outputs and final.outputs[0].finish_reason in ("stop", "length"):
                self.remember(hole, final.outputs[0].text, tuple(final.outputs[0].token_ids))
        return remember

    def keeps(self, hole: Hole) -> bool:
        """Whether suggestions for this hole are remembered at all (its prompt is long enough)."""
        return self._key(hole) is not None

    def __len__(self) -> int:
        """Suggestions held."""
        with self._lock:
            return sum(len(e) for e in self._holes.values())

    def _key(self, hole: Hole) -> tuple | None:
        if len(hole.prompt) < self.anchor_chars:
            return None
        return hole.scope, _digest(hole.suffix), hole.prompt[:self.anchor_chars]


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def context_scope(kind: str, context) -> str:
    """A hole's scope: the request kind and a digest of its other files' chunks."""
    digest = hashlib.sha256()
    for chunk in context:
        digest.update(chunk.filename.encode("utf-8", "surrogatepass") + b"\0"
                      + chunk.text.encode("utf-8", "surrogatepass") + b"\0")
    return f"{kind}:{digest.hexdigest()[:16]}"
