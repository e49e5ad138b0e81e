"""Defective pixels (pure NumPy/SciPy kernels).

Isolated invalid pixels (hot, dead, corrupted) are not left as holes in a moving frame: a static hole that sits at
the same place in every frame puts a spike at zero lag into every masked correlation term, and the band-limited
interpolation of that spike biases the subpixel peak. Instead they are filled from their valid neighbours
(normalized convolution with a small Gaussian), so the filled frame moves with the pattern. Large invalid regions
(the beam-block) stay masked: their correlation terms vary smoothly with the lag.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

#: Invalid regions of at most this many pixels are filled; larger ones stay masked.
MAX_FILLED_CLUSTER = 25
_FILL_RADIUS = 2
_FILL_SIGMA = 1.0


@dataclass(frozen=True, eq=False)
class FillPlan:
    """Where and how to fill isolated invalid pixels of frames that share one mask.

    Attributes
    ----------
    targets : ndarray of int, shape (k,)
        Flat indices of the pixels to fill.
    sources : ndarray of int, shape (k, w)
        Flat indices of their neighbours.
    weights : ndarray of float64, shape (k, w)
        Normalized weights of the neighbours (zero for invalid ones); each row sums to 1.
    mask : ndarray of bool
        The mask left after filling: False only on the large invalid regions.
    """

    targets: np.ndarray
    sources: np.ndarray
    weights: np.ndarray
    mask: np.ndarray


def plan_fill(mask: np.ndarray, *, max_cluster: int = MAX_FILLED_CLUSTER) -> FillPlan:
    """Plan the filling of the isolated invalid pixels of ``mask`` (True = valid).

    Parameters
    ----------
    mask : ndarray of bool
        Valid pixels of an image or volume.
    max_cluster : int
        Connected invalid regions of at most this many pixels are filled.

    Returns
    -------
    FillPlan
    """
    mask = np.asarray(mask, dtype=bool)
    invalid = ~mask
    labels, _ = ndi.label(invalid)
    sizes = np.bincount(labels.ravel())
    small = invalid & (sizes[labels] <= max_cluster) & (labels > 0)
    targets = np.flatnonzero(small)
    offsets = np.stack(np.meshgrid(*[np.arange(-_FILL_RADIUS, _FILL_RADIUS + 1)] * mask.ndim, indexing="ij"),
                       axis=-1).reshape(-1, mask.ndim)
    coords = np.stack(np.unravel_index(targets, mask.shape), axis=1)  # (k, ndim)
    neighbours = coords[:, None, :] + offsets[None, :, :]  # (k, w, ndim)
    inside = np.all((neighbours >= 0) & (neighbours < np.asarray(mask.shape)), axis=-1)
    clipped = np.clip(neighbours, 0, np.asarray(mask.shape) - 1)
    sources = np.ravel_multi_index(tuple(np.moveaxis(clipped, -1, 0)), mask.shape)
    weights = np.exp(-np.sum(offsets**2, axis=1) / (2 * _FILL_SIGMA**2))[None, :] * inside * mask.ravel()[sources]
    total = weights.sum(axis=1)
    fillable = total > 0
    first_valid = np.flatnonzero(mask.ravel())[:1]
    # Invalid neighbours point at a valid pixel with weight 0, so a NaN in a hole never leaks into a fill.
    sources = np.where(weights > 0, sources, first_valid[0] if first_valid.size else 0)
    result_mask = mask.copy()
    result_mask.ravel()[targets[fillable]] = True
    return FillPlan(targets=targets[fillable], sources=sources[fillable],
                    weights=weights[fillable] / total[fillable, None], mask=result_mask)


def fill_pixels(flat_frames: np.ndarray, fill: FillPlan) -> None:
    """Fill the planned pixels of frames in place.

    Parameters
    ----------
    flat_frames : ndarray, shape (n, pixels)
        Frames flattened over their spatial axes (a writable view).
    fill : FillPlan
    """
    if fill.targets.size == 0:
        return
    # float64 accumulation: a frame's filled values do not depend on how many frames share the call.
    values = np.einsum("nkw,kw->nk", flat_frames[:, fill.sources], fill.weights, dtype=np.float64)
    flat_frames[:, fill.targets] = values
