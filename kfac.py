#!/usr/bin/env python3
"""Train LBANN's MNIST models, optionally with K-FAC.

    python3 kfac.py --model mlp --optimizer adam --optimizer-learning-rate 1e-4
    python3 kfac.py --model mlp --optimizer sgd --optimizer-learning-rate 1e-1 \
        --kfac --kfac-damping-act 0.01 --kfac-damping-err 1
    python3 kfac.py model=cnn optimizer=momentum optimizer.learning_rate=0.01   # Hydra overrides
    python3 kfac.py --help

LBANN's flags become Hydra overrides (launcher/flags.py); Hydra composes configs/ onto the
schema (trainer/config.py); then this rank trains (trainer/run.py).
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

# ruff: noqa: E402 (the path above must be set before the project's imports)
import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from launcher.env import LAUNCHED, rank_info
from launcher.flags import FlagError, help_text, translate
from launcher.launch import LaunchError, launch_argv, run_ranks
from trainer.config import Config, validate

ConfigStore.instance().store(name="schema", node=Config)
CONFIG_DIR = os.path.join(HERE, "configs")


def fail(message: str) -> None:
    """Ends the program with one clear line and exit status 2 (bad input)."""
    print(f"kfac.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def precompose(overrides: list[str]) -> None:
    """Composes the config once before Hydra runs, so bad input is one line, not a traceback."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        cause = err.__cause__
        detail = f": {str(cause).splitlines()[0]}" if cause and str(cause) else ""
        fail(" ".join(str(err).split()) + detail)
    errors = validate(cfg)
    if errors:
        fail("; ".join(errors))


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Runs one composed config: launches ranks, or trains in this process."""
    errors = validate(cfg)
    if errors:
        fail("; ".join(errors))
    lc = cfg.launcher
    output_dir = HydraConfig.get().runtime.output_dir
    if lc.setup_only or lc.batch_job:
        fail("--setup-only and --batch-job are not supported yet")
    if os.environ.get(LAUNCHED) or lc.nodes * lc.procs_per_node == 1 or lc.scheduler == "local":
        from trainer.run import train

        train(cfg, output_dir, rank_info(os.environ))
        return
    # Re-invoke kfac.py in every rank with the canonical overrides (never the LBANN flags),
    # all writing into this run's directory.
    overrides = [*HydraConfig.get().overrides.task, f"hydra.run.dir={output_dir}", "hydra.output_subdir=null"]
    try:
        argv = launch_argv(lc, os.path.abspath(__file__), overrides, os.environ)
    except LaunchError as err:
        fail(str(err))
    status = run_ranks(argv)
    if status:
        print(f"kfac.py: the ranks ended with status {status}", file=sys.stderr)
        sys.exit(status)


def cli(argv: list[str]) -> None:
    """Translates LBANN flags, checks the config, then hands over to Hydra."""
    try:
        hydra_args = translate(argv)
    except FlagError as err:
        fail(str(err))
    if "--help" in hydra_args or "-h" in hydra_args:
        print(help_text())
    else:
        hydra_only = {"-m", "--multirun", "--cfg", "-c", "--info", "-i", "--hydra-help",
                      "--version", "--shell-completion", "-sc", "-cp", "-cn", "-cd",
                      "--config-path", "--config-name", "--config-dir", "--experimental-rerun"}
        if not hydra_only.intersection(a.partition("=")[0] for a in hydra_args):
            precompose(hydra_args)
    sys.argv = [sys.argv[0], *hydra_args]
    main()


if __name__ == "__main__":
    cli(sys.argv[1:])
