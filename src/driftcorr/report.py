"""A picture of a driftcorr output for a person: drift over time with its uncertainty, correlation and flagged
frames, and the mean image before and after correction (edge layer; matplotlib, no display needed).
"""

from __future__ import annotations

import base64
import html as html_text
import io
import json
import os

import matplotlib

matplotlib.use("Agg")  # files only: a nightly job has no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402

from . import store  # noqa: E402
from .errors import InputError  # noqa: E402

#: Frames averaged for the before/after mean images (evenly spread over the trusted frames).
MEAN_FRAMES = 100


def _open(output) -> xr.Dataset:
    location = os.fspath(output)
    state = store.read_output(location)
    if state is None:
        raise InputError(f"{location!r} is not a driftcorr output; give the OUTPUT of 'driftcorr correct' or "
                         "'driftcorr estimate'")
    if state.status != store.STATUS_COMPLETE:
        raise InputError(f"output {location!r} is {state.status}; run the correction to the end first "
                         "(the same command resumes it)")
    return store.open_output_dataset(location)


def time_axis(ds: xr.Dataset) -> tuple[np.ndarray, str]:
    """The values to plot frames against: the ``time`` coordinate when there is one, else the frame number."""
    if "time" in ds.coords and ds["time"].dims == ("frame",):
        return ds["time"].values, "time"
    return ds["frame"].values, "frame"


def _mean_images(ds: xr.Dataset) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Mean of up to :data:`MEAN_FRAMES` trusted frames of the raw input (if it can be opened) and corrected."""
    valid = np.flatnonzero(ds["valid"].values)
    if valid.size == 0:
        return None, None
    chosen = valid[np.unique(np.linspace(0, valid.size - 1, min(MEAN_FRAMES, valid.size)).round().astype(int))]
    before = after = None
    try:
        raw = store.open_stack(ds.attrs["input"])
        if raw.shape[0] >= ds.sizes["frame"]:
            before = raw.isel(frame=chosen).astype(np.float64).mean("frame").values
    except Exception:  # the input moved or is gone: show the reference instead
        before = None
    if "corrected" in ds:
        after = ds["corrected"].isel(frame=chosen).mean("frame", skipna=True).values
    return before, after


def report_figure(output) -> plt.Figure:
    """The report's figure for the driftcorr output at ``output``.

    Parameters
    ----------
    output : str or path-like
        A complete driftcorr output.

    Returns
    -------
    matplotlib.figure.Figure
        Drift per axis against time with its 1-sigma band and the flagged frames; the peak correlation; the mean
        image of the raw input (or the reference, when the input cannot be opened) and of the corrected stack.
    """
    ds = _open(output)
    x, label = time_axis(ds)
    shift, sigma = ds["shift"].values, ds["sigma"].values
    valid = ds["valid"].values
    axes_names = [str(a) for a in ds["axis"].values]
    figure, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    drift, ncc_axis, before_axis, after_axis = axes.ravel()
    for i, name in enumerate(axes_names):
        line, = drift.plot(x, shift[:, i], lw=1, label=f"shift {name}")
        drift.fill_between(x, shift[:, i] - sigma[:, i], shift[:, i] + sigma[:, i], color=line.get_color(),
                           alpha=0.3, lw=0)
        drift.plot(x[~valid], shift[~valid, i], "x", color="red", ms=6)
    drift.set(xlabel=label, ylabel="shift (px)", title="drift (band: 1 sigma; x: flagged frames, interpolated)")
    drift.legend(loc="best")
    ncc_axis.plot(x, ds["ncc"].values, lw=1)
    ncc_axis.plot(x[~valid], ds["ncc"].values[~valid], "x", color="red", ms=6, label="flagged")
    ncc_axis.set(xlabel=label, ylabel="peak NCC", title=f"correlation ({int((~valid).sum())} flagged frames)")
    ncc_axis.legend(loc="best")
    before, after = _mean_images(ds)
    if ds["reference"].ndim == 3:  # volumes: show maximum projections along z
        before = None if before is None else np.nanmax(before, axis=0)
        after = None if after is None else np.nanmax(after, axis=0)
    if before is None:
        before = ds["reference"].values
        before = before.max(axis=0) if before.ndim == 3 else before
        before_title = "reference (input not readable)"
    else:
        before_title = "mean of trusted frames, before"
    # One colour scale for both, robust to hot pixels and the NaN edges of the corrected frames.
    finite = before[np.isfinite(before)]
    limits = dict(zip(("vmin", "vmax"), np.percentile(finite, [0.5, 99.5]) if finite.size else (None, None),
                      strict=True))
    before_axis.imshow(before, cmap="magma", **limits)
    before_axis.set_title(before_title)
    if after is not None:
        after_axis.imshow(after, cmap="magma", **limits)
        after_axis.set_title("mean of trusted frames, corrected")
    else:
        after_axis.text(0.5, 0.5, "drift only (no corrected stack)", ha="center", va="center")
    for image_axis in (before_axis, after_axis):
        image_axis.set_xticks([])
        image_axis.set_yticks([])
    figure.suptitle(f"driftcorr: {ds.sizes['frame']} frames, {int(valid.sum())} trusted, RMS sigma "
                    f"{np.sqrt(np.nanmean(sigma**2)):.4f} px")
    return figure


def write_report(output, *, png=None, html=None) -> None:
    """Write the report of a driftcorr output as a PNG and/or a self-contained HTML page."""
    if png is None and html is None:
        raise InputError("nothing to write: give --png FILE and/or --html FILE")
    for path in (png, html):
        if path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise InputError(f"cannot write {os.fspath(path)!r}: its folder does not exist")
    figure = report_figure(output)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    data = buffer.getvalue()
    if png is not None:
        with open(png, "wb") as handle:
            handle.write(data)
    if html is not None:
        ds = _open(output)
        flagged = np.flatnonzero(~ds["valid"].values).tolist()
        config = ds.attrs.get("config", {})
        config = json.loads(config) if isinstance(config, str) else config
        rows = "".join(f"<tr><th>{html_text.escape(str(k))}</th><td>{html_text.escape(str(v))}</td></tr>"
                       for k, v in [("output", os.fspath(output)), ("input", ds.attrs.get("input")),
                                    ("frames", ds.sizes["frame"]), ("flagged frames", flagged),
                                    ("reference", ds["reference"].attrs.get("long_name")), *sorted(config.items())])
        page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>driftcorr report</title></head><body>"
                f"<h1>driftcorr report</h1><img alt='drift report' src='data:image/png;base64,"
                f"{base64.b64encode(data).decode()}'><table>{rows}</table></body></html>")
        with open(html, "w", encoding="utf-8") as handle:
            handle.write(page)
