"""Calibration sources, calibration windows and evaluation text: no network, a tokenizer built in-test."""

from __future__ import annotations

import gzip
import hashlib
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from lowbit.calibration import sources
from lowbit.calibration.sources import find_local_corpus, read_text_source
from lowbit.calibration.windows import (
    CHAT_REQUEST,
    CalibrationConfig,
    build_calibration,
    sample_windows,
    start_tokens,
    tokenize_documents,
    windows_sha256,
)
from lowbit.evals.datasets import eval_windows, load_eval_text
from lowbit.errors import CorruptInputError, UsageError
from lowbit.manifest import load_windows, save_windows

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared_data = pytest.mark.skipif(
    not (SHARED_DATA / "c4" / "c4-sample.jsonl").is_file(),
    reason=f"reference corpora not found at {SHARED_DATA} (see shared/data/README.md)",
)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Quantization maps weights to a small grid of values.",
    "A calibration set is a handful of windows of ordinary text.",
    "Perplexity is the exponential of the mean negative log likelihood.",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE that adds a BOS by default and has a chat template."""
    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    model.train_from_iterator(SENTENCES * 4, trainer)
    model.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", model.token_to_id("<s>"))]
    )
    wrapped = PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", eos_token="</s>")
    wrapped.chat_template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    return wrapped


@pytest.fixture
def no_local_data(tmp_path, monkeypatch):
    """No data folder anywhere and a Hub that always fails."""
    monkeypatch.setenv("LOWBIT_DATA_DIR", str(tmp_path / "empty"))

    def hub_unreachable(*args, **kwargs):
        raise OSError("no network in tests")

    monkeypatch.setattr(sources, "hf_hub_download", hub_unreachable)


@pytest.fixture
def without_pyarrow(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)


def write_local_corpora(folder: Path) -> None:
    (folder / "c4").mkdir(parents=True)
    (folder / "c4" / "c4-sample.jsonl").write_text("\n".join(json.dumps({"text": s}) for s in SENTENCES) + "\n")
    (folder / "wikitext-2-raw").mkdir()
    (folder / "wikitext-2-raw" / "wiki.test.raw").write_bytes(b" = Title = \r\n First line .\r\n Second line .\r\n")


# ---------------------------------------------------------------- sources


def test_text_file_is_split_into_paragraphs_with_crlf_read_as_lf(tmp_path):
    raw = b"first paragraph\r\nstill first\r\n\r\n  \r\nsecond paragraph\r\n"
    path = tmp_path / "corpus.txt"
    path.write_bytes(raw)
    source = read_text_source(str(path))
    assert source.documents == ["first paragraph\nstill first", "second paragraph"]
    assert source.provenance["kind"] == "file"
    assert source.provenance["source"] == str(path)
    assert source.provenance["sha256"] == hashlib.sha256(raw).hexdigest()


def test_text_file_without_blank_lines_is_one_document(tmp_path):
    path = tmp_path / "corpus.raw"
    path.write_text("line one\nline two\nline three\n")
    assert read_text_source(str(path)).documents == ["line one\nline two\nline three"]


def test_jsonl_file_reads_the_text_field(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "alpha beta"}\n\n{"text": "gamma", "url": "x"}\n')
    source = read_text_source(str(path))
    assert source.documents == ["alpha beta", "gamma"]
    assert source.provenance["kind"] == "jsonl"


@pytest.mark.parametrize("bad_line", ["{not json", '{"body": "no text field"}', '{"text": 3}'])
def test_bad_jsonl_line_names_its_line_number(tmp_path, bad_line):
    path = tmp_path / "corpus.jsonl"
    path.write_text(f'{{"text": "fine"}}\n{{"text": "fine too"}}\n{bad_line}\n')
    with pytest.raises(UsageError, match="line 3"):
        read_text_source(str(path))


def test_folder_reads_txt_and_jsonl_files_recursively_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "inner.jsonl").write_text('{"text": "from jsonl"}\n')
    (tmp_path / "a.txt").write_text("from a")
    (tmp_path / "c.txt").write_text("from c")
    (tmp_path / "ignored.csv").write_text("not read")
    source = read_text_source(str(tmp_path))
    assert source.documents == ["from a", "from jsonl", "from c"]
    assert source.provenance["kind"] == "folder"
    assert source.provenance["files"] == ["a.txt", "b/inner.jsonl", "c.txt"]

    before = source.provenance["sha256"]
    (tmp_path / "c.txt").write_text("from c, edited")
    assert read_text_source(str(tmp_path)).provenance["sha256"] != before


def test_missing_path_is_a_usage_error():
    with pytest.raises(UsageError, match="calibration source not found: /no/such/corpus.txt"):
        read_text_source("/no/such/corpus.txt")


def test_empty_text_is_a_usage_error(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(UsageError, match="no text"):
        read_text_source(str(tmp_path / "empty.txt"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(UsageError, match="no .txt or .jsonl"):
        read_text_source(str(tmp_path / "folder"))


def test_unsupported_file_type_is_a_usage_error(tmp_path):
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(UsageError, match="must end in"):
        read_text_source(str(tmp_path / "table.csv"))


def test_pydoc_corpus_is_available_offline(no_local_data):
    source = read_text_source("pydoc")
    assert len(source.documents) > 10
    assert source.provenance["kind"] == "named" and source.provenance["source"] == "pydoc"
    assert read_text_source("pydoc").provenance["sha256"] == source.provenance["sha256"]


def test_named_corpora_are_found_in_lowbit_data_dir(tmp_path, monkeypatch, without_pyarrow):
    write_local_corpora(tmp_path)
    monkeypatch.setenv("LOWBIT_DATA_DIR", str(tmp_path))
    c4 = read_text_source("c4")
    assert c4.documents == SENTENCES
    assert c4.provenance["origin"] == "local"
    # wikitext2 prefers the Hub's train split; without pyarrow it falls back to the local test file and says so.
    wikitext = read_text_source("wikitext2")
    assert wikitext.provenance["split"] == "test"
    assert "contaminates" in wikitext.provenance["note"]
    assert "First line" in wikitext.documents[0]


def test_local_data_folder_is_found_relative_to_cwd_only(tmp_path, monkeypatch):
    monkeypatch.delenv("LOWBIT_DATA_DIR", raising=False)
    write_local_corpora(tmp_path / "shared" / "data")
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    assert find_local_corpus("c4") == (tmp_path / "shared" / "data" / "c4" / "c4-sample.jsonl").resolve()

    # never beside the package's own files (installed, they lie in site-packages), even where this
    # checkout has a ../shared/data
    monkeypatch.chdir(tmp_path)
    assert find_local_corpus("c4") is None


@pytest.mark.parametrize("name", ["c4", "wikitext2"])
def test_named_corpus_nowhere_to_be_found_says_how_to_fix_it(name, no_local_data):
    with pytest.raises(UsageError, match=f"corpus {name} cannot be found offline.*LOWBIT_DATA_DIR"):
        read_text_source(name)


def test_c4_comes_from_the_hub_when_not_local(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    shard = tmp_path / "shard.json.gz"
    with gzip.open(shard, "wt") as stream:
        stream.writelines(json.dumps({"text": s, "url": "u"}) + "\n" for s in SENTENCES)
    requests = []

    def fake_download(repo_id, filename, **kwargs):
        requests.append((repo_id, filename, kwargs["local_files_only"]))
        return str(shard)

    monkeypatch.setattr(sources, "hf_hub_download", fake_download)
    source = read_text_source("c4")
    assert source.documents == SENTENCES
    assert source.provenance["origin"] == "hub" and source.provenance["split"] == "train"
    assert requests == [("allenai/c4", "en/c4-train.00000-of-01024.json.gz", True)]


def test_hub_parquet_without_pyarrow_says_to_install_it(no_local_data, without_pyarrow):
    with pytest.raises(UsageError, match="pip install pyarrow"):
        load_eval_text("wikitext2")


@needs_shared_data
def test_shared_c4_sample_matches_its_published_checksum(monkeypatch):
    monkeypatch.setenv("LOWBIT_DATA_DIR", str(SHARED_DATA))
    source = read_text_source("c4")
    assert len(source.documents) == 300
    assert source.provenance["sha256"] == "f51528081ef22279f2840c02c4cd7cdfc372138be0817c5b8714d200af692b78"


# ---------------------------------------------------------------- calibration windows


def test_tokenize_documents_joins_with_blank_lines_and_adds_no_bos(tokenizer):
    tokens = tokenize_documents(SENTENCES[:2], tokenizer)
    assert tokens.dtype == torch.int64 and tokens.dim() == 1
    assert tokenizer.bos_token_id not in tokens.tolist()
    assert tokenizer.decode(tokens.tolist()) == SENTENCES[0] + "\n\n" + SENTENCES[1]


def test_tokenize_documents_with_chat_template_wraps_each_document(tokenizer):
    tokens = tokenize_documents(SENTENCES[:3], tokenizer, chat_template=True)
    text = tokenizer.decode(tokens.tolist())
    assert text.count(CHAT_REQUEST) == 3
    assert all(f"assistant: {sentence}" in text for sentence in SENTENCES[:3])
    assert tokens.tolist().count(tokenizer.bos_token_id) == 6  # the template opens every message


def test_chat_template_missing_is_a_usage_error(tokenizer):
    plain = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    with pytest.raises(UsageError, match="no chat template"):
        tokenize_documents(SENTENCES, plain, chat_template=True)


def test_windows_are_slices_of_the_tokens_and_depend_only_on_the_seed():
    tokens = torch.arange(1000, dtype=torch.int64)
    windows = sample_windows(tokens, nsamples=8, seqlen=50, seed=3)
    assert windows.shape == (8, 50) and windows.dtype == torch.int64
    for window in windows:
        assert torch.equal(window, tokens[window[0] : window[0] + 50])
    assert torch.equal(windows, sample_windows(tokens, 8, 50, seed=3))
    assert not torch.equal(windows, sample_windows(tokens, 8, 50, seed=4))


def test_text_shorter_than_one_window_is_a_usage_error():
    with pytest.raises(UsageError, match="calibration text has 10 tokens, fewer than one window of 11"):
        sample_windows(torch.arange(10), nsamples=1, seqlen=11, seed=0)
    assert sample_windows(torch.arange(10), nsamples=3, seqlen=10, seed=0).shape == (3, 10)


def test_windows_sha256_follows_its_documented_layout():
    windows = torch.tensor([[1, 2, 3], [4, 5, -6]])
    expected_bytes = b"2x3\n" + b"".join(v.to_bytes(8, "little", signed=True) for v in [1, 2, 3, 4, 5, -6])
    assert windows_sha256(windows) == hashlib.sha256(expected_bytes).hexdigest()
    assert windows_sha256(windows.to(torch.int32)) == windows_sha256(windows)
    assert windows_sha256(windows.reshape(3, 2)) != windows_sha256(windows)


def test_windows_round_trip_through_a_file(tmp_path):
    windows = sample_windows(torch.arange(500), nsamples=4, seqlen=16, seed=1)
    path = tmp_path / "lowbit_calibration.json"
    save_windows(path, windows)
    assert json.loads(path.read_text())["windows"] == windows.tolist()
    assert torch.equal(load_windows(path), windows)
    assert [p.name for p in tmp_path.iterdir()] == ["lowbit_calibration.json"]


def test_loading_bad_windows_files_fails_clearly(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        load_windows(tmp_path / "absent.json")
    for content in ['{"windows": [[1, 2], [3]]}', '{"other": 1}', "not json", '{"windows": []}']:
        (tmp_path / "bad.json").write_text(content)
        with pytest.raises(CorruptInputError):
            load_windows(tmp_path / "bad.json")


def test_build_calibration_records_its_provenance(tmp_path, tokenizer):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(SENTENCES * 3))
    config = CalibrationConfig(source=str(corpus), nsamples=4, seqlen=8, seed=5)
    windows, provenance = build_calibration(config, tokenizer)
    assert windows.shape == (4, 8)
    assert provenance["windows_sha256"] == windows_sha256(windows)
    assert provenance["n_tokens_in_source"] == len(tokenize_documents(SENTENCES * 3, tokenizer))
    assert provenance["source_sha256"] == hashlib.sha256(corpus.read_bytes()).hexdigest()
    assert provenance["source"] == str(corpus) and provenance["kind"] == "file"
    assert (provenance["nsamples"], provenance["seqlen"], provenance["seed"], provenance["chat_template"]) == (
        4, 8, 5, False
    )
    assert provenance["start_tokens"] == [tokenizer.bos_token_id]
    assert windows[:, 0].tolist() == [tokenizer.bos_token_id] * 4
    again, _ = build_calibration(config, tokenizer)
    assert torch.equal(windows, again)
    plain, provenance = build_calibration(replace(config, bos=False), tokenizer)
    assert provenance["start_tokens"] == []
    assert torch.equal(plain, sample_windows(tokenize_documents(SENTENCES * 3, tokenizer), 4, 8, seed=5))


def test_windows_after_start_tokens_are_slices_of_the_tokens():
    tokens = torch.arange(100, 1100, dtype=torch.int64)
    windows = sample_windows(tokens, nsamples=8, seqlen=50, seed=3, start=[7])
    assert windows.shape == (8, 50) and windows[:, 0].tolist() == [7] * 8
    for window in windows:
        first = int(window[1]) - 100
        assert torch.equal(window[1:], tokens[first : first + 49])
    with pytest.raises(UsageError, match="of which 1 start tokens"):
        sample_windows(tokens, nsamples=1, seqlen=1, seed=0, start=[7])


def test_build_calibration_from_pydoc(tokenizer, no_local_data):
    windows, provenance = build_calibration(CalibrationConfig(source="pydoc", nsamples=2, seqlen=64), tokenizer)
    assert windows.shape == (2, 64)
    assert provenance["source"] == "pydoc" and provenance["n_tokens_in_source"] > 64


# ---------------------------------------------------------------- evaluation text


def test_eval_text_from_files(tmp_path):
    (tmp_path / "eval.txt").write_bytes(b"line one\r\n\r\nline two\r\n")
    text, provenance = load_eval_text(str(tmp_path / "eval.txt"))
    assert text == "line one\n\nline two\n"
    assert provenance["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    (tmp_path / "eval.jsonl").write_text('{"text": "doc one"}\n{"text": "doc two"}\n')
    assert load_eval_text(str(tmp_path / "eval.jsonl"))[0] == "doc one\n\ndoc two"
    with pytest.raises(UsageError, match="not found"):
        load_eval_text(str(tmp_path / "absent.txt"))


def test_local_wikitext2_rows_are_lines_joined_by_blank_lines(tmp_path, monkeypatch):
    write_local_corpora(tmp_path)
    monkeypatch.setenv("LOWBIT_DATA_DIR", str(tmp_path))
    text, provenance = load_eval_text("wikitext2")
    assert text == " = Title = \n\n First line .\n\n Second line ."
    assert provenance["protocol"] == "gptq-wikitext2 (rows joined by \\n\\n)"
    assert provenance["dataset"] == "wikitext2"


@needs_shared_data
def test_shared_wikitext2_test_split_has_no_carriage_returns(monkeypatch):
    monkeypatch.setenv("LOWBIT_DATA_DIR", str(SHARED_DATA))
    text, _ = load_eval_text("wikitext2")
    assert "\r" not in text
    assert text.startswith(" = Robert Boulter = \n\n Robert Boulter is")


def test_eval_windows_begin_with_the_bos_then_consecutive_text_with_the_tail_dropped(tokenizer):
    text = " ".join(SENTENCES * 5)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    windows = eval_windows(text, tokenizer, seqlen=16, max_windows=None)
    count = len(ids) // 15  # each window: the BOS, then 15 text tokens
    assert windows.shape == (count, 16) and len(ids) % 15 != 0
    assert windows[:, 0].tolist() == [bos] * count
    assert windows[:, 1:].flatten().tolist() == ids[: count * 15]
    assert torch.equal(eval_windows(text, tokenizer, seqlen=16, max_windows=2), windows[:2])


def test_plain_eval_windows_are_the_gptq_references(tokenizer):
    text = " ".join(SENTENCES * 5)
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id  # the default call's BOS stays, at the start of window 0 only
    windows = eval_windows(text, tokenizer, seqlen=16, max_windows=None, bos=False)
    count = len(ids) // 16
    assert windows.shape == (count, 16) and len(ids) % 16 != 0
    assert windows.flatten().tolist() == ids[: count * 16]


def test_start_tokens_are_what_the_tokenizer_puts_before_text(tokenizer):
    assert start_tokens(tokenizer) == [tokenizer.bos_token_id]
    plain = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="</s>")
    plain.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A")
    assert start_tokens(plain) == []
    text = " ".join(SENTENCES * 5)
    assert torch.equal(eval_windows(text, plain, 16, None), eval_windows(text, plain, 16, None, bos=False))


def test_eval_text_shorter_than_one_window_is_a_usage_error(tokenizer):
    with pytest.raises(UsageError, match="fewer than one window of 4096"):
        eval_windows(SENTENCES[0], tokenizer, seqlen=4096, max_windows=None)


# ---------------------------------------------------------------- from the command line


def test_quantize_windows_begin_with_the_bos_unless_no_bos(tmp_path):
    from tokenizers import processors as token_processors
    from typer.testing import CliRunner

    from lowbit.cli import app
    from tests.conftest import byte_tokenizer, save_tiny_model

    model = save_tiny_model(tmp_path / "tiny", layers=1, hidden=64)
    tokenizer = byte_tokenizer()  # byte ids; byte 1 stands for the BOS
    bos = tokenizer.convert_ids_to_tokens(1)
    tokenizer.backend_tokenizer.post_processor = token_processors.TemplateProcessing(single=f"{bos} $A",
                                                                                     special_tokens=[(bos, 1)])
    tokenizer.save_pretrained(model)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(SENTENCES * 20))
    for flag, start in (("--bos", [1]), ("--no-bos", [])):
        out = tmp_path / flag
        result = CliRunner().invoke(app, ["-q", "quantize", str(model), "-o", str(out), "--method", "gptq",
                                          "--group-size", "32", "--calibration", str(corpus), "--nsamples", "3",
                                          "--seqlen", "16", flag])
        assert result.exit_code == 0, result.output
        assert json.loads((out / "lowbit_manifest.json").read_text())["calibration"]["start_tokens"] == start
        first = [window[0] for window in json.loads((out / "lowbit_calibration.json").read_text())["windows"]]
        assert (first == [1] * 3) == (flag == "--bos")
