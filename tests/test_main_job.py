"""The main job's recipe and its GPTQ-vs-RTN comparison."""

from __future__ import annotations

import json

import pytest

from lowbit.errors import UsageError
from lowbit.examples import comparison_lines
from lowbit.recipe_file import load_recipe
from tests.conftest import REPO


def write_checkpoint(folder, method: str, ppl: float, kld: float, windows: int = 8) -> None:
    folder.mkdir()
    report = {"ppl_base": 30.0, "ppl_quantized": ppl, "ppl_ratio": ppl / 30.0, "kld": {"mean": kld},
              "same_top": 0.6, "dataset_sha256": "a" * 64, "windows": windows, "seqlen": 512}
    (folder / "lowbit_manifest.json").write_text(json.dumps({"format": "lowbit-manifest", "method": method,
                                                             "eval": report}))


def test_comparison_says_whether_gptq_beats_rtn(tmp_path):
    write_checkpoint(tmp_path / "gptq", "gptq", 40.0, 0.40)
    write_checkpoint(tmp_path / "rtn", "rtn", 44.6, 0.48)
    lines = comparison_lines(tmp_path / "gptq", tmp_path / "rtn")
    assert "perplexity 30.00 -> 40.00 (ratio 1.333)" in lines[0] and "mean KLD 0.480" in lines[1]
    assert lines[-1] == "gptq beats rtn on these 8 x 512 windows"

    assert comparison_lines(tmp_path / "rtn", tmp_path / "gptq")[-1] == "rtn does NOT beat gptq on these 8 x 512 windows"


def test_comparison_refuses_reports_on_other_windows(tmp_path):
    write_checkpoint(tmp_path / "gptq", "gptq", 40.0, 0.40, windows=8)
    write_checkpoint(tmp_path / "rtn", "rtn", 44.6, 0.48, windows=4)
    with pytest.raises(UsageError, match="same windows"):
        comparison_lines(tmp_path / "gptq", tmp_path / "rtn")


def test_main_job_calibrates_on_the_shared_c4_and_its_baseline_on_the_same_windows(shared_data, monkeypatch):
    monkeypatch.setenv("LOWBIT_DATA_DIR", str(shared_data))
    gptq, rtn = load_recipe(REPO / "examples" / "smollm2.toml"), load_recipe(REPO / "examples" / "smollm2-rtn.toml")
    assert gptq.settings.method == "gptq" and gptq.calibration.source == "c4"
    assert rtn.settings.method == "rtn" and rtn.calibration is None
    assert (gptq.settings.bits, gptq.settings.group_size) == (rtn.settings.bits, rtn.settings.group_size)
    assert gptq.eval.options == rtn.eval.options
    assert gptq.eval.dataset == rtn.eval.dataset
    # gates that round-to-nearest's result on these windows (ratio 1.46, KLD 0.48) fails, both of them
    assert gptq.eval.gates.max_ppl_ratio < 1.46 and gptq.eval.gates.max_kld < 0.48
    assert gptq.settings.act_order and gptq.settings.static_groups and gptq.settings.scale_search  # the defaults
