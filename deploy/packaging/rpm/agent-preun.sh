# shellcheck shell=sh
# fleetban-agent %preun: on removal ($1 = 0, not an upgrade), stop the agent
# and remove its firewall entries.
if [ "$1" -eq 0 ]; then
    if [ -d /run/systemd/system ]; then
        systemctl disable --now fleetban-agent.service >/dev/null 2>&1 || :
    fi
    if [ -f /etc/fleetban/agent.toml ]; then
        /usr/bin/fleetban-agent firewall flush --config /etc/fleetban/agent.toml || :
    fi
fi
