"""`promptfleet export`: a run's adapters in another form, from either store format.

    promptfleet export runs/fleet --task sst2 --peft out/sst2     # one task as a PEFT adapter directory
    promptfleet export runs/fleet --packed stores/fleet           # every task into a packed store
    promptfleet export runs/fleet --dirs stores/fleet-dirs        # every task as a PEFT directory

A run of many tasks exports one packed store (`tuner.prompt_store`), which `peft` cannot load: `--peft`
writes one task of it (or of a per-task store) as the three files `tuner.export.save_adapter` writes,
loadable by `peft.PeftModel.from_pretrained`. `--packed` into an existing packed store rewrites only
the shards whose tasks changed (a serving store can be refreshed from each new run).

Mistakes (an unknown task, a directory that is not empty) are one line and exit 2. This module
writes no format of its own: the writers are `tuner.export` and `tuner.prompt_store`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

from tuner.config import ConfigError, shown

HELP = "write a run's task as a PEFT adapter, or its adapters as a packed store or per-task directories"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help=HELP,
        description=__doc__.split("\n\n")[0] + " RUN_DIR is a run directory (its adapters/ are read) or "
        "a prompt store itself; either store format is read.",
        epilog="\n\n".join(__doc__.split("\n\n")[1:3]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished run directory, or a prompt store")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--peft", metavar="DIR", help="write --task as a PEFT prompt-tuning adapter into DIR")
    what.add_argument(
        "--packed",
        metavar="OUT",
        help="write every task into the packed store OUT (it then holds exactly these)",
    )
    what.add_argument("--dirs", metavar="OUT", help="write every task as OUT/<task>/ (PEFT directories)")
    p.add_argument("--task", metavar="NAME", help="the task to write (with --peft)")
    p.add_argument(
        "--force", action="store_true", help="--peft: overwrite the adapter files in a non-empty DIR"
    )
    p.set_defaults(func=_export_command)


def _export_command(args: argparse.Namespace) -> int:
    from tuner.run_adapters import AdapterStore

    store = AdapterStore(store_root(args.run_dir))
    if args.peft is not None:
        if not args.task:
            raise ConfigError("export: --peft needs --task NAME (the task to write)")
        out = export_peft(store, args.task, args.peft, force=args.force)
        print(f"wrote task {args.task} to {out}")
    elif args.task:
        raise ConfigError("export: --task goes with --peft (--packed and --dirs write every task)")
    else:
        out = Path(args.packed or args.dirs)
        if out.resolve() == store.root.resolve():
            raise ConfigError(f"export: {out} is the store being read: write to another directory")
        convert(store, out, packed=args.packed is not None)
        print(f"wrote {len(store.names)} tasks to {out}")
    return 0


def store_root(run_dir: str | os.PathLike) -> Path:
    """The prompt store of `run_dir`: its adapters/ for a run directory, else `run_dir` itself."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ConfigError(
            f"export: {shown(run_dir)} is not a directory (give a run directory or a prompt store)"
        )
    return path / "adapters" if (path / "adapters").is_dir() else path


def backbone_config(store, name: str) -> SimpleNamespace:
    """What PEFT's config needs of the backbone (width, heads, layers), as the store recorded it: a
    packed store's index, or the task's own adapter_config.json."""
    if store.index is not None:
        return store.index.backbone_config()
    from tuner.export import ADAPTER_CONFIG, MAX_CONFIG_BYTES, open_regular

    path = store.root / name / ADAPTER_CONFIG
    f = open_regular(path, MAX_CONFIG_BYTES)
    if f is None:
        raise FileNotFoundError(f"{path} does not exist")
    with f:
        cfg = json.loads(f.read(MAX_CONFIG_BYTES + 1) or b"null")
    keys = {
        "hidden_size": "token_dim",
        "num_attention_heads": "num_attention_heads",
        "num_hidden_layers": "num_layers",
    }
    if not isinstance(cfg, dict) or not all(isinstance(cfg.get(v), int) for v in keys.values()):
        raise ConfigError(f"{path} lacks {', '.join(keys.values())}")
    return SimpleNamespace(**{k: cfg[v] for k, v in keys.items()})


def _adapter(store, name: str):
    try:
        return store.adapter(name)
    except KeyError:
        some = ", ".join(store.names[:3]) + (", ..." if len(store.names) > 3 else "")
        raise ConfigError(
            f"export: no task {shown(name)} in {store.root}: it has {len(store.names)} tasks ({some})"
        ) from None


def export_peft(store, name: str, out: str | os.PathLike, *, force: bool = False) -> Path:
    """Task `name` of `store` (a `tuner.run_adapters.AdapterStore`) written into directory `out` as a
    PEFT prompt-tuning adapter. `out` must not exist or be empty; `force` overwrites the adapter's
    files in a non-empty one (other files stay). Each file is renamed into place whole."""
    from tuner.export import write_adapter_files

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"export: {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(
            f"export: {out} exists and is not empty (--force overwrites the adapter files in it)"
        )
    adapter = _adapter(store, name)
    config = backbone_config(store, name)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    try:
        write_adapter_files(tmp, adapter, config)
        for f in sorted(tmp.iterdir()):
            f.chmod(0o644)
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def convert(store, out: Path, *, packed: bool) -> None:
    """Every task of `store` written to `out`: one packed store, or a directory per task."""
    from tuner.run_adapters import export_adapters

    if not store.names:
        raise ConfigError(f"export: {store.root} holds no tasks")
    config = backbone_config(store, store.names[0])
    export_adapters(out, (store.adapter(n) for n in store.names), config, packed)
