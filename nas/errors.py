"""Errors raised at nas's boundaries: each message names the field, the value and the fix."""


class NasError(ValueError):
    """A user-facing error; the CLI prints its message as one line and exits non-zero."""


class ArchitectureError(NasError):
    """An Architecture that the parent cannot produce."""


class UnsupportedModelError(NasError):
    """A parent whose model family has no adapter."""


class DataError(NasError):
    """Missing, empty or too-short data."""


class ConfigError(NasError):
    """An invalid search space or run configuration."""


class TrainingError(NasError):
    """A training run that cannot go on (e.g. a non-finite loss)."""


class EngineError(NasError):
    """A serving engine (vLLM, llama.cpp) that is not installed or fails on a model."""
