"""Kernel-facing drivers of netplumb: namespaces, links, nftables, VXLAN and tc; plain values only."""
