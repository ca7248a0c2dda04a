"""The callback end to end: hooks, schedules, robustness, printing, checkpoints, two ranks."""

from __future__ import annotations

import copy
import io
from collections import OrderedDict
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_callback import KFACCallback, KFACConfig
from kfac_callback.base import Callback
from tests.support.threads import ThreadComm, run_ranks

D = torch.float64


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, 3, 3, padding=1),
        bn1=nn.BatchNorm2d(3),
        relu=nn.ReLU(inplace=True),
        pool=nn.MaxPool2d(2),
        flat=nn.Flatten(),
        ip1=nn.Linear(3 * 4 * 4, 5),
        act=nn.Tanh(),
        ip2=nn.Linear(5, 3, bias=False),
    )).to(D)


def batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, dtype=D, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def vec(m: torch.Tensor) -> torch.Tensor:
    """Column-major vec: vec(e āᵀ) = ā ⊗ e."""
    return m.mT.reshape(-1)


def weight_matrix_grad(layer: nn.Linear) -> torch.Tensor:
    g = layer.weight.grad
    return g if layer.bias is None else torch.cat([g, layer.bias.grad[:, None]], dim=1)


# -- construction ------------------------------------------------------------------------


def test_blocks_in_model_order_with_types_and_owners() -> None:
    cb = KFACCallback(cnn(), printer=lambda s: None)
    assert list(cb.blocks) == ["conv1", "bn1", "ip1", "ip2"]
    assert [b.kind for b in cb.blocks.values()] == ["conv2d", "batchnorm", "linear", "linear"]
    assert [b.factor_dims() for b in cb.blocks.values()] == [[10, 3], [6], [49, 5], [5, 3]]
    assert set(cb.owners.values()) == {0}


def test_damping_spellings() -> None:
    model = cnn()
    cb = KFACCallback(model, damping_act=0.01, damping_err=1.0)
    assert cb.config.damping_act == [0.01] and cb.config.damping_err == [1.0]
    cb.remove_hooks()
    cb = KFACCallback(model, damping_act=(0.1, 0.01), damping_err="1,0.5", disable_layers="ip2")
    assert cb.config.damping_act == [0.1, 0.01] and cb.config.damping_err == [1.0, 0.5]
    assert "ip2" not in cb.blocks
    with pytest.raises(ValueError, match=r"kfac.damping_act: init 0.01 < target 1"):
        KFACCallback(model, damping_act=(0.01, 1.0))
    with pytest.raises(TypeError, match="damping_actt"):
        KFACCallback(model, damping_actt=0.1)


def test_from_config_and_trainer_hook() -> None:
    from omegaconf import OmegaConf

    node = OmegaConf.merge(OmegaConf.structured(KFACConfig),
                           {"enabled": True, "damping_err": [1.0, 0.1], "use_pi": True})
    model = cnn()
    cb = KFACCallback.from_config(model, node, printer=lambda s: None)
    assert isinstance(cb, Callback)
    assert cb.config.damping_err == [1.0, 0.1] and cb.config.use_pi
    assert KFACCallback.from_config(model, KFACConfig(), printer=lambda s: None).steps == 0
    backward(model, *batch(4, 1))
    cb.on_backward_prop_end(SimpleNamespace())
    assert cb.steps == 1 and all(b.updates == 1 for b in cb.blocks.values())


def test_disable_layers_leaves_the_plain_gradient() -> None:
    model = cnn()
    cb = KFACCallback(model, disable_layers=["ip1", "bn1"], printer=lambda s: None)
    assert list(cb.blocks) == ["conv1", "ip2"]
    backward(model, *batch(4, 1))
    plain = grads(model)
    cb.step()
    after = grads(model)
    for name in ("ip1.weight", "ip1.bias", "bn1.weight", "bn1.bias"):
        torch.testing.assert_close(after[name], plain[name], rtol=0, atol=0)
    assert not torch.allclose(after["ip2.weight"], plain["ip2.weight"])


def test_unknown_disabled_layer_lists_the_preconditionable_layers() -> None:
    with pytest.raises(ValueError, match=r"\['ip3'\].*\['conv1', 'bn1', 'ip1', 'ip2'\]"):
        KFACCallback(cnn(), disable_layers=["ip3"])


def test_dilated_grouped_conv_is_preconditioned_unless_disabled() -> None:
    model = nn.Sequential(OrderedDict(c=nn.Conv2d(2, 4, 3, dilation=2, groups=2), f=nn.Flatten()))
    assert list(KFACCallback(model).blocks) == ["c"]
    lines = KFACCallback(model, disable_layers=["c"]).setup_lines()
    assert "disable_layers=c" in lines[0] and not any("layer c" in line or "Conv2d c" in line for line in lines)


# -- hooks and schedules -----------------------------------------------------------------


def test_captures_in_training_with_grad_and_factors_only_on_update_steps() -> None:
    model = cnn()
    cb = KFACCallback(model, update_interval_init=2, update_interval_target=2,
                      printer=lambda s: None)
    x, y = batch(4, 2)
    model.eval()
    model(x)
    with torch.no_grad():
        model.train()
        model(x)
    assert cb.capture.captures == {}
    model.train()
    for s in range(4):
        backward(model, x, y)
        assert set(cb.capture.captures) == set(cb.blocks)  # every step: the batch route needs them
        cb.step()
        assert [b.updates for b in cb.blocks.values()] == [s // 2 + 1] * 4  # updates at s = 0, 2
    assert [b.updates for b in cb.blocks.values()] == [2, 2, 2, 2]
    assert cb.steps == 4


def test_one_sample_factors_equal_the_exact_fisher_block() -> None:
    """With one sample, A ⊗ G is the Fisher g gᵀ of vec([W|b]), g = ā ⊗ e (column-major)."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 6, bias=False), nn.Linear(6, 3)).to(D)
    cb = KFACCallback(model, damping_act=0.02, damping_err=0.3, printer=lambda s: None)
    x, y = torch.randn(1, 4, dtype=D), torch.tensor([2])
    backward(model, x, y)
    g = {name: vec(weight_matrix_grad(model.get_submodule(name))) for name in cb.blocks}
    cb.step()
    for name, block in cb.blocks.items():
        torch.testing.assert_close(torch.kron(block.A, block.G), torch.outer(g[name], g[name]))
        # ...and the preconditioned gradient is the damped Kronecker solve.
        eye_a, eye_g = torch.eye(block.A.shape[0], dtype=D), torch.eye(block.G.shape[0], dtype=D)
        kron = torch.kron(block.A + 0.02 * eye_a, block.G + 0.3 * eye_g)
        expected = torch.linalg.solve(kron, g[name])
        torch.testing.assert_close(vec(weight_matrix_grad(model.get_submodule(name))), expected)


def test_two_steps_running_average_with_decay() -> None:
    torch.manual_seed(6)
    layer = nn.Linear(3, 2).to(D)
    model = nn.Sequential(OrderedDict(fc=layer))
    cb = KFACCallback(model, kronecker_decay=0.9, printer=lambda s: None)
    expected_a, expected_g = [], []
    for seed in (1, 2):
        gen = torch.Generator().manual_seed(seed)
        x, y = torch.randn(5, 3, dtype=D, generator=gen), torch.randint(0, 2, (5,), generator=gen)
        out = layer(x)
        (e,) = torch.autograd.grad(F.cross_entropy(out, y), out)  # e_i, global N = 5
        abar = torch.cat([x, torch.ones(5, 1, dtype=D)], dim=1)
        expected_a.append(sum(torch.outer(a, a) for a in abar) / 5)
        expected_g.append(5 * sum(torch.outer(v, v) for v in e))
        backward(model, x, y)
        cb.step()
    block = cb.blocks["fc"]
    torch.testing.assert_close(block.A, 0.9 * expected_a[0] + 0.1 * expected_a[1])
    torch.testing.assert_close(block.G, 0.9 * expected_g[0] + 0.1 * expected_g[1])


# -- robustness --------------------------------------------------------------------------


def test_nan_input_never_reaches_the_weights() -> None:
    model = cnn()
    lines: list[str] = []
    cb = KFACCallback(model, printer=lines.append)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    backward(model, *batch(4, 1))
    cb.step()
    opt.step()
    factors = {n: [m.clone() for m in b.factors()] for n, b in cb.blocks.items()}
    before = copy.deepcopy(model.state_dict())
    x, y = batch(4, 2)
    x[0, 0, 3, 3] = float("nan")
    x[1, 0, 2, 2] = float("inf")
    backward(model, x, y)
    cb.step()
    opt.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, before[name], rtol=0, atol=0)
    for name, block in cb.blocks.items():
        for got, want in zip(block.factors(), factors[name], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert "K-FAC callback: step 1: layer ip2: non-finite gradient; zeroed for this step" in lines
    assert any("layer conv1: non-finite Kronecker factor skipped" in line for line in lines)


def test_non_finite_factor_from_input_keeps_running_average_and_is_said_once() -> None:
    model = cnn()
    lines: list[str] = []
    cb = KFACCallback(model, printer=lines.append)
    backward(model, *batch(4, 1))
    cb.step()
    a_before = cb.blocks["ip1"].A.clone()
    for seed in (2, 3):
        backward(model, *batch(4, seed))
        cb.capture.captures["ip1"].a[0, 0] = float("nan")  # poisons only ip1's factor
        cb.step()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    torch.testing.assert_close(cb.blocks["ip1"].A, a_before, rtol=0, atol=0)
    assert sum("layer ip1: non-finite Kronecker factor" in line for line in lines) == 1


def test_inf_gradient_of_one_layer_is_zeroed_and_reported() -> None:
    model = cnn()
    lines: list[str] = []
    cb = KFACCallback(model, printer=lines.append)
    backward(model, *batch(4, 1))
    model.ip1.weight.grad[0, 0] = float("inf")
    cb.step()
    assert lines == ["K-FAC callback: step 0: layer ip1: non-finite gradient; zeroed for this step"]
    assert (model.ip1.weight.grad == 0).all() and (model.ip1.bias.grad == 0).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("use_eigen", [False, True])
@pytest.mark.parametrize("bad", ["indefinite", "inf"])
def test_failed_decomposition_keeps_the_plain_gradient(bad: str, use_eigen: bool) -> None:
    model = cnn()
    lines: list[str] = []
    # Interval 2: step 1 recomputes the inverses without updating (and so repairing) factors.
    cb = KFACCallback(model, update_interval_init=2, update_interval_target=2,
                      use_eigen=use_eigen, printer=lines.append)
    backward(model, *batch(4, 1))
    cb.step()
    block = cb.blocks["ip1"]
    eye = torch.eye(block.A.shape[0], dtype=D)
    block.A = -1e6 * eye if bad == "indefinite" else block.A + float("inf")
    backward(model, *batch(4, 2))
    plain = grads(model)
    cb.step()
    after = grads(model)
    torch.testing.assert_close(after["ip1.weight"], plain["ip1.weight"], rtol=0, atol=0)
    assert not torch.allclose(after["ip2.weight"], plain["ip2.weight"])
    assert "K-FAC callback: step 1: layer ip1: no usable inverse; the layer keeps its plain " \
           "gradient" in lines


# -- printing ----------------------------------------------------------------------------


def test_epoch_end_damping_line_exactly() -> None:
    lines: list[str] = []
    cb = KFACCallback(cnn(), damping_act=0.01, damping_err=1.0, printer=lines.append)
    cb.on_epoch_end(SimpleNamespace(epoch=19))
    assert lines == ["K-FAC callback: changing damping value to 0.01 (act), 1 (err), "
                     "0.03 (bn_act), 0.03 (bn_err) at 20 epochs"]


def test_setup_lines_and_communicator_adoption() -> None:
    lines: list[str] = []
    cb = KFACCallback(cnn(), printer=lines.append)
    comm = SimpleNamespace(rank=1, world_size=2)
    cb.on_setup_end(SimpleNamespace(comm=comm))
    assert cb.comm is comm
    assert lines[0].startswith("K-FAC callback: damping_act=0.03 damping_err=0.03 ")
    assert "inverse_strategy=all" in lines[0] and "ranks=2" in lines[0]
    assert lines[1:] == [
        "K-FAC callback: layer conv1 (conv2d): A 10x10, G 3x3, owner rank 0",
        "K-FAC callback: layer bn1 (batchnorm): F 6x6, owner rank 1",
        "K-FAC callback: layer ip1 (linear): A 49x49, G 5x5, owner rank 0",
        "K-FAC callback: layer ip2 (linear): A 5x5, G 3x3, owner rank 1",
    ]


def test_print_time_and_matrix_summary() -> None:
    model = cnn()
    lines: list[str] = []
    cb = KFACCallback(model, print_time=True, print_matrix_summary=True, printer=lines.append)
    backward(model, *batch(4, 1))
    cb.step()
    assert sum(" took " in line for line in lines) == 4
    assert any(line.startswith("K-FAC callback: step 0: layer ip2: G_inv 3x3 norm ")
               for line in lines)


# -- checkpoints -------------------------------------------------------------------------


def test_state_dict_round_trip_gives_identical_next_step() -> None:
    options: dict[str, Any] = {"damping_act": (0.1, 0.01), "damping_warmup_steps": 10,
                               "kronecker_decay": 0.5, "printer": lambda s: None}
    model = cnn()
    cb = KFACCallback(model, **options)
    for seed in (1, 2):
        backward(model, *batch(4, seed))
        cb.step()
    buffer = io.BytesIO()
    torch.save(cb.state_dict(), buffer)
    model2 = copy.deepcopy(model)
    cb2 = KFACCallback(model2, **options)
    buffer.seek(0)
    cb2.load_state_dict(torch.load(buffer))
    assert cb2.steps == 2 and cb2.current_dampings() == cb.current_dampings()
    for m, cbk in ((model, cb), (model2, cb2)):
        backward(m, *batch(4, 3))
        cbk.step()
    for name, g in grads(model2).items():
        torch.testing.assert_close(g, grads(model)[name], rtol=0, atol=0)
    for name, block in cb.blocks.items():
        for a, b in zip(block.factors(), cb2.blocks[name].factors(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


# -- two ranks (threads standing in for processes) ---------------------------------------


def mlp_conv() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, 2, 3, stride=2, padding=1), relu=nn.ReLU(), flat=nn.Flatten(),
        ip1=nn.Linear(32, 6), act=nn.Tanh(), ip2=nn.Linear(6, 3, bias=False))).to(D)


# Every owner strategy (real MPI ranks: tests/trainer/test_ranks.py, "each" and "root" there slow).
@pytest.mark.parametrize("strategy", ["all", "each", "root", "balanced"])
def test_two_ranks_equal_one_rank_on_the_same_global_batch(strategy: str) -> None:
    batches = [batch(8, seed) for seed in (1, 2, 3)]
    options = {"inverse_strategy": strategy, "kronecker_decay": 0.7,
               "printer": lambda s: None}
    # Models are built here: the global RNG must not be shared by racing threads.
    models = [mlp_conv() for _ in range(3)]
    ref_model = models[2]
    ref = KFACCallback(ref_model, **options)
    ref_grads = []
    for x, y in batches:
        backward(ref_model, x, y)
        ref.step()
        ref_grads.append(grads(ref_model))

    def rank_main(comm: ThreadComm) -> Any:
        model = models[comm.rank]
        cb = KFACCallback(model, comm=comm, **options)
        out = []
        for x, y in batches:
            part = slice(4 * comm.rank, 4 * comm.rank + 4)
            backward(model, x[part], y[part])  # mean over the LOCAL batch
            params = [p.grad for p in model.parameters()]
            comm.allreduce_sum_(params)  # what the trainer does before the callback
            for g in params:
                g.div_(2)
            cb.step()
            out.append(grads(model))
        return out, cb.owners, comm.calls

    results = run_ranks(2, rank_main)
    for out, owners, calls in results:
        owning = {0} if strategy == "root" else {0, 1}  # root inverts everything; otherwise both own some
        assert set(owners.values()) == owning
        # Per step: gradient average (test), one factor collective, one broadcast per owner.
        assert calls[:2 + len(owning)] == ["allreduce", "allreduce", *(f"broadcast{r}" for r in sorted(owning))]
        for step_grads, want in zip(out, ref_grads, strict=True):
            for name, g in step_grads.items():
                torch.testing.assert_close(g, want[name])
