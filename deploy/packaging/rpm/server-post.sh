# shellcheck shell=sh
# fleetban-server %post: systemd told of the unit. The server is neither
# enabled nor started: it needs a database first.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    # $1 is 2 or more on an upgrade: run the new binary (migrations run at start).
    if [ "$1" -ge 2 ]; then
        systemctl try-restart fleetban-server.service >/dev/null 2>&1 || :
    fi
fi
if [ "$1" -eq 1 ]; then
    echo "fleetban-server: set database_url in /etc/fleetban/server.toml, then run"
    echo "  systemctl enable --now fleetban-server"
fi
