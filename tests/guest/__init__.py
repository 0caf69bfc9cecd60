"""The tiny real test guest: its image builder, console helper and pytest fixtures."""
