"""K-FAC for a Bernoulli output (the autoencoder's sigmoid cross-entropy summed over the outputs),
against dense float64 formulas: G from the true targets (empirical) and from targets sampled
from sigmoid(logits) (fisher=mc); the sampler's frequencies; R thread ranks draw what one rank
draws (docs/algorithm.md §3, "Fisher")."""

from __future__ import annotations

import pytest
import torch

from kfac_callback import KFACCallback
from kfac_callback.estimation.outputs import Bernoulli
from models import Autoencoder
from tests.support.threads import run_ranks

pytestmark = pytest.mark.usefixtures("one_thread")

D = torch.float64
N = 12


def setup(fisher: str, seed: int = 7) -> tuple[Autoencoder, KFACCallback, torch.Tensor]:
    torch.manual_seed(0)
    model = Autoencoder((6, 5, 3, 5, 6)).to(D)
    cb = KFACCallback(model, output="bernoulli", fisher=fisher, seed=seed, printer=lambda s: None)
    x = torch.rand(N, 6, generator=torch.Generator().manual_seed(1), dtype=D)
    return model, cb, x


def one_step(model: Autoencoder, cb: KFACCallback, x: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    cb.sample_fisher(logits)
    (Bernoulli().loss_sum(logits, x) / len(x)).backward()
    cb.step()
    return logits.detach()


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_last_layers_g_is_n_times_the_sum_of_e_e_transposed(fisher: str) -> None:
    """e = (sigmoid(z) − t)/N per sample, t the image (empirical) or the targets the seed draws (mc)."""
    model, cb, x = setup(fisher)
    logits = one_step(model, cb, x)
    targets = x if fisher == "empirical" else Bernoulli().sample(logits, seed=7, step=0, offset=0, total=N)
    if fisher == "mc":
        assert set(targets.unique().tolist()) <= {0.0, 1.0}
    e = (torch.sigmoid(logits) - targets) / N
    a, g = cb.blocks["layers.dec2"].factors()
    assert torch.allclose(g, N * e.T @ e, rtol=1e-12, atol=1e-15)


def test_sampled_targets_are_bernoulli_of_the_sigmoid() -> None:
    logits = torch.tensor([[-2.0, 0.0, 1.5]], dtype=D).expand(20000, 3)
    t = Bernoulli().sample(logits, seed=3, step=5, offset=0, total=20000)
    assert torch.allclose(t.mean(0), torch.sigmoid(logits[0]), atol=0.015)


def test_thread_ranks_draw_the_targets_one_rank_draws() -> None:
    logits = torch.randn(10, 4, generator=torch.Generator().manual_seed(2), dtype=D)
    whole = Bernoulli().sample(logits, seed=1, step=3, offset=0, total=10)
    shares = [4, 3, 2, 1]

    def draw(comm) -> torch.Tensor:
        lo = sum(shares[:comm.rank])
        return Bernoulli().sample(logits[lo:lo + shares[comm.rank]], seed=1, step=3, offset=lo, total=10)

    assert torch.equal(torch.cat(run_ranks(4, draw)), whole)
