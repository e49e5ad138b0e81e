"""Command line: ``driftcorr demo | correct | estimate | apply | status | report``.

Exit codes: 0 success; 2 bad input or usage (one line on stderr, no traceback); 1 unexpected failure.
"""

from __future__ import annotations

import contextlib
import functools
import re
import sys
import traceback
from pathlib import Path

import click

from . import __version__
from .config import ClusterConfig, load_config_file, load_run_settings, make_config
from .errors import ConfigError, DriftcorrError, RunFailedError
from .store import restore_storage_options, set_storage_options

EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1


def _reporting_errors(command):
    """Turn expected errors into one line and exit code 2, unexpected ones into a short message and exit 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        verbose = click.get_current_context().find_root().params.get("verbose", False)
        try:
            return command(*args, **kwargs)
        except DriftcorrError as error:
            if verbose:
                traceback.print_exc()
            click.echo(f"driftcorr: error: {error}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except RunFailedError as error:
            if verbose:
                traceback.print_exc()
            click.echo(f"driftcorr: failed: {error}", err=True)
            sys.exit(EXIT_FAILURE)
        except (click.exceptions.Exit, click.ClickException, KeyboardInterrupt):
            raise
        except Exception as error:  # the last resort: never show a bare traceback to a user
            if verbose:
                traceback.print_exc()
            click.echo(f"driftcorr: unexpected error: {type(error).__name__}: {error} "
                       "(rerun with --verbose for the traceback)", err=True)
            sys.exit(EXIT_FAILURE)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="driftcorr")
@click.option("--verbose", is_flag=True, help="Show tracebacks of errors.")
def main(verbose: bool) -> None:
    """Subpixel drift correction of long image time series stored in Zarr."""


def _correction_options(command):
    options = [
        click.option("--mask", type=str, default=None,
                     help="Valid-pixel mask: .npy, .tif, .png (nonzero = valid) or a Zarr array."),
        click.option("--array", type=str, default=None, help="Array name inside an input group."),
        click.option("--reference", type=str, default=None,
                     help="Reference: iterative (default), iterative:A:B, pairs, pairs:A:B, a frame index, mean:A:B "
                          "or median:A:B."),
        click.option("--detect-defects/--no-detect-defects", default=None,
                     help="Find hot, dead, stuck (and, without --mask, unlit) pixels from the stack (default on)."),
        click.option("--bandpass", type=(float, float), default=None, metavar="LOW HIGH",
                     help="Mask-aware difference-of-Gaussians band-pass, scales in px (default: none)."),
        click.option("--tame-outliers/--no-tame-outliers", default=None,
                     help="Leave out cosmic-ray streaks and other frame-local outliers (default on)."),
        click.option("--upsample", "upsample_factor", type=float, default=None,
                     help="Subpixel precision 1/K px (default 50)."),
        click.option("--max-shift", type=int, default=None, help="Largest shift searched, px (default: frame/8)."),
        click.option("--method", type=click.Choice(["ncc", "phase"]), default=None,
                     help="Masked NCC (default) or phase correlation."),
        click.option("--block-frames", type=int, default=None, help="Frames per task (default: from frame size)."),
        click.option("--start-time", type=str, default=None,
                     help="Time of frame 0, ISO 8601 (with --frame-interval: the output's time coordinate)."),
        click.option("--frame-interval", type=float, default=None, help="Seconds between frames (with --start-time)."),
        click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
                     help="TOML or JSON file of options (command-line options win)."),
        click.option("--scheduler", type=str, default=None, metavar="ADDRESS_OR_FILE",
                     help="Run on a Dask cluster: tcp://HOST:PORT of its scheduler, or its scheduler file "
                          "(default: local threads; see also [cluster] in --config)."),
        click.option("--progress/--no-progress", default=True,
                     help="Show progress on stderr: a bar on a terminal, a line every 30 s otherwise (default on)."),
        click.option("--overwrite", is_flag=True,
                     help="Start over on an existing driftcorr output (without it, an interrupted output is resumed "
                          "and one whose input has grown is extended)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@contextlib.contextmanager
def _dask_cluster(cluster: ClusterConfig, storage_options: dict | None = None):
    """A distributed client for the run: to a running scheduler, to a local cluster, or none (local threads).

    The workers get the ``storage_options`` too (a worker plugin, so workers that join later get them as well).
    """
    if cluster.scheduler is None and cluster.local_workers is None:
        yield None
        return
    with _dask_client(cluster) as client:
        if not storage_options:
            yield client
            return
        name = "driftcorr-storage-options"
        client.register_plugin(_storage_options_plugin(storage_options), name=name)
        try:
            yield client
        finally:  # a shared scheduler must not keep this run's options (credentials) for the next one
            client.unregister_worker_plugin(name)


def _storage_options_plugin(storage_options: dict):
    from distributed.diagnostics.plugin import WorkerPlugin

    class StorageOptions(WorkerPlugin):
        def __init__(self, options):
            self.options = options

        def setup(self, worker):
            self.saved = set_storage_options(self.options)

        def teardown(self, worker):
            restore_storage_options(getattr(self, "saved", {}))

    return StorageOptions(storage_options)


@contextlib.contextmanager
def _dask_client(cluster: ClusterConfig):
    from distributed import Client, LocalCluster

    if cluster.scheduler is not None:
        target = cluster.scheduler
        by_file = "://" not in target and Path(target).is_file()
        if not by_file and "://" not in target:
            if not re.fullmatch(r"[\w.\-]+:\d+", target):
                raise ConfigError(f"scheduler {target!r} is neither an address (tcp://HOST:PORT) nor an existing "
                                  "scheduler file")
            target = f"tcp://{target}"  # HOST:PORT
        try:
            client = Client(scheduler_file=target, timeout="20s") if by_file else Client(target, timeout="20s")
        except (OSError, ValueError, AssertionError, KeyError, TypeError) as error:
            raise ConfigError(f"cannot reach the Dask scheduler {cluster.scheduler!r} ({type(error).__name__}: "
                              f"{error}); start it or fix the address or scheduler file") from None
        with client:
            yield client
        return
    with LocalCluster(n_workers=cluster.local_workers, threads_per_worker=cluster.threads_per_worker,
                      processes=True, dashboard_address=None) as local, Client(local) as client:
        yield client


def _build_config(config_file, **cli_options):
    options = load_config_file(config_file) if config_file else {}
    options.update({key: value for key, value in cli_options.items() if value is not None})
    return make_config(**options)


def _run_correction(input, output, mask, config_file, overwrite, estimate_only, **options):
    from .pipeline import correct

    progress = options.pop("progress")
    cluster, storage_options = load_run_settings(config_file, scheduler=options.pop("scheduler"))
    cfg = _build_config(config_file, **options)
    set_storage_options(storage_options)
    with _dask_cluster(cluster, storage_options):
        result = correct(input, output, mask=mask, overwrite=overwrite, estimate_only=estimate_only, config=cfg,
                         progress=progress)
    unreadable = result.attrs.get("unreadable_frames") or []
    if unreadable:
        frames = ", ".join(f"{first}-{last}" for first, last in unreadable)
        click.echo(f"driftcorr: warning: input frames {frames} could not be read (damaged chunks); they are marked "
                   "invalid and their shift interpolated", err=True)
    n_valid = int(result["valid"].sum())
    click.echo(f"wrote {output}: {result.sizes['frame']} frames, {n_valid} valid, "
               f"{result.sizes['frame'] - n_valid} flagged")


@main.command()
@click.argument("input")
@click.argument("output")
@_correction_options
@click.option("--order", "interpolation_order", type=int, default=None, help="Spline order of the shift (3).")
@_reporting_errors
def correct(input, output, mask, config_file, overwrite, **options):
    """Estimate the drift of INPUT and write shifts and the corrected stack to OUTPUT."""
    _run_correction(input, output, mask, config_file, overwrite, False, **options)


@main.command()
@click.argument("input")
@click.argument("output")
@_correction_options
@_reporting_errors
def estimate(input, output, mask, config_file, overwrite, **options):
    """Estimate the drift of INPUT and write shifts and quality (no corrected stack) to OUTPUT."""
    _run_correction(input, output, mask, config_file, overwrite, True, **options)


@main.command()
@click.argument("input")
@click.argument("drift")
@click.argument("output")
@click.option("--array", type=str, default=None, help="Array name inside an input group.")
@click.option("--order", "interpolation_order", type=int, default=3, show_default=True,
              help="Spline order of the shift.")
@click.option("--overwrite", is_flag=True, help="Replace an existing driftcorr output.")
@_reporting_errors
def apply(input, drift, output, array, interpolation_order, overwrite):
    """Shift the frames of INPUT by the drift stored in DRIFT and write OUTPUT."""
    from .pipeline import apply_stored_drift

    apply_stored_drift(input, drift, output, array=array, interpolation_order=interpolation_order,
                       overwrite=overwrite)
    click.echo(f"wrote {output}")


@main.command()
@click.argument("output")
@click.option("--png", type=click.Path(dir_okay=False), default=None, help="Write the report as a PNG image.")
@click.option("--html", type=click.Path(dir_okay=False), default=None, help="Write it as a self-contained HTML page.")
@_reporting_errors
def report(output, png, html):
    """Plot the drift of OUTPUT over time, its uncertainty, the flagged frames and the mean image before/after."""
    from .report import write_report

    write_report(output, png=png, html=html)
    click.echo("wrote " + " and ".join(path for path in (png, html) if path))


@main.command()
@click.argument("output")
@_reporting_errors
def status(output):
    """Print how far the driftcorr output OUTPUT is: frames done, completion, configuration."""
    from .store import describe_output

    click.echo(describe_output(output))


@main.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="demo-output", show_default=True,
              help="Folder for raw.zarr and corrected.zarr.")
@click.option("--frames", "n_frames", type=click.IntRange(min=10), default=240, show_default=True)
@click.option("--size", type=click.IntRange(min=64), default=256, show_default=True, help="Frame side, px.")
@click.option("--seed", type=int, default=2026, show_default=True)
@_reporting_errors
def demo(out_dir, n_frames, size, seed):
    """Correct a realistic synthetic run and print its accuracy against the known truth."""
    from .demo import run_demo

    run_demo(out_dir, n_frames=n_frames, size=size, seed=seed, echo=click.echo)


if __name__ == "__main__":  # pragma: no cover
    main()
