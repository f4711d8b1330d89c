"""Who may start a handshake: global and per-source caps, and the penalty box.

Decisions are O(1) and made in the accept loop before any crypto, like OpenSSH's
MaxStartups and PerSourcePenalties. Penalties are short and capped, and a successful
authenticated handshake clears its source, so agents behind one NAT address still get in
after a misbehaving neighbour. No I/O here.
"""

import random
import time

PENALTY_JUNK = 1.0  # seconds: bad magic, failed act one/three, junk
PENALTY_TIMEOUT = 2.0  # seconds: handshake not finished in time
PENALTY_AUTHFAIL = 5.0  # seconds: authenticated key without a grant, or an invalid name
PENALTY_TABLE_MAX = 65536  # sources remembered; the oldest entries go first
REFUSAL_KINDS = {  # admit()'s answer -> the kind counted in Admission.refused (a metric label)
    "penalised": "penalised",
    "too many handshakes": "max_startups",
    "random early drop": "early_drop",
    "offended recently": "recent_offender",
    "too many handshakes from this source": "per_source",
}


def source_of(address):
    """The penalised unit: the IPv4 address, or the /64 of an IPv6 address."""
    host = address[0]
    if ":" in host:
        return ":".join(host.split(":")[:4]) + "::/64"
    return host


class Admission:
    def __init__(self, max_startups=(16, 30, 64), per_source=8, penalty_max=30.0,
                 clock=time.monotonic, rng=random.random):
        self.start, self.rate, self.full = max_startups
        self.per_source = per_source
        self.penalty_max = penalty_max
        self.pending = 0
        self.clean_pending = 0  # of those, from sources with no recent offence
        self.refused = {}  # kind (REFUSAL_KINDS) -> connections refused
        self.penalties = 0  # penalties given (repeat offences included)
        self._pending_by_source = {}
        self._clean_by_source = {}
        self._penalties = {}  # source -> (until, current penalty seconds)
        self._clock = clock
        self._rng = rng

    def admit(self, source):
        """None when a handshake may start (call release() after), else why not."""
        refusal = self._refusal(source)
        if refusal is not None:
            kind = REFUSAL_KINDS[refusal]
            self.refused[kind] = self.refused.get(kind, 0) + 1
        return refusal

    def _refusal(self, source):
        if self.penalised(source):
            return "penalised"
        if self.pending >= self.full:
            return "too many handshakes"
        offender = source in self._penalties  # its record outlives the penalty twice over
        if self.pending >= self.start:
            # Under pressure a source that offended lately gets no slot beyond `start`, and
            # the random early drop is played among clean sources only, on their own count:
            # a flood's sources all earn a record within seconds, a legitimate agent has
            # none, so it finds the slots from `start` to `full` open instead of losing a
            # lottery against the flood. A flood of fresh sources meets the early drop.
            if offender:
                return "offended recently"
            if self.clean_pending >= self.start and self._early_drop(self.clean_pending):
                return "random early drop"
        if self._pending_by_source.get(source, 0) >= self.per_source:
            return "too many handshakes from this source"
        self.pending += 1
        self._pending_by_source[source] = self._pending_by_source.get(source, 0) + 1
        if not offender:
            self.clean_pending += 1
            self._clean_by_source[source] = self._clean_by_source.get(source, 0) + 1
        return None

    def release(self, source):
        self.pending -= 1
        _decrement(self._pending_by_source, source)
        if self._clean_by_source.get(source):
            self.clean_pending -= 1
            _decrement(self._clean_by_source, source)

    def _early_drop(self, pending):
        """Drop with a probability rising from rate% at start to 100% at full."""
        span = max(1, self.full - self.start)
        chance = self.rate + (100 - self.rate) * (pending - self.start) / span
        return self._rng() * 100 < chance

    def penalise(self, source, seconds):
        """Repeat offences double the penalty, never beyond penalty_max. ``seconds`` 0 is no
        offence: it neither penalises nor doubles a penalty already running."""
        if self.penalty_max <= 0 or seconds <= 0:
            return
        now = self._clock()
        until, last = self._penalties.get(source, (0.0, 0.0))
        recent = now < until + 2 * last  # offending again soon after the last penalty ended
        penalty = min(self.penalty_max, max(seconds, last * 2) if recent else seconds)
        if len(self._penalties) >= PENALTY_TABLE_MAX and source not in self._penalties:
            self._penalties.pop(next(iter(self._penalties)))
        self._penalties[source] = (now + penalty, penalty)
        if penalty > 0:
            self.penalties += 1

    def penalised(self, source):
        entry = self._penalties.get(source)
        if entry is None:
            return False
        until, penalty = entry
        now = self._clock()
        if now >= until + 2 * penalty:  # forgotten: the next offence starts from scratch
            del self._penalties[source]
        return now < until

    def clear(self, source):
        self._penalties.pop(source, None)

    @property
    def penalty_table_size(self):
        return len(self._penalties)


def _decrement(counts, source):
    left = counts[source] - 1
    if left:
        counts[source] = left
    else:
        del counts[source]
