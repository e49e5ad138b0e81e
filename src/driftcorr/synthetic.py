"""Realistic synthetic ultrafast-electron-diffraction (UED) runs with known truth.

A :class:`SyntheticRun` holds the parameters and the per-frame truth of a run (pattern centre, beam current,
ring intensities, bad frames, static beam-block and detector defects); its frames are rendered on demand and
deterministically, so a run of any length can be generated out of core, block by block, with identical data.
:func:`make_run` draws a run from a seed.

The truth follows the package's sign convention (scikit-image's): ``true_shifts(r)[t]`` is the shift, in
(row, col) order, that registers frame ``t`` onto frame ``r``, i.e.
``scipy.ndimage.shift(frame_t, true_shifts(r)[t]) ≈ frame_r`` (away from the static beam-block and defects).

This module is pure NumPy/SciPy and imports nothing else from the package.
"""

from dataclasses import dataclass
from functools import cached_property

import numpy as np

__all__ = ["SyntheticRun", "make_run"]

_UINT16_MAX = 65535
# Expected counts at and above which Poisson noise is drawn from a skew-corrected normal approximation
# (Cornish-Fisher expansion matching the first three cumulants); below it, exact Poisson draws.
_POISSON_EXACT_BELOW = 20.0
# Radial profile look-up table resolution (samples per pixel). Linear interpolation of the closed-form radial
# profile at 1/64 px leaves a relative error < 1e-4 of the ring amplitude for ring widths >= 1.2 px.
_LUT_PER_PX = 64
# Relative radii of the first Debye-Scherrer rings of an fcc metal (hkl = 111, 200, 220, 311, 222, 400).
_FCC_RING_RATIOS = np.sqrt(np.array([3.0, 4.0, 8.0, 11.0, 12.0, 16.0]) / 3.0)
# Number of terms of the smooth random walk of the drift (shortest wavelength ~ 1/6 of the run).
_WALK_TERMS = 12
# Components of the run-level random stream (independent children of the seed; frames use spawn key (1, t)).
_GEOMETRY, _TRAJECTORY, _INTENSITY, _BAD_FRAMES, _STREAKS, _DEFECTS = range(6)


def _component_rng(seed: int, component: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0, component)))


def _frame_rng(seed: int, t: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, int(t))))


def _readonly(a: np.ndarray, dtype: type | np.dtype) -> np.ndarray:
    out = np.array(a, dtype=dtype, copy=True)
    out.setflags(write=False)
    return out


@dataclass(frozen=True, eq=False, repr=False)
class SyntheticRun:
    """Parameters and per-frame truth of a synthetic UED run.

    Frames are rendered on demand (:meth:`frames`, :meth:`stack`) and deterministically: the pixels of frame
    ``t`` depend only on the run's parameters and ``(seed, t)``. Build one with :func:`make_run`.

    The pattern is rendered analytically at the sub-pixel centre of each frame (no image interpolation):
    a Lorentzian diffuse background, Debye-Scherrer rings with Gaussian radial profiles (each scaled by
    ``ring_gain[t, k]``), Gaussian Bragg spots on a hexagonal lattice and the undiffracted beam, all times
    ``beam_current[t]``. Pixels covered by the static beam-block receive ``block_level * beam_current[t]``
    counts instead. The detector adds ``pedestal``, Poisson shot noise and Gaussian read noise; hot pixels
    read ``hot_value`` and dead pixels 0 in every frame; output is uint16, clipped (never wrapped) to
    [0, 65535].

    Parameters
    ----------
    shape : tuple of int
        Frame shape ``(ny, nx)``.
    centres : numpy.ndarray
        ``(n_frames, 2)`` float64, true pattern centre of each frame, (row, col), in pixel coordinates (pixel
        ``(i, j)`` has its centre at ``(i, j)``).
    beam_current : numpy.ndarray
        ``(n_frames,)`` multiplicative intensity factor (slow wander around 1).
    ring_gain : numpy.ndarray
        ``(n_frames, n_rings)`` pump-probe intensity factor of each ring (slow modulation around 1).
    beam_off : numpy.ndarray
        ``(n_frames,)`` bool, dark frames: no beam, only pedestal and read noise (plus hot pixels).
    cosmic : numpy.ndarray
        ``(n_frames,)`` bool, frames with a bright cosmic-ray streak (parameters in ``streaks``).
    jump_frame : int or None
        First frame after a sudden re-steer jump of the pattern, or None.
    beam_block : numpy.ndarray
        ``(ny, nx)`` bool, True where the pixel is NOT covered by the beam-block (valid).
    hot_pixels, dead_pixels : numpy.ndarray
        ``(ny, nx)`` bool, static detector defects.
    counts : float
        Peak expected counts of the brightest ring at ``beam_current == 1`` and ``ring_gain == 1`` (above the
        diffuse background).
    pedestal : float
        Detector dark offset added to every pixel.
    seed : int
        Seed the run was drawn from; also seeds the per-frame noise.
    ring_radii, ring_widths, ring_amplitudes : numpy.ndarray
        ``(n_rings,)`` ring radius (px), Gaussian radial sigma (px) and peak counts at gain 1.
    background_amplitude : float
        Diffuse background at the pattern centre (counts); ``A / (1 + (r / background_radius)**2)``.
    background_radius : float
        Half-width of the Lorentzian diffuse background (px).
    spot_offsets : numpy.ndarray
        ``(n_spots, 2)`` Bragg spot positions relative to the pattern centre, (row, col), px.
    spot_amplitudes : numpy.ndarray
        ``(n_spots,)`` spot peak counts.
    spot_sigma : float
        Gaussian sigma of the spots (px).
    beam_amplitude, beam_sigma : float
        Peak counts and Gaussian sigma (px) of the undiffracted central beam.
    block_centre : numpy.ndarray
        ``(2,)`` centre of the beam-block disk (row, col).
    block_radius : float
        Radius of the beam-block disk (px).
    rod_angle : float
        Direction of the beam-block rod from the disk centre (radians; row = sin, col = cos).
    rod_width : float
        Width of the beam-block rod (px).
    block_level : float
        Scattered counts received by covered pixels at ``beam_current == 1``.
    read_noise : float
        Gaussian read-noise sigma (counts) on top of the Poisson shot noise.
    hot_value : int
        Value read by hot pixels.
    streaks : numpy.ndarray
        ``(n_frames, 6)`` cosmic-ray streak of each frame: midpoint row, midpoint col, angle (rad),
        length (px), transverse Gaussian sigma (px), peak counts; NaN in frames without one.
    noise : bool
        If False, frames hold the rounded expected counts (no shot or read noise).
    """

    shape: tuple[int, int]
    centres: np.ndarray
    beam_current: np.ndarray
    ring_gain: np.ndarray
    beam_off: np.ndarray
    cosmic: np.ndarray
    jump_frame: int | None
    beam_block: np.ndarray
    hot_pixels: np.ndarray
    dead_pixels: np.ndarray
    counts: float
    pedestal: float
    seed: int
    ring_radii: np.ndarray
    ring_widths: np.ndarray
    ring_amplitudes: np.ndarray
    background_amplitude: float
    background_radius: float
    spot_offsets: np.ndarray
    spot_amplitudes: np.ndarray
    spot_sigma: float
    beam_amplitude: float
    beam_sigma: float
    block_centre: np.ndarray
    block_radius: float
    rod_angle: float
    rod_width: float
    block_level: float
    read_noise: float
    hot_value: int
    streaks: np.ndarray
    noise: bool

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.shape)
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"`shape` must be two positive ints (ny, nx) (got {self.shape!r})")
        object.__setattr__(self, "shape", shape)
        for name, dtype in [
            ("centres", np.float64), ("beam_current", np.float64), ("ring_gain", np.float64),
            ("beam_off", bool), ("cosmic", bool), ("beam_block", bool), ("hot_pixels", bool),
            ("dead_pixels", bool), ("ring_radii", np.float64), ("ring_widths", np.float64),
            ("ring_amplitudes", np.float64), ("spot_offsets", np.float64), ("spot_amplitudes", np.float64),
            ("block_centre", np.float64), ("streaks", np.float64),
        ]:
            object.__setattr__(self, name, _readonly(getattr(self, name), dtype))
        n, n_rings = self.centres.shape[0], self.ring_radii.shape[0]
        expected = {
            "centres": (n, 2), "beam_current": (n,), "ring_gain": (n, n_rings), "beam_off": (n,),
            "cosmic": (n,), "beam_block": shape, "hot_pixels": shape, "dead_pixels": shape,
            "ring_widths": (n_rings,), "ring_amplitudes": (n_rings,),
            "spot_offsets": (len(self.spot_amplitudes), 2), "block_centre": (2,), "streaks": (n, 6),
        }
        for name, want in expected.items():
            got = getattr(self, name).shape
            if got != want:
                raise ValueError(f"`{name}` must have shape {want} for this run (got {got})")
        if self.jump_frame is not None and not 0 < self.jump_frame < n:
            raise ValueError(f"`jump_frame` must be None or in [1, {n}) (got {self.jump_frame})")

    def __repr__(self) -> str:
        return (
            f"SyntheticRun(n_frames={self.n_frames}, shape={self.shape}, seed={self.seed}, "
            f"counts={self.counts}, pedestal={self.pedestal}, jump_frame={self.jump_frame}, "
            f"n_beam_off={int(self.beam_off.sum())}, n_cosmic={int(self.cosmic.sum())}, noise={self.noise})"
        )

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_static", None)  # rendering cache: rebuilt on demand, not shipped to workers
        return state

    def __setstate__(self, state: dict) -> None:
        for value in state.values():
            if isinstance(value, np.ndarray):
                value.setflags(write=False)
        self.__dict__.update(state)

    # ------------------------------------------------------------------ truth
    @property
    def n_frames(self) -> int:
        """Number of frames in the run."""
        return int(self.centres.shape[0])

    @property
    def mask(self) -> np.ndarray:
        """Trustworthy pixels: not under the beam-block, not hot, not dead.

        Returns
        -------
        numpy.ndarray
            ``(ny, nx)`` bool, True = pixel valid.
        """
        return self.beam_block & ~self.hot_pixels & ~self.dead_pixels

    def true_shifts(self, reference: int = 0) -> np.ndarray:
        """True shifts registering every frame onto frame `reference`.

        Parameters
        ----------
        reference : int, optional
            Index of the reference frame (negative indices count from the end).

        Returns
        -------
        numpy.ndarray
            ``(n_frames, 2)`` float64, ``centres[reference] - centres``, (row, col): the shift such that
            ``scipy.ndimage.shift(frame_t, shift[t]) ≈ frame_reference``.
        """
        n = self.n_frames
        if not -n <= reference < n:
            raise IndexError(f"`reference` must be a frame index in [-{n}, {n}) (got {reference})")
        return self.centres[reference] - self.centres

    # -------------------------------------------------------------- rendering
    def frames(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Render frames ``[start, stop)``.

        Deterministic: a frame's pixels depend only on the run and ``(seed, frame index)``, so rendering in
        any blocking gives identical data (out-of-core generation of huge runs). Thread-safe.

        Parameters
        ----------
        start : int, optional
            First frame to render.
        stop : int or None, optional
            One past the last frame to render; None means ``n_frames``.

        Returns
        -------
        numpy.ndarray
            ``(stop - start, ny, nx)`` uint16.
        """
        n = self.n_frames
        stop = n if stop is None else stop
        if not 0 <= start <= stop <= n:
            raise IndexError(
                f"frames [start, stop) must satisfy 0 <= start <= stop <= {n} (got [{start}, {stop}))"
            )
        out = np.empty((stop - start, *self.shape), dtype=np.uint16)
        work = {name: np.empty(self.shape, dtype=np.float32) for name in ("img", "r", "a", "b")}
        work["idx"] = np.empty(self.shape, dtype=np.intp)
        for i, t in enumerate(range(start, stop)):
            self._render(t, out[i], work)
        return out

    def stack(self) -> np.ndarray:
        """Render all frames.

        Returns
        -------
        numpy.ndarray
            ``(n_frames, ny, nx)`` uint16.
        """
        return self.frames(0, self.n_frames)

    @cached_property
    def _static(self) -> dict:
        """Frame-independent rendering helpers (computed once per run object)."""
        ny, nx = self.shape
        # Any pixel lies within hypot(ny, nx) of any centre inside the frame; centres are kept inside it.
        rmax = float(np.hypot(ny, nx)) + 2.0
        rho = np.arange(int(np.ceil(rmax * _LUT_PER_PX)) + 2) / _LUT_PER_PX
        background = self.background_amplitude / (1.0 + (rho / self.background_radius) ** 2)
        rings = self.ring_amplitudes[:, None] * np.exp(
            -0.5 * ((rho[None, :] - self.ring_radii[:, None]) / self.ring_widths[:, None]) ** 2
        )
        return {
            "rows": np.arange(ny, dtype=np.float64),
            "cols": np.arange(nx, dtype=np.float64),
            "background": background,
            "rings": rings,
            "covered": np.flatnonzero(~self.beam_block),
            "hot": np.flatnonzero(self.hot_pixels),
            "dead": np.flatnonzero(self.dead_pixels),
        }

    def _expected(self, t: int, work: dict) -> np.ndarray:
        """Expected signal counts of frame `t` above the pedestal, float32, in ``work["img"]``."""
        st = self._static
        img = work["img"]
        if self.beam_off[t]:
            img.fill(0.0)
        else:
            cy, cx = self.centres[t]
            r, a, b, idx = work["r"], work["a"], work["b"], work["idx"]
            dy2 = ((st["rows"] - cy) ** 2).astype(np.float32)
            dx2 = ((st["cols"] - cx) ** 2).astype(np.float32)
            np.add(dy2[:, None], dx2[None, :], out=r)
            np.sqrt(r, out=r)
            # Radial part (background + rings): its closed form tabulated finely in r, linearly interpolated.
            profile = st["background"] + self.ring_gain[t] @ st["rings"]
            slope = np.zeros_like(profile)
            slope[:-1] = np.diff(profile)
            r *= np.float32(_LUT_PER_PX)
            np.floor(r, out=a)
            np.copyto(idx, a, casting="unsafe")
            r -= a  # fractional position between table samples
            profile.astype(np.float32).take(idx, out=img, mode="clip")
            slope.astype(np.float32).take(idx, out=b, mode="clip")
            b *= r
            img += b
            centre = np.array([cy, cx])
            _add_gaussians(img, centre + self.spot_offsets, self.spot_amplitudes, self.spot_sigma)
            _add_gaussians(img, centre[None, :], np.array([self.beam_amplitude]), self.beam_sigma)
            img *= np.float32(self.beam_current[t])
            img.flat[st["covered"]] = self.block_level * self.beam_current[t]
        if self.cosmic[t]:
            _add_streak(img, *self.streaks[t])
        return img

    def _render(self, t: int, out: np.ndarray, work: dict) -> None:
        """Render frame `t` into the uint16 array `out` using float32 scratch arrays `work`."""
        lam = self._expected(t, work)
        if self.noise:
            rng = _frame_rng(self.seed, t)
            frame = _detector_noise(lam, self.read_noise, rng, work["r"], work["a"], work["b"])
        else:
            frame = np.rint(lam, out=lam)
        frame += np.float32(self.pedestal)
        np.rint(frame, out=frame)
        np.clip(frame, 0, _UINT16_MAX, out=frame)
        np.copyto(out, frame, casting="unsafe")
        st = self._static
        out.flat[st["hot"]] = min(self.hot_value, _UINT16_MAX)
        out.flat[st["dead"]] = 0


def _detector_noise(
    lam: np.ndarray, read_noise: float, rng: np.random.Generator, x: np.ndarray, z: np.ndarray, c: np.ndarray
) -> np.ndarray:
    """Shot (Poisson) + Gaussian read noise around expected counts `lam`, into float32 `x` (not rounded).

    Pixels with ``lam >= _POISSON_EXACT_BELOW`` use a normal draw with a Cornish-Fisher skew correction that
    matches mean, variance and third cumulant of Poisson + read noise (NumPy's exact Poisson sampler costs
    ~20 ms per 512² frame); lower pixels get exact Poisson draws plus read noise. `z` and `c` are scratch.
    """
    rng.standard_normal(dtype=np.float32, out=z)
    rn2 = np.float32(read_noise**2)
    np.add(lam, rn2, out=x)  # variance
    np.divide(lam, x, out=c)
    c *= np.float32(1.0 / 6.0)  # third cumulant / variance / 6
    np.sqrt(x, out=x)
    x *= z
    x += lam
    np.square(z, out=z)
    z -= np.float32(1.0)
    z *= c
    x += z
    low = np.flatnonzero(lam < _POISSON_EXACT_BELOW)
    if low.size:
        lam_low = lam.flat[low]
        x.flat[low] = rng.poisson(lam_low) + read_noise * rng.standard_normal(low.size, dtype=np.float32)
    return x


def _add_gaussians(img: np.ndarray, positions: np.ndarray, amplitudes: np.ndarray, sigma: float) -> None:
    """Add Gaussians (peaks `amplitudes`, at sub-pixel `positions` (m, 2)) to `img` on local patches."""
    ny, nx = img.shape
    half = int(np.ceil(5.0 * sigma))
    offs = np.arange(-half, half + 1)
    base = np.rint(positions).astype(np.intp)
    rows = base[:, 0, None] + offs  # (m, P)
    cols = base[:, 1, None] + offs
    gy = np.exp(-0.5 * ((rows - positions[:, 0, None]) / sigma) ** 2) * amplitudes[:, None]
    gx = np.exp(-0.5 * ((cols - positions[:, 1, None]) / sigma) ** 2)
    vals = gy[:, :, None] * gx[:, None, :]
    valid = ((rows >= 0) & (rows < ny))[:, :, None] & ((cols >= 0) & (cols < nx))[:, None, :]
    flat = rows[:, :, None] * nx + cols[:, None, :]
    np.add.at(img.reshape(-1), flat[valid], vals[valid].astype(img.dtype))


def _add_streak(
    img: np.ndarray, row: float, col: float, angle: float, length: float, width: float, amplitude: float
) -> None:
    """Add a straight cosmic-ray streak (segment with a Gaussian transverse profile) to `img`."""
    ny, nx = img.shape
    d = np.array([np.sin(angle), np.cos(angle)])
    a = np.array([row, col]) - 0.5 * length * d
    b = a + length * d
    pad = 5.0 * width
    r0, r1 = max(int(np.floor(min(a[0], b[0]) - pad)), 0), min(int(np.ceil(max(a[0], b[0]) + pad)) + 1, ny)
    c0, c1 = max(int(np.floor(min(a[1], b[1]) - pad)), 0), min(int(np.ceil(max(a[1], b[1]) + pad)) + 1, nx)
    if r0 >= r1 or c0 >= c1:
        return
    py = np.arange(r0, r1, dtype=np.float64)[:, None] - a[0]
    px = np.arange(c0, c1, dtype=np.float64)[None, :] - a[1]
    s = np.clip(py * d[0] + px * d[1], 0.0, length)
    dist2 = (py - s * d[0]) ** 2 + (px - s * d[1]) ** 2
    img[r0:r1, c0:c1] += amplitude * np.exp(-0.5 * dist2 / width**2)


def _wander(rng: np.random.Generator, n: int, n_terms: int = 3) -> np.ndarray:
    """Slow smooth random function of the run position, within [-1, 1] (max |.| = 1 over the run)."""
    freq = rng.uniform(0.2, 1.5, n_terms)  # cycles per run
    phase = rng.uniform(0.0, 2.0 * np.pi, n_terms)
    amp = rng.uniform(0.3, 1.0, n_terms)

    def f(u: np.ndarray) -> np.ndarray:
        return (amp * np.sin(2.0 * np.pi * freq * u[:, None] + phase)).sum(axis=1)

    values = f(np.linspace(0.0, 1.0, n) if n > 1 else np.zeros(1))
    scale = max(np.abs(f(np.linspace(0.0, 1.0, 1001))).max(), np.abs(values).max())
    return values / scale


def make_run(
    n_frames: int = 200,
    shape: tuple[int, int] = (256, 256),
    *,
    seed: int = 0,
    drift_px: float = 6.0,
    jump_px: float | None = 10.0,
    counts: float = 2000.0,
    pedestal: float = 100.0,
    n_beam_off: int = 1,
    n_cosmic: int = 1,
    hot_fraction: float = 2e-4,
    dead_fraction: float = 2e-4,
    ring_modulation: float = 0.2,
    beam_current_wander: float = 0.3,
    beam_block: bool = True,
    noise: bool = True,
) -> SyntheticRun:
    """Draw a realistic synthetic UED run with known drift.

    Every random choice is drawn from independent streams of `seed`, so the geometry, trajectory, intensities
    and bad frames of a seed do not change when options such as `noise`, `beam_block`, `jump_px` or the defect
    fractions are switched (the geometry is also independent of `n_frames`).

    Parameters
    ----------
    n_frames : int, optional
        Number of frames.
    shape : tuple of int, optional
        Frame shape ``(ny, nx)``; each side at least 32.
    seed : int, optional
        Non-negative seed of the run and of its per-frame noise.
    drift_px : float, optional
        Largest excursion (px) of the slow smooth drift from the first frame's centre.
    jump_px : float or None, optional
        Size (px) of one sudden re-steer jump, in a random direction, at a frame in the middle third of the
        run, that persists to the end. None or 0: no jump.
    counts : float, optional
        Peak expected counts of the brightest ring at beam current 1 (Poisson statistics: 200 is a low-count
        run).
    pedestal : float, optional
        Detector dark offset in [0, 65535]; values beyond the uint16 range are clipped, never wrapped.
    n_beam_off : int, optional
        Number of beam-off (dark) frames.
    n_cosmic : int, optional
        Number of frames with a bright cosmic-ray streak.
    hot_fraction, dead_fraction : float, optional
        Fractions of static hot (reading 60000) and dead (reading 0) pixels.
    ring_modulation : float, optional
        Each ring's intensity wanders slowly within ``1 ± ring_modulation``; in [0, 1).
    beam_current_wander : float, optional
        The beam current wanders slowly within ``1 ± beam_current_wander``; in [0, 1).
    beam_block : bool, optional
        Include the static beam-block (disk + rod); if False nothing is covered.
    noise : bool, optional
        Add shot and read noise; if False frames hold the rounded expected counts.

    Returns
    -------
    SyntheticRun
        The run; render frames with :meth:`SyntheticRun.frames` or :meth:`SyntheticRun.stack`, and get the
        truth from :meth:`SyntheticRun.true_shifts`.

    Raises
    ------
    ValueError
        If an argument is out of range, or the run is too short to hold the requested bad frames.
    """
    n = _check_int("n_frames", n_frames, 1)
    if len(tuple(shape)) != 2:
        raise ValueError(f"`shape` must be (ny, nx) (got {shape!r})")
    ny, nx = (_check_int("shape", s, 32) for s in shape)
    seed = _check_int("seed", seed, 0)
    n_beam_off = _check_int("n_beam_off", n_beam_off, 0)
    n_cosmic = _check_int("n_cosmic", n_cosmic, 0)
    jump_px = 0.0 if jump_px is None else float(jump_px)
    for name, value, lo, hi in [
        ("drift_px", drift_px, 0.0, np.inf), ("jump_px", jump_px, 0.0, np.inf),
        ("counts", counts, 0.0, np.inf),
        ("pedestal", pedestal, 0.0, _UINT16_MAX), ("hot_fraction", hot_fraction, 0.0, 0.5),
        ("dead_fraction", dead_fraction, 0.0, 0.5), ("ring_modulation", ring_modulation, 0.0, 0.999),
        ("beam_current_wander", beam_current_wander, 0.0, 0.999),
    ]:
        if not lo <= float(value) <= hi:
            raise ValueError(f"`{name}` must be in [{lo}, {hi}] (got {value!r})")
    counts, pedestal = float(counts), float(pedestal)
    side = float(min(ny, nx))
    frame_centre = np.array([(ny - 1) / 2.0, (nx - 1) / 2.0])

    # --- static geometry: pattern, beam-block (independent of n_frames) ---
    rng = _component_rng(seed, _GEOMETRY)
    centre0 = frame_centre + rng.uniform(-0.02, 0.02, 2) * side
    n_rings = int(rng.integers(4, 7))
    ring_radii = _FCC_RING_RATIOS[:n_rings] * rng.uniform(0.11, 0.14) * side
    ring_widths = max(1.2, 0.004 * side) * rng.uniform(1.0, 1.8, n_rings)
    rel = rng.uniform(0.3, 1.0, n_rings)
    ring_amplitudes = counts * rel / rel.max()
    lattice = rng.uniform(0.08, 0.095) * side
    theta = rng.uniform(0.0, np.pi / 3.0)
    k = int(np.ceil(0.36 * side / lattice)) + 1
    i, j = (g.ravel() for g in np.mgrid[-k : k + 1, -k : k + 1])
    a1 = lattice * np.array([np.sin(theta), np.cos(theta)])
    a2 = lattice * np.array([np.sin(theta + np.pi / 3.0), np.cos(theta + np.pi / 3.0)])
    g = i[:, None] * a1 + j[:, None] * a2
    gr = np.hypot(g[:, 0], g[:, 1])
    keep = (gr > 0.1 * side) & (gr <= 0.36 * side)
    spot_offsets, gr = g[keep], gr[keep]
    spot_amplitudes = 0.6 * counts * rng.uniform(0.1, 1.0, len(gr)) * np.exp(-gr / (0.3 * side))
    block_centre = centre0 + rng.uniform(-1.0, 1.0, 2)
    block_radius = 0.06 * side
    rod_angle = float(rng.uniform(np.deg2rad(20.0), np.deg2rad(70.0)))  # towards the bottom-right
    rod_width = 0.03 * side

    yy = np.arange(ny, dtype=np.float64)[:, None] - block_centre[0]
    xx = np.arange(nx, dtype=np.float64)[None, :] - block_centre[1]
    along = yy * np.sin(rod_angle) + xx * np.cos(rod_angle)
    across = -yy * np.cos(rod_angle) + xx * np.sin(rod_angle)
    covered = (yy**2 + xx**2 <= block_radius**2) | ((along >= 0.0) & (np.abs(across) <= rod_width / 2.0))
    block = ~covered if beam_block else np.ones((ny, nx), dtype=bool)

    # --- trajectory: slow smooth drift + optional persistent jump ---
    rng = _component_rng(seed, _TRAJECTORY)
    u = np.linspace(0.0, 1.0, n)[:, None]
    # Smooth random walk: the first terms of the Karhunen-Loeve expansion of a Wiener process on [0, 1]
    # (cost O(n), same path shape for any n).
    kl = (np.arange(_WALK_TERMS) + 0.5) * np.pi
    walk = (np.sin(u * kl) / kl) @ rng.standard_normal((_WALK_TERMS, 2))
    freq = rng.uniform(0.3, 1.0, 2)
    phase = rng.uniform(0.0, 2.0 * np.pi, 2)
    sinus = np.sin(2.0 * np.pi * freq * u + phase)
    drift = 0.6 * _unit_excursion(walk) + 0.4 * _unit_excursion(sinus)
    drift = drift_px * _unit_excursion(drift)
    lo_j = max(1, n // 3)
    candidate_jump = int(rng.integers(lo_j, max(lo_j + 1, (2 * n) // 3))) if n >= 2 else None
    jump_angle = rng.uniform(0.0, 2.0 * np.pi)
    jump_frame = candidate_jump if jump_px > 0.0 else None
    centres = centre0 + drift
    if jump_frame is not None:
        centres[jump_frame:] += jump_px * np.array([np.sin(jump_angle), np.cos(jump_angle)])
    margin = 0.25 * np.array([ny, nx], dtype=np.float64)
    centres = np.clip(centres, frame_centre - margin, frame_centre + margin)

    # --- intensities ---
    rng = _component_rng(seed, _INTENSITY)
    beam_current = 1.0 + beam_current_wander * _wander(rng, n)
    ring_gain = 1.0 + ring_modulation * np.stack([_wander(rng, n) for _ in range(n_rings)], axis=1)

    # --- bad frames: never frame 0 nor the (candidate) jump frame; beam-off and cosmic disjoint ---
    rng = _component_rng(seed, _BAD_FRAMES)
    candidates = np.arange(1, n, dtype=np.intp)
    candidates = candidates[candidates != candidate_jump]
    if n_beam_off + n_cosmic > len(candidates):
        raise ValueError(
            f"a run of {n} frames has room for {len(candidates)} bad frames (not frame 0 nor the jump "
            f"frame); got n_beam_off={n_beam_off} + n_cosmic={n_cosmic}: use more frames or fewer bad frames"
        )
    order = rng.permutation(candidates)
    beam_off = np.zeros(n, dtype=bool)
    beam_off[order[:n_beam_off]] = True
    cosmic = np.zeros(n, dtype=bool)
    cosmic[order[n_beam_off : n_beam_off + n_cosmic]] = True

    rng = _component_rng(seed, _STREAKS)
    streaks = np.column_stack([
        rng.uniform(0.2, 0.8, n) * ny,
        rng.uniform(0.2, 0.8, n) * nx,
        rng.uniform(0.0, np.pi, n),
        rng.uniform(0.25, 0.4, n) * side,
        rng.uniform(0.8, 1.5, n),
        rng.uniform(15000.0, 40000.0, n),
    ])
    streaks[~cosmic] = np.nan

    # --- static detector defects ---
    rng = _component_rng(seed, _DEFECTS)
    n_hot = int(round(hot_fraction * ny * nx))
    n_dead = int(round(dead_fraction * ny * nx))
    picks = rng.choice(ny * nx, size=n_hot + n_dead, replace=False)
    hot = np.zeros(ny * nx, dtype=bool)
    hot[picks[:n_hot]] = True
    dead = np.zeros(ny * nx, dtype=bool)
    dead[picks[n_hot:]] = True

    return SyntheticRun(
        shape=(ny, nx),
        centres=centres,
        beam_current=beam_current,
        ring_gain=ring_gain,
        beam_off=beam_off,
        cosmic=cosmic,
        jump_frame=jump_frame,
        beam_block=block,
        hot_pixels=hot.reshape(ny, nx),
        dead_pixels=dead.reshape(ny, nx),
        counts=counts,
        pedestal=pedestal,
        seed=seed,
        ring_radii=ring_radii,
        ring_widths=ring_widths,
        ring_amplitudes=ring_amplitudes,
        background_amplitude=0.5 * counts,
        background_radius=0.08 * side,
        spot_offsets=spot_offsets,
        spot_amplitudes=spot_amplitudes,
        spot_sigma=max(1.3, 0.005 * side),
        beam_amplitude=2.0 * counts,
        beam_sigma=max(1.5, 0.01 * side),
        block_centre=block_centre,
        block_radius=block_radius,
        rod_angle=rod_angle,
        rod_width=rod_width,
        block_level=3.0,
        read_noise=2.0,
        hot_value=60000,
        streaks=streaks,
        noise=bool(noise),
    )


def _unit_excursion(d: np.ndarray) -> np.ndarray:
    """Shift a (n, 2) path to start at 0 and scale its largest distance from the start to 1 (if nonzero)."""
    d = d - d[0]
    peak = np.hypot(d[:, 0], d[:, 1]).max()
    return d / peak if peak > 0 else d


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum} (got {value!r})")
    return int(value)
