"""A step's captures (and the autograd graph their gradient edges hold) are freed after the step.

A capture keeps its output's gradient edge (kfac.fisher=mc differentiates through it), and that
edge's autograd node keeps the hook that points back at the capture: a cycle through C++ that
Python's collector cannot break, so every step's activations stayed alive (a 3000-sample MLP
grew by ~50 MB a step). The recorder drops the edges once the step has taken its captures.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

from kfac_callback import KFACCallback
from models import build_model


@pytest.mark.parametrize("options", [{}, {"skip_weight_grad": True}, {"fisher": "mc"}])
def test_a_steps_captures_die_after_the_next_steps(options):
    torch.manual_seed(0)
    model = build_model("mlp")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    cb = KFACCallback(model, printer=lambda line: None, damping_act=[0.03], damping_err=[1.0], **options)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    first = []
    for step in range(4):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if step == 0:
            first = [weakref.ref(c) for calls in cb.capture.calls.values() for c in calls]
        cb.sample_fisher(logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        cb.step()
        optimizer.step()
    del logits, loss
    gc.collect()
    assert first and all(ref() is None for ref in first), "a step's captures outlived it"
