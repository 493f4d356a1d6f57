"""Errors that the CLI turns into one clear line and a distinct exit code."""


class LowbitError(Exception):
    """Base class: anything the user can act on. The message is one line."""

    exit_code = 2


class UsageError(LowbitError):
    """Bad arguments or unusable input: missing path, bad config, bad option values."""

    exit_code = 2


class CorruptInputError(LowbitError):
    """Input that exists but cannot be trusted: corrupt or truncated files, NaN weights, pickles."""

    exit_code = 3


class OutputExistsError(LowbitError):
    """The output path exists and --force was not given."""

    exit_code = 4


class ResourceError(LowbitError):
    """The machine ran out of something: disk space, memory."""

    exit_code = 5


class HubError(LowbitError):
    """The Hub refused or failed a request (auth, permissions, network)."""

    exit_code = 6


class VerifyError(LowbitError):
    """A checkpoint does not match its manifest or its config."""

    exit_code = 7


class GateFailed(LowbitError):
    """An evaluation gate failed."""

    exit_code = 1
