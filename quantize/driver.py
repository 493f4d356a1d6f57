"""Quantize a model layer by layer into a standard checkpoint, resumably.

    source safetensors --read one layer--> solver per Linear --> layer file on disk
                                      (Hessians from calibration activations, GPTQ / calibrated NF4)
    all layer files + embeddings/norm/head --stream--> sharded output, config, manifest

Progress lives in `OUTPUT.partial/.lowbit-progress/`: one safetensors file per
finished decoder layer, the activations entering the next layer, and
`progress.json` (written last: it is the commit point). Re-running the same
command continues from there; a run with other settings or inputs refuses.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from lowbit import __version__
from lowbit.errors import LowbitError, OutputExistsError, UsageError
from quantize.arch import Architecture, architecture_of
from quantize.checkpoint import (
    ModelSource,
    SafetensorsCheckpoint,
    check_remote_code,
    load_config_dict,
    open_checkpoint,
    resolve_model,
)
from quantize.manifest import CALIBRATION_FILE, MANIFEST
from quantize.gptq import GPTQConfig, gptq_quantize, rtn_quantize
from quantize.nf4 import BnbConfig, bnb_quantization_config, quantize_bnb
from quantize.pack import pack_gptq_v1
from quantize.stream import (
    Activations,
    add_input_hook,
    build_skeleton,
    embed_windows,
    free_weights,
    load_config,
    load_weights,
    pick_device,
    pick_dtype,
    run_layer,
    run_layer_until,
)
from quantize.writer import (
    PendingTensor,
    check_output_free,
    disk_full_error,
    parse_size,
    publish_folder,
    sha256_file,
    write_json,
    write_sharded,
)

log = logging.getLogger("lowbit")

METHODS = ("gptq", "rtn", "nf4", "fp4")
TOKENIZER_FILES = re.compile(
    r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\.(json|txt)|merges\.txt|.*\.model|"
    r"chat_template\.(jinja|json)|generation_config\.json)$"
)


@dataclass(frozen=True)
class QuantizeSettings:
    """What the output depends on: the method and its parameters."""

    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: bool = False
    static_groups: bool = False
    damp: float = 0.01
    true_sequential: bool = True
    double_quant: bool = True  # nf4/fp4
    skip: str | None = None  # regex of module names kept in 16-bit (nf4/fp4)

    def calibrated(self, has_calibration: bool) -> bool:
        return self.method == "gptq" or (self.method in ("nf4", "fp4") and has_calibration)


@dataclass(frozen=True)
class RunOptions:
    """How to run: none of it changes the output."""

    device: str = "auto"
    dtype: str = "auto"
    max_shard_size: str = "2GB"
    offload: bool | None = None  # activations in host memory; None = decide from free GPU memory
    force: bool = False
    trust_remote_code: bool = False
    allow_pickle: bool = False  # read pickled .bin weights (weights_only) when there are no safetensors
    revision: str | None = None
    token: str | None = None


@dataclass
class QuantizeResult:
    output: Path
    manifest: dict
    seconds: float
    resumed_from_layer: int = 0


ProgressFn = Callable[[str, int, int], None]


@dataclass
class SolvedLinear:
    tensors: dict[str, torch.Tensor]  # names relative to the module, as written to disk
    dequantized: torch.Tensor  # [N, K] float32, what a loader will compute
    stats: dict = field(default_factory=dict)


def make_solver(settings: QuantizeSettings) -> Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None], SolvedLinear]:
    """One function (weight, hessian or None, bias or None) -> what to write, for the chosen method."""
    if settings.method in ("gptq", "rtn"):
        config = GPTQConfig(bits=settings.bits, group_size=settings.group_size, sym=settings.sym,
                            act_order=settings.act_order, static_groups=settings.static_groups, damp=settings.damp)

        def solve_uniform(weight, hessian, bias):
            if hessian is None:
                q, stats = rtn_quantize(weight, config), {}
            else:
                q, gptq_stats = gptq_quantize(weight, hessian, config)
                stats = {"damp": gptq_stats.damp, "dead_inputs": gptq_stats.dead_inputs}
            return SolvedLinear(pack_gptq_v1(q, bias), q.dequantize(), stats)

        return solve_uniform

    bnb = BnbConfig(quant_type=settings.method, double_quant=settings.double_quant, damp=settings.damp)

    def solve_bnb(weight, hessian, bias):
        tensors, dequantized, stats = quantize_bnb(weight, bnb, hessian)
        if bias is not None:
            tensors["bias"] = bias
        return SolvedLinear(tensors, dequantized, stats)

    return solve_bnb


def relative_output_error(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor | None, max_rows: int = 512) -> float:
    """||(W - Q) X||^2 / ||W X||^2 through the Hessian (on a strided subset of rows, to stay cheap);
    without a Hessian, the plain relative weight error."""
    step = max(1, weight.shape[0] // max_rows)
    w, d = weight[::step].float(), (weight - dequantized)[::step].float()
    if hessian is None:
        return float((d * d).sum() / (w * w).sum().clamp_min(1e-30))
    return float(((d @ hessian) * d).sum() / ((w @ hessian) * w).sum().clamp_min(1e-30))


class HessianAccumulator:
    """H = 2/n * sum(x x^T) over all input rows seen, as a running mean in float32."""

    def __init__(self, columns: int, device: torch.device):
        self.hessian = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.float()
        rows = x.shape[0]
        self.hessian *= self.rows / (self.rows + rows)
        self.rows += rows
        x = x * (2 / self.rows) ** 0.5
        self.hessian += x.T @ x


def quantize_model(
    model: str,
    output: Path,
    settings: QuantizeSettings,
    calibration=None,  # calibration.windows.CalibrationConfig, or None (rtn, plain nf4)
    options: RunOptions = RunOptions(),
    on_progress: ProgressFn | None = None,
) -> QuantizeResult:
    """The whole `lowbit quantize`: returns once OUTPUT holds a complete checkpoint."""
    started = time.time()
    report = on_progress or (lambda stage, done, total: None)
    if settings.method not in METHODS:
        raise UsageError(f"unknown method {settings.method!r} (use {', '.join(METHODS)})")
    if settings.method == "gptq" and calibration is None:
        raise UsageError("gptq needs calibration data (--calibration)")
    output = Path(output)
    check_output_free(output, options.force)

    source = resolve_model(model, options.revision, options.token)
    config = load_config_dict(source.folder)
    arch = architecture_of(config)
    check_remote_code(config, source.name, options.trust_remote_code)
    reader = open_checkpoint(source.folder, options.allow_pickle)
    check_shapes(arch, reader, settings)
    device = pick_device(options.device)
    dtype = pick_dtype(options.dtype, device, config.get("torch_dtype") or config.get("dtype"))

    windows, calibration_info = None, None
    if settings.calibrated(calibration is not None):
        windows, calibration_info = _calibration_windows(source, calibration, options)

    work = output.with_name(output.name + ".partial")
    progress_dir = work / ".lowbit-progress"
    fingerprint = _fingerprint(settings, reader, config, calibration_info)
    progress = _open_progress(work, progress_dir, fingerprint, options.force)
    layers_done = progress["layers_done"]
    if layers_done:
        log.info("resuming %s from layer %d of %d", output, layers_done, arch.num_layers)

    try:
        solve = make_solver(settings)
        if windows is not None:
            _quantize_calibrated(source, config, arch, reader, settings, options, solve, windows, device, dtype,
                                 progress_dir, progress, report)
        else:
            _quantize_weights_only(arch, reader, settings, solve, progress_dir, progress, report)
        manifest = _assemble(work, progress_dir, source, config, arch, reader, settings, options,
                             calibration_info, windows, progress, report)
    except OSError as e:
        error = disk_full_error(e, work, reader.total_bytes())
        if error is None:
            raise
        shutil.rmtree(work, ignore_errors=True)
        raise error from None
    except LowbitError:
        # Bad input found part-way (a NaN weight, say): fixing the input makes this progress stale anyway.
        # A crash or a kill keeps OUTPUT.partial for the next run to resume.
        shutil.rmtree(work, ignore_errors=True)
        raise
    publish_folder(work, output)
    return QuantizeResult(output, manifest, time.time() - started, resumed_from_layer=layers_done)


def check_shapes(arch: Architecture, reader: SafetensorsCheckpoint, settings: QuantizeSettings) -> None:
    """Every Linear must exist, and its shape must fit the packing and the group size."""
    for i in range(arch.num_layers):
        for name in arch.linear_names():
            full = arch.layer_prefix(i) + name + ".weight"
            if full not in reader:
                raise UsageError(f"checkpoint lacks {full} (is it a complete {arch.name} checkpoint?)")
            n, k = reader.info(full).shape
            if settings.method not in ("gptq", "rtn"):
                continue
            if settings.group_size > 0 and k % settings.group_size:
                raise UsageError(f"group size {settings.group_size} does not divide in_features {k} of "
                                 f"{full[:-7]} (choose a group size that divides it, or -1)")
            if (k * settings.bits) % 32 or (n * settings.bits) % 32:
                raise UsageError(f"{full[:-7]} is {n}x{k}: {settings.bits}-bit GPTQ packing needs both "
                                 f"dimensions to fill whole 32-bit words")


def _calibration_windows(source: ModelSource, calibration, options: RunOptions):
    from transformers import AutoTokenizer

    from calibration.windows import build_calibration

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.folder, trust_remote_code=options.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load the tokenizer of {source.name}: {str(e).splitlines()[0]}") from None
    return build_calibration(calibration, tokenizer)


def _fingerprint(settings: QuantizeSettings, reader: SafetensorsCheckpoint, config: dict, calibration_info: dict | None) -> str:
    """What the output depends on; progress made under another fingerprint is stale."""
    tensors = sorted((name, str(info.dtype), info.shape, info.file.stat().st_size, info.file.stat().st_mtime_ns)
                     for name, info in reader.tensors.items())
    data = {
        "settings": asdict(settings),
        "config": config,
        "tensors": tensors,
        "calibration": calibration_info and calibration_info.get("windows_sha256"),
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _open_progress(work: Path, progress_dir: Path, fingerprint: str, force: bool) -> dict:
    progress_file = progress_dir / "progress.json"
    if progress_file.exists():
        progress = json.loads(progress_file.read_text())
        if progress.get("fingerprint") == fingerprint:
            return progress
        if not force:
            raise OutputExistsError(f"{work} holds progress of a run with other settings or inputs; "
                                    f"re-run with --force to discard it and start over")
    if work.exists():
        shutil.rmtree(work)
    progress_dir.mkdir(parents=True)
    progress = {"fingerprint": fingerprint, "layers_done": 0, "layers": {},
                "created": _created_timestamp()}
    write_json(progress_file, progress)
    return progress


def _created_timestamp() -> str:
    """Now, or SOURCE_DATE_EPOCH when set (reproducible builds: two runs then write identical manifests)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    seconds = int(epoch) if epoch.isdigit() else time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, with a full disk raised as the OSError that open() would raise."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        for code in (errno.ENOSPC, errno.EDQUOT):
            if f"os error {code})" in str(e):
                raise OSError(code, os.strerror(code), str(path)) from None
        raise


def _save_layer(progress_dir: Path, index: int, tensors: dict[str, torch.Tensor], progress: dict,
                layer_stats: dict, acts: Activations | None) -> None:
    """Persist one finished layer; progress.json is written last, so a crash leaves a consistent state."""
    tmp = progress_dir / f"layer-{index:05d}.safetensors.tmp"
    _save_tensors({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
    tmp.replace(progress_dir / f"layer-{index:05d}.safetensors")
    if acts is not None:
        tmp = progress_dir / f"activations-{index + 1:05d}.safetensors.tmp"
        _save_tensors({"hidden": acts.hidden.detach().to("cpu").contiguous()}, tmp)
        tmp.replace(progress_dir / f"activations-{index + 1:05d}.safetensors")
    progress["layers_done"] = index + 1
    progress["layers"].update(layer_stats)
    write_json(progress_dir / "progress.json", progress)
    old = progress_dir / f"activations-{index:05d}.safetensors"
    old.unlink(missing_ok=True)


def _is_skipped(name: str, settings: QuantizeSettings) -> bool:
    return settings.skip is not None and re.search(settings.skip, name) is not None


def _quantize_weights_only(arch, reader, settings, solve, progress_dir, progress, report) -> None:
    """RTN and plain NF4 need no activations: read a tensor, quantize it, keep only the result."""
    linears = set(arch.linear_names())
    for i in range(progress["layers_done"], arch.num_layers):
        prefix = arch.layer_prefix(i)
        out: dict[str, torch.Tensor] = {}
        stats: dict[str, dict] = {}
        for name in [n for n in reader.names() if n.startswith(prefix)]:
            module, _, kind = name[len(prefix):].rpartition(".")
            if module in linears and kind == "bias" and not _is_skipped(prefix + module, settings):
                continue  # written with its weight
            if module not in linears or kind != "weight" or _is_skipped(prefix + module, settings):
                out[name] = reader.read(name)
                continue
            weight = reader.read(name)
            bias_name = prefix + module + ".bias"
            bias = reader.read(bias_name) if bias_name in reader else None
            solved = solve(weight.float(), None, bias)
            out.update({f"{prefix}{module}.{k}": v for k, v in solved.tensors.items()})
            stats[prefix + module] = {"error": relative_output_error(weight.float(), solved.dequantized, None), **solved.stats}
        _save_layer(progress_dir, i, out, progress, stats, None)
        report("quantize", i + 1, arch.num_layers)


def _quantize_calibrated(source, config, arch, reader, settings, options, solve, windows, device, dtype,
                         progress_dir, progress, report) -> None:
    """GPTQ's layer-by-layer loop: Hessians from the activations, solve each Linear, move on."""
    skeleton = build_skeleton(load_config(source.folder, options.trust_remote_code), options.trust_remote_code)
    offload = options.offload if options.offload is not None else _should_offload(windows, config, dtype, device, settings)
    start = progress["layers_done"]
    embed = reader.read("model.embed_tokens.weight")
    if start == 0:
        acts = embed_windows(skeleton, embed, windows, device, dtype, offload)
    else:  # the layer arguments come from one window; the hidden states from disk
        acts = embed_windows(skeleton, embed, windows[:1], device, dtype, offload)
        hidden = _read_activations(progress_dir / f"activations-{start:05d}.safetensors")
        acts.hidden = hidden.to(acts.hidden.device)
    del embed
    report("quantize", start, arch.num_layers)
    for i in range(start, arch.num_layers):
        prefix = arch.layer_prefix(i)
        layer = skeleton.model.layers[i]
        source_tensors = reader.read_prefix(prefix)
        load_weights(layer, source_tensors, device, dtype)
        out, stats = _quantize_layer(layer, prefix, arch, settings, solve, source_tensors, acts, device)
        run_layer(layer, acts, device, update=True)  # the next layer sees the quantized layer's outputs
        free_weights(layer)
        _save_layer(progress_dir, i, out, progress, stats, acts)
        report("quantize", i + 1, arch.num_layers)


def _read_activations(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(path))["hidden"]


def _should_offload(windows: torch.Tensor, config: dict, dtype: torch.dtype, device: torch.device,
                    settings: QuantizeSettings = QuantizeSettings()) -> bool:
    """Activations to host memory when quantize/plan.py predicts that keeping them on the GPU would not fit."""
    if device.type != "cuda":
        return False
    from quantize.plan import PlanSettings, should_offload_calibration

    plan = PlanSettings(method=settings.method, bits=settings.bits, group_size=settings.group_size,
                        true_sequential=settings.true_sequential, nsamples=windows.shape[0], seqlen=windows.shape[1],
                        device="cuda", compute_bytes=torch.empty((), dtype=dtype).element_size())
    free, _ = torch.cuda.mem_get_info(device)
    return should_offload_calibration(config, plan, free)


def _quantize_layer(layer, prefix, arch, settings, solve, source_tensors, acts, device):
    """Quantize the Linears of one loaded decoder layer, group by group; returns (tensors to write, stats)."""
    out = {prefix + name: t for name, t in source_tensors.items()}  # norms etc. stay as they are
    stats: dict[str, dict] = {}
    groups = [g for g in arch.groups if not all(_is_skipped(prefix + m, settings) for m in g)]
    # true sequential: each group's Hessian is measured with the earlier groups already quantized
    batches = [[g] for g in groups] if settings.true_sequential else [groups]
    for batch in batches:
        hessians = _collect_hessians(layer, batch, acts, device)
        for group, hessian in zip(batch, hessians):
            for name in group:
                if _is_skipped(prefix + name, settings):
                    continue
                linear = layer.get_submodule(name)
                weight = linear.weight.detach().float()
                bias = source_tensors.get(name + ".bias")
                try:
                    solved = solve(weight, hessian.hessian, bias)
                except LowbitError as e:
                    raise type(e)(f"{prefix}{name}: {e}") from None
                linear.weight.data = solved.dequantized.to(linear.weight.dtype)
                for key in ("weight", "bias"):
                    out.pop(f"{prefix}{name}.{key}", None)
                out.update({f"{prefix}{name}.{k}": v for k, v in solved.tensors.items()})
                error = relative_output_error(weight, solved.dequantized, hessian.hessian)
                stats[prefix + name] = {"error": error, **solved.stats}
    return out, stats


def _collect_hessians(layer, groups, acts: Activations, device) -> list[HessianAccumulator]:
    """One pass over the windows, stopped after the last group's modules, with a Hessian per group."""
    accumulators, handles = [], []
    for group in groups:
        first = layer.get_submodule(group[0])
        acc = HessianAccumulator(first.in_features, device)
        accumulators.append(acc)
        handles.append(add_input_hook(first, acc.add))
    try:
        run_layer_until(layer, acts, device, last=layer.get_submodule(groups[-1][-1]))
    finally:
        for h in handles:
            h.remove()
    return accumulators


def _assemble(work, progress_dir, source, config, arch, reader, settings, options, calibration_info,
              windows, progress, report) -> dict:
    """Stream every tensor into the final shards and write config, tokenizer and manifest."""
    for stale in work.iterdir():  # what a run killed while assembling had written
        if stale.is_file():
            stale.unlink()
    layer_files = SafetensorsCheckpoint(progress_dir)  # reads layer-*.safetensors headers
    layer_names = set(layer_files.names())

    def pending(reader_, name):
        info = reader_.info(name)
        check_finite = reader_ is reader  # source tensors (embeddings, norm, lm_head) are checked as they stream
        return PendingTensor(name, info.dtype, info.shape, lambda: reader_.read(name, check_finite=check_finite))

    head = [n for n in reader.names() if not n.startswith("model.layers.")]
    units: list[list[PendingTensor]] = [[pending(reader, n)] for n in head if n.startswith("model.embed_tokens")]
    for i in range(arch.num_layers):
        prefix = arch.layer_prefix(i)
        by_module: dict[str, list[PendingTensor]] = {}
        for name in sorted(n for n in layer_names if n.startswith(prefix)):
            by_module.setdefault(_module_of(name), []).append(pending(layer_files, name))
        units.extend(by_module.values())
    units.extend([pending(reader, n)] for n in head if not n.startswith("model.embed_tokens"))

    total = sum(len(u) for u in units)
    written = iter(range(1, total + 1))
    files = write_sharded(work, units, parse_size(options.max_shard_size),
                          on_tensor=lambda name: report("write", next(written), total))

    quantization_config = _quantization_config(settings, config)
    write_json(work / "config.json", {**config, "quantization_config": quantization_config})
    if settings.method in ("gptq", "rtn"):
        write_json(work / "quantize_config.json", quantization_config)
    for file in sorted(source.folder.iterdir()):
        if file.is_file() and TOKENIZER_FILES.match(file.name):
            shutil.copyfile(file, work / file.name)
    if windows is not None:
        from calibration.windows import save_windows

        save_windows(work / CALIBRATION_FILE, windows)
    for file in sorted(work.iterdir()):
        if file.is_file() and file.name not in files and file.name != MANIFEST:
            files[file.name] = {"sha256": sha256_file(file), "size": file.stat().st_size}

    quantized_modules = {arch.layer_prefix(i) + n for i in range(arch.num_layers) for n in arch.linear_names()
                         if not _is_skipped(arch.layer_prefix(i) + n, settings)}
    quantized_weights = sum(_numel(reader.info(m + ".weight").shape) for m in quantized_modules)
    quantized_bytes = sum(layer_files.info(n).nbytes for n in layer_names
                          if _module_of(n) in quantized_modules and not n.endswith(".bias"))
    manifest = {
        "format": "lowbit-manifest",
        "version": 1,
        "tool": {"name": "lowbit", "version": __version__},
        "created": progress["created"],
        "method": settings.method,
        "settings": asdict(settings),
        "source": {
            "model": source.name,
            "revision": source.revision,
            "architecture": arch.name,
            "dtype": config.get("torch_dtype") or config.get("dtype"),
            "num_parameters": sum(_numel(info.shape) for info in reader.tensors.values()),
            "size_bytes": reader.total_bytes(),
        },
        "calibration": calibration_info and {**calibration_info, "tokens_file": CALIBRATION_FILE},
        "layers": progress["layers"],
        "files": files,
        "output_bytes": sum(f["size"] for f in files.values()),
        "bits_per_weight": round(8 * quantized_bytes / max(quantized_weights, 1), 4),
        "eval": None,
    }
    write_json(work / MANIFEST, manifest)
    shutil.rmtree(progress_dir)
    return manifest


def _module_of(name: str) -> str:
    """The module a tensor belongs to: 'a.b.weight.absmax' -> 'a.b', 'a.b.qweight' -> 'a.b'."""
    if ".weight." in name:
        return name.split(".weight.")[0]
    return name.rsplit(".", 1)[0]


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _quantization_config(settings: QuantizeSettings, config: dict) -> dict:
    if settings.method in ("gptq", "rtn"):
        return {
            "quant_method": "gptq",
            "bits": settings.bits,
            "group_size": settings.group_size,
            "desc_act": settings.act_order,
            "sym": settings.sym,
            "checkpoint_format": "gptq",
            "damp_percent": settings.damp,
            "true_sequential": settings.true_sequential,
            "static_groups": settings.static_groups,
            "lm_head": False,
            "meta": {"quantizer": [f"lowbit:{__version__}"], "method": settings.method},
        }
    arch = architecture_of(config)
    skipped = sorted({arch.layer_prefix(i) + n for i in range(arch.num_layers) for n in arch.linear_names()
                      if _is_skipped(arch.layer_prefix(i) + n, settings)})
    source_dtype = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    bnb = BnbConfig(quant_type=settings.method, double_quant=settings.double_quant, damp=settings.damp)
    return bnb_quantization_config(bnb, ["lm_head", *skipped], compute_dtype=source_dtype)
