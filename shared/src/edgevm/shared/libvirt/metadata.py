"""edgevm's own metadata in a libvirt domain: the VM name and spec revision, under edgevm's namespace."""

import xml.etree.ElementTree as ET
from dataclasses import dataclass

NAMESPACE = "https://edgevm.dev/xmlns/domain/1"
PREFIX = "edgevm"
ET.register_namespace(PREFIX, NAMESPACE)

_VM = f"{{{NAMESPACE}}}vm"
_NAME = f"{{{NAMESPACE}}}name"
_REVISION = f"{{{NAMESPACE}}}revision"


@dataclass(frozen=True, slots=True)
class DomainMetadata:
    """What edgevm records in a domain about the VM it runs."""

    vm: str
    revision: int


def metadata_element(metadata: DomainMetadata) -> ET.Element:
    """The `<edgevm:vm>` element that goes inside a domain's `<metadata>`."""
    root = ET.Element(_VM)
    ET.SubElement(root, _NAME).text = metadata.vm
    ET.SubElement(root, _REVISION).text = str(metadata.revision)
    return root


def parse_metadata(xml: str) -> DomainMetadata | None:
    """edgevm's metadata in a domain XML or virDomainGetMetadata's element: None if absent, ValueError if malformed."""
    root = ET.fromstring(xml)
    if root.tag == "domain":
        element = root.find(f"metadata/{_VM}")
        name_tag, revision_tag = _NAME, _REVISION
    else:
        # virDomainGetMetadata returns the element with its namespace stripped: <vm><name>..</name>..</vm>.
        element = root if root.tag in (_VM, "vm") else None
        namespaced = root.tag == _VM
        name_tag, revision_tag = (_NAME, _REVISION) if namespaced else ("name", "revision")
    if element is None:
        return None
    name = element.findtext(name_tag)
    revision = element.findtext(revision_tag)
    if not name or revision is None or not revision.strip().isdigit():
        raise ValueError(f"malformed edgevm metadata: {ET.tostring(element, encoding='unicode')!r}")
    return DomainMetadata(vm=name, revision=int(revision))
