"""The libvirt driver both libvirt services use (install the extra `edgevm-shared[libvirt]`).

connection: one connection, calls in worker threads with deadlines, reopened when lost; errors: libvirt's
errors as ours; naming and states: domain names and states as edgevm sees them; the capabilities power,
definitions, blockjobs and snapshots, each a small class on a connection.
"""
