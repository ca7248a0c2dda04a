"""Step policy: the schedules (damping warm-up, update and compute intervals), the KL clip and
the adaptive rules (learning rate, momentum, damping)."""
