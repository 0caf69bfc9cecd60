"""Flowwatch's kernel drivers: conntrack over ctnetlink, its own nftables table, probe packets."""
