"""One exception type for every bad input, so the CLI can print one line and exit 2."""

from __future__ import annotations


class MoesimError(ValueError):
    """A user-facing error: a malformed trace, mapping, topology or config, or an impossible request.

    The message is a complete sentence naming the problem; the CLI prints it alone, without a traceback.
    """


class TraceError(MoesimError):
    """A trace file is missing, malformed, truncated or of an unsupported version."""


class MappingError(MoesimError):
    """An expert mapping is malformed or does not fit the model / cluster it is used with."""
