"""edgefed: edge_node."""
