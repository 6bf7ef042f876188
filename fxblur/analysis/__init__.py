"""What the passes read off a graph: the normalised view of each conv and pool, per-channel chains, phase groups."""
