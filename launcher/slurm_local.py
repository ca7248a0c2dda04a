"""``python -m launcher.slurm_local``: the private SLURM's command keeps its name; the code is
launcher/cluster/slurm_local.py."""

from __future__ import annotations

import sys

from launcher.cluster.slurm_local import main

if __name__ == "__main__":
    sys.exit(main())
