#!/bin/sh
# Checks the fleetban .deb and .rpm packages in a directory: each holds its
# binaries, unit, configuration (marked as configuration) and documentation,
# its maintainer scripts create what they must (the `fleetban` user for the
# server, the agent's state directory, a systemd daemon-reload) and start
# nothing; `fleetban-cli` holds `/usr/bin/fleetban` only (which the server
# package no longer ships, and recommends). Exits non-zero naming every
# missing piece.
#
# usage: deploy/packaging/check-packages.sh DIR [--static-agent]
#   --static-agent   the agent's packaged binary must be statically linked
set -eu

dir=${1:?usage: check-packages.sh DIR [--static-agent]}
static_agent=0
[ "${2:-}" = --static-agent ] && static_agent=1
failures=0
fail() {
    printf 'check-packages: %s\n' "$*" >&2
    failures=$((failures + 1))
}

# one GLOB: the single file in DIR matching GLOB, or nothing.
one() {
    # shellcheck disable=SC2086 # $1 is a glob
    set -- "$dir"/$1
    if [ "$#" -eq 1 ] && [ -f "$1" ]; then
        echo "$1"
    fi
}

# expect_files LISTING FILE...: every FILE appears in LISTING (one path a line).
expect_files() {
    listing=$1
    shift
    for file in "$@"; do
        grep -qxF "$file" "$listing" || fail "$(basename "$listing" .list): $file missing"
    done
}

# expect_scripts NAME TEXT PATTERN...: every PATTERN (grep -E) is in TEXT,
# and TEXT never enables or starts a unit.
expect_scripts() {
    name=$1
    text=$2
    shift 2
    for pattern in "$@"; do
        printf '%s\n' "$text" | grep -Eq "$pattern" || fail "$name: no /$pattern/ in its scripts"
    done
    if printf '%s\n' "$text" | grep -Ev '^[[:space:]]*(#|echo)' | grep -Eq 'systemctl (--[a-z-]+ )*(enable|start|restart) '; then
        fail "$name: a maintainer script enables or starts the service"
    fi
}

work=$(mktemp -d "${TMPDIR:-/tmp}/fleetban-pkgcheck.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM

agent_files="/usr/bin/fleetban-agent
/usr/lib/systemd/system/fleetban-agent.service
/etc/fleetban/agent.toml
/usr/share/doc/fleetban-agent/agent.example.toml
/usr/share/doc/fleetban-agent/README.md"
server_files="/usr/bin/fleetban-server
/usr/lib/systemd/system/fleetban-server.service
/etc/fleetban/server.toml
/usr/share/doc/fleetban-server/server.example.toml
/usr/share/doc/fleetban-server/README.md
/usr/share/fleetban/grafana/fleetban.json"

# ---- deb
for pkg in agent server; do
    deb=$(one "fleetban-${pkg}_*.deb")
    if [ -z "$deb" ]; then
        fail "expected exactly one fleetban-${pkg}_*.deb in $dir"
        continue
    fi
    dpkg -c "$deb" | awk '{ print $NF }' | sed 's#^\./#/#' >"$work/deb-$pkg.list"
    if [ "$pkg" = agent ]; then files=$agent_files; else files=$server_files; fi
    # shellcheck disable=SC2086 # one path a word
    expect_files "$work/deb-$pkg.list" $files
    dpkg-deb -e "$deb" "$work/deb-$pkg-control"
    grep -qxF "/etc/fleetban/$pkg.toml" "$work/deb-$pkg-control/conffiles" ||
        fail "deb $pkg: /etc/fleetban/$pkg.toml is not a conffile"
    scripts=$(cat "$work/deb-$pkg-control/postinst" "$work/deb-$pkg-control/prerm" "$work/deb-$pkg-control/postrm")
    if [ "$pkg" = agent ]; then
        expect_scripts "deb agent" "$scripts" 'install -d -m 0700 /var/lib/fleetban' 'daemon-reload' 'firewall flush'
    else
        expect_scripts "deb server" "$scripts" 'adduser --system' 'chown root:fleetban /etc/fleetban/server.toml' 'daemon-reload'
    fi
    dpkg-deb --fsys-tarfile "$deb" | tar -xf - -C "$work" "./usr/bin/fleetban-$pkg"
    mv "$work/usr/bin/fleetban-$pkg" "$work/deb-fleetban-$pkg"
    echo "deb $pkg: $(wc -l <"$work/deb-$pkg.list" | tr -d ' ') entries OK"
done

# ---- deb: the CLI
deb=$(one "fleetban-cli_*.deb")
if [ -z "$deb" ]; then
    fail "expected exactly one fleetban-cli_*.deb in $dir"
else
    dpkg -c "$deb" | awk '$1 !~ /^d/ { print $NF }' | sed 's#^\./#/#' >"$work/deb-cli.list"
    [ "$(grep -v '^/usr/share/doc/fleetban-cli/' "$work/deb-cli.list")" = /usr/bin/fleetban ] ||
        fail "deb cli: holds more than /usr/bin/fleetban: $(tr '\n' ' ' <"$work/deb-cli.list")"
    dpkg-deb -e "$deb" "$work/deb-cli-control"
    for script in preinst postinst prerm postrm conffiles; do
        [ ! -e "$work/deb-cli-control/$script" ] || fail "deb cli: has a $script"
    done
    dpkg-deb -f "$deb" Replaces | grep -qw fleetban-server || fail "deb cli: does not replace fleetban-server"
    echo "deb cli: $(wc -l <"$work/deb-cli.list" | tr -d ' ') files OK"
fi
if [ -f "$work/deb-server.list" ]; then
    ! grep -qxF /usr/bin/fleetban "$work/deb-server.list" || fail "deb server: still ships /usr/bin/fleetban"
    dpkg-deb -f "$(one "fleetban-server_*.deb")" Recommends | grep -qw fleetban-cli ||
        fail "deb server: does not recommend fleetban-cli"
fi

# ---- rpm
for pkg in agent server; do
    rpmfile=$(one "fleetban-$pkg-*.rpm")
    if [ -z "$rpmfile" ]; then
        fail "expected exactly one fleetban-$pkg-*.rpm in $dir"
        continue
    fi
    rpm -qlp "$rpmfile" >"$work/rpm-$pkg.list"
    if [ "$pkg" = agent ]; then files=$agent_files; else files=$server_files; fi
    # shellcheck disable=SC2086 # one path a word
    expect_files "$work/rpm-$pkg.list" $files
    rpm -qpc "$rpmfile" | grep -qxF "/etc/fleetban/$pkg.toml" ||
        fail "rpm $pkg: /etc/fleetban/$pkg.toml is not %config"
    scripts=$(rpm -qp --scripts "$rpmfile")
    if [ "$pkg" = agent ]; then
        expect_scripts "rpm agent" "$scripts" 'postinstall scriptlet' 'install -d -m 0700 /var/lib/fleetban' \
            'daemon-reload' 'preuninstall scriptlet' 'firewall flush'
    else
        expect_scripts "rpm server" "$scripts" 'preinstall scriptlet' 'useradd --system .*fleetban' \
            'postinstall scriptlet' 'daemon-reload'
        rpm -qlpv "$rpmfile" | grep -Eq '^-rw-r-----[[:space:]]+1[[:space:]]+root[[:space:]]+fleetban[[:space:]].*/etc/fleetban/server.toml$' ||
            fail "rpm server: /etc/fleetban/server.toml is not root:fleetban 0640"
    fi
    echo "rpm $pkg: $(wc -l <"$work/rpm-$pkg.list" | tr -d ' ') files OK"
done

# ---- rpm: the CLI
rpmfile=$(one "fleetban-cli-*.rpm")
if [ -z "$rpmfile" ]; then
    fail "expected exactly one fleetban-cli-*.rpm in $dir"
else
    [ "$(rpm -qlp "$rpmfile")" = /usr/bin/fleetban ] ||
        fail "rpm cli: holds more than /usr/bin/fleetban: $(rpm -qlp "$rpmfile" | tr '\n' ' ')"
    [ -z "$(rpm -qpc "$rpmfile")" ] || fail "rpm cli: has configuration files"
    # Its scriptlets (inherited keys of the server's) are `exit 0`.
    rpm -qp --scripts "$rpmfile" | grep -v 'scriptlet' | grep -qvx 'exit 0' &&
        fail "rpm cli: a scriptlet does more than exit 0"
    rpm -qpR "$rpmfile" | grep -q shadow-utils && fail "rpm cli: requires shadow-utils"
    echo "rpm cli: OK"
fi
if [ -f "$work/rpm-server.list" ]; then
    ! grep -qxF /usr/bin/fleetban "$work/rpm-server.list" || fail "rpm server: still ships /usr/bin/fleetban"
    rpm -qp --recommends "$(one "fleetban-server-*.rpm")" | grep -qx fleetban-cli ||
        fail "rpm server: does not recommend fleetban-cli"
fi

if [ "$static_agent" -eq 1 ] && [ -f "$work/deb-fleetban-agent" ]; then
    if file "$work/deb-fleetban-agent" | grep -Eq 'statically linked|static-pie linked'; then
        "$work/deb-fleetban-agent" --version >/dev/null || fail "the packaged agent does not run"
        echo "agent binary: statically linked, runs"
    else
        fail "the packaged agent is not statically linked: $(file "$work/deb-fleetban-agent")"
    fi
fi

if [ "$failures" -ne 0 ]; then
    echo "check-packages: $failures problem(s)" >&2
    exit 1
fi
echo "check-packages: all packages OK"
