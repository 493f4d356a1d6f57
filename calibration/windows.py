"""Token windows for calibration, deterministic by seed.

The flow: read a text source -> tokenize all of it once -> draw `nsamples`
windows of `seqlen` tokens at random start offsets (torch.Generator seeded
with `seed`). Start offsets are drawn independently and uniformly, as the
GPTQ reference does, so windows may overlap (always possible, likely when
the text is short); any text of at least one window is usable.

Every window begins with the tokens the tokenizer puts before any text
(`start_tokens`: Gemma's and Llama's BOS; SmolLM2 and Qwen have none), then
seqlen minus that many text tokens: the model is always run that way, and
some models are not themselves without it. Gemma-3-270M scores wikitext-2 at
perplexity 24 with a BOS before each 512-token window and 62 without one
(BENCHMARKS.md, "Windows that begin as the model is run"): the GPTQ
reference's plain windows calibrate and score it in a state no user sees.
`bos=False` gives the reference's plain windows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.calibration.sources import read_text_source
from lowbit.errors import UsageError

# With --chat-template every document becomes one assistant answer to a
# neutral request, so the model is calibrated on its chat format
# (role markers, turn ends) around ordinary text.
CHAT_REQUEST = "Continue the text."
START_PROBE = "Hello"  # any text: start_tokens reads what the tokenizer puts before it


@dataclass(frozen=True)
class CalibrationConfig:
    source: str = "c4"  # when none is named, calibration.sources.default_calibration() picks (c4, else pydoc)
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    chat_template: bool = False
    bos: bool = True  # every window begins with start_tokens(tokenizer)

    def build(self, tokenizer) -> tuple[Tensor, dict]:
        """The windows and their provenance: what the quantizer asks of its calibration."""
        return build_calibration(self, tokenizer)


def token_ids(text: str, tokenizer) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def start_tokens(tokenizer) -> list[int]:
    """The ids the tokenizer puts before any text of its own accord: [BOS] for Gemma and Llama, [] for
    SmolLM2 and Qwen (what its default call adds in front of the plain ids)."""
    plain = token_ids(START_PROBE, tokenizer)
    full = list(tokenizer(START_PROBE, verbose=False)["input_ids"])
    for offset in range(len(full) - len(plain) + 1):
        if full[offset : offset + len(plain)] == plain:
            return full[:offset]
    return []


def chat_text(document: str, tokenizer) -> str:
    conversation = [
        {"role": "user", "content": CHAT_REQUEST},
        {"role": "assistant", "content": document},
    ]
    return tokenizer.apply_chat_template(conversation, tokenize=False)


def tokenize_documents(documents: list[str], tokenizer, chat_template: bool = False) -> Tensor:
    """1-D int64 token ids of all documents, without the tokenizer's automatic special tokens.

    Plain: documents joined by "\\n\\n", tokenized once. Chat: each document
    rendered as a chat turn (the template adds its own special tokens as
    text), tokenized, and the ids concatenated.
    """
    if not chat_template:
        return torch.tensor(token_ids("\n\n".join(documents), tokenizer), dtype=torch.int64)
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError("the tokenizer has no chat template; calibrate without --chat-template")
    ids: list[int] = []
    for document in documents:
        ids += token_ids(chat_text(document, tokenizer), tokenizer)
    return torch.tensor(ids, dtype=torch.int64)


def sample_windows(tokens: Tensor, nsamples: int, seqlen: int, seed: int, start: list[int] | None = None) -> Tensor:
    """[nsamples, seqlen] int64 windows: START (the tokenizer's start tokens, or none), then text from
    independent uniform offsets (windows may overlap)."""
    start = start or []
    text_length = seqlen - len(start)
    if nsamples < 1 or text_length < 1:
        raise UsageError(f"nsamples and seqlen must be at least 1 (got {nsamples}, {seqlen}"
                         f"{f', of which {len(start)} start tokens' if start else ''})")
    if len(tokens) < text_length:
        raise UsageError(f"calibration text has {len(tokens)} tokens, fewer than one window of {seqlen}"
                         f"{f' ({text_length} after the start tokens)' if start else ''}")
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.randint(0, len(tokens) - text_length + 1, (nsamples,), generator=generator)
    prefix = torch.tensor(start, dtype=torch.int64)
    return torch.stack([torch.cat([prefix, tokens[offset : offset + text_length].to(torch.int64)])
                        for offset in offsets.tolist()])


def windows_sha256(windows: Tensor) -> str:
    """sha256 of the header "NxS\\n" followed by the ids as little-endian int64, row by row."""
    rows, columns = windows.shape
    header = f"{rows}x{columns}\n".encode("ascii")
    body = windows.to(torch.int64).contiguous().numpy().astype("<i8").tobytes()
    return hashlib.sha256(header + body).hexdigest()


def build_calibration(config: CalibrationConfig, tokenizer) -> tuple[Tensor, dict]:
    """Calibration windows and their provenance for the manifest.

    The provenance is the source's (its "sha256" named "source_sha256", as in
    the manifest) plus the window settings and the windows' own hash.
    """
    source = read_text_source(config.source)
    tokens = tokenize_documents(source.documents, tokenizer, config.chat_template)
    start = start_tokens(tokenizer) if config.bos else []
    windows = sample_windows(tokens, config.nsamples, config.seqlen, config.seed, start)
    source_provenance = {key: value for key, value in source.provenance.items() if key != "sha256"}
    provenance = {
        **source_provenance,
        "source_sha256": source.provenance["sha256"],
        "nsamples": config.nsamples,
        "seqlen": config.seqlen,
        "seed": config.seed,
        "chat_template": config.chat_template,
        "start_tokens": start,
        "windows_sha256": windows_sha256(windows),
        "n_tokens_in_source": len(tokens),
    }
    return windows, provenance
