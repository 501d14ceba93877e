"""Error types for user mistakes; the CLI turns each into a one-line message and exit code."""

from __future__ import annotations


class VlpError(Exception):
    """Base class of every error caused by user input (exit code 2 in the CLI)."""

    exit_code = 2


class ConfigError(VlpError):
    """params.yaml (or an override) has an unknown key, a wrong type or a bad value."""


class DataError(VlpError):
    """A dataset, manifest or image is malformed; the message names the file and row."""


class ResultsError(VlpError):
    """A results/annotations/similarity file handed to an evaluator is malformed."""


class ResumeError(VlpError):
    """`--resume` found checkpoints written with other params or data than the current ones."""


class RegistryError(VlpError):
    """A registry operation cannot proceed (no such model, alias or version)."""


class RequestError(VlpError):
    """A request to a served model is malformed or over a limit; the message names the row."""


class OutputError(VlpError):
    """An output location cannot be written, or holds files vlp did not write and so will not
    replace or delete (a params path, `--out`, the tracking store)."""


class ServiceError(VlpError):
    """A service of the local team stack (`make services`) cannot be installed, started or
    stopped; the message names the service and its log file."""


class TrackingError(VlpError):
    """The MLflow tracking store cannot be reached or used; the message names its URI."""
