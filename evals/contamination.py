"""Is the evaluation text inside the calibration data?

Calibrating on the evaluation text flatters the perplexity of the quantized
model. The check follows the decontamination of training data in Phi-4's
report: word 13-grams of each calibration text (the decoded calibration
windows) are looked up in the 13-grams of the evaluation text.

Words are the lowercase `\\w+` runs of the text, so punctuation, spacing and
case do not matter (wikitext's " @-@ " and " , " vanish). An n-gram never
spans two calibration texts. N-grams are stored as 64-bit blake2b hashes of
the space-joined words, stable across processes.
"""

from __future__ import annotations

import hashlib
import re

# Unrelated English texts share almost no 13-word sequences (a few
# quotations or boilerplate lines at most), while text copied from one into
# the other shares all of its own. So more than 1% shared, measured either
# way, means text was copied: `overlap_rate` (share of the calibration
# n-grams found in the evaluation text: calibration windows were cut from
# it) or `eval_coverage` (share of the evaluation n-grams found in the
# calibration: the evaluation text, or part of it, sits inside a larger
# calibration corpus).
CONTAMINATION_THRESHOLD = 0.01

WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def ngram_hash(ngram: list[str]) -> int:
    digest = hashlib.blake2b(" ".join(ngram).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def word_ngrams(text: str, n: int = 13) -> set[int]:
    """Hashes of all n-word sequences of the text (empty when it has fewer than n words)."""
    tokens = words(text)
    return {ngram_hash(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def contamination_report(calibration_texts: list[str], eval_text: str, n: int = 13) -> dict:
    """Shared n-grams of calibration and evaluation text, as shares of each side, and the verdict."""
    calibration = set().union(*(word_ngrams(text, n) for text in calibration_texts))
    evaluation = word_ngrams(eval_text, n)
    shared = len(calibration & evaluation)
    overlap_rate = shared / len(calibration) if calibration else 0.0
    eval_coverage = shared / len(evaluation) if evaluation else 0.0
    return {
        "n": n,
        "calibration_ngrams": len(calibration),
        "eval_ngrams": len(evaluation),
        "shared_ngrams": shared,
        "overlap_rate": overlap_rate,
        "eval_coverage": eval_coverage,
        "threshold": CONTAMINATION_THRESHOLD,
        "contaminated": max(overlap_rate, eval_coverage) > CONTAMINATION_THRESHOLD,
    }
