"""Incremental detokenization: generated ids to final text deltas.

`IncrementalDetokenizer.add(token_id)` returns the text that became final. Byte-level
BPE can split one character (emoji, CJK) over several tokens; while the decoded window ends in
U+FFFD the text is held back, and `flush()` releases whatever is still held when generation ends.
Contract: the concatenation of all deltas plus `flush()` is the text the generated ids add after
the prompt, `decode(prompt + generated)[len(decode(prompt)):]`. For byte-level tokenizers that is
exactly `decode(generated)`; for SentencePiece-style decoders, which strip a leading space from a
sequence, it keeps the space a first generated token "▁world" really adds after the prompt.
ByteFallback decoders (Llama) turn a whole run of byte tokens into U+FFFD when the run is not valid
UTF-8, so there the contract holds for output that is valid UTF-8; a stray invalid byte can make
already-emitted text differ from a later full decode.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serve_app.tokenizer import CodeTokenizer

# How many prompt tokens give the first generated token its context: enough to start on a character
# boundary and for SentencePiece decoders to keep a leading space; few, so each step decodes little.
_PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns generated ids into final text deltas, never ending a delta inside a UTF-8 character.

    Keeps a window ids[prefix_offset:]: the text of ids[prefix_offset:read_offset] was emitted already,
    so each step decodes a few tokens, not the whole output (vLLM's scheme). A delta is released only
    when the window's text does not end in U+FFFD, i.e. read_offset always sits on a character boundary.
    """

    def __init__(self, tokenizer: CodeTokenizer, prompt_ids: Sequence[int] = (),
                 skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        context = self._prompt_context(list(prompt_ids))
        self._ids = context
        self._num_context = len(context)
        self._prefix_offset = 0
        self._read_offset = len(context)

    def _prompt_context(self, prompt_ids: list[int]) -> list[int]:
        # Start the window on a character boundary: one starting inside a character decodes to U+FFFD,
        # and ByteFallback decoders then blank the whole run of byte tokens, valid bytes included.
        # A UTF-8 character is at most 4 bytes, so a few steps back always find a boundary in valid text.
        n = len(prompt_ids)
        for start in range(max(n - _PROMPT_CONTEXT_TOKENS, 0), max(n - _PROMPT_CONTEXT_TOKENS - 4, -1), -1):
            context = prompt_ids[start:]
            text = self._decode(context)
            if not text.startswith("\ufffd"):
                break
        # A prompt ending inside a character has no stable text to diff against: decode without context.
        return [] if text.endswith("\ufffd") else context

    @property
    def output_ids(self) -> list[int]:
        return self._ids[self._num_context:]

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def add(self, token_id: int) -> str:
        """Appends one generated id; returns the text that is now final (possibly "")."""
        self._ids.append(token_id)
        return self._release(final=False)

    def flush(self) -> str:
        """Releases text held back at the end of generation (e.g. an unfinished character as U+FFFD)."""
        return self._release(final=True) if self._read_offset < len(self._ids) else ""

    def _release(self, final: bool) -> str:
        new_text = self._decode(self._ids[self._prefix_offset:])
        if new_text.endswith("\ufffd") and not final:
            return ""  # a multi-byte character may still be completed by the next tokens
        delta = new_text[len(self._decode(self._ids[self._prefix_offset:self._read_offset])):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return delta
