"""Admin web interface: real HTTP against a running balancer with real backends and traffic.

Every class starts pydirector in-process (support.Balancer) with an <admin>
block, starts the admin server on an ephemeral port, and talks to it with
http.client, raw sockets, and -- where installed -- wget, curl and headless
Chromium.
"""

import base64
import collections
import contextlib
import html.parser
import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import unittest
import urllib.parse

import support
from support import (BalancerCase, Backend, LOG, WorkersMixin, config_xml, exchange, free_port, service_xml,
                     wait_until)

import pydirector
import pydirector_admin

PASSWORD = 'pass word'       # a space, so URL and form encoding are exercised
_HASH = []


def password_hash():
    """One hash for the whole file (both users share it), cheap to check: every test has
    its own balancer, whose first login is a real check."""
    if not _HASH:
        _HASH.append(pydirector.hash_password(PASSWORD, iterations=support.FAST_HASH_ITERATIONS))
    return _HASH[0]


def basic(user, password):
    return 'Basic ' + base64.b64encode(('%s:%s' % (user, password)).encode()).decode()


def admin_xml(port=None):
    """The <admin> block; in-process tests then start the server on port 0 instead."""
    return ('  <admin listen="127.0.0.1:%d">\n'
            '    <user name="admin" password="%s" access="full"/>\n'
            '    <user name="viewer" password="%s" access="readonly"/>\n'
            '  </admin>\n' % (port or free_port(), password_hash(), password_hash()))


HISTORY_KEYS = ('history', 'rate', 'rate_peak')


def steady(snapshot):
    """A snapshot without what moves with the clock alone (its time, the workers' heartbeat
    ages, a down host's downtime, the history, which takes a sample every 5 s)."""
    snapshot.pop('now')
    snapshot.pop('history')
    for worker in snapshot.get('workers') or ():
        worker.pop('heartbeat')
    for service in snapshot['services']:
        things = [service] + [host for group in service['groups'] for host in group['hosts']]
        for thing in things:
            for key in HISTORY_KEYS:
                thing.pop(key)
        for host in things[1:]:
            host.pop('downtime')
    return snapshot


def name_then_echo(conn, backend):
    """Say our name, then echo: a held connection shows which host it reached and that it still flows."""
    conn.sendall(backend.name.encode() + b'\n')
    support.echo(conn, backend)


class Response(object):
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def __repr__(self):
        return '<%d %r>' % (self.status, self.body[:200])


class AdminCase(BalancerCase):
    """A balancer with service 'web' (groups main and spare) and its admin server, per test."""

    def backends(self):
        self.n1 = self.backend(support.say_name, 'n1')
        self.n2 = self.backend(support.say_name, 'n2')
        self.s1 = self.backend(support.say_name, 's1')
        self.dead_port = free_port()

    def service(self):
        return service_xml(None, groups=[
            ('main', 'roundrobin', [('n1', self.n1.address), ('n2', self.n2.address),
                                    ('dead', '127.0.0.1:%d' % self.dead_port)]),
            ('spare', 'leastconns', [('s1', self.s1.address)]),
        ], enable='main')

    def setUp(self):
        BalancerCase.setUp(self)
        self.backends()
        self.bal = self.start(config_xml(self.service() + admin_xml()))
        self.start_admin()

    def start_admin(self):
        a = self.bal.config.admin
        self.admin_config = pydirector.Admin(a.listen, a.host, 0, a.users)
        self.server = pydirector_admin.start(self.bal.director, self.admin_config)
        self.addCleanup(self.server.stop)
        self.port = self.server.server_address[1]
        self.base = 'http://127.0.0.1:%d' % self.port

    # -- helpers ------------------------------------------------------------

    def fetch(self, path, method='GET', body=None, headers=None, user='admin', password=PASSWORD, port=None,
              timeout=10, source='127.0.0.1'):
        conn = http.client.HTTPConnection('127.0.0.1', port or self.port, timeout=timeout, source_address=(source, 0))
        sent = {}
        if user is not None:
            sent['Authorization'] = basic(user, password)
        if isinstance(body, dict):
            body = urllib.parse.urlencode(body)
            sent['Content-Type'] = 'application/x-www-form-urlencoded'
        sent.update(headers or {})
        try:
            conn.request(method, path, body, sent)
            resp = conn.getresponse()
            return Response(resp.status, resp.headers, resp.read().decode('utf-8'))
        finally:
            conn.close()

    def change(self, path, expect=200, **kwargs):
        """A change as scripts make it: a form POST (the query string of path becomes the body)."""
        if 'method' not in kwargs and 'body' not in kwargs:
            path, _, query = path.partition('?')
            kwargs['method'] = 'POST'
            kwargs['body'] = query
            kwargs['headers'] = dict(kwargs.get('headers') or {}, **{
                'Content-Type': 'application/x-www-form-urlencoded'})
        resp = self.fetch(path, **kwargs)
        self.assertEqual(resp.status, expect, resp)
        if expect == 200:
            self.assertTrue(resp.body.startswith('OK '), resp)
        else:
            self.assertTrue(resp.body.startswith('ERROR '), resp)
        return resp.body

    def raw(self, data, port=None):
        """Send raw bytes, half-close, return everything the server answers."""
        sock = socket.create_connection(('127.0.0.1', port or self.port), timeout=10)
        try:
            sock.sendall(data)
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            return support.recv_all(sock)
        finally:
            sock.close()

    def pending(self, sock, server=None):
        """The server's record of this client socket, while it is still reading its request.
        (By address: another process's stray connection may be pending too.)"""
        for p in list((server or self.server).reader.pending.values()):
            if p.address[:2] == sock.getsockname()[:2]:
                return p
        return None

    def host(self, name, service='web'):
        return self.bal.host(name, service)

    def hosts(self, group='main'):
        for s in self.bal.snapshot()['services']:
            for g in s['groups']:
                if g['name'] == group:
                    return [h['name'] for h in g['hosts']]
        return None

    def wait_dead_down(self):
        """Send traffic until the dead host was tried and marked down."""
        def down():
            exchange(self.bal.port())
            return self.host('dead')['health'] == 'down'
        wait_until(down, 5)


# ---------------------------------------------------------------------------

class ReadingTest(AdminCase):

    def setUp(self):
        super(ReadingTest, self).setUp()
        for _ in range(6):
            exchange(self.bal.port())

    def test_index(self):
        resp = self.fetch('/')
        self.assertEqual(resp.status, 200)
        self.assertEqual(resp.headers['Content-Type'], 'text/html; charset=utf-8')
        self.assertIn('pydirector %s on %s' % (pydirector.VERSION, socket.gethostname()), resp.body)
        self.assertIn('Started ', resp.body)
        for link in ('/running', '/running.txt', '/running.json', '/running.xml', '/config.xml', '/metrics'):
            self.assertIn('href="%s"' % link, resp.body)
        self.assertIn("frame-ancestors 'none'", resp.headers['Content-Security-Policy'])

    def test_running_page(self):
        self.wait_dead_down()
        body = self.fetch('/running').body
        self.assertIn('<h2>Service web</h2>', body)
        self.assertIn('Group main <span class="enabled">(enabled)</span>', body)
        self.assertIn('Group spare (inactive)', body)
        self.assertIn('<td>%s</td>' % self.n1.address, body)
        self.assertRegex(body, r'<td class="down">down: connection refused<br>'
                               r'<span class="note">since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(\d+s ago\)')
        self.assertIn('<td class="up">up</td>', body)
        for action in ('enableGroup', 'changeScheduler', 'delAllHosts', 'delGroup', 'addHost', 'delHost',
                       'hostAdminDown', 'retryHost', 'newGroup', 'addUser', 'delUser', 'closeLog'):
            self.assertIn('method="post" action="/%s"' % action, body)
        self.assertNotIn('http-equiv="refresh"', body)

    def test_running_page_refresh_and_message(self):
        body = self.fetch('/running?refresh=5&msg=OK+done').body
        self.assertIn('<meta http-equiv="refresh" content="5; url=/running?refresh=5">', body)
        self.assertIn('<p class="msg ok">OK done</p>', body)
        self.assertEqual(self.fetch('/running?refresh=0').status, 400)
        self.assertEqual(self.fetch('/running?refresh=abc').status, 400)

    def test_running_page_readonly_has_no_change_forms(self):
        body = self.fetch('/running', user='viewer').body
        self.assertIn('User viewer has read-only access.', body)
        parser = FormParser()
        parser.feed(body)
        # Only the explain form, which reads: a GET, allowed to read-only users.
        self.assertEqual(parser.forms, [('/explain', 'get', {'service': 'web', 'client': ''})])
        self.assertIn('<h2>Service web</h2>', body)

    def test_running_txt(self):
        self.wait_dead_down()
        resp = self.fetch('/running.txt')
        self.assertEqual(resp.headers['Content-Type'], 'text/plain; charset=utf-8')
        lines = resp.body.splitlines()
        listen = '127.0.0.1:%d' % self.bal.port()
        self.assertEqual(lines[0], 'service web %s main' % listen)
        self.assertEqual(lines[1], 'group main enabled')
        self.assertRegex(lines[2], r'^host n1 %s \d+ [1-9]\d* up$' % re.escape(self.n1.address))
        self.assertRegex(lines[3], r'^host n2 %s \d+ [1-9]\d* up$' % re.escape(self.n2.address))
        self.assertEqual(lines[4], 'disabled dead 127.0.0.1:%d connection_refused - 0 0' % self.dead_port)
        self.assertEqual(lines[5], 'group spare inactive')
        self.assertEqual(lines[6], 'host s1 %s 0 0 up' % self.s1.address)
        self.assertEqual(len(lines), 7)
        # Totals are the balancer's own: compare with a snapshot taken now (no traffic in between).
        snap = {h['name']: h for h in self.bal.snapshot()['services'][0]['groups'][0]['hosts']}
        self.assertEqual(lines[2].split()[3:5], [str(snap['n1']['open']), str(snap['n1']['total'])])

    def test_running_json(self):
        resp = self.fetch('/running.json')
        self.assertEqual(resp.headers['Content-Type'], 'application/json')
        data = json.loads(resp.body)
        snap = self.bal.snapshot()
        for d in (data, snap):
            steady(d)
        self.assertEqual(data, snap)
        self.assertEqual([u['name'] for u in data['users']], ['admin', 'viewer'])
        self.assertNotIn('pbkdf2', resp.body)

    def test_running_xml_round_trip(self):
        self.change('/addHost?service=web&group=spare&name=extra&ip=127.0.0.1:9&weight=3&maxconns=7')
        self.change('/enableGroup?service=web&group=spare')
        try:
            resp = self.fetch('/running.xml')
            self.assertEqual(resp.status, 200)
            self.assertEqual(resp.headers['Content-Type'], 'application/xml; charset=utf-8')
            config = pydirector.parse_config(resp.body, 'running.xml')
            self.assertEqual(config.to_xml(), resp.body)
            self.assertIn('<host name="extra" ip="127.0.0.1:9" weight="3" maxconns="7"/>', resp.body)
            self.assertIn('<enable group="spare"/>', resp.body)
        finally:
            self.change('/enableGroup?service=web&group=main')
            self.change('/delHost?service=web&group=spare&name=extra')

    def test_config_xml(self):
        resp = self.fetch('/config.xml')
        self.assertEqual(resp.status, 200)
        self.assertEqual(resp.body, self.bal.director.loaded_xml)
        pydirector.parse_config(resp.body, 'config.xml')

    def test_xml_pages_need_full_access(self):
        # They hold the users' password hashes.
        self.assertEqual(self.fetch('/running.xml', user='viewer').status, 403)
        self.assertEqual(self.fetch('/config.xml', user='viewer').status, 403)

    def test_metrics_format(self):
        self.wait_dead_down()
        # Label values with a quote, a backslash and non-ASCII must come out escaped.
        self.bal.call(self.bal.director.add_host, 'web', 'spare', 'we"ird\\ñame', '127.0.0.1:9')
        try:
            resp = self.fetch('/metrics')
        finally:
            self.bal.call(self.bal.director.del_host, 'web', 'spare', 'we"ird\\ñame')
        self.assertEqual(resp.headers['Content-Type'], 'text/plain; version=0.0.4; charset=utf-8')
        samples = parse_prometheus(self, resp.body)
        port = self.bal.port()
        accepted = samples[('pydirector_service_accepted_total', (('service', 'web'),))]
        self.assertGreaterEqual(accepted, 6)
        self.assertEqual(samples[('pydirector_service_refused_total', (('service', 'web'),))], 0)
        self.assertGreaterEqual(samples[('pydirector_service_failovers_total', (('service', 'web'),))], 1)

        def host(metric, name, group='main', address=None):
            address = address or {'n1': self.n1.address, 'n2': self.n2.address,
                                  'dead': '127.0.0.1:%d' % self.dead_port}[name]
            return samples[(metric, (('service', 'web'), ('group', group), ('host', name), ('address', address)))]

        self.assertEqual(host('pydirector_host_up', 'n1'), 1)
        self.assertEqual(host('pydirector_host_up', 'dead'), 0)
        self.assertGreaterEqual(host('pydirector_host_connections_total', 'n1'), 1)
        self.assertEqual(host('pydirector_host_open_connections', 'n1'), 0)
        # say_name sends two bytes and the client sends none.
        self.assertEqual(host('pydirector_host_bytes_out_total', 'n1'),
                         2 * host('pydirector_host_connections_total', 'n1'))
        self.assertEqual(host('pydirector_host_bytes_in_total', 'n1'), 0)
        self.assertEqual(host('pydirector_host_up', 'we"ird\\ñame', 'spare', '127.0.0.1:9'), 1)
        self.assertIn('host="we\\"ird\\\\ñame"', resp.body)
        self.assertEqual(samples[('pydirector_group_enabled', (('service', 'web'), ('group', 'spare')))], 0)
        self.assertTrue(port)

    def test_head(self):
        get = self.fetch('/running.txt')
        head = self.fetch('/running.txt', method='HEAD')
        self.assertEqual(head.status, 200)
        self.assertEqual(head.body, '')
        self.assertEqual(head.headers['Content-Length'], get.headers['Content-Length'])

    def test_unknown_path_is_404(self):
        resp = self.fetch('/nothing/here')
        self.assertEqual(resp.status, 404)
        self.assertEqual(resp.body, 'ERROR no page /nothing/here\n')

    def test_wrong_method_is_405(self):
        resp = self.fetch('/running', method='POST', body={'a': 'b'})
        self.assertEqual((resp.status, resp.headers['Allow']), (405, 'GET, HEAD'))
        resp = self.fetch('/addHost', method='PUT')
        self.assertEqual((resp.status, resp.headers['Allow']), (405, 'POST'))
        self.assertEqual(self.fetch('/closeLog', method='HEAD').status, 405)
        self.assertEqual(self.fetch('/', method='DELETE').status, 405)

    def test_unknown_query_parameter_is_400(self):
        resp = self.fetch('/running.txt?verbose=1')
        self.assertEqual(resp.status, 400)
        self.assertEqual(resp.body, 'ERROR unknown parameter verbose\n')


PROM_NAME = r'[a-zA-Z_:][a-zA-Z0-9_:]*'
PROM_LABEL_VALUE = r'"((?:[^"\\\n]|\\[\\"n])*)"'
PROM_SAMPLE = re.compile(r'^(%s)(?:\{((?:[a-zA-Z_][a-zA-Z0-9_]*=%s)(?:,[a-zA-Z_][a-zA-Z0-9_]*=%s)*)\})?'
                         r' (-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?|NaN|[+-]Inf)(?: -?[0-9]+)?$'
                         % (PROM_NAME, PROM_LABEL_VALUE, PROM_LABEL_VALUE))
PROM_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)=%s' % PROM_LABEL_VALUE)


def parse_prometheus(test, text):
    """Check text line by line against the text exposition format; return {(name, labels): value}."""
    test.assertTrue(text.endswith('\n'))
    helped, typed, finished = set(), {}, set()
    current = None
    samples = {}
    for line in text.splitlines():
        m = re.match(r'^# HELP (%s) (.*)$' % PROM_NAME, line)
        if m:
            test.assertNotIn(m.group(1), helped, line)
            test.assertNotIn(m.group(1), typed, 'HELP after TYPE: ' + line)
            helped.add(m.group(1))
            continue
        m = re.match(r'^# TYPE (%s) (counter|gauge|histogram|summary|untyped)$' % PROM_NAME, line)
        if m:
            test.assertNotIn(m.group(1), typed, line)
            test.assertIn(m.group(1), helped, 'TYPE without HELP first: ' + line)
            typed[m.group(1)] = m.group(2)
            if current is not None:
                finished.add(current)
            current = m.group(1)
            continue
        m = PROM_SAMPLE.match(line)
        test.assertIsNotNone(m, 'not a valid sample line: %r' % line)
        name = m.group(1)
        test.assertEqual(name, current, 'sample outside its family block: ' + line)
        test.assertNotIn(name, finished)
        if typed[name] == 'counter':
            test.assertTrue(name.endswith('_total'), line)
        labels = tuple((k, v.replace('\\"', '"').replace('\\n', '\n').replace('\\\\', '\\'))
                       for k, v in PROM_LABEL.findall(m.group(2) or ''))
        key = (name, labels)
        test.assertNotIn(key, samples, 'duplicate series: ' + line)
        samples[key] = float(m.group(5))
    return samples


# ---------------------------------------------------------------------------

class AuthTest(AdminCase):

    def test_missing_credentials(self):
        resp = self.fetch('/running.txt', user=None)
        self.assertEqual(resp.status, 401)
        self.assertEqual(resp.headers['WWW-Authenticate'], 'Basic realm="pydirector"')
        self.assertEqual(resp.body, 'ERROR credentials needed\n')

    def test_malformed_credentials(self):
        for header in ('Basic !!!not-base64!!!', 'Basic ' + base64.b64encode(b'no colon').decode(),
                       'Bearer abc', 'Basic'):
            resp = self.fetch('/running.txt', user=None, headers={'Authorization': header})
            self.assertEqual(resp.status, 401, header)
            self.assertEqual(resp.headers['WWW-Authenticate'], 'Basic realm="pydirector"')

    def test_wrong_password_and_unknown_user(self):
        mark = LOG.mark()
        self.assertEqual(self.fetch('/running.txt', password='wrong').status, 401)
        self.assertEqual(self.fetch('/running.txt', user='nobody', source='127.0.0.2').status, 401)
        LOG.wait_for("admin: bad credentials for user admin from 127.0.0.1", mark)
        LOG.wait_for("admin: bad credentials for user nobody from 127.0.0.2", mark)

    def test_readonly_user_reads_but_cannot_change(self):
        self.assertEqual(self.fetch('/running.txt', user='viewer').status, 200)
        self.assertEqual(self.fetch('/metrics', user='viewer').status, 200)
        resp = self.fetch('/hostAdminDown', 'POST', {'service': 'web', 'group': 'main', 'name': 'n1'}, user='viewer')
        self.assertEqual((resp.status, resp.body), (403, 'ERROR user viewer has read-only access\n'))
        resp = self.fetch('/closeLog', method='POST', body={}, user='viewer')
        self.assertEqual(resp.status, 403)
        self.assertEqual(self.host('n1')['admin'], 'enabled')

    def test_successful_checks_are_cached(self):
        calls = []
        real = pydirector_admin.check_password

        def counting(password, stored):
            calls.append(stored)
            return real(password, stored)

        self.fetch('/running.txt')  # admin's own check is cached before counting starts
        pydirector_admin.check_password = counting
        try:
            self.change('/addUser?name=cached&password=x%20y&access=readonly')
            for _ in range(3):
                self.assertEqual(self.fetch('/running.txt', user='cached', password='x y').status, 200)
            self.assertEqual(len(calls), 1)
            # A changed password is a new stored hash: the old cache entry no longer matches.
            self.change('/addUser?name=cached&password=other&access=readonly')
            self.assertEqual(self.fetch('/running.txt', user='cached', password='x y').status, 401)
            self.assertEqual(self.fetch('/running.txt', user='cached', password='other').status, 200)
            self.change('/delUser?name=cached')
            self.assertEqual(self.fetch('/running.txt', user='cached', password='other').status, 401)
        finally:
            pydirector_admin.check_password = real

    def test_legacy_crypt_hash(self):
        try:
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter('ignore', DeprecationWarning)
                import crypt
        except ImportError:
            self.skipTest('no crypt module in this Python (removed in 3.13): legacy hashes cannot verify')
        stored = crypt.crypt('old secret', crypt.mksalt(crypt.METHOD_SHA512))
        if not stored or not stored.startswith('$6$'):
            self.skipTest('this libc crypt() lacks SHA-512')
        self.bal.call(self.bal.director.add_user, 'legacy', stored, 'full')
        try:
            self.assertEqual(self.fetch('/running.txt', user='legacy', password='old secret').status, 200)
            self.assertEqual(self.fetch('/running.txt', user='legacy', password='old secreT').status, 401)
        finally:
            self.bal.call(self.bal.director.del_user, 'legacy')


# ---------------------------------------------------------------------------

class ChangeTest(AdminCase):

    def test_add_and_delete_host(self):
        backend = Backend(support.say_name, 'n3')
        self.addCleanup(backend.close)
        body = self.change('/addHost?service=web&group=main&name=n3&ip=%s&weight=2&maxconns=5' % backend.address)
        self.assertEqual(body, 'OK added host n3 (%s) to web/main\n' % backend.address)
        h = self.host('n3')
        self.assertEqual((h['ip'], h['weight'], h['maxconns'], h['state']), (backend.address, 2, 5, 'up'))
        wait_until(lambda: exchange(self.bal.port()) == b'n3')  # it takes traffic
        self.change('/addHost?service=web&group=main&name=n3&ip=%s' % backend.address, 409)
        self.change('/delHost?service=web&group=main&ip=%s' % backend.address)
        self.assertNotIn('n3', self.hosts())
        self.change('/delHost?service=web&group=main&name=n3', 404)

    def test_add_host_errors(self):
        self.change('/addHost?service=nope&group=main&name=x&ip=127.0.0.1:9', 404)
        self.change('/addHost?service=web&group=nope&name=x&ip=127.0.0.1:9', 404)
        self.change('/addHost?service=web&group=main&name=x', 400)
        self.change('/addHost?service=web&group=main&name=x&ip=', 400)
        self.change('/addHost?service=web&group=main&name=x&ip=nocolon', 400)
        self.change('/addHost?service=web&group=main&name=x&ip=127.0.0.1:9&weight=heavy', 400)
        self.change('/addHost?service=web&group=main&name=x&ip=127.0.0.1:9&colour=red', 400)
        self.change('/addHost?service=web&group=main&name=x&name=y&ip=127.0.0.1:9', 400)
        self.change('/addHost?service=web&group=main&name=a%0Ab&ip=127.0.0.1:9', 400)
        self.change('/addHost?service=web&group=main&name=a%E2%80%A8b&ip=127.0.0.1:9', 400)
        self.change('/addHost?service=web&group=main&name=%FF&ip=127.0.0.1:9', 400)
        self.assertNotIn('x', self.hosts())

    def test_add_host_refuses_what_the_config_refuses(self):
        # Bug 1 of the structure issue: these were added, and running.xml then failed to load.
        for ip, why in (('*:80', "ip '*:80': '*' is for listening; a host needs an address"),
                        ('[::]:80', "ip '[::]:80': '::' means any address, for listening; a host needs an address"),
                        ('0.0.0.0:80', "ip '0.0.0.0:80': '0.0.0.0' means any address, for listening; "
                                       "a host needs an address")):
            body = self.change('/addHost?' + urllib.parse.urlencode(
                {'service': 'web', 'group': 'main', 'name': 'x', 'ip': ip}), 400)
            self.assertEqual(body, 'ERROR %s\n' % why)
        self.assertNotIn('x', self.hosts())
        pydirector.parse_config(self.fetch('/running.xml').body, 'running.xml')   # still loads
        # The config file says the same, word for word (one validator).
        with self.assertRaises(pydirector.ConfigError) as cm:
            pydirector.parse_config('<pdconfig><service name="s"><listen ip="*:1"/><group name="g" '
                                    'scheduler="random"><host name="x" ip="[::]:80"/></group></service>'
                                    '</pdconfig>', 'x.xml')
        self.assertEqual(str(cm.exception), "x.xml:1: <host> ip '[::]:80': '::' means any address, for "
                                            "listening; a host needs an address")

    def test_control_characters_cannot_forge_log_lines(self):
        mark = LOG.mark()
        body = self.change('/addHost?service=web&group=main&name=x%0Dforged%0Aline&ip=127.0.0.1:9', 400)
        self.assertEqual(body, 'ERROR parameter name contains control characters\n')
        lines = LOG.since(mark)
        self.assertTrue(any('refused (400)' in l for l in lines), lines)
        self.assertFalse(any('\n' in l or '\r' in l for l in lines), lines)

    def test_del_host_refuses_last_host_of_enabled_group(self):
        self.change('/newGroup?service=web&group=solo&scheduler=random')
        self.change('/addHost?service=web&group=solo&name=only&ip=%s' % self.s1.address)
        self.change('/enableGroup?service=web&group=solo')
        try:
            body = self.change('/delHost?service=web&group=solo&name=only', 409)
            self.assertIn('last host of the enabled group', body)
            self.change('/delAllHosts?service=web&group=solo', 409)
            self.change('/delGroup?service=web&group=solo', 409)
        finally:
            self.change('/enableGroup?service=web&group=main')
        self.change('/delAllHosts?service=web&group=solo')
        self.assertEqual(self.hosts('solo'), [])
        self.change('/delGroup?service=web&group=solo')
        self.assertIsNone(self.hosts('solo'))
        self.change('/delGroup?service=web&group=solo', 404)

    def test_new_group_errors(self):
        self.change('/newGroup?service=web&group=main&scheduler=random', 409)
        self.change('/newGroup?service=web&group=g2&scheduler=bogus', 400)
        self.change('/newGroup?service=nope&group=g2&scheduler=random', 404)
        self.change('/newGroup?service=web&group=g2', 400)

    def test_enable_group(self):
        self.assertIn(exchange(self.bal.port()), (b'n1', b'n2'))
        body = self.change('/enableGroup?service=web&group=spare')
        self.assertEqual(body, 'OK enabled group spare in service web (was main)\n')
        try:
            self.assertEqual(exchange(self.bal.port()), b's1')
            self.assertIn('group spare enabled', self.fetch('/running.txt').body)
        finally:
            self.change('/enableGroup?service=web&group=main')
        self.change('/enableGroup?service=web&group=nope', 404)

    def test_change_scheduler(self):
        body = self.change('/changeScheduler?service=web&group=spare&scheduler=roundrobin,sticky')
        self.assertIn('roundrobin,sticky', body)
        self.assertIn('Group spare (inactive) &mdash; scheduler roundrobin,sticky', self.fetch('/running').body)
        self.change('/changeScheduler?service=web&group=spare&scheduler=nonsense', 400)
        self.change('/changeScheduler?service=web&group=spare&scheduler=leastconns')

    def test_drain_and_undrain(self):
        self.change('/hostAdminDown?service=web&group=main&name=n2')
        try:
            self.assertEqual(self.host('n2')['state'], 'draining')
            # A drained host still shows its open and total connections.
            total = self.host('n2')['total']
            self.assertIn('disabled n2 %s draining - 0 %d\n' % (self.n2.address, total),
                          self.fetch('/running.txt').body)
            self.assertEqual({exchange(self.bal.port()) for _ in range(4)}, {b'n1'})
        finally:
            self.change('/hostAdminUp?service=web&group=main&name=n2')
        self.assertEqual(self.host('n2')['state'], 'up')
        self.change('/hostAdminDown?service=web&group=main&name=zz', 404)

    def test_retry_host(self):
        body = self.change('/retryHost?service=web&group=main&name=dead')
        self.assertEqual(body, 'OK probing host dead in web/main now\n')
        self.change('/retryHost?service=web&group=main', 400)

    def test_users(self):
        self.change('/addUser?name=ops&password=pw&access=full')
        self.assertEqual(self.fetch('/running.txt', user='ops', password='pw').status, 200)
        self.change('/addUser?name=ops&password=pw&access=root', 400)
        self.change('/addUser?name=ops&access=full', 400)
        self.change('/delUser?name=ops')
        self.change('/delUser?name=ops', 404)
        body = self.change('/delUser?name=admin', 409)
        self.assertIn('last full-access user', body)
        self.assertIn('<td>admin</td><td>full</td>', self.fetch('/running').body)

    def test_close_log(self):
        self.assertEqual(self.change('/closeLog'), 'OK log reopened\n')
        self.change('/closeLog?now=1', 400)

    def test_post_form(self):
        resp = self.fetch('/hostAdminDown', method='POST', body={'service': 'web', 'group': 'main', 'name': 'n1'})
        self.assertEqual(resp.status, 200, resp)
        self.assertEqual(self.host('n1')['admin'], 'draining')
        resp = self.fetch('/hostAdminUp', method='POST', body={'service': 'web', 'group': 'main', 'name': 'n1'})
        self.assertEqual(resp.status, 200, resp)
        self.assertEqual(self.host('n1')['admin'], 'enabled')

    def test_post_body_limits(self):
        resp = self.fetch('/closeLog', method='POST', body='{"a": 1}', headers={'Content-Type': 'application/json'})
        self.assertEqual(resp.status, 415)
        resp = self.fetch('/closeLog', method='POST', body='a=' + 'x' * 70000,
                          headers={'Content-Type': 'application/x-www-form-urlencoded'})
        self.assertEqual(resp.status, 413)
        answer = self.raw(b'POST /closeLog HTTP/1.1\r\nHost: x\r\nAuthorization: ' +
                          basic('admin', PASSWORD).encode() + b'\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n')
        self.assertTrue(answer.startswith(b'HTTP/1.0 411 '), answer)

    def test_browser_gets_redirected_with_the_result(self):
        browser = {'Accept': 'text/html,application/xhtml+xml,*/*;q=0.8'}
        resp = self.fetch('/hostAdminDown', 'POST', {'service': 'web', 'group': 'main', 'name': 'n1'},
                          headers=browser)
        self.assertEqual(resp.status, 303)
        location = resp.headers['Location']
        self.assertEqual(location, '/running?msg=OK+draining+host+n1+in+web%2Fmain+%280+open%29')
        self.assertIn('<p class="msg ok">OK draining host n1 in web/main (0 open)</p>', self.fetch(location).body)
        resp = self.fetch('/hostAdminUp', method='POST', headers=browser,
                          body={'service': 'web', 'group': 'main', 'name': 'n1'})
        self.assertEqual(resp.status, 303)
        resp = self.fetch('/hostAdminUp', 'POST', {'service': 'web', 'group': 'main', 'name': '<b>'},
                          headers=browser)
        self.assertEqual(resp.status, 303)
        page = self.fetch(resp.headers['Location']).body
        self.assertIn('<p class="msg error">ERROR no host &#x27;&lt;b&gt;&#x27; in web/main</p>', page)


# ---------------------------------------------------------------------------
# Issue 4: explain, reload, switches with drain/rollback, PROXY hosts, health timeline

class ExplainTest(AdminCase):

    def service(self):
        return service_xml(None, groups=[
            ('main', 'hash', [('n1', self.n1.address), ('n2', self.n2.address),
                              ('dead', '127.0.0.1:%d' % self.dead_port)]),
            ('spare', 'roundrobin,sticky', [('s1', self.s1.address)]),
        ], enable='main', extra='    <deny cidr="10.9.0.0/16"/>\n')

    def wait_dead_down(self):
        """Under hash a client only tries the hosts of its own ring order, so
        connect from a loopback address whose order starts with dead."""
        for last in range(2, 255):
            client = '127.0.0.%d' % last
            if self.explain_json(client)['ranking'][0][0] == 'dead':
                break
        else:
            self.fail('no client in 127.0.0.2-254 has dead first')

        def down():
            with socket.create_connection(('127.0.0.1', self.bal.port()), timeout=10,
                                          source_address=(client, 0)) as sock:
                sock.shutdown(socket.SHUT_WR)
                support.recv_all(sock)
            return self.host('dead')['health'] == 'down'
        wait_until(down, 5)

    def explain_json(self, client, service='web', user='admin'):
        resp = self.fetch('/explain?service=%s&client=%s&format=json' % (service, client), user=user)
        self.assertEqual(resp.status, 200, resp)
        self.assertEqual(resp.headers['Content-Type'], 'application/json')
        return json.loads(resp.body)

    def test_text_one_fact_per_line(self):
        self.wait_dead_down()
        before = self.bal.snapshot()
        resp = self.fetch('/explain?service=web&client=10.1.2.3', user='viewer')  # reading: read-only is enough
        self.assertEqual((resp.status, resp.headers['Content-Type']), (200, 'text/plain; charset=utf-8'))
        info = self.explain_json('10.1.2.3')
        # The director's own answer, line by line.
        self.assertEqual(resp.body.splitlines(), [
            'service: web', 'client: 10.1.2.3', 'allowed: yes', 'group: main', 'scheduler: hash',
            'host: %s %s' % (info['host'], info['address']),
            'reason: ' + info['reason'],
            'sticky: none',
            'ranking: ' + ', '.join('%s %s' % (name, pydirector_admin.explain_number(score))
                                    for name, score in info['ranking']),
            'skipped: dead (down: %s)' % self.bal.host('dead')['reason'],   # why it is down, too
        ])
        self.assertIn(info['host'], ('n1', 'n2'))
        # The host is the first of the client's ranking that is not down.
        self.assertEqual([name for name, _ in info['ranking'] if name != 'dead'][0], info['host'])
        # Where it says the client goes is where it goes (hash: same client, same host).
        self.assertEqual(set(n for n, _ in info['ranking']), {'n1', 'n2', 'dead'})
        after = self.bal.snapshot()
        for snap in (before, after):
            steady(snap)
        self.assertEqual(before, after)  # explain changes nothing

    def test_denied_client(self):
        resp = self.fetch('/explain?service=web&client=10.9.0.1')
        lines = resp.body.splitlines()
        self.assertEqual(lines[2], "allowed: no, denied by the service's allow/deny rules")
        self.assertRegex(lines[5], r'^host: none \(if allowed: n[12] 127\.0\.0\.1:\d+\)$')
        self.assertFalse(self.explain_json('10.9.0.1')['allowed'])
        # IPv4-mapped IPv6 clients match IPv4 rules.
        self.assertFalse(self.explain_json('::ffff:10.9.0.1')['allowed'])

    def test_sticky_entry(self):
        self.change('/enableGroup?service=web&group=spare')
        try:
            self.assertEqual(support.exchange(self.bal.port()), b's1')
            lines = self.fetch('/explain?service=web&client=127.0.0.1').body.splitlines()
        finally:
            self.change('/enableGroup?service=web&group=main')
        self.assertEqual(lines[3:5], ['group: spare', 'scheduler: roundrobin,sticky'])
        self.assertRegex(lines[7], r'^sticky: s1, expires in \d+(\.\d+)? s$')
        self.assertNotIn('ranking', ' '.join(lines))

    def test_errors(self):
        self.assertEqual(self.fetch('/explain?service=nope&client=10.0.0.1').status, 404)
        resp = self.fetch('/explain?service=web&client=not-an-ip')
        self.assertEqual(resp.status, 400)
        self.assertIn('client must be an IP address', resp.body)
        self.assertEqual(self.fetch('/explain?service=web').status, 400)
        self.assertEqual(self.fetch('/explain?service=web&client=10.0.0.1&format=xml').status, 400)
        self.assertEqual(self.fetch('/explain?service=web&client=10.0.0.1', method='POST', body={}).status, 405)

    def test_linked_from_running(self):
        parser = FormParser()
        parser.feed(self.fetch('/running').body)
        self.assertIn(('/explain', 'get', {'service': 'web', 'client': ''}), parser.forms)


class ReloadTest(AdminCase):

    def setUp(self):
        BalancerCase.setUp(self)
        self.backends()
        self.dir = tempfile.mkdtemp(prefix='pydirector-reload-')
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, 'reload.xml')
        self.listen = free_port()
        self.admin = admin_xml()
        self.write(service_xml([('n1', self.n1.address)], listen_port=self.listen))
        with open(self.path) as f:
            self.bal = self.start(f.read(), path=self.path)
        self.start_admin()

    def write(self, service):
        with open(self.path, 'w') as f:
            f.write(config_xml(service + self.admin))

    def test_reload(self):
        self.assertEqual(self.change('/reload'), 'OK reloaded %s: no changes\n' % self.path)
        self.write(service_xml([('n1', self.n1.address), ('n2', self.n2.address)], listen_port=self.listen))
        mark = LOG.mark()
        body = self.change('/reload', method='POST', body={})
        self.assertTrue(body.startswith('OK reloaded %s: ' % self.path), body)
        self.assertIn('n2', body)
        self.assertEqual(self.hosts(), ['n1', 'n2'])
        LOG.wait_for('admin: user admin from 127.0.0.1: reloaded %s: ' % self.path, mark)
        self.assertIsNotNone(json.loads(self.fetch('/running.json').body)['reloaded'])

    def test_config_xml_is_the_file_as_last_loaded_read_on_the_loop(self):
        # Bug 4: the admin thread read it while a reload rewrote it on the loop.  Now it
        # is what the last reload loaded, read on the loop thread.
        self.write(service_xml([('n1', self.n1.address), ('n2', self.n2.address)], listen_port=self.listen))
        self.change('/reload')
        self.assertEqual(self.fetch('/config.xml').body, pydirector.load_config(self.path).to_xml())
        director = self.bal.director
        threads = []
        real = director.loaded_config_xml

        def recording():
            threads.append(threading.get_ident())
            return real()
        director.loaded_config_xml = recording
        self.addCleanup(delattr, director, 'loaded_config_xml')
        self.assertEqual(self.fetch('/config.xml').status, 200)
        self.assertEqual(threads, [director.loop.thread_ident])

    def test_invalid_file_changes_nothing(self):
        before = self.fetch('/running.xml').body
        with open(self.path, 'w') as f:
            f.write('<pdconfig>\n  <service name="web">\n</pdconfig>\n')
        try:
            body = self.change('/reload', 400)
            self.assertRegex(body, r'^ERROR %s:\d+: ' % re.escape(self.path))
            self.assertEqual(self.fetch('/running.xml').body, before)
        finally:
            self.write(service_xml([('n1', self.n1.address)], listen_port=self.listen))
            self.change('/reload')

    def test_needs_full_access(self):
        self.assertEqual(self.fetch('/reload', 'POST', {}, user='viewer').status, 403)
        self.change('/reload?now=1', 400)


class SwitchTest(AdminCase):
    """enableGroup with drain and rollback; the pending switch on the pages."""

    def test_bad_drain_and_rollback(self):
        # The config file's own rule for seconds: '1e3' and '1.' pass there, so here too.
        for value in ('-1', 'abc', 'inf', 'nan', '86401', '1e9', '%2B5'):
            body = self.change('/enableGroup?service=web&group=spare&drain=%s' % value, 400)
            self.assertEqual(body, "ERROR drain %r: must be a number of seconds >= 0 and <= 86400\n"
                             % urllib.parse.unquote(value))
            self.change('/enableGroup?service=web&group=spare&rollback=%s' % value, 400)
        self.assertEqual(self.bal.snapshot()['services'][0]['enabled'], 'main')

    def test_drain_deadline_shown(self):
        body = self.change('/enableGroup?service=web&group=spare&drain=30')
        try:
            self.assertEqual(body, 'OK enabled group spare in service web (was main); '
                                   'connections left on main close in 30 s\n')
            switch = json.loads(self.fetch('/running.json').body)['services'][0]['switch']
            self.assertEqual((switch['from'], switch['to'], switch['rollback_until']), ('main', 'spare', None))
            self.assertAlmostEqual(switch['drain_until'], time.time() + 30, delta=10)
            page = self.fetch('/running').body
            self.assertRegex(page, r'<p class="msg switch">Switching from group main to group spare: connections '
                                   r'still on main are closed at [0-9: -]+ \(in (29|30)s\)\.</p>')
        finally:
            self.change('/enableGroup?service=web&group=main')
        self.assertIsNone(json.loads(self.fetch('/running.json').body)['services'][0]['switch'])
        self.assertNotIn('Switching from', self.fetch('/running').body)

    def test_rollback_deadline_shown(self):
        # A group with no host up: the switch waits for one, or goes back.
        self.change('/newGroup?service=web&group=dark&scheduler=roundrobin')
        self.addCleanup(self.change, '/delGroup?service=web&group=dark')
        self.change('/addHost?service=web&group=dark&name=d1&ip=127.0.0.1:%d' % self.dead_port)
        self.change('/hostAdminDown?service=web&group=dark&name=d1')
        body = self.change('/enableGroup', method='POST',
                           body={'service': 'web', 'group': 'dark', 'drain': '', 'rollback': '60', 'force': '1'})
        try:
            self.assertIn('back to main unless a host is up within 60 s', body)
            page = self.fetch('/running').body
            self.assertRegex(page, r'Switching from group main to group dark: back to main at [0-9: -]+ '
                                   r'\(in (59|60)s\) unless a host of dark is up by then\.')
        finally:
            self.change('/enableGroup?service=web&group=main')


class ProxyHostTest(AdminCase):

    def test_add_host_with_send_proxy(self):
        self.change('/addHost?service=web&group=spare&name=p2&ip=127.0.0.1:9&send_proxy=v2')
        self.addCleanup(self.change, '/delHost?service=web&group=spare&name=p2')
        self.assertEqual(self.host('p2')['send_proxy'], 'v2')
        self.assertIn('<host name="p2" ip="127.0.0.1:9" send_proxy="v2"/>', self.fetch('/running.xml').body)
        self.assertIn('<td>127.0.0.1:9 <span class="note">(sends PROXY v2)</span></td>', self.fetch('/running').body)
        body = self.change('/addHost?service=web&group=spare&name=p3&ip=127.0.0.1:9&send_proxy=v3', 400)
        self.assertEqual(body, "ERROR send_proxy 'v3': must be 'v1' or 'v2'\n")
        # The page's form sends an empty value for "no PROXY header".
        self.change('/addHost', method='POST', body={'service': 'web', 'group': 'spare', 'name': 'p4',
                                                     'ip': '127.0.0.1:10', 'weight': '', 'maxconns': '',
                                                     'send_proxy': ''})
        self.addCleanup(self.change, '/delHost?service=web&group=spare&name=p4')
        self.assertIsNone(self.host('p4')['send_proxy'])


class UserHashTest(AdminCase):

    def test_add_user_with_a_hash(self):
        stored = pydirector.hash_password('from a file', iterations=1000)
        self.change('/addUser', method='POST', body={'name': 'copied', 'password_hash': stored, 'access': 'readonly'})
        self.addCleanup(self.change, '/delUser?name=copied')
        self.assertEqual(self.fetch('/running.txt', user='copied', password='from a file').status, 200)
        self.assertIn('password="%s"' % stored, self.fetch('/running.xml').body)
        body = self.change('/addUser?name=x&password_hash=plaintext&access=full', 400)
        self.assertIn("user 'x': password must be a hash", body)
        body = self.change('/addUser?name=x&password=a&password_hash=%s&access=full' % urllib.parse.quote(stored), 400)
        self.assertEqual(body, 'ERROR give password or password_hash (one of them)\n')
        self.assertNotIn('x', [u['name'] for u in self.bal.snapshot()['users']])


class TimelineTest(AdminCase):

    def test_running_page_and_json(self):
        self.wait_dead_down()
        snap = json.loads(self.fetch('/running.json').body)
        dead = [h for h in snap['services'][0]['groups'][0]['hosts'] if h['name'] == 'dead'][0]
        self.assertEqual([(c['from'], c['to'], c['why']) for c in dead['timeline']],
                         [('up', 'down', 'connection refused')])
        self.assertIsNotNone(dead['next_probe'])  # a down host is probed
        n1 = [h for h in snap['services'][0]['groups'][0]['hosts'] if h['name'] == 'n1'][0]
        self.assertEqual((n1['timeline'], n1['next_probe']), ([], None))  # up, and no <check>: not probed
        page = self.fetch('/running').body
        self.assertRegex(page, r'<td class="checks">next probe in \d+s<br>down \d+s in all<details><summary>1 change, '
                               r'last \d+s ago</summary>'
                               r'<ol class="timeline"><li>[0-9: -]+ up&rarr;down: connection refused</li></ol>'
                               r'</details></td>')
        self.assertIn('<td class="checks"><span class="note">no probe planned</span><br>'
                      '<span class="note">no state changes</span></td>', page)
        # Draining is a state change too, newest first on the page.
        self.change('/hostAdminDown?service=web&group=main&name=n2')
        self.change('/hostAdminUp?service=web&group=main&name=n2')
        page = self.fetch('/running').body
        self.assertRegex(page, r'<td class="checks"><span class="note">no probe planned</span><details>'
                               r'<summary>2 changes, last \d+s ago</summary><ol class="timeline">'
                               r'<li>[0-9: -]+ draining&rarr;up: by admin</li>'
                               r'<li>[0-9: -]+ up&rarr;draining: by admin</li></ol></details></td>')

    def test_metrics(self):
        self.wait_dead_down()
        samples = parse_prometheus(self, self.fetch('/metrics').body)
        web = (('service', 'web'),)
        self.assertEqual(samples[('pydirector_service_open_connections', web)], 0)
        self.assertEqual(samples[('pydirector_service_queued', web)], 0)
        self.assertEqual(samples[('pydirector_service_denied_total', web)], 0)
        self.assertEqual(samples[('pydirector_service_maxconns', web)], 0)
        dead = (('service', 'web'), ('group', 'main'), ('host', 'dead'), ('address', '127.0.0.1:%d' % self.dead_port))
        n1 = (('service', 'web'), ('group', 'main'), ('host', 'n1'), ('address', self.n1.address))
        snap = self.bal.snapshot()
        host = [h for h in snap['services'][0]['groups'][0]['hosts'] if h['name'] == 'dead'][0]
        self.assertAlmostEqual(samples[('pydirector_host_last_state_change_timestamp_seconds', dead)],
                               host['timeline'][-1]['when'], places=2)
        self.assertTrue(0 <= samples[('pydirector_host_next_probe_seconds', dead)] <= 5.0)
        self.assertNotIn(('pydirector_host_next_probe_seconds', n1), samples)  # not probed: no sample

    def test_state_changes_counter_from_a_count(self):
        # Only a true count makes the counter: the timeline is capped, a counter must not be.
        snap = self.bal.snapshot()
        text = pydirector_admin.render_metrics(snap)
        self.assertIn('pydirector_host_state_changes_total', text)
        for service in snap['services']:
            for group in service['groups']:
                for host in group['hosts']:
                    host['state_changes'] = 12
        samples = parse_prometheus(self, pydirector_admin.render_metrics(snap))
        n1 = (('service', 'web'), ('group', 'main'), ('host', 'n1'), ('address', self.n1.address))
        self.assertEqual(samples[('pydirector_host_state_changes_total', n1)], 12)

class CrossSiteTest(AdminCase):
    """A change a browser makes for another site is refused; the admin's own pages are not."""

    def refused(self, headers, method='POST'):
        body = {'service': 'web', 'group': 'main', 'name': 'n1'}
        resp = self.fetch('/hostAdminDown', method=method, body=body, headers=headers)
        self.assertEqual(resp.status, 403, (headers, resp))
        self.assertIn('cross-site request refused', resp.body)
        self.assertEqual(self.host('n1')['admin'], 'enabled')

    def test_sec_fetch_site(self):
        self.refused({'Sec-Fetch-Site': 'cross-site'})
        self.refused({'Sec-Fetch-Site': 'same-site'}, 'POST')

    def test_origin_and_referer(self):
        self.refused({'Origin': 'http://evil.example'}, 'POST')
        self.refused({'Origin': 'null'}, 'POST')
        self.refused({'Origin': 'http://127.0.0.1:%d' % (self.port + 1)})
        self.refused({'Referer': 'http://evil.example/page.html'})
        self.refused({'Referer': 'http://127.0.0.1:%d.evil.example/' % self.port})
        self.refused({'Origin': 'http://127.0.0.1:%d' % self.port, 'Host': 'other.example:%d' % self.port})

    def test_same_origin_passes(self):
        own = 'http://127.0.0.1:%d' % self.port
        for headers in ({'Origin': own, 'Sec-Fetch-Site': 'same-origin'},
                        {'Referer': own + '/running?refresh=5'}, {'Sec-Fetch-Site': 'none'}):
            self.change('/hostAdminDown', method='POST', headers=headers,
                        body={'service': 'web', 'group': 'main', 'name': 'n1'})
            self.change('/hostAdminUp?service=web&group=main&name=n1', headers=headers)

    def test_reading_is_not_checked(self):
        resp = self.fetch('/running.txt', headers={'Sec-Fetch-Site': 'cross-site', 'Origin': 'http://evil.example'})
        self.assertEqual(resp.status, 200)


class EscapingTest(AdminCase):

    def test_script_host_name_is_escaped(self):
        self.change('/addHost', method='POST', body={'service': 'web', 'group': 'spare', 'name': '<script>',
                                                     'ip': '127.0.0.1:9'})
        self.change('/addHost', method='POST', body={'service': 'web', 'group': 'spare',
                                                     'name': 'x" onmouseover="alert(1)', 'ip': '127.0.0.1:10'})
        try:
            page = self.fetch('/running').body
            self.assertIn('<td>&lt;script&gt;</td>', page)
            # The page's own script is the one there is.
            self.assertEqual(page.count('<script>'), 1)
            self.assertIn('<script>%s</script>' % pydirector_admin.CONFIRM_SCRIPT, page)
            self.assertIn('value="x&quot; onmouseover=&quot;alert(1)"', page)
            self.assertNotIn('" onmouseover="', page)
            # running.txt fields never hold whitespace.
            self.assertIn('host x"_onmouseover="alert(1) 127.0.0.1:10 0 0', self.fetch('/running.txt').body)
        finally:
            self.change('/delHost?service=web&group=spare&name=%3Cscript%3E')
            self.change('/delHost?service=web&group=spare&name=x%22+onmouseover%3D%22alert%281%29')

    def test_message_is_escaped(self):
        page = self.fetch('/running?msg=%3Cimg+src%3Dx%3E').body
        self.assertIn('<p class="msg error">&lt;img src=x&gt;</p>', page)
        self.assertEqual(self.fetch('/running?msg=a%0Ab').status, 400)


# ---------------------------------------------------------------------------

class LimitsTest(AdminCase):

    def auth_line(self):
        return b'Authorization: ' + basic('admin', PASSWORD).encode() + b'\r\n'

    def test_long_request_line_is_414(self):
        answer = self.raw(b'GET /' + b'a' * 9000 + b' HTTP/1.1\r\nHost: x\r\n\r\n')
        self.assertTrue(answer.startswith(b'HTTP/1.0 414 '), answer[:100])

    def test_oversized_headers_are_431(self):
        answer = self.raw(b'GET / HTTP/1.1\r\nX-Big: ' + b'b' * 9000 + b'\r\n\r\n')
        self.assertTrue(answer.startswith(b'HTTP/1.0 431 '), answer[:100])
        answer = self.raw(b'GET / HTTP/1.1\r\n' + b''.join(b'X-%d: y\r\n' % i for i in range(101)) + b'\r\n')
        self.assertTrue(answer.startswith(b'HTTP/1.0 431 '), answer[:100])
        answer = self.raw(b'GET / HTTP/1.1\r\n' + b''.join(b'X-%d: %s\r\n' % (i, b'z' * 4000) for i in range(9))
                          + b'\r\n')
        self.assertTrue(answer.startswith(b'HTTP/1.0 431 '), answer[:100])

    def test_malformed_request_is_400(self):
        self.assertTrue(self.raw(b'GARBAGE\r\n\r\n').startswith(b'HTTP/1.0 400 '))
        self.assertIn(b'ERROR Bad request version', self.raw(b'GET / HTTP/9x\r\n\r\n'))
        answer = self.raw(b'GET / HTTP/1.1\r\nHost: x\r\n')  # no blank line: cut short
        self.assertTrue(answer.startswith(b'HTTP/1.0 400 '), answer)

    def test_refused_before_the_request_ends(self):
        # A request the handler refuses on what came so far is answered then, with the
        # client still connected and sending, not at the deadline.
        auth = self.auth_line()
        for data, status in ((b'GET /' + b'a' * 9000, 414), (b'GARBAGE\r\n', 400),
                             (b'GET / HTTP/1.1\r\nX-Big: ' + b'b' * 9000, 431),
                             (b'POST /closeLog HTTP/1.1\r\n' + auth + b'Content-Length: 70000\r\n\r\n', 413)):
            with self.subTest(status=status), socket.create_connection(('127.0.0.1', self.port), timeout=5) as sock:
                sock.sendall(data)
                answer = support.recv_all(sock)
                self.assertTrue(answer.startswith(b'HTTP/1.0 %d ' % status), answer[:100])

    def test_request_in_pieces(self):
        # Head and body come in many reads; no worker is spent until the last byte.
        body = urllib.parse.urlencode({'service': 'web', 'group': 'main', 'name': 'n1'}).encode()
        data = (b'POST /hostAdminDown HTTP/1.0\r\n' + self.auth_line() +
                b'Content-Type: application/x-www-form-urlencoded\r\nContent-Length: %d\r\n\r\n' % len(body) + body)
        wait_until(lambda: self.server.open_connections() == 0)
        with socket.create_connection(('127.0.0.1', self.port), timeout=5) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for start in range(0, len(data) - 1, 16):
                sock.sendall(data[start:min(start + 16, len(data) - 1)])
            wait_until(lambda: self.pending(sock) is not None and len(self.pending(sock).data) == len(data) - 1)
            self.assertEqual(self.server.busy, 0)
            sock.sendall(data[-1:])
            answer = support.recv_all(sock)
        self.addCleanup(self.change, '/hostAdminUp?service=web&group=main&name=n1')
        self.assertTrue(answer.startswith(b'HTTP/1.0 200 '), answer)
        self.assertTrue(answer.endswith(b'\r\n\r\nOK draining host n1 in web/main (0 open)\n'), answer)

    def test_trickling_client_is_cut_at_the_deadline(self):
        self.server.connection_deadline = 1.0
        self.addCleanup(setattr, self.server, 'connection_deadline', pydirector_admin.CONNECTION_DEADLINE)
        sock = socket.create_connection(('127.0.0.1', self.port), timeout=5)
        self.addCleanup(sock.close)
        sock.sendall(b'GET /running.txt HTTP/1.1\r\n')
        started = time.monotonic()
        sock.settimeout(0.2)

        def cut():
            try:
                sock.sendall(b'X')  # one byte at a time: each read succeeds, so only the deadline helps
                return sock.recv(100) == b''
            except socket.timeout:
                return False
            except OSError:
                return True
        wait_until(cut, 10, interval=0.1)
        self.assertLess(time.monotonic() - started, 10.0)   # its 1 s deadline, not the default 30 s
        self.assertEqual(self.fetch('/running.txt').status, 200)

    def test_silent_client_times_out(self):
        self.server.request_timeout = 0.3
        self.addCleanup(setattr, self.server, 'request_timeout', pydirector_admin.REQUEST_TIMEOUT)
        sock = socket.create_connection(('127.0.0.1', self.port), timeout=9)
        with sock:
            started = time.monotonic()
            self.assertEqual(sock.recv(100), b'')
            self.assertLess(time.monotonic() - started, 8.0)    # its 0.3 s, not the default 10 s

    def test_connection_cap(self):
        # Idle and slow clients fill every place for a connection still sending its
        # request: a new one closes the oldest of them, never itself, so the
        # operator gets in.
        wait_until(lambda: self.server.open_connections() == 0)  # earlier requests are done
        self.addCleanup(setattr, self.server, 'max_pending', self.server.max_pending)
        self.server.max_pending = 2
        held = []
        for data in (b'', b'GET /running.txt HTTP/1.1\r\nX-Slow: ', b''):
            sock = socket.create_connection(('127.0.0.1', self.port), timeout=5)
            self.addCleanup(sock.close)
            sock.sendall(data)
            held.append(sock)
            wait_until(lambda: self.pending(sock) is not None and len(self.pending(sock).data) == len(data))
        self.assertEqual(held[0].recv(100), b'')    # the oldest, closed for the third
        started = time.monotonic()
        self.assertEqual(self.fetch('/running.txt').status, 200)
        self.assertLess(time.monotonic() - started, 5.0)    # let in at once, not after a deadline
        self.assertEqual(held[1].recv(100), b'')    # the oldest then, closed for the operator
        self.assertIsNotNone(self.pending(held[2]))  # which came after
        held[2].sendall(b'GET /running.txt HTTP/1.0\r\nAuthorization: ' + basic('admin', PASSWORD).encode()
                        + b'\r\n\r\n')
        self.assertTrue(support.recv_all(held[2]).startswith(b'HTTP/1.0 200 '))

    def test_busy_workers_answer_503(self):
        # Every worker busy (on a stuck loop) and the queue full: a further request
        # is told so at once instead of hanging; the queued one is answered later.
        # One with credentials that passed before goes first, past a full queue (to
        # twice its size): an operator is never behind a flood of others.
        self.fetch('/running.txt')  # credentials cached, so each request waits on the loop once
        # The worker of that fetch may still be closing its connection: with one worker
        # allowed, a request arriving meanwhile would be queued behind it, and the next
        # one refused, so the counts below would never be seen.  Start from idle.
        wait_until(lambda: self.server.busy == 0 and self.server.open_connections() == 0)
        for name in ('max_workers', 'max_queued', 'loop_timeout'):
            self.addCleanup(setattr, self.server, name, getattr(self.server, name))
            setattr(self.server, name, 1)
        # The stuck loop must outlast the test: a worker that gave up on it (503) would
        # take the queued request and empty the queue before the test looked.
        self.server.loop_timeout = 60
        release = threading.Event()
        self.addCleanup(release.set)
        self.bal.director.loop.call_soon_threadsafe(release.wait, 60)
        answers = collections.OrderedDict()

        def fetch(name, **kwargs):
            response = self.fetch('/running.txt', timeout=90, **kwargs)
            with lock:
                answers[name] = response
        lock = threading.Lock()
        threads = [threading.Thread(target=fetch, args=('answered',)),
                   threading.Thread(target=fetch, args=('queued',), kwargs={'user': 'viewer'}),
                   threading.Thread(target=fetch, args=('operator',))]
        threads[0].start()
        wait_until(lambda: len(self.server.answering) == 1)     # the first is in its worker
        threads[1].start()                                      # (viewer's credentials: not checked yet)
        wait_until(lambda: len(self.server.queue) == 1)
        started = time.monotonic()
        refused = self.fetch('/running.txt', user=None)
        self.assertLess(time.monotonic() - started, 30)   # at once, not when the loop is back
        self.assertEqual((refused.status, refused.body), (503, 'ERROR the admin server is busy; try again\n'))
        self.assertEqual(refused.headers['X-Content-Type-Options'], 'nosniff')
        self.assertEqual(refused.headers['Content-Type'], 'text/plain; charset=utf-8')
        threads[2].start()
        wait_until(lambda: len(self.server.queue) == 2)
        # The operator's went first in line (the order the answers reach the client
        # threads is the scheduler's, not the server's).
        self.assertIn(basic('admin', PASSWORD).encode(), self.server.queue[0].data)
        self.assertIn(basic('viewer', PASSWORD).encode(), self.server.queue[1].data)
        self.assertEqual(self.fetch('/running.txt').status, 503)     # the queue at twice its size
        release.set()
        for thread in threads:
            thread.join(10)
        self.assertEqual(dict((name, r.status) for name, r in answers.items()),
                         {'answered': 200, 'operator': 200, 'queued': 200})

    def test_stuck_loop_is_503(self):
        self.fetch('/running.txt')  # credentials cached, so only the snapshot waits on the loop
        release = threading.Event()
        self.server.loop_timeout = 0.3
        self.bal.director.loop.call_soon_threadsafe(release.wait, 5)
        try:
            resp = self.fetch('/running.txt')
        finally:
            release.set()
            self.server.loop_timeout = pydirector_admin.LOOP_TIMEOUT
        self.assertEqual((resp.status, resp.body), (503, 'ERROR the balancer is busy; try again\n'))
        wait_until(lambda: self.fetch('/running.txt').status == 200)

    def test_bug_is_500_logged_once_and_nothing_on_stderr(self):
        def broken():
            raise RuntimeError('boom')
        director = self.bal.director
        director.close_log = broken
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                resp = self.fetch('/closeLog', 'POST', {})
                self.fetch('/running.txt')
                self.raw(b'GET / HTTP/1.1\r\n')  # cut short
        finally:
            del director.close_log
        self.assertEqual((resp.status, resp.body), (500, 'ERROR internal error (logged)\n'))
        tracebacks = self.take_tracebacks()
        self.assertEqual(len(tracebacks), 1, tracebacks)
        self.assertIn('RuntimeError: boom', tracebacks[0])
        self.assertEqual(stderr.getvalue(), '')

    def test_https(self):
        if not shutil.which('openssl'):
            self.skipTest('openssl command not found: cannot make a test certificate')
        tmp = tempfile.mkdtemp(prefix='pydirector-tls-')
        self.addCleanup(shutil.rmtree, tmp)
        cert, key = os.path.join(tmp, 'cert.pem'), os.path.join(tmp, 'key.pem')
        subprocess.check_call(['openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', key,
                               '-out', cert, '-days', '2', '-subj', '/CN=localhost',
                               '-addext', 'subjectAltName=IP:127.0.0.1'],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        a = self.admin_config
        server = pydirector_admin.start(self.bal.director, pydirector.Admin(
                                        a.listen, a.host, 0, a.users, certfile=cert, keyfile=key))
        self.addCleanup(server.stop)
        port = server.server_address[1]
        context = ssl.create_default_context(cafile=cert)
        # A client that stops halfway through its hello, and one that stops halfway
        # through its request, hold no worker and do not hold up the next one.
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        with self.assertRaises(ssl.SSLWantReadError):
            context.wrap_bio(incoming, outgoing, server_hostname='127.0.0.1').do_handshake()
        hello = outgoing.read()
        silent = socket.create_connection(('127.0.0.1', port))
        self.addCleanup(silent.close)
        silent.sendall(hello[:len(hello) // 2])
        slow = context.wrap_socket(socket.create_connection(('127.0.0.1', port), timeout=5),
                                   server_hostname='127.0.0.1')
        self.addCleanup(slow.close)
        slow.sendall(b'GET /running.txt HTTP/1.0\r\nAuthorization: ' + basic('admin', PASSWORD).encode() + b'\r\n')
        wait_until(lambda: self.pending(silent, server) is not None and self.pending(slow, server) is not None)
        self.assertEqual(server.busy, 0)
        conn = http.client.HTTPSConnection('127.0.0.1', port, timeout=5, context=context)
        conn.request('GET', '/running.txt', headers={'Authorization': basic('admin', PASSWORD)})
        resp = conn.getresponse()
        self.assertEqual(resp.status, 200)
        self.assertIn(b'service web', resp.read())
        conn.close()
        slow.sendall(b'\r\n')
        answer = support.recv_all(slow)
        self.assertTrue(answer.startswith(b'HTTP/1.0 200 '), answer[:100])
        # Plain HTTP to the TLS port fails cleanly, without a traceback.
        mark = LOG.mark()
        self.raw(b'GET / HTTP/1.0\r\n\r\n', port=port)
        self.assertFalse([l for l in LOG.since(mark) if l.startswith('TRACEBACK')])


# ---------------------------------------------------------------------------

class TrafficTest(AdminCase):
    """Changes under real traffic: open connections finish, new ones follow the change."""

    def backends(self):
        self.e1 = self.backend(name_then_echo, 'e1')
        self.e2 = self.backend(name_then_echo, 'e2')
        self.b1 = self.backend(name_then_echo, 'b1')

    def service(self):
        return service_xml(None, groups=[
            ('main', 'roundrobin', [('e1', self.e1.address), ('e2', self.e2.address)]),
            ('blue', 'roundrobin', [('b1', self.b1.address)]),
        ], enable='main')

    def open_client(self):
        sock = support.connect(self.bal.port())
        self.addCleanup(sock.close)
        f = sock.makefile('rb')
        self.addCleanup(f.close)
        name = f.readline().strip().decode()
        return sock, f, name

    def ping(self, sock, f, data=b'ping\n'):
        sock.sendall(data)
        self.assertEqual(f.readline(), data)

    def test_del_host_with_open_connections(self):
        pairs_before = self.bal.open_pairs()
        clients = [self.open_client() for _ in range(4)]
        on_e1 = [c for c in clients if c[2] == 'e1']
        # Round robin: 2 of 4 (with workers, each rotating on its own, at least 2).
        self.assertGreaterEqual(len(on_e1), 2, [c[2] for c in clients])
        e3 = Backend(name_then_echo, 'e3')
        self.addCleanup(e3.close)
        self.change('/addHost?service=web&group=main&name=e3&ip=%s' % e3.address)
        self.addCleanup(self.change, '/delHost?service=web&group=main&name=e3')
        body = self.change('/delHost?service=web&group=main&name=e1')
        self.addCleanup(self.change, '/addHost?service=web&group=main&name=e1&ip=%s' % self.e1.address)
        self.assertEqual(body, 'OK removed host e1 (%s) from web/main\n' % self.e1.address)
        self.assertNotIn('e1', self.hosts())
        # The open connections to e1 still flow both ways, and finish normally.
        for sock, f, _ in on_e1:
            self.ping(sock, f)
        # New connections never go to e1.
        self.assertEqual({self.open_client()[2] for _ in range(4)}, {'e2', 'e3'})
        for sock, f, _ in on_e1:
            sock.shutdown(socket.SHUT_WR)
            self.assertEqual(f.read(), b'')
        wait_until(lambda: self.bal.open_pairs() == pairs_before + 8 - len(on_e1))
        wait_until(lambda: self.e1.open == 0)

    def test_enable_group_under_load(self):
        held_sock, held_f, held_name = self.open_client()
        self.assertIn(held_name, ('e1', 'e2'))
        results = []
        errors = []
        stop = threading.Event()

        def load():
            for _ in range(5000):
                if stop.is_set():
                    return
                started = time.monotonic()
                try:
                    answer = exchange(self.bal.port(), b'x')
                except OSError as e:
                    errors.append(e)
                    continue
                results.append((started, answer))

        thread = threading.Thread(target=load, daemon=True)
        thread.start()
        try:
            wait_until(lambda: len(results) >= 20, 10)
            self.change('/enableGroup?service=web&group=blue')
            switched = time.monotonic()
            wait_until(lambda: any(t > switched for t, _ in results), 10)
            wait_until(lambda: len([1 for t, _ in list(results) if t > switched]) >= 20, 10)
        finally:
            stop.set()
            thread.join(10)
            self.change('/enableGroup?service=web&group=main')
        self.assertEqual(errors, [])
        before = [a for t, a in results if t < switched]
        after = [a for t, a in results if t > switched]
        self.assertTrue(set(before) <= {b'e1\nx', b'e2\nx', b'b1\nx'}, set(before))
        self.assertIn(b'e1\nx', before)
        self.assertEqual(set(after), {b'b1\nx'})
        # The connection opened before the switch still flows to its old host.
        self.ping(held_sock, held_f)


# ---------------------------------------------------------------------------

def tool_env(home):
    """A clean environment for wget/curl: no proxies, no rc files of the user running the tests."""
    return {'PATH': os.environ.get('PATH', '/usr/bin:/bin'), 'HOME': home, 'LC_ALL': 'C'}


class ToolsTest(AdminCase):
    """The scripted workflow with the real tools: add a host, see it, drain it, delete it."""

    def run_tool(self, args):
        home = tempfile.mkdtemp(prefix='pydirector-tool-')
        self.addCleanup(shutil.rmtree, home)
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=tool_env(home))
        out, err = proc.communicate(timeout=20)
        return proc.returncode, out.decode(), err.decode()

    def wget(self, path, *extra):
        return self.run_tool(['wget', '-q', '-O', '-', '--user=admin', '--password=' + PASSWORD] + list(extra) +
                             [self.base + path])

    def curl(self, path, *extra):
        return self.run_tool(['curl', '-q', '-sS', '--fail', '-u', 'admin:' + PASSWORD] + list(extra) +
                             [self.base + path])

    def test_wget_workflow(self):
        if not shutil.which('wget'):
            self.skipTest('wget not on PATH (CI installs it)')
        backend = Backend(support.say_name, 'w1')
        self.addCleanup(backend.close)
        q = 'service=web&group=main&name=w1'
        rc, out, err = self.wget('/addHost', '--post-data=%s&ip=%s' % (q, backend.address))
        self.assertEqual((rc, out), (0, 'OK added host w1 (%s) to web/main\n' % backend.address), err)
        rc, out, err = self.wget('/running.txt')
        self.assertEqual(rc, 0)
        self.assertIn('host w1 %s 0 0 up\n' % backend.address, out)
        rc, out, err = self.wget('/hostAdminDown', '--post-data=' + q)
        self.assertEqual((rc, out), (0, 'OK draining host w1 in web/main (0 open)\n'))
        self.assertIn('disabled w1 %s draining - 0 0\n' % backend.address, self.wget('/running.txt')[1])
        rc, out, err = self.wget('/delHost', '--post-data=' + q)
        self.assertEqual((rc, out), (0, 'OK removed host w1 (%s) from web/main\n' % backend.address))
        self.assertNotIn('w1', self.wget('/running.txt')[1])
        # Failures exit non-zero (wget: 8 = the server answered with an error); the reason
        # shows only with --content-on-error, as the README has it.
        self.assertEqual(self.wget('/delHost', '--post-data=' + q)[:2], (8, ''))
        rc, out, err = self.wget('/delHost', '--content-on-error', '--post-data=' + q)
        self.assertEqual((rc, out), (8, "ERROR no host 'w1' in web/main\n"))
        # A change as a plain GET (1.0's style) is refused unless <admin get_changes="on">.
        rc, out, err = self.run_tool(['wget', '-O', '-', '--content-on-error', '--user=admin',
                                      '--password=' + PASSWORD, self.base + '/hostAdminDown?' + q])
        self.assertEqual(rc, 8)
        self.assertIn('ERROR changes are POST requests: wget --post-data=', out)
        rc, out, err = self.run_tool(['wget', '-q', '-O', '-', '--user=admin', '--password=wrong',
                                      self.base + '/running.txt'])
        self.assertEqual(rc, 6)  # 6 = authentication failure

    def test_curl_workflow(self):
        if not shutil.which('curl'):
            self.skipTest('curl not on PATH (CI installs it)')
        backend = Backend(support.say_name, 'c1')
        self.addCleanup(backend.close)
        rc, out, err = self.curl('/addHost', '--data', 'service=web&group=main&name=c1&ip=' + backend.address)
        self.assertEqual((rc, out), (0, 'OK added host c1 (%s) to web/main\n' % backend.address), err)
        self.assertIn('host c1 %s 0 0 up\n' % backend.address, self.curl('/running.txt')[1])
        self.assertEqual(self.curl('/hostAdminDown', '-d', 'service=web&group=main&name=c1')[0], 0)
        self.assertIn('disabled c1 %s draining - 0 0\n' % backend.address, self.curl('/running.txt')[1])
        self.assertEqual(self.curl('/delHost', '--data', 'service=web&group=main&name=c1')[0], 0)
        self.assertNotIn('c1', self.curl('/running.txt')[1])
        rc, out, err = self.curl('/delHost', '-d', 'service=web&group=main&name=c1')
        self.assertEqual(rc, 22)  # --fail: HTTP status >= 400
        self.assertIn('404', err)
        # Without --fail a script still sees the reason.
        rc, out, err = self.run_tool(['curl', '-q', '-sS', '-u', 'admin:' + PASSWORD, '-d',
                                      'service=web&group=main&name=c1', self.base + '/delHost'])
        self.assertEqual(out, "ERROR no host 'c1' in web/main\n")


class CommandLineTest(BalancerCase):
    """`python3 pydirector.py -c FILE` with <admin>: the module runs as __main__ there."""

    def test_refusals_and_shutdown(self):
        backend = Backend(support.say_name, 'p1')
        self.addCleanup(backend.close)
        listen, admin_port = free_port(), free_port()
        xml = config_xml(service_xml([('p1', backend.address)], listen_port=listen) + admin_xml(admin_port))
        proc = support.BalancerProcess(xml, wait_port=admin_port)
        self.addCleanup(proc.close)
        self.assertEqual(exchange(listen), b'p1')

        def fetch(path):
            conn = http.client.HTTPConnection('127.0.0.1', admin_port, timeout=10)
            path, _, query = path.partition('?')
            conn.request('POST' if query else 'GET', path, query or None, headers={
                'Authorization': basic('admin', PASSWORD), 'Content-Type': 'application/x-www-form-urlencoded'})
            resp = conn.getresponse()
            body = resp.read().decode()
            conn.close()
            return resp.status, body

        # A refusal is the director's AdminError, not a 500 from a second copy of the module.
        self.assertEqual(fetch('/delHost?service=web&group=main&name=nope'),
                         (404, "ERROR no host 'nope' in web/main\n"))
        self.assertEqual(fetch('/delHost?service=web&group=main&name=p1'),
                         (409, 'ERROR refusing to remove the last host of the enabled group main\n'))
        self.assertIn('host p1 %s 0 1' % backend.address, fetch('/running.txt')[1])
        proc.signal(signal.SIGTERM)
        self.assertEqual(proc.wait(), 0)
        output = proc.output()
        self.assertIn('admin listening on http://127.0.0.1:%d' % admin_port, output)
        self.assertNotIn('Traceback', output)


class FormParser(html.parser.HTMLParser):
    """The POST forms of a page: [(action, {field: value})], from hidden and visible inputs."""

    def __init__(self):
        html.parser.HTMLParser.__init__(self)
        self.forms = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == 'form':
            self.forms.append((attrs.get('action'), attrs.get('method'), {}))
        elif tag == 'input' and self.forms and 'name' in attrs:
            self.forms[-1][2][attrs['name']] = attrs.get('value', '')


CHROMIUM = '/usr/bin/chromium'


class ChromiumTest(AdminCase):
    """/running in a real headless browser; the enable-group button's form POSTed as the browser would."""

    def dump_dom(self, path):
        profile = tempfile.mkdtemp(prefix='pydirector-chromium-')
        self.addCleanup(shutil.rmtree, profile, True)
        url = 'http://admin:%s@127.0.0.1:%d%s' % (urllib.parse.quote(PASSWORD, safe=''), self.port, path)
        proc = subprocess.Popen([CHROMIUM, '--headless', '--no-sandbox', '--disable-gpu',
                                 '--disable-background-networking', '--disable-component-update',
                                 '--disable-sync', '--no-first-run', '--user-data-dir=' + profile,
                                 '--dump-dom', url], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        return out.decode('utf-8')

    def test_enable_group_from_the_page(self):
        if not os.path.exists(CHROMIUM):
            self.skipTest('%s not installed (CI installs Debian chromium)' % CHROMIUM)
        dom = self.dump_dom('/running')
        self.assertIn('<h2>Service web</h2>', dom)
        parser = FormParser()
        parser.feed(dom)
        forms = [f for f in parser.forms if f[0] == '/enableGroup']
        self.assertEqual(len(forms), 1, parser.forms)
        action, method, fields = forms[0]
        self.assertEqual((method, fields), ('post', {'service': 'web', 'group': 'spare', 'drain': '',
                                                     'rollback': ''}))
        # Submit it with the headers Chromium sends for a same-origin form POST.
        own = 'http://127.0.0.1:%d' % self.port
        resp = self.fetch(action, method='POST', body=fields, headers={
            'Origin': own, 'Referer': own + '/running', 'Sec-Fetch-Site': 'same-origin',
            'Sec-Fetch-Mode': 'navigate', 'Accept': 'text/html,application/xhtml+xml,*/*;q=0.8'})
        self.assertEqual(resp.status, 303)
        try:
            self.assertEqual(exchange(self.bal.port()), b's1')
            dom = self.dump_dom(resp.headers['Location'])
            self.assertIn('<p class="msg ok">OK enabled group spare in service web (was main)</p>', dom)
            self.assertIn('Group spare <span class="enabled">(enabled)</span>', dom)
        finally:
            self.change('/enableGroup?service=web&group=main')


# The pages and changes again with a master and two worker processes: the admin of
# the master shows their sums and answers once every worker has made a change.
# (The admin server's own suites, Auth, CrossSite, Escaping and Limits, are the
# same code either way.)

class ReadingWorkersTest(WorkersMixin, ReadingTest):
    pass


class ChangeWorkersTest(WorkersMixin, ChangeTest):
    pass


class ExplainWorkersTest(WorkersMixin, ExplainTest):
    pass


class ReloadWorkersTest(WorkersMixin, ReloadTest):
    pass


class SwitchWorkersTest(WorkersMixin, SwitchTest):
    pass


class ProxyHostWorkersTest(WorkersMixin, ProxyHostTest):
    pass


class TimelineWorkersTest(WorkersMixin, TimelineTest):
    pass


class TrafficWorkersTest(WorkersMixin, TrafficTest):
    pass


class ToolsWorkersTest(WorkersMixin, ToolsTest):
    pass


if __name__ == '__main__':
    unittest.main()
