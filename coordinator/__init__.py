"""edgefed: coordinator."""
