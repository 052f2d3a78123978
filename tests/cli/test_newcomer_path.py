"""Issue 12, the CLI on the README's path: what a newcomer types against a real ``twin up``.

One engine (``sites/demo`` on free ports, its own state dir) serves the tests of this module;
each test runs ``twin`` as a subprocess, as a user would.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.procs import ROOT, Up, alive, children, cli_env, run, start_up, wait_for

pytestmark = pytest.mark.slow  # subprocesses and a real engine: ~1 min for the module

DEMO = ROOT / "sites" / "demo"
PW = "correct horse battery"


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Up, dict[str, str]]]:
    state = tmp_path_factory.mktemp("newcomer") / "state"
    env = cli_env(state)
    engine = start_up(env, str(DEMO), "--listen", "127.0.0.1:0", "--mqtt-listen", "127.0.0.1:0")
    try:
        added = run({**env, "TWIN_PASSWORD": PW}, "user", "add", "root", "--role", "admin")
        assert added.returncode == 0, added.stderr
        token = run(env, "token", "create", "root").stdout.strip()
        yield engine, {**env, "TWIN_SERVER": engine.url, "TWIN_TOKEN": token}
    finally:
        engine.stop()


def one_error(proc: object) -> str:
    """stderr of a failed command: one 'error:' line and one 'hint:' line, no traceback."""
    err = proc.stderr  # type: ignore[attr-defined]
    assert proc.returncode == 1, (proc.returncode, proc.stdout, err)  # type: ignore[attr-defined]
    assert "Traceback" not in err and "this is a bug" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), err
    return err


# -- item 1: apply through the API ----------------------------------------------------------------
def test_apply_through_the_server_prints_the_revision(up, tmp_path: Path) -> None:
    _, env = up
    same = run(env, "apply", str(DEMO))  # TWIN_SERVER is set, as after the README's export
    assert same.returncode == 0, same.stderr
    assert re.search(r"applied through http://\S+: no changes \(revision \d+\)", same.stdout), same.stdout
    site = tmp_path / "demo"
    shutil.copytree(DEMO, site)
    devices = site / "devices.yaml"
    devices.write_text(devices.read_text().replace("tags: [hvac, critical]", "tags: [hvac]", 1))
    changed = run(env, "apply", str(site), "--server", env["TWIN_SERVER"])
    assert changed.returncode == 0, changed.stderr
    m = re.search(r"applied through http://\S+: revision (\d+) \(\+0 ~1 -0\)", changed.stdout)
    assert m, changed.stdout
    head = json.loads(run(env, "history", "-o", "json").stdout)[0]
    assert head["revision"] == int(m.group(1)) and head["updated"] == 1
    restored = run(env, "apply", str(DEMO), "-o", "json")
    assert restored.returncode == 0 and json.loads(restored.stdout)["changed"] is True


# -- item 4: no literal rich markup ---------------------------------------------------------------
def test_command_get_and_scene_trace_print_no_markup(up) -> None:
    _, env = up
    listed = run(env, "command", "list", "fan_01", "--json")
    assert listed.returncode == 0, listed.stderr
    cmd_id = json.loads(listed.stdout)[0]["id"]
    for args in (("command", "get", cmd_id), ("command", "get", cmd_id, "--server", env["TWIN_SERVER"])):
        shown = run(env, *args)
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.startswith(cmd_id + "  fan_01 "), shown.stdout
        assert "[bold]" not in shown.stdout and "[/]" not in shown.stdout
    ran = run(env, "scene", "run", "all-fans-max", "--wait")  # a manual scene: always runs
    assert ran.returncode == 0, ran.stderr
    traced = run(env, "scene", "trace", "all-fans-max")
    assert traced.returncode == 0, traced.stderr
    out = ran.stdout + traced.stdout
    assert out.startswith("all-fans-max run ") and "✓" in out, out
    assert not re.search(r"\[/?(bold|green|red)?\]", out), out


# -- item 5: an unknown scene is an error ---------------------------------------------------------
def test_unknown_scene_is_an_error_with_a_did_you_mean(up) -> None:
    _, env = up
    err = one_error(run(env, "scene", "trace", "fan-on-when-hott"))
    assert "no scene 'fan-on-when-hott'" in err and "did you mean 'fan-on-when-hot'?" in err
    local = {k: v for k, v in env.items() if k not in ("TWIN_SERVER", "TWIN_TOKEN")}
    err = one_error(run(local, "scene", "trace", "temp_control"))
    assert "twin scene list" in err
    known = run(local, "scene", "trace", "gate-patrol")  # never ran: no error
    assert known.returncode == 0 and "no runs of gate-patrol recorded yet" in known.stdout


# -- item 6: users from scripts -------------------------------------------------------------------
def test_user_add_reads_the_password_from_stdin_and_never_hangs(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "state")
    added = run(env, "user", "add", "ops", "--role", "operator", "--password-stdin", input=PW + "\n")
    assert added.returncode == 0, added.stderr
    assert run(env, "token", "create", "ops").returncode == 0
    err = one_error(run(env, "user", "add", "bob"))  # no terminal, no password: not exit 130
    assert "--password-stdin" in err
    assert run(env, "user", "add", "eve", "--password-stdin", input="short\n").returncode == 1
    users = run(env, "user", "list").stdout
    assert "ops" in users and "bob" not in users and "eve" not in users


# -- item 7: device keys, usage errors ------------------------------------------------------------
def test_device_key_list_without_a_device_lists_every_key(up) -> None:
    _, env = up
    created = run(env, "device-key", "create", "fan_02")
    assert created.returncode == 0, created.stderr
    key_id = created.stdout.split()[1]
    every = run(env, "device-key", "list")
    assert every.returncode == 0, every.stderr
    assert re.search(rf"{key_id}\s+fan_02\s+.*active", every.stdout), every.stdout
    one_error(run(env, "device-key", "list", "no_such_device"))
    usage = run(env, "get")  # a usage error is click's message, not "this is a bug"
    assert usage.returncode == 2 and "Missing argument" in usage.stderr, usage.stderr
    assert "this is a bug" not in usage.stderr


# -- item 3: every listener is checked before anything is applied ---------------------------------
@pytest.mark.parametrize(
    "which", ["--listen", "--mqtt-listen", "--mqtt-wss-listen", "--dashboard-listen"]
)
def test_a_taken_port_fails_before_the_apply(tmp_path: Path, which: str) -> None:
    env = cli_env(tmp_path / "state")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        addrs = {"--listen": "127.0.0.1:0", "--mqtt-listen": "127.0.0.1:0"}
        addrs[which] = f"127.0.0.1:{port}"
        args = [x for kv in addrs.items() for x in kv]
        if which == "--dashboard-listen":
            args.append("--dashboard")
        if which == "--mqtt-wss-listen":
            from mqtt.test_listeners_cli import _server_cert

            _, cert, key = _server_cert(tmp_path)
            args += ["--mqtt-certfile", cert, "--mqtt-keyfile", key]
        failed = run(env, "up", str(DEMO), *args, timeout=60)
    err = one_error(failed)
    assert f"address 127.0.0.1:{port} is already in use" in err and which in err
    assert "applied" not in failed.stdout
    assert "No revisions yet" in run(env, "history").stdout  # nothing was applied


# -- item 7: signals ------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_up_stops_on_sigterm_and_sigint_with_its_dashboard(tmp_path: Path, sig: int) -> None:
    env = cli_env(tmp_path / "state")
    engine = start_up(env, str(DEMO), "--listen", "127.0.0.1:0", "--mqtt-listen", "127.0.0.1:0",
                      "--dashboard")  # fmt: skip
    try:
        dash_url = re.search(r"^\s*dashboard\s+(http://\S+)", engine.output, re.M)
        assert dash_url, engine.output
        kids = wait_for(lambda: children(engine.proc.pid), "the dashboard process")
    finally:
        code = engine.stop(sig, timeout=30)
    assert code == 0, engine.output
    assert "stopped." in engine.output and "Traceback" not in engine.output, engine.output
    wait_for(lambda: not any(alive(k) for k in kids), "the dashboard to stop", within=10)


def test_broker_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    import subprocess

    from cli.procs import CLI

    env = cli_env(tmp_path / "state")
    proc = subprocess.Popen([*CLI, "broker", "--listen", "127.0.0.1:0", "--no-auth", "--no-persist"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline().startswith("mqtt 127.0.0.1:")
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "stopped." in out


# -- item 14: what a user reads -------------------------------------------------------------------
def test_up_prints_its_summary_then_the_addresses(up) -> None:
    engine, _ = up
    banner = engine.output.split("FLUX IoT engine up", 1)[1].split("Ctrl-C to stop.", 1)[0]
    for word in ("registry", "api", "openapi", "websocket", "metrics", "mqtt"):
        assert re.search(rf"^\s+{word}\s+\S", banner, re.M), banner
    assert " INFO " not in banner, banner  # no log line inside the banner
    assert "metrics" in banner and "needs a token" in banner


def test_live_values_are_rounded(up) -> None:
    _, env = up

    def described() -> str:
        proc = run(env, "describe", "device", "fan_01")
        assert proc.returncode == 0, proc.stderr
        return proc.stdout if "current: reported" in proc.stdout else ""

    text = wait_for(described, "fan_01's current")
    value = re.search(r"current: reported (\S+)", text).group(1)  # type: ignore[union-attr]
    assert re.fullmatch(r"-?\d+\.\d{2}", value), text  # the model declares precision: 2
    table = run(env, "query", "temperature", "--device", "temp_sensor_01", "--from", "-1h")
    assert table.returncode == 0, table.stderr
    assert "critical, hvac, floor=1" in table.stdout and ",critical," not in table.stdout


def test_help_has_no_bool_noise_and_commands_log_warnings_only(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "state")
    helped = run(env, "apply", "--help")
    assert "--prune" in helped.stdout and "<bool>" not in helped.stdout, helped.stdout
    assert "<str>" in helped.stdout  # options that take a value still say which
    quiet = run(env, "apply", str(DEMO))
    assert quiet.returncode == 0 and "INFO" not in quiet.stderr, quiet.stderr
    loud = run(cli_env(tmp_path / "other"), "-v", "apply", str(DEMO))
    assert loud.returncode == 0 and "INFO twin.registry" in loud.stderr, loud.stderr
