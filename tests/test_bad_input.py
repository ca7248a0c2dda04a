"""Bad invocations of kfac.py: each ends at once, non-zero, with one clear line and no traceback.

Flags, overrides, config and sweep files, data files and checkpoint files; the files of an
earlier run (made once, small) are hashed before and after and must not change.

Starting Python with torch and Hydra costs seconds here, so most invocations are forked from
one process that has imported ``kfac.py`` once (``FORK_SERVER``): each child runs
``kfac.cli(argv)`` exactly as ``python kfac.py argv`` would, with its own stdout/stderr and
exit status. A few run as real ``python kfac.py`` processes, to keep the entry point honest.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore

from trainer.checkpoint import newest_checkpoint
from trainer.config import Config
from trainer.data.mnist import write_idx
from trainer.run import train

ROOT = Path(__file__).resolve().parent.parent
ConfigStore.instance().store(name="schema", node=Config)
SMALL = ["trainer.epochs=1", "data.max_train_samples=40", "data.max_test_samples=20", "trainer.mini_batch_size=20",
         "trainer.progress=false"]

FORK_SERVER = r"""
import json, os, sys, time, traceback
sys.path.insert(0, sys.argv[1])
import kfac, models, trainer.run, trainer.checkpoint  # the imports every invocation would pay for
# Hydra finds configs/ beside the file of a task function defined in __main__, as with `python kfac.py`.
kfac.main.__wrapped__.__module__ = "__main__"
cases = json.load(sys.stdin)
running, results = {}, {}
def reap():
    pid, status = os.wait()
    name, start = running.pop(pid)
    results[name] = {"status": os.waitstatus_to_exitcode(status), "seconds": time.monotonic() - start}
for case in cases:
    while len(running) >= 4:
        reap()
    pid = os.fork()
    if pid == 0:
        for fd, path in ((1, case["stdout"]), (2, case["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        os.environ.update(case["env"])
        sys.argv = ["kfac.py", *case["argv"]]
        code = 0
        try:
            kfac.cli(case["argv"])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    running[pid] = (case["name"], time.monotonic())
while running:
    reap()
print(json.dumps(results))
"""


def idx_files(folder: Path, n: int = 10, **broken: bytes | np.ndarray) -> Path:
    """A small, valid MNIST (n train, n test) with some files replaced by ``broken`` content."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 255, (n, 28, 28), dtype=np.uint8),
              "train-labels-idx1-ubyte": rng.integers(0, 10, n, dtype=np.uint8),
              "t10k-images-idx3-ubyte": rng.integers(0, 255, (n, 28, 28), dtype=np.uint8),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, n, dtype=np.uint8)}
    for name, array in arrays.items():
        write_idx(folder / name, array)
    for name, content in broken.items():
        name = name.replace("_", "-").replace("-gz", ".gz")
        if isinstance(content, np.ndarray):
            write_idx(folder / name, content)
        else:
            (folder / name).write_bytes(content)
        if name.endswith(".gz"):
            (folder / name.removesuffix(".gz")).unlink()
    return folder


def tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def earlier(tmp_path_factory) -> Path:
    """One small finished run (mlp, adam) with its checkpoints: the run that must stay undamaged."""
    exp = tmp_path_factory.mktemp("exp")
    work_dir = exp / "20240101_000000_kfac"
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*SMALL, f"launcher.experiment_dir={exp}"])
    train(cfg, str(work_dir))
    (work_dir / "config.yaml").write_text("trainer:\n  epochs: 1\n")
    return work_dir


def cases(earlier: Path, tmp: Path) -> list[tuple[str, list[str], str]]:
    """(name, argv, words the one message must contain)."""
    ckpt = newest_checkpoint(earlier)
    data = ckpt.read_bytes()
    (tmp / "truncated.pt").write_bytes(data[: len(data) // 3])
    (tmp / "random.pt").write_bytes(np.random.default_rng(1).bytes(4096))
    (tmp / "empty_dir").mkdir()
    configs = tmp / "configs"
    (configs / "sweep").mkdir(parents=True)
    (configs / "sweep" / "badkey.yaml").write_text(
        "# @package _global_\nhydra:\n  sweeper:\n    params:\n      optimizer.nosuchkey: 1,2\n")
    (configs / "sweep" / "nopackage.yaml").write_text("trainer:\n  epochs: 1\n")
    (configs / "sweep" / "broken.yaml").write_text("hydra:\n  sweeper:\n    params: [1, 2\n")
    (configs / "experiment").mkdir()
    (configs / "experiment" / "badvalue.yaml").write_text("# @package _global_\ntrainer:\n  epochs: many\n")
    images = np.zeros((10, 28, 28), dtype=np.uint8)
    data_dirs = {
        "bad magic": idx_files(tmp / "d1", train_images_idx3_ubyte=np.zeros(10, dtype=np.uint8)),
        "truncated": idx_files(tmp / "d2", train_images_idx3_ubyte=b"\x00\x00\x08\x03\x00\x00\x00\x0a\x00\x00\x00\x1c"
                               b"\x00\x00\x00\x1c" + bytes(100)),
        "label out of range": idx_files(tmp / "d3", train_labels_idx1_ubyte=np.full(10, 12, dtype=np.uint8)),
        "count mismatch": idx_files(tmp / "d4", t10k_labels_idx1_ubyte=np.zeros(9, dtype=np.uint8)),
        "corrupt gzip": idx_files(tmp / "d5", train_labels_idx1_ubyte_gz=gzip.compress(b"\x00\x00\x08\x01")[:-6]),
        "image shape": idx_files(tmp / "d6", t10k_images_idx3_ubyte=images[:, :27, :27].copy()),
    }
    resume = f"trainer.resume={ckpt}"
    return [
        # LBANN flags
        ("unknown flag", ["--bogus"], "--bogus"),
        ("epochs not a number", ["--num_epochs", "many"], "many"),
        ("batch zero", ["--mini_batch_size", "0"], "--mini_batch_size"),
        ("unknown model", ["--model", "resnet50"], "resnet50"),
        ("unknown optimizer", ["--optimizer", "adamax"], "adamax"),
        ("damping grows", ["--kfac", "--kfac-damping-act", "0.01,1"], "damping"),
        ("zero nodes", ["--nodes", "0"], "--nodes"),
        ("unknown flag, close to a real one", ["--num_epoch", "3"], "did you mean --num-epochs?"),
        ("a value after a switch", ["--kfac", "1"], "--kfac takes no value"),
        ("a bare word", ["fast"], "'fast': neither a flag"),
        ("zero epochs", ["--num_epochs", "0"], "expected an integer >= 1, got 0"),
        ("unknown layer to leave out", ["--kfac", "--kfac-disable-layers", "ip9"], "ip9 is not a layer of model mlp"),
        ("negative time limit", ["--time-limit", "-5"], "time"),
        ("flag without value", ["--num_epochs"], "--num_epochs"),
        # Hydra overrides
        ("negative epochs", ["trainer.epochs=-1"], "trainer.epochs"),
        ("unknown key", ["trainer.nosuchkey=1"], "nosuchkey"),
        ("unknown key added with +", ["+trainer.epoch=3"], "trainer.epoch is not a config key; did you mean trainer.epochs?"),
        ("unknown section", ["trainr.epochs=3"], "did you mean trainer.epochs?"),
        ("unknown device", ["trainer.device=tpu"], "trainer.device"),
        ("unknown dtype", ["trainer.dtype=float16"], "trainer.dtype"),
        ("learning rate not a number", ["optimizer.learning_rate=fast"], "fast"),
        ("unknown model group", ["model=transformer"],
         "model=transformer: no such model config (known: autoencoder, cnn, mlp, resnet, resnet_dw, vit)"),
        ("misspelt model group", ["model=mpl"], "model=mpl: no such model config; did you mean mlp?"),
        ("override syntax", ["trainer.epochs=[1,"], "trainer.epochs"),
        ("negative checkpoints to keep", ["trainer.keep_checkpoints=-1"], "trainer.keep_checkpoints"),
        ("no checkpoints, yet every epoch", ["trainer.keep_checkpoints=0", "trainer.checkpoint_every_epoch=true"],
         "trainer.keep_checkpoints=0 writes no checkpoint"),
        ("nccl on the CPU", ["trainer.backend=nccl", "trainer.device=cpu"], "trainer.backend=nccl"),
        *([("cuda without a GPU", ["trainer.device=cuda"], "trainer.device=cuda: this machine has no CUDA device"),
           ("nccl without a GPU", ["trainer.backend=nccl", "--procs-per-node", "2"], "NCCL needs GPUs")]
          if not torch.cuda.is_available() else []),
        ("unknown on_nonfinite", ["trainer.on_nonfinite=ignore"], "trainer.on_nonfinite"),
        ("negative checkpoint interval", ["trainer.checkpoint_every_steps=-3"], "trainer.checkpoint_every_steps"),
        ("negative signal seconds", ["launcher.signal_seconds=-1"], "launcher.signal_seconds"),
        ("requeue without slurm", ["launcher=mpiexec", "launcher.requeue=true"], "launcher.requeue"),
        # config and sweep files
        ("no such sweep", ["sweep=nope"], "sweep=nope"),
        ("no such sweep in a sweep", ["-m", "sweep=nope"], "sweep=nope"),
        ("no such experiment", ["experiment=nope"], "experiment=nope"),
        ("sweep file with a bad key", ["--config-dir", str(configs), "-m", "sweep=badkey"], "nosuchkey"),
        ("sweep file without its package line", ["--config-dir", str(configs), "sweep=nopackage"], "sweep"),
        ("sweep file that is not YAML", ["--config-dir", str(configs), "-m", "sweep=broken"], "broken.yaml"),
        ("experiment file with a bad value", ["--config-dir", str(configs), "experiment=badvalue"], "many"),
        ("sweep value of the wrong type", ["-m", "trainer.epochs=1,x"], "x"),
        # data files (each in its own experiment dir)
        *[(f"data: {what}", [*SMALL, f"data.dir={folder}", f"launcher.experiment_dir={tmp / 'runs' / folder.name}"],
           str(folder)) for what, folder in data_dirs.items()],
        ("data dir that is a file", [*SMALL, f"data.dir={earlier / 'config.yaml'}"], "exists but is not a directory"),
        ("data dir below a file", [*SMALL, f"data.dir={earlier / 'config.yaml' / 'mnist'}"], "is not a directory"),
        # checkpoint files
        ("truncated checkpoint", [*SMALL, f"trainer.resume={tmp / 'truncated.pt'}"], "truncated.pt"),
        ("random bytes checkpoint", [*SMALL, f"trainer.resume={tmp / 'random.pt'}"], "random.pt"),
        ("config file as checkpoint", [*SMALL, f"trainer.resume={earlier / 'config.yaml'}"], "config.yaml"),
        ("missing checkpoint", [*SMALL, f"trainer.resume={tmp / 'nope.pt'}"], "nope.pt"),
        ("dir without checkpoints", [*SMALL, f"trainer.resume={tmp / 'empty_dir'}"], "no checkpoints"),
        ("latest of an unknown job", [*SMALL, "trainer.resume=latest", "launcher.job_name=nobody",
                                      f"launcher.experiment_dir={earlier.parent}"], "nobody"),
        ("checkpoint of another model", [*SMALL, "model=cnn", resume], "model.name is 'mlp' there, 'cnn' here"),
        ("checkpoint of another optimizer", [*SMALL, "optimizer=sgd", resume], "optimizer.name"),
        ("checkpoint without K-FAC", [*SMALL, "--kfac", resume], "kfac.enabled"),
        ("checkpoint of another batch size", [*SMALL[:3], "trainer.mini_batch_size=10", resume],
         "trainer.mini_batch_size is 20 there, 10 here"),
        ("checkpoint of another seed", [*SMALL, "seed=7", resume], "seed is 42 there, 7 here"),
        ("checkpoint of another dtype", [*SMALL, "trainer.dtype=float64", resume], "trainer.dtype"),
    ]


REAL = {"unknown flag", "truncated checkpoint", "data: bad magic"}  # also run as real processes


def run_real(argv: list[str], env: dict[str, str], cwd: Path) -> dict:
    start = time.monotonic()
    result = subprocess.run([sys.executable, str(ROOT / "kfac.py"), *argv], capture_output=True, text=True,
                            cwd=cwd, env=env, timeout=120)
    return {"status": result.returncode, "seconds": time.monotonic() - start, "stdout": result.stdout,
            "stderr": result.stderr}


def test_bad_invocations_fail_fast_with_one_line_and_leave_earlier_runs_alone(earlier, tmp_path):
    table = cases(earlier, tmp_path)
    assert len(table) >= 30
    before = tree_hashes(earlier.parent)
    env = {"KFAC_EXPERIMENT_DIR": str(tmp_path / "runs" / "default"), "PYTHONUNBUFFERED": "1"}
    jobs = [{"name": name, "argv": argv, "env": env, "stdout": str(tmp_path / f"{i}.out"),
             "stderr": str(tmp_path / f"{i}.err")} for i, (name, argv, _) in enumerate(table)]
    full_env = dict(os.environ, **env)
    with ThreadPoolExecutor(max_workers=len(REAL)) as pool:
        real = {name: pool.submit(run_real, argv, full_env, tmp_path) for name, argv, _ in table if name in REAL}
        server = subprocess.run([sys.executable, "-c", FORK_SERVER, str(ROOT)], input=json.dumps(jobs),
                                capture_output=True, text=True, cwd=tmp_path, timeout=600)
        real = {name: future.result() for name, future in real.items()}
    assert server.returncode == 0, server.stderr
    results = json.loads(server.stdout.splitlines()[-1])
    problems = []
    for job, (name, _, words) in zip(jobs, table, strict=True):
        outcome = dict(results[name], stdout=Path(job["stdout"]).read_text(), stderr=Path(job["stderr"]).read_text())
        for how, got in (("forked", outcome), ("real", real.get(name))):
            if got is None:
                continue
            lines = [line for line in got["stderr"].splitlines() if line.strip()]
            if got["status"] == 0 or "Traceback" in got["stdout"] + got["stderr"] or len(lines) != 1 \
                    or not lines[0].startswith("kfac.py: error: ") or words not in lines[0] or got["seconds"] > 60:
                problems.append(f"{name} ({how}): status {got['status']} after {got['seconds']:.1f} s, "
                                f"stderr {got['stderr'][-600:]!r}")
    assert not problems, "\n".join(problems)
    assert tree_hashes(earlier.parent) == before
    shutil.rmtree(tmp_path / "runs", ignore_errors=True)
