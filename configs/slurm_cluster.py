"""Start a Dask cluster on SLURM with dask-jobqueue and leave a scheduler file for `driftcorr --scheduler`.

    pip install dask-jobqueue
    python configs/slurm_cluster.py /shared/scheduler.json &      # keeps the cluster up while it runs
    driftcorr correct /shared/raw.zarr /shared/out.zarr --mask block.npy --scheduler /shared/scheduler.json

Edit the queue, account, cores, memory and walltime for your site. Each SLURM job runs one worker process of one
thread per core; driftcorr's tasks are single-threaded inside.
"""

import sys
import time

from dask_jobqueue import SLURMCluster
from distributed import Client

scheduler_file = sys.argv[1] if len(sys.argv) > 1 else "scheduler.json"
cluster = SLURMCluster(queue="normal", account="my-account", cores=8, processes=8, memory="32GB",
                       walltime="04:00:00", scheduler_options={"dashboard_address": None})
cluster.scale(jobs=4)
client = Client(cluster)
client.write_scheduler_file(scheduler_file)
print(f"cluster up; scheduler file {scheduler_file}; Ctrl-C to stop", flush=True)
try:
    while True:
        time.sleep(60)
except KeyboardInterrupt:
    client.close()
    cluster.close()
