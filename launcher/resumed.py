"""A resumed run keeps its own config: ``trainer.resume=<work dir>`` alone continues that run.

The work dir's ``config.yaml`` (the resolved config the run was started with) becomes the base
of the resumed run: every value it holds that differs from the defaults is carried as an
override, except the keys given on this command line (named in an override, or changed by a
group such as ``experiment=...`` or ``--model``). Those win; if one of them changes what a
checkpoint must share with its run (the model, the optimizer, the seed, the batch...), the
checkpoint check refuses it in one line, as for any resume (``trainer/checkpoint.py``).

Pure: configs in, override strings out (the entry point composes and reads the files).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from launcher.workdir import CONFIG_NAME

# Values of the old run that a resumed one never takes over: where it resumes from is this
# command's, and a run that only wrote its work dir has no checkpoint to resume.
NOT_CARRIED = ("trainer.resume", "launcher.setup_only")
_BARE = re.compile(r"[A-Za-z_/.][\w/.\-+:@%]*")
_SPECIAL = {"true", "false", "null", "none", "inf", "-inf", "+inf", "nan"}


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{dotted key: value}`` of a nested mapping; lists and scalars are values."""
    out: dict[str, Any] = {}
    if isinstance(node, Mapping):
        for name, value in node.items():
            key = f"{prefix}{name}"
            if isinstance(value, Mapping) and value:
                out.update(flatten(value, key + "."))
            else:
                out[key] = value
    return out


def render(value: Any) -> str:
    """``value`` in Hydra's override grammar (strings quoted unless they read as themselves)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(render(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{render(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if _BARE.fullmatch(text) and text.lower() not in _SPECIAL:
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def override_key(override: str) -> str:
    """``trainer.epochs`` of ``+trainer.epochs=3``; ``model`` of ``model=cnn``."""
    return override.lstrip("+~").partition("=")[0].split("@")[0]


def given_keys(overrides: Sequence[str], defaults: Mapping[str, Any], user: Mapping[str, Any]) -> set[str]:
    """The flat keys this command line sets: named in an override (a group names all of its
    keys), or composed to a value other than the default (``experiment=...``, ``--kfac``)."""
    named = {override_key(o) for o in overrides}
    return {k for k in defaults if user.get(k) != defaults[k] or any(k == n or k.startswith(n + ".") for n in named)}


def carried_overrides(saved: Mapping[str, Any], defaults: Mapping[str, Any], user: Mapping[str, Any],
                      overrides: Sequence[str]) -> list[str]:
    """The overrides that give a resumed run the saved run's config.

    Args:
        saved: The saved run's config (its ``config.yaml``, nested).
        defaults: The config composed with no override (nested).
        user: The config composed from this command line (nested).
        overrides: This command line's overrides.

    Returns:
        ``key=value`` for each saved value that differs from the default and that this
        command line does not set; keys the schema no longer has are left out.
    """
    flat_saved, flat_defaults = flatten(saved), flatten(defaults)
    given = given_keys(overrides, flat_defaults, flatten(user))
    return [f"{key}={render(value)}" for key, value in flat_saved.items()
            if key in flat_defaults and key not in given and key not in NOT_CARRIED and value != flat_defaults[key]]


def saved_config_path(checkpoint: str | Path) -> Optional[Path]:
    """The ``config.yaml`` of the work dir a checkpoint belongs to (None: it has none)."""
    folder = Path(checkpoint).parent
    work_dir = folder.parent if folder.name == "checkpoints" else folder
    found = work_dir / CONFIG_NAME
    return found if found.is_file() else None
