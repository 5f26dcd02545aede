"""StopChecker: split-invariant, never emits part of a stop string, cuts before the earliest match."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serve_app.engine.stop import StopChecker, StopCheckerError, StopResult


def _reference(text: str, stops: list[str]) -> str:
    """Whole-text semantics: cut before the earliest position where any stop string starts."""
    found = [i for i in (text.find(s) for s in stops) if i != -1]
    return text[:min(found)] if found else text


def _stream(deltas: list[str], stops: list[str]) -> tuple[list[str], bool]:
    """Feed deltas until a stop; flush at the end. Returns the emitted pieces and whether it stopped."""
    checker = StopChecker(stops)
    pieces = []
    for delta in deltas:
        result = checker.feed(delta)
        pieces.append(result.text)
        if result.stopped:
            return pieces, True
    final = checker.flush()
    pieces.append(final.text)
    return pieces, final.stopped


def _split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    return [text[a:b] for a, b in zip(points, points[1:])]


_ALPHABET = "ab\nc"  # small alphabet: stop strings occur and overlap often
_texts = st.text(alphabet=_ALPHABET, max_size=40)
_stops = st.lists(st.text(alphabet=_ALPHABET, min_size=1, max_size=4), min_size=1, max_size=3)


@settings(max_examples=400, deadline=None)
@given(text=_texts, stops=_stops, cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=12))
def test_any_split_emits_the_same_text_as_the_whole(text, stops, cuts):
    whole, whole_stopped = _stream([text], stops)
    split, split_stopped = _stream(_split(text, cuts), stops)
    assert "".join(split) == "".join(whole) == _reference(text, stops)
    assert split_stopped == whole_stopped == any(s in text for s in stops)


@settings(max_examples=300, deadline=None)
@given(text=_texts, stops=_stops, cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=12))
def test_streamed_prefixes_never_run_past_the_final_text(text, stops, cuts):
    # Nothing emitted is ever retracted: every running total is a prefix of the final answer,
    # so no client sees the start of a stop string that is later cut.
    pieces, _ = _stream(_split(text, cuts), stops)
    expected = _reference(text, stops)
    emitted = ""
    for piece in pieces:
        emitted += piece
        assert expected.startswith(emitted)


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=_ALPHABET, max_size=30), stop=st.text(alphabet=_ALPHABET, min_size=1, max_size=4))
def test_single_stop_string_stops_in_the_delta_that_completes_it(text, stop):
    checker = StopChecker([stop])
    for end, ch in enumerate(text, start=1):
        result = checker.feed(ch)
        if stop in text[:end]:
            assert result.stopped and result.stop_string == stop
            return
        assert not result.stopped


def test_partial_stop_string_is_held_back_then_released():
    checker = StopChecker(["</code>"])
    assert checker.feed("x = 1</co") == StopResult("x = 1", False, None)
    assert checker.feed("l>") == StopResult("</col>", False, None)


def test_stop_string_spanning_three_deltas_is_cut_exactly_before_it():
    checker = StopChecker(["\n\n\n"])
    out = [checker.feed(d) for d in ["return x\n", "\n", "\nmore"]]
    assert [r.text for r in out] == ["return x", "", ""]
    assert out[-1].stopped and out[-1].stop_string == "\n\n\n"


def test_earliest_match_wins_even_when_a_later_stop_completes_first():
    checker = StopChecker(["bc", "abcd"])
    assert checker.feed("abc") == StopResult("", False, None)  # "abcd" could still start at 0
    assert checker.feed("d") == StopResult("", True, "abcd")


def test_pending_match_is_settled_by_the_next_delta():
    checker = StopChecker(["bc", "abcd"])
    checker.feed("abc")
    assert checker.feed("x") == StopResult("a", True, "bc")


def test_flush_settles_a_pending_match_and_releases_held_text():
    pending = StopChecker(["bc", "abcd"])
    assert pending.feed("zabc") == StopResult("z", False, None)
    assert pending.flush() == StopResult("a", True, "bc")
    held = StopChecker(["END"])
    assert held.feed("done EN").text == "done "
    assert held.flush() == StopResult("EN", False, None)


def test_no_stop_strings_passes_text_through():
    checker = StopChecker([])
    assert checker.feed("anything") == StopResult("anything", False, None)
    assert checker.flush() == StopResult("", False, None)


def test_feeding_after_a_stop_is_an_error():
    checker = StopChecker(["x"])
    assert checker.feed("ax").stopped
    with pytest.raises(StopCheckerError, match="after a stop"):
        checker.feed("more")


def test_empty_stop_string_is_rejected():
    with pytest.raises(StopCheckerError, match="non-empty"):
        StopChecker(["ok", ""])


def test_multibyte_text_is_cut_by_characters():
    checker = StopChecker(["🙂"])
    assert checker.feed("héllo 你好🙂 rest") == StopResult("héllo 你好", True, "🙂")
