#!/bin/bash
# Bad arguments to the benchmark scripts that need no kit: a clear error
# (exit status 2, the argument named), and nothing written.
# Usage: test-bench-args.sh SRCDIR BUILDDIR
set -u
src=$1 build=$2
script=$src/tests/bench/bench-qcow2-cached.py
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
fails=0
expect() {
    local what=$1 want=$2; shift 2
    local out rc
    out=$(TMPDIR=$tmp python3 "$script" --strata-img "$build/block/strata-img" \
          --tmp "$tmp" "$@" 2>&1); rc=$?
    if [ $rc -eq 2 ] && grep -q -- "$want" <<<"$out" &&
       [ -z "$(ls -A "$tmp")" ]; then
        echo "ok - $what"
    else
        echo "not ok - $what (exit $rc): $out"; fails=$((fails + 1))
    fi
}
expect "reps 0" "--reps must be at least 1" --reps 0
expect "reps not a number" "invalid int value" --reps x
expect "size not in MiB" "--size must be" --size 1000
expect "scale 0" "--scale must be" --scale 0
expect "chain without chain.json" "no chain.json there" --chain "$src"
expect "deep chain missing" "no chain.json there" --deep-chain "$tmp/nope"
expect "depths garbage" "--depths takes" --depths 64,x
expect "depths zero" "--depths must be positive" --depths 0
expect "unknown option" "unrecognized arguments" --frobnicate
expect "missing tool" "not found" --qemu-io /nonexistent/qemu-io
exit $fails
