"""systemd user units for omkd: render them for this installation and write them.

The canonical units live in ``systemd/`` at the repository root; the wheel ships them as
``omkd/systemd_units``. Rendering rewrites two things in ``omkd.service``:

- ``ExecStart=`` runs the omkd of this installation by absolute path, since a user manager's
  ``$PATH`` rarely includes a virtualenv or ``~/.local/bin``.
- ``--db`` names the database the other omkd commands find by default (``$OMKD_DB``, else
  ``$XDG_STATE_HOME/omk/omk.db``, else ``~/.local/state/omk/omk.db``: the rule of
  ``omkd.config.resolve_db_path``), with ``ReadWritePaths=`` on its directory in place of
  ``StateDirectory=omk``. The shipped ``%S/omk`` agrees with that default only on systemd
  254 and later: before, ``%S`` is ``~/.config``.

No trio: the ``omkd install-units`` command wraps install_units() and
enable_instructions().
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

from omkd.config import resolve_db_path
from omkd.db.maintenance import make_private_dirs

__all__ = [
    "UNIT_NAMES",
    "enable_instructions",
    "install_units",
    "omkd_command",
    "private_tmp_warning",
    "render_units",
    "unit_dir",
]

UNIT_NAMES = ("omkd.socket", "omkd.service")
_PRIVATE_TMP_DIRS = ("/tmp", "/var/tmp")  # the service's own (PrivateTmp=yes)
SERVICE = "omkd.service"
UNIT_FILE_MODE = 0o644

_STATE_DIRECTORY_LINES = ("StateDirectory=", "StateDirectoryMode=", "# %S/omk")


def _template_dir() -> Path:
    packaged = resources.files("omkd") / "systemd_units"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "systemd"


def _read_templates() -> dict[str, str]:
    directory = _template_dir()
    return {name: (directory / name).read_text(encoding="utf-8") for name in UNIT_NAMES}


def _quote_exec_arg(arg: str) -> str:
    """Quote one word for an ``ExecStart=`` line (systemd.service(5), "Command lines")."""
    if "\n" in arg or "\r" in arg:
        raise ValueError(f"a unit file cannot hold a newline in an argument: {arg!r}")
    arg = arg.replace("%", "%%").replace("$", "$$")  # No specifier or variable expansion.
    if arg and not any(c in arg for c in " \t\"'\\;"):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _quote_path(path: str) -> str:
    """Quote one path for a path-list setting such as ``ReadWritePaths=``."""
    if "\n" in path or "\r" in path:
        raise ValueError(f"a unit file cannot hold a newline in a path: {path!r}")
    path = path.replace("%", "%%")
    if not any(c in path for c in " \t\"'\\"):
        return path
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'


def private_tmp_warning(db_path: str | os.PathLike[str]) -> str | None:
    """What to tell whoever installs the units for a database under /tmp or /var/tmp: the
    service (PrivateTmp=yes) has its own, and would serve another, empty database there."""
    path = os.fspath(db_path)
    if not any(os.path.commonpath([path, tmp]) == tmp for tmp in _PRIVATE_TMP_DIRS):
        return None
    return (
        f"warning: {path} is under /tmp or /var/tmp, and the service runs with "
        "PrivateTmp=yes: it would open another database, in a /tmp of its own; choose one "
        "outside them with --db (or drop PrivateTmp= in an override)"
    )


def render_units(
    exec_path: str | Sequence[str],
    extra_args: list[str] | None = None,
    *,
    db_path: str | None = None,
) -> dict[str, str]:
    """Return the unit files, name to text, with ``ExecStart=`` running ``exec_path``.

    ``exec_path`` is the absolute path of the ``omkd`` script, or the argv prefix that runs
    omkd (``[python, "-m", "omkd"]``). ``ExecStart`` becomes that, then ``serve --db DB``,
    then ``extra_args``. ``DB`` is ``db_path`` when given, with ``ReadWritePaths=`` on its
    directory replacing ``StateDirectory=``; else the shipped ``%S/omk/omk.db``.

    Raises ValueError when ``exec_path`` or ``db_path`` is not absolute or a word holds a
    newline, and RuntimeError when a shipped template lacks the lines rendering rewrites.
    """
    command = [exec_path] if isinstance(exec_path, str) else list(exec_path)
    if not command or not os.path.isabs(command[0]):
        raise ValueError(f"ExecStart needs an absolute executable path, got {exec_path!r}")
    if db_path is not None and not os.path.isabs(db_path):
        raise ValueError(f"--db needs an absolute path, got {db_path!r}")
    db_word = _quote_exec_arg(db_path) if db_path is not None else "%S/omk/omk.db"
    words = [_quote_exec_arg(w) for w in command] + ["serve", "--db", db_word]
    words += [_quote_exec_arg(w) for w in extra_args or []]

    units = _read_templates()
    lines = units[SERVICE].splitlines()
    exec_lines = [i for i, line in enumerate(lines) if line.startswith("ExecStart=")]
    if len(exec_lines) != 1:
        raise RuntimeError(f"{SERVICE} template must have one ExecStart= line")
    lines[exec_lines[0]] = "ExecStart=" + " ".join(words)
    if db_path is not None:
        lines = _replace_state_directory(lines, os.path.dirname(db_path))
    units[SERVICE] = "\n".join(lines) + "\n"
    return units


def _replace_state_directory(lines: list[str], db_dir: str) -> list[str]:
    index = next((i for i, line in enumerate(lines) if line == "StateDirectory=omk"), None)
    if index is None:
        raise RuntimeError(f"{SERVICE} template must have StateDirectory=omk")
    lines = list(lines)
    lines[index] = "ReadWritePaths=" + _quote_path(db_dir)
    lines.insert(index, "# The database directory: writable under ProtectSystem=strict.")
    return [line for line in lines if not line.startswith(_STATE_DIRECTORY_LINES)]


def _xdg_dir(env: Mapping[str, str], name: str, fallback: str) -> Path:
    value = env.get(name, "")
    # The XDG base directory spec ignores relative values.
    if value and os.path.isabs(value):
        return Path(value)
    return Path(env.get("HOME") or Path.home()) / fallback


def unit_dir(env: Mapping[str, str] = os.environ) -> Path:
    """Return where the user manager looks for units: ``$XDG_CONFIG_HOME/systemd/user``."""
    return _xdg_dir(env, "XDG_CONFIG_HOME", ".config") / "systemd" / "user"


def omkd_command() -> list[str]:
    """Return the absolute argv prefix that runs this installation's omkd.

    The ``omkd`` script installed beside this interpreter (its virtualenv, prefix or user
    scripts directory) first, then ``omkd`` on ``$PATH``, else ``[python, "-m", "omkd"]``.
    """
    candidates = [
        Path(sys.executable).parent / "omkd",
        Path(sysconfig.get_path("scripts")) / "omkd",
        Path(sysconfig.get_path("scripts", f"{os.name}_user")) / "omkd",
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return [str(candidate.absolute())]
    found = shutil.which("omkd")
    if found:
        return [str(Path(found).absolute())]
    return [str(Path(sys.executable).absolute()), "-m", "omkd"]


def install_units(
    dest_dir: Path | None = None,
    *,
    db_path: Path | None = None,
    extra_args: list[str] | None = None,
    env: Mapping[str, str] = os.environ,
) -> list[Path]:
    """Write omkd.socket and omkd.service for this installation; return the paths written.

    ``dest_dir`` defaults to unit_dir(); ``db_path`` to the database ``omkd serve`` would
    use without ``--db`` (``omkd.config.resolve_db_path``), made absolute. ``ExecStart``
    runs omkd_command(). The database directory is created (mode 0700, with its parents)
    when missing, since ``ReadWritePaths=`` needs it to exist; an existing directory keeps
    its mode. Each unit is written to a temporary file and renamed into place, so a reader
    never sees half a unit. Existing units are replaced.

    Raises OSError when a directory or file cannot be written.
    """
    dest = dest_dir if dest_dir is not None else unit_dir(env)
    db = (db_path if db_path is not None else resolve_db_path(None, env)).absolute()
    units = render_units(omkd_command(), extra_args, db_path=str(db))
    make_private_dirs(db.parent)
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in units.items():
        path = dest / name
        tmp = dest / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.chmod(UNIT_FILE_MODE)
        tmp.replace(path)
        written.append(path)
    return written


def enable_instructions() -> str:
    """Return the commands that load, enable and inspect the installed units, one a line."""
    return "\n".join(
        [
            "systemctl --user daemon-reload",
            "systemctl --user enable --now omkd.socket",
            "systemctl --user status omkd",
            "journalctl --user -u omkd",
        ]
    )
