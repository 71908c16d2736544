"""The protected-share budget: how much of the device pool one workflow's prompts are protected in.

Every eviction key (``AgentState.next_use``, ``context_next_use``) starts with an over-budget
flag, so KV past its workflow's share is evicted before every protected prompt of every
workflow. :func:`apply_budget` sets those flags for one workflow.

- Fixed prompts are counted first, then contexts, each nearest first (by steps; unknown steps
  last), each adding the tokens of its path not already counted: a node shared by several of
  the workflow's prompts and contexts counts once.
- A prompt (context) is over budget only if its agent owns it, has steps, and the running count
  passed the budget at it; a workflow whose paths fit is all within.
"""

from __future__ import annotations

import math

from kvflow.cache.workflow_table import AgentState, WorkflowState


def apply_budget(workflow: WorkflowState, budget: float) -> list[AgentState]:
    """Mark the prompts and contexts past ``budget`` tokens of the workflow, nearest first; return
    the agents whose flags changed."""
    agents = workflow.agents.values()
    owned = sum(agent.node_tokens for agent in agents if agent.node is not None)
    owned += sum(agent.context_tokens for agent in agents if agent.context is not None)
    if owned <= budget:
        # Its paths hold at most that many tokens: none is past the budget.
        changed = [agent for agent in agents if agent.over_budget or agent.context_over_budget]
        for agent in changed:
            agent.over_budget = agent.context_over_budget = False
        return changed
    counted: set[int] = set()
    used, changed = 0, {}
    ordered = sorted(agents, key=_nearest_first)
    for flag, slot in (("over_budget", "node"), ("context_over_budget", "context")):
        for agent in ordered:
            node = getattr(agent, slot)
            while node is not None and node.parent is not None and id(node) not in counted:
                counted.add(id(node))
                used += len(node.key)
                node = node.parent
            over = getattr(agent, slot) is not None and agent.steps is not None and used > budget
            if over != getattr(agent, flag):
                setattr(agent, flag, over)
                changed[agent] = None
    return list(changed)


def _nearest_first(agent: AgentState) -> float:
    return math.inf if agent.steps is None else agent.steps
