"""When a paused agent resumes: its own pauses, measured on the cache's logical clock.

An agent that resumes its context (a multi-turn chat, a tool loop) sends its next request after
a pause: a tool runs, a user types, sub-agents work. Each agent keeps the gap between its
consecutive hinted requests (``gap``, in ticks of :class:`~kvflow.cache.urgency.LogicalClock`),
smoothed in log space (a geometric mean: tool latencies are heavy-tailed, and one long pause
must not make an agent look idle for many turns), and expects its next request one gap after
its latest (``expected``, fixed when set, so every tensor-parallel rank and the tree's cached
values agree). An agent not measured yet takes the cache's prior, smoothed the same way over
every agent's measured pauses (1 before any).

A finished request whose hint states ``expected_pause_s`` sets the length of the pause after it
(``hinted``: the ticks it ran plus those seconds at the clock's rate) in place of the gap, for
that pause only; the gap still learns from what the pause turns out to be.

A pause that runs ``REVIEW_FACTOR`` times its gap is reviewed, as a stalled workflow is
(:mod:`kvflow.cache.urgency`): it is now expected to last ``REVIEW_FACTOR`` times as long as it
already has, so a context nobody resumes falls behind live ones without a client's help.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvflow.cache.urgency import REVIEW_FACTOR, LogicalClock, smoothed_gap


@dataclass(eq=False)
class AgentPauses:
    """One agent's pauses between requests, and when its next request is expected."""

    clock: LogicalClock
    last_request: int = 0  # clock reading at its latest hinted request (0: none yet)
    gap: float = 1.0  # clock advance between its consecutive requests, smoothed in log space
    observed: int = 0  # pauses measured
    stretch: float = 0.0  # how long its current pause is expected to last, set by a review
    hinted: float | None = None  # its current pause's length from its request's hint (None: the gap)
    expected: float = 0.0  # when its next request is expected (fixed when set)
    review_at: float = 0.0  # the clock reading at which its pause counts as stalled

    def request(self) -> None:
        """A hinted request of this agent was admitted (after the clock ticked for it)."""
        now = self.clock.now
        if self.last_request:
            pause = now - self.last_request
            self.gap = smoothed_gap(self.gap, pause, self.observed > 0)
            self.observed += 1
            self.clock.pause_measured(pause)
        self.last_request, self.stretch, self.hinted = now, 0.0, None
        self._anchor()

    @property
    def estimate(self) -> float:
        """The gap its next request is expected after (the prior while unmeasured)."""
        return self.gap if self.observed else self.clock.prior_pause

    @property
    def length(self) -> float:
        """How long its current pause is expected to last before any review: the hint's, else the gap."""
        return self.estimate if self.hinted is None else self.hinted

    @property
    def source(self) -> str:
        """Where :attr:`length` comes from: ``hint``, ``measured`` or ``prior``."""
        return "hint" if self.hinted is not None else "measured" if self.observed else "prior"

    def hint(self, ticks: float) -> None:
        """Its request finished, saying its next request comes ``ticks`` from now."""
        self.hinted = self.clock.now - self.last_request + ticks
        self._anchor()

    def review(self) -> None:
        """Its pause lasted until :attr:`review_at`: expect it to last ``REVIEW_FACTOR`` times as long."""
        self.stretch = float(REVIEW_FACTOR * (self.clock.now - self.last_request))
        self._anchor()

    def _anchor(self) -> None:
        gap = self.length
        self.expected = self.last_request + max(gap, self.stretch)
        self.review_at = self.last_request + max(REVIEW_FACTOR * gap, self.stretch)
