#!/usr/bin/env bash
# Installs what the tests need, then runs them. The README's test command.
set -euo pipefail
cd "$(dirname "$0")"

# Debian tools the tests drive: socat (line mode by hand), systemd (socket activation,
# unit verification), sqlite3, setpriv (util-linux, to connect as another uid).
need=()
command -v socat >/dev/null || need+=(socat)
command -v systemd-socket-activate >/dev/null || need+=(systemd)
command -v sqlite3 >/dev/null || need+=(sqlite3)
command -v setpriv >/dev/null || need+=(util-linux)
if ((${#need[@]})); then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    else
        echo "test.sh: missing ${need[*]}; install them (apt-get install ${need[*]})" >&2
    fi
fi

python3 -m pip install -q --disable-pip-version-check -e ./client -e '.[test]'
exec python3 -m pytest -q "$@"
