"""The IDX file format (MNIST's): parse and encode, read and write (atomically, plain or gzipped)."""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from launcher.workdir import atomic_write_bytes

# IDX type byte -> big-endian numpy dtype (the IDX format is big-endian throughout).
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_DTYPE_CODES = {dtype.newbyteorder("="): code for code, dtype in _IDX_DTYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"



class DataError(Exception):
    """MNIST data is missing, corrupt, or could not be fetched; the message names the file."""


def gunzip_if_gzip(raw: bytes, source: str | os.PathLike[str]) -> bytes:
    """Returns ``raw`` gunzipped when it is gzip data (told by magic, not by name).

    Raises:
        DataError: The gzip stream is truncated or corrupt.
    """
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as err:
        raise DataError(f"{source}: truncated or corrupt gzip data ({err})") from err


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    """Returns a file's content, gunzipped if it is gzip data; see :func:`gunzip_if_gzip`."""
    return gunzip_if_gzip(Path(path).read_bytes(), path)


def parse_idx(data: bytes, source: str | os.PathLike[str], magic: int | None = None) -> np.ndarray:
    """Parses IDX bytes into an array in native byte order.

    Args:
        data: The uncompressed file content.
        source: The file name used in error messages.
        magic: The expected magic number (0x803 for MNIST images, 0x801 for labels), or
            None to accept any valid IDX type and rank.

    Returns:
        A writable array with the header's shape and dtype.

    Raises:
        DataError: Wrong magic number, truncated header or data, or trailing bytes.
    """
    if len(data) < 4:
        raise DataError(f"{source}: truncated file: {len(data)} bytes, no IDX header")
    found = int.from_bytes(data[:4], "big")
    code, dims = (found >> 8) & 0xFF, found & 0xFF
    if found >> 16 != 0 or code not in _IDX_DTYPES or (magic is not None and found != magic):
        want = f"0x{magic:08x}" if magic is not None else "0x0000TTNN with a known type TT"
        raise DataError(f"{source}: wrong magic number 0x{found:08x}, expected {want}")
    header = 4 + 4 * dims
    if len(data) < header:
        raise DataError(f"{source}: truncated file: {len(data)} bytes, header needs {header}")
    shape = struct.unpack(f">{dims}I", data[4:header])
    dtype = _IDX_DTYPES[code]
    need = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) < need:
        raise DataError(f"{source}: truncated file: {len(data)} bytes, header shape {shape} needs {need}")
    if len(data) > need:
        raise DataError(f"{source}: {len(data) - need} unexpected bytes after the data")
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))  # a copy: writable, native order


def read_idx(path: str | os.PathLike[str], magic: int | None = None) -> np.ndarray:
    """Reads an IDX file, plain or gzipped; see :func:`parse_idx`."""
    return parse_idx(read_bytes(path), path, magic)


def idx_bytes(array: np.ndarray) -> bytes:
    """Returns the IDX encoding (header and big-endian data) of ``array``.

    Raises:
        ValueError: The dtype has no IDX type code or the array has over 255 dimensions.
    """
    array = np.asarray(array)
    code = _DTYPE_CODES.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    if array.ndim > 255:
        raise ValueError(f"IDX cannot store {array.ndim} dimensions")
    header = struct.pack(f">HBB{array.ndim}I", 0, code, array.ndim, *array.shape)
    return header + np.ascontiguousarray(array, dtype=_IDX_DTYPES[code]).tobytes()


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Writes ``array`` as an IDX file atomically, gzipped when ``path`` ends in ``.gz``."""
    data = idx_bytes(array)
    if str(path).endswith(".gz"):
        # mtime=0 makes the gzip output reproducible byte for byte.
        data = gzip.compress(data, mtime=0)
    atomic_write_bytes(path, data)
