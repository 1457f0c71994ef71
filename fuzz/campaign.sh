#!/usr/bin/env bash
# A fuzzing campaign: each target in turn (one at a time, nice 19), for up to 10 million runs or its
# time budget, on a grown corpus kept in fuzz/corpus-grown (not committed). Afterwards the grown
# corpus is reduced (-set_cover_merge) and the smallest new inputs, at most KEEP per target, are
# added to the committed corpus in fuzz/corpus. Figures go to fuzz/campaign.log.
#
# Usage: fuzz/campaign.sh [TARGET=SECONDS ...]   (binaries must be built: see README.md)
set -euo pipefail
cd "$(dirname "$0")"
triple="$(rustc -vV | sed -n 's/^host: //p')"
bin_dir="${CARGO_TARGET_DIR:-target}/$triple/release"
keep="${KEEP:-30}"
runs="${RUNS:-10000000}"
budgets=("$@")
[ "${#budgets[@]}" -gt 0 ] || budgets=(probe=240 stun=400 relay_frames=500 packet=600 dns=600 netmap=600 socks5=500 backup=500 wg_path=700 netstack=700)
export ASAN_OPTIONS="detect_odr_violation=0:${ASAN_OPTIONS:-}"
log="campaign.log"
echo "campaign start $(date -u +%FT%TZ) rev $(git rev-parse --short HEAD 2>/dev/null || echo ?)" >>"$log"
for b in "${budgets[@]}"; do
    t="${b%%=*}"
    secs="${b#*=}"
    mkdir -p "corpus-grown/$t" "artifacts/$t" "corpus-merged/$t"
    cp -n "corpus/$t"/* "corpus-grown/$t"/ 2>/dev/null || true
    start=$SECONDS
    set +e
    nice -n 19 "$bin_dir/$t" "corpus-grown/$t" -runs="$runs" -max_total_time="$secs" -max_len=16384 \
        -timeout=25 -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="artifacts/$t/" \
        >"artifacts/$t/campaign.out" 2>&1
    rc=$?
    set -e
    took=$((SECONDS - start))
    execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "artifacts/$t/campaign.out" | tail -1)"
    last="$(grep -E '^#[0-9]+' "artifacts/$t/campaign.out" | tail -1 | grep -oE 'cov: [0-9]+ ft: [0-9]+' || true)"
    crashes="$(find "artifacts/$t" -name 'crash-*' -o -name 'timeout-*' -o -name 'oom-*' -o -name 'leak-*' | wc -l)"
    echo "$t: rc=$rc execs=${execs:-?} ${last:-} time=${took}s budget=${secs}s crashes=$crashes grown=$(ls "corpus-grown/$t" | wc -l)" | tee -a "$log"
    # Reduce, then keep the smallest inputs that the committed corpus does not have yet.
    rm -rf "corpus-merged/$t" && mkdir -p "corpus-merged/$t"
    nice -n 19 "$bin_dir/$t" -set_cover_merge=1 -max_len=4096 -timeout=25 "corpus-merged/$t" "corpus-grown/$t" \
        >"artifacts/$t/merge.out" 2>&1 || true
    added=0
    for f in $(ls -S -r "corpus-merged/$t"); do
        [ "$added" -lt "$keep" ] || break
        [ -e "corpus/$t/$f" ] && continue
        cmp -s "corpus-merged/$t/$f" <(cat /dev/null) && continue
        cp "corpus-merged/$t/$f" "corpus/$t/$f"
        added=$((added + 1))
    done
    echo "$t: merged $(ls "corpus-merged/$t" | wc -l), added $added to corpus/$t" | tee -a "$log"
done
echo "campaign end $(date -u +%FT%TZ)" >>"$log"
