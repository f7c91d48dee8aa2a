"""UDP services (issue 31): <service protocol="udp">, sessions, failover on ICMP
errors, UDP and DNS health checks, workers, and the admin's view of them.

Real servers on 127.0.0.1: dnsmasq (answering one name with its own address,
so a test tells which one answered), dig and logger where installed (.ci/run
installs dnsmasq-base, bind9-dnsutils and bsdutils; a test without them
skips, saying so), and small UDP servers of our own (UdpBackend).
"""

import os
import re
import signal
import socket
import threading
import time
import unittest
from unittest import mock

import support
from support import (LOG, BalancerCase, ExternalServer, WorkersMixin, config_xml, exchange, fd_count,
                     free_port, need_program, service_xml, single_process, wait_until)

import pydirector
import pydirector_admin


# -- peers -------------------------------------------------------------------

class UdpBackend(object):
    """A UDP server on 127.0.0.1: answers each datagram with answer(self, data) (a list of
    datagrams; by default one, its name, ':' and the datagram) and keeps what came, with
    the peer it came from."""

    def __init__(self, name='backend', answer=None, port=0):
        self.name = name
        self.answer = answer or (lambda backend, data: [backend.name.encode() + b':' + data])
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(('127.0.0.1', port))
        self.sock.settimeout(0.02)
        self.port = self.sock.getsockname()[1]
        self.address = '127.0.0.1:%d' % self.port
        self.received = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name='udp-' + name, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stopping.is_set():
            try:
                data, peer = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            self.received.append((data, peer))
            for reply in self.answer(self, data):
                try:
                    self.sock.sendto(reply, peer)
                except OSError:
                    pass

    def peers(self):
        return set(peer for _, peer in self.received)

    def close(self):
        if not self.stopping.is_set():
            self.stopping.set()
            self.thread.join(5)
            self.sock.close()


def echo_exactly(backend, data):
    return [data]


def silent(backend, data):
    return []


def client(timeout=3.0, port=0):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(('127.0.0.1', port))
    sock.settimeout(timeout)
    return sock


def ask(port, data, sock=None, timeout=3.0):
    """One datagram to the balancer and its first reply (socket.timeout if none)."""
    own = sock is None
    sock = sock or client(timeout)
    try:
        sock.sendto(data, ('127.0.0.1', port))
        reply, peer = sock.recvfrom(65535)
        assert peer == ('127.0.0.1', port), peer    # from the address the client asked
        return reply
    finally:
        if own:
            sock.close()


def dns_answer_address(data):
    """The address of the last A record of a DNS answer ('127.0.0.2')."""
    return '.'.join(str(b) for b in data[-4:])


def udp_service(hosts, name='dns', scheduler='roundrobin', listen_port=None, udp='', extra=''):
    """A UDP service's XML (hosts as service_xml takes them); udp: <udp>'s attributes."""
    text = service_xml(hosts, name, scheduler, listen_port, extra + ('    <udp %s/>\n' % udp if udp else ''))
    return text.replace('<service name="%s">' % name, '<service name="%s" protocol="udp">' % name, 1)


def access_lines(mark, service='dns'):
    return [l for l in LOG.since(mark) if l.startswith('access service=%s ' % service)]


class DnsServer(ExternalServer):
    """dnsmasq answering svc.test with `address` and nothing else (REFUSED: no upstream)."""

    def __init__(self, address, port=None):
        self.dns_port = port or free_port()
        ExternalServer.__init__(self, [need_program('dnsmasq'), '--keep-in-foreground', '--conf-file=/dev/null',
                                       '--no-resolv', '--no-hosts', '--port', str(self.dns_port),
                                       '--listen-address', '127.0.0.1', '--bind-interfaces',
                                       '--pid-file={dir}/dnsmasq.pid', '--address=/svc.test/%s' % address],
                                {}, self.dns_port)      # it answers over TCP too: accepts() sees it up
        self.address = '127.0.0.1:%d' % self.dns_port


class UdpCase(BalancerCase):
    def udp_backend(self, name='backend', answer=None, port=0):
        backend = UdpBackend(name, answer, port)
        self.addCleanup(backend.close)
        return backend

    def dnsmasq(self, address):
        server = DnsServer(address)
        self.addCleanup(server.close)
        return server

    def udp_port(self, service='dns'):
        return self.balancer.port(service)

    def service_snapshot(self, name='dns'):
        return [s for s in self.balancer.snapshot()['services'] if s['name'] == name][0]

    def wait_sessions(self, count, name='dns'):
        """Wait until the service holds `count` sessions (every worker's)."""
        wait_until(lambda: self.service_snapshot(name)['open'] == count, 10,
                   message='sessions of %s not %d: %r' % (name, count, self.service_snapshot(name)))

    def end_sessions(self):
        """End every session: here at once; in workers by their idle timeout (IDLE)."""
        if not self.workers:
            self.balancer.call(self.balancer.director.end_sessions, lambda s: True, 'shutdown')
        self.wait_sessions(0)


IDLE = '    <timeouts idle="2"/>\n'      # sessions a test holds end by themselves in workers


# -- the config --------------------------------------------------------------

class UdpConfigTest(unittest.TestCase):

    def parse(self, services):
        return pydirector.parse_config(config_xml(services), 'x.xml')

    def refused(self, services, message):
        with self.assertRaises(pydirector.ConfigError) as cm:
            self.parse(services)
        self.assertEqual(str(cm.exception), message)

    def test_a_udp_service_and_its_defaults(self):
        config = self.parse(udp_service([('a', '127.0.0.1:5301')], listen_port=5300))
        service = config.services[0]
        self.assertEqual(service.protocol, 'udp')
        self.assertEqual(service.timeouts.idle, pydirector.UDP_IDLE)
        self.assertEqual((service.udp.responses, service.udp.sessions), (None, pydirector.UDP_SESSIONS))
        # running.xml says so, and loads back the same.
        xml = config.to_xml()
        self.assertIn('<service name="dns" protocol="udp">', xml)
        self.assertIn('<timeouts idle="60"/>', xml)
        self.assertEqual(pydirector.parse_config(xml, 'r.xml').to_xml(), xml)
        tcp = self.parse(service_xml([('a', '127.0.0.1:5301')], listen_port=5300)).services[0]
        self.assertEqual((tcp.protocol, tcp.udp, tcp.timeouts.idle), ('tcp', None, 3600.0))

    def test_udp_settings_and_an_idle_timeout_of_its_own(self):
        service = self.parse(udp_service([('a', '127.0.0.1:5301')], udp='responses="1" sessions="20"',
                                         extra='    <timeouts connect="1"/>\n')).services[0]
        self.assertEqual((service.udp.responses, service.udp.sessions), (1, 20))
        self.assertEqual(service.timeouts.idle, pydirector.UDP_IDLE)   # not given: UDP's, not TCP's
        service = self.parse(udp_service([('a', '127.0.0.1:5301')], extra='    <timeouts idle="5"/>\n')).services[0]
        self.assertEqual(service.timeouts.idle, 5.0)

    def test_a_tcp_and_a_udp_service_share_an_address(self):
        # DNS answers on port 53 over both.
        config = self.parse(udp_service([('a', '127.0.0.1:5301')], listen_port=5300) +
                            service_xml([('a', '127.0.0.1:5301')], name='dnstcp', listen_port=5300))
        self.assertEqual([s.protocol for s in config.services], ['udp', 'tcp'])
        self.refused(udp_service([('a', '127.0.0.1:5301')], listen_port=5300) +
                     udp_service([('a', '127.0.0.1:5301')], name='other', listen_port=5300),
                     "x.xml:9: listen '127.0.0.1:5300' is already used by service 'dns'")

    def test_what_only_tcp_has_is_an_error_at_its_line(self):
        hosts = [('a', '127.0.0.1:5301')]
        service = udp_service(hosts, listen_port=5300)
        self.refused(service.replace('<listen ip="127.0.0.1:5300"/>',
                                     '<listen ip="127.0.0.1:5300" sni="a.example.com"/>'),
                     """x.xml:3: <listen> sni needs TCP: service 'dns' is protocol="udp\"""")
        self.refused(service.replace('<listen ip="127.0.0.1:5300"/>',
                                     '<listen ip="127.0.0.1:5300" accept_proxy="v2"/>'),
                     """x.xml:3: <listen> accept_proxy needs TCP: service 'dns' is protocol="udp\"""")
        self.refused(udp_service([('a', '127.0.0.1:5301', 'send_proxy="v1"')]),
                     """x.xml:5: <host> send_proxy needs TCP: service 'dns' is protocol="udp\"""")
        self.refused(udp_service(hosts, extra='    <clients maxconns="5"/>\n'),
                     """x.xml:7: <clients> needs TCP: service 'dns' is protocol="udp\"""")
        self.refused(service_xml(hosts, extra='    <udp responses="1"/>\n'),
                     """x.xml:7: service 'web': <udp> is only for a service with protocol="udp\"""")
        self.refused(udp_service(hosts, udp='responses="1"', extra='    <udp sessions="5"/>\n'),
                     "x.xml:8: service 'dns': more than one <udp>")
        self.refused(udp_service(hosts, udp='responses="-1"'),
                     "x.xml:7: <udp> responses '-1': must be an integer >= 0")
        self.refused(udp_service(hosts, udp='sessions="0"'),
                     "x.xml:7: <udp> sessions '0': must be an integer 1-1000000")
        self.refused(service_xml(hosts).replace('<service name="web">', '<service name="web" protocol="sctp">'),
                     "x.xml:2: <service> protocol 'sctp': must be 'tcp' or 'udp'")

    def test_a_dns_check_is_a_name_and_replaces_send(self):
        hosts = [('a', '127.0.0.1:5301')]
        check = udp_service(hosts, extra='    <check dns="svc.test" interval="1"/>\n')
        self.assertEqual(self.parse(check).services[0].check.dns, 'svc.test')
        self.refused(udp_service(hosts, extra='    <check dns="svc.test" send="x" expect="y"/>\n'),
                     'x.xml:7: <check> dns writes its own query and judges the answer: give dns or '
                     'send/expect/status, not both (this one has send, expect)')
        self.refused(udp_service(hosts, extra='    <check dns="no space.test"/>\n'),
                     "x.xml:7: <check> dns 'no space.test': not a DNS name (letters, digits, - and _, in labels "
                     "of 1-63 separated by dots, at most 253 in all)")

    def test_diff_names_what_the_admin_cannot_change(self):
        hosts = [('a', '127.0.0.1:5301')]
        old = self.parse(udp_service(hosts, listen_port=5300, udp='responses="1"'))
        new = self.parse(udp_service(hosts, listen_port=5300, udp='responses="2"'))
        self.assertEqual(pydirector_admin.plan_changes(old, new).problems,
                         ['service dns: <udp responses="1"/> -> <udp responses="2"/>'])
        tcp = self.parse(service_xml(hosts, name='dns', listen_port=5300))
        self.assertEqual(pydirector_admin.plan_changes(old, tcp).problems,
                         ['service dns: protocol udp -> (default)', 'service dns: <timeouts idle="60"/> -> (none)',
                          'service dns: <udp responses="1"/> -> (none)'])

    def test_the_dns_query_and_its_verdicts(self):
        qname = pydirector.dns_name('svc.test.')
        query = pydirector.dns_query(0x1234, qname, pydirector.DNS_A, edns=False)
        self.assertEqual(query, b'\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00'
                                b'\x03svc\x04test\x00\x00\x01\x00\x01')
        answer = b'\x12\x34\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00' + query[12:]
        self.assertEqual(pydirector.judge_dns(answer, 0x1234, qname, False, True),
                         (True, 'probe ok (DNS NOERROR, 1 answer record(s))'))
        self.assertIsNone(pydirector.judge_dns(answer, 0x4321, qname, False, True))     # not ours: wait for ours
        refused = b'\x12\x34\x81\x85' + answer[4:]
        self.assertEqual(pydirector.judge_dns(refused, 0x1234, qname, False, True), (False, 'DNS answer REFUSED'))
        self.assertEqual(pydirector.judge_dns(query, 0x1234, qname, False, True),
                         (False, 'not the DNS answer: not a response'))
        other = pydirector.dns_name('other.test')
        self.assertEqual(pydirector.judge_dns(answer, 0x1234, other, False, True),
                         (False, 'not the DNS answer: a question not ours'))
        self.assertEqual(pydirector.judge_dns(answer[:8], 0x1234, qname, False, True),
                         (False, 'not a DNS answer: shorter than a DNS header'))
        framed = len(answer).to_bytes(2, 'big') + answer
        self.assertIsNone(pydirector.judge_dns(framed[:20], 0x1234, qname, True, False))
        self.assertEqual(pydirector.judge_dns(framed[:20], 0x1234, qname, True, True),
                         (False, 'a DNS answer cut short (20 bytes)'))
        self.assertEqual(pydirector.judge_dns(framed, 0x1234, qname, True, False)[0], True)
        self.assertEqual(pydirector.judge_dns(framed, 0x4321, qname, True, False),
                         (False, 'not the DNS answer: wrong ID'))


# -- sessions, with small servers of our own -------------------------------------

class SessionTest(UdpCase):
    """The data path: sessions, their ends, the table's bound, failover."""

    def test_replies_map_back_to_each_client(self):
        one, two = self.udp_backend('one'), self.udp_backend('two')
        self.start(udp_service([('one', one.address), ('two', two.address)], extra=IDLE))
        port = self.udp_port()
        clients = [client() for _ in range(6)]
        try:
            for index, sock in enumerate(clients):
                sock.sendto(b'q%d' % index, ('127.0.0.1', port))
            replies = [sock.recv(100) for sock in clients]
            # Each its own answer; new clients alternate (roundrobin: each worker's own).
            self.assertEqual([r.split(b':')[1] for r in replies], [b'q%d' % i for i in range(6)])
            if not self.workers:
                self.assertEqual(sorted(r.split(b':')[0] for r in replies), [b'one'] * 3 + [b'two'] * 3)
            # A session keeps its host: a client's next datagrams go where its first did.
            for sock, first in zip(clients, replies):
                for n in range(3):
                    self.assertEqual(ask(port, b'again', sock).split(b':')[0], first.split(b':')[0])
            self.wait_sessions(6)
        finally:
            for sock in clients:
                sock.close()
        self.end_sessions()

    def test_responses_end_a_session_and_each_query_is_a_pick(self):
        one, two = self.udp_backend('one'), self.udp_backend('two')
        self.start(udp_service([('one', one.address), ('two', two.address)], udp='responses="1"'))
        mark = LOG.mark()
        sock = client()
        try:
            hosts = [ask(self.udp_port(), b'q', sock).split(b':')[0] for _ in range(4)]
        finally:
            sock.close()
        # One client, one source port: still a pick per query, as DNS wants.
        self.assertEqual(hosts, [b'one', b'two', b'one', b'two'])
        self.wait_sessions(0)
        lines = LOG.wait_for('end=responses', mark)
        self.assertRegex(lines[0], r'^access service=dns client=127\.0\.0\.1:\d+ protocol=udp host=one '
                                   r'backend=127\.0\.0\.1:%d failovers=0 datagrams_in=1 datagrams_out=1 '
                                   r'bytes_in=1 bytes_out=5 duration=\d+\.\d{3} end=responses$' % one.port)

    def test_two_responses_per_request(self):
        def twice(backend, data):
            return [b'first', b'second']
        backend = self.udp_backend('one', twice)
        self.start(udp_service([('one', backend.address)], udp='responses="2"'))
        mark = LOG.mark()
        sock = client()
        try:
            sock.sendto(b'q', ('127.0.0.1', self.udp_port()))
            self.assertEqual([sock.recv(100), sock.recv(100)], [b'first', b'second'])
        finally:
            sock.close()
        LOG.wait_for('datagrams_in=1 datagrams_out=2 bytes_in=1 bytes_out=11', mark)
        self.wait_sessions(0)

    def test_send_and_forget(self):
        one, two = self.udp_backend('one', silent), self.udp_backend('two', silent)
        self.start(udp_service([('one', one.address), ('two', two.address)], udp='responses="0"'))
        mark = LOG.mark()
        sock = client()
        try:
            for n in range(10):
                sock.sendto(b'line %d' % n, ('127.0.0.1', self.udp_port()))
        finally:
            sock.close()
        wait_until(lambda: len(one.received) + len(two.received) == 10)
        self.assertEqual((len(one.received), len(two.received)), (5, 5))
        wait_until(lambda: len([l for l in access_lines(mark) if 'end=responses' in l]) == 10)
        self.assertEqual(self.service_snapshot()['open'], 0)    # nothing held

    def test_idle_sessions_end(self):
        backend = self.udp_backend('one')
        self.start(udp_service([('one', backend.address)], extra='    <timeouts idle="0.3"/>\n'))
        mark = LOG.mark()
        sock = client()
        try:
            started = time.monotonic()
            self.assertEqual(ask(self.udp_port(), b'a', sock), b'one:a')
            self.wait_sessions(1)
            line = LOG.wait_for('end=idle', mark)[0]
            self.assertGreaterEqual(time.monotonic() - started, 0.3)
            self.assertIn('datagrams_in=1 datagrams_out=1', line)
            self.assertEqual(self.service_snapshot()['open'], 0)
            # Its next datagram makes a new session.
            self.assertEqual(ask(self.udp_port(), b'b', sock), b'one:b')
            self.assertEqual(len(backend.peers()), 2)
        finally:
            sock.close()
        wait_until(lambda: len([l for l in access_lines(mark) if 'end=idle' in l]) == 2)

    def test_activity_keeps_a_session(self):
        backend = self.udp_backend('one')
        self.start(udp_service([('one', backend.address)], extra='    <timeouts idle="0.5"/>\n'))
        sock = client()
        try:
            for n in range(8):      # 8 x 0.15 s: longer than idle, never idle that long
                self.assertEqual(ask(self.udp_port(), b'x', sock), b'one:x')
                time.sleep(0.15)
            self.assertEqual(len(backend.peers()), 1)   # one session all along
        finally:
            sock.close()
        self.wait_sessions(0)

    @single_process('the table is each process\'s, and the kernel spreads clients over the workers')
    def test_a_full_table_evicts_the_least_recently_used(self):
        backend = self.udp_backend('one')
        self.start(udp_service([('one', backend.address)], udp='sessions="2"'))
        mark = LOG.mark()
        a, b, c = client(), client(), client()
        try:
            ask(self.udp_port(), b'a', a)
            ask(self.udp_port(), b'b', b)
            ask(self.udp_port(), b'a again', a)    # b is now the least recently used
            ask(self.udp_port(), b'c', c)
            line = LOG.wait_for('end=evicted', mark)[0]
            self.assertIn('client=127.0.0.1:%d ' % b.getsockname()[1], line)
            snapshot = self.service_snapshot()
            self.assertEqual((snapshot['open'], snapshot['udp']['evicted']), (2, 1))
            LOG.wait_for('service dns: 2 sessions held (<udp sessions>): evicting the least recently used', mark)
            self.assertEqual(ask(self.udp_port(), b'a', a), b'one:a')   # a kept its session
            self.assertEqual(len(backend.peers()), 3)
        finally:
            for sock in (a, b, c):
                sock.close()
        self.end_sessions()

    def test_datagrams_of_any_size(self):
        backend = self.udp_backend('one', echo_exactly)
        self.start(udp_service([('one', backend.address)], udp='responses="1"'))
        for size in (0, 1, 1232, 1233, 9000, 65507):     # 65,507: the most one IPv4 datagram carries
            data = os.urandom(size)
            self.assertEqual(ask(self.udp_port(), data), data, size)
        self.wait_sessions(0)

    def test_a_refusing_host_is_marked_down_and_the_request_goes_to_another(self):
        closed = free_port()
        backend = self.udp_backend('two')
        self.start(udp_service([('one', '127.0.0.1:%d' % closed), ('two', backend.address)], udp='responses="1"'))
        mark = LOG.mark()
        # The first client is one's: its datagram meets an ICMP port unreachable, and is sent to two.
        self.assertEqual(ask(self.udp_port(), b'q'), b'two:q')
        LOG.wait_for('host one (127.0.0.1:%d) in dns/main down: connection refused' % closed, mark)
        self.balancer.sync()     # every worker knows
        line = LOG.wait_for('failovers=1', mark)[0]
        self.assertIn('host=two', line)
        self.assertEqual(self.balancer.host('one', 'dns')['state'], 'down')
        for n in range(4):
            self.assertEqual(ask(self.udp_port(), b'q'), b'two:q')
        wait_until(lambda: self.service_snapshot()['accepted'] == 5)
        self.assertEqual(self.service_snapshot()['failovers'], 1)
        self.wait_sessions(0)

    def test_a_host_the_checks_take_down_loses_its_sessions_with_on_down_close(self):
        state = {'healthy': True}

        def answer(backend, data):
            if data == b'ping':
                return [b'OK'] if state['healthy'] else [b'NO']
            return [b'one:' + data]
        backend = self.udp_backend('one', answer)
        self.start(udp_service([('one', backend.address)], extra=IDLE + '    <check interval="0.1" timeout="1" '
                               'fall="1" send="ping" expect="OK" on_down="close"/>\n'))
        mark = LOG.mark()
        sock = client()
        try:
            self.assertEqual(ask(self.udp_port(), b'q', sock), b'one:q')
            self.wait_sessions(1)
            state['healthy'] = False
            line = LOG.wait_for('end=host-down', mark, 10)[0]
            self.assertIn('client=127.0.0.1:%d ' % sock.getsockname()[1], line)
        finally:
            sock.close()
        self.wait_sessions(0)

    def test_an_ipv6_client(self):
        if not socket.has_ipv6:
            self.skipTest('no IPv6')
        try:
            probe = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            probe.bind(('::1', 0))
            probe.close()
        except OSError:
            self.skipTest('no ::1 here')
        backend = self.udp_backend('one')
        port = free_port()
        mark = LOG.mark()
        self.start(udp_service([('one', backend.address)], listen_port=port, udp='responses="1"')
                   .replace('127.0.0.1:%d' % port, '[::1]:%d' % port))
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.settimeout(3)
            sock.bind(('::1', 0))
            sock.sendto(b'q', ('::1', port))
            self.assertEqual(sock.recvfrom(100)[0], b'one:q')
            LOG.wait_for('access service=dns client=[::1]:%d protocol=udp host=one' % sock.getsockname()[1], mark)
        self.wait_sessions(0)

    def test_denied_clients_make_no_session(self):
        backend = self.udp_backend('one')
        self.start(udp_service([('one', backend.address)], extra='    <deny cidr="127.0.0.0/8"/>\n'))
        with self.assertRaises(socket.timeout):
            ask(self.udp_port(), b'q', timeout=0.3)
        wait_until(lambda: self.service_snapshot()['denied'] == 1)
        self.assertEqual((backend.received, self.service_snapshot()['open']), ([], 0))

    @single_process('each worker says so once a second')
    def test_no_host_drops_and_says_so_once(self):
        self.start(udp_service([('one', '127.0.0.1:%d' % free_port())], udp='responses="1"'))
        mark = LOG.mark()
        for n in range(3):
            with self.assertRaises(socket.timeout):
                ask(self.udp_port(), b'q', timeout=0.3)
        lines = [l for l in LOG.since(mark) if 'no host available in group main' in l]
        self.assertEqual(len(lines), 1, LOG.since(mark))     # once a second, not once a datagram
        wait_until(lambda: self.service_snapshot()['refused'] == 2)    # the first met one's ICMP error
        self.wait_sessions(0)

    def test_hash_keeps_a_client_address_on_one_host(self):
        backends = [self.udp_backend(name) for name in ('one', 'two', 'three')]
        self.start(udp_service([(b.name, b.address) for b in backends], scheduler='hash', udp='responses="1"'))
        hosts = set(ask(self.udp_port(), b'q').split(b':')[0] for _ in range(6))    # six source ports
        self.assertEqual(len(hosts), 1)
        self.wait_sessions(0)

    def test_a_flood_of_sources_only_evicts(self):
        backend = self.udp_backend('one', silent)
        tcp = self.backend()
        self.start(udp_service([('one', backend.address)], udp='sessions="50"', extra=IDLE),
                   service_xml([('echo', tcp.address)]))
        base = fd_count()
        port = self.udp_port()
        held = 50 * (self.workers or 1)     # each process holds 50 (each worker had far more clients)
        socks = []      # all kept open: a port used again would be the same client
        try:
            for batch in range(20):     # 1,000 client addresses, 50 at a time
                batch = [client() for _ in range(50)]
                socks.extend(batch)
                for sock in batch:
                    sock.sendto(b'x' * 512, ('127.0.0.1', port))
                # The table holds at most 50, whatever came; other services still answer.
                self.assertEqual(exchange(self.balancer.port('web'), b'still here'), b'still here')
                # (Read before the next burst: the kernel drops what a full socket buffer cannot take.)
                wait_until(lambda: self.service_snapshot()['udp']['datagrams_in'] == len(socks), 10)
            wait_until(lambda: self.service_snapshot()['accepted'] == 1000, 10,
                       message=repr(self.service_snapshot()))
            snapshot = self.service_snapshot()
            self.assertEqual((snapshot['open'], snapshot['udp']['evicted'], snapshot['udp']['datagrams_in']),
                             (held, 1000 - held, 1000))
            if not self.workers:        # (the balancer's fds are this process's)
                self.assertLessEqual(fd_count() - base - len(socks), 50)
                self.assertEqual(len(self.balancer.director.services['dns'].udp.sessions), 50)
        finally:
            for sock in socks:
                sock.close()
        self.end_sessions()

    @single_process('a patched socket() of this process')
    def test_out_of_fds_the_oldest_session_makes_room(self):
        backend = self.udp_backend('one')
        self.start(udp_service([('one', backend.address)]))
        a, b = client(), client()
        real = pydirector._socket.socket
        refusals = []

        def socket_once_out(*args):
            if not refusals:
                refusals.append(args)
                raise OSError(24, 'Too many open files')
            return real(*args)
        try:
            ask(self.udp_port(), b'a', a)
            with mock.patch.object(pydirector._socket, 'socket', socket_once_out):
                self.assertEqual(ask(self.udp_port(), b'b', b), b'one:b')
            snapshot = self.service_snapshot()
            self.assertEqual((snapshot['open'], snapshot['udp']['evicted'], len(refusals)), (1, 1, 1))
        finally:
            a.close()
            b.close()
        self.end_sessions()

    def test_the_admin_view(self):
        backend = self.udp_backend('one')
        self.start(udp_service([('one', backend.address)], udp='responses="1" sessions="300"'))
        sock = client()
        try:
            ask(self.udp_port(), b'q', sock)
        finally:
            sock.close()
        # (A worker writes its counters as the session ends, just after the reply went.)
        wait_until(lambda: self.service_snapshot()['udp']['datagrams_out'] == 1)
        self.wait_sessions(0)
        snapshot = self.balancer.snapshot()
        service = snapshot['services'][0]
        self.assertEqual(service['protocol'], 'udp')
        self.assertEqual(service['udp'], {'responses': 1, 'sessions_max': 300, 'evicted': 0, 'dropped': 0,
                                          'datagrams_in': 1, 'datagrams_out': 1})
        self.assertEqual(service['check'], None)
        self.assertIn('service dns 127.0.0.1:%d main udp\n' % self.udp_port(),
                      pydirector_admin.render_running_txt(snapshot))
        metrics = pydirector_admin.render_metrics(snapshot)
        for line in ('pydirector_service_udp_sessions_max{service="dns"} 300',
                     'pydirector_service_udp_datagrams_in_total{service="dns"} 1',
                     'pydirector_service_udp_datagrams_out_total{service="dns"} 1',
                     'pydirector_service_udp_evicted_total{service="dns"} 0',
                     'pydirector_service_accepted_total{service="dns"} 1'):
            self.assertIn(line + '\n', metrics)
        page = pydirector_admin.render_running(snapshot, 'admin', True)
        self.assertIn('(UDP)', page)
        self.assertIn('UDP: a session per client address, ending after 1 reply per request; at most 300 '
                      'sessions per process (evicted so far: 0). Datagrams from clients 1, to clients 1, '
                      'dropped 0.', page)
        explained = pydirector_admin.render_explain(self.balancer.call(self.balancer.director.explain, 'dns',
                                                                      '10.0.0.1'))
        self.assertIn('protocol: udp (a new client address gets the host below; an open session keeps its own)\n',
                      explained)
        self.assertIn('host: one 127.0.0.1:%d\n' % backend.port, explained)

    @single_process('the sessions of this process')
    def test_explain_names_a_clients_open_sessions(self):
        one, two = self.udp_backend('one'), self.udp_backend('two')
        self.start(udp_service([('one', one.address), ('two', two.address)]))
        sock = client()
        try:
            ask(self.udp_port(), b'q', sock)
            info = self.balancer.call(self.balancer.director.explain, 'dns', '127.0.0.1')
            self.assertEqual(info['sessions'], [['127.0.0.1:%d' % sock.getsockname()[1],
                                                 '127.0.0.1:%d' % self.udp_port(), 'one']])
            self.assertEqual(info['host'], 'two')       # a new client goes on
        finally:
            sock.close()
        self.end_sessions()

    def test_add_host_refuses_send_proxy(self):
        backend = self.udp_backend('one')
        self.start(udp_service([('one', backend.address)], extra=IDLE))
        with self.assertRaises(pydirector.AdminError) as cm:
            self.balancer.call(self.balancer.director.add_host, 'dns', 'main', 'two', '127.0.0.1:9', send_proxy='v1')
        self.assertEqual((cm.exception.status, cm.exception.message),
                         (400, 'send_proxy needs TCP: service dns is protocol="udp"'))
        self.balancer.call(self.balancer.director.add_host, 'dns', 'main', 'two', '127.0.0.1:9')

    def test_a_reload_adds_a_udp_service(self):
        backend = self.udp_backend('one')
        tcp = self.backend()
        path = os.path.join(self.tempdir(), 'pd.xml')
        tcp_only = service_xml([('echo', tcp.address)])
        self.start(tcp_only, path=path)
        listen = free_port()
        with open(path, 'w') as f:
            f.write(config_xml(tcp_only, udp_service([('one', backend.address)], listen_port=listen,
                                                    udp='responses="1"')))
        message = self.reload()
        self.assertIn('+service dns', message)
        self.assertEqual(ask(listen, b'q'), b'one:q')
        self.assertEqual(exchange(self.balancer.port('web'), b'x'), b'x')
        self.wait_sessions(0)
        # And one that changes it: a session limit and responses.
        with open(path, 'w') as f:
            f.write(config_xml(tcp_only, udp_service([('one', backend.address)], listen_port=listen,
                                                    udp='sessions="7"', extra=IDLE)))
        self.assertIn('dns: timeouts, udp', self.reload())
        self.assertEqual(self.service_snapshot()['udp']['sessions_max'], 7)
        self.assertEqual(ask(listen, b'again'), b'one:again')
        self.end_sessions()

    def test_a_reload_that_shortens_idle_ends_sessions_by_it(self):
        # The table's one timer, armed by the first session for the old idle timeout,
        # is due again by the new one: a session after the reload does not wait it out.
        backend = self.udp_backend('one')
        path = os.path.join(self.tempdir(), 'pd.xml')
        listen = free_port()
        self.start(udp_service([('one', backend.address)], listen_port=listen, udp='responses="1"'), path=path)
        self.assertEqual(ask(listen, b'q'), b'one:q')
        self.wait_sessions(0)
        with open(path, 'w') as f:
            f.write(config_xml(udp_service([('one', backend.address)], listen_port=listen,
                                           extra='    <timeouts idle="0.5"/>\n')))
        self.assertIn('dns: timeouts, udp', self.reload())
        mark = LOG.mark()
        self.assertEqual(ask(listen, b'again'), b'one:again')
        self.wait_sessions(1)
        self.wait_sessions(0)       # within 10 s, not the 60 s the first timer was for
        self.assertIn('datagrams_in=1 datagrams_out=1', LOG.wait_for('end=idle', mark)[0])

    def test_a_reload_turns_a_service_to_udp_and_back(self):
        backend = self.udp_backend('one')
        tcp = self.backend()
        path = os.path.join(self.tempdir(), 'pd.xml')
        listen = free_port()
        tcp_service = service_xml([('echo', tcp.address)], name='dns', listen_port=listen)
        self.start(tcp_service, path=path)
        self.assertEqual(exchange(listen, b'x'), b'x')
        with open(path, 'w') as f:
            f.write(config_xml(udp_service([('one', backend.address)], listen_port=listen, extra=IDLE)))
        self.assertIn('dns: protocol, timeouts, -host echo, +host one', self.reload())
        self.assertEqual(ask(listen, b'q'), b'one:q')
        wait_until(lambda: not support.accepts(listen))     # the TCP listener is gone (a master's: once
                                                            # every worker let go of it)
        self.wait_sessions(1)
        with open(path, 'w') as f:
            f.write(config_xml(tcp_service))
        self.reload()
        self.assertEqual(exchange(listen, b'y'), b'y')
        self.wait_sessions(0)       # ended with their listener
        with self.assertRaises(socket.timeout):
            ask(listen, b'q', timeout=0.3)

    def reload(self):
        message = self.balancer.director.reload()      # from this thread, as SIGHUP's does
        self.balancer.sync()
        return message

    def tempdir(self):
        import shutil
        import tempfile
        directory = tempfile.mkdtemp(prefix='pydirector-udp-')
        self.addCleanup(shutil.rmtree, directory)
        return directory


class SessionWorkersTest(WorkersMixin, SessionTest):
    pass


# -- health checks ------------------------------------------------------------

class UdpCheckTest(UdpCase):

    def test_send_and_expect(self):
        def health(backend, data):
            return [b'OK ' + data] if data == b'ping' else []
        good, bad = self.udp_backend('good', health), self.udp_backend('bad', lambda b, d: [b'NO'])
        self.start(udp_service([('good', good.address), ('bad', bad.address)],
                               extra='    <check interval="0.1" timeout="1" fall="1" send="ping" expect="OK"/>\n'))
        wait_until(lambda: self.balancer.host('bad', 'dns')['state'] == 'down', 10)
        self.assertEqual(self.balancer.host('bad', 'dns')['reason'], "expected b'OK', got b'NO' (1 failed probes)")
        self.assertEqual(self.balancer.host('good', 'dns')['state'], 'up')
        self.assertEqual(self.service_snapshot()['check'],
                         'send ping, then expect OK anywhere in the answer')

    def test_silence_fails_a_check_that_sends(self):
        quiet = self.udp_backend('quiet', silent)
        self.start(udp_service([('quiet', quiet.address)],
                               extra='    <check interval="0.1" timeout="0.2" fall="1" send="ping"/>\n'))
        wait_until(lambda: self.balancer.host('quiet', 'dns')['state'] == 'down', 10)
        self.assertEqual(self.balancer.host('quiet', 'dns')['reason'], 'no answer within 0.2 s (1 failed probes)')

    def test_without_send_only_an_icmp_error_is_down(self):
        quiet = self.udp_backend('quiet', silent)
        closed = free_port()
        self.start(udp_service([('quiet', quiet.address), ('closed', '127.0.0.1:%d' % closed)],
                               extra='    <check interval="0.1" timeout="1" fall="1"/>\n'))
        wait_until(lambda: self.balancer.host('closed', 'dns')['state'] == 'down', 10)
        self.assertEqual(self.balancer.host('closed', 'dns')['reason'], 'connection refused (1 failed probes)')
        wait_until(lambda: len(quiet.received) >= 2, 10)
        self.assertEqual(quiet.received[0][0], b'')     # an empty datagram
        self.assertEqual(self.balancer.host('quiet', 'dns')['state'], 'up')
        self.assertEqual(self.service_snapshot()['check'],
                         'send an empty datagram; down only on an ICMP error within 0.5 s')


# -- DNS, with dnsmasq and dig ---------------------------------------------------

class DnsTest(UdpCase):
    """Two dnsmasq answer svc.test, each with its own address: the answer says who answered."""

    def setUp(self):
        super(DnsTest, self).setUp()
        self.one = self.dnsmasq('127.0.0.1')
        self.two = self.dnsmasq('127.0.0.2')

    def start_dns(self, udp='responses="1"', extra=''):
        return self.start(udp_service([('one', self.one.address), ('two', self.two.address)], udp=udp,
                                      extra=extra))

    def query(self, sock=None, name='svc.test', timeout=3.0):
        ident = int.from_bytes(os.urandom(2), 'big')
        query = pydirector.dns_query(ident, pydirector.dns_name(name), pydirector.DNS_A, edns=False)
        answer = ask(self.udp_port(), query, sock, timeout)
        self.assertEqual(int.from_bytes(answer[:2], 'big'), ident)
        return answer

    def test_dig_and_python_clients_get_answers(self):
        dig = need_program('dig')
        self.start_dns()
        import subprocess
        answers = []
        for n in range(4):
            out = subprocess.run([dig, '@127.0.0.1', '-p', str(self.udp_port()), 'svc.test', '+short',
                                  '+tries=1', '+time=3'], stdout=subprocess.PIPE, timeout=20).stdout
            answers.append(out.decode().strip())
        answers += [dns_answer_address(self.query()) for n in range(4)]
        # Roundrobin reaches both, query by query.
        self.assertEqual(answers, ['127.0.0.1', '127.0.0.2'] * 4)
        self.wait_sessions(0)

    def test_dns_health_check(self):
        self.start_dns(extra='    <check interval="0.1" timeout="1" fall="1" rise="1" dns="svc.test"/>\n')
        self.assertEqual(self.service_snapshot()['check'],
                         'send a DNS query for svc.test, then an answer with its id and rcode NOERROR')
        mark = LOG.mark()
        self.two.close()
        LOG.wait_for('host two (%s) in dns/main down: connection refused' % self.two.address, mark, 10)
        self.assertEqual(self.balancer.host('one', 'dns')['state'], 'up')

    def test_a_name_the_servers_refuse_fails_the_check(self):
        self.start_dns(extra='    <check interval="0.1" timeout="1" fall="1" dns="elsewhere.test"/>\n')
        wait_until(lambda: self.balancer.host('one', 'dns')['state'] == 'down', 10)
        self.assertEqual(self.balancer.host('one', 'dns')['reason'], 'DNS answer REFUSED (1 failed probes)')

    def test_a_killed_backend_loses_no_query_after_detection(self):
        self.start_dns()
        mark = LOG.mark()
        answers, lost = [], []
        sock = client(0.5)
        try:
            for n in range(200):
                if n == 50:
                    os.kill(self.two.proc.pid, signal.SIGKILL)
                    self.two.proc.wait(10)
                try:
                    answers.append(dns_answer_address(self.query(sock, timeout=0.5)))
                except socket.timeout:
                    lost.append(n)
                    sock.close()        # a late answer must not be taken for the next query's
                    sock = client(0.5)
        finally:
            sock.close()
        LOG.wait_for('host two (%s) in dns/main down: connection refused' % self.two.address, mark)
        # Killed between queries, two had none in flight: not one was lost.  The first
        # query two would have had met its ICMP error and went to one.
        self.assertEqual(lost, [])
        self.assertEqual(answers[50:], ['127.0.0.1'] * 150)
        self.assertEqual(answers[:50], ['127.0.0.1', '127.0.0.2'] * 25)
        self.wait_sessions(0)
        wait_until(lambda: len(access_lines(mark)) == 200)
        self.assertEqual(len([l for l in access_lines(mark) if 'failovers=1' in l]), 1)


class DnsWorkersTest(WorkersMixin, DnsTest):
    def test_dig_and_python_clients_get_answers(self):
        # Each worker turns its own roundrobin: both hosts answer, in no set order.
        self.start_dns()
        self.assertEqual(set(dns_answer_address(self.query()) for n in range(20)), {'127.0.0.1', '127.0.0.2'})
        self.wait_sessions(0)

    def test_a_killed_backend_loses_no_query_after_detection(self):
        self.start_dns()
        mark = LOG.mark()
        for n in range(10):
            self.query()
        self.two.proc.kill()
        self.two.proc.wait(10)
        # Each worker learns two is down from its own ICMP error or from the master: no query is lost.
        answers = [dns_answer_address(self.query(timeout=1)) for n in range(40)]
        self.assertEqual(answers, ['127.0.0.1'] * 40)
        LOG.wait_for('host two (%s) in dns/main down: connection refused' % self.two.address, mark)
        self.wait_sessions(0)


# -- syslog, with logger --------------------------------------------------------

class SyslogTest(UdpCase):

    def test_logger_reaches_two_receivers(self):
        logger = need_program('logger')
        one, two = self.udp_backend('one', silent), self.udp_backend('two', silent)
        self.start(udp_service([('one', one.address), ('two', two.address)], name='syslog', udp='responses="0"'))
        import subprocess
        for n in range(6):
            subprocess.run([logger, '--udp', '--server', '127.0.0.1', '--port', str(self.udp_port('syslog')),
                            'pydirector test message %d' % n], check=True, timeout=20)
        wait_until(lambda: len(one.received) + len(two.received) == 6, 10)
        got = [data.decode() for data, _ in one.received + two.received]
        self.assertEqual(sorted(int(re.search(r'test message (\d)', m).group(1)) for m in got), list(range(6)))
        if not self.workers:    # each worker turns its own roundrobin
            self.assertEqual((len(one.received), len(two.received)), (3, 3))
        self.assertTrue(one.received and two.received)
        self.assertEqual(self.service_snapshot('syslog')['open'], 0)


class SyslogWorkersTest(WorkersMixin, SyslogTest):
    pass


# -- workers -----------------------------------------------------------------

@unittest.skipIf(pydirector.workers_unsupported(), 'no worker processes here')
class UdpWorkersTest(UdpCase):
    workers = 2

    def test_a_client_stays_on_one_session_and_both_workers_serve(self):
        backend = self.udp_backend('one')
        self.start(udp_service([('one', backend.address)], extra='    <timeouts idle="0.5"/>\n'))
        socks = [client() for _ in range(16)]
        try:
            for sock in socks:
                for n in range(5):
                    self.assertEqual(ask(self.udp_port(), b'%d' % n, sock), b'one:%d' % n)
            # Each client's five datagrams came through one session (one source port at the
            # backend); the kernel spread the clients over both workers' sockets.
            self.assertEqual(len(backend.peers()), 16)
            # (Counters reach the master at the workers' next tick.)
            def workers():
                found = self.balancer.snapshot()['workers']
                return found if sum(w['accepted'] for w in found) == 16 else None
            workers = wait_until(workers)
            self.assertTrue(all(w['accepted'] for w in workers), workers)
        finally:
            for sock in socks:
                sock.close()
        self.wait_sessions(0)

    def test_a_restarted_worker_serves_its_clients_again(self):
        backend = self.udp_backend('one')
        self.start(udp_service([('one', backend.address)], extra='    <timeouts idle="0.5"/>\n'))
        mark = LOG.mark()
        sock = client()
        try:
            self.assertEqual(ask(self.udp_port(), b'a', sock), b'one:a')
            self.wait_sessions(1)
            # The worker holding the session dies: its sessions go with it.
            holder = [w for w in self.balancer.snapshot()['workers'] if w['open']][0]
            os.kill(holder['pid'], signal.SIGKILL)
            LOG.wait_for('worker %d (pid %d) exited' % (holder['worker'], holder['pid']), mark)
            wait_until(lambda: all(w['up'] for w in self.balancer.snapshot()['workers']), 30)
            # Its socket stayed in the master: the same client reaches the new worker, a new session.
            self.assertEqual(ask(self.udp_port(), b'b', sock), b'one:b')
            self.assertEqual(len(backend.peers()), 2)
        finally:
            sock.close()
        self.wait_sessions(0)


if __name__ == '__main__':
    unittest.main()
