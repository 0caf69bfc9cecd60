"""The gateway's queries (`edgevm.gw.*`), answered from the read model."""

from __future__ import annotations

import msgspec

from edgevm.gateway.model import FleetModel
from edgevm.shared.commands import (
    Empty,
    GwFlowList,
    GwFlowListRequest,
    GwTaskList,
    GwTaskListRequest,
    GwVmListRequest,
    NodeList,
)


class GatewayHandlers:
    """Typed handlers over one FleetModel."""

    def __init__(self, model: FleetModel) -> None:
        self._model = model

    async def node_list(self, req: Empty) -> NodeList:
        """gw.node.list."""
        return NodeList(self._model.node_list())

    async def vm_list(self, req: GwVmListRequest) -> msgspec.Raw:
        """gw.vm.list: a GwVmList, encoded by the model (it keeps each node's part encoded)."""
        return msgspec.Raw(self._model.vm_list_json(req.node))

    async def task_list(self, req: GwTaskListRequest) -> GwTaskList:
        """gw.task.list."""
        return GwTaskList(self._model.task_list(req.node, req.vm, req.limit))

    async def flow_list(self, req: GwFlowListRequest) -> GwFlowList:
        """gw.flow.list."""
        return GwFlowList(self._model.flow_list(req.node, req.vm, req.status, req.limit))
