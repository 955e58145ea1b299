"""Write README.md from nbs/index.ipynb.

Quarto (which `nbdev_readme` needs) cannot be installed offline on the build machines, so this small converter
renders the index notebook the way nbdev would: markdown cells as they are, code cells as ```python blocks with
the `#|` directives removed, text outputs as plain blocks, and cells marked `#| hide` left out.
"""
import json, pathlib, sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEADER = "<!-- Generated from nbs/index.ipynb by tools/make_readme.py; edit the notebook, not this file. -->\n\n"

def _src(cell): return ''.join(cell.get('source', ''))

def _directives(src):
    return [l[3:].strip() for l in src.splitlines() if l.startswith('#|')]

def _text_outputs(cell):
    out = []
    for o in cell.get('outputs', []):
        if o.get('output_type') == 'stream': out.append(''.join(o.get('text', '')))
        elif 'data' in o and 'text/markdown' in o['data']: out.append(('md', ''.join(o['data']['text/markdown'])))
        elif 'data' in o and 'text/plain' in o['data']: out.append(''.join(o['data']['text/plain']))
    return out

def render(nb):
    parts = []
    for cell in nb['cells']:
        src = _src(cell)
        if cell['cell_type'] == 'markdown':
            parts.append(src.strip()); continue
        if cell['cell_type'] != 'code': continue
        dirs = _directives(src)
        if any(d.startswith(('hide', 'exporti', 'default_exp')) for d in dirs): continue
        code = '\n'.join(l for l in src.splitlines() if not l.startswith('#|')).strip()
        if code and not any(d.startswith('echo: false') for d in dirs): parts.append(f"```python\n{code}\n```")
        for o in _text_outputs(cell):
            if isinstance(o, tuple): parts.append(o[1].strip())
            elif o.strip(): parts.append(f"```\n{o.rstrip()}\n```")
    return HEADER + '\n\n'.join(p for p in parts if p) + '\n'

def main():
    nb = json.loads((ROOT / 'nbs' / 'index.ipynb').read_text(encoding='utf-8'))
    text = render(nb)
    readme = ROOT / 'README.md'
    if not readme.exists() or readme.read_text(encoding='utf-8') != text:
        readme.write_text(text, encoding='utf-8')
        print('README.md written', file=sys.stderr)

if __name__ == '__main__': main()
