"""edgefed: federated."""
