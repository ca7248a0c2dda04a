"""What a checkpoint keeps of the K-FAC callback, and how it is read back (its keys never change:
old checkpoints load)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kfac_callback.base import Communicator
from kfac_callback.blocks import Block
from kfac_callback.policy.adaptive import AdaptiveRules
from kfac_callback.policy.schedules import DampingSchedule
from kfac_callback.ranks import exchange
from kfac_callback.wrappers import user_name


def export_state(blocks: Mapping[str, Block], owners: Mapping[str, int], comm: Communicator, steps: int,
                 dampings: Sequence[DampingSchedule], need_inverses: bool, adaptive: AdaptiveRules) -> dict[str, Any]:
    """Running averages, update counts, dampings, the step counter and the inverses.

    With several ranks this is a collective that every rank must call: a layer's inverses
    live on its owner only, so they are gathered here. A resumed run (with any number of
    ranks) then preconditions with exactly the same inverses until the next compute step.
    """
    inverses = {name: b.export_inverses() if owners[name] == comm.rank else {} for name, b in blocks.items()}
    if comm.world_size > 1 and blocks:
        shapes = {name: [(f"{f}.{kind}", s) for f, s in zip(b.factor_names, b.factor_shapes(), strict=True)
                         for kind in ("chol", "inverse")] for name, b in blocks.items()}
        device = next(iter(blocks.values())).module.weight.device
        inverses = exchange.gather_inverses(comm, inverses, owners, shapes, device)
    return {
        "steps": steps,
        "dampings": [d.value for d in dampings],
        "factors": {name: [None if m is None else m.detach().clone() for m in b.factors()]
                    for name, b in blocks.items()},
        "updates": {name: b.updates for name, b in blocks.items()},
        "inverses": inverses,
        "need_inverses": need_inverses,
        **({"adaptive": adaptive.state_dict()} if adaptive.enabled else {}),
    }


def import_state(state: Mapping[str, Any], blocks: Mapping[str, Block], owners: Mapping[str, int], rank: int,
                 dampings: Sequence[DampingSchedule], adaptive: AdaptiveRules) -> tuple[int, bool]:
    """Restores ``export_state()`` into the blocks, dampings and adaptive rules, the inverses too
    (each rank keeps those it owns now); returns the step counter and whether the inverses must
    be recomputed (a state without inverses, an older one).

    Layer names saved with a wrapper's prefix (``module.ip1``, by code that named DDP's
    layers) are read as the user's (``ip1``).

    Raises:
        ValueError: If the state's layers differ from the blocks'.
    """
    state = {**state, **{key: {user_name(k, blocks): v for k, v in state[key].items()}
                         for key in ("factors", "updates", "inverses") if state.get(key) is not None}}
    if set(state["factors"]) != set(blocks):
        raise ValueError(f"K-FAC state has layers {sorted(state['factors'])}, the callback "
                         f"has {sorted(blocks)}")
    for d, v in zip(dampings, state["dampings"], strict=True):
        d.value = float(v)
    inverses = state.get("inverses")
    for name, block in blocks.items():
        block.set_factors(list(state["factors"][name]))
        block.updates = int(state["updates"][name])
        block.clear_inverses()
        if inverses is not None and owners[name] == rank:
            block.import_inverses(dict(inverses.get(name, {})))
    if adaptive.enabled:
        adaptive.load_state_dict(state.get("adaptive"))
    return int(state["steps"]), inverses is None or bool(state.get("need_inverses", False))
