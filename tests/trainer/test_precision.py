"""trainer.precision: bf16 autocast on CPU trains the MLP and the CNN with K-FAC, whose factors and
inverses stay float32 (docs/algorithm.md §3); fp16 needs a GPU (tested where CUDA exists)."""

from __future__ import annotations

import pytest
import torch

from kfac_callback import KFACCallback
from tests.support.data import real_mnist
from tests.support.trainers import make_trainer
from trainer.config import precision_errors
from trainer.data.mnist import load_mnist
from trainer.precision import make_precision


class Seen(KFACCallback):
    """Records the dtypes K-FAC saw: the captured rows, the factors and the inverses."""

    def step(self, shares=None, learning_rate=None, batch=None):
        self.rows = {n: (c.a.dtype, c.g.dtype) for n, c in self.capture.captures.items() if c.g is not None}
        super().step(shares, learning_rate, batch)
        self.factor_dtypes = {m.dtype for b in self.blocks.values() for m in b.factors()}
        self.inverse_dtypes = {m.dtype for b in self.blocks.values() for f in b.factor_names
                               if (m := getattr(b, f"{f}_inv")) is not None}


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_bf16_autocast_trains_with_float32_factors(model, one_thread):
    data = real_mnist(400, 100)
    trainer = make_trainer(data=data, batch=50, model=model, optimizer="sgd", precision="bf16", epochs=2,
                           test_every_epoch=True)
    cb = Seen(trainer.model, damping_act=0.01, damping_err=1.0, printer=lambda s: None)
    trainer.callbacks.append(cb)
    cb.on_setup_end(trainer)
    history = trainer.fit()
    last = "ip3" if model == "mlp" else "ip2"
    assert cb.rows[last] == (torch.bfloat16, torch.bfloat16)  # the forward ran in bf16
    assert cb.factor_dtypes == cb.inverse_dtypes == {torch.float32}
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert history[-1]["train_objective"] < history[0]["train_objective"] < 2.3
    assert history[-1]["test_accuracy"] > 60


def test_fp16_needs_a_gpu_and_autocast_float32_weights():
    with pytest.raises(ValueError, match="fp16 with a loss scaler is for GPUs.*use trainer.precision=bf16"):
        make_precision("fp16", torch.device("cpu"))
    assert precision_errors("bf16", "float64", "auto") == [
        "trainer.precision=bf16: autocast needs float32 weights, but trainer.dtype=float64; use "
        "trainer.dtype=float32, or trainer.precision=fp32"]
    assert precision_errors("fp16", "float32", "cpu")[0].startswith("trainer.precision=fp16: fp16 with a loss scaler")
    assert precision_errors("fp32", "float64", "cpu") == precision_errors("bf16", "float32", "cpu") == []


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast with a GradScaler is for GPUs")
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_fp16_with_a_grad_scaler_on_a_gpu(model):
    """fp16 on CUDA: the scaler's first steps overflow (scale 65536) and are skipped by the scaler
    and by K-FAC; the factors stay float32 and finite, and the run learns."""
    from kfac_callback.base import SingleProcess
    from models import build_model
    from trainer.optimizers import OptimizerConfig, build_optimizer
    from trainer.trainer import Trainer

    data = load_mnist(None, 1000, 200, fetch=False)
    device = torch.device("cuda")
    torch.manual_seed(0)
    net = build_model(model).to(device)
    opt = build_optimizer(OptimizerConfig(name="sgd", learning_rate=0.1), net.parameters())
    cb = Seen(net, damping_act=0.01, damping_err=1.0, printer=lambda s: None)
    lines: list[str] = []
    trainer = Trainer(net, opt, data, epochs=2, mini_batch_size=100, callbacks=[cb], comm=SingleProcess(),
                      device=device, seed=1, log=lines.append, precision="fp16", test_every_epoch=True)
    assert cb.grad_scaler is trainer.grad_scaler is not None
    history = trainer.fit()
    assert cb.rows[("ip3" if model == "mlp" else "ip2")][1] == torch.float16
    assert cb.factor_dtypes == {torch.float32}
    assert all(bool(torch.isfinite(m).all()) for b in cb.blocks.values() for m in b.factors())
    assert cb.steps + trainer.overflows == trainer.step and cb.skipped_steps == 0  # the trainer skipped them
    assert history[-1]["test_accuracy"] > 80
