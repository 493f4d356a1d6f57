"""The last step of a quantization run: every tensor into the final shards, plus config, tokenizer, manifest.

Layer files from the progress folder and the source's embeddings, norm and head are
streamed one tensor at a time into `model-0000i-of-0000n.safetensors`, then the
config (with its `quantization_config`), the tokenizer files and `lowbit_manifest.json`
are written. See DESIGN.md for the manifest.
"""

from __future__ import annotations

import functools
import re
import shutil
from dataclasses import asdict
from pathlib import Path

from lowbit.files import sha256_file, write_json
from lowbit.manifest import CALIBRATION_FILE, MANIFEST, manifest_header, save_windows, write_manifest
from lowbit.quantize.checkpoint import SafetensorsCheckpoint
from lowbit.quantize.input_scales import SCALES_TAG, InputScaling, layer_scales
from lowbit.quantize.job import QuantizeJob
from lowbit.quantize.mixed import DEFAULT_WEIGHTING, Unit, base_format, budget_bytes, choose, score_of, unit_of
from lowbit.quantize.nf4 import BnbConfig, bnb_quantization_config
from lowbit.quantize.pack import LinearFormat, dynamic_map
from lowbit.quantize.pack import quantization_config as gptq_quantization_config
from lowbit.quantize.progress import candidates_dir
from lowbit.quantize.settings import QuantizeSettings
from lowbit.quantize.writer import PendingTensor, parse_size, write_sharded

TOKENIZER_FILES = re.compile(
    r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\.(json|txt)|merges\.txt|.*\.model|"
    r"chat_template\.(jinja|json)|generation_config\.json)$"
)


def assemble(job: QuantizeJob) -> dict:
    """Stream every tensor into the final shards and write config, tokenizer and manifest; the progress
    folder goes once they are written."""
    formats = mixed_formats(job) if job.settings.target_bpw is not None else {}
    manifest = write_checkpoint(job, formats, job.work)
    shutil.rmtree(job.progress_dir)
    return manifest


def write_checkpoint(job: QuantizeJob, formats: dict[str, LinearFormat], work: Path, allow_split: bool = False) -> dict:
    """The checkpoint of a solved job (every layer in its progress folder) into `work`, each decoder Linear in
    its format in `formats` (the base where absent): the base's tensors from the layer files, another kept
    candidate's from its folder, unquantized ones from the source. The progress folder is left as it is, so
    that several format maps can be written from one solve (benchmarks/mixed.py). allow_split: see
    pack.dynamic_map."""
    progress_dir, source, config, arch, reader = job.progress_dir, job.source, job.config, job.arch, job.reader
    settings, calibration_info, windows, progress, report = (job.settings, job.calibration_info, job.windows,
                                                             job.progress, job.report)
    work.mkdir(parents=True, exist_ok=True)
    for stale in work.iterdir():  # what a run killed while assembling had written
        if stale.is_file():
            stale.unlink()
    layer_files = SafetensorsCheckpoint(progress_dir)  # reads layer-*.safetensors headers
    layer_names = set(layer_files.names())

    def pending(reader_, name):
        info = reader_.info(name)
        check_finite = reader_ is reader  # source tensors (embeddings, norm, lm_head) are checked as they stream
        return PendingTensor(name, info.dtype, info.shape, lambda: reader_.read(name, check_finite=check_finite))

    base = base_format(settings)
    candidate_files = {fmt.tag: SafetensorsCheckpoint(candidates_dir(progress_dir, fmt.tag))
                       for fmt in set(formats.values()) if fmt.quantized and fmt != base}
    scales_dir = candidates_dir(progress_dir, SCALES_TAG)
    scaling = InputScaling.of(arch, config, settings) if scales_dir.is_dir() else None
    scale_files = SafetensorsCheckpoint(scales_dir) if scaling is not None else None

    def module_tensors(module: str, stored: list[str], prefix: str) -> list[PendingTensor]:
        """The tensors of the format chosen for module: the layer file's (the base), a candidate's, the source's
        (with input scales: as InputScaling.dense_tensors makes them)."""
        fmt = formats.get(module, base)
        if fmt == base:
            return [pending(layer_files, n) for n in stored]
        files = candidate_files[fmt.tag] if fmt.quantized else reader
        names = [n for n in sorted(files.names()) if _module_of(n) == module]
        if fmt.quantized or scaling is None:
            return [pending(files, n) for n in names]

        @functools.lru_cache(maxsize=1)  # a module's tensors are written one after the other: computed once
        def dense() -> dict:
            scales = layer_scales(scale_files.names(), scale_files.read, prefix)
            return scaling.dense_tensors({n: reader.read(n) for n in names}, prefix, module, scales)
        return [PendingTensor(n, reader.info(n).dtype, reader.info(n).shape, lambda n=n: dense()[n]) for n in names]

    head = [n for n in reader.names() if not n.startswith(arch.layers_prefix)]  # and a vision tower, as it is
    units: list[list[PendingTensor]] = [[pending(reader, n)] for n in head if n == arch.embed_name]
    for i in range(arch.num_layers):
        prefix = arch.layer_prefix(i)
        by_module: dict[str, list[str]] = {}
        for name in sorted(n for n in layer_names if n.startswith(prefix)):
            by_module.setdefault(_module_of(name), []).append(name)
        units.extend(module_tensors(module, stored, prefix) for module, stored in by_module.items())
    units.extend([pending(reader, n)] for n in head if n != arch.embed_name)

    total = sum(len(u) for u in units)
    written = iter(range(1, total + 1))
    files = write_sharded(work, units, parse_size(job.options.max_shard_size),
                          on_tensor=lambda name: report("write", next(written), total))

    if settings.gptq_format:
        quantization_config = gptq_quantization_config(settings, arch, dynamic_map(formats, base, arch, allow_split))
    else:
        dense = {m for m, fmt in formats.items() if not fmt.quantized}
        quantization_config = _bnb_config(settings, config, arch, dense)
    write_json(work / "config.json", {**config, "quantization_config": quantization_config})
    if settings.gptq_format:
        write_json(work / "quantize_config.json", quantization_config)
    for file in sorted(source.folder.iterdir()):
        if file.is_file() and TOKENIZER_FILES.match(file.name):
            shutil.copyfile(file, work / file.name)
    if windows is not None:
        save_windows(work / CALIBRATION_FILE, windows)
    for file in sorted(work.iterdir()):
        if file.is_file() and file.name not in files and file.name != MANIFEST:
            files[file.name] = {"sha256": sha256_file(file), "size": file.stat().st_size}

    quantized_modules = set(arch.quantized_linears(settings.is_skipped))
    quantized_weights = sum(_numel(reader.info(m + ".weight").shape) for m in quantized_modules)
    quantized_bytes = sum(t.nbytes for unit in units for t in unit  # the decoder Linears' as written, bias aside
                          if _module_of(t.name) in quantized_modules and not t.name.endswith(".bias"))
    layers = progress["layers"]
    if formats:  # what the budget chose, Linear by Linear
        layers = {m: {**stats, "bits": formats.get(m, base).bits, "group_size": formats.get(m, base).group_size}
                  for m, stats in layers.items()}
    manifest = {
        **manifest_header(),
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
        "layers": layers,
        "files": files,
        "output_bytes": sum(f["size"] for f in files.values()),
        "bits_per_weight": round(8 * quantized_bytes / max(quantized_weights, 1), 4),
        "eval": None,
    }
    write_manifest(work, manifest)
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


def mixed_formats(job: QuantizeJob, budget: int | None = None, weighting: str = DEFAULT_WEIGHTING) -> dict[str, LinearFormat]:
    """Under a size budget: the format of every decoder Linear, chosen over the whole model at once from
    the errors the layer loop measured (quantize/mixed.py); one format per projection group.
    budget: bytes of the decoder Linears; by default what the settings' target_bpw allows."""
    units = mixed_units(job, weighting)
    if budget is None:
        weights = sum(_numel(job.reader.info(m + ".weight").shape) for unit in units for m in unit.modules)
        budget = budget_bytes(job.settings.target_bpw, weights)
    chosen = choose(units, budget)
    return {m: option.fmt for unit, option in zip(units, chosen) for m in unit.modules}


def mixed_units(job: QuantizeJob, weighting: str = DEFAULT_WEIGHTING) -> list[Unit]:
    """The units of choice of a solved job (one per projection group and layer), scored from its progress."""
    arch, reader, settings, stats = job.arch, job.reader, job.settings, job.progress["layers"]
    base = base_format(settings)
    units = []
    for i in range(arch.num_layers):
        for group in arch.groups:
            modules = tuple(arch.layer_prefix(i) + name for name in group)
            infos = [reader.info(m + ".weight") for m in modules]
            scores = [score_of(settings, *info.shape, info.dtype.itemsize, stats[m], weighting)
                      for m, info in zip(modules, infos)]
            units.append(unit_of(modules, scores, base))
    return units


def _bnb_config(settings: QuantizeSettings, config: dict, arch, dense: set[str]) -> dict:
    """bitsandbytes' quantization_config; its skip list names every decoder Linear left dense (by --skip or
    by the budget) as transformers and vLLM load it."""
    skipped = sorted({arch.loaded_name(m) for m in arch.quantized_linears() if settings.is_skipped(m) or m in dense})
    source_dtype = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    bnb = BnbConfig.from_settings(settings)
    skip = ["lm_head", *arch.loaded_unquantized_modules(), *skipped]
    return bnb_quantization_config(bnb, skip, compute_dtype=source_dtype)
