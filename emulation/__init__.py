"""edgefed: emulation."""
