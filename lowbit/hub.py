"""Publish a lowbit checkpoint folder to the Hugging Face Hub (`lowbit push`).

push_folder: write the model card (and the error plot) into a temporary folder,
never into the checkpoint, create the repo, ask the Hub
which files it already has (paths-info gives each file's git id and, for LFS
files, its sha256), and upload only the files that are missing or differ, in
commits of at most `max_commit_bytes`. An interrupted push, run again, uploads
only what is still missing.

Retries. huggingface_hub retries by itself (5 retries, waits of 1 to 8 s, on
429, 5xx and network errors) the requests it sends through `http_backoff`:
preupload, the LFS batch call, LFS uploads and their verification. It does not
retry create_repo, create_branch, paths-info, validate-yaml or the commit POST.
So the upload step (`preupload_lfs_files`) runs once here, with the library's
retry messages forwarded to `on_event`, and the other calls go through
`_call(..., retry=True)`: every request is retried by exactly one loop.
401/403 are never retried; a refused connection is reported at once.
"""

import hashlib
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from functools import partial
from pathlib import Path

import httpx2
from huggingface_hub import CommitOperationAdd, HfApi, RepoFile
from huggingface_hub.utils import HFValidationError
from huggingface_hub.utils import validate_repo_id as hf_validate_repo_id

from lowbit import __version__
from lowbit.card import FORMATS_FILE, LAYER_ERRORS_FILE, build_model_card, chosen_formats, format_map_svg, layer_error_svg, layer_errors
from lowbit.errors import HubError, UsageError
from lowbit.redact import redact, register_secret
from lowbit.manifest import CALIBRATION_FILE, MANIFEST, read_manifest
from lowbit.network import hub_endpoint

CARD_FILE = "README.md"
log = logging.getLogger("lowbit")
RETRY_TRIES = 4  # our own loop: 1 try + 3 retries, waits of base, 2*base, 4*base
_RETRYABLE_STATUS = {429, 500, 502, 503, 504}

# What a lowbit checkpoint folder publishes; anything else (resume state, temp files) stays local.
_PUSHED_NAMES = {
    "config.json", "generation_config.json", "quantize_config.json", MANIFEST, CALIBRATION_FILE,
    CARD_FILE, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
    "chat_template.json",
}  # fmt: skip
_PUSHED_SUFFIXES = (".safetensors", ".safetensors.index.json", ".svg", ".png")


@dataclass(frozen=True)
class PushOptions:
    repo_id: str
    private: bool = False
    revision: str | None = None
    create_pr: bool = False
    commit_message: str | None = None
    token: str | None = None  # else HF_TOKEN or the stored login (huggingface_hub resolves that)
    dry_run: bool = False
    base_model: str | None = None  # the source's Hub id for the card, when the manifest cannot tell
    max_commit_bytes: int = 2 * 1024**3  # large folders go up in several commits


@dataclass
class PushResult:
    repo_id: str
    url: str | None
    uploaded: list[str]
    skipped: list[str]
    commits: int
    dry_run: bool
    card: str


def validate_repo_id(repo_id: str) -> None:
    """UsageError unless `repo_id` is a valid "namespace/name"; no network."""
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise UsageError(f"invalid repo id {repo_id!r}: expected namespace/name, e.g. alice/model-GPTQ-4bit")
    try:
        hf_validate_repo_id(repo_id)
    except HFValidationError as err:
        raise UsageError(f"invalid repo id {repo_id!r}: {err}") from None


def files_to_push(folder: Path) -> list[Path]:
    """The files of checkpoint `folder` that belong on the Hub, sorted by name.

    Refuses (UsageError) a folder without lowbit_manifest.json or config.json,
    without weights, missing a file its manifest lists, or holding a link that
    points outside it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder")
    root = folder.resolve()
    for required in (MANIFEST, "config.json"):
        if not (folder / required).is_file():
            raise UsageError(f"{folder} is not a complete lowbit checkpoint: {required} is missing")
    chosen = []
    for path in sorted(folder.iterdir()):
        if not (path.name in _PUSHED_NAMES or path.name.endswith(_PUSHED_SUFFIXES)):
            continue
        target = path.resolve()
        if not target.is_relative_to(root):
            raise UsageError(f"{path} links to {target}, outside the checkpoint folder; copy the file in instead")
        if not target.is_file():
            raise UsageError(f"{path} is not a regular file (broken link?)")
        chosen.append(path)
    names = {path.name for path in chosen}
    if not any(name.endswith(".safetensors") for name in names):
        raise UsageError(f"{folder} is not a complete lowbit checkpoint: no .safetensors weights")
    missing = sorted(set(read_manifest(folder).get("files") or {}) - names)
    if missing:
        listed = ", ".join(missing)
        raise UsageError(f"{folder} is not a complete lowbit checkpoint: {listed} listed in the manifest but absent")
    return chosen


def push_folder(folder: Path, options: PushOptions, on_event: Callable[[str], None] | None = None) -> PushResult:
    """Publish checkpoint `folder` as `options.repo_id`; see the module docstring."""

    def emit(message: str) -> None:
        if on_event is not None:
            on_event(redact(message))

    validate_repo_id(options.repo_id)
    if options.max_commit_bytes <= 0:
        raise UsageError("max_commit_bytes must be positive")
    if options.token:
        register_secret(options.token)
    folder = Path(folder)
    files_to_push(folder)  # refuse an incomplete folder before anything else
    manifest = read_manifest(folder)
    if options.base_model is not None:
        validate_repo_id(options.base_model)
    card_data = build_model_card(manifest, options.repo_id, options.base_model)
    if not card_data.data.base_model:
        log.warning("no base model is known (the source is a local folder), so the Hub will not link this "
                    "repo to it: pass --base-model NAMESPACE/NAME (push.base_model in a recipe)")
    card = redact(str(card_data))
    pictures = {name: redact(draw(manifest)) for name, draw, wanted in (
        (LAYER_ERRORS_FILE, layer_error_svg, layer_errors(manifest)),
        (FORMATS_FILE, format_map_svg, chosen_formats(manifest))) if wanted}
    if options.dry_run:
        names = {path.name for path in files_to_push(folder)} | {CARD_FILE} | set(pictures)
        return PushResult(options.repo_id, None, sorted(names), [], 0, True, card)

    with tempfile.TemporaryDirectory(prefix="lowbit-card-") as staging:  # the user's folder is not written
        paths = {path.name: path for path in files_to_push(folder)}
        paths[CARD_FILE] = _staged(Path(staging), CARD_FILE, card)
        for name, picture in pictures.items():
            paths[name] = _staged(Path(staging), name, picture)
        return _push_files(paths, manifest, options, card, emit)


def _staged(staging: Path, name: str, text: str) -> Path:
    path = staging / name
    path.write_text(text, encoding="utf-8")
    return path


def _push_files(paths: dict[str, Path], manifest: dict, options: PushOptions, card: str,
                emit: Callable[[str], None]) -> PushResult:
    digests = {name: _digests(path) for name, path in paths.items()}

    api = HfApi(endpoint=hub_endpoint(), token=options.token, library_name="lowbit", library_version=__version__)
    with _forward_library_retries(emit):
        url = _prepare_repo(api, options, emit)
        remote = _call(
            "listing the files on the Hub",
            lambda: _remote_files(api, options.repo_id, list(paths), options.revision),
            emit, options.repo_id,
        )  # fmt: skip
        skipped = [name for name in paths if name in remote and _same_content(digests[name], remote[name])]
        to_upload = [name for name in paths if name not in skipped]
        sizes = [(name, paths[name].stat().st_size) for name in _upload_order(to_upload)]
        batches = [[paths[name] for name in batch] for batch in plan_commits(sizes, options.max_commit_bytes)]
        emit(f"{len(to_upload)} file(s) to upload in {len(batches)} commit(s), {len(skipped)} already on the Hub")
        pr_url = _commit_batches(api, options, batches, digests, _default_commit_message(manifest), emit)
    return PushResult(options.repo_id, pr_url or url, to_upload, skipped, len(batches), False, card)


def _prepare_repo(api: HfApi, options: PushOptions, emit: Callable[[str], None]) -> str:
    """Create the repo (and the target branch) unless they exist; returns the repo URL."""
    repo_id = options.repo_id
    # private=None rather than False: an existing repo and an organisation's default visibility are left alone.
    url = _call(
        "creating the repository",
        lambda: api.create_repo(repo_id, private=options.private or None, exist_ok=True),
        emit, repo_id,
    )  # fmt: skip
    if options.revision and not options.create_pr:
        _call(
            f"creating branch {options.revision}",
            lambda: api.create_branch(repo_id, branch=options.revision, exist_ok=True),
            emit, repo_id,
        )  # fmt: skip
    return str(url)


def _commit_batches(
    api: HfApi,
    options: PushOptions,
    batches: list[list[Path]],
    digests: dict[str, tuple[str, str]],
    default_message: str,
    emit: Callable[[str], None],
) -> str | None:
    """Upload and commit each batch in turn; returns the pull request's URL when one was opened."""
    repo_id, revision, create_pr, pr_url = options.repo_id, options.revision, options.create_pr, None
    for number, batch in enumerate(batches, 1):
        step = f"commit {number}/{len(batches)}"
        message = (options.commit_message or default_message) + (f" ({step})" if len(batches) > 1 else "")
        operations = [CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=str(path)) for path in batch]
        for op in operations:
            op.upload_info.sha256 = bytes.fromhex(digests[op.path_in_repo][0])  # spares the library a re-read
        emit(f"{step}: uploading {', '.join(path.name for path in batch)}")
        upload = partial(
            api.preupload_lfs_files, repo_id, additions=operations, revision=revision, create_pr=create_pr,
            free_memory=False,
        )  # fmt: skip
        _call(f"uploading the files of {step}", upload, emit, repo_id, retry=False)  # the library retries these
        commit = partial(
            api.create_commit, repo_id, operations, commit_message=message, revision=revision, create_pr=create_pr
        )
        info = _call(f"making {step}", commit, emit, repo_id)
        if create_pr:  # the later commits go onto the pull request's branch
            pr_url, revision, create_pr = info.pr_url, info.pr_revision, False
        emit(f"{step}: committed")
    return pr_url


def plan_commits(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Group (name, size) in order into commits of at most `max_bytes`; a larger file gets its own commit."""
    batches: list[list[str]] = []
    batch_bytes = 0
    for name, size in sizes:
        if not batches or batch_bytes + size > max_bytes:
            batches.append([])
            batch_bytes = 0
        batches[-1].append(name)
        batch_bytes += size
    return batches


# --- comparing with what the Hub has ----------------------------------------


def _remote_files(api: HfApi, repo_id: str, names: list[str], revision: str | None) -> dict[str, RepoFile]:
    entries = api.get_paths_info(repo_id, names, revision=revision)
    return {entry.path: entry for entry in entries if isinstance(entry, RepoFile)}


def _digests(path: Path) -> tuple[str, str]:
    """(sha256, git blob sha1) of a file in one read: the Hub gives the first for LFS files, the second otherwise."""
    sha256 = hashlib.sha256()
    git_sha1 = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as file:
        while chunk := file.read(8 * 1024 * 1024):
            sha256.update(chunk)
            git_sha1.update(chunk)
    return sha256.hexdigest(), git_sha1.hexdigest()


def _same_content(local: tuple[str, str], remote: RepoFile) -> bool:
    sha256, git_sha1 = local
    return remote.lfs.sha256 == sha256 if remote.lfs is not None else remote.blob_id == git_sha1


def _upload_order(names: list[str]) -> list[str]:
    # Weights first, the small files that make the repo loadable (config, index, card) last,
    # so that an interrupted push does not present a complete-looking but broken model.
    return sorted(names, key=lambda name: (not name.endswith(".safetensors"), name == CARD_FILE, name))


def _default_commit_message(manifest: dict) -> str:
    bits = (manifest.get("settings") or {}).get("bits", 4)
    return f"Upload {manifest.get('method', 'quantized')} {bits}-bit checkpoint with lowbit {__version__}"


# --- errors and retries ------------------------------------------------------


def _call(step: str, fn: Callable, emit: Callable[[str], None], repo_id: str, *, retry: bool = True):
    """fn(), retrying 429/5xx with exponential backoff when `retry`; Hub and network failures become HubError."""
    tries = RETRY_TRIES if retry else 1
    for attempt in range(1, tries + 1):
        try:
            return fn()
        except Exception as err:
            cause = _hub_cause(err)
            if cause is None:
                raise
            status = _status(cause)
            if status in _RETRYABLE_STATUS and attempt < tries:
                wait = max(_retry_base_seconds() * 2 ** (attempt - 1), _retry_after_seconds(cause))
                _countdown(f"{step}: the Hub answered HTTP {status} (retry {attempt}/{tries - 1})", wait, emit)
                continue
            raise HubError(redact(_describe(cause, step, repo_id))) from err


def _hub_cause(err: BaseException) -> httpx2.HTTPError | None:
    """The HTTP or network error behind `err` (the library wraps some in RuntimeError), if any."""
    while err is not None:
        if isinstance(err, httpx2.HTTPError):
            return err
        err = err.__cause__
    return None


def _status(err: httpx2.HTTPError) -> int | None:
    response = getattr(err, "response", None)
    return response.status_code if response is not None else None


def _describe(err: httpx2.HTTPError, step: str, repo_id: str) -> str:
    status = _status(err)
    namespace = repo_id.split("/")[0]
    if status is None:
        reason = "connection refused" if isinstance(err, httpx2.ConnectError) else type(err).__name__
        return f"cannot reach the Hub at {hub_endpoint()} while {step}: {reason}"
    if status == 401:
        return "token missing or invalid: log in with `hf auth login`, set HF_TOKEN or pass --token"
    if status == 403:
        return f"no write access to {namespace}: the token cannot write to {repo_id}"
    if status in _RETRYABLE_STATUS:
        return f"the Hub kept answering HTTP {status} while {step}; run the same command again to resume"
    server_message = err.response.headers.get("X-Error-Message") or ""
    return f"the Hub answered HTTP {status} while {step} for {repo_id}{': ' + server_message if server_message else ''}"


def _retry_base_seconds() -> float:
    try:
        return max(0.0, float(os.environ.get("LOWBIT_RETRY_BASE_SECONDS", "2")))
    except ValueError:
        return 2.0


def _retry_after_seconds(err: httpx2.HTTPError) -> float:
    """The server's Retry-After (seconds or a date), capped at 5 minutes; 0 when absent."""
    value = err.response.headers.get("Retry-After", "") if _status(err) else ""
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return 0.0
    return min(max(seconds, 0.0), 300.0)


def _countdown(message: str, seconds: float, emit: Callable[[str], None]) -> None:
    remaining = seconds
    while remaining > 0:
        emit(f"{message}; retrying in {math.ceil(remaining)}s")
        step = min(1.0, remaining)
        time.sleep(step)
        remaining -= step


class _EventHandler(logging.Handler):
    def __init__(self, emit: Callable[[str], None]):
        super().__init__(logging.WARNING)
        self._emit = emit

    def emit(self, record: logging.LogRecord) -> None:
        self._emit(f"hub: {record.getMessage()}")


@contextmanager
def _forward_library_retries(emit: Callable[[str], None]) -> Iterator[None]:
    """Send huggingface_hub's own retry warnings ("Retrying in 2s [Retry 1/5]") to on_event."""
    logger = logging.getLogger("huggingface_hub.utils._http")
    handler = _EventHandler(emit)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
