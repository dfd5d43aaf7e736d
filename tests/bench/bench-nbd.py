#!/usr/bin/env python3
"""NBD benchmarks: strata against QEMU 7.2, side by side in one run.

Two suites (both by default; --suites picks):

  client  (issue 9)  read a whole export of qemu-nbd into a local raw
          file: `strata-img convert -n -f raw -O raw nbd+unix://... out`
          against `qemu-img convert -n` of the same; every copy is
          compared with the source (cmp).
  export  (issue 6)  the same client, `qemu-img bench -f raw
          nbd+unix://...`, against stratad's export and against
          qemu-storage-daemon's export of an identical file: 4 KiB random
          reads and writes at depth 32, 1 MiB sequential reads and writes.
          Both daemons get the same command line (--blockdev file with
          cache.direct=on and aio=io_uring, raw on top, --nbd-server,
          --export writable).  Every sample is checked afterwards with
          qemu-io reads of the expected pattern through the export.  Each of
          those four cache.direct=on rows also gets, in every round, the
          matching row of shared/bench's limit suite: fio (io_uring,
          O_DIRECT, depth 32) doing the same I/O on the same file, and
          the report gives each side's time as a percentage of it (the
          target where the disk, not the CPU, bounds a row).  The two
          4 KiB rows are run a second time with fio's nbd engine
          (libnbd) as the client: qemu-img's NBD client keeps at most 16
          requests in flight whatever -d says, fio keeps all 32 (fio
          checks every block: the file's pattern for reads; for writes
          a second, untimed fio run over the same offsets reads back
          the pattern written).  Four
          more rows are the same four through the page cache
          (cache.direct=off, the file read once before each sample), where
          the CPU and not the disk bounds them.  Two
          more rows put a null-co node (read-zeroes=on) under the export
          instead of the file, so that no disk is involved: 4 KiB reads at
          depth 1 (the round trip through the server, in microseconds per
          request) and at depth 32 (what the server sustains when only
          software is in the way; both daemons answer these reads of
          zeroes with hole chunks).  One row, QEMU's column only, is the
          bound of the 4 KiB read row: qemu-img bench on the file itself
          (cache=none, io_uring) at depth 16, the most requests QEMU's NBD
          client keeps in flight whatever -d says.

Two more rows, one side each, are floors (tests/bench/nbd-floor.c, built
with the project): `nbd-floor copy`, a client that receives each payload
64 KiB at a time into a buffer that stays in the CPU's cache and writes
it out from there, and does nothing else, on the client row's export;
and `nbd-floor serve`, a server that only receives, submits to io_uring
(O_DIRECT) and gathers the replies, under
qemu-img bench's rr4k row, twice: with simple replies, and with the
structured replies both daemons grant QEMU's client.  They show what
each row leaves to any client or server on this machine.

The client row is about reading through the NBD client, so the copy must
not be bound by writing it out.  The output therefore lives on /dev/shm
(as in bench-img-ops.py), is created once, before the first sample, and
is overwritten in place (`convert -n`) by every sample.  Writing into a
disk-backed file left both tools waiting for the page cache's writeback;
creating a fresh file each time made them fault in 1 GiB of new tmpfs
pages per sample, and on a VM whose balloon reports free pages to the
host (virtio-balloon free page reporting: the pages of the file deleted
after the previous sample go back to the host at once) every such fault
costs the host a page too.  That is where qemu-img's bimodal times came
from: the same 1 GiB copy into tmpfs pages (copy_folio_from_iter_atomic)
took 240 to 1,700 perf samples from one run to the next, and the slow
runs' extra time was all client CPU (0.66 s against 1.65 s).  Before
every sample the output is refilled with a byte the source does not
hold (untimed), so `cmp` still proves that every byte was copied.

Besides the wall time each sample records the CPU time of the client
(its rusage) and of the server (qemu-nbd or the daemon, from
/proc/PID/stat): on a loaded machine those move much less than the wall
time.

Method as shared/bench: every row once per side in each repetition, the
order alternating between repetitions; medians (and minimum) over
--reps (default 5); a failed or unverified sample has no value and is
listed under FAILURES (exit status 1).  Times are the tools' own
("Run completed in" for bench, wall time for convert).

    tests/bench/bench-nbd.py                       # 1 GiB, 5 reps
    tests/bench/bench-nbd.py --size 256M --reps 2  # a quick look
"""
import argparse
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.realpath(__file__))
_spec = importlib.util.spec_from_file_location(
    "bench_img", os.path.join(HERE, "bench-img.py"))
bench_img = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_img)
log, evict, warm = bench_img.log, bench_img.evict, bench_img.warm
golden_step, parse_size = bench_img.golden_step, bench_img.parse_size
RUN_RE, MIB = bench_img.RUN_RE, bench_img.MIB


def run_timed(argv):
    """Runs @argv; its output, wall time and CPU time (user + system)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, universal_newlines=True)
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    t = time.perf_counter() - t0
    p.stdout.close()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError("%s: status %d: %s" % (" ".join(argv), p.returncode,
                                                  out.strip()[-400:]))
    return out, t, ru.ru_utime + ru.ru_stime


def proc_cpu(pid):
    """CPU seconds (user + system, all threads) of a running process."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fill(path, size, byte):
    """Overwrites @path in place (its pages stay allocated)."""
    block = bytes([byte]) * (8 * MIB)
    with open(path, "r+b" if os.path.exists(path) else "wb") as f:
        for off in range(0, size, len(block)):
            f.write(block[:min(len(block), size - off)])


def run(argv, **kw):
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       universal_newlines=True, **kw)
    if p.returncode != 0:
        raise RuntimeError("%s: status %d: %s" % (" ".join(argv), p.returncode,
                                                  p.stdout.strip()[-400:]))
    return p.stdout


class Server:
    """A process serving one export on a UNIX socket until stop()."""

    def __init__(self, argv, sock, pidfile=None, env=None):
        self.sock = sock
        for p in (sock, pidfile):
            if p and os.path.exists(p):
                os.unlink(p)
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, env=env)
        deadline = time.time() + 30
        # QSD creates its sockets while still parsing options: wait for
        # the pidfile, written once it is ready (see shared/bench).
        ready = pidfile or sock
        while not os.path.exists(ready) or not os.path.exists(sock):
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError("%s did not start" % argv[0])
            time.sleep(0.01)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Row:
    def __init__(self, suite, name, work, **kw):
        self.suite, self.name, self.work = suite, name, work
        self.__dict__.update(kw)
        # A row of one side only ("alone": a bound, not a comparison)
        # is sampled once per round and reported apart.
        sides = ("alone",) if kw.get("alone") else ("qemu", "strata")
        self.samples = {side: [] for side in sides}
        self.cpu = {side: [] for side in sides}   # (client, server) s
        self.limit_samples = []                   # fio, same I/O (s)
        self.failures = []


def make_file(path, size, pattern):
    run(["qemu-img", "create", "-q", "-f", "raw", path, str(size)])
    run(["qemu-io", "-f", "raw", "-c",
         "write -P 0x%02x 0 %d" % (pattern, size), path])


def qio_check(uri, offsets, length, pattern):
    cmds = []
    for off in offsets:
        cmds += ["-c", "read -P 0x%02x %d %d" % (pattern, off, length)]
    out = run(["qemu-io", "-f", "raw"] + cmds + [uri])
    if "Pattern verification failed" in out or "error" in out.lower():
        raise RuntimeError("verification: %s" % out.strip()[-300:])


class Bench:
    def __init__(self, a):
        self.a = a
        self.tmp = tempfile.mkdtemp(prefix="strata-bench-nbd.", dir=a.tmp)
        self.size = a.size
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.shm = tempfile.mkdtemp(prefix="strata-bench-nbd.", dir=shm)

    def path(self, name):
        return os.path.join(self.tmp, name)

    # ---- client: convert from qemu-nbd ----

    def client_setup(self):
        self.src = self.path("src.raw")
        make_file(self.src, self.size, 0x11)
        self.nbd_sock = self.path("qnbd.sock")
        # qemu-nbd allocates a buffer per request; glibc maps those of
        # 128 KiB and more afresh each time (its threshold never adapts
        # to the 2 MiB both clients ask for), so a new qemu-nbd faulted in
        # every page it served: 262,656 minor faults and 0.8-1.2 s of CPU
        # per GiB against 0.4 s once its heap keeps them.  The server is
        # the same for both sides; with these tunables it runs at its
        # best from the first sample and the row measures the clients.
        env = dict(os.environ, GLIBC_TUNABLES=(
            "glibc.malloc.mmap_threshold=33554432:"
            "glibc.malloc.trim_threshold=268435456"))
        self.qnbd = Server(["qemu-nbd", "-f", "raw", "-r", "-x", "src",
                            "-e", "4", "--persistent", "-k", self.nbd_sock,
                            "--pid-file", self.path("qnbd.pid"), self.src],
                           self.nbd_sock, self.path("qnbd.pid"), env=env)
        # Allocated once, overwritten by every sample (see above).
        self.out = os.path.join(self.shm, "out.raw")
        fill(self.out, self.size, 0xee)
        row = Row("client", "convert %d MiB from qemu-nbd" %
                  (self.size // MIB), self.size, uri="nbd+unix:///src?socket=%s"
                  % self.nbd_sock)
        # One untimed copy per side first: strata-img reads over several
        # connections (the export allows it), so the server keeps more
        # requests and buffers at once than for qemu-img's one, and a
        # fresh qemu-nbd faulted their pages in (24k faults, 2 s of CPU)
        # in whichever sample first asked for them.
        for side in ("qemu", "strata"):
            self.client_sample(row, side)
        rows = [row]
        if self.a.floor:
            # The least any client can do here (tests/bench/nbd-floor.c):
            # four connections, two 2 MiB reads in flight on each (its
            # best on this row), each payload received 64 KiB at a time
            # into a buffer and written out from there.
            rows.append(Row("client", "convert %d MiB, nbd-floor copy "
                            "(64 KiB pieces received and written, "
                            "nothing else)" % (self.size // MIB), self.size,
                            alone=True))
        return rows

    def client_sample(self, row, side):
        tool = self.a.qemu_img if side == "qemu" else self.a.strata_img
        fill(self.out, self.size, 0xee)
        warm(self.src)      # the server's side is the same for both
        c0 = proc_cpu(self.qnbd.proc.pid)
        if side == "alone":
            argv = [self.a.floor, "copy", self.nbd_sock, "src", self.out,
                    "4", "2"]
        else:
            argv = [tool, "convert", "-n", "-f", "raw", "-O", "raw", row.uri,
                    self.out]
        _, t, cpu = run_timed(argv)
        srv = proc_cpu(self.qnbd.proc.pid) - c0
        if subprocess.call(["cmp", "-s", self.out, self.src]) != 0:
            raise RuntimeError("the copy differs from the source")
        return t, cpu, srv

    # ---- export: qemu-img bench through stratad / QSD ----

    def export_setup(self):
        self.rfile = self.path("read.raw")
        self.wfile = self.path("write.raw")
        make_file(self.rfile, self.size, 0x11)
        make_file(self.wfile, self.size, 0x11)
        n4k = self.size // 4096
        step = golden_step(self.size, 4096)
        sc = self.a.scale
        rows = [
            # With cache.direct=on the disk may bound these: each also
            # gets the matching row of shared/bench's limit suite (fio,
            # io_uring, O_DIRECT, depth 32, the same I/O on the same
            # file) in the same round.
            Row("export", "rr4k qd32", "r", bs=4096, count=int(n4k // 4 * sc),
                step=step, write=False, limit="randread"),
            Row("export", "rw4k qd32", "w", bs=4096, count=int(n4k // 8 * sc),
                step=step, write=True, limit="randwrite"),
            Row("export", "sr1m qd32", "r", bs=MIB,
                count=int(self.size // MIB * sc), step=MIB, write=False,
                limit="read"),
            Row("export", "sw1m qd32", "w", bs=MIB,
                count=int(self.size // MIB * sc), step=MIB, write=True,
                limit="write"),
            # The same two 4 KiB rows with a client that keeps all 32
            # requests in flight: fio's nbd engine (libnbd), one
            # connection, which checks every block it reads or wrote
            # (verify=pattern).  qemu-img bench's NBD client keeps at most
            # 16 and, through either server, makes about the same rate:
            # these rows show what the servers do when the client allows
            # more.
        ] + ([
            Row("export", "rr4k qd32, fio nbd client", "r", bs=4096,
                count=int(n4k // 4 * sc), step=step, write=False,
                limit="randread", client="fio"),
            Row("export", "rw4k qd32, fio nbd client", "w", bs=4096,
                count=int(n4k // 8 * sc), step=step, write=True,
                limit="randwrite", client="fio"),
        ] if self.a.fio else []) + [
            # The bound of the rr4k row: the file itself read by qemu-img
            # at the 16 requests in flight QEMU's NBD client allows
            # (MAX_NBD_REQUESTS), no NBD in the way.  One side only.
            Row("export", "rr4k qd16 file, no NBD", "disk", bs=4096,
                count=int(n4k // 4 * sc), step=step, write=False, depth=16,
                alone=True),
        ] + ([
            # The rr4k row's server floor: qemu-img bench against
            # nbd-floor serve (tests/bench/nbd-floor.c), which does
            # nothing but receive, submit to io_uring (O_DIRECT) and
            # gather the replies: what the row leaves to any server.
            Row("export", "rr4k qd32, nbd-floor server", "r", bs=4096,
                count=int(n4k // 4 * sc), step=step, write=False,
                limit="randread", alone=True, floor=True),
            # The same with structured replies, which QEMU's client asks
            # for and both daemons grant: each read's reply is then one
            # OFFSET_DATA chunk, which the client takes in four pieces
            # rather than a simple reply's three.  The floor of what a
            # server that speaks as the daemons do can make of the row.
            Row("export", "rr4k qd32, nbd-floor server, structured replies",
                "r", bs=4096, count=int(n4k // 4 * sc), step=step,
                write=False, limit="randread", alone=True, floor=True,
                structured=True),
        ] if self.a.floor else []) + [
            # The same four through the page cache (cache.direct=off, the
            # file read once before each sample): the CPU, not the disk,
            # bounds these.
            Row("export", "rr4k qd32 page cache", "r", bs=4096,
                count=int(n4k // 2 * sc), step=step, write=False, pc=True),
            Row("export", "rw4k qd32 page cache", "w", bs=4096,
                count=int(n4k // 4 * sc), step=step, write=True, pc=True),
            Row("export", "sr1m qd32 page cache", "r", bs=MIB,
                count=int(self.size // MIB * sc), step=MIB, write=False,
                pc=True),
            Row("export", "sw1m qd32 page cache", "w", bs=MIB,
                count=int(self.size // MIB * sc), step=MIB, write=True,
                pc=True),
            Row("export", "rr4k qd1 null", "null", bs=4096,
                count=int(20000 * sc), step=step, write=False, depth=1),
            Row("export", "rr4k qd32 null", "null", bs=4096,
                count=int(n4k // 2 * sc), step=step, write=False),
        ]
        return rows

    def daemon(self, side, f, direct=True):
        sock = self.path("%s.sock" % side)
        pidfile = self.path("%s.pid" % side)
        exe = self.a.qsd if side == "qemu" else self.a.stratad
        if f is None:
            nodes = ["--blockdev", "driver=null-co,node-name=d,size=%d,"
                     "read-zeroes=on" % self.size]
        else:
            nodes = ["--blockdev", "driver=file,node-name=f,filename=%s,"
                     "cache.direct=%s,aio=io_uring"
                     % (f, "on" if direct else "off"),
                     "--blockdev", "driver=raw,node-name=d,file=f"]
        argv = [exe] + nodes + [
                "--nbd-server", "addr.type=unix,addr.path=%s" % sock,
                "--export", "type=nbd,id=e,node-name=d,name=disk,"
                "writable=on",
                "--pidfile", pidfile]
        return Server(argv, sock, pidfile), "nbd+unix:///disk?socket=%s" % sock

    def limit_sample(self, row):
        """fio on the row's file: the disk's time for the row's I/O."""
        f = {"r": self.rfile, "w": self.wfile}[row.work]
        evict(f)
        out = run([self.a.fio] + bench_img.fio_limit_args(
            f, self.size, row.count * row.bs, row.limit, row.bs))
        return bench_img.fio_seconds(out, row.limit)

    def export_sample(self, row, side):
        f = {"r": self.rfile, "w": self.wfile, "null": None,
             "disk": self.rfile}[row.work]
        pattern = 0x5a if side == "qemu" else 0xa5
        pc = getattr(row, "pc", False)
        if f and pc:
            warm(f)
        elif f:
            evict(f)
        if row.work == "disk":
            out, _, cpu = run_timed([
                self.a.qemu_img, "bench", "-f", "raw", "-t", "none",
                "-i", "io_uring", "-d", str(row.depth), "-c", str(row.count),
                "-s", str(row.bs), "-S", str(row.step), f])
            m = RUN_RE.search(out)
            if not m:
                raise RuntimeError("no run time in: %s" % out[-200:])
            return float(m.group(1)), cpu, 0.0
        if getattr(row, "floor", False):
            sock = self.path("floor.sock")
            srv = Server([self.a.floor, "serve", sock, f,
                          "cached" if pc else "direct"] +
                         (["structured"] if getattr(row, "structured", False)
                          else []), sock)
            uri = "nbd+unix:///disk?socket=%s" % sock
        else:
            srv, uri = self.daemon(side, f, direct=not pc)
        if getattr(row, "client", None) == "fio":
            try:
                return self.fio_nbd_sample(row, srv, uri, pattern)
            finally:
                srv.stop()
        try:
            argv = [self.a.qemu_img, "bench", "-f", "raw",
                    "-d", str(getattr(row, "depth", 32)),
                    "-c", str(row.count), "-s", str(row.bs),
                    "-S", str(row.step)]
            if row.write:
                argv += ["-w", "--pattern=%d" % pattern]
            c0 = proc_cpu(srv.proc.pid)
            out, _, cpu = run_timed(argv + [uri])
            srv_cpu = proc_cpu(srv.proc.pid) - c0
            m = RUN_RE.search(out)
            if not m:
                raise RuntimeError("no run time in: %s" % out[-200:])
            t = float(m.group(1))
            # First, second and last request's blocks hold what was
            # written (writes), the file's pattern (reads) or zeroes.
            offs = sorted({(i * row.step) % self.size
                           for i in (0, 1, row.count - 1)})
            expect = pattern if row.write else 0x11 if f else 0
            qio_check(uri, offs, row.bs, expect)
        finally:
            srv.stop()
        return t, cpu, srv_cpu

    def fio_nbd_sample(self, row, srv, uri, pattern):
        """fio's nbd engine as the client: the row's I/O at depth 32,
        every block checked against the file's pattern (reads) or, by a
        second, untimed run of fio over the same offsets (verify_only),
        against the pattern written (writes); fio fails the sample on
        any mismatch."""
        rw = "randwrite" if row.write else "randread"
        argv = [self.a.fio, "--name=nbd", "--ioengine=nbd", "--uri=%s" % uri,
                "--rw=%s" % rw, "--bs=%d" % row.bs, "--iodepth=32",
                "--size=%d" % self.size, "--io_size=%d" % (row.count * row.bs),
                "--randrepeat=1", "--verify=pattern",
                "--verify_pattern=0x%02x" % (pattern if row.write else 0x11),
                "--verify_state_save=0", "--output-format=json"]
        if row.write:
            argv.append("--do_verify=0")
        c0 = proc_cpu(srv.proc.pid)
        out, _, cpu = run_timed(argv)
        srv_cpu = proc_cpu(srv.proc.pid) - c0
        if row.write:
            run(argv + ["--verify_only"])
        return bench_img.fio_seconds(out, rw), cpu, srv_cpu

    # ---- the run ----

    def go(self):
        rows = []
        try:
            if "client" in self.a.suites:
                rows += self.client_setup()
            if "export" in self.a.suites:
                rows += self.export_setup()
            for rep in range(self.a.reps):
                limits = {}
                order = ["qemu", "strata"] if rep % 2 == 0 else ["strata", "qemu"]
                for row in rows:
                    for side in order + ["alone"]:
                        if side not in row.samples:
                            continue
                        fn = self.client_sample if row.suite == "client" \
                            else self.export_sample
                        try:
                            t, cpu, srv = fn(row, side)
                            row.samples[side].append(t)
                            row.cpu[side].append((cpu, srv))
                            log("rep %d %s %s: %.3f s (CPU: client %.2f s, "
                                "server %.2f s)" % (rep + 1, row.name, side,
                                                    t, cpu, srv))
                        except Exception as e:  # noqa: BLE001
                            row.failures.append("%s rep %d: %s" %
                                                (side, rep + 1, e))
                            log("FAILED %s %s: %s" % (row.name, side, e))
                    if getattr(row, "limit", None) and self.a.fio:
                        # Rows doing the same I/O on the same file (the
                        # fio-client rows) share one limit per round.
                        key = (row.work, row.limit, row.count, row.bs)
                        try:
                            if key not in limits:
                                limits[key] = self.limit_sample(row)
                                log("rep %d %s limit (fio): %.3f s"
                                    % (rep + 1, row.name, limits[key]))
                            row.limit_samples.append(limits[key])
                        except Exception as e:  # noqa: BLE001
                            row.failures.append("limit rep %d: %s"
                                                % (rep + 1, e))
                            log("FAILED %s limit: %s" % (row.name, e))
        finally:
            if getattr(self, "qnbd", None):
                self.qnbd.stop()
            if not self.a.keep:
                shutil.rmtree(self.tmp, ignore_errors=True)
                shutil.rmtree(self.shm, ignore_errors=True)
        return rows


def rate(r, xs):
    if not xs:
        return "—"
    med = statistics.median(xs)
    if r.suite == "client":
        return "%.0f MiB/s" % (r.work / MIB / med)
    if getattr(r, "depth", 32) == 1:
        return "%.1f µs/req" % (med / r.count * 1e6)
    return "%.1fk ops/s" % (r.count / med / 1e3)


def cpu_cells(r, side):
    """Median client and server CPU: seconds (client rows) or µs per
    request (export rows)."""
    cells = []
    for i in (0, 1):
        xs = [c[i] for c in r.cpu[side]]
        if not xs:
            cells.append("—")
        elif r.suite == "client":
            cells.append("%.2f" % statistics.median(xs))
        else:
            cells.append("%.1f µs" % (statistics.median(xs) / r.count * 1e6))
    return cells


def report(rows, reps):
    pairs = [r for r in rows if "alone" not in r.samples]
    alone = [r for r in rows if "alone" in r.samples]
    out = ["| row | QEMU s, median (min) | strata s, median (min) | "
           "QEMU rate | strata rate | QEMU/strata (speed-up) |",
           "|---|---:|---:|---:|---:|---:|"]
    for r in pairs:
        q, s = r.samples["qemu"], r.samples["strata"]
        speed = "—"
        if q and s:
            speed = "%.2f×" % (statistics.median(q) / statistics.median(s))
        out.append("| %s | %s | %s | %s | %s | %s |" % (
            r.name, bench_img.fmt_time(q), bench_img.fmt_time(s), rate(r, q),
            rate(r, s), speed))
    out += ["", "CPU time, median over the samples: client / server "
            "(seconds; per request for the export rows, in µs).", "",
            "| row | QEMU client | QEMU server | strata client | "
            "strata server |", "|---|---:|---:|---:|---:|"]
    for r in pairs:
        cells = cpu_cells(r, "qemu") + cpu_cells(r, "strata")
        out.append("| %s | %s |" % (r.name, " | ".join(cells)))
    if alone:
        out += ["", "Bounds, one side each, in the same rounds: the file "
                "without NBD, and nbd-floor (tests/bench/nbd-floor.c), a "
                "server or client that does nothing but move the bytes; "
                "each row's CPU as above.", "",
                "| row | s, median (min) | rate | client CPU | server CPU |",
                "|---|---:|---:|---:|---:|"]
        for r in alone:
            out.append("| %s | %s | %s | %s |" % (
                r.name, bench_img.fmt_time(r.samples["alone"]),
                rate(r, r.samples["alone"]),
                " | ".join(cpu_cells(r, "alone"))))
    lim = [r for r in rows if r.limit_samples and
           any(r.samples[side] for side in r.samples)]
    if lim:
        out += ["", "Where the disk may bound a row: the matching row of "
                "shared/bench's limit suite (fio, io_uring, O_DIRECT, depth "
                "32, the same I/O on the same file, in the same rounds); a "
                "bound's figure is in QEMU's column.", "",
                "| row | fio s, median | QEMU % of limit | strata % of "
                "limit |", "|---|---:|---:|---:|"]
        for r in lim:
            fl = statistics.median(r.limit_samples)
            cells = []
            for side in ("alone", "strata") if "alone" in r.samples \
                    else ("qemu", "strata"):
                xs = r.samples.get(side)
                cells.append("%.0f %%" % (100 * fl / statistics.median(xs))
                             if xs else "—")
            out.append("| %s | %.3f | %s | %s |" % (r.name, fl, cells[0],
                                                    cells[1]))
    out.append("")
    out.append("%d repetitions, sides alternating; QEMU = qemu-img convert "
               "(client) or qemu-storage-daemon's export (export); speed-up "
               "= QEMU median time / strata median time (> 1: strata "
               "faster)." % reps)
    fails = [(r.name, f) for r in rows for f in r.failures]
    if fails:
        out += ["", "FAILURES:"] + ["- %s: %s" % f for f in fails]
    return "\n".join(out)


def main():
    top = os.path.dirname(os.path.dirname(HERE))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suites", default="client,export")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--size", type=parse_size, default=parse_size("1G"))
    p.add_argument("--scale", type=float, default=1.0,
                   help="fewer bench requests (export suite)")
    p.add_argument("--build", default=os.path.join(top, "build"))
    p.add_argument("--strata-img")
    p.add_argument("--stratad")
    p.add_argument("--qemu-img", default=os.environ.get("QEMU_IMG", "qemu-img"))
    p.add_argument("--qsd", default=os.environ.get("QSD",
                                                   "qemu-storage-daemon"))
    p.add_argument("--tmp", default=os.environ.get("STRATA_BENCH_TMP"))
    p.add_argument("--out", help="also write the table here")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--fio", default=os.environ.get("FIO", "fio"),
                   help="fio for the disk-limit rows ('' to skip them)")
    p.add_argument("--floor", help="tests/bench/nbd-floor, built (default: "
                   "in --build; '' to skip its rows)")
    a = p.parse_args()
    if a.fio and not shutil.which(a.fio):
        log("no %s: the export rows run without their disk limit" % a.fio)
        a.fio = ""
    a.suites = a.suites.split(",")
    a.strata_img = a.strata_img or os.path.join(a.build, "block", "strata-img")
    a.stratad = a.stratad or os.path.join(a.build, "qmp", "stratad")
    if a.floor is None:
        a.floor = os.path.join(a.build, "tests", "bench", "nbd-floor")
    if a.floor and not os.access(a.floor, os.X_OK):
        log("no %s: no floor rows" % a.floor)
        a.floor = ""
    rows = Bench(a).go()
    text = report(rows, a.reps)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 1 if any(r.failures for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
