"""An in-memory FLUX IoT API (httpx.MockTransport) for the dashboard's AppTest tests."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

import httpx

from twin.spec import load_site

STATUSES = {"door_sensor_01": "offline", "plc_packer_01": "fault"}


class FakeApi:
    def __init__(self, site: str) -> None:
        loaded = load_site(site)
        self.devices = []
        now = time.time()
        for name, doc in sorted(loaded.of_kind("Device").items()):
            meta, spec = doc.body["metadata"], doc.body["spec"]
            self.devices.append({
                "name": name, "site": meta.get("site"), "group": meta.get("group"),
                "tags": list(meta.get("tags") or []), "labels": dict(meta.get("labels") or {}),
                "type": spec.get("type"), "model": spec.get("model"), "protocol": "sim",
                "status": STATUSES.get(name, "online"), "last_seen": now - 3,
                "maintenance": False,
            })  # fmt: skip
        self.alarms = [
            {"id": 1, "device": "door_sensor_01", "type": "offline", "severity": "major",
             "message": "no heartbeat", "state": "active", "raised_at": now - 60,
             "acked_at": None, "acked_by": None, "cleared_at": None, "cleared_by": None},
        ]  # fmt: skip
        self.commands: dict[str, dict[str, Any]] = {}
        self.queries: list[dict[str, list[str]]] = []
        self.scenes = [
            {"name": s, "site": "plant-a", "enabled": True, "spec": {"enabled": True}}
            for s in loaded.of_kind("Scene")
        ]
        self.executed: list[str] = []
        self.puts: list[dict[str, Any]] = []
        self.control = True  # False: 503 like an engine without the control service
        self.edges: list[dict[str, Any]] = []

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/api/v1")
        q = parse_qs(request.url.query.decode())
        method = request.method
        if path == "/auth/login":
            body = json.loads(request.content)
            if body["password"] != "secret123":
                return httpx.Response(401, json={"detail": "wrong user name or password"})
            role = body["username"] if body["username"] in ("viewer", "operator") else "admin"
            return httpx.Response(
                200,
                json={
                    "access_token": f"tok-{role}",
                    "role": role,
                    "refresh_token": "r",
                    "sites": [],
                },
            )
        role = request.headers.get("authorization", "").removeprefix("Bearer tok-")
        if role not in ("viewer", "operator", "admin"):
            return httpx.Response(401, json={"detail": "missing bearer token"})
        if path == "/edges":
            return httpx.Response(200, json={"items": self.edges})
        if path == "/devices":
            return httpx.Response(200, json={"items": self.devices, "total": len(self.devices)})
        if path.startswith("/alarms"):
            if method == "GET":
                states = q.get("state")
                items = [a for a in self.alarms if not states or a["state"] in states]
                return httpx.Response(200, json={"items": items})
            if role == "viewer":
                return httpx.Response(403, json={"detail": "needs role operator"})
            alarm = next(a for a in self.alarms if a["id"] == int(path.split("/")[2]))
            alarm["state"] = "acknowledged" if path.endswith("/ack") else "cleared"
            alarm["acked_by"] = role
            return httpx.Response(200, json=alarm)
        if path == "/timeseries/query":
            self.queries.append(q)
            tier = q.get("tier", ["raw" if "every" in q else ""])[0]
            headers = {"X-Twin-Tier": tier} if tier else {}
            return httpx.Response(200, json=self.query(q), headers=headers)
        if not self.control:
            detail = "the control service is not running in this engine"
            return httpx.Response(503, json={"detail": detail})
        if path.endswith("/commands") and path.startswith("/devices/"):
            device = path.split("/")[2]
            if method == "POST":
                if role == "viewer":
                    return httpx.Response(403, json={"detail": "needs role operator"})
                body = json.loads(request.content)
                cid = f"c{len(self.commands) + 1}"
                self.commands[cid] = {
                    "id": cid,
                    "device": device,
                    "type": body["type"],
                    "params": body["params"],
                    "status": "success",
                    "created_at": time.time(),
                    "error": None,
                }
                return httpx.Response(201, json=self.commands[cid])
            items = [c for c in self.commands.values() if c["device"] == device]
            return httpx.Response(200, json={"device": device, "commands": items})
        if path.startswith("/commands/"):
            return httpx.Response(200, json=self.commands[path.split("/")[2]])
        if path == "/scenes":
            return httpx.Response(200, json={"scenes": self.scenes})
        if path.startswith("/scenes/") and method == "PUT":
            if role != "admin":
                return httpx.Response(403, json={"detail": "needs role admin"})
            self.puts.append(json.loads(request.content))
            return httpx.Response(200, json={"scene": path.split("/")[2], "changed": True})
        if path.endswith("/execute"):
            self.executed.append(path.split("/")[2])
            return httpx.Response(202, json={"scene": path.split("/")[2], "run_id": "r1"})
        if path.endswith("/traces"):
            trace = {"scene": path.split("/")[2], "ok": True}
            return httpx.Response(200, json={"scene": trace["scene"], "traces": [trace]})
        return httpx.Response(404, json={"detail": "Not Found"})

    def query(self, q: dict[str, list[str]]) -> dict[str, Any]:
        metrics = q.get("metric", ["temperature"])
        aggs = [a for v in q.get("agg", ["avg"]) for a in v.split(",")]
        agg = aggs[0]
        extra = aggs[1:]
        group_by = q.get("group_by", ["device"])[0]
        devices = q.get("device") or [d["name"] for d in self.devices[:3]]
        t0 = int(time.time()) // 60 * 60 - 600
        cols = (
            ["ts", "device", "metric", *aggs] if group_by == "device" else ["ts", "metric", *aggs]
        )
        compare = bool(q.get("compare"))
        if compare:
            cols += [f"{agg}_previous", f"{agg}_delta", f"{agg}_pct"]
        rows = []
        for m in metrics:
            for k, dev in enumerate(devices if group_by == "device" else ["all"]):
                for i in range(10):
                    ts = datetime.fromtimestamp(t0 + 60 * i, UTC).isoformat().replace("+00:00", "Z")
                    v = 20.0 + k + 0.5 * i
                    row: list[Any] = [ts, dev, m, v] if group_by == "device" else [ts, m, v]
                    row += [{"count": 6, "min": v - 1, "max": v + 1}.get(a, v) for a in extra]
                    if compare:
                        row += [v - 1, 1.0, 5.0]
                    rows.append(row)
        return {"columns": cols, "rows": rows, "count": len(rows)}
