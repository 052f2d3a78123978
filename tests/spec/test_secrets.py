from __future__ import annotations

from pathlib import Path

import pytest

from twin.errors import SpecError, TwinError
from twin.spec.secrets import Secrets, env_name

DOC = {"kind": "Device", "metadata": {"name": "plc1"},
       "spec": {"credentials": {"username": "u", "password": {"secret": "plant-a/plc"}},
                "binding": {"mqtt": {}}}}


def test_env_name() -> None:
    assert env_name("plant-a/plc") == "TWIN_SECRET_PLANT_A_PLC"


def test_environment_wins_over_file(tmp_path: Path) -> None:
    f = tmp_path / "secrets.yaml"
    f.write_text("plant-a/plc: from-file\n")
    f.chmod(0o600)
    assert Secrets(f, environ={}).resolve(DOC) == {("spec", "credentials", "password"): "from-file"}
    env = {"TWIN_SECRET_PLANT_A_PLC": "from-env"}
    assert Secrets(f, environ=env).resolve(DOC)[("spec", "credentials", "password")] == "from-env"


def test_missing_secret_names_where_and_how(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        Secrets(tmp_path / "none.yaml", environ={}).resolve(DOC)
    (p,) = info.value.problems
    assert str(p) == "Device plc1: spec.credentials.password: secret 'plant-a/plc' is not set"
    assert p.hint is not None and "export TWIN_SECRET_PLANT_A_PLC=" in p.hint


def test_world_readable_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "secrets.yaml"
    f.write_text("plant-a/plc: x\n")
    f.chmod(0o644)
    with pytest.raises(TwinError, match="readable by other users"):
        Secrets(f, environ={}).resolve(DOC)
