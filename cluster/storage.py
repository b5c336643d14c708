"""Where a job's checkpoints and outputs live on the cluster: `cluster.storage`.

On one machine every path is visible to every Ray node, so a run keeps Ray Train's copy of its
checkpoints in its own run directory (`<run_dir>/ray`). On a multi-node cluster a checkpoint
written on one node must be readable on the node that replaces it, so `cluster.storage` names
storage every node shares: a filesystem path mounted on all nodes (NFS, a volume; plain or
`file://`), or a URI Ray Train reads and writes through pyarrow (`s3://`, `gs://`).

- Ray Train's checkpoints (what a replaced worker group resumes from) go to `<storage>/<name>-<id>`
  (`ray_train_storage`); the id tells apart runs of one name in different output directories.
- With a filesystem storage, a relative `output_dir` lies under it (`cluster_output_dir`), so
  adapters, report and summary land on shared storage too. Rank 0 writes these with plain file
  I/O, so with a URI storage `output_dir` must be a path on the cluster's nodes.

It does not copy files or mount anything; `cluster.launch` and `cluster.jobs` use these rules.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from urllib.parse import urlparse


def storage_path(storage: str) -> Path | None:
    """The filesystem directory `storage` names (plain path or `file://`), None for other URIs."""
    if "://" not in storage:
        return Path(storage).expanduser()
    parsed = urlparse(storage)
    return Path(parsed.path) if parsed.scheme == "file" else None


def cluster_output_dir(output_dir: str, storage: str) -> str:
    """`output_dir` as the cluster sees it: a relative one lies under a filesystem `storage`."""
    base = storage_path(storage) if storage else None
    if base is None or Path(output_dir).is_absolute():
        return output_dir
    return str(base / output_dir)


def ray_train_storage(run_dir: Path, name: str, storage: str) -> tuple[str, str]:
    """Ray Train's `(storage_path, name)` for a run: under the run directory, or on `storage`."""
    if not storage:
        return str(run_dir / "ray"), name
    run_id = hashlib.sha256(str(run_dir).encode()).hexdigest()[:8]
    return storage, f"{name}-{run_id}"
