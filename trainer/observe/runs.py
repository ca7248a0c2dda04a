"""The runs a report compares: their ``metrics.jsonl`` files, records and configs, and the
names they go by (the config values that differ between them).

Everything but the readers of files is pure.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from launcher.workdir import METRICS_FILE, epoch_records, parse_metrics
from trainer.observe.lbann_log import g

METRICS = METRICS_FILE
# Keys that differ between runs without making them different experiments.
# The job name is in the work dir's name, which names runs that differ in nothing else.
IGNORED = {"launcher.experiment_dir", "launcher.job_name", "data.dir", "trainer.progress", "trainer.tensorboard",
           "kfac.print_time", "kfac.print_matrix", "kfac.print_matrix_summary"}
ALIASES = {"optimizer.name": "optimizer", "optimizer.learning_rate": "lr", "kfac.enabled": "kfac",
           "model.name": "model", "trainer.epochs": "epochs", "trainer.mini_batch_size": "mb"}

class ReportError(Exception):
    """Bad input to the report: one line for the user."""


@dataclass
class Run:
    """One run: its work dir, per-epoch records and (flattened) config."""

    path: Path
    records: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)
    complete: bool = False  # the config is a whole composed config, not just overrides


# -- reading (thin I/O) ------------------------------------------------------------------


def _natural(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def find_metrics(paths: Sequence[str | Path]) -> list[Path]:
    """The metrics.jsonl files of the given work dirs, sweep dirs or files, in natural order.

    Raises:
        ReportError: For a path that does not exist.
    """
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise ReportError(f"no such file or directory: {p}")
        if p.is_file():
            candidates = [p]
        elif (p / METRICS).is_file():
            candidates = [p / METRICS]
        else:
            candidates = sorted(p.rglob(METRICS), key=_natural)
        found += [c for c in candidates if c not in found]
    return found


def parse_records(text: str) -> list[dict[str, Any]]:
    """The per-epoch JSON objects of a metrics.jsonl text (blank, partial and test lines skipped)."""
    return epoch_records(parse_metrics(text))


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; one-element lists (dampings) become their element."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, list):
            flat[name] = value[0] if len(value) == 1 else tuple(value)
        else:
            flat[name] = value
    return flat


def overrides_config(overrides: Sequence[str]) -> dict[str, Any]:
    """Hydra overrides as a flat config: ``optimizer=sgd`` is the group choice ``optimizer.name``."""
    config: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.lstrip("+~").partition("=")
        if not sep:
            continue
        value = yaml.safe_load(text) if text else None
        if "." not in key and isinstance(value, str):
            key = f"{key}.name"
        config.update(flatten({key: value}))
    return config


def read_config(work_dir: Path) -> dict[str, Any]:
    """The flattened config of a work dir: .hydra/config.yaml, config.yaml, or the overrides."""
    for name in (".hydra/config.yaml", "config.yaml"):
        path = work_dir / name
        if path.is_file():
            tree = yaml.safe_load(path.read_text()) or {}
            if isinstance(tree, Mapping):
                return flatten(tree)
    path = work_dir / ".hydra" / "overrides.yaml"
    if path.is_file():
        return overrides_config(yaml.safe_load(path.read_text()) or [])
    return {}


def load_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Reads every run under ``paths``; runs with no complete record are skipped.

    Raises:
        ReportError: For a missing path, or when no metrics are found.
    """
    runs = []
    for metrics in find_metrics(paths):
        records = parse_records(metrics.read_text())
        if records:
            complete = any((metrics.parent / n).is_file() for n in (".hydra/config.yaml", "config.yaml"))
            runs.append(Run(metrics.parent, records, read_config(metrics.parent), complete))
    if not runs:
        raise ReportError(f"no {METRICS} with records found in {', '.join(map(str, paths))}")
    return runs

# -- naming and the table (pure) ---------------------------------------------------------


def relevant(run: Run, key: str) -> bool:
    # With K-FAC off, its options don't describe the run.
    return not (key.startswith("kfac.") and key != "kfac.enabled" and run.config.get("kfac.enabled") is False)


def varying_keys(runs: Sequence[Run]) -> list[str]:
    """Config keys whose values differ between runs, in config order.

    A key missing from a run's whole composed config (that config predates the key) says
    nothing about how the runs differ, so it is left out; a run known only by its overrides
    lacks every key it did not override, and those still count.
    """
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run.config if k not in keys and k not in IGNORED]
    keys = [k for k in keys if all(k in r.config for r in runs if r.complete)]
    return [k for k in keys if len({repr(r.config.get(k)) for r in runs}) > 1]


def format_value(key: str, value: Any) -> str:
    """A config value as it appears in a run name."""
    if key == "kfac.enabled":
        return "on" if value else "off"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return g(value)
    if isinstance(value, tuple):
        return ",".join(format_value(key, v) for v in value)
    return str(value)


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """Short, unambiguous names: ``optimizer.learning_rate`` -> ``lr``, ``kfac.damping_act`` -> ``damping_act``."""
    names = {k: ALIASES.get(k, k.rsplit(".", 1)[-1]) for k in keys}
    clash = {n for n in names.values() if list(names.values()).count(n) > 1}
    return {k: (k if n in clash else n) for k, n in names.items()}


def run_labels(runs: Sequence[Run]) -> list[str]:
    """One name per run, from the config values that differ (else the directory name)."""
    keys = varying_keys(runs)
    names = short_names(keys)
    labels = []
    for run in runs:
        parts = [f"{names[k]}={format_value(k, run.config.get(k))}" for k in keys
                 if k in run.config and relevant(run, k)]
        labels.append(" ".join(parts) or run.path.name)
    for i, label in enumerate(labels):
        if labels.count(label) > 1:
            labels[i] = f"{label} ({runs[i].path.name})"
    return labels

def test_points(records: Sequence[Mapping[str, Any]]) -> int:
    """How many per-epoch records of a run hold a test accuracy."""
    return sum(r.get("test_accuracy") is not None for r in records)
