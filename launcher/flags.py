"""LBANN's command-line flags, translated into Hydra overrides. Pure: argv in, argv out.

``translate`` turns ``--nodes 2 --kfac --kfac-damping-act 0.01,1`` into
``launcher.nodes=2 kfac.enabled=true kfac.damping_act=[0.01,1.0]`` and passes Hydra's own
arguments (``key=value`` overrides, ``-m``, ``--cfg job``, ``--help`` ...) through unchanged.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

from launcher.config import group_options

STRATEGIES = ("all", "each", "root", "balanced")
# optimizer.schedule's choices; the home is trainer/lr_schedule.py (the launcher imports no trainer
# code), a test keeps the two the same.
SCHEDULES = ("constant", "cosine", "step")


class FlagError(ValueError):
    """A flag or its value is not valid; the message names the flag and what is allowed."""


def _int(minimum: int) -> Callable[[str, str], str]:
    def parse(flag: str, text: str) -> str:
        try:
            value = int(text)
        except ValueError:
            raise FlagError(f"{flag}: expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise FlagError(f"{flag}: expected an integer >= {minimum}, got {value}")
        return str(value)
    return parse


def _float(flag: str, text: str, *, positive: bool = False, below_one: bool = False) -> float:
    try:
        value = float(text)
    except ValueError:
        raise FlagError(f"{flag}: expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise FlagError(f"{flag}: expected a finite number, got {text!r}")
    if positive and value <= 0:
        raise FlagError(f"{flag}: expected a number > 0, got {text}")
    if below_one and not 0 <= value < 1:
        raise FlagError(f"{flag}: expected a number in [0, 1), got {text}")
    if value < 0:
        raise FlagError(f"{flag}: expected a number >= 0, got {text}")
    return value


def _positive_float(flag: str, text: str) -> str:
    return repr(_float(flag, text, positive=True))


def _nonnegative_float(flag: str, text: str) -> str:
    return repr(_float(flag, text))


def _decay(flag: str, text: str) -> str:
    return repr(_float(flag, text, below_one=True))


def _damping(flag: str, text: str) -> str:
    parts = text.replace(",", " ").split()
    if len(parts) not in (1, 2):
        raise FlagError(f"{flag}: expected one value or 'init,target', got {text!r}")
    values = [_float(flag, p, positive=True) for p in parts]
    if len(values) == 2 and values[0] < values[1]:
        raise FlagError(f"{flag}: init {parts[0]} < target {parts[1]} is not allowed "
                        "(damping warms down from init to target)")
    return "[" + ",".join(repr(v) for v in values) + "]"


def _choice(choices: tuple[str, ...]) -> Callable[[str, str], str]:
    def parse(flag: str, text: str) -> str:
        if text not in choices:
            raise FlagError(f"{flag}: {text!r} is not one of {', '.join(choices)}")
        return text
    return parse


def _group(group: str) -> Callable[[str, str], str]:
    """A choice among a config group's files (``configs/<group>/*.yaml``), looked up when parsed."""
    def parse(flag: str, text: str) -> str:
        return _choice(group_options(group))(flag, text)
    return parse


def _name(flag: str, text: str) -> str:
    if not text or any(c in text for c in "/=,[]'\" \t"):
        raise FlagError(f"{flag}: expected a plain name, got {text!r}")
    return text


def _names(flag: str, text: str) -> str:
    names = [n for n in text.replace(",", " ").split() if n]
    if not names:
        raise FlagError(f"{flag}: expected layer names such as ip1,ip2, got {text!r}")
    return "[" + ",".join(_name(flag, n) for n in names) + "]"


@dataclass(frozen=True)
class Flag:
    """One LBANN flag: the override key it sets and how its value is checked and written."""

    key: str
    parse: Optional[Callable[[str, str], str]]  # None: a switch that sets the key to true
    help: str  # no default here: the config (``--cfg job``) is the one home of the defaults


FLAGS: dict[str, Flag] = {
    "--nodes": Flag("launcher.nodes", _int(1), "number of nodes"),
    "--procs-per-node": Flag("launcher.procs_per_node", _int(1), "MPI ranks per node"),
    "--partition": Flag("launcher.partition", _name, "scheduler partition"),
    "--account": Flag("launcher.account", _name, "scheduler account"),
    "--reservation": Flag("launcher.reservation", _name, "scheduler reservation"),
    "--time-limit": Flag("launcher.time_limit", _int(1), "job time limit in minutes"),
    "--job-name": Flag("launcher.job_name", _name, "job name"),
    "--setup-only": Flag("launcher.setup_only", None, "write the work directory, run nothing"),
    "--batch-job": Flag("launcher.batch_job", None, "submit the batch script with sbatch"),
    "--num-epochs": Flag("trainer.epochs", _int(1), "epochs"),
    "--mini-batch-size": Flag("trainer.mini_batch_size", _int(1), "GLOBAL mini-batch size"),
    "--model": Flag("model", _group("model"), "a configs/model/ file"),
    "--optimizer": Flag("optimizer", _group("optimizer"), "a configs/optimizer/ file"),
    "--optimizer-learning-rate": Flag("optimizer.learning_rate", _positive_float, "learning rate"),
    "--optimizer-warmup-steps": Flag("optimizer.warmup_steps", _int(0), "linear learning-rate warm-up steps"),
    "--optimizer-schedule": Flag("optimizer.schedule", _choice(SCHEDULES), " | ".join(SCHEDULES) + " (after warm-up)"),
    "--kfac": Flag("kfac.enabled", None, "attach the K-FAC callback"),
    "--kfac-damping-act": Flag("kfac.damping_act", _damping, "activation damping: v or init,target"),
    "--kfac-damping-err": Flag("kfac.damping_err", _damping, "error damping: v or init,target"),
    "--kfac-damping-bn-act": Flag("kfac.damping_bn_act", _damping, "BatchNorm act damping"),
    "--kfac-damping-bn-err": Flag("kfac.damping_bn_err", _damping, "BatchNorm err damping"),
    "--kfac-damping-warmup-steps": Flag("kfac.damping_warmup_steps", _int(1), "damping warm-up steps"),
    "--kfac-update-interval-init": Flag("kfac.update_interval_init", _int(1), "initial factor-update interval"),
    "--kfac-update-interval-target": Flag("kfac.update_interval_target", _int(1), "final factor-update interval"),
    "--kfac-update-interval-steps": Flag("kfac.update_interval_steps", _int(0), "steps to reach the final interval"),
    "--kfac-compute-interval-steps": Flag("kfac.compute_interval_steps", _int(1), "recompute inverses every N steps"),
    "--kfac-use-pi": Flag("kfac.use_pi", None, "pi-damping"),
    "--use-eigen": Flag("kfac.use_eigen", None, "eigendecompositions instead of Cholesky"),
    "--kfac-kronecker-decay": Flag("kfac.kronecker_decay", _decay, "running-average weight on the old value"),
    "--kfac-inverse-strategy": Flag("kfac.inverse_strategy", _choice(STRATEGIES), " | ".join(STRATEGIES)),
    "--kfac-disable-layers": Flag("kfac.disable_layers", _names, "layers left to the base optimizer (ip1,ip2)"),
    "--kfac-learning-rate-factor": Flag("kfac.learning_rate_factor", _positive_float, "scales the preconditioned gradient"),
    "--print-matrix": Flag("kfac.print_matrix", None, "print the K-FAC matrices"),
    "--print-matrix-summary": Flag("kfac.print_matrix_summary", None, "print K-FAC matrix summaries"),
    "--kfac-print-time": Flag("kfac.print_time", None, "print each inverse's timing"),
    "--seed": Flag("seed", _int(0), "random seed"),
}

# Hydra's own command-line arguments, with how many values each takes.
HYDRA_ARGS = {
    "-m": 0, "--multirun": 0, "--resolve": 0, "--hydra-help": 0, "--version": 0,
    "-h": 0, "--help": 0, "--cfg": 1, "-c": 1, "--package": 1, "-p": 1, "--info": 1, "-i": 1,
    "--config-path": 1, "-cp": 1, "--config-name": 1, "-cn": 1, "--config-dir": 1, "-cd": 1,
    "--experimental-rerun": 1, "--shell-completion": 0, "-sc": 1,
}


def canonical_flag(arg: str) -> str:
    """LBANN spells some flags with underscores, some with hyphens; accept both everywhere."""
    return "--" + arg[2:].replace("_", "-") if arg.startswith("--") else arg


def did_you_mean(word: str, known: list[str], cutoff: float = 0.6) -> str:
    """``"; did you mean X?"`` for the closest of ``known`` names, or ``""``.

    ``cutoff`` is difflib's similarity bar: long dotted keys share their section's prefix, so
    they need a higher one than short names.
    """
    close = difflib.get_close_matches(word, known, n=1, cutoff=cutoff)
    return f"; did you mean {close[0]}?" if close else ""


def stray_value(arg: str, before: Optional[str]) -> str:
    """The message for a word that is neither a flag nor a ``key=value`` override."""
    switch = FLAGS.get(canonical_flag(before.partition("=")[0])) if before else None
    if switch is not None and switch.parse is None:
        return f"{before} takes no value, but {arg!r} follows it: drop {arg!r} (the flag alone turns it on)"
    return f"{arg!r}: neither a flag (--name) nor an override (key=value)"


def translate(argv: list[str]) -> list[str]:
    """Turns LBANN flags into Hydra overrides; Hydra's arguments pass through unchanged.

    Raises:
        FlagError: for an unknown flag, a missing value or a value that is not allowed.
    """
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        name, eq, inline = arg.partition("=")
        if arg in HYDRA_ARGS or name in HYDRA_ARGS:
            out.append(arg)
            if not eq and HYDRA_ARGS.get(arg, 0) and i < len(argv):
                out.append(argv[i])
                i += 1
            continue
        if not arg.startswith("-"):
            if not eq and not arg.startswith("~"):  # Hydra would answer with a lexer error
                raise FlagError(stray_value(arg, argv[i - 2] if i >= 2 else None))
            out.append(arg)  # a Hydra override: key=value, +key=value, ~key
            continue
        flag = FLAGS.get(canonical_flag(name))
        if flag is None:
            raise FlagError(f"{name}: unknown flag{did_you_mean(canonical_flag(name), [*FLAGS, *HYDRA_ARGS])} "
                            "(see --help for the flags, or use a Hydra override key=value)")
        if flag.parse is None:
            if eq:
                raise FlagError(f"{name}: takes no value")
            out.append(f"{flag.key}=true")
            continue
        if eq:
            value = inline
        elif i < len(argv) and not (argv[i].startswith("--") and argv[i][2:3].isalpha()):
            value = argv[i]
            i += 1
        else:
            raise FlagError(f"{name}: missing value ({flag.help})")
        out.append(f"{flag.key}={flag.parse(name, value)}")
    return out


def help_text() -> str:
    """The LBANN flag table printed by ``--help`` before Hydra's own help."""
    lines = ["kfac.py: train LBANN's MNIST models, optionally with K-FAC.", "",
             "LBANN flags (hyphens and underscores are interchangeable):"]
    for name, flag in FLAGS.items():
        value = "" if flag.parse is None else " VALUE"
        lines.append(f"  {name + value:36s} {flag.help}  -> {flag.key}")
    lines += ["", "Defaults: python3 kfac.py --cfg job prints the composed config (add flags to see their effect).",
              "Hydra overrides (key=value) and -m/--multirun, --cfg job, --info work too.", ""]
    return "\n".join(lines)
