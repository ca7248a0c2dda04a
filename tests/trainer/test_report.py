"""trainer.report on real runs: the table, CSV and plots match the metrics files; heat map; errors.

Also the K-FAC and TensorBoard additions to the metrics, and that a non-TTY run's stdout
holds no progress bar.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from kfac_callback.base import Callback
from tests.support.trainers import make_trainer
from trainer.observe.callbacks import TimerCallback
from trainer.observe.report import few_test_points_notes, format_table, main, summarize, sweep_grid, table_rows
from trainer.observe.report_plots import CURVES, curves_figure
from trainer.observe.runs import Run, flatten, load_runs, overrides_config, parse_records, run_labels
from trainer.observe.tensorboard_log import TensorBoardCallback
from trainer.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--num_epochs", "2", "data.max_train_samples=300", "data.max_test_samples=200", "trainer.num_threads=1"]
RUNS = {  # experiment dir -> (flags, expected name in the report)
    "adam": (["--optimizer", "adam", "--optimizer-learning-rate", "1e-3", "trainer.test_every_epoch=true"],
             "optimizer=adam lr=0.001 kfac=off test_every_epoch=true"),
    "sgd": (["--optimizer", "sgd", "--optimizer-learning-rate", "0.1"],
            "optimizer=sgd lr=0.1 kfac=off test_every_epoch=false"),
    "kfac": (["--optimizer", "sgd", "--optimizer-learning-rate", "0.1", "--kfac"],
             "optimizer=sgd lr=0.1 kfac=on test_every_epoch=false"),
}
PROGRESS_JUNK = ("\r", "\x1b[", "█", "it/s", "batch/s", "epoch/s")


def kfac(*args: str) -> SimpleNamespace:
    # Bytes, not text=True: universal newlines would turn a bar's "\r" into "\n".
    result = subprocess.run([sys.executable, str(ROOT / "kfac.py"), *args], capture_output=True, cwd=ROOT, timeout=300)
    return SimpleNamespace(returncode=result.returncode, stdout=result.stdout.decode(), stderr=result.stderr.decode())


def report_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.report", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory) -> SimpleNamespace:
    """Three tiny real runs of kfac.py, each in its own experiment dir under one parent."""
    parent = tmp_path_factory.mktemp("runs")
    results = {}
    with ThreadPoolExecutor(max_workers=len(RUNS)) as pool:  # independent one-thread runs: side by side
        done = dict(zip(RUNS, pool.map(lambda name: kfac(*SMALL, *RUNS[name][0], f"launcher.experiment_dir={parent / name}"),
                                       RUNS), strict=True))
    for name in RUNS:
        result = done[name]
        assert result.returncode == 0, result.stderr
        (work_dir,) = (parent / name).iterdir()
        results[name] = SimpleNamespace(result=result, work_dir=work_dir,
                                        records=[json.loads(line) for line in
                                                 (work_dir / "metrics.jsonl").read_text().splitlines()])
    return SimpleNamespace(parent=parent, runs=results)


def assert_png_not_blank(path: Path, min_size: tuple[int, int] = (300, 200)) -> None:
    import numpy as np
    from PIL import Image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as png:
        width, height = png.size
        pixels = np.asarray(png.convert("RGB")).reshape(-1, 3)
    assert width >= min_size[0] and height >= min_size[1]
    assert pixels.astype(float).var() > 0
    assert len(np.unique(pixels, axis=0)) > 10  # axes, text and coloured lines


# -- real runs ---------------------------------------------------------------------------


def test_table_rows_are_the_values_of_the_metrics_files(real_runs):
    rows = {r["path"]: r for r in table_rows(load_runs([real_runs.parent]))}
    assert len(rows) == 3
    for name, run in real_runs.runs.items():
        row, records = rows[str(run.work_dir)], run.records
        assert row["run"] == RUNS[name][1]
        assert row["final_test_accuracy"] == records[-1]["test_accuracy"]
        assert row["best_test_accuracy"] == max(r["test_accuracy"] for r in records if "test_accuracy" in r)
        assert row["final_train_objective"] == records[-1]["train_objective"]
        assert row["epochs"] == 2 == len(records)
        assert row["total_time"] == records[-1]["wall_time"]
    assert [len([r for r in run.records if "test_accuracy" in r]) for run in real_runs.runs.values()] == [2, 1, 1]


def test_report_command_prints_the_table_and_writes_csv_and_plots(real_runs, tmp_path):
    out = tmp_path / "report"
    result = report_cli(str(real_runs.parent), "--out", str(out))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["run", "final", "test", "acc"]
    for name, run in real_runs.runs.items():
        (line,) = [line for line in lines if line.startswith(RUNS[name][1] + " ")]
        last = run.records[-1]
        assert line.split()[-5:] == [f"{last['test_accuracy']:.2f}",
                                     f"{max(r['test_accuracy'] for r in run.records if 'test_accuracy' in r):.2f}",
                                     f"{last['train_objective']:.4g}", "2", f"{last['wall_time']:.1f}"]
    with open(out / "runs.csv", newline="") as f:
        rows = {r["path"]: r for r in csv.DictReader(f)}
    for name, run in real_runs.runs.items():
        row, last = rows[str(run.work_dir)], run.records[-1]
        assert row["run"] == RUNS[name][1]
        assert float(row["final_test_accuracy"]) == last["test_accuracy"]
        assert float(row["final_train_objective"]) == last["train_objective"]
        assert float(row["total_time"]) == last["wall_time"]
        assert row["optimizer.name"] == name.replace("kfac", "sgd")
    # kfac and sgd were tested only after their last epoch: one line each says so; adam has a curve.
    notes = [line for line in lines if line.startswith("note: ")]
    assert notes == [f"note: {RUNS[name][1]}: 1 test point (after epoch 2), too few for a test-accuracy curve; "
                     "plotted as a single marker" for name in ("kfac", "sgd")]  # in path order
    assert lines.index(notes[0]) > max(lines.index(line) for line in lines if line.startswith(RUNS["adam"][1]))
    for png in ("curves_by_epoch.png", "curves_by_time.png"):
        assert_png_not_blank(out / png, (800, 300))
    assert not (out / "heatmap_test_accuracy.png").exists()  # no 2-D numeric sweep here


def test_kfac_run_records_dampings_and_update_interval(real_runs):
    for record in real_runs.runs["kfac"].records:
        assert {k: record[k] for k in record if k.startswith("kfac_")} == {
            "kfac_damping_act": 0.03, "kfac_damping_err": 0.03, "kfac_damping_bn_act": 0.03,
            "kfac_damping_bn_err": 0.03, "kfac_update_interval": 1}
    assert not any(k.startswith("kfac_") for k in real_runs.runs["sgd"].records[0])


def test_a_non_tty_run_prints_no_progress_bar(real_runs):
    for run in real_runs.runs.values():
        stdout = run.result.stdout
        assert "model0 (instance 0) training epoch 1 objective function : " in stdout
        assert not [junk for junk in PROGRESS_JUNK if junk in stdout + run.result.stderr]
        assert not [junk for junk in PROGRESS_JUNK if junk in (run.work_dir / "out.log").read_bytes().decode()]


# -- a 2x2 sweep (synthetic files) -------------------------------------------------------


def write_run(work_dir: Path, config: dict[str, Any], accuracies: list[float], config_file: str) -> None:
    import yaml

    (work_dir / config_file).parent.mkdir(parents=True, exist_ok=True)
    (work_dir / config_file).write_text(yaml.safe_dump(config))
    records = [{"epoch": e, "train_objective": 2.0 / (e + 1), "train_accuracy": a - 1, "wall_time": 1.5 * (e + 1),
                "test_accuracy": a, "test_objective": 1.0} for e, a in enumerate(accuracies)]
    (work_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def make_sweep(sweep: Path) -> dict[tuple[float, float], float]:
    final = {}
    for job, (act, err) in enumerate([(0.01, 1.0), (0.01, 10.0), (0.1, 1.0), (0.1, 10.0)]):
        final[(act, err)] = 90.0 + 10 * act + err / 10
        config = {"optimizer": {"name": "sgd", "learning_rate": 0.1},
                  "kfac": {"enabled": True, "damping_act": [act], "damping_err": [err], "damping_bn_act": [0.03]},
                  "launcher": {"experiment_dir": str(sweep)}}
        # The launcher's config.yaml for half of them, Hydra's .hydra/config.yaml for the rest.
        write_run(sweep / str(job), config, [80.0, final[(act, err)]],
                  "config.yaml" if job % 2 else ".hydra/config.yaml")
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    return final


def test_a_2x2_sweep_gets_a_heat_map_of_final_test_accuracy(tmp_path):
    final = make_sweep(tmp_path / "sweep")
    runs = load_runs([tmp_path / "sweep"])
    assert [r.path.name for r in runs] == ["0", "1", "2", "3"]
    assert run_labels(runs) == ["damping_act=0.01 damping_err=1", "damping_act=0.01 damping_err=10",
                                "damping_act=0.1 damping_err=1", "damping_act=0.1 damping_err=10"]
    rk, ck, rows, cols, grid = sweep_grid(runs)
    assert (rk, ck, rows, cols) == ("kfac.damping_act", "kfac.damping_err", [0.01, 0.1], [1.0, 10.0])
    assert grid == [[final[(a, e)] for e in cols] for a in rows]

    out = tmp_path / "out"
    assert main([str(tmp_path / "sweep"), "--out", str(out)]) == 0
    assert_png_not_blank(out / "heatmap_test_accuracy.png")
    assert_png_not_blank(out / "curves_by_epoch.png")


def test_without_out_the_report_goes_into_the_one_directory_given(tmp_path, capsys):
    make_sweep(tmp_path / "sweep")
    assert main([str(tmp_path / "sweep")]) == 0
    assert (tmp_path / "sweep" / "runs.csv").is_file()
    assert "damping_act=0.1 damping_err=10" in capsys.readouterr().out


# -- errors and the pure pieces -----------------------------------------------------------


def test_no_metrics_is_one_clear_line_and_status_2(tmp_path):
    (tmp_path / "empty").mkdir()
    result = report_cli(str(tmp_path / "empty"))
    assert result.returncode == 2
    assert result.stderr == f"trainer.report: error: no metrics.jsonl with records found in {tmp_path / 'empty'}\n"
    result = report_cli(str(tmp_path / "missing"))
    assert result.returncode == 2
    assert result.stderr == f"trainer.report: error: no such file or directory: {tmp_path / 'missing'}\n"


def test_partial_last_line_is_skipped():
    assert parse_records('{"epoch": 0}\n\n{"epoch": 1}\n{"epo') == [{"epoch": 0}, {"epoch": 1}]


def test_overrides_only_work_dir_is_named_from_its_overrides(tmp_path):
    import yaml

    for name, overrides in (("a", ["optimizer=adam", "kfac.damping_act=[0.01]"]), ("b", ["optimizer=sgd"])):
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        (tmp_path / name / "metrics.jsonl").write_text('{"epoch": 0, "train_objective": 1.5, "wall_time": 2.0}\n')
    assert overrides_config(["optimizer=adam", "kfac.damping_act=[0.01]", "trainer.epochs=3"]) == {
        "optimizer.name": "adam", "kfac.damping_act": 0.01, "trainer.epochs": 3}
    runs = load_runs([tmp_path / "a", tmp_path / "b"])
    assert run_labels(runs) == ["optimizer=adam damping_act=0.01", "optimizer=sgd"]
    table = format_table(table_rows(runs))
    assert table.splitlines()[2].split() == ["optimizer=adam", "damping_act=0.01", "-", "-", "1.5", "1", "2.0"]


def test_runs_with_the_same_config_are_named_by_directory():
    runs = [Run(Path("/x/run1"), [{}], {"a.b": 1}), Run(Path("/x/run2"), [{}], {"a.b": 1})]
    assert run_labels(runs) == ["run1", "run2"]
    runs = [Run(Path("/x/1"), [{}], {"kfac.enabled": False, "kfac.damping_act": 0.03}),
            Run(Path("/x/2"), [{}], {"kfac.enabled": True, "kfac.damping_act": 0.01})]
    assert run_labels(runs) == ["kfac=off", "kfac=on damping_act=0.01"]  # K-FAC options only when on


def test_flatten_and_summarize():
    assert flatten({"kfac": {"damping_act": [0.01], "damping_err": [10, 1]}, "seed": 4}) == {
        "kfac.damping_act": 0.01, "kfac.damping_err": (10, 1), "seed": 4}
    records = [{"epoch": 0, "test_accuracy": 90.0, "train_objective": 0.5, "wall_time": 3.0},
               {"epoch": 1, "test_accuracy": 89.0, "train_objective": 0.25, "wall_time": 6.0}]
    assert summarize(records) == {"final_test_accuracy": 89.0, "best_test_accuracy": 90.0,
                                  "final_train_objective": 0.25, "epochs": 2, "total_time": 6.0}


# -- TensorBoard --------------------------------------------------------------------------


class Damped(Callback):
    def metrics(self) -> dict[str, float]:
        return {"kfac_damping_act": 0.5, "kfac_update_interval": 3}


def tiny_trainer(callbacks: list[Callback]) -> Trainer:
    return make_trainer(callbacks, epochs=2, optimizer="sgd", test_every_epoch=True)


def test_tensorboard_callback_writes_the_epoch_scalars_on_rank_0(tmp_path, one_thread):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    history = tiny_trainer([TimerCallback(), Damped(), TensorBoardCallback(str(tmp_path / "tb"))]).fit()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert set(scalars) == {"train/objective", "train/accuracy", "time/epoch_run_time", "time/minibatch_mean",
                            "time/wall", "test/objective", "test/accuracy", "kfac/damping_act", "kfac/update_interval"}
    for tag, key in (("train/objective", "train_objective"), ("test/accuracy", "test_accuracy")):
        assert scalars[tag] == [(r["epoch"], pytest.approx(r[key], rel=1e-6)) for r in history]
    assert scalars["kfac/damping_act"] == [(0, 0.5), (1, 0.5)]

    tiny_trainer([TimerCallback(), TensorBoardCallback(str(tmp_path / "tb1"), rank=1)]).fit()
    assert not (tmp_path / "tb1").exists()


def test_kfac_metrics_follow_the_damping_and_update_interval_schedules():
    from torch import nn

    from kfac_callback import KFACCallback
    from kfac_callback.policy.schedules import DampingSchedule

    kfac = KFACCallback(nn.Sequential(nn.Linear(4, 3)), damping_act=[1.0, 0.01], damping_warmup_steps=10,
                        update_interval_init=1, update_interval_target=5, update_interval_steps=10)
    expected = DampingSchedule([1.0, 0.01], 10)
    assert kfac.metrics() == {"kfac_damping_act": expected.value, "kfac_damping_err": 0.03, "kfac_damping_bn_act": 0.03,
                              "kfac_damping_bn_err": 0.03, "kfac_update_interval": 1}
    kfac.steps = 5
    for d in kfac.dampings:
        d.advance()
    expected.advance()
    assert kfac.metrics()["kfac_damping_act"] == expected.value < 1.0
    assert kfac.metrics()["kfac_update_interval"] == 3  # floor(1 + (5 - 1) * 5/10)


def test_names_hold_only_what_differs_and_not_the_job_name():
    common = {"model.name": "mlp", "trainer.epochs": 20, "kfac.enabled": True, "kfac.damping_act": 0.01,
              "launcher.experiment_dir": "/tmp/x"}
    runs = [Run(Path("/x/20260101_000000_fast"), [{}], {**common, "optimizer.learning_rate": 0.1,
                                                        "launcher.job_name": "fast"}, complete=True),
            Run(Path("/x/20260101_000100_slow"), [{}], {**common, "optimizer.learning_rate": 0.3,
                                                        "launcher.job_name": "slow"}, complete=True)]
    assert run_labels(runs) == ["lr=0.1", "lr=0.3"]
    for run in runs:
        run.config["optimizer.learning_rate"] = 0.1
    assert run_labels(runs) == ["20260101_000000_fast", "20260101_000100_slow"]  # the job name is in the dir


def test_a_key_missing_from_an_older_whole_config_does_not_name_runs():
    runs = [Run(Path("/x/old"), [{}], {"optimizer.name": "adam"}, complete=True),
            Run(Path("/x/new"), [{}], {"optimizer.name": "sgd", "trainer.keep_checkpoints": 3}, complete=True)]
    assert run_labels(runs) == ["optimizer=adam", "optimizer=sgd"]


# -- the curves' legend and runs with few test points ------------------------------------------


def curve_runs(names: list[str], tested: list[str]) -> list[Run]:
    """Runs of 5 epochs; tested ``every`` epoch, only at the ``end`` or ``never``."""
    runs = []
    for i, (name, when) in enumerate(zip(names, tested, strict=True)):
        records = [{"epoch": e, "train_objective": 1.0 / (e + 1 + i), "wall_time": 2.0 * (e + 1)} for e in range(5)]
        for e, record in enumerate(records):
            if when == "every" or (when == "end" and e == 4):
                record["test_accuracy"] = 90.0 + i + e
        runs.append(Run(Path(f"/x/{name}"), records, {}))
    return runs


def drawn(fig):
    """Draws ``fig`` with every warning an error; returns the renderer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "constrained_layout not applied because axes sizes collapsed"
        canvas.draw()
    return canvas.get_renderer()


LONG = ["optimizer=sgd lr=0.1 kfac=on damping_act=0.01,0.001 damping_err=1 update_interval_target=10 mb=100 seed=1",
        "optimizer=adam lr=0.0001 kfac=off model=mlp_with_a_long_descriptive_name epochs=20 mb=100 seed=2 "
        "weight_decay=0.0005",
        "x" * 230,  # one unbreakable word, longer than the figure is wide
        "optimizer=momentum lr=0.01 kfac=on damping_act=0.3 model=cnn weight_decay=0.0005 epochs=20 seed=3"]


@pytest.mark.parametrize("names", [LONG, ["adam", "kfac"], [f"damping_act={a} damping_err={e}" for a in
                                                           (0.01, 0.03, 0.1, 0.3) for e in (0.1, 1, 10)]],
                         ids=["long", "short", "12 runs"])
@pytest.mark.parametrize("x, xlabel", [c[:2] for c in CURVES], ids=["epoch", "time"])
def test_the_legend_sits_below_the_panels_inside_the_figure_without_warnings(names, x, xlabel):
    assert len(LONG[1]) > 80 and min(map(len, LONG)) > 80
    fig = curves_figure(curve_runs(names, ["every"] * len(names)), names, x, xlabel)
    renderer = drawn(fig)
    (legend,) = fig.legends
    box = legend.get_window_extent(renderer)
    assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and fig.bbox.y0 <= box.y0 and box.y1 <= fig.bbox.y1
    assert len(fig.axes) == 2 and not any(ax.get_legend() for ax in fig.axes)
    for ax in fig.axes:
        # Not over the data area, the y label, the x label or the tick labels: below them all.
        for part in (ax.get_window_extent(renderer), ax.yaxis.label.get_window_extent(renderer),
                     ax.xaxis.label.get_window_extent(renderer), ax.get_tightbbox(renderer)):
            assert not box.overlaps(part)
        assert box.y1 < ax.get_tightbbox(renderer).y0
        assert ax.bbox.height > 150 and ax.bbox.width > 300  # the legend did not squash the panels
    # The whole names, wrapped (a word longer than a line broken inside).
    assert ["".join(t.get_text().split()) for t in legend.get_texts()] == ["".join(n.split()) for n in names]
    assert max(len(line) for t in legend.get_texts() for line in t.get_text().splitlines()) <= 100


def test_a_run_tested_once_is_a_large_marker_and_one_never_tested_is_named():
    names = ["adam", "sgd", "kfac"]
    runs = curve_runs(names, ["every", "end", "never"])
    assert few_test_points_notes(runs, names) == [
        "note: sgd: 1 test point (after epoch 5), too few for a test-accuracy curve; plotted as a single marker",
        "note: kfac: no test points, nothing to plot for test accuracy"]
    fig = curves_figure(runs, names, "epoch", "epochs completed")
    drawn(fig)
    acc_ax = fig.axes[0]
    adam, sgd, kfac = acc_ax.get_lines()
    assert (list(adam.get_xdata()), adam.get_marker()) == ([1, 2, 3, 4, 5], "o")
    assert (list(sgd.get_xdata()), list(sgd.get_ydata())) == ([5], [95.0])
    assert sgd.get_marker() == "D" and sgd.get_markersize() >= 2 * adam.get_markersize() - 3
    assert list(kfac.get_xdata()) == []
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["adam", "sgd [1 test point]",
                                                                  "kfac [no test points]"]
    assert few_test_points_notes(runs[:1], names[:1]) == []


def test_with_no_test_points_at_all_the_accuracy_panel_says_so():
    runs = curve_runs(["a", "b"], ["never", "never"])
    acc_ax = curves_figure(runs, ["a", "b"], "epoch", "epochs completed").axes[0]
    assert [t.get_text() for t in acc_ax.texts] == ["no run has test points"]
    runs[0].records[-1]["test_accuracy"] = 97.0
    assert list(curves_figure(runs, ["a", "b"], "epoch", "epochs completed").axes[0].texts) == []
