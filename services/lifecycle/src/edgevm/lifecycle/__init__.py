"""edgevm lifecycle service."""
