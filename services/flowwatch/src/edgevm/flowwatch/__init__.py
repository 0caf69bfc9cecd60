"""edgevm flowwatch service."""
