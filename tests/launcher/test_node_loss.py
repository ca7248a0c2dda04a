"""Node losses in a row (slow): each ends its job with exactly one line of ours naming the node;
so does a cut link.

benchmarks/node_loss.py does the rounds (submit, train, kill node2, read err.log, node2 back); this
test runs ``KFAC_NODE_LOSS_RUNS`` of them per communicator (2 by default, to keep ``make test-all``
short; the 20 + 20 of docs/faults.md with ``KFAC_NODE_LOSS_RUNS=20``).
"""

from __future__ import annotations

import os

import pytest

from benchmarks.node_loss import stress, table
from launcher.cluster import netns
from launcher.cluster.slurm_cluster import EmulatedCluster
from launcher.cluster.slurm_daemons import missing_programs

reason = ", ".join(missing_programs()) and f"needs SLURM ({', '.join(missing_programs())} missing: .ci/install-slurm)"
reason = reason or netns.unsupported_reason()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(reason), reason=reason or "")]
RUNS = int(os.environ.get("KFAC_NODE_LOSS_RUNS", "2"))


@pytest.mark.timeout(120 * RUNS * 2 + 120)
def test_every_node_loss_ends_its_job_with_one_line_naming_the_node(tmp_path):
    with EmulatedCluster(nodes=2, cpus=4, cred_expire_s=5) as cluster:
        outcomes = [*stress(cluster, tmp_path, "mpi", RUNS), *stress(cluster, tmp_path, "gloo", RUNS)]
    print(table(outcomes))
    assert all(o.one_line for o in outcomes), "\n".join(o.summary() for o in outcomes)
    assert all(o.ended_after_s < 60 for o in outcomes), [o.ended_after_s for o in outcomes]


def test_a_cut_link_is_named_by_the_side_of_rank_0(tmp_path):
    """node2's link down: its ranks live on and, here, still count their heartbeats (one machine's
    file system), so rank 0's side names them as out of reach (trainer/ranks/reach.py)."""
    with EmulatedCluster(nodes=2, cpus=4, cred_expire_s=5) as cluster:
        outcomes = [*stress(cluster, tmp_path, "mpi", 1, fault="cut"), *stress(cluster, tmp_path, "gloo", 1, fault="cut")]
    print(table(outcomes))
    for outcome in outcomes:
        assert outcome.one_line and "unreachable over the network" in outcome.ours[0], outcome.summary()
