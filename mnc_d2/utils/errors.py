"""Errors a user can fix without reading a traceback: bad input data, a bad config, missing weights,
a diverged run. Each message names the file / dataset / config key and the reason.

``train_net.py`` prints an :class:`MNCError` as one message and exits with status 2; anything else is
a bug and keeps its traceback. Every class also derives from the builtin error a caller would expect
(``ValueError``, ``FileNotFoundError``, ...), so ``except ValueError`` keeps working.
"""

from detectron2.data.detection_utils import SizeMismatchError

__all__ = [
    "MNCError",
    "ConfigError",
    "MissingInputError",
    "DatasetError",
    "BadImageError",
    "ImageNotFoundError",
    "CorruptImageError",
    "ImageSizeMismatchError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "UnsafeCheckpointError",
    "NonFiniteError",
]


class MNCError(Exception):
    """Base of the errors caused by the user's input, data or environment, not by a bug."""


class ConfigError(MNCError, ValueError):
    """A config file or command-line option that cannot be used (unknown key, wrong type, bad value)."""


class MissingInputError(ConfigError, FileNotFoundError):
    """A file or pattern named on the command line (e.g. the demo's ``--input``) matches nothing."""


class DatasetError(MNCError, ValueError):
    """A dataset that cannot be used: unreadable or malformed annotation file, empty dataset, bad record."""


class BadImageError(MNCError, OSError):
    """One image cannot be used. Training may skip it (``MNC_RELIABILITY.BAD_IMAGE``); evaluation raises."""

    def __init__(self, message, file_name=None):
        super().__init__(message)
        self.file_name = file_name

    def __reduce__(self):  # keep file_name through pickling (DataLoader workers re-raise in the parent)
        return type(self), (str(self), self.file_name)

    def __str__(self):
        return self.args[0] if self.args else ""


class ImageNotFoundError(BadImageError, FileNotFoundError):
    """The image file does not exist."""


class CorruptImageError(BadImageError):
    """The image file exists but cannot be decoded (truncated, not an image, unsupported)."""


class ImageSizeMismatchError(BadImageError, SizeMismatchError):
    """The decoded image's size disagrees with the width/height recorded in its annotation (also a D2
    ``SizeMismatchError``, what D2's mapper raises)."""


class CheckpointError(MNCError, RuntimeError):
    """A checkpoint / weights file that cannot be loaded (corrupt, not a checkpoint)."""


class UnsafeCheckpointError(CheckpointError):
    """A weights file that holds code or objects other than weights: refused, never executed."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A weights file named by the config (``MODEL.WEIGHTS``) or by ``last_checkpoint`` is missing."""


class NonFiniteError(MNCError, FloatingPointError):
    """Training produced a NaN/Inf loss, gradient or weight; no update with it was applied or saved."""
