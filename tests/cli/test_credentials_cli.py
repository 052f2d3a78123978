"""`twin user disable/enable`, `twin token create/list/revoke [--user]`: the CLI's side of
credential lifecycles, checked with the very checks the API runs on a bearer token."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from twin.api import auth
from twin.errors import AuthError
from twin.registry import open_registry

ROOT = Path(__file__).resolve().parents[2]


def twin(env: dict[str, str], *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "twin.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def still_valid(state: Path, token: str) -> bool:
    """What the API checks on a bearer token (twin.api.state.ApiState.authenticate)."""
    reg = open_registry(None, state)
    try:
        claims = auth.decode_access_token(auth.load_secret(state), token)
        auth.check_claims(claims, reg.get_user(claims["sub"]))
        rec = reg.get_api_token(claims["tid"])
        return rec is not None and rec.revoked_at is None
    except AuthError:
        return False
    finally:
        reg.close()


def test_token_and_user_lifecycle(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = {**os.environ, "TWIN_STATE_DIR": str(state), "TWIN_PASSWORD": "correct horse",
           "COLUMNS": "200"}
    env.pop("TWIN_REGISTRY", None)
    twin(env, "user", "add", "alice", "--role", "viewer")
    made = twin(env, "token", "create", "alice", "--note", "grafana")
    t1 = made.stdout.strip()
    tid = made.stderr.split()[1]
    assert still_valid(state, t1)
    listed = twin(env, "token", "list").stdout
    assert tid in listed and "grafana" in listed and "expires" in listed
    # one token by its id
    twin(env, "token", "revoke", tid)
    assert not still_valid(state, t1)
    assert "revoked" in twin(env, "token", "list", "--user", "alice").stdout
    twin(env, "token", "revoke", "nope", code=1)
    # every token of a user
    t2 = twin(env, "token", "create", "alice").stdout.strip()
    assert still_valid(state, t2)
    assert "generation 2" in twin(env, "token", "revoke", "--user", "alice").stdout
    assert not still_valid(state, t2)
    twin(env, "token", "revoke", code=1)  # neither an id nor --user
    # disable / enable
    t3 = twin(env, "token", "create", "alice").stdout.strip()
    twin(env, "user", "disable", "alice")
    assert not still_valid(state, t3)
    assert "disabled" in twin(env, "user", "list").stdout
    twin(env, "user", "enable", "alice")
    assert still_valid(state, t3)
    twin(env, "user", "disable", "ghost", code=1)
    # deleted and added again: another user, the old token stays dead
    twin(env, "user", "delete", "alice")
    twin(env, "user", "add", "alice", "--role", "admin")
    assert not still_valid(state, t3)


def test_state_dir_made_by_the_cli_is_private(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = {**os.environ, "TWIN_STATE_DIR": str(state), "TWIN_PASSWORD": "correct horse"}
    env.pop("TWIN_REGISTRY", None)
    twin(env, "user", "add", "bob", "--role", "viewer")
    twin(env, "token", "create", "bob")
    assert (state.stat().st_mode & 0o777) == 0o700
    for p in state.iterdir():
        assert (p.stat().st_mode & 0o777) == 0o600, p.name
