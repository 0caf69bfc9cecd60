"""edgevm gateway service."""
