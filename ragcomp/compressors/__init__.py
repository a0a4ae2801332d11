"""One module per method; each registers itself in ragcomp.registry by name."""
