"""`lowbit eval`: perplexity and KL divergence of a quantized model against its base, layer by layer.

    eval text --tokenize once--> windows [n, seqlen]
    each model folder --embed, decoder layers 0..L-1, final norm--> final hidden states [n, seqlen, hidden]
    both final hidden states --lm_head over chunks of positions--> NLL, KLD, same top token, delta-p

Each model runs as the quantizer does (quantize/stream.py): all windows
through decoder layer i before layer i+1, with only that layer's weights
materialised (dequantized by quantize.loader.DenseWeights), so a model far
larger than the GPU can be scored. The head then projects `chunk_tokens`
positions at a time: the logits of a whole window (seqlen x vocab floats)
never exist at once.

Scoring convention (the GPTQ protocol, the number papers report): within
each window, position t predicts token t + 1, so a window of seqlen tokens
gives seqlen - 1 predictions, as transformers' `model(ids, labels=ids).loss`
counts them. Perplexity is exp of the mean NLL over all predictions; every
window has as many, so this equals exp of the mean per-window loss. Logits
are computed in float32 whatever dtype the layers ran in.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from lowbit.calibration.windows import start_tokens
from lowbit.evals.contamination import contamination_report
from lowbit.evals.datasets import eval_windows, load_eval_text
from lowbit.errors import UsageError
from lowbit.quantize.arch import architecture_of
from lowbit.quantize.checkpoint import load_config_dict, resolve_model
from lowbit.quantize.distributed import Ranks, joined, rank_device
from lowbit.network import hub_token
from lowbit.manifest import CALIBRATION_FILE, MANIFEST, load_windows, read_manifest
from lowbit.quantize.loader import DenseWeights
from lowbit.quantize.fit import should_offload as offload_needed
from lowbit.quantize.plan import PlanSettings
from lowbit.quantize.stream import (
    Activations,
    build_skeleton,
    each_layer,
    embed_windows,
    free_weights,
    load_config,
    load_weights,
    pick_device,
    pick_dtype,
    run_layer,
)

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)

SCORING = "position t predicts token t+1 within each window (seqlen-1 predictions per window)"


@dataclass(frozen=True)
class EvalOptions:
    seqlen: int = 2048
    max_windows: int | None = None
    device: str = "auto"
    dtype: str = "auto"  # see quantize.stream.pick_dtype
    chunk_tokens: int = 512  # positions projected through lm_head at once
    offload: bool | None = None  # keep hidden states in host memory; None = decide from free GPU memory
    bos: bool = True  # every window begins with the tokenizer's start tokens (evals/datasets.py)

    def __post_init__(self) -> None:
        if self.seqlen < 2:
            raise UsageError(f"seqlen must be at least 2 (position t predicts token t+1), not {self.seqlen}")
        if self.chunk_tokens < 1 or (self.max_windows is not None and self.max_windows < 1):
            raise UsageError(f"chunk_tokens and max_windows must be at least 1 "
                             f"(got {self.chunk_tokens}, {self.max_windows})")


def default_base(quantized: Path) -> str:
    """The model a lowbit checkpoint was quantized from, as its manifest names it (a folder or a Hub id)."""
    model = (read_manifest(Path(quantized)).get("source") or {}).get("model")
    if not isinstance(model, str) or not model:
        raise UsageError(f"{MANIFEST} in {quantized} names no source model; name the base model explicitly")
    return model


# ---- one model, layer by layer ----


def model_dtype(config: dict) -> str | None:
    return config.get("torch_dtype") or config.get("dtype")


def should_offload(config: dict, windows: Tensor, chunk_tokens: int, dtype: torch.dtype, device: torch.device,
                   with_base: bool) -> bool:
    """Hidden states to host memory when quantize/plan.py predicts that keeping them on the GPU would not fit."""
    plan = PlanSettings(compute_bytes=dtype.itemsize, eval_windows=windows.shape[0], eval_seqlen=windows.shape[1],
                        eval_chunk=chunk_tokens, eval_base=with_base)
    return offload_needed(config, plan, device, "evaluate")


def dense_skeleton(folder: Path) -> nn.Module:
    """The model on `meta`, built as a plain model: the layers get dequantized weights."""
    config = load_config(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return build_skeleton(config)


def final_hidden_states(folder: Path, windows: Tensor, options: EvalOptions = EvalOptions(),
                        on_progress: ProgressFn | None = None) -> Tensor:
    """[n, seqlen, hidden] outputs of the final norm for every window, one decoder layer materialised at a time.

    They live on the device, or in host memory when offloaded, in the dtype the layers ran in.
    """
    report = on_progress or (lambda stage, done, total: None)
    weights = DenseWeights(Path(folder))
    arch = architecture_of(weights.config, weights.checkpoint.names())
    device = pick_device(options.device)
    dtype = pick_dtype(options.dtype, device, model_dtype(weights.config))
    offload = options.offload
    if offload is None:
        offload = should_offload(weights.config, windows, options.chunk_tokens, dtype, device, with_base=False)
    model = dense_skeleton(Path(folder))
    acts = embed_windows(model, weights.read(arch.embed_name), windows, device, dtype, offload)
    for _, layer, _ in each_layer(model, arch, weights.read_prefix, device, dtype, report=report,
                                  prefetch=weights.checkpoint.prefetch_prefix):
        run_layer(layer, acts, device, update=True)
    apply_final_norm(model.model.norm, weights.read_prefix(arch.norm_prefix), acts, device, dtype)
    return acts.hidden


def apply_final_norm(norm: nn.Module, tensors: dict[str, Tensor], acts: Activations,
                     device: torch.device, dtype: torch.dtype) -> None:
    load_weights(norm, tensors, device, dtype)
    with torch.no_grad():
        for i in range(acts.hidden.shape[0]):
            acts.hidden[i] = norm(acts.window(i, device))[0].to(acts.hidden.device)
    free_weights(norm)


# ---- scoring over chunks of positions ----


def chunk_log_probs(hidden: Tensor, head: Tensor) -> Tensor:
    """Next-token log-probabilities of a chunk: [positions, hidden] x [vocab, hidden] -> [positions, vocab] float32."""
    return torch.log_softmax(hidden.to(head.device, torch.float32) @ head.T, dim=-1)


def position_chunks(seqlen: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """[start, end) ranges of at most chunk_tokens positions covering the seqlen - 1 predicting positions."""
    if chunk_tokens < 1 or seqlen < 2:
        raise UsageError(f"need chunk_tokens >= 1 and windows of at least 2 tokens (got {chunk_tokens}, {seqlen})")
    return [(start, min(start + chunk_tokens, seqlen - 1)) for start in range(0, seqlen - 1, chunk_tokens)]


def targets_of(windows: Tensor, window: int, start: int, end: int, device: torch.device) -> Tensor:
    """[positions, 1] ids of the tokens that positions start..end-1 predict."""
    return windows[window, start + 1 : end + 1].to(device).unsqueeze(1)


def perplexity(hidden: Tensor, windows: Tensor, head: Tensor, chunk_tokens: int = 512) -> dict:
    """Perplexity of one model from its final hidden states; computed on the head's device."""
    return perplexity_of(token_nll(hidden, windows, head, chunk_tokens))


def token_nll(hidden: Tensor, windows: Tensor, head: Tensor, chunk_tokens: int = 512) -> Tensor:
    """Every predicted token's negative log-likelihood, window by window, in host memory."""
    nll = []
    for i in range(windows.shape[0]):
        for start, end in position_chunks(windows.shape[1], chunk_tokens):
            log_probs = chunk_log_probs(hidden[i, start:end], head)
            nll.append(-log_probs.gather(1, targets_of(windows, i, start, end, head.device))[:, 0].cpu())
    return torch.cat(nll)


def perplexity_of(nll: Tensor) -> dict:
    nll = nll.double()
    return {"ppl": float(nll.mean().exp()), "tokens": nll.numel()}


def score(base_hidden: Tensor, quant_hidden: Tensor, windows: Tensor, base_head: Tensor, quant_head: Tensor,
          chunk_tokens: int = 512, on_progress: ProgressFn | None = None) -> dict:
    """Compare two models' next-token distributions position by position (llama.cpp's figures)."""
    return summarize(*token_scores(base_hidden, quant_hidden, windows, base_head, quant_head, chunk_tokens, on_progress))


def token_scores(base_hidden: Tensor, quant_hidden: Tensor, windows: Tensor, base_head: Tensor, quant_head: Tensor,
                 chunk_tokens: int = 512, on_progress: ProgressFn | None = None) -> tuple[Tensor, ...]:
    """Per predicted token, window by window: the base's and the quantized model's NLL, the KLD, same top.

    Heads are float32 [vocab, hidden] on the device to compute on; hidden states
    move there a chunk at a time.
    """
    report = on_progress or (lambda stage, done, total: None)
    device = base_head.device
    nll_base, nll_quant, kld, same_top = [], [], [], []
    for i in range(windows.shape[0]):
        for start, end in position_chunks(windows.shape[1], chunk_tokens):
            targets = targets_of(windows, i, start, end, device)
            log_p = chunk_log_probs(base_hidden[i, start:end], base_head)
            log_q = chunk_log_probs(quant_hidden[i, start:end], quant_head)
            nll_base.append(-log_p.gather(1, targets)[:, 0].cpu())
            nll_quant.append(-log_q.gather(1, targets)[:, 0].cpu())
            kld.append((log_p.exp() * (log_p - log_q)).sum(dim=-1).cpu())  # KL(base || quantized)
            same_top.append((log_p.argmax(dim=-1) == log_q.argmax(dim=-1)).cpu())
        report("score", i + 1, windows.shape[0])
    return torch.cat(nll_base), torch.cat(nll_quant), torch.cat(kld), torch.cat(same_top)


def summarize(nll_base: Tensor, nll_quant: Tensor, kld: Tensor, same_top: Tensor) -> dict:
    """The report's figures from per-token NLLs, KLDs and same-top flags."""
    nll_base, nll_quant, kld = nll_base.double(), nll_quant.double(), kld.double()
    ppl_base = float(nll_base.mean().exp())
    ppl_quant = float(nll_quant.mean().exp())
    delta_p = (-nll_quant).exp() - (-nll_base).exp()  # p_quant(target) - p_base(target)
    median, p99, p999 = np.percentile(kld.numpy(), [50, 99, 99.9])
    return {
        "ppl_base": ppl_base,
        "ppl_quantized": ppl_quant,
        "ppl_delta": ppl_quant - ppl_base,
        "ppl_ratio": ppl_quant / ppl_base,
        "mean_log_ppl_ratio": float((nll_quant - nll_base).mean()),  # ln(PPL(Q) / PPL(base))
        "kld": {"mean": float(kld.mean()), "median": float(median), "p99": float(p99),
                "p999": float(p999), "max": float(kld.max())},
        "same_top": float(same_top.double().mean()),
        "delta_p": {"mean": float(delta_p.mean()), "rms": float(delta_p.square().mean().sqrt())},
        "tokens": nll_base.numel(),
    }


# ---- the whole evaluation ----


def evaluate(quantized: Path, base: Path | str | None, dataset: str, options: EvalOptions = EvalOptions(),
             on_progress: ProgressFn | None = None, base_revision: str | None = None) -> dict | None:
    """The report of `lowbit eval`: base vs quantized on the same windows; only the perplexity when base is None.

    Under torchrun each rank scores its own block of the windows and rank 0 puts the per-token figures
    together in window order (the report is a single process's); the other ranks return None."""
    with joined(rank_device(pick_device(options.device))) as ranks:
        return _evaluate(quantized, base, dataset, options, on_progress if ranks.primary else None, base_revision,
                         ranks)


def _evaluate(quantized: Path, base: Path | str | None, dataset: str, options: EvalOptions,
              on_progress: ProgressFn | None, base_revision: str | None, ranks: Ranks) -> dict | None:
    started = time.time()
    report = on_progress or (lambda stage, done, total: None)
    quantized = Path(quantized)
    base_folder = resolve_model(str(base), base_revision, hub_token()).folder if base is not None else None
    config = load_config_dict(quantized)
    if base_folder is not None:
        check_same_vocabulary(config, load_config_dict(base_folder))
    tokenizer = load_tokenizer(quantized if has_tokenizer(quantized) or base_folder is None else base_folder)
    text, provenance = load_eval_text(dataset)
    all_windows = eval_windows(text, tokenizer, options.seqlen, options.max_windows, options.bos)
    windows = all_windows[ranks.windows(all_windows.shape[0])]

    device = rank_device(pick_device(options.device))
    dtype = pick_dtype(options.dtype, device, model_dtype(config))
    if options.offload is None:
        offload = should_offload(config, windows, options.chunk_tokens, dtype, device, with_base=base_folder is not None)
        options = replace(options, offload=offload)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    if base_folder is None:
        hidden = final_hidden_states(quantized, windows, options, stage(report, "quantized"))
        head = head_on(DenseWeights(quantized).lm_head_weight(), device)
        nll = ranks.concat_on_primary(token_nll(hidden, windows, head, options.chunk_tokens))
        figures = perplexity_of(nll) if ranks.primary else None
    else:
        base_hidden = final_hidden_states(base_folder, windows, options, stage(report, "base"))
        quant_hidden = final_hidden_states(quantized, windows, options, stage(report, "quantized"))
        base_head = DenseWeights(base_folder).lm_head_weight()
        quant_head = DenseWeights(quantized).lm_head_weight()
        same_head = base_head.dtype == quant_head.dtype and torch.equal(base_head, quant_head)
        base_head = head_on(base_head, device)
        quant_head = base_head if same_head else head_on(quant_head, device)  # one copy when the head is shared
        scores = token_scores(base_hidden, quant_hidden, windows, base_head, quant_head, options.chunk_tokens, report)
        scores = [ranks.concat_on_primary(s) for s in scores]  # in window order: rank 0's block first
        figures = summarize(*scores) if ranks.primary else None
    if not ranks.primary:
        return None

    return {
        **figures,
        "quantized": str(quantized),
        "base": None if base is None else str(base),
        "dataset": dataset,
        "dataset_file": provenance["file"],
        "dataset_sha256": provenance["sha256"],
        "protocol": provenance["protocol"],
        "scoring": SCORING,
        "window_start_tokens": start_tokens(tokenizer) if options.bos else [],
        "windows": all_windows.shape[0],
        "seqlen": all_windows.shape[1],
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "chunk_tokens": options.chunk_tokens,
        "offload": options.offload,
        "seconds": round(time.time() - started, 3),
        "peak_host_bytes": peak_host_bytes(),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "contamination": calibration_contamination(quantized, tokenizer, text),
    }


def stage(on_progress: ProgressFn, name: str) -> ProgressFn:
    """Report a model's layer progress under the model's name ("base", "quantized")."""
    return lambda _stage, done, total: on_progress(name, done, total)


def head_on(head: Tensor, device: torch.device) -> Tensor:
    return head.to(device=device, dtype=torch.float32)


def check_same_vocabulary(quantized_config: dict, base_config: dict) -> None:
    q, b = quantized_config.get("vocab_size"), base_config.get("vocab_size")
    if q != b:
        raise UsageError(f"the base model has vocabulary size {b}, the quantized model {q}: is it the right base?")


def has_tokenizer(folder: Path) -> bool:
    """Other tools' checkpoints sometimes ship without one: the base model's then serves."""
    return any((Path(folder) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load the tokenizer in {folder}: {str(e).splitlines()[0]}") from None


def calibration_contamination(quantized: Path, tokenizer, eval_text: str) -> dict | None:
    """N-gram overlap of the saved calibration windows with the evaluation text; None without that file."""

    file = quantized / CALIBRATION_FILE
    if not file.exists():
        return None
    texts = tokenizer.batch_decode(load_windows(file).tolist(), skip_special_tokens=True)
    return contamination_report(texts, eval_text)


def peak_host_bytes() -> int | None:
    """The process's peak resident memory so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
