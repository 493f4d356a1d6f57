"""Quality per bit, side by side: lowbit's methods and llm-compressor's GPTQ, same windows, one run.

    python benchmarks/quality.py                                   # the whole grid (hours on 2 cores)
    python benchmarks/quality.py --models smollm2 --configs 4g64 --methods rtn,gptq,llmc-default \\
        --nsamples 16 --eval-windows 8                             # a reduced grid

For each model (SmolLM2-135M, Gemma-3-270M) and bit configuration (4g64, 4g128 where every Linear's input
is a multiple of 128, 3g64), every method is quantized in its own child process, one after the other, each
alone: wall time, CPU time and peak RSS are that child's, from interpreter start to the written
checkpoint. Calibration: `--calibration` (c4 from the shared data folder by default), `--nsamples` x
`--seqlen` windows drawn once per model exactly as `lowbit quantize` draws them (`--calibration-seed`, 0); each calibrated
lowbit run's lowbit_calibration.json is checked to hold the same ids, and llm-compressor is given them.
Every model, the base included, is scored by one plain transformers perplexity over the same wikitext-2
test windows (`--eval-windows` x `--eval-seqlen`), with the share of positions whose argmax matches the
base's; `--kld` adds lowbit's own evaluator (KLD, same-top) for lowbit's checkpoints.

Finished quantizations and scores are kept in `--cache` (outside the repo), keyed by the method's full
command and the hash of lowbit's quantizer source (or llm-compressor's version), so an interrupted run
resumes and a larger grid reuses what a smaller one made. Rows reused from an earlier run are marked.
Figures and the exact command go to BENCHMARKS.md, one section per model set and evaluation length (a grid
below the issue's minimum, 64 x 512 calibration and 40 x 512 evaluation, is written as "reduced"); a run
over a subset of methods or configurations replaces its section with that subset.

The full grid, then the defaults and the peer on 40 x 2048 windows (the quantizations are reused):

    python benchmarks/quality.py
    python benchmarks/quality.py --methods gptq-default,nf4,nf4-cal,llmc-default,llmc-mse,llmc-imatrix \
        --eval-seqlen 2048
    python benchmarks/quality.py --dry-run ...                 # what a grid would still quantize and score
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.markdown import replace_section  # noqa: E402
from benchmarks.peer_llmcompressor import (  # noqa: E402
    LLMC_VERSION, PEER_CONFIGS, ChildFailed, ensure_llmc_venv, llmc_command, ppl_command,
    timed_child)
from benchmarks.quality_report import markdown  # noqa: E402

TESTS_CACHE = Path.home() / ".cache" / "lowbit-tests"
MODELS = {"smollm2": TESTS_CACHE / "smollm2-135m-bf16", "gemma3": TESTS_CACHE / "gemma3-270m-bf16"}
CONFIGS = ("4g64", "4g128", "3g64")
# lowbit methods: (options, calibrated, uses the bits/group configuration). "?" marks an option passed only
# when this lowbit has it (pins a default that older versions do not have, so the run means the same).
LOWBIT_METHODS = {
    "rtn": (["--method", "rtn", "?--no-scale-search"], False, True),
    "rtn-ss": (["--method", "rtn", "--scale-search", "?--no-awq-scales"], True, True),
    "rtn-ss-awq": (["--method", "rtn", "--scale-search", "--awq-scales"], True, True),  # AWQ's own recipe: RTN
    "gptq": (["--method", "gptq", "--no-act-order", "?--no-scale-search", "?--no-awq-scales"], True, True),
    "gptq-ss": (["--method", "gptq", "--no-act-order", "--scale-search", "?--no-awq-scales"], True, True),
    "gptq-ss-ao": (["--method", "gptq", "--scale-search", "--act-order", "--static-groups", "?--no-awq-scales"],
                   True, True),
    "gptq-default": (["--method", "gptq"], True, True),
    "gptq-asym": (["--method", "gptq", "--asym"], True, True),
    "gptq-sym": (["--method", "gptq", "--sym"], True, True),  # the defaults on a symmetric grid at any bits
    "gptq-no-awq": (["--method", "gptq", "--no-awq-scales"], True, True),  # the defaults less one lever each
    "gptq-no-ss": (["--method", "gptq", "--no-scale-search"], True, True),
    "gptq-dynamic": (["--method", "gptq", "--no-static-groups"], True, True),  # search on error-updated weights
    "gptq-no-ao": (["--method", "gptq", "--no-act-order"], True, True),
    "gptq-fp": (["--method", "gptq", "--fp-targets"], True, True),  # fit towards the unquantized outputs at any bits
    "gptq-no-fp": (["--method", "gptq", "?--no-fp-targets"], True, True),  # each Linear fit to its own inputs only
    "gptq-exact": (["--method", "gptq", "--exact-matmul"], True, True),  # the defaults in full float32 matmuls
    "gptq-bf16": (["--method", "gptq", "--dtype", "bfloat16"], True, True),  # the layers in a GPU's compute dtype
    "nf4": (["--method", "nf4", "?--no-scale-search"], False, False),
    "nf4-cal": (["--method", "nf4", "?--no-scale-search", "?--no-fp-targets", "?--no-act-order"], True, False),
    "nf4-cal-ss": (["--method", "nf4", "--scale-search", "?--no-fp-targets", "?--no-act-order"], True, False),
    "nf4-cal-ao": (["--method", "nf4", "--scale-search", "--act-order", "--no-fp-targets"], True, False),
    "nf4-cal-fp": (["--method", "nf4", "--scale-search", "--fp-targets"], True, False),  # the defaults (act-order too)
}
METHODS = ("base", *LOWBIT_METHODS, *PEER_CONFIGS)


def parse_config(name: str) -> tuple[int, int]:
    bits, group = name.split("g")
    return int(bits), int(group)


def linear_inputs(model: Path) -> set[int]:
    config = json.loads((model / "config.json").read_text())
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return {config["hidden_size"], config["intermediate_size"], heads * head_dim}


def fits(model: Path, config: str) -> bool:
    return all(size % parse_config(config)[1] == 0 for size in linear_inputs(model))


def lowbit_options() -> set[str]:
    """The options this lowbit's `quantize` accepts (so a grid runs on a branch without the newer ones)."""
    help_text = subprocess.run([sys.executable, "-m", "lowbit.cli", "quantize", "--help"], cwd=REPO, capture_output=True,
                               text=True, env={**os.environ, "COLUMNS": "200"}).stdout
    return {word.strip("│,") for word in help_text.split() if word.startswith("--")}


def code_hash() -> str:
    """Hash of the source a lowbit checkpoint depends on: a change there makes the cache miss."""
    digest = hashlib.sha256()
    for folder in ("quantize", "calibration", "lowbit"):
        for file in sorted((REPO / folder).rglob("*.py")):
            digest.update(file.relative_to(REPO).as_posix().encode() + file.read_bytes())
    return digest.hexdigest()[:12]


# ---- windows ----

def prepare_windows(model: Path, cache: Path, args) -> tuple[Path, Path]:
    """Calibration windows as `lowbit quantize` draws them, and the wikitext-2 test windows, saved once per model."""
    from transformers import AutoTokenizer

    from lowbit.calibration.windows import CalibrationConfig, build_calibration, start_tokens
    from lowbit.manifest import save_windows
    from lowbit.evals.datasets import eval_windows, load_eval_text

    tokenizer = AutoTokenizer.from_pretrained(model)
    seed = f"-seed{args.calibration_seed}" if args.calibration_seed else ""  # seed 0 keeps the older caches' name
    bos = "-bos" if start_tokens(tokenizer) else ""  # windows that begin with a BOS (Gemma 3), unlike the older caches'
    calibration = cache / f"calibration-{args.calibration}-{args.nsamples}x{args.seqlen}{seed}{bos}.json"
    evaluation = cache / f"evaluation-wikitext2-{args.eval_windows}x{args.eval_seqlen}{bos}.json"
    if not calibration.exists():
        config = CalibrationConfig(args.calibration, args.nsamples, args.seqlen, seed=args.calibration_seed)
        save_windows(calibration, build_calibration(config, tokenizer)[0])
    if not evaluation.exists():
        text, _ = load_eval_text("wikitext2")
        save_windows(evaluation, eval_windows(text, tokenizer, args.eval_seqlen, args.eval_windows))
    return calibration, evaluation


# ---- one run ----

def run_key(command: list[str], revision: str) -> str:
    return hashlib.sha256(json.dumps([command, revision]).encode()).hexdigest()[:10]


def lowbit_run(method: str, config: str, model: Path, args, supported: set[str]) -> tuple[list[str], str] | str:
    """(the quantize options, the cache revision), or why this lowbit cannot run the method."""
    options, calibrated, configured = LOWBIT_METHODS[method]
    chosen = []
    for option in options:
        if option.startswith("?"):
            chosen += [option[1:]] if option[1:] in supported else []
        elif option.startswith("--") and option.split("=")[0] not in supported:
            return f"this lowbit has no {option}"
        else:
            chosen.append(option)
    if configured:
        bits, group = parse_config(config)
        chosen += ["--bits", str(bits), "--group-size", str(group)]
    if calibrated:
        chosen += ["--calibration", args.calibration, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                   "--seed", str(args.calibration_seed)]
    return chosen, args.revision


def quantize(tool: str, method: str, config: str, model: Path, calibration: Path, folder: Path, args, run) -> dict:
    """Quantize into folder/model (a child process, timed); the record kept next to it."""
    out = folder / "model"
    if tool == "lowbit":
        options, _ = run
        command = [sys.executable, "-m", "lowbit.cli", "-q", "quantize", str(model), "-o", str(out), "--device", "cpu",
                   "--force", *options]
        shown = "lowbit quantize MODEL -o OUT " + shlex.join(options)
    else:
        bits, group = parse_config(config)
        command = llmc_command(args.llmc_python, model, calibration, out, method, bits, group)
        shown = f"llm-compressor {LLMC_VERSION} oneshot GPTQModifier ({method}, W{bits}A16 g{group})"
    print(f"  quantize {model.name} {config} {method}: {shown}", flush=True)
    timing = timed_child(command)
    record = {"command": shown, "quantize": timing, "recorded_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "output_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors"))}
    if tool == "lowbit" and "--calibration" in run[0]:
        used = json.loads((out / "lowbit_calibration.json").read_text())["windows"]
        if used != json.loads(calibration.read_text())["windows"]:
            raise SystemExit(f"{method}: lowbit drew other calibration windows than {calibration}")
        record["same_calibration_ids"] = True
    if tool == "llmc":
        record["peer_run"] = json.loads((out / "peer_run.json").read_text())
    manifest = out / "lowbit_manifest.json"
    if manifest.exists():
        record["bits_per_weight"] = json.loads(manifest.read_text()).get("bits_per_weight")
    return record


def score(tool: str, folder: Path, evaluation: Path, base_top: Path, args, model: Path) -> dict:
    """Perplexity (+ same-top vs the base) from the plain transformers function; lowbit's evaluator with --kld."""
    python = args.llmc_python if tool == "llmc" else Path(sys.executable)
    kind = {"lowbit": "lowbit", "llmc": "plain", "base": "plain"}[tool]
    target = model if tool == "base" else folder / "model"
    result = timed_child(ppl_command(python, kind, target, evaluation, base_top if tool == "base" else None,
                                     None if tool == "base" else base_top))
    scores = {"ppl": result["ppl"], "same_top": result.get("same_top"), "eval_seconds": result["seconds"],
              "eval_cpu_seconds": result["cpu_seconds"]}
    if args.kld and tool == "lowbit":
        code = ("import json,sys; sys.path.insert(0, %r); from lowbit.evals.evaluate import EvalOptions, evaluate; "
                "r = evaluate(%r, %r, 'wikitext2', EvalOptions(seqlen=%d, max_windows=%d, device='cpu')); "
                "print(json.dumps({'kld': r['kld'], 'same_top': r['same_top'], 'ppl': r['ppl_quantized']}))"
                % (str(REPO), str(target), str(model), args.eval_seqlen, args.eval_windows))
        scores["lowbit_eval"] = timed_child([sys.executable, "-c", code])
    return scores


def cell_folder(model_name: str, config: str, method: str, args, calibration: Path, supported: set[str]):
    """(tool, lowbit's run or None, the cache folder) of one grid cell, or why this lowbit cannot run it."""
    tool = "base" if method == "base" else ("llmc" if method in PEER_CONFIGS else "lowbit")
    if tool == "base":
        return tool, None, args.cache / model_name / "base"
    if tool == "llmc":
        key = run_key([method, config, calibration.name], LLMC_VERSION + peer_source_hash())
        return tool, None, args.cache / model_name / f"{method}-{config}-{key}"
    run = lowbit_run(method, config, MODELS[model_name], args, supported)
    if isinstance(run, str):
        return run
    return tool, run, args.cache / model_name / f"{method}-{config if LOWBIT_METHODS[method][2] else 'nf4'}-{run_key(*run)}"


def peer_source_hash() -> str:
    """What an llm-compressor run depends on, besides its version: the child that drives it and its configs."""
    import benchmarks.peer_llmcompressor as peer

    source = inspect.getsource(peer.child_llmc) + inspect.getsource(peer.applied_config) + repr(PEER_CONFIGS)
    return hashlib.sha256(source.encode()).hexdigest()[:12]


def run_one(model_name: str, config: str, method: str, args, windows: tuple[Path, Path], supported: set[str]) -> dict:
    """Quantize (or reuse) and score one cell of the grid; {"skipped": why} or {"failed": why} where it cannot."""
    model = MODELS[model_name]
    calibration, evaluation = windows
    cache = args.cache / model_name
    cell = cell_folder(model_name, config, method, args, calibration, supported)
    if isinstance(cell, str):
        return {"skipped": cell}
    tool, run, folder = cell
    folder.mkdir(parents=True, exist_ok=True)
    record_file = folder / "record.json"
    record = json.loads(record_file.read_text()) if record_file.exists() and not args.fresh else {}
    reused = "quantize" in record
    if args.reuse_only and (tool != "base" and not reused or evaluation.name not in record.get("scores", {})):
        return {"skipped": "not in the cache (--reuse-only)"}
    try:
        if tool != "base" and not reused:
            record = quantize(tool, method, config, model, calibration, folder, args, run)
            record_file.write_text(json.dumps(record, indent=2))
        eval_key = evaluation.name
        scores = record.setdefault("scores", {})
        if eval_key not in scores or (args.kld and tool == "lowbit" and "lowbit_eval" not in scores[eval_key]):
            base_top = cache / f"base-top-{eval_key}.pt"
            scores[eval_key] = score(tool, folder, evaluation, base_top, args, model)
            record_file.write_text(json.dumps(record, indent=2))
    except ChildFailed as failure:
        (folder / "failed.log").write_text(failure.log)
        print(f"  {method} {config} failed: {failure} (log: {folder / 'failed.log'})", flush=True)
        return {"failed": str(failure)}
    return {**record, **record["scores"][evaluation.name], "reused": reused, "tool": tool}


# ---- the grid ----

def grid(args) -> dict:
    """{model: {config: {method: result}}}; NF4 methods sit under the pseudo-configuration "nf4"."""
    supported = lowbit_options()
    results: dict = {}
    for model_name in args.models:
        model = MODELS[model_name]
        if model_name == "smollm2":
            from lowbit.examples import build_smollm2

            build_smollm2(model)
        if not (model / "config.json").exists():
            print(f"{model_name}: no model at {model}, skipped", flush=True)
            continue
        (args.cache / model_name).mkdir(parents=True, exist_ok=True)
        windows = prepare_windows(model, args.cache / model_name, args)
        per_model = results.setdefault(model_name, {})
        if args.dry_run:
            print(f"{model_name} base: {cell_state(model_name, '', 'base', args, windows, supported)}")
        else:
            per_model["base"] = run_one(model_name, "", "base", args, windows, supported)
            print(f"{model_name} base: ppl {per_model['base'].get('ppl')}", flush=True)
        cells = [(c, m) for c in args.configs for m in args.methods if m != "base" and not is_nf4(m)]
        cells += [("nf4", m) for m in args.methods if is_nf4(m)]
        for config, method in cells:
            if config != "nf4" and not fits(model, config):
                why = f"a Linear input is not a multiple of {config}'s group"
                per_model.setdefault(config, {})[method] = {"skipped": why}
                if args.dry_run:
                    print(f"{model_name} {config} {method}: skipped ({why})")
                continue
            if args.dry_run:
                print(f"{model_name} {config} {method}: {cell_state(model_name, config, method, args, windows, supported)}")
                continue
            result = run_one(model_name, config, method, args, windows, supported)
            per_model.setdefault(config, {})[method] = result
            if "ppl" in result:
                print(f"{model_name} {config} {method}: ppl {result['ppl']:.3f}, quantize {result['quantize']['seconds']} s"
                      f"{' (reused)' if result['reused'] else ''}", flush=True)
    return results


def cell_state(model_name: str, config: str, method: str, args, windows: tuple[Path, Path], supported: set[str]) -> str:
    """For --dry-run: what running this cell would do."""
    cell = cell_folder(model_name, config, method, args, windows[0], supported)
    if isinstance(cell, str):
        return f"skipped ({cell})"
    record_file = cell[2] / "record.json"
    record = json.loads(record_file.read_text()) if record_file.exists() and not args.fresh else {}
    quantized = "quantized" if "quantize" in record or cell[0] == "base" else "to quantize"
    scored = "scored" if windows[1].name in record.get("scores", {}) else "to score"
    return f"{quantized}, {scored} ({cell[2]})"


def is_nf4(method: str) -> bool:
    return method in LOWBIT_METHODS and not LOWBIT_METHODS[method][2]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,gemma3", help=f"comma-separated, of {','.join(MODELS)}")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated BITSgGROUP, e.g. 4g64,3g64")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {','.join(METHODS)}")
    parser.add_argument("--calibration", default="c4")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--calibration-seed", type=int, default=0, help="which calibration windows are drawn")
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--kld", action="store_true", help="also run lowbit's evaluator (KLD) on lowbit's checkpoints")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "lowbit-bench" / "quality")
    parser.add_argument("--venv", type=Path, default=Path.home() / ".cache" / "lowbit-bench" / "llmc-venv")
    parser.add_argument("--fresh", action="store_true", help="quantize and score again even where the cache has it")
    parser.add_argument("--json", type=Path, help="also write every result as JSON")
    parser.add_argument("--reuse-only", action="store_true", help="report only what the cache holds, run nothing new")
    parser.add_argument("--dry-run", action="store_true", help="list what would be quantized and scored, run nothing")
    parser.add_argument("--note", help="a line written at the top of the section (how the run was taken)")
    parser.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    parser.add_argument("--section", help="the BENCHMARKS.md section to write (default: named after the model set)")
    args = parser.parse_args(argv)
    args.models, args.configs, args.methods = (value.split(",") for value in (args.models, args.configs, args.methods))
    for value, known, what in ((args.models, MODELS, "model"), (args.methods, METHODS, "method")):
        unknown = [v for v in value if v not in known]
        if unknown:
            parser.error(f"unknown {what} {', '.join(unknown)}")
    for config in args.configs:
        try:
            parse_config(config)
        except ValueError:
            parser.error(f"configuration {config!r} is not BITSgGROUP (e.g. 4g64)")
    if "base" not in args.methods:
        args.methods.insert(0, "base")
    return args


def prepare(args) -> None:
    """What a grid run needs besides its arguments: the source revision, llm-compressor's venv, the cache."""
    args.revision = code_hash()
    args.llmc_python = ensure_llmc_venv(args.venv) if any(m in PEER_CONFIGS for m in args.methods) else None
    args.cache.mkdir(parents=True, exist_ok=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    prepare(args)
    started = time.time()
    results = grid(args)
    if args.dry_run:
        return
    command = "python benchmarks/" + Path(sys.argv[0]).name + " " + shlex.join(sys.argv[1:] if argv is None else argv)
    text = markdown(results, args, command.strip(), time.time() - started)
    if args.note:
        text = f"**{args.note}**\n\n{text}"
    print(text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    if not args.no_write:
        reduced = args.nsamples < 64 or args.seqlen < 512 or args.eval_windows < 40
        models = "" if args.models == list(MODELS) else "-" + "-".join(args.models)  # one section per model set
        key = args.section or ("quality" + models + ("-reduced" if reduced else "")
                               + ("" if args.eval_seqlen == 512 else f"-{args.eval_seqlen}"))
        title = (f"Quality per bit{' (REDUCED grid)' if reduced else ''}: lowbit vs llm-compressor, "
                 f"{args.eval_windows} x {args.eval_seqlen} wikitext-2 windows"
                 + (f" ({args.section})" if args.section else ""))
        replace_section(REPO / "BENCHMARKS.md", key, title, text)


if __name__ == "__main__":
    main()
