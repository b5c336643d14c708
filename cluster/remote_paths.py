"""Where a submitted job's files are on a remote cluster: mapped, in the upload, or on shared storage.

`promptfleet submit` to a remote cluster (or `--remote`, for a tunnelled one) cannot pass this
machine's paths: the cluster has its own filesystem. Each file the job reads (the config, its task
files, their data, a local backbone, `prompt.init_from`) gets one place there (`ClusterView.place`),
tried in this order:

1. mapped: under a `cluster.path_map` key (a folder or file of this machine, relative to the job
   file or absolute), it is read at the mapped path (e.g. `{../../shared/data: /workspace/shared/data}`,
   a volume every pod mounts). It need not exist here.
2. uploaded with the project: inside the project directory (the Ray job's `working_dir`), outside
   what the upload leaves out (`.venv/`, `runs/`...).
3. on `cluster.storage`: a path every node mounts, at the same absolute path here and there.
4. beside the project: with `submit --cluster-root DIR` (where the project lives on the cluster, e.g.
   `/workspace/promptfleet` in the image) a file under the project's parent folder is read at the
   same place relative to DIR (`configs/tasks/sst2.yaml`'s `../../../shared/data/...` ->
   `/workspace/shared/data/...`), as the YAML's relative path says.
5. uploaded with the job: a job or task YAML, or a data file, that only this machine has is copied
   into `.promptfleet-job/` of the upload, if all of them together stay within `UPLOAD_LIMIT_MB`.

Anything else (a local backbone or init_from run of this machine, data over the limit, a file that
does not exist here and is not mapped) is refused in one line that names the file and the fixes.

A YAML whose references would not lead to those places on the cluster (a task file of the project
naming `../../../shared/data/...` that is mapped elsewhere) is uploaded as a rewritten copy; the job
config is never rewritten: its paths (`tasks`, `model.name`, `prompt.init_from`) are passed on the
entrypoint as overrides, after the user's. `stage_upload` builds the upload: links to the project's
top-level entries plus the copies, so the project is not copied.

It does not decide what a cluster on this machine gets (it reads this machine's paths as they are;
`cluster.jobs`), nor submit anything.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import yaml

from cluster.storage import storage_path
from tuner.config import ConfigError, JobConfig, apply_overrides, read_yaml

UPLOAD_DIR = ".promptfleet-job"  # the job's own uploaded files, inside the uploaded working dir
UPLOAD_LIMIT_MB = 64  # job files copied into the upload, all together (Ray's whole package: 512 MiB)
# Never uploaded: environments, outputs, VCS and caches (Ray also honours .gitignore).
EXCLUDES = [
    ".venv/",
    "runs/",
    ".git/",
    "**/__pycache__/",
    "*.egg-info/",
    ".pytest_cache/",
    ".ruff_cache/",
    "bench/results/",
    ".ci/",
]
_LEFT_OUT = tuple(e.rstrip("/") for e in EXCLUDES if "*" not in e)  # folders of the project not uploaded


@dataclass
class JobFile:
    """A file of this machine the job reads: what it is, where it is, and how it is named."""

    what: str  # e.g. "task sst2: data file"
    path: Path  # resolved here
    written: str  # as its YAML (or an override) writes it; "" if not from one
    key: str = "config"  # config, tasks, data.<split>, model.name, prompt.init_from
    base: Path | None = None  # the folder a relative `written` is relative to
    owner: int | None = None  # index (in `job_files`) of the YAML that names it: the config or a task file


def job_files(config: Path, overrides: list[str], cfg: JobConfig) -> list[JobFile]:
    """The config, its task files, their data, a local backbone and the run `prompt.init_from` names."""
    from tuner.tasks.spec import TaskSpec  # imports torch: only for a submission

    raw_tasks = apply_overrides(read_yaml(config), list(overrides)).get("tasks") or []
    files = [JobFile("config", config.resolve(), str(config))]
    for t, w in zip(cfg.tasks, raw_tasks):
        files.append(JobFile("task file", Path(t), str(w), "tasks", config.resolve().parent, 0))
    for index, t in enumerate(cfg.tasks, start=1):
        spec, raw = TaskSpec.load(t), read_yaml(t).get("data") or {}
        if spec.data.format != "hub":
            for key in ("train", "eval", "train_target", "eval_target"):
                if getattr(spec.data, key):
                    what, path = f"task {spec.name}: data file", Path(getattr(spec.data, key))
                    files.append(JobFile(what, path, str(raw[key]), f"data.{key}", Path(t).parent, index))
    backbone = Path(cfg.model.name).expanduser()
    if backbone.is_absolute() or backbone.exists():  # not the embedded default or a Hub id
        files.append(JobFile("model.name", backbone.resolve(), cfg.model.name, "model.name", Path.cwd()))
    if cfg.prompt.init_from:  # a finished run directory (continual training)
        path = Path(cfg.prompt.init_from).expanduser().resolve()
        files.append(JobFile("prompt.init_from", path, cfg.prompt.init_from, "prompt.init_from", Path.cwd()))
    return files


@dataclass(frozen=True)
class Place:
    """Where a file is on the cluster: inside the uploaded working dir (a relative path), or absolute."""

    path: str  # POSIX
    uploaded: bool

    def named_from(self, yaml_place: Place) -> str:
        """How a YAML at `yaml_place` names this file (a relative path within the upload)."""
        if not self.uploaded:
            return self.path
        assert yaml_place.uploaded, "a file of the upload is named from a YAML of the upload"
        return posixpath.relpath(self.path, posixpath.dirname(yaml_place.path) or ".")

    def reached_by(self, written: str, yaml_place: Place | None) -> bool:
        """Whether `written` (as a YAML at `yaml_place` writes it; None: from the working dir) leads here."""
        if os.path.isabs(written):
            return not self.uploaded and posixpath.normpath(written) == self.path
        if written.startswith("~") or self.uploaded != (yaml_place is None or yaml_place.uploaded):
            return False
        base = posixpath.dirname(yaml_place.path) if yaml_place is not None else ""
        return posixpath.normpath(posixpath.join(base, written)) == self.path


def _lexical(f: JobFile) -> Path:
    """`f`'s path as written, made absolute without resolving links (a mapped folder may be a link)."""
    written = os.path.expanduser(f.written) if f.written else ""
    if not written:
        return f.path
    return Path(os.path.normpath(written if os.path.isabs(written) else (f.base or Path.cwd()) / written))


@dataclass
class ClusterView:
    """What a remote cluster sees of this machine's files (the rule of the module docstring)."""

    root: Path  # the project, uploaded
    shared: Path | None  # cluster.storage as a path, if it is one
    path_map: list[tuple[Path, PurePosixPath]] = field(default_factory=list)  # here -> there
    beside: tuple[Path, PurePosixPath] | None = None  # --cluster-root: the project's parent -> DIR's

    @classmethod
    def for_job(cls, config: Path, cfg: JobConfig, root: Path, cluster_root: str | None) -> ClusterView:
        storage = cfg.cluster.storage
        here = Path(os.path.abspath(config)).parent
        pairs = []
        for key, there in cfg.cluster.path_map.items():
            path = Path(os.path.normpath(here / os.path.expanduser(str(key))))
            pairs += [(path, PurePosixPath(there)), (path.resolve(), PurePosixPath(there))]
        beside = None
        if cluster_root:
            if not posixpath.isabs(cluster_root):
                raise ConfigError(f"--cluster-root {cluster_root}: must be an absolute path on the cluster")
            beside = (root.resolve().parent, PurePosixPath(posixpath.normpath(cluster_root)).parent)
        return cls(root.resolve(), storage_path(storage) if storage else None, pairs, beside)

    def mapped(self, path: Path, *, beside: bool = True) -> str | None:
        """Where `path` (absolute) is on the cluster by `cluster.path_map` (longest key first), else by
        `--cluster-root` (`beside`); None if neither says."""
        hits = [(k, v) for k, v in self.path_map if path.is_relative_to(k)]
        if not hits and beside and self.beside is not None and path.is_relative_to(self.beside[0]):
            hits = [self.beside]
        if not hits:
            return None
        key, there = max(hits, key=lambda kv: len(kv[0].parts))
        return str(there / path.relative_to(key).as_posix())

    def place(self, f: JobFile) -> Place | None:
        """Where the cluster reads `f` without uploading it (None: nowhere)."""
        paths = [_lexical(f), f.path]
        for p in paths:
            if (there := self.mapped(p, beside=False)) is not None:
                return Place(there, uploaded=False)
        rel = f.path.relative_to(self.root).as_posix() if f.path.is_relative_to(self.root) else None
        if rel is not None and not any(rel == d or rel.startswith(d + "/") for d in _LEFT_OUT):
            return Place(rel, uploaded=True)
        if self.shared is not None and f.path.is_relative_to(self.shared.resolve()):
            return Place(f.path.as_posix(), uploaded=False)
        for p in paths:
            if (there := self.mapped(p)) is not None:
                return Place(there, uploaded=False)
        return None

    def unseen(self, f: JobFile, why: str = "is on this machine only") -> str:
        """The one line refusing `f`: what it is, and every way to make it visible to the cluster."""
        where = (
            f"under cluster.storage={self.shared}"
            if self.shared
            else "on a filesystem every node mounts (cluster.storage=<its path>)"
        )
        folder = f.path if f.key in ("model.name", "prompt.init_from") else f.path.parent
        return (
            f"{f.what} {f.path} {why}, the cluster cannot read it: say where the cluster has it "
            f"(cluster.path_map={{{folder}: <path on the cluster>}} or submit --cluster-root), put it "
            f"in the project ({self.root}, uploaded with the job) or {where}"
        )


@dataclass
class RemotePlan:
    """How a job reaches a remote cluster: its config's path there, overrides, files to upload, notes."""

    config_arg: str
    overrides: list[str]
    uploads: dict[str, Path | str]  # path inside the upload -> a file to copy, or a rewritten YAML's text
    notes: list[str]


def plan_remote(
    config: Path, overrides: list[str], cfg: JobConfig, root: Path, cluster_root: str | None = None
) -> RemotePlan:
    """Place every file of the job on the cluster (module docstring); `ConfigError` names one it cannot."""
    view = ClusterView.for_job(config, cfg, root, cluster_root)
    files = job_files(config, overrides, cfg)
    uploads: dict[str, Path | str] = {}
    places = [_place_or_upload(view, f, uploads) for f in files]
    mapped = sorted({p.path for p, f in zip(places, files) if not p.uploaded and not _on(view.shared, f)})
    for t in [i for i, f in enumerate(files) if f.key == "tasks"]:  # data named as the cluster has it
        data = [i for i, f in enumerate(files) if f.owner == t]
        if all(places[d].reached_by(files[d].written, places[t]) for d in data):
            continue
        raw = read_yaml(files[t].path)
        if places[t].path not in uploads:  # a task file of the project or the storage: a copy
            places[t] = _upload_name(uploads, "tasks", files[t].path.name)
        for d in data:
            raw["data"][files[d].key.split(".", 1)[1]] = places[d].named_from(places[t])
        uploads[places[t].path] = yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)
    tasks = [i for i, f in enumerate(files) if f.key == "tasks"]
    extra = []
    if not all(places[t].reached_by(files[t].written, places[0]) for t in tasks):
        if not places[0].uploaded:  # an uploaded task file is named from an uploaded config only
            places[0] = _upload_name(uploads, "", config.name)
            uploads[places[0].path] = files[0].path
        extra.append("tasks=" + json.dumps([places[t].named_from(places[0]) for t in tasks]))
    for i, f in enumerate(files):  # relative to the job's working dir, as `train` reads them
        if f.key in ("model.name", "prompt.init_from") and not places[i].reached_by(f.written, None):
            extra.append(f"{f.key}={places[i].path}")
    notes = []
    if uploads:
        size = sum(v.stat().st_size if isinstance(v, Path) else len(v) for v in uploads.values())
        notes.append(f"uploaded with the job: {len(uploads)} file(s) of this machine ({size / 1024:.1f} KiB)")
    if mapped:
        notes.append(f"the cluster reads {len(mapped)} file(s) at mapped paths, e.g. {mapped[0]}")
    return RemotePlan(places[0].path, extra, uploads, notes)


def _on(shared: Path | None, f: JobFile) -> bool:
    return shared is not None and f.path.is_relative_to(shared.resolve())


def _place_or_upload(view: ClusterView, f: JobFile, uploads: dict[str, Path | str]) -> Place:
    """`f`'s place on the cluster, uploading it (a file within the limit) when the cluster has none."""
    place = view.place(f)
    if place is not None:
        return place
    for name, source in uploads.items():  # a data file named twice (train and eval) is uploaded once
        if source == f.path:
            return Place(name, uploaded=True)
    if f.key in ("model.name", "prompt.init_from"):
        raise ConfigError(view.unseen(f))
    if not f.path.is_file():
        raise ConfigError(view.unseen(f, "does not exist here and is not mapped to the cluster"))
    used = sum(v.stat().st_size if isinstance(v, Path) else len(v) for v in uploads.values())
    size = f.path.stat().st_size
    if used + size > UPLOAD_LIMIT_MB * 2**20:
        why = f"({size / 2**20:.1f} MiB) is on this machine only and over the job's upload limit ({UPLOAD_LIMIT_MB} MiB)"
        raise ConfigError(view.unseen(f, why))
    folder = {"config": "", "tasks": "tasks"}.get(f.key, "data")
    place = _upload_name(uploads, folder, f.path.name)
    uploads[place.path] = f.path
    return place


def _upload_name(uploads: dict[str, Path | str], folder: str, name: str) -> Place:
    """A free path for `name` in `.promptfleet-job/<folder>/` (`-2`, `-3`... before the suffix if taken)."""
    stem, suffix = os.path.splitext(name)
    for n in range(1, len(uploads) + 2):
        path = posixpath.join(UPLOAD_DIR, folder, f"{stem}-{n}{suffix}" if n > 1 else name)
        if path not in uploads:
            return Place(path, uploaded=True)
    raise AssertionError("unreachable: one of len(uploads) + 1 names is free")


def stage_upload(root: Path, uploads: dict[str, Path | str]) -> Path:
    """A temporary folder to upload as the job's working dir: a link to each top-level entry of the
    project (Ray's packaging follows links; what EXCLUDES names is left out) and the job's own files
    under `.promptfleet-job/`. The caller removes it once the job is submitted."""
    stage = Path(tempfile.mkdtemp(prefix="promptfleet-upload-"))
    try:
        for entry in root.iterdir():
            if entry.name not in _LEFT_OUT and entry.name != UPLOAD_DIR:
                (stage / entry.name).symlink_to(entry)
        for name, source in uploads.items():
            dest = stage / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(source, Path):
                shutil.copyfile(source, dest)
            else:
                dest.write_text(source, encoding="utf-8")
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return stage
