"""`lowbit run RECIPE.toml`: quantize -> eval (with gates) -> push, from one file a CI job keeps.

A recipe is TOML with the tables [model], [quantize], [calibration], [eval]
(with [eval.gates]), [push] and [output]; `SCHEMA` in lowbit/recipe_file.py lists every key.
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
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from lowbit.errors import LowbitError, OutputExistsError
from lowbit.evals.evaluate import evaluate
from lowbit.evals.report import attach_to_manifest, check_gates
from lowbit.files import sha256_file
from lowbit.hub import push_folder
from lowbit.network import hub_endpoint
from lowbit.manifest import read_manifest, update_manifest
from lowbit.network import hub_token
from lowbit.quantize.driver import quantize_model
from lowbit.recipe_file import Recipe, load_recipe

RUN = "run"  # the manifest key holding each stage's record
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
    options = replace(recipe.run_options, force=True, revision=recipe.model.revision, token=token)
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
                          "endpoint": hub_endpoint(),
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
