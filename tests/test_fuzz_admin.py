"""Bad-input suite for the admin web interface (issue 6).

AdminFuzzTest sends thousands of generated requests over raw sockets to the
real admin server of an in-process balancer: bad methods, paths with '..',
'%2e' and NUL, huge and malformed headers, broken Basic credentials, unknown
and missing parameters, markup and newlines in names, cross-site markers,
mixed with valid read-only requests.  Whatever arrives: no 5xx, no
traceback, no marker reflected raw into an HTML page, every request answered
with a status line, and no change to the balancer unless the request had
valid full-access credentials and no cross-site marker.

SlowlorisTest holds many admin sockets open, trickling a byte at a time
(200 here; PYDIRECTOR_SLOWLORIS_SOCKETS=1000 for the full run): they hold no
admin thread, a legitimate request still answers quickly, and the data
plane keeps its throughput.

Fixed seeds throughout: a failure names the request (X-Fuzz-Id) to replay.
"""

import base64
import collections
import os
import random
import re
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.parse
from unittest import mock

import support
from support import BalancerCase, Backend, Balancer, LOG, config_xml, free_port, raw_exchanges, service_xml, wait_until

import pydirector
import pydirector_admin

PASSWORD = 'pass word'
WRONG = 'pass wort'
# Few iterations: thousands of wrong passwords must each be checked in microseconds.
FAST_HASH = pydirector.hash_password(PASSWORD, iterations=1000)

# Injected into names, paths, parameters and headers; none may come back raw in text/html.
MARKERS = ['<script>x</script>', '"><img src=x onerror=alert(1)>', "'><svg onload=x>", '<iframe src=//evil>']

TOTAL_REQUESTS = 5000
UNPRIVILEGED_SHARE = 0.8      # the rest have full access: they may change things, and must not break


def basic(user, password):
    return 'Basic ' + base64.b64encode(('%s:%s' % (user, password)).encode('utf-8')).decode('ascii')


def b64(raw):
    return base64.b64encode(raw).decode('ascii')


# Authorization header values: valid for the full-access user (spelled three
# ways the server accepts), valid read-only, and broken, wrong or absent.
FULL_CREDENTIALS = [basic('admin', PASSWORD), 'basic ' + b64(b'admin:' + PASSWORD.encode()),
                    'Basic  ' + b64(b'admin:' + PASSWORD.encode()) + '  ']
READONLY_CREDENTIALS = [basic('viewer', PASSWORD)]
BAD_CREDENTIALS = [
    None, '', 'Basic', 'Basic ', 'Basic ====', 'Basic !!!!', 'Basic ' + b64(b'admin'),
    'Basic ' + b64(b'admin:' + PASSWORD.encode())[:-2], basic('admin', WRONG), basic('admin', ''),
    basic('Admin', PASSWORD), basic('admin ', PASSWORD), basic('nobody', PASSWORD), basic('', PASSWORD),
    basic('admin', PASSWORD + ':x'), basic('<script>x</script>', 'x'), basic('admin\nX-Injected: yes', 'x'),
    'Basic ' + b64(b'admin:\xff\xfe'), 'Basic ' + b64(b'\x00admin:' + PASSWORD.encode()),
    'Basic ' + b64(b'a' * 6000 + b':b'), 'Bearer ' + b64(b'admin:' + PASSWORD.encode()),
    'Digest username="admin"', 'Basic ' + b64(b'admin:' + PASSWORD.encode()) + ' extra',
    'Basic\t' + b64(b'viewer:' + WRONG.encode()), basic('viewer', WRONG),
]

METHODS = ['GET'] * 8 + ['POST'] * 4 + ['HEAD'] * 2 + [
    'PUT', 'DELETE', 'OPTIONS', 'TRACE', 'CONNECT', 'PATCH', 'PRI', 'get', 'Get', 'G\x00T', 'GET\x7f',
    'X' * 300, '<script>x</script>', 'GET/', '\xc3\xa9']

# The pages and changes are the admin's own tables, so a new one is fuzzed too; left out
# are the two that read and write the config file, which this balancer, its config given
# as text, has not.
NOT_FUZZED = {'/reload': 'reads the config file', '/saveConfig': 'writes the config file'}
PAGES = sorted(pydirector_admin.PAGES)
ACTIONS = sorted(set(pydirector_admin.ACTIONS) - set(NOT_FUZZED))
# The parameters of the pages that take some (a change's are in its ACTIONS row), and the
# pages that answer 200 to any user only with some.
PAGE_PARAMS = {'/running': ['msg', 'refresh'], '/explain': ['service', 'client', 'sni', 'listen', 'format']}
NEEDS_PARAMS = ['/explain']
# What answers 200 with no parameter (403 without full access where the table says so).
PLAIN_PAGES = [path for path in PAGES if path not in NEEDS_PARAMS and path != pydirector_admin.HEALTHZ]
READABLE_PAGES = [path for path in PLAIN_PAGES if not pydirector_admin.PAGES[path][1]]
ODD_PATHS = [
    '/nope', '/running/', '/RUNNING', '/running.txt/..', '/../running.txt', '/%2e%2e/running.txt',
    '/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd', '/running.txt%00', '/\x00', '/%00', '/running.txt\x00.html',
    '//running.txt', '//[', '//[::1', 'http://[x/', 'http://127.0.0.1/running.txt', 'http://evil.example/addHost',
    '*', 'running.txt', '/running.txt#frag', '/..\\..\\windows', '/<script>x</script>', '/%3Cscript%3Ex%3C/script%3E',
    '/\xff\xfe', '/caf\xc3\xa9', '/running.txt;x=1', '/index.html', '/./running', '/running/./', '/%2e',
    '/%2e%2e', '/.%2e/', '/running%2etxt', '/?', '/running??', '/%', '/%zz', '/%C0%AE%C0%AE/']

ODD_PARAMS = ['x', '<script>x</script>', '', 'name[]', 'SERVICE', 'na\x00me', 'a\nb', '\xe9', '%', 'name ']
VALUES = (['web', 'main', 'spare', 'one', 'two', 'three', 'new', '127.0.0.1:1', '127.0.0.1:65535',
           '[::1]:80', 'roundrobin', 'leastconns', 'hash,sticky', 'full', 'readonly', '1', '5', '1000'] * 2 + [
    '<script>x</script>', '"><img src=x onerror=alert(1)>', "'><svg onload=x>", '<iframe src=//evil>',
    'a\nb', 'a\r\nX-Injected: yes', '\r\n\r\n<script>x</script>', '\x00', '\x1b[31m', '\u202e', '\u2028',
    'caf\u00e9', '\u00b2', '\u00b9\u00b2', '\u0663', '\uff11', '-1', '0', '1001', '99999999999999999999',
    '', ' ', '../../etc/passwd', '%', '%%', '&', '=', 'x' * 3000, 'roundrobin,', ',sticky', 'nope', '1e3',
    '3.5', '0x10', '*:80', ':80', 'host name:80', 'a' * 64 + '.example:80', '\U0001f600'])
NUMBERS = ['1', '5', '30', '3600', '0', '-1', '3601', '1e3', '3.5', '0x10', '\u00b2', '\u00b9\u00b2', '\u0663',
           '\uff11', '99999999999999999999', ' 5', '5 ', '+5', '']
# Well-formed values per parameter, so requests get past the first check; names
# are hostile (markup, spaces, non-ASCII) but acceptable, so they reach the pages.
TIDY_VALUES = {
    'service': ['web'], 'group': ['main', 'spare', 'new', 'extra'],
    'scheduler': ['roundrobin', 'leastconns', 'hash,sticky', 'random'], 'access': ['full', 'readonly'],
    'ip': ['127.0.0.1:%d' % n for n in range(1, 6)] + ['[::1]:80', 'localhost:80'],
    'weight': ['1', '5', '1000'], 'maxconns': ['0', '10'], 'refresh': ['5', '3600'],
    'state': ['ready', 'drain', 'maint'], 'force': ['1', '0'], 'backup': ['on', 'off'],
    'drain': ['0', '1', '30'], 'rollback': ['1', '30'], 'send_proxy': ['v1', 'v2'],
    'password_hash': [FAST_HASH], 'client': ['10.0.0.1', '::1', '127.0.0.1'], 'format': ['json', 'text'],
    'sni': ['web.example', 'caf\u00e9.example'],
    'name': MARKERS + ['one', 'two', 'three', 'four', 'caf\u00e9', 'a b', 'x' * 200],
    'password': ['secret', 'a b', '\u00e9'], 'msg': MARKERS + ['OK done'],
}
# Percent-escapes that are not valid UTF-8, and raw bytes.
RAW_QUERY_BITS = ['%FF', '%C0%AF', '%ED%A0%80', '%', '%zz', '\xff', '\xe9', ' ', '\t', '#x', '&&', '=&=']

GOOD_VERSIONS = ['HTTP/1.0', 'HTTP/1.1']
BAD_VERSIONS = ['HTTP/2.0', 'HTTP/3', 'HTTP/1.1x', 'HTTP/9x', 'HTTP', 'http/1.0', 'HTTP/1.0\x00', 'HTTP/01.1',
                'HTTP/1.10', 'HTTP/1.01', 'FOO/1.0', 'HTTP/1.0 extra', 'HTTP/<script>x</script>', '']
# Claims HTTP/0.9, whose answers have no status line or headers (so no nosniff, no CSP).
OLD_VERSION = 'HTTP/0.9'

CROSS_SITE = [
    'Sec-Fetch-Site: cross-site', 'Sec-Fetch-Site: same-site', 'Sec-Fetch-Site: CROSS-SITE',
    'Sec-Fetch-Site:  cross-site ', 'Origin: http://evil.example', 'Origin: null',
    'Origin: http://evil.example:{port}', 'Origin: http://127.0.0.1:1', 'Origin: https://evil.example',
    'Origin: http://[bad', 'Origin: http://127.0.0.1:99999', 'Origin: file://', 'Referer: http://evil.example/running',
    'Referer: http://evil.example:{port}/running', 'Referer: //evil.example/', 'Referer: javascript:alert(1)',
]
SAME_SITE = ['Sec-Fetch-Site: same-origin', 'Sec-Fetch-Site: none', 'Origin: http://127.0.0.1:{port}',
             'Referer: http://127.0.0.1:{port}/running']

GARBAGE_HEADERS = [
    'X-No-Colon', ' folded continuation', '\tfolded tab', ': empty name', 'X-Nul: a\x00b', 'X-Big: ' + 'b' * 9000,
    'X-Latin: \xe9\xff', 'Transfer-Encoding: chunked', 'Content-Length: abc', 'Content-Length: -1',
    'Content-Length: \udcb2', 'Content-Length: \udcb9', 'Content-Length: \udcb3\udcb2',
    'Content-Length: 99999999', 'Content-Length: 1e3',
    'Content-Length:  5 ', 'Content-Length: 5\r\nContent-Length: 6', 'Content-Type: text/plain',
    'Content-Type: application/x-www-form-urlencoded; charset=latin-1', 'Content-Type: multipart/form-data',
    'Expect: 100-continue', 'Connection: keep-alive', 'Host: <script>x</script>', 'Host: [',
    'X-Injected-Test: <script>x</script>', 'Accept: text/html', 'Accept: */*',
    'Cookie: ' + 'c=' + 'x' * 7000, 'X-Many: ' + ', '.join(['v'] * 2000), 'Accept-Encoding: gzip',
]


def quote(value, rng):
    """Mostly properly escaped, sometimes raw (spaces and all): both must be survivable."""
    if rng.random() < 0.85:
        return urllib.parse.quote(value, safe='')
    return value


# The parameters each page or action takes: most generated queries use these,
# so requests get past parameter checking into the code behind it.
ROUTE_PARAMS = dict((path, list(action.required + action.optional))
                    for path, action in pydirector_admin.ACTIONS.items())
ROUTE_PARAMS.update(PAGE_PARAMS)
PARAMS = sorted(set(name for names in ROUTE_PARAMS.values() for name in names))


class RequestMaker(object):
    """Generated requests as (bytes, may change state, X-Fuzz-Id)."""

    def __init__(self, seed, port):
        self.rng = random.Random(seed)
        self.port = port
        self.count = 0

    def fill(self, text):
        return text.replace('{port}', str(self.port))

    def value(self, name, tidy):
        if name in TIDY_VALUES and self.rng.random() < tidy:
            return self.rng.choice(TIDY_VALUES[name])
        if name in ('refresh', 'weight', 'maxconns', 'drain', 'rollback') and self.rng.random() < 0.7:
            return self.rng.choice(NUMBERS)
        value = self.rng.choice(VALUES)
        if name == 'name' and value == 'admin':
            value = 'someone'   # never lock the fuzzer out by changing its own user
        return value

    def query(self, path, tidy):
        rng = self.rng
        pairs = []
        known = ROUTE_PARAMS.get(path, [])
        if known and rng.random() < tidy:
            names = [n for n in known if rng.random() < 0.9]
        else:
            names = [rng.choice(PARAMS) for _ in range(rng.choice([0, 1, 2, 3, 3, 4, 5]))]
        for name in names:
            if rng.random() < 0.05:
                name = rng.choice(ODD_PARAMS)
            pairs.append('%s=%s' % (quote(name, rng), quote(self.value(name, tidy), rng)))
        if pairs and rng.random() < 0.05:
            pairs.append(rng.choice(pairs))              # a parameter given twice
        if rng.random() < 0.05:
            pairs.append(rng.choice(RAW_QUERY_BITS))
        return '&'.join(pairs)

    def request(self, privileged, tidy=0.5):
        """A random request.  privileged=False guarantees it lacks full access or carries a
        cross-site marker; tidy (0-1) is how often each part is well-formed."""
        rng = self.rng
        self.count += 1
        if rng.random() < tidy:
            # /running is the one page with parameters: give it a bigger share.
            path = rng.choice(ACTIONS if privileged else PAGES + ['/running'] * 3 + ACTIONS)
        else:
            path = rng.choice(PAGES + ACTIONS + ODD_PATHS)
        if rng.random() < tidy:
            method = rng.choice(['GET', 'HEAD'] if path in PAGES else ['GET', 'POST'])
        else:
            method = rng.choice(METHODS)
        query = self.query(path, tidy) if rng.random() < 0.8 else ''
        form = ''
        if method == 'POST' and rng.random() < 0.8:
            # A form body: the query's parameters, or (less tidy) another set beside them.
            form, query = (query, '') if rng.random() < tidy else (self.query(path, tidy), query)
        target = path + ('?' + query if query or rng.random() < 0.05 else '')
        roll, good = rng.random(), 0.86 + tidy / 10
        version = rng.choice(GOOD_VERSIONS) if roll < good else OLD_VERSION if roll < good + 0.01 else \
            rng.choice(BAD_VERSIONS)
        cross_site = []
        same_site = []
        if privileged:
            auth = rng.choice(FULL_CREDENTIALS)
            if rng.random() < 0.2:
                same_site.append(self.fill(rng.choice(SAME_SITE)))
        else:
            roll = rng.random()
            if roll < 0.45:
                auth, full = rng.choice(BAD_CREDENTIALS), False
            elif roll < 0.6:
                auth, full = rng.choice(READONLY_CREDENTIALS), False
            else:
                auth, full = rng.choice(FULL_CREDENTIALS), True
            if full or rng.random() < 0.3:
                cross_site.extend(self.fill(m) for m in rng.sample(CROSS_SITE, rng.choice([1, 1, 2])))
        # The cross-site markers come first, right after the request line, so no
        # malformed line after them can hide them from the server.
        headers = cross_site + same_site + ['X-Fuzz-Id: %d' % self.count]
        if rng.random() < 0.9:
            headers.append('Host: 127.0.0.1:%d' % self.port)
        if auth is not None:
            headers.append('Authorization: ' + auth)
        if rng.random() < 0.2:
            headers.append('Accept: text/html,application/xhtml+xml')
        body = b''
        if form:
            body = form.encode('utf-8', 'surrogateescape')
            if rng.random() < 0.9:
                headers.append('Content-Type: application/x-www-form-urlencoded')
            if rng.random() < 0.9:
                headers.append('Content-Length: %d' % (len(body) + rng.choice([0] * 8 + [-1, 1, 100])))
        for _ in range(0 if rng.random() < tidy else rng.choice([0, 1, 1, 2, 3])):
            headers.append(rng.choice(GARBAGE_HEADERS))
        if rng.random() < 0.02:
            headers.extend('X-H%d: y' % i for i in range(rng.choice([99, 101, 150])))
        eol = '\r\n' if rng.random() < 0.9 else '\n'
        line = ' '.join(part for part in (method, target, version) if part)
        data = (eol.join([line] + headers) + eol + eol).encode('utf-8', 'surrogateescape')
        return data + body, privileged, self.count

    def readonly(self):
        """A valid read-only request that must answer 200."""
        rng = self.rng
        self.count += 1
        path = rng.choice(READABLE_PAGES)
        if path == '/running' and rng.random() < 0.5:
            path += '?msg=' + urllib.parse.quote(rng.choice(MARKERS + ['OK <b>done</b>', 'ERROR caf\u00e9']))
        data = ('GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nX-Fuzz-Id: %d\r\nAuthorization: %s\r\n\r\n' % (
            path, self.port, self.count, rng.choice(READONLY_CREDENTIALS + FULL_CREDENTIALS))).encode()
        return data, False, self.count


def running_state(balancer):
    """What an unauthorised request must not change: services, groups, hosts, users, running config."""
    def collect():
        director = balancer.director
        snap = director.snapshot()
        services = [(s['name'], s['enabled'], tuple(s['listen']),
                     tuple((g['name'], g['scheduler'], g['enabled'],
                            tuple((h['name'], h['ip'], h['weight'], h['maxconns'], h['admin']) for h in g['hosts']))
                           for g in s['groups']))
                    for s in snap['services']]
        users = [(u['name'], u['access']) for u in snap['users']]
        return services, users, director.running_config().to_xml()
    return balancer.call(collect)


class AdminCase(BalancerCase):
    """A balancer with service web (groups main and spare) and its admin server on an ephemeral port."""

    @classmethod
    def start_balancer(cls, service):
        admin = ('  <admin listen="127.0.0.1:%d">\n'
                 '    <user name="admin" password="%s" access="full"/>\n'
                 '    <user name="viewer" password="%s" access="readonly"/>\n'
                 '  </admin>\n' % (free_port(), FAST_HASH, FAST_HASH))
        cls.bal = Balancer(config_xml(service + admin))
        a = cls.bal.config.admin
        cls.server = pydirector_admin.start(cls.bal.director, pydirector.Admin(a.listen, a.host, 0, a.users))
        cls.port = cls.server.server_address[1]
        # Bad logins from this address are answered at once (not held back): the fuzz is about answers.
        cls.server.refusal_delay = 0
        # An unknown user costs one check of this hash; the default strength would take minutes here.
        cls.server.passwords.unknown_user_hash = pydirector.hash_password('no such user', iterations=1000)
        # The good credentials pass once before any flood: a cached success is never locked out
        # (bad ones from this address soon get 429 without a check).
        for auth in FULL_CREDENTIALS[:1] + READONLY_CREDENTIALS:
            data = 'GET / HTTP/1.0\r\nAuthorization: %s\r\n\r\n' % auth
            assert raw_exchanges(cls.port, [data.encode()])[0].status == 200

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()
        cls.bal.stop()

    def post(self, path, auth=None, timeout=10):
        """A change: the query string of path sent as a form body."""
        path, _, query = path.partition('?')
        data = ('POST %s HTTP/1.0\r\nHost: 127.0.0.1:%d\r\nAuthorization: %s\r\nContent-Type: '
                'application/x-www-form-urlencoded\r\nContent-Length: %d\r\n\r\n%s' % (
                    path, self.port, auth or basic('admin', PASSWORD), len(query), query))
        return raw_exchanges(self.port, [data.encode()], timeout=timeout)[0]

    def get(self, path, auth=None, timeout=10):
        auth = auth or basic('admin', PASSWORD)
        data = ('GET %s HTTP/1.0\r\nHost: 127.0.0.1:%d\r\nAuthorization: %s\r\n\r\n' % (path, self.port, auth))
        return raw_exchanges(self.port, [data.encode()], timeout=timeout)[0]


def problems_in(requests, responses):
    """Every broken promise in a batch of answers, as readable text (with the request's X-Fuzz-Id)."""
    problems = []
    for data, response in zip(requests, responses):
        fuzz_id = re.search(rb'X-Fuzz-Id: (\d+)', data)
        where = 'request %s %r' % (fuzz_id.group(1).decode() if fuzz_id else '?', data[:100])
        if response.error == 'timed out':
            problems.append('%s: no answer in time' % where)
            continue
        if response.status is None:
            # A headerless answer is read as HTML by anything that still speaks HTTP/0.9.
            if any(marker.encode() in response.data for marker in MARKERS):
                problems.append('%s: marker reflected raw in %r' % (where, response.data[:100]))
            if data.strip():
                problems.append('%s: no status line in %r' % (where, response.data[:100]))
            continue
        if response.status >= 500:
            problems.append('%s: %d %r' % (where, response.status, response.body[:100]))
        if any(name.lower().startswith('x-injected') for name, _ in response.headers):
            problems.append('%s: header injected: %r' % (where, response.headers))
        content_type = response.header('Content-Type') or ''
        if content_type.startswith('text/html'):
            body = response.body.decode('utf-8', 'replace')
            for marker in MARKERS:
                if marker in body:
                    problems.append('%s: %r reflected raw into HTML' % (where, marker))
    return problems


class AdminFuzzTest(AdminCase):
    """Thousands of generated requests: nothing breaks, nothing unauthorised changes anything."""

    SEED = 2024

    @classmethod
    def setUpClass(cls):
        cls.start_balancer(service_xml(None, groups=[
            ('main', 'roundrobin', [('one', '127.0.0.1:%d' % free_port()), ('two', '127.0.0.1:%d' % free_port())]),
            ('spare', 'leastconns', [('three', '127.0.0.1:%d' % free_port())]),
        ], enable='main'))

    def test_fuzz(self):
        maker = RequestMaker(self.SEED, self.port)
        statuses = collections.Counter()
        problems = []
        started = time.monotonic()
        mark = LOG.mark()

        # 1. No full access (or a cross-site marker): nothing may change.  Valid
        #    read-only requests are mixed in and must answer 200.
        unprivileged = int(TOTAL_REQUESTS * UNPRIVILEGED_SHARE)
        requests, readonly = [], set()
        for i in range(unprivileged):
            if maker.rng.random() < 0.12:
                readonly.add(i)
                requests.append(maker.readonly()[0])
            else:
                data, privileged, _ = maker.request(privileged=False)
                assert not privileged
                requests.append(data)
        before = running_state(self.bal)
        responses = raw_exchanges(self.port, requests, parallel=8)
        after = running_state(self.bal)
        problems.extend(problems_in(requests, responses))
        statuses.update(r.status for r in responses)
        bad_readonly = [(requests[i][:80], responses[i]) for i in sorted(readonly) if responses[i].status != 200]
        self.assertEqual(bad_readonly, [], 'valid read-only requests that did not answer 200')
        self.assertEqual(after[0], before[0], 'services, groups or hosts changed without full access')
        self.assertEqual(after[1], before[1], 'users changed without full access')
        self.assertEqual(after[2], before[2], 'the running config changed without full access')
        changes = [l for l in LOG.since(mark) if l.startswith('admin: user ') or 'log file reopened' in l]
        self.assertEqual(changes, [], 'a change ran without full access')

        # 2. Full access, same site: changes may happen, with hostile names and values.
        fast_hash = lambda password: pydirector.hash_password(password, iterations=1000)  # noqa: E731
        requests = [maker.request(privileged=True, tidy=0.9)[0] for _ in range(TOTAL_REQUESTS - unprivileged)]
        with mock.patch.object(pydirector_admin, 'hash_password', fast_hash):
            responses = raw_exchanges(self.port, requests, parallel=8)
        problems.extend(problems_in(requests, responses))
        statuses.update(r.status for r in responses)
        sent = unprivileged + len(requests)
        # Whatever the fuzz left, the pages below must have markup to escape: a group,
        # a host and a user named after each marker.
        quote_all = lambda text: urllib.parse.quote(text, safe='')  # noqa: E731
        with mock.patch.object(pydirector_admin, 'hash_password', fast_hash):
            for number, marker in enumerate(MARKERS):
                m = quote_all(marker)
                for change in ('/newGroup?service=web&group=%s&scheduler=roundrobin' % m,
                               '/addHost?service=web&group=%s&name=%s&ip=127.0.0.1:%d' % (m, m, 9 + number),
                               '/addUser?name=%s&password=x&access=readonly' % m):
                    response = self.post(change)
                    self.assertIn(response.status, (200, 409), (change, response))
        names = [n for s in self.bal.snapshot()['services'] for g in s['groups']
                 for n in [g['name']] + [h['name'] for h in g['hosts']]]
        names += [u['name'] for u in self.bal.snapshot()['users']]
        self.assertEqual([m for m in MARKERS if names.count(m) < 3], [], names)

        # 3. Every page after all that: still answering, and escaping what was added.
        pages = PLAIN_PAGES + ['/running?refresh=5'] + ['/running?msg=' + urllib.parse.quote(m) for m in MARKERS]
        requests = [('GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAuthorization: %s\r\n\r\n' % (
            page, self.port, auth)).encode() for page in pages for auth in (FULL_CREDENTIALS[0],
                                                                             READONLY_CREDENTIALS[0])]
        responses = raw_exchanges(self.port, requests, parallel=4)
        problems.extend(problems_in(requests, responses))
        sent += len(requests)
        for data, response in zip(requests, responses):
            path = data.split(b' ')[1].split(b'?')[0].decode()
            if pydirector_admin.PAGES[path][1] and READONLY_CREDENTIALS[0].encode() in data:
                self.assertEqual(response.status, 403, data[:60])
            else:
                self.assertEqual(response.status, 200, (data[:60], response))
        statuses.update(r.status for r in responses)

        elapsed = time.monotonic() - started
        tracebacks = [l for l in LOG.since(mark) if l.startswith('TRACEBACK')]
        print('\nadmin fuzz: %d requests in %.1f s; statuses %s; %d problems, %d tracebacks' % (
            sent, elapsed, dict(sorted(statuses.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))),
            len(problems), len(tracebacks)), file=sys.stderr)
        self.assertGreaterEqual(sent, 5000)
        self.assertEqual(problems, [], '%d problems; first: %s' % (len(problems), problems[:10]))
        self.assertEqual(tracebacks, [], '%d tracebacks; first: %s' % (len(tracebacks), tracebacks[:2]))
        self.assertLess(elapsed, 60)      # a hang guard; about 6-15 s here


def count_until_eof(conn, backend):
    """A sink: read to EOF, answer with the number of bytes."""
    total = 0
    while True:
        data = conn.recv(262144)
        if not data:
            break
        total += len(data)
    conn.sendall(b'%d' % total)


SLOWLORIS_SOCKETS = int(os.environ.get('PYDIRECTOR_SLOWLORIS_SOCKETS', '200'))
# Many short transfers, of which the fastest counts: on a shared two-core machine a
# quiet 5 ms window comes far more often than a quiet 100 ms one, so best-of-30 of
# 4 MiB repeats within a few per cent where best-of-3 of 64 MiB swung by half.
BULK_BYTES = 4 << 20
BULK_SAMPLES = 30


class SlowlorisTest(AdminCase):
    """Many admin sockets that trickle a byte every few seconds and never finish a request.

    Scaled down here (200 sockets, one trickle round); PYDIRECTOR_SLOWLORIS_SOCKETS=1000
    runs the full size with three rounds, 3 s apart."""

    @classmethod
    def setUpClass(cls):
        cls.sink = Backend(count_until_eof, 'sink')
        cls.start_balancer(service_xml([('sink', cls.sink.address)]))

    @classmethod
    def tearDownClass(cls):
        super(SlowlorisTest, cls).tearDownClass()
        cls.sink.close()

    def bulk_seconds(self):
        """Seconds to push BULK_BYTES through the balancer and hear the sink's count back."""
        chunk = b'x' * (256 << 10)
        started = time.monotonic()
        sock = support.connect(self.bal.port(), timeout=30)
        try:
            for _ in range(BULK_BYTES // len(chunk)):
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)
            answer = support.recv_all(sock)
        finally:
            sock.close()
        self.assertEqual(answer, b'%d' % BULK_BYTES)
        return time.monotonic() - started

    def throughput(self):
        """MB/s of the least disturbed of BULK_SAMPLES transfers."""
        return BULK_BYTES / min(self.bulk_seconds() for _ in range(BULK_SAMPLES)) / 1e6

    def legit_request(self):
        started = time.monotonic()
        response = self.get('/running.txt', timeout=5)
        return response, time.monotonic() - started

    def open_slow_sockets(self, count):
        """count sockets connected to the admin, in batches, each batch connected and taken
        off the accept queue before the next: a burst of SYNs past the listen backlog is
        retried a second later, and a legitimate request would queue behind it by chance."""
        slow = []
        self.addCleanup(lambda: [s.close() for s in slow])
        for batch in range(0, count, 50):
            selector = selectors.DefaultSelector()
            for _ in range(min(50, count - batch)):
                sock = socket.socket()
                sock.setblocking(False)
                sock.connect_ex(('127.0.0.1', self.port))
                slow.append(sock)
                selector.register(sock, selectors.EVENT_WRITE)
            deadline = time.monotonic() + 15
            while selector.get_map() and time.monotonic() < deadline:
                for key, _ in selector.select(0.5):
                    selector.unregister(key.fileobj)
            self.assertFalse(selector.get_map(), 'slow sockets that never connected')
            selector.close()
            if support.accept_queue_length(self.port) is not None:
                wait_until(lambda: support.accept_queue_length(self.port) == 0, 10)
        return slow

    def test_slowloris(self):
        count = SLOWLORIS_SOCKETS
        rounds, interval = (1, 0.0) if count <= 200 else (3, 3.0)
        support.raise_open_files(2 * count + 256)
        cap = self.server.max_pending
        self.assertEqual(self.legit_request()[0].status, 200)    # credentials cached
        wait_until(lambda: self.server.open_connections() == 0)
        threads_before = set(threading.enumerate())

        def admin_threads():
            # New threads since the start, but for the sink's own connection threads.
            return len(set(threading.enumerate()) - threads_before - set(self.sink.threads))

        request = b'GET /running.txt HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: '
        most_threads = most_pending = cut = 0
        latencies, statuses, figures = [], [], []
        # The box is shared, and even best-of-30 can meet a busy spell on one side:
        # a throughput change past 10% is measured afresh, up to three times.
        for attempt in range(3):
            before = self.throughput()
            slow = self.open_slow_sockets(count)
            for number in range(rounds):
                if number:
                    time.sleep(interval)      # the attack's own pace, not synchronisation
                for sock in slow:
                    try:
                        sock.send(request if number == 0 else b'a')
                    except OSError:
                        cut += 1
                most_threads = max(most_threads, admin_threads())
                most_pending = max(most_pending, len(self.server.reader.pending))
                response, seconds = self.legit_request()
                statuses.append(response.status)
                latencies.append(seconds)
            during = self.throughput()
            most_threads = max(most_threads, admin_threads())
            for sock in slow:
                sock.close()
            wait_until(lambda: self.server.open_connections() == 0, 40)
            after = self.throughput()
            figures.append((before, during, after))
            # Against the nearer of the two undisturbed figures: a real cost shows against both.
            change = min((during / before - 1, during / after - 1), key=abs)
            if change > -0.10 or statuses != [200] * len(statuses):
                break               # settled; or failing anyway, on something a rerun will not change

        print('\nslowloris: %d sockets, %d round(s) of trickling; admin threads +%d, connections still sending '
              '%d (cap %d); '
              'legit requests %s in %s ms; %d sends to sockets the server had cut; throughput MB/s '
              'before/during/after %s (%+.1f%%)' % (
                  count, rounds, most_threads, most_pending, cap, statuses,
                  '/'.join('%.0f' % (s * 1000) for s in latencies), cut,
                  ', '.join('%.0f/%.0f/%.0f' % three for three in figures), change * 100),
              file=sys.stderr)
        # The reader thread was there before; a worker or two may be answering the legit requests.
        self.assertLessEqual(most_threads, 2, 'slow clients hold admin threads')
        self.assertLessEqual(most_pending, cap)
        self.assertEqual(statuses, [200] * len(statuses), 'a legitimate request was not answered')
        self.assertLess(max(latencies), 0.5)
        # Only a slowdown can be the slow clients' doing; a speed-up is the machine.  The
        # full run holds the 10%; CI runs two suites at once, so it only
        # guards against the data plane stalling.
        limit = 0.10 if 'PYDIRECTOR_SLOWLORIS_SOCKETS' in os.environ else 0.5
        self.assertGreater(change, -limit, 'data-plane throughput changed by %+.1f%%' % (change * 100))

# ---------------------------------------------------------------------------
# Regressions: cases the fuzzer found, one named test each.
# ---------------------------------------------------------------------------

class AdminRegressionTest(AdminCase):

    @classmethod
    def setUpClass(cls):
        cls.start_balancer(service_xml([('one', '127.0.0.1:%d' % free_port())]))

    def answer(self, request_line, headers=(), body=b''):
        lines = [request_line, 'Host: 127.0.0.1:%d' % self.port, 'Authorization: ' + basic('admin', PASSWORD)]
        data = ('\r\n'.join(lines + list(headers)) + '\r\n\r\n').encode('utf-8', 'surrogateescape') + body
        mark = LOG.mark()
        response = raw_exchanges(self.port, [data])[0]
        tracebacks = [l for l in LOG.since(mark) if l.startswith('TRACEBACK')]
        self.assertEqual(tracebacks, [])
        return response

    def test_superscript_content_length_is_400(self):
        # Header values are read as latin-1, where b'\xb2' is '\u00b2': str.isdigit()
        # says yes, int() says no, and the ValueError became a 500.
        for value in ('\udcb2', '\udcb9', '\udcb3\udcb2'):
            with self.subTest(value=value):
                response = self.answer('POST /closeLog HTTP/1.0', ['Content-Length: ' + value])
                self.assertEqual(response.status, 400, response)

    def test_superscript_refresh_is_400(self):
        # The same isdigit()/int() mismatch in /running?refresh=.
        for value in ('%C2%B2', '%C2%B9%C2%B2'):
            with self.subTest(value=value):
                response = self.answer('GET /running?refresh=%s HTTP/1.0' % value)
                self.assertEqual(response.status, 400, response)

    def test_target_urlsplit_refuses_is_4xx(self):
        # urllib.parse.urlsplit raises ValueError ('Invalid IPv6 URL') on these;
        # '//[' only on Pythons whose http.server does not collapse leading slashes.
        for target in ('http://[x/', 'http://[::1/running.txt', '//[', '//[::1/running'):
            with self.subTest(target=target):
                response = self.answer('GET %s HTTP/1.0' % target)
                self.assertIsNotNone(response.status, response)
                self.assertTrue(400 <= response.status < 500, response)

    def test_bad_version_answer_has_status_line_and_headers(self):
        # parse_request answers version errors before it sets request_version, so
        # the answer went out HTTP/0.9 style: no status line, no Content-Type, no
        # nosniff -- and the version text, markup and all, in the bare body.
        for version in ('HTTP/1.1x', 'HTTP/<script>x</script>', 'FOO/1.0', 'HTTP/0.9', 'HTTP/2.0'):
            with self.subTest(version=version):
                response = self.answer('GET /running.txt %s' % version)
                self.assertIsNotNone(response.status, response)
                self.assertEqual(response.header('X-Content-Type-Options'), 'nosniff')
                self.assertTrue(response.header('Content-Type').startswith('text/plain'), response)

    def test_http2_request_is_not_5xx(self):
        # 505 is what http.server picks for HTTP/2+; the admin promises no 5xx but 503 (busy) and 500 (bug).
        response = self.answer('GET /running.txt HTTP/2.0')
        self.assertIsNotNone(response.status, response)
        self.assertLess(response.status, 500, response)


    def test_slow_clients_do_not_lock_out_the_operator(self):
        # The slowloris test in small: with every admin slot held by a client still
        # dribbling its request head, a new connection was closed unanswered for up
        # to CONNECTION_DEADLINE (30 s), however often the operator retried.
        wait_until(lambda: self.server.open_connections() == 0)
        self.addCleanup(setattr, self.server, 'max_pending', self.server.max_pending)
        self.server.max_pending = 2
        slow = []
        for _ in range(2):
            sock = socket.create_connection(('127.0.0.1', self.port), timeout=5)
            self.addCleanup(sock.close)
            sock.sendall(b'GET /running.txt HTTP/1.1\r\nX-Slow: ')
            slow.append(sock.getsockname())
        wait_until(lambda: set(slow) <= set(p.address for p in list(self.server.reader.pending.values())))
        self.assertEqual(self.server.busy, 0)
        started = time.monotonic()
        response = self.get('/running.txt', timeout=5)
        self.assertEqual(response.status, 200, response)
        self.assertLess(time.monotonic() - started, 5)    # not behind the slow ones (10 s each)

if __name__ == '__main__':
    unittest.main()


# Values no admin change should turn into a running.xml that does not load.
HOSTILE_NAMES = MARKERS + ['a:b', 'ops:team', ' ', 'x\u202ey', 'tab\there', 'new\nline', 'caf\u00e9', '-', '.',
                           'a' * 300, '\u2028', 'name with spaces', '&amp;', ']]>', '"quoted"']
HOSTILE_IPS = ['*:80', '[::]:80', '0.0.0.0:80', '127.0.0.1:0', '127.0.0.1:65536', '::1:80', '[::1]:80',
               '127.0.0.1:8080', 'localhost:81', 'bad host:80', 'x' * 300 + ':80', '10.0.0.300:1', '1.2.3.4',
               '[fe80::1%eth0]:80', 'host.example.:90', '127.0.0.1:-1', '<b>:80']
HOSTILE_NUMBERS = ['', '0', '1', '1000', '1001', '-1', '2.5', '1e3', '\u00b2', '99999999999999', ' 3']
HOSTILE_SCHEDULERS = ['roundrobin', 'hash,sticky', 'leastconns, sticky', 'nope', '', ',', 'random,sticky,sticky',
                      'leastconnsrr', 'hash,bogus']


class RunningXmlAlwaysLoadsTest(AdminCase):
    """The structure issue's bug 1, generated: random admin changes with hostile values,
    and whatever the admin accepted, running.xml passes `pydirector.py --check`."""

    SEED = 77
    CHANGES = 300

    @classmethod
    def setUpClass(cls):
        pass    # a balancer of the test's own: the hosts it adds start probe threads

    @classmethod
    def tearDownClass(cls):
        pass

    def test_random_changes_keep_running_xml_loadable(self):
        self.start_balancer(service_xml([('one', '127.0.0.1:%d' % free_port())]))
        self.addCleanup(self.bal.stop)
        self.addCleanup(self.server.stop)
        rng = random.Random(self.SEED)
        statuses = collections.Counter()
        groups = ['main']
        for number in range(self.CHANGES):
            kind = rng.choice(['addHost', 'addHost', 'newGroup', 'addUser', 'changeScheduler'])
            if kind == 'addHost':
                params = {'service': 'web', 'group': rng.choice(groups), 'name': rng.choice(HOSTILE_NAMES + ['h%d' % number]),
                          'ip': rng.choice(HOSTILE_IPS + ['127.0.0.1:%d' % (10000 + number)])}
                for key in ('weight', 'maxconns'):
                    if rng.random() < 0.5:
                        params[key] = rng.choice(HOSTILE_NUMBERS)
                if rng.random() < 0.3:
                    params['send_proxy'] = rng.choice(['v1', 'v2', 'v3', ''])
            elif kind == 'newGroup':
                name = rng.choice(HOSTILE_NAMES + ['g%d' % number])
                params = {'service': 'web', 'group': name, 'scheduler': rng.choice(HOSTILE_SCHEDULERS)}
            elif kind == 'addUser':
                params = {'name': rng.choice(HOSTILE_NAMES + ['u%d' % number]), 'access': rng.choice(['full', 'readonly', 'x']),
                          'password_hash': rng.choice([FAST_HASH, 'plain', '$6$x$y'])}
            else:
                params = {'service': 'web', 'group': rng.choice(groups), 'scheduler': rng.choice(HOSTILE_SCHEDULERS)}
            response = self.post('/%s?%s' % (kind, urllib.parse.urlencode(params)))
            statuses[response.status] += 1
            self.assertIn(response.status, (200, 400, 404, 409), (kind, params, response))
            if kind == 'newGroup' and response.status == 200:
                groups.append(params['group'])
            if number % 50 == 49 or number == self.CHANGES - 1:
                xml = self.get('/running.xml')
                self.assertEqual(xml.status, 200)
                try:
                    pydirector.parse_config(xml.body, 'running.xml')
                except pydirector.ConfigError as e:
                    self.fail('after %s %r, running.xml does not load: %s' % (kind, params, e))
        # And the real command line, as an operator would check it.
        folder = tempfile.mkdtemp(prefix='pydirector-running-')
        self.addCleanup(shutil.rmtree, folder, True)
        path = os.path.join(folder, 'running.xml')
        with open(path, 'wb') as f:
            f.write(self.get('/running.xml').body)
        proc = subprocess.run([sys.executable, os.path.join(support.REPO, 'pydirector.py'), '--check', path],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
        self.assertEqual(proc.returncode, 0, proc.stdout.decode('utf-8', 'replace')[-2000:])
        self.assertGreater(statuses[200], 30, statuses)
        self.assertGreater(statuses[400], 30, statuses)
