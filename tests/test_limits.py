"""Per-client limits (issue 29): <clients maxconns rate burst mode v6prefix table>.

The limiter alone first (no sockets: a clock passed in), then the shared table
the workers count in, then real clients on real sockets: distinct clients are
distinct source addresses, 127.0.0.2 and up; IPv6 clients come in PROXY
headers, as no /64 can be assumed routed to this machine's loopback.  The
balancer suites run again with two worker processes (LimitsWorkersTest), where
the limits must hold in total.
"""

import http.client
import json
import os
import shutil
import socket
import tempfile
import time
import types
import unittest

import support
from support import LOG, Backend, BalancerCase, WorkersMixin, config_xml, echo, service_xml, wait_until

import pydirector
import pydirector_admin


def limits(counts=None, **texts):
    """A ClientLimits of these <clients> attributes, counting into counts (made if None)."""
    config = pydirector.Clients(**pydirector.read_values(pydirector.CLIENTS_ATTRS, texts))
    return pydirector.ClientLimits(config, counts or types.SimpleNamespace(
        limited=0, limited_dry=0, client_evictions=0))


class ClientKeyTest(unittest.TestCase):

    def test_ipv4_counts_per_address(self):
        key = pydirector.client_key
        self.assertEqual(key('192.0.2.7'), '192.0.2.7')
        self.assertNotEqual(key('192.0.2.7'), key('192.0.2.8'))
        # An IPv4 client in IPv6 clothes (a PROXY TCP6 line, a dual-stack socket) is that IPv4 client.
        self.assertEqual(key('::ffff:192.0.2.7'), '192.0.2.7')

    def test_ipv6_counts_per_64(self):
        key = pydirector.client_key
        self.assertEqual(key('::1'), key('::2'))
        self.assertEqual(key('2001:db8:1:2::1'), key('2001:db8:1:2:ffff:ffff:ffff:ffff'))
        self.assertEqual(key('2001:db8:1:2::1'), key('2001:0db8:0001:0002:0000:0000:0000:0009'))
        self.assertNotEqual(key('2001:db8:1:2::1'), key('2001:db8:1:3::1'))
        self.assertEqual(key('fe80::1%eth0'), key('fe80::2'))
        self.assertEqual(pydirector.client_key_text(key('2001:db8:1:2::1')), '2001:db8:1:2::/64')

    def test_v6prefix(self):
        key = pydirector.client_key
        self.assertEqual(key('2001:db8:1:200::1', 56), key('2001:db8:1:2ff::1', 56))
        self.assertNotEqual(key('2001:db8:1:200::1', 56), key('2001:db8:1:300::1', 56))
        # Keys of two prefix lengths never meet (a reload may change it under open connections).
        self.assertNotEqual(key('2001:db8:1:200::1', 56), key('2001:db8:1:200::1', 64))
        self.assertEqual(pydirector.client_key_text(key('2001:db8:1:2ff::1', 56)), '2001:db8:1:200::/56')
        self.assertEqual(pydirector.client_key_text(key('2001:db8::1', 1)), '::/1')


class LimiterTest(unittest.TestCase):
    """ClientLimits in one process, its clock passed in."""

    def test_maxconns(self):
        lim = limits(maxconns='5')
        entries = [lim.admit('192.0.2.1', 10.0) for _ in range(5)]
        self.assertTrue(all(entries))
        self.assertIsNone(lim.admit('192.0.2.1', 10.0))
        self.assertEqual((lim.why, lim.counts.limited), ('maxconns', 1))
        self.assertIsNotNone(lim.admit('192.0.2.2', 10.0))      # another client
        lim.release(entries[0], 10.0)
        self.assertIsNotNone(lim.admit('192.0.2.1', 10.0))
        self.assertEqual(lim.table['192.0.2.1'].open, 5)

    def test_rate_is_a_token_bucket(self):
        lim = limits(rate='20')      # burst: 20
        passed = [lim.admit('192.0.2.1', 100.0) for _ in range(30)]
        self.assertEqual(sum(1 for e in passed if e), 20)
        self.assertEqual((lim.why, lim.counts.limited), ('rate', 10))
        self.assertIsNone(lim.admit('192.0.2.1', 100.049))
        self.assertIsNotNone(lim.admit('192.0.2.1', 100.05))    # one token a twentieth of a second
        self.assertIsNone(lim.admit('192.0.2.1', 100.05))
        later = [lim.admit('192.0.2.1', 110.0) for _ in range(30)]     # full again, not fuller
        self.assertEqual(sum(1 for e in later if e), 20)

    def test_burst(self):
        lim = limits(rate='2', burst='5')
        self.assertEqual(sum(1 for _ in range(9) if lim.admit('k', 0.0)), 5)
        self.assertEqual(sum(1 for _ in range(9) if lim.admit('k', 1.0)), 2)
        self.assertEqual(limits(rate='0.5').burst, 1)
        self.assertEqual(limits(rate='2.5').burst, 3)

    def test_both_limits(self):
        lim = limits(maxconns='2', rate='1', burst='10')
        a, b = lim.admit('k', 0.0), lim.admit('k', 0.0)
        self.assertIsNone(lim.admit('k', 0.0))
        self.assertEqual(lim.why, 'maxconns')
        lim.release(a, 0.0)
        lim.release(b, 0.0)
        passed = 0
        for _ in range(20):     # each closed at once: only the rate bites (two taken already)
            entry = lim.admit('k', 0.0)
            if entry is not None:
                passed += 1
                lim.release(entry, 0.0)
        self.assertEqual(passed, 8)
        self.assertEqual(lim.why, 'rate')
        self.assertEqual(lim.state('k', 0.0), [0, 0, 'rate'])
        self.assertEqual(lim.state('k', 1.0), [0, 1, None])
        self.assertEqual(lim.state('other', 0.0), [0, 10, None])

    def test_mode_log_counts_and_refuses_nothing_itself(self):
        lim = limits(maxconns='1', mode='log')
        self.assertIsNotNone(lim.admit('k', 0.0))
        self.assertIsNone(lim.admit('k', 0.0))       # the caller lets it through, uncounted
        self.assertEqual((lim.counts.limited, lim.counts.limited_dry), (0, 1))
        self.assertEqual(lim.table['k'].open, 1)

    def test_an_entry_holding_nothing_is_dropped(self):
        lim = limits(maxconns='5', rate='10')
        entry = lim.admit('k', 0.0)
        lim.release(entry, 0.0)         # its bucket is not full yet: kept
        self.assertIn('k', lim.table)
        entry = lim.admit('k', 5.0)
        lim.release(entry, 5.2)         # full again by then: nothing to keep
        self.assertNotIn('k', lim.table)
        entry = limits(maxconns='5')
        kept = entry.admit('k', 0.0)
        entry.release(kept, 0.0)
        self.assertEqual(len(entry.table), 0)

    def test_eviction_is_counted(self):
        lim = limits(maxconns='5', table='2')
        held = [lim.admit(key, 0.0) for key in ('a', 'b')]
        lim.admit('a', 1.0)             # a was used last: b is idle longest
        lim.admit('c', 2.0)
        self.assertEqual(list(lim.table), ['a', 'c'])
        self.assertEqual(lim.counts.client_evictions, 1)
        lim.release(held[1], 3.0)       # b's connection closes: its entry is gone, nothing breaks
        self.assertEqual(list(lim.table), ['a', 'c'])
        # An entry holding nothing that goes is no loss: not counted.
        lim = limits(rate='1', table='2')
        lim.release(lim.admit('a', 0.0), 0.0)
        lim.release(lim.admit('b', 0.0), 0.0)
        lim.admit('c', 10.0)            # a's bucket has been full since 1.0
        self.assertEqual((list(lim.table), lim.counts.client_evictions), (['b', 'c'], 0))
        lim.admit('d', 10.0)            # b's is full too by now
        self.assertEqual(lim.counts.client_evictions, 0)

    def test_sweep_drops_entries_holding_nothing(self):
        lim = limits(rate='1')
        for n in range(pydirector.CLIENT_SWEEP_MIN):
            lim.release(lim.admit('10.0.%d.%d' % (n // 256, n % 256), 0.0), 0.0)
        self.assertEqual(len(lim.table), pydirector.CLIENT_SWEEP_MIN)   # buckets not full at 0.0
        lim.admit('10.9.9.9', 5.0)
        self.assertEqual(list(lim.table), ['10.9.9.9'])
        self.assertEqual(lim.counts.client_evictions, 0)

    def test_configure_in_place(self):
        lim = limits(maxconns='3', table='5')
        for key in 'abcde':
            lim.admit(key, 0.0)
        config = pydirector.Clients(**pydirector.read_values(pydirector.CLIENTS_ATTRS,
                                                             {'maxconns': '1', 'table': '3'}))
        lim.configure(config)
        self.assertEqual(list(lim.table), ['c', 'd', 'e'])
        self.assertEqual(lim.counts.client_evictions, 2)
        self.assertIsNone(lim.admit('c', 0.0))

    def test_top(self):
        lim = limits(maxconns='100')
        for key, count in (('a', 3), ('b', 7), ('c', 1)):
            for _ in range(count):
                lim.admit(key, 0.0)
        self.assertEqual(lim.top(2), [['b', 7], ['a', 3]])


class ClientShareTest(unittest.TestCase):
    """Two workers' rows of one shared table, mapped three times in this process."""

    def share(self, lines=pydirector.CLIENT_LINES):
        master = pydirector.ClientShare.create(2, lines)
        self.addCleanup(master.close)
        rows = [pydirector.ClientShare(os.dup(master.fd), 2, row, lines) for row in (0, 1)]
        for row in rows:
            self.addCleanup(row.close)
        return master, rows

    def worker_limits(self, rows, slot=3, **texts):
        found = []
        for row in rows:
            lim = limits(**texts)
            lim.attach(row, slot)
            found.append(lim)
        return found

    def test_maxconns_holds_in_total(self):
        master, rows = self.share()
        one, two = self.worker_limits(rows, maxconns='5')
        held = [one.admit('192.0.2.1', 0.0) for _ in range(3)]
        self.assertEqual(sum(1 for _ in range(5) if two.admit('192.0.2.1', 0.0)), 2)
        self.assertEqual(two.why, 'maxconns')
        one.release(held[0], 0.0)
        self.assertIsNotNone(two.admit('192.0.2.1', 0.0))
        self.assertIsNotNone(two.admit('192.0.2.2', 0.0))      # another client
        self.assertEqual(master.totals(3), {(768, 0xC0000201): [5, 1], (768, 0xC0000202): [1, 1]})
        self.assertEqual(master.others(master.where(768, '192.0.2.1'))[0], 5)
        self.assertEqual(master.totals(4), {})                  # another service's slot

    def test_rate_holds_in_total(self):
        master, rows = self.share()
        one, two = self.worker_limits(rows, rate='10', burst='4')
        key = one.key('2001:db8::1')
        self.assertEqual(sum(1 for _ in range(3) if one.admit(key, 100.0)), 3)
        self.assertEqual(sum(1 for _ in range(3) if two.admit(key, 100.0)), 1)
        self.assertEqual(two.why, 'rate')
        self.assertIsNone(one.admit(key, 100.0))
        self.assertIsNotNone(one.admit(key, 100.1))
        self.assertIsNone(two.admit(key, 100.1))
        key, = master.totals(3)
        self.assertEqual(pydirector.shared_key_text(*key), '2001:db8::/64')

    def test_lines_found_after_removals(self):
        # Few places, so that homes collide and keys sit past them.
        master, (row, _) = self.share(lines=8)
        lim = limits(maxconns='9')
        lim.attach(row, 1)
        keys = ['10.0.0.%d' % n for n in range(8)]
        entries = dict((key, lim.admit(key, 0.0)) for key in keys)
        self.assertTrue(all(e.at >= 0 for e in entries.values()))

        def seen():
            return dict((key, master.others(master.where(256, key))[0]) for key in keys)
        self.assertEqual(seen(), dict.fromkeys(keys, 1))
        for key in keys[::2]:
            lim.release(entries[key], 0.0)
        self.assertEqual(seen(), dict((key, n % 2) for n, key in enumerate(keys)))
        for key in keys[::2]:
            entries[key] = lim.admit(key, 0.0)
        self.assertEqual(seen(), dict.fromkeys(keys, 1))
        # No line is left: the next client takes the place of the entry idle longest.
        lim.admit('10.0.1.1', 0.0)
        self.assertEqual(master.others(master.where(256, '10.0.1.1'))[0], 1)
        self.assertEqual(lim.counts.client_evictions, 1)
        master.clear_row(0)
        self.assertEqual(master.totals(1), {})

    def test_detach_leaves_nothing(self):
        master, rows = self.share()
        one, two = self.worker_limits(rows, maxconns='1')
        entry = one.admit('192.0.2.1', 0.0)
        self.assertIsNone(two.admit('192.0.2.1', 0.0))
        one.detach()
        self.assertEqual(master.totals(3), {})
        self.assertIsNotNone(two.admit('192.0.2.1', 0.0))
        one.release(entry, 0.0)         # an entry of limits gone: counted nowhere
        self.assertEqual(master.others(master.where(768, '192.0.2.1'))[0], 1)


class ConfigTest(unittest.TestCase):

    def error(self, clients):
        xml = config_xml(service_xml([('one', '127.0.0.1:9')], listen_port=9, extra=clients))
        with self.assertRaises(pydirector.ConfigError) as cm:
            pydirector.parse_config(xml, 'x.xml')
        return str(cm.exception)

    def test_errors(self):
        self.assertEqual(self.error('    <clients/>\n'),
                         'x.xml:7: <clients> needs maxconns or rate (or both): it limits nothing')
        self.assertEqual(self.error('    <clients maxconns="5" burst="3"/>\n'),
                         'x.xml:7: <clients> burst is only used with rate')
        self.assertEqual(self.error('    <clients rate="0"/>\n'),
                         "x.xml:7: <clients> rate '0': must be a number of new connections a second > 0 and <= 1e+06")
        self.assertEqual(self.error('    <clients maxconns="5" v6prefix="128"/>\n'),
                         "x.xml:7: <clients> v6prefix '128': must be an integer 1-64")
        self.assertEqual(self.error('    <clients maxconns="5"/>\n    <clients rate="1"/>\n'),
                         "x.xml:8: service 'web': more than one <clients>")


# -- real clients --------------------------------------------------------------

def client(port, source, data=b'ping', header=b''):
    """A connection from source: the socket if the balancer let it through (its data
    echoed), else None (reset or closed, at connect or later)."""
    sock = socket.socket()
    sock.settimeout(10)
    try:
        sock.bind((source, 0))
        sock.connect(('127.0.0.1', port))
        sock.sendall(header + data)
        if support.recv_all(sock, len(data)) == data:
            return sock
    except OSError:
        pass
    sock.close()
    return None


class LimitsCase(BalancerCase):

    def setUp(self):
        BalancerCase.setUp(self)
        self.echo = self.backend(echo, 'echo')

    def start_limited(self, clients, listen='', **root):
        extra = '    <clients %s/>\n' % clients if clients else ''
        xml = service_xml([('one', self.echo.address)], extra=extra)
        if listen:
            xml = xml.replace('<listen ip="127.0.0.1:%d"/>' % self.port_of(xml),
                              '<listen ip="127.0.0.1:%d" %s/>' % (self.port_of(xml), listen))
        return self.start(xml, **root)

    @staticmethod
    def port_of(xml):
        return int(xml.split('<listen ip="127.0.0.1:')[1].split('"')[0])

    def held(self, source, count, port=None):
        """count connections from source, kept open (closed at cleanup): those let through."""
        socks = [client(port or self.balancer.port(), source) for _ in range(count)]
        for sock in socks:
            if sock is not None:
                self.addCleanup(sock.close)
        return [s for s in socks if s is not None]

    def service(self):
        return self.balancer.snapshot()['services'][0]

    def counted(self, **values):
        """The service's snapshot once these keys (of it, or of its clients) have these values:
        a worker writes what stays open within its next tick (50 ms)."""
        def found():
            service = self.service()
            seen = dict((key, service[key] if key in service else service['clients'][key]) for key in values)
            return service if seen == values else None
        return wait_until(found, message='never counted %r' % (values,))

    def access_ends(self, end):
        return [l for l in LOG.since(self.mark) if l.startswith('access ') and l.endswith(' end=%s' % end)]


class LimitsTest(LimitsCase):

    def test_maxconns_per_client(self):
        self.start_limited('maxconns="5"')
        self.assertEqual(len(self.held('127.0.0.2', 10)), 5)
        wait_until(lambda: self.echo.accepted == 5)
        # Meanwhile another address is served: ten connections, one after another.
        for _ in range(10):
            sock = client(self.balancer.port(), '127.0.0.3')
            self.assertIsNotNone(sock)
            sock.close()
        wait_until(lambda: self.echo.accepted == 15)
        service = self.counted(limited=5, limited_dry=0, refused=0)
        self.assertEqual(service['clients']['top'][0], ['127.0.0.2', 5])
        wait_until(lambda: len(self.access_ends('limited')) == 5)
        self.assertTrue(all(' client=127.0.0.2:' in l and ' host=- ' in l for l in self.access_ends('limited')))
        LOG.wait_for('service web: client 127.0.0.2:', self.mark)
        self.assertIn('refused: 5 connections open (clients maxconns 5)', '\n'.join(self.log_lines()))
        self.assertEqual(self.echo.accepted, 15)    # none of the refused reached it

    def test_rate(self):
        self.start_limited('rate="20"')
        port = self.balancer.port()
        started = time.monotonic()
        socks = []
        for _ in range(100):
            sock = socket.socket()
            sock.settimeout(10)
            self.addCleanup(sock.close)
            sock.bind(('127.0.0.2', 0))
            try:
                sock.connect(('127.0.0.1', port))
                sock.sendall(b'x')
            except OSError:
                continue
            socks.append(sock)
        elapsed = time.monotonic() - started
        passed = 0
        for sock in socks:
            try:
                passed += support.recv_all(sock, 1) == b'x'
            except OSError:
                pass
        # The burst (20), and what the bucket gained meanwhile; with workers, the rare race of
        # two admitting at the same instant may let one more through.
        self.assertGreaterEqual(passed, 20)
        self.assertLessEqual(passed, 20 + int(20 * elapsed) + 1 + (2 if self.workers else 0), elapsed)
        wait_until(lambda: self.service()['limited'] == 100 - passed)
        # The bucket fills again: within a second or so, clients pass again.
        wait_until(lambda: self.held('127.0.0.2', 1), 3)

    def test_mode_log_refuses_nothing(self):
        self.start_limited('maxconns="5" mode="log"')
        self.assertEqual(len(self.held('127.0.0.2', 10)), 10)
        self.counted(limited=0, limited_dry=5)
        LOG.wait_for('service web: client 127.0.0.2:', self.mark)
        self.assertIn('would be refused (clients mode log): 5 connections open (clients maxconns 5)',
                      '\n'.join(self.log_lines()))
        self.assertEqual(self.access_ends('limited'), [])
        # What it says for a client over the limit: it would be refused, and is not.
        info = self.balancer.call(self.balancer.director.explain, 'web', '127.0.0.2')
        self.assertIn('limited: would be (mode log lets it through), 5 connections open (clients maxconns 5)',
                      pydirector_admin.render_explain(info))

    def test_ipv6_counts_per_64(self):
        # The client address is the PROXY header's: IPv6 clients from a trusted front proxy.
        self.start_limited('maxconns="2"', listen='accept_proxy="v1" trusted="127.0.0.0/8"')
        port = self.balancer.port()

        def via(source):
            return client(port, '127.0.0.2', header=('PROXY TCP6 %s 2001:db8::80 40000 443\r\n' % source).encode())
        first = [via('2001:db8:1:2::1'), via('2001:db8:1:2:ffff::9')]
        self.assertTrue(all(first))
        self.assertIsNone(via('2001:db8:1:2::77'))          # the same /64: its third
        other = via('2001:db8:1:3::1')                       # another /64
        self.assertIsNotNone(other)
        mapped = via('::ffff:192.0.2.1')        # an IPv4 client, as a front proxy may write it
        self.assertIsNotNone(mapped)
        self.addCleanup(mapped.close)
        for sock in first + [other]:
            sock.close()
        service = self.counted(limited=1, top=[['192.0.2.1', 1]])
        self.assertEqual(service['clients']['v6prefix'], 64)

    def test_eviction_is_counted(self):
        self.start_limited('maxconns="5" table="2"')
        for n in range(2, 7):
            self.assertEqual(len(self.held('127.0.0.%d' % n, 1)), 1)
        if self.workers:    # five clients on two workers: one has three or more
            service = wait_until(lambda: self.service()['client_evictions'] and self.service())
            self.assertLessEqual(service['clients']['entries'], 4)
        else:
            self.counted(client_evictions=3, entries=2)

    def test_reload_changes_the_limit_and_cuts_nothing(self):
        path = os.path.join(tempfile.mkdtemp(prefix='pydirector-limits-'), 'limits.xml')
        self.addCleanup(shutil.rmtree, os.path.dirname(path))
        self.start_limited('maxconns="2"', path=path)
        balancer = self.balancer
        port = balancer.port()
        xml = balancer.call(balancer.director.running_xml)

        def reload(clients):
            with open(path, 'w') as f:
                f.write(xml.replace('<clients maxconns="2"/>', clients))
            balancer.director.reload()
            balancer.sync()

        def flowing(socks):
            for sock in socks:
                sock.sendall(b'again')
                self.assertEqual(support.recv_all(sock, 5), b'again')
            return True
        held = self.held('127.0.0.2', 3)
        self.assertEqual(len(held), 2)
        reload('<clients maxconns="4"/>')
        self.assertTrue(flowing(held))
        held += self.held('127.0.0.2', 3)
        self.assertEqual(len(held), 4)
        reload('')      # no limits at all
        held += self.held('127.0.0.2', 1)
        self.assertEqual(len(held), 5)
        # Limits new to the service count the clients connected already.
        reload('<clients maxconns="6" mode="log"/>')
        self.assertEqual(len(self.held('127.0.0.2', 2)), 2)
        self.counted(limited_dry=1, limited=2)
        self.assertTrue(flowing(held))

    def test_explain_says_whether_and_why(self):
        self.start_limited('maxconns="3" rate="50" burst="5"')
        self.held('127.0.0.2', 3)
        director = self.balancer.director
        info = self.balancer.call(director.explain, 'web', '127.0.0.2')['clients']
        self.assertEqual((info['key'], info['open'], info['limited']), ('127.0.0.2', 3, 'maxconns'))
        text = pydirector_admin.render_explain(self.balancer.call(director.explain, 'web', '127.0.0.2'))
        self.assertIn('clients: 127.0.0.2, 3 open, ', text)
        self.assertIn('limited: yes, 3 connections open (clients maxconns 3)\n', text)
        info = self.balancer.call(director.explain, 'web', '127.0.0.3')['clients']
        self.assertEqual((info['open'], info['left'], info['limited']), (0, 5, None))
        self.assertIn('limited: no\n', pydirector_admin.render_explain(
            self.balancer.call(director.explain, 'web', '127.0.0.3')))

    def test_pages_and_metrics(self):
        self.start_limited('maxconns="2"')
        self.held('127.0.0.2', 3)
        self.held('127.0.0.3', 1)
        # (With workers, each counts the entries it holds, at its tick: a client of both is two.)
        self.counted(limited=1, top=[['127.0.0.2', 2], ['127.0.0.3', 1]])
        entries = r'\d+' if self.workers else '2'
        admin = pydirector.Admin('127.0.0.1:0', '127.0.0.1', 0, [pydirector.User(
            name='admin', password=pydirector.hash_password('pw', iterations=support.FAST_HASH_ITERATIONS),
            access='full')])
        self.balancer.call(self.balancer.director.add_user, 'admin', admin.users[0].password, 'full')
        server = pydirector_admin.start(self.balancer.director, admin)
        self.addCleanup(server.stop)

        def get(path):
            conn = http.client.HTTPConnection('127.0.0.1', server.server_address[1], timeout=10)
            try:
                conn.request('GET', path, headers={'Authorization': 'Basic YWRtaW46cHc='})
                resp = conn.getresponse()
                self.assertEqual(resp.status, 200)
                return resp.read().decode()
            finally:
                conn.close()
        running = get('/running')
        self.assertRegex(running, r'Per-client limits: maxconns 2 per address \(IPv6: per /64\)\. Refused 1; '
                                  r'addresses tracked %s of 100000; evicted 0\.' % entries)
        self.assertIn('<tr><td>127.0.0.2</td><td>2</td></tr><tr><td>127.0.0.3</td><td>1</td></tr>', running)
        clients = json.loads(get('/running.json'))['services'][0]['clients']
        self.assertEqual(clients['top'], [['127.0.0.2', 2], ['127.0.0.3', 1]])
        metrics = get('/metrics')
        self.assertIn('pydirector_service_client_limited_total{service="web"} 1\n', metrics)
        self.assertIn('pydirector_service_client_evictions_total{service="web"} 0\n', metrics)
        self.assertRegex(metrics, r'pydirector_service_client_addresses\{service="web"\} %s\n' % entries)
        explained = get('/explain?service=web&client=127.0.0.2')
        self.assertIn('limited: yes, 2 connections open (clients maxconns 2)', explained)

    def test_a_service_without_clients_tracks_nothing(self):
        self.start_limited('')
        self.assertEqual(len(self.held('127.0.0.2', 10)), 10)
        service = self.service()
        self.assertEqual((service['clients'], service['limited']), (None, 0))
        self.assertIsNone(self.balancer.call(self.balancer.director.explain, 'web', '127.0.0.2')['clients'])
        self.assertNotIn('pydirector_service_client', pydirector_admin.render_metrics(self.balancer.snapshot()))


class LimitsWorkersTest(WorkersMixin, LimitsTest):
    pass


@unittest.skipIf(pydirector.workers_unsupported(), 'no worker processes here')
class AcrossWorkersTest(LimitsCase):
    """Clients steered to one worker, then the other (the other stopped meanwhile):
    the second counts what the first let through."""

    workers = 2

    def start_limited(self, clients, listen='', **root):
        root.setdefault('worker_timeout', '60')     # a stopped worker is steering, not stuck
        return LimitsCase.start_limited(self, clients, listen, **root)

    def via(self, pid, count):
        from test_workers import only
        with only(self.balancer.worker_pids(), pid):
            return self.held('127.0.0.2', count)

    def test_maxconns_holds_in_total(self):
        self.start_limited('maxconns="5"')
        first, second = self.balancer.worker_pids()
        self.assertEqual(len(self.via(first, 3)), 3)
        self.assertEqual(len(self.via(second, 3)), 2)
        self.counted(limited=1, top=[['127.0.0.2', 5]])

    def test_rate_holds_in_total(self):
        self.start_limited('rate="0.1" burst="4"')      # nothing more for 10 s
        first, second = self.balancer.worker_pids()
        self.assertEqual(len(self.via(first, 3)), 3)
        self.assertEqual(len(self.via(second, 3)), 1)

    def test_a_dead_workers_clients_are_gone(self):
        self.start_limited('maxconns="4"')
        first, second = self.balancer.worker_pids()
        held = self.via(first, 4)
        self.assertEqual(len(held), 4)
        os.kill(first, 9)
        wait_until(lambda: first not in self.balancer.worker_pids() and all(
            w.ready for w in self.balancer.master.workers), 20)
        for sock in held:
            sock.close()
        self.assertEqual(len(self.held('127.0.0.2', 4)), 4)


if __name__ == '__main__':
    unittest.main()
