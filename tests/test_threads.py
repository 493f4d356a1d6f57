"""lowbit's OpenMP default (lowbit/__init__.py): idle threads spin briefly, and a user's own setting wins."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SHOW = "import os, lowbit; print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"


def spin_settings_seen(**user) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", SHOW], env={**clean, **user}, capture_output=True, text=True, check=True)
    return out.stdout.split()


@pytest.mark.parametrize(("user", "seen"), [
    ({}, ["10000", "None"]),  # brief spins: a quiet machine's elementwise ops do not wait on wake-ups
    ({"OMP_WAIT_POLICY": "PASSIVE"}, ["None", "PASSIVE"]),  # a chosen policy is left alone, spin count and all
    ({"GOMP_SPINCOUNT": "50"}, ["50", "None"]),
])
def test_idle_threads_spin_briefly_unless_the_user_chose(user, seen):
    assert spin_settings_seen(**user) == seen
