"""TLS routed by server name on a shared listen address (issue 13): the balancer
reads each client's ClientHello, picks the service by its name and relays the
stream untouched, so the backend does the handshake with its own certificate.

Backends are real TLS servers (Python ssl), each with its own self-signed
certificate made by the test; clients are openssl s_client, curl and Python
ssl.  Each test asserts which certificate the client saw and the bytes end to
end; the bad-input tests assert that each client is closed, counted and logged
once, and that no backend is ever contacted."""

import json
import os
import shutil
import socket
import ssl
import sys
import tempfile
import unittest
import urllib.error
import urllib.request

import support
from support import (LOG, Backend, TLSBackend, connect, echo, free_port, recv_all, say_name,
                     tls_connect, tls_exchange, wait_until)
import random

from test_sni import extension, fixtures, hello, hello_body, length_fields, message, mutate, records, server_name_ext

import pydirector
import pydirector_admin

BIG = bytes(range(256)) * 256       # 64 KiB


def service(name, sni, hosts, port, host='127.0.0.1', listen_attrs='', extra=''):
    """One <service> on host:port with sni; hosts: [(name, address, attrs)]."""
    address = '[%s]:%d' % (host, port) if ':' in host else '%s:%d' % (host, port)
    lines = ''.join('      <host name="%s" ip="%s" %s/>\n' % (h[0], h[1], h[2] if len(h) > 2 else '')
                    for h in hosts)
    return ('  <service name="%s">\n    <listen ip="%s" sni="%s" %s/>\n'
            '    <group name="main" scheduler="roundrobin">\n%s    </group>\n%s  </service>\n'
            % (name, address, sni, listen_attrs, lines, extra))


def config(*services, **kw):
    return '<pdconfig>\n%s%s</pdconfig>\n' % (''.join(services), kw.get('tail', ''))


def closed_by_peer(sock, timeout=10):
    """True when the peer closed (EOF or reset) without sending a byte."""
    sock.settimeout(timeout)
    try:
        return recv_all(sock) == b''
    except ConnectionResetError:
        return True


def record_until_eof(conn, backend):
    """Keep every byte up to the client's EOF in backend.received, then answer 'ok'."""
    data = recv_all(conn)
    with backend.lock:
        backend.received.append(data)
    conn.sendall(b'ok')


class ProxiedTLSBackend(TLSBackend):
    """A TLS backend behind send_proxy: reads the PROXY header a byte at a time (so
    the TLS bytes after it stay in the kernel for ssl), keeps it, then does TLS."""

    def __init__(self, *args, **kwargs):
        self.proxy_headers = []
        TLSBackend.__init__(self, *args, **kwargs)

    def _serve_tls(self, conn, backend):
        header = b''
        while True:
            byte = conn.recv(1)
            if not byte:
                return
            header += byte
            result = pydirector.parse_proxy_header(header, 'any')
            if result is not None:
                break
        with self.lock:
            self.proxy_headers.append(result[1:])
        TLSBackend._serve_tls(self, conn, backend)


class SniCase(support.BalancerCase):
    """Helpers: a balancer per test, its address's counters and access lines; after
    each test no client may be left reading its hello either."""

    def own(self, thing):
        """A backend (or anything with close()) closed after the test."""
        self.addCleanup(thing.close)
        return thing

    def start(self, xml, path=None):
        balancer = support.BalancerCase.start(self, xml, path=path)
        self.addCleanup(self.check_no_readers, balancer)
        return balancer

    def check_no_readers(self, balancer):
        if balancer.thread.is_alive() and balancer.director.loop.running:   # not stopped by the test
            wait_until(lambda: balancer.call(lambda: len(balancer.director.hellos)) == 0, 5,
                       message='clients left reading their hello')

    def connect(self, port):
        sock = connect(port)
        self.addCleanup(sock.close)
        return sock

    def address_counters(self, index=0):
        return self.balancer.snapshot()['sni'][index]

    def forget_log_times(self):
        """As if a second had passed since each kind was last logged (the rate limit)."""
        def forget():
            for service in self.balancer.director.services.values():
                for listener in service.listeners:
                    listener.logged.clear()
        self.balancer.call(forget)

    def access_lines(self, text='access '):
        return [line for line in LOG.since(self.mark) if line.startswith('access ') and text in line]

    def access_line(self, client_port):
        return wait_until(lambda: self.access_lines(' client=127.0.0.1:%d ' % client_port))[0]


# ---------------------------------------------------------------------------

class ThreeServicesTest(SniCase):
    """api, www and a default service on one port, each with its own TLS backend."""

    def setUp(self):
        SniCase.setUp(self)
        self.api = self.own(TLSBackend(['api.example.com'], say_name))
        self.www = self.own(TLSBackend(['www.example.com'], say_name))
        self.other = self.own(TLSBackend(['other.example'], say_name))
        self.port = free_port()
        self.start(config(
            service('api', 'api.example.com,*.api.example.com', [('a1', self.api.address)], self.port),
            service('www', 'www.example.com, Example.COM.', [('w1', self.www.address)], self.port),
            service('other', '*', [('o1', self.other.address)], self.port)))

    def test_one_socket_for_three_services(self):
        director = self.balancer.director
        listeners = self.balancer.call(lambda: [s.listeners for s in director.services.values()])
        self.assertEqual([len(l) for l in listeners], [1, 1, 1])
        self.assertTrue(listeners[0][0] is listeners[1][0] is listeners[2][0])
        self.assertEqual(self.balancer.port('api'), self.port)

    def test_each_name_lands_on_its_service(self):
        for name, cert in [('api.example.com', 'api.example.com'), ('v1.api.example.com', 'api.example.com'),
                           ('a.b.api.example.com', 'api.example.com'), ('www.example.com', 'www.example.com'),
                           ('example.com', 'www.example.com'), ('EXAMPLE.com.', 'www.example.com'),
                           ('mail.example.com', 'other.example'), ('example.org', 'other.example')]:
            with self.subTest(name=name):
                self.assertEqual(tls_exchange(self.port, server_hostname=name), (cert, cert.encode()))
        self.assertEqual(self.api.server_names, ['api.example.com', 'v1.api.example.com', 'a.b.api.example.com'])
        self.assertEqual(self.www.server_names, ['www.example.com', 'example.com', 'EXAMPLE.com.'])
        self.assertEqual(self.other.server_names, ['mail.example.com', 'example.org'])
        snapshot = self.balancer.snapshot()
        self.assertEqual([(s['name'], s['accepted']) for s in snapshot['services']],
                         [('api', 3), ('www', 3), ('other', 2)])

    def test_a_hello_without_a_name_goes_to_the_default(self):
        self.assertEqual(tls_exchange(self.port), ('other.example', b'other.example'))
        self.assertEqual(support.openssl_client(self.port), 'other.example')
        self.assertEqual(self.other.server_names, [None, None])

    def test_openssl_and_curl(self):
        self.backend_handlers(support.https_say_name)
        for name, cert in [('www.example.com', 'www.example.com'), ('v9.api.example.com', 'api.example.com'),
                           ('nowhere.example.net', 'other.example')]:
            with self.subTest(name=name):
                self.assertEqual(support.openssl_client(self.port, name), cert)
                self.assertEqual(support.curl_client(self.port, name), (cert, cert.encode()))

    def backend_handlers(self, handler):
        for backend in (self.api, self.www, self.other):
            backend.tls_handler = handler

    def test_64k_echoed_through_tls(self):
        self.backend_handlers(echo)
        for name, cert in [('api.example.com', 'api.example.com'), ('www.example.com', 'www.example.com'),
                           (None, 'other.example')]:
            with self.subTest(name=name):
                self.assertEqual(tls_exchange(self.port, BIG, name, expect=len(BIG)), (cert, BIG))

    def test_access_lines_carry_the_name(self):
        tls, cert = tls_connect(self.port, 'v2.api.example.com')
        client_port = tls.getsockname()[1]
        self.assertEqual(tls.recv(100), b'api.example.com')
        tls.close()
        line = self.access_line(client_port)
        self.assertRegex(line, r'^access service=api client=127\.0\.0\.1:%d sni=v2\.api\.example\.com host=a1 '
                               r'backend=127\.0\.0\.1:%d failovers=0 bytes_in=[0-9]+ bytes_out=[0-9]+ '
                               r'duration=[0-9.]+ end=\S+$' % (client_port, self.api.port))
        tls, cert = tls_connect(self.port)
        client_port = tls.getsockname()[1]
        tls.close()
        self.assertIn(' sni=- host=o1 ', self.access_line(client_port))

    def test_pages(self):
        snapshot = self.balancer.snapshot()
        self.assertEqual(snapshot['services'][0]['listens'],
                         [{'ip': '127.0.0.1:%d' % self.port, 'sni': ['api.example.com', '*.api.example.com'],
                           'accept_proxy': None}])
        entry = snapshot['sni'][0]
        self.assertEqual(entry['address'], '127.0.0.1:%d' % self.port)
        self.assertEqual(entry['names'], [['api.example.com', 'api'], ['example.com', 'www'],
                                          ['www.example.com', 'www'], ['*.api.example.com', 'api'],
                                          ['*', 'other']])
        self.assertEqual(entry['hello_timeout'], 3.0)
        text = pydirector_admin.render_running_txt(snapshot)
        self.assertIn('service api 127.0.0.1:%d main\nsni 127.0.0.1:%d api.example.com,*.api.example.com\n'
                      % (self.port, self.port), text)
        self.assertIn('sni 127.0.0.1:%d www.example.com,example.com\n' % self.port, text)
        page = pydirector_admin.render_running(snapshot, 'admin', True)
        self.assertIn('Listening on 127.0.0.1:%d (sni api.example.com, *.api.example.com)' % self.port, page)
        self.assertIn('<tr><td>*.api.example.com</td><td>api</td></tr>', page)
        self.assertIn('<input type="hidden" name="listen" value="127.0.0.1:%d">' % self.port, page)


class ExplainTest(SniCase):
    """Explain, given a server name: which service and why, then which host."""

    def setUp(self):
        SniCase.setUp(self)
        self.port = free_port()
        self.start(config(
            service('api', 'api.example.com,*.api.example.com', [('a1', '127.0.0.1:1001')], self.port),
            service('deep', '*.eu.api.example.com', [('d1', '127.0.0.1:1002')], self.port),
            service('plain', 'x', [('p1', '127.0.0.1:1003')], free_port()).replace(' sni="x"', '')))
        self.listen = '127.0.0.1:%d' % self.port

    def explain(self, *args, **kwargs):
        return self.balancer.call(self.balancer.director.explain, *args, **kwargs)

    def test_by_listen(self):
        for name, service, pattern, why in [
                ('api.example.com', 'api', 'api.example.com',
                 "server name 'api.example.com' is claimed exactly by service api on %s"),
                ('V1.Api.Example.COM.', 'api', '*.api.example.com',
                 "server name 'v1.api.example.com' matches '*.api.example.com' of service api on %s "
                 "(exact names first, then the longest '*.' suffix, then '*')"),
                ('fr.eu.api.example.com', 'deep', '*.eu.api.example.com',
                 "server name 'fr.eu.api.example.com' matches '*.eu.api.example.com' of service deep on %s "
                 "(exact names first, then the longest '*.' suffix, then '*')")]:
            with self.subTest(name=name):
                info = self.explain(None, '10.0.0.1', sni=name, listen=self.listen)
                self.assertEqual((info['service'], info['sni_pattern'], info['sni_reason']),
                                 (service, pattern, why % self.listen))
                self.assertEqual(info['host'], service[0] + '1')
        info = self.explain(None, '10.0.0.1', sni='example.org', listen='127.0.0.1:%d' % self.port)
        self.assertEqual((info['service'], info['host']), (None, None))
        self.assertEqual(info['reason'], "no service on %s takes server name 'example.org', and none has '*': "
                                         "the client is closed before any backend is contacted" % self.listen)
        info = self.explain(None, '10.0.0.1', listen=self.listen)
        self.assertIn('a hello without a server name, and none has', info['reason'])
        text = pydirector_admin.render_explain(info)
        self.assertTrue(text.startswith('service: none\nclient: 10.0.0.1\nlisten: %s\n'
                                        'sni: none (a hello without a server name)\nsni match: no service'
                                        % self.listen), text)

    def test_by_service(self):
        info = self.explain('deep', '10.0.0.1', sni='v1.api.example.com')
        self.assertEqual((info['service'], info['host'], info['listen']), ('api', 'a1', self.listen))
        text = pydirector_admin.render_explain(info)
        self.assertIn('\nsni: v1.api.example.com\nsni match: server name', text)
        self.assertIn('\nhost: a1 127.0.0.1:1001\n', text)
        info = self.explain('plain', '10.0.0.1', sni='api.example.com')
        self.assertEqual(info['service'], 'plain')
        self.assertEqual(info['sni_reason'], "the listens of service plain have no sni: the name does not "
                                             "choose its clients' service")
        plain = self.explain('api', '10.0.0.1')     # no name: the service itself, as before
        self.assertEqual((plain['service'], plain['sni_reason']), ('api', None))

    def test_refused(self):
        for args, kwargs, status in [
                ((None, '10.0.0.1'), {}, 400),
                (('api', '10.0.0.1'), {'listen': self.listen}, 400),
                ((None, '10.0.0.1'), {'listen': '127.0.0.1:1'}, 404),
                ((None, '10.0.0.1'), {'listen': 'nonsense'}, 400),
                (('api', '10.0.0.1'), {'sni': 'a..b'}, 400),
                (('api', '10.0.0.1'), {'sni': '*.example.com'}, 400)]:
            with self.subTest(args=args, kwargs=kwargs):
                with self.assertRaises(pydirector.AdminError) as caught:
                    self.explain(*args, **kwargs)
                self.assertEqual(caught.exception.status, status)


class AdminPagesTest(SniCase):
    """/explain, /running.json, /running.txt and /metrics over real HTTP."""

    def setUp(self):
        SniCase.setUp(self)
        self.api = self.own(TLSBackend(['api.example.com'], say_name))
        self.port = free_port()
        password = pydirector.hash_password('pw', iterations=1000)
        self.start(config(service('api', 'api.example.com', [('a1', self.api.address)], self.port),
                          tail='  <admin listen="127.0.0.1:%d">\n    <user name="admin" password="%s" '
                               'access="full"/>\n  </admin>\n' % (free_port(), password)))
        a = self.balancer.config.admin
        server = pydirector_admin.start(self.balancer.director, pydirector.Admin(a.listen, a.host, 0, a.users))
        self.addCleanup(server.stop)
        self.base = 'http://127.0.0.1:%d' % server.server_address[1]
        auth = urllib.request.HTTPBasicAuthHandler()
        auth.add_password('pydirector', self.base, 'admin', 'pw')
        self.opener = urllib.request.build_opener(auth)

    def fetch(self, path):
        with self.opener.open(self.base + path, timeout=10) as resp:
            return resp.read().decode()

    def test_pages(self):
        text = self.fetch('/explain?listen=127.0.0.1:%d&client=10.1.2.3&sni=api.example.com' % self.port)
        self.assertIn("service: api\nclient: 10.1.2.3\nlisten: 127.0.0.1:%d\nsni: api.example.com\n"
                      "sni match: server name 'api.example.com' is claimed exactly by service api" % self.port, text)
        info = json.loads(self.fetch('/explain?service=api&client=10.1.2.3&sni=nope.example.com&format=json'))
        self.assertEqual((info['service'], info['sni']), (None, 'nope.example.com'))
        with self.assertRaises(urllib.error.HTTPError) as caught:
            self.fetch('/explain?client=10.1.2.3&sni=api.example.com')
        self.assertEqual(caught.exception.code, 400)
        self.assertIn('sni 127.0.0.1:%d api.example.com\n' % self.port, self.fetch('/running.txt'))
        running = json.loads(self.fetch('/running.json'))
        self.assertEqual(running['sni'][0]['names'], [['api.example.com', 'api']])
        self.assertIn('(sni api.example.com)', self.fetch('/running'))
        # One client with a name nobody takes, one that is not TLS at all.
        tls_error = (ssl.SSLError, ConnectionResetError, OSError)
        with self.assertRaises(tls_error):
            tls_connect(self.port, 'nobody.example.com')
        self.assertTrue(closed_by_peer(self.send_raw(b'hello?')))
        wait_until(lambda: self.address_counters()['bad']['not-tls'] == 1)
        metrics = self.fetch('/metrics')
        address = 'address="127.0.0.1:%d"' % self.port
        self.assertIn('pydirector_sni_unmatched_total{%s} 1\n' % address, metrics)
        self.assertIn('pydirector_sni_bad_hellos_total{%s,reason="not-tls"} 1\n' % address, metrics)
        self.assertIn('pydirector_sni_bad_hellos_total{%s,reason="timeout"} 0\n' % address, metrics)
        self.assertIn('pydirector_sni_reading{%s} 0\n' % address, metrics)
        self.assertIn('pydirector_service_accepted_total{service="api"} 0\n', metrics)
        self.assertEqual(self.api.accepted, 0)

    def send_raw(self, data):
        sock = self.connect(self.port)
        sock.sendall(data)
        return sock


class LimitsTest(SniCase):
    """Once the hello has chosen the service, its rules hold as for any client."""

    def test_maxconns_and_allow_deny(self):
        api = self.own(TLSBackend(['api.example.com'], echo))
        www = self.own(TLSBackend(['www.example.com'], echo))
        port = free_port()
        self.start(config(
            service('api', 'api.example.com', [('a1', api.address)], port).replace(
                '<service name="api">', '<service name="api" maxconns="1">'),
            service('www', 'www.example.com', [('w1', www.address)], port, extra='    <deny cidr="127.0.0.1"/>\n')))
        held, cert = tls_connect(port, 'api.example.com')
        self.assertEqual(cert, 'api.example.com')
        with self.assertRaises((ssl.SSLError, ConnectionResetError, OSError)):
            tls_connect(port, 'api.example.com')       # over maxconns: closed, never connected
        with self.assertRaises((ssl.SSLError, ConnectionResetError, OSError)):
            tls_connect(port, 'www.example.com')       # denied by www's rules
        wait_until(lambda: len(self.access_lines(' end=full')) == 1 and len(self.access_lines(' end=denied')) == 1)
        self.assertIn(' service=api ', self.access_lines(' end=full')[0])
        self.assertIn(' service=www ', self.access_lines(' end=denied')[0])
        services = {s['name']: s for s in self.balancer.snapshot()['services']}
        self.assertEqual((services['api']['refused'], services['www']['denied']), (1, 1))
        self.assertEqual((api.accepted, www.accepted), (1, 0))
        held.sendall(b'still')
        self.assertEqual(held.recv(100), b'still')
        held.close()


class InternationalNamesTest(SniCase):
    """Names in the config as people write them (U-labels, any case) reach the clients
    that ask for them: clients send A-labels made by UTS #46 non-transitional
    processing (curl with libidn2, browsers), so 'fa\u00df.de' is xn--fa-hia.de, a
    name other than fass.de (issue 25, F8: IDNA 2003 made it fass.de)."""

    def sharp_s(self, *extra):
        """Services fass (fa\u00df.de), default (*) and extra [(name, sni, cert name)] on one port."""
        backends = [('fass', 'FA\u00df.de', 'xn--fa-hia.de'), ('default', '*', 'other.example')] + list(extra)
        port = free_port()
        services = []
        for name, sni, cert in backends:
            backend = self.own(TLSBackend([cert], support.https_say_name))
            services.append(service(name, sni, [(name + '1', backend.address)], port))
        self.start(config(*services))
        return port

    def cert(self, port, name):
        """The name of the certificate Python ssl sees when it sends name."""
        tls, seen = tls_connect(port, name)
        tls.close()
        return seen

    def need_idna2008_ssl(self):
        # The TLS backends and the Python client are Python ssl.
        if sys.version_info < (3, 7):
            self.skipTest("Python 3.6's ssl decodes server names with IDNA 2003 and fails the handshake "
                          "on xn--fa-hia.de or xn--mxa8ab.gr, as client and as server (bpo-28414, fixed in 3.7)")

    def test_curl_sends_the_a_label_of_a_sharp_s(self):
        support.need_curl_idn()
        self.need_idna2008_ssl()
        port = self.sharp_s()
        self.assertEqual(support.curl_client(port, 'fa\u00df.de'), ('xn--fa-hia.de', b'xn--fa-hia.de'))
        self.assertEqual(support.curl_client(port, 'FA\u00df.DE'), ('xn--fa-hia.de', b'xn--fa-hia.de'))
        # fass.de is another name: nobody here claims it.
        self.assertEqual(support.curl_client(port, 'fass.de'), ('other.example', b'other.example'))
        lines = wait_until(lambda: self.access_lines(' sni=') if len(self.access_lines(' sni=')) == 3 else None)
        self.assertEqual([line.split(' sni=')[1].split()[0] for line in lines if ' service=fass ' in line],
                         ['xn--fa-hia.de', 'xn--fa-hia.de'])
        self.assertEqual(len([line for line in lines if ' service=default ' in line and ' sni=fass.de ' in line]), 1)

    def test_python_ssl_with_the_a_label(self):
        self.need_idna2008_ssl()
        port = self.sharp_s()
        for name, cert in [('xn--fa-hia.de', 'xn--fa-hia.de'), ('XN--FA-HIA.de.', 'xn--fa-hia.de'),
                           ('fass.de', 'other.example')]:
            with self.subTest(name=name):
                self.assertEqual(self.cert(port, name), cert)

    def test_deviations_are_names_of_their_own(self):
        """\u00df and a final \u03c2 are kept: fa\u00df.de and fass.de, \u03c3\u03b1\u03c2.gr and \u03c3\u03b1\u03c3.gr are four names."""
        self.need_idna2008_ssl()
        port = self.sharp_s(('ss', 'fass.de', 'fass.de'), ('final', '\u03c3\u03b1\u03c2.gr', 'final'),
                            ('sigma', '\u03a3\u0391\u03a3.gr', 'sigma'))
        for name, cert in [('xn--fa-hia.de', 'xn--fa-hia.de'), ('fass.de', 'fass.de'),
                           ('xn--mxa8ab.gr', 'final'), ('xn--mxa9ab.gr', 'sigma')]:
            with self.subTest(name=name):
                self.assertEqual(self.cert(port, name), cert)
        support.need_curl_idn()
        for name, cert in [('fa\u00df.de', 'xn--fa-hia.de'), ('fass.de', 'fass.de'),
                           ('\u03c3\u03b1\u03c2.gr', 'final'), ('\u03a3\u0391\u03a3.gr', 'sigma')]:
            with self.subTest(name=name):
                self.assertEqual(support.curl_client(port, name)[0], cert)

    def test_explain(self):
        """explain takes a name as written, or any A-label a hello may carry."""
        port = self.sharp_s(('ss', 'fass.de', 'fass.de'))
        for name, sni, service, pattern in [
                ('FA\u00df.de', 'xn--fa-hia.de', 'fass', 'xn--fa-hia.de'),
                ('XN--FA-HIA.de', 'xn--fa-hia.de', 'fass', 'xn--fa-hia.de'),
                ('fass.de', 'fass.de', 'ss', 'fass.de'),
                ('xn--zz-zz.de', 'xn--zz-zz.de', 'default', '*')]:      # not punycode, yet curl sends it
            with self.subTest(name=name):
                info = self.balancer.call(self.balancer.director.explain, None, '10.0.0.1', sni=name,
                                          listen='127.0.0.1:%d' % port)
                self.assertEqual((info['sni'], info['service'], info['sni_pattern']), (sni, service, pattern))

    def test_more_names(self):
        """Upper case, a wildcard over a U-label; curl, openssl and Python ssl agree."""
        support.need_curl_idn()
        port = self.sharp_s(('shop', 'B\u00fccher.example', 'xn--bcher-kva.example'),
                            ('wild', '*.\u00c4rzte.example', 'wild'))
        for name, cert in [('b\u00fccher.example', 'xn--bcher-kva.example'), ('B\u00dcCHER.example', 'xn--bcher-kva.example'),
                           ('www.\u00e4rzte.example', 'wild'), ('a.b.\u00c4RZTE.example', 'wild')]:
            with self.subTest(name=name):
                self.assertEqual(support.curl_client(port, name)[0], cert)
        self.assertEqual(self.cert(port, 'xn--bcher-kva.example'), 'xn--bcher-kva.example')
        self.assertEqual(self.cert(port, 'b\u00fccher.example'), 'xn--bcher-kva.example')   # IDNA 2003 agrees here
        self.assertEqual(support.openssl_client(port, 'xn--bcher-kva.example'), 'xn--bcher-kva.example')


class FailoverTest(SniCase):

    def test_the_first_host_refuses(self):
        good = self.own(TLSBackend(['api.example.com'], echo))
        port = free_port()
        dead = '127.0.0.1:%d' % free_port()
        self.start(config(service('api', 'api.example.com', [('dead', dead), ('good', good.address)], port)))
        tls, cert = tls_connect(port, 'api.example.com')
        client_port = tls.getsockname()[1]
        self.assertEqual(cert, 'api.example.com')
        tls.sendall(b'after failover')
        self.assertEqual(tls.recv(100), b'after failover')
        tls.close()
        self.assertIn(' host=good backend=%s failovers=1 ' % good.address, self.access_line(client_port))
        self.assertEqual(good.server_names, ['api.example.com'])

    def test_every_byte_is_replayed_to_the_next_host(self):
        """The hello and what came with it reach the host that answers, exactly once, in order."""
        recorder = self.own(Backend(record_until_eof))
        port = free_port()
        dead = '127.0.0.1:%d' % free_port()
        self.start(config(service('api', 'api.example.com', [('dead', dead), ('rec', recorder.address)], port)))
        data = hello(b'api.example.com') + b'early data after the hello'
        sock = connect(port)
        sock.sendall(data[:40])     # the hello in two segments: the reader holds the first
        wait_until(lambda: self.balancer.call(lambda: [r.received for r in self.balancer.director.hellos]) == [40])
        sock.sendall(data[40:])
        sock.shutdown(socket.SHUT_WR)
        self.assertEqual(recv_all(sock), b'ok')
        sock.close()
        self.assertEqual(recorder.received, [data])
        self.assertIn(' failovers=1 ', wait_until(lambda: self.access_lines(' sni=api.example.com '))[0])


class IPv6Test(SniCase):

    def setUp(self):
        SniCase.setUp(self)
        probe = socket.socket(socket.AF_INET6)
        try:
            probe.bind(('::1', 0))
        except OSError:
            self.skipTest('no IPv6 loopback here')
        finally:
            probe.close()

    def test_names_on_v6(self):
        api = self.own(TLSBackend(['api.example.com'], support.https_say_name))
        www = self.own(TLSBackend(['www.example.com'], support.https_say_name))
        port = free_port()
        self.start(config(service('api', 'api.example.com', [('a1', api.address)], port, host='::1'),
                          service('www', 'www.example.com,*', [('w1', www.address)], port, host='::1')))
        self.assertEqual(support.openssl_client(port, 'api.example.com', host='::1'), 'api.example.com')
        self.assertEqual(support.curl_client(port, 'www.example.com', host='::1'),
                         ('www.example.com', b'www.example.com'))
        api.tls_handler = www.tls_handler = echo
        self.assertEqual(tls_exchange(port, BIG, 'api.example.com', expect=len(BIG), host='::1'),
                         ('api.example.com', BIG))
        self.assertEqual(tls_exchange(port, b'x', None, expect=1, host='::1'), ('www.example.com', b'x'))
        wait_until(lambda: len(self.access_lines(' client=[::1]:')) == 4)


class ProxyProtocolTest(SniCase):
    """A PROXY-speaking front in front of the shared address, send_proxy behind it."""

    def setUp(self):
        SniCase.setUp(self)
        self.api = self.own(ProxiedTLSBackend(['api.example.com'], echo))
        self.www = self.own(TLSBackend(['www.example.com'], echo))
        self.port = free_port()
        attrs = 'accept_proxy="v2" trusted="127.0.0.0/8"'
        self.start(config(
            service('api', 'api.example.com', [('a1', self.api.address, 'send_proxy="v2"')], self.port,
                    listen_attrs=attrs, extra='    <timeouts connect="0.4"/>\n'),
            service('www', 'www.example.com', [('w1', self.www.address)], self.port, listen_attrs=attrs,
                    extra='    <timeouts connect="0.5"/>\n')))

    def tls_after_header(self, name, source=('203.0.113.7', 4242), dest=('198.51.100.1', 443)):
        sock = connect(self.port)
        sock.sendall(pydirector.proxy_header_v2(source, dest))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        tls = context.wrap_socket(sock, server_hostname=name)
        return tls, support.cert_name(tls.getpeercert(binary_form=True))

    def test_v2_header_then_the_hello(self):
        tls, cert = self.tls_after_header('api.example.com')
        self.assertEqual(cert, 'api.example.com')
        tls.sendall(BIG)
        got = b''
        while len(got) < len(BIG):
            got += tls.recv(65536)
        self.assertEqual(got, BIG)
        tls.close()
        # send_proxy: the host learns the client of the front's header, and where it connected.
        self.assertEqual(self.api.proxy_headers, [(('203.0.113.7', 4242), ('198.51.100.1', 443))])
        line = wait_until(lambda: self.access_lines(' client=203.0.113.7:4242 '))[0]
        self.assertIn(' sni=api.example.com host=a1 ', line)
        tls, cert = self.tls_after_header('www.example.com', ('2001:db8::5', 5555), ('2001:db8::1', 443))
        self.assertEqual(cert, 'www.example.com')
        tls.close()
        wait_until(lambda: self.access_lines(' client=[2001:db8::5]:5555 sni=www.example.com '))

    def test_header_and_hello_in_one_segment(self):
        recorder = self.own(Backend(record_until_eof))
        port = free_port()
        self.start(config(service('rec', 'rec.example.com', [('r1', recorder.address)], port,
                                  listen_attrs='accept_proxy="v1"')))
        data = hello(b'rec.example.com') + b'and more'
        sock = connect(port)
        sock.sendall(b'PROXY TCP4 192.0.2.1 192.0.2.2 1111 443\r\n' + data)
        sock.shutdown(socket.SHUT_WR)
        self.assertEqual(recv_all(sock), b'ok')
        sock.close()
        self.assertEqual(recorder.received, [data])
        wait_until(lambda: self.access_lines(' client=192.0.2.1:1111 sni=rec.example.com host=r1 '))

    def test_bad_and_untrusted_headers(self):
        sock = self.connect(self.port)
        sock.sendall(b'PROXY NONSENSE\r\n')
        self.assertTrue(closed_by_peer(sock))
        wait_until(lambda: self.address_counters()['bad']['bad-proxy'] == 1)
        LOG.wait_for('listen 127.0.0.1:%d: client 127.0.0.1:%d: bad PROXY header: ' % (
            self.port, sock.getsockname()[1]), self.mark)
        sock.close()
        # A hello where the header should be is no header either.
        sock = self.connect(self.port)
        sock.sendall(hello(b'api.example.com'))
        self.assertTrue(closed_by_peer(sock))
        wait_until(lambda: self.address_counters()['bad']['bad-proxy'] == 2)
        # The header alone, then silence: the address's deadline (the longest connect timeout).
        sock = self.connect(self.port)
        sock.sendall(pydirector.proxy_header_v2(('203.0.113.9', 1), ('198.51.100.1', 443)))
        self.assertTrue(closed_by_peer(sock))
        LOG.wait_for('client 203.0.113.9:1: no whole TLS hello within 0.5 s (28 bytes came)', self.mark)
        self.assertEqual(self.address_counters()['bad']['timeout'], 1)
        self.assertEqual((self.api.accepted, self.www.accepted), (0, 0))

    def test_untrusted_peer(self):
        port = free_port()      # a second balancer beside the first
        self.start(config(service('api', 'api.example.com', [('a1', self.api.address)], port,
                                  listen_attrs='accept_proxy="v2" trusted="10.0.0.0/8"')))
        sock = self.connect(port)
        self.assertTrue(closed_by_peer(sock))
        wait_until(lambda: self.address_counters()['bad']['untrusted-proxy'] == 1)
        LOG.wait_for('listen 127.0.0.1:%d: client 127.0.0.1:%d: not a trusted proxy'
                     % (port, sock.getsockname()[1]), self.mark)
        self.assertIn(' end=denied', self.access_line(sock.getsockname()[1]))
        self.assertEqual(self.api.accepted, 0)


class BadInputTest(SniCase):
    """Each bad client is closed, counted on its address, logged once and never reaches
    a backend; a good connection open meanwhile carries on."""

    def setUp(self):
        SniCase.setUp(self)
        self.api = self.own(TLSBackend(['api.example.com'], echo))
        self.www = self.own(TLSBackend(['www.example.com'], echo))
        self.port = free_port()
        self.start(config(
            service('api', 'api.example.com', [('a1', self.api.address)], self.port,
                    extra='    <timeouts connect="0.3"/>\n'),
            service('www', 'www.example.com', [('w1', self.www.address)], self.port,
                    extra='    <timeouts connect="0.5"/>\n')))
        self.listen = '127.0.0.1:%d' % self.port

    def refused(self, data, kind, why, end='bad-hello', shut=True, received=None):
        """Send data (then EOF when shut); the client must be closed, its kind counted once,
        one log line saying why, one access line, no backend contacted."""
        self.forget_log_times()
        before = self.address_counters()
        mark = LOG.mark()
        sock = connect(self.port)
        client_port = sock.getsockname()[1]
        try:
            if data:
                sock.sendall(data)
            if shut:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass    # closed before all of it went: a hello over the bound
        self.assertTrue(closed_by_peer(sock))
        sock.close()
        key = ('bad', kind) if kind != 'unmatched' else ('unmatched',)
        count = lambda c: c[key[0]][key[1]] if len(key) == 2 else c[key[0]]
        wait_until(lambda: count(self.address_counters()) == count(before) + 1)
        lines = LOG.wait_for('listen %s: client 127.0.0.1:%d: ' % (self.listen, client_port), mark)
        self.assertEqual(lines, ['listen %s: client 127.0.0.1:%d: %s' % (self.listen, client_port, why)])
        line = self.access_line(client_port)
        self.assertRegex(line, r'^access service=- client=127\.0\.0\.1:%d sni=- host=- backend=- failovers=0 '
                               r'bytes_in=%s bytes_out=0 duration=[0-9.]+ end=%s$'
                         % (client_port, len(data) if received is None else received, end))
        self.assertEqual((self.api.accepted, self.www.accepted), (0, 0))

    def test_not_tls(self):
        self.refused(b'GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n', 'not-tls',
                     "bad TLS hello: not TLS: first byte 0x47 'G'")
        self.refused(b'\x15\x03\x01\x00\x02\x02\x28', 'not-tls', 'bad TLS hello: not a TLS hello: a TLS alert record first')
        self.refused(b'\x16\x03\x03\x00\x06\x02\x00\x00\x02\x03\x03', 'not-tls',
                     'bad TLS hello: not a ClientHello: handshake message type 2')

    def test_truncated(self):
        data = hello(b'api.example.com')
        self.refused(data[:100], 'truncated', 'closed after 100 bytes, before its TLS hello ended')
        self.refused(b'', 'truncated', 'closed after 0 bytes, before its TLS hello ended')

    def test_lengths_that_lie(self):
        body = hello_body(server_name_ext(b'api.example.com'))
        at = 5 + 4 + 2 + 32 + 1 + 32 + 2 + 6 + 1 + 1     # the extensions length
        data = bytearray(records(message(body)))
        data[at:at + 2] = (int.from_bytes(data[at:at + 2], 'big') + 7).to_bytes(2, 'big')
        extensions = len(server_name_ext(b'api.example.com'))
        self.refused(bytes(data), 'malformed', 'bad TLS hello: malformed ClientHello: extensions of %d bytes '
                                               'where %d remain' % (extensions + 7, extensions))
        self.refused(b'\x16\x03\x01\x00\x00', 'malformed', 'bad TLS hello: malformed ClientHello: an empty TLS record')
        data = records(message(body))
        longer_record = data[:3] + (len(data) - 5 + 100).to_bytes(2, 'big') + data[5:]
        self.refused(longer_record, 'malformed',
                     'bad TLS hello: malformed ClientHello: more handshake bytes after it in its record')
        longer_message = data[:6] + (len(body) + 100).to_bytes(3, 'big') + data[9:]
        self.refused(longer_message, 'malformed', 'bad TLS hello: malformed ClientHello: extensions of %d bytes '
                                                  'where %d remain' % (extensions, extensions + 100))

    def test_over_the_bound(self):
        padded = hello_body(server_name_ext(b'api.example.com') + extension(21, bytes(17000)))
        self.refused(records(message(padded))[:20000], 'too-big', 'bad TLS hello: TLS hello over 16384 bytes',
                     shut=False, received='[0-9]+')

    def test_nothing_before_the_deadline(self):
        # The deadline is the longest <timeouts connect> of the services on the address: 0.5 s.
        self.refused(b'', 'timeout', 'no whole TLS hello within 0.5 s (0 bytes came)', end='hello-timeout',
                     shut=False)
        self.refused(hello(b'api.example.com')[:50], 'timeout', 'no whole TLS hello within 0.5 s (50 bytes came)',
                     end='hello-timeout', shut=False)

    def test_a_name_nobody_takes(self):
        for name, why, shown in [
                ('nobody.example.com', "TLS hello for 'nobody.example.com', which no service here takes "
                                       "(and none has '*')", 'nobody.example.com'),
                (None, "TLS hello without a server name, and no service here has '*'", '-')]:
            with self.subTest(name=name):
                self.forget_log_times()
                mark = LOG.mark()
                before = self.address_counters()['unmatched']
                with self.assertRaises((ssl.SSLError, ConnectionResetError, OSError)):
                    tls_connect(self.port, name)
                wait_until(lambda: self.address_counters()['unmatched'] == before + 1)
                line = LOG.wait_for('listen %s: client ' % self.listen, mark)
                self.assertEqual(len(line), 1)
                self.assertTrue(line[0].endswith(why), line)
                self.assertRegex(wait_until(lambda: [l for l in LOG.since(mark) if l.startswith('access ')])[0],
                                 r' sni=%s host=- .* end=unknown-sni$' % shown.replace('.', r'\.'))
        self.assertEqual((self.api.accepted, self.www.accepted), (0, 0))

    def test_bad_input_disturbs_nothing(self):
        tls, cert = tls_connect(self.port, 'www.example.com')
        self.assertEqual(cert, 'www.example.com')
        tls.sendall(b'before')
        self.assertEqual(tls.recv(100), b'before')
        garbage = [b'\x00' * 50, b'SSH-2.0-OpenSSH_9.6\r\n', bytes(range(256)), b'\x16\x03\x01\xff\xff',
                   b'\x16\x03\x01\x40\x01' + bytes(100)]
        socks = []
        for data in garbage:
            sock = connect(self.port)
            sock.sendall(data)
            socks.append(sock)
        for sock in socks:
            self.assertTrue(closed_by_peer(sock))
            sock.close()
        wait_until(lambda: sum(self.address_counters()['bad'].values()) == len(garbage))
        tls.sendall(b'after')
        self.assertEqual(tls.recv(100), b'after')
        self.assertEqual(tls_exchange(self.port, BIG, 'api.example.com', expect=len(BIG)), ('api.example.com', BIG))
        tls.close()
        self.assertEqual((self.api.accepted, self.www.accepted), (1, 1))
        self.assertEqual(self.balancer.call(lambda: len(self.balancer.director.hellos)), 0)

    def test_logged_at_most_once_a_second(self):
        for _ in range(5):
            sock = connect(self.port)
            sock.sendall(b'not tls')
            self.assertTrue(closed_by_peer(sock))
            sock.close()
        wait_until(lambda: self.address_counters()['bad']['not-tls'] == 5)
        lines = [l for l in LOG.since(self.mark) if l.startswith('listen %s: ' % self.listen)]
        self.assertEqual(len(lines), 1, lines)
        wait_until(lambda: len(self.access_lines(' end=bad-hello')) == 5)   # every client has its access line

        def age_last_line():    # as if the second had passed, without waiting for it
            self.balancer.director.services['api'].listeners[0].logged['not-tls'][0] -= 1.0
        self.balancer.call(age_last_line)
        sock = connect(self.port)
        client_port = sock.getsockname()[1]
        sock.sendall(b'still not tls')
        self.assertTrue(closed_by_peer(sock))
        sock.close()
        line = LOG.wait_for('listen %s: client 127.0.0.1:%d: ' % (self.listen, client_port), self.mark)
        self.assertTrue(line[0].endswith(" 0x73 's' (4 more like it not logged since the last such line)"), line)

    def test_stop_closes_clients_still_reading(self):
        sock = connect(self.port)
        sock.sendall(b'\x16\x03')
        wait_until(lambda: self.address_counters()['reading'] == 1)
        self.balancer.call(self.balancer.director.begin_stop, 10)
        self.assertTrue(closed_by_peer(sock))
        self.assertIn(' end=shutdown', self.access_line(sock.getsockname()[1]))
        sock.close()


class FuzzTest(SniCase):
    """Mutated real hellos (fixed seeds) at a running balancer: each is routed exactly
    when the reader accepts it, with its bytes replayed whole, else refused and counted
    by kind; the loop never meets an error, and no client is left behind."""

    CASES = 150

    def test_mutated_hellos(self):
        recorder = self.own(Backend(record_until_eof))
        port = free_port()
        self.start(config(service('any', '*', [('r1', recorder.address)], port)))
        rng = random.Random(1313)
        hellos = fixtures()
        expected = {'routed': 0, 'error': 0, 'need': 0}
        routed = []
        for case in range(self.CASES):
            name, original, _ = hellos[case % len(hellos)]
            data = mutate(rng, original, length_fields(original))
            try:
                outcome = 'routed' if pydirector.parse_client_hello(data) else 'need'
            except ValueError:
                outcome = 'error'
            expected[outcome] += 1
            sock = connect(port)
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
                answer = recv_all(sock)
            except ConnectionResetError:
                answer = b''
            finally:
                sock.close()
            self.assertEqual(answer, b'ok' if outcome == 'routed' else b'', (case, name, data.hex()))
            if outcome == 'routed':
                routed.append(data)
        counters = self.address_counters()
        bad = counters['bad']
        self.assertEqual((recorder.accepted, bad['not-tls'] + bad['malformed'] + bad['too-big'], bad['truncated']),
                         (expected['routed'], expected['error'], expected['need']))
        self.assertEqual(recorder.received, routed)
        for kind in expected:
            self.assertGreater(expected[kind], 10, expected)
        self.assertEqual(counters['reading'], 0)
        wait_until(lambda: self.balancer.open_pairs() == 0)
        self.assertEqual([l for l in LOG.since(self.mark) if 'unexpected' in l or 'TRACEBACK' in l], [])


class ReloadTest(SniCase):
    """A reload moves names and adds and removes services on the address, on the one
    socket, without cutting a connection."""

    def setUp(self):
        SniCase.setUp(self)
        self.dir = tempfile.mkdtemp(prefix='pydirector-sni-')
        self.addCleanup(lambda: shutil.rmtree(self.dir, True))
        self.path = os.path.join(self.dir, 'live.xml')
        self.api = self.own(TLSBackend(['api.example.com'], echo))
        self.www = self.own(TLSBackend(['www.example.com'], echo))
        self.new = self.own(TLSBackend(['new.example.com'], echo))
        self.port = free_port()

    def xml(self, api_names, www_names, new=False):
        return config(service('api', api_names, [('a1', self.api.address)], self.port),
                      service('www', www_names, [('w1', self.www.address)], self.port),
                      service('new', 'new.example.com', [('n1', self.new.address)], self.port) if new else '')

    def reload(self, xml):
        with open(self.path, 'w') as f:
            f.write(xml)
        return self.balancer.director.reload()

    def test_a_name_moves(self):
        self.start(self.xml('api.example.com', 'www.example.com,moved.example.com'), path=self.path)
        listener = self.balancer.call(lambda: self.balancer.director.services['api'].listeners[0])
        held, cert = tls_connect(self.port, 'moved.example.com')
        self.assertEqual(cert, 'www.example.com')
        wait_until(lambda: self.www.server_names == ['moved.example.com'])
        # A client halfway through its hello when the reload comes gets the new names.
        halfway = connect(self.port)
        data = hello(b'moved.example.com')
        halfway.sendall(data[:30])
        wait_until(lambda: self.address_counters()['reading'] == 1)

        message = self.reload(self.xml('api.example.com,moved.example.com', 'www.example.com', new=True))
        self.assertEqual(message, 'reloaded %s: api: listen 127.0.0.1:%d sni api.example.com,moved.example.com; '
                                  'www: listen 127.0.0.1:%d sni www.example.com; +service new'
                         % (self.path, self.port, self.port))
        self.assertIs(self.balancer.call(lambda: self.balancer.director.services['new'].listeners[0]), listener)
        self.assertEqual(tls_exchange(self.port, b'x', 'moved.example.com', expect=1), ('api.example.com', b'x'))
        self.assertEqual(tls_exchange(self.port, b'y', 'new.example.com', expect=1), ('new.example.com', b'y'))
        halfway.sendall(data[30:])
        halfway.shutdown(socket.SHUT_WR)
        wait_until(lambda: self.api.accepted == 2)
        halfway.close()
        # The connection made before still flows, on its old service.
        held.sendall(b'still here')
        self.assertEqual(held.recv(100), b'still here')

        message = self.reload(self.xml('api.example.com', 'www.example.com'))
        self.assertIn('-service new', message)
        with self.assertRaises((ssl.SSLError, ConnectionResetError, OSError)):
            tls_connect(self.port, 'new.example.com')
        wait_until(lambda: self.address_counters()['unmatched'] == 1)
        held.sendall(b'and after')
        self.assertEqual(held.recv(100), b'and after')
        held.close()
        self.assertIn('<listen ip="127.0.0.1:%d" sni="api.example.com"/>' % self.port,
                      self.balancer.call(self.balancer.director.running_xml))

    def test_running_xml_loads(self):
        self.start(self.xml('api.example.com,*.API.example.com.', '*'), path=self.path)
        xml = self.balancer.call(self.balancer.director.running_xml)
        self.assertIn('sni="api.example.com,*.api.example.com"', xml)
        again = pydirector.parse_config(xml, 'running.xml')
        self.assertEqual([l.sni for s in again.services for l in s.listens],
                         [['api.example.com', '*.api.example.com'], ['*']])


if __name__ == '__main__':
    unittest.main()
