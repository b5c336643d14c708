"""Per-task adapters in Hugging Face PEFT's prompt-tuning format, which serving reads too.

A task directory holds:
  adapter_config.json        PEFT `PromptTuningConfig` (peft_type PROMPT_TUNING, CAUSAL_LM)
  adapter_model.safetensors  {"prompt_embeddings": [num_virtual_tokens, hidden]}
  promptfleet_task.json      what serving needs beyond PEFT (`TaskMeta`): kind, template, prefix,
                             verbaliser, metric, stop strings

`peft.PeftModel.from_pretrained(backbone, task_dir)` loads it as is. Only safetensors is ever
read; task names are validated before they become directory names. A run of many tasks writes one
packed store instead (`tuner.prompt_store`; `tuner.run_adapters` picks), from which
`promptfleet export --peft` writes a task in this format (`write_adapter_files`).

Publishing is atomic: each save writes a new version directory `root/.versions/<name>/<version>/`
and then flips ONE pointer, the relative symlink `root/<name>`, with a single `os.replace`. A
reader (the serving registry, a hot reload) sees the old version or the new one, complete, and the
task never disappears in between. The previous version is kept (a reader may still be loading it);
older ones are deleted. `load_adapter` resolves the pointer once and opens every file of that one
version before reading any: an open file outlives its deletion, and a version deleted before its
files were opened is given up for the one now published, so a reader gets one whole version.

Reading is bounded before anything is parsed: each file by its size, `promptfleet_task.json` by every
field (`TaskMeta`), and the prompt by its safetensors header (dtype, shape, the file's size), which
`load_adapter` hands to the reader's `check` (`AdapterHeader`) before it reads the tensor: the
serving registry refuses a prompt of another width, or longer than the backbone's context, without
reading its data.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors.torch import load, save_file

from tuner.schema import ReadByKey, validate_name
from tuner.tasks.input_budget import max_input_tokens
from tuner.tasks.kinds import kind_of
from tuner.tasks.templates import check_template, render_input, template_fields

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TASK_META = "promptfleet_task.json"
VERSIONS = ".versions"  # hidden: the registry never mistakes it for a task
MAX_CONFIG_BYTES = 1 << 20  # adapter_config.json: PEFT writes about a kilobyte
# promptfleet_task.json: a prefix of demonstrations; a 262,144-character one fits even JSON-escaped
MAX_META_BYTES = 4 << 20
MAX_WEIGHTS_BYTES = 1 << 30  # e.g. 2,048 virtual tokens x 16,384 wide in fp32 is 128 MiB
MAX_HEADER_BYTES = 1 << 20  # a safetensors header: one tensor's dtype, shape and offsets, as JSON
_LIMITS = {ADAPTER_CONFIG: MAX_CONFIG_BYTES, ADAPTER_WEIGHTS: MAX_WEIGHTS_BYTES, TASK_META: MAX_META_BYTES}
_OPEN_ATTEMPTS = 5  # a reader whose resolved version is pruned under it resolves the pointer again
PROMPT_TENSOR = "prompt_embeddings"
FLOAT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}  # safetensors dtype -> bytes per value

# Bounds of a `promptfleet_task.json`, written by others into a store a server reads (the prefix and
# template are bounded by the reader, e.g. serving's longest prompt; `extra` by the file's size).
MAX_LABELS = 1000  # verbaliser entries
MAX_LABEL_CHARS = 256  # a label's name, its verbaliser words, a stop string
MAX_STOPS = 16
MAX_DESCRIPTION_CHARS = 4096
MAX_NAME_CHARS = 256  # kind, metric
MAX_NEW_TOKENS = 1 << 20
MAX_INPUT_TOKENS = 1 << 24


@dataclass
class TaskMeta(ReadByKey):
    """What serving needs of a task beyond its prompt (`promptfleet_task.json`), written by the
    tuner (`from_spec`) and read by serving (`render` gives the model input of a request with the
    same function training used, `tuner.tasks.templates.render_input`)."""

    kind: str = "generation"  # classification | generation | ner
    description: str = ""
    template: str = ""  # the task's input template; "" = the request text as is
    prefix: str = ""  # description + demonstrations, before every input (as in training)
    verbaliser: dict[str, str] = field(default_factory=dict)  # classification: label -> words
    metric: str = ""
    max_new_tokens: int | None = None
    score: float | None = None  # the tuned headline metric at export
    # Where the task's answer ends (`tuner.tasks.stops`); [] = end of sequence only, as in an adapter
    # written before stop strings existed.
    stop: list[str] = field(default_factory=list)
    # A decoded task's input keeps its last this many tokens, as evaluation cut it
    # (`tuner.tasks.input_budget`); None = no cut, as in an adapter written before the rule was recorded.
    max_input_tokens: int | None = None
    extra: dict = field(default_factory=dict)  # keys this version does not know, kept as written

    @classmethod
    def from_spec(
        cls,
        spec,
        prefix: str,
        score: float | None = None,
        *,
        max_len: int | None = None,
        virtual_tokens: int = 0,
    ) -> TaskMeta:
        """The record of a `tuner.tasks.spec.TaskSpec` trained with `prefix`; with `max_len` (the job's
        `model.max_seq_len`) and the prompt's `virtual_tokens`, a decoded kind's input-length rule."""
        decoded = max_len is not None and not kind_of(spec.kind).label_scored
        return cls(
            kind=spec.kind,
            description=spec.description,
            template=spec.template,
            prefix=prefix,
            verbaliser=dict(spec.verbaliser),
            metric=spec.metric,
            max_new_tokens=spec.max_new_tokens,
            score=score,
            stop=list(spec.stop),
            max_input_tokens=(
                max_input_tokens(max_len, virtual_tokens, spec.max_new_tokens) if decoded else None
            ),
        )

    def __post_init__(self) -> None:
        """A `promptfleet_task.json` is read from a prompt store that others write: every field is
        checked and bounded here, so a bad one refuses the adapter at load instead of failing (or
        slowing) each request. The prefix and template are bounded by the reader (`AdapterHeader`)."""
        for name, limit in (
            ("kind", MAX_NAME_CHARS),
            ("description", MAX_DESCRIPTION_CHARS),
            ("template", None),
            ("prefix", None),
            ("metric", MAX_NAME_CHARS),
        ):
            _check_text(name, getattr(self, name), limit)
        label_words = kind_of(self.kind).label_scored  # ValueError naming the kinds for an unknown one
        if not isinstance(self.verbaliser, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and (v or not label_words)
            for k, v in self.verbaliser.items()
        ):
            raise ValueError("verbaliser must map labels to non-empty strings")
        if len(self.verbaliser) > MAX_LABELS:
            raise ValueError(f"verbaliser has {len(self.verbaliser)} labels, more than {MAX_LABELS}")
        for label, words in self.verbaliser.items():
            _check_text("a verbaliser label", label, MAX_LABEL_CHARS)
            _check_text(f"the verbaliser words of label {label[:40]!r}", words, MAX_LABEL_CHARS)
        if self.max_new_tokens is not None and not (
            _positive_int(self.max_new_tokens) and self.max_new_tokens <= MAX_NEW_TOKENS
        ):
            raise ValueError(
                f"max_new_tokens must be a positive integer of at most {MAX_NEW_TOKENS}, "
                f"got {self.max_new_tokens!r:.40}"
            )
        if self.max_input_tokens is not None and not (
            _positive_int(self.max_input_tokens) and self.max_input_tokens <= MAX_INPUT_TOKENS
        ):
            raise ValueError(
                f"max_input_tokens must be a positive integer of at most {MAX_INPUT_TOKENS}, "
                f"got {self.max_input_tokens!r:.40}"
            )
        if self.score is not None and not _finite_number(self.score):
            raise ValueError(f"score must be a finite number, got {self.score!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r:.80}")
        if len(self.stop) > MAX_STOPS:
            raise ValueError(f"stop has {len(self.stop)} strings, more than {MAX_STOPS}")
        for s in self.stop:
            _check_text("a stop string", s, MAX_LABEL_CHARS)
        if not isinstance(self.extra, dict):
            raise ValueError("extra must be a mapping")
        check_template(self.template)

    @classmethod
    def from_dict(cls, data: dict) -> TaskMeta:
        if not isinstance(data, dict):
            raise ValueError(f"{TASK_META} is not a JSON object")
        known = {f.name for f in fields(cls)} - {"extra"}
        meta = cls(**{k: v for k, v in data.items() if k in known})
        meta.extra = {k: v for k, v in data.items() if k not in known and k != "name"}
        return meta

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**self.extra, **out}

    @property
    def input_fields(self) -> list[str]:
        return template_fields(self.template)

    def render(self, text: str, raw: bool = False) -> str:
        """The model input for a request's `text`, exactly as training rendered a row.

        A template with one field takes `text` as that field; one with several fields takes a JSON
        object of them (e.g. `{"premise": ..., "hypothesis": ...}`). Raises ValueError otherwise.
        """
        if raw:
            return text
        names = self.input_fields
        if not names:
            return self.prefix + text
        if len(names) == 1:
            values = {names[0]: text}
        else:
            try:
                values = json.loads(text)
            except (ValueError, RecursionError):  # RecursionError: arrays nested a thousand deep
                values = None
            if not isinstance(values, dict) or set(values) != set(names):
                raise ValueError(
                    f"this task's input has the fields {', '.join(names)}: send them as a JSON object"
                )
        try:
            rendered = render_input(self.template, self.prefix, values)
            rendered.encode("utf-8")  # JSON may spell a lone surrogate ("\\ud800") inside a field
        except UnicodeEncodeError:
            raise ValueError("the input is not valid unicode (it contains a lone surrogate)") from None
        except (KeyError, IndexError, ValueError, RecursionError) as e:
            raise ValueError(f"the task's template cannot be filled: {e}") from None
        return rendered


def _check_text(what: str, value, limit: int | None) -> None:
    """ValueError unless `value` is a string of valid unicode (JSON may spell a lone surrogate,
    "\\ud800", which no tokenizer takes) of at most `limit` characters (None: any length)."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    if limit is not None and len(value) > limit:
        raise ValueError(f"{what} has {len(value)} characters, more than {limit}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid unicode (it contains a lone surrogate)") from None


def _positive_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def _finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class TaskAdapter:
    """A task's trained prompt and the metadata needed to serve it."""

    name: str
    prompt: torch.Tensor  # [num_virtual_tokens, hidden]
    backbone: str  # base_model_name_or_path as written in adapter_config.json
    meta: TaskMeta = field(default_factory=TaskMeta)  # a dict is read with TaskMeta.from_dict

    def __post_init__(self) -> None:
        if isinstance(self.meta, dict):
            self.meta = TaskMeta.from_dict(self.meta)


@dataclass(frozen=True)
class AdapterHeader:
    """What an adapter says about itself before its prompt tensor is read (`load_adapter`'s `check`)."""

    backbone: str  # base_model_name_or_path as written in adapter_config.json
    num_virtual_tokens: int
    width: int  # the prompt's width: the backbone's hidden size it was trained for
    dtype: str  # safetensors dtype: F32, F16, BF16 or F64
    meta: TaskMeta


def peft_config_dict(num_virtual_tokens: int, backbone_config, base_model: str) -> dict:
    from peft import PromptTuningConfig

    cfg = PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=num_virtual_tokens,
        token_dim=backbone_config.hidden_size,
        num_transformer_submodules=1,
        num_attention_heads=backbone_config.num_attention_heads,
        num_layers=backbone_config.num_hidden_layers,
        base_model_name_or_path=base_model,
    )
    return cfg.to_dict()


def save_adapter(root: str | os.PathLike, adapter: TaskAdapter, backbone_config) -> Path:
    """Publish `root/<name>` atomically: a new version directory, then one pointer flip.

    Returns `root/<name>` (a symlink to the version directory; read it like a directory).
    """
    validate_name("task name", adapter.name)
    root = Path(root)
    versions = root / VERSIONS / adapter.name
    versions.mkdir(parents=True, exist_ok=True)
    # Names sort by time, so "older than the one we replace" is a string comparison.
    version = Path(tempfile.mkdtemp(prefix=f"{time.time_ns():020d}-", dir=versions))
    write_adapter_files(version, adapter, backbone_config)
    version.chmod(0o755)  # mkdtemp makes it 0700; the server may run as another user
    final = root / adapter.name
    previous = os.readlink(final) if final.is_symlink() else None
    if final.exists() and not final.is_symlink():
        # A store written before versioned publishing: move the directory under .versions once
        # (the only moment this task is briefly missing), then flip as usual.
        legacy = versions / f"{0:020d}-legacy"
        shutil.rmtree(legacy, ignore_errors=True)
        os.rename(final, legacy)
        previous = os.path.relpath(legacy, root)
    link = root / f".{adapter.name}.link-{version.name}"
    os.symlink(os.path.relpath(version, root), link)
    os.replace(link, final)  # the one atomic step: readers see the old version or the new one
    _prune(versions, version.name, keep=Path(previous).name if previous else "")
    return final


def write_adapter_files(directory: Path, adapter: TaskAdapter, backbone_config) -> None:
    """The three files of a PEFT prompt-tuning adapter, written into the existing `directory`.
    `backbone_config` needs `hidden_size`, `num_attention_heads` and `num_hidden_layers`."""
    cfg = peft_config_dict(adapter.prompt.shape[0], backbone_config, adapter.backbone)
    _write(directory / ADAPTER_CONFIG, json.dumps(cfg, indent=2, default=str).encode())
    save_file(
        {PROMPT_TENSOR: adapter.prompt.detach().float().contiguous().cpu()}, str(directory / ADAPTER_WEIGHTS)
    )
    meta = json.dumps({"name": adapter.name, **adapter.meta.to_dict()}, indent=2, default=str).encode()
    _write(directory / TASK_META, meta)


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _prune(versions: Path, current: str, keep: str) -> None:
    """Delete versions older than `current`, except `keep` (the one it replaced); a newer one
    belongs to a save still running."""
    for child in versions.iterdir():
        if child.name < current and child.name != keep:
            shutil.rmtree(child, ignore_errors=True)


def load_adapter(
    task_dir: str | os.PathLike, name: str | None = None, check: Callable[[AdapterHeader], None] | None = None
) -> TaskAdapter:
    """Read a PEFT prompt-tuning adapter directory (safetensors only).

    Args:
        task_dir: `root/<name>` (or a version directory it points to, then `name` is needed).
        name: the task's name; defaults to the directory's name.
        check: called with the adapter's `AdapterHeader` (its config, metadata and the prompt's
            dtype and shape from the safetensors header) before the prompt's data is read; it raises
            to refuse the adapter (serving refuses another width or a prompt too long this way).
    """
    name = validate_name("task name", name if name is not None else Path(task_dir).name)
    with ExitStack() as files:
        d, opened = _open_version(task_dir, files)
        weights = opened[ADAPTER_WEIGHTS]
        if weights is None:
            raise FileNotFoundError(f"{d}: no {ADAPTER_WEIGHTS} (only safetensors adapters are loaded)")
        cfg = json.loads(_read_open(opened, ADAPTER_CONFIG) or b"null")
        if not isinstance(cfg, dict) or cfg.get("peft_type") != "PROMPT_TUNING":
            peft_type = cfg.get("peft_type") if isinstance(cfg, dict) else None
            raise ValueError(f"{d}: peft_type {peft_type!r} is not PROMPT_TUNING")
        meta = _read_open(opened, TASK_META)
        meta = TaskMeta.from_dict(json.loads(meta) if meta is not None else {})
        dtype, shape, size = _prompt_header(weights, d)
        if shape[0] != cfg.get("num_virtual_tokens"):
            raise ValueError(f"{d}: {PROMPT_TENSOR} shape {tuple(shape)} does not match {ADAPTER_CONFIG}")
        backbone = cfg.get("base_model_name_or_path") or ""
        if check is not None:
            check(AdapterHeader(backbone, shape[0], shape[1], dtype, meta))
        prompt = _read_prompt(weights, d, shape, size)
    if not torch.isfinite(prompt).all():
        raise ValueError(f"{d}: {PROMPT_TENSOR} holds non-finite values")
    return TaskAdapter(name, prompt, backbone, meta)


class _HeaderRead(Exception):
    """Stops `load_adapter` at its header check (`read_adapter_header`): the data is not wanted."""

    def __init__(self, header: AdapterHeader):
        super().__init__("header read")
        self.header = header


def read_adapter_header(
    task_dir: str | os.PathLike, name: str | None = None, check: Callable[[AdapterHeader], None] | None = None
) -> AdapterHeader:
    """An adapter's `AdapterHeader` (config, metadata, the prompt's dtype and shape), passed to `check`
    first if given, as `load_adapter` reads and checks it, without reading the prompt's data."""

    def check_then_stop(header: AdapterHeader) -> None:
        if check is not None:
            check(header)
        raise _HeaderRead(header)

    try:
        load_adapter(task_dir, name, check=check_then_stop)
    except _HeaderRead as done:
        return done.header
    raise RuntimeError("load_adapter read an adapter without checking its header")


def _prompt_header(f: BinaryIO, d: Path) -> tuple[str, list[int], int]:
    """The prompt's dtype, shape [P, width] and the file's size, from the safetensors header alone
    (an 8-byte little-endian length, then that much JSON). ValueError unless the header describes
    exactly one float tensor `prompt_embeddings` whose data ends where the file ends."""
    size = os.fstat(f.fileno()).st_size
    n, header = read_safetensors_header(f, size, MAX_HEADER_BYTES, f"{d}: {ADAPTER_WEIGHTS}")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"} if isinstance(header, dict) else {}
    info = tensors.get(PROMPT_TENSOR)
    if len(tensors) != 1 or not isinstance(info, dict):
        raise ValueError(
            f"{d}: {ADAPTER_WEIGHTS} must hold one tensor `{PROMPT_TENSOR}`, it has {sorted(tensors)[:5]}"
        )
    dtype, shape = info.get("dtype"), info.get("shape")
    if not isinstance(dtype, str) or dtype not in FLOAT_BYTES:
        raise ValueError(f"{d}: {PROMPT_TENSOR} has dtype {dtype!r:.20}, not one of {', '.join(FLOAT_BYTES)}")
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(x) is int and x >= 0 for x in shape)):
        raise ValueError(f"{d}: {PROMPT_TENSOR} has shape {shape!r:.60}, not [num_virtual_tokens, width]")
    nbytes = shape[0] * shape[1] * FLOAT_BYTES[dtype]
    if info.get("data_offsets") != [0, nbytes] or size != n + nbytes:
        raise ValueError(
            f"{d}: {ADAPTER_WEIGHTS} has {size} bytes, its header describes {n + nbytes} "
            f"({PROMPT_TENSOR} {dtype} {shape}): truncated or not a safetensors file"
        )
    return dtype, shape, size


def read_safetensors_header(
    f: BinaryIO, size: int, limit: int, where: str, error=ValueError
) -> tuple[int, object]:
    """(where the data starts, the header's JSON) of the safetensors file `f` of `size` bytes: an
    8-byte little-endian length, then at most `limit` bytes of JSON. `error` (naming `where`) if the
    length is out of bounds or the JSON does not parse; what the JSON holds is the caller's to check."""
    f.seek(0)
    head = f.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 0 < n <= min(limit, size - 8):
        raise error(f"{where} has no safetensors header of at most {limit} bytes")
    try:
        return 8 + n, json.loads(f.read(n))
    except (ValueError, RecursionError):
        raise error(f"{where} has a safetensors header that is not JSON") from None


def _read_prompt(f: BinaryIO, d: Path, shape: list[int], size: int) -> torch.Tensor:
    """The prompt tensor of the safetensors file `f` whose header `_prompt_header` checked (`size`
    bytes): read whole and parsed by safetensors, which checks the header again."""
    f.seek(0)
    data = f.read(size + 1)
    if len(data) != size:
        raise ValueError(f"{d}: {ADAPTER_WEIGHTS} changed size while it was read")
    prompt = load(data)[PROMPT_TENSOR]
    if list(prompt.shape) != shape:  # rewritten in place between the two reads
        raise ValueError(f"{d}: {ADAPTER_WEIGHTS} changed while it was read")
    return prompt


def _resolve_version(task_dir: str | os.PathLike) -> Path:
    """The directory `task_dir` names now: the version `root/<name>` points to, or itself."""
    return Path(os.path.realpath(task_dir))


def _open_version(task_dir: str | os.PathLike, files: ExitStack) -> tuple[Path, dict[str, BinaryIO | None]]:
    """Resolve the published pointer once and open every adapter file of that one version (None
    for a missing one); `files` closes them.

    An open file stays readable after it is unlinked, so once opened a version cannot be lost. Two
    publishes between resolving and opening prune the resolved version (only the live one and the
    one before are kept): then the pointer has moved on, and the new version is opened instead.
    """
    for _ in range(_OPEN_ATTEMPTS):
        d = _resolve_version(task_dir)
        attempt = ExitStack()
        files.enter_context(attempt)
        opened = {}
        for fname, limit in _LIMITS.items():
            opened[fname] = open_regular(d / fname, limit)
            if opened[fname] is not None:
                attempt.enter_context(opened[fname])
        if all(f is not None for f in opened.values()) or _resolve_version(task_dir) == d:
            if not d.is_dir():  # a dangling pointer (or path), not a race: it will not come back
                link = os.path.islink(task_dir)
                raise FileNotFoundError(
                    f"{task_dir} points to {d}, which does not exist" if link else f"{d} does not exist"
                )
            return d, opened
        attempt.close()  # this version was replaced and pruned meanwhile: open the one now published
    raise FileNotFoundError(
        f"{task_dir}: each of the last {_OPEN_ATTEMPTS} versions it pointed to was deleted before "
        "its files could be opened (published faster than it can be read?)"
    )


def open_regular(path: Path, limit: int) -> BinaryIO | None:
    """`path` opened, or None if it does not exist; ValueError unless it is a regular file of at most
    `limit` bytes. Opened non-blocking and checked on the open descriptor: a FIFO or device swapped
    in would otherwise block the reader (the serving engine's thread) or never end."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        return None
    f = os.fdopen(fd, "rb")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path.name} is not a regular file")
        if st.st_size > limit:
            raise ValueError(
                f"{path.name} has {st.st_size} bytes, more than the {limit} an adapter file may have"
            )
    except BaseException:
        f.close()
        raise
    return f


def _read_open(opened: dict[str, BinaryIO | None], fname: str) -> bytes | None:
    """The bytes of the adapter file `fname` as `_open_version` opened it (None: it is missing)."""
    if opened[fname] is None:
        return None
    limit = _LIMITS[fname]
    data = opened[fname].read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{fname} grew past {limit} bytes while it was read")
    return data
