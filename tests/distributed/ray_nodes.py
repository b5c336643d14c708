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

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from local_ray import free_port


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
        from ray.cluster_utils import Cluster

        # Short temp path: Ray's unix socket paths must stay under ~107 characters.
        temp_dir = Path(tempfile.mkdtemp(prefix="pfnodes-", dir="/tmp"))
        head = {
            "num_cpus": 0,  # the driver and Ray Train's controller need none; workers go to worker nodes
            "include_dashboard": False,
            "gcs_server_port": free_port(),
            "temp_dir": str(temp_dir),
            **_node_ports(),
        }
        nodes = cls(Cluster(initialize_head=True, head_node_args=head), temp_dir, cpus_per_node)
        for _ in range(workers):
            nodes.add()
        return nodes

    def add(self):
        """Join one more worker node; returns its `ray._private.node.Node`."""
        return self.cluster.add_node(num_cpus=self.cpus_per_node, **_node_ports())

    def remove(self, node_id: str) -> None:
        """Take the worker node `node_id` away with all its processes (its workers die with it).

        The raylet is stopped with SIGTERM, so it unregisters from the GCS (a drained or preempted
        machine) instead of being declared dead only after missed health checks: a worker group Ray
        Train restarts in the meantime would mostly be placed on the dead node and fail again.
        """
        (node,) = [n for n in self.cluster.worker_nodes if n.node_id == node_id]
        self.cluster.remove_node(node, allow_graceful=True)

    @property
    def worker_node_ids(self) -> set[str]:
        return {n.node_id for n in self.cluster.worker_nodes}

    def train_workers(self) -> list[str]:
        """Node ids of the live Ray Train worker actors, as the GCS records them."""
        actors = self.cluster.global_state.actor_table(None, actor_state_name="ALIVE").values()
        return [a["Address"]["NodeID"] for a in actors if a["ActorClassName"] == "RayTrainWorker"]

    def stop(self) -> None:
        self.cluster.shutdown()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _node_ports() -> dict[str, int]:
    # Ray's fixed defaults for these may be taken by another Ray on this shared machine.
    return {"dashboard_agent_listen_port": free_port(), "metrics_export_port": free_port()}
