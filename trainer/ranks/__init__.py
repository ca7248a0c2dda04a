"""The ranks of a job: communicators, reachable addresses, placement, the step watchdog, stop signals."""
