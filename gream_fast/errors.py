"""The package's error types. Every bad input raises a GreamError that names the file, line or
field at fault and what was expected."""


class GreamError(Exception):
    """Base class of every error gream-fast raises for bad input or bad state."""


class InvalidInputError(GreamError, ValueError):
    """An argument, array or record is malformed (wrong shape, value or format)."""


class FormatError(GreamError, ValueError):
    """A file does not have the expected format; the message names the file and the field."""


class DataError(FormatError):
    """A data file is malformed; the message names the file and line."""


class OutputError(GreamError):
    """An output path that must not or cannot be written (it is an input, holds data the command
    did not write, sits under a file, is not writable); the message names the path."""
