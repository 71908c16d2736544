"""Patch: with data parallelism, every request of a workflow goes to one DP rank.

Both hooks run in SGLang's DP controller process, the one place every tokenized request passes
through on its way to a rank; the rank table is :class:`WorkflowRanks`.

- A hinted workflow's requests all go to one rank, the least loaded at first sight, so each fixed
  prompt is computed on one rank only; every other request keeps SGLang's dispatch exactly.
- The rank table is bounded like the cache's workflow table: at most ``--kvflow-max-workflows``
  entries, each forgotten after ``--kvflow-hint-ttl`` seconds without a request.
- Target ``DataParallelController.dispatching_with_trace`` (BEFORE, :func:`_pin_to_workflow_rank`):
  sets a hinted request's ``routed_dp_rank`` to its workflow's rank.
- Target ``DataParallelController.send_control_message`` (BEFORE,
  :func:`_forget_ended_workflows`): an ``end`` command forgets the workflow's rank.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from kvflow import control
from kvflow.config import KVFlowConfig
from kvflow.expiring_table import ExpiringTable, WhenFull
from kvflow.hints import decode_transport

_CONTROLLER = "sglang.srt.managers.data_parallel_controller.DataParallelController"
TARGETS = (f"{_CONTROLLER}.dispatching_with_trace", f"{_CONTROLLER}.send_control_message")
# The controller's attributes this patch reads (set in its ``__init__``).
CONTROLLER_ATTRIBUTES = ("load_balance_method", "_active_workers", "load_snapshot_reader")


class WorkflowRanks:
    """The DP rank of each workflow: the least loaded at first sight, then sticky.

    A workflow seen for the first time goes to the active rank with the fewest running and
    waiting requests (the schedulers' load snapshots), ties broken by fewer workflows already
    pinned there; afterwards it sticks to that rank.
    """

    def __init__(self, capacity: int, ttl: float, clock: Callable[[], float] | None = None) -> None:
        extra = {} if clock is None else {"clock": clock}
        self._table: ExpiringTable[int] = ExpiringTable(capacity, WhenFull.DROP_OLDEST, ttl, **extra)
        self._pinned: Counter[int] = Counter()

    def __len__(self) -> int:
        return len(self._table)

    def pinned(self, rank: int) -> int:
        """Workflows currently pinned to ``rank``."""
        return self._pinned[rank]

    def rank_for(self, workflow_id: str, active: list[int], loads: Callable[[], Mapping[int, int]]) -> int:
        """The rank for a request of ``workflow_id`` among the ``active`` ranks.

        ``loads`` (requests per rank) is read only when the workflow needs a rank:
        at first sight, or when its rank is no longer active.
        """
        self._expire()
        rank = self._table.get(workflow_id)
        if rank is not None and rank in active:
            self._table.touch(workflow_id)
            return rank
        self.forget(workflow_id)
        load = loads()
        rank = min(active, key=lambda r: (load.get(r, 0), self._pinned[r], r))
        self._table.put(workflow_id, rank)
        self._pinned[rank] += 1
        self._expire()
        return rank

    def forget(self, workflow_id: str) -> None:
        """Drop ``workflow_id``'s rank (its next request is placed afresh)."""
        rank = self._table.pop(workflow_id)
        if rank is not None:
            self._pinned[rank] -= 1

    def _expire(self) -> None:
        for _, rank in self._table.expire():
            self._pinned[rank] -= 1


def hinted_workflow(req: Any) -> str | None:
    """The workflow id of the kvflow hint a tokenized request carries, or None."""
    sampling_params = getattr(req, "sampling_params", None)
    hint = decode_transport(getattr(sampling_params, "custom_params", None))
    return None if hint is None else hint.workflow_id


def ended_workflows(server_args: Mapping[str, Any]) -> list[str]:
    """The workflows a ``SetInternalStateReq``'s kvflow ``end`` commands end."""
    ended = []
    for key in server_args:
        if not control.is_command(key):
            continue
        try:
            command = control.decode(key)
        except control.ControlError:
            continue  # the scheduler logs malformed commands
        if isinstance(command, control.End):
            ended.append(command.workflow_id)
    return ended


def _ranks(controller: Any) -> WorkflowRanks:
    ranks = getattr(controller, "kvflow_workflow_ranks", None)
    if ranks is None:
        config = KVFlowConfig.from_env() or KVFlowConfig()
        ranks = WorkflowRanks(config.max_workflows, config.hint_ttl)
        controller.kvflow_workflow_ranks = ranks
    return ranks


def _requests_per_rank(controller: Any) -> dict[int, int]:
    return {
        load.dp_rank: load.num_running_reqs + load.num_waiting_reqs
        for load in controller.load_snapshot_reader.read_all()
    }


def _pin_to_workflow_rank(controller, req, *args, **kwargs) -> None:
    """Set a hinted request's ``routed_dp_rank`` to its workflow's rank (:class:`WorkflowRanks`).

    A request carrying a kvflow hint (``sampling_params.custom_params["kvflow"]``, the transport
    the HTTP layer writes on all three endpoints and for registered workflows) gets its
    workflow's rank, which SGLang's own dispatch then honours (``maybe_external_dp_rank_routing``).
    A request that already names a ``routed_dp_rank`` keeps it, requests without a hint keep
    SGLang's dispatch exactly, and under ``follow_bootstrap_room`` (a PD prefill server, whose
    rank pairs with the decode side) nothing is pinned.
    """
    from sglang.srt.managers.data_parallel_controller import LoadBalanceMethod

    if (
        req.routed_dp_rank is not None
        or controller.load_balance_method is LoadBalanceMethod.FOLLOW_BOOTSTRAP_ROOM
    ):
        return
    workflow_id = hinted_workflow(req)
    if workflow_id is not None and controller._active_workers:
        req.routed_dp_rank = _ranks(controller).rank_for(
            workflow_id, controller._active_workers, lambda: _requests_per_rank(controller)
        )


def _forget_ended_workflows(controller, obj, *args, **kwargs) -> None:
    """Forget the rank of each workflow an ``end`` command (``DELETE /kvflow/workflows/{id}``) ends.

    SGLang sends every internal-state request, kvflow's commands included, to every rank; ranks
    that do not track the workflow ignore the command.
    """
    from sglang.srt.managers.io_struct import SetInternalStateReq

    if isinstance(obj, SetInternalStateReq):
        for workflow_id in ended_workflows(obj.server_args):
            _ranks(controller).forget(workflow_id)


def register_hooks() -> None:
    HookRegistry.register(TARGETS[0], _pin_to_workflow_rank, HookType.BEFORE)
    HookRegistry.register(TARGETS[1], _forget_ended_workflows, HookType.BEFORE)
