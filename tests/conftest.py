"""Shared test setup: the repository root on sys.path, and the ``one_thread`` fixture.

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


@pytest.fixture
def one_thread():
    """One torch thread during the test: the machine may be busy, and tiny runs thrash on several."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
