"""Which failed steps of a converge are a VM's: decided by the step and the names it was for (pure)."""

import pytest

from edgevm.netplumb.vms import concerns
from edgevm.shared.netstate import NetFailure, VmNetRecord
from edgevm.shared.spec import VirtualInterface, VnetAttachment

WEB = VmNetRecord(
    vm="web", vrf="red", netns="edgevm-red", nics=[], updated_at="t",
    virtual_networks=[VnetAttachment(network="blue", virtual_ip="10.9.0.5")],
    virtual_interfaces=[VirtualInterface(name="eth7", destination="eth1")],
)


@pytest.mark.parametrize(
    ("failure", "mine"),
    [
        (NetFailure(step="vrf", what="VRF red", error="e", vrf="red"), True),
        (NetFailure(step="vrf", what="VRF green", error="e", vrf="green"), False),
        (NetFailure(step="tables", what="nftables table of the node", error="e"), True),
        (NetFailure(step="tables", what="building the nftables tables", error="e"), True),
        (NetFailure(step="taps", what="attaching VM taps", error="e"), True),
        (NetFailure(step="vnet", what="virtual network blue", error="e", network="blue"), True),
        (NetFailure(step="vnet", what="virtual network gold", error="e", network="gold"), False),
        (NetFailure(step="attach", what="attaching red to blue", error="e", vrf="red", network="blue"), True),
        (NetFailure(step="attach", what="attaching green to blue", error="e", vrf="green", network="blue"), False),
        (NetFailure(step="detach", what="detaching red from gold", error="e", vrf="red", network="gold"), False),
        (NetFailure(step="detach", what="detaching red from blue", error="e", vrf="red", network="blue"), True),
        (NetFailure(step="vif", what="virtual interface eth7", error="e", interface="eth7"), True),
        (NetFailure(step="vif", what="virtual interface eth8", error="e", interface="eth8"), False),
        (NetFailure(step="unwire", what="unwiring eth7", error="e", interface="eth7"), True),
        (NetFailure(step="links", what="removing unused links", error="e"), False),
    ],
)
def test_a_failure_is_a_vms_when_its_step_was_for_something_the_vm_uses(failure, mine):
    assert concerns(failure, WEB) is mine


def test_a_failure_reads_as_its_step_and_the_kernels_sentence():
    failure = NetFailure(step="vif", what="virtual interface eth7", error="link evt-fw-1 does not exist",
                         interface="eth7")
    assert str(failure) == "virtual interface eth7: link evt-fw-1 does not exist"
