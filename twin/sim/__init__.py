"""Simulators: devices without hardware, for the demo and for tests."""

from __future__ import annotations

from twin.sim.generators import PointGenerator, make_generator

__all__ = ["PointGenerator", "make_generator"]
