"""The models users bring, through ``kfac.py`` with K-FAC on 2 real MPI ranks: the ViT (its attention
swapped for ours, LayerNorm, Linear on tokens), the ResNet (BatchNorm) and its depthwise variant
(grouped convolutions), every layer preconditioned or named (docs/algorithm.md §3, "Layers")."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kfac_callback import KFACCallback
from models import build_model

ROOT = Path(__file__).resolve().parent.parent.parent
EXPECTED = {
    "vit": ["layer blocks.0.self_attn.in_proj (linear): A 65x65, G 192x192", "layer blocks.1.norm2 (layernorm)",
            "layer patches (conv2d): A 50x50", "layer blocks.0.self_attn (MultiheadAttention): runs as "
            "kfac_callback.MultiheadAttention", "left to the base optimizer (no K-FAC block for this type): ViT model"],
    "resnet": ["layer stages.2.shortcut.1 (batchnorm)", "layer stages.2.second.0 (conv2d): A 576x576"],
    "resnet_dw": ["layer stages.0.first.0 (conv2d): A 144x144, G 16x16"],
}


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """One 2-rank K-FAC epoch per model, the three jobs at once (independent processes)."""
    jobs = {}
    for name in EXPECTED:
        out = tmp_path_factory.mktemp(name)
        cmd = [sys.executable, str(ROOT / "kfac.py"), "--model", name, "--kfac", "--procs-per-node", "2",
               "--num_epochs", "1", "--mini_batch_size", "50", "data.max_train_samples=100",
               "data.max_test_samples=50", "trainer.num_threads=1", f"launcher.experiment_dir={out}"]
        jobs[name] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT), out)
    done = {}
    for name, (proc, out) in jobs.items():
        stdout, stderr = proc.communicate(timeout=300)
        done[name] = (subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), out)
    return done


@pytest.mark.parametrize("name", list(EXPECTED))
def test_model_trains_with_kfac_on_two_ranks_and_names_every_layer(name: str, two_rank_runs) -> None:
    result, out = two_rank_runs[name]
    assert result.returncode == 0, result.stderr[-2000:]
    for line in EXPECTED[name]:
        assert line in result.stdout, line
    assert "model0 (instance 0) test accuracy : " in result.stdout
    assert "hooks did not fire" not in result.stdout
    (work_dir,) = out.iterdir()
    (record,) = [json.loads(x) for x in (work_dir / "metrics.jsonl").read_text().splitlines()]
    assert record["step"] == 2 and math.isfinite(record["train_objective"])
    assert "ranks=2" in result.stdout  # the options line: K-FAC ran on both ranks


@pytest.mark.parametrize("name", ["vit", "resnet", "resnet_dw"])
def test_every_parameter_is_preconditioned_or_named(name: str) -> None:
    model = build_model(name)
    cb = KFACCallback(model, printer=lambda s: None)
    covered = {id(p) for b in cb.blocks.values() for p in b.parameters()}
    lines = "\n".join(cb.setup_lines())
    for pname, p in model.named_parameters():
        owner = pname.rpartition(".")[0] or "model"
        assert id(p) in covered or f" {owner}" in lines, pname
    x = torch.randn(4, 1, 28, 28)
    assert model(x).shape == (4, 10)
