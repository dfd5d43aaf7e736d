#!/usr/bin/env bash
# strata-img bench: output, semantics and errors, with qemu-img and qemu-io
# as the referees where they are installed.
#
#   img-bench.sh PATH/TO/strata-img
set -uo pipefail

IMG=${1:?usage: img-bench.sh PATH/TO/strata-img}
QEMU_IMG=${QEMU_IMG:-qemu-img}
QEMU_IO=${QEMU_IO:-qemu-io}
have_qemu_img=false; command -v "$QEMU_IMG" >/dev/null && have_qemu_img=true
have_qemu_io=false; command -v "$QEMU_IO" >/dev/null && have_qemu_io=true

tmp=$(mktemp -d "${TMPDIR:-/tmp}/img-bench.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
pass=0 fail=0

ok()   { pass=$((pass + 1)); echo "ok: $*"; }
bad()  { fail=$((fail + 1)); echo "FAIL: $*"; }

# run NAME ARGS...: runs strata-img, output in $tmp/out and $tmp/err.
run() {
    "$IMG" "$@" >"$tmp/out" 2>"$tmp/err"
}

# expect_run DESCRIPTION EXPECTED-FIRST-LINE ARGS...: a run that must
# succeed, print qemu-img's first line as given and a timing line.
expect_run() {
    local what=$1 first=$2; shift 2
    if ! run bench "$@"; then
        bad "$what: exit status $? ($(head -c 300 "$tmp/err"))"
        return
    fi
    if [ "$(head -n 1 "$tmp/out")" != "$first" ]; then
        bad "$what: first line is '$(head -n 1 "$tmp/out")', not '$first'"
        return
    fi
    if ! tail -n 1 "$tmp/out" | grep -qE '^Run completed in [0-9]+\.[0-9]{3} seconds\.$'; then
        bad "$what: no 'Run completed in X.XXX seconds.' line: $(cat "$tmp/out")"
        return
    fi
    ok "$what"
}

# expect_error DESCRIPTION MESSAGE-REGEX ARGS...: a run that must fail with
# status 1, a "strata-img: " message matching, and no timing line.
expect_error() {
    local what=$1 re=$2; shift 2
    run bench "$@"
    local st=$?
    if [ $st -ne 1 ]; then
        bad "$what: exit status $st, not 1"
    elif ! grep -qE "^strata-img: $re" "$tmp/err"; then
        bad "$what: message '$(head -n 2 "$tmp/err")' does not match '$re'"
    elif grep -q 'Run completed' "$tmp/out"; then
        bad "$what: printed a timing line"
    else
        ok "$what"
    fi
}

raw=$tmp/disk.raw
truncate -s 8M "$raw"

# ---- version and help ----
if run --version && head -n 1 "$tmp/out" | grep -qE '^strata-img version [0-9]+\.[0-9]+' &&
   grep -q 'qemu-img 7.2 dialect' "$tmp/out"; then
    ok "--version"
else
    bad "--version: $(cat "$tmp/out" "$tmp/err")"
fi
if run --help && grep -q '^  bench ' "$tmp/out"; then ok "--help lists bench"; else bad "--help"; fi
if run bench --help && grep -q 'strata-img bench' "$tmp/out"; then ok "bench --help"; else bad "bench --help"; fi
run frobnicate; st=$?
if [ $st -eq 1 ] && grep -q "Command not found: frobnicate" "$tmp/err"; then
    ok "unknown subcommand"
else
    bad "unknown subcommand: status $st"
fi

# ---- reads and writes on a raw file ----
expect_run "raw read" \
    "Sending 1000 read requests, 4096 bytes each, 8 in parallel (starting at offset 0, step size 4096)" \
    -c 1000 -d 8 -f raw "$raw"
expect_run "raw read wrapping past the end (5000 x 4k on 8M)" \
    "Sending 5000 read requests, 4096 bytes each, 64 in parallel (starting at offset 0, step size 4096)" \
    -c 5000 -f raw "$raw"
expect_run "raw read, offset and step" \
    "Sending 100 read requests, 512 bytes each, 4 in parallel (starting at offset 4096, step size 8192)" \
    -c 100 -d 4 -s 512 -o 4k -S 8k -f raw "$raw"
for t in none writeback writethrough directsync unsafe; do
    expect_run "raw read -t $t" \
        "Sending 64 read requests, 4096 bytes each, 64 in parallel (starting at offset 0, step size 4096)" \
        -c 64 -t $t -f raw "$raw"
done
for i in threads io_uring; do
    expect_run "raw read -i $i" \
        "Sending 64 read requests, 4096 bytes each, 64 in parallel (starting at offset 0, step size 4096)" \
        -c 64 -i $i -f raw "$raw"
done

# A full pass of 2048 x 4 KiB covers the 8 MiB once: every byte is 0x5a.
expect_run "raw write --pattern=0x5a" \
    "Sending 2048 write requests, 4096 bytes each, 16 in parallel (starting at offset 0, step size 4096)" \
    -w --pattern=0x5a -c 2048 -d 16 -f raw "$raw"
if $have_qemu_io; then
    if "$QEMU_IO" -f raw -c 'read -P 0x5a 0 8M' "$raw" >"$tmp/qio" 2>&1 &&
       ! grep -q 'Pattern verification failed' "$tmp/qio"; then
        ok "qemu-io reads 0x5a over the whole image"
    else
        bad "qemu-io read -P 0x5a: $(head -n 3 "$tmp/qio")"
    fi
else
    if cmp -s "$raw" <(head -c 8M /dev/zero | tr '\000' '\132'); then
        ok "the file holds 0x5a everywhere"
    else
        bad "the file does not hold 0x5a everywhere"
    fi
fi

expect_run "raw write, flush every 64" \
    "Sending 256 write requests, 4096 bytes each, 16 in parallel (starting at offset 0, step size 4096)" \
    -w --pattern=0xa5 --flush-interval=64 -c 256 -d 16 -f raw "$raw"
if grep -qx 'Sending flush every 64 requests' "$tmp/out"; then ok "flush line"; else bad "flush line missing"; fi
expect_run "raw write, flush every 64, no drain" \
    "Sending 256 write requests, 4096 bytes each, 16 in parallel (starting at offset 0, step size 4096)" \
    -w --flush-interval=64 --no-drain -c 256 -d 16 -t none -f raw "$raw"
if cmp -s <(head -c 1M "$raw") <(head -c 1M /dev/zero); then
    ok "the last run wrote pattern 0 over the first MiB"
else
    bad "the last run's default pattern 0 is not in the file"
fi
expect_run "-n (native AIO) with -t none" \
    "Sending 64 read requests, 4096 bytes each, 64 in parallel (starting at offset 0, step size 4096)" \
    -c 64 -n -t none -f raw "$raw"
expect_error "-n without O_DIRECT, refused as qemu-img refuses it" \
    "Could not open '.*': aio=native was specified, but it requires cache.direct=on" -n -f raw "$raw"

# A failing request ends the run with status 1 and no timing line; the
# 50th read fails, so the requests around it were in flight and drain.
blkdebug="driver=raw,file.driver=blkdebug,file.inject-error.0.event=read_aio"
blkdebug="$blkdebug,file.inject-error.0.errno=5,file.inject-error.0.x-after=50"
blkdebug="$blkdebug,file.image.driver=file,file.image.filename=$raw"
expect_error "an injected EIO fails the run" "Failed request: Input/output error" \
    -c 1000 -d 16 --image-opts "$blkdebug"
blkdebug="driver=raw,file.driver=blkdebug,file.inject-error.0.event=flush_to_disk"
blkdebug="$blkdebug,file.inject-error.0.errno=28"
blkdebug="$blkdebug,file.image.driver=file,file.image.filename=$raw"
expect_error "an injected flush failure fails the run" "Failed request: No space left on device" \
    -w -c 256 -d 16 --flush-interval=64 --image-opts "$blkdebug"

expect_run "format probed as raw without -f" \
    "Sending 16 read requests, 4096 bytes each, 64 in parallel (starting at offset 0, step size 4096)" \
    -c 16 "$raw"
expect_run "-U" \
    "Sending 16 read requests, 4096 bytes each, 64 in parallel (starting at offset 0, step size 4096)" \
    -c 16 -U -f raw "$raw"
expect_run "--image-opts raw over file" \
    "Sending 16 read requests, 4096 bytes each, 64 in parallel (starting at offset 0, step size 4096)" \
    -c 16 --image-opts "driver=raw,file.driver=file,file.filename=$raw"

# ---- cache modes reach the file node (and its nested definitions) ----
if command -v strace >/dev/null && strace -f -o /dev/null true 2>/dev/null; then
    # open_mode ARGS...: "direct" or "buffered", how strata-img opened the
    # image in a successful run; "failed" otherwise.
    open_mode() {
        # LeakSanitizer cannot run under ptrace: no leak check here.
        if ! ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0" \
             strace -f -e trace=openat -o "$tmp/trace" "$IMG" bench -c 8 "$@" >/dev/null 2>&1 ||
           ! grep -q "\"$raw\"" "$tmp/trace"; then
            echo failed
        elif grep "\"$raw\"" "$tmp/trace" | grep -q O_DIRECT; then
            echo direct
        else
            echo buffered
        fi
    }
    for spec in "-f raw $raw" \
                "--image-opts driver=raw,file.driver=file,file.filename=$raw" \
                "--image-opts {\"driver\":\"raw\",\"file\":{\"driver\":\"file\",\"filename\":\"$raw\"}}"; do
        for t in none:direct directsync:direct writeback:buffered unsafe:buffered; do
            # shellcheck disable=SC2086
            got=$(open_mode -t ${t%%:*} $spec)
            if [ "$got" = "${t##*:}" ]; then ok "-t ${t%%:*} opens $got: $spec"
            else bad "-t ${t%%:*} opens $got, not ${t##*:}: $spec"; fi
        done
    done
    got=$(open_mode -t none --image-opts \
          "driver=raw,file.driver=file,file.filename=$raw,file.cache.direct=off")
    if [ "$got" = buffered ]; then
        ok "a node's own cache.direct=off wins over -t none"
    else
        bad "-t none with the spec's file.cache.direct=off opens $got"
    fi
else
    echo "note: no usable strace; cache mode checks skipped"
fi

# ---- null-co ----
expect_run "null-co read" \
    "Sending 20000 read requests, 4096 bytes each, 32 in parallel (starting at offset 0, step size 4096)" \
    -c 20000 -d 32 --image-opts driver=null-co,size=64M
expect_run "null-co write" \
    "Sending 20000 write requests, 65536 bytes each, 32 in parallel (starting at offset 0, step size 65536)" \
    -w -c 20000 -d 32 -s 64k --image-opts driver=null-co,size=64M

# ---- the same first line as qemu-img's ----
if $have_qemu_img; then
    for args in "-c 300 -d 4 -s 1k -S 3k -o 512" "-w -c 100 -d 2 --pattern=7"; do
        # shellcheck disable=SC2086
        q=$("$QEMU_IMG" bench -f raw $args "$raw" 2>/dev/null | head -n 1)
        # shellcheck disable=SC2086
        s=$("$IMG" bench -f raw $args "$raw" 2>/dev/null | head -n 1)
        if [ -n "$q" ] && [ "$q" = "$s" ]; then
            ok "same first line as qemu-img for '$args'"
        else
            bad "first line differs for '$args': qemu-img '$q', strata-img '$s'"
        fi
    done
fi

# ---- bad input: qemu-img's message, status 1 ----
expect_error "-c garbage" "Invalid request count specified" -c abc "$raw"
expect_error "-c negative" "Invalid request count specified" -c -1 "$raw"
expect_error "-c zero" "Invalid request count specified" -c 0 "$raw"
expect_error "-c too large" "Invalid request count specified" -c 4294967296 "$raw"
expect_error "-d garbage" "Invalid queue depth specified" -d x "$raw"
expect_error "-d zero" "Invalid queue depth specified" -d 0 "$raw"
expect_error "-d negative" "Invalid queue depth specified" -d -4 "$raw"
expect_error "-s garbage" "Invalid buffer size specified" -s x "$raw"
expect_error "-s zero" "Invalid buffer size specified" -s 0 "$raw"
expect_error "-s negative" "Invalid buffer size specified" -s -4k "$raw"
expect_error "-s 4G" "Invalid buffer size specified" -s 4G "$raw"
expect_error "-S garbage" "Invalid step_size specified" -S 1q "$raw"
expect_error "-o garbage" "Invalid offset specified" -o x "$raw"
expect_error "-o negative" "Invalid offset specified" -o -5 "$raw"
expect_error "-o beyond the end" "Offset 1073741824 is beyond the end of the image" -o 1G -f raw "$raw"
expect_error "-t unknown" "Invalid cache mode" -t bogus "$raw"
expect_error "-i unknown" "Invalid aio option: bogus" -i bogus "$raw"
expect_error "--pattern too large" "Invalid pattern byte specified" --pattern=300 "$raw"
expect_error "--pattern garbage" "Invalid pattern byte specified" --pattern=x "$raw"
expect_error "--flush-interval garbage" "Invalid flush interval specified" --flush-interval=x -w "$raw"
expect_error "--flush-interval without -w" "--flush-interval is only available in write tests" \
    --flush-interval=64 "$raw"
expect_error "--flush-interval below depth" "Flush interval can't be smaller than depth" \
    -w --flush-interval=4 -d 8 "$raw"
expect_error "no filename" "Expecting one image file name"
expect_error "two filenames" "Expecting one image file name" "$raw" "$raw"
expect_error "unknown option" "unrecognized option '--bogus'" --bogus "$raw"
expect_error "missing argument" "argument for '-c' is missing" "$raw" -c
expect_error "missing file" "Could not open '$tmp/nope.raw'" -f raw "$tmp/nope.raw"
expect_error "unknown driver" "Could not open" --image-opts driver=no-such-driver
expect_error "--image-opts with -f" "--image-opts and --format are mutually exclusive" \
    -f raw --image-opts driver=null-co
expect_error "write on a read-only node" "Could not open" \
    -w --image-opts "driver=raw,read-only=on,file.driver=file,file.filename=$raw"

echo "img-bench: $pass passed, $fail failed"
[ $fail -eq 0 ]
