#!/usr/bin/env bash
# Map distribution benchmark: N nodes connected to one server (a separate release-built process).
#   bench/map-fanout.sh 1000 10000
set -euo pipefail
cd "$(dirname "$0")/.."
# Each node holds one TLS connection: two file descriptors per node across the two processes.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
cargo build --release -p tunnel-server
cargo bench -p tunnel-tests --bench map_fanout -- "${@:-1000}"
