"""The container image's install steps, read from the Dockerfile: what they pin, and a run of them here.

The Dockerfile must install what `make setup` installs, the tested set: the lock files with their hashes,
torch from PyTorch's CPU index, the project `--no-deps`. Two checks read the Dockerfile through this module:

- `tests/unit/test_image_lock.py`: every package a `pip install` there names is pinned by the locks (or, for
  pip and torch, which the locks leave out, by the Makefile's pins), every requirement file it installs is a
  lock, installed `--no-deps --require-hashes`, and no step resolves versions (`install_problems`);
- `make image-check` (`python -m cluster.image`): runs the Dockerfile's RUN steps (its `pip` and `python`
  commands) in a fresh virtualenv on this machine, with the files its COPY lines copy and its ENV paths
  placed under a temporary root, then compares what was installed with the locks, runs `pip check` and
  imports the stack (`run_install_steps`, `verify_installed`).

It builds no image and needs no Docker: the base image's own packages are not there, and RUN commands other
than `pip` and `python` (chmod) only make sense inside the image; they are listed as skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import venv
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
LOCKS = ("requirements.lock", "requirements-backbone.lock")
# Installed without --no-deps only when they have no dependencies to resolve.
NO_DEPENDENCIES = {"pip"}
# pip options that take a value (the next token), as the Dockerfile and the Makefile use them.
VALUE_OPTIONS = {
    "-r": "--requirement",
    "--requirement": "--requirement",
    "-c": "--constraint",
    "--constraint": "--constraint",
    "-e": "--editable",
    "--editable": "--editable",
    "-i": "--index-url",
    "--index-url": "--index-url",
    "--extra-index-url": "--extra-index-url",
    "-f": "--find-links",
    "--find-links": "--find-links",
}


@dataclass(frozen=True)
class PipInstall:
    """One `pip install` command: its flags, its options with values, and the packages it names."""

    flags: frozenset[str]
    options: dict[str, tuple[str, ...]]  # long option name -> its values, in order
    packages: tuple[str, ...]  # positional requirement specs

    @classmethod
    def parse(cls, argv: list[str]) -> PipInstall:
        """From the tokens after `pip install`."""
        flags, options, packages = set(), {}, []
        tokens = iter(argv)
        for tok in tokens:
            name, eq, value = tok.partition("=")
            if name in VALUE_OPTIONS:
                key = VALUE_OPTIONS[name]
                options[key] = (*options.get(key, ()), value if eq else next(tokens))
            elif tok.startswith("-"):
                flags.add(tok)
            else:
                packages.append(tok)
        return cls(frozenset(flags), options, tuple(packages))

    @property
    def requirement_files(self) -> tuple[str, ...]:
        return self.options.get("--requirement", ())

    @property
    def local_projects(self) -> tuple[str, ...]:
        """Directories installed (editable or not): `.`, `-e .`."""
        plain = tuple(p for p in self.packages if p.startswith((".", "/")))
        return self.options.get("--editable", ()) + plain

    def summary(self) -> tuple:
        """What the command installs and how, without options that only say where from or how loudly."""
        pins = tuple(sorted(p for p in self.packages if p not in self.local_projects))
        return (
            pins,
            self.requirement_files,
            self.local_projects,
            "--no-deps" in self.flags,
            "--require-hashes" in self.flags,
        )


@dataclass
class Dockerfile:
    """The parts of a Dockerfile the checks need, with ARG defaults substituted into the commands."""

    args: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    # In order: ("copy", (src..., dest)) and ("run", (token, ...)), one entry per `&&`-joined command.
    steps: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)

    @classmethod
    def read(cls, path: str | Path) -> Dockerfile:
        df = cls()
        text = re.sub(r"\\\n", " ", Path(path).read_text())
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            instr, _, rest = line.partition(" ")
            instr, rest = instr.upper(), df.substitute(rest.strip())
            if instr == "ARG":
                name, _, default = rest.partition("=")
                df.args[name] = default
            elif instr == "ENV":
                for item in shlex.split(rest):
                    key, _, value = item.partition("=")
                    df.env[key] = value
            elif instr == "WORKDIR":
                df.workdir = rest
            elif instr == "COPY":
                df.steps.append(("copy", tuple(shlex.split(rest))))
            elif instr == "RUN":
                for command in rest.split("&&"):
                    df.steps.append(("run", tuple(shlex.split(command))))
        return df

    def substitute(self, text: str) -> str:
        """`${NAME}` and `$NAME` replaced by ARG defaults or ENV values (an unknown name is an error)."""

        def value(m: re.Match) -> str:
            name = m.group(1) or m.group(2)
            known = {**self.args, **self.env}
            if name not in known:
                raise ValueError(f"Dockerfile: ${name} has no ARG default or ENV value")
            return known[name]

        return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, text)

    def pip_installs(self) -> list[PipInstall]:
        return [PipInstall.parse(list(argv[2:])) for kind, argv in self.steps if _is_pip_install(kind, argv)]


def _is_pip_install(kind: str, argv: tuple[str, ...]) -> bool:
    return kind == "run" and argv[:2] == ("pip", "install")


def lock_pins(path: str | Path) -> dict[str, str]:
    """Canonical package name -> exact version, for every `name==version` entry of a lock file."""
    pins = {}
    for line in Path(path).read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)", line)
        if m:
            pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def makefile_variables(path: str | Path) -> dict[str, str]:
    """`NAME := value` / `?=` / `=` assignments of a Makefile, `$(NAME)` references expanded."""
    out: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        m = re.match(r"^([A-Z_]+)\s*[:?]?=\s*(.*?)\s*$", line)
        if m:
            out[m.group(1)] = re.sub(r"\$\((\w+)\)", lambda r: out.get(r.group(1), ""), m.group(2))
    return out


def makefile_setup_installs(path: str | Path, target: str = "$(VENV)/.installed") -> list[PipInstall]:
    """The `$(PIP) install` commands of the Makefile's setup recipe (`target`), variables expanded."""
    variables = makefile_variables(path)
    installs, inside = [], False
    for line in Path(path).read_text().splitlines():
        if not line.startswith("\t"):
            inside = line.startswith(f"{target}:")
            continue
        m = re.match(r"^\t\$\(PIP\) install (.*)$", line)
        if m and inside:
            expanded = re.sub(r"\$\((\w+)\)", lambda r: variables[r.group(1)], m.group(1))
            installs.append(PipInstall.parse(shlex.split(expanded)))
    return installs


def extra_pins(makefile: str | Path) -> dict[str, str]:
    """The pins the locks leave out and the Makefile holds (pip, torch): name -> version."""
    variables = makefile_variables(makefile)
    pins = {}
    for key in ("PIP_VERSION", "TORCH"):
        req = Requirement(variables[key])
        (spec,) = req.specifier
        pins[canonicalize_name(req.name)] = spec.version
    return pins


def install_problems(
    installs: list[PipInstall], locks: dict[str, dict[str, str]], pins: dict[str, str]
) -> list[str]:
    """What in `installs` is not the locked set: each problem one line (empty: all pinned).

    `locks`: lock file name -> its pins; `pins`: the versions the locks leave out (pip, torch)."""
    locked = {name: v for lock in locks.values() for name, v in lock.items()}
    problems, installed_files = [], set()
    for inst in installs:
        for spec in inst.packages:
            if spec in inst.local_projects:
                continue
            req = Requirement(spec)
            name, specs = canonicalize_name(req.name), list(req.specifier)
            want = locked.get(name, pins.get(name))
            if len(specs) != 1 or specs[0].operator != "==" or "*" in specs[0].version:
                problems.append(f"{spec}: not an exact version (the locks pin {want or 'nothing for it'})")
            elif want is None:
                problems.append(f"{spec}: not in the locks ({', '.join(locks)})")
            elif specs[0].version != want:
                problems.append(f"{spec}: the locks pin {name}=={want}")
            if "--no-deps" not in inst.flags and name not in NO_DEPENDENCIES:
                problems.append(f"{spec}: installed without --no-deps (pip would resolve its dependencies)")
        for project in inst.local_projects:
            if "--no-deps" not in inst.flags:
                problems.append(
                    f"project {project}: installed without --no-deps (pip would resolve pyproject's ranges)"
                )
        for file in inst.requirement_files:
            installed_files.add(Path(file).name)
            if Path(file).name not in locks:
                problems.append(f"-r {file}: not a lock file ({', '.join(locks)})")
            if not {"--no-deps", "--require-hashes"} <= inst.flags:
                problems.append(f"-r {file}: installed without --no-deps --require-hashes")
    problems += [f"{lock}: never installed" for lock in locks if lock not in installed_files]
    return problems


def _under(root: Path, path: str) -> Path:
    """Where the image's absolute `path` lies in this check's stand-in root."""
    return root / path.lstrip("/")


def run_install_steps(df: Dockerfile, root: Path, repo: Path = REPO, log=print) -> Path:
    """Run `df`'s COPY and RUN steps into a fresh virtualenv under `root`; returns the venv.

    `pip` and `python` commands run with the venv's interpreter, in the stand-in WORKDIR, with the
    Dockerfile's ENV (absolute paths placed under `root`). Raises CalledProcessError on a failing step."""
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    python = str(env_dir / "bin" / "python")
    workdir = _under(root, df.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PROMPTFLEET_CACHE")}
    env.update({k: str(_under(root, v)) if v.startswith("/") else v for k, v in df.env.items()})
    env.update(VIRTUAL_ENV=str(env_dir), PATH=f"{env_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    for kind, argv in df.steps:
        if kind == "copy":
            *sources, dest = argv
            for src in sources:
                target = workdir / dest if dest not in (".", "./") else workdir / Path(src).name
                if (repo / src).is_dir():
                    shutil.copytree(repo / src, target, dirs_exist_ok=True)
                else:
                    shutil.copy2(repo / src, target)
            continue
        if argv[0] not in ("pip", "python"):
            log(f"image-check: skipped (Docker only): {shlex.join(argv)}")
            continue
        cmd = [python, "-m", "pip", *argv[1:]] if argv[0] == "pip" else [python, *argv[1:]]
        log(f"image-check: $ {shlex.join(argv)}")
        subprocess.run(cmd, cwd=workdir, env=env, check=True)
    return env_dir


_INSTALLED = (
    "import importlib.metadata as m, json; "
    "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"
)
_IMPORTS = (
    "import torch, deepspeed, transformers, peft, ray.train, ray.serve; "
    "import tuner.recipe, cluster.launch, serving.api, serving.ray_app; "
    "assert torch.version.cuda is None, 'torch is a CUDA build'; print('imports ok, torch', torch.__version__)"
)


def verify_installed(
    env_dir: Path, locks: dict[str, dict[str, str]], pins: dict[str, str], workdir: Path
) -> list[str]:
    """What the venv holds that differs from the locked set, `pip check`'s complaints, failed imports."""
    python = str(env_dir / "bin" / "python")
    out = subprocess.run([python, "-c", _INSTALLED], capture_output=True, text=True, check=True).stdout
    installed = {canonicalize_name(k): v for k, v in json.loads(out).items()}
    wanted = {name: v for lock in locks.values() for name, v in lock.items()} | pins
    problems = []
    for name, version in sorted(wanted.items()):
        have = installed.get(name)
        if have is None or have.split("+")[0] != version:
            problems.append(f"{name}: installed {have}, pinned {version}")
    extra = sorted(set(installed) - set(wanted) - {"promptfleet"})
    problems += [f"{name}=={installed[name]}: installed but not in the locks" for name in extra]
    check = subprocess.run([python, "-m", "pip", "check"], capture_output=True, text=True)
    # The backbone lock's packages are installed without their own dependencies on purpose (the GGUF file
    # is all that is read: DESIGN.md), so pip check's word on them is expected.
    without_deps = set(locks.get(LOCKS[1], {}))
    problems += [
        f"pip check: {line}"
        for line in check.stdout.splitlines()
        if line.strip() and canonicalize_name(line.split()[0]) not in without_deps
    ]
    smoke = subprocess.run([python, "-c", _IMPORTS], cwd=workdir, capture_output=True, text=True)
    if smoke.returncode:
        problems.append(f"imports: {(smoke.stderr.strip().splitlines() or ['failed'])[-1]}")
    return problems


def image_check(dockerfile: Path, repo: Path = REPO, keep: Path | None = None) -> int:
    """`make image-check`: the Dockerfile's install steps in a fresh virtualenv, then what they installed."""
    df = Dockerfile.read(dockerfile)
    locks = {name: lock_pins(repo / name) for name in LOCKS}
    pins = extra_pins(repo / "Makefile")
    problems = install_problems(df.pip_installs(), locks, pins)
    root = keep or Path(tempfile.mkdtemp(prefix="promptfleet-image-check-"))
    try:
        env_dir = run_install_steps(df, root, repo)
        problems += verify_installed(env_dir, locks, pins, _under(root, df.workdir))
    except subprocess.CalledProcessError as e:
        problems.append(f"step failed (exit {e.returncode}): {shlex.join(map(str, e.cmd))}")
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)
    n = sum(len(lock) for lock in locks.values())
    if problems:
        print(f"image-check: {len(problems)} problem(s):", *problems, sep="\n  ", file=sys.stderr)
        return 1
    print(
        f"image-check: ok: every RUN pip/python step of {dockerfile.name} ran in a fresh virtualenv; it holds the "
        f"{n} locked versions exactly, {', '.join(f'{k} {v}' for k, v in pins.items())}, the project, nothing else; "
        "pip check clean (the backbone wheel runs without its own dependencies, on purpose); torch is the CPU "
        "build; the stack imports"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.image", description=__doc__.split("\n\n")[0])
    p.add_argument("--dockerfile", type=Path, default=REPO / "Dockerfile")
    p.add_argument(
        "--keep", type=Path, default=None, help="build the venv here and keep it (default: a temp dir)"
    )
    args = p.parse_args(argv)
    return image_check(args.dockerfile, REPO, args.keep)


if __name__ == "__main__":
    sys.exit(main())
