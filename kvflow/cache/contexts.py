"""Agent contexts: which agents resume the context their previous turn left in the tree.

When a request finishes SGLang inserts its prompt + output, for a next turn that starts with
them to match. An agent owns that path's end (its *context*, evicted in its fixed prompt's order) only
while it *resumes*: its latest prompt started with its previous prompt, was longer, and that
previous prompt was longer than its fixed prompt. The paper's workloads (a fixed prompt and a
new suffix each time) never do, so their outputs and suffixes never inherit protection.

- Each agent keeps its latest prompt's length and hash, not its tokens; a hash of a tuple of
  ints is the same in every process, so every tensor-parallel rank decides alike.
- An agent not seen twice follows the cache's prior: the smoothed share of observed turns that
  resumed (none observed: it does not resume).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvflow.cache.urgency import smoothed
from kvflow.cache.workflow_table import AgentState


def _digest(prompt: Sequence[int], length: int) -> int:
    return hash(tuple(prompt[:length]))


@dataclass
class ResumeTracker:
    """Learns, per agent and over the cache, whether prompts extend the previous ones."""

    prior: float | None = None  # smoothed share of observed turns that resumed (None: none observed)

    def observe(self, agent: AgentState, prompt: Sequence[int]) -> None:
        """A hinted request of ``agent`` arrived with ``prompt``: does it resume the previous one?"""
        record = agent.prompt_record
        if record is not None:
            length, digest = record
            resumed = (agent.fixed_prefix_len or 0) < length < len(prompt) and _digest(
                prompt, length
            ) == digest
            agent.resumes = resumed
            self.prior = smoothed(self.prior or 0.0, float(resumed), self.prior is not None)
        agent.prompt_record = (len(prompt), _digest(prompt, len(prompt)))

    def protects(self, agent: AgentState) -> bool:
        """Whether the agent's context is to be owned (it resumes, or the prior says agents do)."""
        if agent.resumes is not None:
            return agent.resumes
        return self.prior is not None and self.prior >= 0.5
