#!/usr/bin/env python3
"""Build dist/pydirector.pyz: the whole balancer as one executable file.

    python3 tools/bundle.py [--output PATH] [--python INTERPRETER] [--source DIR]

The archive is a zipapp (PEP 441) holding pydirector.py, schedulers.py,
pydirector_admin.py and a small __main__.py, behind a
`#!/usr/bin/env python3` line.  Copy it anywhere and run it:

    python3 pydirector.pyz -c /etc/pydirector/pydirector.xml
    python3 pydirector.pyz --check /etc/pydirector/pydirector.xml
    python3 pydirector.pyz admin ARGS...     # the admin module's command line

It works on every Python pydirector supports (3.6 up): Python puts the
archive first on sys.path, so the lazy `import pydirector_admin` (for a
config with <admin>) finds it inside.  The same path trick runs the admin
module's command line without the `admin` word:

    PYTHONPATH=pydirector.pyz python3 -m pydirector_admin ARGS...

Standard library only.  The output depends only on the three sources: files
in a fixed order with fixed timestamps and permissions, so two builds of the
same tree are byte-identical (given the same zlib).
"""

import argparse
import hashlib
import io
import os
import re
import sys
import tempfile
import zipapp
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ('pydirector.py', 'schedulers.py', 'pydirector_admin.py')
DEFAULT_OUTPUT = os.path.join(REPO, 'dist', 'pydirector.pyz')
DEFAULT_INTERPRETER = '/usr/bin/env python3'

# The start of every zip entry: 1980-01-01, the earliest date zip can hold.
# A fixed date (not the files' mtimes) keeps builds reproducible.
FIXED_DATE = (1980, 1, 1, 0, 0, 0)

MAIN = '''\
"""pydirector.pyz: pydirector in one file (built by tools/bundle.py).

    python3 pydirector.pyz [-c] CONFIG.xml | --check CONFIG.xml | --version | --help
    python3 pydirector.pyz admin ARGS...   the command line of pydirector_admin
                                           (as python3 -m pydirector_admin ARGS...)
"""

import sys


def run():
    # This file must stay valid Python 2 too: an old python3 (or python) is told plainly,
    # before the modules' f-strings meet its parser.
    if sys.version_info < (3, 6):
        sys.stderr.write('pydirector needs Python 3.6 or newer; this is Python %d.%d (%s)\\n'
                         % (sys.version_info[0], sys.version_info[1], sys.executable))
        return 1
    if len(sys.argv) > 1 and sys.argv[1] == 'admin':
        import runpy
        del sys.argv[1]
        # The module's own `if __name__ == '__main__':` block does the rest,
        # exactly as with `python3 -m pydirector_admin`.
        runpy.run_module('pydirector_admin', run_name='__main__', alter_sys=True)
        return 0
    import pydirector
    return pydirector.main()


sys.exit(run())
'''


def entry(name):
    info = zipfile.ZipInfo(name, date_time=FIXED_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.create_system = 3                  # unix, so the mode below is read
    info.external_attr = 0o644 << 16
    return info


def build_zip(interpreter=DEFAULT_INTERPRETER, source_dir=REPO):
    """The archive's bytes, #! line included."""
    buffer = io.BytesIO()
    # The #! line goes in before the zip, so the zip's offsets count it and
    # zip tools read the file without complaint about extra leading bytes.
    buffer.write(b'#!' + interpreter.encode('utf-8') + b'\n')
    with zipfile.ZipFile(buffer, 'w') as archive:
        archive.writestr(entry('__main__.py'), MAIN.encode('utf-8'))
        for name in SOURCES:
            with open(os.path.join(source_dir, name), 'rb') as f:
                archive.writestr(entry(name), f.read())
    return buffer.getvalue()


def version(source_dir=REPO):
    with open(os.path.join(source_dir, 'pydirector.py'), encoding='utf-8') as f:
        found = re.search(r"^VERSION = '([^']+)'", f.read(), re.MULTILINE)
    return found.group(1) if found else 'unknown'


def bundle(output=DEFAULT_OUTPUT, interpreter=DEFAULT_INTERPRETER, source_dir=REPO):
    """Write the .pyz to ``output`` (atomically: a running copy is never
    seen half-written) and return its path."""
    data = build_zip(interpreter, source_dir)
    directory = os.path.dirname(os.path.abspath(output))
    os.makedirs(directory, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix='.pydirector-', suffix='.pyz', dir=directory)
    os.close(fd)
    try:
        # zipapp checks the archive, rewrites the same #! line and sets the
        # execute bit.
        zipapp.create_archive(io.BytesIO(data), temp, interpreter=interpreter)
        os.chmod(temp, 0o755)               # mkstemp made it 0600
        os.replace(temp, output)
    except BaseException:
        os.unlink(temp)
        raise
    return output


def main(argv=None):
    parser = argparse.ArgumentParser(prog='tools/bundle.py', description=__doc__.splitlines()[0])
    parser.add_argument('-o', '--output', default=DEFAULT_OUTPUT,
                        help='where to write the archive (default: dist/pydirector.pyz)')
    parser.add_argument('--python', default=DEFAULT_INTERPRETER, metavar='INTERPRETER',
                        help='the #! interpreter (default: %(default)s)')
    parser.add_argument('--source', default=REPO, metavar='DIR',
                        help='where the three .py files are (default: this checkout)')
    args = parser.parse_args(argv)
    path = bundle(args.output, args.python, args.source)
    with open(path, 'rb') as f:
        data = f.read()
    shown = os.path.relpath(path)
    if shown.startswith(os.pardir):
        shown = os.path.abspath(path)
    print('wrote %s: pydirector %s, %d bytes, sha256 %s' % (
        shown, version(args.source), len(data), hashlib.sha256(data).hexdigest()))
    return 0


if __name__ == '__main__':
    sys.exit(main())
