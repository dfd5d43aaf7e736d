#!/usr/bin/env python3
"""bench-img-ops -- strata-img convert, commit and safe rebase against
qemu-img's same commands on the shared bench's chain.

The chain is ../shared/bench's default (mkchain: 1 GiB, base with 60 %
data, 4 overlays of 5 % each).  Rows:

  convert   convert -O qcow2 snap4.qcow2 OUT     (OUT on /dev/shm, so the
            writeback of the output does not dominate)
  commit    commit snap4.qcow2                   (into snap3, top emptied)
  commit-b  commit -b base.qcow2 snap4.qcow2     (all four into the base)
  rebase    rebase -F qcow2 -b base.qcow2 snap4.qcow2   (safe mode)

Each repetition runs every row once per side, the side that goes first
alternating, on fresh copies of the files the command writes (on
/dev/shm; the read-only layers are symlinks to the original chain).  The
time is the command's wall clock.  Every result is verified with
`qemu-img compare` against the original top's view (and qemu-img check
for the written images); a sample that fails verification aborts the run.
Medians and minima are reported with the ratio qemu/strata (> 1: strata
is faster).  Stdlib only.

  bench-img-ops.py --strata-img build/block/strata-img [--reps 5]
      [--chain DIR] [--mkchain PATH] [--json OUT]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

LAYERS = ["base.qcow2", "snap1.qcow2", "snap2.qcow2", "snap3.qcow2",
          "snap4.qcow2"]
ROWS = {
    # name: (files the command writes, argv after the tool, verification)
    "convert": ([], ["convert", "-O", "qcow2", "snap4.qcow2", "OUT"]),
    "commit": (["snap3.qcow2", "snap4.qcow2"], ["commit", "snap4.qcow2"]),
    "commit-b": (LAYERS, ["commit", "-b", "base.qcow2", "snap4.qcow2"]),
    "rebase": (["snap4.qcow2"],
               ["rebase", "-F", "qcow2", "-b", "base.qcow2", "snap4.qcow2"]),
}


def log(msg):
    sys.stderr.write("[%s] %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


def run(argv, cwd=None):
    p = subprocess.run(argv, cwd=cwd, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, universal_newlines=True)
    if p.returncode != 0:
        raise RuntimeError("%s: exit %d: %s" % (" ".join(argv),
                                                 p.returncode, p.stdout))
    return p.stdout


def prepare(chain, work, writes):
    if os.path.exists(work):
        shutil.rmtree(work)
    os.makedirs(work)
    for f in LAYERS:
        if f in writes:
            shutil.copyfile(os.path.join(chain, f), os.path.join(work, f))
        else:
            os.symlink(os.path.join(chain, f), os.path.join(work, f))


def sample(tool, row, chain, work, qemu_img):
    writes, args = ROWS[row]
    prepare(chain, work, writes)
    out = os.path.join(work, "out.qcow2")
    argv = [tool] + [out if a == "OUT" else a for a in args]
    t0 = time.monotonic()
    run(argv, cwd=work)
    dt = time.monotonic() - t0
    # Verify: what the top reads (or the copy) equals the original top.
    result = out if row == "convert" else os.path.join(work, "snap4.qcow2")
    run([qemu_img, "compare", "-f", "qcow2", "-F", "qcow2", result,
         os.path.join(chain, "snap4.qcow2")])
    for f in (["out.qcow2"] if row == "convert" else writes):
        run([qemu_img, "check", os.path.join(work, f)])
    return dt


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--strata-img", required=True)
    ap.add_argument("--qemu-img", default=shutil.which("qemu-img"))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--chain", help="an existing mkchain directory")
    ap.add_argument("--mkchain", default=os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "..", "..",
        "shared", "bench", "mkchain"))
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--json")
    a = ap.parse_args()
    strata = os.path.abspath(a.strata_img)
    rows = a.rows.split(",")
    scratch = tempfile.mkdtemp(prefix="bench-img-ops.",
                               dir="/dev/shm" if os.path.isdir("/dev/shm")
                               else None)
    try:
        chain = a.chain
        if not chain:
            chain = os.path.join(scratch, "chain")
            log("building the chain with %s" % a.mkchain)
            run([a.mkchain, "-q", "-o", chain])
        work = os.path.join(scratch, "work")
        times = {r: {"qemu": [], "strata": []} for r in rows}
        for rep in range(a.reps):
            order = [("qemu", a.qemu_img), ("strata", strata)]
            if rep % 2:
                order.reverse()
            for r in rows:
                for side, tool in order:
                    dt = sample(tool, r, chain, work, a.qemu_img)
                    times[r][side].append(dt)
                    log("rep %d %-8s %-6s %.3f s (verified)" % (rep, r, side,
                                                                dt))
        print("| operation | qemu-img median (min) | strata-img median (min)"
              " | qemu/strata |")
        print("|---|---|---|---|")
        for r in rows:
            q, s = times[r]["qemu"], times[r]["strata"]
            print("| %s | %.3f s (%.3f) | %.3f s (%.3f) | %.2fx |" % (
                r, statistics.median(q), min(q), statistics.median(s),
                min(s), statistics.median(q) / statistics.median(s)))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(times, f, indent=1)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
