"""The OpenAPI document is true: documented errors, one error shape, complete Allow on 405."""

from __future__ import annotations

from .conftest import Api


async def test_405_allow_lists_every_method_of_the_path(api: Api) -> None:
    async with api.client() as c:
        # GET and POST are two routes on one path: Starlette's Allow named only the first
        r = await c.delete("/api/v1/devices")
        assert r.status_code == 405
        assert set(r.headers["allow"].split(", ")) == {"GET", "HEAD", "POST"}
        r = await c.patch("/api/v1/devices/t1")
        assert r.status_code == 405
        assert set(r.headers["allow"].split(", ")) == {"DELETE", "GET", "HEAD", "PUT"}


async def test_every_error_answered_is_documented(api: Api) -> None:
    async with api.client() as c:
        doc = (await c.get("/openapi.json")).json()
        ops = doc["paths"]
        assert "HTTPValidationError" not in doc["components"]["schemas"]
        assert {"401", "403", "404", "422", "429"} <= set(
            ops["/api/v1/devices/{device}"]["get"]["responses"]
        )
        assert "401" in ops["/api/v1/auth/login"]["post"]["responses"]  # wrong password
        assert "text/plain" in ops["/metrics"]["get"]["responses"]["200"]["content"]
        # a route's own 422 (a line) matches the documented Error schema
        r = await c.post("/api/v1/devices", json={"metadata": [1]})
        assert r.status_code == 422 and isinstance(r.json()["detail"], str)
        body = ops["/api/v1/devices"]["post"]["requestBody"]["content"]["application/json"]
        assert body["schema"]["required"] == ["metadata"]
