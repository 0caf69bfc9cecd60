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
from edgevm.shared.paging import Page


class GatewayHandlers:
    """Typed handlers over one FleetModel."""

    def __init__(self, model: FleetModel) -> None:
        self._model = model

    async def node_list(self, req: Empty) -> NodeList:
        """gw.node.list."""
        return NodeList(self._model.node_list())

    async def vm_list(self, req: GwVmListRequest) -> msgspec.Raw | Page:
        """gw.vm.list: a GwVmList, encoded by the model (it keeps each node's part encoded); paged with `limit`."""
        if req.limit is None and req.after is None:
            return msgspec.Raw(self._model.vm_list_json(req.node))
        after = None
        if req.after is not None:
            node, _, name = req.after.partition("/")
            after = (node, name)
        return Page("vms", self._model.vm_rows(req.node, after), req.limit)

    async def task_list(self, req: GwTaskListRequest) -> GwTaskList:
        """gw.task.list."""
        return GwTaskList(self._model.task_list(req.node, req.vm, req.limit))

    async def flow_list(self, req: GwFlowListRequest) -> GwFlowList:
        """gw.flow.list."""
        return GwFlowList(self._model.flow_list(req.node, req.vm, req.status, req.limit))
