#!/usr/bin/env python3
"""bench-job-limit -- live jobs against QSD and against what the disk
itself can do for the same amount of copying.

A job with cache.direct on is bound by the disk, not the CPU: it reads
what it copies and writes it again.  So beside the two daemons, every
round also runs the disk's own limit for that job: fio reading the
job's bytes while writing as many into a fresh file, at the same time
(two fio jobs in one run, O_DIRECT, io_uring, 1 MiB requests, 16 in
flight each: sequential, the best case for the disk).  Its time is how
fast any block layer could do the job; "% of limit" is that time over
the daemon's.

The bytes a job moves are counted from the pristine chain with `qemu-img
map` (data extents only; holes and zeroes cost no I/O), the same for
both daemons:

  stream         what the layers below the top hold (depth >= 1)
  stream-base    what the overlays between top and base hold
  commit         what snap(N-1) and snap(N-2) hold (into snap1)
  active-commit  what every overlay holds (into the base)
  mirror         everything the top shows

The job rows are shared/bench's own (benchkit.jobs: the same chain,
start, hold, verification against a flattened reference), measured for
QSD and $STRATAD in rounds with the sides alternating; the limit row
runs once per round beside them.  The kit is found at --kit (default:
../shared/bench next to this repository) or $STRATA_BENCH_KIT.

  STRATAD=build/qmp/stratad tests/bench/bench-job-limit.py \\
      [--jobs stream,active-commit,mirror] [--reps 5] [--chain DIR]

--cache writeback: the jobs with cache.direct=off, and the limit row
through the page cache (the source dropped from it first, the written
file fsynced at the end, as the jobs flush their target).

Stdlib only.  Prints the kit's report, then the table of medians.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
MIB = 1 << 20
DEFAULT_KIT = os.environ.get("STRATA_BENCH_KIT",
                             os.path.join(REPO, "..", "shared", "bench"))


def kit_modules(kit):
    sys.path.insert(0, os.path.abspath(kit))
    from benchkit import driver, jobs
    from benchkit.common import (FIO, QEMU_IMG, BenchError, evict, have_tool,
                                 qemu_side, rm_f, run, strata_side)
    from benchkit.report import Row
    return dict(driver=driver, jobs=jobs, FIO=FIO, QEMU_IMG=QEMU_IMG,
                BenchError=BenchError, evict=evict, have_tool=have_tool, qemu_side=qemu_side,
                rm_f=rm_f, run=run, strata_side=strata_side, Row=Row)


def data_bytes(k, path, depth_ok):
    """Bytes of data extents in `qemu-img map` of path whose depth passes."""
    out = k["run"](k["QEMU_IMG"] + ["map", "--output=json", "-f", "qcow2", path]).stdout
    return sum(e["length"] for e in json.loads(out)
               if e.get("data") and depth_ok(e.get("depth", 0)))


def job_bytes(k, chain, job):
    n = len(chain.images) - 1
    top = chain.top["path"]
    if job == "stream":
        return data_bytes(k, top, lambda d: d >= 1)
    if job == "stream-base":
        return data_bytes(k, top, lambda d: 1 <= d < n)
    if job == "commit":
        # top-node snap(N-1), base-node snap1: snap(N-1) down to snap2
        return data_bytes(k, chain.images[n - 1]["path"], lambda d: d < n - 2)
    if job == "active-commit":
        return data_bytes(k, top, lambda d: d < n)
    if job == "mirror":
        return data_bytes(k, top, lambda d: True)
    raise SystemExit("no byte count for job %r" % job)


def fio_moves(k, src, dst, nbytes, buffered):
    """Reads nbytes of src while writing nbytes into a fresh dst (both
    rounded up to whole 1 MiB requests).  buffered: through the page
    cache, src dropped from it first (as the kit drops the chain), and
    dst made stable at the end (the jobs flush their target before
    they finish)."""
    nbytes = (nbytes + MIB - 1) // MIB * MIB
    k["rm_f"](dst)
    common = ["--ioengine=io_uring", "--direct=%d" % (0 if buffered else 1),
              "--bs=1M", "--iodepth=16", "--size=%d" % nbytes]
    wr_extra = ["--end_fsync=1"] if buffered else []
    if buffered:
        k["evict"]([src])
    try:
        p = k["run"](k["FIO"] + ["--output-format=json",
                                 "--name=rd", "--rw=read", "--filename=%s" % src] + common +
                     ["--name=wr", "--rw=write", "--filename=%s" % dst] + common +
                     wr_extra)
    finally:
        k["rm_f"](dst)
    txt = p.stdout
    data = json.loads(txt[txt.index("{"):])
    times = {}
    for j in data["jobs"]:
        d = j["read"] if j["jobname"] == "rd" else j["write"]
        if not d.get("runtime") or d.get("io_bytes", 0) < nbytes:
            raise k["BenchError"]("fio %s moved %s of %d bytes" % (
                j["jobname"], d.get("io_bytes"), nbytes))
        times[j["jobname"]] = d["runtime"] / 1000.0
    secs = max(times.values())
    return {"value": secs, "read_s": times["rd"], "write_s": times["wr"],
            "moved_bytes": nbytes,
            "log": "(%.0f MiB read + %.0f MiB written; read %.3f s, write %.3f s)" % (
                nbytes / 1048576.0, nbytes / 1048576.0, times["rd"], times["wr"])}


class Suite:
    """A kit suite: the kit's job rows plus one limit row per job."""

    def __init__(self, k):
        self.k = k

    def make_rows(self, ws, args):
        k = self.k
        rows = k["jobs"].make_rows(ws, args)
        chain = ws.chain()
        src = ws.fio_file()
        dst = os.path.join(ws.sub("job-limit"), "write.dat")
        for job in k["jobs"].parse_list(args.jobs, k["jobs"].JOBS, "job"):
            nbytes = job_bytes(k, chain, job)
            buffered = args.cache == "writeback"
            rows.append(k["Row"]("limit", "moves-" + job,
                                 lambda side, n=nbytes, b=buffered:
                                 fio_moves(k, src, dst, n, b),
                                 needs=None, work_bytes=nbytes))
        return rows


def summary(samples_path, jobs, cache):
    vals = {}
    with open(samples_path) as fh:
        for line in fh:
            s = json.loads(line)
            if s.get("value") is not None:
                vals.setdefault((s["row"], s["side"]), []).append(s["value"])

    def med(row, side):
        v = vals.get((row, side))
        return statistics.median(v) if v else None

    lines = ["| job | QSD s | strata s | limit s | strata/QSD | strata % of limit |",
             "|---|---:|---:|---:|---:|---:|"]
    for job in jobs:
        q, s = med(job + "/" + cache, "qemu"), med(job + "/" + cache, "strata")
        lim = med("moves-" + job, "limit")
        if None in (q, s, lim):
            lines.append("| %s | incomplete |  |  |  |  |" % job)
            continue
        lines.append("| %s | %.3f | %.3f | %.3f | %.2f | %.0f %% |" % (
            job, q, s, lim, s / q, 100.0 * lim / s))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kit", default=DEFAULT_KIT, help="shared/bench directory")
    known, _ = ap.parse_known_args()
    k = kit_modules(known.kit)
    k["driver"].add_common_args(ap)
    k["jobs"].add_args(ap)
    ap.set_defaults(jobs="stream,active-commit,mirror", cache="direct")
    args = ap.parse_args()
    if args.cache not in ("direct", "writeback"):
        raise SystemExit("--cache is direct or writeback (one at a time)")
    if not k["have_tool"](k["FIO"]):
        raise SystemExit("fio is needed for the limit rows")
    sides = [k["qemu_side"]()]
    b = k["strata_side"]()
    if b is None or b.daemon is None:
        raise SystemExit("set $STRATAD")
    sides.append(b)
    if not args.out:
        args.out = subprocess.run(["mktemp", "-d", "-t", "bench-job-limit.XXXXXX"],
                                  capture_output=True, text=True,
                                  check=True).stdout.strip()
    rc = k["driver"].run(args, [Suite(k)], sides)
    jobs = k["jobs"].parse_list(args.jobs, k["jobs"].JOBS, "job")
    print()
    print(summary(os.path.join(args.out, "samples.jsonl"), jobs, args.cache))
    return rc


if __name__ == "__main__":
    sys.exit(main())
