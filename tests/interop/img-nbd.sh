#!/usr/bin/env bash
# strata-img on NBD URIs against qemu-img on the same qemu-nbd exports:
# info, map, compare and convert over nbd+unix://, nbd:// (TCP on
# 127.0.0.1) and nbd+tcp://, a qcow2 file exported as is (probed as
# qcow2 through NBD), and bad URIs, unknown exports and absent servers
# worded as qemu-img words them.
#
#   img-nbd.sh PATH/TO/strata-img
set -uo pipefail
IMG=$(realpath "${1:?usage: img-nbd.sh PATH/TO/strata-img}")
. "$(dirname "$(realpath "$0")")/img-lib.sh"
command -v qemu-nbd >/dev/null || { echo "SKIP: no qemu-nbd"; exit 77; }

pids=()
cleanup() {
    for f in "${pids[@]}"; do [ -f "$f" ] && kill -9 "$(cat "$f")"; done
    rm -rf "$tmp"
}
trap cleanup EXIT

# serve NAME FILE FMT ARGS...: qemu-nbd in the background (two clients
# at once: compare opens the export twice).
serve() {
    local name=$1 file=$2 fmt=$3; shift 3
    qemu-nbd --fork --pid-file="$PWD/$name.pid" -f "$fmt" -x "$name" \
        -e 2 --persistent "$@" "$file" || bad "qemu-nbd $name"
    pids+=("$PWD/$name.pid")
}

qemu-img create -q -f qcow2 disk.qcow2 64M
qio -c 'write -P 0x11 0 1M' -c 'write -z 4M 1M' -c 'write -P 0x22 8M 64k' \
    -c 'write -P 0x33 63M 512' disk.qcow2
cp disk.qcow2 copy.qcow2
qemu-img convert -O raw disk.qcow2 disk.raw

serve exp disk.qcow2 qcow2 -k "$PWD/s.sock" -r
U="nbd+unix:///exp?socket=$PWD/s.sock"
port=$(python3 -c 'import socket; s = socket.socket()
s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
serve tcp disk.qcow2 qcow2 -b 127.0.0.1 -p "$port" -r
T="nbd://127.0.0.1:$port/tcp"
# The image file itself, unparsed: strata-img must probe qcow2 over NBD.
serve file copy.qcow2 raw -k "$PWD/f.sock" -r
F="nbd+unix:///file?socket=$PWD/f.sock"

for u in "$U" "$T" "nbd+tcp://127.0.0.1:$port/tcp" \
         "nbd:unix:$PWD/s.sock:exportname=exp" "$F"; do
    same "info $u" info "$u"
    same "info json $u" info --output=json "$u"
    same "map $u" map "$u"
    same "map json $u" map --output=json "$u"
done
same "info -f raw (the qcow2 bytes)" info -f raw "$F"
same "map -f raw" map --output=json -f raw "$F"

same "compare uri file" compare "$U" disk.raw
same "compare file uri" compare disk.raw "$T"
same "compare strict (allocation differs)" compare -s "$U" disk.raw
same "compare two exports" compare "$U" "$T"
same "compare probed qcow2" compare "$F" "$U"
cp disk.raw other.raw
qio -f raw -c 'write -P 0x44 9M 4k' other.raw
same "compare differs" compare "$U" other.raw

"$IMG" convert -O raw "$U" s.raw && qemu-img convert -O raw "$U" q.raw &&
    cmp -s s.raw q.raw && ok "convert to raw: same bytes" ||
    bad "convert to raw"
"$IMG" convert -O qcow2 "$T" s.qcow2 && compare_ok "convert tcp to qcow2" \
    s.qcow2 disk.raw
qemu-img convert -O qcow2 "$T" q.qcow2
same "convert keeps holes (map of result)" map --output=json s.qcow2
[ "$(alloc_map s.qcow2)" == "$(alloc_map q.qcow2)" ] &&
    ok "convert allocates as qemu-img" || bad "convert allocation"
"$IMG" convert -O raw "$F" f.raw && cmp -s f.raw disk.raw &&
    ok "convert of a probed qcow2 export" || bad "convert probed"
# Into an existing file (-n) full of other bytes: the zeroed and the
# hole ranges must be written as zeroes, the data as data (the target's
# writes leave the loop's thread when the source is an export).
python3 -c 'import sys; open(sys.argv[1], "wb").write(b"\xee" * (64 << 20))' \
    n.raw
"$IMG" convert -n -O raw "$U" n.raw && cmp -s n.raw disk.raw &&
    ok "convert -n over other bytes" || bad "convert -n"
python3 -c 'import sys; open(sys.argv[1], "wb").write(b"\xee" * (64 << 20))' \
    nq.qcow2.raw
qemu-img convert -O qcow2 nq.qcow2.raw nq.qcow2
"$IMG" convert -n -O qcow2 "$T" nq.qcow2 && compare_ok \
    "convert -n into an existing qcow2" nq.qcow2 disk.raw

# A thin overlay whose backing file is a remote image: the header names
# the export, and info, map and convert read through it as qemu-img does.
qemu-img create -q -f qcow2 -b "$U" -F raw thin.qcow2
qio -c 'write -P 0x55 2M 64k' thin.qcow2
same "info --backing-chain, NBD backing" info --backing-chain thin.qcow2
same "map, NBD backing" map --output=json thin.qcow2
"$IMG" convert -O raw thin.qcow2 t.raw &&
    qemu-img convert -O raw thin.qcow2 tq.raw && cmp -s t.raw tq.raw &&
    ok "convert through an NBD backing: same bytes" ||
    bad "convert through an NBD backing"
# With no backing format in the header, the export is probed (the qcow2
# bytes served raw must open as qcow2); the extension's magic is zeroed,
# which ends the list there.
qemu-img create -q -f qcow2 -b "$F" -F qcow2 nofmt.qcow2
python3 - nofmt.qcow2 <<'PY'
import struct, sys
f = open(sys.argv[1], "r+b"); h = f.read(4096)
off = struct.unpack(">I", h[100:104])[0]
while True:
    magic, ln = struct.unpack(">II", h[off:off + 8])
    if magic in (0, 0xE2792ACA):
        break
    off += 8 + (ln + 7) // 8 * 8
assert magic == 0xE2792ACA
f.seek(off); f.write(b"\0\0\0\0")
PY
qemu-img info nofmt.qcow2 | grep -q "backing file format" &&
    bad "nofmt.qcow2 still records a backing format"
same "info --backing-chain, NBD backing probed" info --backing-chain nofmt.qcow2
"$IMG" compare nofmt.qcow2 disk.raw >/dev/null &&
    ok "compare through a probed NBD backing" ||
    bad "compare through a probed NBD backing"
qemu-img create -q -f qcow2 -u -b "nbd+unix:///x?sock=1" -F raw bad.qcow2 64M
"$IMG" info --backing-chain bad.qcow2 >/dev/null 2>err.s
[ $? -eq 1 ] && grep -q "nbd+unix:///x?sock=1.*No valid URL specified" err.s &&
    ok "bad URI as a backing string: named, status 1" ||
    bad "bad URI as a backing string: $(cat err.s)"

# convert reads an export over several connections where the server
# allows it (NBD_FLAG_CAN_MULTI_CONN): four with qemu-nbd -e 4; with -e 2
# the third handshake goes unanswered and convert goes on with two (and
# does not wait the 30 s a first handshake may take); one where the flag
# is missing (-e 1).  A proxy in front of each server counts the
# connections.
cat > proxy.py <<'PY'
import socket, sys, threading
listen, target, count = sys.argv[1:4]
srv = socket.socket(socket.AF_UNIX)
srv.bind(listen)
srv.listen(16)
n = 0
def pump(a, b):
    try:
        while True:
            d = a.recv(1 << 20)
            if not d:
                break
            b.sendall(d)
    except OSError:
        pass
    for s in (a, b):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
while True:
    c, _ = srv.accept()
    n += 1
    with open(count, "w") as f:
        f.write("%d\n" % n)
    u = socket.socket(socket.AF_UNIX)
    u.connect(target)
    threading.Thread(target=pump, args=(c, u), daemon=True).start()
    threading.Thread(target=pump, args=(u, c), daemon=True).start()
PY
proxy() {   # proxy NAME TARGET: connections so far in NAME.count
    python3 proxy.py "$PWD/$1.psock" "$2" "$PWD/$1.count" &
    echo $! > "$PWD/$1.proxy.pid"
    disown
    pids+=("$PWD/$1.proxy.pid")
    for _ in $(seq 100); do [ -S "$PWD/$1.psock" ] && break; sleep 0.05; done
}
conns() { cat "$1.count" 2>/dev/null || echo 0; }
for e in 4 2 1; do
    serve "m$e" disk.raw raw -k "$PWD/m$e.sock" -r -e "$e"
    proxy "m$e" "$PWD/m$e.sock"
done
# (qemu-nbd takes the last -e: the one given here, not serve's -e 2.)
for case in "4 4" "2 3" "1 1"; do
    set -- $case
    rm -f mc.raw
    before=$(conns "m$1")
    start=$(date +%s%N)
    "$IMG" convert -f raw -O raw "nbd+unix:///m$1?socket=$PWD/m$1.psock" \
        mc.raw 2>err.s
    st=$?
    ms=$(( ($(date +%s%N) - start) / 1000000 ))
    [ $st -eq 0 ] && [ ! -s err.s ] && cmp -s mc.raw disk.raw &&
        [ $(( $(conns "m$1") - before )) = "$2" ] && [ "$ms" -lt 10000 ] &&
        ok "convert from qemu-nbd -e $1: $2 connections, same bytes" ||
        bad "convert -e $1: status $st, $(( $(conns "m$1") - before ))" \
            "connections (want $2), ${ms} ms, $(cat err.s)"
done
# Fewer on request (for measuring); garbage is said and keeps the four.
for case in "1 1" "2 2" "x 4" "9 4" "-1 4" " 4"; do
    set -- $case
    [ $# = 1 ] && set -- "" "$1"
    before=$(conns m4)
    STRATA_IMG_NBD_CONNECTIONS=$1 "$IMG" convert -f raw -O raw \
        "nbd+unix:///m4?socket=$PWD/m4.psock" mc.raw 2>err.s && cmp -s mc.raw disk.raw &&
        [ $(( $(conns m4) - before )) = "$2" ] &&
        { [ "$1" = 1 ] || [ "$1" = 2 ] && [ ! -s err.s ] ||
          grep -q "STRATA_IMG_NBD_CONNECTIONS: '$1' is not a number from 1 to 4; using 4" err.s; } &&
        ok "STRATA_IMG_NBD_CONNECTIONS='$1': $2 connections ($(cat err.s))" ||
        bad "STRATA_IMG_NBD_CONNECTIONS='$1': $(( $(conns m4) - before )) $(cat err.s)"
done
before=$(conns m4)
qemu-img convert -f raw -O raw "nbd+unix:///m4?socket=$PWD/m4.psock" mq.raw
[ $(( $(conns m4) - before )) = 1 ] &&
    ok "the proxy counts qemu-img's one connection" ||
    bad "proxy count for qemu-img: $(( $(conns m4) - before ))"
# -l: a snapshot loaded into the first connection is not in the others,
# so a source read at a snapshot keeps one connection.
cp disk.qcow2 copy2.qcow2 && qemu-img snapshot -c snap copy2.qcow2
qio -c 'write -P 0x66 0 1M' copy2.qcow2
serve snapq copy2.qcow2 raw -k "$PWD/sq.sock" -r -e 4
proxy snapq "$PWD/sq.sock"
"$IMG" convert -f qcow2 -l snap -O raw \
    "nbd+unix:///snapq?socket=$PWD/snapq.psock" ls.raw &&
    cmp -s ls.raw disk.raw && [ "$(conns snapq)" = 1 ] &&
    ok "convert -l over NBD: the snapshot's bytes, one connection" ||
    bad "convert -l over NBD: $(conns snapq) connections"

# ---- convert streaming into the target ----
# A raw target written through the page cache takes each data chunk as
# a stream: the NBD driver receives it into a 64 KiB staging buffer and
# each piece is written from there (block/img-convert.c, convert_sink),
# by default on worker threads that receive the large payloads and
# write straight into the target's file (convert_direct_sink), with
# STRATA_IMG_CONVERT_STREAM=1 inline on the loop's thread.  Which path a
# copy took shows in its writes: streamed, none is larger than 64 KiB,
# and they come from other threads than the main one or not; through a
# chunk buffer, the data goes out in 2 MiB writes.  The source has zero
# runs inside its data, holes, and a last block of 512 data bytes.
qemu-img create -q -f raw src.raw 64M
qio -f raw -c 'write -P 0x11 0 40M' -c 'write -P 0 1M 4k' \
    -c 'write -P 0 5M 256k' -c 'write -P 0 36M 64k' \
    -c 'write -P 0x22 56M 7M' -c 'write -P 0x33 63M 512' src.raw
qemu-img create -q -f raw zsrc.raw 128M
qio -f raw -c 'write -P 0 0 128M' zsrc.raw
qemu-img create -q -f raw hsrc.raw 16M
qio -f raw -c 'write -P 0x44 8M 4M' hsrc.raw
serve mp src.raw raw -k "$PWD/mp.sock" -r -e 4
serve zp zsrc.raw raw -k "$PWD/zp.sock" -r -e 4
serve hp hsrc.raw raw -k "$PWD/hp.sock" -r -e 4
M="nbd+unix:///mp?socket=$PWD/mp.sock"
Z="nbd+unix:///zp?socket=$PWD/zp.sock"
H="nbd+unix:///hp?socket=$PWD/hp.sock"
qemu-img convert -f raw -O raw "$M" q-map.raw
shm=$(mktemp -d /dev/shm/img-nbd.XXXXXX)
small="$PWD/small"
cleanup_stream() {
    mountpoint -q "$small" && umount "$small"
    rm -rf "$shm"
    cleanup
}
trap cleanup_stream EXIT
fill() {    # fill FILE SIZE: SIZE bytes of 0xee
    python3 -c 'import sys
open(sys.argv[1], "wb").write(b"\xee" * int(sys.argv[2]))' "$1" "$2"
}
# largest_write: the most bytes one pwrite/pwritev of data (not of
# zeroes: where the file system cannot zero a range, zeroes are written
# from a zero buffer, up to 1 MiB at a time) in the last streamed() wrote
# (0: none).
largest_write() {
    awk '/pwrite/ && / = [0-9]+$/ && !/"\\0\\0\\0\\0/ {
             n = $NF + 0; if (n > m) m = n }
         END { print m + 0 }' trace.out
}
# off_main_writes: how many of those writes came from another thread
# than the process's own (whose id its execve line bears).
off_main_writes() {
    awk '/execve\(/ && !main { main = $1 }
         /pwrite/ && / = [0-9]+$/ && !/"\\0\\0\\0\\0/ && $1 != main { n++ }
         END { print n + 0 }' trace.out
}
# streamed DESC WANT OUT SRC ARGS...: converts SRC to OUT under strace;
# the copy must equal SRC's bytes, and its writes show the path it took
# (WANT "threads": some, none over 64 KiB, from worker threads too;
# "stream": the same, all from the main thread; "buffer": 2 MiB ones;
# "none").
streamed() {
    local what=$1 want=$2 out=$3 src=$4; shift 4
    local big st path
    # (LeakSanitizer cannot run under ptrace; the untraced converts
    # above take the same paths with it.)
    # A file per thread (-ff), so that no call is cut in two by
    # another's; trace.out gets them all, each line led by its thread.
    rm -f trace.out trace.[0-9]*
    ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0" \
        strace -ff -qq -e trace=execve,pwrite64,pwritev,pwritev2 \
        -o trace "$IMG" convert "$@" -f raw -O raw "$src" "$out" \
        2>err.s
    st=$?
    for f in trace.[0-9]*; do sed "s/^/${f#trace.} /" "$f"; done > trace.out
    big=$(largest_write)
    if [ "$big" -eq 0 ]; then path=none
    elif [ "$big" -le 65536 ] && [ "$(off_main_writes)" -gt 0 ]; then
        path=threads
    elif [ "$big" -le 65536 ]; then path=stream
    elif [ "$big" -ge $((2 << 20)) ]; then path=buffer
    else path="writes of up to $big bytes"
    fi
    if [ $st -eq 0 ] && cmp -s "$out" "$(src_file "$src")" &&
        [ "$path" = "$want" ]; then
        ok "$what ($path, largest write $big)"
    else
        bad "$what: status $st, $path (want $want), $(cat err.s)"
    fi
}
src_file() {
    case $1 in "$M") echo src.raw ;; "$Z") echo zsrc.raw ;; *) echo hsrc.raw ;; esac
}
if ! strace -f -qq -o /dev/null true 2>/dev/null; then
    bad "strace cannot trace here: the streamed-convert checks need it"
else
    streamed "fresh target on a disk: streamed" threads m0.raw "$M"
    [ "$(alloc_map m0.raw)" == "$(alloc_map q-map.raw)" ] &&
        ok "fresh target on a disk: holes and zero runs as qemu-img's" ||
        bad "fresh target allocation: $(alloc_map m0.raw | tr '\n' ' ')" \
            "vs $(alloc_map q-map.raw | tr '\n' ' ')"
    streamed "fresh target in memory: streamed" threads "$shm/m1.raw" "$M"
    [ "$(alloc_map "$shm/m1.raw")" == "$(alloc_map q-map.raw)" ] &&
        ok "fresh target in memory: holes and zero runs as qemu-img's" ||
        bad "fresh target allocation: $(alloc_map "$shm/m1.raw" | tr '\n' ' ')"
    streamed "fresh target, holes around data" threads "$shm/h1.raw" "$H"
    [ "$(alloc_map "$shm/h1.raw" | tr '\n' ' ')" == "0 8388608 0 True True False 8388608 4194304 0 True False True 12582912 4194304 0 True True False " ] &&
        ok "holes around data stay holes" ||
        bad "holes around data: $(alloc_map "$shm/h1.raw" | tr '\n' ' ')"
    fill "$shm/m2.raw" $((64 << 20))
    streamed "-n onto a file in memory: streamed, zeroes written" threads \
        "$shm/m2.raw" "$M" -n
    fill "$shm/m2.raw" $((64 << 20))
    STRATA_IMG_CONVERT_STREAM=1 streamed \
        "-n onto a file in memory, STRATA_IMG_CONVERT_STREAM=1: streamed on the loop's thread" \
        stream "$shm/m2.raw" "$M" -n
    fill m4.raw $((64 << 20))
    streamed "-n onto data on a disk: streamed" threads m4.raw "$M" -n
    truncate -s 64M "$shm/m3.raw"
    streamed "-n --target-is-zero: streamed" threads "$shm/m3.raw" "$M" \
        -n --target-is-zero
    [ "$(alloc_map "$shm/m3.raw")" == "$(alloc_map q-map.raw)" ] &&
        ok "--target-is-zero: holes as qemu-img's fresh copy" ||
        bad "--target-is-zero allocation: $(alloc_map "$shm/m3.raw" |
            tr '\n' ' ')"
    streamed "-o preallocation=falloc: streamed" threads m5.raw "$M" \
        -o preallocation=falloc
    [ "$(stat -c %b m5.raw)" -ge $(( (64 << 20) / 512 )) ] &&
        ok "preallocation kept" || bad "preallocation: $(stat -c %b m5.raw)"
    # Each write stable as it completes, or no page cache: 2 MiB writes
    # from the chunk buffers, as before.  (O_DIRECT needs a file system
    # that takes it: tmpfs refuses the open.)
    streamed "-t writethrough: through buffers" buffer m6.raw "$M" \
        -t writethrough
    if [ "$(stat -f -c %T .)" != tmpfs ]; then
        streamed "-t none: through buffers" buffer m7.raw "$M" -t none
    fi
    STRATA_IMG_CONVERT_STREAM=0 streamed \
        "STRATA_IMG_CONVERT_STREAM=0: through buffers" buffer m8.raw "$M"
    STRATA_IMG_CONVERT_STREAM=1 streamed \
        "STRATA_IMG_CONVERT_STREAM=1: streamed on the loop's thread" stream \
        m8.raw "$M"
    for v in x 3 -1 ""; do
        STRATA_IMG_CONVERT_STREAM=$v streamed \
            "STRATA_IMG_CONVERT_STREAM='$v': streamed" threads m9.raw "$M"
        grep -q "STRATA_IMG_CONVERT_STREAM: '$v' is not a number from 0 to 2; using 2" err.s &&
            ok "STRATA_IMG_CONVERT_STREAM='$v' is said" ||
            bad "no word on '$v': $(cat err.s)"
    done
    # Data that is all zeroes (a server that reports no holes): nothing
    # is written to a fresh target, which stays one hole; under -n the
    # zeroes are written as zeroes (fallocate, not data).
    streamed "zeroes as data: nothing written" none "$shm/z1.raw" "$Z"
    [ "$(alloc_map "$shm/z1.raw")" == "0 134217728 0 True True False" ] &&
        ok "zeroes as data: the copy is a hole" ||
        bad "zeroes as data allocation: $(alloc_map "$shm/z1.raw" | tr '\n' ' ')"
    fill "$shm/z2.raw" $((128 << 20))
    streamed "-n, zeroes as data: zeroed, not written" none "$shm/z2.raw" \
        "$Z" -n
    # A qcow2 target allocates clusters as it is written: not streamed,
    # whose pieces land in no set order.
    ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0" \
        strace -f -qq -e trace=pwrite64,pwritev,pwritev2 -o trace.out \
        "$IMG" convert -f raw -O qcow2 "$M" m10.qcow2 2>err.s &&
        [ "$(largest_write)" -gt 65536 ] &&
        qemu-img compare -q -f raw -F qcow2 src.raw m10.qcow2 &&
        qemu-img check -q m10.qcow2 &&
        ok "qcow2 target: not streamed, the same bytes" ||
        bad "qcow2 target: largest write $(largest_write), $(cat err.s)"
    # Out of space: a streamed piece's write fails; the copy stops with
    # qemu-img's status and word, and nothing hangs.
    mkdir -p "$small"
    if mount -t tmpfs -o size=8m tmpfs "$small" 2>/dev/null; then
        timeout 60 "$IMG" convert -f raw -O raw "$M" "$small/o.raw" 2>err.s
        st=$?
        qemu-img convert -f raw -O raw "$M" "$small/q.raw" 2>err.q
        sq=$?
        [ $st -eq 1 ] && [ $sq -eq 1 ] &&
            grep -q "No space left on device" err.s &&
            ok "out of space: status 1 as qemu-img ($(cat err.s))" ||
            bad "out of space: status $st (qemu-img $sq): $(cat err.s)"
        umount "$small"
    else
        echo "note: cannot mount a small tmpfs here; out-of-space not run"
    fi
fi

same "unknown export" info "nbd+unix:///nope?socket=$PWD/s.sock"
same "empty export name" info "nbd+unix://?socket=$PWD/s.sock"
same "no server" info "nbd+unix:///exp?socket=$PWD/none.sock"
same "refused port" info "nbd://127.0.0.1:1/exp"
same "no socket" info "nbd+unix:///exp"
same "extra query" info "nbd+unix:///exp?socket=$PWD/s.sock&x=1"
same "query on tcp" info "nbd://127.0.0.1:$port/tcp?socket=x"
same "no host" info "nbd:///exp"
same "tls scheme" info "nbds://127.0.0.1/exp"
refuse "convert onto an export refused" - convert -n -O raw disk.raw "$U"
finish
