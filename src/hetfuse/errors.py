"""Exceptions raised by hetfuse. Every user-facing error is a :class:`HetfuseError` with a clear message."""


class HetfuseError(ValueError):
    """Bad input or an unsupported model: the message says what and where."""


class UnsupportedModelError(HetfuseError):
    """The model contains an operation hetfuse cannot describe (the message names the node and op)."""


class CheckpointError(HetfuseError):
    """A checkpoint file is corrupt, foreign, unsafe to load or would overwrite an existing file."""


class DataError(HetfuseError):
    """A data set is unknown, missing or malformed (the message says where it looked)."""
