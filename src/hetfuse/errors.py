"""Exceptions raised by hetfuse. Every user-facing error is a :class:`HetfuseError` with a clear message."""


class HetfuseError(ValueError):
    """Bad input or an unsupported model: the message (one line) says what and where; ``details`` (optional,
    several lines) says more, e.g. every path that was looked at (the CLI prints it with ``--verbose``).
    ``cli_message`` (optional): the message as the command line says it, where the remedy differs between a
    Python caller and a command-line user (``force=True`` / ``--force``); the message is the Python caller's."""

    def __init__(self, message: str = "", *, details: str | None = None, cli_message: str | None = None) -> None:
        super().__init__(message)
        self.details = details
        self.cli_message = cli_message


class UnsupportedModelError(HetfuseError):
    """The model contains an operation hetfuse cannot describe (the message names the node and op)."""


class CheckpointError(HetfuseError):
    """A checkpoint file is corrupt, foreign, unsafe to load or would overwrite an existing file."""


class DataError(HetfuseError):
    """A data set is unknown, missing or malformed (the message says where it looked)."""
