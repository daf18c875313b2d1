"""A real one-node Slurm cluster for the tests, started from Debian's ``slurm-wlm`` and ``munge`` in a temporary
folder (its own munge key and socket, ports and state): ``munged``, ``slurmctld`` and ``slurmd`` as root, one node of
the machine's CPUs, job requeue on. ``SLURM_CONF`` in ``cluster.env`` points the client commands at it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from cluster_tools import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")


def missing() -> str | None:
    """Why a Slurm cluster cannot be started here (None: it can)."""
    if os.geteuid() != 0:
        return "the Slurm daemons are started as root"
    absent = [x for x in (*DAEMONS, "sbatch", "scontrol", "squeue", "sacct", "mungekey")
              if shutil.which(x) is None and not Path(f"/usr/sbin/{x}").exists()]
    return f"not installed: {', '.join(absent)} (apt-get install slurm-wlm)" if absent else None


def _exe(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


@dataclass
class SlurmCluster:
    root: Path
    env: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)

    def start(self, cpus: int | None = None, timeout: float = 60) -> SlurmCluster:
        r, host = self.root, socket.gethostname()
        for d in ("state", "spool", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        key = r / "munge" / "munge.key"
        subprocess.run([_exe("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
        sock = r / "munge" / "munge.sock"
        conf = r / "slurm.conf"
        cpus = cpus or os.cpu_count() or 1
        # cred_expire (default 120 s) is also how long a requeued job waits before it may start again: slurmd
        # refuses a new launch of the job while its old credential is revoked. 5 s keeps the test short; the wait
        # is Slurm's own (forcing StartTime=now instead raced it: "Job credential revoked", the job FAILED).
        conf.write_text(f"""ClusterName=fcmaetest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={sock},cred_expire=5
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
JobRequeue=1
ReturnToService=2
KillWait=30
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'slurmctld.log'}
SlurmdLogFile={r / 'slurmd.log'}
SlurmctldParameters=enable_configless
NodeName={host} CPUs={cpus} State=UNKNOWN
PartitionName=main Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
""")
        self.env = {**os.environ, "SLURM_CONF": str(conf)}
        self._spawn([_exe("munged"), "-F", "--force", f"--key-file={key}", f"--socket={sock}",
                     f"--pid-file={r / 'munge' / 'munged.pid'}", f"--log-file={r / 'munge' / 'munged.log'}",
                     f"--seed-file={r / 'munge' / 'seed'}"], "munged.out")
        self._wait(lambda: sock.exists(), timeout, "munged")
        self._spawn([_exe("slurmctld"), "-D", "-i", "-f", str(conf)], "slurmctld.out")
        self._spawn([_exe("slurmd"), "-D", "-f", str(conf)], "slurmd.out")
        self._wait(self._node_idle, timeout, "the node to come up")
        return self

    def _spawn(self, cmd: list[str], log: str) -> None:
        out = (self.root / log).open("w")
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT))

    def _node_idle(self) -> bool:
        res = self.run("sinfo", "-h", "-o", "%T", check=False)
        return res.returncode == 0 and res.stdout.strip().startswith("idle")

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"Slurm did not start ({what}; exited: {dead}): {self.logs()}")
            time.sleep(0.2)

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, check=check, timeout=60)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(self.root.glob("*.log"))
                         + sorted(self.root.glob("*.out")) if p.is_file())

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", job_id, check=False).stdout
        return dict(x.split("=", 1) for x in out.split() if "=" in x)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
