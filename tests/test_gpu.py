"""The GPU paths, where CUDA exists (``-m cuda``; ``benchmarks/gpu_check.sh`` runs them): a device
per local rank, NCCL across the GPUs there are (the DDP example under torchrun, and ``kfac.py``'s
own ranks) against one process, and a real fp16 run with its loss scaler and LBANN's GPU
memory line. The fp16 numbers themselves: ``tests/trainer/test_precision.py``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
ENV = dict(os.environ, PYTHONPATH=str(ROOT))
# float64 on GPUs: reductions split differently over ranks agree to about 1e-12, not bit for bit.
TOLERANCE = 1e-7
# 10 K-FAC steps in float64 on real MNIST (tests/trainer/test_ranks.py's run).
COMMON = ["--num_epochs", "1", "trainer.mini_batch_size=100", "data.max_train_samples=1000",
          "data.max_test_samples=100", "trainer.dtype=float64", "kfac.enabled=true", "optimizer=sgd",
          "optimizer.learning_rate=0.1", "kfac.damping_act=[0.01]", "kfac.damping_err=[1.0]",
          "kfac.inverse_dtype=float64", "trainer.progress=false", "trainer.device=cuda"]

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(GPUS == 0, reason="needs a CUDA device")]


def run(cmd: list[str]) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def max_relative_difference(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(((a[k].double().cpu() - b[k].double().cpu()).norm() / b[k].double().cpu().norm()).item() for k in b)


def test_each_local_rank_trains_on_its_own_gpu():
    from trainer.run import choose_device

    for local_rank in range(GPUS + 1):
        device = choose_device("auto", local_rank)
        assert device == torch.device("cuda", local_rank % GPUS)
        assert torch.cuda.current_device() == local_rank % GPUS
    assert choose_device("cpu", 0) == torch.device("cpu")


def test_the_ddp_example_under_nccl_on_every_gpu_gives_one_process_weights(tmp_path):
    example = [str(ROOT / "examples/ddp_kfac.py"), "--steps", "10", "--dtype", "float64"]
    run([PYTHON, *example, "--save", str(tmp_path / "one.pt")])
    torchrun = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(GPUS)]
    run([*torchrun, *example, "--save", str(tmp_path / "all.pt")])
    worst = max_relative_difference(torch.load(tmp_path / "all.pt"), torch.load(tmp_path / "one.pt"))
    print(f"DDP + K-FAC under torchrun, NCCL on {GPUS} GPU(s) vs 1 process: max relative difference {worst:.2e}")
    assert worst < TOLERANCE


@pytest.mark.skipif(GPUS < 2, reason="NCCL across GPUs needs two of them")
def test_kfac_py_ranks_on_every_gpu_with_nccl_give_one_ranks_weights(tmp_path):
    from trainer.checkpoint import load_checkpoint, newest_checkpoint

    weights = {}
    for ranks in (1, GPUS):
        out = run([PYTHON, str(ROOT / "kfac.py"), *COMMON, "--procs-per-node", str(ranks), "trainer.backend=nccl",
                   f"launcher.experiment_dir={tmp_path / str(ranks)}"])
        work_dir = Path(re.search(r"^work dir: (.+)$", out, re.M).group(1))
        weights[ranks] = load_checkpoint(newest_checkpoint(work_dir))["model"]
        assert "Model 0 GPU memory usage statistics" in out
    worst = max_relative_difference(weights[GPUS], weights[1])
    print(f"kfac.py, {GPUS} ranks with NCCL vs 1 rank: max relative difference {worst:.2e}")
    assert worst < TOLERANCE


def test_a_real_fp16_run_scales_its_loss_and_prints_the_gpu_memory_line(tmp_path):
    out = run([PYTHON, str(ROOT / "kfac.py"), "--kfac", "--num_epochs", "1", "data.max_train_samples=2000",
               "trainer.precision=fp16", "trainer.device=cuda", "trainer.progress=false",
               f"launcher.experiment_dir={tmp_path}"])
    assert re.search(r"^Model 0 GPU memory usage statistics : \S+ GiB current, \S+ GiB peak", out, re.M), out
    accuracy = float(re.search(r"test accuracy : ([\d.]+)%", out).group(1))
    assert accuracy > 80, out
