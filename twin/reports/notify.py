"""Alarm notifications: ``kind: NotificationRule``.

Why a kind of its own (not a field of alarms or scenes): alarms are raised by many sources
(the monitor's offline/fault, supervision, scenes, storage) and a rule is about *who is told*
— per site, per severity, per team — which changes on its own schedule and has owners of its
own. A rule::

    match:       {min_severity: major, types: [offline, fault], select: {group: line-1}}
    channels:    [{type: email, ...}, {type: webhook, ...}, {type: mqtt, topic: ...}, {type: folder, ...}]
    group:       30s            # alarms raised within 30 s go out as one message
    throttle:    {max: 10, window: 1h}   # more are counted and summarised in the next message
    quiet_hours: {from: "22:00", to: "06:00", timezone: Europe/Berlin, except: critical}
    escalate:    {after: 15m, channels: [...]}   # still active (not acknowledged) after 15 min
    resolved:    true           # tell the same channels when a notified alarm clears

Events come from the engine's bus (``kind: alarm``, ``event: raised | acknowledged |
cleared``), so every alarm source is covered. State (pending groups, throttle windows,
escalation timers) is in memory: after a restart, alarms still active are not notified again
(the engine's monitor does not re-raise them), and pending escalations are lost — documented.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import zoneinfo
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twin.registry.base import Key
from twin.reports.channels import ChannelContext, Message, RetryPolicy, deliver
from twin.spec.dashboards import device_matches
from twin.spec.units import parse_duration

log = logging.getLogger(__name__)

SEVERITIES = ("critical", "major", "minor", "warning", "info")
RANK = {s: i for i, s in enumerate(SEVERITIES)}  # 0 is the most severe


def at_least(severity: str, floor: str) -> bool:
    return RANK.get(severity, len(RANK)) <= RANK.get(floor, len(RANK))


def in_quiet_hours(quiet: Mapping[str, Any] | None, now: float, default_tz: str) -> bool:
    if not quiet:
        return False
    zone = zoneinfo.ZoneInfo(str(quiet.get("timezone") or default_tz))
    local = dt.datetime.fromtimestamp(now, zone).time()
    a = dt.time.fromisoformat(str(quiet["from"]))
    b = dt.time.fromisoformat(str(quiet["to"]))
    return a <= local < b if a <= b else (local >= a or local < b)


@dataclass
class Rule:
    name: str
    site: str | None
    spec: dict[str, Any]
    timezone: str
    group: float = 0.0
    pending: list[dict[str, Any]] = field(default_factory=list)
    pending_since: float | None = None
    sent: deque[float] = field(default_factory=deque)
    held: int = 0  # alarms throttled since the last message
    notified: dict[int, float] = field(default_factory=dict)  # alarm id -> escalation deadline
    escalated: set[int] = field(default_factory=set)

    @property
    def channels(self) -> list[dict[str, Any]]:
        return list(self.spec.get("channels") or [])

    def matches(self, alarm: Mapping[str, Any], event: Mapping[str, Any],
                specs: Mapping[Key, Mapping[str, Any]]) -> bool:
        if self.spec.get("enabled") is False:
            return False
        match = self.spec.get("match") or {}
        sev = str(alarm.get("severity"))
        if match.get("severity") and sev not in match["severity"]:
            return False
        if match.get("min_severity") and not at_least(sev, str(match["min_severity"])):
            return False
        if match.get("types") and str(alarm.get("type")) not in match["types"]:
            return False
        device = specs.get(("Device", str(alarm.get("device"))))
        site = (device or {}).get("metadata", {}).get("site") if device else event.get("site")
        if self.site and site != self.site:
            return False
        select = match.get("select")
        if select:
            if device is None:
                return False
            groups = {n: d for (k, n), d in specs.items() if k == "DeviceGroup"}
            return device_matches(device, select, groups)
        return True


def alarm_text(alarm: Mapping[str, Any], tz: str) -> str:
    when = dt.datetime.fromtimestamp(float(alarm.get("raised_at") or 0), zoneinfo.ZoneInfo(tz))
    return (f"[{str(alarm.get('severity')).upper()}] {alarm.get('device')}: {alarm.get('type')}"
            f" — {alarm.get('message')} (raised {when:%Y-%m-%d %H:%M:%S %Z})")


Send = Callable[[list[dict[str, Any]], Message, str], Awaitable[None]]


class Notifier:
    """Rules over the alarm events of one engine; ``spawn`` runs a delivery in the background
    (the service's nursery), so a slow channel never holds up the next event."""

    def __init__(
        self,
        ctx: ChannelContext,
        specs: Callable[[], Mapping[Key, Mapping[str, Any]]],
        spawn: Callable[[Callable[[], Awaitable[None]]], None],
        *,
        clock: Callable[[], float] = time.time,
        retry: RetryPolicy = RetryPolicy(3, 2.0),
    ) -> None:
        self.ctx = ctx
        self.specs = specs
        self.spawn = spawn
        self.clock = clock
        self.retry = retry
        self.rules: dict[str, Rule] = {}
        self._specs_id: int | None = None
        self.recent: deque[dict[str, Any]] = deque(maxlen=200)
        self.counts = {"sent": 0, "failed": 0, "suppressed": 0, "throttled": 0,
                       "escalated": 0, "resolved": 0}

    # -- rules -------------------------------------------------------------------------------
    def reload(self) -> None:
        specs = self.specs()
        if id(specs) == self._specs_id:
            return
        self._specs_id = id(specs)
        fresh: dict[str, Rule] = {}
        for (kind, name), doc in specs.items():
            if kind != "NotificationRule":
                continue
            site = (doc.get("metadata") or {}).get("site")
            site_doc = specs.get(("Site", str(site))) if site else None
            tz = str(((site_doc or {}).get("spec") or {}).get("timezone") or "UTC")
            spec = dict(doc.get("spec") or {})
            old = self.rules.get(name)
            rule = Rule(name, site, spec, tz, parse_duration(spec.get("group", 0)))
            if old is not None:  # keep the running state of a rule that was only edited
                rule.pending, rule.pending_since, rule.sent = old.pending, old.pending_since, old.sent
                rule.held, rule.notified, rule.escalated = old.held, old.notified, old.escalated
            fresh[name] = rule
        self.rules = fresh

    # -- events ------------------------------------------------------------------------------
    def feed(self, event: Mapping[str, Any]) -> None:
        if event.get("kind") != "alarm":
            return
        self.reload()
        alarm = dict(event.get("alarm") or {})
        what = event.get("event")
        now = self.clock()
        specs = self.specs()
        for rule in self.rules.values():
            aid = int(alarm.get("id") or 0)
            if what == "raised":
                if not rule.matches(alarm, event, specs):
                    continue
                quiet = rule.spec.get("quiet_hours")
                if in_quiet_hours(quiet, now, rule.timezone) and not at_least(
                    str(alarm.get("severity")), str((quiet or {}).get("except") or "critical")
                ):
                    self.counts["suppressed"] += 1
                    self._record(rule, "suppressed", [alarm], None)
                    continue
                rule.pending.append(alarm)
                if rule.pending_since is None:
                    rule.pending_since = now
                esc = rule.spec.get("escalate")
                if esc:
                    rule.notified[aid] = float(alarm.get("raised_at") or now) + parse_duration(
                        esc["after"])
                else:
                    rule.notified[aid] = float("inf")
                if rule.group <= 0:
                    self._flush(rule, now)
            elif what == "acknowledged":
                if aid in rule.notified:
                    rule.notified[aid] = float("inf")  # acknowledged: no escalation
            elif what == "cleared":
                if aid not in rule.notified:
                    continue
                rule.notified.pop(aid, None)
                rule.escalated.discard(aid)
                rule.pending = [a for a in rule.pending if int(a.get("id") or 0) != aid]
                if rule.spec.get("resolved", True):
                    self.counts["resolved"] += 1
                    self._send(rule, "resolved", [alarm], rule.channels)

    def tick(self) -> None:
        """Flush groups whose window ended; escalate alarms past their deadline."""
        now = self.clock()
        for rule in self.rules.values():
            if rule.pending and rule.pending_since is not None and \
                    now - rule.pending_since >= rule.group:
                self._flush(rule, now)
            esc = rule.spec.get("escalate")
            if not esc:
                continue
            due = [aid for aid, deadline in rule.notified.items()
                   if deadline <= now and aid not in rule.escalated]
            for aid in due:
                rule.escalated.add(aid)
                rule.notified[aid] = float("inf")
                self.counts["escalated"] += 1
                self._send(rule, "escalated", [{"id": aid, **self._alarm_info(rule, aid)}],
                           list(esc.get("channels") or []))

    def _alarm_info(self, rule: Rule, aid: int) -> dict[str, Any]:
        for r in self.recent:
            for a in r.get("alarms") or ():
                if int(a.get("id") or 0) == aid and r["rule"] == rule.name:
                    return dict(a)
        return {}

    def _flush(self, rule: Rule, now: float) -> None:
        alarms, rule.pending, rule.pending_since = rule.pending, [], None
        if not alarms:
            return
        throttle = rule.spec.get("throttle")
        if throttle:
            window = parse_duration(throttle.get("window", "1h"))
            while rule.sent and rule.sent[0] <= now - window:
                rule.sent.popleft()
            if len(rule.sent) >= int(throttle["max"]):
                rule.held += len(alarms)
                self.counts["throttled"] += len(alarms)
                self._record(rule, "throttled", alarms, None)
                return
            rule.sent.append(now)
        held, rule.held = rule.held, 0
        self._send(rule, "raised", alarms, rule.channels, held=held)

    # -- messages ----------------------------------------------------------------------------
    def message(self, rule: Rule, event: str, alarms: list[dict[str, Any]],
                held: int = 0) -> Message:
        prefix = str(rule.spec.get("subject") or "[FLUX IoT]")
        first = alarms[0]
        verb = {"raised": "", "escalated": "ESCALATED (not acknowledged): ",
                "resolved": "RESOLVED: "}[event]
        if len(alarms) == 1:
            subject = (f"{prefix} {verb}{str(first.get('severity', '')).upper()} "
                       f"{first.get('device')}: {first.get('type')}")
        else:
            subject = f"{prefix} {verb}{len(alarms)} alarms ({rule.name})"
        lines = [alarm_text(a, rule.timezone) for a in alarms]
        if held:
            lines.append(f"({held} more alarms were held back by throttling since the last message)")
        return Message(
            subject=subject,
            text="\n".join(lines) + f"\n\nrule {rule.name} · FLUX IoT",
            payload={"event": f"alarm.{event}", "rule": rule.name, "site": rule.site,
                     "alarms": alarms, "held_back": held, "sent_at": self.clock()},
            name=f"{int(self.clock() * 1000)}-{rule.name}-alarm-{event}-{first.get('id')}",
        )

    def _record(self, rule: Rule, event: str, alarms: list[dict[str, Any]],
                outcomes: list[dict[str, Any]] | None) -> dict[str, Any]:
        entry = {"rule": rule.name, "event": event, "at": self.clock(), "alarms": alarms,
                 "deliveries": outcomes or []}
        self.recent.append(entry)
        return entry

    def _send(self, rule: Rule, event: str, alarms: list[dict[str, Any]],
              channels: list[dict[str, Any]], held: int = 0) -> None:
        msg = self.message(rule, event, alarms, held)
        entry = self._record(rule, event, alarms, [])

        async def go() -> None:
            for channel in channels:
                out = await deliver(channel, msg, self.ctx, self.retry)
                entry["deliveries"].append(out)
                ok = out["status"] == "delivered"
                self.counts["sent" if ok else "failed"] += 1
                if not ok:
                    log.warning("notification rule %s: %s to %s failed: %s", rule.name, event,
                                out["target"], out["error"])

        self.spawn(go)


__all__ = ["Notifier", "Rule", "at_least", "in_quiet_hours"]
