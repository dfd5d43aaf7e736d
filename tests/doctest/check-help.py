#!/usr/bin/env python3
"""Checks that every flag a program's --help prints appears in its doc.

    check-help.py PROGRAM DOC.md

A flag is a `--long` word or a `-x` letter at an option's place in the
help text; the doc must show each one literally (`--wait`, `-w`).
Exit status 1 names the flags missing.
"""
import re
import subprocess
import sys

LONG = re.compile(r'(?<![\w-])(--[a-z][a-z0-9-]*)')
SHORT = re.compile(r"(?:^|[\s\[|,'])(-[a-zA-Z])(?=[\s\],=|']|$)", re.M)


def flags(text):
    return set(LONG.findall(text)) | set(SHORT.findall(text))


def main():
    prog, doc = sys.argv[1], sys.argv[2]
    out = subprocess.run([prog, '--help'], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, timeout=60)
    if out.returncode != 0:
        print('%s --help: exit status %d' % (prog, out.returncode))
        return 1
    helptext = out.stdout.decode('utf-8', 'replace')
    with open(doc, encoding='utf-8') as f:
        text = f.read()
    want = flags(helptext)
    if len(want) < 3:
        print('%s --help: too few flags found (%s)' % (prog, sorted(want)))
        return 1
    missing = sorted(f for f in want
                     if not re.search(r'(?<![\w-])' + re.escape(f) +
                                      r'(?![\w-])', text))
    if missing:
        print('%s: flags of %s --help missing: %s' % (doc, prog,
                                                      ' '.join(missing)))
        return 1
    print('%s: all %d flags of --help documented' % (doc, len(want)))
    return 0


if __name__ == '__main__':
    sys.exit(main())
