"""Beyond one machine: a real Dask scheduler and worker processes on loopback, and an S3-compatible server.

Every process runs on 127.0.0.1; nothing leaves the machine. The results are compared with the same correction run
with the local threaded scheduler and local files.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from driftcorr.store import write_stack
from driftcorr.synthetic import make_run

BIN = Path(sys.executable).parent
N_FRAMES, BLOCK = 96, 4
COMPARED = ("shift", "raw_shift", "sigma", "ncc", "valid", "corrected")


def _cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "driftcorr.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _wait_for(condition, timeout=60.0, what="it"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout} s")
        time.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _assert_same(out, expected):
    ds, ref = xr.open_zarr(out), xr.open_zarr(expected)
    assert ds.attrs["status"] == "complete"
    for name in COMPARED:
        np.testing.assert_array_equal(ds[name].values, ref[name].values, err_msg=name)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The run written locally and corrected with the local threaded scheduler (the expected result)."""
    root = tmp_path_factory.mktemp("cluster")
    run = make_run(N_FRAMES, (96, 96), seed=12, jump_px=None)
    raw = write_stack(run.stack(), root / "raw.zarr", block_frames=BLOCK)
    np.save(root / "mask.npy", run.beam_block)
    done = _cli("correct", raw, root / "local.zarr", "--mask", root / "mask.npy", "--block-frames", BLOCK)
    assert done.returncode == 0, done.stderr
    return {"run": run, "raw": raw, "mask": root / "mask.npy", "local": root / "local.zarr", "root": root}


@pytest.fixture
def dask_cluster(tmp_path):
    """A `dask scheduler` and two single-threaded `dask worker` processes (no nanny: a killed worker stays dead)."""
    scheduler_file = tmp_path / "scheduler.json"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    scheduler = subprocess.Popen([BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", str(_free_port()),
                                  "--no-dashboard", "--scheduler-file", scheduler_file], **quiet)
    workers = []
    try:
        _wait_for(scheduler_file.exists, what="the scheduler file")
        for _ in range(2):
            workers.append(subprocess.Popen([BIN / "dask", "worker", "--scheduler-file", scheduler_file,
                                             "--nthreads", "1", "--no-nanny", "--no-dashboard",
                                             "--host", "127.0.0.1"], **quiet))
        from distributed import Client

        with Client(scheduler_file=str(scheduler_file), timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
        yield {"file": scheduler_file, "address": json.loads(scheduler_file.read_text())["address"],
               "workers": workers}
    finally:
        for process in [*workers, scheduler]:
            process.kill()
            process.wait()


def test_running_scheduler_gives_the_local_result(local_run, dask_cluster, tmp_path):
    out = tmp_path / "out.zarr"
    host_port = dask_cluster["address"].removeprefix("tcp://")  # HOST:PORT is taken as tcp://HOST:PORT
    done = _cli("correct", local_run["raw"], out, "--mask", local_run["mask"], "--block-frames", BLOCK,
                "--scheduler", host_port)
    assert done.returncode == 0, done.stderr
    _assert_same(out, local_run["local"])
    # The scheduler file works as well.
    again = _cli("correct", local_run["raw"], tmp_path / "by_file.zarr", "--mask", local_run["mask"],
                 "--block-frames", BLOCK, "--scheduler", dask_cluster["file"])
    assert again.returncode == 0, again.stderr
    _assert_same(tmp_path / "by_file.zarr", local_run["local"])


def test_killed_worker_process_still_completes(local_run, dask_cluster, tmp_path):
    out = tmp_path / "out.zarr"
    run = subprocess.Popen([sys.executable, "-m", "driftcorr.cli", "correct", local_run["raw"], str(out), "--mask",
                            str(local_run["mask"]), "--block-frames", str(BLOCK), "--scheduler",
                            dask_cluster["address"]], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    markers = out / "_progress" / "registered" / "c"
    _wait_for(lambda: markers.is_dir() and len(list(markers.iterdir())) >= N_FRAMES // BLOCK // 4, timeout=120,
              what="a quarter of the blocks")
    dask_cluster["workers"][0].send_signal(signal.SIGKILL)
    killed_at = len(list(markers.iterdir()))
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr
    assert killed_at < N_FRAMES // BLOCK, "the registration had finished before the worker was killed"
    _assert_same(out, local_run["local"])


@pytest.mark.parametrize("scheduler", ["nowhere.json", "not-json", "http://127.0.0.1:8786", "tcp://127.0.0.1"])
def test_unreachable_scheduler_is_a_clear_error(local_run, tmp_path, scheduler):
    if scheduler == "not-json":
        scheduler = tmp_path / "scheduler.json"
        scheduler.write_text("this is not json")
    done = _cli("correct", local_run["raw"], tmp_path / "out.zarr", "--scheduler", scheduler, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "scheduler" in done.stderr
    assert not (tmp_path / "out.zarr").exists()


def test_local_cluster_from_the_config_file(local_run, tmp_path):
    config = tmp_path / "cluster.toml"
    config.write_text("[correction]\nblock_frames = 4\n\n[cluster]\nlocal_workers = 2\n")
    done = _cli("correct", local_run["raw"], tmp_path / "out.zarr", "--mask", local_run["mask"], "--config", config)
    assert done.returncode == 0, done.stderr
    _assert_same(tmp_path / "out.zarr", local_run["local"])


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server on loopback, with the standard AWS environment variables pointing at it."""
    pytest.importorskip("s3fs")
    port = _free_port()
    server = subprocess.Popen([BIN / "moto_server", "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    def reachable():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            return False

    try:
        _wait_for(reachable, what="the S3 server")
        yield env
    finally:
        server.kill()
        server.wait()


def test_s3_input_and_output(local_run, s3_server, monkeypatch):
    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(key, s3_server[key])
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("runs")
    write_stack(local_run["run"].stack(), "s3://runs/raw.zarr", block_frames=BLOCK)
    done = _cli("correct", "s3://runs/raw.zarr", "s3://runs/out.zarr", "--mask", local_run["mask"],
                "--block-frames", BLOCK, env=s3_server)
    assert done.returncode == 0, done.stderr
    ds, ref = xr.open_zarr("s3://runs/out.zarr"), xr.open_zarr(local_run["local"])
    assert ds.attrs["status"] == "complete" and ds.attrs["input"] == "s3://runs/raw.zarr"
    for name in COMPARED:
        np.testing.assert_array_equal(ds[name].values, ref[name].values, err_msg=name)
    # Rerunning the same command on the object store resumes (here: nothing left to do).
    assert _cli("correct", "s3://runs/raw.zarr", "s3://runs/out.zarr", "--mask", local_run["mask"],
                "--block-frames", BLOCK, env=s3_server).returncode == 0


def test_s3_endpoint_from_storage_options_in_the_config(local_run, s3_server, monkeypatch, tmp_path):
    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(key, s3_server[key])
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("options")
    write_stack(local_run["run"].stack(), "s3://options/raw.zarr", block_frames=BLOCK)
    config = tmp_path / "s3.toml"
    config.write_text(f'[correction]\nblock_frames = {BLOCK}\n\n[storage_options.s3]\n'
                      f'endpoint_url = "{s3_server["AWS_ENDPOINT_URL"]}"\n')
    env = {key: value for key, value in s3_server.items() if key != "AWS_ENDPOINT_URL"}
    done = _cli("estimate", "s3://options/raw.zarr", "s3://options/out.zarr", "--mask", local_run["mask"],
                "--config", config, env=env)
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(xr.open_zarr("s3://options/out.zarr")["shift"].values,
                                  xr.open_zarr(local_run["local"])["shift"].values)
    # Worker processes of a local cluster get the storage options too (they read and write the blocks).
    config.write_text(config.read_text() + "\n[cluster]\nlocal_workers = 2\n")
    done = _cli("correct", "s3://options/raw.zarr", "s3://options/out2.zarr", "--mask", local_run["mask"],
                "--config", config, env=env)
    assert done.returncode == 0, done.stderr
    ds = xr.open_zarr("s3://options/out2.zarr")
    assert ds.attrs["unreadable_frames"] == []
    np.testing.assert_array_equal(ds["corrected"].values, xr.open_zarr(local_run["local"])["corrected"].values)


def test_the_plan_is_sent_once_not_per_task(local_run, tmp_path, monkeypatch):
    """The reference plan (megabytes) leaves the client once for the whole registration, whatever the blocks."""
    distributed = pytest.importorskip("distributed")
    from driftcorr import correct
    from driftcorr.registration import ReferencePlan

    pickled = []
    original = ReferencePlan.__reduce_ex__

    def counting(self, protocol):
        pickled.append(protocol)
        return original(self, protocol)

    monkeypatch.setattr(ReferencePlan, "__reduce_ex__", counting)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=50) as cluster, distributed.Client(cluster):
        correct(local_run["raw"], tmp_path / "out.zarr", mask=np.load(local_run["mask"]), block_frames=BLOCK,
                estimate_only=True)
    # 24 blocks; the plan is pickled once to hash it into its graph key and once to send it, not once per block.
    assert N_FRAMES // BLOCK == 24 and len(pickled) <= 2, len(pickled)
