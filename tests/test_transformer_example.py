"""The README's transformer example (a user's own model in a plain loop): under torchrun on 2
processes with DDP it gives one process's weights, in float64 (docs/algorithm.md §6)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def run(cmd: list[str]) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_transformer_example_on_two_processes_gives_one_process_weights(tmp_path: Path) -> None:
    example = [str(ROOT / "examples/transformer_kfac.py"), "--steps", "4", "--dtype", "float64",
               "--weight-sharing", "reduce"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    jobs = [subprocess.Popen([*prefix, *example, "--save", str(tmp_path / name)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
            for prefix, name in (([sys.executable], "one.pt"), (torchrun, "two.pt"))]
    outputs = []
    for job in jobs:
        out, err = job.communicate(timeout=300)
        assert job.returncode == 0, out[-3000:] + err[-3000:]
        outputs.append(out)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert set(one) == set(two) and "encoder.layers.0.self_attn.in_proj_weight" in one  # PyTorch's keys
    worst = max(float((two[k] - one[k]).norm() / one[k].norm()) for k in one)
    print(f"torchrun 2 processes vs 1: max relative weight difference {worst:.2e}")
    assert worst < 1e-9
    assert "layer encoder.layers.0.self_attn.in_proj (linear): A 65x65, G 192x192" in outputs[0]
    assert "layer position (embedding): A 28 (diagonal), G 64x64" in outputs[0]
