"""A throw-away single-node SLURM for the tests: munged, slurmctld and slurmd started as root from a config
written into a temporary folder, and ended by their pids.

Everything the daemons write (state, spool, logs, pid files, the munge key and socket) lives under that folder.
One node with this machine's CPUs and memory, one partition (``debug``), accounting off: submitit then warns
that ``sacct`` is unavailable and decides completion from the result file its job writes (see
configs/hydra/launcher/slurm.yaml). Debian packages: ``apt-get install slurm-wlm munge`` (Slurm 22.05).
Config keys: https://slurm.schedmd.com/archive/slurm-22.05.8/slurm.conf.html
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo")
PARTITION = "debug"


class ClusterUnavailable(RuntimeError):
    """The cluster cannot run here; the message says why in one line (the tests skip with it)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 1024


def _find(name: str) -> str | None:
    # the daemons live in /usr/sbin, which a non-login PATH may lack
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def unavailable_reason() -> str | None:
    """Why this machine cannot host the test cluster, or None when it can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "the SLURM tests start slurmctld/slurmd/munged and need root"
    missing = [name for name in (*DAEMONS, *CLIENTS) if _find(name) is None]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge"
    return None


class SlurmCluster:
    """Start with :meth:`start`, end with :meth:`stop`; :attr:`env` is the environment for client commands
    (``SLURM_CONF`` points at this cluster's config, so a real cluster on the machine is never touched)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.node = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count() or 1
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge/munge.socket"
        self.processes: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.env["PATH"] = f"{self.env.get('PATH', '')}:/usr/sbin:/sbin"

    # --- configuration ---------------------------------------------------------------------------------------
    def _write_config(self) -> None:
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        key = self.root / "munge/munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        r = self.root
        lines = [
            "ClusterName=restoretest",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd.log",
            # no cgroups in a container: track job processes through /proc, bind no tasks
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SwitchType=switch/none",
            "MpiDefault=none",
            # CPUs are the consumable resource, so two one-CPU jobs run side by side on a 2-CPU machine
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            # accounting off (no slurmdbd); the completion record goes to a text file
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={r}/log/jobcomp.txt",
            "ReturnToService=2",
            # fast tests: schedule, kill and forget quickly (defaults are minutes)
            "KillWait=2",
            "MinJobAge=300",
            "SchedulerParameters=sched_interval=1,bf_interval=1",
            "SlurmdParameters=config_overrides",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={_memory_mb()} State=UNKNOWN",
            f"PartitionName={PARTITION} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    # --- life cycle ------------------------------------------------------------------------------------------
    def _spawn(self, name: str, *args: str) -> None:
        log = (self.root / f"log/{name}.out").open("w")
        self.processes[name] = subprocess.Popen(
            [_find(name), *args], stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )

    def _check_alive(self, name: str) -> None:
        proc = self.processes[name]
        if proc.poll() is not None:
            tail = (self.root / f"log/{name}.out").read_text().strip().splitlines()[-3:]
            raise ClusterUnavailable(f"{name} exited with {proc.returncode}: {' | '.join(tail)}")

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the three daemons in the foreground (so their pids are ours) and wait for the node."""
        reason = unavailable_reason()
        if reason:
            raise ClusterUnavailable(reason)
        self._write_config()
        m = self.root / "munge"
        # -F: foreground; --force: root-owned key and socket folder in /tmp are fine for a test
        self._spawn(
            "munged",
            "-F",
            "--force",
            f"--socket={self.munge_socket}",
            f"--key-file={m}/munge.key",
            f"--pid-file={m}/munged.pid",
            f"--log-file={m}/munged.log",
            f"--seed-file={m}/munged.seed",
        )
        self._wait(lambda: self.munge_socket.exists(), "munged", timeout_s)
        # -D: foreground; -i: ignore state left by an earlier cluster (there is none: a fresh folder)
        self._spawn("slurmctld", "-D", "-i", "-f", str(self.conf))
        self._wait(lambda: self._run("scontrol", "ping").returncode == 0, "slurmctld", timeout_s)
        self._spawn("slurmd", "-D", "-f", str(self.conf), "-N", self.node)
        self._wait(lambda: self.node_state() == "idle", "slurmd", timeout_s)

    def _wait(self, ready, name: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for started in self.processes:
                self._check_alive(started)
            if ready():
                return
            time.sleep(0.3)
        raise ClusterUnavailable(
            f"{name} did not come up within {timeout_s:.0f} s (logs: {self.root / 'log'})"
        )

    def stop(self, grace_s: float = 15.0) -> None:
        """Let jobs that are ending (a result written, Python exiting) finish for ``grace_s``, cancel the rest,
        wait for them to leave the node, then end the daemons by their pids."""
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            for wait_s, cancel in ((grace_s, False), (30.0, True)):
                if cancel and self.jobs():
                    self._run("scancel", "--full", f"--partition={PARTITION}")
                deadline = time.monotonic() + wait_s
                while time.monotonic() < deadline and self.jobs():
                    time.sleep(0.5)
        for name in reversed(DAEMONS):
            proc = self.processes.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # --- clients ---------------------------------------------------------------------------------------------
    def _run(self, *cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=30)

    def node_state(self) -> str:
        out = self._run("sinfo", "-h", "-N", "-o", "%t", "-n", self.node).stdout.strip()
        return out.rstrip("*~#")

    def jobs(self) -> list[str]:
        """Ids of the jobs the controller still runs or holds (array tasks as ``<array id>_<task>``)."""
        out = self._run("squeue", "-h", "-o", "%i").stdout
        return [line.strip() for line in out.splitlines() if line.strip()]

    def scontrol(self, *args: str) -> subprocess.CompletedProcess:
        return self._run("scontrol", *args)

    def start_now(self, job: str, timeout_s: float = 60.0) -> None:
        """Let a requeued job start again at once. Slurm holds a requeued job back for the credential lifetime
        (``AuthInfo`` ``cred_expire``, 120 s by default) once its killed attempt has left the node; the update is
        only taken then (before, it fails or is overwritten)."""
        deadline = time.monotonic() + timeout_s
        while True:
            state = self._run("squeue", "-h", "-j", job, "-o", "%T %r").stdout.split()
            if state[:2] == ["PENDING", "BeginTime"]:
                update = self.scontrol("update", f"jobid={job}", "StartTime=now")
                if update.returncode == 0:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"requeued job {job} did not become startable (squeue: {' '.join(state)})")
            time.sleep(0.5)


def pause_until_released(after_step: int = 1, timeout_s: float = 300.0):
    """A Lightning callback for the requeue test (``+callbacks.pause._target_=slurm_cluster.pause_until_released``;
    built in a function so that this module imports without Lightning).

    In a job's first attempt (``SLURM_RESTART_COUNT`` unset), once ``after_step`` steps are done and checkpointed,
    it writes ``<run dir>/paused`` and waits for ``<run dir>/release`` (at most ``timeout_s``), so that the test
    can requeue the job at a known step; a requeued attempt runs straight through."""
    from lightning.pytorch.callbacks import Callback

    class PauseUntilReleased(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            # ModelCheckpoint saves at the end of a batch: last.ckpt of step `after_step` exists by now
            if trainer.global_step != after_step or os.environ.get("SLURM_RESTART_COUNT", "0") != "0":
                return
            run_dir = Path(trainer.default_root_dir)
            (run_dir / "paused").write_text(os.environ.get("SLURM_JOB_ID", ""))
            deadline = time.monotonic() + timeout_s
            while not (run_dir / "release").exists() and time.monotonic() < deadline:
                time.sleep(0.2)

    return PauseUntilReleased()
