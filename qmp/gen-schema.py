#!/usr/bin/env python3
"""Compiles qmp/schema.json into a C string (strata_qmp_schema_text).

The schema is checked to be JSON here, so a broken schema fails the build
rather than the daemon's start.  What is compiled in is the schema without
its "doc" members and without white space: the daemon parses it at every
start, and the docs are read from the source by docs/qmp.md's test only."""
import json
import sys

src, dst = sys.argv[1], sys.argv[2]
with open(src, 'rb') as f:
    data = f.read()


def strip_docs(node):
    if isinstance(node, dict):
        return {k: strip_docs(v) for k, v in node.items() if k != 'doc'}
    if isinstance(node, list):
        return [strip_docs(v) for v in node]
    return node


schema = strip_docs(json.loads(data.decode('utf-8')))
data = json.dumps(schema, separators=(',', ':'),
                  ensure_ascii=False).encode('utf-8')

with open(dst, 'w') as out:
    out.write('/* Generated from qmp/schema.json by qmp/gen-schema.py. */\n')
    out.write('#include "qmp-private.h"\n\n')
    out.write('const char strata_qmp_schema_text[] =\n')
    # One line holds it all: cut it into C string pieces of 64 bytes.
    for i in range(0, len(data), 64):
        esc = ''.join(chr(b) if 32 <= b < 127 and chr(b) not in '"\\?'
                      else '\\%03o' % b for b in data[i:i + 64])
        out.write('    "%s"\n' % esc)
    out.write(';\n')
