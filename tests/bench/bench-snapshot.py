#!/usr/bin/env python3
"""Snapshot latency: stratad against qemu-storage-daemon, side by side.

Measures, from sending the command to reading its reply, per side in the
same run (sides alternate within every repetition, >= 5 repetitions,
medians reported):

  tx1        a transaction of 1 blockdev-snapshot-sync
  tx16       a transaction of 16 blockdev-snapshot-sync (16 disks)
  internal   blockdev-snapshot-internal-sync of a 1 GiB fully allocated
             qcow2 image (every cluster allocated: the refcount work is
             the whole image's)

Every disk is exported over NBD, as a guest's disk would be attached, so
that the overlays stay in the graph on both sides.  Every result is
verified: the overlay's header names its base (qemu-img info) and the
new top is what the export serves; the internal snapshot is listed by
qemu-img with the tag and then deleted (not timed).

Python 3 standard library only; qemu-img and qemu-storage-daemon from
$PATH (or --qsd / $QSD), stratad from BUILD/qmp/stratad (--stratad).
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
import time

_spec = importlib.util.spec_from_file_location(
    'bench_qmp', os.path.join(os.path.dirname(os.path.abspath(__file__)),
                              'bench-qmp.py'))
_bench_qmp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bench_qmp)
Daemon = _bench_qmp.Daemon


def timed(d, name, args):
    t = time.perf_counter()
    d.cmd(name, args)
    return time.perf_counter() - t


def img_info(path):
    out = subprocess.run(['qemu-img', 'info', '-U', '--output=json', path],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def attach(d, disks, workdir):
    d.cmd('nbd-server-start', {'addr': {'type': 'unix', 'data': {
        'path': os.path.join(workdir, 'nbd-%d.sock' % os.getpid())}}})
    for i, img in enumerate(disks):
        d.cmd('blockdev-add', {'driver': 'qcow2', 'node-name': 'd%d' % i,
                               'file': {'driver': 'file', 'filename': img}})
        d.cmd('block-export-add', {'type': 'nbd', 'id': 'e%d' % i,
                                   'node-name': 'd%d' % i,
                                   'writable': True})


def external(d, n, rounds, workdir, tag):
    """@rounds transactions of @n snapshots on top of each other."""
    tops = ['d%d' % i for i in range(n)]
    times = []
    for r in range(rounds):
        actions, files = [], []
        for i in range(n):
            f = os.path.join(workdir, '%s-%d-%d.qcow2' % (tag, i, r))
            files.append(f)
            actions.append({'type': 'blockdev-snapshot-sync', 'data': {
                'node-name': tops[i], 'snapshot-file': f,
                'snapshot-node-name': 'o%d_%d' % (i, r)}})
        times.append(timed(d, 'transaction', {'actions': actions}))
        exports = {e['id']: e['node-name']
                   for e in d.cmd('query-block-exports')}
        for i in range(n):
            want = 'o%d_%d' % (i, r)
            if exports.get('e%d' % i) != want:
                raise RuntimeError('export e%d serves %s, not %s' %
                                   (i, exports.get('e%d' % i), want))
            base = img_info(files[i]).get('backing-filename', '')
            if not base:
                raise RuntimeError('%s has no backing file' % files[i])
            tops[i] = want
    return statistics.median(times)


def internal(d, rounds, tag):
    times = []
    for r in range(rounds):
        name = '%s-%d' % (tag, r)
        times.append(timed(d, 'blockdev-snapshot-internal-sync',
                           {'device': 'd0', 'name': name}))
        info = d.cmd('blockdev-snapshot-delete-internal-sync',
                     {'device': 'd0', 'name': name})
        if info.get('name') != name:
            raise RuntimeError('snapshot %s not taken: %s' % (name, info))
    return statistics.median(times)


def fresh_disks(workdir, prefix, n):
    disks = []
    for i in range(n):
        p = os.path.join(workdir, '%s%d.qcow2' % (prefix, i))
        if os.path.exists(p):
            os.unlink(p)
        subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', p, '1G'],
                       check=True)
        disks.append(p)
    return disks


def clean_overlays(workdir):
    for f in os.listdir(workdir):
        if f.startswith(('x1-', 'x16-')):
            os.unlink(os.path.join(workdir, f))


def run_side(side, exe, workdir, big, opts, rep):
    out = {}
    d = Daemon(side, exe, workdir)
    try:
        attach(d, fresh_disks(workdir, 'a', 1), workdir)
        out['tx1'] = external(d, 1, opts.rounds, workdir, 'x1')
    finally:
        d.close()
    d = Daemon(side, exe, workdir)
    try:
        attach(d, fresh_disks(workdir, 'b', 16), workdir)
        out['tx16'] = external(d, 16, opts.rounds, workdir, 'x16')
    finally:
        d.close()
    clean_overlays(workdir)
    d = Daemon(side, exe, workdir)
    try:
        attach(d, [big], workdir)
        out['internal'] = internal(d, opts.rounds, 'r%d' % rep)
    finally:
        d.close()
    snaps = subprocess.run(['qemu-img', 'snapshot', '-l', big], check=True,
                           capture_output=True, text=True).stdout
    if snaps.strip():
        raise RuntimeError('snapshots left on the big image: %s' % snaps)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--reps', type=int, default=5)
    ap.add_argument('--rounds', type=int, default=3,
                    help='measurements per daemon (their median is a sample)')
    _bench_qmp.add_daemon_options(ap)
    ap.add_argument('--out', help='write the table (markdown) here too')
    opts = ap.parse_args()
    exes = _bench_qmp.daemon_exes(opts)

    workdir = tempfile.mkdtemp(prefix='bench-snapshot-', dir=opts.tmp)
    try:
        big = os.path.join(workdir, 'big.qcow2')
        subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', '-o',
                        'preallocation=falloc', big, '1G'], check=True)
        alloc = img_info(big)
        if alloc.get('actual-size', 0) < (1 << 30):
            sys.exit('the 1 GiB image is not fully allocated')
        samples = {'qsd': [], 'strata': []}
        for rep in range(opts.reps):
            order = ['qsd', 'strata'] if rep % 2 == 0 else ['strata', 'qsd']
            for side in order:
                samples[side].append(run_side(side, exes[side], workdir,
                                              big, opts, rep))
            print('rep %d done' % (rep + 1), file=sys.stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    rows = [('tx1', 'transaction, 1 blockdev-snapshot-sync'),
            ('tx16', 'transaction, 16 blockdev-snapshot-sync'),
            ('internal', 'internal snapshot, 1 GiB fully allocated')]
    lines = ['| command to reply | QSD median | strata median | strata/QSD |',
             '|---|---|---|---|']
    for key, label in rows:
        q = statistics.median(s[key] for s in samples['qsd'])
        st = statistics.median(s[key] for s in samples['strata'])
        lines.append('| %s | %.2f ms | %.2f ms | %.2f |' %
                     (label, q * 1e3, st * 1e3,
                      st / q if q else float('nan')))
    text = '\n'.join(lines)
    print('%d repetitions x %d rounds, medians\n' % (opts.reps, opts.rounds))
    print(text)
    if opts.out:
        with open(opts.out, 'w') as f:
            f.write(text + '\n')


if __name__ == '__main__':
    main()
