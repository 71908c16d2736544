"""The DP rank table and what the DP controller hook reads from SGLang's tokenized requests (no server)."""

from __future__ import annotations

from array import array

import pytest
from kvflow.patches.dp_routing import WorkflowRanks, ended_workflows, hinted_workflow
from sglang.srt.managers.io_struct import TokenizedGenerateReqInput
from sglang.srt.sampling.sampling_params import SamplingParams

from kvflow import control
from kvflow.hints import WorkflowHint, transport


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def no_load() -> dict[int, int]:
    return {}


def test_first_sight_takes_the_least_loaded_rank_then_the_workflow_sticks():
    ranks = WorkflowRanks(capacity=16, ttl=60)
    assert ranks.rank_for("a", [0, 1], lambda: {0: 3, 1: 1}) == 1
    # Sticky: the load is not even read again.
    assert ranks.rank_for("a", [0, 1], lambda: pytest.fail("load read for a placed workflow")) == 1
    # Equal load: fewer workflows pinned wins, then the lower rank.
    assert ranks.rank_for("b", [0, 1], lambda: {0: 0, 1: 0}) == 0
    assert ranks.rank_for("c", [0, 1], no_load) == 0 and ranks.rank_for("d", [0, 1], no_load) == 1
    assert (ranks.pinned(0), ranks.pinned(1)) == (2, 2)


def test_a_workflow_whose_rank_went_inactive_is_placed_again():
    ranks = WorkflowRanks(capacity=16, ttl=60)
    assert ranks.rank_for("a", [0, 1], lambda: {0: 5}) == 1
    assert ranks.rank_for("a", [0, 2], lambda: {0: 5}) == 2
    assert (ranks.pinned(1), ranks.pinned(2), len(ranks)) == (0, 1, 1)


def test_the_table_is_bounded_and_forgets_idle_and_ended_workflows():
    clock = Clock()
    ranks = WorkflowRanks(capacity=2, ttl=10, clock=clock)
    for workflow in ("a", "b", "c"):
        ranks.rank_for(workflow, [0, 1], no_load)
    assert len(ranks) == 2 and ranks.pinned(0) + ranks.pinned(1) == 2  # "a", the oldest, went
    clock.now = 5
    ranks.rank_for("b", [0, 1], no_load)  # a use keeps it
    clock.now = 12
    ranks.rank_for("d", [0, 1], no_load)  # "c" idle past the TTL
    assert len(ranks) == 2
    ranks.forget("b")
    ranks.forget("unknown")
    assert len(ranks) == 1 and ranks.pinned(0) + ranks.pinned(1) == 1


def tokenized(custom_params: dict | None) -> TokenizedGenerateReqInput:
    return TokenizedGenerateReqInput(
        input_text=None,
        input_ids=array("i", [1, 2, 3]),
        input_embeds=None,
        mm_inputs=None,
        token_type_ids=None,
        sampling_params=SamplingParams(custom_params=custom_params),
        return_logprob=False,
        logprob_start_len=-1,
        top_logprobs_num=0,
        token_ids_logprob=None,
        stream=False,
    )


def test_the_workflow_is_read_from_the_hint_transport_of_a_tokenized_request():
    hint = WorkflowHint("wf-1", "planner", steps_to_execution={"planner": 0})
    assert hinted_workflow(tokenized(transport(hint))) == "wf-1"
    assert hinted_workflow(tokenized({"other": 1})) is None
    assert hinted_workflow(tokenized(None)) is None
    assert hinted_workflow(tokenized({"kvflow": "{not json"})) is None


def test_end_commands_name_the_workflows_they_end():
    server_args = {
        control.encode(control.End("wf-1")),
        control.encode(control.Steps("wf-2", {"a": 1})),
        "kvflow:{broken",
        "max_running_requests",
    }
    assert ended_workflows(dict.fromkeys(server_args, 1)) == ["wf-1"]
