"""edgevm netplumb service."""
