"""Imports run one way, downward: a test fails on one that runs back up (docs: the design's rooms).

- ``models/`` and ``kfac_callback/`` import the standard library, torch, numpy and themselves;
- ``launcher/`` imports none of trainer, kfac_callback, models, torch;
- ``trainer/`` may import kfac_callback, models and, of the launcher, only env, workdir, config;
- nothing imports ``kfac`` (the entry point ties the rooms together).

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


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_downward(path: Path) -> None:
    room = room_of(path)
    bad = [f"{path.relative_to(ROOT)}:{line}: import {name}: {why}"
           for line, name in imported(path) if (why := violation(room, name))]
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


def test_importing_kfac_callback_loads_no_trainer_launcher_or_config_library() -> None:
    code = ("import json, sys, kfac_callback; print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = set(json.loads(result.stdout))
    assert not loaded & {"trainer", "launcher", "models", "hydra", "omegaconf"}, sorted(loaded)
