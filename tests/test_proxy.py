"""Proxy behaviour on real sockets: bytes end to end, failover, half-close,
resets, flow control, timeouts, the manager, group switches."""

import hashlib
import os
import socket
import struct
import threading
import time
import unittest

from support import (BalancerCase, Backend, Blackhole, LOG, WorkersMixin, connect, digest_until_eof,
                     echo, exchange, free_port, hold_open, recv_all, say_name, service_xml,
                     single_process, wait_until)

import pydirector


def digest(data):
    return ('%s %d' % (hashlib.sha256(data).hexdigest(), len(data))).encode()


class ProxyTestCase(BalancerCase):
    """Backends and a balancer per test (support.BalancerCase)."""


class TestRelay(ProxyTestCase):

    def test_megabytes_both_ways_checksummed(self):
        b = self.backend(echo)
        self.start(service_xml([('one', b.address)]))
        payload = os.urandom(4 * 1024 * 1024 + 17)
        sock = connect(self.balancer.port())

        def send():
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        t = threading.Thread(target=send)
        t.start()
        got = recv_all(sock)
        t.join()
        sock.close()
        self.assertEqual(hashlib.sha256(got).hexdigest(), hashlib.sha256(payload).hexdigest())
        self.assertEqual(len(got), len(payload))

    def test_upload_then_answer(self):
        b = self.backend(digest_until_eof)
        self.start(service_xml([('one', b.address)]))
        payload = os.urandom(3 * 1024 * 1024)
        self.assertEqual(exchange(self.balancer.port(), payload), digest(payload))

    def test_counters_after_connection(self):
        b = self.backend(digest_until_eof)
        self.start(service_xml([('one', b.address)]))
        payload = b'x' * 1000
        answer = exchange(self.balancer.port(), payload)
        wait_until(lambda: self.balancer.host('one')['open'] == 0)
        host = self.balancer.host('one')
        self.assertEqual((host['total'], host['bytes_in'], host['bytes_out']), (1, 1000, len(answer)))
        service = self.balancer.snapshot()['services'][0]
        self.assertEqual(service['accepted'], 1)

    def test_many_concurrent_clients(self):
        b = self.backend(digest_until_eof)
        self.start(service_xml([('one', b.address)]))
        results = {}

        def client(i):
            payload = os.urandom(20000 + i)
            results[i] = exchange(self.balancer.port(), payload) == digest(payload)
        threads = [threading.Thread(target=client, args=(i,)) for i in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        self.assertEqual(sorted(results), list(range(50)))
        self.assertTrue(all(results.values()))
        wait_until(lambda: self.balancer.open_pairs() == 0)

    def test_ipv6_listen_and_backend(self):
        b = Backend(echo, family=socket.AF_INET6, host='::1')
        self.addCleanup(b.close)
        port = free_port()
        xml = service_xml([('one', '[::1]:%d' % b.port)]).replace(
            '127.0.0.1:%d' % port, '[::1]:%d' % port)
        xml = ('<pdconfig>\n  <service name="web">\n    <listen ip="[::1]:%d"/>\n'
               '    <group name="main" scheduler="roundrobin">\n'
               '      <host name="one" ip="[::1]:%d"/>\n    </group>\n  </service>\n</pdconfig>\n'
               % (port, b.port))
        self.start(xml)
        sock = socket.create_connection(('::1', port), timeout=10)
        sock.sendall(b'over six')
        sock.shutdown(socket.SHUT_WR)
        self.assertEqual(recv_all(sock), b'over six')
        sock.close()

    def test_host_given_by_name(self):
        b = self.backend(echo)
        self.start(service_xml([('one', 'localhost:%d' % b.port)]))
        self.assertEqual(exchange(self.balancer.port(), b'named'), b'named')

    def test_unresolvable_name_is_a_down_host(self):
        b = self.backend(echo)
        self.start(service_xml([('ghost', 'no-such-host.invalid:80'), ('one', b.address)]))
        ghost = self.balancer.host('ghost')
        self.assertEqual(ghost['health'], 'down')
        self.assertIn('cannot resolve no-such-host.invalid', ghost['reason'])
        for _ in range(3):
            self.assertEqual(exchange(self.balancer.port(), b'hi'), b'hi')


class TestSchedulingOverSockets(ProxyTestCase):

    @single_process('each worker keeps its own rotation')
    def test_roundrobin_order(self):
        names = ['s1', 's2', 's3']
        hosts = [(n, self.backend(say_name, n).address) for n in names]
        self.start(service_xml(hosts, scheduler='roundrobin'))
        got = [exchange(self.balancer.port()).decode() for _ in range(7)]
        self.assertEqual(got, ['s1', 's2', 's3', 's1', 's2', 's3', 's1'])

    @single_process('each worker keeps its own rotation')
    def test_weights_over_sockets(self):
        a = self.backend(say_name, 'a')
        b = self.backend(say_name, 'b')
        self.start(service_xml([('a', a.address, 'weight="3"'), ('b', b.address)]))
        got = ''.join(exchange(self.balancer.port()).decode() for _ in range(8))
        self.assertEqual(got, 'aabaaaba')

    def test_maxconns_full_host_is_skipped(self):
        a = self.backend(hold_open, 'a')
        b = self.backend(say_name, 'b')
        self.start(service_xml([('a', a.address, 'maxconns="1"'), ('b', b.address, 'weight="1"')],
                               scheduler='leastconns'))
        held = connect(self.balancer.port())
        wait_until(lambda: a.open == 1)
        # 'a' is first and least loaded by weight only if it has room: it is full now.
        self.assertEqual(exchange(self.balancer.port()), b'b')
        self.assertEqual(exchange(self.balancer.port()), b'b')
        held.close()
        wait_until(lambda: self.balancer.host('a')['open'] == 0)

    def test_enabled_group_switch_leaves_old_connections(self):
        a = self.backend(echo, 'a')
        b = self.backend(say_name, 'b')
        self.start(service_xml(None, groups=[('blue', 'roundrobin', [('a', a.address)]),
                                             ('green', 'roundrobin', [('b', b.address)])],
                               enable='blue'))
        old = connect(self.balancer.port())
        old.sendall(b'ping')
        self.assertEqual(old.recv(10), b'ping')
        message = self.balancer.call(self.balancer.director.enable_group, 'web', 'green')
        self.assertEqual(message, 'enabled group green in service web (was blue)')
        self.assertEqual(exchange(self.balancer.port()), b'b')
        old.sendall(b'still blue')
        self.assertEqual(old.recv(20), b'still blue')
        old.close()


class TestFailover(ProxyTestCase):

    def test_refused_host_fails_over_with_early_bytes(self):
        dead = free_port()
        good = self.backend(digest_until_eof)
        self.start(service_xml([('one', '127.0.0.1:%d' % dead), ('two', good.address)]))
        payload = b'early bytes sent before any backend answered'
        self.assertEqual(exchange(self.balancer.port(), payload), digest(payload))
        LOG.wait_for('host one (127.0.0.1:%d) in web/main down: connection refused' % dead, self.mark)
        one = self.balancer.host('one')
        self.assertEqual((one['health'], one['reason'], one['open'], one['total']),
                         ('down', 'connection refused', 0, 0))
        self.assertEqual(self.balancer.snapshot()['services'][0]['failovers'], 1)
        # Down hosts get no more clients.
        for _ in range(3):
            self.assertEqual(exchange(self.balancer.port(), b'x'), digest(b'x'))
        self.assertEqual(self.balancer.host('two')['total'], 4)

    def test_blackholed_host_times_out_then_fails_over(self):
        hole = Blackhole()
        self.addCleanup(hole.close)
        good = self.backend(digest_until_eof)
        timeouts = '    <timeouts connect="0.3"/>\n'
        self.start(service_xml([('one', hole.address), ('two', good.address)], extra=timeouts))
        sock = connect(self.balancer.port())
        sock.sendall(b'held while the first host stays silent')
        sock.shutdown(socket.SHUT_WR)
        started = time.monotonic()
        answer = recv_all(sock)
        elapsed = time.monotonic() - started
        sock.close()
        self.assertEqual(answer, digest(b'held while the first host stays silent'))
        self.assertGreater(elapsed, 0.25)
        self.assertLess(elapsed, 8)      # failed over, not held to the client's 10 s
        LOG.wait_for('host one (%s) in web/main down: connect timeout' % hole.address, self.mark)

    def test_connect_timeout_is_not_an_idle_timeout(self):
        b = self.backend(echo)
        self.start(service_xml([('one', b.address)], extra='    <timeouts connect="0.2" idle="30"/>\n'))
        sock = connect(self.balancer.port())
        sock.sendall(b'a')
        self.assertEqual(sock.recv(1), b'a')
        time.sleep(0.5)  # the point of the test: outlive the connect timeout
        sock.sendall(b'b')
        self.assertEqual(sock.recv(1), b'b')
        sock.close()

    def answer_or_reset(self, data):
        # Closing a socket with unread input sends RST, so 'closed' may read as a reset.
        try:
            return exchange(self.balancer.port(), data)
        except OSError:  # reset, or not connected any more by the time we shut down
            return b''

    def test_all_hosts_down(self):
        p1, p2 = free_port(), free_port()
        self.start(service_xml([('one', '127.0.0.1:%d' % p1), ('two', '127.0.0.1:%d' % p2)]))
        self.assertEqual(self.answer_or_reset(b'anyone?'), b'')
        LOG.wait_for('gave up after 2 host(s) failed', self.mark)
        # Both are down now: the next client is closed at once, without trying.  With
        # workers, once the master has told every worker so (another worker may take it).
        wait_until(lambda: len([l for l in self.log_lines() if 'in web/main down:' in l]) == 2)
        self.balancer.sync()
        self.assertEqual(self.answer_or_reset(b'anyone?'), b'')
        LOG.wait_for('no host available in group main', self.mark)
        service = self.balancer.snapshot()['services'][0]
        self.assertEqual((service['accepted'], service['refused']), (2, 1))
        wait_until(lambda: self.balancer.open_pairs() == 0)

    def test_manager_brings_a_host_back_after_rise_probes(self):
        port = free_port()
        good = self.backend(say_name, 'two')
        check = '    <check interval="0.1" timeout="0.5" rise="2" fall="2"/>\n'
        self.start(service_xml([('one', '127.0.0.1:%d' % port), ('two', good.address)], extra=check))
        self.assertEqual(exchange(self.balancer.port()), b'two')
        LOG.wait_for('in web/main down: connection refused', self.mark)
        revived = Backend(say_name, 'one')
        # Rebind the very port the host is configured with: the first socket's accept
        # thread ends (a shutdown wakes its accept; a close alone would not) first.
        revived.sock.shutdown(socket.SHUT_RDWR)
        revived.sock.close()
        revived.thread.join(5)
        revived.sock = socket.socket()
        revived.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        revived.sock.bind(('127.0.0.1', port))
        revived.sock.listen(16)
        revived.thread = threading.Thread(target=revived._serve, daemon=True)
        revived.thread.start()
        self.addCleanup(revived.close)
        LOG.wait_for('host one (127.0.0.1:%d) in web/main up: answered 2 probe(s)' % port, self.mark)
        self.balancer.sync()    # with workers: each has heard of it (a moment after the master's line)
        if self.workers:        # each rotates on its own: both hosts, not two each
            self.assertEqual({exchange(self.balancer.port()).decode() for _ in range(4)}, {'one', 'two'})
        else:
            got = sorted(exchange(self.balancer.port()).decode() for _ in range(4))
            self.assertEqual(got, ['one', 'one', 'two', 'two'])

    def test_health_check_takes_an_up_host_down_after_fall(self):
        a = self.backend(hold_open, 'a')
        b = self.backend(say_name, 'b')
        check = '    <check interval="0.05" timeout="0.5" rise="1" fall="3"/>\n'
        self.start(service_xml([('a', a.address), ('b', b.address)], extra=check))
        a.close()
        line = LOG.wait_for('host a (%s) in web/main down: connection refused (3 failed probes)'
                            % a.address, self.mark)
        self.assertEqual(len(line), 1)
        self.assertEqual(exchange(self.balancer.port()), b'b')

    def test_send_expect_check(self):
        def http(conn, backend):
            conn.recv(1024)
            conn.sendall(b'HTTP/1.0 503 Busy\r\n\r\n' if backend.name == 'bad' else b'HTTP/1.0 200 OK\r\n\r\n')
        bad = self.backend(http, 'bad')
        good = self.backend(http, 'good')
        check = ('    <check interval="0.05" timeout="0.5" rise="1" fall="1" '
                 'send="GET / HTTP/1.0\\r\\n\\r\\n" expect="200 OK"/>\n')
        self.start(service_xml([('bad', bad.address), ('good', good.address)], extra=check))
        LOG.wait_for('host bad (%s) in web/main down: expected' % bad.address, self.mark)
        self.assertEqual(self.balancer.host('good')['health'], 'up')


class TestHalfCloseAndResets(ProxyTestCase):

    def test_client_half_close_answer_still_flows(self):
        b = self.backend(digest_until_eof)
        self.start(service_xml([('one', b.address)]))
        sock = connect(self.balancer.port())
        sock.sendall(b'question')
        sock.shutdown(socket.SHUT_WR)
        self.assertEqual(recv_all(sock), digest(b'question'))
        sock.close()

    def test_backend_half_close_client_data_still_flows(self):
        done = threading.Event()
        received = []

        def greet_then_listen(conn, backend):
            conn.sendall(b'greeting')
            conn.shutdown(socket.SHUT_WR)
            received.append(recv_all(conn))
            done.set()
        b = self.backend(greet_then_listen)
        self.start(service_xml([('one', b.address)]))
        sock = connect(self.balancer.port())
        self.assertEqual(recv_all(sock), b'greeting')    # FIN reached us...
        payload = os.urandom(300000)
        sock.sendall(payload)                              # ...and we may still talk
        sock.shutdown(socket.SHUT_WR)
        self.assertTrue(done.wait(10))
        self.assertEqual(received, [payload])
        sock.close()
        wait_until(lambda: self.balancer.open_pairs() == 0)

    def test_backend_writes_then_closes_all_bytes_arrive(self):
        blob = os.urandom(2 * 1024 * 1024)

        def write_and_close(conn, backend):
            conn.sendall(blob)
        b = self.backend(write_and_close)
        self.start(service_xml([('one', b.address)]))
        sock = connect(self.balancer.port())
        got = recv_all(sock)
        sock.close()
        self.assertEqual(hashlib.sha256(got).digest(), hashlib.sha256(blob).digest())

    def test_backend_reset_mid_stream_closes_client(self):
        def reset(conn, backend):
            conn.sendall(b'partial')
            conn.recv(10)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
        b = self.backend(reset)
        self.start(service_xml([('one', b.address)]))
        sock = connect(self.balancer.port())
        self.assertEqual(sock.recv(7), b'partial')
        sock.sendall(b'go')
        started = time.monotonic()
        with self.assertRaises(ConnectionResetError):
            while sock.recv(100):
                pass
        self.assertLess(time.monotonic() - started, 5)  # passed on, not left to a timeout
        sock.close()
        wait_until(lambda: self.balancer.open_pairs() == 0)

    def test_client_reset_closes_backend(self):
        b = self.backend(hold_open)
        self.start(service_xml([('one', b.address)]))
        sock = connect(self.balancer.port())
        wait_until(lambda: b.open == 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
        sock.close()
        wait_until(lambda: b.open == 0)
        wait_until(lambda: self.balancer.open_pairs() == 0)

    def test_client_leaves_during_connect(self):
        hole = Blackhole()
        self.addCleanup(hole.close)
        self.start(service_xml([('one', hole.address)], extra='    <timeouts connect="0.3"/>\n'))
        sock = connect(self.balancer.port())
        sock.close()
        # The attempt times out, the host is marked down, the pair goes away: nothing leaks.
        # (Read from here, the pair may be gone a moment before its host's count.)
        wait_until(lambda: self.balancer.open_pairs() == 0 and self.balancer.host('one')['open'] == 0, 3,
                   message='left open: %d pair(s), host one %r' % (self.balancer.open_pairs(),
                                                                   self.balancer.host('one')))


class TestFlowControlAndTimeouts(ProxyTestCase):

    @single_process('reads the pairs of the balancer')
    def test_client_that_never_reads_holds_bounded_memory(self):
        pushed = [0]
        stalled = threading.Event()

        def firehose(conn, backend):
            conn.setblocking(False)
            chunk = b'x' * 65536
            last_progress = time.monotonic()
            while time.monotonic() - last_progress < 0.5 and pushed[0] < 256 * 1024 * 1024:
                try:
                    pushed[0] += conn.send(chunk)
                    last_progress = time.monotonic()
                except BlockingIOError:
                    time.sleep(0.01)
            stalled.set()
        b = self.backend(firehose)
        self.start(service_xml([('one', b.address)]))
        sock = connect(self.balancer.port())
        self.assertTrue(stalled.wait(30))
        # The kernel buffers a few MiB on each socket; the balancer itself holds at most one recv.
        self.assertLess(pushed[0], 40 * 1024 * 1024)
        pending = self.balancer.call(lambda: [p.pending()[1] for p in self.balancer.director.pairs])
        self.assertEqual(len(pending), 1)
        self.assertLessEqual(pending[0], max(pydirector.BUFFER_SIZE, pydirector.SPLICE_SIZE))
        # And once the client reads, every byte comes through.
        sock.settimeout(10)
        got = len(recv_all(sock))
        self.assertEqual(got, pushed[0])
        sock.close()

    def test_idle_timeout_closes_both_sides(self):
        b = self.backend(hold_open)
        self.start(service_xml([('one', b.address)], extra='    <timeouts idle="0.3"/>\n'))
        # Timed from before the connect: the balancer's idle clock starts after it,
        # while the backend may see the connection late on a loaded machine.
        started = time.monotonic()
        sock = connect(self.balancer.port())
        wait_until(lambda: b.open == 1)
        self.assertEqual(recv_all(sock), b'')
        self.assertGreater(time.monotonic() - started, 0.2)
        wait_until(lambda: b.open == 0)
        LOG.wait_for('in web: idle for', self.mark)
        sock.close()

    def test_active_connection_outlives_idle_timeout(self):
        b = self.backend(echo)
        self.start(service_xml([('one', b.address)], extra='    <timeouts idle="0.3"/>\n'))
        sock = connect(self.balancer.port())
        for i in range(8):          # 8 x 0.1 s: well past 0.3 s in total, never idle for 0.3 s
            sock.sendall(b'%d' % i)
            self.assertEqual(sock.recv(10), b'%d' % i)
            time.sleep(0.1)
        sock.close()



# The same relay tests on each data path: plain recv/send, and os.splice
# through a pipe from the first full read (where Python has os.splice).

class PlainPath(object):
    splice_after = None

    def setUp(self):
        saved = pydirector.SPLICE_AFTER
        pydirector.SPLICE_AFTER = self.splice_after
        self.addCleanup(setattr, pydirector, 'SPLICE_AFTER', saved)
        super(PlainPath, self).setUp()


class SplicePath(PlainPath):
    splice_after = 0

    def setUp(self):
        if pydirector.splice is None:
            self.skipTest('no os.splice on this Python (3.10+ on Linux)')
        super(SplicePath, self).setUp()


class TestRelayPlain(PlainPath, TestRelay):
    pass


class TestRelaySplice(SplicePath, TestRelay):

    def test_bulk_moves_through_the_pipe(self):
        b = self.backend(echo)
        self.start(service_xml([('one', b.address)]))
        sock = connect(self.balancer.port())
        payload = os.urandom(3 * 1024 * 1024)
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        got = b''
        while len(got) < len(payload):
            got += sock.recv(1 << 20)
        sender.join()
        self.assertEqual(got, payload)
        spliced = self.balancer.call(lambda: [(p.splice_up is not None, p.splice_down is not None)
                                              for p in self.balancer.director.pairs])
        self.assertEqual(spliced, [(True, True)])
        sock.close()


class TestHalfCloseAndResetsPlain(PlainPath, TestHalfCloseAndResets):
    pass


class TestHalfCloseAndResetsSplice(SplicePath, TestHalfCloseAndResets):
    pass


class TestFlowControlPlain(PlainPath, TestFlowControlAndTimeouts):
    pass


class TestFlowControlSplice(SplicePath, TestFlowControlAndTimeouts):
    pass


# The same suites with a master and two worker processes (support.WorkersMixin).

class TestRelayWorkers(WorkersMixin, TestRelay):
    pass


class TestSchedulingOverSocketsWorkers(WorkersMixin, TestSchedulingOverSockets):
    pass


class TestFailoverWorkers(WorkersMixin, TestFailover):
    pass


class TestHalfCloseAndResetsWorkers(WorkersMixin, TestHalfCloseAndResets):
    pass


class TestFlowControlWorkers(WorkersMixin, TestFlowControlAndTimeouts):
    pass


if __name__ == '__main__':
    unittest.main()
