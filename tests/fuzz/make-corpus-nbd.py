#!/usr/bin/env python3
"""Writes the seed corpus of fuzz-nbd-server into tests/fuzz/corpus-nbd/:
client byte streams (handshake, options, requests) for the exports the
target serves ("e": 1 MiB writable, "ro": 64 KiB read-only).

    tests/fuzz/make-corpus-nbd.py [DIR]
"""
import os
import struct
import sys

OPTS_MAGIC = 0x49484156454F5054
REQ_MAGIC = 0x25609513
FIXED, NO_ZEROES = 1, 2
EXPORT_NAME, ABORT, LIST, INFO, GO, STRUCTURED, LIST_META, SET_META = (
    1, 2, 3, 6, 7, 8, 9, 10)
READ, WRITE, DISC, FLUSH, TRIM, CACHE, ZEROES, BLOCK_STATUS = range(8)
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO = 1, 2, 4, 8, 16


def flags(f=FIXED | NO_ZEROES):
    return struct.pack(">I", f)


def opt(code, payload=b""):
    return struct.pack(">QII", OPTS_MAGIC, code, len(payload)) + payload


def name(n):
    n = n.encode()
    return struct.pack(">I", len(n)) + n


def go(export, infos=(), code=GO):
    return opt(code, name(export) + struct.pack(">H", len(infos)) +
               b"".join(struct.pack(">H", i) for i in infos))


def meta(export, queries, code=SET_META):
    return opt(code, name(export) + struct.pack(">I", len(queries)) +
               b"".join(name(q) for q in queries))


def req(cmd, cookie, off, length, fl=0, payload=b""):
    return struct.pack(">IHHQQI", REQ_MAGIC, fl, cmd, cookie, off,
                       length) + payload


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "corpus-nbd")
    os.makedirs(out, exist_ok=True)
    ctx = ["base:allocation", "qemu:allocation-depth"]
    seeds = {
        "full-session": flags() + opt(STRUCTURED) + meta("e", ctx) +
        go("e", (0, 1, 2, 3)) +
        req(READ, 1, 0, 4096) +
        req(WRITE, 2, 4096, 512, FUA, b"\xa5" * 512) +
        req(BLOCK_STATUS, 3, 0, 1 << 20) +
        req(BLOCK_STATUS, 4, 0, 65536, REQ_ONE) +
        req(ZEROES, 5, 8192, 8192, NO_HOLE) +
        req(ZEROES, 6, 8192, 8192, FAST_ZERO) +
        req(TRIM, 7, 0, 4096) + req(FLUSH, 8, 0, 0) +
        req(READ, 9, 1 << 19, 65536, DF) + req(CACHE, 10, 0, 4096) +
        req(DISC, 11, 0, 0),
        "simple-replies": flags() + go("e") +
        req(READ, 1, 0, 512) + req(WRITE, 2, 0, 16, 0, b"x" * 16) +
        req(DISC, 3, 0, 0),
        "export-name": flags(FIXED) + opt(EXPORT_NAME, b"e") +
        req(READ, 1, 0, 4096),
        "list-info-abort": flags() + opt(LIST) + go("e", (1, 2), INFO) +
        meta("e", ["base:", "qemu:"], LIST_META) + go("nope", (), INFO) +
        opt(0x1234, b"junk") + opt(ABORT),
        "read-only": flags() + opt(STRUCTURED) +
        meta("ro", ["base:allocation"]) + go("ro") +
        req(WRITE, 1, 0, 8, 0, b"12345678") + req(READ, 2, 65000, 4096) +
        req(BLOCK_STATUS, 3, 0, 65536) + req(99, 4, 0, 0),
        "hostile-lengths": flags() + opt(STRUCTURED) + go("e") +
        req(READ, 1, (1 << 20) - 512, 1024) +
        req(READ, 2, 0, 64 << 20) + req(ZEROES, 3, 0, 0xFFFFFFFF) +
        req(BLOCK_STATUS, 4, 1 << 63, 4096),
    }
    for n, data in seeds.items():
        with open(os.path.join(out, n), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main()
