"""Plugins: sandboxed WebAssembly modules (wasmtime) and Starlark scripts.

Roles: payload codecs on bindings, transforms on readings, scene conditions and actions.
``registry`` is the entry point for the rest of the engine; ``abi`` documents the memory
layout; ``host`` loads, swaps, limits and accounts for plugins.
"""
