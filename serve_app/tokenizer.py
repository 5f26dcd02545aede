"""Tokenizer for code models: loading, FIM and chat prompts, stop ids.

Loading: `CodeTokenizer.from_dir(model_dir)` reads `tokenizer.json` (required, `tokenizers` format)
and, when present, `tokenizer_config.json` (eos/bos tokens, chat template, added tokens),
`chat_template.jinja` (wins over the config's template, as in transformers) and
`generation_config.json` (extra eos ids). `transformers` is never imported here; tests use it as
an oracle only.

Streaming: `serve_app/detokenizer.py`.

FIM (fill-in-the-middle): PSM order (prefix-token + prefix + suffix-token + suffix + middle-token),
or SPM when the checkpoint declares `"fim_order": "spm"` in tokenizer_config.json (serve_app/fim.py
says why and how long files are fitted), with the style detected from the vocabulary (see
`FIM_FORMATS`). Special tokens are inserted as single ids; the text parts are encoded separately,
so BPE never merges across a boundary.
CodeLlama follows Meta's reference `infilling_prompt_tokens`: "<PRE> {prefix} <SUF>{suffix} <MID>",
i.e. a space before the prefix text, none before the suffix text; the spaces in front of <SUF> and
<MID> belong to the real vocabulary's tokens ("▁<SUF>", "▁<MID>"), they are not extra text.

Chat: the model's Jinja `chat_template`, rendered as transformers does (sandboxed environment,
`trim_blocks`, `lstrip_blocks`, `raise_exception`, `messages`, `add_generation_prompt`,
`bos_token`, `eos_token`). Without one, `DEFAULT_CHAT_TEMPLATE`: each message becomes
"<|{role}|>\\n{content}\\n", and the generation prompt is "<|assistant|>\\n".

Stop ids: the eos id, the ids in `generation_config.json`'s `eos_token_id`, and those of the
end-of-turn tokens in `STOP_TOKEN_CANDIDATES` that exist in the vocabulary.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
import string
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Tokenizer

from serve_app.fim import (FIM_FORMATS, FIM_ORDERS, REPO_TOKENS, ContextFile, FimFormat,  # noqa: F401 (re-exported)
                           assemble, context_ids, fit, split_cursor_line)


class TokenizerError(ValueError):
    """The tokenizer files are missing, unreadable or inconsistent (names the file)."""


class PromptError(TokenizerError):
    """A prompt cannot be built: bad chat messages, a failing chat template, FIM unsupported."""


@dataclass(frozen=True)
class FimPrompt:
    ids: list[int]              # the prompt, in the checkpoint's FIM order
    dropped_tokens: int         # prefix/suffix tokens trimmed away to fit (0: nothing was)


# End-of-turn / end-of-document tokens that end generation when the vocabulary has them, besides
# eos: GPT/StarCoder/Qwen base, ChatML, Llama 3, Phi, DeepSeek, DeepSeek-Coder instruct, CodeLlama infill.
STOP_TOKEN_CANDIDATES: tuple[str, ...] = (
    "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<|eom_id|>",
    "<｜end▁of▁sentence｜>", "<|EOT|>", "▁<EOT>", "<EOT>",
)

CHAT_ROLES = ("system", "user", "assistant")

# Used when the model ships no chat template; a Jinja template so both paths render the same way.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_PUNCTUATION = frozenset(string.punctuation)   # ASCII: the brackets and operators of code
_PROBE_TEXT = "x"  # any plain text; encoding it shows what the post-processor adds around a text


@dataclass(frozen=True)
class ChatMessage:
    role: str      # one of CHAT_ROLES
    content: str   # the message text


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask markers in some HF templates) renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _compile_chat_template(source: str, origin: Path) -> jinja2.Template:
    # Same environment as transformers' apply_chat_template: templates come from the Hub (untrusted),
    # hence the sandbox; tojson without HTML escaping, as templates expect.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: (
        json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys))
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"chat template from {origin} does not compile: {e}") from e


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json spells special tokens as plain strings or as serialized AddedToken dicts.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template_source(model_dir: Path, cfg: Mapping[str, Any]) -> str | None:
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = cfg.get("chat_template")
    if isinstance(template, list):  # older multi-template form: [{"name": "default", "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _apply_added_tokens(tok: Tokenizer, cfg: Mapping[str, Any], cfg_path: Path) -> None:
    """Add tokens that tokenizer_config.json declares but tokenizer.json lacks, checking their ids."""
    declared = cfg.get("added_tokens_decoder") or {}
    try:
        entries = sorted((int(k), v) for k, v in declared.items())
    except (AttributeError, ValueError) as e:
        raise TokenizerError(f"{cfg_path}: added_tokens_decoder must map integer ids to tokens: {e}") from e
    for token_id, spec in entries:
        content = _token_content(spec)
        existing = tok.token_to_id(content) if content is not None else None
        if content is None or existing == token_id:
            continue
        next_id = tok.get_vocab_size(with_added_tokens=True)
        if existing is not None or token_id != next_id:
            raise TokenizerError(f"{cfg_path}: added token {content!r} declared with id {token_id}, but "
                                 f"tokenizer.json has it at {existing} (next free id {next_id})")
        special = isinstance(spec, dict) and bool(spec.get("special", False))
        tok.add_tokens([AddedToken(content, special=special, normalized=not special)])


def _without_dummy_prefix(tok: Tokenizer) -> Tokenizer:
    """A copy that never prepends "▁"/" " to its input, for FIM text fragments mid-prompt."""
    def strip(node: Any) -> Any:
        if isinstance(node, list):
            return [strip(n) for n in node if not (isinstance(n, dict) and n.get("type") == "Prepend")]
        if isinstance(node, dict):
            node = {k: strip(v) for k, v in node.items()}
            if node.get("type") == "Metaspace":
                node["prepend_scheme"] = "never"
                node["add_prefix_space"] = False
            elif node.get("type") == "ByteLevel":
                node["add_prefix_space"] = False
        return node

    spec = json.loads(tok.to_str())
    changed = dict(spec)
    for key in ("normalizer", "pre_tokenizer"):
        node = strip(spec.get(key))
        changed[key] = None if isinstance(node, dict) and node.get("type") == "Prepend" else node
    # Most code tokenizers (byte-level BPE) have no dummy prefix: share the original, no second copy.
    return tok if changed == spec else Tokenizer.from_str(json.dumps(changed))


class CodeTokenizer:
    """A `tokenizers.Tokenizer` plus what serving needs from the model directory's configs."""

    def __init__(self, tokenizer: Tokenizer, *, eos_token: str | None = None, bos_token: str | None = None,
                 chat_template: str | None = None, extra_eos_ids: Sequence[int] = (),
                 source: Path = Path("<memory>"), fim_order: str = "psm") -> None:
        if fim_order not in FIM_ORDERS:
            raise TokenizerError(f"{source / 'tokenizer_config.json'}: fim_order {fim_order!r} is not one of "
                                 f"{', '.join(FIM_ORDERS)}")
        self.fim_order = fim_order   # the order FIM prompts are built in (the checkpoint's training)
        self._tok = tokenizer
        self.source = source  # model directory, named in error messages
        self.eos_token, self.bos_token = eos_token, bos_token
        self.eos_token_id = self._special_id(eos_token, "eos_token")
        self.bos_token_id = self._special_id(bos_token, "bos_token")
        self._extra_eos_ids = tuple(extra_eos_ids)
        self.chat_template = chat_template  # None: DEFAULT_CHAT_TEMPLATE is used
        self._chat = _compile_chat_template(chat_template or DEFAULT_CHAT_TEMPLATE, source)
        self._fragment_tok = _without_dummy_prefix(tokenizer)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> CodeTokenizer:
        model_dir = Path(model_dir)
        tok_path = model_dir / "tokenizer.json"
        if not tok_path.is_file():
            raise TokenizerError(f"tokenizer.json not found: {tok_path}")
        try:
            tok = Tokenizer.from_file(str(tok_path))
        except Exception as e:  # tokenizers raises bare Exception on malformed JSON
            raise TokenizerError(f"cannot load {tok_path}: {e}") from e
        cfg_path = model_dir / "tokenizer_config.json"
        cfg = _read_json(cfg_path) if cfg_path.is_file() else {}
        _apply_added_tokens(tok, cfg, cfg_path)
        gen_path = model_dir / "generation_config.json"
        gen_eos = _read_json(gen_path).get("eos_token_id") if gen_path.is_file() else None
        extra = gen_eos if isinstance(gen_eos, list) else [gen_eos] if isinstance(gen_eos, int) else []
        return cls(tok, eos_token=_token_content(cfg.get("eos_token")),
                   bos_token=_token_content(cfg.get("bos_token")),
                   chat_template=_chat_template_source(model_dir, cfg), extra_eos_ids=extra, source=model_dir,
                   fim_order=cfg.get("fim_order") or "psm")

    def _special_id(self, token: str | None, field: str) -> int | None:
        if token is None:
            return None
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{self.source / 'tokenizer_config.json'}: {field} {token!r} is not in the vocabulary")
        return token_id

    # -- basic encode / decode ------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @cached_property
    def leading_special_ids(self) -> tuple[int, ...]:
        """Ids the post-processor puts before a text (usually bos), as `encode(..., add_special_tokens=True)` would."""
        enc = self._tok.encode(_PROBE_TEXT, add_special_tokens=True)
        lead = []
        for token_id, is_special in zip(enc.ids, enc.special_tokens_mask):
            if not is_special:
                break
            lead.append(token_id)
        return tuple(lead)

    @cached_property
    def stop_token_ids(self) -> tuple[int, ...]:
        """eos, generation_config eos ids, and the end-of-turn tokens of STOP_TOKEN_CANDIDATES in the vocabulary."""
        found = [self.eos_token_id, *self._extra_eos_ids, *(self._tok.token_to_id(t) for t in STOP_TOKEN_CANDIDATES)]
        return tuple(sorted({i for i in found if i is not None}))

    @cached_property
    def structural_token_ids(self) -> tuple[int, ...]:
        """Ids whose text is only whitespace and ASCII punctuation (indents, newlines, brackets,
        colons, commas): what code repeats by nature, which a penalty with
        `penalty_skips_structural` leaves alone. Special tokens are not structural. One decode per
        vocabulary entry, on first use (~1 s for a 150k vocabulary)."""
        special = set(self._tok.get_added_tokens_decoder())
        out = []
        for token_id in range(self.vocab_size):
            if token_id in special:
                continue
            text = self._tok.decode([token_id], skip_special_tokens=False)
            if text and all(c.isspace() or c in _PUNCTUATION for c in text):
                out.append(token_id)
        return tuple(out)

    # -- FIM ------------------------------------------------------------------------------------

    @cached_property
    def fim_format(self) -> FimFormat | None:
        """The FIM style whose three tokens are all in the vocabulary; None when the model has none."""
        for fmt in FIM_FORMATS:
            if all(self._tok.token_to_id(t) is not None for t in fmt.tokens):
                return fmt
        return None

    def build_fim_prompt_ids(self, prefix: str, suffix: str, add_special_tokens: bool = True,
                             order: str | None = None, cursor_line_after_middle: bool = True) -> list[int]:
        """FIM prompt ids in `order` (default: the checkpoint's `fim_order`); `add_special_tokens`
        prepends what the post-processor adds (e.g. bos); `cursor_line_after_middle=False` gives
        plain PSM (bench/fim_cursor_line.py compares the two)."""
        return self.build_fim_prompt(prefix, suffix, None, add_special_tokens, order,
                                     cursor_line_after_middle=cursor_line_after_middle).ids

    def build_fim_prompt(self, prefix: str, suffix: str, max_prompt_tokens: int | None,
                         add_special_tokens: bool = True, order: str | None = None,
                         context: Sequence[ContextFile] = (), cursor_line_after_middle: bool = True) -> FimPrompt:
        """Like build_fim_prompt_ids, trimmed at its far ends to at most `max_prompt_tokens` (fim.fit),
        after other files' `context` where it leaves room (fim.context_ids)."""
        fmt = self._checked_fim_format(prefix, suffix)
        order = order or self.fim_order
        ids = tuple(self._tok.token_to_id(t) for t in fmt.tokens)
        lead = list(self.leading_special_ids) if add_special_tokens else []

        def encode_prefix(text: str) -> tuple[list[int], list[int]]:
            """(ids of the prefix part, ids after <MID>): PSM moves the cursor's line after <MID>."""
            head, line = split_cursor_line(text) if order == "psm" and cursor_line_after_middle else (text, "")
            head = " " + head if fmt.space_before_prefix and head else head
            return self._encode_fragment(head), self._encode_fragment(line)

        pre, suf, dropped = encode_prefix(prefix), self._encode_fragment(suffix), 0
        room = None if max_prompt_tokens is None else max_prompt_tokens - len(lead) - 3
        if room is not None and len(pre[0]) + len(pre[1]) + len(suf) > room:   # else encoded once
            parts = fit(prefix, suffix, room, lambda text: len(self._encode_fragment(text)),
                        lambda text: sum(map(len, encode_prefix(text))))
            pre, suf, dropped = encode_prefix(parts.prefix), self._encode_fragment(parts.suffix), parts.dropped_tokens
        left = None if room is None else room - len(pre[0]) - len(pre[1]) - len(suf)
        extra, extra_dropped = context_ids(context, self.repo_token_ids, self._encode_fragment, left)
        return FimPrompt(assemble(order, [*lead, *extra], ids, pre[0], suf, pre[1]), dropped + extra_dropped)

    @cached_property
    def repo_token_ids(self) -> tuple[int, int] | None:
        """(repo name, file separator) ids of the first REPO_TOKENS pair in the vocabulary; None if none is."""
        for names in REPO_TOKENS:
            found = tuple(self._tok.token_to_id(t) for t in names)
            if None not in found:
                return found
        return None

    def _checked_fim_format(self, prefix, suffix) -> FimFormat:
        fmt = self.fim_format
        if fmt is None:
            looked_for = "; ".join(f"{f.name} {' '.join(f.tokens)}" for f in FIM_FORMATS)
            raise PromptError(f"FIM is unsupported by the tokenizer in {self.source}: none of these token sets "
                              f"is in its vocabulary: {looked_for}")
        if not isinstance(prefix, str) or not isinstance(suffix, str):
            raise PromptError(f"FIM prefix and suffix must be str, got {type(prefix).__name__}, "
                              f"{type(suffix).__name__}")
        return fmt

    def encode_fragment(self, text: str) -> list[int]:
        """Ids of text that continues other text (a suggestion's rest, a prompt's middle): no
        SentencePiece dummy-prefix space, no special tokens."""
        return self._encode_fragment(text)

    def _encode_fragment(self, text: str) -> list[int]:
        # Mid-prompt text must not get a SentencePiece dummy-prefix space: Meta's encode_infilling
        # strips it from the suffix, and the CodeLlama prefix space is added explicitly above.
        return self._fragment_tok.encode(text, add_special_tokens=False).ids if text else []

    # -- chat -----------------------------------------------------------------------------------

    def render_chat(self, messages: Sequence[ChatMessage | Mapping[str, Any]],
                    add_generation_prompt: bool = True) -> str:
        plain = _validate_messages(messages)
        specials = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token)) if v is not None}
        try:
            # tools/documents are passed as None (not left undefined) because templates test `is not none`.
            return self._chat.render(messages=plain, add_generation_prompt=add_generation_prompt,
                                     tools=None, documents=None, **specials)
        except (jinja2.TemplateError, TypeError) as e:  # TypeError: template arithmetic on bad values
            raise PromptError(f"chat template of {self.source} rejected the messages: {e}") from e

    def build_chat_prompt_ids(self, messages: Sequence[ChatMessage | Mapping[str, Any]],
                              add_generation_prompt: bool = True) -> list[int]:
        # No post-processor specials: templates write bos themselves (transformers does the same).
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)


def _validate_messages(messages: Sequence[ChatMessage | Mapping[str, Any]]) -> list[dict[str, str]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise PromptError(f"messages must be a non-empty list of messages, got {messages!r:.80}")
    plain = []
    for i, msg in enumerate(messages):
        if isinstance(msg, ChatMessage):
            role, content = msg.role, msg.content
        elif isinstance(msg, Mapping):
            role, content = msg.get("role"), msg.get("content")
        else:
            raise PromptError(f"messages[{i}] must be a ChatMessage or a mapping, got {type(msg).__name__}")
        if role not in CHAT_ROLES:
            raise PromptError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise PromptError(f"messages[{i}].content must be a str, got {type(content).__name__}")
        plain.append({"role": role, "content": content})
    return plain
