#!/usr/bin/env python3
"""QMP benchmark: stratad against qemu-storage-daemon, side by side.

Measures, per side, in the same run (the method of shared/bench: sides
alternate within every repetition, >= 5 repetitions, medians reported):

  spawn       daemon start to the first QMP answer (qmp_capabilities)
  version     round trip of query-version
  nodes100    round trip of query-named-block-nodes with 100 null-co nodes
  rss100      RSS growth from the idle daemon to one with 100 qcow2 nodes

Python 3 standard library only; qemu-img and qemu-storage-daemon from
$PATH (or --qsd / $QSD), stratad from BUILD/qmp/stratad (--stratad).
"""
import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time


class Daemon:
    def __init__(self, side, exe, workdir):
        self.sock_path = os.path.join(workdir, '%s.sock' % side)
        if os.path.exists(self.sock_path):
            os.unlink(self.sock_path)
        if side == 'strata':
            argv = [exe, '--qmp', self.sock_path]
        else:
            argv = [exe, '--chardev',
                    'socket,path=%s,server=on,wait=off,id=m0' %
                    self.sock_path, '--monitor', 'chardev=m0']
        self.side = side
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(argv, cwd=workdir,
                                     stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.sock = None
        deadline = self.t0 + 10
        while True:
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(self.sock_path)
                self.sock = s
                break
            except OSError:
                s.close()
                if time.perf_counter() > deadline:
                    raise RuntimeError('%s did not start' % side)
                time.sleep(0.0002)
        try:
            # A daemon that never answers fails the start instead of
            # hanging the run.
            self.sock.settimeout(30)
            self.f = self.sock.makefile('rwb', buffering=0)
            self.rfile = self.sock.makefile('rb')
            self.rfile.readline()                   # greeting
            self.cmd('qmp_capabilities')
        except Exception as e:
            self.proc.kill()
            self.proc.wait()
            self.sock.close()
            raise RuntimeError('%s: %s' % (side, e))
        self.t_ready = time.perf_counter() - self.t0

    def cmd(self, name, args=None):
        msg = {'execute': name}
        if args is not None:
            msg['arguments'] = args
        self.sock.sendall(json.dumps(msg).encode() + b'\n')
        while True:
            line = self.rfile.readline()
            if not line:
                raise RuntimeError('%s: connection closed' % name)
            r = json.loads(line)
            if 'return' in r or 'error' in r:
                break
        if 'error' in r:
            raise RuntimeError('%s: %s: %s (sent %r)' % (
                self.side, name, r['error'], json.dumps(msg)))
        return r['return']

    def rss_kib(self):
        with open('/proc/%d/status' % self.proc.pid) as f:
            for line in f:
                if line.startswith('VmRSS:'):
                    return int(line.split()[1])
        return -1

    def close(self):
        try:
            self.sock.sendall(b'{"execute": "quit"}\n')
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        self.sock.close()


def roundtrip(d, name, args, n):
    d.cmd(name, args)                           # warm up
    t = time.perf_counter()
    for _ in range(n):
        d.cmd(name, args)
    return (time.perf_counter() - t) / n


def start_daemon(side, exe, workdir):
    """A daemon that fails its start (no greeting, a garbled reply to
    qmp_capabilities: QSD 7.2 does either once in a few hundred starts
    here) is counted, reported and started again."""
    for attempt in range(3):
        try:
            return Daemon(side, exe, workdir)
        except (OSError, RuntimeError, ValueError) as e:
            print('%s: start failed (%s), retrying' % (side, e),
                  file=sys.stderr)
    raise RuntimeError('%s: three starts failed' % side)


def run_side(side, exe, workdir, images, opts):
    out = {}
    spawns = []
    for _ in range(opts.spawns):
        d = start_daemon(side, exe, workdir)
        spawns.append(d.t_ready)
        d.close()
    out['spawn'] = statistics.median(spawns)

    d = start_daemon(side, exe, workdir)
    try:
        out['version'] = roundtrip(d, 'query-version', None, opts.requests)
        for i in range(100):
            d.cmd('blockdev-add', {'driver': 'null-co', 'node-name': 'n%d' % i,
                                   'size': 1 << 30})
        out['nodes100'] = roundtrip(d, 'query-named-block-nodes', None,
                                    max(opts.requests // 10, 20))
    finally:
        d.close()

    d = start_daemon(side, exe, workdir)
    try:
        time.sleep(0.05)
        idle = d.rss_kib()
        for i, img in enumerate(images):
            d.cmd('blockdev-add', {'driver': 'qcow2', 'node-name': 'q%d' % i,
                                   'file': {'driver': 'file',
                                            'filename': img}})
        time.sleep(0.05)
        out['rss100'] = (d.rss_kib() - idle) * 1024
    finally:
        d.close()
    return out


def add_daemon_options(ap):
    """--build, --stratad, --qsd and --tmp, as every QMP bench takes them."""
    ap.add_argument('--build', default='build')
    ap.add_argument('--stratad')
    ap.add_argument('--qsd', default=os.environ.get('QSD',
                                                    'qemu-storage-daemon'))
    ap.add_argument('--tmp', default=os.environ.get('STRATA_BENCH_TMP'))


def daemon_exes(opts):
    """The two daemons' paths from add_daemon_options' options; exits
    naming them when either is missing."""
    stratad = opts.stratad or os.path.join(opts.build, 'qmp', 'stratad')
    exes = {'qsd': shutil.which(opts.qsd), 'strata': os.path.abspath(stratad)}
    if not exes['qsd'] or not os.access(exes['strata'], os.X_OK):
        sys.exit('need qemu-storage-daemon and stratad (%s)' % exes)
    return exes


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--reps', type=int, default=5)
    ap.add_argument('--requests', type=int, default=2000,
                    help='query-version round trips per repetition')
    ap.add_argument('--spawns', type=int, default=10,
                    help='daemon starts per repetition')
    add_daemon_options(ap)
    ap.add_argument('--out', help='write the table (markdown) here too')
    opts = ap.parse_args()
    exes = daemon_exes(opts)

    workdir = tempfile.mkdtemp(prefix='bench-qmp-', dir=opts.tmp)
    try:
        images = []
        for i in range(100):
            p = os.path.join(workdir, 'q%d.qcow2' % i)
            subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', p,
                            '64M'], check=True)
            images.append(p)
        samples = {'qsd': [], 'strata': []}
        for rep in range(opts.reps):
            order = ['qsd', 'strata'] if rep % 2 == 0 else ['strata', 'qsd']
            for side in order:
                samples[side].append(run_side(side, exes[side], workdir,
                                              images, opts))
            print('rep %d done' % (rep + 1), file=sys.stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    rows = [('spawn', 'spawn to first QMP answer', 1e3, 'ms'),
            ('version', 'query-version round trip', 1e6, 'µs'),
            ('nodes100', 'query-named-block-nodes, 100 nodes', 1e6, 'µs'),
            ('rss100', 'RSS growth, idle to 100 qcow2 nodes', 1 / 2**20,
             'MiB')]
    lines = ['| metric | QSD median | strata median | strata/QSD |',
             '|---|---|---|---|']
    for key, label, scale, unit in rows:
        q = statistics.median(s[key] for s in samples['qsd'])
        st = statistics.median(s[key] for s in samples['strata'])
        lines.append('| %s | %.2f %s | %.2f %s | %.2f |' %
                     (label, q * scale, unit, st * scale, unit,
                      st / q if q else float('nan')))
    text = '\n'.join(lines)
    print('%d repetitions, medians\n' % opts.reps)
    print(text)
    if opts.out:
        with open(opts.out, 'w') as f:
            f.write(text + '\n')


if __name__ == '__main__':
    main()
