"""Errors the CLI turns into an exit code and one line that names what to fix.

Bad input (the user can fix it: a path, a record, a key, a credential) exits 2; a failed
environment (a server or disk that is down or full) exits 1.
"""


class InputError(Exception):
    """Bad input: a missing file, a malformed record, an unknown config key or model.

    Raised before any output is written, so a failed run leaves nothing half-done.
    """


class InvalidURI(InputError, ValueError):
    """A malformed ``s3://`` URI (also a ValueError, as the argument is one)."""


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking store cannot be reached; the message names its URI."""


class StorageUnavailable(RuntimeError):
    """The S3 endpoint cannot be reached or times out; the message names it and the URI."""


class EndpointUnavailable(RuntimeError):
    """A generation server failed after the client's retries; the message names URL and model.

    An environment failure, not bad input: the CLI exits 1, and the stage has written nothing.
    ``status_code`` is the server's HTTP answer, None when it could not be reached.
    """

    status_code: int | None = None
