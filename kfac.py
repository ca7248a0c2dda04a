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
from datetime import datetime
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

# ruff: noqa: E402 (the path above must be set before the project's imports)
import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from launcher.batch import SubmitError, choose_work_dir
from launcher.config import LauncherConfig
from launcher.env import LAUNCHED, rank_info
from launcher.flags import FlagError, help_text, translate
from launcher.launch import LaunchError, Run, start
from trainer.config import Config, section, validate

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
    """Runs one composed config: as one rank of a job, or by starting the run's ranks."""
    errors = validate(cfg)
    if errors:
        fail("; ".join(errors))
    from trainer.run import train

    hydra_cfg = HydraConfig.get()
    if os.environ.get(LAUNCHED):  # this process is one rank of a started job
        train(cfg, hydra_cfg.runtime.output_dir, rank_info(os.environ))
        return
    launcher = section(cfg.launcher, LauncherConfig)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        work_dir = Path(hydra_cfg.runtime.output_dir).resolve()  # <sweep dir>/<job number>
    else:
        work_dir = choose_work_dir(Path(launcher.experiment_dir).resolve(), launcher.job_name, datetime.now())
    run = Run(launcher=launcher, work_dir=work_dir, overrides=list(hydra_cfg.overrides.task),
              config_yaml=OmegaConf.to_yaml(cfg, resolve=True), script=os.path.abspath(__file__))
    try:
        status = start(run, lambda out: train(cfg, str(out)))
    except (LaunchError, SubmitError) as err:
        fail(str(err))
    if status:
        print(f"kfac.py: the run ended with status {status}; see {work_dir / 'err.log'}", file=sys.stderr)
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
