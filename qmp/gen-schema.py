#!/usr/bin/env python3
"""Compiles qmp/schema.json into a C string (strata_qmp_schema_text).

The schema is checked to be JSON here, so a broken schema fails the build
rather than the daemon's start."""
import json
import sys

src, dst = sys.argv[1], sys.argv[2]
with open(src, 'rb') as f:
    data = f.read()
json.loads(data.decode('utf-8'))

with open(dst, 'w') as out:
    out.write('/* Generated from qmp/schema.json by qmp/gen-schema.py. */\n')
    out.write('#include "qmp-private.h"\n\n')
    out.write('const char strata_qmp_schema_text[] =\n')
    for line in data.split(b'\n'):
        esc = ''.join(chr(b) if 32 <= b < 127 and chr(b) not in '"\\?'
                      else '\\%03o' % b for b in line)
        out.write('    "%s\\n"\n' % esc)
    out.write(';\n')
