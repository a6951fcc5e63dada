"""Ray for a search: join a cluster or start a private one on loopback, and the cluster the plan is checked
against."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import torch

from nas.plan import Cluster
from nas.space import SearchSpace


def init_ray(address: str | None, folder: Path, num_cpus: int | None = None) -> str:
    """Join a cluster (`--address`, or the one a Ray job or RAY_ADDRESS names), else start a private Ray on
    loopback for the run folder `folder`. Returns how Ray was reached."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return "this process's Ray"
    if address or os.environ.get("RAY_ADDRESS"):
        # Bare: inside a Ray job the job's own runtime env applies, and resources are the cluster's.
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        return f"cluster {address or os.environ['RAY_ADDRESS']}"
    # Ray reads this when `ray_constants` is imported (and its agents when they start): with it off, every
    # Ray process takes the loopback address as the node's and never binds another interface's.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    # In case Ray was imported before the variable was set (`nas.search` imports it, with Tune). Private, and kept:
    # Ray has no public setting for a loopback-only node, and without it a private Ray binds the machine's other
    # interfaces.
    ray_constants.ENABLE_RAY_CLUSTER = False
    # Ray's Unix socket paths (temp dir + ~65 bytes of session name) must stay under 107 bytes, which a run folder
    # deep in a file system would overflow: its files go to a short folder named for the run folder.
    temp = Path(tempfile.gettempdir()) / f"nas-ray-{hashlib.sha1(str(folder).encode()).hexdigest()[:8]}"
    env = {"env_vars": {k: os.environ[k] for k in ("NAS_CACHE", "HF_HUB_OFFLINE") if k in os.environ}}
    # ERROR: its notice that token authentication is on concerns clusters, not this private, loopback-only one.
    ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, dashboard_host="127.0.0.1",
             _node_ip_address="127.0.0.1", _temp_dir=str(temp), runtime_env=env, log_to_driver=False,
             logging_level=logging.ERROR)
    return "a private Ray on 127.0.0.1"


def this_machine(space: SearchSpace) -> Cluster:
    """This machine, as the plan check sees the private Ray it would start here: its GPUs (a GPU's memory from
    `resources.gpu_memory_gb`) and its memory."""
    return Cluster(nodes=1, gpus_per_node=torch.cuda.device_count(), gpu_memory_gb=space.resources.gpu_memory_gb)


def ray_cluster(space: SearchSpace) -> Cluster:
    """The cluster Ray reaches, as the plan check sees it: its nodes and the most GPUs on one; a GPU's memory from
    `resources.gpu_memory_gb`, a node's from this machine."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    gpus = max((int(n["Resources"].get("GPU", 0)) for n in nodes), default=0)
    return Cluster(nodes=max(1, len(nodes)), gpus_per_node=gpus, gpu_memory_gb=space.resources.gpu_memory_gb)
