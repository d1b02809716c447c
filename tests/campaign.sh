#!/usr/bin/env bash
# The crash campaign (issue 11): N long kill -9 soaks (torture_long, one seed each) and the long
# LazyFS power-cut run, then a summary table: seed, kills, referrals, lost, duplicated, result.
#
#   tests/campaign.sh [N] [BASE_SEED]        # N soaks (default 20), seeds BASE_SEED+1..+N
#   CAMPAIGN_POWERCUTS=0 tests/campaign.sh 1 # skip the long power-cut run
#   CAMPAIGN_DIR=/var/tmp/c tests/campaign.sh   # where the logs go (default: a new temp dir)
#
# Runs from the repository root; honours CARGO_TARGET_DIR. Lost/duplicated are counted from the
# history checker's violation lines (it prints at most 50). Exit status 1 if any run failed.
set -u
cd "$(dirname "$0")/.."
N=${1:-20}
BASE=${2:-$(date +%s)}
DIR=${CAMPAIGN_DIR:-$(mktemp -d /tmp/refex-campaign.XXXXXX)}
mkdir -p "$DIR"
echo "campaign: $N soaks, base seed $BASE, logs in $DIR" >&2
cargo test --release --test it --no-run >"$DIR/build.log" 2>&1 || {
    echo "build failed, see $DIR/build.log" >&2
    exit 1
}

ROWS=()
FAILED=0
row() { # name seed log rc
    local name=$1 seed=$2 log=$3 rc=$4
    local kills refs lost dup result
    kills=$(grep -oE 'torture: [0-9]+ kills' "$log" | tail -1 | grep -oE '[0-9]+')
    refs=$(grep -oE 'torture: [0-9]+ kills, [0-9]+ referrals' "$log" | tail -1 | grep -oE '[0-9]+ referrals' | grep -oE '[0-9]+')
    if [ -z "$kills" ]; then # the power-cut run
        kills=$(grep -oE 'power cuts: [0-9]+ cuts' "$log" | tail -1 | grep -oE '[0-9]+')
        refs=$(grep -oE '[0-9]+ referrals handed over' "$log" | tail -1 | grep -oE '^[0-9]+')
    fi
    # Each violation is printed twice on failure (the list and the panic message): count refs.
    lost=$(grep -oE '[^ ]+: handed over, never delivered' "$log" | sort -u | wc -l)
    dup=$(grep -oE '[^ ]+: delivered [0-9]+ times' "$log" | sort -u | wc -l)
    if [ "$rc" = 0 ]; then result=ok; else result="FAIL(rc=$rc)"; FAILED=1; fi
    ROWS+=("$(printf '%-14s %-22s %7s %10s %6s %6s  %s' "$name" "$seed" "${kills:-?}" "${refs:-?}" "$lost" "$dup" "$result")")
}

for i in $(seq 1 "$N"); do
    seed=$((BASE + i))
    log="$DIR/soak-$seed.log"
    echo "soak $i/$N: REFEX_TORTURE_SEED=$seed" >&2
    REFEX_TORTURE_SEED=$seed cargo test --release --test it -- --ignored --exact \
        torture::torture_long --nocapture >"$log" 2>&1
    row "soak-$i" "$seed" "$log" $?
done

if [ "${CAMPAIGN_POWERCUTS:-1}" != 0 ]; then
    log="$DIR/powercuts.log"
    echo "long power-cut run" >&2
    cargo test --release --test it -- --ignored --exact powercut::power_cuts_long \
        --nocapture >"$log" 2>&1
    rc=$?
    seed=$(grep -oE 'power-cut seed [0-9]+' "$log" | grep -oE '[0-9]+$')
    row powercuts "${seed:-?}" "$log" $rc
fi

printf '%-14s %-22s %7s %10s %6s %6s  %s\n' run seed kills referrals lost dup result
for r in "${ROWS[@]}"; do echo "$r"; done
exit $FAILED
