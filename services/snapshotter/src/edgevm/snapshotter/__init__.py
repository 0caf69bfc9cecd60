"""edgevm snapshotter service."""
