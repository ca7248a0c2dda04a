"""Distribution over ranks: each rank's share of a step, who owns which layer's inverses, every
buffer the ranks exchange, and the communicator of a torch.distributed process group."""
