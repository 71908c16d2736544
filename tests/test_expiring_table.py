"""ExpiringTable: last-use order, TTL expiry on an injected clock, and the two capacity rules."""

from __future__ import annotations

from kvflow.expiring_table import ExpiringTable, WhenFull


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def table(capacity: int = 10, when_full: WhenFull = WhenFull.DROP_OLDEST, ttl: float = 5.0):
    clock = FakeClock()
    return ExpiringTable(capacity, when_full, ttl=ttl, clock=clock), clock


def test_entries_past_the_ttl_expire_oldest_first_and_not_at_the_ttl_itself():
    t, clock = table()
    t.put("a", 1)
    clock.now = 1.0
    t.put("b", 2)
    clock.now = 5.0  # a is exactly at the TTL: kept
    assert t.expire() == [] and len(t) == 2
    clock.now = 5.5
    assert t.expire() == [("a", 1)]
    assert "a" not in t and "b" in t
    clock.now = 100.0
    assert t.expire() == [("b", 2)] and len(t) == 0
    assert t.expire() == []


def test_a_touch_moves_an_entry_to_the_back_and_restarts_its_ttl():
    t, clock = table()
    t.put("a", 1)
    t.put("b", 2)
    t.put("c", 3)
    clock.now = 4.0
    t.touch("a")
    assert list(t.values()) == [2, 3, 1] and t.oldest() == "b"
    clock.now = 6.0  # b and c are past the TTL, a was used at 4
    assert t.expire() == [("b", 2), ("c", 3)]
    assert list(t.values()) == [1]


def test_put_replaces_the_value_and_counts_as_a_use():
    t, _ = table()
    t.put("a", 1)
    t.put("b", 2)
    t.put("a", 10)
    assert t.get("a") == 10 and list(t.values()) == [2, 10]


def test_get_is_not_a_use():
    t, clock = table()
    t.put("a", 1)
    t.put("b", 2)
    assert t.get("a") == 1 and t.get("missing") is None
    assert t.oldest() == "a"
    clock.now = 6.0
    assert [key for key, _ in t.expire()] == ["a", "b"]


def test_drop_oldest_cap_drops_the_least_recently_used_down_to_the_capacity():
    t, _ = table(capacity=2, ttl=float("inf"))
    for key in "abc":
        t.put(key, key)
    t.touch("a")
    t.put("d", "d")  # order b c a d: two over the capacity
    assert len(t) == 4 and t.full
    assert t.expire() == [("b", "b"), ("c", "c")]
    assert list(t.values()) == ["a", "d"] and t.expire() == []


def test_refuse_cap_never_drops_for_the_capacity_but_reports_full():
    t, clock = table(capacity=2, when_full=WhenFull.REFUSE)
    t.put("a", 1)
    assert not t.full
    t.put("b", 2)
    assert t.full
    t.put("c", 3)  # the caller is expected to refuse; the table keeps everything it was given
    assert t.expire() == [] and len(t) == 3
    clock.now = 6.0
    assert t.expire() == [("a", 1), ("b", 2), ("c", 3)] and not t.full


def test_due_looks_at_the_oldest_entry_at_the_given_time():
    t, _ = table(capacity=1)
    assert not t.due(0.0)
    t.put("a", 1)
    assert not t.due(5.0) and t.due(5.1)
    t.put("b", 2)
    assert t.due(0.0)  # over the capacity, whatever the time


def test_page_walks_least_recently_used_first():
    t, _ = table()
    for i, key in enumerate("abcde"):
        t.put(key, i)
    t.touch("b")
    assert t.page(0, 2) == [0, 2]
    assert t.page(2, 2) == [3, 4]
    assert t.page(4, 10) == [1]
    assert t.page(5, 10) == []


def test_pop_forgets_one_entry_and_its_last_use():
    t, clock = table()
    t.put("a", 1)
    t.put("b", 2)
    assert t.pop("a") == 1 and t.pop("a") is None
    assert "a" not in t and len(t) == 1
    t.put("a", 3)  # back, with a fresh last use
    clock.now = 5.5
    t.touch("a")
    assert t.expire() == [("b", 2)] and t.get("a") == 3
