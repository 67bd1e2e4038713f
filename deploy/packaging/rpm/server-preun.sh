# shellcheck shell=sh
# fleetban-server %preun: stop the server on removal ($1 = 0, not an upgrade).
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
    systemctl disable --now fleetban-server.service >/dev/null 2>&1 || :
fi
