"""The backends of the snapshotter: libvirt (domains and their snapshots) and qemu-img (overlay files)."""
