"""Exceptions raised by driftcorr.

Every expected failure (bad input, bad configuration, an output that must not be touched) derives from
:class:`DriftcorrError`, so the command line can turn it into one clear line and exit code 2. Each class also
derives from the built-in exception a Python user would expect, so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class DriftcorrError(Exception):
    """Base class of the errors driftcorr raises on purpose (bad input, configuration or output)."""


class InputError(DriftcorrError, ValueError):
    """An input stack, mask, reference or argument cannot be used as given."""


class ConfigError(DriftcorrError, ValueError):
    """A configuration file or option is unknown or has an invalid value."""


class OutputExistsError(DriftcorrError, FileExistsError):
    """The output location exists and may not be replaced."""


class OutputError(DriftcorrError, OSError):
    """The output location cannot be written, or is not a driftcorr output."""


class OutputMismatchError(OutputExistsError):
    """An existing output was made from another input or with other options, so it cannot be resumed."""


class OutputLockedError(DriftcorrError, BlockingIOError):
    """Another driftcorr process is writing the output."""


class RunFailedError(RuntimeError):
    """Some blocks could not be processed; the output is left incomplete and the same command resumes it.

    Not a :class:`DriftcorrError`: the input was acceptable, so the command line exits with 1, not 2.
    """
