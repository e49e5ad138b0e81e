"""driftcorr: out-of-core subpixel drift correction of long image time series stored in Zarr.

Public API
----------
register
    Register one image (or a batch) onto a reference: subpixel masked NCC.
estimate_drift
    Per-frame shifts, uncertainties and quality flags of a stack, as an xarray Dataset.
apply_drift
    Lazily shift a stack by its drift.
correct
    Estimate and apply the drift of a stored stack, writing a Zarr output.
open_stack
    Open a stored stack lazily.
"""

import logging
from importlib.metadata import PackageNotFoundError, version

from .errors import ConfigError, DriftcorrError, InputError, OutputError, OutputExistsError
from .pipeline import apply_drift, correct, estimate_drift
from .registration import RegistrationResult, register
from .store import open_stack

# A library logs; the application decides where it goes (the command line reports on its own).
logging.getLogger("driftcorr").addHandler(logging.NullHandler())

try:
    __version__ = version("driftcorr")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "ConfigError",
    "DriftcorrError",
    "InputError",
    "OutputError",
    "OutputExistsError",
    "RegistrationResult",
    "__version__",
    "apply_drift",
    "correct",
    "estimate_drift",
    "open_stack",
    "register",
]
