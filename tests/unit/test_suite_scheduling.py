"""`make test` runs two pytest-xdist workers with conftest's scheduler: a module never spans two workers (its
module fixtures would be built twice), and the modules of the shared Ray cluster are one unit (two workers
would each start a cluster, and `local_ray.shared_cluster` stops it after the last of them in collection order)."""

import pytest
from conftest import REPO, SHARED_RAY_MODULES, pytest_xdist_make_scheduler

pytest.importorskip("xdist")


class _Config:
    def __init__(self, dist: str):
        self.dist = dist

    def getvalue(self, name):
        return {"dist": self.dist, "tx": ["2*popen"]}.get(name)

    option = type("Option", (), {"loadscopereorder": False})()


def _scheduler():
    from xdist.scheduler import LoadScopeScheduling

    sched = pytest_xdist_make_scheduler(_Config("loadscope"), log=None)
    assert isinstance(sched, LoadScopeScheduling)
    return sched


def test_the_shared_clusters_modules_are_one_unit_and_other_modules_their_own():
    split = _scheduler()._split_scope
    shared = {split(f"{m}::test_a") for m in SHARED_RAY_MODULES} | {
        split(f"{m}::test_b[x]") for m in SHARED_RAY_MODULES
    }
    assert len(shared) == 1
    assert split("tests/distributed/test_multi_node.py::test_a") == "tests/distributed/test_multi_node.py"
    assert split("tests/unit/test_config.py::TestX::test_y[a::b]") == "tests/unit/test_config.py"
    assert split("tests/unit/test_config.py::test_y") != split("tests/unit/test_layout.py::test_y")


def test_other_distribution_modes_keep_xdists_scheduler():
    assert pytest_xdist_make_scheduler(_Config("load"), log=None) is None


def test_the_shared_modules_exist_and_ask_for_the_shared_cluster():
    for module in SHARED_RAY_MODULES:
        text = (REPO / module).read_text()
        assert "shared_cluster(request)" in text, module
    others = {
        p.relative_to(REPO).as_posix()
        for p in (REPO / "tests" / "distributed").glob("test_*.py")
        if "shared_cluster(request)" in p.read_text()
    }
    assert others == SHARED_RAY_MODULES
