"""Retention as a load lever: when pages wait too long for the model, pages admitted from then on are pruned
harder, never below a floor, and the level steps back up as the queue drains.

Pruned pages prefill faster and hold fewer KV rows, so more of them decode together: lowering retention
under a burst buys capacity for a little accuracy (the paper keeps 99.47% at 84.25%), where a service
without this lever can only answer 503. The policy is off unless ``RTPRUNE_ADAPTIVE_TARGET_WAIT_S`` is set.

:class:`RetentionPolicy` is pure (no clock, no scheduler): the scheduler asks :meth:`~RetentionPolicy.next_level`
once per admitted page with the page's time in the queue (the load signal), and :meth:`~RetentionPolicy.cap`
for that page's retention cap. Running pages keep their prompt: only pages not yet admitted change.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from service.engine.options import PageKnobs
from service.engine.stats import Adaptation


@dataclass(frozen=True)
class RetentionPolicy:
    """The retention cap for the next admissions, from how long admitted pages waited.

    ``level`` is the cap in (floor, 1]: it steps down by ``step`` when the signal (the median wait of the
    pages admitted last) is over ``target_wait_s``, and up by ``step`` for each ``hold_s`` that passed
    while it was under ``relax_ratio`` of the target (hysteresis: between the two it holds, so it does not
    oscillate). At most one step down per ``hold_s``, so one burst does not drive it to the floor at once.
    """

    target_wait_s: float
    floor: float = 0.5
    step: float = 0.1
    hold_s: float = 0.5
    relax_ratio: float = 0.5

    def __post_init__(self) -> None:
        if not self.target_wait_s > 0:
            raise ValueError("the adaptive retention target must be a positive number of seconds")
        if not 0 < self.floor <= 1:
            raise ValueError("the adaptive retention floor must be in (0, 1]")
        if not (self.hold_s > 0 and 0 < self.step <= 1):
            raise ValueError("the adaptive retention steps need hold_s > 0 and a step in (0, 1]")

    def next_level(self, level: float, wait_s: float, since_change_s: float) -> float:
        """The level after a page that waited ``wait_s`` was admitted, ``since_change_s`` after the last
        change. Never below the floor nor above 1; lower or equal for a longer wait (monotone in load)."""
        if since_change_s < self.hold_s:
            return level
        if wait_s > self.target_wait_s:
            return max(self.floor, round(level - self.step, 9))
        if wait_s < self.relax_ratio * self.target_wait_s:
            return min(1.0, round(level + self.step * int(since_change_s // self.hold_s), 9))
        return level

    @staticmethod
    def pinned(knobs: PageKnobs) -> bool:
        """A page the policy never changes: it asked so (``adapt=false``), or for every token (pruner none)."""
        return not knobs.adapt or knobs.pruner == "none"

    def cap(self, level: float, knobs: PageKnobs) -> float | None:
        """The retention cap for a page with these knobs at ``level``; None leaves the page as it asked: the
        policy at rest, a pinned page (``adapt=false``), ``pruner=none`` (it asked for every token), or a
        fixed retention already at or below the cap. Never below the floor."""
        if level >= 1.0 or self.pinned(knobs):
            return None
        cap = max(level, self.floor)
        fixed = knobs.fixed_retention
        if fixed is not None and fixed <= cap:
            return None
        return cap


SIGNAL_PAGES = 5  # the load signal is the median wait of the pages admitted last: one unlucky page is not load
QUEUED_SIGNAL_PAGE = 3  # ... or the wait so far of the third page still in the queue: a queue building up


class AdaptiveRetention:
    """The policy's state in the scheduler: the current level, when it last changed, and the waits of the pages
    admitted last, whose median is the load signal (one thread uses it)."""

    def __init__(self, policy: RetentionPolicy, now: float) -> None:
        self.policy = policy
        self.level = 1.0
        self.changed_at = now
        self.waits: deque[float] = deque(maxlen=SIGNAL_PAGES)
        self.queued_s = 0.0  # how long the third-oldest page still waiting has waited (0: fewer wait)

    def admit(
        self, knobs: PageKnobs, wait_s: float, now: float, still_waiting: Sequence[float] = ()
    ) -> Adaptation | None:
        """Update the level with this admitted page's wait, and give the page's cap (None: a pinned page, or
        pruner none). ``still_waiting``: how long the pages that arrived first among those still in the queue
        have waited so far, longest first. ``adapted`` is settled by the engine once the page is pruned (an
        ``auto`` page whose own ratio is under the cap is not lowered)."""
        self.waits.append(wait_s)
        self.queued_s = still_waiting[QUEUED_SIGNAL_PAGE - 1] if len(still_waiting) >= QUEUED_SIGNAL_PAGE else 0.0
        level = self.policy.next_level(self.level, self.signal_s, now - self.changed_at)
        if level != self.level:
            self.level, self.changed_at = level, now
        if self.policy.pinned(knobs):
            return None
        cap = self.policy.cap(self.level, knobs)
        return Adaptation(
            adapted=False,
            cap=1.0 if cap is None else cap,
            queue_wait_s=round(self.signal_s, 3),
            target_wait_s=self.policy.target_wait_s,
        )

    @property
    def signal_s(self) -> float:
        """The load signal: the median time in the queue of the last pages admitted (0 before any), or, when
        longer, how long the page that arrived third among those still waiting has waited so far. The first
        lags: a burst shows in it only once its pages are admitted, and by then it has filled the queue.
        The second leads: three pages that already waited longer than the target will push the median over
        it when they are admitted, so the level starts down now; one page that waits long alone does not."""
        admitted = statistics.median(self.waits) if self.waits else 0.0
        return max(admitted, self.queued_s)
