"""MNIST for the trainer: tensors in memory and the mini-batches of each rank.

Files, checksums and fetching live in :mod:`trainer.data.mnist_fetch`; the names a caller needs
are re-exported here. To pre-stage the data for nodes without internet::

    python -m trainer.data fetch --dir /shared/mnist     # then: export KFAC_DATA_DIR=/shared/mnist

Batching for data-parallel ranks: every rank draws the same permutation of the training
set (seeded from ``seed`` and ``epoch``) and cuts each global mini-batch into
``world_size`` contiguous shares, as even as they go (docs/algorithm.md §6); rank ``r`` takes
share ``r``. The shares are disjoint and cover the batch without any communication.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainer.data.idx import DataError, parse_idx, read_bytes, read_idx, write_idx
from trainer.data.mnist_fetch import (
    FILE_NAMES,
    IMAGES_MAGIC,
    LABELS_MAGIC,
    SHA256,
    TEST_IMAGES,
    TEST_LABELS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    check_sha256,
    default_data_dir,
    ensure_mnist,
    find_file,
    verify_mnist,
)

__all__ = [
    "MNIST",
    "BatchPlan",
    "DataError",
    "batch_plan",
    "split_batch",
    "default_data_dir",
    "ensure_mnist",
    "epoch_batches",
    "epoch_seed",
    "load_mnist",
    "read_idx",
    "read_split",
    "verify_mnist",
    "write_idx",
]

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class MNIST:
    """The MNIST data set in memory.

    Attributes:
        train_x: float32 ``[n, 1, 28, 28]``, pixels divided by 255 (so in [0, 1]).
        train_y: int64 ``[n]``, digits 0-9.
        test_x: float32 ``[m, 1, 28, 28]``.
        test_y: int64 ``[m]``.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def _read_checked(path: Path, magic: int, verify: bool) -> np.ndarray:
    data = read_bytes(path)
    if verify:
        expected = SHA256.get(path.name.removesuffix(".gz"))
        if expected is None:
            raise DataError(f"{path}: no known sha256 for this file name")
        check_sha256(data, expected, path)
    return parse_idx(data, path, magic)


def read_split(
    images_path: PathLike,
    labels_path: PathLike,
    limit: int | None = None,
    verify: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reads one images/labels pair of IDX files into tensors.

    Args:
        images_path: IDX images file (magic 0x803), plain or gzipped.
        labels_path: IDX labels file (magic 0x801), plain or gzipped.
        limit: Keep only the first ``limit`` samples (original file order), or all if None.
        verify: Also compare the sha256 of each file with the standard MNIST sum; only
            for files with the standard names.

    Returns:
        ``(x, y)``: float32 ``[n, 1, 28, 28]`` pixels / 255 and int64 ``[n]`` labels.

    Raises:
        DataError: A structural fault or checksum mismatch; the message names the file.
    """
    images_path, labels_path = Path(images_path), Path(labels_path)
    images = _read_checked(images_path, IMAGES_MAGIC, verify)
    labels = _read_checked(labels_path, LABELS_MAGIC, verify)
    if images.shape[1:] != (28, 28):
        raise DataError(f"{images_path}: images are {images.shape[1:]}, expected (28, 28)")
    if len(images) != len(labels):
        raise DataError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    bad = np.flatnonzero(labels > 9)  # uint8, so never below 0
    if bad.size:
        raise DataError(f"{labels_path}: label {labels[bad[0]]} at index {bad[0]} is outside 0-9")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    # Cut before converting, so a capped run never holds the full float32 copy.
    x = torch.from_numpy(images.astype(np.float32) / np.float32(255)).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


def load_mnist(
    data_dir: PathLike | None = None,
    max_train_samples: int | None = None,
    max_test_samples: int | None = None,
    *,
    fetch: bool = True,
    verify: bool = False,
) -> MNIST:
    """Loads MNIST from ``data_dir``, fetching missing files first if allowed.

    Args:
        data_dir: Directory of the four IDX files; :func:`default_data_dir` when None.
        max_train_samples: Keep the first this many training samples (None: all 60000).
        max_test_samples: Keep the first this many test samples (None: all 10000).
        fetch: Fetch missing files with :func:`ensure_mnist`; if False they are an error.
        verify: Check the sha256 sums too, not only the structure.

    Raises:
        DataError: Files are missing, corrupt or could not be fetched.
        ValueError: A negative sample cap.
    """
    for name, cap in (("max_train_samples", max_train_samples), ("max_test_samples", max_test_samples)):
        if cap is not None and cap < 0:
            raise ValueError(f"{name} must be >= 0 or None, got {cap}")
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if fetch:
        ensure_mnist(data_dir)
    paths = {}
    for name in FILE_NAMES:
        paths[name] = find_file(data_dir, name)
        if paths[name] is None:
            raise DataError(f"{data_dir / name}: missing (run python -m trainer.data fetch --dir {data_dir})")
    train_x, train_y = read_split(paths[TRAIN_IMAGES], paths[TRAIN_LABELS], max_train_samples, verify)
    test_x, test_y = read_split(paths[TEST_IMAGES], paths[TEST_LABELS], max_test_samples, verify)
    return MNIST(train_x, train_y, test_x, test_y)


# ---------------------------------------------------------------------------- batching


def split_batch(batch: int, world_size: int) -> tuple[int, ...]:
    """Each rank's share of a mini-batch of ``batch`` samples, as even as it goes.

    Rank ``r`` gets ``batch // world_size`` samples, one more when ``r < batch % world_size``
    (100 over 8 ranks: four ranks of 13, then four of 12; 2 over 3 ranks: 1, 1, 0), LBANN's
    split (docs/algorithm.md §6).
    """
    base, extra = divmod(batch, world_size)
    return tuple(base + (r < extra) for r in range(world_size))


@dataclass(frozen=True)
class BatchPlan:
    """Iteration counts of one epoch and every rank's share of its batches, as LBANN prints them.

    Attributes:
        iterations: Global mini-batches per epoch ("iter/epoch").
        global_batch: Samples in a full global mini-batch.
        global_last_batch: Samples in the epoch's last mini-batch ("global last MB"): the
            remainder, or a full batch when the batch size divides the epoch.
        shares: Per rank, its samples of a full mini-batch (:func:`split_batch`).
        last_shares: Per rank, its samples of the last mini-batch ("local last MB").
    """

    iterations: int
    global_batch: int
    global_last_batch: int
    shares: tuple[int, ...]
    last_shares: tuple[int, ...]

    def step_shares(self, step: int) -> tuple[int, ...]:
        """Per rank, its samples of mini-batch ``step`` (0-based) of the epoch."""
        return self.last_shares if step == self.iterations - 1 else self.shares


def batch_plan(n_samples: int, global_batch: int, world_size: int = 1) -> BatchPlan:
    """Returns how an epoch of ``n_samples`` splits into mini-batches and rank shares.

    Full global batches come first; the remainder ``n_samples % global_batch``, if any, is a
    last, smaller batch. Every batch is split over the ranks by :func:`split_batch`, so any
    batch size works on any rank count; a rank may get no sample of a batch smaller than the
    rank count (it still takes part in the step, contributing nothing). No sample is dropped.

    Raises:
        ValueError: A negative ``n_samples``, or non-positive sizes.
    """
    if n_samples < 0:
        raise ValueError(f"n_samples must be >= 0, got {n_samples}")
    if global_batch < 1 or world_size < 1:
        raise ValueError(f"global_batch and world_size must be >= 1, got {global_batch} and {world_size}")
    full, rest = divmod(n_samples, global_batch)
    last = rest if rest else (global_batch if full else 0)
    return BatchPlan(
        iterations=full + int(rest > 0),
        global_batch=global_batch,
        global_last_batch=last,
        shares=split_batch(global_batch, world_size),
        last_shares=split_batch(last, world_size),
    )


def epoch_seed(seed: int, epoch: int) -> int:
    """Returns the generator seed of one epoch, a 32-bit hash of ``(seed, epoch)``.

    Hashed rather than, say, ``seed * K + epoch``: torch's CPU generator keeps only the
    low 32 bits of a seed, and a hash keeps distinct pairs apart within them.
    """
    digest = hashlib.blake2b(f"kfac-mnist:{seed}:{epoch}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def epoch_batches(
    n_samples: int,
    global_batch: int,
    epoch: int = 0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = True,
) -> Iterator[torch.Tensor]:
    """Yields this rank's sample indices for each global mini-batch of one epoch.

    Args:
        n_samples: Size of the data set.
        global_batch: Samples per global mini-batch, summed over ranks.
        epoch: The epoch number; with ``shuffle`` it picks the permutation.
        seed: The run's seed; the same on every rank, so the shares fit together.
        rank: This rank, ``0 <= rank < world_size``.
        world_size: Number of data-parallel ranks.
        shuffle: Permute the samples (training) or keep file order (testing).

    Yields:
        int64 index tensors, one per global mini-batch: this rank's contiguous share
        (:func:`split_batch`, possibly empty), the last batch possibly smaller; see
        :func:`batch_plan`.

    Raises:
        ValueError: Bad sizes or rank; raised at the call, not at the first ``next``.
    """
    plan = batch_plan(n_samples, global_batch, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if shuffle:
        generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
        order = torch.randperm(n_samples, generator=generator)
    else:
        order = torch.arange(n_samples)
    return _shares(order, plan, rank)


def _shares(order: torch.Tensor, plan: BatchPlan, rank: int) -> Iterator[torch.Tensor]:
    for step in range(plan.iterations):
        shares = plan.step_shares(step)
        # The ranks before this one hold the batch's first samples, in rank order.
        start = step * plan.global_batch + sum(shares[:rank])
        yield order[start : start + shares[rank]]
