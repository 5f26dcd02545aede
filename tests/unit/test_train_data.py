"""Corpus split, code tokenizer, FIM spans, training samples and eval cases, on small synthetic sources.

A tiny code tokenizer is trained here with the same function as the shipped one, so these tests do
not depend on the artifact; the artifact in serve_app/default_model/ is checked too when present.
"""
from __future__ import annotations

from dataclasses import replace

import ast
import json
import textwrap
from pathlib import Path

import pytest

from serve_app.train.corpus import CorpusConfig, SourceFile, is_heldout, load_corpus, split_corpus
from serve_app.train.data import (
    DataConfig,
    EvalConfig,
    build_eval_set,
    encode_text,
    iter_training_samples,
)
from serve_app.train.spans import middle_parses, split_at_span, statement_spans
from serve_app.train.tokenizer_rules import (
    EOS,
    FIM_MIDDLE,
    FIM_PREFIX,
    FIM_SUFFIX,
    INDENT,
    SPECIAL_TOKENS,
    required_pieces,
)
from serve_app.train.tokenizer_train import train_bpe, train_tokenizer

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "serve_app" / "default_model"

SOURCE = textwrap.dedent('''\
    """A module docstring."""
    import os
    from typing import Iterator


    class Counter:
        """Counts things."""

        def __init__(self, start: int = 0) -> None:
            self.count = start
            self.seen = {}

        @property
        def double(self) -> int:
            return self.count * 2

        def add(self, key: str, amount: int = 1) -> int:
            if amount <= 0:
                raise ValueError(f"amount must be positive, got {amount}")
            elif amount > 100:
                amount = 100
            else:
                pass
            for _ in range(amount):
                self.count += 1
            with open(os.devnull, "w") as fh:
                fh.write(key)
            try:
                self.seen[key] = self.seen.get(key, 0) + amount
            except TypeError:
                return -1
            a = 1; b = 2
            if a != b: a = b
            while self.count >= 10 ** 6:
                self.count //= 2
            return self.count  # the new count


    def walk(root: str) -> Iterator[str]:
        help_text = """
    Column-zero lines inside a string.
    """
        for entry in os.scandir(root):
            if entry.is_dir():
                yield from walk(entry.path)
            else:
                yield entry.path


    if __name__ == "__main__":
        print(Counter().add("x"))
''')

# Text that must survive encode → decode unchanged: tabs, mixed and odd whitespace, Unicode,
# CRLF, special-token look-alikes, trailing spaces.
TRICKY_TEXTS = [
    "",
    "x",
    "\tif x:\n\t\treturn  y \n",
    "    \t  mixed \t\t whitespace   \n\n\n        \n",
    "héllo wörld — ünïcode ✓ 你好 🙂 👩‍👩‍👧 \u200b\u00a0\u3000\x0c end",
    "line one\r\nline two\rline three\n",
    "s = '<|endoftext|><fim_prefix>'  # not a special token\n",
    "a+=1;b!=2 -> c**d//e<=f>=g:=h @= i\\\n",
    "         nine spaces and trailing   ",
    "def __init__(self):\n        pass\n",
]


def _synthetic_texts() -> list[str]:
    variants = [SOURCE.replace("Counter", name).replace("count", name.lower() + "_n")
                for name in ("Counter", "Tally", "Meter", "Gauge")]
    return variants * 3


@pytest.fixture(scope="module")
def code_tok():
    return train_tokenizer(_synthetic_texts(), vocab_size=600)


def _files(texts: dict[str, str]) -> list[SourceFile]:
    return [SourceFile(path=Path(name), rel_name=name, text=text) for name, text in texts.items()]


def _write(root: Path, rel: str, data: bytes | str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


# --- corpus ----------------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_complete(tmp_path):
    for i in range(120):
        _write(tmp_path, f"pkg{i % 7}/mod_{i}.py", f"X_{i} = {i}\n")
    config = CorpusConfig(root=tmp_path, heldout_per_mille=200)
    files = load_corpus(config)
    first, second = split_corpus(files, 200), split_corpus(load_corpus(config), 200)
    train, held = {f.rel_name for f in first.train}, {f.rel_name for f in first.heldout}
    assert [f.rel_name for f in second.heldout] == sorted(held)
    assert not train & held and train | held == {f.rel_name for f in files}
    assert 5 <= len(held) <= 45  # ~20% of 120; a hash, not a coin, but far from either extreme


def test_heldout_hash_is_pinned():
    # Changing the hash would silently move files between train and eval; these were held out first.
    assert is_heldout("asyncio/futures.py") and is_heldout("statistics.py")
    assert not is_heldout("asyncio/events.py") and not is_heldout("os.py")


def test_corpus_filters_unusable_files(tmp_path):
    _write(tmp_path, "good.py", "def f():\r\n    return 1\r\n")
    _write(tmp_path, "twin.py", "def f():\n    return 1\n")  # duplicate of good.py after CRLF normalising
    _write(tmp_path, "latin1.py", b"s = '\xe9'\n")
    _write(tmp_path, "py2.py", "print 'hello'\n")
    _write(tmp_path, "empty.py", "\n\n")
    _write(tmp_path, "huge.py", "x = 1\n" * 1000)
    _write(tmp_path, "site-packages/third.py", "y = 2\n")
    _write(tmp_path, "__pycache__/cached.py", "z = 3\n")
    _write(tmp_path, "encodings/cp_x.py", '"""Character Mapping Codec generated with gencodec.py."""\n')
    _write(tmp_path, "test/test_good.py", "assert True\n")
    files = load_corpus(CorpusConfig(root=tmp_path, max_bytes=2000))
    assert [f.rel_name for f in files] == ["good.py", "test/test_good.py"]
    assert files[0].text == "def f():\n    return 1\n"
    no_tests = load_corpus(CorpusConfig(root=tmp_path, max_bytes=2000, include_tests=False))
    assert [f.rel_name for f in no_tests] == ["good.py"]


# --- FIM spans -------------------------------------------------------------------------------


def test_fim_spans_are_whole_lines_and_complete_statements():
    spans = statement_spans(SOURCE)
    lines = SOURCE.split("\n")
    assert len(spans) > 20
    for span in spans:
        parts = split_at_span(SOURCE, span)
        assert parts.prefix + parts.middle + parts.suffix == SOURCE
        assert ast.dump(ast.parse(parts.prefix + parts.middle + parts.suffix)) == ast.dump(ast.parse(SOURCE))
        assert parts.prefix == "" or parts.prefix.endswith("\n")
        assert parts.middle.endswith("\n")
        first = lines[span.start_line].lstrip()
        assert not first.startswith(("elif", "else", "except")), span
        if span.kind != "Assign" or "help_text" not in first:
            assert middle_parses(parts.middle), parts.middle


def test_fim_spans_skip_lines_shared_by_statements():
    spans = statement_spans(SOURCE)
    starts = {SOURCE.split("\n")[s.start_line].strip() for s in spans}
    assert "a = 1; b = 2" not in starts
    one_liner = [s.kind for s in spans if SOURCE.split("\n")[s.start_line].strip() == "if a != b: a = b"]
    assert one_liner == ["If"]  # the whole one-line if, never its body "a = b" alone
    assert "return self.count  # the new count" in starts  # a trailing comment is fine
    assert "@property" in starts  # decorated defs start at their decorator


def test_middle_with_column_zero_string_does_not_parse_alone():
    lines = SOURCE.split("\n")
    span = next(s for s in statement_spans(SOURCE) if lines[s.start_line].strip().startswith("help_text"))
    assert not middle_parses(split_at_span(SOURCE, span).middle)


# --- tokenizer -------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_code_tokenizer_round_trips_exactly(code_tok, text):
    assert code_tok.decode(code_tok.encode(text).ids, skip_special_tokens=False) == text
    assert code_tok.decode(encode_text(code_tok, text)) == text


def test_code_tokenizer_special_token_ids(code_tok):
    assert [code_tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert code_tok.get_vocab_size() == 600


def _whole(tok, text: str, piece: str) -> bool:
    """``piece`` (optionally with its leading space) is covered by exactly one token of ``text``."""
    start = text.index(piece)
    enc = tok.encode(text)
    return any(s in (start, start - 1) and e == start + len(piece) for s, e in enc.offsets)


# Contexts where a GPT-2-style pre-tokenizer would glue the piece to its neighbours.
WHOLE_PIECES = [
    ("x+=(1)\n", "+="),
    ("if a!=(b):\n", "!="),
    ("def f()->(int): pass\n", "->"),
    ("n = x**(-2)//(y)\n", "**"),
    ("n = x**(-2)//(y)\n", "//"),
    ("t = a==(b)\n", "=="),
    ("t = a<=(b)>=(c)\n", "<="),
    ("t = a<=(b)>=(c)\n", ">="),
    ("print(self.x)\n", "self."),
    ("        return(x)\n", "return"),
    ("    def __init__(self, x):\n", "def __init__(self"),
    ('if __name__ == "__main__":\n', 'if __name__ == "__main__":'),
]


@pytest.mark.parametrize(("text", "piece"), WHOLE_PIECES)
def test_code_tokenizer_keeps_pieces_whole(code_tok, text, piece):
    assert _whole(code_tok, text, piece)


def test_general_tokenizer_splits_most_of_those_pieces():
    # Guards the test above: the same checks must be able to fail.
    tok = train_bpe(_synthetic_texts(), vocab_size=600, kind="general")
    assert sum(not _whole(tok, text, piece) for text, piece in WHOLE_PIECES) >= 8


def test_code_tokenizer_indent_is_one_token_per_level(code_tok):
    enc = code_tok.encode("if x:\n        y = 1\n")
    indent_id = code_tok.token_to_id("Ġ" * 4)  # byte-level spelling of four spaces
    assert code_tok.encode(INDENT).ids == [indent_id]
    assert enc.ids.count(indent_id) == 2 and code_tok.encode(" " * 12).ids == [indent_id] * 3


def test_every_required_piece_is_one_token(code_tok):
    assert [p for p in required_pieces() if len(code_tok.encode(p).ids) != 1] == []


def test_general_tokenizer_round_trips_too():
    tok = train_bpe(_synthetic_texts(), vocab_size=600, kind="general")
    for text in TRICKY_TEXTS:
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text


# --- training samples ------------------------------------------------------------------------


def _fim_layout(tok, sample):
    ids = list(sample.input_ids[: sample.num_tokens])
    p, s, m = (tok.token_to_id(t) for t in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE))
    assert ids[0] == p and ids.count(p) == ids.count(s) == ids.count(m) == 1
    assert ids[-1] == tok.token_to_id(EOS) and ids.count(tok.token_to_id(EOS)) == 1
    i_s, i_m = ids.index(s), ids.index(m)
    assert 0 < i_s < i_m < len(ids) - 1
    return [tok.decode(part) for part in (ids[1:i_s], ids[i_s + 1:i_m], ids[i_m + 1:-1])]


def test_fim_samples_have_psm_layout_and_whole_statement_middles(code_tok):
    files = _files({"a.py": SOURCE})
    config = DataConfig(max_len=2048, fim_rate=1.0, max_middle_tokens=256)
    samples = list(iter_training_samples(files, code_tok, config))
    assert samples and all(s.is_fim and len(s.input_ids) == 2048 for s in samples)
    for sample in samples:
        assert set(sample.input_ids[sample.num_tokens:]) <= {code_tok.token_to_id(EOS)}
        prefix, suffix, middle = _fim_layout(code_tok, sample)
        assert prefix + middle + suffix == SOURCE  # nothing trimmed at this length
        assert middle_parses(middle) and middle.endswith("\n")
        assert ast.dump(ast.parse(prefix + middle + suffix)) == ast.dump(ast.parse(SOURCE))


def _spm_layout(tok, sample):
    """(prefix, suffix, middle) of an SPM row: <PRE><SUF>suffix<MID>prefix middle<EOS>."""
    ids = list(sample.input_ids[: sample.num_tokens])
    p, s, m = (tok.token_to_id(t) for t in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE))
    assert ids[:2] == [p, s] and ids.count(m) == 1 and ids[-1] == tok.token_to_id(EOS)
    return tok.decode(ids[2:ids.index(m)]), tok.decode(ids[ids.index(m) + 1:-1])


def test_spm_share_of_fim_samples_follows_spm_rate_and_matches_the_servers_layout(code_tok):
    files = _files({f"f{i}.py": SOURCE for i in range(40)})
    config = DataConfig(max_len=2048, fim_rate=1.0, max_middle_tokens=256, spm_rate=0.5)
    samples = list(iter_training_samples(files, code_tok, config))
    p, s = code_tok.token_to_id(FIM_PREFIX), code_tok.token_to_id(FIM_SUFFIX)
    spm = [x for x in samples if x.input_ids[:2] == (p, s)]   # (a hole at the file's start reads alike in both)
    assert 0.3 < len(spm) / len(samples) < 0.75
    for sample in spm:
        suffix, prefix_and_middle = _spm_layout(code_tok, sample)
        assert SOURCE.endswith(suffix) and prefix_and_middle + suffix == SOURCE
    # The same layout the server builds for an SPM checkpoint (serve_app.fim.assemble).
    from serve_app.fim import assemble
    head = list(spm[0].input_ids[: spm[0].input_ids.index(code_tok.token_to_id(FIM_MIDDLE)) + 1])
    assert assemble("spm", [], (p, s, code_tok.token_to_id(FIM_MIDDLE)), [], head[2:-1]) == head
    # spm_rate 0 draws nothing extra: the earlier releases' samples are reproduced exactly.
    psm_only = list(iter_training_samples(files, code_tok, replace(config, spm_rate=0.0)))
    before = list(iter_training_samples(files, code_tok, DataConfig(max_len=2048, fim_rate=1.0, max_middle_tokens=256)))
    assert psm_only == before


def test_fim_trimming_respects_budget_and_line_starts(code_tok):
    text = SOURCE * 4
    config = DataConfig(max_len=128, fim_rate=1.0, max_middle_tokens=48, seed=3)
    samples = list(iter_training_samples(_files({"big.py": text}), code_tok, config))
    assert samples
    for sample in samples:
        assert sample.num_tokens <= 128
        prefix, suffix, middle = _fim_layout(code_tok, sample)
        hole = text.index(prefix + middle + suffix[:1]) if prefix else 0
        assert prefix == "" or text[hole - 1: hole] in ("", "\n")  # prefix starts at a line start
        assert suffix == "" or suffix.endswith("\n")  # suffix ends at a line end
        assert prefix + middle + suffix in text
        # ids of a trimmed part are what serving would get by encoding the same text
        ids = list(sample.input_ids[1: sample.input_ids.index(code_tok.token_to_id(FIM_SUFFIX))])
        assert encode_text(code_tok, prefix) == ids


def test_plain_samples_pack_files_separated_by_eos(code_tok):
    files = _files({"a.py": SOURCE, "b.py": "x = 1\n", "c.py": "def f():\n    return 2\n"})
    samples = list(iter_training_samples(files, code_tok, DataConfig(max_len=64, fim_rate=0.0)))
    eos = code_tok.token_to_id(EOS)
    assert all(not s.is_fim and len(s.input_ids) == 64 for s in samples)
    assert all(s.num_tokens == 64 for s in samples[:-1])
    stream = [t for s in samples for t in s.input_ids[: s.num_tokens]]
    assert stream.count(eos) == 3 and stream[-1] == eos
    docs = code_tok.decode(stream, skip_special_tokens=False).split(EOS)
    assert sorted(docs[:3]) == sorted(f.text for f in files)


def test_training_samples_are_deterministic_given_seed(code_tok):
    files = _files({f"m{i}.py": SOURCE.replace("Counter", f"C{i}") for i in range(6)})
    config = DataConfig(max_len=256, fim_rate=0.5, max_middle_tokens=64, seed=7)
    once = list(iter_training_samples(files, code_tok, config))
    again = list(iter_training_samples(list(reversed(files)), code_tok, config))
    reseeded = DataConfig(max_len=256, fim_rate=0.5, max_middle_tokens=64, seed=8)
    other = list(iter_training_samples(files, code_tok, reseeded))
    assert once == again and once != other
    assert any(s.is_fim for s in once) and any(not s.is_fim for s in once)


def test_data_config_rejects_middle_larger_than_context():
    with pytest.raises(ValueError, match="max_middle_tokens"):
        DataConfig(max_len=64, max_middle_tokens=64)
    assert DataConfig(max_len=64).middle_limit == 16  # default: a quarter of the context


# --- eval set --------------------------------------------------------------------------------


def test_eval_set_cases_are_deterministic_and_well_formed():
    files = _files({"a.py": SOURCE, "b.py": SOURCE.replace("Counter", "Other")})
    config = EvalConfig(num_next_line=20, num_fim=10)
    built, rebuilt = build_eval_set(files, config), build_eval_set(list(reversed(files)), config)
    assert built == rebuilt and len(built.next_line) == 20 and len(built.fim) == 10
    texts = {f.rel_name: f.text for f in files}
    for case in built.next_line:
        assert texts[case.rel_name].startswith(case.prefix + case.target + "\n")
        assert case.target.strip() and not case.target.strip().startswith("#")
    for case in built.fim:
        assert case.span.in_function and case.span.num_lines <= config.max_middle_lines
        assert case.prefix + case.middle + case.suffix == texts[case.rel_name]
        assert middle_parses(case.middle)


# --- shipped artifact ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped_tok():
    path = DEFAULT_MODEL / "tokenizer.json"
    if not path.exists():
        pytest.skip("no shipped tokenizer in serve_app/default_model/")
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(path))


def test_structural_tokens_are_whitespace_and_punctuation_only():
    from serve_app.config import default_model_dir
    from serve_app.tokenizer import CodeTokenizer

    tok = CodeTokenizer.from_dir(default_model_dir())
    structural = set(tok.structural_token_ids)
    for text in ("    ", "\n", "(", "):", "\n        "):
        assert set(tok.encode(text)) <= structural, text
    for text in ("def", "self", "x", "return"):
        assert not set(tok.encode(text)) & structural, text
    assert not structural & set(tok.stop_token_ids) and tok.token_to_id("<fim_middle>") not in structural


def test_shipped_tokenizer_has_contract(shipped_tok):
    assert shipped_tok.get_vocab_size() == 8192
    assert [shipped_tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert [p for p in required_pieces() if len(shipped_tok.encode(p).ids) != 1] == []
    for text in TRICKY_TEXTS + [SOURCE]:
        assert shipped_tok.decode(shipped_tok.encode(text).ids, skip_special_tokens=False) == text
    config = json.loads((DEFAULT_MODEL / "tokenizer_config.json").read_text())
    assert config["eos_token"] == EOS


def test_shipped_tokenizer_loads_in_transformers(shipped_tok):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(DEFAULT_MODEL))
    assert hf.eos_token_id == 0 and hf.convert_tokens_to_ids(FIM_MIDDLE) == 3
    for text in TRICKY_TEXTS:
        assert hf.decode(hf.encode(text, add_special_tokens=False)) == text
