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
chain is built on disk (under $STRATA_BENCH_TMP, else $TMPDIR) and its
files are dropped from the page cache (posix_fadvise DONTNEED) before
every sample, so the read-only layers come from the disk; --warm keeps
them cached instead.  The time is the command's wall clock; its CPU time
(user + system, all threads) is reported too, being less sensitive to
other load on the machine.  Every result is verified with `qemu-img
compare` against the original top's view (and qemu-img check for the
written images); a sample that fails verification aborts the run.
Medians and minima are reported with the ratio qemu/strata (> 1: strata
is faster).  With --cold-read, a row "read" times a plain sequential read
of the base image (dd, 16 MiB blocks) from a cold cache: about what the
disk allows for the bulk of what the commands read.  With --floor, a row
"floor" times the chain's five files read by five `cat`s side by side
from a cold cache: every byte of the chain off the disk, each copied
once, with no image format in between.  --rows picks rows (e.g. --rows
convert --floor).  --before PATH adds a third side, another strata-img
(the tree before a change), to the same rotation: an A/B of two builds
against qemu-img in one run.  Stdlib only.

  bench-img-ops.py --strata-img build/block/strata-img [--reps 5]
      [--rows convert,commit,commit-b,rebase] [--chain DIR]
      [--mkchain PATH] [--warm] [--cold-read] [--floor] [--before PATH]
      [--json OUT]
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


def timed(argv, cwd=None):
    """Runs @argv; (wall seconds, CPU seconds of the child)."""
    with tempfile.TemporaryFile(mode="w+") as out:
        t0 = time.monotonic()
        p = subprocess.Popen(argv, cwd=cwd, stdout=out,
                             stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(p.pid, 0)
        dt = time.monotonic() - t0
        p.returncode = os.waitstatus_to_exitcode(status) \
            if hasattr(os, "waitstatus_to_exitcode") else status >> 8
        if p.returncode != 0:
            out.seek(0)
            raise RuntimeError("%s: exit %d: %s" % (
                " ".join(argv), p.returncode, out.read()))
    return dt, ru.ru_utime + ru.ru_stime


def drop_cache(chain):
    for f in LAYERS:
        fd = os.open(os.path.join(chain, f), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def prepare(chain, work, writes):
    if os.path.exists(work):
        shutil.rmtree(work)
    os.makedirs(work)
    for f in LAYERS:
        if f in writes:
            shutil.copyfile(os.path.join(chain, f), os.path.join(work, f))
        else:
            os.symlink(os.path.join(chain, f), os.path.join(work, f))


def sample(tool, row, chain, work, qemu_img, cold):
    if row == "floor":
        drop_cache(chain)
        return timed(["sh", "-c", "for f in \"$@\"; do cat \"$f\" >/dev/null"
                      " & done; wait", "sh"] +
                     [os.path.join(chain, f) for f in LAYERS])
    if row == "read":
        drop_cache(chain)
        return timed(["dd", "bs=16M", "status=none", "of=/dev/null"] +
                     ["if=" + os.path.join(chain, f) for f in LAYERS[:1]])
    writes, args = ROWS[row]
    prepare(chain, work, writes)
    if cold:
        drop_cache(chain)
    out = os.path.join(work, "out.qcow2")
    argv = [tool] + [out if a == "OUT" else a for a in args]
    dt = timed(argv, cwd=work)
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
    ap.add_argument("--warm", action="store_true",
                    help="chain on /dev/shm, not dropped from the cache")
    ap.add_argument("--cold-read", action="store_true",
                    help="also time a plain cold read of the chain")
    ap.add_argument("--before", help="another strata-img to run as a third"
                    " side (e.g. the build before a change)")
    ap.add_argument("--floor", action="store_true",
                    help="also time five cold cats of the chain side by side")
    ap.add_argument("--json")
    a = ap.parse_args()
    strata = os.path.abspath(a.strata_img)
    rows = a.rows.split(",")
    for r in rows:
        if r not in ROWS:
            ap.error("unknown row %r (rows: %s)" % (r, ",".join(ROWS)))
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    scratch = tempfile.mkdtemp(prefix="bench-img-ops.", dir=shm)
    disk = None
    try:
        chain = a.chain
        if not chain:
            if a.warm:
                chain = os.path.join(scratch, "chain")
            else:
                disk = tempfile.mkdtemp(
                    prefix="bench-img-ops-chain.",
                    dir=os.environ.get("STRATA_BENCH_TMP"))
                chain = os.path.join(disk, "chain")
            log("building the chain in %s with %s" % (chain, a.mkchain))
            run([a.mkchain, "-q", "-o", chain])
        work = os.path.join(scratch, "work")
        sides = [("qemu", a.qemu_img), ("strata", strata)]
        if a.before:
            sides.append(("before", os.path.abspath(a.before)))
        times = {r: {side: [] for side, _ in sides} for r in rows}
        cpu = {r: {side: [] for side, _ in sides} for r in rows}
        for rep in range(a.reps):
            # Every side goes first as often as the others.
            k = rep % len(sides)
            order = sides[k:] + sides[:k]
            if rep % 2:
                order.reverse()
            if a.cold_read:
                dt, _ = sample(None, "read", chain, work, a.qemu_img, True)
                times.setdefault("read", []).append(dt)
                log("rep %d read (dd of the base, cold) %.3f s" % (rep, dt))
            if a.floor:
                dt, _ = sample(None, "floor", chain, work, a.qemu_img, True)
                times.setdefault("floor", []).append(dt)
                log("rep %d floor (5 cats of the chain, cold) %.3f s" % (
                    rep, dt))
            for r in rows:
                for side, tool in order:
                    dt, ct = sample(tool, r, chain, work, a.qemu_img,
                                    not a.warm)
                    times[r][side].append(dt)
                    cpu[r][side].append(ct)
                    log("rep %d %-8s %-6s %.3f s, CPU %.3f s (verified)" % (
                        rep, r, side, dt, ct))
        print("%s page cache; wall clock median (min), CPU time median" %
              ("warm" if a.warm else "cold"))
        print()
        print("| operation | qemu-img | strata-img | qemu/strata |"
              " CPU qemu-img | CPU strata-img |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            q, s = times[r]["qemu"], times[r]["strata"]
            print("| %s | %.3f s (%.3f) | %.3f s (%.3f) | %.2fx | %.3f s |"
                  " %.3f s |" % (
                      r, statistics.median(q), min(q), statistics.median(s),
                      min(s), statistics.median(q) / statistics.median(s),
                      statistics.median(cpu[r]["qemu"]),
                      statistics.median(cpu[r]["strata"])))
        if a.before:
            print()
            print("| operation | before | qemu/before | CPU before |")
            print("|---|---|---|---|")
            for r in rows:
                q, b = times[r]["qemu"], times[r]["before"]
                print("| %s | %.3f s (%.3f) | %.2fx | %.3f s |" % (
                    r, statistics.median(b), min(b),
                    statistics.median(q) / statistics.median(b),
                    statistics.median(cpu[r]["before"])))
        if a.cold_read:
            rd = times["read"]
            print("| read (dd of base.qcow2, cold) | %.3f s (%.3f) |"
                  " | | | |" % (statistics.median(rd), min(rd)))
        if a.floor:
            fl = times["floor"]
            print("| floor (5 cats of the chain side by side, cold) |"
                  " %.3f s (%.3f) | | | | |" % (statistics.median(fl),
                                               min(fl)))
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"wall": times, "cpu": cpu}, f, indent=1)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if disk:
            shutil.rmtree(disk, ignore_errors=True)


if __name__ == "__main__":
    main()
