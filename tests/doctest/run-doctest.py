#!/usr/bin/env python3
"""Runs the examples of a Markdown document and checks their output.

    run-doctest.py --build BUILD-DIR DOC.md...
    run-doctest.py --build BUILD-DIR --self-test

A fenced block is run when its info string carries the word `doctest`:

    ```sh doctest            shell commands, run by bash -e in the scratch
                             directory; `exit=N` expects that exit status
    ```json doctest          QMP commands ({"execute": ...}, one after the
                             other) sent to qmp.sock; prints each reply

A block whose info string is `output`, right after a runnable one, is what
that block must print (stdout and stderr together).  In it, `...` inside
a line matches any text on that line, and a line holding only `...` any
number of lines.  An HTML comment opening with `<!-- doctest` holds shell
commands run like a block but not shown to readers.

Blocks run in document order, all in one scratch directory, with the
build's strata-img, strata-qmp and stratad first in PATH.  Volatile fields
(timestamps, dates, sizes on disk, rates, the scratch directory's path)
are masked on both sides before comparing.  A daemon the examples start
with --pidfile NAME.pid is stopped (by that pid) when the run ends.
Exit status: 0 all passed, 1 a block failed, 77 a needed tool is missing.
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

BLOCK_TIMEOUT = 120

FENCE = re.compile(r'^(```+)\s*(.*)$')
HIDDEN = re.compile(r'^<!--\s*doctest\s*$')

# (pattern, replacement), applied to expected and actual text alike.
VOLATILE = [
    (re.compile(r'"timestamp": \{[^}]*\}'), '"timestamp": {...}'),
    (re.compile(r'(disk size: )\S+( \S+)?'), r'\1SIZE'),
    (re.compile(r'("actual-size": )\d+'), r'\1SIZE'),
    (re.compile(r'\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}'), 'DATE'),
    (re.compile(r'\b\d{2,}:\d{2}:\d{2}\.\d{3}\b'), 'CLOCK'),
    (re.compile(r'(\d+ ops; )\S+ sec \([^)]*\)'), r'\1TIME'),
    (re.compile(r'("date-(?:sec|nsec)": )\d+'), r'\1N'),
    (re.compile(r'("vm-clock-(?:sec|nsec)": )\d+'), r'\1N'),
]


class Block:
    def __init__(self, kind, text, line, exit_status=0):
        self.kind = kind            # 'sh' or 'qmp'
        self.text = text
        self.line = line            # first line of the block in the file
        self.exit_status = exit_status
        self.expected = None        # text of the following output block


def parse(path):
    """Returns the runnable blocks of @path, in order."""
    with open(path, encoding='utf-8') as f:
        lines = f.read().split('\n')
    blocks = []
    last = None         # the runnable block an output block may follow
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if HIDDEN.match(lines[i]):
            j = i + 1
            while j < len(lines) and lines[j].strip() != '-->':
                j += 1
            blocks.append(Block('sh', '\n'.join(lines[i + 1:j]), i + 2))
            last = None
            i = j + 1
            continue
        if not m:
            if lines[i].strip():
                last = None
            i += 1
            continue
        fence, info = m.group(1), m.group(2).split()
        j = i + 1
        while j < len(lines) and not lines[j].startswith(fence):
            j += 1
        if j >= len(lines):
            sys.exit('%s:%d: unterminated code block' % (path, i + 1))
        body = '\n'.join(lines[i + 1:j])
        if 'doctest' in info:
            kind = 'qmp' if info[0] == 'json' else 'sh'
            status = 0
            for word in info:
                if word.startswith('exit='):
                    status = int(word[5:])
            last = Block(kind, body, i + 2, status)
            blocks.append(last)
        elif info == ['output'] and last is not None:
            last.expected = body
            last = None
        else:
            last = None
        i = j + 1
    return blocks


def mask(text, scratch):
    text = text.replace(scratch, '$PWD')
    for pattern, repl in VOLATILE:
        text = pattern.sub(repl, text)
    return '\n'.join(line.rstrip() for line in text.strip('\n').split('\n'))


def matches(expected, actual):
    """Whether @actual fits @expected, with its `...` wildcards."""
    parts = []
    for line in expected.split('\n'):
        if line.strip() == '...':
            parts.append(r'(?:[^\n]*\n)*?')
        else:
            esc = re.escape(line).replace(re.escape('...'), r'[^\n]*?')
            parts.append(esc + r'\n')
    return re.fullmatch(''.join(parts), actual + '\n') is not None


def qmp_run(sock_path, text):
    """Sends each QMP command of @text; returns the replies, one a line."""
    decoder = json.JSONDecoder()
    commands = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        obj, end = decoder.raw_decode(text, pos)
        commands.append(obj)
        pos = end
        while pos < len(text) and text[pos].isspace():
            pos += 1
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(BLOCK_TIMEOUT)
    s.connect(sock_path)
    buf = ''

    def next_reply():
        nonlocal buf
        while True:
            while True:
                stripped = buf.lstrip()
                if not stripped:
                    break
                try:
                    obj, end = decoder.raw_decode(stripped)
                except ValueError:
                    break
                buf = stripped[end:]
                if 'event' not in obj:
                    return obj
            data = s.recv(65536)
            if not data:
                raise RuntimeError('the server closed the connection')
            buf += data.decode('utf-8')

    out = []
    try:
        next_reply()                            # the greeting
        s.sendall(b'{"execute": "qmp_capabilities"}\n')
        next_reply()
        for cmd in commands:
            s.sendall((json.dumps(cmd) + '\n').encode('utf-8'))
            out.append(json.dumps(next_reply()))
    finally:
        s.close()
    return '\n'.join(out) + '\n', 0


def sh_run(scratch, env, text):
    p = subprocess.run(['bash', '-e', '-o', 'pipefail', '-c', text],
                       cwd=scratch, env=env, stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=BLOCK_TIMEOUT)
    return p.stdout.decode('utf-8', 'replace'), p.returncode


def stop_daemons(scratch):
    """Stops, by the pid in its pid file, every daemon still running."""
    for name in os.listdir(scratch):
        if not name.endswith('.pid'):
            continue
        try:
            with open(os.path.join(scratch, name)) as f:
                pid = int(f.read().strip())
            os.kill(pid, signal.SIGTERM)
        except (ValueError, OSError):
            continue
        for _ in range(200):
            try:
                os.kill(pid, 0)
            except OSError:
                break
            time.sleep(0.05)
        else:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def run_doc(path, build, verbose=True):
    """Runs every block of @path; returns the number of failures."""
    blocks = parse(path)
    scratch = tempfile.mkdtemp(prefix='strata-doctest.')
    env = dict(os.environ)
    env['PATH'] = os.pathsep.join([os.path.join(build, 'block'),
                                   os.path.join(build, 'qmp'),
                                   env.get('PATH', '')])
    env['LC_ALL'] = 'C'
    failures = 0
    name = os.path.basename(path)
    try:
        for b in blocks:
            try:
                if b.kind == 'qmp':
                    out, status = qmp_run(os.path.join(scratch, 'qmp.sock'),
                                          b.text)
                else:
                    out, status = sh_run(scratch, env, b.text)
            except (OSError, RuntimeError, ValueError,
                    subprocess.TimeoutExpired) as e:
                out, status = 'doctest: %s\n' % e, -1
            problem = None
            if status != b.exit_status:
                problem = 'exit status %d, expected %d' % (status,
                                                           b.exit_status)
            elif b.expected is not None:
                want = mask(b.expected, scratch)
                got = mask(out, scratch)
                if not matches(want, got):
                    problem = 'output differs'
            if problem:
                failures += 1
                if verbose:
                    print('FAIL %s:%d: %s' % (name, b.line, problem))
                    print('--- block:\n%s' % b.text)
                    if b.expected is not None:
                        print('--- expected:\n%s' % b.expected)
                    print('--- got:\n%s' % out.rstrip('\n'))
                    print('---')
                # Later blocks build on this one: stop here.
                break
            elif verbose:
                print('ok   %s:%d' % (name, b.line))
    finally:
        stop_daemons(scratch)
        shutil.rmtree(scratch, ignore_errors=True)
    if verbose:
        print('%s: %d blocks, %d failed' % (name, len(blocks), failures))
    return failures


SELF_TEST_GOOD = '''
```sh doctest
echo hello; echo "size 42"
```

```output
hello
size ...
```

```sh doctest exit=3
echo oops >&2; exit 3
```

```output
oops
```

```sh doctest
echo kept > note
```

<!-- doctest
test "$(cat note)" = kept
-->
'''


def self_test(build):
    """A right document passes; each kind of rot in it fails."""
    cases = [
        ('good', SELF_TEST_GOOD, 0),
        ('wrong output', SELF_TEST_GOOD.replace('hello\n', 'goodbye\n'), 1),
        ('wrong status', SELF_TEST_GOOD.replace('exit=3', 'exit=2'), 1),
        ('failing command', SELF_TEST_GOOD.replace('echo hello;',
                                                   'false;'), 1),
        ('hidden check', SELF_TEST_GOOD.replace('echo kept', 'echo lost'), 1),
        ('extra line', SELF_TEST_GOOD.replace('size ...\n', ''), 1),
    ]
    tmp = tempfile.mkdtemp(prefix='strata-doctest-self.')
    bad = 0
    try:
        for label, text, want in cases:
            path = os.path.join(tmp, 'doc.md')
            with open(path, 'w') as f:
                f.write(text)
            got = 1 if run_doc(path, build, verbose=False) else 0
            print('%s %s' % ('ok  ' if got == want else 'FAIL', label))
            bad += got != want
        # The masks: volatile fields compare equal, others do not.
        if not matches(mask('disk size: 196 KiB', '/x'),
                       mask('disk size: 2 MiB', '/x')):
            print('FAIL mask of disk size')
            bad += 1
        if matches(mask('virtual size: 1 GiB', '/x'),
                   mask('virtual size: 2 GiB', '/x')):
            print('FAIL virtual size masked')
            bad += 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if bad else 0


def main():
    ap = argparse.ArgumentParser(description='Run the examples of a doc.')
    ap.add_argument('--build', required=True)
    ap.add_argument('--self-test', action='store_true')
    ap.add_argument('--need', action='append', default=[],
                    help='a program the examples need (else exit 77)')
    ap.add_argument('docs', nargs='*')
    args = ap.parse_args()
    build = os.path.abspath(args.build)
    if args.self_test:
        return self_test(build)
    for prog in args.need:
        if not shutil.which(prog):
            print('%s is not installed: skipped' % prog)
            return 77
    failures = 0
    for doc in args.docs:
        failures += run_doc(doc, build)
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
