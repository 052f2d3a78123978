"""Scene actions: classes with a load-time ``build`` and a run-time ``run``, in a dict.

```yaml
- {type: command, device: fan_01, command: set_state, params: {state: true}, wait: true, timeout: 10s}
- {type: set_desired, device: fan_01, property: speed, value: 80}
- {type: delay, duration: 30s}
- {type: wait_for, conditions: [...], timeout: 5m, continue_on_timeout: false}
- {type: alarm, action: raise, device: fan_01, alarm: overheat, severity: major, message: "..."}
- {type: webhook, url: "https://...", method: POST, body: {...}, headers: {...}}
- {type: notify, channels: [{type: email, ...}], subject: "...", message: "..."}
- {type: scene, scene: other_scene, wait: true}
- {type: if, conditions: [...], then: [...], else: [...]}
- {type: choose, options: [{conditions: [...], actions: [...]}], default: [...]}
- {type: parallel, actions: [...]}          # each item runs concurrently
- {type: sequence, actions: [...]}
- {type: repeat, count: 3 | while: [...] | until: [...], actions: [...]}
- {type: stop, reason: "..."}
- {type: plugin, plugin: NAME, inputs: {t: {device: d1, point: temperature}}}
```
A ``plugin`` action asks a Plugin (role ``action``, twin/plugins) with the same input as a
plugin condition and runs the actions it returns (any type but ``plugin``; built and checked
like YAML ones, so the scene's policy applies to them); a plugin that fails fails the step.
``set_desired`` takes effect at once (the reconciler converges the device) and is recorded as
a runtime desired-state override set by ``scene:<name>`` (twin/registry/overrides.py), exactly
like a PATCH of the twin's desired state through the API: it survives a restart and re-applying
the YAML, shows in `twin describe device`, is never a revision (`twin plan` stays clean), and
gives way when the spec value in git changes.

Every step may carry ``continue_on_error: true`` (an error is recorded, the run goes on) and
``alias`` (a readable name in traces).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Self

import trio

from twin.control.conditions import (
    Condition,
    SceneDefinitionError,
    build_conditions,
    build_typed,
    check_all,
    plugin_input,
)
from twin.plugins import registry as plugins
from twin.spec.units import parse_duration

if TYPE_CHECKING:
    from twin.control.scenes import RunContext

REPEAT_LIMIT = 10_000


class StopRun(Exception):  # a control-flow signal, not an error
    def __init__(self, reason: str, failed: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.failed = failed


class StepError(Exception):
    """An action failed (recorded in the trace; ends the run unless continue_on_error)."""


@dataclass(eq=False)
class Action:
    type: ClassVar[str]
    alias: str | None = field(default=None, kw_only=True)
    continue_on_error: bool = field(default=False, kw_only=True)

    async def run(self, ctx: RunContext, path: str) -> dict[str, Any]:
        raise NotImplementedError

    def children(self) -> list[Action]:
        return []

    def writes(self) -> list[tuple[str, str]]:
        """(device, property-or-command) this action writes: for conflict/loop analysis."""
        return []

    def walk(self) -> list[Action]:
        out: list[Action] = [self]
        for c in self.children():
            out += c.walk()
        return out


def _common(spec: Mapping[str, Any]) -> dict[str, Any]:
    return {"alias": spec.get("alias"), "continue_on_error": bool(spec.get("continue_on_error"))}


async def run_sequence(ctx: RunContext, actions: tuple[Action, ...], prefix: str) -> None:
    for i, a in enumerate(actions):
        await ctx.step(a, f"{prefix}/{i}")


@dataclass(eq=False)
class Command(Action):
    type: ClassVar[str] = "command"
    device: str
    command: str
    params: dict[str, Any]
    timeout: float | None
    wait: bool

    @classmethod
    def build(cls, spec: Mapping[str, Any]) -> Command:
        return cls(
            spec["device"],
            spec["command"],
            dict(spec.get("params") or {}),
            parse_duration(spec["timeout"]) if "timeout" in spec else None,
            bool(spec.get("wait", False)),
            **_common(spec),
        )

    async def run(self, ctx: RunContext, path: str) -> dict[str, Any]:
        return await ctx.effects.command(
            self.device,
            self.command,
            self.params,
            command_timeout=self.timeout,
            wait=self.wait,
            source=ctx.source,
        )

    def writes(self) -> list[tuple[str, str]]:
        return [(self.device, f"command:{self.command}")]


@dataclass(eq=False)
class SetDesired(Action):
    type: ClassVar[str] = "set_desired"
    device: str
    property: str
    value: Any

    @classmethod
    def build(cls, spec: Mapping[str, Any]) -> SetDesired:
        return cls(spec["device"], spec["property"], spec["value"], **_common(spec))

    async def run(self, ctx: RunContext, path: str) -> dict[str, Any]:
        return await ctx.effects.set_desired(
            self.device, self.property, self.value, source=ctx.source
        )

    def writes(self) -> list[tuple[str, str]]:
        return [(self.device, self.property)]


@dataclass(eq=False)
class Delay(Action):
    type: ClassVar[str] = "delay"
    seconds: float

    @classmethod
    def build(cls, spec: Mapping[str, Any]) -> Delay:
        return cls(parse_duration(spec["duration"]), **_common(spec))

    async def run(self, ctx: RunContext, path: str) -> dict[str, Any]:
        await trio.sleep(self.seconds)
        return {"seconds": self.seconds}


@dataclass(eq=False)
class WaitFor(Action):
    type: ClassVar[str] = "wait_for"
    conditions: tuple[Condition, ...]
    timeout: float | None
    continue_on_timeout: bool

    @classmethod
    def build(cls, spec: Mapping[str, Any]) -> WaitFor:
        return cls(
            build_conditions(spec["conditions"]),
            parse_duration(spec["timeout"]) if "timeout" in spec else None,
            bool(spec.get("continue_on_timeout", False)),
            **_common(spec),
        )

    async def run(self, ctx: RunContext, path: str) -> dict[str, Any]:
        started = trio.current_time()
        with trio.move_on_after(self.timeout if self.timeout is not None else float("inf")):
            while not check_all(self.conditions, ctx.state, None, path):
                await ctx.engine.state_changed()
            return {"waited": trio.current_time() - started}
        if self.continue_on_timeout:
            return {"waited": trio.current_time() - started, "timed_out": True}
        raise StepError(f"wait_for: conditions not met within {self.timeout:g}s")


@dataclass(eq=False)
class AlarmAction(Action):
    type: ClassVar[str] = "alarm"
    action: str
    device: str
    alarm: str
    severity: str
    message: str

    @classmethod
    def build(cls, spec: Mapping[str, Any]) -> AlarmAction:
        return cls(
            spec.get("action", "raise"),
            spec["device"],
            spec.get("alarm", "scene"),
            spec.get("severity", "warning"),
            spec.get("message", ""),
            **_common(spec),
        )

    async def run(self, ctx: RunContext, path: str) -> dict[str, Any]:
        message = self.message or f"scene {ctx.scene}"
        return await ctx.effects.alarm(self.action, self.device, self.alarm, self.severity, message)


@dataclass(eq=False)
class Webhook(Action):
    type: ClassVar[str] = "webhook"
    url: str
    method: str
    body: Any
    headers: dict[str, str]
    timeout: float

    @classmethod
    def build(cls, spec: Mapping[str, Any]) -> Webhook:
        return cls(
            spec["url"],
            str(spec.get("method", "POST")).upper(),
            spec.get("body"),
            dict(spec.get("headers") or {}),
            parse_duration(spec.get("timeout", "10s")),
            **_common(spec),
        )

    async def run(self, ctx: RunContext, path: str) -> dict[str, Any]:
        body = self.body if self.body is not None else {"scene": ctx.scene, "trigger": ctx.trigger}
        return await ctx.effects.webhook(self.method, self.url, body, self.headers, self.timeout)


@dataclass(eq=False)
class Notify(Action):
    """Tell people through the notification channels (email, webhook, MQTT topic, folder) the
    engine's notification service delivers to (twin.reports.channels)."""

    type: ClassVar[str] = "notify"
    channels: tuple[dict[str, Any], ...]
    subject: str
    message: str

    @classmethod
    def build(cls, spec: Mapping[str, Any]) -> Notify:
        return cls(
            tuple(dict(c) for c in spec.get("channels") or ()),
            str(spec.get("subject") or ""),
            str(spec.get("message") or ""),
            **_common(spec),
        )

    async def run(self, ctx: RunContext, path: str) -> dict[str, Any]:
        subject = self.subject or f"[FLUX IoT] scene {ctx.scene}"
        payload = {"scene": ctx.scene, "trigger": ctx.trigger}
        return await ctx.effects.notify(self.channels, subject, self.message or subject, payload)


@dataclass(eq=False)
class RunScene(Action):
    type: ClassVar[str] = "scene"
    scene: str
    wait: bool

    @classmethod
    def build(cls, spec: Mapping[str, Any]) -> RunScene:
        return cls(spec["scene"], bool(spec.get("wait", False)), **_common(spec))

    async def run(self, ctx: RunContext, path: str) -> dict[str, Any]:
        return await ctx.engine.run_from_scene(ctx, self.scene, wait=self.wait)


@dataclass(eq=False)
class If(Action):
    type: ClassVar[str] = "if"
    conditions: tuple[Condition, ...]
    then: tuple[Action, ...]
    else_: tuple[Action, ...]

    @classmethod
    def build(cls, spec: Mapping[str, Any]) -> If:
        return cls(
            build_conditions(spec["conditions"]),
            build_actions(spec.get("then")),
            build_actions(spec.get("else")),
            **_common(spec),
        )

    async def run(self, ctx: RunContext, path: str) -> dict[str, Any]:
        ok = ctx.conditions(self.conditions, f"{path}/conditions")
        if ok:
            await run_sequence(ctx, self.then, f"{path}/then")
        else:
            await run_sequence(ctx, self.else_, f"{path}/else")
        return {"branch": "then" if ok else "else"}

    def children(self) -> list[Action]:
        return [*self.then, *self.else_]


@dataclass(eq=False)
class Choose(Action):
    type: ClassVar[str] = "choose"
    options: tuple[tuple[tuple[Condition, ...], tuple[Action, ...]], ...]
    default: tuple[Action, ...]

    @classmethod
    def build(cls, spec: Mapping[str, Any]) -> Choose:
        options = tuple(
            (build_conditions(o.get("conditions")), build_actions(o.get("actions")))
            for o in spec.get("options") or []
        )
        return cls(options, build_actions(spec.get("default")), **_common(spec))

    async def run(self, ctx: RunContext, path: str) -> dict[str, Any]:
        for i, (conds, actions) in enumerate(self.options):
            if ctx.conditions(conds, f"{path}/options/{i}/conditions"):
                await run_sequence(ctx, actions, f"{path}/options/{i}/actions")
                return {"chosen": i}
        await run_sequence(ctx, self.default, f"{path}/default")
        return {"chosen": "default"}

    def children(self) -> list[Action]:
        out = [a for _, acts in self.options for a in acts]
        return out + list(self.default)


@dataclass(eq=False)
class _Block(Action):
    """An action made of the list of actions under its ``actions:``."""

    actions: tuple[Action, ...]

    @classmethod
    def build(cls, spec: Mapping[str, Any]) -> Self:
        return cls(build_actions(spec["actions"]), **_common(spec))

    def children(self) -> list[Action]:
        return list(self.actions)


@dataclass(eq=False)
class Parallel(_Block):
    type: ClassVar[str] = "parallel"

    async def run(self, ctx: RunContext, path: str) -> dict[str, Any]:
        errors: list[str] = []

        async def one(i: int, a: Action) -> None:
            try:
                await ctx.step(a, f"{path}/actions/{i}")
            except StepError as exc:
                errors.append(str(exc))

        async with trio.open_nursery() as n:
            for i, a in enumerate(self.actions):
                n.start_soon(one, i, a)
        if errors:
            raise StepError("; ".join(errors))
        return {"branches": len(self.actions)}


@dataclass(eq=False)
class Sequence(_Block):
    type: ClassVar[str] = "sequence"

    async def run(self, ctx: RunContext, path: str) -> dict[str, Any]:
        await run_sequence(ctx, self.actions, f"{path}/actions")
        return {}


@dataclass(eq=False)
class Repeat(Action):
    type: ClassVar[str] = "repeat"
    count: int | None
    while_: tuple[Condition, ...] | None
    until: tuple[Condition, ...] | None
    actions: tuple[Action, ...]

    @classmethod
    def build(cls, spec: Mapping[str, Any]) -> Repeat:
        modes = [k for k in ("count", "while", "until") if k in spec]
        if len(modes) != 1:
            raise SceneDefinitionError("repeat: give exactly one of count, while, until")
        return cls(
            int(spec["count"]) if "count" in spec else None,
            build_conditions(spec["while"]) if "while" in spec else None,
            build_conditions(spec["until"]) if "until" in spec else None,
            build_actions(spec["actions"]),
            **_common(spec),
        )

    async def run(self, ctx: RunContext, path: str) -> dict[str, Any]:
        i = 0
        while i < REPEAT_LIMIT:
            if self.count is not None and i >= self.count:
                break
            if self.while_ is not None and not ctx.conditions(self.while_, f"{path}/while/{i}"):
                break
            await run_sequence(ctx, self.actions, f"{path}/actions/{i}")
            i += 1
            if self.until is not None and ctx.conditions(self.until, f"{path}/until/{i}"):
                break
            await trio.lowlevel.checkpoint()
        return {"iterations": i}

    def children(self) -> list[Action]:
        return list(self.actions)


@dataclass(eq=False)
class Stop(Action):
    type: ClassVar[str] = "stop"
    reason: str
    error: bool

    @classmethod
    def build(cls, spec: Mapping[str, Any]) -> Stop:
        return cls(
            str(spec.get("reason", "stopped")), bool(spec.get("error", False)), **_common(spec)
        )

    async def run(self, ctx: RunContext, path: str) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        raise StopRun(self.reason, failed=self.error)


@dataclass(eq=False)
class PluginAction(Action):
    type: ClassVar[str] = "plugin"
    plugin: str
    inputs: tuple[tuple[str, str, str], ...]

    @classmethod
    def build(cls, spec: Mapping[str, Any]) -> PluginAction:
        inputs = tuple((str(a), str(r["device"]), str(r["point"]))
                       for a, r in (spec.get("inputs") or {}).items())
        return cls(str(spec["plugin"]), inputs, **_common(spec))

    async def run(self, ctx: RunContext, path: str) -> dict[str, Any]:
        doc = plugin_input(ctx, self.inputs)
        if plugins.host().uses_thread(self.plugin):
            result = await trio.to_thread.run_sync(plugins.action, self.plugin, [doc])
        else:
            result = plugins.action(self.plugin, [doc])
        if result is None:
            raise StepError(f"plugin {self.plugin}: failed ({plugins.host().stats[self.plugin].last_error})")
        specs = result[0]
        if isinstance(specs, Mapping):
            specs = [specs]
        if not isinstance(specs, list) or not all(isinstance(a, Mapping) for a in specs):
            raise StepError(f"plugin {self.plugin}: must return a list of actions")
        if any(a.get("type") == "plugin" for a in specs):
            raise StepError(f"plugin {self.plugin}: may not return plugin actions")
        try:
            actions = build_actions(specs)
        except (SceneDefinitionError, KeyError, TypeError, ValueError) as exc:
            raise StepError(f"plugin {self.plugin}: returned an invalid action: {exc}") from None
        await run_sequence(ctx, actions, f"{path}/plugin")
        return {"plugin": self.plugin, "actions": [a.get("type") for a in specs]}


ACTIONS: dict[str, Callable[[Mapping[str, Any]], Action]] = {
    "command": Command.build,
    "set_desired": SetDesired.build,
    "delay": Delay.build,
    "wait_for": WaitFor.build,
    "alarm": AlarmAction.build,
    "webhook": Webhook.build,
    "notify": Notify.build,
    "scene": RunScene.build,
    "if": If.build,
    "choose": Choose.build,
    "parallel": Parallel.build,
    "sequence": Sequence.build,
    "repeat": Repeat.build,
    "stop": Stop.build,
    "plugin": PluginAction.build,
}


def build_action(spec: Mapping[str, Any]) -> Action:
    return build_typed(ACTIONS, spec, "action")


def build_actions(specs: Any) -> tuple[Action, ...]:
    return tuple(build_action(a) for a in specs or [])
