"""The `lowbit` command line: parse options, call the library, print results.

Results go to stdout (a table, or JSON with --json); progress and logs go to
stderr. Errors the user can act on print one line and exit with their code
(see lowbit/errors.py); nothing here prints a traceback unless --verbose.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.logging import RichHandler

from lowbit.console import (bad_option, handle_errors, print_json, progress_bar, progress_callback,
                            quiet_third_parties, state, stderr, stdout)
from lowbit.errors import GateFailed, UsageError
from lowbit.network import hub_token
from lowbit.quantize.settings import GPTQ_FORMAT_METHODS, InvalidSetting, Method, QuantizeSettings
from lowbit.redact import redact

log = logging.getLogger("lowbit")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Quantize LLMs to 4 bits shard by shard, verify them, publish them.")

@app.callback()
def main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logs, and tracebacks for internal errors."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors and results."),
) -> None:
    quiet = quiet or os.environ.get("RANK", "0") != "0"  # under torchrun rank 0 speaks for the run
    state.update(verbose=verbose, quiet=quiet)
    level = logging.DEBUG if verbose else logging.ERROR if quiet else logging.INFO
    handler = RichHandler(console=stderr, show_time=False, show_path=False)
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)
    quiet_third_parties(verbose)


@app.command()
@handle_errors
def quantize(
    model: str = typer.Argument(..., help="Local folder or Hub repo id."),
    output: Path = typer.Option(..., "--output", "-o", help="Output folder (written to OUTPUT.partial, renamed when complete)."),
    method: Method = typer.Option(Method.GPTQ, help="rtn: round to nearest, the baseline."),
    bits: int = typer.Option(4, help="2, 3, 4 or 8 (gptq/rtn)."),
    group_size: int = typer.Option(128, help="-1, 32, 64 or 128 (gptq/rtn)."),
    act_order: bool = typer.Option(True, "--act-order/--no-act-order", help="Quantize columns by descending Hessian diagonal (gptq, calibrated nf4/fp4)."),
    sym: Optional[bool] = typer.Option(None, "--sym/--asym", help="gptq/rtn: symmetric grid, or a zero point per group (default: symmetric at 4 and 8 bits, the only GPTQ codes vLLM loads; asymmetric below)."),
    damp: float = typer.Option(0.01, help="Hessian damping, as a fraction of its mean diagonal."),
    static_groups: bool = typer.Option(True, "--static-groups/--no-static-groups", help="Groups stay in column order (with act-order: desc_act false, fast kernels)."),
    scale_search: Optional[bool] = typer.Option(None, "--scale-search/--no-scale-search", help="Choose each group's clipping by the Hessian-weighted error (default: on wherever there is calibration)."),
    awq_scales: Optional[bool] = typer.Option(None, "--awq-scales/--no-awq-scales", help="gptq/rtn: scale each input channel by its activation (AWQ) before solving, folded into the norm or Linear before it; the checkpoint stays plain GPTQ (default: on at 4 and 8 bits wherever there is calibration)."),
    true_sequential: bool = typer.Option(True, "--true-sequential/--no-true-sequential"),
    fp_targets: Optional[bool] = typer.Option(None, "--fp-targets/--no-fp-targets", help="gptq, calibrated nf4/fp4: fit each Linear towards the unquantized model's outputs too (GPTAQ), making up part of the error of the layers before it; about 1.6x the time and more host memory (default: on for gptq below 4 bits and for calibrated nf4/fp4, unless it would take the host past 90% of its memory)."),
    fast_matmul: bool = typer.Option(True, "--fast-matmul/--exact-matmul", help="Calibration passes and Hessian sums in float32 with bfloat16 operands (the solver is always exact); --exact-matmul for full float32."),
    double_quant: bool = typer.Option(True, "--double-quant/--no-double-quant", help="nf4/fp4: quantize the block scales too."),
    skip: Optional[str] = typer.Option(None, help="nf4/fp4: regex of modules kept in 16-bit (lm_head always is)."),
    target_bpw: Optional[float] = typer.Option(None, "--target-bpw", help="A size budget in bits per weight (scales, zeros, g_idx, absmax included), above the uniform setting's: each Linear group gets (gptq/rtn) 4-bit finer groups, 8-bit or 16-bit, (nf4/fp4) 16-bit, where that cuts the most error."),
    first_position_share: float = typer.Option(1 / 128, help="The share of each calibration window's rows that its first position (the attention sink) makes up in every Hessian, counted at least once; 0: once, like any token."),
    calibration: Optional[str] = typer.Option(None, help="Text file, JSONL, folder, or pydoc|c4|wikitext2. gptq default: c4 (pydoc, with a warning, when c4 cannot be had). nf4/fp4: calibrated when given."),
    nsamples: int = typer.Option(128, help="Calibration windows."),
    seqlen: int = typer.Option(2048, help="Tokens per calibration window."),
    seed: int = typer.Option(0, help="Seed for sampling the calibration windows."),
    chat_template: bool = typer.Option(False, "--chat-template", help="Wrap calibration texts in the model's chat template."),
    bos: bool = typer.Option(True, "--bos/--no-bos", help="Begin each calibration window with the tokenizer's BOS, as the model is run (--no-bos: plain text windows)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", help="Compute dtype: auto, float32, float16, bfloat16."),
    max_shard_size: str = typer.Option("2GB", help="Largest output shard."),
    offload: Optional[bool] = typer.Option(None, "--offload/--no-offload", help="Calibration activations in host memory (default: when they would not fit the GPU)."),
    revision: Optional[str] = typer.Option(None, help="Hub revision of MODEL."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model repo's own Python code to run."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Read pickled .bin weights (torch.load weights_only) when there are no safetensors."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output, or discard stale progress."),
    json_out: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Quantize MODEL into a standard GPTQ or bitsandbytes checkpoint, one decoder layer at a time."""
    from lowbit.calibration.windows import CalibrationConfig
    from lowbit.card import vllm_refusal_of
    from lowbit.quantize.driver import RunOptions, quantize_model
    from lowbit.quantize.writer import parse_size

    try:
        parse_size(max_shard_size)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--max-shard-size") from None
    if scale_search and calibration is None and method != "gptq":
        raise typer.BadParameter(f"{method} with scale search weighs each input by its calibration activations: "
                                 "give --calibration", param_hint="--scale-search")
    try:
        settings = QuantizeSettings(method=method, bits=bits, group_size=group_size, sym=sym, act_order=act_order,
                                    static_groups=static_groups, scale_search=scale_search is not False, damp=damp,
                                    true_sequential=true_sequential, fp_targets=fp_targets, double_quant=double_quant,
                                    skip=skip, target_bpw=target_bpw, awq_scales=awq_scales, fast_matmul=fast_matmul,
                                    first_position_share=first_position_share)
    except InvalidSetting as e:
        raise bad_option(e) from None
    if calibration is None and method == "gptq":  # calibrated NF4 is asked for by naming --calibration
        from lowbit.calibration.sources import default_calibration

        calibration = default_calibration()
    calib = None
    if calibration is not None and (method != "rtn" or settings.scale_search):
        calib = CalibrationConfig(source=calibration, nsamples=nsamples, seqlen=seqlen, seed=seed, chat_template=chat_template, bos=bos)
    token = hub_token()
    options = RunOptions(device=device, dtype=dtype, max_shard_size=max_shard_size, offload=offload, force=force,
                         trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, revision=revision, token=token)
    with progress_bar() as progress:
        result = quantize_model(model, output, settings, calib, options, on_progress=progress_callback(progress))
    manifest = result.manifest
    if not result.primary:  # torchrun's other ranks: rank 0 reports
        return
    refusal = vllm_refusal_of(manifest)
    if json_out:
        print_json({"output": str(result.output), "seconds": round(result.seconds, 2), "vllm_refusal": refusal,
                    "manifest": manifest})
        return
    stdout.print(f"[green]wrote[/green] {result.output}: {manifest['method']} "
                 f"{manifest['bits_per_weight']:.2f} bits/weight, {manifest['output_bytes'] / 1e6:.1f} MB "
                 f"(source {manifest['source']['size_bytes'] / 1e6:.1f} MB) in {result.seconds:.1f}s"
                 + (f", resumed from layer {result.resumed_from_layer}" if result.resumed_from_layer else ""))
    if refusal:
        stdout.print(f"[yellow]note:[/yellow] {refusal}; transformers loads it")


@app.command()
@handle_errors
def inspect(
    folder: Path = typer.Argument(..., help="A checkpoint folder (lowbit quantize's output)."),
    verify: bool = typer.Option(False, "--verify", help="Check every file's sha256 and every tensor's shape and dtype."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary (and the problems found) as JSON."),
) -> None:
    """Show what a checkpoint is; with --verify, check it against its manifest and config (exit 7 on a mismatch)."""
    from lowbit.errors import VerifyError
    from lowbit.checkpoint_info import summarize
    from lowbit.checkpoint_info import verify as verify_checkpoint

    summary = summarize(folder)
    problems = verify_checkpoint(folder) if verify else None
    if json_out:
        print_json({"summary": summary.to_dict(), "problems": problems})
    else:
        print_summary(summary)
        if problems == []:
            stdout.print("[green]verified[/green]: every file matches the manifest, every tensor the config")
    if problems:
        for problem in problems:
            log.error("mismatch: %s", redact(problem))
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise VerifyError(f"{folder} failed verification: {problems[0]}{more}")


def print_summary(summary) -> None:
    source = summary.source or {}
    rows = [
        ("method", summary.method),
        ("architecture", summary.architecture),
        ("bits", summary.bits),
        ("group size", summary.group_size),
        ("bits per weight", summary.bits_per_weight),
        ("size", f"{summary.size_bytes / 1e6:.1f} MB"),
        ("source", " ".join(str(v) for v in (source.get("model"), source.get("revision")) if v) or None),
        ("source size", f"{source['size_bytes'] / 1e6:.1f} MB" if source.get("size_bytes") else None),
        ("calibration", (summary.calibration or {}).get("source")),
        ("created", summary.created),
        ("vLLM", f"no: {summary.vllm_refusal}" if summary.vllm_refusal else
         "loads it (4- or 8-bit symmetric codes)" if summary.method in GPTQ_FORMAT_METHODS else None),
    ]
    if summary.eval:
        from lowbit.evals.report import report_rows

        rows += [(f"eval: {metric}", value) for metric, value in report_rows(summary.eval)]
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        if value is not None:  # soft_wrap: a long path stays on its line
            stdout.print(f"{key:<{width}}  {redact(str(value))}", soft_wrap=True, markup=False, highlight=False)
    if summary.formats:
        from lowbit.format_plot import format_text_table

        for line in format_text_table(summary.formats):
            stdout.print(line, soft_wrap=True, markup=False, highlight=False)


@app.command("eval")
@handle_errors
def eval_command(
    quantized: Path = typer.Argument(..., help="A checkpoint folder: lowbit's, another tool's GPTQ or bitsandbytes, or unquantized."),
    base: Optional[str] = typer.Option(None, help="Base model (default: the source named in a lowbit manifest)."),
    dataset: str = typer.Option("wikitext2", help="wikitext2, c4, or a .txt/.jsonl PATH."),
    seqlen: int = typer.Option(2048, help="Tokens per window (GPTQ protocol: 2048)."),
    max_windows: Optional[int] = typer.Option(None, help="Score only the first N windows."),
    bos: bool = typer.Option(True, "--bos/--no-bos", help="Begin each window with the tokenizer's BOS, as the model is run (--no-bos: the GPTQ papers' plain windows)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", help="Compute dtype: auto, float32, float16, bfloat16."),
    chunk_tokens: int = typer.Option(512, help="Positions projected through the head at once."),
    offload: Optional[bool] = typer.Option(None, "--offload/--no-offload", help="Hidden states in host memory."),
    max_ppl_delta: Optional[float] = typer.Option(None, help="Gate: PPL(quantized) - PPL(base) at most this."),
    max_ppl_ratio: Optional[float] = typer.Option(None, help="Gate: PPL(quantized) / PPL(base) at most this."),
    max_kld: Optional[float] = typer.Option(None, help="Gate: mean KL divergence at most this."),
    min_same_top: Optional[float] = typer.Option(None, help="Gate: same-top-token rate at least this (0-1)."),
    attach: bool = typer.Option(True, "--attach/--no-attach", help="Store the report in a lowbit checkpoint's "
                                "manifest (other folders are never written: the report goes to NAME.lowbit-eval.json here)."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Write the report as JSON to PATH ('-' for stdout)."),
) -> None:
    """Score QUANTIZED against its base on the same windows; exit 1 when a gate fails."""
    from lowbit.evals.evaluate import EvalOptions, evaluate
    from lowbit.evals.report import Gates, attach_to_manifest, check_gates, report_table
    from lowbit.manifest import MANIFEST, read_manifest

    is_lowbit = (quantized / MANIFEST).is_file()
    revision = None
    if base is None:
        from lowbit.evals.evaluate import default_base

        if not is_lowbit:
            raise UsageError(f"{quantized} has no {MANIFEST} to name its base model: pass --base MODEL "
                             "(a folder or a Hub id)")
        base = default_base(quantized)
        revision = (read_manifest(quantized).get("source") or {}).get("revision")
    options = EvalOptions(seqlen=seqlen, max_windows=max_windows, device=device, dtype=dtype, chunk_tokens=chunk_tokens, offload=offload, bos=bos)
    hub_token()
    with progress_bar() as progress:
        report = evaluate(quantized, base, dataset, options, on_progress=progress_callback(progress), base_revision=revision)
    if report is None:  # torchrun's other ranks: rank 0 reports
        return
    gates = Gates(max_ppl_delta=max_ppl_delta, max_ppl_ratio=max_ppl_ratio, max_kld=max_kld, min_same_top=min_same_top)
    failures = check_gates(report, gates)
    report["gates"] = {"passed": not failures, "failures": failures, **{k: v for k, v in vars(gates).items() if v is not None}}
    if attach and is_lowbit:
        attach_to_manifest(quantized, report)
    elif attach and json_path is None:  # not our folder: leave it as it is, and say where the report went
        json_path = str(report_file(quantized))
    if json_path == "-":
        print_json(report)
    else:
        if json_path:
            Path(json_path).write_text(redact(json.dumps(report, indent=2, default=str)) + "\n")
        stdout.print(report_table(report))
        if json_path and not is_lowbit:
            stdout.print(f"{quantized} is not a lowbit checkpoint (left as it is): the report is in {json_path}",
                         markup=False, highlight=False)
    warning = (report.get("contamination") or {}).get("contaminated")
    if warning:
        stderr.print("[yellow bold]warning:[/] the evaluation text overlaps the calibration data: the delta flatters the model")
    if failures:
        raise GateFailed("gate failed: " + "; ".join(failures))


def report_file(folder: Path) -> Path:
    """Where the report on a folder lowbit did not write goes: NAME.lowbit-eval.json in the current folder."""
    return Path(f"{folder.resolve().name}.lowbit-eval.json")


@app.command()
@handle_errors
def push(
    folder: Path = typer.Argument(..., help="A lowbit checkpoint folder."),
    repo_id: str = typer.Argument(..., help="namespace/name on the Hub."),
    private: bool = typer.Option(False, "--private", help="Create the repo private."),
    revision: Optional[str] = typer.Option(None, help="Branch to push to."),
    create_pr: bool = typer.Option(False, "--create-pr", help="Open a pull request instead of committing to the branch."),
    commit_message: Optional[str] = typer.Option(None, help="Commit message."),
    token: Optional[str] = typer.Option(None, help="Hub token (default: HF_TOKEN, or the stored login)."),
    base_model: Optional[str] = typer.Option(None, help="Hub id of the source model, for the card, when it was "
                                             "quantized from a local folder (e.g. microsoft/phi-4)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be uploaded and print the card; send nothing."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Upload a checkpoint with its model card; a re-run uploads only what is missing."""
    from lowbit.hub import PushOptions, push_folder

    options = PushOptions(repo_id=repo_id, private=private, revision=revision, create_pr=create_pr,
                          commit_message=commit_message, token=hub_token(token), dry_run=dry_run,
                          base_model=base_model)
    result = push_folder(folder, options, on_event=lambda message: log.info(message))
    if json_out:
        print_json(vars(result))
        return
    if dry_run:
        stdout.print(result.card, markup=False, highlight=False)
        stdout.print(f"[bold]dry run:[/bold] would upload {len(result.uploaded)} files to {repo_id}: "
                     + ", ".join(result.uploaded))
        return
    stdout.print(f"[green]pushed[/green] {len(result.uploaded)} files ({len(result.skipped)} already there) "
                 f"in {result.commits} commits to {result.url or repo_id}")


@app.command("run")
@handle_errors
def run_command(
    recipe: Path = typer.Argument(..., help="A recipe TOML file (see examples/smollm2.toml)."),
    dry_run_push: bool = typer.Option(False, "--dry-run-push", help="Show what push would upload and the card; send nothing."),
    force: bool = typer.Option(False, "--force", help="Run every stage even if unchanged; replace an output `lowbit run` did not make."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Quantize -> eval (with gates) -> push, as RECIPE says; a re-run skips unchanged stages. Exit 1 when a gate fails."""
    from lowbit.recipe import run_recipe, summary_lines

    hub_token()  # registers HF_TOKEN, so that no output shows it
    with progress_bar() as progress:
        summary = run_recipe(recipe, dry_run_push=dry_run_push, force=force, on_progress=progress_callback(progress),
                             on_event=lambda message: log.info(message))
    if json_out:
        print_json(summary)
    else:
        card = (summary["push"] or {}).get("card")
        if card:  # soft_wrap: the card is printed as it would be published, lines unbroken
            stdout.print(card, markup=False, highlight=False, soft_wrap=True)
        for line in summary_lines(summary):
            stdout.print(line, markup=False, highlight=False, soft_wrap=True)
    failures = (summary["gates"] or {}).get("failures")
    if failures:
        raise GateFailed("gate failed, nothing pushed: " + "; ".join(failures))


@app.command()
@handle_errors
def plan(
    model: str = typer.Argument(..., help="Local folder or Hub repo id: only its config.json is read."),
    gpu: Optional[str] = typer.Option(None, help="GPU memory, e.g. 16GiB (without it: plan for the CPU)."),
    host_memory: Optional[str] = typer.Option(None, "--host-memory", help="Host memory, e.g. 32GiB."),
    method: Method = typer.Option(Method.GPTQ),
    calibrated: bool = typer.Option(False, "--calibrated", help="nf4/fp4 with calibration data (GPTQ onto the code book)."),
    bits: int = typer.Option(4, help="2, 3, 4 or 8 (gptq/rtn)."),
    group_size: int = typer.Option(128, help="-1, 32, 64 or 128 (gptq/rtn)."),
    nsamples: int = typer.Option(128, help="Calibration windows."),
    seqlen: int = typer.Option(2048, help="Tokens per calibration window."),
    offload: bool = typer.Option(False, "--offload", help="Calibration activations in host memory."),
    true_sequential: bool = typer.Option(True, "--true-sequential/--no-true-sequential"),
    fp_targets: Optional[bool] = typer.Option(None, "--fp-targets/--no-fp-targets", help="As lowbit quantize takes it."),
    eval_windows: int = typer.Option(40, help="Evaluation windows (lowbit eval --max-windows)."),
    eval_seqlen: int = typer.Option(2048, help="Tokens per evaluation window."),
    eval_chunk: int = typer.Option(512, help="Positions projected through the head at once (lowbit eval --chunk-tokens)."),
    target_bpw: Optional[float] = typer.Option(None, "--target-bpw", help="A size budget, as lowbit quantize takes it: "
                                               "its candidate solves' memory and its size."),
    ranks: int = typer.Option(1, help="torchrun's processes (--nproc-per-node): the memory of each."),
    revision: Optional[str] = typer.Option(None, help="Hub revision of MODEL."),
    json_out: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Predict peak GPU and host memory of quantizing and evaluating MODEL; exit 1 when it does not fit."""
    from lowbit.plan_view import render
    from lowbit.quantize.checkpoint import read_config
    from lowbit.quantize.fit import plan as make_plan
    from lowbit.quantize.plan import PlanSettings
    from lowbit.quantize.writer import parse_size

    limits = {}
    for name, text in (("--gpu", gpu), ("--host-memory", host_memory)):
        try:
            limits[name] = parse_size(text) if text is not None else None
        except ValueError:
            raise UsageError(f"{name}: not a size: {text!r} (e.g. 16GiB, 24GB)") from None
    try:
        quantize_settings = QuantizeSettings(method=method, bits=bits, group_size=group_size,
                                             true_sequential=true_sequential, target_bpw=target_bpw,
                                             fp_targets=fp_targets)
    except InvalidSetting as e:
        raise bad_option(e) from None
    settings = PlanSettings(quantize=quantize_settings, calibrated=method == Method.GPTQ or calibrated,
                            nsamples=nsamples, seqlen=seqlen, device="cuda" if gpu is not None else "cpu",
                            offload=offload, eval_windows=eval_windows, eval_seqlen=eval_seqlen, eval_chunk=eval_chunk)
    result = make_plan(read_config(model, revision, hub_token()), settings, limits["--gpu"], limits["--host-memory"],
                       ranks)
    if json_out:
        print_json(result)
    else:
        for line in render(result):
            stdout.print(line, markup=False, highlight=False, soft_wrap=True)
    if not result["fits"]:
        raise GateFailed("does not fit" + (": see the suggestions" if result["suggestions"] else ""))


def run() -> None:
    """The `lowbit` command. Under torchrun a finished process leaves without the interpreter's teardown:
    gloo's worker threads can still hold tensors then, and freeing them during finalization is the likely
    reason a rank whose run had succeeded aborted ("terminate called without an active exception", exit -6)
    in 3 of about 20 runs of the two-rank eval test. Its outputs are written and renamed by then; only
    the exit code is left to give."""
    try:
        app()
    except SystemExit as finished:
        from lowbit.quantize.distributed import torchrun_world

        if torchrun_world() is None:
            raise
        code = finished.code if isinstance(finished.code, int) else (0 if finished.code is None else 1)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    run()
