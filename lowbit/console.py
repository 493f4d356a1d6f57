"""How the CLI talks to its user: the two consoles, one line per error, progress bars, JSON on stdout."""

from __future__ import annotations

import functools
import json
import logging
import sys
import traceback

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from lowbit.errors import LowbitError
from lowbit.quantize.settings import InvalidSetting
from lowbit.redact import redact

# soft_wrap: a message is one line, however narrow the (absent) terminal
stdout = Console(soft_wrap=True)
stderr = Console(stderr=True, soft_wrap=True)
state = {"verbose": False, "quiet": False}


# Loggers of libraries that warn about things that are not the user's business here.
# bitsandbytes: at import, a multi-line note that an optional CPU matmul kernel (which lowbit never runs) is absent.
THIRD_PARTY_NOISE = ("bitsandbytes.backends.cpu.ops",)


def quiet_third_parties(verbose: bool) -> None:
    """Every log line once, through our handler; known noise only with --verbose.

    huggingface_hub gives its root logger a handler of its own, so its warnings would
    print twice (once there, once through ours): drop it and let them propagate.
    """
    from huggingface_hub.utils import logging as hf_logging

    hf_logger = hf_logging.get_logger()
    for own in list(hf_logger.handlers):
        hf_logger.removeHandler(own)
    hf_logger.propagate = True
    for name in THIRD_PARTY_NOISE:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.ERROR)


def handle_errors(command):
    """One line and a distinct exit code for every failure; a traceback only with --verbose."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except LowbitError as e:
            stderr.print(f"[red]error:[/red] {escape(redact(str(e)))}", highlight=False, markup=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            stderr.print("interrupted: re-run the same command to resume")
            raise typer.Exit(130) from None
        except MemoryError:
            stderr.print("[red]error:[/red] out of host memory (see `lowbit plan` for settings that fit)")
            raise typer.Exit(5) from None
        except (typer.Exit, click.exceptions.ClickException, typer.BadParameter):
            raise
        except Exception as e:  # a bug: still one line, the traceback with --verbose
            if state["verbose"]:
                stderr.print(redact(traceback.format_exc()), markup=False, highlight=False)
            message = redact(f"{type(e).__name__}: {e}".splitlines()[0])
            stderr.print(f"[red]internal error:[/red] {escape(message)} (run with --verbose for details)", markup=True)
            raise typer.Exit(70) from None

    return wrapper


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=stderr, disable=state["quiet"], transient=False)


def progress_callback(progress: Progress):
    """Adapt the library's on_progress(stage, done, total) to rich tasks, one per stage."""
    tasks: dict[str, int] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = progress.add_task(stage, total=total)
        progress.update(tasks[stage], completed=done, total=total)

    return update


def print_json(data: dict) -> None:
    sys.stdout.write(redact(json.dumps(data, indent=2, default=str)) + "\n")


def bad_option(error: InvalidSetting) -> typer.BadParameter:
    """A setting's broken rule, pointed at the option that set it (exit 2, click's usage line)."""
    return typer.BadParameter(error.rule, param_hint="--" + error.name.replace("_", "-"))
