"""Keep Hugging Face tokens out of messages, logs and files.

Every text lowbit shows or writes that could echo something from the outside
(server error messages, model cards, progress events) goes through `redact`.
"""

import os
import re

REDACTED = "hf_***"

# User access tokens are "hf_" followed by ~34 letters and digits.
_TOKEN_SHAPE = re.compile(r"hf_[A-Za-z0-9]{30,}")

# Shorter values would redact ordinary words; no real token is that short.
_MIN_SECRET_LENGTH = 8

_registered: set[str] = set()


def register_secret(value: str) -> None:
    """Remember a token given on the command line so that `redact` hides it too."""
    value = (value or "").strip()
    if len(value) >= _MIN_SECRET_LENGTH:
        _registered.add(value)


def secrets() -> list[str]:
    """The tokens known right now: HF_TOKEN, HUGGING_FACE_HUB_TOKEN and the registered ones."""
    from_env = [os.environ.get("HF_TOKEN", ""), os.environ.get("HUGGING_FACE_HUB_TOKEN", "")]
    known = {value.strip() for value in from_env} | _registered
    # Longest first, so that a secret containing another one is replaced whole.
    return sorted((s for s in known if len(s) >= _MIN_SECRET_LENGTH), key=len, reverse=True)


def redact(text: str) -> str:
    """`text` with every known secret and anything shaped like a token replaced by "hf_***"."""
    for secret in secrets():
        text = text.replace(secret, REDACTED)
    return _TOKEN_SHAPE.sub(REDACTED, text)
