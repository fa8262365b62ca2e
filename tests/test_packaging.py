"""A plain (non-editable) install ships the migrations and the systemd units, and migrates."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from omkd.db import load_migrations

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_ships_migrations_and_units_and_migrates(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("omkd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    migrations = load_migrations(ROOT / "migrations")
    assert {f"omkd/migrations/{m.filename}" for m in migrations} <= set(names)
    assert {"omkd/systemd_units/omkd.service", "omkd/systemd_units/omkd.socket"} <= set(names)
    assert "omkd/py.typed" in names
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(site),
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    probe = (
        f"import sys; sys.path.insert(0, {str(site)!r}); import omkd, omkd.db; "
        f"assert omkd.__file__.startswith({str(site)!r}), omkd.__file__; "
        f"d = omkd.db.Database.open({str(tmp_path / 'new.db')!r}); print(d.schema_version)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(migrations[-1].version)
