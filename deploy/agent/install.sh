#!/bin/sh
# fleetban agent installer for cPanel/Exim hosts.
#
#   curl -fsSL https://fleet.example.net/install.sh | sh -s -- \
#       --server https://fleet.example.net:50051 --token TOKEN \
#       --binary-url https://fleet.example.net/fleetban-agent --sha256 HEX
#   sh install.sh --server URL --token TOKEN --binary ./fleetban-agent
#
# Detects the OS and the firewall in use (CSF, nftables, ipset; firewalld is
# noted), installs the binary (/usr/local/bin/fleetban-agent) and its systemd
# unit (/etc/systemd/system/fleetban-agent.service), writes
# /etc/fleetban/agent.toml for cPanel's Exim (/var/log/exim_mainlog,
# smtp_accept_max from /etc/exim.conf; the host's own addresses and the
# entries of /etc/csf/csf.allow and csf.ignore in the local allowlist),
# enrolls with the server, starts the agent and prints its status.
#
# Running it again upgrades: the binary and unit are replaced when they
# differ and the agent restarted; the configuration, the enrollment and the
# spool are kept (--reconfigure rewrites the configuration). --uninstall
# removes the agent's firewall entries and everything the installer added.
# --root DIR installs into DIR instead of / (staging, tests); with
# --no-start --no-enroll it needs neither systemd, nor a server, nor root.
set -eu

PROG=fleetban-install
BIN_PATH=/usr/local/bin/fleetban-agent
UNIT_PATH=/etc/systemd/system/fleetban-agent.service
CONF_DIR=/etc/fleetban
CONF_PATH=$CONF_DIR/agent.toml
CA_PATH=$CONF_DIR/ca.pem
STATE_DIR=/var/lib/fleetban
MANIFEST=$STATE_DIR/install-manifest

SERVER=""
TOKEN=${FLEETBAN_ENROLL_TOKEN:-}
BACKEND=""
BINARY=""
BINARY_URL=${FLEETBAN_AGENT_URL:-}
SHA256=""
CA_FILE=""
ROOT=""
NO_START=0
NO_ENROLL=0
UNINSTALL=0
RECONFIGURE=0

CHANGED=0
BINARY_CHANGED=0
UNIT_CHANGED=0
CONFIG_CHANGED=0
TMP=""

say() { printf '%s: %s\n' "$PROG" "$*"; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }
die() {
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit 1
}

usage() {
    cat <<'USAGE'
usage: install.sh --server URL --token TOKEN [options]
       install.sh --uninstall [--root DIR]

  --server URL        fleetban-server gRPC URL (https://host:50051)
  --token TOKEN       enrollment token (or FLEETBAN_ENROLL_TOKEN)
  --backend NAME      nftables | ipset | csf | dry-run (default: detected)
  --binary PATH       the fleetban-agent binary to install (static musl build)
  --binary-url URL    download the binary instead (or FLEETBAN_AGENT_URL)
  --sha256 HEX        expected SHA-256 of the binary
  --ca-file PATH      CA certificate of the server (installed as /etc/fleetban/ca.pem)
  --root DIR          install into DIR instead of / (needs --no-start --no-enroll)
  --no-start          do not enable, start or restart the service
  --no-enroll         do not enroll with the server
  --reconfigure       rewrite /etc/fleetban/agent.toml even if it exists
  --uninstall         remove the agent, its firewall entries and its files
USAGE
}

need_value() {
    if [ "$#" -lt 2 ] || [ -z "$2" ]; then
        die "$1 needs a value"
    fi
}

while [ "$#" -gt 0 ]; do
    case $1 in
        --*=*)
            flag=${1%%=*}
            value=${1#*=}
            shift
            set -- "$flag" "$value" "$@"
            continue
            ;;
        --server) need_value "$@"; SERVER=$2; shift ;;
        --token) need_value "$@"; TOKEN=$2; shift ;;
        --backend) need_value "$@"; BACKEND=$2; shift ;;
        --binary) need_value "$@"; BINARY=$2; shift ;;
        --binary-url) need_value "$@"; BINARY_URL=$2; shift ;;
        --sha256) need_value "$@"; SHA256=$2; shift ;;
        --ca-file) need_value "$@"; CA_FILE=$2; shift ;;
        --root) need_value "$@"; ROOT=$2; shift ;;
        --no-start) NO_START=1 ;;
        --no-enroll) NO_ENROLL=1 ;;
        --reconfigure) RECONFIGURE=1 ;;
        --uninstall) UNINSTALL=1 ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
    shift
done

case $BACKEND in
    "" | nftables | ipset | csf | dry-run) ;;
    *) die "--backend must be nftables, ipset, csf or dry-run, not '$BACKEND'" ;;
esac

if [ -n "$CA_FILE" ] && [ ! -r "$CA_FILE" ]; then
    die "--ca-file $CA_FILE is not readable"
fi

# ROOT is a prefix: "" for the running system.
if [ -n "$ROOT" ]; then
    [ -d "$ROOT" ] || die "--root $ROOT is not a directory"
    ROOT=$(cd "$ROOT" && pwd)
    [ "$ROOT" = / ] && ROOT=""
fi
if [ -n "$ROOT" ]; then
    # Enrolling and starting act on the running system, not on DIR.
    if [ "$UNINSTALL" -eq 0 ] && { [ "$NO_START" -eq 0 ] || [ "$NO_ENROLL" -eq 0 ]; }; then
        die "--root $ROOT needs --no-start and --no-enroll"
    fi
    NO_START=1
    NO_ENROLL=1
elif [ "$(id -u)" -ne 0 ]; then
    die "run as root (or use --root DIR --no-start --no-enroll for a staging tree)"
fi

cleanup() {
    if [ -n "$TMP" ]; then
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
TMP=$(mktemp -d "${TMPDIR:-/tmp}/fleetban-install.XXXXXX")

# ---------------------------------------------------------------- helpers

# have PROGRAM: whether PROGRAM is installed (inside ROOT when one is given).
have() {
    if [ -z "$ROOT" ] && command -v "$1" >/dev/null 2>&1; then
        return 0
    fi
    for dir in /usr/sbin /sbin /usr/bin /bin /usr/local/sbin /usr/local/bin; do
        [ -x "$ROOT$dir/$1" ] && return 0
    done
    return 1
}

# record KIND PATH: remember that the installer created PATH (f file, d dir).
record() {
    if ! grep -qxF "$1 $2" "$ROOT$MANIFEST" 2>/dev/null; then
        printf '%s %s\n' "$1" "$2" >>"$ROOT$MANIFEST"
    fi
}

# ensure_dir PATH MODE: create PATH (and missing parents) inside ROOT; the
# ones created are recorded once the manifest's directory exists.
PENDING_DIRS=""
ensure_dir() {
    [ -d "$ROOT$1" ] && return 0
    parent=$(dirname "$1")
    [ "$parent" = "$1" ] || ensure_dir "$parent" 0755
    mkdir "$ROOT$1"
    chmod "$2" "$ROOT$1"
    PENDING_DIRS="$PENDING_DIRS $1"
}

flush_pending_dirs() {
    for dir in $PENDING_DIRS; do
        record d "$dir"
    done
    PENDING_DIRS=""
}

# put SOURCE PATH MODE: install SOURCE as PATH (inside ROOT) atomically when
# the content or mode differs; returns 0 when it changed something.
put() {
    target=$ROOT$2
    if [ -f "$target" ] && cmp -s "$1" "$target"; then
        current=$(stat -c '%a' "$target")
        if [ "$current" = "${3#0}" ] || [ "0$current" = "$3" ]; then
            return 1
        fi
        chmod "$3" "$target"
        return 0
    fi
    [ -e "$target" ] || record f "$2"
    cp "$1" "$target.fleetban-new"
    chmod "$3" "$target.fleetban-new"
    mv -f "$target.fleetban-new" "$target"
    return 0
}

# ---------------------------------------------------------------- uninstall

if [ "$UNINSTALL" -eq 1 ]; then
    if [ -z "$ROOT" ]; then
        if have systemctl && [ -f "$UNIT_PATH" ]; then
            systemctl disable --now fleetban-agent.service >/dev/null 2>&1 || true
        fi
        if [ -x "$BIN_PATH" ] && [ -f "$CONF_PATH" ]; then
            if "$BIN_PATH" firewall flush --config "$CONF_PATH"; then
                say "removed the agent's firewall entries"
            else
                warn "could not flush the agent's firewall entries; see above"
            fi
        fi
    else
        say "--root: the firewall of this machine is left alone"
    fi
    if [ -f "$ROOT$MANIFEST" ]; then
        manifest=$(cat "$ROOT$MANIFEST")
    else
        warn "no $MANIFEST: removing the installer's default paths"
        manifest="f $BIN_PATH
f $UNIT_PATH
f $CONF_PATH
f $CA_PATH
d $CONF_DIR
d $STATE_DIR"
    fi
    # Files first, then the state directory, then created directories,
    # deepest first.
    printf '%s\n' "$manifest" | while read -r kind path; do
        if [ "$kind" = f ] && [ -e "$ROOT$path" ]; then
            rm -f "$ROOT$path"
            say "removed $path"
        fi
    done
    if printf '%s\n' "$manifest" | grep -qxF "d $STATE_DIR"; then
        state_path=$ROOT$STATE_DIR
        rm -rf -- "$state_path"
        say "removed $STATE_DIR (credentials, spool)"
    fi
    printf '%s\n' "$manifest" | sed -n 's/^d //p' | sort -r | while read -r path; do
        if [ -d "$ROOT$path" ]; then
            rmdir "$ROOT$path" 2>/dev/null || warn "$path is not empty; left in place"
        fi
    done
    if [ -z "$ROOT" ] && have systemctl; then
        systemctl daemon-reload >/dev/null 2>&1 || true
    fi
    say "fleetban agent uninstalled; revoke it on the server (DELETE /api/v1/agents/ID) to drop it from the fleet"
    exit 0
fi

# ---------------------------------------------------------------- detect

OS_ID=unknown
OS_VERSION=""
OS_LIKE=""
if [ -r "$ROOT/etc/os-release" ]; then
    OS_ID=$(sed -n 's/^ID="\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$ROOT/etc/os-release" | head -n 1)
    OS_VERSION=$(sed -n 's/^VERSION_ID="\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$ROOT/etc/os-release" | head -n 1)
    OS_LIKE=$(sed -n 's/^ID_LIKE="\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$ROOT/etc/os-release" | head -n 1)
fi
major=${OS_VERSION%%.*}
case "$OS_ID:$major" in
    almalinux:8 | almalinux:9 | cloudlinux:8 | cloudlinux:9 | rocky:8 | rocky:9 | rhel:8 | rhel:9) supported=1 ;;
    ubuntu:22 | ubuntu:24 | debian:11 | debian:12 | debian:13) supported=1 ;;
    *) supported=0 ;;
esac
if [ "$supported" -eq 1 ]; then
    say "OS: $OS_ID $OS_VERSION"
else
    warn "OS '$OS_ID $OS_VERSION' (like '$OS_LIKE') is not one fleetban is tested on; continuing"
fi

if [ -z "$BACKEND" ]; then
    if have csf || [ -f "$ROOT/etc/csf/csf.conf" ]; then
        BACKEND=csf
    elif have nft; then
        BACKEND=nftables
    elif have ipset && have iptables; then
        BACKEND=ipset
    else
        die "no supported firewall found (CSF, nft, ipset+iptables); install nftables or pass --backend dry-run"
    fi
    say "firewall: $BACKEND (detected)"
else
    say "firewall: $BACKEND (--backend)"
fi
if have firewall-cmd || [ -f "$ROOT/usr/lib/systemd/system/firewalld.service" ]; then
    say "note: firewalld is installed; fleetban's nftables table hooks in before it (priority -10) and needs no firewalld rule"
fi

# cPanel's Exim logs to /var/log/exim_mainlog; Debian's exim4 to /var/log/exim4/mainlog.
LOG_PATH=/var/log/exim_mainlog
if [ ! -e "$ROOT$LOG_PATH" ] && [ ! -d "$ROOT/usr/local/cpanel" ] && [ -d "$ROOT/var/log/exim4" ]; then
    LOG_PATH=/var/log/exim4/mainlog
fi

SMTP_ACCEPT_MAX=0
if [ -r "$ROOT/etc/exim.conf" ]; then
    found=$(sed -n 's/^[[:space:]]*smtp_accept_max[[:space:]]*=[[:space:]]*\([0-9][0-9]*\)[[:space:]]*$/\1/p' \
        "$ROOT/etc/exim.conf" | tail -n 1)
    if [ -n "$found" ]; then
        SMTP_ACCEPT_MAX=$found
        say "smtp_accept_max = $SMTP_ACCEPT_MAX (from /etc/exim.conf)"
    fi
fi

# normalize: reads address/CIDR tokens (one per line) and prints each valid
# one with its host bits cleared (IPv4 and IPv6); anything else is dropped.
normalize() {
    awk '
function hexval(h,    i, v) {
    v = 0
    h = tolower(h)
    for (i = 1; i <= length(h); i++) v = v * 16 + index("0123456789abcdef", substr(h, i, 1)) - 1
    return v
}
function pow2(n,    r) { r = 1; while (n-- > 0) r *= 2; return r }
function keep(value, width, bits) {
    if (bits >= width) return value
    if (bits <= 0) return 0
    return value - value % pow2(width - bits)
}
function v4(addr, len,    o, n, i, out) {
    n = split(addr, o, ".")
    if (n != 4) return ""
    for (i = 1; i <= 4; i++) if (o[i] !~ /^[0-9]+$/ || o[i] + 0 > 255) return ""
    if (len == "") len = 32
    if (len !~ /^[0-9]+$/ || len + 0 > 32 || len + 0 < 1) return ""
    out = ""
    for (i = 1; i <= 4; i++) out = out (i > 1 ? "." : "") keep(o[i] + 0, 8, len - 8 * (i - 1))
    return len == 32 ? out : out "/" len
}
function v6(addr, len,    parts, head, tail, nh, nt, g, i, n, out, best, bestlen, run, start) {
    if (addr !~ /^[0-9A-Fa-f:]+$/ || addr ~ /:::/) return ""
    if (len == "") len = 128
    if (len !~ /^[0-9]+$/ || len + 0 > 128 || len + 0 < 1) return ""
    n = split(addr, parts, "::")
    if (n > 2) return ""
    nh = parts[1] == "" ? 0 : split(parts[1], head, ":")
    nt = (n == 2 && parts[2] != "") ? split(parts[2], tail, ":") : 0
    if (n == 1 && nh != 8) return ""
    if (n == 2 && nh + nt > 7) return ""
    for (i = 1; i <= 8; i++) g[i] = 0
    for (i = 1; i <= nh; i++) { if (head[i] == "" || length(head[i]) > 4) return ""; g[i] = hexval(head[i]) }
    for (i = 1; i <= nt; i++) { if (tail[i] == "" || length(tail[i]) > 4) return ""; g[8 - nt + i] = hexval(tail[i]) }
    for (i = 1; i <= 8; i++) g[i] = keep(g[i], 16, len - 16 * (i - 1))
    best = 0; bestlen = 0; run = 0
    for (i = 1; i <= 8; i++) {
        if (g[i] == 0) { run++; if (run == 1) start = i; if (run > bestlen) { bestlen = run; best = start } }
        else run = 0
    }
    out = ""
    if (bestlen < 2) {
        for (i = 1; i <= 8; i++) out = out (i > 1 ? ":" : "") sprintf("%x", g[i])
    } else {
        for (i = 1; i < best; i++) out = out (i > 1 ? ":" : "") sprintf("%x", g[i])
        out = out "::"
        for (i = best + bestlen; i <= 8; i++) out = out (i > best + bestlen ? ":" : "") sprintf("%x", g[i])
    }
    return len == 128 ? out : out "/" len
}
{
    token = $0
    len = ""
    if (index(token, "/")) { len = substr(token, index(token, "/") + 1); token = substr(token, 1, index(token, "/") - 1) }
    if (index(token, ":")) r = v6(token, len); else r = v4(token, len)
    if (r != "") print r
}'
}

# csf_entries FILE [DEPTH]: the addresses and CIDRs of a CSF allow/ignore
# file, one token per line (the first word of each line); Include lines are
# followed two levels deep, inside ROOT. Advanced filters
# (tcp|in|d=22|s=192.0.2.7) allow a protocol, port or direction only, while
# the agent's allowlist exempts an address from every block: they are not
# taken, and are listed in $TMP/csf-skipped instead.
csf_entries() {
    if [ ! -r "$ROOT$1" ]; then
        return 0
    fi
    sed -e 's/#.*//' "$ROOT$1" | while read -r first rest; do
        case $first in
            "") ;;
            Include)
                if [ "${2:-0}" -lt 2 ]; then
                    csf_entries "${rest%% *}" $((${2:-0} + 1))
                fi
                ;;
            *"|"*) printf '%s (%s)\n' "$first" "$1" >>"$TMP/csf-skipped" ;;
            *) printf '%s\n' "$first" ;;
        esac
    done
    return 0
}

# host_addresses: this machine's global addresses (also with --root: they are
# the addresses of the host the staging tree is built on).
host_addresses() {
    if command -v ip >/dev/null 2>&1; then
        ip -o addr show scope global 2>/dev/null | awk '{ sub(/\/.*/, "", $4); print $4 }'
    elif command -v hostname >/dev/null 2>&1; then
        hostname -I 2>/dev/null | tr ' ' '\n' | sed '/^$/d'
    fi
    return 0
}

host_addresses | normalize | sort -u >"$TMP/own"
: >"$TMP/csf-skipped"
{
    csf_entries /etc/csf/csf.allow
    csf_entries /etc/csf/csf.ignore
} | normalize | sort -u >"$TMP/csf"
say "allowlist: $(wc -l <"$TMP/own" | tr -d ' ') own address(es), $(wc -l <"$TMP/csf" | tr -d ' ') CSF entr(ies)"
if [ -s "$TMP/csf-skipped" ]; then
    say "allowlist: skipped $(wc -l <"$TMP/csf-skipped" | tr -d ' ') port-restricted (advanced) CSF entr(ies); the allowlist exempts whole addresses from every block:"
    while read -r skipped; do
        say "  skipped: $skipped"
    done <"$TMP/csf-skipped"
fi

# ---------------------------------------------------------------- binary

if [ -z "$BINARY" ] && [ -z "$BINARY_URL" ]; then
    beside=$(dirname "$0")/fleetban-agent
    if [ -f "$beside" ]; then
        BINARY=$beside
    else
        die "no binary: pass --binary PATH or --binary-url URL"
    fi
fi
if [ -z "$BINARY" ]; then
    BINARY=$TMP/fleetban-agent
    if command -v curl >/dev/null 2>&1; then
        curl -fsSL --retry 3 -o "$BINARY" "$BINARY_URL" || die "cannot download $BINARY_URL"
    elif command -v wget >/dev/null 2>&1; then
        wget -q -O "$BINARY" "$BINARY_URL" || die "cannot download $BINARY_URL"
    else
        die "neither curl nor wget is installed to download $BINARY_URL"
    fi
fi
[ -f "$BINARY" ] || die "binary $BINARY does not exist"
if [ -n "$SHA256" ]; then
    actual=$(sha256sum "$BINARY" | awk '{ print $1 }')
    [ "$actual" = "$SHA256" ] || die "SHA-256 of $BINARY is $actual, expected $SHA256"
fi
cp "$BINARY" "$TMP/agent"
chmod 0755 "$TMP/agent"
NEW_VERSION=$("$TMP/agent" --version 2>/dev/null) || die "$BINARY does not run on this host"

# The configuration is generated and checked before anything is written.
WRITE_CONFIG=0
if [ -f "$ROOT$CONF_PATH" ] && [ "$RECONFIGURE" -eq 0 ]; then
    say "keeping $CONF_PATH (pass --reconfigure to rewrite it)"
    if [ -n "$CA_FILE" ] && ! grep -q '^ca_file' "$ROOT$CONF_PATH"; then
        warn "$CONF_PATH sets no ca_file: pass --reconfigure to use $CA_PATH"
    fi
else
    WRITE_CONFIG=1
    [ -n "$SERVER" ] || die "--server URL is required to write $CONF_PATH"
    {
        echo "# fleetban agent configuration, written by the fleetban installer."
        echo "# Every key is documented in agent.example.toml. Re-running the installer"
        echo "# keeps this file; pass --reconfigure to rewrite it."
        echo ""
        printf 'server = "%s"\n' "$SERVER"
        if [ -n "$CA_FILE" ] || [ -f "$ROOT$CA_PATH" ]; then
            printf 'ca_file = "%s"\n' "$CA_PATH"
        fi
        printf 'state_dir = "%s"\n' "$STATE_DIR"
        echo 'timezone = "local"'
        echo ""
        echo "[[source]]"
        echo 'kind = "exim"'
        printf 'path = "%s"\n' "$LOG_PATH"
        echo 'start_at = "end"'
        echo ""
        echo "[firewall]"
        printf 'backend = "%s"\n' "$BACKEND"
        echo 'scope = "smtp"'
        echo ""
        echo "[allowlist]"
        echo "# This host's own addresses, then the entries of /etc/csf/csf.allow and"
        echo "# /etc/csf/csf.ignore at install time."
        if [ -s "$TMP/csf-skipped" ]; then
            echo "# Not taken (port-restricted CSF filters; the allowlist exempts whole"
            echo "# addresses from every block):"
            sed 's/^/#   /' "$TMP/csf-skipped"
        fi
        echo "cidrs = ["
        sed 's/.*/  "&",/' "$TMP/own"
        sed 's/.*/  "&",/' "$TMP/csf"
        echo "]"
        echo ""
        echo "[detect]"
        echo "# Exim's smtp_accept_max (read from /etc/exim.conf; 0 = learn it from the log)."
        printf 'smtp_accept_max = %s\n' "$SMTP_ACCEPT_MAX"
    } >"$TMP/agent.toml"
    # A generated file that the new binary refuses never replaces a good one.
    check_flags=""
    [ -n "$ROOT" ] && check_flags="--no-host"
    # shellcheck disable=SC2086 # empty or one flag
    "$TMP/agent" check-config --config "$TMP/agent.toml" $check_flags >/dev/null ||
        die "the generated configuration is invalid (see above)"
fi

# ---------------------------------------------------------------- files

ensure_dir "$STATE_DIR" 0700
flush_pending_dirs
ensure_dir "$(dirname "$BIN_PATH")" 0755
ensure_dir "$(dirname "$UNIT_PATH")" 0755
ensure_dir "$CONF_DIR" 0755
flush_pending_dirs

if [ -n "$CA_FILE" ]; then
    if put "$CA_FILE" "$CA_PATH" 0644; then
        CHANGED=1
        CONFIG_CHANGED=1
        say "installed $CA_PATH"
    fi
fi

if [ "$WRITE_CONFIG" -eq 1 ]; then
    if put "$TMP/agent.toml" "$CONF_PATH" 0640; then
        CHANGED=1
        CONFIG_CHANGED=1
        say "wrote $CONF_PATH"
    fi
fi

# The configuration in place (kept or just written) must suit the new binary.
check_flags=""
[ -n "$ROOT" ] && check_flags="--no-host"
# shellcheck disable=SC2086 # empty or one flag
if ! "$TMP/agent" check-config --config "$ROOT$CONF_PATH" $check_flags >"$TMP/check" 2>&1; then
    cat "$TMP/check" >&2
    die "$CONF_PATH is refused by $NEW_VERSION; fix it or pass --reconfigure"
fi

OLD_VERSION=""
if [ -x "$ROOT$BIN_PATH" ]; then
    OLD_VERSION=$("$ROOT$BIN_PATH" --version 2>/dev/null || echo unknown)
fi
if put "$TMP/agent" "$BIN_PATH" 0755; then
    CHANGED=1
    BINARY_CHANGED=1
    if [ -n "$OLD_VERSION" ]; then
        say "upgraded $BIN_PATH: $OLD_VERSION -> $NEW_VERSION"
    else
        say "installed $BIN_PATH ($NEW_VERSION)"
    fi
fi

# The unit is deploy/systemd/fleetban-agent.service with the binary in
# /usr/local/bin (the packages install it in /usr/bin).
sed "s#/usr/bin/fleetban-agent#$BIN_PATH#g" >"$TMP/unit" <<'UNIT'
# fleetban agent: tails the Exim main log, blocks abusers locally and keeps
# the host firewall equal to the fleet blocklist.
#
# Installed by the fleetban-agent package as
# /usr/lib/systemd/system/fleetban-agent.service, or by deploy/agent/install.sh
# as /etc/systemd/system/fleetban-agent.service (binary in /usr/local/bin).
# Local changes: `systemctl edit fleetban-agent`.
[Unit]
Description=fleetban agent (Exim abuse detection, fleet blocklist)
Documentation=https://example.invalid/fleetban
Wants=network-online.target
After=network-online.target nftables.service firewalld.service csf.service lfd.service

[Service]
# READY=1 is sent once the firewall's first reconcile has run, so
# `systemctl start` returns with the host protected.
Type=notify
NotifyAccess=main
Environment=RUST_LOG=info
ExecStartPre=/usr/bin/fleetban-agent check-config --config /etc/fleetban/agent.toml
ExecStart=/usr/bin/fleetban-agent run --config /etc/fleetban/agent.toml
Restart=on-failure
RestartSec=5s
TimeoutStartSec=120s
TimeoutStopSec=30s
# Logs go to the journal: journalctl -u fleetban-agent
StandardOutput=journal
StandardError=journal
SyslogIdentifier=fleetban-agent

# Runs as root, but with only these capabilities: manage the firewall
# (nft, ipset, iptables, csf) and read /var/log/exim_mainlog (mode 0640,
# owned by the mail user).
CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW CAP_DAC_READ_SEARCH
AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW CAP_DAC_READ_SEARCH
NoNewPrivileges=yes
ProtectSystem=strict
# The state directory (credentials, spool, checkpoints) is the only place the
# agent writes; CSF keeps its temporary and permanent bans under /etc/csf and
# /var/lib/csf, iptables-legacy takes /run/xtables.lock.
StateDirectory=fleetban
StateDirectoryMode=0700
ReadWritePaths=/var/lib/fleetban
ReadWritePaths=-/etc/csf -/var/lib/csf -/var/log/lfd.log -/run/xtables.lock
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
UMask=0077

[Install]
WantedBy=multi-user.target
UNIT
if put "$TMP/unit" "$UNIT_PATH" 0644; then
    CHANGED=1
    UNIT_CHANGED=1
    say "installed $UNIT_PATH"
fi

# ---------------------------------------------------------------- enroll

if [ "$NO_ENROLL" -eq 0 ]; then
    if [ -f "$STATE_DIR/credentials.json" ]; then
        say "already enrolled (keeping $STATE_DIR/credentials.json)"
    else
        [ -n "$TOKEN" ] || die "--token TOKEN is required to enroll (or pass --no-enroll)"
        # The server is the configuration's; the token travels in the
        # environment, not on the command line.
        agent_id=$(FLEETBAN_ENROLL_TOKEN=$TOKEN "$BIN_PATH" enroll --config "$CONF_PATH") ||
            die "enrollment failed (see above)"
        CHANGED=1
        say "enrolled as agent $agent_id"
    fi
fi

# ---------------------------------------------------------------- start

if [ "$NO_START" -eq 0 ]; then
    have systemctl || die "systemctl not found: start the agent yourself, or pass --no-start"
    if [ "$UNIT_CHANGED" -eq 1 ]; then
        systemctl daemon-reload
    fi
    systemctl enable --quiet fleetban-agent.service
    if systemctl is-active --quiet fleetban-agent.service; then
        if [ "$BINARY_CHANGED" -eq 1 ] || [ "$UNIT_CHANGED" -eq 1 ] || [ "$CONFIG_CHANGED" -eq 1 ]; then
            say "restarting fleetban-agent"
            systemctl restart fleetban-agent.service || die "the agent did not restart: journalctl -u fleetban-agent"
            CHANGED=1
        fi
    else
        say "starting fleetban-agent"
        systemctl start fleetban-agent.service || die "the agent did not start: journalctl -u fleetban-agent"
        CHANGED=1
    fi
    "$BIN_PATH" status --config "$CONF_PATH" || warn "fleetban-agent status failed"
fi

if [ "$CHANGED" -eq 1 ]; then
    say "done: changed=yes"
else
    say "done: changed=no"
fi
