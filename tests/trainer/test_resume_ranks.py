"""A checkpoint written by 4 ranks resumes on 2 ranks or 1, and one written by 1 rank on 4, and
each ends with the uninterrupted run's weights (float64, K-FAC, real mpiexec through kfac.py).

This is what a job that lost a node, or got a smaller allocation, needs: the factors are sums
over the whole batch and the inverses are gathered into the checkpoint, so no rank owns state
that another rank count could not take over (docs/algorithm.md §6).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.checkpoint import list_checkpoints, load_checkpoint

ROOT = Path(__file__).resolve().parent.parent.parent
MPIEXEC = Path(sys.executable).parent / "mpiexec"
# The README's K-FAC recipe in float64, 10 steps an epoch; every inverse owned by a different
# rank than on 1 rank (inverse_strategy=each) so a changed rank count really moves them.
RECIPE = ["--kfac", "--num_epochs", "2", "trainer.mini_batch_size=100", "data.max_train_samples=1000",
          "data.max_test_samples=100", "trainer.dtype=float64", "optimizer=sgd", "optimizer.learning_rate=0.1",
          "kfac.damping_act=[0.01]", "kfac.damping_err=[1.0]", "kfac.inverse_dtype=float64",
          "kfac.inverse_strategy=each", "kfac.compute_interval_steps=3", "trainer.flush_denormal=false",
          "trainer.checkpoint_every_epoch=true"]

pytestmark = pytest.mark.skipif(not os.access(MPIEXEC, os.X_OK), reason="needs the venv's mpiexec")


def run(tmp: Path, ranks: int, *args: str) -> Path:
    """Trains through kfac.py with ``ranks`` ranks on this machine; returns the work dir."""
    result = subprocess.run([sys.executable, str(ROOT / "kfac.py"), "--procs-per-node", str(ranks), *RECIPE,
                             f"launcher.experiment_dir={tmp}", *args], capture_output=True, text=True,
                            timeout=300, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return Path(re.search(r"work dir: (\S+)", result.stdout + result.stderr).group(1))


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(checkpoint)["model"]


def relative_difference(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in b)


@pytest.mark.slow  # tests/trainer/test_resume.py resumes 4 ranks' checkpoint on 2 in the default run
def test_checkpoints_resume_on_another_rank_count_with_the_uninterrupted_numbers(tmp_path):
    four = run(tmp_path, 4, "launcher.job_name=four")
    one = run(tmp_path, 1, "launcher.job_name=one")
    first_epoch_4, final_4 = list_checkpoints(four / "checkpoints")[-2:]
    first_epoch_1, final_1 = list_checkpoints(one / "checkpoints")[-2:]
    assert relative_difference(weights(final_4), weights(final_1)) < 1e-9
    for ranks, start, uninterrupted in ((2, first_epoch_4, final_4), (1, first_epoch_4, final_4),
                                        (4, first_epoch_1, final_1)):
        resumed = run(tmp_path, ranks, f"trainer.resume={start}", f"launcher.job_name=resumed{ranks}")
        out = (resumed / "out.log").read_text() if (resumed / "out.log").exists() else ""
        final = list_checkpoints(resumed / "checkpoints")[-1]
        assert load_checkpoint(final)["world_size"] == ranks, out
        difference = relative_difference(weights(final), weights(uninterrupted))
        assert difference < 1e-9, (ranks, start, difference)
    # The second epoch moved the weights: the comparison is not vacuous.
    assert relative_difference(weights(first_epoch_4), weights(final_4)) > 1e-3
