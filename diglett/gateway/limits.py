"""The gateway's rate and memory limits: new streams per second, and the memory budget.

Both only count and decide; they hold no socket and end nothing. ``TokenBucket`` queues (a
caller past the burst waits); ``MemoryBudget`` answers whether new streams are refused.
"""

import logging
import time

import gevent

log = logging.getLogger(__name__)

BUDGET_REFUSE = 0.75  # share of memory_budget buffered at which new streams are refused
BUDGET_RESUME = 0.50  # ... and below which they are taken again


class TokenBucket:
    """New streams per second: beyond the burst, callers wait (queued, never refused)."""

    def __init__(self, rate, burst):
        self.rate, self.burst = float(rate), float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self):
        while True:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= 1:
                self.tokens -= 1
                return
            gevent.sleep((1 - self.tokens) / self.rate)


class MemoryBudget:
    """Buffered tunnel bytes past 75% of memory_budget refuse new streams, until they fall
    below 50% (hysteresis, so the refusals do not flap)."""

    def __init__(self):
        self.over = False

    def exceeded(self, buffered, budget):
        if self.over:
            self.over = buffered > budget * BUDGET_RESUME
        else:
            self.over = buffered > budget * BUDGET_REFUSE
            if self.over:
                log.warning("memory budget: %d bytes buffered (budget %d); refusing new "
                            "streams until it falls below half", buffered, budget)
        return self.over
