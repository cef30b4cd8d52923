"""A real Slurm cluster on one machine, for tests and for developers.

Starts Debian's slurm-wlm daemons (munged, slurmctld, slurmd) with a private configuration under one base
directory. With ``nodes=0`` there is one node named after this host; with ``nodes=N`` there are N emulated
nodes n1..nN, each slurmd in its own network + UTS namespace (veth into a bridge, addresses that exist only
on this machine), so a ``-N2`` job really runs on two hosts with distinct names and addresses. The nodes
share the filesystem, PIDs and CPUs, like nodes of a cluster with a shared filesystem.

Needs root and ``apt-get install -y --no-install-recommends slurm-wlm slurmctld slurmd slurm-client munge``.

Developer use::

    python -m cluster.local_slurm start --nodes 2 --base /tmp/slurm-dev
    export SLURM_CONF=/tmp/slurm-dev/etc/slurm.conf
    sbatch ...; squeue; sinfo
    python -m cluster.local_slurm stop --base /tmp/slurm-dev

Facts this relies on (measured on Debian 12's slurm-wlm 22.05): clients need SLURM_CONF;
munged refuses a socket in a 0700 directory; ``ip netns exec`` remounts /sys and slurmd then dies, so
slurmd is entered with nsenter + unshare; ``cred_expire`` below 5 s silently becomes 120 s, and it is also
the delay before a requeued job starts again.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
NAMESPACE_BINARIES = ("ip", "nsenter", "unshare")
APT_INSTALL = "apt-get install -y --no-install-recommends slurm-wlm slurmctld slurmd slurm-client munge"
SPEC_FILE = "cluster.json"
_TAG_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")
_SUBNET_RE = re.compile(r"^10\.\d{1,3}\.\d{1,3}$")


class SlurmUnavailable(RuntimeError):
    """This machine cannot run the local cluster (binaries missing, not root); the message says why."""


@dataclass(frozen=True)
class ClusterSpec:
    """Where and how a local cluster runs. Everything it writes lives under ``base``."""

    base: Path
    nodes: int = 2  # 0: one node named after this host, in the host's network namespace
    tag: str = "sci"  # prefix of namespaces and interfaces; unique among clusters running at once
    subnet: str = "10.200.0"  # the emulated nodes' /24; .254 is the controller's address on the bridge
    ctld_port: int = 16817
    slurmd_port: int = 16818
    cred_expire_s: int = 10  # also how long a requeued job waits before it may start again
    slurmd_timeout_s: int = 30  # a node that does not answer for this long is DOWN (its jobs requeue)

    def __post_init__(self) -> None:
        if not 0 <= self.nodes <= 250:
            raise ValueError(f"nodes must be in 0..250, got {self.nodes}")
        if not _TAG_RE.match(self.tag):
            # interface names are at most 15 characters: "<tag>-h<i>" must fit
            raise ValueError(
                f"tag must be 1-8 lowercase letters/digits starting with a letter, got {self.tag!r}"
            )
        if not _SUBNET_RE.match(self.subnet):
            raise ValueError(
                f"subnet must look like '10.200.0' (the first three octets), got {self.subnet!r}"
            )
        if self.cred_expire_s < 5:
            raise ValueError(
                f"cred_expire_s must be >= 5 (Slurm silently turns smaller values into 120), got {self.cred_expire_s}"
            )
        if self.ctld_port == self.slurmd_port:
            raise ValueError(f"ctld_port and slurmd_port must differ, both are {self.ctld_port}")


def check_prerequisites(nodes: int) -> None:
    """Raise SlurmUnavailable naming what is missing to run a local cluster with ``nodes`` nodes."""
    if os.geteuid() != 0:
        raise SlurmUnavailable("the local Slurm cluster needs root (slurmd, network namespaces)")
    needed = SLURM_BINARIES + (NAMESPACE_BINARIES if nodes > 0 else ())
    missing = [b for b in needed if _which(b) is None]
    if missing:
        raise SlurmUnavailable(f"missing {', '.join(missing)}; install with: {APT_INSTALL}")


def _which(name: str) -> str | None:
    # daemons live in /usr/sbin, which is not on every PATH
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


class LocalSlurm:
    """Start, drive and stop one local cluster described by a ClusterSpec."""

    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        self.base = spec.base
        self.conf = spec.base / "etc" / "slurm.conf"
        self.run_dir = spec.base / "run"
        self.log_dir = spec.base / "log"
        self.host = socket.gethostname().split(".")[0]
        self.ctl_addr = "127.0.0.1" if spec.nodes == 0 else f"{spec.subnet}.254"
        self.node_names = [self.host] if spec.nodes == 0 else [f"n{i}" for i in range(1, spec.nodes + 1)]

    @classmethod
    def attach(cls, base: Path) -> LocalSlurm:
        """The cluster started earlier (maybe by another process) under ``base``."""
        path = base / SPEC_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: no local cluster was started under {base}")
        fields = json.loads(path.read_text())
        fields["base"] = Path(fields["base"])
        return cls(ClusterSpec(**fields))

    # ---------------------------------------------------------------- environment for clients
    @property
    def env(self) -> dict[str, str]:
        """os.environ plus SLURM_CONF; pass it to every Slurm client and to anything that submits jobs."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command (``sinfo``, ``scontrol`` ...) against this cluster."""
        return subprocess.run(
            args, env=self.env, check=check, timeout=timeout, capture_output=True, text=True
        )

    # ---------------------------------------------------------------- start / stop
    def start(self, timeout_s: float = 90) -> None:
        """Write the configuration, create the node namespaces, start all daemons, wait until nodes are idle."""
        check_prerequisites(self.spec.nodes)
        if self._alive("slurmctld"):
            raise RuntimeError(f"a cluster is already running under {self.base}; stop it first")
        if self.spec.nodes > 0 and Path(f"/sys/class/net/{self._bridge}").exists():
            raise RuntimeError(
                f"network bridge {self._bridge} exists: another local cluster with tag {self.spec.tag!r} is "
                f"running; stop it (python -m cluster.local_slurm stop --base DIR) or use another tag"
            )
        self._write_files()
        try:
            if self.spec.nodes > 0:  # network first: fail before any daemon starts
                self._create_network()
            self._start_munged()
            self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf)])
            for name in self.node_names:
                self.start_node(name)
            self.wait_nodes("idle", timeout_s=timeout_s)
        except BaseException:
            tails = self.log_tails()
            self.stop()
            raise RuntimeError(f"local Slurm did not come up under {self.base}:\n{tails}") from None

    def stop(self) -> None:
        """Cancel every job, stop all daemons, kill what is left on the emulated nodes, remove the network."""
        if self._alive("slurmctld"):
            self.run("scancel", "--quiet", "--partition=debug", check=False, timeout=10)
            deadline = time.monotonic() + 10
            while (
                time.monotonic() < deadline
                and self.run("squeue", "-h", check=False, timeout=5).stdout.strip()
            ):
                time.sleep(0.2)
        pids = (
            {f.stem: int(f.read_text()) for f in self.run_dir.glob("*.bgpid")}
            if self.run_dir.is_dir()
            else {}
        )
        _terminate(list(pids.values()))
        for f in self.run_dir.glob("*.bgpid"):
            f.unlink()
        if self.spec.nodes > 0:
            for i, name in enumerate(self.node_names, start=1):
                ns = self._netns(name)
                if Path(f"/run/netns/{ns}").exists():
                    _terminate(self._netns_pids(ns), grace_s=0)  # job leftovers on that node
                    _ip("netns", "del", ns)
                _ip("link", "del", f"{self.spec.tag}-h{i}", check=False)
            _ip("link", "del", self._bridge, check=False)

    # ---------------------------------------------------------------- nodes
    def start_node(self, name: str) -> None:
        """Start (or restart after kill_node) the slurmd of node ``name``."""
        (self.base / "spool" / name).mkdir(parents=True, exist_ok=True)
        slurmd = [_which("slurmd") or "slurmd", "-D", "-f", str(self.conf)]
        if self.spec.nodes == 0:
            self._spawn(f"slurmd-{name}", slurmd)
            return
        hosts = self.base / "etc" / "hosts"
        # hostname and /etc/hosts are private to this node: unshare's new mount namespace is private by default
        inner = f"hostname {name} && mount --bind {hosts} /etc/hosts && exec {' '.join(slurmd)}"
        argv = [
            "nsenter",
            f"--net=/run/netns/{self._netns(name)}",
            "unshare",
            "--uts",
            "--mount",
            "sh",
            "-c",
            inner,
        ]
        self._spawn(f"slurmd-{name}", argv)  # nsenter, unshare and sh all exec: the pid is slurmd's

    def kill_node(self, name: str) -> None:
        """Emulate a node dying: SIGKILL its slurmd and everything else running in its namespace (job steps)."""
        if self.spec.nodes == 0:
            raise ValueError("kill_node needs emulated nodes (nodes >= 1); this cluster has one host node")
        if name not in self.node_names:
            raise ValueError(f"unknown node {name!r}; nodes are {self.node_names}")
        _terminate(self._netns_pids(self._netns(name)), grace_s=0)
        (self.run_dir / f"slurmd-{name}.bgpid").unlink(missing_ok=True)

    def node_states(self) -> dict[str, str]:
        """Node name -> Slurm state as sinfo prints it ('idle', 'alloc', 'down*', ...)."""
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=10).stdout
        return dict(line.split() for line in out.splitlines() if line.strip())

    def wait_nodes(self, state: str, timeout_s: float = 60, nodes: Sequence[str] | None = None) -> None:
        """Wait until every node (or those named) is in ``state``; TimeoutError with the states otherwise."""
        want = list(nodes or self.node_names)
        states: dict[str, str] = {}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = self.node_states()
            if all(states.get(n) == state for n in want):
                return
            time.sleep(0.2)
        raise TimeoutError(f"nodes {want} not {state} after {timeout_s} s: {states}")

    # ---------------------------------------------------------------- jobs
    def sbatch(self, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> int:
        """Submit a batch job (sbatch arguments as on the command line); return its job id."""
        result = subprocess.run(
            ["sbatch", "--parsable", *args],
            env={**self.env, **(env or {})},
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"sbatch {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}"
            )
        return int(result.stdout.strip().split(";")[0])

    def hostnames(self, nodelist: str) -> list[str]:
        """A Slurm node list (``n[1-2]``) as node names, in order."""
        return self.run("scontrol", "show", "hostnames", nodelist, timeout=10).stdout.split()

    def job(self, job_id: int) -> dict[str, str]:
        """The job's fields from ``scontrol show job`` (JobState, Restarts, NodeList, ExitCode, ...)."""
        out = self.run("scontrol", "-o", "show", "job", str(job_id), timeout=10).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def wait_job(
        self, job_id: int, until: Callable[[dict[str, str]], bool], timeout_s: float, what: str = ""
    ) -> dict[str, str]:
        """Poll the job until ``until(fields)`` holds; return the fields, or TimeoutError showing the last ones."""
        fields: dict[str, str] = {}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            fields = self.job(job_id)
            if until(fields):
                return fields
            time.sleep(0.3)
        raise TimeoutError(
            f"job {job_id}: {what or 'condition'} not reached after {timeout_s} s; last state: {fields}"
        )

    def wait_finished(self, job_id: int, timeout_s: float) -> dict[str, str]:
        """Wait until the job is in a final state (COMPLETED, FAILED, ...) and return its fields."""
        final = {
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "TIMEOUT",
            "NODE_FAIL",
            "OUT_OF_MEMORY",
            "BOOT_FAIL",
            "DEADLINE",
        }
        return self.wait_job(job_id, lambda f: f.get("JobState") in final, timeout_s, "a final state")

    def log_tails(self, lines: int = 15) -> str:
        """The last lines of every daemon log, for error messages."""
        parts = []
        for log in sorted(self.log_dir.glob("*")) if self.log_dir.is_dir() else []:
            text = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"== {log}\n" + "\n".join(text))
        return "\n".join(parts)

    # ---------------------------------------------------------------- internals
    @property
    def _bridge(self) -> str:
        return f"{self.spec.tag}-br"

    def _netns(self, name: str) -> str:
        return f"{self.spec.tag}-{name}"

    def _netns_pids(self, ns: str) -> list[int]:
        if not Path(f"/run/netns/{ns}").exists():
            return []
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False).stdout
        return [int(p) for p in out.split()]

    def _alive(self, daemon: str) -> bool:
        pidfile = self.run_dir / f"{daemon}.bgpid"
        if not pidfile.is_file():
            return False
        try:
            os.kill(int(pidfile.read_text()), 0)
        except ProcessLookupError:
            return False
        return True

    def _spawn(self, daemon: str, argv: list[str]) -> None:
        log = open(self.log_dir / f"{daemon}.out", "ab")  # noqa: SIM115 - the daemon owns it from here on
        argv = [_which(argv[0]) or argv[0], *argv[1:]]
        # own session: a Ctrl-C aimed at pytest or the CLI must not reach the daemons
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=self.env
        )
        log.close()
        (self.run_dir / f"{daemon}.bgpid").write_text(str(proc.pid))

    def _start_munged(self) -> None:
        sock = self.run_dir / "munge.socket"
        munge = self.base / "munge"
        self._spawn(
            "munged",
            ["munged", "--foreground", f"--socket={sock}", f"--key-file={munge / 'munge.key'}",
             f"--pid-file={self.run_dir / 'munged.pid'}", f"--seed-file={munge / 'seed'}",
             f"--log-file={self.log_dir / 'munged.log'}"],
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not sock.is_socket():
            if time.monotonic() > deadline:
                raise RuntimeError(f"munged did not create {sock}")
            time.sleep(0.05)

    def _write_files(self) -> None:
        for parent in self.base.parents:
            if parent.exists() and not parent.stat().st_mode & 0o001:
                raise ValueError(
                    f"munged refuses a socket below {parent} (not world-executable); "
                    f"choose a base directory elsewhere, e.g. tempfile.mkdtemp() under /tmp"
                )
        for sub in ("etc", "munge", "state", "spool", "run", "log"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        # munged wants its key private but refuses a socket directory that others cannot traverse
        (self.base / "munge").chmod(0o700)
        for d in (self.base, self.run_dir):
            d.chmod(0o755)
        key = self.base / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            key.chmod(0o400)
        self.conf.write_text(self._slurm_conf())
        hosts = ["127.0.0.1 localhost", f"{self.ctl_addr} {self.host}"]
        hosts += [
            f"{self.spec.subnet}.{i} {n}" for i, n in enumerate(self.node_names, start=1) if self.spec.nodes
        ]
        (self.base / "etc" / "hosts").write_text("\n".join(hosts) + "\n")
        spec = {**asdict(self.spec), "base": str(self.spec.base)}
        (self.base / SPEC_FILE).write_text(json.dumps(spec, indent=1))

    def _slurm_conf(self) -> str:
        s, b = self.spec, self.base
        cpus = os.cpu_count() or 1
        if s.nodes == 0:
            nodes = [f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000"]
        else:
            nodes = [f"NodeName={n} NodeAddr={s.subnet}.{i} CPUs={cpus} RealMemory=1000"
                     for i, n in enumerate(self.node_names, start=1)]  # fmt: skip
        lines = [
            "ClusterName=local",
            f"SlurmctldHost={self.host}({self.ctl_addr})",
            "SlurmUser=root",
            f"SlurmctldPort={s.ctld_port}",
            f"SlurmdPort={s.slurmd_port}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={b}/run/munge.socket,cred_expire={s.cred_expire_s}",
            f"StateSaveLocation={b}/state",
            f"SlurmdSpoolDir={b}/spool/%n",
            f"SlurmctldPidFile={b}/run/slurmctld.pid",
            f"SlurmdPidFile={b}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={b}/log/slurmctld.log",
            f"SlurmdLogFile={b}/log/slurmd-%n.log",
            "MailProg=/bin/true",
            # no cgroups here: track processes by parentage, bind nothing
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2,bf_interval=2",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "ReturnToService=2",  # a node that was DOWN is usable again as soon as its slurmd registers
            f"SlurmdTimeout={s.slurmd_timeout_s}",
            "KillWait=5",
            "MinJobAge=600",  # keep finished jobs visible to scontrol for the tests
            *nodes,
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        return "\n".join(lines) + "\n"

    def _create_network(self) -> None:
        s = self.spec
        _ip("link", "add", self._bridge, "type", "bridge")
        _ip("addr", "add", f"{self.ctl_addr}/24", "dev", self._bridge)
        _ip("link", "set", self._bridge, "up")
        for i, name in enumerate(self.node_names, start=1):
            ns, host_if, node_if = self._netns(name), f"{s.tag}-h{i}", f"{s.tag}-c{i}"
            _ip("netns", "add", ns)
            _ip("link", "add", host_if, "type", "veth", "peer", "name", node_if)
            _ip("link", "set", host_if, "master", self._bridge, "up")
            _ip("link", "set", node_if, "netns", ns)
            _ip("-n", ns, "link", "set", node_if, "name", "eth0")
            _ip("-n", ns, "addr", "add", f"{s.subnet}.{i}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")


def _ip(*args: str, check: bool = True) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")


def _terminate(pids: list[int], grace_s: float = 10) -> None:
    """SIGTERM (unless grace_s is 0), wait up to grace_s, then SIGKILL whatever is still alive."""
    sig = signal.SIGTERM if grace_s > 0 else signal.SIGKILL
    for pid in pids:
        _signal(pid, sig)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_exists(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        _signal(pid, signal.SIGKILL)
    for pid in pids:  # reap our own children so they do not linger as zombies
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours still "exists" for kill(0): reap it
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: start / stop / status of a local cluster under --base."""
    parser = argparse.ArgumentParser(
        prog="python -m cluster.local_slurm", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start a cluster and print the SLURM_CONF to export")
    start.add_argument("--nodes", type=int, default=2, help="emulated nodes; 0 = one node, this host")
    start.add_argument(
        "--tag", default="sci", help="prefix of namespaces/interfaces (unique per running cluster)"
    )
    start.add_argument("--subnet", default="10.200.0", help="first three octets of the nodes' addresses")
    start.add_argument("--cred-expire", type=int, default=10, help="seconds; also the requeue delay (>= 5)")
    for p in (start, sub.add_parser("stop"), sub.add_parser("status")):
        p.add_argument(
            "--base", type=Path, default=Path("/tmp/slurm-local"), help="directory holding everything"
        )
    args = parser.parse_args(argv)
    if args.command == "start":
        spec = ClusterSpec(
            args.base.resolve(), args.nodes, args.tag, args.subnet, cred_expire_s=args.cred_expire
        )
        cluster = LocalSlurm(spec)
        t0 = time.monotonic()
        cluster.start()
        print(f"slurm up in {time.monotonic() - t0:.1f} s: {cluster.node_states()}")
        print(f"export SLURM_CONF={cluster.conf}")
    elif args.command == "stop":
        LocalSlurm.attach(args.base.resolve()).stop()
        print("stopped")
    else:
        print(LocalSlurm.attach(args.base.resolve()).run("sinfo").stdout, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
