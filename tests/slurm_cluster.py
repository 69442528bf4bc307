"""A real Slurm cluster of N nodes on this one machine, for tests (not a test file).

    with slurm_cluster(tmp_dir, nodes=2) as info:
        job = info.submit("slurm/train.sbatch", ["configs/x.yaml"], cwd=repo, sbatch_args=["--nodes=2"])
        state = info.wait_job(job, timeout=300)   # {"JobState": "COMPLETED", "ExitCode": "0:0", ...}

Every node has `gpus` GPUs as Slurm sees them (count and CUDA_VISIBLE_DEVICES), backed by character devices
equal to /dev/null: jobs can ask for GPUs and get them, and torch finds none.

Needs root and Debian's slurmctld, slurmd, slurm-client and munge (`.ci/install_slurm.sh`);
`can_run_slurm()` says why not otherwise. Slurm 22.05 is built with MULTIPLE_SLURMD, so
the N nodes are N slurmd daemons (`-N nodeX`) on their own ports, all on 127.0.0.1.

munged is shared machine state: it is started only when its socket does not answer and is
left running afterwards (other clusters or tests may use it). The Slurm daemons are ours:
teardown stops them through their PID files, never by name.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")
TERMINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
    "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
}
_KEY = re.compile(r"(?:^|\s)([A-Za-z][\w/:]*)=")


def _which(name: str) -> str | None:
    return shutil.which(name, path=SBIN_PATH)


def can_run_slurm() -> tuple[bool, str]:
    """(True, "") when this process can bring up a local cluster, else (False, why)."""
    if os.geteuid() != 0:
        return False, "local Slurm cluster needs root (munged key, /etc/hosts, slurmd)"
    missing = [b for b in ("slurmctld", "slurmd", "munged", "sbatch", "srun", "scontrol", "sinfo") if not _which(b)]
    if missing:
        return False, f"Slurm/munge not installed (missing {', '.join(missing)}); run .ci/install_slurm.sh as root"
    return True, ""


@dataclass
class ClusterInfo:
    conf: Path
    env: dict[str, str]
    """A copy of os.environ without inherited SLURM_* variables, plus SLURM_CONF."""
    nodes: list[str]
    tmp_dir: Path
    log_dir: Path
    pid_files: list[Path] = field(default_factory=list)

    def submit(self, script: str | Path, args: Sequence[str] = (), env: Mapping[str, str] | None = None,
               cwd: str | Path | None = None, sbatch_args: Sequence[str] = ()) -> str:
        return submit(script, args, {**self.env, **(env or {})}, cwd, sbatch_args)

    def wait_job(self, job_id: str, timeout: float = 300) -> dict[str, str]:
        return wait_job(job_id, timeout, self.env)

    def logs(self, lines: int = 40) -> str:
        """Tail of every daemon log, for failure messages."""
        out = []
        for log in sorted(self.log_dir.glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.name} ---\n" + "\n".join(text))
        return "\n".join(out)


def _run(cmd: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | Path | None = None,
         timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), env=dict(env) if env is not None else None, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def submit(script: str | Path, args: Sequence[str] = (), env: Mapping[str, str] | None = None,
           cwd: str | Path | None = None, sbatch_args: Sequence[str] = ()) -> str:
    """`sbatch --parsable [sbatch_args] script args...`; returns the job id."""
    res = _run([_which("sbatch") or "sbatch", "--parsable", *sbatch_args, str(script), *args], env, cwd)
    if res.returncode != 0:
        raise RuntimeError(f"sbatch {script} failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout.strip().split(";")[0]


def parse_job(line: str) -> dict[str, str]:
    """Parse one `scontrol show job -o` line into {Key: Value} (values may hold spaces)."""
    keys = list(_KEY.finditer(line))
    return {m.group(1): line[m.end():(keys[i + 1].start() if i + 1 < len(keys) else len(line))].strip()
            for i, m in enumerate(keys)}


def wait_job(job_id: str, timeout: float = 300, env: Mapping[str, str] | None = None,
             poll: float = 0.5) -> dict[str, str]:
    """Poll `scontrol show job -o ID` until the job ends; return its parsed record.

    (`sbatch --wait` polls at 2, 10, 42 s... and would cost tens of seconds per job.)
    Raises TimeoutError (with the last record) when it has not ended in `timeout` s.
    """
    deadline = time.monotonic() + timeout
    info: dict[str, str] = {}
    while True:
        res = _run([_which("scontrol") or "scontrol", "show", "job", "-o", str(job_id)], env)
        if res.returncode == 0 and res.stdout.strip():
            info = parse_job(res.stdout.strip())
            if info.get("JobState") in TERMINAL_STATES:
                return info
        elif info:
            raise RuntimeError(f"job {job_id} vanished from slurmctld before it was seen ending "
                               f"(MinJobAge too small?): {res.stderr.strip()}; last: {info}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} not finished after {timeout:.0f} s; last state: "
                               f"{info.get('JobState')} ({info.get('Reason')}) {res.stderr.strip()}")
        time.sleep(poll)


# ---------------------------------------------------------------- bring-up ---

def _socket_answers(path: Path) -> bool:
    with contextlib.closing(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)) as s:
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False


def _ensure_munge() -> None:
    munge = pwd.getpwnam("munge")
    if not MUNGE_KEY.exists():
        MUNGE_KEY.parent.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(MUNGE_KEY, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(1024))
        os.chown(MUNGE_KEY, munge.pw_uid, munge.pw_gid)
    if _socket_answers(MUNGE_SOCKET):
        return
    for d in (MUNGE_SOCKET.parent, Path("/var/log/munge"), Path("/var/lib/munge")):
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, munge.pw_uid, munge.pw_gid)
    # --force: a socket file left by a dead munged would otherwise stop it.
    res = _run(["runuser", "-u", "munge", "--", _which("munged") or "munged", "--force"])
    if res.returncode != 0:
        raise RuntimeError(f"munged failed to start: {res.stderr.strip()}")
    _wait(lambda: _socket_answers(MUNGE_SOCKET), 10, "munged socket " + str(MUNGE_SOCKET))


def _ensure_hosts(names: Sequence[str]) -> None:
    """Make node names resolve to 127.0.0.1 (appends one line, only for missing names)."""
    hosts = Path("/etc/hosts")
    known = {tok for line in hosts.read_text().splitlines() for tok in line.split("#")[0].split()[1:]}
    missing = [n for n in names if n not in known]
    if missing:
        with hosts.open("a") as f:
            f.write(f"127.0.0.1 {' '.join(missing)}  # flowerdist test Slurm nodes\n")


def _port_free(port: int) -> bool:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _free_port_block(count: int) -> int:
    """First port of `count` consecutive free ports in 17000-19999 (below the jobs'
    rendezvous ports, 20000 + job id % 20000, and below the ephemeral range)."""
    blocks = range(17000, 20000 - count, count)
    starts = [17000] + random.sample(blocks, min(40, len(blocks)))
    for base in starts:
        if all(_port_free(p) for p in range(base, base + count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports in 17000-19999")


def _node_topology() -> str:
    """`slurmd -C`'s hardware line without NodeName/UpTime, e.g. 'CPUs=2 ... RealMemory=24105'."""
    res = _run([_which("slurmd") or "slurmd", "-C"])
    first = res.stdout.splitlines()[0] if res.returncode == 0 and res.stdout else ""
    words = [w for w in first.split() if not w.startswith(("NodeName=", "UpTime="))]
    if not any(w.startswith("CPUs=") for w in words):
        raise RuntimeError(f"slurmd -C gave no topology: {res.stdout!r} {res.stderr!r}")
    return " ".join(words)


def _wait(ok, timeout: float, what: str, detail=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}\n{detail()}")
        time.sleep(0.1)


def _fake_gpus(tmp: Path, names: str, count: int) -> str:
    """gres.conf for `count` GPUs per node, each a character device like /dev/null (Slurm needs device files)."""
    for i in range(count):
        dev = tmp / f"nvidia{i}"
        if not dev.exists():
            os.mknod(dev, 0o20666, os.makedev(1, 3))
    (tmp / "gres.conf").write_text(f"NodeName={names} Name=gpu File={tmp}/nvidia[0-{count - 1}]\n" if count else "")
    return f"Gres=gpu:{count}" if count else ""


def _write_conf(tmp: Path, spool: Path, nodes: int, base_port: int, gpus: int = 0) -> Path:
    host = socket.gethostname()
    conf = tmp / "slurm.conf"
    names = f"node[1-{nodes}]" if nodes > 1 else "node1"
    ports = f"[{base_port + 1}-{base_port + nodes}]" if nodes > 1 else str(base_port + 1)
    conf.write_text(f"""\
# Written by tests/slurm_cluster.py: {nodes} slurmd on one host, everything under {tmp}
ClusterName=flowerdist-test
GresTypes=gpu
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={base_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={tmp}/state
SlurmdSpoolDir={spool}/%n
SlurmctldPidFile={tmp}/slurmctld.pid
SlurmdPidFile={tmp}/slurmd-%n.pid
SlurmctldLogFile={tmp}/log/slurmctld.log
SlurmdLogFile={tmp}/log/slurmd-%n.log
# No cgroups or accounting in a container: plain process tracking, no binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
# The main and backfill schedulers look at pending jobs every second (defaults 60 s and 30 s): a requeued job
# that becomes eligible starts then, not up to half a minute later.
SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1
ReturnToService=2
JobRequeue=1
# A requeued job may start again once its old credential expires (default 120 s): 5 s, the least Slurm accepts.
AuthInfo=cred_expire=5
# Fast teardown of ended jobs; finished jobs stay visible to scontrol for 60 s.
KillWait=2
MinJobAge=60
InactiveLimit=0
FirstJobId={random.randint(1, 19000)}
NodeName={names} NodeHostname={host} NodeAddr=127.0.0.1 Port={ports} {_node_topology()} {_fake_gpus(tmp, names, gpus)} State=UNKNOWN
PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (a container's PID 1 may never reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _stop(pid_files: Sequence[Path], timeout: float = 10) -> None:
    pids = [p for p in (_pid(f) for f in pid_files) if p]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not any(alive(p) for p in pids):
            return


def _slurm_env(conf: Path) -> dict[str, str]:
    # Inherited SLURM_* (say, pytest itself inside a Slurm job) would leak into sbatch/srun.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
    env["SLURM_CONF"] = str(conf)
    env["PATH"] = SBIN_PATH
    return env


@contextlib.contextmanager
def slurm_cluster(tmp_dir: Path, nodes: int = 2, gpus: int = 8, timeout: float = 30) -> Iterator[ClusterInfo]:
    """Bring up slurmctld + `nodes` slurmd (node1..nodeN) with `gpus` GPUs each, yield once all are idle, then stop them."""
    ok, why = can_run_slurm()
    if not ok:
        raise RuntimeError(why)
    tmp = Path(tmp_dir).resolve()
    # slurmd puts step sockets (<spool>/<node>_<job>.<step>) in its spool dir: keep the
    # path well under the 108-byte AF_UNIX limit even when tmp_dir is deep.
    own_spool = len(str(tmp)) > 50
    spool = Path(tempfile.mkdtemp(prefix="fdslurm-")) if own_spool else tmp / "spool"
    names = [f"node{i}" for i in range(1, nodes + 1)]
    for d in [tmp / "state", tmp / "log", *(spool / n for n in names)]:
        d.mkdir(parents=True, exist_ok=True)

    _ensure_munge()
    _ensure_hosts(names)
    conf = _write_conf(tmp, spool, nodes, _free_port_block(nodes + 1), gpus)
    env = _slurm_env(conf)
    info = ClusterInfo(conf=conf, env=env, nodes=names, tmp_dir=tmp, log_dir=tmp / "log",
                       pid_files=[tmp / "slurmctld.pid", *(tmp / f"slurmd-{n}.pid" for n in names)])
    try:
        res = _run([_which("slurmctld") or "slurmctld", "-f", str(conf)], env)
        if res.returncode != 0:
            raise RuntimeError(f"slurmctld failed: {res.stderr.strip()}\n{info.logs()}")
        for n in names:
            res = _run([_which("slurmd") or "slurmd", "-f", str(conf), "-N", n], env)
            if res.returncode != 0:
                raise RuntimeError(f"slurmd -N {n} failed: {res.stderr.strip()}\n{info.logs()}")

        def all_idle() -> bool:
            res = _run([_which("sinfo") or "sinfo", "-h", "-N", "-o", "%N %T"], env, timeout=10)
            states = dict(line.split() for line in res.stdout.splitlines() if len(line.split()) == 2)
            return all(states.get(n) == "idle" for n in names)

        _wait(all_idle, timeout, f"{nodes} Slurm nodes to be idle in sinfo (conf {conf})",
              lambda: _run([_which("sinfo") or "sinfo", "-N", "-l"], env).stdout + info.logs())
        yield info
    finally:
        _stop(info.pid_files)
        if own_spool:
            shutil.rmtree(spool, ignore_errors=True)
