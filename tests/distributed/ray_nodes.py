"""A real multi-node Ray cluster on this machine: a head and worker nodes, each its own raylet.

`RayNodes.start(workers=2)` uses Ray's `ray.cluster_utils.Cluster`: every node is a separate
raylet (own node id, own object store, own worker processes) joined to one GCS, exactly as on
several machines, minus the network. The head gets no CPUs, each worker node `cpus_per_node`, so a
Ray Train worker asking for that many CPUs lands alone on its node. Every port is picked free
(other Ray clusters may run on this shared machine) and the temp dir is the cluster's own.

`remove(node_id)` stops a node's raylet and everything on it (a lost machine); `add()` joins a
new one. `train_workers()` reads from the GCS which node runs each live Ray Train worker.
It does not submit jobs or run training (tests start `promptfleet train --address`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from local_ray import free_ports


@dataclass
class RayNodes:
    cluster: object  # ray.cluster_utils.Cluster
    temp_dir: Path
    cpus_per_node: int

    @property
    def address(self) -> str:
        """GCS address (`promptfleet train --address`)."""
        return self.cluster.address

    @classmethod
    def start(cls, workers: int = 2, cpus_per_node: int = 1) -> RayNodes:
        from ray._private.utils import get_ray_address_file
        from ray.cluster_utils import Cluster

        # Cluster writes the head's address to Ray's default temp dir (/tmp/ray), whatever temp_dir
        # says, and fails if that directory does not exist yet (a fresh machine where no Ray has run).
        Path(get_ray_address_file(None)).parent.mkdir(parents=True, exist_ok=True)

        # Short temp path: Ray's unix socket paths must stay under ~107 characters.
        temp_dir = Path(tempfile.mkdtemp(prefix="pfnodes-", dir="/tmp"))
        head = {
            "num_cpus": 0,  # the driver and Ray Train's controller need none; workers go to worker nodes
            "include_dashboard": False,
            "temp_dir": str(temp_dir),
            **_node_ports(gcs=True),
        }
        nodes = cls(Cluster(initialize_head=True, head_node_args=head), temp_dir, cpus_per_node)
        for _ in range(workers):
            nodes.add()
        return nodes

    def add(self):
        """Join one more worker node; returns its `ray._private.node.Node`."""
        return self.cluster.add_node(num_cpus=self.cpus_per_node, **_node_ports())

    def remove(self, node_id: str, timeout_s: float = 60) -> None:
        """Take the worker node `node_id` away with all its processes (its workers die with it).

        The raylet is stopped with SIGTERM, so it unregisters from the GCS (a drained or preempted
        machine) instead of being declared dead only after missed health checks: a worker group Ray
        Train restarts in the meantime would mostly be placed on the dead node and fail again. It is
        given until the GCS records the node dead (at most `timeout_s`) before what is left is killed:
        `Cluster.remove_node` alone gives it one second, then SIGKILLs it, which on a loaded machine
        can cut the unregistration short and leave the node half-dead for minutes.
        """
        from ray._private import ray_constants

        (node,) = [n for n in self.cluster.worker_nodes if n.node_id == node_id]
        node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.terminate()
        deadline = time.monotonic() + timeout_s
        while self.is_alive(node_id) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.cluster.remove_node(node, allow_graceful=True)  # whatever is left, and forget the node

    def is_alive(self, node_id: str) -> bool:
        """Whether the GCS counts node `node_id` alive."""
        return any(n["NodeID"] == node_id and n["Alive"] for n in self.cluster.global_state.node_table())

    @property
    def worker_node_ids(self) -> set[str]:
        return {n.node_id for n in self.cluster.worker_nodes}

    def train_workers(self) -> list[str]:
        """Node ids of the live Ray Train worker actors, as the GCS records them."""
        return self.actor_nodes("RayTrainWorker")

    def actor_nodes(self, class_name: str) -> list[str]:
        """Node ids of the live actors of class `class_name`, as the GCS records them."""
        actors = self.cluster.global_state.actor_table(None, actor_state_name="ALIVE").values()
        return [a["Address"]["NodeID"] for a in actors if a["ActorClassName"] == class_name]

    @property
    def head_node_id(self) -> str:
        return self.cluster.head_node.node_id

    def diagnostics(self, lines: int = 40) -> str:
        """Why a run stalled or failed, for a test's failure message: what Ray Train's controllers logged at
        INFO and above (failure decisions, restarts, startup timeouts), the GCS's node and actor deaths, and
        the node table (the temp dir, with every log, is removed at `stop`)."""
        logs = self.temp_dir / "session_latest" / "logs"
        out = ["-- Ray Train controllers (INFO and above):"]
        for path in sorted((logs / "train").glob("ray-train-sys-controller-*.log")):
            for line in path.read_text(errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("levelname") in ("INFO", "WARNING", "ERROR"):
                    out.append(
                        f"{rec.get('asctime')} {rec['levelname']} {rec['message'].splitlines()[0][:240]}"
                    )
        out = out[:1] + out[1:][-lines:]
        gcs = logs / "gcs_server.out"
        events = [
            line[:240]
            for line in (gcs.read_text(errors="replace").splitlines() if gcs.exists() else [])
            if any(
                k in line
                for k in ("is dead", "Actor is failed", "Draining", "drain", "Unregister", "removed")
            )
        ]
        out += ["-- GCS node and actor deaths:", *events[-lines:], "-- nodes:"]
        for n in self.cluster.global_state.node_table():
            out.append(f"{n['NodeID'][:12]} alive={n['Alive']} resources={n.get('Resources', {})}")
        return "\n".join(out)

    def stop(self) -> None:
        self.cluster.shutdown()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _node_ports(gcs: bool = False) -> dict[str, int]:
    # Ray's fixed defaults for these may be taken by another Ray on this shared machine; one `free_ports`
    # call, so no two of them are the same port.
    listen, metrics, *head = free_ports(3 if gcs else 2)
    return {"dashboard_agent_listen_port": listen, "metrics_export_port": metrics} | (
        {"gcs_server_port": head[0]} if gcs else {}
    )
