#!/bin/sh
# Runs `systemd-analyze verify` on the fleetban units inside a scratch root,
# so that the ExecStart binaries need not be installed on the machine: the
# given binaries are copied to /usr/bin of the scratch root with the system's
# own unit files. Fails on any complaint, warnings included (systemd-analyze
# exits 0 on an unknown key).
#
# usage: deploy/systemd/verify.sh BIN_DIR    (BIN_DIR holds fleetban-agent and fleetban-server)
set -eu

here=$(cd "$(dirname "$0")" && pwd)
bins=${1:?usage: verify.sh BIN_DIR}

if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "systemd-analyze not available: skipped" >&2
    exit 0
fi
units=""
for dir in /usr/lib/systemd/system /lib/systemd/system; do
    if [ -f "$dir/sysinit.target" ]; then
        units=$dir
        break
    fi
done
if [ -z "$units" ]; then
    echo "no systemd unit directory with sysinit.target: skipped" >&2
    exit 0
fi

root=$(mktemp -d "${TMPDIR:-/tmp}/fleetban-units.XXXXXX")
trap 'rm -rf "$root"' EXIT INT TERM
mkdir -p "$root/usr/bin" "$root/usr/lib/systemd" "$root/etc/systemd/system"
cp -R "$units" "$root/usr/lib/systemd/system"
for name in fleetban-agent fleetban-server; do
    cp "$bins/$name" "$root/usr/bin/$name"
    cp "$here/$name.service" "$root/etc/systemd/system/$name.service"
done

status=0
out=$(systemd-analyze verify --man=no --root="$root" fleetban-agent.service fleetban-server.service 2>&1) || status=$?
if [ "$status" -ne 0 ] || [ -n "$out" ]; then
    printf '%s\n' "$out" >&2
    echo "systemd-analyze verify failed (exit $status)" >&2
    exit 1
fi
echo "systemd-analyze verify: fleetban-agent.service fleetban-server.service OK"
