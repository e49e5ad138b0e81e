"""Subpixel masked normalized cross-correlation registration (pure NumPy/SciPy kernel).

The masked NCC of Padfield (2012) is written as six cross-correlations. Everything that depends only on the
reference (and on a static mask) is transformed once in a :class:`ReferencePlan`; per frame only the frame's own
terms are transformed. The integer peak is found in the lag window ``|d| <= max_shift``; it is then refined by
evaluating every correlation term at fractional lags with a matrix-multiply DFT of its spectrum
(Guizar-Sicairos et al. 2008) and taking Newton steps on a shrinking stencil around the peak, so the subpixel
estimate is the maximum of the exact band-limited masked NCC, not of a fitted surface.

Sign convention (scikit-image's): the returned ``shift`` registers ``moving`` onto ``reference``, in array axis
order: ``scipy.ndimage.shift(moving, shift) ≈ reference``.

References
----------
.. [1] D. Padfield, "Masked Object Registration in the Fourier Domain", IEEE Trans. Image Process. 21(5),
       2706-2718 (2012). :DOI:`10.1109/TIP.2011.2181402`
.. [2] M. Guizar-Sicairos, S. T. Thurman and J. R. Fienup, "Efficient subpixel image registration algorithms",
       Opt. Lett. 33, 156-158 (2008). :DOI:`10.1364/OL.33.000156`
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.fft as sfft
from scipy import ndimage as ndi

from .bandpass import BandPass, bandpass_frames
from .defects import FillPlan, IntensityLevels, fill_pixels, find_outliers, intensity_levels, outlier_ceiling, plan_fill
from .errors import InputError
from .residual import ResidualBasis, residual_basis, residual_step

METHODS = ("ncc", "phase")

_MAX_NEWTON = 8
_TRUST_RADIUS = 0.5
_FLAT_RELATIVE = 1e-6
#: A reference whose point reflection correlates at least this well has a centre of symmetry (a diffraction
#: pattern): intensity changes symmetric about it are absorbed by the final step (:mod:`driftcorr.residual`).
SYMMETRY_MIN_NCC = 0.8


@dataclass(frozen=True)
class RegistrationResult:
    """Shifts and quality of a batch of registrations.

    Attributes
    ----------
    shift : ndarray, shape (n, ndim), float64
        Shift that registers each moving frame onto the reference, in array axis order, px.
    sigma : ndarray, shape (n, ndim), float64
        Estimated 1-sigma uncertainty of ``shift``, px.
    ncc : ndarray, shape (n,), float64
        Peak normalized cross-correlation (phase correlation value for ``method="phase"``).
    overlap : ndarray, shape (n,), float64
        Pixels used at the peak lag as a fraction of the reference's valid pixels.
    second_peak : ndarray, shape (n,), float64
        Height of the highest other local maximum relative to the peak (near 1: ambiguous match).
    """

    shift: np.ndarray
    sigma: np.ndarray
    ncc: np.ndarray
    overlap: np.ndarray
    second_peak: np.ndarray


@dataclass(frozen=True, eq=False)
class ReferencePlan:
    """Everything about a reference that is reused for every frame registered against it.

    Build it with :func:`make_plan`; pass it to :func:`register_frames`. Arrays are read-only.
    """

    method: str
    frame_shape: tuple[int, ...]
    pad_shape: tuple[int, ...]
    max_shift: tuple[int, ...]
    min_overlap: float
    dtype: np.dtype
    reference_mask: np.ndarray
    moving_mask: np.ndarray
    fill: FillPlan
    spec_f: np.ndarray
    spec_mf: np.ndarray
    spec_f2: np.ndarray
    spec_static: np.ndarray | None
    static_maps: np.ndarray | None
    n_reference: float
    levels: IntensityLevels | None = None
    outlier_search: np.ndarray | None = None
    residual_basis: ResidualBasis | None = None
    bandpass: BandPass | None = None

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions (2 for images, 3 for volumes)."""
        return len(self.frame_shape)


def default_max_shift(frame_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Default search radius: an eighth of the frame along each axis (at least 1 px)."""
    return tuple(max(1, n // 8) for n in frame_shape)


def _as_max_shift(max_shift, frame_shape: tuple[int, ...]) -> tuple[int, ...]:
    if max_shift is None:
        return default_max_shift(frame_shape)
    values = np.broadcast_to(np.asarray(max_shift), (len(frame_shape),))
    if not np.all(np.isfinite(values)) or np.any(values < 1):
        raise InputError(f"max_shift must be at least 1 px (got {max_shift!r})")
    out = tuple(int(np.ceil(v)) for v in values)
    for d, n in zip(out, frame_shape, strict=True):
        if d > n // 2:
            shape = "×".join(map(str, frame_shape))
            raise InputError(
                f"max_shift must be at most half the frame (got {max_shift!r} for {shape} frames, at most "
                f"{min(frame_shape) // 2}): beyond that too little of two frames overlaps to register them"
            )
    return out


def _outlier_search(reference, levels, fill: FillPlan, moving_mask: np.ndarray, bright_pixels) -> np.ndarray:
    """Pixels where streak cores are looked for.

    Everywhere, the beam-block included (so a streak crossing it is grown from both sides), but the isolated
    defects, the known ``bright_pixels``, and pixels already too bright in the (unfiltered) reference: static
    bright pixels under the beam-block, such as hot pixels the user masked.
    """
    frame_shape = reference.shape
    search = ~(fill.mask & ~moving_mask)
    with np.errstate(invalid="ignore"):
        search &= ~(np.asarray(reference, dtype=np.float64) > outlier_ceiling(levels, 1.0))
    if bright_pixels is not None:
        bright = np.asarray(bright_pixels, dtype=bool)
        if bright.shape != tuple(frame_shape):
            raise InputError(f"bright_pixels must have the frame shape {tuple(frame_shape)} (got {bright.shape})")
        search &= ~bright
    return search


def _as_bandpass(value) -> BandPass | None:
    if value is None or isinstance(value, BandPass):
        return value
    try:
        low, high = value
    except (TypeError, ValueError):
        raise InputError(f"bandpass must be a pair (low, high) of scales in px (got {value!r})") from None
    return BandPass(float(low), None if high is None else float(high))


def check_mask(mask, frame_shape: tuple[int, ...], name: str = "mask") -> np.ndarray:
    if mask is None:
        return np.ones(frame_shape, dtype=bool)
    mask = np.asarray(mask)
    if mask.shape != frame_shape:
        raise InputError(f"{name} must have the frame shape {frame_shape} (got {mask.shape})")
    mask = mask.astype(bool, copy=False)
    if not mask.any():
        raise InputError(f"{name} has no valid pixel (all False); True marks the pixels to use")
    return mask


def _centred(frames: np.ndarray, mask: np.ndarray, dtype, ndim: int, fill: FillPlan | None = None) -> np.ndarray:
    """Frames as ``dtype`` with isolated defects filled, the valid-pixel mean removed and invalid pixels zeroed.

    The trailing ``ndim`` axes are spatial; ``mask`` is one mask for all frames or one per frame. The mean is
    accumulated in float64 so a frame's result does not depend on the batch it is registered in.
    """
    out = np.array(frames, dtype=dtype, copy=True)
    flat = out.reshape(*out.shape[: out.ndim - ndim], -1)
    if fill is not None:
        fill_pixels(flat.reshape(-1, flat.shape[-1]), fill)
    mask_flat = mask.reshape(*mask.shape[: mask.ndim - ndim], -1)
    if not mask_flat.all():
        flat *= mask_flat
    count = np.maximum(mask_flat.sum(axis=-1), 1)
    flat -= (flat.sum(axis=-1, dtype=np.float64) / count).astype(dtype)[..., None]
    if not mask_flat.all():
        flat *= mask_flat
    return out


def make_plan(
    reference,
    *,
    reference_mask=None,
    moving_mask=None,
    max_shift=None,
    method: str = "ncc",
    min_overlap: float = 0.3,
    dtype=np.float32,
    workers: int = 1,
    tame_outliers: bool = True,
    bright_pixels=None,
    bandpass=None,
    radial_intensity: bool = True,
) -> ReferencePlan:
    """Precompute the reference's transforms for registering many frames against it.

    Parameters
    ----------
    reference : array_like, shape (y, x) or (z, y, x)
        Reference image or volume.
    reference_mask : array_like of bool, optional
        True where the reference pixel is valid. Default: all valid.
    moving_mask : array_like of bool, optional
        Static mask shared by every moving frame (the beam-block case); default: ``reference_mask``.
        Frames with masks of their own are passed ``masks=`` in :func:`register_frames` instead.
    max_shift : int or sequence of int, optional
        Largest shift searched along each axis, px. Default: an eighth of the frame.
    method : {"ncc", "phase"}
        Masked normalized cross-correlation, or unmasked phase correlation (masked pixels are zeroed).
    min_overlap : float
        Lags whose overlap has fewer than this fraction of the reference's valid pixels are not considered.
    dtype : dtype
        Floating dtype of the per-frame transforms (float32 by default; float64 for extra precision).
    workers : int
        Threads used by each FFT.
    tame_outliers : bool
        Mask, in each moving frame, pixels far brighter than the reference's pattern can be (cosmic-ray
        streaks, saturated lines; see :func:`driftcorr.defects.find_outliers`) before correlating.
    bright_pixels : array_like of bool, optional
        Pixels known to be bright in every frame (hot pixels, also under the beam-block), left out of the
        outlier search. Isolated invalid pixels of ``moving_mask`` are always left out.
    bandpass : (low, high) or BandPass, optional
        Filter the reference and every frame with a mask-aware difference of Gaussians of these scales, px
        (:mod:`driftcorr.bandpass`); ``high`` None for a low-pass only. Default: no filtering.
    radial_intensity : bool
        When the reference has a centre of point symmetry (a diffraction pattern), let intensity changes
        symmetric about it (rings brightening or fading) not bias the shifts (:mod:`driftcorr.residual`).
        References without one are registered as if this were False.

    Returns
    -------
    ReferencePlan
    """
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS} (got {method!r})")
    reference = np.asarray(reference)
    if reference.ndim not in (2, 3):
        raise InputError(f"reference must be a 2-D image or 3-D volume (got {reference.ndim}-D)")
    if not np.issubdtype(reference.dtype, np.number) or np.iscomplexobj(reference):
        raise InputError(f"reference must be real-valued (got dtype {reference.dtype})")
    if not 0 < min_overlap <= 1:
        raise InputError(f"min_overlap must be in (0, 1] (got {min_overlap!r})")
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise InputError(f"dtype must be a floating dtype (got {dtype})")
    frame_shape = reference.shape
    ref_mask = check_mask(reference_mask, frame_shape, "reference_mask")
    mov_mask = ref_mask if moving_mask is None else check_mask(moving_mask, frame_shape, "moving_mask")
    shifts = _as_max_shift(max_shift, frame_shape)
    if method == "phase":
        pad = tuple(frame_shape)  # circular, like scikit-image: whitening would amplify a zero-padding step
    else:
        pad = tuple(sfft.next_fast_len(n + d, real=True) for n, d in zip(frame_shape, shifts, strict=True))
    fill = plan_fill(mov_mask)
    axes = tuple(range(-len(frame_shape), 0))
    if not np.all(np.isfinite(reference[ref_mask])):
        raise InputError("reference has NaN or infinite values at valid pixels; mask them or pick another reference")
    band = _as_bandpass(bandpass)
    centre = symmetry_centre(reference, ref_mask, workers=workers) if radial_intensity and method == "ncc" else None
    levels = intensity_levels(reference, ref_mask) if tame_outliers and method == "ncc" else None
    search = _outlier_search(reference, levels, fill, mov_mask, bright_pixels) if levels is not None else None
    if band is not None:
        reference = bandpass_frames(reference[None], ref_mask, band, dtype=np.float64)[0]

    f = _centred(reference, ref_mask, np.float64, reference.ndim)
    spec_f = sfft.rfftn(f, s=pad, axes=axes, workers=workers)
    spec_mf = sfft.rfftn(ref_mask.astype(np.float64), s=pad, axes=axes, workers=workers)
    spec_f2 = sfft.rfftn(f * f, s=pad, axes=axes, workers=workers)
    spec_mg = sfft.rfftn(fill.mask.astype(np.float64), s=pad, axes=axes, workers=workers)
    complex_dtype = np.result_type(dtype, np.complex64)
    if method == "ncc":
        # Overlap count, reference sum and reference sum of squares over the overlap: frame-independent.
        static = np.stack([spec_mf * spec_mg.conj(), spec_f * spec_mg.conj(), spec_f2 * spec_mg.conj()])
        maps = _irfft_window(static, pad, shifts, workers)
        spec_static = static.astype(complex_dtype)
    else:
        maps = spec_static = None
    plan = ReferencePlan(
        method=method,
        frame_shape=frame_shape,
        pad_shape=pad,
        max_shift=shifts,
        min_overlap=float(min_overlap),
        dtype=dtype,
        reference_mask=ref_mask,
        moving_mask=mov_mask,
        fill=fill,
        spec_f=spec_f.astype(complex_dtype),
        spec_mf=spec_mf.astype(complex_dtype),
        spec_f2=spec_f2.astype(complex_dtype),
        spec_static=spec_static,
        static_maps=maps,
        n_reference=float(ref_mask.sum()),
        levels=levels,
        outlier_search=search,
        residual_basis=residual_basis(f, ref_mask, fill.mask, centre) if method == "ncc" else None,
        bandpass=band,
    )
    for value in (plan.outlier_search, plan.reference_mask, plan.moving_mask, plan.spec_f, plan.spec_mf, plan.spec_f2,
                  plan.spec_static, plan.static_maps):
        if value is not None:
            value.flags.writeable = False
    return plan


def symmetry_centre(reference, mask, *, workers: int = 1) -> np.ndarray | None:
    """Centre of point symmetry of an image, found by registering it onto its own point reflection.

    Parameters
    ----------
    reference : ndarray
        The image (or volume).
    mask : ndarray of bool
        Its valid pixels.
    workers : int
        Threads used by each FFT.

    Returns
    -------
    ndarray of float, shape (ndim,), or None
        The centre (px, array axis order), or None when the reflection correlates less than
        :data:`SYMMETRY_MIN_NCC` within a quarter of the frame of the middle.
    """
    reference = np.asarray(reference)
    flip = (slice(None, None, -1),) * reference.ndim
    window = tuple(max(1, n // 4) for n in reference.shape)
    plan = make_plan(reference, reference_mask=mask, moving_mask=mask[flip], max_shift=window,
                     tame_outliers=False, radial_intensity=False, workers=workers)
    reflected = np.where(mask, reference, 0)[flip]
    result = register_frames(plan, reflected[None], upsample_factor=100, workers=workers, tame=False)
    shift = result.shift[0]
    inside = np.all(np.abs(shift) < np.asarray(window) - 1)
    if not (result.ncc[0] >= SYMMETRY_MIN_NCC and inside):
        return None
    # Symmetric about c: reflected(x) = f(N - 1 - x) = f(x + 2c - N + 1), so the shift is 2c - N + 1.
    return (shift + np.asarray(reference.shape) - 1) / 2


def _ncc_from_terms(n, sf, sff, sg, sgg, sfg, min_count):
    """Masked NCC from its correlation terms; NaN where the overlap is too small or has no contrast."""
    with np.errstate(divide="ignore", invalid="ignore"):
        safe_n = np.where(n >= min_count, n, np.nan)
        num = sfg - sf * sg / safe_n
        vf = sff - sf * sf / safe_n
        vg = sgg - sg * sg / safe_n
        # A variance that cancels to (almost) nothing means a flat overlap: the correlation is undefined there.
        usable = (vf > _FLAT_RELATIVE * np.abs(sff)) & (vg > _FLAT_RELATIVE * np.abs(sgg))
        return np.where(usable, num / np.sqrt(np.where(usable, vf * vg, 1.0)), np.nan)


def register_frames(
    plan: ReferencePlan,
    frames,
    *,
    masks=None,
    upsample_factor: float = 50,
    workers: int = 1,
    tame: bool = True,
) -> RegistrationResult:
    """Register a block of frames onto the plan's reference.

    Parameters
    ----------
    plan : ReferencePlan
        From :func:`make_plan`.
    frames : array_like, shape (n, *frame_shape)
        The moving frames (any real dtype).
    masks : array_like of bool, shape (n, *frame_shape) or frame_shape, optional
        Per-frame masks (True = valid). Default: the plan's static moving mask (fastest).
    upsample_factor : float
        Subpixel precision: the refinement zooms in until its stencil is at most ``1/upsample_factor`` px.
        1 gives integer shifts.
    workers : int
        Threads used by each FFT.
    tame : bool
        Leave out frame-local outliers when the plan was made with ``tame_outliers`` (frames given their own
        ``masks`` are used as they are).

    Returns
    -------
    RegistrationResult
    """
    frames = np.asarray(frames)
    ndim = plan.ndim
    if frames.shape[1:] != plan.frame_shape or frames.ndim != ndim + 1:
        raise InputError(f"frames must have shape (n, {', '.join(map(str, plan.frame_shape))}) (got {frames.shape})")
    if np.iscomplexobj(frames) or not np.issubdtype(frames.dtype, np.number):
        raise InputError(f"frames must be real-valued (got dtype {frames.dtype})")
    if not upsample_factor >= 1:
        raise InputError(f"upsample_factor must be at least 1 (got {upsample_factor!r})")
    n_frames = frames.shape[0]
    if n_frames == 0:
        empty = np.zeros((0, ndim))
        return RegistrationResult(empty, empty.copy(), np.zeros(0), np.zeros(0), np.zeros(0))
    axes = tuple(range(-ndim, 0))
    pad = plan.pad_shape
    per_frame_masks = masks is not None
    if tame and not per_frame_masks and plan.levels is not None:
        outliers = find_outliers(frames, plan.outlier_search, plan.levels) & plan.fill.mask
        hit = outliers.reshape(n_frames, -1).any(axis=1)
        if hit.any():
            return _register_with_outliers(plan, frames, outliers, hit, upsample_factor, workers)
    if per_frame_masks:
        masks = np.broadcast_to(np.asarray(masks, dtype=bool), frames.shape)
    mask = masks if per_frame_masks else plan.fill.mask

    finite = np.isfinite(frames).all(axis=axes) if frames.dtype.kind == "f" else np.ones(n_frames, bool)
    frames = np.where(np.isfinite(frames), frames, 0) if not finite.all() else frames
    fill = None if per_frame_masks else plan.fill
    if plan.bandpass is not None:
        # Normalized convolution fills isolated holes from their neighbours by itself; their filled values are
        # kept (a zero there would be a static dip in every frame, pulling the peak to zero lag).
        frames = bandpass_frames(frames, mask if per_frame_masks else plan.moving_mask, plan.bandpass,
                                 keep=mask, dtype=plan.dtype)
        fill = None
    g = _centred(frames, mask, plan.dtype, ndim, fill=fill)
    if plan.method == "phase":
        spec_g = _rfft_padded(g, pad, workers)
        product = plan.spec_f * spec_g.conj()
        product /= np.maximum(np.abs(product), np.finfo(plan.dtype).tiny)
        spectra = product[:, None]
        maps = _irfft_window(spectra, pad, plan.max_shift, workers)
        surface = maps[:, 0].astype(np.float64)
        static_spec = None
        n_map = np.full(surface.shape, plan.n_reference)
    else:
        spec_g, spectra, maps = _correlation_terms(plan, g, masks if per_frame_masks else None, workers)
        del g
        static_spec = None if per_frame_masks else plan.spec_static
        if not per_frame_masks:
            maps = np.concatenate([np.broadcast_to(plan.static_maps, (n_frames, *plan.static_maps.shape)), maps],
                                  axis=1)
        n_map = maps[:, 0]
        surface = _ncc_from_terms(*np.moveaxis(maps, 1, 0), plan.min_overlap * plan.n_reference)

    surface = np.where(np.isfinite(surface), surface, -np.inf)
    flat = surface.reshape(n_frames, -1)
    peak_index = np.argmax(flat, axis=1)
    peak_value = flat[np.arange(n_frames), peak_index]
    peak = np.stack(np.unravel_index(peak_index, surface.shape[1:]), axis=1)
    second = _second_peak(surface, peak_value)
    window_centre = np.asarray(plan.max_shift)
    lag = (peak - window_centre).astype(np.float64)
    ok = np.isfinite(peak_value) & finite
    overlap = np.take_along_axis(n_map.reshape(n_frames, -1), peak_index[:, None], 1)[:, 0] / plan.n_reference

    shift, value, hessian = _refine(plan, spectra, static_spec, surface, peak, lag, ok, upsample_factor)
    if plan.method == "phase":
        sigma = np.full(shift.shape, np.nan)  # no uncertainty model for phase correlation
    else:
        del spectra
        shift, sigma = residual_step(plan.residual_basis, spec_g, np.asarray(mask), shift, ok, pad,
                                     refine=upsample_factor > 1, clustered=plan.bandpass is not None,
                                     workers=workers)
    shift[~ok] = np.nan
    sigma[~ok] = np.nan
    value = np.where(ok, value, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        # No other local maximum in the window: no competitor at all, ratio 0.
        second_ratio = np.where(ok & (peak_value > 0), np.nan_to_num(second / peak_value, nan=0.0), np.nan)
    if plan.method == "ncc":
        value = np.clip(value, -1.0, 1.0)  # the interpolated surface can overshoot 1 by a hair
    return RegistrationResult(shift=shift, sigma=sigma, ncc=value, overlap=np.where(ok, overlap, np.nan),
                              second_peak=second_ratio)


def _correlation_terms(plan: ReferencePlan, g: np.ndarray, masks: np.ndarray | None, workers: int):
    """The frames' spectra and the masked NCC's correlation terms in the lag window, frame by frame.

    One frame at a time, so that its transforms stay in the processor's cache (twice as fast as whole blocks at
    512²). ``g`` holds the centred frames; ``masks`` their own masks, or None for the plan's static one (whose
    three frame-independent terms are in the plan). Returns the conjugated spectra of ``g`` (n, *spectrum), the
    spectra of the terms (n, terms, *spectrum) and their values at lags ``-D..D`` (n, terms, *window), float64.
    """
    pad = plan.pad_shape
    n_static = 0 if masks is None else 3
    spectrum = (*pad[:-1], pad[-1] // 2 + 1)
    spec_g = np.empty((len(g), *spectrum), dtype=plan.spec_f.dtype)
    spectra = np.empty((len(g), n_static + 3, *spectrum), dtype=plan.spec_f.dtype)
    maps = np.empty((len(g), n_static + 3, *(2 * d + 1 for d in plan.max_shift)))
    for i, frame in enumerate(g):
        conj_g = np.conjugate(_rfft_padded(frame, pad, workers), out=spec_g[i])  # stored conjugated in one pass
        conj_g2 = _rfft_padded(frame * frame, pad, workers)
        np.conjugate(conj_g2, out=conj_g2)
        terms = spectra[i]
        if masks is not None:
            conj_m = _rfft_padded(np.asarray(masks[i], plan.dtype), pad, workers)
            np.conjugate(conj_m, out=conj_m)
            for t, fixed in enumerate((plan.spec_mf, plan.spec_f, plan.spec_f2)):
                np.multiply(fixed, conj_m, out=terms[t])
        np.multiply(plan.spec_mf, conj_g, out=terms[n_static])
        np.multiply(plan.spec_mf, conj_g2, out=terms[n_static + 1])
        np.multiply(plan.spec_f, conj_g, out=terms[n_static + 2])
        maps[i] = _irfft_window(terms, pad, plan.max_shift, workers)
    return spec_g, spectra, maps


def _register_with_outliers(plan, frames, outliers, hit, upsample_factor, workers) -> RegistrationResult:
    """Register frames holding outliers with per-frame masks that leave them out; the others as usual."""
    tainted = np.array(frames[hit], dtype=plan.dtype)
    # Static isolated defects are filled as on the fast path; the outliers are masked in their own frame.
    fill_pixels(tainted.reshape(len(tainted), -1), plan.fill)
    masks = plan.fill.mask & ~outliers[hit]
    parts = [(hit, register_frames(plan, tainted, masks=masks, upsample_factor=upsample_factor, workers=workers))]
    if not hit.all():
        parts.append((~hit, register_frames(plan, frames[~hit], masks=None, upsample_factor=upsample_factor,
                                            workers=workers, tame=False)))
    merged = {}
    for name in RegistrationResult.__dataclass_fields__:
        sample = getattr(parts[0][1], name)
        out = np.empty((len(frames), *sample.shape[1:]), dtype=sample.dtype)
        for rows, result in parts:
            out[rows] = getattr(result, name)
        merged[name] = out
    return RegistrationResult(**merged)


def _second_peak(surface: np.ndarray, peak_value: np.ndarray) -> np.ndarray:
    """Height of the highest local maximum other than the global one, per frame."""
    ndim = surface.ndim - 1
    finite = np.where(np.isfinite(surface), surface, np.nanmin(np.where(np.isfinite(surface), surface, np.inf)))
    local_max = ndi.maximum_filter(finite, size=(1,) + (3,) * ndim, mode="nearest") == finite
    candidates = np.where(local_max & np.isfinite(surface), surface, -np.inf).reshape(surface.shape[0], -1)
    order = np.sort(candidates, axis=1)
    if order.shape[1] < 2:
        return np.full(surface.shape[0], np.nan)
    # The largest candidate is the peak itself; the next one is the best competitor.
    second = np.where(order[:, -1] >= peak_value, order[:, -2], order[:, -1])
    return np.where(np.isfinite(second), second, np.nan)


def _quadratic_step(values: np.ndarray, h: float):
    """Newton step from values on a 3**ndim stencil of spacing ``h`` (axis order = array order).

    Returns the step (n, ndim), the gradient (n, ndim), the Hessian (n, ndim, ndim) and the centre value.
    """
    n = values.shape[0]
    ndim = values.ndim - 1
    centre = (1,) * ndim
    grad = np.empty((n, ndim))
    hess = np.empty((n, ndim, ndim))
    f0 = values[(slice(None), *centre)]
    with np.errstate(invalid="ignore"):  # a stencil reaching an undefined lag (-inf): NaN, so no step
        for a in range(ndim):
            plus = list(centre)
            minus = list(centre)
            plus[a], minus[a] = 2, 0
            fp = values[(slice(None), *plus)]
            fm = values[(slice(None), *minus)]
            grad[:, a] = (fp - fm) / (2 * h)
            hess[:, a, a] = (fp - 2 * f0 + fm) / h**2
            for b in range(a + 1, ndim):
                corner = {}
                for sa in (0, 2):
                    for sb in (0, 2):
                        idx = list(centre)
                        idx[a], idx[b] = sa, sb
                        corner[sa, sb] = values[(slice(None), *idx)]
                cross = (corner[2, 2] - corner[2, 0] - corner[0, 2] + corner[0, 0]) / (4 * h**2)
                hess[:, a, b] = hess[:, b, a] = cross
    step = np.full((n, ndim), np.nan)
    good = np.all(np.isfinite(hess), axis=(1, 2)) & np.all(np.isfinite(grad), axis=1)
    if good.any():
        eig = np.linalg.eigvalsh(np.where(good[:, None, None], hess, -np.eye(ndim)))
        good &= np.all(eig < 0, axis=1)
        safe_h = np.where(good[:, None, None], hess, -np.eye(ndim))
        step = np.where(good[:, None], -np.linalg.solve(safe_h, grad[..., None])[..., 0], np.nan)
    return step, grad, hess, f0


def _refine(plan, spectra, static_spec, surface, peak, lag, ok, upsample_factor):
    """Newton iterations on the exact band-limited correlation surface, from the integer peak.

    Returns shift (n, ndim), peak value (n,) and Hessian of the surface at the peak (n, ndim, ndim) per px².
    """
    n_frames, ndim = lag.shape
    # Start: a quadratic through the integer-lag neighbourhood of the peak, when it lies inside the window.
    hood = np.full((n_frames,) + (3,) * ndim, np.nan)
    inside = np.all((peak >= 1) & (peak <= np.asarray(surface.shape[1:]) - 2), axis=1) & ok
    offsets = np.stack(np.meshgrid(*[np.arange(-1, 2)] * ndim, indexing="ij"), axis=-1)
    for i in np.flatnonzero(inside):
        hood[i] = surface[i][tuple(np.moveaxis(peak[i] + offsets, -1, 0))]
    step, _, hess, _ = _quadratic_step(hood, 1.0)
    value = np.where(ok, surface.reshape(n_frames, -1).max(axis=1), np.nan)
    usable = np.isfinite(step).all(axis=1) & (np.abs(step) <= 0.5).all(axis=1)
    centre = lag + np.where(usable[:, None], step, 0.0)
    if upsample_factor <= 1:
        return np.where(ok[:, None], np.round(lag), np.nan), value, hess

    tolerance = 1.0 / upsample_factor
    limit = np.asarray(plan.max_shift, dtype=np.float64)
    active = np.flatnonzero(ok)
    for _ in range(_MAX_NEWTON):
        if active.size == 0:
            break
        jet = _surface_jet(plan, spectra, static_spec, active, centre[active])
        v, g, h = jet
        concave = np.all(np.isfinite(h), axis=(1, 2)) & np.all(np.isfinite(g), axis=1) & np.isfinite(v)
        concave[concave] &= np.all(np.linalg.eigvalsh(h[concave]) < 0, axis=1)
        safe_h = np.where(concave[:, None, None], h, -np.eye(ndim))
        newton = -np.linalg.solve(safe_h, np.nan_to_num(g)[..., None])[..., 0]
        # Outside the concave region climb along the gradient; never jump more than the trust radius.
        climb = np.nan_to_num(g) / np.maximum(np.linalg.norm(np.nan_to_num(g), axis=1, keepdims=True), 1e-300)
        move = np.where(concave[:, None], newton, _TRUST_RADIUS * climb)
        move *= np.minimum(1.0, _TRUST_RADIUS / np.maximum(np.abs(move).max(axis=1, keepdims=True), 1e-300))
        centre[active] = np.clip(centre[active] + move, -limit, limit)
        value[active] = np.where(concave, v + 0.5 * np.einsum("ni,ni->n", np.nan_to_num(g), move), v)
        hess[active] = np.where(concave[:, None, None], h, hess[active])
        converged = concave & (np.abs(move).max(axis=1) < tolerance)
        active = active[~converged & np.isfinite(v)]
    return np.where(ok[:, None], centre, np.nan), value, hess


def _dft_matrices(pad_shape, centres: np.ndarray, dtype):
    """Per-axis matrices evaluating an inverse DFT and its first two derivatives at ``centres``.

    Row 0 evaluates the interpolant, rows 1 and 2 its first and second derivative along that axis. The last
    axis is a real FFT axis (Hermitian half spectrum).
    """
    ndim = len(pad_shape)
    mats = []
    for a, p in enumerate(pad_shape):
        if a == ndim - 1:
            freq = np.arange(p // 2 + 1, dtype=np.float64)
            weight = np.full(freq.size, 2.0)
            weight[0] = 1.0
            if p % 2 == 0:
                weight[-1] = 1.0
        else:
            freq = sfft.fftfreq(p, 1.0 / p)
            weight = np.ones(p)
        omega = 2j * np.pi * freq / p
        base = np.exp(centres[:, a, None] * omega[None, :]) * weight
        mats.append(np.stack([base, base * omega, base * omega**2], axis=1).astype(dtype))
    return mats


def _jet_from_derivatives(d: np.ndarray):
    """(value, gradient, Hessian) from an array of mixed derivatives ``d[..., a0, a1, ...]`` (orders 0-2)."""
    ndim = d.ndim - 1
    zero = (0,) * ndim
    value = d[(slice(None), *zero)]
    grad = np.empty((d.shape[0], ndim))
    hess = np.empty((d.shape[0], ndim, ndim))
    for i in range(ndim):
        order = list(zero)
        order[i] = 1
        grad[:, i] = d[(slice(None), *order)]
        for j in range(ndim):
            order = list(zero)
            order[i] += 1
            order[j] += 1
            hess[:, i, j] = d[(slice(None), *order)]
    return value, grad, hess


def _jet_mul(a, b):
    return (a[0] * b[0], a[1] * b[0][:, None] + b[1] * a[0][:, None],
            a[2] * b[0][:, None, None] + b[2] * a[0][:, None, None]
            + np.einsum("ni,nj->nij", a[1], b[1]) + np.einsum("ni,nj->nij", b[1], a[1]))


def _jet_sub(a, b):
    return a[0] - b[0], a[1] - b[1], a[2] - b[2]


def _jet_pow(a, exponent: float):
    v = a[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        f0 = v**exponent
        f1 = exponent * v ** (exponent - 1)
        f2 = exponent * (exponent - 1) * v ** (exponent - 2)
    return f0, a[1] * f1[:, None], a[2] * f1[:, None, None] + np.einsum("ni,nj->nij", a[1], a[1]) * f2[:, None, None]


def _surface_jet(plan, spectra, static_spec, active, centres):
    """Value, gradient and Hessian of the correlation surface at ``centres``, from exact DFT evaluation.

    Each correlation term and its derivatives come from matrix-multiply DFTs of its spectrum; the masked NCC's
    derivatives follow by the chain rule, so no finite difference of nearly equal numbers is ever taken.
    """
    mats = _dft_matrices(plan.pad_shape, centres, spectra.dtype)
    own = spectra if active.size == spectra.shape[0] else spectra[active]
    terms = _dft_eval(own, mats)  # (n, n_terms, 3, ..., 3): derivative orders per axis
    if static_spec is not None:
        terms = np.concatenate([_dft_eval(static_spec, mats), terms], axis=1)
    terms = terms.astype(np.float64) / float(np.prod(plan.pad_shape))
    jets = [_jet_from_derivatives(terms[:, t]) for t in range(terms.shape[1])]
    if plan.method == "phase":
        return jets[0]
    n, sf, sff, sg, sgg, sfg = jets
    small = n[0] < plan.min_overlap * plan.n_reference
    inv_n = _jet_pow(n, -1.0)
    num = _jet_sub(sfg, _jet_mul(_jet_mul(sf, sg), inv_n))
    vf = _jet_sub(sff, _jet_mul(_jet_mul(sf, sf), inv_n))
    vg = _jet_sub(sgg, _jet_mul(_jet_mul(sg, sg), inv_n))
    flat = (vf[0] <= _FLAT_RELATIVE * np.abs(sff[0])) | (vg[0] <= _FLAT_RELATIVE * np.abs(sgg[0])) | small
    value, grad, hess = _jet_mul(num, _jet_pow(_jet_mul(vf, vg), -0.5))
    value = np.where(flat, np.nan, value)
    return value, grad, hess


def _dft_eval(spec: np.ndarray, mats: list[np.ndarray]) -> np.ndarray:
    """Evaluate real inverse DFTs of spectra on per-frame 3-point grids.

    ``spec`` is (n, terms, *spectrum) or, shared by all frames, (terms, *spectrum); ``mats`` from
    :func:`_dft_matrices`. Returns (n, terms, 3, ..., 3), without the 1/size normalization.
    """
    n = mats[0].shape[0]
    ndim = len(mats)
    shared = spec.ndim == ndim + 1
    letters = "ijklm"[:ndim]
    results = []
    for t in range(spec.shape[0 if shared else 1]):
        term = spec[t] if shared else spec[:, t]
        # The first contraction touches the whole spectrum: one matrix product (no copies).
        if shared:
            out = (mats[0].reshape(n * 3, -1) @ term.reshape(term.shape[0], -1)).reshape(n, 3, *term.shape[1:])
        else:
            out = np.matmul(mats[0], term.reshape(n, term.shape[1], -1)).reshape(n, 3, *term.shape[2:])
        for a in range(1, ndim):
            src = "n" + letters[:a] + "p" + letters[a + 1:]
            dst = "n" + letters[:a] + "q" + letters[a + 1:]
            out = np.einsum(f"{src},nqp->{dst}", out, mats[a])
        results.append(out.real)
    return np.stack(results, axis=1)


def _rfft_padded(x: np.ndarray, pad: tuple[int, ...], workers: int) -> np.ndarray:
    """``rfftn(x, s=pad)`` over the trailing axes, skipping the transforms of all-zero padding rows."""
    ndim = len(pad)
    out = sfft.rfft(x, n=pad[-1], axis=-1, workers=workers)
    for a in range(ndim - 1):
        out = sfft.fft(out, n=pad[a], axis=a - ndim, workers=workers, overwrite_x=True)
    return out


def _irfft_window(spec: np.ndarray, pad: tuple[int, ...], max_shift: tuple[int, ...], workers: int) -> np.ndarray:
    """Lags ``-D..D`` of ``irfftn(spec, s=pad)`` (lag ``-D`` first), transforming only the rows that are kept."""
    ndim = len(pad)
    out = spec
    for a in range(ndim - 1):
        out = sfft.ifft(out, axis=a - ndim, workers=workers, overwrite_x=out is not spec)
        out = np.take(out, np.arange(-max_shift[a], max_shift[a] + 1) % pad[a], axis=a - ndim)
    out = sfft.irfft(out, n=pad[-1], axis=-1, workers=workers)
    return np.take(out, np.arange(-max_shift[-1], max_shift[-1] + 1) % pad[-1], axis=-1)


def register(
    reference,
    moving,
    *,
    reference_mask=None,
    moving_mask=None,
    upsample_factor: float = 50,
    max_shift=None,
    method: str = "ncc",
    min_overlap: float = 0.3,
    dtype=np.float32,
) -> RegistrationResult:
    """Register one image (or a batch of images) onto a reference with subpixel masked NCC.

    Parameters
    ----------
    reference : array_like, shape (y, x) or (z, y, x)
        Reference image or volume.
    moving : array_like, shape like ``reference`` or (n, *reference.shape)
        Image(s) to register.
    reference_mask, moving_mask : array_like of bool, optional
        True where pixels are valid. ``moving_mask`` defaults to ``reference_mask``; a moving mask of the frame
        shape applies to every moving image.
    upsample_factor : float
        Subpixel precision, see :func:`register_frames`; 1 gives integer shifts.
    max_shift : int or sequence of int, optional
        Largest shift searched along each axis (default: an eighth of the frame).
    method : {"ncc", "phase"}
        Masked NCC (default) or unmasked phase correlation.
    min_overlap : float
        Smallest overlap considered, as a fraction of the reference's valid pixels.
    dtype : dtype
        Floating dtype of the transforms.

    Returns
    -------
    RegistrationResult
        For a single ``moving`` image its fields hold one registration (``shift`` has shape (ndim,)).

    Examples
    --------
    >>> import numpy as np
    >>> from scipy import ndimage as ndi
    >>> rng = np.random.default_rng(0)
    >>> reference = ndi.gaussian_filter(rng.random((64, 64)), 2)
    >>> moving = ndi.shift(reference, (2.5, -1.25), order=3, mode="wrap")
    >>> np.round(register(reference, moving).shift, 1)
    array([-2.5,  1.2])
    """
    reference = np.asarray(reference)
    moving = np.asarray(moving)
    single = moving.ndim == reference.ndim
    if moving.shape[moving.ndim - reference.ndim:] != reference.shape or moving.ndim > reference.ndim + 1:
        raise InputError(f"moving must have the reference's shape {reference.shape} (got {moving.shape})")
    plan = make_plan(reference, reference_mask=reference_mask, moving_mask=moving_mask, max_shift=max_shift,
                     method=method, min_overlap=min_overlap, dtype=dtype)
    result = register_frames(plan, moving[None] if single else moving, upsample_factor=upsample_factor)
    if not single:
        return result
    return RegistrationResult(*(getattr(result, name)[0] for name in RegistrationResult.__dataclass_fields__))
