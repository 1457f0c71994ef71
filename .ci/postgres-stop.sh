#!/usr/bin/env bash
# Stop the private test cluster started by .ci/postgres.sh.
#
#   bash .ci/postgres-stop.sh            # stop it, keep its data for a fast restart
#   bash .ci/postgres-stop.sh --purge    # stop it and delete $TUNNEL_CI_PG_DIR
#
# Environment: TUNNEL_CI_PG_DIR (default /tmp/tunnel-ci-pg), as for postgres.sh.
# Safe to run when nothing is running or the directory does not exist.
set -euo pipefail

log() { printf '[postgres-stop.sh] %s\n' "$*" >&2; }
die() { printf '[postgres-stop.sh] ERROR: %s\n' "$*" >&2; exit 1; }

PURGE=0
for arg in "$@"; do
    case "$arg" in
        --purge) PURGE=1 ;;
        -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 0 ;;
        *) die "unknown argument '$arg' (only --purge is accepted)" ;;
    esac
done

BASE="${TUNNEL_CI_PG_DIR:-/tmp/tunnel-ci-pg}"
DATA="$BASE/data"
[[ "$BASE" == /* ]] || die "TUNNEL_CI_PG_DIR must be an absolute path, got '$BASE'"
[[ -L "$BASE" ]] && die "$BASE is a symlink; refusing to touch it"
(( EUID == 0 )) || die "must run as root"
unset PGDATA PGPORT PGHOST || true
cd /

as_pg() {
    if command -v runuser >/dev/null 2>&1; then
        runuser -u postgres -- "$@"
    else
        # shellcheck disable=SC2016  # $0/$@ are for the inner shell
        su postgres -s /bin/sh -c '"$0" "$@"' -- "$@"
    fi
}

postmaster_alive() {
    # Not pg_ctl status: that also reports a not-yet-reaped zombie as running.
    local pid state
    pid="$(sed -n 1p "$DATA/postmaster.pid" 2>/dev/null || true)"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    state="$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || true)"
    [[ -n "$state" && "$state" != Z && "$state" != X ]] || return 1
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null || true)" == postgres* ]]
}

if [[ -f "$DATA/postmaster.pid" ]] && ! postmaster_alive; then
    log "no server running in $DATA (removing stale postmaster.pid)"
    rm -f "$DATA/postmaster.pid"
elif [[ -f "$DATA/postmaster.pid" ]]; then
    ver="$(cat "$DATA/PG_VERSION" 2>/dev/null || true)"
    pg_ctl="/usr/lib/postgresql/$ver/bin/pg_ctl"
    if [[ -n "$ver" && -x "$pg_ctl" ]]; then
        log "stopping PostgreSQL in $DATA"
        as_pg "$pg_ctl" -D "$DATA" -m fast -w -t 60 stop >&2 \
            || as_pg "$pg_ctl" -D "$DATA" -m immediate -w -t 30 stop >&2 \
            || die "could not stop the server in $DATA"
    else
        # No matching pg_ctl (package removed?): signal the postmaster
        # directly. SIGINT = fast shutdown.
        pid="$(head -n 1 "$DATA/postmaster.pid" 2>/dev/null || true)"
        log "stopping postmaster pid $pid (no pg_ctl for version '$ver')"
        kill -INT "$pid"
        for _ in $(seq 1 300); do postmaster_alive || break; sleep 0.2; done
        postmaster_alive && die "postmaster $pid did not exit"
        rm -f "$DATA/postmaster.pid"
    fi
else
    log "no server running in $DATA"
fi

if (( PURGE )) && [[ -e "$BASE" ]]; then
    log "removing $BASE"
    rm -rf "$BASE"
fi
