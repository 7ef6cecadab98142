"""Errors the CLI turns into exit code 2 with a message that names what to fix."""


class InputError(Exception):
    """Bad input: a missing file, a malformed record, an unknown config key or model.

    Raised before any output is written, so a failed run leaves nothing half-done.
    """


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking store cannot be reached; the message names its URI."""


class EndpointUnavailable(RuntimeError):
    """A generation server failed after the client's retries; the message names URL and model.

    An environment failure, not bad input: the CLI exits 1, and the stage has written nothing.
    ``status_code`` is the server's HTTP answer, None when it could not be reached.
    """

    status_code: int | None = None
