"""Control: the command ledger, desired-state reconciliation, scenes, ``twin simulate``.

Engine integration: ``Engine(registry, config, services=[ControlService(), ...])``; the API's
control routes (``twin.api.routes.commands``) find the running service in
``engine.service_info["control"]``.
"""

from __future__ import annotations

from twin.control.ledger import (
    SEED_COMMANDS,
    SET,
    TERMINAL,
    Catalog,
    CommandStatus,
    DeviceCommand,
    IllegalTransition,
    Ledger,
    MemoryStore,
    RetryPolicy,
)
from twin.control.scenes import Scene, SceneEngine
from twin.control.service import ControlService, Reconciler, command_history
from twin.control.simulate import load_scenario, simulate

__all__ = [
    "SEED_COMMANDS",
    "SET",
    "TERMINAL",
    "Catalog",
    "CommandStatus",
    "ControlService",
    "DeviceCommand",
    "IllegalTransition",
    "Ledger",
    "MemoryStore",
    "Reconciler",
    "RetryPolicy",
    "Scene",
    "SceneEngine",
    "command_history",
    "load_scenario",
    "simulate",
]
