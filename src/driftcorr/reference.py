"""Choosing the reference frame (pure NumPy kernels).

A reference is written as a frame index (``0``, ``-1``) or a combination of a frame range,
``mean:A:B`` or ``median:A:B`` (frames A to B-1, Python slice semantics).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError

KINDS = ("frame", "mean", "median")
_FORMS = "a frame index such as 0, or mean:A:B / median:A:B for frames A..B-1"


@dataclass(frozen=True)
class ReferenceSpec:
    """Which frames make the reference and how they are combined."""

    kind: str
    start: int
    stop: int

    @property
    def frames(self) -> range:
        """Frame indices the reference is built from."""
        return range(self.start, self.stop)

    def __str__(self) -> str:
        return str(self.start) if self.kind == "frame" else f"{self.kind}:{self.start}:{self.stop}"


def parse_reference(value, n_frames: int) -> ReferenceSpec:
    """Parse a reference specification against a stack of ``n_frames`` frames.

    Parameters
    ----------
    value : int or str
        ``5``, ``"-1"``, ``"mean:0:20"`` or ``"median:10:30"``.
    n_frames : int
        Number of frames in the stack.

    Returns
    -------
    ReferenceSpec
        With non-negative, in-range indices.
    """
    text = str(value).strip()
    if isinstance(value, bool):
        raise InputError(f"reference must be {_FORMS} (got {value!r})")
    if ":" not in text:
        try:
            index = int(text)
        except ValueError:
            raise InputError(f"reference must be {_FORMS} (got {value!r})") from None
        if not -n_frames <= index < n_frames:
            raise InputError(f"reference frame {index} is out of range for a stack of {n_frames} frames; "
                             f"use an index from 0 to {n_frames - 1}")
        index %= n_frames
        return ReferenceSpec("frame", index, index + 1)
    parts = text.split(":")
    if len(parts) != 3 or parts[0] not in KINDS[1:]:
        raise InputError(f"reference must be {_FORMS} (got {value!r})")
    try:
        start, stop = int(parts[1]), int(parts[2])
    except ValueError:
        raise InputError(f"reference must be {_FORMS} (got {value!r})") from None
    start_, stop_, _ = slice(start, stop).indices(n_frames)
    if stop_ <= start_ or start < -n_frames or start >= n_frames:
        raise InputError(f"reference range {value!r} selects no frame of a stack of {n_frames} frames")
    return ReferenceSpec(parts[0], start_, stop_)


def combine_frames(frames, kind: str) -> np.ndarray:
    """Combine frames into one reference image.

    Parameters
    ----------
    frames : array_like, shape (n, *frame_shape)
    kind : {"frame", "mean", "median"}
        ``"frame"`` requires exactly one frame.

    Returns
    -------
    ndarray, float64, shape frame_shape
    """
    frames = np.asarray(frames, dtype=np.float64)
    if kind == "frame":
        if frames.shape[0] != 1:
            raise InputError(f"a frame reference needs exactly one frame (got {frames.shape[0]})")
        return frames[0]
    if kind == "mean":
        return np.mean(frames, axis=0)
    if kind == "median":
        return np.median(frames, axis=0)
    raise InputError(f"reference kind must be one of {KINDS} (got {kind!r})")
