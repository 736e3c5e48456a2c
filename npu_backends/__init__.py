"""edgefed: npu_backends."""
