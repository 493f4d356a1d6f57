"""`lowbit run RECIPE.toml` on a tiny random Llama, pushing to the local fake Hub (tests/fake_hub.py)."""

import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import lowbit.recipe as recipe_module
from lowbit.cli import app
from lowbit.errors import OutputExistsError
from lowbit.hub import files_to_push
from lowbit.recipe import run_recipe
from lowbit.recipe_file import load_recipe
from lowbit.manifest import MANIFEST
from tests.conftest import save_tiny_model
from tests.fake_hub import FAKE_TOKEN, FAKE_USER

REPO = f"{FAKE_USER}/tiny-run-gptq"
CALIBRATION_TEXT = "Quantization maps each weight to one of a few levels, chosen to keep the outputs close. " * 40
EVAL_TEXT = ("The lighthouse keeper climbed the spiral stairs every evening and polished the great lens. "
             "Ships passing the rocks at night saw the beam sweep across the water. ") * 10


def recipe_text(gates: str = "max_ppl_ratio = 100.0", max_windows: int = 4, group_size: int = 32,
                push: bool = True, evaluate: bool = True) -> str:
    """A recipe whose paths are all relative to its folder."""
    text = f"""
[model]
source = "models/tiny"

[quantize]
method = "gptq"
bits = 4
group_size = {group_size}
device = "cpu"
dtype = "float32"
max_shard_size = "40KB"

[calibration]
source = "calibration.txt"
nsamples = 4
seqlen = 32

[output]
dir = "out/tiny-gptq"
"""
    if evaluate:
        text += f"""
[eval]
dataset = "eval.txt"
seqlen = 32
max_windows = {max_windows}
device = "cpu"
dtype = "float32"

[eval.gates]
{gates}
"""
    if push:
        text += f'\n[push]\nrepo_id = "{REPO}"\n'
    return text


@pytest.fixture
def project(tmp_path) -> Path:
    """A folder with a tiny model, calibration and eval texts, and recipe.toml."""
    save_tiny_model(tmp_path / "models" / "tiny", "llama", layers=3)
    (tmp_path / "calibration.txt").write_text(CALIBRATION_TEXT)
    (tmp_path / "eval.txt").write_text(EVAL_TEXT)
    (tmp_path / "recipe.toml").write_text(recipe_text())
    return tmp_path


@pytest.fixture
def calls(monkeypatch) -> dict[str, int]:
    """How often the run called the quantizer, the evaluator and the Hub upload."""
    counts = {"quantize": 0, "evaluate": 0, "push": 0}
    for name, key in (("quantize_model", "quantize"), ("evaluate", "evaluate"), ("push_folder", "push")):
        real = getattr(recipe_module, name)

        def spy(*args, _real=real, _key=key, **kwargs):
            counts[_key] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(recipe_module, name, spy)
    return counts


def cli(*args):
    return CliRunner().invoke(app, ["run", *[str(a) for a in args]])


def json_summary(result) -> dict:
    return json.loads(result.stdout)


def one_line(text: str) -> str:
    return " ".join(text.split())


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_paths_resolve_against_the_recipe_folder(project, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)  # not the recipe's folder
    recipe = load_recipe(project / "recipe.toml")
    assert recipe.model.source == str((project / "models" / "tiny").resolve())
    assert recipe.calibration.source == str((project / "calibration.txt").resolve())
    assert recipe.eval.dataset == str((project / "eval.txt").resolve())
    assert recipe.output == (project / "out" / "tiny-gptq").resolve()
    assert recipe.settings.group_size == 32 and recipe.run_options.max_shard_size == "40KB"
    assert recipe.eval.gates.max_ppl_ratio == 100.0 and recipe.eval.options.max_windows == 4

    named = project / "named.toml"
    named.write_text('[model]\nsource = "microsoft/phi-4"\n[calibration]\nsource = "c4"\n'
                     '[eval]\ndataset = "wikitext2"\n[output]\ndir = "/abs/out"\n')
    recipe = load_recipe(named)
    assert (recipe.model.source, recipe.calibration.source, recipe.eval.dataset) == ("microsoft/phi-4", "c4", "wikitext2")
    assert recipe.output == Path("/abs/out")


def test_full_run_pushes_and_a_rerun_does_no_work(hub, project, calls):
    summary = run_recipe(project / "recipe.toml")

    assert summary["stages"] == {"quantize": "done", "eval": "passed", "push": "done"}
    output = Path(summary["output"])
    pushed = [path.name for path in files_to_push(output)]
    assert {"config.json", MANIFEST, "model.safetensors.index.json"} <= set(pushed)
    assert (REPO, "README.md") in hub.files and "README.md" not in pushed  # the card is not written into the output
    for name in set(pushed) - {MANIFEST}:
        assert sha256(hub.files[(REPO, name)]) == sha256((output / name).read_bytes()), name
    # the push is recorded after the upload: the Hub's manifest lacks only that record
    manifest = json.loads((output / MANIFEST).read_text())
    published = json.loads(hub.files[(REPO, MANIFEST)])
    assert published["run"] == {k: v for k, v in manifest["run"].items() if k != "push"}
    assert {k: v for k, v in published.items() if k != "run"} == {k: v for k, v in manifest.items() if k != "run"}
    assert manifest["eval"]["gates"] == {"passed": True, "failures": [], "max_ppl_ratio": 100.0}
    assert set(manifest["run"]) == {"quantize", "eval", "push"}
    assert summary["figures"]["ppl_ratio"] == manifest["eval"]["ppl_ratio"]
    assert calls == {"quantize": 1, "evaluate": 1, "push": 1}
    requests_before = len(hub.requests)

    again = cli(project / "recipe.toml", "--json")

    assert again.exit_code == 0, again.output
    assert json_summary(again)["stages"] == {"quantize": "skipped", "eval": "skipped", "push": "skipped"}
    assert calls == {"quantize": 1, "evaluate": 1, "push": 1}
    assert len(hub.requests) == requests_before  # not even a question to the Hub


def test_failed_gate_pushes_nothing_and_a_changed_gate_reruns_only_eval_and_push(hub, project, calls):
    recipe = project / "recipe.toml"
    recipe.write_text(recipe_text(gates="max_ppl_ratio = 0.5"))  # no quantized model is twice as good

    failed = cli(recipe, "--json")

    assert failed.exit_code == 1, failed.output
    summary = json_summary(failed)
    assert summary["stages"] == {"quantize": "done", "eval": "failed", "push": "skipped"}
    assert summary["gates"]["passed"] is False and "max_ppl_ratio" in summary["gates"]["failures"][0]
    assert "gate failed, nothing pushed" in one_line(failed.stderr)
    assert hub.commits == [] and hub.requests == []

    # the same recipe again: still failing, still nothing pushed, nothing recomputed
    assert cli(recipe, "--json").exit_code == 1
    assert calls == {"quantize": 1, "evaluate": 1, "push": 0} and hub.requests == []

    recipe.write_text(recipe_text(gates="max_ppl_ratio = 2.0"))
    passed = cli(recipe, "--json")

    assert passed.exit_code == 0, passed.output
    summary = json_summary(passed)
    assert summary["stages"] == {"quantize": "skipped", "eval": "passed", "push": "done"}
    assert summary["eval"] == {"rescored": False}  # the gates were checked on the stored figures
    assert calls == {"quantize": 1, "evaluate": 1, "push": 1}
    assert len(hub.commits) == 1
    stored = json.loads(hub.files[(REPO, MANIFEST)])
    assert stored["eval"]["gates"] == {"passed": True, "failures": [], "max_ppl_ratio": 2.0}


def test_changed_eval_settings_rescore_and_push_only_what_changed(hub, project, calls):
    recipe = project / "recipe.toml"
    first = run_recipe(recipe)
    recipe.write_text(recipe_text(max_windows=2))

    second = run_recipe(recipe)

    assert second["stages"] == {"quantize": "skipped", "eval": "passed", "push": "done"}
    assert second["eval"] == {"rescored": True}
    assert calls == {"quantize": 1, "evaluate": 2, "push": 2}
    assert second["figures"]["eval_windows"] == 2 and first["figures"]["eval_windows"] == 4
    # the weights did not change: only the manifest (new report) and the card showing it go up
    assert set(second["push"]["uploaded"]) == {MANIFEST, "README.md"}


def test_changed_quantize_settings_requantize_and_replace_the_output(project, calls):
    recipe = project / "recipe.toml"
    recipe.write_text(recipe_text(push=False, evaluate=False))
    run_recipe(recipe)
    recipe.write_text(recipe_text(push=False, evaluate=False, group_size=64))

    summary = run_recipe(recipe)

    assert summary["stages"] == {"quantize": "done", "eval": "skipped", "push": "skipped"}
    assert calls["quantize"] == 2
    manifest = json.loads((Path(summary["output"]) / MANIFEST).read_text())
    assert manifest["settings"]["group_size"] == 64


def test_output_files_are_rehashed_only_when_their_stat_changed(project, calls):
    recipe = project / "recipe.toml"
    recipe.write_text(recipe_text(push=False, evaluate=False))
    output = Path(run_recipe(recipe)["output"])
    shard = sorted(output.glob("model-*.safetensors"))[0]

    shard.write_bytes(shard.read_bytes())  # same bytes, new mtime: re-hashed, found intact
    assert run_recipe(recipe)["stages"]["quantize"] == "skipped"

    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, other content
    shard.write_bytes(bytes(data))
    assert run_recipe(recipe)["stages"]["quantize"] == "done"
    assert calls["quantize"] == 2
    assert sha256(shard.read_bytes()) == json.loads((output / MANIFEST).read_text())["files"][shard.name]["sha256"]


def test_interrupted_quantize_resumes(project):
    recipe = project / "recipe.toml"
    recipe.write_text(recipe_text(push=False, evaluate=False))

    def interrupt_after_two_layers(stage, done, total):
        if stage == "quantize" and done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, on_progress=interrupt_after_two_layers)
    summary = run_recipe(recipe)

    assert summary["stages"]["quantize"] == "done"
    assert summary["quantize"]["resumed_from_layer"] == 2


def test_an_output_not_made_by_run_is_kept_unless_forced(project):
    recipe = project / "recipe.toml"
    recipe.write_text(recipe_text(push=False, evaluate=False))
    output = project / "out" / "tiny-gptq"
    output.mkdir(parents=True)
    (output / "notes.txt").write_text("mine")

    with pytest.raises(OutputExistsError, match="not made by `lowbit run`"):
        run_recipe(recipe)
    assert (output / "notes.txt").exists()
    assert run_recipe(recipe, force=True)["stages"]["quantize"] == "done"


def test_dry_run_push_sends_nothing_and_shows_the_card(hub, project):
    result = cli(project / "recipe.toml", "--dry-run-push")

    assert result.exit_code == 0, result.output
    assert hub.requests == []
    assert "library_name: transformers" in result.stdout  # the card's metadata
    assert "push: dry-run (would upload" in one_line(result.stdout)
    assert "README.md" not in {p.name for p in (project / "out" / "tiny-gptq").iterdir()}


def test_token_comes_from_the_environment_only(hub, project):
    summary = run_recipe(project / "recipe.toml")
    assert summary["stages"]["push"] == "done"  # HF_TOKEN (set by the hub fixture) was used
    assert FAKE_TOKEN not in (Path(summary["output"]) / MANIFEST).read_text()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[model]\nsource = "m"\n[output]\ndir = "o"\n[quantize]\nbitz = 4\n', "unknown key quantize.bitz"),
        ('[model]\nsource = "m"\n[output]\ndir = "o"\n[quantize]\nbits = "four"\n',
         "quantize.bits must be an integer, not 'four'"),
        ('[model]\nsource = "m"\n[output]\ndir = "o"\n[quantize]\nbits = 5\n', "quantize.bits must be 2, 3, 4 or 8"),
        ('[model]\nsource = "m"\n[output]\ndir = "o"\n[eval.gates]\nmax_kld = "low"\n',
         "eval.gates.max_kld must be a number"),
        ('[model]\nsource = "m"\n[output]\ndir = "o"\n[eval]\nseqlen = 1\n', "eval.seqlen must be at least 2"),
        ('[model]\nsource = "m"\n[output]\ndir = "o"\n[push]\nrepo_id = "a/b"\ntoken = "hf_x"\n',
         "push.token is not allowed"),
        ('[model]\nsource = "m"\n[output]\ndir = "o"\n[push]\nrepo_id = "no-namespace"\n', "push.repo_id"),
        ('[model]\nsource = "m"\n[output]\ndir = "o"\n[push]\nprivate = true\n', "push.repo_id is required"),
        ('[model]\nsource = "m"\n[output]\ndir = "o"\n[quantize]\nmethod = "rtn"\nscale_search = false\n'
         '[calibration]\nnsamples = 4\n', "calibration is not used by method rtn without scale_search"),
        ('[model]\nsource = "m"\n[output]\ndir = "o"\n[extra]\nx = 1\n', "unknown key extra"),
        ('[model]\nrevision = "main"\n[output]\ndir = "o"\n', "model.source is required"),
        ('[model]\nsource = "m"\n', "the recipe has no output table"),
        ('[model\nsource = "m"\n', "is not valid TOML"),
    ],
)
def test_bad_recipes_give_one_line_and_exit_2(tmp_path, text, message):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(text)

    result = cli(recipe)

    assert result.exit_code == 2, result.output
    assert result.stderr.count("error:") == 1
    assert message in one_line(result.stderr)


def test_missing_recipe_is_a_usage_error(tmp_path):
    result = cli(tmp_path / "absent.toml")
    assert result.exit_code == 2 and "recipe not found" in one_line(result.stderr)
