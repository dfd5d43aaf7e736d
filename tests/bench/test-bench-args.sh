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

# nbd-floor (the measuring tool bench-nbd.py runs): usage errors exit 2,
# a failure to set up exits 1 with the reason, and nothing is created.
floor=$build/tests/bench/nbd-floor
floor_expect() {
    local what=$1 want_rc=$2 want=$3; shift 3
    local out rc
    out=$(cd "$tmp" && "$floor" "$@" 2>&1); rc=$?
    if [ $rc -eq "$want_rc" ] && grep -q -- "$want" <<<"$out" &&
       [ -z "$(ls -A "$tmp")" ]; then
        echo "ok - nbd-floor: $what"
    else
        echo "not ok - nbd-floor: $what (exit $rc): $out"
        ls -A "$tmp"; fails=$((fails + 1))
    fi
}
floor_expect "no arguments" 2 "usage: nbd-floor serve"
floor_expect "unknown mode" 2 "usage:" frob a b c
floor_expect "serve: cache mode garbage" 2 "usage:" serve s.sock f writeback
floor_expect "serve: reply mode garbage" 2 "usage:" serve s.sock f direct structure
floor_expect "serve: one argument too many" 2 "usage:" \
    serve s.sock f direct structured x
floor_expect "copy: 0 connections" 2 "usage:" copy s.sock e out 0 2
floor_expect "copy: 65 connections" 2 "usage:" copy s.sock e out 65 2
floor_expect "copy: depth not a number" 2 "usage:" copy s.sock e out 4 x
floor_expect "serve: no such file" 1 "nosuch.raw: No such file" \
    serve "$tmp/s.sock" "$tmp/nosuch.raw" direct
floor_expect "copy: no server" 1 "cannot negotiate with" \
    copy "$tmp/none.sock" e "$tmp/out" 4 2

# A server that clients feed garbage closes their connections and keeps
# serving; its file is unchanged.
head -c 1048576 /dev/urandom >"$tmp/f.raw"
sum=$(md5sum <"$tmp/f.raw")
"$floor" serve "$tmp/f.sock" "$tmp/f.raw" cached &
floor_pid=$!
for _ in $(seq 100); do [ -S "$tmp/f.sock" ] && break; sleep 0.05; done
if out=$(python3 - "$tmp/f.sock" 2>&1 <<'PY'
import os, socket, struct, sys

def conn():
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(sys.argv[1])
    assert s.recv(18)[:16] == b"NBDMAGICIHAVEOPT"
    return s

def closed(s):
    try:
        return s.recv(65536) == b""
    except ConnectionResetError:
        return True

def negotiated():
    s = conn()
    s.sendall(struct.pack(">I", 3) + b"IHAVEOPT" + struct.pack(">II", 1, 4) +
              b"disk")
    assert len(s.recv(10)) == 10
    return s

s = conn()                  # garbage for options
s.sendall(os.urandom(64))
assert closed(s), "handshake garbage"
s = negotiated()            # a request of bad magic, socket kept open
s.sendall(b"\xde\xad" * 14)
assert closed(s), "bad magic"
s = negotiated()            # a read past what the server takes
s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 1, 0, 1 << 30))
assert closed(s), "oversized read"
s = negotiated()            # a write cut short by the client's end
s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, 2, 0, 4096) + b"x" * 100)
s.close()
s = negotiated()            # and a good read still answers
s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 7, 4096, 4096))
got = b""
while len(got) < 16 + 4096:
    got += s.recv(65536)
magic, err, handle = struct.unpack(">IIQ", got[:16])
assert (magic, err) == (0x67446698, 0), (magic, err)
with open(sys.argv[1].replace("f.sock", "f.raw"), "rb") as f:
    f.seek(4096)
    assert got[16:] == f.read(4096), "read data"
PY
) && [ "$(md5sum <"$tmp/f.raw")" = "$sum" ]; then
    echo "ok - nbd-floor: garbage from clients, then a good read"
else
    echo "not ok - nbd-floor: garbage from clients: $out"; fails=$((fails + 1))
fi
kill $floor_pid; wait $floor_pid 2>/dev/null

# With structured replies: a STRUCTURED_REPLY option with a payload is
# refused and the handshake goes on; one without is granted, and a read
# is answered with one OFFSET_DATA chunk holding the file's bytes.
"$floor" serve "$tmp/s.sock" "$tmp/f.raw" cached structured &
floor_pid=$!
for _ in $(seq 100); do [ -S "$tmp/s.sock" ] && break; sleep 0.05; done
if out=$(python3 - "$tmp/s.sock" "$tmp/f.raw" 2>&1 <<'PY'
import socket, struct, sys

def recv_all(s, n):
    got = b""
    while len(got) < n:
        b = s.recv(n - len(got))
        assert b, "closed"
        got += b
    return got

s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
s.connect(sys.argv[1])
assert recv_all(s, 18)[:16] == b"NBDMAGICIHAVEOPT"
s.sendall(struct.pack(">I", 3))
for payload, want in ((b"x", 0x80000001), (b"", 1)):
    s.sendall(b"IHAVEOPT" + struct.pack(">II", 8, len(payload)) + payload)
    magic, opt, rtype, rlen = struct.unpack(">QIII", recv_all(s, 20))
    assert (opt, rtype, rlen) == (8, want, 0), (opt, hex(rtype), rlen)
s.sendall(b"IHAVEOPT" + struct.pack(">II", 1, 4) + b"disk")
recv_all(s, 10)
s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 7, 4096, 4096))
magic, flags, ctype, handle, clen, off = struct.unpack(
    ">IHHQIQ", recv_all(s, 28))
assert (magic, flags, ctype, handle, clen, off) == \
    (0x668e33ef, 1, 1, 7, 8 + 4096, 4096), (hex(magic), flags, ctype, clen)
with open(sys.argv[2], "rb") as f:
    f.seek(4096)
    assert recv_all(s, 4096) == f.read(4096), "read data"
PY
); then
    echo "ok - nbd-floor: structured replies"
else
    echo "not ok - nbd-floor: structured replies: $out"; fails=$((fails + 1))
fi
kill $floor_pid; wait $floor_pid 2>/dev/null
exit $fails
