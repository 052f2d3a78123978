"""LoginThrottle and LoginAudit on a fake clock: free failures, the doubling lock-out, logins
in flight, what a success clears; failed logins aggregated per key and window."""

from __future__ import annotations

from twin.api.throttle import LoginAudit, LoginThrottle


def test_lock_out_doubles_after_the_free_failures() -> None:
    now = [0.0]
    t = LoginThrottle(free_per_user=2, free_per_address=100, base=1.0, cap=5.0,
                      clock=lambda: now[0])
    for _ in range(2):
        assert t.begin("u", "a") == 0.0
        t.end("u", "a", ok=False)
    assert t.begin("u", "a") == 1.0  # locked 1 s after the 2nd failure
    now[0] += 1.0
    assert t.begin("u", "a") == 0.0
    t.end("u", "a", ok=False)
    assert t.begin("u", "a") == 2.0  # then 2 s
    assert t.begin("other", "a") == 0.0  # another user is not locked
    t.end("other", "a", ok=True)
    for _ in range(5):  # ... and the lock never exceeds the cap
        now[0] += 10.0
        assert t.begin("u", "a") == 0.0
        t.end("u", "a", ok=False)
    assert t.begin("u", "a") == 5.0


def test_success_clears_the_user_not_the_address() -> None:
    now = [0.0]
    t = LoginThrottle(free_per_user=2, free_per_address=3, clock=lambda: now[0])
    for _ in range(2):
        t.begin("u", "a")
        t.end("u", "a", ok=False)
    now[0] += 1.0
    assert t.begin("u", "a") == 0.0
    t.end("u", "a", ok=True)
    assert t.begin("u", "a") == 0.0  # the user starts over ...
    t.end("u", "a", ok=False)
    assert t.begin("v", "a") > 0  # ... but the address has had its 3 failures


def test_logins_in_flight_count() -> None:
    t = LoginThrottle(free_per_user=5, free_per_address=5, max_inflight=2, max_pending=3)
    assert t.begin("u", "a") == 0.0 and t.begin("v", "a") == 0.0
    assert t.begin("w", "a") == 1.0  # two from this address are being verified already
    assert t.begin("x", "b") == 0.0
    assert t.begin("y", "c") == 1.0  # three in flight overall
    t.end("u", "a", ok=False)
    assert t.begin("y", "c") == 0.0


def test_failed_logins_aggregate_per_key_and_window() -> None:
    now = [100.0]
    audit = LoginAudit(window=60.0, clock=lambda: now[0])
    for _ in range(3):
        audit.failed("alice", "10.0.0.1", 401)
    for i in range(30):
        audit.failed(f"name{i}", "10.0.0.1", 429)
    now[0] += 30.0
    audit.failed("alice", "10.0.0.2", 401)
    assert audit.due() == []  # no window has closed
    now[0] += 30.0
    rows = {(u, a): d for u, a, d in audit.due()}
    assert set(rows) == {("alice", "10.0.0.1"), ("*", "10.0.0.1")}
    assert rows[("alice", "10.0.0.1")]["by_status"] == {"401": 3}
    star = rows[("*", "10.0.0.1")]
    assert star["failures"] == 30 and len(star["users"]) == 20
    assert star["other_users_attempts"] == 10
    assert [(u, a) for u, a, _ in audit.due(all=True)] == [("alice", "10.0.0.2")]
