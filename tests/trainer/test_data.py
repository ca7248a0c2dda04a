"""Tests of trainer.data: IDX files, loading with its error messages, and rank batching."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.data import mnist_fetch
from trainer.data.idx import idx_bytes
from trainer.data.mnist import (
    DataError,
    batch_plan,
    default_data_dir,
    epoch_batches,
    epoch_seed,
    load_mnist,
    read_idx,
    split_batch,
    write_idx,
)
from trainer.data.mnist_fetch import FILE_NAMES

N_TRAIN, N_TEST = 12, 5


def tiny_arrays() -> dict[str, np.ndarray]:
    """Four small MNIST-shaped arrays with distinct, known values."""
    rng = np.random.default_rng(0)
    train_x = rng.integers(0, 256, size=(N_TRAIN, 28, 28), dtype=np.uint8)
    train_x[0, 0, 0] = 255  # so the maximum pixel is known
    return {
        "train-images-idx3-ubyte": train_x,
        "train-labels-idx1-ubyte": (np.arange(N_TRAIN) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, size=(N_TEST, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.array([7, 2, 1, 0, 4], dtype=np.uint8),
    }


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    for name, array in tiny_arrays().items():
        write_idx(tmp_path / name, array)
    return tmp_path


# ---------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path: Path, suffix: str, dtype: type) -> None:
    array = (np.arange(2 * 3 * 4) - 5).reshape(2, 3, 4).astype(dtype)
    path = tmp_path / f"a.idx{suffix}"
    write_idx(path, array)
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype)
    assert back.shape == (2, 3, 4)
    np.testing.assert_array_equal(back, array)
    assert path.read_bytes().startswith(b"\x1f\x8b") == (suffix == ".gz")


def test_idx_header_bytes_are_standard() -> None:
    labels = np.array([5, 0, 4], dtype=np.uint8)
    assert idx_bytes(labels) == b"\x00\x00\x08\x01" + b"\x00\x00\x00\x03" + b"\x05\x00\x04"
    images = np.zeros((2, 28, 28), dtype=np.uint8)
    header = b"\x00\x00\x08\x03" + b"\x00\x00\x00\x02" + b"\x00\x00\x00\x1c" * 2
    assert idx_bytes(images)[:16] == header
    assert len(idx_bytes(images)) == 16 + 2 * 784


def test_idx_rejects_unsupported_dtype() -> None:
    with pytest.raises(ValueError, match="cannot store dtype int64"):
        idx_bytes(np.zeros(3, dtype=np.int64))


# ---------------------------------------------------------------------------- loading


def test_load_values_shapes_and_dtypes(tiny_dir: Path) -> None:
    arrays = tiny_arrays()
    data = load_mnist(tiny_dir, fetch=False)
    assert data.train_x.shape == (N_TRAIN, 1, 28, 28)
    assert data.test_x.shape == (N_TEST, 1, 28, 28)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    expected = torch.from_numpy(arrays["train-images-idx3-ubyte"].astype(np.float32) / 255)
    torch.testing.assert_close(data.train_x[:, 0], expected, rtol=0, atol=0)
    assert data.train_x.max().item() == 1.0
    assert data.train_y.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert data.test_y.tolist() == [7, 2, 1, 0, 4]


def test_load_reads_gzipped_files(tmp_path: Path) -> None:
    for name, array in tiny_arrays().items():
        write_idx(tmp_path / f"{name}.gz", array)
    data = load_mnist(tmp_path, fetch=False)
    assert data.test_y.tolist() == [7, 2, 1, 0, 4]
    assert data.train_x.shape == (N_TRAIN, 1, 28, 28)


def test_max_samples_keep_the_first_samples(tiny_dir: Path) -> None:
    full = load_mnist(tiny_dir, fetch=False)
    capped = load_mnist(tiny_dir, max_train_samples=5, max_test_samples=2, fetch=False)
    assert capped.train_x.shape == (5, 1, 28, 28)
    assert capped.train_y.tolist() == [0, 1, 2, 3, 4]
    assert capped.test_y.tolist() == [7, 2]
    assert torch.equal(capped.train_x, full.train_x[:5])
    assert load_mnist(tiny_dir, max_train_samples=100, fetch=False).train_y.numel() == N_TRAIN
    with pytest.raises(ValueError, match="max_train_samples must be >= 0"):
        load_mnist(tiny_dir, max_train_samples=-1, fetch=False)


def _corrupt(tiny_dir: Path, fault: str) -> str:
    """Damages one file of ``tiny_dir``; returns the name of the file to blame."""
    arrays = tiny_arrays()
    if fault == "magic":
        write_idx(tiny_dir / "train-images-idx3-ubyte", arrays["train-labels-idx1-ubyte"])
        return "train-images-idx3-ubyte"
    if fault == "truncated":
        path = tiny_dir / "t10k-images-idx3-ubyte"
        path.write_bytes(path.read_bytes()[:-10])
        return path.name
    if fault == "truncated-gz":
        path = tiny_dir / "t10k-labels-idx1-ubyte"
        data = gzip.compress(path.read_bytes())
        path.unlink()
        (tiny_dir / f"{path.name}.gz").write_bytes(data[: len(data) // 2])
        return f"{path.name}.gz"
    if fault == "trailing":
        path = tiny_dir / "t10k-labels-idx1-ubyte"
        path.write_bytes(path.read_bytes() + b"\x00\x00")
        return path.name
    if fault == "count":
        write_idx(tiny_dir / "train-labels-idx1-ubyte", np.zeros(N_TRAIN - 1, np.uint8))
        return "train-labels-idx1-ubyte"
    if fault == "label":
        labels = arrays["t10k-labels-idx1-ubyte"].copy()
        labels[3] = 12
        write_idx(tiny_dir / "t10k-labels-idx1-ubyte", labels)
        return "t10k-labels-idx1-ubyte"
    raise AssertionError(fault)


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("magic", "wrong magic number 0x00000801, expected 0x00000803"),
        ("truncated", r"truncated file: 3926 bytes, header shape \(5, 28, 28\) needs 3936"),
        ("truncated-gz", "truncated or corrupt gzip data"),
        ("trailing", "2 unexpected bytes after the data"),
        ("count", "has 12 images but .*train-labels-idx1-ubyte has 11 labels"),
        ("label", "label 12 at index 3 is outside 0-9"),
    ],
)
def test_corrupt_files_raise_one_clear_error(tiny_dir: Path, fault: str, message: str) -> None:
    blamed = _corrupt(tiny_dir, fault)
    with pytest.raises(DataError, match=message) as caught:
        load_mnist(tiny_dir, fetch=False)
    assert str(tiny_dir / blamed) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_checksum_mismatch_is_reported_with_verify(tiny_dir: Path) -> None:
    load_mnist(tiny_dir, fetch=False)  # structurally fine, so no error without verify
    with pytest.raises(DataError, match="sha256 checksum mismatch: expected ba891046") as caught:
        load_mnist(tiny_dir, fetch=False, verify=True)
    assert str(tiny_dir / "train-images-idx3-ubyte") in str(caught.value)


def test_missing_file_without_fetch(tiny_dir: Path) -> None:
    (tiny_dir / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte: missing"):
        load_mnist(tiny_dir, fetch=False)


def test_real_mnist_if_present() -> None:
    data_dir = default_data_dir()
    if any(mnist_fetch.find_file(data_dir, name) is None for name in FILE_NAMES):
        pytest.skip(f"MNIST not in {data_dir}; run python -m trainer.data fetch")
    data = load_mnist(data_dir, fetch=False, verify=True)
    assert data.train_x.shape == (60000, 1, 28, 28)
    assert data.test_x.shape == (10000, 1, 28, 28)
    assert data.train_x.max().item() == 1.0 and data.train_x.min().item() == 0.0
    assert data.test_x.max().item() == 1.0
    assert torch.bincount(data.train_y).tolist() == [
        5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949,
    ]  # fmt: skip
    assert data.train_y[:5].tolist() == [5, 0, 4, 1, 9]
    assert data.test_y[:5].tolist() == [7, 2, 1, 0, 4]


# ---------------------------------------------------------------------------- batching


def _epoch(n: int, batch: int, world: int, **kwargs: object) -> list[list[list[int]]]:
    """Per step, the index lists of every rank."""
    per_rank = [
        [b.tolist() for b in epoch_batches(n, batch, rank=r, world_size=world, **kwargs)]
        for r in range(world)
    ]
    return [list(step) for step in zip(*per_rank, strict=True)]


def test_rank_shares_are_contiguous_disjoint_and_cover_the_batch() -> None:
    one = _epoch(100, 20, 1, epoch=3, seed=7)
    four = _epoch(100, 20, 4, epoch=3, seed=7)
    assert len(four) == 5
    for (whole,), shares in zip(one, four, strict=True):
        assert [len(s) for s in shares] == [5, 5, 5, 5]
        assert sum(shares, []) == whole  # rank r holds the r-th contiguous share
    seen = [i for step in four for share in step for i in share]
    assert sorted(seen) == list(range(100))


def test_order_is_reshuffled_per_epoch_and_reproducible() -> None:
    e0 = _epoch(50, 10, 2, epoch=0, seed=1)
    assert _epoch(50, 10, 2, epoch=0, seed=1) == e0
    assert _epoch(50, 10, 2, epoch=1, seed=1) != e0
    assert _epoch(50, 10, 2, epoch=0, seed=2) != e0
    assert epoch_seed(0, 1) != epoch_seed(1, 0)
    assert 0 <= epoch_seed(123, 4) < 2**32


def test_unshuffled_order_is_file_order() -> None:
    steps = _epoch(12, 6, 2, epoch=5, seed=9, shuffle=False)
    assert steps == [[[0, 1, 2], [3, 4, 5]], [[6, 7, 8], [9, 10, 11]]]


def test_any_global_batch_splits_over_any_rank_count() -> None:
    """100 over 8 ranks: rank r gets 100 // 8 + (r < 100 % 8), contiguous, in rank order."""
    assert split_batch(100, 8) == (13, 13, 13, 13, 12, 12, 12, 12)
    assert split_batch(100, 3) == (34, 33, 33)
    assert split_batch(2, 3) == (1, 1, 0)
    assert split_batch(0, 2) == (0, 0)
    steps = _epoch(230, 100, 8, epoch=2, seed=3)
    one = _epoch(230, 100, 1, epoch=2, seed=3)
    assert [[len(s) for s in step] for step in steps] == [[13] * 4 + [12] * 4] * 2 + [[4] * 6 + [3] * 2]
    for (whole,), shares in zip(one, steps, strict=True):
        assert sum(shares, []) == whole
    assert sorted(i for step in steps for share in step for i in share) == list(range(230))


def test_a_rank_may_get_no_sample_of_a_small_batch() -> None:
    steps = _epoch(5, 2, 3, shuffle=False)
    assert steps == [[[0], [1], []], [[2], [3], []], [[4], [], []]]
    assert all(b.dtype == torch.int64 for b in epoch_batches(5, 2, rank=2, world_size=3))


def test_bad_rank_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\)"):
        epoch_batches(100, 10, rank=2, world_size=2)


def test_last_partial_batch_is_always_kept() -> None:
    even = _epoch(104, 20, 4, shuffle=False)
    assert len(even) == 6
    assert even[-1] == [[100], [101], [102], [103]]
    uneven = _epoch(103, 20, 4, shuffle=False)
    assert len(uneven) == 6
    assert uneven[-1] == [[100], [101], [102], []]


def test_batch_plan_matches_lbann_counts() -> None:
    plan = batch_plan(60000, 64, 2)
    assert (plan.iterations, plan.shares) == (938, (32, 32))
    assert (plan.global_last_batch, plan.last_shares) == (32, (16, 16))
    exact = batch_plan(10000, 100, 4)
    assert (exact.iterations, exact.global_last_batch, exact.last_shares) == (100, 100, (25,) * 4)
    uneven = batch_plan(1030, 100, 4)
    assert (uneven.iterations, uneven.shares) == (11, (25,) * 4)
    assert (uneven.global_last_batch, uneven.last_shares) == (30, (8, 8, 7, 7))
    assert [uneven.step_shares(s) for s in (0, 9, 10)] == [(25,) * 4, (25,) * 4, (8, 8, 7, 7)]
    three = batch_plan(10000, 100, 3)
    assert (three.iterations, three.shares, three.last_shares) == (100, (34, 33, 33), (34, 33, 33))
    small = batch_plan(6, 20, 2)
    assert (small.iterations, small.global_last_batch, small.last_shares) == (1, 6, (3, 3))
    empty = batch_plan(0, 8, 2)
    assert (empty.iterations, empty.global_last_batch, empty.last_shares) == (0, 0, (0, 0))
