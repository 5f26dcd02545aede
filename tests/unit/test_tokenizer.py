"""serve_app.tokenizer: loading, incremental detokenization, FIM and chat prompts, stop ids.

transformers is the oracle for encode/decode and chat-template rendering; for CodeLlama FIM the oracle
is Meta's reference `infilling_prompt_tokens` (transformers 5 puts a "▁" before the suffix, Meta does not).
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serve_app.tokenizer import (
    DEFAULT_CHAT_TEMPLATE, ChatMessage, CodeTokenizer, FimFormat, PromptError,
    TokenizerError,
)
from serve_app.detokenizer import IncrementalDetokenizer
from tests.helpers.factories import FIM_STYLES, build_sentencepiece_tokenizer, build_tokenizer

HYPOTHESIS = settings(max_examples=150, deadline=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture])

# Multi-byte characters, most of them absent from the tiny vocabularies, so they split into byte tokens.
TRICKY_TEXT = st.text(alphabet=st.sampled_from(list("ab \n\té ü—✓你好世界🙂🚀👨‍👩‍👧ñ∑€𝔘")), max_size=40)

CHATML_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' and not loop.first %}"
    "{{ raise_exception('system must come first') }}{% endif %}\n"
    "    <|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}{{ eos_token | length }}"
)

MESSAGES = [
    {"role": "system", "content": "You write Python."},
    {"role": "user", "content": "Sort a list — quickly 🙂"},
    {"role": "assistant", "content": "sorted(xs)"},
    {"role": "user", "content": "Again, 你好"},
]


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tok")
    dirs = {style: build_tokenizer(root / style, fim_style=style) for style in FIM_STYLES}
    dirs["sentencepiece"] = build_sentencepiece_tokenizer(root / "sentencepiece")
    return dirs


@pytest.fixture(scope="module")
def tok(tok_dirs: dict[str, Path]) -> CodeTokenizer:
    return CodeTokenizer.from_dir(tok_dirs["starcoder"])


@pytest.fixture(scope="module")
def sp_tok(tok_dirs: dict[str, Path]) -> CodeTokenizer:
    return CodeTokenizer.from_dir(tok_dirs["sentencepiece"])


def _write_config(model_dir: Path, **fields: object) -> None:
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    cfg.update(fields)
    (model_dir / "tokenizer_config.json").write_text(json.dumps(cfg))


def _stream(tokenizer: CodeTokenizer, prompt_ids: list[int], gen_ids: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    return [detok.add(i) for i in gen_ids] + [detok.flush()]


# -- loading, encode/decode -------------------------------------------------------------------------

def test_missing_tokenizer_json_raises_error_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="tokenizer.json not found.*tokenizer.json"):
        CodeTokenizer.from_dir(tmp_path)


def test_corrupt_tokenizer_json_raises_error_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"cannot load .*tokenizer\.json"):
        CodeTokenizer.from_dir(tmp_path)


def test_corrupt_tokenizer_config_raises_error_naming_the_file(tmp_path: Path) -> None:
    build_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json"):
        CodeTokenizer.from_dir(tmp_path)


def test_eos_token_not_in_vocab_raises_error_naming_the_token(tmp_path: Path) -> None:
    build_tokenizer(tmp_path)
    _write_config(tmp_path, eos_token="<|no_such_token|>")
    with pytest.raises(TokenizerError, match=r"eos_token '<\|no_such_token\|>'"):
        CodeTokenizer.from_dir(tmp_path)


def test_tokenizer_without_config_loads_with_no_eos(tmp_path: Path) -> None:
    build_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    t = CodeTokenizer.from_dir(tmp_path)
    assert t.eos_token_id is None and t.chat_template is None
    assert t.stop_token_ids == (t.token_to_id("<|endoftext|>"),)  # still found by name


def test_eos_token_given_as_added_token_dict_is_understood(tmp_path: Path) -> None:
    build_tokenizer(tmp_path)
    _write_config(tmp_path, eos_token={"__type": "AddedToken", "content": "<file_sep>", "special": True})
    t = CodeTokenizer.from_dir(tmp_path)
    assert t.eos_token == "<file_sep>" and t.eos_token_id == t.token_to_id("<file_sep>")


def test_encode_and_decode_match_transformers(tok_dirs: dict[str, Path]) -> None:
    from transformers import PreTrainedTokenizerFast

    for name in ("starcoder", "sentencepiece"):
        ours = CodeTokenizer.from_dir(tok_dirs[name])
        oracle = PreTrainedTokenizerFast(tokenizer_file=str(tok_dirs[name] / "tokenizer.json"))
        text = "def f(x):\n    return x  # héllo 🙂 你好\n"
        ids = ours.encode(text)
        assert ids == oracle.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == oracle.decode(ids) == text
        assert ours.vocab_size == len(oracle)


def test_encode_with_special_tokens_adds_bos_for_llama_style(sp_tok: CodeTokenizer) -> None:
    assert sp_tok.encode("x", add_special_tokens=True)[0] == sp_tok.bos_token_id == sp_tok.token_to_id("<s>")
    assert sp_tok.bos_token_id not in sp_tok.encode("x")


def test_added_token_declared_only_in_config_is_added_with_its_id(tmp_path: Path) -> None:
    build_tokenizer(tmp_path)
    next_id = CodeTokenizer.from_dir(tmp_path).vocab_size
    _write_config(tmp_path, added_tokens_decoder={str(next_id): {"content": "<|im_end|>", "special": True}})
    t = CodeTokenizer.from_dir(tmp_path)
    assert t.token_to_id("<|im_end|>") == next_id
    assert t.encode("a<|im_end|>")[-1] == next_id  # matched whole, never split by BPE
    assert next_id in t.stop_token_ids


def test_added_token_with_conflicting_id_raises(tmp_path: Path) -> None:
    build_tokenizer(tmp_path)
    _write_config(tmp_path, added_tokens_decoder={"5": {"content": "<|endoftext|>", "special": True}})
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json.*'<\|endoftext\|>'.*id 5"):
        CodeTokenizer.from_dir(tmp_path)


def test_serve_app_tokenizer_does_not_import_transformers() -> None:
    code = "import sys, serve_app.tokenizer; sys.exit('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[2]).returncode == 0


# -- incremental detokenization ---------------------------------------------------------------------

def test_emoji_split_over_byte_tokens_is_held_until_complete(tok: CodeTokenizer) -> None:
    ids = tok.encode("🚀")
    assert len(ids) > 1  # not in the tiny vocabulary: one token per byte
    deltas = _stream(tok, tok.encode("x = "), ids)
    assert deltas[:-2] == [""] * (len(ids) - 1) and deltas[-2] == "🚀" and deltas[-1] == ""


def test_flush_releases_an_unfinished_character(tok: CodeTokenizer) -> None:
    ids = tok.encode("a🚀")[:-1]  # last byte of the emoji never arrives
    deltas = _stream(tok, [], ids)
    assert deltas[0] == "a" and "".join(deltas[1:-1]) == ""
    assert deltas[-1] == "\ufffd" and "".join(deltas) == tok.decode(ids)


@HYPOTHESIS
@given(prompt=TRICKY_TEXT, text=TRICKY_TEXT)
def test_deltas_of_encoded_text_concatenate_to_the_text(tok: CodeTokenizer, prompt: str, text: str) -> None:
    deltas = _stream(tok, tok.encode(prompt), tok.encode(text))
    assert "".join(deltas) == tok.decode(tok.encode(text)) == text
    assert not any("\ufffd" in d for d in deltas)  # never a broken character on the way


@HYPOTHESIS
@given(data=st.data())
def test_deltas_of_random_ids_concatenate_to_decode(tok: CodeTokenizer, data: st.DataObject) -> None:
    ids = st.lists(st.integers(0, tok.vocab_size - 1), max_size=30)
    prompt, gen = data.draw(ids), data.draw(ids)
    assert "".join(_stream(tok, prompt, gen)) == tok.decode(gen)


@HYPOTHESIS
@given(prompt=TRICKY_TEXT, text=TRICKY_TEXT)
def test_sentencepiece_deltas_are_the_text_added_after_the_prompt(
        sp_tok: CodeTokenizer, prompt: str, text: str) -> None:
    text = text.lstrip(" ")  # so the dummy prefix is the only leading space
    prompt_ids, gen = sp_tok.encode(prompt + "#"), sp_tok.encode(text)  # gen starts with the dummy "▁"
    deltas = _stream(sp_tok, prompt_ids, gen)
    full = sp_tok.decode(prompt_ids + gen)
    assert "".join(deltas) == full[len(sp_tok.decode(prompt_ids)):] == (" " + text if text else "")
    assert not any("\ufffd" in d for d in deltas)


def test_sentencepiece_first_token_keeps_its_leading_space(sp_tok: CodeTokenizer) -> None:
    gen = sp_tok.encode("return x")  # starts with the dummy-prefix "▁"
    assert sp_tok.decode(gen) == "return x"  # a standalone decode strips the space...
    assert "".join(_stream(sp_tok, sp_tok.encode("def f():"), gen)) == " return x"  # ...the stream keeps it


# -- FIM --------------------------------------------------------------------------------------------

# The prefix ends at a line start, so these layouts are the references' (the cursor's line goes after
# <MID> in PSM; tests/unit/test_fim_prompts.py covers that).
PREFIX, SUFFIX = "def add(a, b):\n", "\n    return c\n"


@pytest.mark.parametrize("style", ["starcoder", "qwen", "deepseek"])
def test_fim_prompt_is_prefix_suffix_middle_with_single_special_ids(tok_dirs: dict[str, Path], style: str) -> None:
    t = CodeTokenizer.from_dir(tok_dirs[style])
    pre, suf, mid = FIM_STYLES[style]
    assert t.fim_format == FimFormat(style, pre, suf, mid)
    ids = t.build_fim_prompt_ids(PREFIX, SUFFIX)
    pre_id, suf_id, mid_id = (t.token_to_id(s) for s in (pre, suf, mid))
    assert ids == [pre_id, *t.encode(PREFIX), suf_id, *t.encode(SUFFIX), mid_id]
    assert t.decode(ids, skip_special_tokens=False) == f"{pre}{PREFIX}{suf}{SUFFIX}{mid}"


def test_fim_special_tokens_are_never_split_even_next_to_angle_brackets(tok: CodeTokenizer) -> None:
    ids = tok.build_fim_prompt_ids("x = 1\n", "> b\n")
    fim_ids = [tok.token_to_id(s) for s in FIM_STYLES["starcoder"]]
    assert [i for i in ids if i in fim_ids] == fim_ids  # each exactly once, in PSM order
    assert tok.decode(ids) == "x = 1\n> b\n"
    ids = tok.build_fim_prompt_ids("x = a <", "> b\n")     # the cursor's line "x = a <" after <MID>
    assert [i for i in ids if i in fim_ids] == fim_ids
    assert tok.decode(ids, skip_special_tokens=False).endswith(f"{FIM_STYLES['starcoder'][2]}x = a <")


def test_codellama_fim_byte_level_puts_a_space_before_the_prefix_only(tok_dirs: dict[str, Path]) -> None:
    t = CodeTokenizer.from_dir(tok_dirs["codellama"])
    assert t.fim_format is not None and t.fim_format.name == "codellama"
    ids = t.build_fim_prompt_ids(PREFIX, SUFFIX)
    assert t.decode(ids, skip_special_tokens=False) == f"<PRE> {PREFIX}<SUF>{SUFFIX}<MID>"
    assert t.decode(t.build_fim_prompt_ids("", SUFFIX), skip_special_tokens=False) == f"<PRE><SUF>{SUFFIX}<MID>"


def test_codellama_fim_sentencepiece_follows_meta_reference(sp_tok: CodeTokenizer) -> None:
    # Meta's infilling_prompt_tokens: [bos, PRE] + encode(pre) + [SUF] + encode_infilling(suf) + [MID],
    # where encode adds the dummy "▁" and encode_infilling strips it.
    ids = sp_tok.build_fim_prompt_ids(PREFIX, SUFFIX)
    pre_id, suf_id, mid_id = (sp_tok.token_to_id(s) for s in ("▁<PRE>", "▁<SUF>", "▁<MID>"))
    assert ids[:2] == [sp_tok.bos_token_id, pre_id] and ids[-1] == mid_id
    split = ids.index(suf_id)
    assert ids[2:split] == sp_tok.encode(PREFIX)
    assert sp_tok.id_to_token(ids[split + 1]) != "▁" and sp_tok.decode(ids[split + 1:-1]) == SUFFIX
    assert sp_tok.decode(ids, skip_special_tokens=False) == f"<s> <PRE> {PREFIX} <SUF>{SUFFIX} <MID>"
    assert sp_tok.build_fim_prompt_ids(PREFIX, SUFFIX, add_special_tokens=False) == ids[1:]


def test_fim_unsupported_names_the_tokens_looked_for(tok_dirs: dict[str, Path]) -> None:
    t = CodeTokenizer.from_dir(tok_dirs["none"])
    assert t.fim_format is None
    with pytest.raises(PromptError, match="FIM is unsupported") as err:
        t.build_fim_prompt_ids("a", "b")
    for tokens in FIM_STYLES.values():
        assert all(s in str(err.value) for s in tokens)


def test_fim_format_is_frozen(tok: CodeTokenizer) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        tok.fim_format.prefix_token = "<x>"  # type: ignore[union-attr, misc]


# -- chat -------------------------------------------------------------------------------------------

def test_default_chat_format_without_template(tok: CodeTokenizer) -> None:
    assert tok.chat_template is None
    text = tok.render_chat([ChatMessage("system", "Be brief."), {"role": "user", "content": "hi"}])
    assert text == "<|system|>\nBe brief.\n<|user|>\nhi\n<|assistant|>\n"
    assert tok.render_chat([ChatMessage("user", "hi")], add_generation_prompt=False) == "<|user|>\nhi\n"


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, DEFAULT_CHAT_TEMPLATE])
def test_chat_template_renders_like_transformers(tmp_path: Path, template: str) -> None:
    from transformers import PreTrainedTokenizerFast

    build_tokenizer(tmp_path, chat_template=template)
    t = CodeTokenizer.from_dir(tmp_path)
    oracle = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), eos_token="<|endoftext|>")
    expected = oracle.apply_chat_template(MESSAGES, chat_template=template, tokenize=False, add_generation_prompt=True)
    assert t.render_chat(MESSAGES) == expected
    assert t.build_chat_prompt_ids(MESSAGES) == oracle.apply_chat_template(
        MESSAGES, chat_template=template, tokenize=True, add_generation_prompt=True, return_dict=False)


def test_chat_template_raise_exception_becomes_prompt_error(tmp_path: Path) -> None:
    build_tokenizer(tmp_path, chat_template=CHATML_TEMPLATE)
    t = CodeTokenizer.from_dir(tmp_path)
    with pytest.raises(PromptError, match="system must come first"):
        t.render_chat([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])


def test_chat_template_generation_tags_render_their_body(tmp_path: Path) -> None:
    build_tokenizer(tmp_path, chat_template="{% for m in messages %}{% generation %}[{{ m.content }}]"
                                            "{% endgeneration %}{% endfor %}")
    rendered = CodeTokenizer.from_dir(tmp_path).render_chat(MESSAGES[:2])
    assert rendered == "[You write Python.][Sort a list — quickly 🙂]"


def test_chat_template_jinja_file_wins_over_config(tmp_path: Path) -> None:
    build_tokenizer(tmp_path, chat_template="from config")
    (tmp_path / "chat_template.jinja").write_text("from file {{ messages | length }}")
    assert CodeTokenizer.from_dir(tmp_path).render_chat(MESSAGES) == "from file 4"


def test_chat_template_syntax_error_raises_at_load(tmp_path: Path) -> None:
    build_tokenizer(tmp_path, chat_template="{% for m in messages %}")
    with pytest.raises(TokenizerError, match="does not compile"):
        CodeTokenizer.from_dir(tmp_path)


def test_chat_template_cannot_escape_the_sandbox(tmp_path: Path) -> None:
    build_tokenizer(tmp_path, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(PromptError):
        CodeTokenizer.from_dir(tmp_path).render_chat(MESSAGES)


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty list"),
    ([{"role": "tool", "content": "x"}], r"messages\[0\]\.role .*'tool'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": None}], r"messages\[1\]\.content .*NoneType"),
    ([{"role": "user"}], r"messages\[0\]\.content"),
    (["hello"], r"messages\[0\] must be a ChatMessage"),
    ("hello", "non-empty list"),
])
def test_invalid_chat_messages_raise_prompt_error_naming_the_message(
        tok: CodeTokenizer, messages: list, match: str) -> None:
    with pytest.raises(PromptError, match=match):
        tok.render_chat(messages)


# -- stop ids ---------------------------------------------------------------------------------------

def test_stop_ids_include_eos_end_of_turn_tokens_and_generation_config(tmp_path: Path) -> None:
    build_tokenizer(tmp_path)
    base = CodeTokenizer.from_dir(tmp_path)
    n = base.vocab_size
    _write_config(tmp_path, eos_token="<file_sep>", added_tokens_decoder={
        str(n): {"content": "<|im_end|>", "special": True}, str(n + 1): {"content": "<|eot_id|>", "special": True}})
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 8]}))
    t = CodeTokenizer.from_dir(tmp_path)
    expected = {t.token_to_id("<file_sep>"), t.token_to_id("<|endoftext|>"), n, n + 1, 7, 8}
    assert set(t.stop_token_ids) == expected and len(t.stop_token_ids) == len(expected)


def test_sentencepiece_stop_ids_are_eos_and_codellama_eot(sp_tok: CodeTokenizer) -> None:
    assert set(sp_tok.stop_token_ids) == {sp_tok.token_to_id("</s>"), sp_tok.token_to_id("▁<EOT>")}
