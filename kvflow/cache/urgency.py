"""When an agent's prompt is next needed: steps-to-execution turned into time, comparable across workflows.

Steps are hops, and hops of different workflows do not take the same time: one
step away in a workflow whose agents write long outputs can come long after
three steps away in a fast one. So each workflow keeps its *pace*: the
smoothed time between two of its consecutive hinted requests. An agent
``steps`` hops away is expected at ``last_step + steps * interval``, taken when
its steps are set (a hint that does not name it leaves it there), and
eviction orders owned prompts by that expected time (latest first), so within
one workflow the hint's order is kept and across workflows the one needed
later goes first (Belady's rule on the estimate).

Time is a *logical* clock: the number of hinted requests this cache admitted.
Every tensor-parallel rank admits the same requests in the same order and an
offline replay reproduces them, so every rank computes the same next uses; no wall
clock is read. A workflow seen once has no interval yet and takes the prior:
the smoothed interval over every workflow (1 before any was measured).

Seconds a client states (a hint's ``expected_pause_s``) become ticks at the clock's rate, measured
only from the HTTP process's stamps on hinted requests (:mod:`kvflow.cache.stamped_clock`) over
windows of :data:`RATE_WINDOW` ticks and smoothed as seconds per tick; until one window is measured
there is no rate and such hints are ignored.

A workflow that stalls (a slow tool, or it is done and nobody said so)
would keep the expected times of its last step, earlier than anything else.
So a workflow whose step has lasted ``REVIEW_FACTOR`` times its interval is
reviewed: its step is now expected to last ``REVIEW_FACTOR`` times as long as
it already has (``stretch``: the longer a wait, the longer it tends to go on),
which moves all its agents later, and the next review comes when that runs
out. A finished workflow's prompts thus fall behind the live ones' after a
few reviews (each moving its agents, spaced geometrically), and a new
step of the workflow resets the stretch.

With urgency ``hops`` the next use is the steps themselves (the paper's rule),
kept for comparison; nothing is reviewed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

URGENCY_MODES = ("time", "hops")
# Weight of the newest interval in a pace. Half-weight follows a workflow that slows down or
# speeds up within two steps, while one outlier step moves the estimate only halfway.
SMOOTHING = 0.5
REVIEW_FACTOR = 2
RATE_WINDOW = 8  # ticks per sample of the clock's rate: one tick's stamp gap is mostly jitter


def smoothed(estimate: float, sample: float, measured: bool) -> float:
    """``estimate`` moved toward ``sample``; the first sample (``measured`` False) replaces it."""
    return estimate + SMOOTHING * (sample - estimate) if measured else float(sample)


def smoothed_gap(gap: float, sample: int, measured: bool) -> float:
    """:func:`smoothed` in log space (a geometric mean, for heavy-tailed gaps of at least 1 tick)."""
    return math.exp(smoothed(math.log(gap), math.log(sample), True)) if measured else float(sample)


@dataclass(eq=False)
class LogicalClock:
    """The cache's clock (hinted requests admitted) and the priors of unmeasured workflows and agents."""

    mode: str = "time"
    now: int = 0
    prior_interval: float = 1.0
    prior_pause: float = 1.0  # an agent's gap between requests, smoothed in log space (pauses.py)
    seconds_per_tick: float | None = None  # stamped seconds per tick, smoothed (None: not measured)
    _measured: bool = False
    _pause_measured: bool = False
    _rate_since: tuple[int, float] | None = None  # (tick, stamp) where the current rate window began

    def __post_init__(self) -> None:
        if self.mode not in URGENCY_MODES:
            raise ValueError(f"urgency must be one of {', '.join(URGENCY_MODES)}, got {self.mode!r}")

    def tick(self) -> int:
        self.now += 1
        return self.now

    def stamped(self, stamp: float) -> None:
        """The hinted request that just ticked the clock was stamped ``stamp`` (never decreasing)."""
        if self._rate_since is None:
            self._rate_since = (self.now, stamp)
            return
        tick, since = self._rate_since
        if self.now - tick >= RATE_WINDOW and stamp > since:
            sample = (stamp - since) / (self.now - tick)
            measured = self.seconds_per_tick is not None
            self.seconds_per_tick = smoothed(self.seconds_per_tick or 0.0, sample, measured)
            self._rate_since = (self.now, stamp)

    @property
    def ticks_per_second(self) -> float | None:
        """The clock's measured rate (None before a window of stamps was measured)."""
        return None if self.seconds_per_tick is None else 1.0 / self.seconds_per_tick

    def ticks_for(self, seconds: float) -> float | None:
        """``seconds`` of stamped time in ticks, at least 1; None while the rate is not measured."""
        rate = self.ticks_per_second
        return None if rate is None else max(1.0, seconds * rate)

    def measured(self, interval: int) -> None:
        """One workflow's interval was measured: fold it into the prior."""
        self.prior_interval = smoothed(self.prior_interval, interval, self._measured)
        self._measured = True

    def pause_measured(self, gap: int) -> None:
        """One agent's gap between requests was measured: fold it into the prior pause."""
        self.prior_pause = smoothed_gap(self.prior_pause, gap, self._pause_measured)
        self._pause_measured = True


@dataclass(eq=False)
class WorkflowPace:
    """One workflow's pace on a :class:`LogicalClock`; shared by all of its agents.

    An agent's expected time is read from it when the agent's steps are set or
    its workflow is reviewed (``AgentState.anchor``): a workflow not measured yet
    keeps the prior as it was at its latest step, not the prior's later values.
    """

    clock: LogicalClock
    last_step: int = 0  # clock reading at its latest hinted request
    interval: float = 1.0  # smoothed clock advance between its consecutive hinted requests
    measured: bool = False  # False: ``interval`` is the prior, taken at the latest step
    stretch: float = 0.0  # how long its current step is expected to last, set by a review

    def step(self) -> None:
        """A hinted request of this workflow was admitted (the clock ticks)."""
        seen_before = self.last_step > 0
        now = self.clock.tick()
        if seen_before:
            gap = now - self.last_step
            self.interval = smoothed(self.interval, gap, self.measured)
            self.measured = True
            self.clock.measured(gap)
        else:
            self.interval = self.clock.prior_interval
        self.last_step, self.stretch = now, 0.0

    @property
    def review_at(self) -> float:
        """The clock reading at which its current step counts as stalled (see the module docstring)."""
        return self.last_step + max(REVIEW_FACTOR * self.interval, self.stretch)

    def review(self) -> None:
        """Its step has lasted past :attr:`review_at`: expect it to last ``REVIEW_FACTOR`` times as long."""
        self.stretch = float(REVIEW_FACTOR * (self.clock.now - self.last_step))

    def expected_at(self, steps: int) -> float:
        """When an agent ``steps`` hops away is expected to run (the steps themselves with ``hops``)."""
        if self.clock.mode == "hops":
            return steps
        return self.last_step + steps * max(self.interval, self.stretch)
