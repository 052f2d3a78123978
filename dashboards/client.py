"""The dashboard's only way to the engine: the REST API (httpx), with the routes of twin/api.

Control routes (commands, scenes) are written against the documented API of the control
issue; a server without them answers 404 and the panels say the feature is not available.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import httpx

API = "/api/v1"
ROLES = ("viewer", "operator", "admin")


class ApiError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


class NotAvailable(ApiError):
    """The server has no such route or service (404 on a route, 503 from a service)."""


@dataclass
class Login:
    user: str
    role: str
    token: str
    refresh_token: str = ""
    sites: list[str] = field(default_factory=list)

    def can(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


@dataclass
class Table:
    """A query answer: ``columns`` and ``rows`` (lists), as the API returns it."""

    columns: list[str]
    rows: list[list[Any]]
    tier: str | None = None
    """What the engine read (``X-Twin-Tier``: ``raw``, ``agg_3600s``, ``agg_3600s+raw``)."""

    def records(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, r, strict=False)) for r in self.rows]


class FluxClient:
    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 15.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    # -- plumbing ---------------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = kw.pop("headers", {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        resp = self._http.request(method, API + path, headers=headers, **kw)
        if resp.status_code >= 400:
            try:
                detail = resp.json().get("detail", resp.text)
            except ValueError:
                detail = resp.text
            not_found_route = resp.status_code == 404 and detail == "Not Found"
            cls = NotAvailable if resp.status_code == 503 or not_found_route else ApiError
            raise cls(resp.status_code, str(detail))
        return resp

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        return self._request(method, path, **kw).json()

    # -- auth ---------------------------------------------------------------------------------------
    def login(self, user: str, password: str) -> Login:
        body = self._json("POST", "/auth/login", json={"username": user, "password": password})
        self.token = body["access_token"]
        return Login(
            user,
            body["role"],
            body["access_token"],
            body.get("refresh_token", ""),
            list(body.get("sites") or []),
        )

    def health(self) -> dict[str, Any]:
        return dict(self._json("GET", "/health"))

    # -- devices, alarms ------------------------------------------------------------------------------
    def devices(self, **filters: Any) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        offset = 0
        while True:
            page = self._json(
                "GET", "/devices", params={**filters, "limit": 1000, "offset": offset}
            )
            out.extend(page["items"])
            offset += len(page["items"])
            if not page["items"] or offset >= page["total"]:
                return out

    def twin(self, device: str) -> dict[str, Any]:
        return dict(self._json("GET", f"/devices/{device}/twin"))

    def alarms(
        self, states: list[str] | None = None, device: str | None = None, limit: int = 500
    ) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if states:
            params["state"] = states
        if device:
            params["device"] = device
        return list(self._json("GET", "/alarms", params=params)["items"])

    def ack_alarm(self, alarm_id: int) -> dict[str, Any]:
        return dict(self._json("POST", f"/alarms/{alarm_id}/ack"))

    def clear_alarm(self, alarm_id: int) -> dict[str, Any]:
        return dict(self._json("POST", f"/alarms/{alarm_id}/clear"))

    # -- time series -------------------------------------------------------------------------------
    def query(self, **params: Any) -> Table:
        """``GET /timeseries/query`` (``from_`` stands for ``from``)."""
        resp = self._request("GET", "/timeseries/query", params=_query_params(params))
        body = resp.json()
        tier = resp.headers.get("x-twin-tier")
        return Table(list(body["columns"]), [list(r) for r in body["rows"]], tier)

    def export(self, fmt: str, **params: Any) -> bytes:
        """The same query as a CSV, XLSX or Parquet download from the server."""
        qp = {**_query_params(params), "format": fmt}
        return self._request("GET", "/timeseries/query", params=qp).content

    # -- control (issue 5 routes) --------------------------------------------------------------------
    def send_command(
        self,
        device: str,
        type_: str,
        params: dict[str, Any] | None = None,
        timeout: str | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"type": type_, "params": params or {}}
        if timeout:
            body["timeout"] = timeout
        return dict(self._json("POST", f"/devices/{device}/commands", json=body))

    def video_links(self, camera: str) -> dict[str, Any]:
        """Signed links (HLS, HTTP-FLV, snapshot) a browser's <video> can use directly."""
        return dict(self._json("GET", f"/video/cameras/{camera}/urls"))

    def video_cameras(self) -> list[dict[str, Any]]:
        return _items(self._json("GET", "/video/cameras"))

    def command(self, cmd_id: str) -> dict[str, Any]:
        return dict(self._json("GET", f"/commands/{cmd_id}"))

    def cancel_command(self, cmd_id: str) -> dict[str, Any]:
        return dict(self._json("DELETE", f"/commands/{cmd_id}"))

    def device_commands(self, device: str, limit: int = 20) -> list[dict[str, Any]]:
        return _items(self._json("GET", f"/devices/{device}/commands", params={"limit": limit}))

    def scenes(self) -> list[dict[str, Any]]:
        return _items(self._json("GET", "/scenes"))

    def cluster(self) -> dict[str, Any]:
        """The engines of a scale-out cluster and what each owns (``cluster`` null: one)."""
        return dict(self._json("GET", "/cluster"))

    def edges(self) -> list[dict[str, Any]]:
        """Link state of every edge node (online, revision, lag, outbox, last sync)."""
        return _items(self._json("GET", "/edges"))

    def run_scene(self, name: str) -> dict[str, Any]:
        return dict(self._json("POST", f"/scenes/{name}/execute"))

    def put_scene(self, name: str, document: dict[str, Any]) -> dict[str, Any]:
        return dict(self._json("PUT", f"/scenes/{name}", json=document))

    def scene_traces(self, name: str, limit: int = 5) -> list[dict[str, Any]]:
        return _items(self._json("GET", f"/scenes/{name}/traces", params={"limit": limit}))

    # -- reports (twin/api/routes/reports.py) -------------------------------------------------
    def reports(self) -> list[dict[str, Any]]:
        return _items(self._json("GET", "/reports"))

    def report_runs(self, name: str, limit: int = 10) -> list[dict[str, Any]]:
        return _items(self._json("GET", f"/reports/{name}/runs", params={"limit": limit}))

    def run_report(self, name: str, period: str | None = None) -> dict[str, Any]:
        params = {"period": period} if period else {}
        return dict(self._json("POST", f"/reports/{name}/run", params=params))

    def report_file(self, run_id: str, filename: str) -> bytes:
        return self._request("GET", f"/reports/runs/{run_id}/files/{filename}").content


def _items(body: Any) -> list[dict[str, Any]]:
    """The list of a list answer: ``items``, ``commands``, ``scenes`` or ``traces``."""
    if isinstance(body, dict):
        body = next((body[k] for k in ("items", "commands", "scenes", "traces") if k in body), [])
    return [dict(x) for x in body]


def _query_params(params: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in params.items():
        if v is None or v == [] or v is False:
            continue
        key = "from" if k == "from_" else k
        out[key] = "true" if v is True else v
    return out


def read_table(data: bytes, fmt: str) -> list[list[Any]]:
    """Rows (header first) of an exported CSV or XLSX file, for checks."""
    if fmt == "csv":
        import csv

        return [list(r) for r in csv.reader(io.StringIO(data.decode("utf-8")))]
    from openpyxl import load_workbook

    wb = load_workbook(io.BytesIO(data), read_only=True)
    ws = wb.worksheets[0]
    return [list(r) for r in ws.iter_rows(values_only=True)]
