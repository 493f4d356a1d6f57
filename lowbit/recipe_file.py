"""RECIPE.toml read and checked once: every key known and typed, each table mapped onto the library's own
dataclasses (QuantizeSettings, RunOptions, CalibrationConfig, EvalOptions, Gates, PushOptions). What the
tables mean and how a run uses them: lowbit/recipe.py.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

from lowbit.calibration.sources import NAMED_CORPORA, default_calibration
from lowbit.calibration.windows import CalibrationConfig
from lowbit.errors import UsageError
from lowbit.evals.evaluate import EvalOptions
from lowbit.evals.report import Gates
from lowbit.hub import PushOptions, validate_repo_id
from lowbit.quantize.driver import RunOptions
from lowbit.quantize.settings import InvalidSetting, QuantizeSettings
from lowbit.quantize.writer import parse_size

EVAL_DATASETS = ("wikitext2", "c4")  # named evaluation corpora; anything else is a path
DTYPES = ("auto", "float32", "float16", "bfloat16")

# Every key a recipe may hold, with its TOML type; a nested dict is a sub-table.
SCHEMA: dict[str, dict] = {
    "model": {"source": str, "revision": str},
    "quantize": {
        "method": str, "bits": int, "group_size": int, "act_order": bool, "sym": bool, "damp": float,
        "static_groups": bool, "scale_search": bool, "awq_scales": bool, "fp_targets": bool, "true_sequential": bool, "fast_matmul": bool, "double_quant": bool, "skip": str,
        "first_position_share": float,
        "target_bpw": float,
        "device": str, "dtype": str, "max_shard_size": str,
    },
    "calibration": {"source": str, "nsamples": int, "seqlen": int, "seed": int, "chat_template": bool, "bos": bool},
    "eval": {
        "dataset": str, "seqlen": int, "max_windows": int, "device": str, "dtype": str, "chunk_tokens": int, "bos": bool,
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
    try:
        settings = QuantizeSettings(**quantize)
    except InvalidSetting as e:
        raise UsageError(f"{path}: quantize.{e.name} {e.rule}") from None
    check_run_options(run_options, path)
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


def check_run_options(run_options: RunOptions, path: Path) -> None:
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
