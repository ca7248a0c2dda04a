"""Every file under configs/ composes onto the schema and validates; --help loads no torch.

The sweep files are composed with the first value of each swept key, as ``kfac.py -m`` would
start their first run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from launcher.config import CONFIG_DIR, group_options
from trainer.config import Config, validate

ROOT = Path(__file__).resolve().parent.parent
GROUPS = ("model", "optimizer", "kfac", "launcher", "experiment", "sweep")
ConfigStore.instance().store(name="schema", node=Config)


def options() -> list[tuple[str, str]]:
    return [(group, name) for group in GROUPS for name in group_options(group)]


def compose_config(overrides: list[str], hydra: bool = False):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=hydra)


def first_point(params: dict) -> list[str]:
    """``key=first value`` of each swept key of a sweep file's ``hydra.sweeper.params``."""
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    first = [next(iter(o.sweep_string_iterator())) if o.is_sweep_override() else o.get_value_element_as_str()
             for o in parsed]
    return [f"{o.get_key_element()}={value}" for o, value in zip(parsed, first, strict=True)]


def test_every_group_has_its_files_listed():
    assert {"mlp", "cnn"} <= set(group_options("model"))
    assert set(group_options("launcher")) == {"auto", "local", "mpiexec", "slurm"}
    assert len(options()) == sum(len(list((ROOT / "configs" / g).glob("*.yaml"))) for g in GROUPS)


def test_the_primary_config_composes_and_validates():
    cfg = compose_config([])
    assert validate(cfg) == []
    assert cfg.model.name == "mlp" and cfg.optimizer.name == "adam" and cfg.launcher.scheduler == "auto"


@pytest.mark.parametrize("group,name", options(), ids=lambda x: x)
def test_every_config_file_composes_and_validates(group, name):
    if group == "sweep":
        params = compose_config([f"sweep={name}"], hydra=True).hydra.sweeper.params
        assert params, f"sweep/{name}.yaml sweeps nothing"
        cfg = compose_config([f"sweep={name}", *first_point(OmegaConf.to_container(params))])
    else:
        cfg = compose_config([f"{group}={name}"])
    assert validate(cfg) == [], f"{group}/{name}.yaml"
    if group == "launcher":
        assert cfg.launcher.scheduler == name
    if group in ("model", "optimizer"):
        assert cfg[group].name == name


# kfac.py in a fresh interpreter, as `python kfac.py ARGS` runs it; its last stdout line then says
# its exit status and which of the project's packages and torch it had loaded.
IN_PROCESS = """import json, runpy, sys
sys.argv = ['kfac.py', *sys.argv[1:]]
try:
    runpy.run_path('kfac.py', run_name='__main__')
except SystemExit as end:
    status = end.code
else:
    status = 0
loaded = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'trainer', 'models', 'kfac_callback'})
print(json.dumps({'exit': status, 'loaded': loaded}))
"""


def run_kfac_py(*args: str) -> tuple[subprocess.CompletedProcess, dict]:
    result = subprocess.run([sys.executable, "-c", IN_PROCESS, *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result, json.loads(result.stdout.splitlines()[-1])


def test_help_loads_no_torch():
    result, end = run_kfac_py("--help")
    assert "--kfac-damping-act" in result.stdout and "Powered by Hydra" in result.stdout
    assert result.stderr == "" and end["loaded"] == [], f"--help loaded: {end['loaded']}; {result.stderr}"


@pytest.mark.parametrize("override", ["trainer.epochs=-2", "optimizer.learning_rate=-1", "trainer.precision=fp8",
                                      "model.task=ranking", "trainer.backend=carrier-pigeon"])
def test_a_bad_value_is_refused_in_one_line_before_torch_loads(override):
    """Validation needs only the names of the models, tasks, communicators and precisions."""
    result, end = run_kfac_py(override)
    key = override.partition("=")[0]
    assert result.stderr.startswith(f"kfac.py: error: {key}") and result.stderr.count("\n") == 1, result.stderr
    assert end["exit"] == 2 and "torch" not in end["loaded"], end


def test_help_into_a_closed_pipe_prints_no_traceback():
    result = subprocess.run(f"{sys.executable} kfac.py --help | head -1", shell=True, cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.startswith("kfac.py: ") and result.stdout.count("\n") == 1
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr


def test_kfac_large_batch_is_the_measured_lever_recipe_at_the_flags_batch():
    """experiment=kfac_large_batch takes its batch from --mini_batch_size, and composes to the
    recipe benchmarks/batch_scaling.py measured: its K-FAC base with act damping 0.1 and
    factors from 1000 samples."""
    from benchmarks.batch_scaling import BASE_FLAGS
    from launcher.flags import translate

    recipe = f"{BASE_FLAGS['kfac']} --optimizer-learning-rate 1 --kfac-damping-act 0.1 kfac.factor_batch_size=1000"
    lever = compose_config(translate(["--mini_batch_size", "3000", *recipe.split()]))
    experiment = compose_config(translate(["--mini_batch_size", "3000", "experiment=kfac_large_batch"]))
    assert experiment.trainer.mini_batch_size == 3000
    assert experiment.optimizer == lever.optimizer and experiment.kfac == lever.kfac
