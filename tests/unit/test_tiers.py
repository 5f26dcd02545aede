"""Complexity tiers (api/tiers.py): the context table, explicit fields winning, chat, cost, determinism."""
from __future__ import annotations

import dataclasses

import pytest

from serve_app.api.tiers import (DEFAULT_POLICY, REASONS, SUFFIX_CHARS, TAIL_CHARS, TAIL_LINES, CompletionContext,
                                 Precision, Tier, TierDefaults, TierError, TierPolicy, classify, classify_request,
                                 extract_features, resolve)

S, M, C = Tier.SIMPLE, Tier.MEDIUM, Tier.COMPLEX
INT4, INT8, FULL = Precision.INT4, Precision.INT8, Precision.FULL


def ctx(prefix: str, suffix: str = "", **kwargs) -> CompletionContext:
    return CompletionContext(prefix=prefix, suffix=suffix, **kwargs)


# (id, prefix, suffix, language hint, tier, precision, reasons[0])
CASES = [
    ("identifier", "result = compute_tot", "", None, S, INT4, "mid_line"),
    ("attribute", "def f(x):\n    return x.", "\n", None, S, INT4, "mid_line"),
    ("call_args", "print(format_name(first, ", ")\n", None, S, INT4, "open_bracket"),
    ("dict_entries", "CONFIG = {\n    'host': 'localhost',\n    ", "\n}\n", "python", S, INT4, "open_bracket"),
    ("string_literal", "msg = 'hello wor", "'\n", None, S, INT4, "in_string"),
    ("escaped_quote", 's = "say \\"hi', '"\n', None, S, INT4, "in_string"),
    ("hash_and_paren_in_string", 'x = "#(" + foo(', ")\n", None, S, INT4, "open_bracket"),
    ("edit_existing_header", "def area(width, ", "height):\n    return width * height\n", None, S, INT4,
     "edit_header"),
    ("gap_between_statements", "def f():\n    x = 1\n    ", "\n    return x\n", None, S, INT4, "next_statement"),
    ("if_header_line_end", "def f(total, limit):\n    if total > limit:", "\n", None, M, INT8, "opens_block"),
    ("blank_line_after_for", "for item in items:\n    ", "", None, M, INT8, "opens_block"),
    ("except_block", "try:\n    run()\nexcept ValueError as exc:\n    ", "", None, M, INT8, "opens_block"),
    ("header_with_comment", "if ready:  # both inputs loaded\n    ", "", None, M, INT8, "opens_block"),
    ("def_whose_body_exists", "def merge_sort(xs):\n    ", "\n    return sorted(xs)\n", None, M, INT8,
     "opens_block"),
    ("comment", "x = 1\n# retry the request when the ", "", None, M, INT8, "in_comment"),
    ("inside_docstring", 'def f(x):\n    """Return the ', "", None, M, INT8, "in_docstring"),
    ("end_of_body", "def f():\n    x = 1\n    ", "\n\ndef g():\n    pass\n", None, M, INT8, "block_continuation"),
    ("top_level_before_code", "import os\n\n", "def main():\n    pass\n", None, M, INT8, "new_top_level_statement"),
    ("js_if_block", "if (x > 0) {\n  ", "\n}\n", "javascript", M, INT8, "opens_block"),
    ("js_callback_body", 'app.get("/", (req, res) => {\n  ', "\n});\n", "javascript", M, INT8, "opens_block"),
    ("ts_comment", "// TODO: handle the ", "\n", "typescript", M, INT8, "in_comment"),
    ("bash_loop", "for f in *.txt; do\n  ", "\ndone\n", "bash", M, INT8, "opens_block"),
    ("new_function", "def merge_sort(xs):\n    ", "", None, C, FULL, "new_definition"),
    ("new_class", "class LRUCache:\n    ", "", None, C, FULL, "new_definition"),
    ("typing_signature", "def parse_args(argv, ", "", None, C, FULL, "new_definition"),
    ("multiline_signature", "def f(\n    a: int,\n    b: int,\n) -> int:\n    ", "", None, C, FULL,
     "new_definition"),
    ("method_before_next_method", "class A:\n    def m(self):\n        ", "\n\n    def n(self):\n        pass\n",
     None, C, FULL, "new_definition"),
    ("decorated_async_def", "@app.get('/')\nasync def index(request):\n    ", "", None, C, FULL, "new_definition"),
    ("implement_docstring", 'def median(xs):\n    """Return the median of xs."""\n    ', "", None, C, FULL,
     "implement_docstring"),
    ("open_gap_end_of_file", "import os\n\n", "", None, C, FULL, "open_gap"),
    ("empty_file", "", "", None, C, FULL, "open_gap"),
    ("rust_fn", "fn main() {\n    ", "\n}\n", "rust", C, FULL, "new_definition"),
    ("c_signature_typed", "static int add(int a, ", "", "c", C, FULL, "new_definition"),
    ("js_doc_comment", "/** Adds two numbers. */\n", "", "javascript", C, FULL, "implement_docstring"),
]


@pytest.mark.parametrize("name, prefix, suffix, language, tier, precision, reason", CASES, ids=[c[0] for c in CASES])
def test_context_picks_the_tier(name, prefix, suffix, language, tier, precision, reason):
    d = classify(ctx(prefix, suffix, language=language))
    assert (d.tier, d.precision, d.reasons[0]) == (tier, precision, reason)
    assert d.reasons == (reason,)       # nothing explicit was sent: no adjustments


def test_table_covers_every_tier_and_is_large_enough():
    assert len(CASES) >= 25 and {c[4] for c in CASES} == {S, M, C}


def test_defaults_are_the_reference_design():
    p = DEFAULT_POLICY
    assert p.simple == TierDefaults(INT4, 32, 0.1, 1, False)
    assert p.medium == TierDefaults(INT8, 128, 0.3, 1, False)
    assert p.complex == TierDefaults(FULL, 512, 0.4, 3, True)


@pytest.mark.parametrize("prefix, tier", [("x = foo.ba", S), ("if x:", M), ("class A:\n    ", C)])
def test_decision_carries_the_tier_defaults(prefix, tier):
    d, defaults = classify(ctx(prefix)), DEFAULT_POLICY.defaults(tier)
    assert d.tier is tier and not d.max_tokens_explicit
    assert (d.precision, d.max_tokens, d.temperature, d.n, d.rank_candidates) == dataclasses.astuple(defaults)


# ---- features ------------------------------------------------------------------------------------

def test_features_of_a_call_inside_a_string_free_line():
    f = extract_features(ctx('x = "#(" + foo(bar[1], ', ")\n"))
    assert (f.open_brackets, f.in_comment, f.in_string) == (1, False, False)
    assert (f.mid_line, f.cursor_at_line_end) == (True, False)


def test_a_bracket_opened_above_the_window_is_ignored_when_closed():
    prefix = "DATA = [\n" + "    1,\n" * (TAIL_LINES + 10) + "]\nvalue = DATA."
    f = extract_features(ctx(prefix))
    assert (f.open_brackets, f.mid_line) == (0, True) and classify(ctx(prefix)).tier is S


def test_features_of_a_block_header():
    f = extract_features(ctx("def f(x):\n    while x > 0:\n        ", "\n    return x\n"))
    assert (f.opens_block, f.block_keyword, f.is_definition, f.body_follows) == (True, "while", False, False)
    assert (f.indent, f.suffix_next_indent, f.suffix_lines, f.language) == (8, 4, 1, "python")


def test_language_hint_decides_what_a_brace_means():
    prefix, suffix = "CONFIG = {\n    'host': 'localhost',\n    ", "\n}\n"
    assert classify(ctx(prefix, suffix, language="python")).tier is S     # a dict literal: finish entries
    assert classify(ctx(prefix, suffix, language="javascript")).tier is M  # a scope: the rest of a body
    assert extract_features(ctx(prefix, suffix, language="Python")).language == "python"


def test_text_without_a_hint_is_recognised():
    assert extract_features(ctx("import os\n\ndef f(x):\n    return x\n")).language == "python"
    assert extract_features(ctx("const x = 1;\nfunction f() {\n  return x;\n}\n")).language == "other"
    assert extract_features(ctx("Once upon a time")).language == "unknown"


# ---- explicit max_tokens -------------------------------------------------------------------------

@pytest.mark.parametrize("prefix, max_tokens, tier, moved", [
    ("x = foo.ba", 200, C, "max_tokens_above_medium"),
    ("x = foo.ba", 64, M, "max_tokens_above_simple"),
    ("x = foo.ba", 32, S, None),
    ("if x:", 300, C, "max_tokens_above_medium"),
    ("if x:", 100, M, None),
    ("if x:", 8, M, None),                # a body start stays INT8 however short
    ("class A:\n    ", 16, M, "max_tokens_within_simple"),
    ("class A:\n    ", 100, C, None),
])
def test_explicit_max_tokens_moves_the_tier_by_budget(prefix, max_tokens, tier, moved):
    d = classify(ctx(prefix, max_tokens=max_tokens))
    assert d.tier is tier and d.max_tokens == max_tokens and d.max_tokens_explicit
    assert d.reasons[1:] == (("explicit_max_tokens", moved) if moved else ("explicit_max_tokens",))


def test_explicit_max_tokens_is_not_clipped_to_the_tier_budget():
    d = classify(ctx("x = foo.ba", max_tokens=2000))
    assert (d.tier, d.max_tokens, d.precision) == (C, 2000, FULL)


def test_policy_can_stop_max_tokens_from_picking_the_tier():
    policy = TierPolicy(explicit_max_tokens_sets_tier=False)
    d = classify(ctx("x = foo.ba", max_tokens=500), policy)
    assert (d.tier, d.max_tokens, d.reasons) == (S, 500, ("mid_line", "explicit_max_tokens"))


def test_single_line_stop_makes_it_simple():
    d = classify(ctx("class A:\n    ", stop=("\n",)))
    assert d.tier is S and d.reasons == ("new_definition", "single_line_stop")
    assert classify(ctx("class A:\n    ", stop=("\n\n",))).tier is C


# ---- resolve: explicit fields win ----------------------------------------------------------------

def test_precision_override_keeps_the_tier_label():
    r = resolve(classify(ctx("class A:\n    ")), "int4")
    assert (r.tier, r.precision) == (C, INT4) and "precision_override" in r.reasons
    assert (r.max_tokens, r.temperature, r.num_candidates) == (512, 0.4, 3)   # the tier's other defaults stay
    r = resolve(classify(ctx("x = foo.ba")), "full")
    assert (r.tier, r.precision, r.max_tokens) == (S, FULL, 32)
    assert resolve(classify(ctx("x = foo.ba")), "auto").precision is INT4


def test_unknown_precision_is_a_typed_error_naming_the_value():
    with pytest.raises(TierError, match="'fp8'") as exc:
        resolve(classify(ctx("x = foo.ba")), "fp8")
    assert exc.value.param == "precision"


def test_complex_default_generates_three_and_returns_the_best():
    r = resolve(classify(ctx("class A:\n    ")))
    assert (r.n, r.num_candidates, r.rank_candidates, r.temperature) == (1, 3, True, 0.4)


def test_explicit_temperature_and_max_tokens_win():
    r = resolve(classify(ctx("x = foo.ba")), requested_max_tokens=20, requested_temperature=0.9)
    assert (r.tier, r.max_tokens, r.temperature) == (S, 20, 0.9)
    assert {"explicit_max_tokens", "explicit_temperature"} <= set(r.reasons)


def test_explicit_n_returns_all_candidates_unranked():
    r = resolve(classify(ctx("class A:\n    ")), requested_n=2)
    assert (r.n, r.num_candidates, r.rank_candidates) == (2, 2, False) and "explicit_n" in r.reasons
    r = resolve(classify(ctx("x = foo.ba")), requested_n=4)
    assert (r.n, r.num_candidates, r.rank_candidates) == (4, 4, False)


@pytest.mark.parametrize("kwargs, reason", [({"requested_temperature": 0.0}, "greedy_unranked"),
                                            ({"stream": True}, "stream_unranked")])
def test_ranking_is_dropped_where_it_cannot_help(kwargs, reason):
    r = resolve(classify(ctx("class A:\n    ")), **kwargs)
    assert (r.n, r.num_candidates, r.rank_candidates) == (1, 1, False) and reason in r.reasons


def test_classify_request_is_classify_then_resolve():
    c = ctx("x = foo.ba", max_tokens=64)
    assert classify_request(c, "int8", 0.2, None) == resolve(classify(c), "int8", None, 0.2, None)


# ---- chat ----------------------------------------------------------------------------------------

def test_chat_is_complex_by_default():
    d = classify(ctx("def f(:", kind="chat"))
    assert (d.tier, d.precision, d.reasons, d.features) == (C, FULL, ("chat",), None)
    r = resolve(d)
    assert (r.max_tokens, r.num_candidates, r.n) == (512, 3, 1)


def test_chat_with_a_tiny_budget_is_medium():
    d = classify(ctx("", kind="chat", max_tokens=16))
    assert (d.tier, d.precision) == (M, INT8)
    assert d.reasons == ("chat", "explicit_max_tokens", "max_tokens_within_simple")


def test_chat_ignores_single_line_stop():
    assert classify(ctx("", kind="chat", stop=("\n",))).tier is C


# ---- validation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, param", [({"kind": "edit"}, "kind"), ({"max_tokens": 0}, "max_tokens"),
                                           ({"max_tokens": True}, "max_tokens")])
def test_bad_context_is_a_typed_error(kwargs, param):
    with pytest.raises(TierError) as exc:
        ctx("x", **kwargs)
    assert exc.value.param == param


@pytest.mark.parametrize("change, param", [
    ({"simple": TierDefaults(INT4, 256, 0.1, 1, False)}, "max_tokens"),     # budgets out of order
    ({"complex": TierDefaults(FULL, 512, 0.4, 1, True)}, "complex"),        # ranking one candidate
    ({"medium": TierDefaults(INT8, 128, 3.0, 1, False)}, "medium"),         # temperature out of range
])
def test_policy_is_validated(change, param):
    with pytest.raises(TierError) as exc:
        TierPolicy(**change)
    assert exc.value.param == param


def test_results_are_frozen():
    d = classify(ctx("x = foo.ba"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.tier = C  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_POLICY.simple.max_tokens = 64  # type: ignore[misc]


# ---- cost and determinism ------------------------------------------------------------------------

class _SpyStr(str):
    """Text that records its slices and fails on any whole-text read (find, split, iteration...)."""

    def __new__(cls, text: str) -> _SpyStr:
        obj = super().__new__(cls, text)
        obj.slices = []
        return obj

    def __getitem__(self, key):
        self.slices.append(key)
        return str.__getitem__(self, key)


def _forbidden(name: str):
    def method(self, *args, **kwargs):
        raise AssertionError(f"the classifier read the whole text with str.{name}")
    return method


for _name in ("count", "find", "rfind", "index", "rindex", "split", "rsplit", "splitlines", "strip", "lstrip",
              "rstrip", "startswith", "endswith", "partition", "rpartition", "replace", "encode", "expandtabs",
              "lower", "__iter__", "__contains__", "__add__"):
    setattr(_SpyStr, _name, _forbidden(_name))

_FILE = "def helper(x):\n    return x + 1\n\n\n" * 6000        # ~200 KB of code


def test_a_200kb_prefix_is_read_only_through_its_tail():
    prefix, suffix = _SpyStr(_FILE + "def g(x):\n    return helper(x) + "), _SpyStr("\n" + _FILE)
    assert len(prefix) > 200_000
    d = classify(ctx(prefix, suffix))
    assert d.tier is S
    assert len(prefix.slices) == 1 and prefix.slices[0].start >= len(prefix) - TAIL_CHARS
    assert len(suffix.slices) == 1 and suffix.slices[0] == slice(None, SUFFIX_CHARS)
    assert d.features.prefix_lines <= TAIL_LINES and d.features.prefix_chars == len(prefix)


def test_text_above_the_window_changes_nothing():
    body = "x = 1\n" * (TAIL_LINES + 5) + "def f(a):\n    return a."
    junk = "def broken(\n    '''never closed [{\n" * 5000       # would mean "in a docstring, in brackets"
    near, far = extract_features(ctx(body)), extract_features(ctx(junk + body))
    assert dataclasses.replace(far, prefix_chars=0) == dataclasses.replace(near, prefix_chars=0)


def test_a_huge_prefix_alone_does_not_make_it_complex():
    for snippet, tier in [("x = foo.ba", S), ("if x:", M)]:
        assert classify(ctx(_FILE + snippet)).tier is tier


def test_classification_is_deterministic():
    for _, prefix, suffix, language, *_ in CASES:
        c = ctx(prefix, suffix, language=language, max_tokens=100)
        first = classify(c)
        assert classify(c) == first and classify(dataclasses.replace(c), TierPolicy()) == first


def test_reasons_come_from_the_documented_vocabulary():
    seen = set()
    for _, prefix, suffix, language, *_ in CASES:
        for kwargs in ({}, {"max_tokens": 16}, {"max_tokens": 64}, {"max_tokens": 400}, {"stop": ("\n",)}):
            d = classify(ctx(prefix, suffix, language=language, **kwargs))
            r = resolve(d, "int8", None, 0.0, None, stream=True)
            seen.update(r.reasons)
    assert seen <= REASONS
