"""Final shift step and uncertainty from each frame's residual against the reference (pure NumPy kernel).

After the correlation peak is found, every frame is shifted onto the reference (exactly, in Fourier space) and
the linearized model ``g(x) = a f(x) - a grad f(x) . e + b(x) + r(x)`` is fitted by least squares over the pixels
both masks hold well inside. ``e`` is a last correction of the shift, ``r`` the residual whose size gives the
uncertainty (a sandwich estimator, :func:`residual_step`).

``b(x)`` is a constant, or, when the reference has a centre of point symmetry (a diffraction pattern), any
function of the distance to that centre: piecewise constant on thin shells of :data:`SHELL_WIDTH` px. Rings
that brighten or fade between frames (pump-probe intensity changes, beam current, a changing diffuse
background) are radially symmetric and are absorbed by ``b``; a shift is not (it moves every ring's intensity
towards one side), so it is still measured, no longer pulled by the beam-block's asymmetry times the intensity
change. The correlation peak alone, which fits only one gain and offset, is biased by such changes.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import scipy.fft as sfft
from scipy import ndimage as ndi

#: Calibration factor of the uncertainty's variance (see :func:`residual_step`): the geometric mean of
#: (actual RMS error / RMS reported sigma)**2 over 44 synthetic 256x256x200 runs with the beam-block mask
#: (seeds 100-121 at 2000 and 200 counts/px, errors measured from the anchor frame), which was 1.092**2 at
#: the earlier factor 0.63. Checked on unseen seeds in benchmarks/robustness.py.
SIGMA_SCALE = 0.75
#: Pixels this close to a mask edge are left out of the residual (interpolation ringing).
RESIDUAL_MARGIN = 2
#: Masked regions of at most this many pixels are not edges for :data:`RESIDUAL_MARGIN`.
SMALL_HOLE = 4
#: Radial width (px) of the shells on which a radially symmetric intensity change is absorbed.
SHELL_WIDTH = 0.25
#: A final step longer than this (px, any axis) is not a small correction: the correlation peak is kept.
MAX_STEP = 0.5
#: Frames whose shifts round to the same multiple of this many px share their used pixels (and so the reference
#: side of the fit): the moving mask's inner pixels are eroded by half of it, so they hold for every offset within.
OFFSET_CELL = 5
#: Side of the tiles whose residual scores are summed before squaring when the residual is spatially correlated.
TILE = 16
#: Pixels per pass of a frame's fit: its arrays stay in the processor's cache (twice as fast at 512² as whole
#: frames).
FIT_CHUNK = 32768
#: Shared sets of used pixels kept per basis between calls (a few MB each at 512²; blocks in flight at a slow
#: drift share one or two): building one costs as much as fitting ~5 frames.
KEPT_SIDES = 4


@dataclass(frozen=True, eq=False)
class ResidualBasis:
    """The reference side of :func:`residual_step`.

    Attributes
    ----------
    columns : ndarray, float32, shape (1 + ndim, pixels)
        The centred reference (0 outside its mask) and its gradient along each axis, flattened, one row each.
    inner : ndarray of bool, frame shape
        Reference pixels at least :data:`RESIDUAL_MARGIN` px inside its mask.
    moving_core : ndarray of bool, frame shape
        The same for the moving frames' mask, eroded by ``OFFSET_CELL // 2`` px more (square): moved by a multiple
        ``c`` of :data:`OFFSET_CELL`, it lies inside the moving frames' inner pixels moved by any offset near ``c``.
    order : ndarray of int, shape (pixels,)
        Flat pixel indices grouped by shell (stable), so that any subset taken in this order is too.
    shells : ndarray of int, shape (pixels,), or None
        Index of each pixel's shell about the reference's centre of symmetry; None: no radial term.
    centre : ndarray, shape (ndim,), or None
        That centre, px (array axis order).
    """

    columns: np.ndarray
    inner: np.ndarray
    moving_core: np.ndarray
    order: np.ndarray
    shells: np.ndarray | None = None
    centre: np.ndarray | None = None


def residual_basis(f: np.ndarray, reference_mask: np.ndarray, moving_mask: np.ndarray,
                   centre=None) -> ResidualBasis:
    """Precompute the reference side of :func:`residual_step`.

    Parameters
    ----------
    f : ndarray
        The centred reference (0 outside its mask).
    reference_mask, moving_mask : ndarray of bool
        Valid pixels of the reference and of the moving frames.
    centre : sequence of float, optional
        Centre of point symmetry of the reference (px, array axis order): radially symmetric intensity changes
        about it are absorbed. None: only a constant offset.

    Returns
    -------
    ResidualBasis
    """
    ndim = f.ndim
    inner = inner_pixels(reference_mask)
    moving_core = ndi.binary_erosion(inner_pixels(moving_mask), np.ones((3,) * ndim, bool),
                                     iterations=OFFSET_CELL // 2, border_value=0)
    grads = np.gradient(f) if ndim > 1 else [np.gradient(f)]
    columns = np.stack([f.ravel(), *(g.ravel() for g in grads)]).astype(np.float32)
    shells = None
    if centre is not None:
        centre = np.asarray(centre, dtype=np.float64)
        grids = np.meshgrid(*[np.arange(n, dtype=np.float64) - c for n, c in zip(f.shape, centre, strict=True)],
                            indexing="ij")
        radius = np.sqrt(sum(g * g for g in grids)).ravel()
        shells = (radius / SHELL_WIDTH).astype(np.int64)
    order = np.argsort(shells, kind="stable") if shells is not None else np.arange(f.size)
    return ResidualBasis(columns=columns, inner=inner, moving_core=moving_core, shells=shells, centre=centre,
                         order=order)


def inner_pixels(mask: np.ndarray) -> np.ndarray:
    """Valid pixels at least :data:`RESIDUAL_MARGIN` px from the frame's edge and from any masked region larger
    than :data:`SMALL_HOLE` px.

    Isolated masked pixels (hot pixels, scattered defects) are not edges: eroding around each of them would
    leave almost nothing of a frame with many.
    """
    mask = np.asarray(mask, dtype=bool)
    structure = ndi.generate_binary_structure(mask.ndim, 1)
    holes, count = ndi.label(~mask, structure)
    sizes = np.bincount(holes.ravel(), minlength=count + 1)
    small = sizes <= SMALL_HOLE
    small[0] = True
    edge_mask = mask | small[holes]
    return mask & ndi.binary_erosion(edge_mask, structure, iterations=RESIDUAL_MARGIN, border_value=0)


def shifted_mask(mask: np.ndarray, offset) -> np.ndarray:
    """``mask`` moved by a whole-pixel ``offset`` (False where it comes from outside)."""
    out = np.zeros_like(mask)
    src, dst = [], []
    for size, d in zip(mask.shape, offset, strict=True):
        d = int(d)
        src.append(slice(max(-d, 0), size - max(d, 0)))
        dst.append(slice(max(d, 0), size - max(-d, 0)))
    out[tuple(dst)] = mask[tuple(src)]
    return out


def _tile_labels(frame_shape) -> np.ndarray:
    """Flat index of the square tile each pixel belongs to."""
    grids = np.meshgrid(*[np.arange(n) // TILE for n in frame_shape], indexing="ij")
    counts = [-(-n // TILE) for n in frame_shape]
    return np.ravel_multi_index(tuple(grids), counts).ravel()


def _aligned(spectra: np.ndarray, shift: np.ndarray, pad, frame_shape, workers: int) -> np.ndarray:
    """Frames (given by their padded real spectra, which are overwritten) shifted by ``shift`` exactly, cropped,
    flattened, in the spectra's real dtype."""
    ndim = len(frame_shape)
    for axis in range(ndim):
        freq = sfft.rfftfreq(pad[axis]) if axis == ndim - 1 else sfft.fftfreq(pad[axis])
        shape = [1] * ndim
        shape[axis] = -1
        phase = np.exp(-2j * np.pi * freq.reshape(shape)[None] * shift[:, axis].reshape((-1,) + (1,) * ndim))
        spectra *= phase.astype(spectra.dtype)
    # Inverse transform axis by axis, keeping only the frame's rows (the rest is padding).
    out = spectra
    for axis in range(ndim - 1):
        out = sfft.ifft(out, axis=axis - ndim, workers=workers, overwrite_x=True)
        out = out[(Ellipsis, slice(0, frame_shape[axis]), *(slice(None),) * (ndim - 1 - axis))]
    out = sfft.irfft(out, n=pad[-1], axis=-1, workers=workers)[..., :frame_shape[-1]]
    return out.reshape(len(shift), -1)


@dataclass(frozen=True, eq=False)
class _UsedPixels:
    """The reference side of the fit over one set of used pixels (shared by the frames that use the same set).

    The pixels are ordered by shell, so that per-shell sums are sums over contiguous runs.
    """

    index: np.ndarray  # flat indices of the used pixels, grouped by shell
    starts: np.ndarray  # where each (non-empty) shell's run begins in ``index``
    sizes: np.ndarray  # pixels per shell run
    xt: np.ndarray  # (1 + ndim, used): f and grad f, shell means removed, one row each
    inv_normal: np.ndarray  # inverse of x^T x
    f: np.ndarray  # f minus its plain mean, for the overall gain
    ff: float  # f . f
    tiles: np.ndarray | None  # tile of each used pixel (clustered scores)


def _used_pixels(basis: ResidualBasis, use: np.ndarray, tiles: np.ndarray | None) -> _UsedPixels | None:
    """Precompute the fit's reference side over the pixels ``use``; None when the fit is not possible there."""
    index = basis.order[use[basis.order]]
    ndim = basis.columns.shape[0] - 1
    if index.size < 3 * ndim + 3:
        return None
    if basis.shells is not None:
        labels = basis.shells[index]
        starts = np.flatnonzero(np.diff(labels, prepend=labels[0] - 1))
    else:
        starts = np.zeros(1, np.intp)
    sizes = np.diff(starts, append=index.size)
    xt = basis.columns[:, index]
    f = xt[0] - xt[0].mean(dtype=np.float64).astype(xt.dtype)
    xt -= np.repeat(_run_means(xt, starts, sizes), sizes, axis=1)
    normal = _gram(xt)
    if not np.linalg.det(normal) > 0:
        return None
    return _UsedPixels(index=index, starts=starts, sizes=sizes, xt=xt, inv_normal=np.linalg.inv(normal), f=f,
                       ff=float(f @ f), tiles=tiles[index] if tiles is not None else None)


_SHARED_SIDES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_SHARED_SIDES_LOCK = threading.Lock()


def _shared_side(basis: ResidualBasis, offset: tuple[int, ...], clustered: bool) -> _UsedPixels | None:
    """The used pixels of frames moved by ``offset`` (a multiple of :data:`OFFSET_CELL`) under the basis's shared
    moving mask, kept between calls (least recently used first out, :data:`KEPT_SIDES` per basis)."""
    key = (offset, clustered)
    with _SHARED_SIDES_LOCK:
        kept = _SHARED_SIDES.setdefault(basis, OrderedDict())
        if key in kept:
            kept.move_to_end(key)
            return kept[key]
    tiles = _tile_labels(basis.inner.shape) if clustered else None
    side = _used_pixels(basis, (shifted_mask(basis.moving_core, offset) & basis.inner).ravel(), tiles)
    with _SHARED_SIDES_LOCK:
        kept[key] = side
        while len(kept) > KEPT_SIDES:
            kept.popitem(last=False)
    return side


def _fit_meat(side: _UsedPixels, g: np.ndarray, shell_means: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """``sum(r**2 x x^T)`` over the used pixels, ``r = g - shell means - beta . x`` the residual, chunk by chunk."""
    beta = beta.astype(g.dtype)
    meat = np.zeros((len(beta), len(beta)))
    chunk = min(FIT_CHUNK, g.size)
    residual = np.empty(chunk, dtype=g.dtype)
    scores = np.empty((len(beta), chunk), dtype=g.dtype)
    for start in range(0, g.size, chunk):
        stop = min(start + chunk, g.size)
        x = side.xt[:, start:stop]
        r = np.subtract(g[start:stop], shell_means[start:stop], out=residual[:stop - start])
        r -= beta @ x
        meat += _gram(np.multiply(x, r, out=scores[:, :stop - start]))
    return meat


def _gram(rows: np.ndarray) -> np.ndarray:
    """``rows @ rows.T`` for a few long rows: one dot product per pair (several times faster than BLAS's gemm)."""
    out = np.empty((len(rows), len(rows)))
    for i, j in zip(*np.triu_indices(len(rows)), strict=True):
        out[i, j] = out[j, i] = rows[i] @ rows[j]
    return out


def _run_means(values: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Mean of ``values`` over each contiguous run along the last axis."""
    return (np.add.reduceat(values, starts, axis=-1) / sizes).astype(values.dtype, copy=False)


def residual_step(basis: ResidualBasis, spectra_conj: np.ndarray, masks: np.ndarray, shift: np.ndarray,
                  ok: np.ndarray, pad, *, refine: bool = True, clustered: bool = False,
                  workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Last shift correction and 1-sigma uncertainty of registered frames, from their residual.

    Each frame is shifted onto the reference by ``shift`` and ``g = a f - a grad f . e + b + r`` is fitted
    by least squares (see the module docstring): the returned shift is ``shift + e``. The uncertainty is the
    sandwich ``inv(A) J inv(A) / a**2`` of that fit, ``A = sum(x x^T)``, ``J = sum(r**2 x x^T)`` over the
    used pixels, ``x`` the reference's gradient with ``b``'s part removed. It needs no noise model: Poisson
    noise, the reference's own noise and what changes between frames all enter through ``r``. With
    ``clustered`` (a band-passed, so spatially correlated, residual) the scores ``r x`` are summed over tiles of
    :data:`TILE` px before squaring. :data:`SIGMA_SCALE` calibrates it against synthetic runs with known truth.

    Parameters
    ----------
    basis : ResidualBasis
        From :func:`residual_basis`.
    spectra_conj : ndarray, complex, shape (n, *rfft shape of pad)
        Conjugated padded real spectra of the centred frames (overwritten).
    masks : ndarray of bool
        The moving frames' mask: frame shape (shared) or (n, *frame shape).
    shift : ndarray, shape (n, ndim)
        Shifts from the correlation peak.
    ok : ndarray of bool, shape (n,)
        Frames that were registered.
    pad : tuple of int
        Padded shape of the spectra.
    refine : bool
        Apply the correction ``e``; False keeps the shifts (integer-pixel registration) and only measures sigma.
    clustered : bool
        Sum scores over tiles (spatially correlated residual).
    workers : int
        Threads used by the inverse FFT.

    Returns
    -------
    shift, sigma : ndarray, shape (n, ndim)
        Corrected shifts (the input where no correction could be made) and uncertainties (NaN where none).
    """
    n_frames, ndim = shift.shape
    shift = np.array(shift, dtype=np.float64)
    sigma = np.full((n_frames, ndim), np.nan)
    rows = np.flatnonzero(ok & np.all(np.isfinite(shift), axis=1))
    if rows.size == 0:
        return shift, sigma
    frame_shape = basis.inner.shape
    spectra = spectra_conj if rows.size == n_frames else spectra_conj[rows]
    aligned = _aligned(np.conjugate(spectra, out=spectra), shift[rows], pad, frame_shape, workers)
    per_frame = masks.ndim > ndim
    tiles = _tile_labels(frame_shape) if clustered and per_frame else None
    sides: dict = {}  # frames whose used pixels are the same share the reference side of the fit
    for k, t in enumerate(rows):
        cell = 1 if per_frame else OFFSET_CELL
        offset = tuple(int(v) * cell for v in np.round(shift[t] / cell))
        key = (t, *offset) if per_frame else offset
        if key not in sides:
            sides[key] = (_used_pixels(basis, (shifted_mask(inner_pixels(masks[t]), offset) & basis.inner).ravel(),
                                       tiles)
                          if per_frame else _shared_side(basis, offset, clustered))
        side = sides[key]
        if side is None:
            continue
        g = np.take(aligned[k], side.index)
        gain = float(side.f @ g) / side.ff if side.ff > 0 else float("nan")  # side.f sums to 0
        if not gain > 0:
            continue
        beta = side.inv_normal @ (side.xt @ g)  # x has no shell part, so x^T y = x^T g
        shell_means = np.repeat(_run_means(g, side.starts, side.sizes), side.sizes)
        if side.tiles is None:
            meat = _fit_meat(side, g, shell_means, beta)
        else:
            residual = g - shell_means - beta.astype(g.dtype) @ side.xt
            scores = np.stack([np.bincount(side.tiles, weights=row) for row in side.xt * residual])
            meat = _gram(scores)
        cov = SIGMA_SCALE * (side.inv_normal @ meat @ side.inv_normal)[1:, 1:] / gain**2
        sigma[t] = np.sqrt(np.clip(np.diagonal(cov), 0, None))
        step = beta[1:] / gain
        if refine and np.all(np.abs(step) <= MAX_STEP):
            shift[t] += step
    return shift, sigma
