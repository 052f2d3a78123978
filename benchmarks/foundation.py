"""Foundation benchmark: validate, plan and apply a generated site, on SQLite and PostgreSQL.

    .venv/bin/python benchmarks/foundation.py [--devices 10000] [--pg URL | --no-pg]

Generates YAML files (10,000 devices over 100 nested groups and 20 models, 10 files of
devices), then measures, through the same functions the CLI calls:
  validate            read + parse + schema + references
  plan (empty)        against an empty registry
  apply (first)       one transaction
  plan (no change)    validate + plan against a registry that holds it (parse cache warm)
  plan (1 % changed)  after editing 1 % of the devices' desired values in the files (every
                      device file changed, so every file is parsed again)
  apply (1 % changed)
Goals on the 2-core machine: validate + plan < 3 s, apply < 5 s, no-change plan < 1 s.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
import uuid
from pathlib import Path

from twin.registry import open_registry
from twin.spec import load_site
from twin.spec.apply import apply_specs, plan_against

GROUPS, MODELS = 100, 20


def write_site(root: Path, n_devices: int, changed: frozenset[int] = frozenset()) -> None:
    root.mkdir(parents=True, exist_ok=True)
    head = ["apiVersion: flux.iot/v1\nkind: Site\nmetadata: {name: plant-a}\n"
            "spec: {title: Bench plant, timezone: UTC, location: {lat: 48.1, lon: 11.5}}\n"]
    for g in range(GROUPS):
        parent = "" if g < 10 else f"\nspec: {{parent: group-{g % 10:03d}}}"
        head.append(f"apiVersion: flux.iot/v1\nkind: DeviceGroup\n"
                    f"metadata: {{name: group-{g:03d}, site: plant-a}}{parent}\n")
    for m in range(MODELS):
        head.append(f"""apiVersion: flux.iot/v1
kind: DeviceModel
metadata: {{name: model-{m:02d}}}
spec:
  telemetry:
    temperature: {{type: number, unit: "°C", min: -40, max: 125}}
    humidity: {{type: number, unit: "%", min: 0, max: 100}}
  properties:
    sampling_rate: {{type: integer, unit: s, min: 1, max: 3600, access: readwrite}}
    mode: {{type: string, access: readwrite, enum: [eco, normal]}}
  commands:
    reboot: {{}}
    set_sampling_rate: {{params: {{type: object, properties: {{rate: {{type: integer}}}}}}}}
""")
    (root / "site.yaml").write_text("---\n".join(head))
    per_file = max(1, n_devices // 10)
    for f in range(0, n_devices, per_file):
        docs = []
        for i in range(f, min(n_devices, f + per_file)):
            rate = 6 if i in changed else 5
            docs.append(f"""apiVersion: flux.iot/v1
kind: Device
metadata:
  name: dev-{i:05d}
  site: plant-a
  group: group-{i % GROUPS:03d}
  tags: [bench, {"hvac" if i % 3 == 0 else "power"}]
  labels: {{floor: "{i % 7}", row: "{i % 40}"}}
spec:
  type: sensor
  model: model-{i % MODELS:02d}
  heartbeat: {{interval: 10s, timeout: 30s}}
  binding:
    sim:
      interval: 5s
      points:
        temperature: {{wave: sine, min: 18, max: 30, period: 10m}}
        humidity: {{wave: random_walk, min: 30, max: 60}}
  desired: {{sampling_rate: {rate}, mode: eco}}
""")
        (root / f"devices-{f // per_file:02d}.yaml").write_text("---\n".join(docs))


def timed(label: str, fn, results: dict[str, float]):  # type: ignore[no-untyped-def]
    gc.collect()
    t = time.perf_counter()
    value = fn()
    results[label] = time.perf_counter() - t
    return value


def run(backend: str, url: str | None, n: int, tmp: Path) -> dict[str, float]:
    site = tmp / f"site-{backend}"
    write_site(site, n)
    reg = open_registry(url, tmp / f"state-{backend}")
    r: dict[str, float] = {}
    loaded = timed("validate", lambda: load_site(site), r)
    timed("plan (empty registry)", lambda: plan_against(reg, loaded), r)
    timed("apply (first)", lambda: apply_specs(reg, loaded, author="bench"), r)

    cache = tmp / f"cache-{backend}"  # what the CLI uses: STATE_DIR/cache
    timed("validate (cold, filling the parse cache)", lambda: load_site(site, cache_dir=cache), r)

    def full_plan():  # type: ignore[no-untyped-def]
        return plan_against(reg, load_site(site, cache_dir=cache))

    plan, _ = timed("validate + plan (no change)", full_plan, r)
    assert plan.empty
    changed = frozenset(range(0, n, 100))  # 1 %
    write_site(site, n, changed)
    plan, _ = timed("validate + plan (1 % changed)", full_plan, r)
    assert len(plan.changes) == len(changed), len(plan.changes)
    loaded = load_site(site, cache_dir=cache)
    timed("apply (1 % changed)", lambda: apply_specs(reg, loaded, author="bench"), r)
    reg.close()
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--pg", default=os.environ.get("TWIN_TEST_POSTGRES",
                                                   "postgresql://postgres@127.0.0.1:5432/test"))
    ap.add_argument("--no-pg", action="store_true")
    args = ap.parse_args()
    backends: list[tuple[str, str | None]] = [("sqlite", None)]
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    if not args.no_pg:
        backends.append(("postgres", f"{args.pg}{'&' if '?' in args.pg else '?'}schema={schema}"))
    print(f"site: {args.devices} devices, {GROUPS} groups, {MODELS} models; {os.cpu_count()} cores")
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, url in backends:
            try:
                results[name] = run(name, url, args.devices, Path(tmp))
            except Exception as exc:  # a missing PostgreSQL should not hide the SQLite figures
                print(f"{name}: skipped ({type(exc).__name__}: {exc})")
    if len(backends) > 1 and "postgres" in results:
        import psycopg

        with psycopg.connect(args.pg, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    labels = list(next(iter(results.values())))
    print(f"{'step':44}" + "".join(f"{b:>12}" for b in results))
    for label in labels:
        print(f"{label:44}" + "".join(f"{results[b][label]:>11.3f}s" for b in results))
    for b, r in results.items():
        vp = r["validate"] + r["plan (empty registry)"]
        print(f"{b}: validate+plan {vp:.2f}s (goal < 3 s), first apply {r['apply (first)']:.2f}s "
              f"(goal < 5 s), no-change plan {r['validate + plan (no change)']:.2f}s (goal < 1 s)")


if __name__ == "__main__":
    main()
