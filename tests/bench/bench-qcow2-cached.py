#!/usr/bin/env python3
"""bench-qcow2-cached -- qcow2 guest I/O through a warm page cache:
strata-img bench against qemu-img bench, side by side.

shared/bench's `guestio` drops the images from the page cache before
every sample, so its `--bench-cache writeback` rows read from the disk.
The qcow2 issue's page-cache target is about the CPU: the same requests
on the same images with every file already in the page cache.  Rows (all
`-f qcow2 -t writeback -i io_uring -d 32`, the kit's request counts and
its golden-ratio stride for 4 KiB requests):

  fresh      a fully allocated 1 GiB image: rr4k, rw4k, sr64k, sw64k
  chain4     the top of the kit's chain (base + 4 overlays): rr4k,
             sr64k; rw4k and sw64k into a private copy of the top made
             before each sample (4 KiB writes copy-on-write from below)
  depthD     the top of D empty overlays of the kit's deep chain
             (--deep-chain, `mkchain -n 256 --overlay-frac 0 --touch-l2`):
             rr4k and sr64k with the kit's count scaled by 16/D

Method as shared/bench: one run, the sides alternating (qemu first, then
strata first on the next repetition), >= 5 repetitions, medians.  Every
file a sample touches is read once (cat) right before it.  Every sample
is verified: exit status 0 and a parsed "Run completed" line; after a
write sample `qemu-img check` passes on the written image and qemu-io
reads the side's pattern (0x5a QEMU, 0xa5 strata) back from the first
and last request's blocks.

  tests/bench/bench-qcow2-cached.py --chain /var/tmp/ch4 \\
      [--deep-chain /var/tmp/dc] [--depths 64,256] [--reps 5]

Stdlib only.
"""

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
_spec = importlib.util.spec_from_file_location(
    "bench_img", os.path.join(HERE, "bench-img.py"))
bench_img = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_img)
log, golden_step, RUN_RE = bench_img.log, bench_img.golden_step, \
    bench_img.RUN_RE
PATTERN = {"qemu": 0x5A, "strata": 0xA5}
MIB = 1 << 20
GIB = 1 << 30
# mode: (write, block, sequential, count per GiB) -- the kit's guestio
MODES = {
    "rr4k": (False, 4096, False, 65536),
    "rw4k": (True, 4096, False, 32768),
    "sr64k": (False, 65536, True, 16384),
    "sw64k": (True, 65536, True, 16384),
}


def run(cmd, timeout=900):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError("%s: exit status %d: %s" % (
            " ".join(cmd), p.returncode, (p.stdout + p.stderr).strip()[-400:]))
    return p.stdout


def warm(paths):
    for p in paths:
        bench_img.warm(p)


def chain_files(d):
    """Paths of a kit chain directory, bottom to top."""
    with open(os.path.join(d, "chain.json")) as f:
        meta = json.load(f)
    imgs = meta["images"] if isinstance(meta, dict) else meta
    return [os.path.join(d, i["file"]) for i in imgs]


class Row:
    def __init__(self, image, mode, files, count, private=None):
        self.image, self.mode = image, mode
        self.files = files          # every file the sample reads
        self.count = count
        self.private = private      # (top, backing) to copy per sample
        self.samples = {"qemu": [], "strata": []}
        self.failures = []

    @property
    def name(self):
        return "%s/%s" % (self.image, self.mode)


class Bench:
    def __init__(self, a):
        self.a = a
        self.tools = {"qemu": a.qemu_img, "strata": a.strata_img}
        self.tmp = tempfile.mkdtemp(prefix="bench-qcow2-cached.", dir=a.tmp)
        self.size = None

    def fresh(self):
        p = os.path.join(self.tmp, "fresh.qcow2")
        log("writing a fully allocated %d MiB qcow2 image (once)"
            % (self.a.size // MIB))
        run([self.a.qemu_img, "create", "-q", "-f", "qcow2", "-o",
             "cluster_size=65536", p, str(self.a.size)])
        run([self.a.qemu_img, "bench", "-w", "--pattern=17", "-f", "qcow2",
             "-t", "none", "-s", str(MIB), "-c", str(self.a.size // MIB),
             "-d", "8", p])
        return p

    def rows(self):
        a = self.a
        rows = []
        per_gib = a.size / float(GIB)

        def n(mode, factor=1.0):
            return max(32, int(MODES[mode][3] * per_gib * factor * a.scale))

        fresh = self.fresh()
        for m in ("rr4k", "rw4k", "sr64k", "sw64k"):
            rows.append(Row("fresh", m, [fresh], n(m)))
        if a.chain:
            files = chain_files(a.chain)
            for m in ("rr4k", "rw4k", "sr64k", "sw64k"):
                priv = (files[-1], files[-2]) if MODES[m][0] else None
                rows.append(Row("chain4", m, files, n(m), priv))
        if a.deep_chain:
            files = chain_files(a.deep_chain)
            for d in [int(x) for x in a.depths.split(",") if x]:
                if d >= len(files):
                    raise SystemExit("the deep chain has only %d overlays"
                                     % (len(files) - 1))
                f = 1.0 if d <= 16 else 16.0 / d
                for m in ("rr4k", "sr64k"):
                    rows.append(Row("depth%d" % d, m, files[:d + 1],
                                    n(m, f)))
        return rows

    def argv(self, side, row, path):
        write, block, seq, _ = MODES[row.mode]
        step = block if seq else golden_step(self.a.size, block)
        a = [self.tools[side], "bench", "-f", "qcow2", "-t", "writeback",
             "-i", "io_uring", "-d", "32", "-c", str(row.count),
             "-s", str(block), "-S", str(step)]
        if write:
            a += ["-w", "--pattern=%d" % PATTERN[side]]
        return a + [path], step

    def verify(self, side, row, path, step):
        block = MODES[row.mode][1]
        run([self.a.qemu_img, "check", "-q", "-f", "qcow2", path])
        size = self.a.size
        offs = sorted({0, ((row.count - 1) * step) % size})
        cmds = []
        for o in offs:
            cmds += ["-c", "read -P %d %d %d" % (PATTERN[side], o, block)]
        out = run([self.a.qemu_io, "-f", "qcow2", "-r"] + cmds + [path])
        if "Pattern verification failed" in out:
            raise RuntimeError("%s: pattern not found: %s" % (path, out[-300:]))

    def sample(self, side, row):
        path = row.files[-1]
        files = list(row.files)
        work = None
        if row.private:
            top, below = row.private
            work = os.path.join(self.tmp, "top-%s.qcow2" % side)
            subprocess.run(["cp", "--sparse=always", top, work], check=True)
            run([self.a.qemu_img, "rebase", "-u", "-f", "qcow2", "-b", below,
                 "-F", "qcow2", work])
            path = work
            files = files[:-1] + [work]
        try:
            warm(files)
            argv, step = self.argv(side, row, path)
            out = run(argv)
            m = RUN_RE.search(out)
            if not m:
                raise RuntimeError("no 'Run completed' line in: %r" % out[-300:])
            if MODES[row.mode][0]:
                self.verify(side, row, path, step)
            return float(m.group(1))
        finally:
            if work and os.path.exists(work):
                os.unlink(work)

    def go(self):
        rows = self.rows()
        try:
            for rep in range(self.a.reps):
                order = ["qemu", "strata"] if rep % 2 == 0 else ["strata", "qemu"]
                for row in rows:
                    for side in order:
                        try:
                            t = self.sample(side, row)
                            row.samples[side].append(t)
                            log("rep %d %s %s: %.3f s" % (rep + 1, row.name,
                                                          side, t))
                        except Exception as e:  # noqa: BLE001
                            row.failures.append("%s rep %d: %s" % (side, rep + 1, e))
                            log("FAILED %s %s: %s" % (row.name, side, e))
        finally:
            if not self.a.keep:
                shutil.rmtree(self.tmp, ignore_errors=True)
        return rows


def report(rows):
    lines = ["| row | requests | QEMU s, median (min) | strata s, median (min) "
             "| QEMU rate | strata rate | speed-up |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        q, s = r.samples["qemu"], r.samples["strata"]
        if not q or not s:
            lines.append("| %s | %d | incomplete | | | | |" % (r.name, r.count))
            continue
        qm, sm = statistics.median(q), statistics.median(s)
        block = MODES[r.mode][1]

        def rate(t):
            if block <= 16384:
                return "%.1fk IOPS" % (r.count / t / 1e3)
            return "%.0f MiB/s" % (r.count * block / t / MIB)
        lines.append("| %s | %d | %.3f (%.3f) | %.3f (%.3f) | %s | %s | %.2fx |" % (
            r.name, r.count, qm, min(q), sm, min(s), rate(qm), rate(sm), qm / sm))
    lines.append("")
    lines.append("speed-up = QEMU's median time / strata's (> 1: strata is faster); "
                 "%d repetitions" % max(len(r.samples["qemu"]) for r in rows))
    fails = [(r.name, f) for r in rows for f in r.failures]
    if fails:
        lines.append("")
        lines.append("FAILURES")
        lines += ["  %s: %s" % f for f in fails]
    return "\n".join(lines)


def check_args(ap, a):
    """Refuses bad arguments before any image is written."""
    if a.reps < 1:
        ap.error("--reps must be at least 1")
    if a.size < 64 * MIB or a.size % MIB:
        ap.error("--size must be a whole number of MiB, at least 64 MiB")
    if not 0 < a.scale <= 1:
        ap.error("--scale must be in (0, 1]")
    for opt, d in (("--chain", a.chain), ("--deep-chain", a.deep_chain)):
        if d and not os.path.isfile(os.path.join(d, "chain.json")):
            ap.error("%s %s: no chain.json there (make one with the kit's "
                     "mkchain)" % (opt, d))
    try:
        depths = [int(x) for x in a.depths.split(",") if x]
    except ValueError:
        ap.error("--depths takes depths separated by commas, not %r"
                 % a.depths)
    if any(d < 1 for d in depths):
        ap.error("--depths must be positive")
    for t in (a.strata_img, a.qemu_img, a.qemu_io):
        if not shutil.which(t):
            ap.error("%s: not found" % t)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--size", type=int, default=GIB)
    ap.add_argument("--scale", type=float, default=1.0,
                    help="fewer requests per sample")
    ap.add_argument("--chain", help="the kit's chain directory (mkchain)")
    ap.add_argument("--deep-chain", help="the kit's deep chain directory")
    ap.add_argument("--depths", default="64,256")
    ap.add_argument("--strata-img",
                    default=os.path.join(REPO, "build", "block", "strata-img"))
    ap.add_argument("--qemu-img", default="qemu-img")
    ap.add_argument("--qemu-io", default="qemu-io")
    ap.add_argument("--tmp", default=os.environ.get("TMPDIR", "/var/tmp"))
    ap.add_argument("--out", help="also write the table here")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    check_args(ap, a)
    rows = Bench(a).go()
    text = report(rows)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 1 if any(r.failures for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
