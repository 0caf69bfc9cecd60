"""How edgevm names its libvirt domains, so they are told apart from every other domain on the host."""

DOMAIN_PREFIX = "edgevm-"


def domain_name(vm: str) -> str:
    """The libvirt domain name of a VM."""
    return DOMAIN_PREFIX + vm


def vm_name(domain: str) -> str | None:
    """The VM name of an edgevm domain, or None for a domain that is not edgevm's."""
    if domain.startswith(DOMAIN_PREFIX) and len(domain) > len(DOMAIN_PREFIX):
        return domain[len(DOMAIN_PREFIX) :]
    return None
