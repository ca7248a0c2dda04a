"""A private SLURM for tests and trials on one machine: one node on 127.0.0.1, or N emulated nodes,
each a network namespace (``python -m launcher.slurm_local``)."""
