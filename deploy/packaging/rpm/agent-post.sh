# shellcheck shell=sh
# fleetban-agent %post: the state directory, and systemd told of the unit.
# The agent is neither enabled nor started: it needs a server and enrollment.
install -d -m 0700 /var/lib/fleetban
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    # $1 is 2 or more on an upgrade: run the new binary.
    if [ "$1" -ge 2 ]; then
        systemctl try-restart fleetban-agent.service >/dev/null 2>&1 || :
    fi
fi
if [ "$1" -eq 1 ]; then
    echo "fleetban-agent: edit /etc/fleetban/agent.toml, then run"
    echo "  fleetban-agent enroll --token TOKEN --config /etc/fleetban/agent.toml"
    echo "  systemctl enable --now fleetban-agent"
fi
