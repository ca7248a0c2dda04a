"""Checkpoints in one process: atomic writes, refusals, resume lookup, K-FAC inverses, faults, signals."""

from __future__ import annotations

import io
import os
import signal
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from kfac_callback import KFACCallback
from kfac_callback.base import Callback
from tests.support.data import tiny_data
from tests.support.trainers import make_trainer
from trainer.checkpoint import (
    CheckpointError,
    check_compatible,
    list_checkpoints,
    load_checkpoint,
    newest_checkpoint,
    run_identity,
    save_checkpoint,
)
from trainer.data.mnist import epoch_batches
from trainer.gradients import NonFiniteError
from trainer.resume import newest_intact, resolve_resume, resume_candidates
from trainer.trainer import Trainer


def state(step: int) -> dict:
    return {"format": "kfac-mnist-checkpoint", "version": 1, "step": step, "w": torch.full((3,), float(step))}


def test_save_keeps_the_newest_and_a_crash_mid_write_leaves_the_previous(tmp_path, monkeypatch):
    for step in (1, 2, 3, 4):
        save_checkpoint(state(step), tmp_path, step, keep=3)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000002.pt", "step_000003.pt", "step_000004.pt"]
    before = (tmp_path / "step_000004.pt").read_bytes()

    def crash(obj, f, *args, **kwargs):  # half a file, then the "power cut"
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint(state(5), tmp_path, 5, keep=3)
    monkeypatch.undo()
    assert newest_checkpoint(tmp_path).name == "step_000004.pt"
    assert (tmp_path / "step_000004.pt").read_bytes() == before
    assert load_checkpoint(tmp_path / "step_000004.pt")["step"] == 4
    # A writer killed by SIGKILL leaves its temporary file: never taken for a checkpoint, cleared next time.
    (tmp_path / ".step_000005.pt.tmp999").write_bytes(b"junk")
    assert newest_checkpoint(tmp_path).name == "step_000004.pt"
    save_checkpoint(state(6), tmp_path, 6, keep=3)
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("content, words", [
    (None, "damaged or truncated"),
    (os.urandom(3000), "not a checkpoint file"),
    (b"", "not a checkpoint file"),
    ("foreign", "not a kfac.py checkpoint"),
    ("version", "format version 99"),
])
def test_load_refuses_damaged_and_foreign_files_in_one_line(tmp_path, content, words):
    good = save_checkpoint(state(7), tmp_path / "good", 7, keep=1)
    path = tmp_path / "bad.pt"
    if content is None:
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif content == "foreign":
        torch.save({"model": {}}, path)
    elif content == "version":
        torch.save({**state(1), "version": 99}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert words in str(err.value) and "\n" not in str(err.value) and str(path) in str(err.value)


def cfg(**changes) -> SimpleNamespace:
    c = SimpleNamespace(model=SimpleNamespace(name="mlp"), optimizer=SimpleNamespace(name="adam"),
                        kfac=SimpleNamespace(enabled=False, disable_layers=[]), seed=42,
                        trainer=SimpleNamespace(mini_batch_size=100, dtype="float32"),
                        data=SimpleNamespace(max_train_samples=None))
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        setattr(getattr(c, section), key, value)
    return c


def test_a_checkpoint_of_another_model_or_config_is_refused_naming_what_differs():
    shapes = {"ip1.weight": [1000, 784]}
    saved = {"identity": run_identity(cfg(), shapes)}
    check_compatible(saved, run_identity(cfg(), shapes), "x.pt")  # same: accepted
    with pytest.raises(CheckpointError) as err:
        check_compatible(saved, run_identity(cfg(model__name="cnn", optimizer__name="sgd"), shapes), "x.pt")
    message = str(err.value)
    assert "model.name is 'mlp' there, 'cnn' here" in message and "optimizer.name is 'adam' there, 'sgd' here" in message
    with pytest.raises(CheckpointError, match="trainer.mini_batch_size is 100 there, 50 here"):
        check_compatible(saved, run_identity(cfg(trainer__mini_batch_size=50), shapes), "x.pt")
    with pytest.raises(CheckpointError, match=r"ip1.weight: \[1000, 784\] there, \[10, 784\] here"):
        check_compatible(saved, run_identity(cfg(), {"ip1.weight": [10, 784]}), "x.pt")


def test_resume_finds_a_file_a_work_dir_auto_and_latest(tmp_path):
    exp = tmp_path / "exp"
    old = exp / "20240101_000000_kfac" / "checkpoints"
    new = exp / "20240102_000000_kfac_2" / "checkpoints"
    other = exp / "20240103_000000_other" / "checkpoints"
    for folder, step in ((old, 5), (new, 3), (other, 9)):
        save_checkpoint(state(step), folder, step, keep=3)
    os.utime(old / "step_000005.pt", (1, 1))  # older on disk, though its step is larger
    assert resolve_resume(None) is None
    assert resolve_resume(str(old / "step_000005.pt")) == old / "step_000005.pt"
    assert resolve_resume(str(old.parent)) == old / "step_000005.pt"
    assert resolve_resume("latest", experiment_dir=exp, job_name="kfac") == new / "step_000003.pt"
    assert resolve_resume("auto", work_dir=other.parent) == other / "step_000009.pt"
    assert resolve_resume("auto", work_dir=tmp_path) is None  # nothing yet: a fresh start
    # A requeued job resumes from its own newest checkpoint rather than where it first began.
    assert resolve_resume(str(old.parent), work_dir=other.parent, prefer_work_dir=True) == other / "step_000009.pt"
    for value, words in (("latest", "no checkpoints in the work dirs of job 'nobody'"),
                         (str(tmp_path / "missing"), "no such file or directory"),
                         (str(tmp_path), "no checkpoints in")):
        with pytest.raises(CheckpointError, match=words):
            resolve_resume(value, experiment_dir=exp, job_name="nobody")


def tiny_model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def test_kfac_state_keeps_the_inverses_so_resume_is_exact_between_compute_steps():
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(7)]

    def run(model, kfac, opt, data):
        for x, y in data:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            kfac.step()
            opt.step()

    def fresh():
        model = tiny_model()
        kfac = KFACCallback(model, damping_act=0.1, damping_err=0.1, compute_interval_steps=3)
        return model, kfac, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    model, kfac, opt = fresh()
    run(model, kfac, opt, batches)
    resumed, kfac2, opt2 = fresh()
    run(resumed, kfac2, opt2, batches[:4])  # step 4: the inverses of step 3 are still in use
    buffer = io.BytesIO()
    torch.save({"m": resumed.state_dict(), "o": opt2.state_dict(), "k": kfac2.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed, kfac2, opt2 = fresh()
    resumed.load_state_dict(saved["m"])
    opt2.load_state_dict(saved["o"])
    kfac2.load_state_dict(saved["k"])
    run(resumed, kfac2, opt2, batches[4:])
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def checkpointed(work_dir, *, epochs=2, callbacks=(), **options) -> Trainer:
    """The MLP on 40 fake samples, mini-batches of 20, checkpoints and metrics in ``work_dir``."""
    return make_trainer(callbacks, epochs=epochs, batch=20, n_train=40, work_dir=work_dir, **options)


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_nonfinite_batch_is_skipped_or_stops_with_a_checkpoint_of_the_state_before(tmp_path):
    lines: list[str] = []
    second = list(epoch_batches(40, 20, 0, 1))[1]
    bad = tiny_data(40, nan_sample=int(second[0]))  # a NaN pixel in epoch 0, batch 1 (step 1)
    trainer = checkpointed(tmp_path / "skip", data=bad, lines=lines)
    trainer.fit()
    assert any(line.startswith("trainer: step 1 (epoch 0, batch 1): non-finite loss (this rank's batch holds "
                               "non-finite inputs); non-finite gradient in ip1.weight") and line.endswith("step skipped")
               for line in lines), lines
    assert all(bool(torch.isfinite(w).all()) for w in weights(trainer).values())

    stopping = checkpointed(tmp_path / "stop", data=bad, on_nonfinite="stop")
    with pytest.raises(NonFiniteError, match=r"step 1 \(epoch 0, batch 1\): non-finite loss.*stopped.*step_000001.pt"):
        stopping.fit()
    saved = load_checkpoint(tmp_path / "stop" / "checkpoints" / "step_000001.pt")
    assert (saved["epoch"], saved["batch"]) == (0, 1)  # the bad batch is not done yet
    # Resumed with on_nonfinite=skip it goes past the bad batch and ends like the skipping run.
    resumed = checkpointed(tmp_path / "stop", data=bad)
    resumed.load_state_dict(saved)
    resumed.fit()
    for k, v in weights(trainer).items():
        assert torch.equal(v, resumed.model.state_dict()[k])


def test_no_checkpoint_is_written_with_nonfinite_weights(tmp_path):
    trainer = checkpointed(tmp_path)
    with torch.no_grad():
        trainer.model.ip2.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="weights of ip2.weight are not finite; no checkpoint written"):
        trainer.save()
    assert list_checkpoints(tmp_path / "checkpoints") == []


class SignalAt(Callback):
    """Sends this process a real signal at the end of one step."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_batch_end(self, trainer: Trainer) -> None:
        if trainer.step == self.step:
            os.kill(os.getpid(), self.signum)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    reference = checkpointed(tmp_path_factory.mktemp("ref"), epochs=3)
    reference.fit()
    return weights(reference)


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_a_signal_checkpoints_at_the_next_step_and_resume_ends_bit_for_bit_the_same(tmp_path, signum, uninterrupted):
    work = tmp_path / "run"
    stopped = checkpointed(work, epochs=3, callbacks=[SignalAt(3, signum)])
    history = stopped.fit()
    assert stopped.stopped == signal.Signals(signum).name and len(history) == 1
    assert signal.getsignal(signum) is not None  # the handlers are put back
    checkpoint = newest_checkpoint(work)
    assert checkpoint.name == "step_000004.pt"  # the step after the signal: every step is whole
    assert (work / "preempted").read_text().strip() == str(checkpoint)
    resumed = checkpointed(work, epochs=3)
    resumed.load_state_dict(load_checkpoint(checkpoint))
    assert resumed.fit()[-1]["epoch"] == 2
    for k, v in uninterrupted.items():
        assert torch.equal(v, resumed.model.state_dict()[k])
    records = [line for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3  # epoch 0 from before the signal, then epochs 1 and 2


def test_resume_passes_over_damaged_checkpoints_names_them_and_refuses_a_named_one(tmp_path):
    folder = tmp_path / "20240101_000000_kfac" / "checkpoints"
    for step in (3, 6, 9, 10):
        save_checkpoint(state(step), folder, step, keep=10)
    newest = folder / "step_000010.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated
    (folder / "step_000009.pt").write_bytes(b"PK\x03\x04" + os.urandom(200))  # damaged
    found = newest_intact(resume_candidates(str(folder.parent)))
    assert found.path == folder / "step_000006.pt" and found.state["step"] == 6
    note = found.note()
    assert note.startswith(f"passed over damaged checkpoints {newest}, step_000009.pt (is damaged or truncated: ")
    assert note.endswith(f"resuming from {folder / 'step_000006.pt'}, the newest intact one") and "\n" not in note
    # trainer.resume=latest does the same; a newer work dir with nothing intact gives way to an older one.
    broken = tmp_path / "20240102_000000_kfac" / "checkpoints"
    broken.mkdir(parents=True)
    (broken / "step_000001.pt").write_bytes(b"")
    os.utime(broken / "step_000001.pt", (2e9, 2e9))  # written last
    latest = newest_intact(resume_candidates("latest", experiment_dir=tmp_path, job_name="kfac"))
    assert latest.path == found.path and [p for p, _ in latest.damaged] == [broken / "step_000001.pt", newest,
                                                                           folder / "step_000009.pt"]
    assert newest_intact(resume_candidates(str(folder / "step_000003.pt"))).damaged == []
    # A file named by the user is that file or nothing: refused, naming the intact one beside it.
    with pytest.raises(CheckpointError, match=rf"step_000010.pt is damaged or truncated: .*; the newest intact "
                                              rf"checkpoint beside it is {folder / 'step_000006.pt'}"):
        newest_intact(resume_candidates(str(newest)))
    with pytest.raises(CheckpointError, match="no intact checkpoint: checkpoint .*step_000001.pt is not a checkpoint"):
        newest_intact(resume_candidates(str(broken.parent)))
    # Continuing from step 6 in the same folder, step 7's checkpoint replaces the passed-over later ones.
    save_checkpoint(state(7), folder, 7, keep=2)
    assert [p.name for p in list_checkpoints(folder)] == ["step_000006.pt", "step_000007.pt"]
