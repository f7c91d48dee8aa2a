"""Backends from DNS (issue 32): <discover> on real DNS servers on loopback.

dnsmasq (which .ci/run installs from dnsmasq-base; without it those tests skip,
saying so) serves a hosts file it rereads on SIGHUP, --host-record and
--srv-host; backends listen on their own loopback addresses (127.0.0.11,
127.0.0.12, ...) at one port, or on one address at several.  What dnsmasq
will not do (set TC, forge answers, say nothing) a small server of our own
does, building its messages here by hand, apart from the code under test.
The wire format's parser is also tested on its own, malformed input first.
"""

import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
import unittest

import support
from support import (LOG, AdoptedBackend, BalancerCase, WorkersMixin, accepts, config_xml, connect, echo,
                     exchange, free_port, need_program, process_state, recv_all, say_name, single_process, wait_until)

import pydirector
import pydirector_admin

TTL = 1     # what dnsmasq gives its local records (--local-ttl)


# -- DNS servers for the tests ---------------------------------------------------

class Dnsmasq(object):
    """dnsmasq on 127.0.0.1:port, UDP and TCP: the names of a hosts file (set_hosts
    rewrites it and sends SIGHUP, which rereads it) and of options.  Every name
    under .test is local: one it does not know is NXDOMAIN."""

    def __init__(self, hosts=(), options=(), port=None):
        self.program = need_program('dnsmasq')
        self.dir = tempfile.mkdtemp(prefix='pydirector-dns-')
        self.hosts_path = os.path.join(self.dir, 'hosts')
        self.log_path = os.path.join(self.dir, 'dnsmasq.log')
        self.port = port or free_port()
        self.options = list(options)
        self.proc = None
        self.write_hosts(hosts)
        self.start()

    def start(self):
        argv = [self.program, '--keep-in-foreground', '--conf-file=/dev/null', '--port=%d' % self.port,
                '--listen-address=127.0.0.1', '--bind-interfaces', '--no-resolv', '--no-hosts',
                '--local=/test/', '--addn-hosts=' + self.hosts_path, '--local-ttl=%d' % TTL, '--pid-file=',
                '--log-facility=-'] + self.options
        if os.getuid() == 0:
            argv.append('--user=root')      # as nobody it could not read our temp dir
        with open(self.log_path, 'ab') as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: self.proc.poll() is not None or accepts(self.port), 10)
        if self.proc.poll() is not None:
            raise AssertionError('dnsmasq exited: %s' % self.output())

    @property
    def address(self):
        return '127.0.0.1:%d' % self.port

    def write_hosts(self, lines):
        with open(self.hosts_path + '.new', 'w') as f:
            f.write(''.join(line + '\n' for line in lines))
        os.rename(self.hosts_path + '.new', self.hosts_path)

    def set_hosts(self, lines):
        self.write_hosts(lines)
        self.proc.send_signal(signal.SIGHUP)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def output(self):
        with open(self.log_path, 'rb') as f:
            return f.read().decode('utf-8', 'replace')

    def close(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def question_of(query):
    """(id, question name in wire form, type) of a query, read here by hand."""
    at = 12
    while query[at]:
        at += 1 + query[at]
    return struct.unpack('!H', query[:2])[0], query[12:at + 1], struct.unpack('!H', query[at + 1:at + 3])[0]


def answer(query_id, qname, qtype, addresses=(), flags=0x8180, ttl=TTL):
    """A response to a question of qname/qtype carrying these IPv4 addresses as A records
    (each naming the question's name by a pointer to it)."""
    records = b''.join(b'\xc0\x0c' + struct.pack('!HHIH', 1, 1, ttl, 4) + socket.inet_aton(a) for a in addresses)
    return (struct.pack('!HHHHHH', query_id, flags, 1, len(addresses), 0, 0) + qname +
            struct.pack('!HH', qtype, 1) + records)


class OwnDns(object):
    """Our own DNS server on 127.0.0.1:port, UDP and TCP.  udp(query) -> the datagrams to
    send back (the last one may be the answer); tcp(query) -> the answer over TCP.
    queries: ('udp' or 'tcp', name, type) of each query, in order."""

    def __init__(self, udp, tcp=None):
        self.udp_answers = udp
        self.tcp_answer = tcp
        self.queries = []
        self.stopping = threading.Event()
        # A port of this process's block (free_port): nothing else takes it over UDP or TCP.
        self.port = free_port()
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.tcp = socket.socket()
        try:
            self.udp.bind(('127.0.0.1', self.port))
            self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.tcp.bind(('127.0.0.1', self.port))
            self.tcp.listen(8)
        except OSError:
            self.udp.close()
            self.tcp.close()
            raise
        for sock in (self.udp, self.tcp):
            sock.settimeout(0.05)      # to see stopping
        self.threads = [threading.Thread(target=self.serve_udp, daemon=True),
                        threading.Thread(target=self.serve_tcp, daemon=True)]
        for thread in self.threads:
            thread.start()

    @property
    def address(self):
        return '127.0.0.1:%d' % self.port

    def serve_udp(self):
        while not self.stopping.is_set():
            try:
                query, peer = self.udp.recvfrom(4096)
            except socket.timeout:
                continue
            _, qname, qtype = question_of(query)
            self.queries.append(('udp', qname, qtype))
            for datagram in self.udp_answers(query):
                self.udp.sendto(datagram, peer)

    def serve_tcp(self):
        while not self.stopping.is_set():
            try:
                conn, _ = self.tcp.accept()
            except socket.timeout:
                continue
            with conn:
                conn.settimeout(5)
                data = b''
                while len(data) < 2 or len(data) < 2 + struct.unpack('!H', data[:2])[0]:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                query = data[2:]
                _, qname, qtype = question_of(query)
                self.queries.append(('tcp', qname, qtype))
                reply = self.tcp_answer(query)
                conn.sendall(struct.pack('!H', len(reply)) + reply)

    def close(self):
        self.stopping.set()
        for thread in self.threads:
            thread.join(5)
        self.udp.close()
        self.tcp.close()


# -- backends and the config ------------------------------------------------------

def name_then_echo(conn, backend):
    """Say our name (one line), then echo: a client knows its host and can go on talking."""
    conn.sendall(backend.name.encode() + b'\n')
    echo(conn, backend)


def discover_xml(discover, hosts='', check='', scheduler='roundrobin', listen_port=None):
    return ('  <service name="web">\n    <listen ip="127.0.0.1:%d"/>\n'
            '    <group name="main" scheduler="%s">\n%s      <discover %s/>\n    </group>\n%s  </service>\n'
            % (listen_port or free_port(), scheduler, hosts, discover, check))


class DiscoveryCase(BalancerCase):

    def backend_at(self, ip, port, handler=say_name):
        """A backend on ip:port, named after its address's last number ('11' for 127.0.0.11)."""
        sock = socket.socket(socket.AF_INET6 if ':' in ip else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((ip, port))
        backend = AdoptedBackend(sock, handler, ip.rsplit('.', 1)[-1])
        self.addCleanup(backend.close)
        return backend

    def dnsmasq(self, hosts=(), options=()):
        server = Dnsmasq(hosts, options)
        self.addCleanup(server.close)
        return server

    def own_dns(self, udp, tcp=None):
        server = OwnDns(udp, tcp)
        self.addCleanup(server.close)
        return server

    def group(self):
        return self.balancer.snapshot()['services'][0]['groups'][0]

    def hosts(self):
        """{address: state} of the group's hosts."""
        return dict((h['ip'], h['state']) for h in self.group()['hosts'])

    def discover(self, index=0):
        return self.group()['discover'][index]

    def served_by(self, count):
        """The names of the hosts count clients got, in order."""
        return [exchange(self.balancer.port()).decode() for _ in range(count)]

    def serving(self, hosts):
        """The names of the hosts 3 * hosts clients got, as a set: each worker takes its own
        turns (roundrobin), but one of two takes at least half the clients, so every host."""
        return set(self.served_by(3 * hosts))


# -- on dnsmasq --------------------------------------------------------------------

class DnsmasqTest(DiscoveryCase):

    def start_a(self, names=('11', '12'), keep='last', extra='', check='', **root):
        """web.test with A records 127.0.0.N for each name, a backend on each at one port."""
        self.port = free_port()
        self.dns = self.dnsmasq(['127.0.0.%s web.test' % n for n in names], extra.split())
        self.backends = dict((n, self.backend_at('127.0.0.%s' % n, self.port)) for n in names)
        xml = discover_xml('name="web.test" port="%d" resolver="%s" interval="0.5" keep="%s"'
                           % (self.port, self.dns.address, keep), check=check)
        self.start(xml, **root)
        wait_until(lambda: len(self.hosts()) == len(names), 10)

    def address(self, n):
        return '127.0.0.%s:%d' % (n, self.port)

    def test_two_records_serve_a_third_joins_and_a_removed_one_drains(self):
        self.start_a()
        self.assertEqual(self.hosts(), {self.address(11): 'up', self.address(12): 'up'})
        self.assertEqual(self.serving(2), {'11', '12'})
        # A third record: picked up within the interval and the TTL (and time for a busy machine).
        self.backend_at('127.0.0.13', self.port)
        self.dns.set_hosts(['127.0.0.%d web.test' % n for n in (11, 12, 13)])
        began = time.monotonic()
        wait_until(lambda: len(self.hosts()) == 3, 0.5 + TTL + 5)
        self.assertLess(time.monotonic() - began, 0.5 + TTL + 5)
        self.assertEqual(self.serving(3), {'11', '12', '13'})
        # A client on 12, which then leaves the name.
        self.backends['12'].handler = name_then_echo
        held = None
        for _ in range(12):
            sock = connect(self.balancer.port())
            if sock.recv(3) == b'12\n':
                held = sock
                break
            sock.close()
        self.assertIsNotNone(held)
        self.addCleanup(held.close)
        mark = LOG.mark()
        self.dns.set_hosts(['127.0.0.11 web.test', '127.0.0.13 web.test'])
        wait_until(lambda: self.address(12) not in self.hosts(), 0.5 + TTL + 5)
        LOG.wait_for('host web.test-127.0.0.12-%d (%s) removed from web/main' % (self.port, self.address(12)), mark)
        LOG.wait_for('discover web.test in web/main: 2 host(s) from DNS: -web.test-127.0.0.12-%d' % self.port, mark)
        # New clients go to the others; the one on 12 is untouched, and goes on.
        self.assertEqual(self.serving(2), {'11', '13'})
        held.sendall(b'still here')
        held.shutdown(socket.SHUT_WR)
        self.assertEqual(recv_all(held), b'still here')

    def test_a_and_aaaa_records(self):
        port = free_port()
        dns = self.dnsmasq(options=['--host-record=web.test,127.0.0.11,::1'])
        self.backend_at('127.0.0.11', port)
        six = self.backend_at('::1', port)
        six.name = 'six'
        self.start(discover_xml('name="web.test" port="%d" resolver="%s"' % (port, dns.address)))
        wait_until(lambda: len(self.hosts()) == 2, 10)
        self.assertEqual(sorted(self.hosts()), ['127.0.0.11:%d' % port, '[::1]:%d' % port])
        self.assertEqual(self.serving(2), {'11', 'six'})

    def test_srv_two_ports_on_one_ip_and_weights(self):
        first, second, third = free_port(), free_port(), free_port()
        dns = self.dnsmasq(options=['--host-record=one.test,127.0.0.21',
                                    '--srv-host=_web._tcp.test,one.test,%d,10,1' % first,
                                    '--srv-host=_web._tcp.test,one.test,%d,10,3' % second,
                                    '--srv-host=_web._tcp.test,one.test,%d,20,5' % third])    # a later priority
        for port, name in ((first, 'first'), (second, 'second'), (third, 'third')):
            self.backend_at('127.0.0.21', port).name = name
        self.start(discover_xml('name="_web._tcp.test" type="srv" resolver="%s"' % dns.address))
        wait_until(lambda: len(self.hosts()) == 2, 10)
        hosts = dict((h['ip'], h['weight']) for h in self.group()['hosts'])
        self.assertEqual(hosts, {'127.0.0.21:%d' % first: 1, '127.0.0.21:%d' % second: 3})
        served = self.served_by(8)
        if not self.workers:    # roundrobin, 1:3, in one process: any 4 picks in a row
            self.assertEqual((served.count('first'), served.count('second')), (2, 6))
        self.assertEqual(set(served), {'first', 'second'})
        self.assertEqual(self.discover()['notes'], ['1 record(s) of a priority after 10 left out'])

    def test_dns_down_keeps_the_last_answer(self):
        self.start_a()
        mark = LOG.mark()
        self.dns.stop()
        LOG.wait_for('discover web.test in web/main failed (refused): 127.0.0.1:%d refused the query (nothing '
                     'listens there); keeping the 2 host(s) of its last answer' % self.dns.port, mark, timeout=10)
        self.assertEqual(self.serving(2), {'11', '12'})
        wait_until(lambda: self.discover()['failures']['refused'] >= 2, 10)     # asked again, and counted
        self.assertTrue(self.discover()['failing'])
        self.assertEqual(len(self.hosts()), 2)
        # Back: the same hosts, still up, kept their counters.
        total = sum(h['total'] for h in self.group()['hosts'])
        self.dns.start()
        LOG.wait_for('discover web.test in web/main answers again', mark, timeout=10)
        self.assertFalse(self.discover()['failing'])
        self.assertEqual(self.hosts(), {self.address(11): 'up', self.address(12): 'up'})
        self.assertEqual(sum(h['total'] for h in self.group()['hosts']), total)

    def test_dns_down_with_keep_empty_empties_the_group(self):
        self.start_a(keep='empty')
        mark = LOG.mark()
        self.dns.stop()
        LOG.wait_for('discover web.test in web/main failed (refused): 127.0.0.1:%d refused the query (nothing '
                     'listens there); keep="empty": removed its 2 host(s)' % self.dns.port, mark, timeout=10)
        wait_until(lambda: self.hosts() == {}, 5)
        self.assertEqual(exchange(self.balancer.port()), b'')       # no host: closed
        self.dns.start()
        wait_until(lambda: len(self.hosts()) == 2, 10)

    def test_nxdomain_is_handled_like_dns_down(self):
        self.start_a()
        mark = LOG.mark()
        self.dns.set_hosts([])
        LOG.wait_for('discover web.test in web/main failed (nxdomain): NXDOMAIN for web.test A from %s; '
                     'keeping the 2 host(s) of its last answer' % self.dns.address, mark, timeout=10)
        self.assertEqual(len(self.hosts()), 2)
        self.assertEqual(self.serving(2), {'11', '12'})
        self.assertGreaterEqual(self.discover()['failures']['nxdomain'], 1)

    def test_an_empty_answer_is_handled_like_dns_down(self):
        # web.test keeps a TXT record: its A and AAAA questions get NOERROR and no record.
        self.start_a(keep='empty', extra='--txt-record=web.test,here')
        mark = LOG.mark()
        self.dns.set_hosts([])
        LOG.wait_for('discover web.test in web/main failed (empty): no A or AAAA record for web.test; '
                     'keep="empty": removed its 2 host(s)', mark, timeout=10)
        wait_until(lambda: self.hosts() == {}, 5)
        self.assertGreaterEqual(self.discover()['failures']['empty'], 1)

    def test_new_hosts_are_checked_first(self):
        check = '    <check interval="0.2" timeout="1" rise="1" fall="1"/>\n'
        mark = LOG.mark()
        self.start_a(check=check)
        name = 'web.test-127.0.0.11-%d' % self.port
        LOG.wait_for('host %s (%s) in web/main up: answered 1 probe(s)' % (name, self.address(11)), mark, timeout=10)
        host = [h for h in self.group()['hosts'] if h['name'] == name][0]
        self.assertEqual([(c['from'], c['to']) for c in host['timeline']], [('down', 'up')])
        self.assertEqual(host['discovered'], 'web.test')

    def test_an_address_a_host_of_the_file_holds_stays_its(self):
        self.port = free_port()
        self.dns = self.dnsmasq(['127.0.0.11 web.test', '127.0.0.12 web.test'])
        self.backend_at('127.0.0.11', self.port)
        self.backend_at('127.0.0.12', self.port)
        mark = LOG.mark()
        self.start(discover_xml('name="web.test" port="%d" resolver="%s"' % (self.port, self.dns.address),
                                hosts='      <host name="static" ip="127.0.0.11:%d"/>\n' % self.port))
        wait_until(lambda: len(self.hosts()) == 2, 10)
        self.assertEqual(sorted(h['name'] for h in self.group()['hosts']),
                         ['static', 'web.test-127.0.0.12-%d' % self.port])
        answers = self.discover()['answers']
        wait_until(lambda: self.discover()['answers'] >= answers + 2, 10)    # asked again: nothing changes
        self.assertEqual(len([l for l in LOG.since(mark) if 'host(s) from DNS' in l]), 1)
        self.assertEqual(self.serving(2), {'11', '12'})

    def test_running_xml_keeps_the_discover_and_the_pages_show_it(self):
        self.start_a()
        director = self.balancer.director
        xml = self.balancer.call(director.running_xml)
        self.assertIn('<discover name="web.test" resolver="%s" port="%d" interval="0.5"/>'
                      % (self.dns.address, self.port), xml)
        self.assertNotIn('127.0.0.11', xml)
        self.assertEqual(pydirector.ConfigDiff(pydirector.parse_config(xml, 'running.xml'), self.balancer.config)
                         .services['web'].groups['main'].settings, [])
        d = self.discover()
        self.assertEqual((d['name'], d['type'], d['hosts'], d['ttl'], d['last_error'], d['server']),
                         ('web.test', 'a', 2, TTL, None, self.dns.address))
        self.assertIsNotNone(d['last_answer'])
        info = self.balancer.call(director.explain, 'web', '10.0.0.1')
        self.assertEqual(info['from_dns'], {'web.test-127.0.0.11-%d' % self.port: 'web.test',
                                            'web.test-127.0.0.12-%d' % self.port: 'web.test'})
        text = pydirector_admin.render_explain(info)
        self.assertRegex(text, r'\nhost: web\.test-127\.0\.0\.1[12]-%d 127\.0\.0\.1[12]:%d \(from DNS: web\.test\)\n'
                         % (self.port, self.port))
        self.assertIn('from DNS: 2 host(s) of the group from discover web.test\n', text)
        snapshot = self.balancer.snapshot()
        metrics = pydirector_admin.render_metrics(snapshot)
        labels = '{service="web",group="main",discover="web.test"}'
        self.assertIn('pydirector_discover_hosts%s 2\n' % labels, metrics)
        self.assertIn('pydirector_discover_failing%s 0\n' % labels, metrics)
        self.assertIn('pydirector_discover_ttl_seconds%s %d\n' % (labels, TTL), metrics)
        self.assertIn('pydirector_discover_failures_total{service="web",group="main",discover="web.test",'
                      'reason="nxdomain"} 0\n', metrics)
        page = pydirector_admin.render_running(snapshot, 'admin', True)
        self.assertIn('%s <span class="note">(from DNS: web.test)</span>' % self.address(11), page)
        self.assertIn('<td>web.test <span class="note">(A port %d, keep last)</span></td>' % self.port, page)

    def test_reload_adds_changes_and_removes_a_discover(self):
        self.port = free_port()
        dns = self.dnsmasq(['127.0.0.11 web.test', '127.0.0.12 other.test'])
        self.backend_at('127.0.0.11', self.port)
        self.backend_at('127.0.0.12', self.port)
        static = self.backend(say_name, 'static')
        listen = free_port()
        directory = tempfile.mkdtemp(prefix='pydirector-test-')
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, 'live.xml')

        def xml(discover=None):
            return config_xml(
                '  <service name="web">\n    <listen ip="127.0.0.1:%d"/>\n'
                '    <group name="main" scheduler="roundrobin">\n      <host name="static" ip="%s"/>\n%s'
                '    </group>\n  </service>\n' % (listen, static.address, '      <discover name="%s" port="%d" '
                                                    'resolver="%s"/>\n' % (discover, self.port, dns.address)
                                                    if discover else ''))

        def reload(discover):
            with open(path, 'w') as f:
                f.write(xml(discover))
            message = self.balancer.director.reload()
            self.balancer.sync()
            return message

        self.start(xml('web.test'), path=path)
        wait_until(lambda: len(self.hosts()) == 2, 10)
        self.assertEqual(self.serving(2), {'11', 'static'})
        message = reload('other.test')
        self.assertIn('+discover main/other.test', message)
        self.assertIn('-discover main/web.test', message)
        wait_until(lambda: sorted(self.hosts()) == sorted([static.address, '127.0.0.12:%d' % self.port]), 10)
        self.assertEqual(self.serving(2), {'12', 'static'})
        # Changed: asked again at once; its hosts stay meanwhile (the same name, the same answer).
        message = reload('OTHER.test')
        self.assertIn('discover main/OTHER.test', message)
        self.assertEqual(self.serving(2), {'12', 'static'})
        message = reload(None)
        self.assertIn('-discover main/OTHER.test', message)
        self.assertEqual(self.hosts(), {static.address: 'up'})
        self.assertEqual(self.serving(1), {'static'})

    def test_more_than_a_group_holds_is_cut(self):
        # 1,100 A records: a 17 KB answer, truncated over UDP and read over TCP; 1,000 kept.
        names = ['127.0.%d.%d web.test' % (1 + i // 250, 1 + i % 250) for i in range(1100)]
        dns = self.dnsmasq(names)
        mark = LOG.mark()
        self.start(discover_xml('name="web.test" port="9" resolver="%s"' % dns.address))
        wait_until(lambda: len(self.hosts()) == 1000, 20)
        LOG.wait_for('discover web.test in web/main: 1100 backend(s), more than the group has room for '
                     '(1000 in all from DNS): 100 left out', mark)
        d = self.discover()
        self.assertEqual((d['found'], d['left_out'], d['hosts']), (1100, 100, 1000))
        self.assertGreaterEqual(d['tcp'], 1)
        # The next answers keep the same thousand: nothing churns.
        answers = d['answers']
        wait_until(lambda: self.discover()['answers'] >= answers + 2, 10)
        self.assertNotIn('removed from web/main', '\n'.join(LOG.since(mark)))

    def test_a_restarted_worker_gets_the_hosts_from_dns(self):
        if not self.workers:
            self.skipTest('workers only')
        self.start_a()
        pids = self.balancer.worker_pids()
        mark = LOG.mark()
        os.kill(pids[0], signal.SIGKILL)
        new = wait_until(lambda: self.balancer.worker_pids()[0] not in (pids[0], None) and
                         self.balancer.worker_pids()[0], 15)
        LOG.wait_for('worker 1 (pid %d) ready' % new, mark, timeout=15)
        # Only the new worker accepts meanwhile: the other is stopped.
        os.kill(pids[1], signal.SIGSTOP)
        try:
            wait_until(lambda: process_state(pids[1]) == 'T', 5)
            self.assertEqual(sorted(self.served_by(4)), ['11', '11', '12', '12'])
        finally:
            os.kill(pids[1], signal.SIGCONT)


    def test_a_repaired_worker_gets_the_hosts_from_dns(self):
        if not self.workers:
            self.skipTest('workers only')
        self.start_a()
        master = self.balancer.master
        first, second = self.balancer.worker_pids()
        mark = LOG.mark()

        def stray_worker_1():
            # Worker 1 loses its hosts from DNS (a change the master never made), then
            # cannot apply a change: the master sends it the whole running config again.
            worker = master.workers[0]
            master.send_to(worker, 'call', method='set_discovered', args=['web', 'main', 'web.test', []],
                           kwargs={}, slots=[], seq=master.seq)
            master.send_to(worker, 'call', method='del_host', args=['web', 'main', 'nosuch'], kwargs={},
                           slots=[], seq=master.seq)
        self.balancer.call(stray_worker_1)
        LOG.wait_for("worker 1 (pid %d) could not apply del_host: no host 'nosuch' in web/main; "
                     "sending it the running config again" % first, mark)
        self.balancer.call(lambda: master.send_all('sticky', entries=[]))     # acknowledged after the repair
        os.kill(second, signal.SIGSTOP)
        try:
            wait_until(lambda: process_state(second) == 'T', 5)
            self.assertEqual(sorted(self.served_by(4)), ['11', '11', '12', '12'])
        finally:
            os.kill(second, signal.SIGCONT)


class DnsmasqWorkersTest(WorkersMixin, DnsmasqTest):
    """The same with a master, which asks, and two workers, which get what it found."""


# -- on a server of our own ------------------------------------------------------

class OwnServerTest(DiscoveryCase):

    def start_on(self, server, backend_ip='127.0.0.11', **discover):
        self.port = free_port()
        self.backend_at(backend_ip, self.port)
        attrs = 'name="web.test" port="%d" resolver="%s" interval="0.5"' % (self.port, server.address)
        self.start(discover_xml(attrs + ''.join(' %s="%s"' % kv for kv in discover.items())))

    def test_a_truncated_answer_is_asked_again_over_tcp(self):
        def udp(query):
            query_id, qname, qtype = question_of(query)
            return [answer(query_id, qname, qtype, flags=0x8380)]      # TC, and nothing in it

        def tcp(query):
            query_id, qname, qtype = question_of(query)
            return answer(query_id, qname, qtype, ['127.0.0.11'] if qtype == 1 else [])

        server = self.own_dns(udp, tcp)
        self.start_on(server)
        wait_until(lambda: len(self.hosts()) == 1, 10)
        self.assertEqual(self.served_by(1), ['11'])
        self.assertGreaterEqual(self.discover()['tcp'], 2)
        wanted = b'\x03web\x04test\x00'
        self.assertEqual(server.queries[:4], [('udp', wanted, 1), ('tcp', wanted, 1), ('udp', wanted, 28),
                                              ('tcp', wanted, 28)])

    def test_answers_with_the_wrong_id_or_question_are_ignored(self):
        def udp(query):
            query_id, qname, qtype = question_of(query)
            wanted = ['127.0.0.11'] if qtype == 1 else []
            return [answer(query_id ^ 0x5a5a, qname, qtype, ['127.0.0.66']),                 # not our ID
                    answer(query_id, b'\x05other\x04test\x00', qtype, ['127.0.0.67']),      # not our name
                    answer(query_id, qname, 16, ['127.0.0.68']),                             # not our type
                    struct.pack('!HHHHHH', query_id, 0x8180, 1, 0, 0, 0) + b'\xc0\x0c',       # a pointer loop
                    answer(query_id, qname, qtype, wanted)]

        server = self.own_dns(udp)
        mark = LOG.mark()
        self.start_on(server)
        wait_until(lambda: len(self.hosts()) == 1, 10)
        self.assertEqual(list(self.hosts()), ['127.0.0.11:%d' % self.port])
        self.assertGreaterEqual(self.discover()['ignored'], 8)      # four before each of two answers
        LOG.wait_for('discover web.test in web/main: ignored 8 DNS message(s) that were not the answer: wrong ID '
                     'from %s; a question not ours from %s; a question not ours from %s...'
                     % ((server.address,) * 3), mark)

    def test_no_answer_is_a_timeout(self):
        server = self.own_dns(lambda query: [])
        mark = LOG.mark()
        self.start_on(server)
        LOG.wait_for('discover web.test in web/main failed (timeout): no answer from %s within %g s; no hosts '
                     'from it yet' % (server.address, pydirector.DNS_TIMEOUT), mark, timeout=10)
        self.assertEqual(self.hosts(), {})
        self.assertGreaterEqual(self.discover()['failures']['timeout'], 1)

    def test_servfail_keeps_the_last_answer(self):
        state = {'fail': False}

        def udp(query):
            query_id, qname, qtype = question_of(query)
            if state['fail']:
                return [answer(query_id, qname, qtype, flags=0x8182)]     # SERVFAIL
            return [answer(query_id, qname, qtype, ['127.0.0.11'] if qtype == 1 else [])]

        server = self.own_dns(udp)
        self.start_on(server)
        wait_until(lambda: len(self.hosts()) == 1, 10)
        mark = LOG.mark()
        state['fail'] = True
        LOG.wait_for('discover web.test in web/main failed (servfail): SERVFAIL for web.test A from %s; keeping '
                     'the 1 host(s) of its last answer' % server.address, mark, timeout=10)
        self.assertEqual(self.served_by(1), ['11'])


# -- the wire format, on its own ----------------------------------------------------

def message(header, body=b''):
    return struct.pack('!HHHHHH', *header) + body


QUESTION = b'\x03web\x04test\x00\x00\x01\x00\x01'


class WireTest(unittest.TestCase):
    """pydirector's DNS messages, built and read; every malformed one a DnsError."""

    def test_a_query(self):
        query = pydirector.dns_query(0x1234, pydirector.dns_name('Web.Test.'), pydirector.DNS_A)
        self.assertEqual(query, message((0x1234, 0x0100, 1, 0, 0, 1), QUESTION) +
                         b'\x00\x00\x29\x10\x00\x00\x00\x00\x00\x00\x00')   # OPT: 4096 bytes, version 0
        plain = pydirector.dns_query(7, pydirector.dns_name('web.test'), pydirector.DNS_A, edns=False)
        self.assertEqual(plain, message((7, 0x0100, 1, 0, 0, 0), QUESTION))

    def test_names(self):
        self.assertEqual(pydirector.dns_name('.'), b'\x00')
        self.assertEqual(pydirector.dns_name_text(b'\x00'), '.')
        self.assertEqual(pydirector.dns_name_text(b'\x03a\nb\x00'), 'a\\nb')
        for bad in ('a..b', 'x' * 64 + '.test', '.'.join(['abcdefgh'] * 29)):
            with self.assertRaises(ValueError):
                pydirector.dns_name(bad)

    def test_an_answer_with_pointers_and_a_cname(self):
        body = (QUESTION +
                b'\xc0\x0c' + struct.pack('!HHIH', 5, 1, 30, 6) + b'\x03www\xc0\x10' +     # web.test CNAME www.test
                b'\xc0\x26' + struct.pack('!HHIH', 1, 1, 7, 4) + bytes([10, 0, 0, 1]) +    # www.test A 10.0.0.1
                b'\xc0\x26' + struct.pack('!HHIH', 1, 1, 0xFFFFFFFF, 4) + bytes([10, 0, 0, 2]))
        parsed = pydirector.parse_dns_message(message((9, 0x8180, 1, 3, 0, 0), body))
        self.assertEqual(parsed.question, (b'\x03web\x04test\x00', 1, 1))
        self.assertEqual([(r.name, r.type, r.ttl, r.value) for r in parsed.records],
                         [(b'\x03web\x04test\x00', 5, 30, b'\x03www\x04test\x00'),
                          (b'\x03www\x04test\x00', 1, 7, '10.0.0.1'),
                          (b'\x03www\x04test\x00', 1, 0, '10.0.0.2')])     # a TTL with its top bit set: 0
        self.assertIsNone(pydirector.dns_problem(parsed, 9, b'\x03web\x04test\x00', 1))
        self.assertEqual(pydirector.dns_problem(parsed, 8, b'\x03web\x04test\x00', 1), 'wrong ID')
        self.assertEqual(pydirector.dns_problem(parsed, 9, b'\x03web\x04test\x00', 28), 'a question not ours')

    def test_malformed_messages(self):
        cases = {
            'shorter than a DNS header': b'\x00' * 11,
            'a compression pointer that does not point back': message((1, 0x8180, 1, 0, 0, 0), b'\xc0\x0c'),
            'a name runs past the end of the message': message((1, 0x8180, 1, 0, 0, 0), b'\x05ab'),
            'a label of a reserved type (0x40)': message((1, 0x8180, 1, 0, 0, 0), b'\x40'),
            'a question runs past the end of the message': message((1, 0x8180, 1, 0, 0, 0), b'\x00\x00'),
            'a record runs past the end of the message': message((1, 0x8180, 1, 1, 0, 0), QUESTION + b'\xc0\x0c' +
                                                                 struct.pack('!HHIH', 1, 1, 1, 8) + b'\x01\x02\x03\x04'),
            'an A record of 3 bytes': message((1, 0x8180, 1, 1, 0, 0), QUESTION + b'\xc0\x0c' +
                                              struct.pack('!HHIH', 1, 1, 1, 3) + b'\x01\x02\x03'),
            'a SRV record whose name does not fill it': message((1, 0x8180, 1, 1, 0, 0), QUESTION + b'\xc0\x0c' +
                                                                struct.pack('!HHIH', 33, 1, 1, 9) +
                                                                b'\x00\x01\x00\x01\x00\x50\x00\x00\x00'),
            'a name longer than 255 octets': message((1, 0x8180, 1, 0, 0, 0), (b'\x3f' + b'a' * 63) * 5 +
                                                     b'\x00\x00\x01\x00\x01'),
            # A pointer to a later pointer back to the first: each jump must go back, so no loop.
            'a compression pointer that does not point back ': message((1, 0x8180, 1, 0, 0, 0),
                                                                       b'\xc0\x0e\xc0\x0c'),
        }
        for reason, data in cases.items():
            with self.subTest(reason=reason):
                with self.assertRaises(pydirector.DnsError) as cm:
                    pydirector.parse_dns_message(data)
                self.assertEqual(str(cm.exception), reason.strip())

    def test_counts_larger_than_the_message_cost_nothing(self):
        data = message((1, 0x8180, 1, 65535, 65535, 65535), QUESTION)
        began = time.monotonic()
        with self.assertRaises(pydirector.DnsError):
            pydirector.parse_dns_message(data)
        self.assertLess(time.monotonic() - began, 0.1)

    def test_random_damage_is_only_ever_a_dns_error(self):
        good = message((9, 0x8180, 1, 2, 0, 1), QUESTION +
                       b'\xc0\x0c' + struct.pack('!HHIH', 33, 1, 5, 12) + b'\x00\x0a\x00\x05\x1f\x90\x03one\xc0\x10' +
                       b'\xc0\x0c' + struct.pack('!HHIH', 28, 1, 5, 16) + bytes(range(16)) +
                       b'\x03one\xc0\x10' + struct.pack('!HHIH', 1, 1, 5, 4) + bytes([127, 0, 0, 1]))
        self.assertEqual(len(pydirector.parse_dns_message(good).records), 2)
        rng = random.Random(32)
        for _ in range(5000):
            data = bytearray(good)
            for _ in range(rng.randint(1, 6)):
                if rng.random() < 0.2 and len(data) > 12:
                    del data[rng.randrange(12, len(data)):]
                else:
                    data[rng.randrange(len(data))] = rng.randrange(256)
            try:
                pydirector.parse_dns_message(bytes(data))
            except pydirector.DnsError:
                pass

    def test_srv_weights(self):
        self.assertEqual(pydirector.srv_weights([0, 1, 3, 1000]), [1, 1, 3, 1000])
        self.assertEqual(pydirector.srv_weights([0, 5, 7000, 65535]), [1, 1, 107, 1000])

    def test_default_resolver(self):
        directory = tempfile.mkdtemp(prefix='pydirector-test-')
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, 'resolv.conf')
        with open(path, 'w') as f:
            f.write('# a comment\nsearch example\nnameserver fd00::53\nnameserver 10.0.0.2\n')
        self.assertEqual(pydirector.default_resolver(path), ('fd00::53', 53))
        with open(path, 'w') as f:
            f.write('nameserver not-an-address\n')
        self.assertEqual(pydirector.default_resolver(path), ('127.0.0.1', 53))
        self.assertEqual(pydirector.default_resolver(os.path.join(directory, 'missing')), ('127.0.0.1', 53))


class DiscoverConfigTest(unittest.TestCase):

    def config(self, discover, hosts=''):
        return ('<pdconfig>\n  <service name="web">\n    <listen ip="127.0.0.1:1"/>\n'
                '    <group name="main" scheduler="roundrobin">\n%s      %s\n    </group>\n  </service>\n'
                '</pdconfig>\n' % (hosts, discover))

    def test_errors(self):
        cases = [
            ('<discover name="web.test"/>', "<discover> 'web.test': type a needs port (the port of every address)"),
            ('<discover name="web test" port="80"/>',
             "<discover> name 'web test': not a DNS name (letters, digits, - and _, in labels of 1-63 separated by "
             "dots, at most 253 in all)"),
            ('<discover name="w.test" port="80" type="mx"/>', "<discover> type 'mx': must be 'a' or 'srv'"),
            ('<discover name="w.test" port="80" resolver="dns.test:53"/>',
             "<discover> resolver 'dns.test:53': must be an IP address, with :PORT or without (port 53)"),
            ('<discover name="w.test" port="80" min_ttl="10" max_ttl="5"/>',
             "<discover> 'w.test': min_ttl 10 is more than max_ttl 5"),
            ('<discover name="w.test" port="80" keep="none"/>', "<discover> keep 'none': must be 'last' or 'empty'"),
            ('<discover name="w.test" port="80"/><discover name="W.TEST." type="srv"/>',
             "group 'main': duplicate discover 'W.TEST.'"),
            ('<discover name="w.test" port="80"><host ip="1.2.3.4:5"/></discover>',
             'unknown element <host> in <discover> (expected: none)'),
        ]
        for discover, error in cases:
            with self.subTest(discover=discover):
                with self.assertRaises(pydirector.ConfigError) as cm:
                    pydirector.parse_config(self.config(discover), 'x.xml')
                self.assertEqual(str(cm.exception), 'x.xml:5: ' + error)

    def test_written_back_and_shown(self):
        config = pydirector.parse_config(self.config('<discover name="_web._tcp.test" type="srv" resolver="::1"/>',
                                                     '      <host name="one" ip="127.0.0.1:2"/>\n'), 'x.xml')
        discover = config.services[0].groups[0].discovers[0]
        self.assertEqual((discover.type, discover.port, discover.keep, discover.min_ttl, discover.max_ttl,
                          discover.interval), ('srv', None, 'last', 1.0, 300.0, 5.0))
        self.assertIn('      <host name="one" ip="127.0.0.1:2"/>\n'
                      '      <discover name="_web._tcp.test" type="srv" resolver="::1"/>\n', config.to_xml())
        self.assertIn('    discover _web._tcp.test: type srv, resolver ::1, interval 5s, min_ttl 1s, max_ttl 300s, '
                      'keep last', pydirector.summary(config))
        self.assertEqual(pydirector.resolver_address('::1'), ('::1', 53))
        self.assertEqual(pydirector.resolver_address('[::1]:5353'), ('::1', 5353))

    def test_a_discover_is_a_difference_the_admin_cannot_make(self):
        old = pydirector.parse_config(self.config('<discover name="w.test" port="80"/>'), 'x.xml')
        new = pydirector.parse_config(self.config('<discover name="w.test" port="81"/>'), 'x.xml')
        plan = pydirector_admin.plan_changes(old, new)
        self.assertEqual(plan.problems, ['web/main: <discover name="w.test" port="80"/> -> '
                                         '<discover name="w.test" port="81"/>'])
        self.assertEqual(plan.steps, [])


if __name__ == '__main__':
    unittest.main()
