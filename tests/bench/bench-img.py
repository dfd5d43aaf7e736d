#!/usr/bin/env python3
"""bench-img -- strata-img bench against qemu-img bench, side by side.

Both tools get the same flags (qemu-img bench's), with -i io_uring. Each
repetition runs every row once, the two sides alternating order (qemu
first, then strata first on the next repetition), so a burst of noise on
a shared machine hits one sample of many rows, not every sample of one.
The time of a sample is the tool's own "Run completed in X seconds" (the
I/O phase only); medians and minima are reported, with ops/s and the ratio
strata/qemu (< 1: strata is faster).

Rows: null-co (no disk: the cost of the block layer itself), then a raw
file through the page cache (-t writeback) and with O_DIRECT (-t none).
The O_DIRECT rows are also compared to what the disk can do: fio with
io_uring, O_DIRECT, queue depth 32 and the same amount of I/O, run the way
shared/bench's `limit` runs it.

--variant NAME:VAR=VALUE[,VAR=VALUE...] adds a further strata side, run
with those environment variables (say STRATA_LOOP_OFFLOAD_MAX=0), in the
same alternation and with its own line per row: a knob is compared A/B in
one run.

Every sample is verified: exit status 0 and a parsed "Run completed"
line; after every write sample some of the blocks it wrote are read back
and must hold its pattern (0xa5 for strata, 0x5a for qemu), and at the end
qemu-io reads the whole file back after one full sequential write by each
side.

Stdlib only. See tests/bench/README.md.
"""

import argparse
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

RUN_RE = re.compile(r"^Run completed in ([0-9.]+) seconds\.$", re.M)
SEND_RE = re.compile(r"^Sending (\d+) (read|write) requests, (\d+) bytes each, "
                     r"(\d+) in parallel \(starting at offset (\d+), step size (\d+)\)$", re.M)
GOLDEN = (math.sqrt(5) - 1) / 2
PATTERN = {"qemu": 0x5A, "strata": 0xA5}
KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB


class BenchError(RuntimeError):
    pass


def pattern_of(side):
    """Variants of strata ("strata:NAME") write strata's pattern."""
    return PATTERN["qemu" if side == "qemu" else "strata"]


def log(msg):
    sys.stderr.write("[%s] %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


def golden_step(size, block):
    """A stride of ~0.618 of the image, coprime with the number of blocks:
    consecutive requests land far apart and `count` requests touch `count`
    distinct blocks (qemu-img bench has no random mode)."""
    n = size // block
    k = max(1, int(round(n * GOLDEN)))
    while math.gcd(k, n) != 1:
        k += 1
    return k * block


def fio_limit_args(path, size, io, rw, bs):
    """fio's arguments for a disk-limit row: the shared kit's limit suite
    (io_uring, O_DIRECT, depth 32) doing @io bytes of @rw in @bs blocks
    on @path, @size bytes of it."""
    return ["--name=limit", "--filename=%s" % path, "--size=%d" % size,
            "--io_size=%d" % io, "--rw=%s" % rw, "--bs=%d" % bs,
            "--iodepth=32", "--direct=1", "--ioengine=io_uring",
            "--randrepeat=1", "--output-format=json"]


def fio_seconds(out, rw):
    """The run time in seconds from fio's JSON output @out."""
    data = json.loads(out[out.index("{"):])
    d = data["jobs"][0]["read" if "read" in rw else "write"]
    if not d.get("runtime"):
        raise BenchError("fio reported no runtime for %s" % rw)
    return d["runtime"] / 1000.0


def evict(path):
    """Write back and drop this one file's page cache (never a global drop)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm(path):
    with open(path, "rb") as f:
        while f.read(8 * MIB):
            pass


class Row:
    """One measurement: a bench command line without the tool."""

    def __init__(self, name, target, write, bs, count, step=None, cache="writeback",
                 limit=None):
        self.name = name
        self.target = target      # "null" or "file"
        self.write = write
        self.bs = bs
        self.count = count
        self.step = step or bs
        self.cache = cache
        self.limit = limit        # (fio rw, bs, io bytes) or None
        self.samples = {}         # side -> times; filled by Bench.measure
        self.failures = []
        self.limit_samples = []

    def args(self, side, path, null_size):
        a = ["bench", "-c", str(self.count), "-d", "32", "-s", str(self.bs),
             "-S", str(self.step), "-i", "io_uring"]
        if self.write:
            a += ["-w", "--pattern=%d" % pattern_of(side)]
        if self.target == "null":
            a += ["--image-opts", "driver=null-co,size=%d" % null_size]
        else:
            a += ["-f", "raw", "-t", self.cache, path]
        return a


def make_rows(size, scale):
    def n(x):
        return max(64, int(x * scale))
    per_gib = size / float(GIB)
    rr, rw, seq = n(65536 * per_gib), n(32768 * per_gib), n(16384 * per_gib)
    step4k = golden_step(size, 4 * KIB)
    rows = [
        Row("null-co read 4k qd32", "null", False, 4 * KIB, n(1000000)),
        Row("null-co write 4k qd32", "null", True, 4 * KIB, n(1000000)),
        Row("null-co read 64k seq qd32", "null", False, 64 * KIB, n(1000000)),
    ]
    for cache in ("writeback", "none"):
        tag = "page cache" if cache == "writeback" else "O_DIRECT"
        direct = cache == "none"
        rows += [
            Row("raw %s read 4k rand qd32" % tag, "file", False, 4 * KIB, rr, step4k, cache,
                ("randread", 4 * KIB, rr * 4 * KIB) if direct else None),
            Row("raw %s write 4k rand qd32" % tag, "file", True, 4 * KIB, rw, step4k, cache,
                ("randwrite", 4 * KIB, rw * 4 * KIB) if direct else None),
            Row("raw %s read 64k seq qd32" % tag, "file", False, 64 * KIB, seq, None, cache,
                ("read", 64 * KIB, seq * 64 * KIB) if direct else None),
            Row("raw %s write 64k seq qd32" % tag, "file", True, 64 * KIB, seq, None, cache,
                ("write", 64 * KIB, seq * 64 * KIB) if direct else None),
        ]
    return rows


class Bench:
    def __init__(self, a):
        self.a = a
        self.tools = {"qemu": shlex.split(a.qemu_img), "strata": shlex.split(a.strata_img)}
        self.envs = {}
        for name, env in a.variants:
            self.tools["strata:" + name] = self.tools["strata"]
            self.envs["strata:" + name] = dict(os.environ, **env)
        self.sides = list(self.tools)
        self.qemu_io = shlex.split(a.qemu_io)
        self.tmp = tempfile.mkdtemp(prefix="bench-img.", dir=a.tmp)
        self.path = os.path.join(self.tmp, "disk.raw")

    def run(self, cmd, timeout=600, env=None):
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True, timeout=timeout, env=env)
        if p.returncode != 0:
            raise BenchError("%s: exit status %d: %s" % (" ".join(cmd), p.returncode,
                                                         p.stderr.strip()[:500]))
        return p

    def bench(self, side, args):
        p = self.run(self.tools[side] + args, env=self.envs.get(side))
        m = RUN_RE.search(p.stdout)
        s = SEND_RE.search(p.stdout)
        if not m or not s:
            raise BenchError("%s bench: no 'Sending'/'Run completed' line in: %r"
                             % (side, p.stdout[:300]))
        return float(m.group(1)), s

    def make_file(self):
        log("filling a %d MiB raw file with data (once)" % (self.a.size // MIB))
        with open(self.path, "wb") as f:
            f.truncate(self.a.size)
        # Non-zero data everywhere, written by QEMU: the reads read real
        # blocks, and no block holds either side's pattern yet.
        self.bench("qemu", ["bench", "-w", "--pattern=17", "-f", "raw", "-t", "none",
                            "-s", str(MIB), "-c", str(self.a.size // MIB), "-d", "8",
                            self.path])
        evict(self.path)

    def verify_blocks(self, row, side, sent, samples=16):
        """Reads back some of the blocks a write sample wrote."""
        count, bs = int(sent.group(1)), int(sent.group(3))
        offset, step = int(sent.group(5)), int(sent.group(6))
        want = bytes([pattern_of(side)]) * bs
        # The last `count` requests overwrite any earlier ones at the same
        # place, so check blocks among the last distinct ones written.
        distinct = min(count, self.a.size // step)
        picks = sorted(set(int(i * (distinct - 1) / max(1, samples - 1))
                           for i in range(samples)))
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for k in picks:
                i = count - distinct + k
                off = (offset + i * step) % self.a.size
                if os.pread(fd, bs, off) != want:
                    raise BenchError("%s %s: block at %d does not hold pattern 0x%02x"
                                     % (side, row.name, off, pattern_of(side)))
        finally:
            os.close(fd)

    def sample(self, row, side):
        if row.target == "file":
            if row.cache == "none":
                evict(self.path)
            else:
                warm(self.path)
        secs, sent = self.bench(side, row.args(side, self.path, self.a.null_size))
        if row.write and row.target == "file":
            self.verify_blocks(row, side, sent)
        return secs

    def fio(self, row):
        rw, bs, io = row.limit
        evict(self.path)
        p = self.run(shlex.split(self.a.fio) +
                     fio_limit_args(self.path, self.a.size, io, rw, bs))
        return fio_seconds(p.stdout, rw)

    def final_check(self):
        """One full sequential write per side, read back by qemu-io."""
        ok = True
        for side in ("strata", "qemu"):
            self.bench(side, ["bench", "-w", "--pattern=%d" % PATTERN[side], "-f", "raw",
                              "-t", "none", "-i", "io_uring", "-s", str(MIB),
                              "-c", str(self.a.size // MIB), "-d", "8", self.path])
            if shutil.which(self.qemu_io[0]):
                p = subprocess.run(self.qemu_io + [
                    "-f", "raw", "-c", "read -P 0x%02x 0 %d" % (PATTERN[side], self.a.size),
                    self.path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    universal_newlines=True)
                good = p.returncode == 0 and "Pattern verification failed" not in p.stdout \
                    and ("read %d/%d bytes" % (self.a.size, self.a.size)) in p.stdout
            else:
                want = bytes([PATTERN[side]]) * MIB
                with open(self.path, "rb") as f:
                    good = all(f.read(MIB) == want for _ in range(self.a.size // MIB))
            log("final read-back of %s's full write: %s" % (side, "ok" if good else "FAILED"))
            ok = ok and good
        return ok

    def measure(self, rows):
        if any(r.target == "file" for r in rows):
            self.make_file()
        for row in rows:
            row.samples = {side: [] for side in self.sides}
        for rep in range(self.a.reps):
            order = self.sides if rep % 2 == 0 else self.sides[::-1]
            log("repetition %d/%d (%s first)" % (rep + 1, self.a.reps, order[0]))
            for row in rows:
                for side in order:
                    try:
                        row.samples[side].append(self.sample(row, side))
                    except (BenchError, subprocess.TimeoutExpired) as e:
                        row.failures.append("rep %d %s: %s" % (rep + 1, side, e))
                        log("FAILED: %s %s: %s" % (row.name, side, e))
                if row.limit and self.a.limit and shutil.which(shlex.split(self.a.fio)[0]):
                    try:
                        row.limit_samples.append(self.fio(row))
                    except (BenchError, subprocess.TimeoutExpired, ValueError) as e:
                        row.failures.append("rep %d fio: %s" % (rep + 1, e))

    def cleanup(self):
        if not self.a.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)


def fmt_time(xs):
    if not xs:
        return "—"
    return "%.3f (%.3f)" % (statistics.median(xs), min(xs))


def fmt_rate(count, xs):
    if not xs:
        return "—"
    med = statistics.median(xs)
    return "%.1fk" % (count / med / 1e3) if med > 0 else "∞"


def report(rows, reps):
    out = []
    out.append("| row | requests | qemu-img s, median (min) | strata-img s, median (min) "
               "| qemu ops/s | strata ops/s | strata/qemu | strata % of disk limit |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        q = r.samples.get("qemu", [])
        # strata, then each variant on a line of its own
        for side in [k for k in r.samples if k != "qemu"]:
            s = r.samples[side]
            name = r.name if side == "strata" else "%s [%s]" % (r.name, side[len("strata:"):])
            ratio = "—"
            if q and s and statistics.median(q) > 0:
                ratio = "%.2f" % (statistics.median(s) / statistics.median(q))
            lim = "—"
            if r.limit_samples and s:
                lim = "%.0f %%" % (100.0 * statistics.median(r.limit_samples) /
                                   statistics.median(s))
            out.append("| %s | %d | %s | %s | %s | %s | %s | %s |" % (
                name, r.count, fmt_time(q), fmt_time(s), fmt_rate(r.count, q),
                fmt_rate(r.count, s), ratio, lim))
    out.append("")
    out.append("%d repetitions, sides alternating; time = the tool's own \"Run completed\" "
               "(I/O phase); ratio = median over median (< 1: strata faster); disk limit = "
               "fio io_uring O_DIRECT qd32, same I/O amount (median)." % reps)
    fails = [(r.name, f) for r in rows for f in r.failures]
    if fails:
        out.append("")
        out.append("FAILURES:")
        for name, f in fails:
            out.append("- %s: %s" % (name, f))
    return "\n".join(out)


def parse_variant(v):
    name, sep, spec = v.partition(":")
    env = {}
    for kv in spec.split(","):
        k, eq, val = kv.partition("=")
        if not eq or not k:
            raise argparse.ArgumentTypeError("bad variant %r: want NAME:VAR=VALUE[,...]" % v)
        env[k] = val
    if not sep or not re.match(r"^[\w.-]+$", name) or name in ("qemu", "strata"):
        raise argparse.ArgumentTypeError("bad variant %r: want NAME:VAR=VALUE[,...]" % v)
    return name, env


def parse_size(s):
    m = re.match(r"^(\d+)([kKmMgG]?)$", s)
    if not m:
        raise argparse.ArgumentTypeError("bad size %r" % s)
    return int(m.group(1)) * {"": 1, "k": KIB, "m": MIB, "g": GIB}[m.group(2).lower()]


def main(argv=None):
    here = os.path.dirname(os.path.realpath(__file__))
    top = os.path.dirname(os.path.dirname(here))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", default=os.path.join(top, "build"),
                    help="build directory holding block/strata-img (default: build/)")
    ap.add_argument("--strata-img", help="strata-img to run (default: BUILD/block/strata-img)")
    ap.add_argument("--qemu-img", default=os.environ.get("QEMU_IMG", "qemu-img"))
    ap.add_argument("--qemu-io", default=os.environ.get("QEMU_IO", "qemu-io"))
    ap.add_argument("--fio", default=os.environ.get("FIO", "fio"))
    ap.add_argument("--reps", type=int, default=5, help="repetitions (default 5, at least 5 "
                    "for numbers worth quoting)")
    ap.add_argument("--size", type=parse_size, default=GIB, help="raw file size (default 1G)")
    ap.add_argument("--null-size", type=parse_size, default=GIB)
    ap.add_argument("--scale", type=float, default=1.0, help="scale every request count")
    ap.add_argument("--rows", default="", help="only rows whose name contains one of these "
                    "comma-separated words (e.g. null-co,O_DIRECT)")
    ap.add_argument("--variant", dest="variants", action="append", default=[],
                    type=parse_variant, metavar="NAME:VAR=VALUE[,...]",
                    help="also run strata-img with these environment variables, "
                    "as a side of its own (repeatable)")
    ap.add_argument("--no-limit", dest="limit", action="store_false",
                    help="skip the fio disk-limit runs")
    ap.add_argument("--tmp", default=os.environ.get("STRATA_BENCH_TMP"),
                    help="scratch parent directory (default $STRATA_BENCH_TMP or $TMPDIR)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--out", help="also write the Markdown table to this file")
    a = ap.parse_args(argv)
    if not a.strata_img:
        a.strata_img = os.path.join(a.build, "block", "strata-img")
    if a.reps < 1:
        ap.error("--reps must be at least 1")
    for tool in (a.strata_img, a.qemu_img):
        if not shutil.which(shlex.split(tool)[0]):
            ap.error("cannot run %s" % tool)

    rows = make_rows(a.size, a.scale)
    if a.rows:
        words = [w for w in a.rows.split(",") if w]
        rows = [r for r in rows if any(w in r.name for w in words)]
    b = Bench(a)
    try:
        b.measure(rows)
        final_ok = b.final_check() if any(r.target == "file" for r in rows) else True
    finally:
        b.cleanup()
    table = report(rows, a.reps)
    print(table)
    if a.out:
        with open(a.out, "w") as f:
            f.write(table + "\n")
    failed = any(r.failures for r in rows) or not final_ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
