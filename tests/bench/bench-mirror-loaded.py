#!/usr/bin/env python3
"""Mirror under load: time to READY while a guest writes at full speed.

Per sample and side (stratad, then qemu-storage-daemon, alternating the
order every repetition):

  1. a fresh copy of the source image (qcow2, --fill of it holding data)
     and an empty qcow2 target of the same size;
  2. the daemon opens both (cache.direct, aio io_uring) and exports the
     source writable over NBD on a UNIX socket;
  3. the guest starts: `qemu-img bench -w -s 4k -d 32` over that export,
     with a stride of 4 KiB x a large prime, so successive writes land
     all over the disk (each in a different 64 KiB granule), as many as
     it can;
  4. blockdev-mirror sync=full (background copy mode: the default); the
     time runs from the command to BLOCK_JOB_READY, capped at --cap
     seconds (QEMU's mirror may never converge under such a guest: the
     row then says "no READY" with what was left to copy);
  5. the guest stops; a READY job is completed, the daemon quits and the
     target must equal the source (qemu-img compare), since both saw
     every write up to the pivot.

stratad also reports, from x-strata-query-jobs, whether it switched to
write-blocking by itself.  Python 3 standard library only; qemu-img and
qemu-storage-daemon from $PATH (or --qemu-img, --qsd).  Timing belongs
here, never in a test; the machine's noise shows in min/median.
"""
import argparse
import importlib.util
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location(
    'bench_qmp', os.path.join(HERE, 'bench-qmp.py'))
bench_qmp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_qmp)

PRIME_STRIDE = 4099     # blocks of 4 KiB between two guest writes


class Daemon(bench_qmp.Daemon):
    """bench-qmp's daemon, keeping the events it reads."""

    def cmd(self, name, args=None):
        msg = {'execute': name}
        if args is not None:
            msg['arguments'] = args
        self.sock.sendall(json.dumps(msg).encode() + b'\n')
        while True:
            r = self._read()
            if 'return' in r or 'error' in r:
                break
        if 'error' in r:
            raise RuntimeError('%s: %s' % (name, r['error']))
        return r['return']

    def _read(self, deadline=None):
        """One message; None when @deadline passes first."""
        buf = getattr(self, 'buf', b'')
        while b'\n' not in buf:
            left = None if deadline is None else deadline - time.perf_counter()
            if left is not None and (left <= 0 or not select.select(
                    [self.sock], [], [], left)[0]):
                self.buf = buf
                return None
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError('connection closed')
            buf += chunk
        line, self.buf = buf.split(b'\n', 1)
        r = json.loads(line)
        if 'event' in r:
            self.events.append(r)
        return r

    def wait_event(self, names, deadline):
        """The first event in @names before @deadline, else None."""
        while True:
            for i, ev in enumerate(self.events):
                if ev['event'] in names:
                    return self.events.pop(i)
            if self._read(deadline) is None:
                return None


def run(argv, **kw):
    return subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, **kw)


def make_source(opts, path):
    run([opts.qemu_img, 'create', '-q', '-f', 'qcow2', path, opts.size])
    size = json.loads(subprocess.check_output(
        [opts.qemu_img, 'info', '--output=json', path]))['virtual-size']
    fill = int(size * opts.fill) // (1 << 20) << 20
    if fill:
        run([opts.qemu_io, '-c', 'write -P 0x5c 0 %d' % fill, path])
    return size


def sample(side, exe, opts, scratch, pristine, size):
    work = os.path.join(scratch, 'work-%s' % side)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    src = os.path.join(work, 'src.qcow2')
    tgt = os.path.join(work, 'tgt.qcow2')
    shutil.copyfile(pristine, src)
    run([opts.qemu_img, 'create', '-q', '-f', 'qcow2', tgt, str(size)])
    d = Daemon(side, exe, work)
    d.events = []
    guest = None
    res = {'side': side}
    try:
        for name, path in (('src', src), ('tgt', tgt)):
            d.cmd('blockdev-add', {
                'driver': 'qcow2', 'node-name': name,
                'cache': {'direct': True},
                'file': {'driver': 'file', 'filename': path,
                         'aio': 'io_uring', 'cache': {'direct': True}}})
        sock = os.path.join(work, 'nbd.sock')
        d.cmd('nbd-server-start', {'addr': {'type': 'unix',
                                            'data': {'path': sock}}})
        d.cmd('block-export-add', {'type': 'nbd', 'id': 'e0',
                                   'node-name': 'src', 'name': 'disk',
                                   'writable': True})
        guest = subprocess.Popen(
            [opts.qemu_img, 'bench', '-w', '-f', 'raw', '-s', '4096',
             '-d', '32', '-c', str(1 << 30), '-S', str(4096 * PRIME_STRIDE),
             '--pattern=0xa7', 'nbd+unix:///disk?socket=%s' % sock],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)                 # the guest is at full speed
        t0 = time.perf_counter()
        d.cmd('blockdev-mirror', {'job-id': 'm', 'device': 'src',
                                  'target': 'tgt', 'sync': 'full'})
        ev = d.wait_event(('BLOCK_JOB_READY', 'BLOCK_JOB_COMPLETED'),
                          t0 + opts.cap)
        ready = ev is not None and ev['event'] == 'BLOCK_JOB_READY'
        res['ready_s'] = time.perf_counter() - t0 if ready else None
        job = d.cmd('query-block-jobs')
        if job:
            res['left'] = job[0]['len'] - job[0]['offset']
        if side == 'strata':
            x = d.cmd('x-strata-query-jobs')
            if x:
                res['copy_mode'] = x[0].get('copy-mode')
                res['auto'] = x[0].get('auto-write-blocking')
        guest.kill()
        guest.wait()
        guest = None
        if ready:
            d.cmd('block-job-complete', {'device': 'm'})
            ev = d.wait_event(('BLOCK_JOB_COMPLETED',),
                              time.perf_counter() + opts.cap)
            if ev is None or 'error' in ev.get('data', {}):
                raise RuntimeError('%s: completion failed: %s' % (side, ev))
        else:
            d.cmd('block-job-cancel', {'device': 'm', 'force': True})
            d.wait_event(('BLOCK_JOB_CANCELLED',),
                         time.perf_counter() + opts.cap)
    finally:
        if guest:
            guest.kill()
            guest.wait()
        d.close()
    if res['ready_s'] is not None:
        r = subprocess.run([opts.qemu_img, 'compare', '-q', src, tgt])
        res['verified'] = r.returncode == 0
        if not res['verified']:
            raise RuntimeError('%s: VERIFY FAILED: target != source' % side)
    shutil.rmtree(work, ignore_errors=True)
    return res


def describe(rs):
    ready = [r['ready_s'] for r in rs if r['ready_s'] is not None]
    out = '%d/%d READY' % (len(ready), len(rs))
    if ready:
        out += ', median %.2f s, min %.2f s' % (statistics.median(ready),
                                                min(ready))
    never = [r for r in rs if r['ready_s'] is None]
    if never:
        out += '; no READY within the cap, %s left to copy' % ', '.join(
            '%.0f MiB' % (r.get('left', 0) / 2**20) for r in never)
    modes = set('%s%s' % (r.get('copy_mode'), ' (auto)' if r.get('auto')
                          else '') for r in rs if 'copy_mode' in r)
    if modes:
        out += '; copy mode at the end: ' + ', '.join(sorted(modes))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--build', default='build')
    ap.add_argument('--stratad')
    ap.add_argument('--qsd', default=os.environ.get(
        'QSD', 'qemu-storage-daemon'))
    ap.add_argument('--qemu-img', default=os.environ.get('QEMU_IMG',
                                                         'qemu-img'))
    ap.add_argument('--qemu-io', default=os.environ.get('QEMU_IO',
                                                        'qemu-io'))
    ap.add_argument('--size', default='1G')
    ap.add_argument('--fill', type=float, default=0.6,
                    help='fraction of the source holding data (0.6)')
    ap.add_argument('--reps', type=int, default=3)
    ap.add_argument('--cap', type=float, default=60,
                    help='seconds to wait for READY (60)')
    ap.add_argument('--sides', default='strata,qsd')
    ap.add_argument('--tmp', default=os.environ.get('STRATA_BENCH_TMP'))
    ap.add_argument('--keep', action='store_true')
    opts = ap.parse_args()
    stratad = opts.stratad or os.path.join(opts.build, 'qmp', 'stratad')
    exes = {'strata': os.path.abspath(stratad), 'qsd': opts.qsd}
    sides = opts.sides.split(',')

    scratch = tempfile.mkdtemp(prefix='strata-mirror-loaded-', dir=opts.tmp)
    results = {s: [] for s in sides}
    try:
        pristine = os.path.join(scratch, 'pristine.qcow2')
        size = make_source(opts, pristine)
        for rep in range(opts.reps):
            order = sides if rep % 2 == 0 else list(reversed(sides))
            for side in order:
                r = sample(side, exes[side], opts, scratch, pristine, size)
                results[side].append(r)
                print('rep %d %-6s %s' % (
                    rep + 1, side, 'READY after %.2f s' % r['ready_s']
                    if r['ready_s'] is not None else
                    'no READY within %.0f s' % opts.cap) +
                    ('' if 'copy_mode' not in r else
                     ' (copy mode %s%s)' % (r['copy_mode'],
                                            ', switched by itself'
                                            if r['auto'] else '')),
                    flush=True)
    finally:
        if not opts.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    print('\nmirror sync=full of a %s image (%.0f%% data), guest: 4 KiB '
          'writes, depth 32, over NBD' % (opts.size, opts.fill * 100))
    for side in sides:
        print('  %-6s %s' % (side, describe(results[side])))
    return 0


if __name__ == '__main__':
    sys.exit(main())
