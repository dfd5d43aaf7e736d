#!/usr/bin/env python3
"""Turns one of strata's Markdown pages into a man page (roff, man(7)).

    md2man.py --name stratad --summary "the strata daemon" \
              --version 0.1.0 docs/stratad.md stratad.1

It knows the Markdown these pages use, no more: `#` headings, paragraphs,
`-` lists, definition lists (a line, then `: text`), fenced blocks,
pipe tables, and inline `code`, **bold**, *emphasis* and [links](url).
The page's `# title` and the paragraph after it become NAME and
DESCRIPTION; every `##` heading a section, every `###` a subsection.
"""
import argparse
import re
import sys


def escape(text):
    text = text.replace('\\', '\\e')
    return text


def inline(text):
    """Markdown inline markup to roff font changes."""
    text = escape(text)
    out = []
    pos = 0
    for m in re.finditer(r'`([^`]*)`', text):
        out.append(prose(text[pos:m.start()]))
        out.append('\\fB' + m.group(1).replace('-', '\\-') + '\\fR')
        pos = m.end()
    out.append(prose(text[pos:]))
    return ''.join(out)


def prose(text):
    text = re.sub(r'\[([^\]]*)\]\(([^)]*)\)', lambda m: m.group(1), text)
    text = re.sub(r'\*\*([^*]+)\*\*', r'\\fB\1\\fR', text)
    text = re.sub(r'(?<![\w*])\*([^*\s][^*]*)\*', r'\\fI\1\\fR', text)
    return text


def line_safe(text):
    """A roff text line must not start with a control character."""
    if text.startswith(('.', "'")):
        return '\\&' + text
    return text


def convert(md, name, summary, version):
    lines = md.split('\n')
    out = ['.\\" Generated from the Markdown source by docs/md2man.py.',
           '.TH %s 1 "" "strata %s" "User Commands"' % (name.upper(),
                                                        version),
           '.ad l',
           '.nh',
           '.SH NAME',
           '%s \\- %s' % (name, summary)]
    para = []
    i = 0

    def flush():
        if para:
            out.append('.PP')
            out.append(line_safe(inline(' '.join(para))))
            para.clear()

    first_section = True
    while i < len(lines):
        line = lines[i]
        if line.startswith('```'):
            flush()
            j = i + 1
            out.append('.PP')
            out.append('.nf')
            out.append('.RS 4')
            while j < len(lines) and not lines[j].startswith('```'):
                out.append(line_safe(escape(lines[j]).replace('-', '\\-')))
                j += 1
            out.append('.RE')
            out.append('.fi')
            i = j + 1
            continue
        if line.startswith('# '):
            out.append('.SH DESCRIPTION')
            first_section = False
            i += 1
            continue
        if line.startswith('## '):
            flush()
            out.append('.SH ' + inline(line[3:].strip()).upper())
            i += 1
            continue
        if line.startswith('### '):
            flush()
            out.append('.SS ' + inline(line[4:].strip()))
            i += 1
            continue
        if line.startswith('|'):
            flush()
            rows = []
            while i < len(lines) and lines[i].startswith('|'):
                cells = [c.strip() for c in lines[i].strip('|').split('|')]
                if not all(re.fullmatch(r':?-+:?', c) for c in cells):
                    rows.append(cells)
                i += 1
            for cells in rows:
                out.append('.TP')
                out.append(line_safe(inline(cells[0])))
                out.append(line_safe(inline(' \u2014 '.join(cells[1:]))))
            continue
        if (i + 1 < len(lines) and lines[i + 1].startswith(': ') and
                line.strip()):
            flush()
            out.append('.TP')
            out.append(line_safe(inline(line.strip())))
            i += 1
            text = []
            while i < len(lines) and (lines[i].startswith(': ') or
                                      lines[i].startswith('  ')):
                text.append(lines[i][2:].strip())
                i += 1
            out.append(line_safe(inline(' '.join(text))))
            continue
        if line.startswith('- '):
            flush()
            out.append('.IP \\(bu 2')
            text = [line[2:].strip()]
            i += 1
            while (i < len(lines) and lines[i].startswith('  ') and
                   lines[i].strip()):
                text.append(lines[i].strip())
                i += 1
            out.append(line_safe(inline(' '.join(text))))
            continue
        if not line.strip():
            flush()
            i += 1
            continue
        para.append(line.strip())
        i += 1
    flush()
    if first_section:
        sys.exit('md2man: no "# title" line')
    return '\n'.join(out).replace('\u2014', '\\(em') + '\n'


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--name', required=True)
    ap.add_argument('--summary', required=True)
    ap.add_argument('--version', default='')
    ap.add_argument('input')
    ap.add_argument('output')
    a = ap.parse_args()
    with open(a.input, encoding='utf-8') as f:
        md = f.read()
    with open(a.output, 'w', encoding='utf-8') as f:
        f.write(convert(md, a.name, a.summary, a.version))


if __name__ == '__main__':
    main()
