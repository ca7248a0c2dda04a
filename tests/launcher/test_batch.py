from __future__ import annotations

import io
import os
import stat
from datetime import datetime

import pytest

from launcher.batch import (
    BatchSpec,
    SubmitError,
    format_time,
    render_batch_script,
    run_batch_script,
    submit,
    write_work_dir,
)
from launcher.workdir import choose_work_dir, work_dir_name

NOW = datetime(2024, 1, 31, 23, 59, 59)

MPIEXEC_SPEC = BatchSpec(
    scheduler="mpiexec", nodes=1, ntasks_per_node=4, job_name="kfac", work_dir="/exp/20240131_235959_kfac",
    launch_argv=["mpiexec", "-n", "4", "/venv/bin/python", "-m", "mpi4py", "/src/kfac.py",
                 "model=mlp", "optimizer.learning_rate=0.0001"],
    env={"OMP_NUM_THREADS": "1", "MSG": "a b's"},
)

MPIEXEC_SCRIPT = """\
#!/bin/bash

cd /exp/20240131_235959_kfac || exit 1
export OMP_NUM_THREADS=1
export MSG='a b'"'"'s'
echo "Started at $(date)"
mpiexec -n 4 /venv/bin/python -m mpi4py /src/kfac.py model=mlp optimizer.learning_rate=0.0001
status=$?
echo "Finished at $(date) with status $status"
exit $status
"""

SLURM_SPEC = BatchSpec(
    scheduler="slurm", nodes=2, ntasks_per_node=4, job_name="mnist", work_dir="/exp/20240131_235959_mnist",
    launch_argv=["srun", "--mpi=pmi2", "--nodes=2", "--ntasks=8", "--ntasks-per-node=4", "/venv/bin/python",
                 "-m", "mpi4py", "/src/kfac.py", "kfac.enabled=true", "kfac.damping_act=[0.01,1.0]"],
    time_limit_minutes=90, partition="pbatch", account="hpc", reservation="res1",
    env={"OMP_NUM_THREADS": "1"},
)

SLURM_SCRIPT = """\
#!/bin/bash
#SBATCH --nodes=2
#SBATCH --ntasks=8
#SBATCH --ntasks-per-node=4
#SBATCH --time=01:30:00
#SBATCH --job-name=mnist
#SBATCH --partition=pbatch
#SBATCH --account=hpc
#SBATCH --reservation=res1
#SBATCH --output=/exp/20240131_235959_mnist/out.log
#SBATCH --error=/exp/20240131_235959_mnist/err.log
#SBATCH --chdir=/exp/20240131_235959_mnist
#SBATCH --no-requeue

export OMP_NUM_THREADS=1
echo "Started at $(date)"
srun --mpi=pmi2 --nodes=2 --ntasks=8 --ntasks-per-node=4 /venv/bin/python -m mpi4py /src/kfac.py \
kfac.enabled=true 'kfac.damping_act=[0.01,1.0]'
status=$?
echo "Finished at $(date) with status $status"
exit $status
"""


def test_mpiexec_script_is_plain_bash():
    assert render_batch_script(MPIEXEC_SPEC) == MPIEXEC_SCRIPT


def test_slurm_script_with_every_option():
    assert render_batch_script(SLURM_SPEC) == SLURM_SCRIPT


def test_slurm_script_minimal_with_signal():
    spec = BatchSpec(scheduler="slurm", nodes=1, ntasks_per_node=1, job_name="kfac", work_dir="/w",
                     launch_argv=["srun", "hostname"], signal="USR1@120")
    assert render_batch_script(spec) == (
        "#!/bin/bash\n"
        "#SBATCH --nodes=1\n#SBATCH --ntasks=1\n#SBATCH --ntasks-per-node=1\n#SBATCH --job-name=kfac\n"
        "#SBATCH --output=/w/out.log\n#SBATCH --error=/w/err.log\n#SBATCH --chdir=/w\n#SBATCH --signal=USR1@120\n"
        "#SBATCH --no-requeue\n\n"
        'echo "Started at $(date)"\nsrun hostname\nstatus=$?\n'
        'echo "Finished at $(date) with status $status"\nexit $status\n'
    )


def test_invalid_spec_names_every_bad_field():
    with pytest.raises(ValueError) as e:
        BatchSpec(scheduler="lsf", nodes=0, ntasks_per_node=1, job_name="a b", work_dir="rel",
                  launch_argv=[], env={"1X": "y"}, time_limit_minutes=0)
    for key in ("scheduler", "nodes", "work_dir", "launch_argv", "env", "time_limit_minutes"):
        assert key in str(e.value)
    with pytest.raises(ValueError, match="job_name"):
        BatchSpec(scheduler="slurm", nodes=1, ntasks_per_node=1, job_name="a b", work_dir="/w", launch_argv=["x"])


def test_work_dir_name():
    assert work_dir_name("kfac", NOW) == "20240131_235959_kfac"


def test_choose_work_dir_adds_a_suffix_when_taken():
    taken: set[str] = set()
    first = choose_work_dir("/exp", "kfac", NOW, exists=taken.__contains__)
    assert str(first) == "/exp/20240131_235959_kfac"
    taken.add(str(first))
    second = choose_work_dir("/exp", "kfac", NOW, exists=taken.__contains__)
    assert str(second) == "/exp/20240131_235959_kfac_2"
    taken.add(str(second))
    assert str(choose_work_dir("/exp", "kfac", NOW, exists=taken.__contains__)) == "/exp/20240131_235959_kfac_3"


@pytest.mark.parametrize("minutes, text", [
    (1, "00:01:00"), (30, "00:30:00"), (60, "01:00:00"), (90, "01:30:00"), (1439, "23:59:00"),
    (1440, "1-00:00:00"), (1500, "1-01:00:00"), (3 * 1440 + 61, "3-01:01:00"),
])
def test_format_time(minutes, text):
    assert format_time(minutes) == text


def test_format_time_rejects_zero():
    with pytest.raises(ValueError):
        format_time(0)


def _write(tmp_path, argv, env=None):
    work_dir = tmp_path / "exp" / "run"
    spec = BatchSpec(scheduler="mpiexec", nodes=1, ntasks_per_node=1, job_name="t", work_dir=str(work_dir),
                     launch_argv=argv, env=env or {})
    write_work_dir(work_dir, render_batch_script(spec), "model: mlp\n")
    return work_dir


def test_write_work_dir(tmp_path):
    work_dir = _write(tmp_path, ["true"])
    assert sorted(os.listdir(work_dir)) == ["batch.sh", "config.yaml"]
    assert (work_dir / "config.yaml").read_text() == "model: mlp\n"
    assert os.stat(work_dir / "batch.sh").st_mode & stat.S_IXUSR


def test_run_batch_script_tees_and_returns_the_status(tmp_path):
    code = "import sys; print('out1'); print('err1', file=sys.stderr); print('out2'); sys.exit(3)"
    work_dir = _write(tmp_path, ["python3", "-c", code], env={"GREETING": "hi there"})
    out, err = io.StringIO(), io.StringIO()
    assert run_batch_script(work_dir, stdout=out, stderr=err) == 3
    out_lines = (work_dir / "out.log").read_text().splitlines()
    assert out_lines[0].startswith("Started at ")
    assert out_lines[1:3] == ["out1", "out2"]
    assert out_lines[3].startswith("Finished at ") and out_lines[3].endswith("with status 3")
    assert (work_dir / "err.log").read_text() == "err1\n"
    assert out.getvalue() == (work_dir / "out.log").read_text()
    assert err.getvalue() == "err1\n"


def test_run_batch_script_runs_in_the_work_dir(tmp_path):
    work_dir = _write(tmp_path, ["pwd"])
    assert run_batch_script(work_dir, stdout=io.StringIO(), stderr=io.StringIO()) == 0
    assert (work_dir / "out.log").read_text().splitlines()[1] == str(work_dir)


def _fake_sbatch(tmp_path, body):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\n" + body)
    (bin_dir / "sbatch").chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}:/usr/bin:/bin")


def test_submit_returns_the_job_id(tmp_path):
    env = _fake_sbatch(tmp_path, 'test "$1 $2" = "--parsable batch.sh" && test -f batch.sh && echo "4242;cluster"\n')
    work_dir = _write(tmp_path, ["true"])
    assert submit(work_dir, env=env) == "4242"


def test_submit_reports_sbatchs_error_on_one_line(tmp_path):
    env = _fake_sbatch(tmp_path, 'echo "sbatch: error: invalid partition" >&2\necho "  specified" >&2\nexit 1\n')
    with pytest.raises(SubmitError, match=r"^sbatch failed for .*batch.sh \(exit 1\): "
                                          r"sbatch: error: invalid partition specified$"):
        submit(_write(tmp_path, ["true"]), env=env)


def test_submit_without_sbatch(tmp_path):
    with pytest.raises(SubmitError, match="sbatch is not on PATH"):
        submit(_write(tmp_path, ["true"]), env={"PATH": str(tmp_path)})
