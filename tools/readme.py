"""Render `nbs/index.ipynb` to `README.md`, as `nbdev-readme` does but without quarto.

Markdown cells are copied as they are; code cells become ```python fences without their `#|` directive lines,
followed by their text outputs (stdout as a terminal shows it, text results) in plain fences. Cells marked `#| hide`
(or `#| include: false`) are left out, `#| echo: false` shows only the outputs, `#| output: false` only the code.
Images, HTML-only outputs, stderr (warnings) and errors are left out.

    python tools/readme.py          # write README.md (`make readme`)
    python tools/readme.py --check  # exit 1 when README.md differs from what it would write (`make test`)

Standard library only: it runs with any Python the project supports, without the virtual environment.
"""
from __future__ import annotations
import argparse, difflib, json, re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NB, README = ROOT/'nbs'/'index.ipynb', ROOT/'README.md'
HEADER = '<!-- Generated from nbs/index.ipynb by tools/readme.py: edit the notebook, then run make readme -->'
_DIRECTIVE = re.compile(r'^\s*#\|\s*(.*?)\s*$')

def _text(x): return ''.join(x) if isinstance(x, list) else (x or '')

def directives(source:str)->tuple[dict, str]:
    "The cell's leading `#|` directives as {name: value}, and the source without them"
    lines, ds = source.splitlines(), {}
    while lines and (m := _DIRECTIVE.match(lines[0])):
        name, _, value = m.group(1).partition(':')
        ds[name.strip().lower()] = value.strip().lower()
        lines.pop(0)
    return ds, '\n'.join(lines).strip('\n')

def _fence(text:str, lang:str='')->str:
    "`text` in a code fence longer than any backtick run inside it"
    ticks = '`' * max(3, 1 + max((len(t) for t in re.findall(r'`+', text)), default=0))
    return f'{ticks}{lang}\n{text.rstrip()}\n{ticks}'

def _terminal(text:str)->str:
    "`text` as a terminal shows it: on each line only what follows the last carriage return (progress bars), no trailing spaces"
    return '\n'.join(line.rstrip('\r').rsplit('\r', 1)[-1].rstrip() for line in text.split('\n'))

def output_text(out:dict)->str|None:
    "The markdown for one output: stdout and text results fenced, markdown as is; `None` for stderr, images, HTML, errors"
    kind = out.get('output_type')
    if kind == 'stream':
        if out.get('name') == 'stderr': return None  # warnings and logs
        text = _text(out.get('text'))
    elif kind in ('execute_result', 'display_data'):
        data = out.get('data', {})
        if 'text/markdown' in data: return _text(data['text/markdown']).strip() or None
        if any(k.startswith('image/') for k in data): return None
        text = _text(data.get('text/plain'))
        if re.fullmatch(r'<(IPython\.core\.display\.\w+|Figure size .*) object>|<Figure size .*>', text.strip()): return None
    else: return None
    text = _terminal(text)
    return _fence(text) if text.strip() else None

def render(nb:dict)->str:
    "The README for notebook `nb` (its JSON)"
    parts = [HEADER]
    for cell in nb['cells']:
        src = _text(cell.get('source'))
        if cell['cell_type'] == 'markdown':
            if src.strip(): parts.append(src.strip('\n'))
            continue
        if cell['cell_type'] != 'code': continue
        ds, code = directives(src)
        if 'hide' in ds or ds.get('include') == 'false': continue
        if code.strip() and ds.get('echo') != 'false': parts.append(_fence(code, 'python'))
        if ds.get('output') != 'false': parts += [t for t in map(output_text, cell.get('outputs', [])) if t]
    return '\n\n'.join(parts) + '\n'

def main(argv=None):
    p = argparse.ArgumentParser(description='Render nbs/index.ipynb to README.md')
    p.add_argument('--check', action='store_true', help='write nothing; exit 1 when README.md differs from the rendering')
    a = p.parse_args(argv)
    new = render(json.loads(NB.read_text(encoding='utf-8')))
    if not a.check:
        if not README.exists() or README.read_text(encoding='utf-8') != new: README.write_text(new, encoding='utf-8')
        return 0
    old = README.read_text(encoding='utf-8') if README.exists() else ''
    if old == new: return 0
    sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True), 'README.md', 'rendered from nbs/index.ipynb', n=1))
    print('README.md is not generated from nbs/index.ipynb: edit the notebook, then run make readme (python tools/readme.py) and commit both')
    return 1

if __name__ == '__main__': sys.exit(main())
