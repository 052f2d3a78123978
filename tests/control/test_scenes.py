"""Scenes: condition evaluation against a reference evaluator, `for:` semantics, run modes,
cron across DST, loops, traces, continue_on_error — on a virtual clock."""

from __future__ import annotations

import datetime as dt
import zoneinfo
from collections.abc import Mapping
from typing import Any

import pytest
import trio
import trio.testing
from croniter import croniter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twin.control.conditions import build_condition
from twin.control.cron import next_fire
from twin.control.ledger import Catalog
from twin.control.scenes import SceneEngine
from twin.control.simulate import RecordingEffects, SimulationReport, load_scenario, simulate

from .helpers import docs

BASE = 1_717_408_800.0  # 2024-06-03 10:00:00 UTC, a Monday


def scene(name: str, triggers: list[Any], actions: list[Any], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "flux.iot/v1",
        "kind": "Scene",
        "metadata": {"name": name, "site": "plant-a"},
        "spec": {"triggers": triggers, "actions": actions, **spec},
    }


def specs_with(*scenes: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    out = docs()
    for s in scenes:
        out[("Scene", s["metadata"]["name"])] = s
    return out


class Harness:
    def __init__(self, specs: Mapping[tuple[str, str], Any], effects: Any = None) -> None:
        self.catalog = Catalog(specs)
        self.report = SimulationReport()
        self.t0 = trio.current_time()
        holder: list[SceneEngine] = []
        self.effects = effects or RecordingEffects(self.catalog, holder, self.report, self.wall)
        self.engine = SceneEngine(
            self.effects, timezone=lambda s: self.catalog.timezone(site=s), wall=self.wall
        )
        holder.append(self.engine)
        self.engine.load(specs)

    def wall(self) -> float:
        return BASE + trio.current_time() - self.t0

    def reading(self, device: str, point: str, value: Any) -> None:
        self.engine.feed({"kind": "reading", "device": device, "point": point, "value": value})

    def traces(self, name: str | None = None) -> list[dict[str, Any]]:
        return [t for t in self.engine.traces if name is None or t["scene"] == name]


# -- conditions vs a reference evaluator ------------------------------------------------------
POINTS = [("fan_01", "speed"), ("fan_01", "power"), ("temp_01", "temperature")]

leaf = st.one_of(
    st.builds(
        lambda p, lo, hi: {
            "type": "numeric",
            "device": p[0],
            "point": p[1],
            "above": lo,
            "below": hi,
        },
        st.sampled_from(POINTS),
        st.integers(-5, 5),
        st.integers(-5, 5),
    ),
    st.builds(
        lambda p, op, v: {
            "type": "numeric",
            "device": p[0],
            "point": p[1],
            "operator": op,
            "value": v,
        },
        st.sampled_from(POINTS),
        st.sampled_from([">", ">=", "<", "<=", "==", "!="]),
        st.integers(-5, 5),
    ),
    st.builds(
        lambda p, v: {"type": "state", "device": p[0], "point": p[1], "value": v},
        st.sampled_from(POINTS),
        st.one_of(st.integers(-5, 5), st.booleans()),
    ),
    st.builds(
        lambda s: {"type": "state", "device": "fan_01", "status": s},
        st.sampled_from(["online", "offline"]),
    ),
    st.builds(
        lambda a, b: {"type": "time", "after": f"{a:02d}:00", "before": f"{b:02d}:00"},
        st.integers(0, 23),
        st.integers(0, 23),
    ),
    st.builds(
        lambda d: {"type": "weekday", "days": d},
        st.lists(
            st.sampled_from(["mon", "tue", "wed", "thu", "fri", "sat", "sun"]),
            min_size=1,
            unique=True,
        ),
    ),
)
tree = st.recursive(
    leaf,
    lambda kids: st.builds(
        lambda t, cs: {"type": t, "conditions": cs},
        st.sampled_from(["and", "or", "not"]),
        st.lists(kids, min_size=1, max_size=3),
    ),
    max_leaves=8,
)


def reference(
    c: dict[str, Any], values: dict[tuple[str, str], Any], status: str | None, now: dt.datetime
) -> bool:
    t = c["type"]
    if t in ("and", "or", "not"):
        rs = [reference(x, values, status, now) for x in c["conditions"]]
        return all(rs) if t == "and" else any(rs) if t == "or" else not any(rs)
    if t == "numeric":
        v = values.get((c["device"], c["point"]))
        if isinstance(v, bool) or not isinstance(v, int | float):
            return False
        ok = True
        if "above" in c:
            ok = ok and v > c["above"]
        if "below" in c:
            ok = ok and v < c["below"]
        if "operator" in c:
            ok = ok and eval(f"{v!r} {c['operator']} {c['value']!r}")
        return ok
    if t == "state":
        if "status" in c:
            return status == c["status"]
        v = values.get((c["device"], c["point"]))
        return type(v) is type(c["value"]) and v == c["value"]
    if t == "time":
        a, b = int(c["after"][:2]), int(c["before"][:2])
        h = now.hour
        return (a <= h < b) if a <= b else (h >= a or h < b)
    if t == "weekday":
        return ["mon", "tue", "wed", "thu", "fri", "sat", "sun"][now.weekday()] in c["days"]
    raise AssertionError(t)


class View:
    def __init__(self, values: dict[tuple[str, str], Any], status: str | None, now: dt.datetime):
        self.values, self._status, self.now = values, status, now

    def value(self, device: str, point: str) -> Any:
        return self.values.get((device, point))

    def status(self, device: str) -> str | None:
        return self._status

    def local_now(self) -> dt.datetime:
        return self.now


@settings(max_examples=300, deadline=None)
@given(
    cond=tree,
    values=st.dictionaries(
        st.sampled_from(POINTS), st.one_of(st.integers(-6, 6), st.booleans(), st.none())
    ),
    status=st.sampled_from([None, "online", "offline"]),
    minute=st.integers(0, 7 * 24 * 60 - 1),
)
def test_conditions_match_reference(
    cond: dict[str, Any], values: dict[Any, Any], status: str | None, minute: int
) -> None:
    now = dt.datetime(2024, 6, 3, tzinfo=zoneinfo.ZoneInfo("Europe/Berlin")) + dt.timedelta(
        minutes=minute
    )
    built = build_condition(cond)
    out: list[Any] = []
    assert built.check(View(values, status, now), out, "c") == reference(cond, values, status, now)
    assert out[-1].path == "c"  # the root is recorded last, every node is recorded


# -- for: semantics --------------------------------------------------------------------------
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    readings=st.lists(st.tuples(st.integers(1, 4), st.integers(25, 35)), min_size=1, max_size=25),
    hold=st.sampled_from([0, 2.5, 5.5]),
)
def test_for_semantics(readings: list[tuple[int, int]], hold: float) -> None:
    """Fires when temperature > 30 has held `hold` seconds with no reading breaking it; once
    per episode. Reference: scan the readings."""
    # reference
    t, since, fired_in_episode, expected = 0.0, None, False, []
    times = []
    for gap, v in readings:
        t += gap
        times.append((t, v))
    for i, (t, v) in enumerate(times):
        if v > 30:
            if since is None:
                since, fired_in_episode = t, False
                if hold == 0:
                    expected.append(t)
                    fired_in_episode = True
        else:
            since = None
        nxt = times[i + 1][0] if i + 1 < len(times) else float("inf")
        if since is not None and not fired_in_episode and hold and since + hold < nxt:
            expected.append(since + hold)
            fired_in_episode = True

    async def main() -> list[float]:
        h = Harness(
            specs_with(
                scene(
                    "hot",
                    [
                        {
                            "type": "device_data",
                            "device": "temp_01",
                            "point": "temperature",
                            "operator": ">",
                            "value": 30,
                            "for": hold,
                        }
                    ],
                    [{"type": "stop", "reason": "noop"}],
                    mode="parallel",
                    max=100,
                )
            )
        )
        async with trio.open_nursery() as n:
            await n.start(h.engine.run)
            last = 0.0
            for t, v in times:
                await trio.sleep(t - last)
                last = t
                h.reading("temp_01", "temperature", v)
            await trio.sleep(hold + 1)
            n.cancel_scope.cancel()
        return [round(tr["started_at"] - BASE, 6) for tr in h.traces("hot")]

    got = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert got == expected


# -- run modes -----------------------------------------------------------------------------
def mode_reference(mode: str, mx: int, starts: list[int], d: float) -> tuple[int, int, int]:
    """(runs completed, runs cancelled, triggers dropped) for runs that last `d` seconds."""
    done = cancelled = dropped = 0
    if mode == "single":
        busy_until = -1.0
        for s in starts:
            if s < busy_until:
                dropped += 1
            else:
                busy_until = s + d
                done += 1
    elif mode == "restart":
        for i, s in enumerate(starts):
            nxt = starts[i + 1] if i + 1 < len(starts) else float("inf")
            if s + d <= nxt:
                done += 1
            else:
                cancelled += 1
    elif mode == "parallel":
        ends: list[float] = []
        for s in starts:
            ends = [e for e in ends if e > s]
            if len(ends) >= mx:
                dropped += 1
            else:
                ends.append(s + d)
                done += 1
    elif mode == "queued":
        free_at = 0.0
        queue_ends: list[float] = []  # start times of queued (not yet started) runs
        for s in starts:
            waiting = [q for q in queue_ends if q > s]  # runs that have not started yet at s
            running = free_at > s
            if running and len(waiting) >= mx:
                dropped += 1
                continue
            start = max(s, free_at)
            free_at = start + d
            queue_ends.append(start)
            done += 1
    return done, cancelled, dropped


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mode=st.sampled_from(["single", "restart", "queued", "parallel"]),
    mx=st.integers(1, 3),
    gaps=st.lists(st.integers(0, 4), min_size=1, max_size=12),
    d=st.sampled_from([0.45, 2.45, 6.45]),  # run ends never coincide with triggers
)
def test_run_modes(mode: str, mx: int, gaps: list[int], d: float) -> None:
    starts, t = [], 0
    for g in gaps:
        t += g
        starts.append(t)

    async def main() -> tuple[int, int, int]:
        h = Harness(
            specs_with(
                scene(
                    "s", [{"type": "manual"}], [{"type": "delay", "duration": d}], mode=mode, max=mx
                )
            )
        )
        dropped = 0

        def on(ev: dict[str, Any]) -> None:
            nonlocal dropped
            dropped += ev["event"] == "dropped"

        h.engine.listeners.append(on)
        async with trio.open_nursery() as n:
            await n.start(h.engine.run)
            last = 0
            for s in starts:
                await trio.sleep(s - last)
                last = s
                await h.engine.execute("s")
            await trio.sleep(d * (len(starts) + 2))
            n.cancel_scope.cancel()
        statuses = [tr["status"] for tr in h.traces("s")]
        return statuses.count("success"), statuses.count("cancelled"), dropped

    got = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert got == mode_reference(mode, mx, starts, d)


# -- cron across DST ---------------------------------------------------------------------------
def cron_reference(expr: str, start: float, end: float, tz: str) -> list[float]:
    """Enumerate every local wall-clock minute in the window."""
    zone = zoneinfo.ZoneInfo(tz)
    both = expr.split()[1] == "*"
    out: set[float] = set()
    naive = dt.datetime.fromtimestamp(start, zone).replace(tzinfo=None, second=0) - dt.timedelta(
        hours=1
    )
    stop = dt.datetime.fromtimestamp(end, zone).replace(tzinfo=None) + dt.timedelta(hours=1)
    while naive <= stop:
        if croniter.match(expr, naive):
            a0 = naive.replace(tzinfo=zone, fold=0)
            a1 = naive.replace(tzinfo=zone, fold=1)
            exists = a0.astimezone(dt.UTC).astimezone(zone).replace(tzinfo=None) == naive
            out.add(a0.timestamp())
            if exists and both and a1.utcoffset() != a0.utcoffset():
                out.add(a1.timestamp())
        naive += dt.timedelta(minutes=1)
    return sorted(x for x in out if start < x <= end)


DST_DAYS = {
    "Europe/Berlin": [(2024, 3, 31), (2024, 10, 27)],
    "America/New_York": [(2024, 3, 10), (2024, 11, 3)],
    "Australia/Lord_Howe": [(2024, 4, 7), (2024, 10, 6)],  # a 30-minute shift
}


@settings(max_examples=20, deadline=None)
@given(
    tz=st.sampled_from(sorted(DST_DAYS)),
    which=st.integers(0, 1),
    minute=st.sampled_from(["0", "30", "*/15", "5,45", "*"]),
    hour=st.sampled_from(["*", "1", "2", "3", "1-3", "*/2"]),
)
def test_cron_next_fire_across_dst(tz: str, which: int, minute: str, hour: str) -> None:
    if minute == "*" and hour == "*":
        minute = "*/7"
    expr = f"{minute} {hour} * * *"
    y, m, d = DST_DAYS[tz][which]
    zone = zoneinfo.ZoneInfo(tz)
    start = (dt.datetime(y, m, d, 22, tzinfo=zone) - dt.timedelta(days=1)).timestamp()
    end = start + 6 * 3600
    got, t = [], start
    while True:
        t = next_fire(expr, t, tz)
        if t > end:
            break
        got.append(t)
    assert got == cron_reference(expr, start, end, tz)
    assert got == sorted(set(got))


def test_daily_cron_fires_once_per_local_day_through_dst() -> None:
    for tz, days in DST_DAYS.items():
        zone = zoneinfo.ZoneInfo(tz)
        for y, m, d in days:
            start = (dt.datetime(y, m, d, tzinfo=zone) - dt.timedelta(days=3)).timestamp()
            fires, t = [], start
            for _ in range(6):
                t = next_fire("30 2 * * *", t, tz)
                fires.append(dt.datetime.fromtimestamp(t, zone))
            assert len({f.date() for f in fires}) == 6, (tz, fires)


# -- loops, traces, errors ---------------------------------------------------------------
class EchoEffects(RecordingEffects):
    """A device that reports whatever it is set to (drives data-trigger loops)."""

    async def set_desired(
        self, device: str, prop: str, value: Any, *, source: str
    ) -> dict[str, Any]:
        out = await super().set_desired(device, prop, value, source=source)
        self.engine_ref[0].feed(
            {"kind": "reading", "device": device, "point": prop, "value": value}
        )
        return out


async def test_trigger_loop_through_devices_is_stopped(autojump_clock: trio.abc.Clock) -> None:
    a = scene(
        "a",
        [{"type": "device_data", "device": "fan_01", "point": "speed", "operator": "changed"}],
        [{"type": "set_desired", "device": "fan_02", "property": "speed", "value": 10}],
    )
    b = scene(
        "b",
        [{"type": "device_data", "device": "fan_02", "point": "speed", "operator": "changed"}],
        [{"type": "set_desired", "device": "fan_01", "property": "speed", "value": 20}],
    )
    specs = specs_with(a, b)
    catalog = Catalog(specs)
    report = SimulationReport()
    holder: list[SceneEngine] = []
    effects = EchoEffects(catalog, holder, report, trio.current_time)
    h = Harness(specs, effects)
    holder.append(h.engine)
    async with trio.open_nursery() as n:
        await n.start(h.engine.run)
        h.reading("fan_01", "speed", 1)
        h.reading("fan_02", "speed", 1)
        h.reading("fan_01", "speed", 5)  # a → fan_02 = 10 → b → fan_01 = 20 → a: loop
        await trio.sleep(1)
        n.cancel_scope.cancel()
    statuses = [(t["scene"], t["status"]) for t in h.traces()]
    assert sorted(statuses) == [("a", "loop"), ("a", "success"), ("b", "success")]
    assert (
        next(t for t in h.traces() if t["status"] == "loop")["error"] == "trigger loop: a → b → a"
    )


async def test_run_scene_loop_and_continue_on_error(autojump_clock: trio.abc.Clock) -> None:
    s1 = scene(
        "s1",
        [{"type": "manual"}],
        [
            {
                "type": "command",
                "device": "fan_01",
                "command": "explode",
                "continue_on_error": True,
            },
            {"type": "scene", "scene": "s2", "wait": True},
        ],
    )
    s2 = scene("s2", [{"type": "manual"}], [{"type": "scene", "scene": "s1"}])
    h = Harness(specs_with(s1, s2))
    async with trio.open_nursery() as n:
        await n.start(h.engine.run)
        await h.engine.execute("s1", wait=True)
        await trio.sleep(1)
        n.cancel_scope.cancel()
    t1 = h.traces("s1")[0]
    assert t1["steps"][0]["outcome"] == "error" and t1["steps"][0]["continued"]
    assert "no command 'explode'" in t1["steps"][0]["error"]
    t2 = h.traces("s2")[0]
    assert t2["status"] == "failed" and "loop: s1 → s2 → s1" in t2["error"]
    assert t2["chain"] == ["s1"]


async def test_actions_if_choose_parallel_repeat_wait_for(autojump_clock: trio.abc.Clock) -> None:
    s = scene(
        "flow",
        [{"type": "manual"}],
        [
            {
                "type": "if",
                "conditions": [
                    {"type": "numeric", "device": "temp_01", "point": "temperature", "above": 30}
                ],
                "then": [
                    {
                        "type": "command",
                        "device": "fan_01",
                        "command": "set_state",
                        "params": {"state": True},
                    }
                ],
                "else": [
                    {
                        "type": "command",
                        "device": "fan_01",
                        "command": "set_state",
                        "params": {"state": False},
                    }
                ],
            },
            {
                "type": "choose",
                "options": [
                    {
                        "conditions": [
                            {"type": "state", "device": "fan_01", "point": "power", "value": True}
                        ],
                        "actions": [
                            {
                                "type": "set_desired",
                                "device": "fan_01",
                                "property": "speed",
                                "value": 90,
                            }
                        ],
                    }
                ],
                "default": [
                    {"type": "set_desired", "device": "fan_01", "property": "speed", "value": 10}
                ],
            },
            {
                "type": "parallel",
                "actions": [
                    {
                        "type": "sequence",
                        "actions": [
                            {"type": "delay", "duration": "2s"},
                            {"type": "command", "device": "fan_02", "command": "reboot"},
                        ],
                    },
                    {"type": "command", "device": "fan_03", "command": "reboot"},
                ],
            },
            {
                "type": "repeat",
                "count": 2,
                "actions": [{"type": "command", "device": "fan_01", "command": "reboot"}],
            },
            {
                "type": "wait_for",
                "conditions": [
                    {"type": "numeric", "device": "temp_01", "point": "temperature", "below": 20}
                ],
                "timeout": "1m",
            },
            {"type": "alarm", "action": "raise", "device": "fan_01", "alarm": "cold"},
            {
                "type": "wait_for",
                "conditions": [
                    {"type": "numeric", "device": "temp_01", "point": "temperature", "below": 0}
                ],
                "timeout": "5s",
            },
        ],
    )
    h = Harness(specs_with(s))
    async with trio.open_nursery() as n:
        await n.start(h.engine.run)
        h.reading("temp_01", "temperature", 35)
        h.reading("fan_01", "power", True)
        run_id = await h.engine.execute("flow")
        await trio.sleep(10)
        h.reading("temp_01", "temperature", 15)
        await trio.sleep(60)
        n.cancel_scope.cancel()
    t = h.traces("flow")[0]
    assert t["run_id"] == run_id
    assert t["status"] == "failed" and "wait_for" in t["error"]
    sent = [(w.device, w.target, w.value) for w in h.report.writes]
    assert sent == [
        ("fan_01", "command:set_state", {"state": True}),
        ("fan_01", "speed", 90),
        ("fan_03", "command:reboot", {}),
        ("fan_02", "command:reboot", {}),
        ("fan_01", "command:reboot", {}),
        ("fan_01", "command:reboot", {}),
    ]
    paths = [s["path"] for s in t["steps"]]
    assert "actions/2/actions/0/actions/0" in paths  # the delay inside the sequence
    waited = next(s for s in t["steps"] if s["path"] == "actions/4")
    assert waited["outcome"] == "ok" and waited["duration"] == pytest.approx(8, abs=0.01)


def test_schedule_in_site_timezone_and_status_alarm_triggers(tmp_path: Any) -> None:
    s_cron = scene(
        "morning",
        [{"type": "schedule", "cron": "30 6 * * *"}],
        [{"type": "command", "device": "fan_01", "command": "reboot"}],
    )
    s_status = scene(
        "down",
        [{"type": "status", "device": "fan_02", "to": "offline", "for": "1m"}],
        [{"type": "alarm", "action": "raise", "device": "fan_02", "alarm": "down"}],
    )
    s_alarm = scene(
        "on-alarm",
        [{"type": "alarm", "event": "raised", "alarm": "down"}],
        [{"type": "command", "device": "fan_03", "command": "reboot"}],
    )
    path = tmp_path / "s.yaml"
    path.write_text(
        "start: '2024-06-03T05:00:00+02:00'\nduration: 3h\nevents:\n"
        "  - {at: 0, device: fan_02, status: offline}\n"
        "  - {at: 30s, device: fan_02, status: online}\n"
        "  - {at: 1m, device: fan_02, status: offline}\n"
    )
    report = simulate(specs_with(s_cron, s_status, s_alarm), load_scenario(path))
    fired = [(line.split(" fired")[0].strip(), at) for at, line in report.lines if "▶" in line]
    zone = zoneinfo.ZoneInfo("Europe/Berlin")
    local = [(name, dt.datetime.fromtimestamp(at, zone).strftime("%H:%M:%S")) for name, at in fired]
    assert local == [("▶ down", "05:02:00"), ("▶ on-alarm", "05:02:00"), ("▶ morning", "06:30:00")]


def test_demo_site_simulation(tmp_path: Any) -> None:
    from twin.spec import load_site

    loaded = load_site("sites/demo")
    report = simulate(loaded.specs, load_scenario("sites/demo/scenarios/hot-afternoon.csv"))
    assert report.fired["fan-on-when-hot"] == 2
    assert report.fired["fan-off-when-cool"] == 1
    assert any("conflict on fan_01 speed" in c for c in report.conflicts)
    assert ("fan_01", "command:set_state", {"state": True}) in [
        (w.device, w.target, w.value) for w in report.writes
    ]
