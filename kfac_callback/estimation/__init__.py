"""Curvature estimation: what the factors are built from, the captured inputs and output
gradients (hooks, micro-batches, rows), their subsample, the sampled Fisher and the model's
output distributions."""
