"""The protected-share budget: how much of the device pool one workflow's prompts are protected in.

Every eviction key (``AgentState.next_use``) starts with the agent's ``over_budget``
flag, so an agent past its workflow's share is evicted before every protected prompt of
every workflow. :func:`apply_budget` sets those flags for one workflow.

- Agents are counted nearest first (by steps; unknown steps last), each adding the
  tokens of its fixed prompt's path not already counted: a node shared by several of
  the workflow's prompts counts once.
- An agent is over budget only if it owns a node, has steps, and the running count
  passed the budget at its prompt; a workflow whose prompts' paths fit is all within.
"""

from __future__ import annotations

import math

from kvflow.cache.workflow_table import AgentState, WorkflowState


def apply_budget(workflow: WorkflowState, budget: float) -> list[AgentState]:
    """Mark the agents past ``budget`` tokens of the workflow, nearest first; return those changed."""
    agents = workflow.agents.values()
    if sum(agent.node_tokens for agent in agents if agent.node is not None) <= budget:
        # Its prompts' paths hold at most that many tokens: none is past the budget.
        changed = [agent for agent in agents if agent.over_budget]
        for agent in changed:
            agent.over_budget = False
        return changed
    counted: set[int] = set()
    used, changed = 0, []
    for agent in sorted(agents, key=_nearest_first):
        node = agent.node
        while node is not None and node.parent is not None and id(node) not in counted:
            counted.add(id(node))
            used += len(node.key)
            node = node.parent
        over = agent.node is not None and agent.steps is not None and used > budget
        if over != agent.over_budget:
            agent.over_budget = over
            changed.append(agent)
    return changed


def _nearest_first(agent: AgentState) -> float:
    return math.inf if agent.steps is None else agent.steps
