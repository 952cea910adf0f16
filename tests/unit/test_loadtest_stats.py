"""The load tool's analysis as pure functions: percentiles, histograms, send-time markers, the
per-socket stream check (gaps, duplicates, late deltas) and the fan-out pairing."""

from __future__ import annotations

import random
from typing import Any

import pytest

from gateway.devtools.marker import markers, token
from gateway.loadtest.stats import FanoutPairer, Histogram, StreamCheck, bucket, check_frames, percentile


def counts_of(values: list[int]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return counts


def test_nearest_rank_percentiles_of_1_to_100() -> None:
    counts = counts_of(list(range(1, 101)))
    assert percentile(counts, 50) == 50
    assert percentile(counts, 95) == 95
    assert percentile(counts, 99) == 99
    assert percentile(counts, 100) == 100
    assert percentile(counts, 0.5) == 1


def test_percentiles_follow_repeated_values_and_order_does_not_matter() -> None:
    values = [7] * 90 + [500] * 9 + [9000]
    random.Random(1).shuffle(values)
    counts = counts_of(values)
    assert percentile(counts, 50) == 7
    assert percentile(counts, 90) == 7
    assert percentile(counts, 91) == 500
    assert percentile(counts, 99) == 500
    assert percentile(counts, 99.5) == 9000


def test_percentiles_of_nothing_and_a_bad_rank() -> None:
    assert percentile({}, 50) is None
    assert percentile({3: 1}, 99) == 3
    with pytest.raises(ValueError, match="percentile"):
        percentile({3: 1}, 0)
    with pytest.raises(ValueError, match="percentile"):
        percentile({3: 1}, 101)


def test_buckets_are_exact_below_2048_us_and_within_a_thousandth_above() -> None:
    assert [bucket(v) for v in (0, 1, 2047)] == [0, 1, 2047]
    previous = 0
    for value in [*range(2048, 5000), *random.Random(2).sample(range(5000, 10**10), 5000)]:
        key = bucket(value)
        assert key <= value
        assert (value - key) / value < 0.001
        assert bucket(key) == key
        if value < 5000:
            assert key >= previous
            previous = key


def test_a_histogram_summarises_in_milliseconds_and_merges_like_one() -> None:
    values = list(range(0, 200_000, 37))
    one, left, right = Histogram(), Histogram(), Histogram()
    for n, v in enumerate(values):
        one.add(v)
        (left if n % 2 else right).add(v)
    left.merge(right)
    assert left.summary_ms() == one.summary_ms()
    summary = one.summary_ms()
    assert summary["count"] == len(values)
    assert summary["max"] == values[-1] / 1000
    exact_p50 = sorted(values)[len(values) // 2 - 1] / 1000
    assert abs(summary["p50"] - exact_p50) <= exact_p50 * 0.001
    assert Histogram.from_state(one.to_state()).summary_ms() == summary


def test_negative_values_count_as_zero_and_are_reported() -> None:
    h = Histogram()
    h.add(-5)
    h.add(10)
    assert h.negative == 1
    assert h.summary_ms()["p50"] == 0.0
    assert h.summary_ms()["negative"] == 1
    assert Histogram().summary_ms()["p50"] is None


def test_markers_survive_concatenation_into_one_delta() -> None:
    stamps = [1_764_000_000_000_001, 1_764_000_000_000_250, 1_764_000_000_123_456]
    text = "".join(token(s) for s in stamps)
    assert markers(text) == stamps
    assert markers(token(stamps[0])) == stamps[:1]
    assert markers("no markers here [123]") == []
    assert token(12) == " ⟦12⟧"


def frames(*specs: tuple[Any, ...]) -> list[dict[str, Any]]:
    """(type, seq, response_id, text) tuples as server frames."""
    return [{"type": t, "seq": seq, "response_id": rid, "text": text} for t, seq, rid, text in specs]


ANSWER = frames(
    ("message", 1, None, "hi"),
    ("ai_start", 2, "r1", None),
    ("delta", 3, "r1", "ab"),
    ("delta", 4, "r1", "cd"),
    ("ai_end", 5, "r1", "abcd"),
)


def test_a_clean_answer_has_no_problem() -> None:
    check = check_frames(ANSWER)
    assert (check.gaps, check.missing, check.duplicates, check.late_deltas) == (0, 0, 0, 0)
    assert (check.duplicate_ends, check.text_mismatches, check.unfinished) == (0, 0, 0)
    assert check.last_seq == 5


def test_a_seq_gap_is_detected_and_counted() -> None:
    check = check_frames([f for f in ANSWER if f["seq"] not in (3, 4)] + frames(("message", 9, None, "x")))
    assert check.gaps == 2  # 2 -> 5 and 5 -> 9
    assert check.missing == 5  # 3, 4, 6, 7, 8
    assert check.duplicates == 0
    assert check.text_mismatches == 1  # the answer's deltas were lost with the gap


def test_a_duplicate_is_detected_counted_and_not_handled_twice() -> None:
    check = check_frames([*ANSWER[:3], ANSWER[2], *ANSWER[3:]])
    assert check.duplicates == 1
    assert check.gaps == 0
    assert check.text_mismatches == 0  # the repeated delta was not added to the answer's text


def test_a_frame_out_of_order_counts_as_a_gap_then_a_duplicate() -> None:
    check = check_frames([ANSWER[0], ANSWER[2], ANSWER[1], *ANSWER[3:]])
    assert (check.gaps, check.missing, check.duplicates) == (1, 1, 1)


def test_a_delta_after_its_answers_end_is_late() -> None:
    check = check_frames([*ANSWER, *frames(("delta", 6, "r1", "ef"))])
    assert check.late_deltas == 1
    assert check.gaps == check.duplicates == 0
    assert check.unfinished == 0


def test_a_second_ai_end_and_an_answer_without_end_are_counted() -> None:
    check = check_frames([*ANSWER, *frames(("ai_end", 6, "r1", "abcd"), ("ai_start", 7, "r2", None))])
    assert check.duplicate_ends == 1
    assert check.unfinished == 1


def test_the_check_starts_after_the_welcome_seq_and_ignores_frames_without_events() -> None:
    later = [{**f, "seq": f["seq"] + 10} for f in ANSWER]
    check = check_frames(
        [{"type": "ack", "seq": 11}, {"type": "typing", "state": True}, *later], start_seq=10
    )
    assert (check.gaps, check.duplicates, check.last_seq) == (0, 0, 15)
    assert StreamCheck(10).seq(12) is True


def test_fanout_pairs_watchers_with_the_user_in_either_order() -> None:
    pairer = FanoutPairer()
    assert pairer.user(1, 100) == []
    assert pairer.watcher(1, 130) == 30
    assert pairer.watcher(1, 150) == 50  # a second watcher of the same delta
    assert pairer.watcher(2, 200) is None  # before the user's
    assert pairer.user(2, 260) == [-60]
    assert pairer.user(2, 270) == []


def test_fanout_keeps_only_a_window_of_seqs() -> None:
    pairer = FanoutPairer(window=4)
    for seq in range(1, 11):
        pairer.user(seq, seq * 10)
    assert pairer.watcher(10, 105) == 5
    assert pairer.watcher(1, 200) is None  # forgotten: it is waited for as an early watcher now
    for seq in range(100, 110):
        pairer.watcher(seq, 0)
    assert pairer.user(100, 5) == []  # the oldest early arrivals were dropped too
    assert pairer.user(109, 5) == [-5]
