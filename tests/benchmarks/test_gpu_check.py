"""benchmarks/gpu_check.sh without a GPU: ``--dry-run`` (and a machine whose nvidia-smi lists no GPU)
prints every command it would run, runs none, and exits 0; the commands cover each README recipe."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def readme_recipes() -> list[str]:
    """The training recipes of the README's command blocks, without their epochs and comment."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    recipes = []
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if not line.startswith("python3 kfac.py") or any(w in line for w in ("--help", "--cfg", "--nodes", "-m ")):
            continue
        args = re.sub(r"--num[-_]epochs \d+|data\.max_train_samples=\d+", "", line.removeprefix("python3 kfac.py"))
        recipes.append(" ".join(args.split()))
    return [r for r in dict.fromkeys(recipes) if r]  # the quick try's plain run leaves ""


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    # An nvidia-smi that lists no GPU comes first on PATH, so the test means the same on a GPU machine.
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    (fake / "nvidia-smi").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}")
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)


def test_dry_run_prints_every_check_runs_nothing_and_exits_0(tmp_path):
    before = sorted((ROOT / "benchmarks" / "runs").rglob("*")) if (ROOT / "benchmarks" / "runs").exists() else []
    result = run(tmp_path, "--dry-run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    planned = [line for line in out.splitlines() if line.startswith("would run [")]
    names = [re.match(r"would run \[(\w+)\]", line).group(1) for line in planned]
    assert names[:3] == ["setup", "torch", "tests"] and names[-1] == "step_time", names
    assert "(at most 240 s): make setup" in planned[0]
    assert planned[2].endswith("-m pytest -q -rs -m cuda -p no:cacheprovider")
    assert planned[-1].endswith("benchmarks/step_time.py --device cuda --steps 50 --warmup 5")
    trainings = [line.split(": .venv/bin/python kfac.py ", 1)[1] for line in planned if "kfac.py" in line]
    for recipe in readme_recipes():
        assert any(t.startswith(recipe + " --num_epochs 1 trainer.device=cuda") for t in trainings), recipe
    assert len(trainings) == len(readme_recipes()) == 7
    assert out.count("| not run (dry run) | - | - |") == len(planned)
    assert out.rstrip().endswith("dry run: nothing was run")
    after = sorted((ROOT / "benchmarks" / "runs").rglob("*")) if (ROOT / "benchmarks" / "runs").exists() else []
    assert after == before and list(tmp_path.iterdir()) == [tmp_path / "bin"]  # nothing made, nothing run


def test_without_a_gpu_it_says_so_and_does_the_dry_run(tmp_path):
    result = run(tmp_path)
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert first == "gpu_check.sh: no GPU here (nvidia-smi lists none); this is what it would run on one:"
    assert result.stdout.rstrip().endswith("dry run: nothing was run")
    assert run(tmp_path, "--bogus").returncode == 2
