"""Errors the CLI turns into exit code 2 with a message that names what to fix."""


class InputError(Exception):
    """Bad input: a missing file, a malformed record, an unknown config key or model.

    Raised before any output is written, so a failed run leaves nothing half-done.
    """


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking store cannot be reached; the message names its URI."""
