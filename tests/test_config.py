"""Where the daemon finds its socket and database, and how configuration is layered."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from omkd.config import ConfigError, default_db_path, load_config, resolve_db_path
from omkd_client.paths import default_socket_path, resolve_socket_path


def test_socket_path_order() -> None:
    env = {"OMKD_SOCKET": "/e/s.sock", "XDG_RUNTIME_DIR": "/run/user/7"}
    assert resolve_socket_path("/flag.sock", env) == Path("/flag.sock")
    assert resolve_socket_path(None, env) == Path("/e/s.sock")
    assert resolve_socket_path(None, {"XDG_RUNTIME_DIR": "/run/user/7"}) == Path(
        "/run/user/7/omk/omkd.sock"
    )
    assert default_socket_path({}) == Path(f"/tmp/omk-{os.getuid()}/omkd.sock")
    assert default_socket_path({"XDG_RUNTIME_DIR": "relative"}) == default_socket_path({})


def test_the_daemon_and_its_clients_take_a_socket_path_of_home_alike() -> None:
    home = Path.home()
    for flag, env in (("~/f.sock", {}), (None, {"OMKD_SOCKET": "~/e.sock"})):
        client = resolve_socket_path(flag, env)
        daemon = load_config(None, {"socket_path": flag}, env=env).socket_path
        assert client.parent == home and str(client) == daemon


def test_db_path_order() -> None:
    env = {"OMKD_DB": "/e/omk.db", "XDG_STATE_HOME": "/state", "HOME": "/home/u"}
    assert resolve_db_path("/flag.db", env) == Path("/flag.db")
    assert resolve_db_path(None, env) == Path("/e/omk.db")
    assert default_db_path({"XDG_STATE_HOME": "/state"}) == Path("/state/omk/omk.db")
    assert default_db_path({"HOME": "/home/u"}) == Path("/home/u/.local/state/omk/omk.db")
    assert default_db_path({"HOME": "/home/u", "XDG_STATE_HOME": "rel"}) == Path(
        "/home/u/.local/state/omk/omk.db"
    )


def test_config_file_then_overrides(tmp_path: Path) -> None:
    file = tmp_path / "omkd.toml"
    file.write_text('lock_timeout = 2.5\ntx_idle_timeout = 9\nsynchronous = "FULL"\n')
    config = load_config(str(file), {"tx_idle_timeout": 3.0, "lock_timeout": None}, env={})
    assert (config.lock_timeout, config.tx_idle_timeout, config.synchronous) == (2.5, 3.0, "FULL")
    assert config.max_message_bytes == 16 * 1024 * 1024


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("lock_timeout = 'soon'", "lock_timeout"),
        ("no_such_option = 1", "no_such_option"),
        ("lock_timeout = -1", "lock_timeout must be positive"),
        ("lock_timeout = nan", "lock_timeout must be positive"),
        ("tx_idle_timeout = nan", "tx_idle_timeout must be positive"),
        ("batch_slice = nan", "batch_slice must not be negative"),
        ("checkpoint_interval = 0", "checkpoint_interval must be positive"),
        ("group_commit_window = -0.1", "group_commit_window must not be negative"),
        ("wal_autocheckpoint = -1", "wal_autocheckpoint must not be negative"),
        ("wal_restart_pages = -1", "wal_restart_pages must not be negative"),
        ("gc_threshold = 0", "gc_threshold must be at least 1"),
        ("long_reads = 0", "long_reads must be at least 1"),
        ("long_call_rows = -1", "long_call_rows must not be negative"),
        ("long_call_bytes = -1", "long_call_bytes must not be negative"),
        ("long_call_seconds = -0.5", "long_call_seconds must not be negative"),
        ("idle_spin = nan", "idle_spin must not be negative"),
        ("idle_spin = -0.0001", "idle_spin must not be negative"),
        ("idle_spin = 0.5", "idle_spin must be at most 0.01"),
        ("accept_retry_delay = -1", "accept_retry_delay must be positive"),
        ("accept_retry_delay = nan", "accept_retry_delay must be positive"),
        ("listen_backlog = -1", "listen_backlog must be at least 1"),
        ("gc_threshold = 2147483648", "gc_threshold must be at most 2147483647"),
        ("this is not toml", "not valid TOML"),
    ],
)
def test_bad_config_file_is_named(tmp_path: Path, text: str, needle: str) -> None:
    file = tmp_path / "bad.toml"
    file.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(file), env={})
    assert needle in str(info.value) and str(file) in str(info.value)


def test_a_config_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    file = tmp_path / "latin1.toml"
    file.write_bytes('socket_path = "/tmp/caf\u00e9.sock"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8 text") as info:
        load_config(str(file), env={})
    assert str(file) in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(str(tmp_path / "none.toml"), env={})


def test_environment_beats_config_file_for_paths(tmp_path: Path) -> None:
    # Flags, then $OMKD_SOCKET / $OMKD_DB, then the file, then the XDG defaults: the
    # environment a unit or a shell sets wins over a file, as it does for omkctl.
    file = tmp_path / "omkd.toml"
    file.write_text('socket_path = "/file/s.sock"\ndb_path = "/file/omk.db"\n')
    env = {"OMKD_SOCKET": "/env/s.sock", "OMKD_DB": "/env/omk.db", "XDG_RUNTIME_DIR": "/run/u"}
    from_env = load_config(str(file), env=env)
    assert (from_env.socket_path, from_env.db_path) == ("/env/s.sock", "/env/omk.db")
    flags = {"socket_path": "/flag/s.sock", "db_path": "/flag/omk.db"}
    from_flags = load_config(str(file), flags, env=env)
    assert (from_flags.socket_path, from_flags.db_path) == ("/flag/s.sock", "/flag/omk.db")
    from_file = load_config(str(file), {"socket_path": None, "db_path": None}, env={})
    assert (from_file.socket_path, from_file.db_path) == ("/file/s.sock", "/file/omk.db")


def test_defaults_when_neither_file_nor_environment_names_the_paths(tmp_path: Path) -> None:
    file = tmp_path / "omkd.toml"
    file.write_text('socket_path = ""\nlock_timeout = 1.5\n')
    env = {"XDG_RUNTIME_DIR": "/run/u", "XDG_STATE_HOME": "/state", "OMKD_DB": ""}
    config = load_config(str(file), env=env)
    assert config.socket_path == "/run/u/omk/omkd.sock"
    assert config.db_path == "/state/omk/omk.db"


def test_a_path_of_the_wrong_type_in_the_file_is_named(tmp_path: Path) -> None:
    file = tmp_path / "omkd.toml"
    file.write_text("db_path = 5\n")
    with pytest.raises(ConfigError, match=r"db_path"):
        load_config(str(file), env={})


def test_a_database_has_one_name_however_it_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The lock file is <db_path>.lock: a second name for the same file must not make a
    # second lock (a symbolic link, "~" in a config file, a relative path).
    home = tmp_path / "home"
    (home / "state").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    real = home / "state" / "omk.db"
    (tmp_path / "link.db").symlink_to(real)
    file = tmp_path / "omkd.toml"
    file.write_text('db_path = "~/state/omk.db"\nsocket_path = "~/omkd.sock"\n')
    config = load_config(str(file), env={})
    assert config.db_path == str(real)
    assert config.socket_path == str(home / "omkd.sock")
    assert load_config(overrides={"db_path": str(tmp_path / "link.db")}, env={}).db_path == str(
        real
    )
    monkeypatch.chdir(home)
    assert load_config(overrides={"db_path": "state/omk.db"}, env={}).db_path == str(real)
    relative = load_config(overrides={"socket_path": "rel.sock"}, env={})
    assert relative.socket_path == str(home / "rel.sock")  # as daemon.status reports it
    assert resolve_db_path(str(tmp_path / "link.db"), {}) == real
    assert resolve_db_path(None, {"OMKD_DB": "~/state/omk.db"}) == real
