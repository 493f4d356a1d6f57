"""`lowbit run RECIPE.toml`: quantize -> eval (with gates) -> push, from one file a CI job keeps.

A recipe is TOML with the tables [model], [quantize], [calibration], [eval]
(with [eval.gates]), [push] and [output]; `SCHEMA` below lists every key.
Relative paths resolve against the recipe's folder. The Hub token comes only
from HF_TOKEN, never from the file.

Each stage records in the checkpoint's manifest, under "run", a hash of its
inputs, so that running the same recipe again does only what changed:

- quantize: inputs = [model] + [quantize] + [calibration] + the source
  folder's file list (name, size, mtime). Skipped when the output's manifest
  holds the same inputs hash and every file the manifest lists is unchanged.
  "Unchanged" is checked cheaply: a file whose size and mtime are those
  recorded when it was written is trusted; any other is re-hashed (sha256)
  against the manifest. An untouched output costs a few stat calls, a copied
  one a full read, and a modified one a new quantization. An interrupted
  quantization resumes (the driver keeps OUTPUT.partial).
- eval: inputs = [eval] without its gates + the base model + the hash of the
  quantize output's file list. Same inputs and the same stored report: the
  report is reused; if only the gates changed they are re-checked on it,
  without scoring again.
- push: inputs = repo id, revision, create_pr, Hub endpoint + the output's
  file list hash + the eval report's hash. Same inputs: skipped (and a push
  uploads only the files the Hub lacks anyway). Nothing is pushed while a
  gate fails.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from lowbit.calibration.sources import NAMED_CORPORA, default_calibration
from lowbit.calibration.windows import CalibrationConfig
from lowbit.evals.evaluate import EvalOptions, evaluate
from lowbit.evals.report import Gates, attach_to_manifest, check_gates
from lowbit.errors import LowbitError, OutputExistsError, UsageError
from lowbit.hub import PushOptions, hub_endpoint, push_folder, validate_repo_id
from lowbit.network import hub_token
from lowbit.quantize.driver import RunOptions, quantize_model
from lowbit.quantize.settings import METHODS, QuantizeSettings
from lowbit.manifest import read_manifest, update_manifest
from lowbit.quantize.writer import parse_size
from lowbit.files import sha256_file

RUN = "run"  # the manifest key holding each stage's record
EVAL_DATASETS = ("wikitext2", "c4")  # named evaluation corpora; anything else is a path
DTYPES = ("auto", "float32", "float16", "bfloat16")

# Every key a recipe may hold, with its TOML type; a nested dict is a sub-table.
SCHEMA: dict[str, dict] = {
    "model": {"source": str, "revision": str},
    "quantize": {
        "method": str, "bits": int, "group_size": int, "act_order": bool, "sym": bool, "damp": float,
        "static_groups": bool, "scale_search": bool, "true_sequential": bool, "double_quant": bool, "skip": str,
        "device": str, "dtype": str, "max_shard_size": str,
    },
    "calibration": {"source": str, "nsamples": int, "seqlen": int, "seed": int, "chat_template": bool},
    "eval": {
        "dataset": str, "seqlen": int, "max_windows": int, "device": str, "dtype": str, "chunk_tokens": int,
        "gates": {"max_ppl_delta": float, "max_ppl_ratio": float, "max_kld": float, "min_same_top": float},
    },
    "push": {"repo_id": str, "private": bool, "revision": str, "create_pr": bool, "commit_message": str,
             "base_model": str, "dry_run": bool},
    "output": {"dir": str},
}  # fmt: skip
TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


@dataclass(frozen=True)
class ModelSection:
    source: str  # an absolute folder path, or a Hub repo id
    revision: str | None = None


@dataclass(frozen=True)
class EvalSection:
    dataset: str = "wikitext2"
    options: EvalOptions = EvalOptions()
    gates: Gates = Gates()


@dataclass(frozen=True)
class Recipe:
    path: Path
    model: ModelSection
    settings: QuantizeSettings
    run_options: RunOptions  # device, dtype, max_shard_size (token and force are added when running)
    calibration: CalibrationConfig | None
    eval: EvalSection | None
    push: PushOptions | None  # the token is added when running
    output: Path


# ---- reading a recipe ----


def load_recipe(path: Path) -> Recipe:
    """Parse and validate RECIPE.toml; UsageError naming the key for anything wrong."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"recipe not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read recipe {path}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path} is not valid TOML: {e}") from None
    tables = check_table(data, SCHEMA, "", path)
    for required in ("model", "output"):
        if required not in tables:
            raise UsageError(f"{path}: the recipe has no {required} table")  # no brackets: the CLI prints rich markup
    return build_recipe(tables, path)


def check_table(table, schema: dict, name: str, recipe: Path) -> dict:
    """The table itself, once every key is known and every value has its type."""
    if not isinstance(table, dict):
        raise UsageError(f"{recipe}: {name} must be a table")
    for key, value in table.items():
        full = f"{name}.{key}" if name else key
        if full == "push.token":
            raise UsageError(f"{recipe}: push.token is not allowed: the token is read from HF_TOKEN only")
        if key not in schema:
            raise UsageError(f"{recipe}: unknown key {full} (known: {', '.join(schema)})")
        expected = schema[key]
        if isinstance(expected, dict):
            check_table(value, expected, full, recipe)
        elif not has_type(value, expected):
            raise UsageError(f"{recipe}: {full} must be {TYPE_NAMES[expected]}, not {value!r}")
    return table


def has_type(value, expected: type) -> bool:
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def require(condition: bool, recipe: Path, key: str, message: str) -> None:
    if not condition:
        raise UsageError(f"{recipe}: {key} {message}")


def build_recipe(tables: dict, path: Path) -> Recipe:
    folder = path.resolve().parent
    model = tables["model"]
    require("source" in model, path, "model.source", "is required")
    output = tables["output"]
    require("dir" in output, path, "output.dir", "is required")
    quantize = dict(tables.get("quantize", {}))
    run_keys = ("device", "dtype", "max_shard_size")
    run_options = RunOptions(**{k: quantize.pop(k) for k in run_keys if k in quantize})
    settings = QuantizeSettings(**quantize)
    check_quantize(settings, run_options, path)
    return Recipe(
        path=path,
        model=ModelSection(model_source(model["source"], folder), model.get("revision")),
        settings=settings,
        run_options=run_options,
        calibration=calibration_section(tables.get("calibration"), settings, folder, path),
        eval=eval_section(tables.get("eval"), folder, path),
        push=push_section(tables.get("push"), path),
        output=resolve_path(output["dir"], folder),
    )


def check_quantize(settings: QuantizeSettings, run_options: RunOptions, path: Path) -> None:
    require(settings.method in METHODS, path, "quantize.method", f"must be one of {', '.join(METHODS)}")
    require(settings.bits in (2, 3, 4, 8), path, "quantize.bits", "must be 2, 3, 4 or 8")
    require(settings.group_size == -1 or settings.group_size >= 1, path, "quantize.group_size",
            "must be -1 or positive")
    require(0 < settings.damp < 1, path, "quantize.damp", "must be between 0 and 1")
    require(run_options.dtype in DTYPES, path, "quantize.dtype", f"must be one of {', '.join(DTYPES)}")
    try:
        parse_size(run_options.max_shard_size)
    except ValueError as e:
        raise UsageError(f"{path}: quantize.max_shard_size: {e}") from None


def calibration_section(table: dict | None, settings: QuantizeSettings, folder: Path,
                        path: Path) -> CalibrationConfig | None:
    """gptq without a calibration source uses `default_calibration()` (c4, else pydoc); rtn uses one only for
    its scale search; nf4/fp4 are calibrated only when the table is there.
    """
    if settings.method == "rtn" and not settings.scale_search:
        require(table is None, path, "calibration", "is not used by method rtn without scale_search: remove the table")
        return None
    if table is None and settings.method != "gptq":
        return None
    table = dict(table or {})
    if "source" not in table:
        table["source"] = default_calibration()
    config = CalibrationConfig(**table)
    require(config.nsamples >= 1, path, "calibration.nsamples", "must be at least 1")
    require(config.seqlen >= 2, path, "calibration.seqlen", "must be at least 2")
    source = config.source if config.source in NAMED_CORPORA else str(resolve_path(config.source, folder))
    return CalibrationConfig(**{**asdict(config), "source": source})


def eval_section(table: dict | None, folder: Path, path: Path) -> EvalSection | None:
    if table is None:
        return None
    table = dict(table)
    gates = Gates(**table.pop("gates", {}))
    dataset = table.pop("dataset", "wikitext2")
    if dataset not in EVAL_DATASETS:
        dataset = str(resolve_path(dataset, folder))
    require(table.get("dtype", "auto") in DTYPES, path, "eval.dtype", f"must be one of {', '.join(DTYPES)}")
    for key, minimum in (("seqlen", 2), ("max_windows", 1), ("chunk_tokens", 1)):
        require(table.get(key, minimum) >= minimum, path, f"eval.{key}", f"must be at least {minimum}")
    return EvalSection(dataset, EvalOptions(**table), gates)


def push_section(table: dict | None, path: Path) -> PushOptions | None:
    if table is None:
        return None
    require("repo_id" in table, path, "push.repo_id", "is required")
    try:
        validate_repo_id(table["repo_id"])
    except UsageError as e:
        raise UsageError(f"{path}: push.repo_id: {e}") from None
    if "base_model" in table:
        try:
            validate_repo_id(table["base_model"])
        except UsageError as e:
            raise UsageError(f"{path}: push.base_model: {e}") from None
    return PushOptions(**table)


def resolve_path(value: str, folder: Path) -> Path:
    """A path as written in the recipe, relative to the recipe's folder; absolute paths stay."""
    return (folder / Path(value).expanduser()).resolve()


def model_source(value: str, folder: Path) -> str:
    """A path when it starts with '.', '/' or '~' or names something next to the recipe; else a Hub repo id."""
    if value.startswith((".", "/", "~")) or (folder / value).exists():
        return str(resolve_path(value, folder))
    return value


# ---- hashes of stage inputs and outputs ----


def stable_hash(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def files_hash(manifest: dict) -> str:
    """The quantize output's identity: the hash of the manifest's {file: {sha256, size}} map."""
    return stable_hash(manifest.get("files") or {})


def source_fingerprint(source: str) -> list | None:
    """(name, size, mtime) of a local model folder's files; None for a Hub id (pin `revision` for CI)."""
    folder = Path(source)
    if not folder.is_dir():
        return None
    return sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in folder.iterdir() if f.is_file())


def file_stats(folder: Path, manifest: dict) -> dict[str, list[int]]:
    return {name: [(folder / name).stat().st_size, (folder / name).stat().st_mtime_ns]
            for name in manifest.get("files") or {}}


def files_unchanged(folder: Path, manifest: dict, recorded_stats: dict) -> bool:
    """Every file of the manifest is there with its size; those whose stat moved are re-hashed."""
    for name, entry in (manifest.get("files") or {}).items():
        file = folder / name
        if not file.is_file() or file.stat().st_size != entry.get("size"):
            return False
        if recorded_stats.get(name) != [file.stat().st_size, file.stat().st_mtime_ns]:
            if sha256_file(file) != entry.get("sha256"):
                return False
    return True


def manifest_or_none(folder: Path) -> dict | None:
    try:
        return read_manifest(folder)
    except LowbitError:
        return None


def record_stage(folder: Path, stage: str, record: dict) -> dict:
    """Store one stage's record in manifest["run"] (rewritten atomically); returns the manifest."""
    return update_manifest(folder, RUN, {**(read_manifest(folder).get(RUN) or {}), stage: record})


# ---- the stages ----

ProgressFn = Callable[[str, int, int], None]


def quantize_stage(recipe: Recipe, token: str | None, force: bool, on_progress: ProgressFn | None) -> dict:
    output = recipe.output
    inputs = stable_hash({
        "model": asdict(recipe.model),
        "source_files": source_fingerprint(recipe.model.source),
        "settings": asdict(recipe.settings),
        "run_options": asdict(recipe.run_options),
        "calibration": recipe.calibration and asdict(recipe.calibration),
    })  # fmt: skip
    manifest = manifest_or_none(output)
    record = ((manifest or {}).get(RUN) or {}).get("quantize") or {}
    current = manifest is not None and record.get("inputs") == inputs
    if not force and current and files_unchanged(output, manifest, record.get("stat") or {}):
        if record.get("stat") != file_stats(output, manifest):  # re-hashed files: trust their new stat next time
            record_stage(output, "quantize", {**record, "stat": file_stats(output, manifest)})
        return {"stage": "skipped"}
    if output.exists() and not force and (manifest is None or RUN not in manifest):
        raise OutputExistsError(f"output {output} exists and was not made by `lowbit run` (use --force to replace it)")
    # force=True: a recipe owns its output folder, and progress from other settings is stale
    options = RunOptions(**{**asdict(recipe.run_options), "force": True, "revision": recipe.model.revision,
                            "token": token})
    result = quantize_model(recipe.model.source, output, recipe.settings, recipe.calibration, options, on_progress)
    record_stage(output, "quantize", {"inputs": inputs, "stat": file_stats(output, result.manifest)})
    return {"stage": "done", "seconds": round(result.seconds, 2), "resumed_from_layer": result.resumed_from_layer}


def eval_stage(recipe: Recipe, force: bool, on_progress: ProgressFn | None) -> dict:
    """{"stage": passed|failed|skipped, "passed": bool|None, "failures": [...]}."""
    if recipe.eval is None:
        return {"stage": "skipped", "passed": None, "failures": []}
    output, section = recipe.output, recipe.eval
    manifest = read_manifest(output)
    inputs = stable_hash({"dataset": section.dataset, "options": asdict(section.options),
                          "base": asdict(recipe.model), "files": files_hash(manifest)})
    gates_hash = stable_hash(asdict(section.gates))
    record = (manifest.get(RUN) or {}).get("eval") or {}
    stored = manifest.get("eval")
    reusable = (not force and stored is not None and record.get("inputs") == inputs
                and record.get("report") == stable_hash(stored))
    if reusable and record.get("gates") == gates_hash:
        gates = stored.get("gates") or {}
        return {"stage": "skipped", "passed": gates.get("passed"), "failures": gates.get("failures", [])}
    if reusable:  # only the gates changed: check them on the stored figures
        report = {k: v for k, v in stored.items() if k not in ("gates", "markdown")}
    else:
        report = evaluate(output, recipe.model.source, section.dataset, section.options, on_progress,
                          base_revision=recipe.model.revision)
    failures = check_gates(report, section.gates)
    limits = {k: v for k, v in asdict(section.gates).items() if v is not None}
    attach_to_manifest(output, {**report, "gates": {"passed": not failures, "failures": failures, **limits}})
    stored = read_manifest(output)["eval"]
    record_stage(output, "eval", {"inputs": inputs, "gates": gates_hash, "report": stable_hash(stored)})
    return {"stage": "failed" if failures else "passed", "passed": not failures, "failures": failures,
            "rescored": not reusable}


def push_stage(recipe: Recipe, dry_run: bool, force: bool, token: str | None,
               on_event: Callable[[str], None] | None) -> dict:
    """{"stage": done|skipped|dry-run, ...}; the caller skips it when a gate failed."""
    if recipe.push is None:
        return {"stage": "skipped"}
    push, output = recipe.push, recipe.output
    options = replace(push, token=token, dry_run=dry_run or push.dry_run)
    manifest = read_manifest(output)
    inputs = stable_hash({"repo_id": push.repo_id, "revision": push.revision, "create_pr": push.create_pr,
                          "base_model": push.base_model,
                          "endpoint": hub_endpoint() or "https://huggingface.co",
                          "files": files_hash(manifest), "eval": stable_hash(manifest.get("eval"))})
    record = (manifest.get(RUN) or {}).get("push") or {}
    if not options.dry_run and not force and record.get("inputs") == inputs:
        return {"stage": "skipped", "repo_id": push.repo_id, "url": record.get("url")}
    result = push_folder(output, options, on_event=on_event)
    summary = {"repo_id": push.repo_id, "url": result.url, "uploaded": result.uploaded,
               "already_there": result.skipped, "commits": result.commits}
    if options.dry_run:
        return {"stage": "dry-run", **summary, "card": result.card}
    record_stage(output, "push", {"inputs": inputs, "url": result.url})
    return {"stage": "done", **summary}


# ---- the whole run ----


def run_recipe(path: Path, dry_run_push: bool = False, force: bool = False, on_progress: ProgressFn | None = None,
               on_event: Callable[[str], None] | None = None) -> dict:
    """Run the recipe's stages; the summary says what each did. A failed gate is in the summary, not raised."""
    recipe = load_recipe(path)
    token = hub_token()
    quantized = quantize_stage(recipe, token, force, on_progress)
    evaluated = eval_stage(recipe, force, on_progress)
    if evaluated["passed"] is False:
        pushed = {"stage": "skipped", "reason": "a gate failed"} if recipe.push else {"stage": "skipped"}
    else:
        pushed = push_stage(recipe, dry_run_push, force, token, on_event)
    manifest = read_manifest(recipe.output)
    return {
        "recipe": str(recipe.path),
        "output": str(recipe.output),
        "stages": {"quantize": quantized.pop("stage"), "eval": evaluated["stage"], "push": pushed.pop("stage")},
        "quantize": quantized,
        "eval": {"rescored": evaluated.get("rescored", False)} if recipe.eval else None,
        "gates": None if recipe.eval is None else {"passed": evaluated["passed"], "failures": evaluated["failures"]},
        "figures": figures(manifest),
        "push": pushed if recipe.push else None,
    }


def figures(manifest: dict) -> dict:
    """The numbers a CI log wants: size, bits per weight, and the eval's headline figures."""
    report = manifest.get("eval") or {}
    values = {
        "method": manifest.get("method"),
        "bits_per_weight": manifest.get("bits_per_weight"),
        "output_bytes": manifest.get("output_bytes"),
        "source_bytes": (manifest.get("source") or {}).get("size_bytes"),
        "ppl_base": report.get("ppl_base"),
        "ppl_quantized": report.get("ppl_quantized"),
        "ppl_delta": report.get("ppl_delta"),
        "ppl_ratio": report.get("ppl_ratio"),
        "kld_mean": (report.get("kld") or {}).get("mean"),
        "same_top": report.get("same_top"),
        "eval_windows": report.get("windows"),
        "eval_seqlen": report.get("seqlen"),
    }
    return {k: v for k, v in values.items() if v is not None}


def summary_lines(summary: dict) -> list[str]:
    """The summary as a few lines for a terminal or a CI log."""
    stages, numbers = summary["stages"], summary["figures"]
    lines = [f"quantize: {stages['quantize']} -> {summary['output']}"
             + (f" ({numbers['bits_per_weight']:.2f} bits/weight, {numbers['output_bytes'] / 1e6:.1f} MB)"
                if "bits_per_weight" in numbers and "output_bytes" in numbers else "")]
    eval_line = f"eval: {stages['eval']}"
    if "ppl_quantized" in numbers:
        eval_line += (f" (perplexity {numbers['ppl_base']:.4f} -> {numbers['ppl_quantized']:.4f}, "
                      f"mean KLD {numbers['kld_mean']:.5f}, same top {numbers['same_top']:.2%})")
    lines.append(eval_line)
    gates = summary.get("gates") or {}
    lines += [f"  gate failed: {failure}" for failure in gates.get("failures", [])]
    push = summary.get("push") or {}
    push_line = f"push: {stages['push']}"
    if stages["push"] == "dry-run":
        push_line += f" (would upload {len(push['uploaded'])} files to {push['repo_id']})"
    elif stages["push"] == "done":
        push_line += (f" ({len(push['uploaded'])} files uploaded, {len(push['already_there'])} already there, "
                      f"{push['url']})")
    elif push.get("reason"):
        push_line += f" ({push['reason']})"
    lines.append(push_line)
    return lines
