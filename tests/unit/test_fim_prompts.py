"""FIM prompts: PSM and SPM built right for every family, the checkpoint's declared order, long files
trimmed at their far ends, and an editor typing into a hole served from the prefix cache (SPM)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from serve_app.fim import fit, keep_end, keep_start
from serve_app.tokenizer import CodeTokenizer, TokenizerError
from tests.helpers.factories import FIM_STYLES, build_sentencepiece_tokenizer, build_tokenizer
from tests.unit.test_api_support import anyio_backend, http_client, make_app, start_engine  # noqa: F401
from tests.helpers.engines import build_model_dir

PREFIX, SUFFIX = "def add(a, b):\n    c = a", "\n    return c\n"


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fim-tok")
    dirs = {style: build_tokenizer(root / style, fim_style=style) for style in FIM_STYLES if style != "none"}
    dirs["spm"] = build_tokenizer(root / "spm", fim_order="spm")
    dirs["sentencepiece"] = build_sentencepiece_tokenizer(root / "sp")
    return dirs


@pytest.mark.parametrize("style", ["starcoder", "qwen", "deepseek", "codellama"])
def test_psm_and_spm_layouts_for_each_family(tok_dirs, style):
    t = CodeTokenizer.from_dir(tok_dirs[style])
    pre, suf, mid = (t.token_to_id(s) for s in FIM_STYLES[style])
    space = " " if style == "codellama" else ""             # CodeLlama's prefix carries a leading space
    p, s = t._encode_fragment(space + PREFIX), t._encode_fragment(SUFFIX)
    head, line = t._encode_fragment(space + "def add(a, b):\n"), t._encode_fragment("    c = a")
    assert t.fim_order == "psm"                              # nothing declared: PSM
    # PSM: the cursor's line goes after <MID> (llama.cpp /infill's `prompt`), the rest before <SUF>
    assert t.build_fim_prompt_ids(PREFIX, SUFFIX) == [pre, *head, suf, *s, mid, *line]
    assert t.build_fim_prompt_ids(PREFIX + "\n", SUFFIX) == [pre, *t._encode_fragment(space + PREFIX + "\n"), suf,
                                                             *s, mid]    # at a line start: plain PSM
    # SPM (Bavarian et al. 2022; bigcode / CodeLlama suffix_first): the prefix runs into the middle.
    assert t.build_fim_prompt_ids(PREFIX, SUFFIX, order="spm") == [pre, suf, *s, mid, *p]


@pytest.mark.parametrize("style", ["starcoder", "spm"])
def test_typing_within_a_line_changes_only_the_tokens_after_the_cursor_line_starts(tok_dirs, style):
    """Keystrokes inside one line leave everything up to the cursor's line as it was, in both
    orders, so the prefix cache serves it; in PSM that includes the whole suffix."""
    t = CodeTokenizer.from_dir(tok_dirs[style])
    mid = t.token_to_id(FIM_STYLES["starcoder"][2])
    body = "def add(a, b):\n    total = 0\n"
    prompts = [t.build_fim_prompt_ids(body + typed, SUFFIX) for typed in ("    c", "    c = ", "    c = a + b")]
    shared = min(len(_common_prefix(a, b)) for a, b in zip(prompts, prompts[1:]))
    assert shared >= prompts[0].index(mid) + (0 if style == "spm" else 1)    # PSM: the suffix and <MID>
    assert shared >= len(t._encode_fragment(SUFFIX)) + 3


def _common_prefix(a: list[int], b: list[int]) -> list[int]:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def test_codellama_sentencepiece_spm_follows_meta_suffix_first(tok_dirs):
    t = CodeTokenizer.from_dir(tok_dirs["sentencepiece"])
    ids = t.build_fim_prompt_ids(PREFIX, SUFFIX, order="spm")
    bos, pre, suf, mid = (t.token_to_id(x) for x in ("<s>", "▁<PRE>", "▁<SUF>", "▁<MID>"))
    # Meta's infilling_prompt_tokens(suffix_first=True): bos, PRE, SUF, suffix, MID, encode(prefix)
    assert ids[:3] == [bos, pre, suf] and ids[3 + len(t._encode_fragment(SUFFIX))] == mid
    assert ids[ids.index(mid) + 1:] == t._encode_fragment(" " + PREFIX)


def test_checkpoint_declaring_spm_gets_spm_prompts_and_a_bad_order_is_named(tok_dirs, tmp_path):
    t = CodeTokenizer.from_dir(tok_dirs["spm"])
    assert t.fim_order == "spm"
    ids = t.build_fim_prompt_ids(PREFIX, SUFFIX)
    assert ids == t.build_fim_prompt_ids(PREFIX, SUFFIX, order="spm")
    assert ids != t.build_fim_prompt_ids(PREFIX, SUFFIX, order="psm")
    bad = build_tokenizer(tmp_path / "bad")
    cfg = json.loads((bad / "tokenizer_config.json").read_text())
    (bad / "tokenizer_config.json").write_text(json.dumps({**cfg, "fim_order": "msp"}))
    with pytest.raises(TokenizerError, match="'msp'"):
        CodeTokenizer.from_dir(bad)


def _count(text: str) -> int:
    return len(text)                                         # one "token" per character: exact arithmetic


def test_fit_keeps_everything_when_it_fits():
    assert fit("ab\ncd", "ef\n", 8, _count).dropped_tokens == 0


def test_fit_drops_whole_lines_from_the_prefix_start_and_the_suffix_end():
    prefix = "".join(f"line{i:02d}\n" for i in range(20)) + "    x = "   # 20 lines of 7 chars + 8
    suffix = "".join(f"tail{i:02d}\n" for i in range(20))
    parts = fit(prefix, suffix, 100, _count)
    assert len(parts.prefix) + len(parts.suffix) <= 100
    assert prefix.endswith(parts.prefix) and parts.prefix.startswith("line")      # cut at a line start
    assert suffix.startswith(parts.suffix) and parts.suffix.endswith("\n")        # cut at a line end
    # the suffix keeps a quarter, and what the prefix's line cut leaves (less than one line)
    assert len(parts.suffix) <= 25 + 7
    assert parts.dropped_tokens == len(prefix) + len(suffix) - len(parts.prefix) - len(parts.suffix)


def test_fit_gives_the_suffix_what_a_short_prefix_leaves():
    suffix = "".join(f"tail{i:02d}\n" for i in range(30))
    parts = fit("x = ", suffix, 60, _count)
    assert parts.prefix == "x = " and len(parts.suffix) == 56


def test_a_single_overlong_line_is_cut_by_characters():
    assert keep_end("a" * 50, 10, _count) == "a" * 10
    assert keep_start("b" * 50, 10, _count) == "b" * 10
    assert keep_end("x\n" + "a" * 50, 10, _count) == "a" * 10


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("spm-model"), "mixtral", fim_order="spm")


@pytest.mark.anyio
async def test_fim_longer_than_the_context_is_trimmed_and_usage_says_so(spm_model):
    engine = start_engine(spm_model)
    tokenizer = CodeTokenizer.from_dir(spm_model)
    try:
        prefix = "".join(f"def f{i}(a, b):\n    return a + b\n" for i in range(60))
        body = {"prompt": prefix, "suffix": "\nprint(f1(1, 2))\n" * 40, "max_tokens": 8, "temperature": 0}
        assert len(tokenizer.build_fim_prompt_ids(body["prompt"], body["suffix"])) > engine.core.max_model_len
        async with http_client(make_app(engine, tokenizer)) as client:
            r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert usage["prompt_tokens"] + 8 <= engine.core.max_model_len
        assert usage["prompt_tokens_details"]["dropped_tokens"] > 0
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def psm_model(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("psm-model"), "mixtral")


@pytest.mark.parametrize("order", ["spm", "psm"])
@pytest.mark.anyio
async def test_typing_into_a_hole_is_served_from_the_prefix_cache(spm_model, psm_model, order):
    """An editor session: the suffix stays, the prefix grows by a few characters per request, within
    one line. SPM keeps everything before the cursor cached; PSM does too, with the cursor's line
    after <MID> (plain PSM recomputes the suffix on every keystroke: 53% cached here)."""
    model = spm_model if order == "spm" else psm_model
    engine = start_engine(model, block_size=16)
    tokenizer = CodeTokenizer.from_dir(model)
    assert tokenizer.fim_order == order
    head = "".join(f"def f{i}(a, b):\n    return a + b\n" for i in range(8)) + "def g(x):\n    y = "
    typed = "x * 2 + f1(x, 3) - f2(1, x)"
    suffix = "\n    return y\n\n" + "".join(f"print(f{i}(1, 2))\n" for i in range(10))
    prompt_tokens = cached = 0
    try:
        async with http_client(make_app(engine, tokenizer)) as client:
            for end in range(0, len(typed), 2):               # two characters per keystroke
                r = await client.post("/v1/completions", json={"prompt": head + typed[:end], "suffix": suffix,
                                                               "max_tokens": 4, "temperature": 0})
                assert r.status_code == 200, r.text
                usage = r.json()["usage"]
                if end:                                       # the first request fills the cache
                    prompt_tokens += usage["prompt_tokens"]
                    cached += usage["prompt_tokens_details"]["cached_tokens"]
    finally:
        engine.shutdown()
    assert cached / prompt_tokens >= 0.9, (cached, prompt_tokens)
