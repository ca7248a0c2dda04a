"""Checkpoints: written atomically, found, checked against the run (where a run resumes from:
``trainer/resume.py``).

A run's checkpoints live in ``<work dir>/checkpoints/step_000123.pt``; the trainer decides
what goes in them (``trainer/state.py``), this file how they are written and read:

- ``save_checkpoint``: a temporary file, fsync, rename, fsync of the folder, so a crash
  mid-write leaves the previous checkpoint as it was; then only the newest ``keep`` remain.
- ``load_checkpoint``: refuses anything that is not a whole checkpoint of ours, in one line.
- ``run_identity`` / ``check_compatible``: what must match between the checkpoint and the run
  (model, optimizer, K-FAC on/off, parameter shapes, the keys that fix the data order).
- ``CheckpointPolicy``: when and where the trainer writes them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from launcher.workdir import atomic_write_bytes

CHECKPOINT_DIR = "checkpoints"
FORMAT = "kfac-mnist-checkpoint"
VERSION = 1
_NAME = re.compile(r"step_(\d+)\.pt\Z")

# The config keys a checkpoint must share with the run that resumes it: they fix the model,
# the optimizer's state layout and the global data order. Epochs and learning rates may change.
MATCH_KEYS = ("model.name", "optimizer.name", "kfac.enabled", "seed", "trainer.mini_batch_size",
              "trainer.dtype", "data.max_train_samples")


@dataclass(frozen=True)
class CheckpointPolicy:
    """When and where the trainer writes checkpoints (``every_steps=0``: not by step count).

    Attributes:
        directory: The run's checkpoint folder.
        every_steps: Write every this many steps (0: off).
        every_epoch: Also write at every epoch end.
        keep: Keep the newest this many.
        identity: ``checkpoint.run_identity`` of the run, stored in every checkpoint.
        work_dir: Where the ``preempted`` marker goes (``None``: nowhere).
    """

    directory: str
    every_steps: int = 0
    every_epoch: bool = False
    keep: int = 3
    identity: Mapping[str, Any] = field(default_factory=dict)
    work_dir: Optional[str] = None


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or from another run shape; the message is one line."""


def checkpoint_name(step: int) -> str:
    """``step_000123.pt``."""
    return f"step_{step:06d}.pt"


def list_checkpoints(directory: str | os.PathLike[str]) -> list[Path]:
    """The checkpoints in a folder, oldest step first (temporary files are not checkpoints)."""
    folder = Path(directory)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def newest_checkpoint(work_dir: str | os.PathLike[str]) -> Optional[Path]:
    """The newest checkpoint of a work dir (its ``checkpoints/`` folder, or the folder itself)."""
    work_dir = Path(work_dir)
    found = list_checkpoints(work_dir / CHECKPOINT_DIR) or list_checkpoints(work_dir)
    return found[-1] if found else None


# --- identity ---------------------------------------------------------------------------------


def _get(cfg: Any, dotted: str) -> Any:
    value = cfg
    for part in dotted.split("."):
        value = value[part] if isinstance(value, Mapping) else getattr(value, part)
    return value


def run_identity(cfg: Any, param_shapes: Mapping[str, list[int]]) -> dict[str, Any]:
    """What identifies a run's shape: the keys that must match, their fingerprint, the shapes."""
    keys = {key: _get(cfg, key) for key in MATCH_KEYS}
    keys["kfac.disable_layers"] = sorted(str(s) for s in _get(cfg, "kfac.disable_layers") or [])
    text = json.dumps(keys, sort_keys=True, default=str)
    return {
        "model": keys["model.name"],
        "optimizer": keys["optimizer.name"],
        "kfac": bool(keys["kfac.enabled"]),
        "param_shapes": {name: list(shape) for name, shape in param_shapes.items()},
        "keys": keys,
        "fingerprint": hashlib.sha256(text.encode()).hexdigest()[:16],
    }


def model_shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    """``{parameter name: shape}`` in model order."""
    return {name: list(p.shape) for name, p in model.named_parameters()}


def identity_differences(saved: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """What differs between a checkpoint's identity and the run's, one phrase per key."""
    diffs = []
    saved_keys, keys = saved.get("keys", {}), expected["keys"]
    for key in sorted(set(saved_keys) | set(keys)):
        if saved_keys.get(key) != keys.get(key):
            diffs.append(f"{key} is {saved_keys.get(key)!r} there, {keys.get(key)!r} here")
    if not diffs and saved.get("param_shapes") != expected["param_shapes"]:
        theirs, ours = saved.get("param_shapes", {}), expected["param_shapes"]
        names = [n for n in {**theirs, **ours} if theirs.get(n) != ours.get(n)]
        diffs.append("parameter shapes differ (" + ", ".join(
            f"{n}: {theirs.get(n)} there, {ours.get(n)} here" for n in names[:3]) + ")")
    if not diffs and saved.get("fingerprint") != expected["fingerprint"]:
        diffs.append(f"config fingerprint {saved.get('fingerprint')} there, {expected['fingerprint']} here")
    return diffs


def check_compatible(state: Mapping[str, Any], identity: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Refuses a checkpoint of another model or config, naming what differs.

    Raises:
        CheckpointError: One line listing every difference.
    """
    diffs = identity_differences(state["identity"], identity)
    if diffs:
        raise CheckpointError(f"checkpoint {path} is from a different run: " + "; ".join(diffs))


# --- writing and reading ----------------------------------------------------------------------


def save_checkpoint(state: Mapping[str, Any], directory: str | os.PathLike[str], step: int, keep: int) -> Path:
    """Writes ``state`` as ``<directory>/step_<step>.pt`` atomically; keeps the newest ``keep``.

    Args:
        state: ``Trainer.state_dict()`` (tensors on any device; saved as they are).
        directory: The run's checkpoint folder (made if missing).
        step: The step the state is at (names the file).
        keep: How many checkpoints to keep, at least 1.

    Returns:
        The checkpoint's path.
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".step_*.tmp*"):  # left by a writer that was killed
        stale.unlink(missing_ok=True)
    path = folder / checkpoint_name(step)
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    atomic_write_bytes(path, buffer.getvalue())  # a temporary file, fsync, rename, fsync of the folder
    # A file of a later step is one a resumed run passed over as damaged (trainer/resume.py):
    # this run's timeline replaces it, so it neither counts as the newest nor survives the pruning.
    found = list_checkpoints(folder)
    later = [p for p in found if int(_NAME.match(p.name).group(1)) > step]
    for old in later + [p for p in found if p not in later][:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> dict[str, Any]:
    """Reads a checkpoint written by ``save_checkpoint``.

    Raises:
        CheckpointError: Missing, truncated, random bytes, or not a checkpoint of this project.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # torch.save writes a zip archive
            raise CheckpointError(f"checkpoint {path} is not a checkpoint file (not a torch.save archive)")
    try:
        # weights_only: a checkpoint is data; unpickling arbitrary objects from a file is not allowed.
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # torch raises several types for a damaged zip or pickle
        detail = " ".join(str(err).split()).split(". ")[0][:160] or type(err).__name__
        raise CheckpointError(f"checkpoint {path} is damaged or truncated: {detail}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a kfac.py checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {state.get('version')}, this "
                              f"kfac.py reads version {VERSION}")
    return state
