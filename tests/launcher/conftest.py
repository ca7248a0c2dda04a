"""One private one-node SLURM for the launcher's tests (``local_slurm``), started on first use.

Starting and stopping munged, slurmctld and slurmd costs seconds; the modules that submit jobs
to one node share this cluster (tests/launcher/test_slurm_cluster.py and test_two_nodes.py start
their own, of several nodes). It does not export SLURM_CONF: a test takes ``local_slurm.env()``,
or the ``slurm_conf`` fixture for code that reads the environment.
"""

from __future__ import annotations

import os
import re

import pytest

from launcher.cluster import slurm_daemons
from launcher.cluster.slurm_daemons import LocalSlurm, missing_programs


@pytest.fixture(scope="package")
def local_slurm():
    if missing_programs() or os.geteuid() != 0:
        pytest.skip("needs root and SLURM + munge (.ci/install-slurm)")
    render = slurm_daemons.render_slurm_conf

    def quick_requeue(*args, **kwargs):
        # A requeued job waits for its launch credential to expire: 5 s, not 120 (test_preemption.py).
        return re.sub(r"^(AuthInfo=\S+)$", r"\1,cred_expire=5", render(*args, **kwargs), flags=re.M)

    cluster = LocalSlurm(cpus=4)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(slurm_daemons, "render_slurm_conf", quick_requeue)
        cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def slurm_conf(local_slurm, monkeypatch):
    """``local_slurm`` with its SLURM_CONF in this process's environment for the test."""
    monkeypatch.setenv("SLURM_CONF", str(local_slurm.paths.conf))
    return local_slurm
