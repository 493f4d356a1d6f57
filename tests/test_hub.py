"""`lowbit push` against a local fake Hub, over real HTTP with the real huggingface_hub client."""

import hashlib
import json
import re
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.utils import _http as hf_http
from safetensors.torch import save_file

from lowbit.errors import HubError, UsageError
from lowbit.hub import RETRY_TRIES, PushOptions, files_to_push, push_folder, validate_repo_id
from lowbit.redact import redact
from tests.fake_hub import FAKE_TOKEN, FAKE_USER, FakeHub
from tests.test_card import sample_manifest

REPO = f"{FAKE_USER}/tiny-gptq"
SHARD_ELEMENTS = 1000  # about 4 kB per shard


def make_checkpoint(folder: Path, shards: int = 3) -> Path:
    """A small but real lowbit output folder: safetensors shards, index, config, tokenizer, manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        tensor_name = f"model.layers.{i}.mlp.down_proj.qweight"
        save_file({tensor_name: torch.randint(0, 2**31 - 1, (SHARD_ELEMENTS,), dtype=torch.int32)}, folder / name)
        weight_map[tensor_name] = name
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"architectures": ["LlamaForCausalLM"], "quantization_config": {"quant_method": "gptq", "bits": 4}}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}}}))
    manifest = sample_manifest()
    manifest["files"] = {
        path.name: {"sha256": _sha256(path.read_bytes()), "size": path.stat().st_size}
        for path in folder.glob("*.safetensors")
    }
    (folder / "lowbit_manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    return make_checkpoint(tmp_path / "ckpt")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _requests_to(hub: FakeHub, method: str, fragment: str) -> list:
    return [r for r in hub.requests if r.method == method and fragment in r.path]


def test_push_uploads_every_file_byte_for_byte(hub, checkpoint):
    result = push_folder(checkpoint, PushOptions(repo_id=REPO))

    pushed = [path.name for path in files_to_push(checkpoint)]  # the card and plot come from elsewhere
    assert {"lowbit_manifest.json", "tokenizer.json"} <= set(pushed) and "README.md" not in pushed
    assert sorted(result.uploaded) == sorted(pushed + ["README.md", "layer_errors.svg"])
    assert hub.files[(REPO, "README.md")].decode() == result.card
    for name in pushed:
        assert _sha256(hub.files[(REPO, name)]) == _sha256((checkpoint / name).read_bytes()), name
    # the shards went through the LFS protocol, one PUT each, the small files inline in the commit
    assert len(_requests_to(hub, "PUT", "/__lfs/")) == 3
    assert result.url.endswith(REPO) and result.commits == 1 and not result.dry_run


def test_uploaded_card_parses_back_with_the_hub_metadata(hub, checkpoint, tmp_path):
    push_folder(checkpoint, PushOptions(repo_id=REPO))

    readme = tmp_path / "downloaded_README.md"
    readme.write_bytes(hub.files[(REPO, "README.md")])
    card = ModelCard.load(readme)
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M"
    assert card.data.base_model_relation == "quantized"
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert {"lowbit", "gptq", "4-bit"} <= set(card.data.tags)
    assert "layer_errors.svg" in card.text and hub.files[(REPO, "layer_errors.svg")].startswith(b"<svg")


def test_small_max_commit_bytes_splits_the_push_into_several_commits(hub, checkpoint):
    result = push_folder(checkpoint, PushOptions(repo_id=REPO, max_commit_bytes=5000))

    commits = [c for c in hub.commits if c["repo_id"] == REPO]
    assert result.commits == len(commits) >= 3
    committed = [path for commit in commits for path in commit["paths"]]
    assert sorted(committed) == sorted(result.uploaded)  # each file exactly once
    for commit in commits:
        sizes = [len(hub.files[(REPO, path)]) for path in commit["paths"]]
        assert sum(sizes) <= 5000 or len(sizes) == 1


def test_interrupted_push_resumes_with_only_the_missing_files(hub, checkpoint):
    options = PushOptions(repo_id=REPO, max_commit_bytes=5000)
    hub.fail_next(500, r"/commit/", times=RETRY_TRIES, skip=1)  # the 2nd commit fails more often than we retry
    with pytest.raises(HubError, match="run the same command again"):
        push_folder(checkpoint, options)
    assert len(_requests_to(hub, "POST", "/commit/")) == 1 + RETRY_TRIES  # one loop, not two nested
    first_run_paths = {p for commit in hub.commits for p in commit["paths"]}
    first_run_objects = {r.path.rsplit("/", 1)[-1] for r in _requests_to(hub, "PUT", "/__lfs/")}
    assert first_run_paths  # the first commit went through
    seen = len(hub.requests)

    result = push_folder(checkpoint, options)

    second_run = hub.requests[seen:]
    second_run_commits = hub.commits[-result.commits :]
    all_files = {path.name for path in files_to_push(checkpoint)} | {"README.md", "layer_errors.svg"}
    assert {p for commit in second_run_commits for p in commit["paths"]} == all_files - first_run_paths
    assert set(result.skipped) == first_run_paths
    # bytes already sent (the failed commit's shard included) are not sent again
    reuploaded = {r.path.rsplit("/", 1)[-1] for r in second_run if r.method == "PUT"}
    assert reuploaded and not reuploaded & first_run_objects
    for name in all_files - {"README.md", "layer_errors.svg"}:
        assert hub.files[(REPO, name)] == (checkpoint / name).read_bytes()


def test_pushing_again_uploads_only_what_changed(hub, checkpoint):
    push_folder(checkpoint, PushOptions(repo_id=REPO))
    again = push_folder(checkpoint, PushOptions(repo_id=REPO))
    assert again.uploaded == [] and again.commits == 0

    (checkpoint / "tokenizer.json").write_text('{"changed": true}')
    changed = push_folder(checkpoint, PushOptions(repo_id=REPO))
    assert changed.uploaded == ["tokenizer.json"] and changed.commits == 1
    assert hub.files[(REPO, "tokenizer.json")] == b'{"changed": true}'


@pytest.mark.parametrize("path_regex", [r"/commit/", r"/paths-info/", r"^/api/repos/create$"])
def test_one_server_error_is_retried_and_the_push_succeeds(hub, checkpoint, path_regex):
    events = []
    hub.fail_next(500, path_regex, times=1)

    push_folder(checkpoint, PushOptions(repo_id=REPO), on_event=events.append)

    matching = [r for r in hub.requests if re.search(path_regex, r.path)]
    assert [r.status for r in matching] == [500, 200]
    assert any("HTTP 500" in event and "retrying in" in event for event in events)
    assert (REPO, "config.json") in hub.files


@pytest.fixture
def library_waits(monkeypatch) -> list[float]:
    """huggingface_hub's own retry waits (1 s, 2 s, ...), recorded instead of slept."""
    waits: list[float] = []
    monkeypatch.setattr(hf_http, "time", SimpleNamespace(sleep=waits.append))
    return waits


def test_library_retries_lfs_uploads_itself(hub, checkpoint, library_waits):
    events = []
    hub.fail_next(503, r"^/__lfs/", times=1)

    push_folder(checkpoint, PushOptions(repo_id=REPO), on_event=events.append)

    puts = _requests_to(hub, "PUT", "/__lfs/")
    assert [r.status for r in puts].count(503) == 1 and len(puts) == 3 + 1
    assert library_waits == [1]
    assert any(event.startswith("hub: ") and "Retrying in 1s" in event for event in events)


def test_uploads_the_library_gave_up_on_are_not_retried_again(hub, checkpoint, library_waits):
    hub.fail_next(503, r"^/__lfs/", times=100)

    with pytest.raises(HubError, match="HTTP 503 while uploading"):
        push_folder(checkpoint, PushOptions(repo_id=REPO))

    # the library's loop alone: 1 try + 5 retries, for each shard it started (up to 5 threads at once)
    puts = _requests_to(hub, "PUT", "/__lfs/")
    tried_objects = {r.path for r in puts}
    assert len(puts) == 6 * len(tried_objects)
    assert not _requests_to(hub, "POST", "/commit/")


def test_bad_token_gives_one_clear_error_and_no_retries(hub, checkpoint, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_WRONGtokenWRONGtokenWRONGtoken0123")

    with pytest.raises(HubError, match="token missing or invalid") as raised:
        push_folder(checkpoint, PushOptions(repo_id=REPO))

    assert "\n" not in str(raised.value)
    assert "WRONGtoken" not in str(raised.value)
    # create_repo, then the library's "does it exist anyway?" check; nothing repeated
    assert [(r.method, r.path) for r in hub.requests] == [("POST", "/api/repos/create"), ("GET", f"/api/models/{REPO}")]


def test_missing_token_is_reported_like_a_bad_one(hub, checkpoint, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError, match="token missing or invalid"):
        push_folder(checkpoint, PushOptions(repo_id=REPO))


def test_other_namespace_gives_no_write_access(hub, checkpoint):
    with pytest.raises(HubError, match="no write access to bob"):
        push_folder(checkpoint, PushOptions(repo_id="bob/tiny-gptq"))
    assert all(r.status in (401, 403, 404) for r in hub.requests)
    assert len(hub.requests) <= 2


def test_connection_refused_is_a_hub_error(monkeypatch, checkpoint):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    with pytest.raises(HubError, match="connection refused"):
        push_folder(checkpoint, PushOptions(repo_id=REPO))


@pytest.mark.parametrize("repo_id", ["no-namespace", "a/b/c", "alice/bad--name", "alice/-x", "alice/name.git", ""])
def test_invalid_repo_id_is_refused_before_any_request(hub, checkpoint, repo_id):
    with pytest.raises(UsageError, match="invalid repo id"):
        push_folder(checkpoint, PushOptions(repo_id=repo_id))
    with pytest.raises(UsageError):
        validate_repo_id(repo_id)
    assert hub.requests == []


def test_base_model_given_at_push_reaches_the_uploaded_card_and_a_bad_one_is_refused(hub, checkpoint, tmp_path):
    push_folder(checkpoint, PushOptions(repo_id=REPO, base_model="microsoft/phi-4"))
    readme = tmp_path / "README.md"
    readme.write_bytes(hub.files[(REPO, "README.md")])
    assert ModelCard.load(readme).data.base_model == "microsoft/phi-4"

    requests = len(hub.requests)
    with pytest.raises(UsageError, match="invalid repo id"):
        push_folder(checkpoint, PushOptions(repo_id=REPO, base_model="not a repo"))
    assert len(hub.requests) == requests


def test_dry_run_makes_no_request_and_writes_nothing(hub, checkpoint):
    before = sorted(p.name for p in checkpoint.iterdir())

    result = push_folder(checkpoint, PushOptions(repo_id=REPO, dry_run=True))

    assert hub.requests == []
    assert sorted(p.name for p in checkpoint.iterdir()) == before
    assert result.dry_run and result.commits == 0 and result.url is None
    assert {"README.md", "layer_errors.svg", "config.json", "model-00001-of-00003.safetensors"} <= set(result.uploaded)
    assert "base_model_relation: quantized" in result.card


def test_create_pr_puts_every_commit_on_one_pull_request(hub, checkpoint):
    result = push_folder(checkpoint, PushOptions(repo_id=REPO, create_pr=True, max_commit_bytes=5000))

    commits = [c for c in hub.commits if c["repo_id"] == REPO]
    assert len(commits) == result.commits >= 3
    assert {c["revision"] for c in commits} == {"refs/pr/1"}
    assert result.url.endswith("/discussions/1")
    assert (REPO, "config.json") not in hub.files  # main is untouched


def test_token_appears_in_no_written_file_event_or_error(hub, checkpoint):
    manifest_path = checkpoint / "lowbit_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["calibration"]["source"] = f"https://example.org/data?token={FAKE_TOKEN}"  # would reach the card
    manifest_path.write_text(json.dumps(manifest))
    events = []

    push_folder(checkpoint, PushOptions(repo_id=REPO, token=FAKE_TOKEN), on_event=events.append)

    for written in ("README.md", "layer_errors.svg"):
        assert FAKE_TOKEN.encode() not in hub.files[(REPO, written)]
    assert b"hf_***" in hub.files[(REPO, "README.md")]
    assert not any(FAKE_TOKEN in event for event in events)

    (checkpoint / "config.json").write_text("{}")  # something to commit
    hub.fail_next(422, r"/commit/", message=f"token {FAKE_TOKEN} is not allowed here")
    with pytest.raises(HubError) as raised:
        push_folder(checkpoint, PushOptions(repo_id=REPO, token=FAKE_TOKEN))
    assert FAKE_TOKEN not in str(raised.value) and "hf_***" in str(raised.value)


def test_redact_hides_registered_env_and_token_shaped_values(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "shortish-secret-value")
    text = "a shortish-secret-value b hf_abcdefghijklmnopqrstuvwxyz0123456789 c hf_internal_testing"
    assert redact(text) == "a hf_*** b hf_*** c hf_internal_testing"


def test_incomplete_or_unsafe_folders_are_refused(tmp_path):
    folder = make_checkpoint(tmp_path / "ok")
    (folder / "resume_state.pt").write_bytes(b"x")
    (folder / "notes.txt").write_text("local notes")
    assert {"resume_state.pt", "notes.txt"}.isdisjoint(p.name for p in files_to_push(folder))

    outside = tmp_path / "secret.json"
    outside.write_text("{}")
    (folder / "tokenizer_config.json").symlink_to(outside)
    with pytest.raises(UsageError, match="outside the checkpoint folder"):
        files_to_push(folder)
    (folder / "tokenizer_config.json").unlink()

    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(UsageError, match="model-00002-of-00003.safetensors"):
        files_to_push(folder)

    for required in ("config.json", "lowbit_manifest.json"):
        other = make_checkpoint(tmp_path / f"no-{required}")
        (other / required).unlink()
        with pytest.raises(UsageError, match=required):
            files_to_push(other)


def test_push_writes_nothing_into_the_checkpoint_and_warns_without_a_base_model(hub, checkpoint, caplog):
    manifest_path = checkpoint / "lowbit_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["source"]["model"] = "/data/models/local-llama"
    manifest_path.write_text(json.dumps(manifest))
    before = sorted((p.name, p.stat().st_mtime_ns) for p in checkpoint.iterdir())
    with caplog.at_level("WARNING", logger="lowbit"):
        push_folder(checkpoint, PushOptions(repo_id=REPO))
    assert sorted((p.name, p.stat().st_mtime_ns) for p in checkpoint.iterdir()) == before
    assert (REPO, "README.md") in hub.files and (REPO, "layer_errors.svg") in hub.files
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "--base-model" in warnings[0]

    caplog.clear()
    with caplog.at_level("WARNING", logger="lowbit"):
        push_folder(checkpoint, PushOptions(repo_id=REPO, base_model="acme/llama"))
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
