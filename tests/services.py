"""Real services for the slow tests, all on 127.0.0.1 and stopped by the test that started them:
a PostgreSQL server (Debian's `postgresql` binaries) and a two-node Ray cluster made with `ray start`."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def have_postgres() -> bool:
    return bool(glob.glob("/usr/lib/postgresql/*/bin/initdb") or shutil.which("initdb"))


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name)]
    if not found[-1]:
        raise RuntimeError(f"PostgreSQL's {name} is missing: apt-get install postgresql")
    return found[-1]


@contextlib.contextmanager
def postgres() -> Iterator[str]:
    """A fresh PostgreSQL cluster on 127.0.0.1 with a database `nas`; yields its SQLAlchemy URL."""
    import psycopg

    folder = Path(tempfile.mkdtemp(prefix="nas-pg-"))
    # PostgreSQL refuses to run as root: run its programs as the `postgres` user then.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(folder, "postgres")
    data, port = folder / "data", free_port()
    try:
        subprocess.run([*as_user, _pg_bin("initdb"), "-D", str(data), "-U", "nas", "--auth=trust", "-E", "UTF8"],
                       check=True, capture_output=True)
        subprocess.run([*as_user, _pg_bin("pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w", "-o",
                        f"-h 127.0.0.1 -p {port} -k {folder}", "start"], check=True, capture_output=True)
        with psycopg.connect(f"host=127.0.0.1 port={port} user=nas dbname=postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE nas")
        yield f"postgresql+psycopg://nas@127.0.0.1:{port}/nas"
    finally:
        subprocess.run([*as_user, _pg_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


# Ray 2.60's `ray start` refuses a worker node while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and without it rewrites
# 127.0.0.1 to the machine's outward address and binds the node's raylet and agents on every interface. The second
# node therefore runs the same `ray start` entry point with those two checks relaxed, so every process of both
# nodes listens on 127.0.0.1 only.
_WORKER_NODE = """
import sys
from ray._private import ray_constants, services
ray_constants.ENABLE_RAY_CLUSTER = True
services.resolve_ip_for_localhost = lambda host: host
from ray.scripts.scripts import main
sys.exit(main())
"""


# A job that holds the head's one CPU with an actor until its folder holds `release` (`RayCluster.hold_head`).
_HOLD = """
import pathlib, sys, time
import ray
ray.init()


@ray.remote(num_cpus=1, resources={"head": 1})
class Hold:
    def ready(self):
        return True


actor = Hold.remote()
ray.get(actor.ready.remote())
flag = pathlib.Path(sys.argv[1])
(flag / "held").touch()
while not (flag / "release").exists():
    time.sleep(0.2)
"""


class RayCluster:
    """A head (`{"head": 1}`) and a second node (`{"node_b": 1}`), one CPU each, token authentication on.

    Each `ray start` runs in its own process group, so `stop()` ends exactly the processes this cluster started.
    """

    def __init__(self, env: dict[str, str] | None = None):
        # Short (Ray's socket paths are limited) and one per node: on a real cluster each node has its own disk, and
        # two nodes sharing one session folder delete each other's runtime-env packages (a job's working dir).
        self.temp = Path(tempfile.mkdtemp(prefix="nasray-", dir="/tmp"))
        self.temp_b = Path(tempfile.mkdtemp(prefix="nasrayb-", dir="/tmp"))
        self.scratch_b = self.temp_b / "tmp"  # node_b's TMPDIR: what its workers write locally is seen here
        self.scratch_b.mkdir()
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.env = {**os.environ, **(env or {}), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
                    "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                    "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
        self.env.pop("RAY_ADDRESS", None)
        self.groups: list[int] = []

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        proc = subprocess.Popen(argv, env={**self.env, **(env or {})}, start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        self.groups.append(proc.pid)
        out, _ = proc.communicate(timeout=180)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(argv[:3])} failed:\n{out[-3000:]}")

    def start(self) -> "RayCluster":
        common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]
        self._start([str(VENV_BIN / "ray"), "start", "--head", "--port", str(self.gcs_port), "--temp-dir",
                     str(self.temp), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
                     "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port",
                     str(free_port()), "--resources", '{"head": 1}', *common])
        self._start([sys.executable, "-c", _WORKER_NODE, "start", "--address", f"127.0.0.1:{self.gcs_port}",
                     "--temp-dir", str(self.temp_b),
                     "--dashboard-agent-listen-port", str(free_port()), "--resources", '{"node_b": 1}', *common],
                    env={"TMPDIR": str(self.scratch_b)})
        self._wait_for_job_agent()
        return self

    def _wait_for_job_agent(self, timeout: float = 180) -> None:
        """`ray start` returns before the head's job agent registers; a loaded machine answers a submission in
        that window with "No available agent to submit job". Submit a no-op job until one is accepted."""
        deadline = time.time() + timeout
        while True:
            probe = subprocess.run([str(VENV_BIN / "ray"), "job", "submit", "--address", self.dashboard, "--no-wait",
                                    "--", "true"], env=self.env, capture_output=True, text=True)
            if probe.returncode == 0:
                return
            if time.time() > deadline:
                raise RuntimeError(f"the cluster accepts no job:\n{probe.stdout[-2000:]}{probe.stderr[-2000:]}")
            time.sleep(2)

    def submit(self, *entrypoint: str, working_dir: Path, runtime_env: dict | None = None) -> subprocess.Popen:
        """`ray job submit` (a client with the cluster's token), following the job's logs to the end."""
        argv = [str(VENV_BIN / "ray"), "job", "submit", "--address", self.dashboard, "--working-dir", str(working_dir)]
        argv += ["--runtime-env-json", json.dumps(runtime_env)] if runtime_env else []
        return subprocess.Popen([*argv, "--", *entrypoint], env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    @contextlib.contextmanager
    def hold_head(self, timeout: float = 180) -> Iterator[Callable[[], None]]:
        """Hold the head's CPU (an actor of a job of its own), so that the trials of a job submitted meanwhile run
        on node_b, whatever the nodes' warm workers; yields `release`, which frees the head (at the latest on exit).
        Placement is then certain rather than a race between the nodes' worker start-ups."""
        flag = Path(tempfile.mkdtemp(prefix="hold-", dir=self.temp))
        (flag / "hold.py").write_text(_HOLD)
        subprocess.run([str(VENV_BIN / "ray"), "job", "submit", "--address", self.dashboard, "--no-wait", "--",
                        sys.executable, str(flag / "hold.py"), str(flag)], env=self.env, check=True,
                       capture_output=True)
        deadline = time.time() + timeout
        while not (flag / "held").exists():
            if time.time() > deadline:
                raise RuntimeError("the head's CPU was not held within the timeout")
            time.sleep(0.2)
        release = (flag / "release").touch
        try:
            yield release
        finally:
            release()

    def processes(self):
        import psutil

        return [p for p in psutil.process_iter(["pid"]) if _group(p.pid) in self.groups]

    def node_b_raylet(self):
        import psutil

        for p in self.processes():
            with contextlib.suppress(psutil.Error):
                if p.name() == "raylet" and any(a.startswith("--static_resource_list=node_b,") for a in p.cmdline()):
                    return p
        raise RuntimeError("node_b's raylet is not running")

    @staticmethod
    def node_id(raylet) -> str:
        """The Ray node id of a raylet process (from its command line)."""
        return next(a.split("=", 1)[1] for a in raylet.cmdline() if a.startswith("--node_id="))

    def listening_addresses(self) -> set[str]:
        import psutil

        pids = {p.pid for p in self.processes()}
        return {c.laddr.ip for c in psutil.net_connections("inet") if c.status == "LISTEN" and c.pid in pids}

    def stop(self) -> None:
        for group in self.groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        deadline = time.time() + 30
        while self.processes() and time.time() < deadline:
            time.sleep(0.5)
        shutil.rmtree(self.temp, ignore_errors=True)
        shutil.rmtree(self.temp_b, ignore_errors=True)


def _group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None
