"""Evaluation text and windows under the GPTQ perplexity protocol.

The protocol (shared/reference/protocols.md): join the split's rows with
"\\n\\n", tokenize once, cut non-overlapping windows of `seqlen` tokens,
drop the tail. Unless `bos=False`, every window begins with the tokenizer's
start tokens (a BOS, where it adds one), as calibration windows do and as the
model is run (calibration/windows.py says why); the reference's plain windows
are `bos=False`. Local files come first (see
`calibration.sources.find_local_corpus`), then the Hub. The provenance's
`protocol` names exactly which rows were joined, because the Hub's
wikitext2 rows differ in whitespace from the lines of the local file:
compare perplexities only under one protocol string.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from lowbit.calibration.sources import (
    C4_REPO,
    C4_VALIDATION_FILE,
    WIKITEXT2_FILES,
    WIKITEXT_REPO,
    decode_utf8,
    download_dataset_file,
    find_local_corpus,
    normalise_newlines,
    not_found_offline,
    parse_jsonl,
    read_jsonl_gz_texts,
    read_parquet_texts,
    require_pyarrow,
    sha256_bytes,
)
from lowbit.calibration.windows import start_tokens, token_ids
from lowbit.errors import UsageError

# The GPTQ reference evaluates C4 on the first 1100 validation documents.
C4_EVAL_DOCUMENTS = 1100


def file_rows(path: Path) -> list[str]:
    """The lines of a text file, CRLF read as LF, without the final newline."""
    lines = normalise_newlines(decode_utf8(path.read_bytes(), path)).split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def wikitext2_text() -> tuple[str, str, str]:
    """(text, protocol, file) of the wikitext-2 raw test split."""
    local = find_local_corpus("wikitext2")
    if local is not None:
        return "\n\n".join(file_rows(local)), "gptq-wikitext2 (rows joined by \\n\\n)", str(local)
    require_pyarrow()  # before a download that could not be read
    path, failure = download_dataset_file(WIKITEXT_REPO, WIKITEXT2_FILES["test"])
    if path is None:
        raise not_found_offline("wikitext2", failure)
    text = "\n\n".join(read_parquet_texts(path))
    return text, "gptq-wikitext2-hub (parquet rows joined by \\n\\n)", f"{WIKITEXT_REPO}/{WIKITEXT2_FILES['test']}"


def c4_text() -> tuple[str, str, str]:
    """(text, protocol, file) of C4: the local sample, else the first validation documents from the Hub."""
    local = find_local_corpus("c4")
    if local is not None:
        documents = parse_jsonl(decode_utf8(local.read_bytes(), local), local)
        return "\n\n".join(documents), "c4-local-sample (documents joined by \\n\\n)", str(local)
    path, failure = download_dataset_file(C4_REPO, C4_VALIDATION_FILE)
    if path is None:
        raise not_found_offline("c4", failure)
    documents, _ = read_jsonl_gz_texts(path, C4_EVAL_DOCUMENTS)
    protocol = f"c4-validation (first {C4_EVAL_DOCUMENTS} documents joined by \\n\\n)"
    return "\n\n".join(documents), protocol, f"{C4_REPO}/{C4_VALIDATION_FILE}"


def path_text(name: str) -> tuple[str, str, str]:
    path = Path(name).expanduser()
    if not path.is_file():
        raise UsageError(f"evaluation dataset not found: {name} (use wikitext2, c4, or a .txt/.jsonl file)")
    if path.suffix == ".jsonl":
        documents = parse_jsonl(decode_utf8(path.read_bytes(), path), path)
        return "\n\n".join(documents), "file (jsonl documents joined by \\n\\n)", str(path)
    return normalise_newlines(decode_utf8(path.read_bytes(), path)), "file (text as is)", str(path)


def load_eval_text(dataset: str) -> tuple[str, dict]:
    """Evaluation text of "wikitext2", "c4" or a file path, and its provenance."""
    readers = {"wikitext2": wikitext2_text, "c4": c4_text}
    text, protocol, file = readers[dataset]() if dataset in readers else path_text(dataset)
    if not text.strip():
        raise UsageError(f"evaluation dataset {dataset} has no text")
    provenance = {"dataset": dataset, "file": file, "protocol": protocol, "sha256": sha256_bytes(text.encode("utf-8"))}
    return text, provenance


def eval_windows(text: str, tokenizer, seqlen: int, max_windows: int | None, bos: bool = True) -> Tensor:
    """[n, seqlen] int64 windows of the text, first max_windows kept: the tokenizer's start tokens, then
    the next seqlen minus that many text tokens (non-overlapping, the tail dropped).

    The text is tokenized once. bos=False: the GPTQ reference's windows, cut from the tokenizer's default
    call, so that a BOS (where the tokenizer adds one) starts the first window only.
    """
    start = start_tokens(tokenizer) if bos else []
    length = seqlen - len(start)
    if length < 1 or (max_windows is not None and max_windows < 1):
        raise UsageError(f"seqlen and max_windows must be at least 1 (got {seqlen}, {max_windows}"
                         f"{f'; each window begins with {len(start)} start tokens' if start else ''})")
    ids = torch.tensor(token_ids(text, tokenizer) if bos else tokenizer(text, verbose=False)["input_ids"],
                       dtype=torch.int64)
    count = len(ids) // length
    if count == 0:
        raise UsageError(f"evaluation text has {len(ids)} tokens, fewer than one window of {seqlen}"
                         f"{f' ({length} after the start tokens)' if start else ''}")
    if max_windows is not None:
        count = min(count, max_windows)
    text_windows = ids[: count * length].reshape(count, length)
    return torch.cat([torch.tensor(start, dtype=torch.int64).expand(count, len(start)), text_windows], dim=1)
