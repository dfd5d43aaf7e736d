#!/usr/bin/env python3
"""guestio-pattern -- how qemu-img bench and strata-img bench drive the disk.

Timings on a shared machine swing by a factor of two from run to run;
this script gathers what does not depend on the load, for the same bench
command on both tools (shared/bench guestio flags: -t none -i io_uring
-d 32):

  syscalls    io_uring_enter and poll calls per 1000 requests (strace -c -f)
  sqes/enter  requests handed to the kernel per io_uring_enter
  block layer per process: bios queued, bios merged into a queued request,
              requests allocated (perf stat, block tracepoints)
  device      requests issued to the disk for the image's own extents
              (perf record -a, block_rq_issue/complete, filtered by the
              file's physical extents from filefrag): count, mean size,
              most common sizes, mean time at the device
  in kernel   time-weighted number of the tool's requests between
              submission and completion (io_uring tracepoints); 32 is a
              full queue

Needs root for the tracepoints, strace, perf and filefrag.  Extra strata
variants are environment settings, e.g. --variant rb1:STRATA_LOOP_REAP_BATCH=1.

Example (an image from shared/bench, or any fully written qcow2):
  tests/bench/guestio-pattern.py --image /tmp/x/fresh.qcow2 --mode sr64k \\
      --variant rb1:STRATA_LOOP_REAP_BATCH=1 --reps 3
"""

import argparse
import bisect
import collections
import importlib.util
import os
import re
import statistics
import subprocess
import sys
import tempfile

MODES = {  # block size, sequential, request count for a 1 GiB image
    "rr4k": (4096, False, 65536),
    "sr64k": (65536, True, 16384),
}
RUN_RE = re.compile(r"Run completed in ([0-9.]+) seconds")
EVENT_RE = re.compile(r"(\d+\.\d+):\s+(\S+):\s")
RQ_RE = re.compile(r"(\d+\.\d+):\s+block:(block_rq_issue|block_rq_complete): "
                   r"\S+ (\S+) .*?(\d+) \+ (\d+)")


def bench_img():
    """bench-img.py beside this script, for its golden-ratio stride."""
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("bench_img", os.path.join(here, "bench-img.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def virtual_size(path):
    out = subprocess.run(["qemu-img", "info", "--output=json", path],
                         capture_output=True, text=True, check=True).stdout
    return int(re.search(r'"virtual-size":\s*(\d+)', out).group(1))


def extents(paths):
    """Sorted (start, end) 512-byte sectors of the files' data on the disk."""
    ext = []
    for p in paths:
        out = subprocess.run(["filefrag", "-v", p], capture_output=True,
                             text=True).stdout
        bs = int(re.search(r"blocks of (\d+) bytes", out).group(1))
        for m in re.finditer(r"^\s*\d+:\s+\d+\.\.\s*\d+:\s+(\d+)\.\.\s*(\d+):",
                             out, re.M):
            ext.append((int(m.group(1)) * bs // 512,
                        (int(m.group(2)) + 1) * bs // 512))
    return sorted(ext)


def run(argv, env=None):
    r = subprocess.run(argv, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError("%s failed: %s" % (argv[0], (r.stdout + r.stderr)[-400:]))
    return r.stdout + r.stderr


def syscalls(bench, env, tmp, n):
    out = run(["strace", "-c", "-f", "-o", os.path.join(tmp, "strace")] + bench, env)
    calls = collections.Counter()
    for line in open(os.path.join(tmp, "strace")):
        f = line.split()
        if len(f) >= 5 and f[-1].isidentifier() and f[3].isdigit():
            calls[f[-1]] += int(f[3])
    enters = calls["io_uring_enter"]
    polls = calls["poll"] + calls["ppoll"] + calls["epoll_wait"]
    m = RUN_RE.search(out)
    return {"time_s": float(m.group(1)) if m else None,
            "enter_per_1k": 1000.0 * enters / n, "poll_per_1k": 1000.0 * polls / n}


def block_counts(bench, env, tmp, n):
    ev = ["io_uring:io_uring_submit_req", "block:block_bio_queue",
          "block:block_bio_backmerge", "block:block_getrq"]
    path = os.path.join(tmp, "stat")
    run(["perf", "stat", "-x,", "-o", path, "-e", ",".join(ev), "--"] + bench, env)
    c = {}
    for line in open(path):
        f = line.strip().split(",")
        if len(f) > 2 and f[2] in ev and f[0].isdigit():
            c[f[2].split(":")[1]] = int(f[0])
    bios = c.get("block_bio_queue", 0)
    return {"sqes": c.get("io_uring_submit_req", 0),
            "bios_per_rq": bios / max(c.get("block_getrq", 0), 1),
            "merged_pct": 100.0 * c.get("block_bio_backmerge", 0) / max(bios, 1)}


def device(bench, env, tmp, ext):
    data = os.path.join(tmp, "dev.data")
    run(["perf", "record", "-q", "-a", "-o", data, "-e",
         "block:block_rq_issue,block:block_rq_complete", "--"] + bench, env)
    script = run(["perf", "script", "-i", data])
    starts = [e[0] for e in ext]

    def ours(sec):
        i = bisect.bisect_right(starts, sec) - 1
        return i >= 0 and sec < ext[i][1]

    pend, lat, sizes = {}, [], collections.Counter()
    for m in RQ_RE.finditer(script):
        t, ev, rwbs, sec, ns = (float(m.group(1)), m.group(2), m.group(3),
                                int(m.group(4)), int(m.group(5)))
        if "R" not in rwbs or not ours(sec):
            continue
        if ev == "block_rq_issue":
            pend[sec] = t
            sizes[ns // 2] += 1
        elif sec in pend:
            lat.append(t - pend.pop(sec))
    n = sum(sizes.values())
    return {"dev_rqs": n,
            "dev_kib": sum(k * v for k, v in sizes.items()) / max(n, 1),
            "dev_us": 1e6 * statistics.mean(lat) if lat else 0.0,
            "dev_sizes": " ".join("%dK:%d" % kv for kv in sizes.most_common(3))}


def in_kernel(bench, env, tmp):
    data = os.path.join(tmp, "ring.data")
    run(["perf", "record", "-q", "-o", data, "-e",
         "io_uring:io_uring_submit_req,io_uring:io_uring_complete", "--"] + bench, env)
    script = run(["perf", "script", "-i", data])
    inflight, last, area, t0, t1 = 0, None, 0.0, None, None
    for m in EVENT_RE.finditer(script):
        t, ev = float(m.group(1)), m.group(2)
        if last is not None:
            area += inflight * (t - last)
        last = t
        if ev == "io_uring:io_uring_submit_req":
            inflight += 1
            t0 = t if t0 is None else t0
        elif ev == "io_uring:io_uring_complete":
            inflight -= 1
            t1 = t
    return {"in_kernel": area / (t1 - t0) if t0 is not None and t1 and t1 > t0 else 0.0}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--image", required=True, help="qcow2 image to read (top of a chain)")
    ap.add_argument("--mode", default="sr64k", choices=sorted(MODES))
    ap.add_argument("--count", type=int, help="requests (default: the kit's count)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--strata-img", default=os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "..", "build", "block", "strata-img"))
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME:VAR=VALUE[,VAR=VALUE] another strata side with this environment")
    a = ap.parse_args()

    size = virtual_size(a.image)
    block, seq, count = MODES[a.mode]
    n = a.count or max(32, int(count * size / float(1 << 30)))
    step = block if seq else bench_img().golden_step(size, block)
    flags = ["bench", "-f", "qcow2", "-t", "none", "-i", "io_uring", "-d", "32",
             "-c", str(n), "-s", str(block), "-S", str(step), a.image]
    chain = run(["qemu-img", "info", "--backing-chain", a.image])
    files = re.findall(r"^image: (.*)$", chain, re.M)
    base = os.path.dirname(os.path.abspath(a.image))
    files = [f if os.path.isabs(f) else os.path.join(base, f) for f in files]
    ext = extents(files)

    sides = [("qemu", ["qemu-img"], None), ("strata", [a.strata_img], None)]
    for v in a.variant:
        name, _, kv = v.partition(":")
        env = dict(os.environ)
        env.update(dict(p.split("=", 1) for p in kv.split(",") if p))
        sides.append((name, [a.strata_img], env))

    res = collections.defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="guestio-pattern-") as tmp:
        for rep in range(a.reps):
            order = sides if rep % 2 == 0 else list(reversed(sides))
            for name, tool, env in order:
                bench = tool + flags
                r = {}
                r.update(syscalls(bench, env, tmp, n))
                r.update(block_counts(bench, env, tmp, n))
                r.update(device(bench, env, tmp, ext))
                r.update(in_kernel(bench, env, tmp))
                res[name].append(r)
                sys.stderr.write("rep %d %s: %s\n" % (rep + 1, name, r))

    cols = [("time_s", "%.3f"), ("enter_per_1k", "%.0f"), ("poll_per_1k", "%.0f"),
            ("bios_per_rq", "%.1f"), ("merged_pct", "%.0f"), ("dev_rqs", "%.0f"),
            ("dev_kib", "%.0f"), ("dev_us", "%.0f"), ("in_kernel", "%.1f")]
    print("%s %s, %d requests, medians of %d (time_s is load-dependent)"
          % (a.image, a.mode, n, a.reps))
    print("| side | " + " | ".join(c for c, _ in cols) + " | device sizes (last rep) |")
    print("|---" * (len(cols) + 2) + "|")
    for name, _, _ in sides:
        rows = res[name]
        vals = [fmt % statistics.median(r[c] for r in rows if r[c] is not None)
                for c, fmt in cols]
        print("| %s | %s | %s |" % (name, " | ".join(vals), rows[-1]["dev_sizes"]))


if __name__ == "__main__":
    main()
