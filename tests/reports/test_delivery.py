"""Delivery against real peers: aiosmtpd with STARTTLS + AUTH, a local HTTP receiver checking
the HMAC signature (with a 503 first: retried), a folder written atomically, and an SMTP
server that is not there (retries, then a recorded failure with the reason; the files kept)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from twin.control.webhooks import WebhookPolicy
from twin.registry import open_registry
from twin.reports.channels import ChannelContext
from twin.reports.runner import ReportRunner
from twin.spec import load_site
from twin.spec.secrets import Secrets

from .conftest import DAY
from .peers import PASSWORD, USER, free_port, start_receiver, start_smtp


def _doc(site: Path, delivery: list[dict[str, Any]], retry: dict[str, Any] | None = None
         ) -> tuple[dict[str, Any], dict[Any, Any]]:
    specs = load_site(site).specs
    doc = dict(specs[("Report", "daily-zh")])
    spec = dict(doc["spec"])
    spec["formats"] = ["pdf", "xlsx"]
    spec["delivery"] = delivery
    spec["retry"] = retry or {"attempts": 3, "backoff": "50ms"}
    doc["spec"] = spec
    return doc, specs


def _runner(tmp_path: Path, store: Any) -> tuple[ReportRunner, Any]:
    reg = open_registry(None, tmp_path / "state")
    env = {"TWIN_SECRET_SMTP_PASSWORD": PASSWORD, "TWIN_SECRET_HOOK": "hook-secret"}
    ctx = ChannelContext(tmp_path / "state", Secrets(environ=env, state_dir=tmp_path / "state"),
                         WebhookPolicy.parse("127.0.0.1/32"))
    return ReportRunner(reg, tmp_path / "state", store, ctx), reg


async def test_email_webhook_and_folder(site: Path, store: Any, tmp_path: Path) -> None:
    from twin.reports.render import period_of

    smtp = start_smtp(tmp_path)
    rec = start_receiver(fail_first=1)
    runner, reg = _runner(tmp_path, store)
    try:
        doc, specs = _doc(site, [
            {"type": "email", "to": ["ops@example.com"], "from": "twin@example.com",
             "smtp": {"host": "127.0.0.1", "port": smtp.port, "starttls": True,
                      "ca_file": str(smtp.cert), "username": USER,
                      "password": {"secret": "smtp_password"}}},
            {"type": "webhook", "url": rec.url, "secret": {"secret": "hook"}},
            {"type": "folder", "path": str(tmp_path / "out")},
        ])
        run = await runner.run(doc, specs, period_of(doc, specs, DAY, 0), trigger="test")
        assert run.status == "success", run
        # e-mail: over STARTTLS, logged in, both files attached
        assert smtp.logins == [USER]
        (mail,) = smtp.messages
        assert "工厂日报" in str(mail["Subject"]) or "=?utf-8?" in str(mail["Subject"])
        names = sorted(p.get_filename() for p in mail.walk() if p.get_filename())
        assert names == ["daily-zh-2026-03-01.pdf", "daily-zh-2026-03-01.xlsx"]
        # webhook: the first 503 was retried; the body is signed and carries the files
        by = {d["channel"]: d for d in run.deliveries}
        assert by["webhook"]["attempts"] == 2 and by["webhook"]["status"] == "delivered"
        assert rec.bad_signatures == 0 and len(rec.bodies) == 1
        assert [f["filename"] for f in rec.bodies[0]["files"]] == names
        assert rec.bodies[0]["period"]["start"] == run.period["start"]
        # folder: both files, no temporary left behind
        out = sorted(p.name for p in (tmp_path / "out").iterdir())
        assert out == names
        # the run record
        again = reg.report_run(run.id)
        assert again is not None and again.status == "success"
        assert [a["filename"] for a in again.artifacts] == names
    finally:
        smtp.stop()
        rec.stop()
        reg.close()


async def test_unreachable_smtp_retries_then_fails_visibly(site: Path, store: Any,
                                                            tmp_path: Path) -> None:
    from twin.reports.render import period_of

    runner, reg = _runner(tmp_path, store)
    port = free_port()  # nothing listens there
    try:
        doc, specs = _doc(site, [
            {"type": "email", "to": ["ops@example.com"],
             "smtp": {"host": "127.0.0.1", "port": port, "timeout": "2s"}},
            {"type": "folder", "path": str(tmp_path / "out")},
        ])
        run = await runner.run(doc, specs, period_of(doc, specs, DAY, 0), trigger="test")
        assert run.status == "partial"  # the folder got the files
        email = next(d for d in run.deliveries if d["channel"] == "email")
        assert email["status"] == "failed" and email["attempts"] == 3
        assert f"127.0.0.1:{port}" in email["error"] and "Connection refused" in email["error"]
        assert run.error and "email:ops@example.com" in run.error
        # nothing lost: the files are kept with the run and went to the folder
        for art in run.artifacts:
            head = (await trio.Path(art["path"]).read_bytes())[:4]
            assert head in (b"%PDF", b"PK\x03\x04")
        assert len(list((tmp_path / "out").iterdir())) == 2
        stored = reg.report_runs("daily-zh")
        assert stored[0].id == run.id and stored[0].status == "partial"
        # e-mail the only channel: the run fails, with the reason; the files are still kept
        doc["spec"]["delivery"] = doc["spec"]["delivery"][:1]
        doc["spec"]["formats"] = ["csv"]
        run = await runner.run(doc, specs, period_of(doc, specs, DAY, 0), trigger="test")
        assert run.status == "failed" and run.error is not None
        assert "Connection refused" in run.error and run.deliveries[0]["attempts"] == 3
        assert (await trio.Path(run.artifacts[0]["path"]).read_bytes()).startswith(b"PK")
    finally:
        reg.close()


@pytest.mark.parametrize("bad", ["nope"])
async def test_webhook_refused_by_allow_list(site: Path, store: Any, tmp_path: Path,
                                             bad: str) -> None:
    from twin.reports.render import period_of

    runner, reg = _runner(tmp_path, store)
    runner.context.webhooks = WebhookPolicy()  # type: ignore[union-attr]
    try:
        doc, specs = _doc(site, [{"type": "webhook", "url": "http://127.0.0.1:9/x"}])
        run = await runner.run(doc, specs, period_of(doc, specs, DAY, 0), trigger="test")
        (d,) = run.deliveries
        assert d["attempts"] == 1 and "not allowed" in d["error"]
    finally:
        reg.close()


async def test_wrong_smtp_password_fails_at_once(site: Path, store: Any, tmp_path: Path) -> None:
    """A refused login is permanent: no retries, the run says why."""
    from twin.reports.render import period_of

    smtp = start_smtp(tmp_path)
    runner, reg = _runner(tmp_path, store)
    assert runner.context is not None
    runner.context.secrets = Secrets(environ={"TWIN_SECRET_SMTP_PASSWORD": "wrong"},
                                     state_dir=tmp_path / "state")
    try:
        doc, specs = _doc(site, [
            {"type": "email", "to": ["ops@example.com"],
             "smtp": {"host": "127.0.0.1", "port": smtp.port, "ca_file": str(smtp.cert),
                      "username": USER, "password": {"secret": "smtp_password"}}},
        ])
        doc["spec"]["formats"] = ["csv"]
        run = await runner.run(doc, specs, period_of(doc, specs, DAY, 0), trigger="test")
        assert run.status == "failed"
        (d,) = run.deliveries
        assert d["attempts"] == 1 and "refused the login (535)" in d["error"], d
        assert smtp.messages == [] and smtp.logins == []
    finally:
        smtp.stop()
        reg.close()
