"""Can the Hugging Face Hub be reached? One quick TCP probe instead of huggingface_hub's retries.

Without a network, huggingface_hub retries each request five times with waits
of 1 to 8 s (about 30 s) before it falls back to its cache. Code that is about
to download asks `hub_unreachable()` first: when the Hub's host refuses or
does not answer within PROBE_SECONDS, it reads the local cache only and, if
the file is not there, says so in one line (`offline_hint`).
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlsplit

from lowbit.redact import register_secret

PROBE_SECONDS = 2.0
DEFAULT_ENDPOINT = "https://huggingface.co"
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or DEFAULT_ENDPOINT


def hub_token(explicit: str | None = None) -> str | None:
    """The token to send: the one given, else HF_TOKEN, else None (huggingface_hub then uses the stored login).
    Registered as a secret, so that no output shows it."""
    token = explicit or os.environ.get("HF_TOKEN") or None
    if token:
        register_secret(token)
    return token


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set (as huggingface_hub reads it, or set since it was imported)."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return constants.HF_HUB_OFFLINE or flag in ("1", "true", "yes", "on")


def hub_unreachable() -> str | None:
    """None when the Hub's host accepts a connection (or a proxy is in the way), else why not."""
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return None  # the proxy decides; a direct probe would say nothing
    return _probe(hub_endpoint())


@functools.lru_cache(maxsize=8)
def _probe(endpoint: str) -> str | None:
    parts = urlsplit(endpoint)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=PROBE_SECONDS):
            return None
    except OSError as err:  # refused, timed out, no route, unknown host
        return f"{parts.hostname}:{port}: {err.strerror or type(err).__name__}"


def local_only() -> bool:
    """Read the Hub cache only: offline mode, or the Hub cannot be reached."""
    return hub_offline() or hub_unreachable() is not None


def offline_hint() -> str:
    """Why a Hub file cannot be had here, and what to do about it (one line)."""
    if hub_offline():
        why = "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache"
    elif hub_unreachable() is not None:
        why = f"the Hub ({hub_endpoint()}) cannot be reached ({hub_unreachable()})"
    else:
        why = f"the Hub ({hub_endpoint()}) did not answer and it is not in the local cache"
    return (f"{why}; with no network, download it once elsewhere and set HF_HUB_OFFLINE=1 to use the "
            "local cache, or pass a local folder")
