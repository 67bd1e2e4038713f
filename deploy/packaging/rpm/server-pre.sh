# shellcheck shell=sh
# fleetban-server %pre: the `fleetban` system user the server runs as (it
# must exist before the files owned by its group are unpacked).
getent group fleetban >/dev/null || groupadd --system fleetban
getent passwd fleetban >/dev/null ||
    useradd --system --gid fleetban --no-create-home --home-dir /nonexistent \
        --shell /sbin/nologin --comment "fleetban server" fleetban
exit 0
