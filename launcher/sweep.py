"""The summary of a sweep: one row per run, printed and written as ``summary.csv``.

A local sweep (``kfac.py -m ...``) prints it when the last run ends (the Hydra callback
below). A sweep submitted to SLURM (``-m --batch-job``) ends as soon as its jobs are queued;
summarise it once they are done with::

    python -m launcher.sweep <sweep dir> --wait
"""

from __future__ import annotations

import argparse
import csv
import io
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback as HydraCallback

from launcher.workdir import JOB_ID_FILE, METRICS_FILE, OUT_LOG, SCRIPT_NAME, atomic_write_text, epoch_records, read_metrics

COLUMNS = ["run", "overrides", "final_test_accuracy", "best_test_accuracy", "final_train_objective",
           "epochs", "time_s", "status"]


def run_dirs(sweep_dir: Path) -> list[Path]:
    """The sweep's run dirs (``0``, ``1``, ...) in numeric order."""
    return sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def summary_row(run_dir: Path, overrides: str) -> dict[str, Any]:
    """One run's row from its ``metrics.jsonl``."""
    records = epoch_records(read_metrics(run_dir / METRICS_FILE))  # not test_every_steps' test records
    tested = [r["test_accuracy"] for r in records if "test_accuracy" in r]
    finished = (run_dir / OUT_LOG).exists() and "Finished at" in (run_dir / OUT_LOG).read_text(errors="replace")
    status = "done" if records and len(tested) and (finished or not (run_dir / JOB_ID_FILE).exists()) else "incomplete"
    return {
        "run": run_dir.name, "overrides": overrides,
        "final_test_accuracy": tested[-1] if tested else None,
        "best_test_accuracy": max(tested) if tested else None,
        "final_train_objective": records[-1]["train_objective"] if records else None,
        "epochs": len(records), "time_s": round(records[-1]["wall_time"], 1) if records else None,
        "status": status,
    }


def run_overrides(run_dir: Path) -> str:
    """The overrides that made this run, read back from its ``batch.sh``."""
    script = run_dir / SCRIPT_NAME
    if not script.exists():
        return ""
    for line in script.read_text().splitlines():
        if "kfac.py" in line:
            args = shlex.split(line.split("kfac.py", 1)[1])
            return " ".join(a for a in args if not a.startswith(("hydra.", "launcher.experiment_dir=",
                                                                 "launcher.batch_job=")))
    return ""


def summarize(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every run's row."""
    return [summary_row(d, run_overrides(d)) for d in run_dirs(sweep_dir)]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width text table of the rows."""
    cells = [COLUMNS] + [[_cell(r[c]) for c in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells)


def to_csv(rows: list[dict[str, Any]]) -> str:
    """The rows as CSV text."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def write_summary(sweep_dir: Path) -> str:
    """Writes ``summary.csv`` into the sweep dir and returns the printed table."""
    rows = summarize(sweep_dir)
    atomic_write_text(sweep_dir / "summary.csv", to_csv(rows))
    return f"sweep summary ({sweep_dir / 'summary.csv'}):\n{format_table(rows)}"


def wait_for_runs(sweep_dir: Path, timeout_s: float, poll_s: float = 2.0) -> bool:
    """Waits until every submitted run has written its ``Finished at`` line; False on timeout."""
    deadline = time.time() + timeout_s
    while True:
        pending = [d for d in run_dirs(sweep_dir)
                   if not ((d / OUT_LOG).exists() and "Finished at" in (d / OUT_LOG).read_text(errors="replace"))]
        if not pending:
            return True
        if time.time() > deadline:
            return False
        time.sleep(poll_s)


class SweepSummary(HydraCallback):
    """Hydra callback: prints and writes the summary when a local sweep ends."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.exists():
            return
        if any((d / JOB_ID_FILE).exists() for d in run_dirs(sweep_dir)):
            print(f"jobs submitted; once they are done: python -m launcher.sweep {sweep_dir} --wait", flush=True)
            return
        print(write_summary(sweep_dir), flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m launcher.sweep SWEEP_DIR [--wait] [--timeout S]``."""
    parser = argparse.ArgumentParser(prog="python -m launcher.sweep", description="Summarise a sweep's runs.")
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--wait", action="store_true", help="wait for submitted runs to finish first")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait at most")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir() or not run_dirs(args.sweep_dir):
        print(f"launcher.sweep: error: {args.sweep_dir} holds no sweep runs (numbered run dirs)", file=sys.stderr)
        return 2
    if args.wait and not wait_for_runs(args.sweep_dir, args.timeout):
        print(f"launcher.sweep: error: runs still unfinished after {args.timeout:g}s", file=sys.stderr)
        print(write_summary(args.sweep_dir))
        return 1
    print(write_summary(args.sweep_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
