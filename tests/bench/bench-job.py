#!/usr/bin/env python3
"""One live job, timed, for profiling: a quick loop beside shared/bench.

Copies a chain made by shared/bench's mkchain (base, snap1..snap4) into a
scratch dir, starts stratad (or qemu-storage-daemon with --qsd), opens
every layer with cache.direct=on (off with --writeback), holds the top with a writable NBD
export, runs one job and prints its time, the daemon's CPU seconds and
peak RSS.  The result is checked with qemu-img compare against a
flattened copy of the pristine chain.  With --perf, the daemon runs
under `perf record -g` (perf.data in the scratch dir, kept).  With
--iotrace, it runs under `perf record` of the io_uring submit and
complete tracepoints, and the job's requests are summed up: count,
MiB and sizes per opcode, and the average number in flight (counts that
do not depend on how busy the machine is; needs perf and root).

  bench-job.py --chain DIR
               --job stream|stream-base|commit|active-commit|mirror
               [--writeback] [--reps N] [--stratad build/qmp/stratad | --qsd]
               [--perf | --perf-stat | --iotrace] [--stats] [--speed B]

active-commit and mirror complete on BLOCK_JOB_READY and are checked on
base and on the new target.qcow2.
--perf-stat: the daemon's instruction count over its whole life (perf
stat -e instructions; load-independent, unlike the time).  --stats:
x-strata-query-node-stats of every layer after the job (stratad).
"""
import collections
import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

JOBS = {
    'stream': {'cmd': 'block-stream',
               'args': {'device': 'snap4'}, 'ref': 'top'},
    'stream-base': {'cmd': 'block-stream',
                    'args': {'device': 'snap4', 'base-node': 'base',
                             'backing-file': 'base.qcow2'}, 'ref': 'top'},
    'commit': {'cmd': 'block-commit',
               'args': {'device': 'snap4', 'top-node': 'snap3',
                        'base-node': 'snap1',
                        'backing-file': 'snap1.qcow2'}, 'ref': 'top'},
    'active-commit': {'cmd': 'block-commit',
                      'args': {'device': 'snap4', 'base-node': 'base'},
                      'ref': 'top', 'complete': True, 'result': 'base'},
    'mirror': {'cmd': 'blockdev-mirror',
               'args': {'device': 'snap4', 'target': 'target', 'sync': 'full'},
               'ref': 'top', 'complete': True, 'result': 'target'},
}
LAYERS = ['base', 'snap1', 'snap2', 'snap3', 'snap4']


class Qmp:
    def __init__(self, path):
        deadline = time.time() + 10
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.time() > deadline:
                    raise
                time.sleep(0.01)
        self.f = self.sock.makefile('rwb', buffering=0)
        self.events = []
        self.read()
        self.cmd('qmp_capabilities')

    def read(self):
        return json.loads(self.f.readline())

    def cmd(self, name, **args):
        self.f.write(json.dumps({'execute': name,
                                 'arguments': args}).encode() + b'\n')
        while True:
            m = self.read()
            if 'event' in m:
                self.events.append(m)
                continue
            if 'error' in m:
                raise RuntimeError('%s: %s' % (name, m['error']))
            return m['return']

    def wait_event(self, name):
        while True:
            for i, e in enumerate(self.events):
                if e['event'] == name:
                    return self.events.pop(i)
            self.events.append(self.read())


def proc_stat(pid):
    with open('/proc/%d/stat' % pid) as f:
        parts = f.read().rsplit(')', 1)[1].split()
    tick = os.sysconf('SC_CLK_TCK')
    cpu = (int(parts[11]) + int(parts[12])) / tick
    hwm = 0
    with open('/proc/%d/status' % pid) as f:
        for line in f:
            if line.startswith('VmHWM:'):
                hwm = int(line.split()[1])
    return cpu, hwm


def run_once(a, tmp, ref):
    work = os.path.join(tmp, 'work')
    shutil.rmtree(work, ignore_errors=True)
    os.mkdir(work)
    for n in LAYERS:
        subprocess.check_call(['cp', '--sparse=always',
                               os.path.join(a.chain, n + '.qcow2'), work])
        fd = os.open(os.path.join(work, n + '.qcow2'), os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    if a.job == 'mirror':
        subprocess.check_call(['qemu-img', 'create', '-q', '-f', 'qcow2',
                               os.path.join(work, 'target.qcow2'), '1G'])
    sock = os.path.join(work, 'qmp.sock')
    if a.qsd:
        argv = ['qemu-storage-daemon', '--chardev',
                'socket,path=%s,server=on,wait=off,id=m0' % sock,
                '--monitor', 'chardev=m0']
    else:
        argv = [a.stratad, '--qmp', sock]
    if a.perf:
        argv = ['perf', 'record', '-g', '-o',
                os.path.join(tmp, 'perf.data'), '--'] + argv
    elif a.perf_stat:
        argv = ['perf', 'stat', '-x', ',', '-e', 'instructions:u,'
                'instructions:k', '-o', os.path.join(tmp, 'perf-stat.txt'),
                '--'] + argv
    elif a.iotrace:
        argv = ['perf', 'record', '-q', '-k', 'CLOCK_MONOTONIC',
                '-e', 'io_uring:io_uring_submit_req',
                '-e', 'io_uring:io_uring_complete',
                '-o', os.path.join(tmp, 'io.data'), '--'] + argv
    proc = subprocess.Popen(argv, cwd=work, stdout=subprocess.DEVNULL)
    q = Qmp(sock)
    pid = proc.pid
    if a.perf or a.perf_stat or a.iotrace:
        time.sleep(0.3)
        pid = int(subprocess.check_output(['pgrep', '-P', str(proc.pid)]))
    prev = None
    direct = not a.writeback
    for n in LAYERS + (['target'] if a.job == 'mirror' else []):
        q.cmd('blockdev-add', **{
            'driver': 'qcow2', 'node-name': n,
            'backing': prev if n != 'target' else None,
            'cache': {'direct': direct},
            'file': {'driver': 'file', 'aio': 'io_uring',
                     'cache': {'direct': direct},
                     'filename': os.path.join(work, n + '.qcow2')}})
        prev = n
    q.cmd('nbd-server-start', addr={'type': 'unix', 'data': {
        'path': os.path.join(work, 'nbd.sock')}})
    q.cmd('block-export-add', type='nbd', id='e0', **{'node-name': 'snap4'},
          writable=True)
    job = JOBS[a.job]
    args = dict(job['args'])
    if a.speed:
        args['speed'] = a.speed
    cpu0, _ = proc_stat(pid)
    m0 = time.monotonic()
    t0 = time.perf_counter()
    q.cmd(job['cmd'], **{'job-id': 'j'}, **args)
    if job.get('complete'):
        q.wait_event('BLOCK_JOB_READY')
        q.cmd('block-job-complete', device='j')
    ev = q.wait_event('BLOCK_JOB_COMPLETED')
    t = time.perf_counter() - t0
    m1 = time.monotonic()
    cpu1, hwm = proc_stat(pid)
    if 'error' in ev['data']:
        raise RuntimeError(ev['data']['error'])
    if a.stats and not a.qsd:
        for n in q.cmd('x-strata-query-node-stats'):
            if n.get('driver') == 'qcow2':
                print('  %s: %s' % (n['node-name'], json.dumps(n['stats'])))
    q.cmd('quit')
    proc.wait()
    if a.perf_stat:
        with open(os.path.join(tmp, 'perf-stat.txt')) as f:
            for line in f:
                if 'instructions' in line:
                    f2 = line.split(',')
                    print('  %s %s' % (f2[2], f2[0]))
    r = subprocess.run(['qemu-img', 'compare', '-q', ref,
                        os.path.join(work, job.get('result', 'snap4') +
                                     '.qcow2')])
    if a.iotrace:
        io_summary(os.path.join(tmp, 'io.data'), m0, m1)
    return t, cpu1 - cpu0, hwm, r.returncode == 0


IO_EVENT = re.compile(r'(\d+\.\d+):\s+io_uring:io_uring_(submit_req|complete):'
                      r'.*?req (0x[0-9a-f]+).*?(?:opcode (\w+)|result (-?\d+))')


def io_summary(data, m0, m1):
    """Requests the daemon sent between job start @m0 and its end @m1
    (CLOCK_MONOTONIC seconds): per opcode, and how many were in flight."""
    out = subprocess.run(['perf', 'script', '-i', data], capture_output=True,
                         text=True).stdout
    pending = {}
    count, size = collections.Counter(), collections.Counter()
    hist = collections.defaultdict(collections.Counter)
    inflight, last, area = 0, m0, 0.0
    for line in out.splitlines():
        m = IO_EVENT.search(line)
        if not m:
            continue
        t = float(m.group(1))
        if m.group(2) == 'submit_req':
            if m0 <= t <= m1:
                area += inflight * (t - last)
                last = t
                inflight += 1
                pending[m.group(3)] = m.group(4)
            continue
        op = pending.pop(m.group(3), None)
        if op is None:
            continue
        area += inflight * (t - last)
        last = t
        inflight -= 1
        res = max(int(m.group(5)), 0)
        count[op] += 1
        size[op] += res
        hist[op][1 << max(res - 1, 0).bit_length() if res else 0] += 1
    for op in sorted(count):
        print('  %-9s %6d requests  %8.1f MiB  sizes: %s' % (
            op, count[op], size[op] / 2**20, ' '.join(
                '%dK:%d' % (k // 1024, v) for k, v in sorted(hist[op].items()))))
    if last > m0:
        print('  requests in flight on average: %.1f' % (area / (last - m0)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--chain', required=True)
    p.add_argument('--job', choices=sorted(JOBS), default='stream')
    p.add_argument('--reps', type=int, default=1)
    p.add_argument('--stratad', default='build/qmp/stratad')
    p.add_argument('--qsd', action='store_true')
    p.add_argument('--perf', action='store_true')
    p.add_argument('--perf-stat', action='store_true')
    p.add_argument('--stats', action='store_true')
    p.add_argument('--iotrace', action='store_true')
    p.add_argument('--speed', type=int, default=0)
    p.add_argument('--writeback', action='store_true',
                   help='cache.direct=off on every node')
    a = p.parse_args()
    a.stratad = os.path.abspath(a.stratad)
    a.chain = os.path.abspath(a.chain)
    tmp = tempfile.mkdtemp(prefix='bench-job.')
    ref = os.path.join(a.chain, 'ref-top.qcow2')
    if not os.path.exists(ref):
        subprocess.check_call(['qemu-img', 'convert', '-O', 'qcow2',
                               os.path.join(a.chain, 'snap4.qcow2'), ref])
    ok_all = True
    for _ in range(a.reps):
        t, cpu, hwm, ok = run_once(a, tmp, ref)
        ok_all = ok_all and ok
        print('%s %s: %.3f s  cpu %.2f s  peak RSS %.1f MiB  %s' % (
            'qsd' if a.qsd else 'strata', a.job, t, cpu, hwm / 1024,
            'verified' if ok else 'MISMATCH'), flush=True)
    if a.perf:
        print('perf data:', os.path.join(tmp, 'perf.data'))
    else:
        shutil.rmtree(tmp)
    return 0 if ok_all else 1


if __name__ == '__main__':
    sys.exit(main())
