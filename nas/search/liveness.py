"""Who runs a trial: this driver, another live one, or a dead one. `DRIVER` names this process (computed once,
at import); a driver records its running trials' heartbeats (`_Heartbeat`), and the RUNNING trials of a dead
driver are failed (`_fail_dead_trials`). HEARTBEAT_S and GRACE_S are read from this module at call time."""

from __future__ import annotations

import datetime
import logging
import os
import socket
import threading
import warnings
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

HEARTBEAT_S = 30  # a driver records the heartbeat of each trial it runs this often
GRACE_S = 120  # a RUNNING trial whose heartbeat is older belongs to a dead driver


def _process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, /proc/<pid>/stat field 22), None if there is no such
    process: with the pid, it names a process even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_space() -> str:
    """Which processes a pid names here: this boot of the kernel and this pid namespace (containers that share a
    hostname each have their own); empty where /proc does not say (macOS: the hostname names the machine)."""
    try:
        return f"{Path('/proc/sys/kernel/random/boot_id').read_text().strip()}.{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


DRIVER = f"{socket.gethostname()}:{_pid_space()}:{os.getpid()}:{_process_start(os.getpid())}"


def _dead_driver(driver: str) -> bool:
    """Whether `driver` (a trial's "driver" attribute) is a process of this machine and pid namespace that has
    ended. Another's (or one named in an earlier form) is judged by its heartbeat alone."""
    parts = driver.rsplit(":", 3)
    if len(parts) != 4 or parts[:2] != [socket.gethostname(), _pid_space()]:
        return False
    pid, start = int(parts[2]), parts[3]
    if not Path("/proc/self/stat").exists():  # no /proc (macOS): the pid alone says it
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return False
    return _process_start(pid) != start


def _register_driver(study) -> None:
    """Name this driver in the study before it asks for any trial (one key per driver, so drivers never overwrite
    each other): a trial is made by `study.ask` before its "driver" attribute can be set, and the list says whose
    such a trial can be."""
    study.set_user_attr(f"driver {DRIVER}", datetime.datetime.now().isoformat(timespec="seconds"))


def _fail_dead_trials(study) -> None:
    """Record as failed the RUNNING trials whose driver is gone: at once when it was a process of this machine,
    else once their heartbeat is older than GRACE_S (Optuna's `fail_stale_trials`). One that names no driver (its
    driver was killed between asking for it and naming itself) is failed at once when every other driver of the
    study is a dead process of this machine, else once it is GRACE_S old. Live trials of another driver on the
    same study are left alone."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    now = datetime.datetime.now()
    others = [key.split(" ", 1)[1] for key in study.user_attrs if key.startswith("driver ")]
    others_gone = all(_dead_driver(d) for d in others if d != DRIVER)
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        driver = t.user_attrs.get("driver")
        orphan = driver is None and (others_gone or (now - t.datetime_start).total_seconds() > GRACE_S)
        if orphan or driver is not None and _dead_driver(driver):
            study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)


class _Heartbeat:
    """Records the heartbeat of this driver's running trials every HEARTBEAT_S seconds, in a thread (Optuna's own
    heartbeat runs only inside `study.optimize`, which Tune does not use)."""

    def __init__(self, storage, trial_ids: Callable[[], list[int]]):
        self.storage, self.trial_ids, self.stop = storage, trial_ids, threading.Event()
        self.thread = threading.Thread(target=self._beat, name="nas-heartbeat", daemon=True)

    def _beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            try:  # (the ids too are read from the database)
                for trial_id in self.trial_ids():
                    self.storage.record_heartbeat(trial_id)
            except Exception as e:  # a locked or dropped database: the next beat tries again
                log.warning("heartbeats not recorded: %s", e)

    def __enter__(self) -> "_Heartbeat":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
