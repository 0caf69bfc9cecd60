"""The edgevm command."""
