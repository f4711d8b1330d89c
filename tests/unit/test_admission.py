"""diglett.admission alone (it is sans-IO): caps, early drop, penalties, recent offenders."""

import pytest

from diglett import admission


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def make(rng=lambda: 0.99, **options):
    clock = Clock()
    options.setdefault("max_startups", (2, 30, 4))
    return admission.Admission(clock=clock, rng=rng, **options), clock


def test_below_start_everyone_gets_a_slot_and_release_gives_it_back():
    gate, _ = make()
    assert gate.admit("10.0.0.1") is None
    assert gate.admit("10.0.0.2") is None
    assert gate.pending == 2
    gate.release("10.0.0.1")
    gate.release("10.0.0.2")
    assert gate.pending == 0


def test_early_drop_between_start_and_full_and_a_hard_cap_at_full():
    gate, _ = make(rng=lambda: 0.0)  # the die always says drop
    gate.admit("a")
    gate.admit("b")
    assert gate.admit("c") == "random early drop"
    lucky, _ = make(rng=lambda: 0.99)
    for source in "abcd":
        assert lucky.admit(source) is None
    assert lucky.admit("e") == "too many handshakes"
    assert lucky.refused == {"max_startups": 1}


def test_a_penalised_source_is_refused_until_the_penalty_ends():
    gate, clock = make()
    gate.penalise("bad", 2.0)
    assert gate.admit("bad") == "penalised"
    clock.now += 2.1
    assert gate.admit("bad") is None


def test_repeat_offences_double_the_penalty_up_to_the_cap():
    gate, clock = make(penalty_max=5.0)
    for expected in (1.0, 2.0, 4.0, 5.0):
        gate.penalise("bad", 1.0)
        assert gate.penalised("bad")
        clock.now += expected - 0.01
        assert gate.penalised("bad")
        clock.now += 0.02
        assert not gate.penalised("bad")


def test_above_start_a_recent_offender_is_refused_and_a_clean_source_is_not():
    gate, clock = make()
    gate.penalise("flood", 1.0)
    clock.now += 1.5  # the penalty is over, the record is not (it lasts twice as long again)
    gate.admit("x")
    gate.admit("y")  # now at start
    assert gate.admit("flood") == "offended recently"
    assert gate.admit("honest") is None
    assert gate.refused == {"recent_offender": 1}


def test_below_start_a_recent_offender_still_gets_a_slot():
    gate, clock = make()
    gate.penalise("flood", 1.0)
    clock.now += 1.5
    assert gate.admit("flood") is None


def test_the_record_is_forgotten_and_a_good_handshake_clears_it():
    gate, clock = make()
    gate.penalise("old", 1.0)
    gate.penalise("nat", 1.0)
    gate.admit("x")
    gate.admit("y")
    clock.now += 3.1  # 1 s penalty + 2 s of memory
    assert gate.admit("old") is None
    gate.release("old")
    clock.now -= 1.0
    gate.clear("nat")  # an agent behind the same address authenticated
    assert gate.admit("nat") is None


def test_per_source_cap():
    gate, _ = make(max_startups=(10, 30, 20), per_source=2)
    assert gate.admit("one") is None
    assert gate.admit("one") is None
    assert gate.admit("one") == "too many handshakes from this source"
    assert gate.admit("two") is None


@pytest.mark.parametrize("address, unit", [
    (("192.0.2.7", 1234), "192.0.2.7"),
    (("2001:db8:1:2:3:4:5:6", 1234, 0, 0), "2001:db8:1:2::/64"),
])
def test_the_penalised_unit_is_the_address_or_its_64(address, unit):
    assert admission.source_of(address) == unit


def test_a_zero_penalty_is_no_offence_and_doubles_nothing():
    gate, clock = make(penalty_max=30.0)
    gate.penalise("src", 2.0)
    gate.penalise("src", 0)  # e.g. a network error, or a handshake we were too slow for
    clock.now += 2.01
    assert not gate.penalised("src")
    fresh, _ = make()
    fresh.penalise("clean", 0)
    assert fresh.admit("clean") is None and fresh.penalties == 0


def test_the_early_drop_counts_clean_handshakes_only():
    gate, clock = make(rng=lambda: 0.0)  # the die always says drop
    for source in ("f1", "f2"):  # two flooding sources with a record, below START
        gate.penalise(source, 1.0)
    clock.now += 1.5  # penalties over, records kept
    assert gate.admit("f1") is None and gate.admit("f2") is None
    assert (gate.pending, gate.clean_pending) == (2, 0)
    assert gate.admit("f1") == "offended recently"  # at START: no more for offenders
    assert gate.admit("agent-1") is None  # clean handshakes are below START on their own count
    assert gate.admit("agent-2") is None
    assert gate.admit("agent-3") == "too many handshakes"  # FULL still holds
    gate.release("agent-1")
    gate.release("f1")
    assert (gate.pending, gate.clean_pending) == (2, 1)
