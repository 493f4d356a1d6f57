"""Where calibration text comes from: a file, a folder, or a named corpus.

`read_text_source(source)` returns the documents plus a provenance record
for the manifest. A source string is, in this order:

- a named corpus: `pydoc` (the standard library's `pydoc_data.topics`, in
  every Python: the fallback of `default_calibration` when c4 cannot be had),
  `c4` (the default), `wikitext2`. These names are
  reserved: write `./c4` to mean a folder called `c4`.
- a `.txt`/`.raw`/`.md` file: paragraphs split on blank lines (the whole
  file when it has none), CRLF read as LF.
- a `.jsonl` file: the string field `text` of every non-blank line.
- a folder: every `.txt` and `.jsonl` file below it, sorted by relative path.

`c4` and `wikitext2` are looked up in a local data folder first (see
`find_local_corpus`) and fetched from the Hugging Face Hub otherwise, except
that wikitext2 *prefers the Hub's train split*: the local file is the test
split, and calibrating on it contaminates wikitext2 evaluation. Provenance
says which split and file were used.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import hf_hub_download

from lowbit.errors import CorruptInputError, UsageError
from lowbit.network import local_only, offline_hint

NAMED_CORPORA = ("pydoc", "c4", "wikitext2")
log = logging.getLogger("lowbit")

# Files of the local data folder (shared/data/README.md).
LOCAL_CORPUS_FILES = {
    "c4": "c4/c4-sample.jsonl",
    "wikitext2": "wikitext-2-raw/wiki.test.raw",
}

C4_REPO = "allenai/c4"
C4_TRAIN_FILE = "en/c4-train.00000-of-01024.json.gz"
C4_VALIDATION_FILE = "en/c4-validation.00000-of-00008.json.gz"
WIKITEXT_REPO = "Salesforce/wikitext"
WIKITEXT2_FILES = {
    "train": "wikitext-2-raw-v1/train-00000-of-00001.parquet",
    "test": "wikitext-2-raw-v1/test-00000-of-00001.parquet",
}
# A C4 train shard holds ~356k documents; the first few thousand give far
# more tokens than 128 windows of 2048 need.
C4_HUB_CALIBRATION_DOCUMENTS = 5000


@dataclass(frozen=True)
class TextSource:
    documents: list[str]
    provenance: dict


# ---------------------------------------------------------------- helpers


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def normalise_newlines(text: str) -> str:
    return text.replace("\r\n", "\n")


def decode_utf8(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CorruptInputError(f"{path} is not UTF-8 text (byte {err.start})") from None


def split_paragraphs(text: str) -> list[str]:
    """Paragraphs separated by blank lines (lines of only whitespace); no blank line -> one document."""
    paragraphs = re.split(r"\n\s*\n", normalise_newlines(text))
    return [p.strip("\n") for p in paragraphs if p.strip()]


def parse_jsonl(text: str, path: Path) -> list[str]:
    """The `text` field of each non-blank line; a bad line is an error naming its number."""
    documents = []
    for number, line in enumerate(normalise_newlines(text).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UsageError(f"{path} line {number}: not valid JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UsageError(f'{path} line {number}: no string field "text"')
        if record["text"].strip():
            documents.append(normalise_newlines(record["text"]))
    return documents


def documents_of_file(path: Path, raw: bytes) -> list[str]:
    text = decode_utf8(raw, path)
    if path.suffix == ".jsonl":
        return parse_jsonl(text, path)
    return split_paragraphs(text)


# ---------------------------------------------------------------- local data folder


def local_data_dirs() -> list[Path]:
    """Where local corpora may live: $LOWBIT_DATA_DIR, else ../shared/data from the working directory.

    Never relative to this file: installed, it lies in site-packages.
    """
    if os.environ.get("LOWBIT_DATA_DIR"):
        return [Path(os.environ["LOWBIT_DATA_DIR"])]
    return [Path.cwd() / ".." / "shared" / "data"]


def find_local_corpus(name: str) -> Path | None:
    """The local file of corpus `name` ("c4" or "wikitext2"), or None when no data folder has it."""
    for folder in local_data_dirs():
        candidate = folder / LOCAL_CORPUS_FILES[name]
        if candidate.is_file():
            return candidate.resolve()
    return None


def not_found_offline(name: str, hub_failure: str) -> UsageError:
    return UsageError(
        f"corpus {name} cannot be found offline: put {LOCAL_CORPUS_FILES[name]} under a folder "
        f"and set LOWBIT_DATA_DIR to it (Hub: {hub_failure})"
    )


# ---------------------------------------------------------------- the Hub


def download_dataset_file(repo_id: str, filename: str) -> tuple[Path | None, str]:
    """(local path, "") when the Hub file is cached or downloadable, else (None, why not)."""
    cache_only = local_only()
    try:
        path = hf_hub_download(repo_id, filename, repo_type="dataset", local_files_only=cache_only)
    except Exception as err:  # offline, no network, gated, missing: all mean "not available here"
        why = offline_hint() if cache_only else type(err).__name__
        return None, f"{repo_id}/{filename}: {why}"
    return Path(path), ""


def require_pyarrow():
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise UsageError("reading the Hub's wikitext2 parquet files needs pyarrow: pip install pyarrow") from None
    return parquet


def read_parquet_texts(path: Path) -> list[str]:
    return require_pyarrow().read_table(path, columns=["text"]).column("text").to_pylist()


def read_jsonl_gz_texts(path: Path, max_documents: int | None) -> tuple[list[str], bytes]:
    """The `text` of the first max_documents lines of a .json.gz, and the decompressed bytes read."""
    texts, lines = [], []
    with gzip.open(path, "rb") as stream:
        for line in stream:
            if max_documents is not None and len(texts) >= max_documents:
                break
            lines.append(line)
            texts.append(json.loads(line)["text"])
    return texts, b"".join(lines)


# ---------------------------------------------------------------- named corpora


def read_pydoc() -> TextSource:
    from pydoc_data.topics import topics

    documents = [topics[key] for key in sorted(topics)]
    raw = "\n\n".join(documents).encode("utf-8")
    provenance = {"origin": "stdlib", "files": ["pydoc_data.topics"], "sha256": sha256_bytes(raw)}
    return TextSource(documents, provenance)


def read_local_corpus(path: Path, split: str) -> TextSource:
    raw = path.read_bytes()
    provenance = {"origin": "local", "split": split, "files": [str(path)], "sha256": sha256_bytes(raw)}
    return TextSource(documents_of_file(path, raw), provenance)


def read_c4() -> TextSource:
    local = find_local_corpus("c4")
    if local is not None:
        return read_local_corpus(local, split="sample")
    path, failure = download_dataset_file(C4_REPO, C4_TRAIN_FILE)
    if path is None:
        raise not_found_offline("c4", failure)
    documents, raw = read_jsonl_gz_texts(path, C4_HUB_CALIBRATION_DOCUMENTS)
    provenance = {
        "origin": "hub", "split": "train", "files": [f"{C4_REPO}/{C4_TRAIN_FILE}"],
        "documents": f"first {len(documents)}", "sha256": sha256_bytes(raw),
    }
    return TextSource(documents, provenance)


def read_wikitext2_train_from_hub() -> tuple[TextSource | None, str]:
    require_pyarrow()  # before a download that could not be read
    path, failure = download_dataset_file(WIKITEXT_REPO, WIKITEXT2_FILES["train"])
    if path is None:
        return None, failure
    raw = path.read_bytes()
    rows = read_parquet_texts(path)
    # Calibration documents: the non-empty rows (headings and paragraphs).
    documents = [row for row in rows if row.strip()]
    provenance = {
        "origin": "hub", "split": "train", "files": [f"{WIKITEXT_REPO}/{WIKITEXT2_FILES['train']}"],
        "sha256": sha256_bytes(raw),
    }
    return TextSource(documents, provenance), ""


def read_wikitext2() -> TextSource:
    try:
        from_hub, failure = read_wikitext2_train_from_hub()
    except UsageError as err:  # pyarrow missing: a local copy still works
        from_hub, failure = None, str(err)
    if from_hub is not None:
        return from_hub
    local = find_local_corpus("wikitext2")
    if local is None:
        raise not_found_offline("wikitext2", failure)
    source = read_local_corpus(local, split="test")
    note = "Hub train split unavailable; calibrating on the test split contaminates wikitext2 evaluation"
    return TextSource(source.documents, {**source.provenance, "note": f"{note} ({failure})"})


def default_calibration() -> str:
    """The calibration source when the user names none: c4 where it can be had, else pydoc with one warning.

    c4 can be had when a local data folder holds it, or the Hub serves (or the cache holds) its first train shard.
    """
    if find_local_corpus("c4") is not None:
        return "c4"
    path, failure = download_dataset_file(C4_REPO, C4_TRAIN_FILE)
    if path is not None:
        return "c4"
    log.debug("c4 unavailable: %s", failure)
    log.warning("calibrating on pydoc, as c4 is in no local data folder and not on the Hub: this costs quality "
                "(SmolLM2-135M GPTQ 4-bit: perplexity ratio 1.92, against 1.50 with c4). Set LOWBIT_DATA_DIR to "
                "a folder with %s, or pass --calibration", LOCAL_CORPUS_FILES["c4"])
    return "pydoc"


def read_named(name: str) -> TextSource:
    readers = {"pydoc": read_pydoc, "c4": read_c4, "wikitext2": read_wikitext2}
    return readers[name]()


# ---------------------------------------------------------------- files and folders

FILE_SUFFIXES = (".txt", ".raw", ".md", ".jsonl")
FOLDER_SUFFIXES = (".txt", ".jsonl")


def read_file(path: Path) -> TextSource:
    if path.suffix not in FILE_SUFFIXES:
        raise UsageError(f"calibration file {path} must end in one of {', '.join(FILE_SUFFIXES)}")
    raw = path.read_bytes()
    kind = "jsonl" if path.suffix == ".jsonl" else "file"
    provenance = {"kind": kind, "files": [str(path)], "sha256": sha256_bytes(raw)}
    return TextSource(documents_of_file(path, raw), provenance)


def read_folder(folder: Path) -> TextSource:
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in FOLDER_SUFFIXES)
    if not paths:
        raise UsageError(f"calibration folder {folder} has no .txt or .jsonl files")
    documents, listing = [], []
    for path in paths:
        raw = path.read_bytes()
        documents += documents_of_file(path, raw)
        listing.append([path.relative_to(folder).as_posix(), sha256_bytes(raw)])
    folder_sha = sha256_bytes(json.dumps(listing).encode("utf-8"))
    provenance = {"kind": "folder", "files": [name for name, _ in listing], "sha256": folder_sha}
    return TextSource(documents, provenance)


def read_text_source(source: str) -> TextSource:
    """Documents and provenance of a calibration source (see the module docstring)."""
    if source in NAMED_CORPORA:
        text_source = read_named(source)
        provenance = {"source": source, "kind": "named", **text_source.provenance}
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise UsageError(f"calibration source not found: {source}")
        text_source = read_folder(path) if path.is_dir() else read_file(path)
        provenance = {"source": source, **text_source.provenance}
    if not any(doc.strip() for doc in text_source.documents):
        raise UsageError(f"calibration source {source} has no text")
    return TextSource(text_source.documents, provenance)
