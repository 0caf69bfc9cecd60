"""The libvirt boundary of the lifecycle service: domain XML, connection, domains, events, host probe."""
