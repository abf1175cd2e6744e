"""A real multi-node Ray cluster on one machine, for tests and benchmarks: each node is a host of its own.

Every node lives in its own Linux network namespace with its own address on a private bridge (veth pairs), made
here as root and removed on exit, so Ray's head and worker nodes talk over a network as they would across
machines; the file system stays shared (as a cluster's shared file system or object store would be). Each node is
``ray start --block`` in a session of its own, so :meth:`RayCluster.kill_node` ends one node's raylet and workers
(and nothing else on the machine) the way a lost host would, and :meth:`RayCluster.stop` leaves no process behind.

The addresses are ``10.251.<net>.0/24``, one subnet per cluster, used only inside this machine's own namespaces
(nothing is routed out of them). Nodes and drivers run with ``RAY_USAGE_STATS_ENABLED=0``, no dashboard, and a
home folder of the cluster's own (so no token auth from a ``~/.ray/auth_token`` of another Ray on the machine).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

RAY_PORT = 6379
START_TIMEOUT_S = 120.0
OBJECT_STORE_BYTES = 100 * 1024 * 1024
START_ATTEMPTS = 3
STARTED = "This command will now block forever"
"""What ``ray start --block`` prints once its node has registered with the cluster."""


def netns_unavailable() -> str | None:
    """Why network namespaces cannot be made here (not root, no ``ip``), or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "network namespaces need iproute2's 'ip' (apt-get install iproute2)"
    probe = f"mpsprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"'ip netns add' failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, netns: str | None = None) -> None:
    command = ["ip", *args] if netns is None else ["ip", "netns", "exec", netns, "ip", *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip()}")


@dataclass
class Node:
    """One Ray node: its namespace, address and the ``ray start --block`` process leading its session."""

    name: str
    netns: str
    address: str
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None


@dataclass
class RayCluster:
    """A head node (no CPUs by default: it runs the driver and the control plane) and worker nodes."""

    tag: str
    subnet: str
    bridge: str
    workdir: Path
    nodes: list[Node] = field(default_factory=list)

    @property
    def head(self) -> Node:
        return self.nodes[0]

    @property
    def workers(self) -> list[Node]:
        return self.nodes[1:]

    @property
    def address(self) -> str:
        """The head's GCS address, as ``--ray-address`` takes it."""
        return f"{self.head.address}:{RAY_PORT}"

    def exec_prefix(self, node: Node | None = None) -> list[str]:
        """A command prefix that runs a program on ``node`` (default: the head), e.g. the embedding driver."""
        env = ["RAY_USAGE_STATS_ENABLED=0", "RAY_AUTH_MODE=disabled", f"HOME={self.workdir}"]
        return ["ip", "netns", "exec", (node or self.head).netns, "env", *env]

    def _add_host(self, name: str, number: int) -> Node:
        netns, outside, inside = f"{self.tag}{name}", f"{self.tag}{name}o", f"{self.tag}{name}i"
        address = f"{self.subnet}.{number}"
        _ip("netns", "add", netns)
        node = Node(name, netns, address)
        self.nodes.append(node)
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        _ip("link", "set", inside, "netns", netns)
        _ip("link", "set", outside, "master", self.bridge, "up")
        _ip("addr", "add", f"{address}/24", "dev", inside, netns=netns)
        _ip("link", "set", inside, "up", netns=netns)
        _ip("link", "set", "lo", "up", netns=netns)
        _ip("route", "add", "default", "via", f"{self.subnet}.1", netns=netns)  # Ray finds its address by route
        return node

    def _start_ray(self, node: Node, cpus: int, head: bool, mask: Path | None) -> None:
        ray = str(Path(sys.executable).with_name("ray"))
        args = [ray, "start", "--block", f"--node-ip-address={node.address}", f"--num-cpus={cpus}"]
        args += ["--num-gpus=0", f"--object-store-memory={OBJECT_STORE_BYTES}", "--disable-usage-stats"]
        args += [f"--temp-dir={self.workdir / node.name}", "--include-dashboard=false"] if head else []
        args += ["--head", f"--port={RAY_PORT}"] if head else [f"--address={self.address}"]
        command = self.exec_prefix(node) + args
        if mask is not None:  # this node cannot see what lies below `mask` (an empty folder over it)
            command = self.exec_prefix(node) + ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                                f"mount -t tmpfs none '{mask}' && exec \"$@\"", "sh", *args]
        node.log = self.workdir / f"{node.name}.log"
        with node.log.open("wb") as log:
            node.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def add_node(self, name: str, cpus: int = 1, mask: Path | None = None) -> Node:
        """A new worker host joining the cluster (``mask``: a folder this host cannot read)."""
        node = self._add_host(name, 10 + len(self.nodes))
        for attempt in range(START_ATTEMPTS):
            self._start_ray(node, cpus, head=False, mask=mask)
            try:
                self.wait_started(node)
                return node
            except RuntimeError:  # Ray gives a raylet a fixed 30 s to register: a busy machine can miss it
                self.kill_node(node)
                if attempt == START_ATTEMPTS - 1:
                    raise
        return node

    def wait_started(self, node: Node) -> None:
        """Until ``ray start`` says the node runs (it has registered with the head), or its start failed."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            self._check_alive()
            if node.log is not None and STARTED in node.log.read_text(errors="replace"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"ray node {node.name} did not start in {START_TIMEOUT_S:g} s; {self._logs()}")

    def _check_alive(self) -> None:
        for node in self.nodes:
            if node.process is not None and node.process.poll() is not None:
                raise RuntimeError(f"ray node {node.name} exited ({node.process.returncode}); {self._logs()}")

    def _logs(self) -> str:
        tails = [f"{n.name}: {n.log.read_text(errors='replace')[-800:]}" for n in self.nodes if n.log]
        return "logs: " + " | ".join(tails)

    def kill_node(self, node: Node) -> None:
        """SIGKILL a node's raylet and workers (its whole session), as if its host had died."""
        if node.process is None:
            return
        _kill_session(node.process.pid)
        node.process.wait(timeout=30)
        node.process = None

    def stop(self) -> None:
        for node in reversed(self.nodes):
            self.kill_node(node)
        for node in self.nodes:
            subprocess.run(["ip", "netns", "del", node.netns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


def _kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid`` (Ray's daemons and workers keep the session of ``ray start``)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) == sid:
                os.kill(int(entry.name), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            continue


def _free_subnet() -> int:
    """A third octet for ``10.251.N.0/24`` that no interface of this machine uses yet."""
    used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True).stdout
    for number in [os.getpid() % 200 + 20, *range(20, 250)]:
        if f"10.251.{number}." not in used:
            return number
    raise RuntimeError("no free 10.251.N.0/24 subnet for the test cluster")


@contextmanager
def ray_cluster(workers: int, cpus: int = 1, head_cpus: int = 0, mask: dict[int, Path] | None = None
                ) -> Iterator[RayCluster]:
    """A head and ``workers`` worker hosts of ``cpus`` CPUs each, started and alive; removed on exit.

    ``mask`` maps a worker's number (0-based) to a folder that host cannot read."""
    net = _free_subnet()
    tag = f"mr{net}"
    workdir = Path(tempfile.mkdtemp(prefix=f"{tag}-", dir="/tmp"))  # short: Ray's socket paths must fit
    cluster = RayCluster(tag, f"10.251.{net}", f"{tag}br", workdir)
    try:
        _ip("link", "add", cluster.bridge, "type", "bridge")
        _ip("addr", "add", f"{cluster.subnet}.1/24", "dev", cluster.bridge)
        _ip("link", "set", cluster.bridge, "up")
        head = cluster._add_host("h", 10)
        cluster._start_ray(head, head_cpus, head=True, mask=None)
        cluster.wait_started(head)
        for number in range(workers):  # one at a time: a raylet must register within Ray's fixed 30 s
            cluster.add_node(f"w{number}", cpus, (mask or {}).get(number))
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
