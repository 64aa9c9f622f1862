"""A one-node Slurm cluster on localhost, in a temporary folder, for the tests marked `slurm`.

munged (its own key and socket), slurmctld and slurmd run as root in the foreground, children of the test
process, with a generated `slurm.conf` under the folder; no cgroups, systemd or accounting database
(`proctrack/linuxproc`, `task/none`): `sacct` is unavailable, `scontrol show job` tells a job's state.
Every daemon binds 127.0.0.1 only. Client commands find the cluster through `SLURM_CONF` (`cluster.env`).

Facts this rests on (Slurm 22.05, Debian's slurm-wlm): `NodeName` must equal `hostname -s`; a requeued job
waits the credential lifetime before it runs again, hence `cred_expire=5` (the lowest Slurm accepts: a lower
value silently falls back to 120 s); munge's socket folder must be world-executable.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "scancel", "squeue", "srun")
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


def missing_programs() -> list[str]:
    """The Slurm and munge programs not on PATH (daemons live in /usr/sbin, which a user's PATH may lack)."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    return [p for p in DAEMONS + CLIENTS if shutil.which(p, path=path) is None]


def skip_reason() -> str | None:
    """Why the cluster cannot start here, or None."""
    missing = missing_programs()
    if missing:
        return (f"Slurm is not installed ({', '.join(missing)} missing): apt-get install -y slurm-wlm munge "
                f"(.ci/run does this as root)")
    if os.geteuid() != 0:
        return "the test Slurm cluster runs its daemons as root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """Every process under `pid` (children, their children, ...), from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # the command name (field 2) may hold spaces: the parent's pid is the 2nd field after its ')'
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _real_memory_mb() -> int:
    """A bit under the machine's memory: slurmd drains a node that reports less than its RealMemory."""
    with open("/proc/meminfo") as fh:
        total_kb = int(next(line for line in fh if line.startswith("MemTotal:")).split()[1])
    return max(256, int(total_kb / 1024 * 0.9))


class SlurmCluster:
    """A cluster of one node (this host, as `hostname -s`) under `root`; `start()` it, `stop()` it."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf),
                    "PATH": os.environ.get("PATH", "") + os.pathsep + "/usr/sbin"}
        self.procs: dict[str, subprocess.Popen] = {}

    # ---- start
    def start(self, timeout: float = 60) -> "SlurmCluster":
        """Write the key and config, start the daemons, return once the node is idle (else stop and raise)."""
        try:
            self._write_files()
            self._start_munged()
            self._start("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
            self._start("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.node])
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _write_files(self) -> None:
        try:  # jobs reach the first node by its name (the sbatch script's rendezvous address)
            socket.gethostbyname(self.node)
        except OSError:
            raise RuntimeError(f"this host's name {self.node!r} does not resolve: add it to /etc/hosts") from None
        munge = self.root / "munge"
        munge.mkdir(parents=True)
        munge.chmod(0o755)  # the socket's folder: world-executable, as munge's clients need
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        for folder in ("state", "spool"):
            (self.root / folder).mkdir()
        self.conf.write_text(self._slurm_conf())

    def _slurm_conf(self) -> str:
        r = self.root
        return "\n".join([
            "ClusterName=cprectest",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire: a requeued job starts again after ~6 s instead of the default 120 s
            f"AuthInfo=socket={r}/munge/munge.socket.2,cred_expire=5",
            # bind the address given here (127.0.0.1), not every interface
            "CommunicationParameters=NoCtldInAddrAny,NoInAddrAny",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd.pid",
            f"SlurmctldLogFile={r}/slurmctld.log",
            f"SlurmdLogFile={r}/slurmd.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            # no cgroups, no systemd, no accounting database
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=1",  # a requeued job starts once eligible, not at the next minute
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "ReturnToService=2",
            "KillWait=30",
            "MinJobAge=600",  # finished jobs stay visible to `scontrol show job` for the module's duration
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={_real_memory_mb()} "
            f"State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            ""])

    def _start_munged(self) -> None:
        m = self.root / "munge"
        self._start("munged", ["munged", "--foreground", "--force", f"--socket={m}/munge.socket.2",
                               f"--key-file={m}/munge.key", f"--pid-file={m}/munged.pid",
                               f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed"])
        self._wait(lambda: (m / "munge.socket.2").exists(), 20, "munged did not create its socket")

    def _start(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / f"{name}.stdout", "w")
        # a session of its own: a signal meant for the test run (Ctrl-C) does not reach the daemons first
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def _wait_idle(self, timeout: float) -> None:
        def idle() -> bool:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.logs()}")
            out = self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
            return out == "idle"
        self._wait(idle, timeout, "the node did not become idle")

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} within {timeout:.0f} s:\n{self.logs()}")
            time.sleep(0.2)

    # ---- use
    def run(self, *cmd: str, check: bool = True, cwd: Path | None = None, env: dict | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
        """A client command against this cluster."""
        proc = subprocess.run(list(cmd), env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def sbatch(self, *args: str, cwd: Path | None = None, env: dict | None = None) -> str:
        """Submit; the job's id (of an array: the array's id)."""
        out = self.run("sbatch", "--parsable", *args, cwd=cwd, env=env).stdout.strip()
        return out.split(";")[0]

    def jobs(self, job_id: str) -> list[dict]:
        """`scontrol show job` as dicts: one for a job, one per task for an array (finished ones too)."""
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]

    def job(self, job_id: str) -> dict:
        return self.jobs(job_id)[0]

    def wait_finished(self, job_id: str, timeout: float = 300) -> list[dict]:
        """Wait until the job (every task of an array) has finished; its records."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.jobs(job_id)
            if records and all(r["JobState"] in FINISHED for r in records):
                return records
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {[r['JobState'] for r in records]} after {timeout:.0f} s")
            time.sleep(0.5)

    def logs(self) -> str:
        parts = []
        for path in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.stdout")):
            parts.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(parts)

    # ---- stop
    def stop(self) -> list[int]:
        """Cancel every job, stop the daemons by their pid, then kill any slurmstepd of this cluster still
        alive, with the job processes under it. Returns the pids of those slurmstepd (empty when everything
        stopped by itself)."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            self._cancel_all_jobs()
        for name in reversed(DAEMONS):
            self._stop_daemon(name)
        strays = self.step_daemons()
        doomed = [p for pid in strays for p in (pid, *_descendants(pid))]  # listed first: orphans are untraceable
        for pid in doomed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return strays

    def _cancel_all_jobs(self, timeout: float = 60) -> None:
        ids = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
        if ids:
            self.run("scancel", *ids, check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (self.run("squeue", "-h", check=False).stdout.strip()
                                               or self.step_daemons()):
            time.sleep(0.5)

    def _stop_daemon(self, name: str, timeout: float = 20) -> None:
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def step_daemons(self) -> list[int]:
        """The pids of this cluster's slurmstepd processes: those holding a file under this cluster's folder
        open (its slurmd log), so that another cluster's or a real one's are never touched."""
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                if not (proc / "cmdline").read_bytes().startswith(b"slurmstepd"):
                    continue
                if any(os.readlink(fd).startswith(str(self.root)) for fd in (proc / "fd").iterdir()):
                    pids.append(int(proc.name))
            except OSError:  # gone meanwhile
                continue
        return pids
