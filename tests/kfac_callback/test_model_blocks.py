"""The blocks of modern models against their dense definitions, in float64 (docs/algorithm.md §3).

Convolutions (Conv1d/Conv2d with stride, dilation, groups, 'same' and non-zero padding modes):
the patches come from autograd's Jacobian of the output with respect to the weight, not from the
block's own unfold. Normalisation layers: the factor is the exact per-sample Fisher block, from
per-sample gradients by ``torch.func``. Embeddings: a fully connected layer on one-hot inputs.
Attention: the projections' factors from the attention computed by hand. Every preconditioned
gradient against the damped Kronecker (or dense) inverse built densely.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_callback import KFACCallback
from kfac_callback.blocks import Dampings, make_block

D = torch.float64
DAMP = Dampings(0.3, 0.2, 0.05, 0.07)


def output_grad(y: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(w, ∂L/∂y) of L = Σ w·y / N: the local mean loss, so that N·∂L/∂y = w is each sample's own."""
    w = torch.randn(y.shape, dtype=D, generator=torch.Generator().manual_seed(seed))
    return w, w / y.shape[0]


def dense_kronecker_solve(a: torch.Tensor, g: torch.Tensor, m: torch.Tensor, la: float, lg: float) -> torch.Tensor:
    """(G + lg I)⁻¹ M (A + la I)⁻¹ through the dense (G + lg I) ⊗ (A + la I)."""
    k = torch.kron(g + lg * torch.eye(len(g), dtype=D), a + la * torch.eye(len(a), dtype=D))
    return torch.linalg.solve(k, m.reshape(-1)).reshape(m.shape)


def fold(block, contributions: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """The block's preconditioned gradients with these factors (DAMP, no π)."""
    assert block.update_factors(contributions, 0.5)
    assert block.compute_inverses(DAMP, dtype=D)
    for p, gr in zip(block.parameters(), grads, strict=True):
        p.grad = gr.clone()
    assert block.precondition()
    return [p.grad for p in block.parameters()]


# -- convolutions ---------------------------------------------------------------------------

CONVS = {
    "conv2d_stride_padding": lambda: nn.Conv2d(2, 4, 3, stride=2, padding=1),
    "conv2d_dilated_grouped": lambda: nn.Conv2d(2, 4, 3, dilation=2, groups=2, padding=2),
    "conv2d_depthwise_same_reflect": lambda: nn.Conv2d(4, 4, 3, groups=4, padding="same", padding_mode="reflect"),
    "conv2d_even_same_circular": lambda: nn.Conv2d(2, 3, 2, padding="same", padding_mode="circular", bias=False),
    "conv1d_grouped_replicate": lambda: nn.Conv1d(4, 6, 3, stride=2, dilation=2, groups=2, padding=1,
                                                  padding_mode="replicate"),
    "conv1d_depthwise_same": lambda: nn.Conv1d(3, 3, 5, groups=3, padding="same"),
}


def jacobian_patches(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, T, groups, C_in/groups·k): ∂y[i, c, t]/∂W[c] for the first channel c of each group."""
    weight = conv.weight.detach()
    jac = torch.func.jacrev(lambda w: torch.func.functional_call(conv, {"weight": w}, (x,)))(weight)
    n, c_out = x.shape[0], weight.shape[0]
    jac = jac.reshape(n, c_out, -1, c_out, weight[0].numel())  # i, c, t, c', k
    per_group = c_out // conv.groups
    firsts = [grp * per_group for grp in range(conv.groups)]
    return torch.stack([jac[:, c, :, c] for c in firsts], dim=2)


@pytest.mark.parametrize("sharing", ["expand", "reduce"])
@pytest.mark.parametrize("case", list(CONVS))
def test_conv_factors_and_preconditioned_gradient_against_dense(case: str, sharing: str) -> None:
    torch.manual_seed(0)
    conv = CONVS[case]().to(D)
    x = torch.randn(3, conv.in_channels, *((7, 6) if isinstance(conv, nn.Conv2d) else (9,)), dtype=D)
    y = conv(x)
    w, go = output_grad(y)
    grads = torch.autograd.grad((w * y).sum() / len(x), [p for p in (conv.weight, conv.bias) if p is not None])
    n, groups, per_group = len(x), conv.groups, conv.out_channels // conv.groups
    p = jacobian_patches(conv, x)  # N, T, groups, k
    positions = p.shape[1]
    if conv.bias is not None:
        p = torch.cat([p, torch.ones(*p.shape[:-1], 1, dtype=D)], dim=-1)
    e = w.flatten(2).transpose(1, 2).reshape(n, positions, groups, per_group)  # each sample's own gradient
    if sharing == "reduce":
        a_rows, g_rows, scale_a = p.sum(dim=1), e.sum(dim=1), 1 / (n * positions)
    else:
        a_rows, g_rows, scale_a = p.reshape(-1, groups, p.shape[-1]), e.reshape(-1, groups, per_group), 1 / n
    a_want = [scale_a * a_rows[:, k].T @ a_rows[:, k] for k in range(groups)]
    g_want = [g_rows[:, k].T @ g_rows[:, k] / (n * positions) for k in range(groups)]

    block = make_block("c", conv, sharing)
    got_a, got_g = block.contributions(x, go, n)
    torch.testing.assert_close(got_a, torch.block_diag(*a_want))
    torch.testing.assert_close(got_g, torch.block_diag(*g_want))

    got = fold(block, [got_a, got_g], list(grads))
    for k in range(groups):
        rows = slice(k * per_group, (k + 1) * per_group)
        m = grads[0][rows].reshape(per_group, -1)
        if conv.bias is not None:
            m = torch.cat([m, grads[1][rows, None]], dim=1)
        want = dense_kronecker_solve(a_want[k], g_want[k], m, DAMP.act, DAMP.err)
        torch.testing.assert_close(got[0][rows].reshape(per_group, -1), want[:, :grads[0][0].numel()])
        if conv.bias is not None:
            torch.testing.assert_close(got[1][rows], want[:, -1])


# -- weight sharing ---------------------------------------------------------------------------


@pytest.mark.parametrize("sharing", ["expand", "reduce"])
def test_one_position_is_the_per_sample_block_and_one_sample_the_exact_fisher(sharing: str) -> None:
    torch.manual_seed(1)
    layer = nn.Linear(4, 3).to(D)
    x = torch.randn(5, 4, dtype=D)
    y = layer(x)
    _, go = output_grad(y)
    flat = make_block("l", layer, sharing).contributions(x, go, 5)
    seq = make_block("l", layer, sharing).contributions(x[:, None], go[:, None], 5)
    for got, want in zip(seq, flat, strict=True):
        torch.testing.assert_close(got, want)
    # One sample: A ⊗ G is the outer product of its own gradient [∇W | ∇b] (row-major vec).
    one = make_block("l", layer, sharing).contributions(x[:1, None], go[:1, None] * 5, 1)
    m = torch.cat([torch.outer(go[0] * 5, x[0]), go[0, :, None] * 5], dim=1).reshape(-1)
    torch.testing.assert_close(torch.kron(one[1], one[0]), torch.outer(m, m))


def test_reduce_is_exact_when_every_position_sees_the_same_input() -> None:
    torch.manual_seed(2)
    layer = nn.Linear(3, 2).to(D)
    x = torch.randn(1, 1, 3, dtype=D).expand(1, 4, 3).contiguous()
    y = layer(x)
    w, go = output_grad(y)
    a, g = make_block("l", layer, "reduce").contributions(x, go, 1)
    gw, gb = torch.autograd.grad((w * y).sum(), [layer.weight, layer.bias])
    m = torch.cat([gw, gb[:, None]], dim=1).reshape(-1)
    torch.testing.assert_close(torch.kron(g, a), torch.outer(m, m))
    ea, eg = make_block("l", layer, "expand").contributions(x, go, 1)
    assert not torch.allclose(torch.kron(eg, ea), torch.outer(m, m))  # expand is not exact here


@pytest.mark.parametrize("sharing", ["expand", "reduce"])
def test_linear_on_two_position_dimensions_against_the_definitions(sharing: str) -> None:
    torch.manual_seed(3)
    layer = nn.Linear(4, 3).to(D)
    x = torch.randn(5, 2, 3, 4, dtype=D)
    y = layer(x)
    w, go = output_grad(y)
    a1 = torch.cat([x, torch.ones(5, 2, 3, 1, dtype=D)], dim=-1).reshape(5, 6, 5)
    e = w.reshape(5, 6, 3)
    if sharing == "expand":
        a_want = torch.einsum("ira,irb->ab", a1, a1) / 5
        g_want = torch.einsum("ira,irb->ab", e, e) / 30
    else:
        a_want = a1.sum(1).T @ a1.sum(1) / 30
        g_want = e.sum(1).T @ e.sum(1) / 30
    a, g = make_block("l", layer, sharing).contributions(x, go, 5)
    torch.testing.assert_close(a, a_want)
    torch.testing.assert_close(g, g_want)


# -- normalisation layers ---------------------------------------------------------------------

NORMS = {
    "layernorm_tokens": (lambda: nn.LayerNorm(4), (5, 3, 4)),
    "layernorm_two_dims_no_bias": (lambda: nn.LayerNorm((2, 3), bias=False), (4, 5, 2, 3)),
    "groupnorm": (lambda: nn.GroupNorm(2, 4), (5, 4, 3, 2)),
}


@pytest.mark.parametrize("case", list(NORMS))
def test_norm_factor_is_the_per_sample_fisher_and_preconditions_densely(case: str) -> None:
    build, shape = NORMS[case]
    torch.manual_seed(4)
    layer = build().to(D)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = 2.0 * torch.randn(*shape, dtype=D) + 0.5
    y = layer(x)
    w, go = output_grad(y)
    params = dict(layer.named_parameters())

    def sample_loss(p: dict[str, torch.Tensor], xi: torch.Tensor, wi: torch.Tensor) -> torch.Tensor:
        return (torch.func.functional_call(layer, p, (xi[None],))[0] * wi).sum()

    per_sample = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))(params, x, w)
    u = torch.cat([per_sample[k].reshape(len(x), -1) for k in params], dim=1)
    f_want = u.T @ u / len(x)
    block = make_block("n", layer)
    (f_got,) = block.contributions(x, go, len(x))
    torch.testing.assert_close(f_got, f_want)

    grads = torch.autograd.grad((w * y).sum() / len(x), list(params.values()))
    got = fold(block, [f_got], list(grads))
    sizes = [p.numel() for p in params.values()]
    damp = [DAMP.bn_act, DAMP.bn_err] if len(sizes) == 2 else [DAMP.bn_act]
    diag = torch.cat([torch.full((k,), d, dtype=D) for k, d in zip(sizes, damp, strict=True)])
    want = torch.linalg.solve(f_want + torch.diag(diag), torch.cat([g.reshape(-1) for g in grads]))
    torch.testing.assert_close(torch.cat([g.reshape(-1) for g in got]), want)


# -- embeddings -------------------------------------------------------------------------------


def test_embedding_is_a_linear_layer_on_one_hot_tokens() -> None:
    torch.manual_seed(5)
    emb = nn.Embedding(7, 3, padding_idx=0).to(D)
    lin = nn.Linear(7, 3, bias=False).to(D)
    with torch.no_grad():
        lin.weight.copy_(emb.weight.T)
    tokens = torch.randint(0, 7, (4, 5))
    tokens[0, 0] = 0
    y = emb(tokens)
    w, go = output_grad(y)
    one_hot = F.one_hot(tokens, 7).to(D)
    torch.testing.assert_close(lin(one_hot), y)
    e_block, l_block = make_block("e", emb), make_block("l", lin)
    (ea, eg), (la, lg) = e_block.contributions(tokens, go, 4), l_block.contributions(one_hot, go, 4)
    torch.testing.assert_close(torch.diag(ea), la)  # the one-hots' Gram is diagonal: the counts / N
    torch.testing.assert_close(eg, lg)
    (e_grad,) = torch.autograd.grad((w * y).sum() / 4, [emb.weight])
    (l_grad,) = torch.autograd.grad((w * lin(one_hot)).sum() / 4, [lin.weight])
    l_grad[:, 0] = 0  # the embedding's padding token gets no gradient
    (e_got,), (l_got,) = fold(e_block, [ea, eg], [e_grad]), fold(l_block, [la, lg], [l_grad])
    torch.testing.assert_close(e_got, l_got.T)
    assert torch.all(e_got[0] == 0)  # the padding row gets no gradient, and stays so
    torch.testing.assert_close(l_got, dense_kronecker_solve(la, lg, l_grad, DAMP.act, DAMP.err))


# -- attention --------------------------------------------------------------------------------


class Attend(nn.Module):
    def __init__(self, **kwargs) -> None:  # noqa: ANN003
        super().__init__()
        torch.manual_seed(6)
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True, **kwargs)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(dim=1))


def test_attention_projections_are_preconditioned_with_their_true_factors() -> None:
    model = Attend().to(D)
    cb = KFACCallback(model, damping_act=DAMP.act, damping_err=DAMP.err, printer=lambda s: None)
    assert list(cb.blocks) == ["attn.out_proj", "attn.in_proj", "head"]
    x = torch.randn(4, 5, 6, dtype=D)
    y = torch.randint(0, 2, (4,))
    loss = F.cross_entropy(model(x), y)
    w_in, b_in = model.attn.in_proj_weight, model.attn.in_proj_bias
    plain = torch.autograd.grad(loss, [w_in, b_in], retain_graph=True)
    loss.backward()
    cb.step()
    # The attention by hand: q, k, v per head, softmax(q kᵀ/√d) v, the heads side by side.
    with torch.no_grad():
        q, k, v = (t.reshape(4, 5, 2, 3).transpose(1, 2) for t in F.linear(x, w_in, b_in).chunk(3, dim=-1))
        context = ((q @ k.transpose(-1, -2) / math.sqrt(3)).softmax(-1) @ v).transpose(1, 2).reshape(4, 5, 6)
    ones = torch.ones(4, 5, 1, dtype=D)
    for name, inputs in (("attn.in_proj", x), ("attn.out_proj", context)):
        a1 = torch.cat([inputs, ones], dim=-1).reshape(-1, 7)
        torch.testing.assert_close(cb.blocks[name].A, a1.T @ a1 / 4)
    block = cb.blocks["attn.in_proj"]
    m = torch.cat([plain[0], plain[1][:, None]], dim=1)
    want = dense_kronecker_solve(block.A, block.G, m, DAMP.act, DAMP.err)
    torch.testing.assert_close(w_in.grad, want[:, :6])
    torch.testing.assert_close(b_in.grad, want[:, 6])


# -- never silently wrong ---------------------------------------------------------------------


class Mixed(nn.Module):
    """Parameters of its own, a type K-FAC has no block for, attention, a sparse embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.zeros(6))
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.act = nn.PReLU()
        self.sparse = nn.Embedding(5, 6, sparse=True)
        self.head = nn.Linear(6, 2)


def test_setup_lines_list_what_is_preconditioned_and_name_the_rest_once() -> None:
    kept = KFACCallback(Mixed(), swap_attention=False, printer=lambda s: None)
    lines = kept.setup_lines()
    layers = [line.split()[3] for line in lines if " layer " in line and "owner rank" in line]
    assert layers == ["head"]  # not attn.out_proj: nn.MultiheadAttention never calls it
    left = [line for line in lines if "not preconditioned" in line]
    assert any("MultiheadAttention attn" in line and "swap_attention" in line for line in left)
    assert any("Mixed model" in line for line in left)
    assert any("PReLU act" in line for line in left)
    assert any("Embedding sparse" in line for line in left)
    swapped = KFACCallback(Mixed(), printer=lambda s: None)
    lines = swapped.setup_lines()
    assert list(swapped.blocks) == ["attn.out_proj", "attn.in_proj", "head"]
    assert any("layer attn (MultiheadAttention): runs as kfac_callback.MultiheadAttention" in line for line in lines)
    assert not any("MultiheadAttention attn" in line for line in lines)


class Functional(nn.Module):
    """``fc`` is called functionally, so its hooks never fire."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.fc = nn.Linear(4, 3)
        self.out = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(F.linear(x, self.fc.weight, self.fc.bias)))


def test_a_layer_whose_hooks_did_not_fire_is_named_once_and_left_plain() -> None:
    model = Functional().to(D)
    lines: list[str] = []
    cb = KFACCallback(model, printer=lines.append)
    for _ in range(2):
        x, y = torch.randn(8, 4, dtype=D), torch.randint(0, 2, (8,))
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        plain = model.fc.weight.grad.clone()
        cb.step()
        torch.testing.assert_close(model.fc.weight.grad, plain, rtol=0, atol=0)
    silent = [line for line in lines if "did not fire" in line]
    assert len(silent) == 1 and "step 0: layer(s) fc:" in silent[0]
    assert cb.blocks["out"].has_inverses and not cb.blocks["fc"].has_inverses


def test_sequential_names_stay_the_users() -> None:
    model = nn.Sequential(OrderedDict(emb=nn.Embedding(5, 4), norm=nn.LayerNorm(4), fc=nn.Linear(4, 2)))
    cb = KFACCallback(model, printer=lambda s: None)
    kinds = {name: b.kind for name, b in cb.blocks.items()}
    assert kinds == {"emb": "embedding", "norm": "layernorm", "fc": "linear"}
    assert "A 5 (diagonal), G 4x4" in "\n".join(cb.setup_lines())


class Positions(nn.Module):
    """A position embedding looked up with ``arange(T)``: one row per position, none per sample."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(8)
        self.position = nn.Embedding(5, 4)
        self.embed = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((self.embed(x) + self.position(torch.arange(5))).mean(dim=1))


def test_a_layer_without_a_batch_dimension_is_named_once_and_left_plain() -> None:
    model = Positions().to(D)
    lines: list[str] = []
    cb = KFACCallback(model, printer=lines.append)
    for _ in range(2):
        x, y = torch.randn(8, 5, 3, dtype=D), torch.randint(0, 2, (8,))
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        plain = model.position.weight.grad.clone()
        cb.step()
        torch.testing.assert_close(model.position.weight.grad, plain, rtol=0, atol=0)
    named = [line for line in lines if "no batch dimension" in line]
    assert len(named) == 1 and "layer position: its input [5]" in named[0]
    assert cb.blocks["embed"].has_inverses and not cb.blocks["position"].has_factors


# -- checkpoints ------------------------------------------------------------------------------


def test_a_transformer_checkpoint_from_two_ranks_resumes_on_one_rank() -> None:
    """Every new block's factors and inverses (the embedding's diagonal ones too) gathered from
    their owners on 2 thread ranks, loaded by 1 rank: its next step is the uninterrupted 1-rank
    run's (float64, within 1e-9: the ranks sum in another order)."""
    import copy
    import io

    from tests.kfac_callback.test_uneven_shares import TinyTransformer, token_data
    from tests.support.threads import run_ranks

    options = {"damping_act": 0.05, "damping_err": 0.05, "kronecker_decay": 0.5, "inverse_strategy": "balanced",
               "printer": lambda s: None}
    base = TinyTransformer().to(D)

    def steps(model: nn.Module, cb: KFACCallback, which: range, rank: int = 0, world: int = 1) -> None:
        for step in which:
            x, y = token_data(step, 8)
            part = slice(rank * 8 // world, (rank + 1) * 8 // world)
            model.zero_grad()
            F.cross_entropy(model(x[part]), y[part]).backward()
            if world > 1:
                grads = [p.grad for p in model.parameters()]
                cb.comm.allreduce_sum_(grads)
                for g in grads:
                    g /= world
            cb.step()

    models = [copy.deepcopy(base) for _ in range(4)]

    def rank_main(comm) -> bytes:  # noqa: ANN001
        cb = KFACCallback(models[comm.rank], comm=comm, **options)
        steps(models[comm.rank], cb, range(2), comm.rank, 2)
        buffer = io.BytesIO()
        torch.save(cb.state_dict(), buffer)
        return buffer.getvalue()

    saved = run_ranks(2, rank_main)[0]
    straight = KFACCallback(models[2], **options)
    steps(models[2], straight, range(3))
    resumed = KFACCallback(models[3], **options)
    with torch.no_grad():
        for p, q in zip(models[3].parameters(), models[0].parameters(), strict=True):
            p.copy_(q)  # the 2-rank run's weights after 2 steps
    resumed.load_state_dict(torch.load(io.BytesIO(saved)))
    assert resumed.blocks["embed"].A_inv.shape == (12,) and resumed.blocks["embed"].has_inverses
    steps(models[3], resumed, range(2, 3))
    for (name, p), q in zip(models[2].named_parameters(), models[3].parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-12, msg=name)
