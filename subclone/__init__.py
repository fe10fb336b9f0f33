"""Weight subcloning: initialize a smaller transformer from a larger pretrained one.

The method follows Samragh et al., "Weight subcloning: direct initialization of
transformers using larger pretrained ones" (arXiv:2312.09299).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("subclone")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"

from subclone.errors import (
    CalibrationError,
    Cancelled,
    FieldError,
    InvalidOptions,
    InvalidTarget,
    ParentNotFound,
    SubcloneError,
    UnsafeCheckpoint,
    UnsupportedArchitecture,
    VerificationFailed,
)
from subclone.options import CalibrationOptions, SubcloneOptions, Target

__all__ = [
    "__version__",
    "CalibrationError",
    "CalibrationOptions",
    "Cancelled",
    "FieldError",
    "InvalidOptions",
    "InvalidTarget",
    "ParentNotFound",
    "SubcloneError",
    "SubcloneOptions",
    "Target",
    "UnsafeCheckpoint",
    "UnsupportedArchitecture",
    "VerificationFailed",
]
