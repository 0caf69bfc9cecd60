"""The gateway's queries (`edgevm.gw.*`), answered from the read model."""

from __future__ import annotations

from edgevm.gateway.model import FleetModel
from edgevm.shared.commands import (
    Empty,
    FlowList,
    GwFlowListRequest,
    GwTaskListRequest,
    GwVmList,
    GwVmListRequest,
    NodeList,
    TaskList,
)


class GatewayHandlers:
    """Typed handlers over one FleetModel."""

    def __init__(self, model: FleetModel) -> None:
        self._model = model

    async def node_list(self, req: Empty) -> NodeList:
        """gw.node.list."""
        return NodeList(self._model.node_list())

    async def vm_list(self, req: GwVmListRequest) -> GwVmList:
        """gw.vm.list."""
        return GwVmList(self._model.vm_list(req.node))

    async def task_list(self, req: GwTaskListRequest) -> TaskList:
        """gw.task.list."""
        return TaskList(self._model.task_list(req.node, req.vm, req.limit))

    async def flow_list(self, req: GwFlowListRequest) -> FlowList:
        """gw.flow.list."""
        return FlowList(self._model.flow_list(req.node, req.vm, req.status, req.limit))
