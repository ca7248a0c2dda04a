"""Imports run one way, downward: a test fails on one that runs back up (docs: the design's rooms).

- ``models/`` and ``kfac_callback/`` import the standard library, torch, numpy and themselves;
- ``launcher/`` imports none of trainer, kfac_callback, models, torch;
- ``trainer/`` may import kfac_callback, models and, of the launcher, only env, workdir, config;
- nothing imports ``kfac`` (the entry point ties the rooms together).

Inside the rooms the subpackages are layers too (``LAYERS``): of its own room a subpackage imports
only the layers below it. In ``kfac_callback/`` the math (``blocks``) imports nothing else of the
callback; curvature estimation (``estimation``) and distribution (``ranks``) only the math and the
foundation (``base``, ``config``); the step policy (``policy``) those; the phases of a step
(``step``) all of them and the callback's messages and clock; nothing below imports the callback
itself (``callback``, ``state``). In ``trainer/`` the data, the ranks and what a run shows
(``observe``) import nothing else of the trainer, so nothing of the loop. The emulated SLURM
(``launcher/cluster``) is a tool beside the launcher: no other launcher module imports it (but
the three-line ``launcher/slurm_local.py`` that keeps its command's name), and the trainer never.

Every import counts, also one inside a function: a lazy import still runs back up.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("models", "kfac_callback", "trainer", "launcher")
LOWEST = {"torch", "numpy"}  # all that models/ and kfac_callback/ may use beyond the standard library
LAUNCHER_FOR_TRAINER = {"launcher", "launcher.env", "launcher.workdir", "launcher.config"}

KFAC_FOUNDATION = {"kfac_callback.base", "kfac_callback.config"}
# Per subpackage, what of its own room it may import (beyond itself).
LAYERS = {
    "kfac_callback.layers": set(),
    "kfac_callback.blocks": {"kfac_callback.layers"},
    "kfac_callback.estimation": {"kfac_callback.blocks", *KFAC_FOUNDATION},
    "kfac_callback.ranks": {"kfac_callback.blocks", *KFAC_FOUNDATION},
    "kfac_callback.policy": {"kfac_callback.blocks", "kfac_callback.estimation", *KFAC_FOUNDATION},
    "kfac_callback.step": {"kfac_callback.blocks", "kfac_callback.estimation", "kfac_callback.ranks",
                           "kfac_callback.policy", "kfac_callback.messages", "kfac_callback.phases",
                           *KFAC_FOUNDATION},
    "trainer.data": set(),
    "trainer.ranks": set(),
    "trainer.observe": set(),
    "launcher.cluster": {"launcher.workdir", "launcher.env", "launcher.commands"},
}
# Modules that only keep a command's old name working, by running the new module.
COMMAND_NAMES = {"launcher.slurm_local": "launcher.cluster.slurm_local", "trainer.report": "trainer.observe.report"}


def sources() -> list[Path]:
    files = [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]
    return [*files, ROOT / "kfac.py"]


def imported(path: Path) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import in ``path``; ``from a import b`` gives ``a.b`` too."""
    package = path.relative_to(ROOT).with_suffix("").parts
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the file's own package
                base = ".".join(package[: len(package) - node.level] + ((node.module,) if node.module else ()))
            else:
                base = node.module or ""
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*"]
    return found


def layer_violation(module: str, name: str) -> str | None:
    """Why ``module`` (dotted) may not import ``name`` by the layers inside the rooms (None: it may)."""
    parts, target = module.split("."), name.split(".")
    if len(target) < 2 or target[0] != parts[0]:
        return None  # another room (``violation``), or a room's bare package name
    layer, wanted = ".".join(parts[:2]), ".".join(target[:2])
    if module in COMMAND_NAMES and name.startswith(COMMAND_NAMES[module]):
        return None
    if wanted == "launcher.cluster" and layer != "launcher.cluster":
        return "only launcher/cluster/ imports the emulated SLURM"
    if layer not in LAYERS or len(parts) < 3 or wanted == layer:
        return None
    if wanted not in LAYERS[layer]:
        return f"{layer.replace('.', '/')}/ imports of {parts[0]}/ only {sorted(LAYERS[layer]) or 'itself'}"
    return None


def violation(room: str, name: str) -> str | None:
    """Why ``room`` may not import ``name`` (None: it may)."""
    top = name.split(".")[0]
    if top == "kfac" and room != "kfac":
        return "nothing imports the entry point kfac.py"
    if room in ("models", "kfac_callback"):
        if top != room and top not in LOWEST and top not in sys.stdlib_module_names and top != "__future__":
            return f"{room}/ imports only the standard library, torch, numpy and itself"
    elif room == "launcher":
        if top in ("trainer", "kfac_callback", "models", "torch"):
            return "launcher/ needs neither the loop, the callback, the models nor torch"
    elif room == "trainer" and top == "launcher":
        # ``from launcher.env import RankInfo`` gives launcher.env and launcher.env.RankInfo.
        if ".".join(name.split(".")[:2]) not in LAUNCHER_FOR_TRAINER:
            return "trainer/ may use only launcher.env, launcher.workdir and launcher.config"
    return None


def room_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def module_of(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_downward(path: Path) -> None:
    room, module = room_of(path), module_of(path)
    bad = [f"{path.relative_to(ROOT)}:{line}: import {name}: {why}"
           for line, name in imported(path) if (why := violation(room, name) or layer_violation(module, name))]
    assert not bad, "\n".join(bad)


def test_the_rule_catches_imports_that_run_up() -> None:
    assert violation("kfac_callback", "trainer.trainer") and violation("kfac_callback", "omegaconf")
    assert violation("kfac_callback", "models") and violation("models", "kfac_callback.base")
    assert violation("launcher", "torch.nn") and violation("launcher", "models")
    assert violation("trainer", "launcher.launch") and violation("trainer", "launcher.flags")
    assert violation("trainer", "kfac") and violation("launcher", "kfac")
    for room, name in (("kfac_callback", "torch.nn"), ("kfac_callback", "kfac_callback.base"), ("models", "numpy"),
                       ("trainer", "launcher.env"), ("trainer", "launcher.env.RankInfo"), ("trainer", "launcher"),
                       ("trainer", "kfac_callback.base"),
                       ("trainer", "omegaconf"), ("launcher", "omegaconf"), ("kfac", "trainer.run")):
        assert violation(room, name) is None, (room, name)


def test_the_layer_rule_catches_imports_that_run_up() -> None:
    up = (("kfac_callback.blocks.linear", "kfac_callback.ranks.exchange"),
          ("kfac_callback.blocks.base", "kfac_callback.policy.schedules"),
          ("kfac_callback.blocks.base", "kfac_callback.base"),
          ("kfac_callback.estimation.capture", "kfac_callback.callback"),
          ("kfac_callback.estimation.outputs", "kfac_callback.policy.adaptive"),
          ("kfac_callback.ranks.exchange", "kfac_callback.step.factors"),
          ("kfac_callback.policy.kl_clip", "kfac_callback.ranks.exchange"),
          ("kfac_callback.policy.adaptive", "kfac_callback.state"),
          ("kfac_callback.step.factors", "kfac_callback.callback"),
          ("trainer.observe.progress", "trainer.trainer"),
          ("trainer.observe.lbann_log", "trainer.run"),
          ("trainer.data.mnist", "trainer.ranks.distributed"),
          ("trainer.ranks.watchdog", "trainer.state"),
          ("trainer.run", "launcher.cluster.slurm_local"),
          ("launcher.launch", "launcher.cluster.slurm_daemons"))
    for module, name in up:
        assert layer_violation(module, name) or violation(module.split(".")[0], name), (module, name)
    for module, name in (("kfac_callback.blocks.base", "kfac_callback.blocks.linalg"),
                         ("kfac_callback.estimation.mc_fisher", "kfac_callback.estimation.outputs"),
                         ("kfac_callback.policy.kl_clip", "kfac_callback.blocks"),
                         ("kfac_callback.policy.adaptive", "kfac_callback.base"),
                         ("kfac_callback.step.factors", "kfac_callback.ranks.exchange"),
                         ("kfac_callback.step.precondition", "kfac_callback.messages"),
                         ("kfac_callback.callback", "kfac_callback.step.factors"),
                         ("trainer.trainer", "trainer.observe.lbann_log"),
                         ("trainer.observe.report", "trainer.observe.metrics"),
                         ("launcher.cluster.slurm_cluster", "launcher.cluster.netns"),
                         ("launcher.slurm_local", "launcher.cluster.slurm_local")):
        assert layer_violation(module, name) is None, (module, name)


def test_importing_kfac_callback_loads_no_trainer_launcher_or_config_library() -> None:
    code = ("import json, sys, kfac_callback; print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = set(json.loads(result.stdout))
    assert not loaded & {"trainer", "launcher", "models", "hydra", "omegaconf"}, sorted(loaded)
