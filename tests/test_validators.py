"""Every configuration error the validators know, through the real CLI, at 1 and at 2 ranks.

``CASES`` holds one override set per error the validators can report. Two checks keep it whole:

- line coverage: every ``errors.append(...)`` / ``problems.append(...)`` / ``return [...]`` in a
  validator must run for some case (a new check without a case fails here);
- the real CLI: the cases are packed into a few invocations (the validators report every problem
  at once), each run as ``python kfac.py`` at 1 and at 2 ranks; each must end with exit status 2
  and exactly the one line the validators give in-process, with no traceback.

Then the same class of error found by the ranks themselves (a config written by ``--setup-only``
and changed before ``batch.sh`` runs): 2 real MPI ranks end with one line for the job.
"""

from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore

import kfac_callback.config
import launcher.config
import trainer.config
import trainer.optimizers
import trainer.preflight
from trainer.config import Config, validate
from trainer.preflight import problems

ROOT = Path(__file__).resolve().parent.parent
ConfigStore.instance().store(name="schema", node=Config)

VALIDATORS = [trainer.config.validate, kfac_callback.config.validate_kfac, kfac_callback.config._damping_errors,
              trainer.optimizers.validate_optimizer, launcher.config.validate_launcher,
              trainer.preflight.layer_problems, trainer.preflight.device_problems, trainer.preflight.data_problems]
# Error lines no command line can reach, with the reason.
UNREACHABLE = {
    # The schema types dampings as list[float]: Hydra refuses a non-number before validation.
    "kfac_callback.config.validate_kfac: not a number or list of numbers",
    # Root may write anywhere, and these tests run as root on CI.
    *(["trainer.data.mnist_fetch.data_dir_problem: is not writable"] if os.geteuid() == 0 else []),
}
NO_GPU = not torch.cuda.is_available()


def case_lists(tmp: Path) -> tuple[list[list[str]], list[list[str]]]:
    """(validator cases, machine cases): one override set per error (see the module docstring).

    The machine's checks (trainer/preflight.py) run only on a config the validators pass, so
    their cases are packed apart.
    """
    a_file = tmp / "a_file"
    a_file.write_text("not a folder\n")
    validator_cases = [
        ["model.name=foo"], ["trainer.epochs=0"], ["trainer.mini_batch_size=0"], ["trainer.device=tpu"],
        ["trainer.dtype=float16"], ["trainer.backend=ucx"], ["trainer.backend=nccl", "trainer.device=cpu"],
        ["trainer.num_threads=0"], ["trainer.progress=maybe"], ["trainer.test_every_steps=-1"],
        ["trainer.stop_at_test_accuracy=120"], ["trainer.stop_at_test_accuracy=90"],
        ["trainer.checkpoint_every_steps=-1"], ["trainer.keep_checkpoints=-1"],
        ["trainer.keep_checkpoints=0", "trainer.checkpoint_every_epoch=true"], ["trainer.on_nonfinite=ignore"],
        ["trainer.resume=' '"], ["data.max_train_samples=0"], ["trainer.step_timeout_s=-1"],
        ["trainer.accumulate_steps=0"], ["trainer.accumulate_steps=5", "trainer.mini_batch_size=4"],
        ["optimizer.name=foo"], ["optimizer.learning_rate=0"], ["optimizer.weight_decay=-1"],
        ["launcher.scheduler=pbs"], ["launcher.nodes=0"], ["launcher.time_limit=0"], ["launcher.signal_seconds=-1"],
        ["launcher.requeue=true", "launcher.scheduler=mpiexec"], ["launcher.job_name='a/b'"],
        ["kfac.damping_warmup_steps=-1"], ["kfac.damping_act=[1,2,3]"], ["kfac.damping_err=[-1]"],
        ["kfac.damping_bn_act=[0.01,0.1]"], ["kfac.damping_bn_err=[0.1,0]"],
        ["kfac.damping_act=[0.1,0.01]", "kfac.damping_warmup_steps=0"],
        ["kfac.damping_err=[1e6,1e-6]", "kfac.damping_warmup_steps=10"],
        ["kfac.update_interval_init=0"], ["kfac.update_interval_steps=-1"], ["kfac.kronecker_decay=1"],
        ["kfac.inverse_strategy=foo"], ["kfac.inverse_dtype=float16"], ["kfac.learning_rate_factor=0"],
        ["kfac.factor_batch_size=-1"], ["kfac.fisher=foo"], ["kfac.kl_clip=-1"], ["kfac.weight_sharing=both"],
        ["kfac.enabled=true", "kfac.fisher=mc", "trainer.accumulate_steps=2"],
    ]
    machine_cases = [["kfac.enabled=true", "kfac.disable_layers=[ip9]"], [f"data.dir={a_file}"],
                     [f"data.dir={a_file / 'mnist'}"]]
    if NO_GPU:
        machine_cases += [["trainer.device=cuda"], ["trainer.backend=nccl", "launcher.procs_per_node=2"]]
    return validator_cases, machine_cases


def messages(overrides: list[str]) -> list[str]:
    """What the CLI reports for ``overrides``: the validators' errors, else the machine's problems."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return validate(cfg) or problems(cfg)


def error_lines(function) -> dict[int, str]:
    """{line number: label} of each place ``function`` reports an error."""
    source = textwrap.dedent(inspect.getsource(function))
    first = inspect.getsourcelines(function)[1]
    name = f"{function.__module__}.{function.__name__}"
    found = {}
    for node in ast.walk(ast.parse(source)):
        reports = (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "append"
                   and isinstance(node.func.value, ast.Name) and node.func.value.id in ("errors", "problems")) or \
                  (isinstance(node, ast.Return) and isinstance(node.value, ast.List) and node.value.elts)
        if reports:
            found[first + node.lineno - 1] = f"{name}: {ast.get_source_segment(source, node)[:80]}"
    return found


# Keys whose checks read each other: their cases never share an invocation.
LINKED = {"trainer.test_every_steps": ("trainer.stop_at_test_accuracy",),
          "launcher.requeue": ("launcher.scheduler", "trainer.keep_checkpoints"),
          "trainer.checkpoint_every_epoch": ("trainer.keep_checkpoints",)}


def keys(case: list[str]) -> set[str]:
    names = {o.lstrip("+").partition("=")[0] for o in case}
    return names | {k for n in names for k in LINKED.get(n, ())}


def pack(cases: list[list[str]]) -> list[list[list[str]]]:
    """Groups cases whose keys are apart into as few invocations as that allows."""
    batches: list[list[list[str]]] = []
    for case in cases:
        for batch in batches:
            if not keys(case) & set().union(*(keys(c) for c in batch)):
                batch.append(case)
                break
        else:
            batches.append([case])
    return batches


@pytest.fixture(scope="module")
def singles(tmp_path_factory):
    """Every case's report, composed in-process under a line tracer: (cases, reports, lines hit)."""
    tmp = tmp_path_factory.mktemp("cases")
    validator_cases, machine_cases = case_lists(tmp)
    targets = {fn.__code__ for fn in [*VALIDATORS, trainer.preflight.data_dir_problem]}
    hit: set[tuple[object, int]] = set()

    def tracer(frame, event, arg):
        if frame.f_code not in targets:
            return None

        def local(frame, event, arg):
            if event == "line":
                hit.add((frame.f_code, frame.f_lineno))
            return local
        return local

    sys.settrace(tracer)
    try:
        reports = {tuple(case): messages(case) for case in [*validator_cases, *machine_cases]}
    finally:
        sys.settrace(None)
    return validator_cases, machine_cases, reports, hit


def test_every_error_line_of_the_validators_has_a_case(singles):
    validator_cases, machine_cases, reports, hit = singles
    silent = [case for case, report in reports.items() if not report]
    assert not silent, f"cases that report nothing: {silent}"
    missed = []
    for fn in [*VALIDATORS, trainer.preflight.data_dir_problem]:
        for line, label in error_lines(fn).items():
            exempt = any(label.startswith(u.split(": ")[0]) and u.split(": ", 1)[1] in label for u in UNREACHABLE)
            if (fn.__code__, line) not in hit and not exempt:
                missed.append(label)
    assert not missed, "no case reaches:\n" + "\n".join(missed)


def run_cli(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "kfac.py"), *argv], capture_output=True, text=True,
                          cwd=cwd, timeout=180)


@pytest.fixture(scope="module")
def cli_runs(singles, tmp_path_factory):
    """{ranks: [(argv, expected line, result)]} for 1 and 2 ranks, all invocations run side by side."""
    validator_cases, machine_cases, reports, _ = singles
    batches = pack(validator_cases) + pack(machine_cases)
    assert len(batches) <= 10, len(batches)
    tmp = tmp_path_factory.mktemp("cli")
    jobs = []
    for ranks in (1, 2):
        extra = [f"launcher.experiment_dir={tmp / 'runs'}"] + (["launcher.procs_per_node=2"] if ranks == 2 else [])
        for batch in batches:
            overrides = [o for c in batch for o in c if not (ranks == 2 and o == "launcher.procs_per_node=2")]
            argv = [*overrides, *extra]
            together = messages(argv)
            # Packed right: the invocation reports exactly what its cases report one by one.
            assert sorted(together) == sorted(m for c in batch for m in reports[tuple(c)]), batch
            jobs.append((ranks, argv, "kfac.py: error: " + "; ".join(together)))
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda job: run_cli(job[1], tmp), jobs))
    runs = {1: [], 2: []}
    for (ranks, argv, expected), result in zip(jobs, results, strict=True):
        runs[ranks].append((argv, expected, result))
    runs["dir"] = tmp / "runs"
    return runs


@pytest.mark.parametrize("ranks", [1, 2])
def test_each_validator_error_is_one_line_and_status_2_through_the_cli(cli_runs, ranks):
    assert cli_runs[ranks]
    wrong = [f"{argv}: status {result.returncode}\n  expected {expected}\n  got {result.stderr.strip()}"
             for argv, expected, result in cli_runs[ranks]
             if result.returncode != 2 or result.stderr.strip() != expected or "Traceback" in result.stdout]
    assert not wrong, "\n".join(wrong)
    assert not cli_runs["dir"].exists()  # nothing was started, no work dir made


def test_a_problem_the_ranks_find_ends_a_two_rank_job_with_one_line(tmp_path):
    """A setup-only work dir, then a bad override in its batch.sh: the ranks' own checks answer."""
    result = run_cli(["--setup-only", "launcher=mpiexec", "--procs-per-node", "2", "trainer.epochs=1",
                      f"launcher.experiment_dir={tmp_path}"], tmp_path)
    assert result.returncode == 0, result.stderr
    (work_dir,) = tmp_path.iterdir()
    script = work_dir / "batch.sh"
    text = script.read_text()
    bad = [("kfac.kronecker_decay=2", "kfac.kronecker_decay: must lie in [0, 1), got 2"),
           ("kfac.disable_layers=[ip9] kfac.enabled=true",
            "kfac.disable_layers: ip9 is not a layer of model mlp (its layers: ip1, ip2, ip3)"),
           (f"data.dir={script}", f"data.dir={script}: exists but is not a directory; "
            "point data.dir (or KFAC_DATA_DIR) at a folder for MNIST")]
    for override, message in bad:
        script.write_text(text.replace(" hydra.run.dir=", f" {override} hydra.run.dir="))
        ran = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=180)
        lines = [line for line in ran.stderr.splitlines() if line.strip()]
        assert ran.returncode == 2, ran.stderr
        assert lines == [f"kfac.py: error: {message}"], ran.stderr
