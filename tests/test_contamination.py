"""The contamination check: word n-grams of the calibration texts found in the evaluation text."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydoc_data.topics import topics

from lowbit.evals.contamination import CONTAMINATION_THRESHOLD, contamination_report, word_ngrams

WIKITEXT_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"

MADE_UP = (
    "Marguerite kept bees on the roof of the old tram depot, and every spring she counted the hives twice, "
    "once at dawn and once after the rain, because the numbers never agreed and the bees never explained. "
    "Her neighbour, a retired ferry captain, painted the hives blue and swore that the colour calmed them. "
    "By August the honey tasted faintly of lime trees and diesel, which the market sellers called character."
)


def pydoc_texts() -> list[str]:
    return [topics[key] for key in sorted(topics)]


def test_words_ignore_case_and_punctuation():
    assert word_ngrams("Hello, World! Good-bye.", n=2) == word_ngrams("hello world good bye", n=2)
    assert word_ngrams("hello world good bye", n=2) != word_ngrams("hello world bye good", n=2)


def test_ngram_count_and_short_texts():
    text = " ".join(f"w{i}" for i in range(20))
    assert len(word_ngrams(text, n=13)) == 20 - 13 + 1
    assert word_ngrams(" ".join(f"w{i}" for i in range(12)), n=13) == set()
    assert all(0 <= h < 2**64 for h in word_ngrams(text, n=13))


def test_eval_text_cut_from_a_large_calibration_text_is_flagged():
    calibration = pydoc_texts()
    eval_text = calibration[len(calibration) // 2]
    report = contamination_report(calibration, eval_text)
    assert report["shared_ngrams"] == report["eval_ngrams"] == len(word_ngrams(eval_text))
    assert report["eval_coverage"] == 1.0
    assert report["overlap_rate"] == report["shared_ngrams"] / report["calibration_ngrams"]
    assert report["overlap_rate"] < CONTAMINATION_THRESHOLD  # a small part of the calibration ...
    assert report["contaminated"] is True  # ... but all of the evaluation text


def test_calibration_windows_drawn_from_a_large_eval_text_are_flagged():
    eval_words = " ".join(pydoc_texts()).split()
    windows = [" ".join(eval_words[start : start + 200]) for start in (1000, 5000)]
    report = contamination_report(windows, " ".join(eval_words))
    assert report["overlap_rate"] == 1.0
    assert report["eval_coverage"] < CONTAMINATION_THRESHOLD
    assert report["contaminated"] is True


def test_unrelated_text_is_not_flagged():
    report = contamination_report(pydoc_texts(), MADE_UP)
    assert report["calibration_ngrams"] > 1000
    assert report["shared_ngrams"] == 0
    assert report["contaminated"] is False
    assert (report["n"], report["threshold"]) == (13, CONTAMINATION_THRESHOLD)


def test_ngrams_do_not_span_two_calibration_texts():
    eval_words = MADE_UP.split()
    halves = [" ".join(eval_words[:6]), " ".join(eval_words[6:12])]
    assert contamination_report(halves, MADE_UP, n=8)["calibration_ngrams"] == 0
    assert contamination_report([" ".join(halves)], MADE_UP, n=8)["shared_ngrams"] == 12 - 8 + 1


def test_no_calibration_ngrams_gives_a_zero_rate():
    report = contamination_report(["too short"], MADE_UP)
    assert report["overlap_rate"] == report["eval_coverage"] == 0.0
    assert report["contaminated"] is False


@pytest.mark.skipif(not WIKITEXT_TEST.is_file(), reason=f"reference corpus not found: {WIKITEXT_TEST}")
def test_pydoc_calibration_is_clean_against_wikitext2():
    eval_text = "\n\n".join(WIKITEXT_TEST.read_text(encoding="utf-8").splitlines())
    assert contamination_report(pydoc_texts(), eval_text)["contaminated"] is False
    wikitext_chunk = eval_text[100_000:120_000]
    assert contamination_report([wikitext_chunk], eval_text)["contaminated"] is True
