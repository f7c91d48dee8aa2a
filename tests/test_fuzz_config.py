"""Bad-input suite for the config file (issue 6): a mutation fuzzer.

The sample config of the repo (plus an <admin> block with users, so admin
parsing is fuzzed too) is broken in a few hundred ways with fixed seeds:
truncated at each element, attributes dropped or garbled, numbers out of
range, duplicate names, DOCTYPE/ENTITY declarations, bad bytes and encoding
declarations, misplaced elements...  Every variant must be refused with a
ConfigError whose text starts 'FILE:LINE: ', within a second, and nothing
but ConfigError may escape.  A mutation that happens to still be valid is
counted and skipped.  A sample goes through the real command line as well:
exit status 1, one line 'pydirector: FILE:LINE: ...' on stderr, and none of
the variant's ports left listening.
"""

import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

from support import PYDIRECTOR, REPO, accepts, free_port

from pydirector import ConfigError, parse_config

# hash_password('secret', iterations=1000) made once; fixed so the variants are stable.
HASH = 'pbkdf2_sha256$1000$SBfJuhTNl16CnH8HNauCkg$HGFu1I07uBHzg9GyHA7CcF8CmxouI2qH2fUWoHF2HAc'

ADMIN_BLOCK = """\
  <admin listen="127.0.0.1:7001">
    <user name="admin" password="%s" access="full"/>
    <user name="viewer" password="%s" access="readonly"/>
  </admin>
  <logging file="pydirector-fuzz.log"/>
""" % (HASH, HASH)

# Bounds the whole run: a parse that takes longer than this is a failure.
PARSE_LIMIT = 5.0     # a hang or quadratic-time guard, not a speed test: CI runs loaded
CLI_SAMPLE = 20


def base_config():
    """sample.xml with the admin block added before </pdconfig>: valid, as bytes."""
    with open(os.path.join(REPO, 'sample.xml'), encoding='utf-8') as f:
        text = f.read()
    end = text.rindex('</pdconfig>')
    return text[:end] + ADMIN_BLOCK + text[end:]


# -- where things are in the base text ----------------------------------------

class Layout(object):
    """Tags, attributes and whole elements of the base text, outside comments."""

    def __init__(self, text):
        self.text = text
        comments = [m.span() for m in re.finditer(r'<!--.*?-->', text, re.S)]

        def live(pos):
            return not any(a <= pos < b for a, b in comments)
        self.tags = [m for m in re.finditer(r'<(/?)([A-Za-z][\w.-]*)[^>]*>', text) if live(m.start())]
        self.attrs = []          # (start, end, name, value_start, value_end)
        for tag in self.tags:
            if tag.group(1):
                continue
            for a in re.finditer(r'\s([A-Za-z_:][\w.:-]*)="([^"]*)"', tag.group(0)):
                self.attrs.append((tag.start() + a.start(), tag.start() + a.end(), a.group(1),
                                   tag.start() + a.start(2), tag.start() + a.end(2)))
        # Whole elements: a self-closing tag, or a start tag through its end tag.
        self.elements = []       # (start, end, tag name)
        stack = []
        for tag in self.tags:
            name = tag.group(2)
            if tag.group(1):
                start_tag = stack.pop()
                self.elements.append((start_tag.start(), tag.end(), name))
            elif tag.group(0).endswith('/>'):
                self.elements.append((tag.start(), tag.end(), name))
            else:
                stack.append(tag)
        self.elements.sort()

    def line_end(self, pos):
        end = self.text.find('\n', pos)
        return len(self.text) if end < 0 else end + 1


NUMERIC = {'drain', 'weight', 'maxconns', 'interval', 'timeout', 'rise', 'fall', 'connect', 'idle'}
OUT_OF_RANGE = ['-1', '0', '-0.5', '1001', '101', '86401', '1e999', '1e-999', 'nan', 'inf', '-inf',
                '0x10', '', ' ', '5 ', ' 5', '1_000', '\uff11\uff12', '\u00b2', '\u0661', '+3',
                '99999999999999999999999999', '3.', '.', 'e5', '1e', '--1', '2,5']
PORTS_OUT = ['0', '65536', '99999', '-1', '', 'http', '80 ', '8_080', '\u00b9\u00b2', '0x50', '123456']
GARBAGE = ['', ' ', 'x', '\u202e', '&#10;', '&#9;', '&#0;', '&#xD800;', '&#x2028;', '&unknown;', '<', '&',
           '"', 'a"b', '<script>x</script>', '*', '*:80', ':80', '[::1]', '[]:1', '[::1]:', '::1:80',
           'host name:1', '10.0.0.999:80', 'caf\u00e9:80', 'a' * 300 + ':80', 'roundrobin,sticky,', 'hash,,',
           'admin', 'FULL', 'pbkdf2_sha256$0$a$b', 'pbkdf2_sha256$1000$!!$??', 'x' * 5000]
BAD_BYTES = [b'\xff', b'\xfe\xff', b'\xc3\x28', b'\xe2\x82', b'\xed\xa0\x80', b'\xc0\xaf', b'\xf8\x88\x80\x80\x80',
             b'\x00', b'\x01', b'\x1b', b'\x0b', b'\xe9', b'\xef\xbf\xbe']
ENCODINGS = ['foo', 'big5', 'utf-7', 'shift_jis', 'euc-jp', 'gb2312', 'iso-2022-jp', 'cp037', 'rot13', 'hex',
             'utf-32', 'UTF-16', 'ebcdic', 'x-mac-roman', 'utf-8"', '']
DOCTYPES = [
    '<!DOCTYPE pdconfig>\n',
    '<!DOCTYPE pdconfig SYSTEM "file:///etc/passwd">\n',
    '<!DOCTYPE pdconfig [\n<!ENTITY xxe SYSTEM "file:///etc/passwd">\n]>\n',
    '<!DOCTYPE pdconfig [\n<!ENTITY a "aaaaaaaaaa">\n<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">\n'
    '<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">\n<!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;">\n]>\n',
    '<!DOCTYPE pdconfig [\n<!ENTITY % p SYSTEM "http://example.invalid/x.dtd">\n%p;\n]>\n',
    '<!DOCTYPE pdconfig PUBLIC "-//X//DTD X//EN" "http://example.invalid/x.dtd">\n',
    '<!DOCTYPE pdconfig [\n<!ATTLIST service name CDATA "web">\n]>\n',
    '<!DOCTYPE pdconfig [\n<!ELEMENT pdconfig ANY>\n]>\n',
]


class Mutator(object):
    """Broken variants of one valid config text, each (label, bytes)."""

    def __init__(self, text, seed):
        self.text = text
        self.layout = Layout(text)
        self.rng = random.Random(seed)

    def replace(self, start, end, new):
        return self.text[:start] + new + self.text[end:]

    def encode(self, text):
        return text.encode('utf-8', 'surrogatepass')

    def variants(self):
        t, lay, rng = self.text, self.layout, self.rng
        out = []

        def add(label, data):
            out.append((label, data if isinstance(data, bytes) else self.encode(data)))

        # Truncated at each element, and in the middle of its tag.
        for tag in lay.tags:
            add('truncate before %s' % tag.group(0)[:20], t[:tag.start()])
            add('truncate inside %s' % tag.group(0)[:20], t[:rng.randint(tag.start() + 1, tag.end() - 1)])
        # Each attribute dropped, renamed, given garbage, and unquoted.
        for start, end, name, vstart, vend in lay.attrs:
            add('drop %s' % name, self.replace(start, end, ''))
            typo = name[:-1] + name[-1].upper() if rng.random() < 0.5 else name + 'x'
            add('rename %s -> %s' % (name, typo), self.replace(start + 1, start + 1 + len(name), typo))
            value = rng.choice(GARBAGE)
            add('garbage %s=%r' % (name, value[:20]), self.replace(vstart, vend, value))
            add('unquoted %s' % name, self.replace(vstart - 1, vend + 1, t[vstart:vend] or 'x'))
            add('duplicate attribute %s' % name, self.replace(end, end, t[start:end]))
            if name in NUMERIC:
                for value in rng.sample(OUT_OF_RANGE, 4):
                    add('number %s=%r' % (name, value), self.replace(vstart, vend, value))
            if name in ('ip', 'listen'):
                colon = t.rfind(':', vstart, vend)
                for value in rng.sample(PORTS_OUT, 3):
                    add('port %s=%r' % (name, value), self.replace(colon + 1, vend, value))
            if name == 'name':
                for value in ('', '   ', 'a&#10;b', 'a&#13;b', 'x&#x202e;y', 'x&#x2028;y', 'tab&#9;'):
                    add('name %r' % value, self.replace(vstart, vend, value))
        # Duplicate elements: every element appears twice (a second service,
        # host, user, <admin>, <check>, ...).
        for start, end, name in lay.elements:
            if name == 'pdconfig':
                continue
            add('duplicate <%s>' % name, self.replace(end, end, '\n' + t[start:end]))
        # Elements renamed, misplaced, emptied; text where none belongs.
        for start, end, name in lay.elements:
            if name in ('pdconfig', 'listen', 'group', 'host', 'user', 'service', 'check', 'timeouts', 'admin'):
                body = t[start:end]
                renamed = re.sub(r'^<%s\b' % name, '<%sx' % name, body)
                renamed = re.sub(r'</%s>$' % name, '</%sx>' % name, renamed)
                add('rename <%s>' % name, self.replace(start, end, renamed))
                add('text in <%s>' % name, self.replace(end, end, 'stray text'))
        for start, end, name in lay.elements:
            if name in ('host', 'user', 'listen', 'enable'):
                root_end = t.rindex('</pdconfig>')
                add('<%s> at top level' % name, self.replace(root_end, root_end, t[start:end] + '\n'))
        # DOCTYPE, ENTITY and entity references.
        for doctype in DOCTYPES:
            add('doctype %s' % doctype[:30], doctype + t)
            first = lay.tags[0].start()
            add('doctype inside %s' % doctype[:30], t[:first] + doctype + t[first:])
        for start, end, name, vstart, vend in rng.sample(lay.attrs, 6):
            add('entity ref in %s' % name, self.replace(vstart, vend, '&xxe;'))
        # Bytes that are not UTF-8, and encoding declarations.
        raw = self.encode(t)
        for data in BAD_BYTES:
            for where in ('attr', 'text', 'comment', 'tag'):
                if where == 'attr':
                    pos = rng.choice(lay.attrs)[3]
                elif where == 'tag':
                    pos = rng.choice(lay.tags).start() + 1
                elif where == 'comment':
                    pos = t.index('<!--') + 5
                else:
                    pos = lay.line_end(rng.choice(lay.tags).end())
                pos = len(self.encode(t[:pos]))
                add('bytes %r in %s' % (data, where), raw[:pos] + data + raw[pos:])
        for encoding in ENCODINGS:
            add('encoding %r' % encoding, '<?xml version="1.0" encoding="%s"?>\n' % encoding + t)
        add('utf-16 declared, utf-8 bytes', b'\xff\xfe' + raw)
        add('xml declaration not first', '\n' + '<?xml version="1.0"?>' + t)
        add('empty file', b'')
        add('only a comment', '<!-- nothing -->\n')
        add('two roots', t + '<pdconfig/>\n')
        add('wrong root', t.replace('<pdconfig', '<config', 1).replace('</pdconfig>', '</config>'))
        add('unclosed comment', t.replace('-->', '--', 1))
        add('cdata', self.replace(lay.tags[1].end(), lay.tags[1].end(), '<![CDATA[hello]]>'))
        add('deep nesting', self.replace(lay.tags[1].end(), lay.tags[1].end(), '<a>' * 5000 + '</a>' * 5000))
        add('huge attribute', self.replace(lay.attrs[0][3], lay.attrs[0][4], 'x' * 1000000))
        # Two or three of the above at once.
        singles = list(out)
        for _ in range(60):
            label, data = rng.choice(singles)
            label2, data2 = rng.choice(singles)
            cut = rng.randint(0, min(len(data), len(data2)))
            add('splice %s | %s' % (label, label2), data[:cut] + data2[cut:])
        return out


def first_line(text):
    return text.splitlines()[0] if text else ''


class ConfigFuzzTest(unittest.TestCase):
    """Hundreds of broken configs: each refused with FILE:LINE, quickly, by ConfigError only."""

    SEED = 6

    @classmethod
    def setUpClass(cls):
        cls.base = base_config()
        cls.variants = Mutator(cls.base, cls.SEED).variants()

    def test_base_is_valid(self):
        config = parse_config(self.base.encode('utf-8'), 'base.xml')
        self.assertEqual([u.name for u in config.admin.users], ['admin', 'viewer'])
        self.assertEqual(config.service('web').group('main').hosts[0].name, 'one')

    def check_refusal(self, path, data):
        """None if data is a valid config; else a problem text, or '' for a proper refusal."""
        started = time.monotonic()
        try:
            parse_config(data, path)
        except ConfigError as e:
            elapsed = time.monotonic() - started
            match = re.match(re.escape(path) + r':(\d+): \S', str(e))
            lines = data.count(b'\n') + 1
            if not match:
                return 'ConfigError without FILE:LINE: %r' % str(e)[:200]
            if int(match.group(1)) != e.line or not 1 <= e.line <= lines:
                return 'line %s out of range 1-%d: %r' % (match.group(1), lines, str(e)[:200])
            if elapsed > PARSE_LIMIT:
                return 'took %.2f s: %r' % (elapsed, str(e)[:200])
            return ''
        except Exception as e:
            return '%s escaped: %s' % (type(e).__name__, str(e)[:200])
        return None

    def test_mutations_are_refused(self):
        problems, valid, rejected = [], [], 0
        started = time.monotonic()
        for number, (label, data) in enumerate(self.variants):
            problem = self.check_refusal('fuzz-%d.xml' % number, data)
            if problem is None:
                valid.append(label)
            elif problem:
                problems.append('%s: %s' % (label, problem))
            else:
                rejected += 1
        elapsed = time.monotonic() - started
        print('\nconfig fuzz: %d variants, %d rejected properly, %d still valid (skipped), %d problems, '
              '%.1f s' % (len(self.variants), rejected, len(valid), len(problems), elapsed), file=sys.stderr)
        self.assertEqual(problems, [], '%d of %d variants were not refused properly; first: %s' % (
            len(problems), len(self.variants), problems[:8]))
        self.assertGreaterEqual(rejected, 200)
        # A fuzzer whose mutations are mostly harmless tests little.
        self.assertLess(len(valid), len(self.variants) // 4, valid[:20])

    def test_command_line_sample(self):
        """A sample of refused variants through `python3 pydirector.py -c bad.xml`."""
        rng = random.Random(2006)
        refused = [(label, data) for number, (label, data) in enumerate(self.variants)
                   if self.check_refusal('sample-%d.xml' % number, data) == '']
        self.assertGreaterEqual(len(refused), CLI_SAMPLE)
        sample = rng.sample(refused, CLI_SAMPLE)
        tmp = tempfile.mkdtemp(prefix='pydirector-fuzz-')
        self.addCleanup(shutil.rmtree, tmp)
        service_port, admin_port = free_port(), free_port()

        # Python's own start and the import, the slowest of three: the refusal itself must add < 1 s.
        startup = 0.0
        for _ in range(3):
            started = time.monotonic()
            subprocess.run([sys.executable, PYDIRECTOR, '--version'], stdout=subprocess.DEVNULL, check=True)
            startup = max(startup, time.monotonic() - started)

        jobs = []
        for number, (label, data) in enumerate(sample):
            # The ports nothing listens on now: afterwards nothing may listen there either.
            data = re.sub(rb'127\.0\.0\.1:8080(?=")', b'127.0.0.1:%d' % service_port, data)
            data = re.sub(rb'127\.0\.0\.1:7001(?=")', b'127.0.0.1:%d' % admin_port, data)
            path = os.path.join(tmp, 'bad-%d.xml' % number)
            with open(path, 'wb') as f:
                f.write(data)
            jobs.append((label, path))
        problems = []
        for label, path in jobs:
            started = time.monotonic()
            proc = subprocess.run([sys.executable, PYDIRECTOR, '-c', path], cwd=tmp, timeout=30,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            elapsed = time.monotonic() - started
            err = proc.stderr.decode('utf-8', 'replace')
            if proc.returncode != 1:
                problems.append('%s: exit %s, stderr %r' % (label, proc.returncode, err[-300:]))
            elif not re.match(r'pydirector: %s:\d+: \S' % re.escape(path), err) or err.count('\n') != 1:
                problems.append('%s: stderr %r' % (label, err[-300:]))
            elif proc.stdout:
                problems.append('%s: stdout %r' % (label, proc.stdout[:200]))
            elif elapsed > startup + PARSE_LIMIT:
                problems.append('%s: took %.2f s (startup %.2f s)' % (label, elapsed, startup))
        self.assertEqual(problems, [])
        self.assertFalse(accepts(service_port) or accepts(admin_port), 'a refused config left a port listening')
        self.assertFalse(os.path.exists(os.path.join(tmp, 'pydirector-fuzz.log')),
                         'a refused config opened its log file')


# ---------------------------------------------------------------------------
# Regressions: cases the fuzzer found, one named test each.
# ---------------------------------------------------------------------------

class ConfigRegressionTest(unittest.TestCase):

    def refused(self, data):
        with self.assertRaises(ConfigError) as cm:
            parse_config(data, 'x.xml')
        return str(cm.exception)

    def test_unknown_encoding_declaration(self):
        # expat asks Python for the codec: LookupError escaped the reader.
        for encoding in (b'foo', b'rot13', b'hex'):
            with self.subTest(encoding=encoding):
                message = self.refused(b'<?xml version="1.0" encoding="%s"?>\n<pdconfig/>' % encoding)
                self.assertRegex(message, r'^x\.xml:1: XML error: .*encoding')

    def test_multibyte_encoding_declaration(self):
        # pyexpat refuses multi-byte codecs with ValueError: it escaped too.
        for encoding in (b'big5', b'utf-7', b'shift_jis'):
            with self.subTest(encoding=encoding):
                message = self.refused(b'<?xml version="1.0" encoding="%s"?>\n<pdconfig/>' % encoding)
                self.assertTrue(message.startswith('x.xml:1: XML error: '), message)

    def test_encoding_declaration_on_the_command_line(self):
        tmp = tempfile.mkdtemp(prefix='pydirector-fuzz-')
        self.addCleanup(shutil.rmtree, tmp)
        path = os.path.join(tmp, 'bad.xml')
        with open(path, 'wb') as f:
            f.write(b'<?xml version="1.0" encoding="big5"?>\n<pdconfig/>\n')
        proc = subprocess.run([sys.executable, PYDIRECTOR, '-c', path], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=15)
        err = proc.stderr.decode('utf-8', 'replace')
        self.assertEqual(proc.returncode, 1, err)
        self.assertNotIn('Traceback', err)
        self.assertTrue(err.startswith('pydirector: %s:1: ' % path), err)

    def test_bad_utf8_in_a_name_has_a_line(self):
        # Python 3.6's pyexpat (expat 2.4.1) decodes element and attribute names
        # itself and raises UnicodeDecodeError, which the reader turned into an
        # error without a line.
        for data in (b'<pdconfig>\n\n<s\xe9rvice/></pdconfig>', b'<pdconfig>\n\n<service n\xe9me="x"/></pdconfig>'):
            with self.subTest(data=data):
                self.assertRegex(self.refused(data), r'^x\.xml:3: XML error: ')

    def test_unencodable_text_has_a_line(self):
        # A str with a lone surrogate cannot reach expat as UTF-8; the error
        # named no line.  (Files are bytes, so only parse_config(str) meets it.)
        message = self.refused('<pdconfig>\n<service name="\udcff"/>\n</pdconfig>')
        self.assertRegex(message, r'^x\.xml:\d+: ')


if __name__ == '__main__':
    unittest.main()
