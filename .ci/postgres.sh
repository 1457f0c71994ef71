#!/usr/bin/env bash
# Start (or reuse) a private, throw-away PostgreSQL cluster for the test suite.
#
#   eval "$(bash .ci/postgres.sh)"      # or: export "$(bash .ci/postgres.sh)"
#   cargo test ...                      # tests read TUNNEL_TEST_POSTGRES_URL
#   bash .ci/postgres-stop.sh --purge   # stop it and delete its directory
#
# What it does, as root on Debian 12 (only Debian's package mirrors needed):
#   * installs Debian's `postgresql` package if it is not installed yet
#     (without letting the package start its default cluster on 5432);
#   * uses initdb/pg_ctl from /usr/lib/postgresql/<highest>/bin — never the
#     /usr/local/bin ones that some machines carry;
#   * keeps the cluster in $TUNNEL_CI_PG_DIR (default /tmp/tunnel-ci-pg), owned
#     by the `postgres` system user, listening on 127.0.0.1 only, with its unix
#     socket in a private 0700 directory;
#   * port: $PGPORT_TEST if set (that port or an error); otherwise the first
#     of 25432..25447 the server can bind. The default range lies below Linux's
#     ephemeral range (32768-60999), where any outgoing connection on the
#     machine can hold a port for a while: the red CI of 2026-12-03 was a bind
#     on 55432 failing with "Address already in use" while nothing listened;
#   * auth: scram-sha-256 over TCP, trust on the private unix socket only;
#   * creates role `tunnel` (password `tunnel`, LOGIN CREATEDB) and database
#     `tunnel_test` owned by it;
#   * prints exactly one line on stdout:
#       TUNNEL_TEST_POSTGRES_URL=postgres://tunnel:tunnel@127.0.0.1:PORT/tunnel_test
#     Everything else goes to stderr.
# Idempotent: a cluster from an earlier run in the same directory is reused
# (started again if it was stopped, moved to the requested port if needed).
#
# Environment:
#   PGPORT_TEST        TCP port (default: first free of 25432..25447)
#   TUNNEL_CI_PG_DIR   base directory (default /tmp/tunnel-ci-pg)
#   PG_READY_TIMEOUT   seconds to wait for the server to accept connections (default 60)
set -euo pipefail

# Real stdout is kept on fd 3 for the single result line; everything else,
# including apt/initdb/pg_ctl chatter, goes to stderr.
exec 3>&1 1>&2

log() { printf '[postgres.sh] %s\n' "$*" >&2; }
die() { printf '[postgres.sh] ERROR: %s\n' "$*" >&2; exit 1; }

if [[ -n "${PGPORT_TEST:-}" ]]; then
    PORT_CANDIDATES=("$PGPORT_TEST")
else
    PORT_CANDIDATES=({25432..25447})
fi
PORT="${PORT_CANDIDATES[0]}"
BASE="${TUNNEL_CI_PG_DIR:-/tmp/tunnel-ci-pg}"
READY_TIMEOUT="${PG_READY_TIMEOUT:-60}"
DATA="$BASE/data"
SOCK="$BASE/sock"
LOGFILE="$BASE/server.log"
ROLE=tunnel
PASS=tunnel
DB=tunnel_test

if ! [[ "$PORT" =~ ^[0-9]+$ ]] || (( PORT < 1024 || PORT > 65535 )); then
    die "PGPORT_TEST must be a port number in 1024..65535, got '$PORT'"
fi
[[ "$READY_TIMEOUT" =~ ^[0-9]+$ ]] || die "PG_READY_TIMEOUT must be an integer"
[[ "$BASE" == /* ]] || die "TUNNEL_CI_PG_DIR must be an absolute path, got '$BASE'"
(( EUID == 0 )) || die "must run as root (it installs packages and switches to the postgres user)"

# Client/server env vars from the caller must not redirect our own commands.
unset PGHOST PGHOSTADDR PGPORT PGUSER PGDATABASE PGPASSWORD PGPASSFILE \
      PGSERVICE PGSERVICEFILE PGOPTIONS PGSSLMODE PGDATA PGAPPNAME || true

# The postgres user may not be able to read the caller's cwd (e.g. /work/...),
# which makes initdb/psql print "could not change directory" noise.
cd /

t_start=$SECONDS

# ---------------------------------------------------------------- install ---
find_bindir() {
    # Highest /usr/lib/postgresql/<ver>/bin that has every binary we need.
    local d best=""
    # shellcheck disable=SC2012  # plain version-number dir names
    while IFS= read -r d; do
        if [[ -x $d/initdb && -x $d/pg_ctl && -x $d/postgres && -x $d/pg_isready && -x $d/psql ]]; then
            best=$d
        fi
    done < <(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V)
    printf '%s' "$best"
}

pkg_installed() {
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" == installed ]]
}

BINDIR="$(find_bindir)"
if ! pkg_installed postgresql || [[ -z "$BINDIR" ]]; then
    log "installing Debian package 'postgresql'"
    t_inst=$SECONDS
    export DEBIAN_FRONTEND=noninteractive
    # Keep the package's maintainer scripts from starting the default
    # 'main' cluster on port 5432 (standard policy-rc.d trick), unless the
    # machine already has its own policy.
    policy_created=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        policy_created=1
        trap '[[ $policy_created == 1 ]] && rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get update -q
    apt-get install -y -q --no-install-recommends postgresql
    if (( policy_created )); then
        rm -f /usr/sbin/policy-rc.d
        policy_created=0
    fi
    log "install took $((SECONDS - t_inst))s"
    BINDIR="$(find_bindir)"
    [[ -n "$BINDIR" ]] || die "postgresql installed but no usable /usr/lib/postgresql/*/bin found"
fi
getent passwd postgres >/dev/null || die "system user 'postgres' does not exist (should come with postgresql-common)"

PGVER="$(basename "$(dirname "$BINDIR")")"
log "using PostgreSQL $PGVER from $BINDIR"

as_pg() {
    # Run as the postgres user. fd 3 (our real stdout) is closed so that a
    # daemonised postmaster can never hold a caller's $(...) pipe open.
    if command -v runuser >/dev/null 2>&1; then
        runuser -u postgres -- "$@" 3>&-
    else
        # shellcheck disable=SC2016  # $0/$@ are for the inner shell
        su postgres -s /bin/sh -c '"$0" "$@"' -- "$@" 3>&-
    fi
}

port_in_use() {
    # true if something accepts TCP connections on 127.0.0.1:$PORT
    (exec 9<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null
}

server_ready() {
    "$BINDIR/pg_isready" -q -h 127.0.0.1 -p "$PORT" -d postgres -t 2 3>&-
}

wait_ready() {
    local deadline=$((SECONDS + READY_TIMEOUT))
    until server_ready; do
        if (( SECONDS >= deadline )); then
            log "server did not accept connections on 127.0.0.1:$PORT within ${READY_TIMEOUT}s; last log lines:"
            tail -n 40 "$LOGFILE" >&2 2>/dev/null || true
            die "PostgreSQL not ready"
        fi
        sleep 0.2
    done
}

# Server settings passed on every start, so a reused data dir always ends up
# on the chosen port/address no matter what an earlier run used.
pg_opts() {
    printf '%s' "-c port=$PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories=$SOCK"
}

# One attempt on $PORT. Returns 2 when the port is taken (something accepts on
# it, or the server's bind failed with "Address already in use"), 1 otherwise.
pg_start_once() {
    if port_in_use; then
        log "port $PORT on 127.0.0.1 is already in use by something that is not this cluster"
        return 2
    fi
    # Only called with no live postmaster on $DATA: socket lock files left in
    # our private socket dir by a crashed server hold its dead pid, which
    # (like postmaster.pid) can block the new server, so clear them.
    rm -f "$SOCK"/.s.PGSQL.*
    log "starting server on 127.0.0.1:$PORT (log: $LOGFILE)"
    local log_off
    log_off="$(stat -c %s "$LOGFILE" 2>/dev/null || echo 0)"
    if ! as_pg "$BINDIR/pg_ctl" -D "$DATA" -l "$LOGFILE" -o "$(pg_opts)" -w -t "$READY_TIMEOUT" start >&2; then
        local attempt
        attempt="$(tail -c +"$((log_off + 1))" "$LOGFILE" 2>/dev/null | tail -n 40 || true)"
        log "pg_ctl start failed; server log of this attempt:"
        printf '%s\n' "$attempt" >&2
        [[ "$attempt" == *'Address already in use'* ]] && return 2
        return 1
    fi
}

pg_start() {
    local candidate rc
    for candidate in "${PORT_CANDIDATES[@]}"; do
        PORT=$candidate
        rc=0
        pg_start_once || rc=$?
        case $rc in
            0) return 0 ;;
            2) continue ;;
            *) die "could not start PostgreSQL" ;;
        esac
    done
    if [[ -n "${PGPORT_TEST:-}" ]]; then
        die "port $PGPORT_TEST on 127.0.0.1 is in use; set PGPORT_TEST to a free port"
    fi
    die "ports ${PORT_CANDIDATES[0]}..${PORT_CANDIDATES[-1]} on 127.0.0.1 are all in use; set PGPORT_TEST to a free port"
}

# ------------------------------------------------------------ directories ---
if [[ -L "$BASE" ]]; then
    die "$BASE is a symlink; refusing to use it"
fi
if [[ -e "$BASE" && ! -d "$BASE" ]]; then
    die "$BASE exists and is not a directory"
fi
mkdir -p "$BASE"
owner="$(stat -c %U "$BASE")"
[[ "$owner" == postgres || "$owner" == root ]] || die "$BASE is owned by '$owner'; refusing to use it"
chown postgres:postgres "$BASE"
chmod 0700 "$BASE"
mkdir -p "$SOCK"
chown postgres:postgres "$SOCK"
chmod 0700 "$SOCK"

# ----------------------------------------------------------------- initdb ---
# A data dir is reusable only if it was fully initialised by the same major
# version; anything else (half-done initdb, other version) is recreated.
if [[ -d "$DATA" ]]; then
    if [[ ! -f "$DATA/PG_VERSION" || ! -f "$DATA/postgresql.conf" || ! -f "$DATA/global/pg_control" ]]; then
        log "incomplete data directory at $DATA; recreating it"
        as_pg "$BINDIR/pg_ctl" -D "$DATA" -m immediate -w stop >/dev/null 2>&1 || true
        rm -rf "$DATA"
    elif [[ "$(cat "$DATA/PG_VERSION")" != "$PGVER" ]]; then
        log "data directory at $DATA is for PostgreSQL $(cat "$DATA/PG_VERSION"), not $PGVER; recreating it"
        oldctl="/usr/lib/postgresql/$(cat "$DATA/PG_VERSION")/bin/pg_ctl"
        [[ -x "$oldctl" ]] && as_pg "$oldctl" -D "$DATA" -m fast -w stop >&2 2>/dev/null || true
        rm -rf "$DATA"
    fi
fi

if [[ ! -d "$DATA" ]]; then
    log "initdb in $DATA"
    pwfile="$(mktemp "$BASE/.pwfile.XXXXXX")"
    # The superuser gets a random, never-printed password (initdb wants one
    # when password auth is enabled); the script itself only ever uses the
    # superuser over the private, trust-authenticated unix socket.
    head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$pwfile"
    chown postgres:postgres "$pwfile"
    chmod 0600 "$pwfile"
    if ! as_pg "$BINDIR/initdb" -D "$DATA" -U postgres --pwfile="$pwfile" \
            --auth-host=scram-sha-256 --auth-local=trust \
            -E UTF8 --locale=C --no-sync >&2; then
        rm -f "$pwfile"
        rm -rf "$DATA"
        die "initdb failed"
    fi
    rm -f "$pwfile"
    # Test-cluster tuning: durability is irrelevant, speed is not.
    cat >> "$DATA/postgresql.conf" <<EOF

# --- added by .ci/postgres.sh (throw-away CI cluster) ---
password_encryption = scram-sha-256
unix_socket_permissions = 0700
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 200
logging_collector = off
EOF
    # Only the loopback lines: no other host may connect at all.
    cat > "$DATA/pg_hba.conf" <<EOF
# Written by .ci/postgres.sh
# TYPE  DATABASE  USER  ADDRESS       METHOD
local   all       all                 trust
host    all       all   127.0.0.1/32  scram-sha-256
host    all       all   ::1/128       scram-sha-256
EOF
    chown postgres:postgres "$DATA/postgresql.conf" "$DATA/pg_hba.conf"
    chmod 0600 "$DATA/pg_hba.conf"
fi

# ------------------------------------------------------------------ start ---
postmaster_alive() {
    # pg_ctl status only does kill(pid, 0), which also succeeds for a zombie:
    # after a crash (kill -9) in a container whose PID 1 is slow to reap, a
    # dead postmaster would look alive. Look at the process state instead.
    local pid state
    pid="$(sed -n 1p "$DATA/postmaster.pid" 2>/dev/null || true)"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    state="$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || true)"
    [[ -n "$state" && "$state" != Z && "$state" != X ]] || return 1
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null || true)" == postgres* ]]
}

if [[ -f "$DATA/postmaster.pid" ]] && ! postmaster_alive; then
    # Postgres would refuse to start while the old pid still "exists".
    log "removing stale $DATA/postmaster.pid (server crashed or was killed)"
    rm -f "$DATA/postmaster.pid"
fi

if postmaster_alive; then
    # Line 4 of postmaster.pid is the port the running server uses.
    running_port="$(sed -n 4p "$DATA/postmaster.pid" 2>/dev/null || true)"
    if [[ " ${PORT_CANDIDATES[*]} " == *" $running_port "* ]]; then
        PORT=$running_port
        log "reusing running cluster in $DATA on 127.0.0.1:$PORT"
    else
        # An earlier run with another PGPORT_TEST: move it to this port.
        log "cluster in $DATA is running on port '${running_port}', not one of ${PORT_CANDIDATES[*]}; restarting it"
        as_pg "$BINDIR/pg_ctl" -D "$DATA" -m fast -w -t "$READY_TIMEOUT" stop >&2 || die "could not stop the old server"
        pg_start
    fi
else
    pg_start
fi
wait_ready

# ------------------------------------------------------------- role + db ---
log "ensuring role '$ROLE' and database '$DB'"
as_pg "$BINDIR/psql" -X -q -v ON_ERROR_STOP=1 -h "$SOCK" -p "$PORT" -U postgres -d postgres >&2 <<SQL
SET client_min_messages = warning;
DO \$\$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '$ROLE') THEN
    CREATE ROLE $ROLE LOGIN CREATEDB PASSWORD '$PASS';
  ELSE
    ALTER ROLE $ROLE LOGIN CREATEDB PASSWORD '$PASS';
  END IF;
END
\$\$;
SELECT 'CREATE DATABASE $DB OWNER $ROLE'
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = '$DB')
\gexec
ALTER DATABASE $DB OWNER TO $ROLE;
SQL

URL="postgres://$ROLE:$PASS@127.0.0.1:$PORT/$DB"

# Prove the URL itself works over TCP with the password before handing it out.
if ! PGCONNECT_TIMEOUT=5 "$BINDIR/psql" -X -q -At "$URL" -c 'select 1' >/dev/null 3>&-; then
    die "cluster is up but '$URL' does not accept connections"
fi

log "ready in $((SECONDS - t_start))s: $URL"
printf 'TUNNEL_TEST_POSTGRES_URL=%s\n' "$URL" >&3
