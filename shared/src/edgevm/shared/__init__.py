"""edgevm.shared: what the services share: protocol, bus, errors, endpoint adapter, config, metrics."""
