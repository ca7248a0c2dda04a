"""Shared test setup: the repository root on sys.path, the ``one_thread`` fixture, and the
longest modules collected first.

Fake data and tiny trainers are in ``tests/support`` (``data.tiny_data``, ``trainers.make_trainer``,
``hooks.HookRecorder``).
"""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# As kfac.py does for its ranks (launcher/env.py), before torch loads: OpenMP threads that wait
# by spinning take the cores from the tests' other processes.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def pytest_configure(config):
    # On pytest-xdist's workers (`make test`), one torch thread each: the workers and the ranks
    # they start share the cores already.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture
def one_thread():
    """One torch thread during the test: the machine may be busy, and tiny runs thrash on several."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# `make test` runs the modules on two workers (pytest-xdist, whole modules each): started first, the
# longest ones (real ranks, emulated nodes, many-step runs) end beside the short ones, not after them.
LONGEST_FIRST = ("tests/launcher/test_node_loss.py",
                 "tests/launcher/test_two_nodes.py", "tests/trainer/test_ranks.py", "tests/trainer/test_resume.py",
                 "tests/test_ctrl_c.py", "tests/models/test_user_models.py", "tests/test_validators.py",
                 "tests/launcher/test_preemption.py", "tests/trainer/test_accumulate.py", "tests/test_torchrun.py")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        path = os.path.relpath(str(item.path), ROOT)
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a module, and of the other modules, stays
