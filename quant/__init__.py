"""edgefed: quant."""
