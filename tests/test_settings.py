"""Each setting's rule lives in quantize/settings.py: every config that carries the setting applies it (the
plan's PlanSettings holds a QuantizeSettings), and the CLI and the recipe point at their own key."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from lowbit.cli import app
from lowbit.quantize.gptq import GPTQConfig
from lowbit.quantize.nf4 import BnbConfig
from lowbit.quantize.settings import InvalidSetting, Method, QuantizeSettings

BAD = [("bits", 5), ("group_size", 0), ("damp", 1.5), ("damp", -0.1)]


@pytest.mark.parametrize(("name", "value"), BAD)
def test_every_config_applies_the_same_rule(name, value):
    configs = [QuantizeSettings, GPTQConfig] + ([BnbConfig] if name == "damp" else [])
    for config in configs:
        with pytest.raises(InvalidSetting) as caught:
            config(**{name: value})
        assert caught.value.name == name, config


def test_methods_are_an_enum_and_strings_become_members():
    settings = QuantizeSettings(method="nf4")
    assert settings.method is Method.NF4 and not settings.gptq_format
    assert QuantizeSettings(method="rtn").gptq_format
    with pytest.raises(InvalidSetting, match="must be one of gptq, rtn, nf4, fp4"):
        QuantizeSettings(method="awq")
    with pytest.raises(InvalidSetting, match="not a regular expression"):
        QuantizeSettings(method="nf4", skip="(")


@pytest.mark.parametrize(("args", "option", "rule"), [
    (["--bits", "5"], "--bits", "must be 2, 3, 4 or 8, not 5"),
    (["--group-size", "0"], "--group-size", "must be -1 or positive"),
    (["--damp", "2"], "--damp", "must be at least 0 and below 1"),
    (["--method", "awq"], "--method", "awq"),
    (["--first-position-share", "1"], "--first-position-share", "must be at least 0 and below 1"),
])
def test_cli_names_the_option_that_breaks_a_rule(tmp_path, args, option, rule):
    for command in (["quantize", str(tmp_path), "-o", str(tmp_path / "out")], ["plan", str(tmp_path)]):
        if command[0] == "plan" and option in ("--damp", "--first-position-share"):
            continue  # plan has neither
        result = CliRunner().invoke(app, command + args)
        text = " ".join(result.output.split())
        assert result.exit_code == 2, result.output
        assert option in text and rule in text, text
        assert not (tmp_path / "out").exists()


def test_the_grid_is_symmetric_where_marlin_runs_and_asymmetric_below(tmp_path):
    """sym unset: symmetric at 4 and 8 bits, asymmetric at 2 and 3; a setting given is kept; the checkpoint's
    quantization_config says what the run applied."""
    import json

    from tests.conftest import save_tiny_model

    assert [QuantizeSettings(bits=b).sym for b in (2, 3, 4, 8)] == [False, False, True, True]
    assert QuantizeSettings(bits=3, sym=True).sym is True and QuantizeSettings(bits=4, sym=False).sym is False
    model = save_tiny_model(tmp_path / "model", layers=1)
    for bits, extra, expected in (("3", [], False), ("3", ["--sym"], True), ("4", [], True)):
        out = tmp_path / f"out-{bits}{''.join(extra)}"
        result = CliRunner().invoke(app, ["quantize", str(model), "-o", str(out), "--method", "rtn", "--bits", bits,
                                          "--group-size", "32", *extra])
        assert result.exit_code == 0, result.output
        assert json.loads((out / "config.json").read_text())["quantization_config"]["sym"] is expected
