"""Bad input found before Hydra runs, in one line each: a config group's unknown option, a key
the schema lacks, an override Hydra cannot parse or compose (a sweep's points too).

Pure of the trainer: the schema comes in as an OmegaConf node, and problems are raised as
``ComposeError`` for the entry point to report (kfac.py's ``fail``).
"""

from __future__ import annotations

import itertools
import os
from typing import Any

from omegaconf import DictConfig, OmegaConf

from launcher.config import CONFIG_DIR, config_groups, group_options
from launcher.flags import did_you_mean


class ComposeError(ValueError):
    """Bad input: the message is the one line to show."""


def sweep_points(overrides: list[str], limit: int = 16) -> list[list[str]]:
    """The sweep's first point, then one point per other value of each swept key (up to ``limit``).

    Composing these finds every bad value without composing the whole grid.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    choices = []
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.is_sweep_override():
            values = itertools.islice(override.sweep_string_iterator(), limit)
            choices.append([f"{override.get_key_element()}={v}" for v in values])
        else:
            choices.append([override.input_line])
    first = [c[0] for c in choices]
    return [first] + [[*first[:i], alt, *first[i + 1:]] for i, c in enumerate(choices) for alt in c[1:]]


def check_group_options(overrides: list[str], config_dirs: list[str]) -> None:
    """Refuses ``model=nope``, ``sweep=nope`` ... in one line with the known names (Hydra would
    ignore an optional group's bad name, or print its search path for a required one).

    Raises:
        ComposeError: Naming the bad option and the known ones.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # precompose reports the unparsable override
        return
    checked = config_groups()  # every group: Hydra skips a misspelt optional one silently
    for override in parsed:
        key = override.get_key_element().lstrip("+~")
        if key not in checked or override.value() is None:
            continue
        names = list(override.sweep_string_iterator()) if override.is_sweep_override() else \
            [override.get_value_element_as_str()]
        known = group_options(key, config_dirs)
        for name in names:
            if name not in known:
                raise ComposeError(f"{key}={name}: no such {key} config{did_you_mean(name, known)} "
                                   f"(known: {', '.join(known) or 'none'})")


def schema_keys(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (``trainer.epochs``, ``kfac.damping_act``, ...)."""
    keys = []
    for name in node:
        key = f"{prefix}{name}"
        keys.append(key)
        if OmegaConf.is_dict(node[name]):
            keys += schema_keys(node[name], key + ".")
    return keys


def check_keys(overrides: list[str], config_dirs: list[str], schema: Any) -> None:
    """Refuses an override of a key the ``schema`` (an OmegaConf node) lacks, ``+trainer.epoch=3`` included.

    Hydra would add a ``+key`` silently (and suggest the ``+`` for a plain one); a typo must
    stop the run, with the closest real key.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # precompose reports the unparsable override
        return
    groups = config_groups(config_dirs)
    known = schema_keys(schema)
    leaves = [k for k in known if not OmegaConf.is_dict(OmegaConf.select(schema, k))]  # what to suggest
    for override in parsed:
        key = override.get_key_element().lstrip("+~").split("@")[0]
        if key.split(".")[0] == "hydra" or key in groups or key in known:
            continue
        raise ComposeError(f"{override.input_line}: {key} is not a config key"
                           f"{did_you_mean(key, leaves, cutoff=0.85)} (python3 kfac.py --cfg job lists them)")


def unparsable(overrides: list[str]) -> str:
    """``"<override>: "`` for the first override Hydra cannot parse (its own message names none)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except Exception:
            return f"{override}: "
    return ""


def compose_points(overrides: list[str], config_dirs: list[str], multirun: bool) -> list[DictConfig]:
    """Composes the config of ``overrides`` (a sweep's points with ``multirun``) before Hydra runs.

    For a sweep (``-m``) it composes the first point, then that point with the first value of
    each parameter of the sweep file, so a bad key in a sweep file is found here too.

    Raises:
        ComposeError: Hydra, OmegaConf or YAML refused it; the first unparsable override named.
    """
    from hydra import compose, initialize_config_dir

    search = [f"hydra.searchpath=[{','.join('file://' + os.path.abspath(d) for d in config_dirs)}]"] if config_dirs else []
    try:
        points = sweep_points(overrides) if multirun else [overrides]
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=[*search, *points[0]], return_hydra_config=multirun)
            params = cfg.hydra.sweeper.get("params") or {} if multirun else {}
            if params:  # the sweep file's own parameters
                swept = sweep_points([f"{k}={v}" for k, v in params.items()])
                points = [[*p, *swept[0]] for p in points] + [[*points[0], *p] for p in swept[1:]]
            return [compose(config_name="config", overrides=[*search, *p]) for p in points]
    except Exception as err:  # Hydra, OmegaConf, YAML in a config file ...: all bad input
        cause = err.__cause__
        detail = f": {str(cause).splitlines()[0]}" if cause and str(cause) else ""
        raise ComposeError(unparsable(overrides) + " ".join(str(err).split()) + detail) from err
