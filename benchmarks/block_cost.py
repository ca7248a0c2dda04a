"""What each K-FAC block type costs against its own layer's forward and backward.

For every layer type of the ViT and the ResNets (``--model vit|resnet``-sized layers, batch
``--batch``), in one process and taking turns so that a drifting machine affects all alike: the
layer's forward + backward, and the block's three parts: folding a batch into the factors
(``accumulate``), the damped inverses (``compute_inverses``) and preconditioning the gradient.
Prints a Markdown table of medians and of each part as a multiple of the forward + backward.

    python benchmarks/block_cost.py --batch 1000 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from kfac_callback.blocks import Dampings, make_block  # noqa: E402
from kfac_callback.layers import MultiheadAttention  # noqa: E402

DAMPING = Dampings(0.03, 0.03, 0.03, 0.03)


def cases(batch: int) -> dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], str]]:
    """name: (layer, its input, weight sharing) at the sizes of the models' layers."""
    tokens = lambda: torch.randn(batch, 17, 64)  # noqa: E731 (the ViT's 17 tokens of width 64)
    return {
        "linear 64→128 on 17 tokens, expand": (lambda: nn.Linear(64, 128), tokens, "expand"),
        "linear 64→128 on 17 tokens, reduce": (lambda: nn.Linear(64, 128), tokens, "reduce"),
        "attention in_proj 64→192, expand": (lambda: MultiheadAttention(64, 4, batch_first=True).in_proj, tokens,
                                             "expand"),
        "layernorm 64 on 17 tokens": (lambda: nn.LayerNorm(64), tokens, "expand"),
        "embedding 1000×64, 17 tokens": (lambda: nn.Embedding(1000, 64), lambda: torch.randint(0, 1000, (batch, 17)),
                                         "expand"),
        "conv2d 1→64 7×7/7 (ViT patches)": (lambda: nn.Conv2d(1, 64, 7, stride=7), lambda: torch.randn(batch, 1, 28, 28),
                                            "expand"),
        "conv2d 32→32 3×3 on 14²": (lambda: nn.Conv2d(32, 32, 3, padding=1, bias=False),
                                    lambda: torch.randn(batch, 32, 14, 14), "expand"),
        "conv2d 32→32 3×3 on 14², reduce": (lambda: nn.Conv2d(32, 32, 3, padding=1, bias=False),
                                            lambda: torch.randn(batch, 32, 14, 14), "reduce"),
        "depthwise conv2d 32 3×3 on 14²": (lambda: nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False),
                                           lambda: torch.randn(batch, 32, 14, 14), "expand"),
        "batchnorm2d 32 on 14²": (lambda: nn.BatchNorm2d(32), lambda: torch.randn(batch, 32, 14, 14), "expand"),
        "groupnorm 8×4 on 14²": (lambda: nn.GroupNorm(8, 32), lambda: torch.randn(batch, 32, 14, 14), "expand"),
    }


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(layer: nn.Module, x: torch.Tensor, sharing: str, rounds: int) -> dict[str, list[float]]:
    block = make_block("layer", layer, sharing)
    params = block.parameters()
    times: dict[str, list[float]] = {"forward+backward": [], "factors": [], "inverses": [], "precondition": []}
    out: dict[str, torch.Tensor] = {}

    def forward_backward() -> None:
        y = layer(x)
        out["g"] = torch.randn_like(y) / len(x)
        y.backward(out["g"])

    for _ in range(rounds):
        for p in params:
            p.grad = None
        times["forward+backward"].append(timed(forward_backward))
        times["factors"].append(timed(lambda: block.accumulate(x, out["g"], len(x), 0.95)))
        times["inverses"].append(timed(lambda: block.compute_inverses(DAMPING, use_pi=True)))
        times["precondition"].append(timed(block.precondition))
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    built = {name: (make(), data(), sharing) for name, (make, data, sharing) in cases(args.batch).items()}
    results: dict[str, dict[str, list[float]]] = {name: {} for name in built}
    for _ in range(3):  # turns: every layer measured in each third of the run
        for name, (layer, x, sharing) in built.items():
            for part, values in measure(layer, x, sharing, args.rounds).items():
                results[name].setdefault(part, []).extend(values[1:])  # the first of a turn warms up
    print(f"Batch {args.batch}, {args.threads} thread(s), medians of {3 * (args.rounds - 1)} rounds; "
          "each part also as a multiple of the layer's forward + backward.\n")
    print("| layer | forward+backward ms | factors ms (×) | inverses ms (×) | precondition ms (×) |")
    print("|---|---|---|---|---|")
    for name, parts in results.items():
        base = statistics.median(parts["forward+backward"])
        cells = [f"{1e3 * base:.2f}"]
        for part in ("factors", "inverses", "precondition"):
            m = statistics.median(parts[part])
            cells.append(f"{1e3 * m:.2f} ({m / base:.2f})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
