"""A master and worker processes (issue 12), on real sockets and real processes.

The in-process tests make this process the master (support.Balancer(workers=2)):
its Director, manager and admin run here, the two workers are real
`pydirector.py --worker` processes accepting on the master's sockets.  A
connection is steered to one worker by stopping the others (SIGSTOP) while it
is accepted: a stopped process is not waiting in epoll, so the kernel hands the
client to a worker that is.  The life-cycle tests run a real master process
(support.SpawnedBalancer with --workers 2) and signal it.
"""

import contextlib
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.request
import base64
from unittest import mock

import support
from support import (BalancerCase, Background, EchoServer, LOG, SpawnedBalancer, accepts, config_xml, connect,
                     echo, exchange, fd_count, free_port, recv_all, say_name, service_xml, wait_until)

import pydirector
import pydirector_admin

PASSWORD = 'pass'


def name_then_echo(conn, backend):
    """Say our name (one line), then echo: a held connection shows where it went."""
    conn.sendall(backend.name.encode() + b'\n')
    echo(conn, backend)


def read_line(sock):
    data = b''
    while not data.endswith(b'\n'):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data.strip().decode()


def tcp_connections(local_port):
    """remote port -> inode of the connected TCP sockets with this local port (/proc/net/tcp*)."""
    found = {}
    for name in ('/proc/net/tcp', '/proc/net/tcp6'):
        with open(name) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                local = int(fields[1].rsplit(':', 1)[1], 16)
                remote = int(fields[2].rsplit(':', 1)[1], 16)
                if local == local_port and fields[3] != '0A':      # not the listening socket
                    found[remote] = fields[9]
    return found


def tcp_inodes(local_port):
    return set(tcp_connections(local_port).values())


def socket_inodes(pid):
    found = set()
    for fd in os.listdir('/proc/%d/fd' % pid):
        try:
            target = os.readlink('/proc/%d/fd/%s' % (pid, fd))
        except OSError:
            continue
        if target.startswith('socket:['):
            found.add(target[8:-1])
    return found


def holders(pids, listen_port, clients):
    """For each client connection, the pid among pids holding the balancer's end (or None)."""
    inodes = tcp_connections(listen_port)
    owner = {}
    for pid in pids:
        for inode in socket_inodes(pid):
            owner[inode] = pid
    return [owner.get(inodes.get(client.getsockname()[1])) for client in clients]


@contextlib.contextmanager
def only(pids, pid):
    """While inside, every process of pids but pid is stopped (SIGSTOP): new clients go to pid."""
    others = [p for p in pids if p != pid]
    for other in others:
        os.kill(other, signal.SIGSTOP)
    try:
        # Really stopped, so out of epoll_wait: else the kernel may still pick it to wake for a
        # client (EPOLLEXCLUSIVE wakes one waiter), and the client waits until it runs again.
        for other in others:
            wait_until(lambda: process_state(other) == 'T', 5)
        yield
    finally:
        for other in others:
            os.kill(other, signal.SIGCONT)


def process_state(pid):
    with open('/proc/%d/stat' % pid) as f:
        return f.read().rsplit(')', 1)[1].split()[0]


def alive(pid):
    try:
        with open('/proc/%d/stat' % pid) as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except OSError:
        return False


class WorkersCase(BalancerCase):
    """A master here and two worker processes, per test."""
    workers = 2

    def pids(self):
        return self.balancer.worker_pids()

    def via(self, pid, port=None, source=None, handled=read_line):
        """A client connection accepted by worker pid: (socket, handled(socket)), where
        handled returns once the balancer has done something with it (the default reads
        the line a say_name or name_then_echo backend sends first)."""
        port = port or self.balancer.port()
        with only(self.pids(), pid):
            sock = socket.socket()
            sock.settimeout(10)
            self.addCleanup(sock.close)
            if source:
                sock.bind((source, 0))
            sock.connect(('127.0.0.1', port))
            result = handled(sock)      # by pid, the one process that could accept it
        return sock, result

    def name_via(self, pid, port=None, source=None):
        """The name a say_name / name_then_echo backend tells a client that worker pid accepted."""
        sock, name = self.via(pid, port, source)
        sock.close()
        return name


class AdminWorkersCase(WorkersCase):
    """With the master's admin server, spoken to over HTTP."""

    def admin_xml(self):
        return '  <admin listen="127.0.0.1:%d">\n    <user name="admin" password="%s" access="full"/>\n  </admin>\n' % (
            free_port(), pydirector.hash_password(PASSWORD, iterations=support.FAST_HASH_ITERATIONS))

    def start_admin(self, balancer):
        """The master's admin server, on a port of its own choosing."""
        admin = balancer.config.admin
        self.server = pydirector_admin.start(balancer.director, pydirector.Admin(admin.listen, admin.host, 0, admin.users))
        self.addCleanup(self.server.stop)

    def admin(self, path, body=None, expect=200):
        request = urllib.request.Request('http://127.0.0.1:%d%s' % (self.server.server_address[1], path),
                                         data=body.encode() if body is not None else None)
        request.add_header('Authorization', 'Basic ' + base64.b64encode(('admin:' + PASSWORD).encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                status, text = answer.status, answer.read().decode()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode()
        self.assertEqual(status, expect, text)
        return text


class SpreadTest(WorkersCase):

    def test_each_worker_takes_clients_from_the_shared_socket(self):
        # Which worker the kernel wakes for a client is the one waiting in epoll_wait
        # (EPOLLEXCLUSIVE), so how a burst spreads depends on timing: a worker that
        # keeps up takes it all.  bench/bench.py measures the spread under load; here,
        # with the other worker stopped, each takes its own clients from the one
        # listening socket, and the master's table counts each worker's own.
        e = EchoServer()
        self.addCleanup(e.close)
        self.start(service_xml([('echo', e.address)], scheduler='leastconns'))
        port = self.balancer.port()
        pids = self.pids()
        clients = []
        backgrounds = []
        for pid, count, seed in ((pids[0], 150, 1), (pids[1], 250, 2)):
            with only(pids, pid):
                background = Background(port, count, seed=seed, interval=3600)
                self.addCleanup(background.stop)
                background.start()      # every client has had its round trip: accepted
            backgrounds.append(background)
            clients.extend(s.sock for s in background.streams)
        held = dict((pid, 0) for pid in pids)
        for pid in holders(pids, port, clients):
            held[pid] += 1
        self.assertEqual(held, {pids[0]: 150, pids[1]: 250})
        # Each worker's line in shared memory is published within half a second.
        wait_until(lambda: sorted((w['pid'], w['open']) for w in self.balancer.snapshot()['workers'])
                   == sorted(held.items()))
        for background in backgrounds:
            self.assertEqual(background.finish(), [])
        wait_until(lambda: self.balancer.open_pairs() == 0)


class KillWorkerTest(WorkersCase):

    def test_sigkill_one_worker_under_load(self):
        e = EchoServer()
        self.addCleanup(e.close)
        self.start(service_xml([('echo', e.address)]))
        port = self.balancer.port()
        pids = self.pids()
        victim, survivor = pids
        streams = {}
        for pid, seed in ((victim, 1), (survivor, 2)):     # each worker's own checksummed streams
            with only(pids, pid):
                streams[pid] = Background(port, 30, seed=seed, interval=0.05)
                self.addCleanup(streams[pid].stop)
                streams[pid].start()
        total_before = self.balancer.host('echo')['total']
        mark = LOG.mark()
        os.kill(victim, signal.SIGKILL)
        # Restarted at once (not after the pause of a worker that keeps dying as it starts):
        # the death seen and a new process in its place...
        LOG.wait_for('worker 1 (pid %d) exited on signal 9 (SIGKILL); restarting it (restart 1)' % victim, mark)
        new = wait_until(lambda: self.pids()[0] != victim and self.pids()[0])
        self.assertNotIn('next try in', '\n'.join(LOG.since(mark)))
        # ...and accepting once it has started.
        LOG.wait_for('worker 1 (pid %d) ready' % new, mark, timeout=15)
        self.assertEqual(self.name_or_echo(new, port), b'after')
        self.assertEqual(streams[survivor].finish(), [])        # the other worker's streams: intact
        cut = streams[victim].finish()
        self.assertEqual(len(cut), 30, cut[:3])                 # the dead worker's: every one cut
        # What the dead worker counted is kept: totals never go back.
        self.assertGreaterEqual(self.balancer.host('echo')['total'], total_before)
        workers = self.balancer.snapshot()['workers']
        self.assertEqual([w['restarts'] for w in workers], [1, 0])

    def name_or_echo(self, pid, port):
        def echoed(sock):
            sock.sendall(b'after')
            sock.shutdown(socket.SHUT_WR)
            return recv_all(sock)
        sock, data = self.via(pid, port, handled=echoed)
        sock.close()
        return data


class AdminEverywhereTest(AdminWorkersCase):
    """An admin change answers once every worker has made it."""

    def setUp(self):
        WorkersCase.setUp(self)
        self.a = self.backend(say_name, 'a')
        self.b = self.backend(say_name, 'b')
        self.g = self.backend(say_name, 'g')
        self.start(service_xml(None, groups=[('main', 'roundrobin', [('a', self.a.address)]),
                                             ('green', 'roundrobin', [('g', self.g.address)])],
                               enable='main'), self.admin_xml())
        self.start_admin(self.balancer)

    def names(self):
        return [self.name_via(pid) for pid in self.pids()]

    def test_add_host_then_del_host(self):
        self.assertEqual(self.names(), ['a', 'a'])
        self.admin('/addHost', 'service=web&group=main&name=b&ip=%s&weight=1000' % self.b.address)
        self.assertEqual(self.names(), ['b', 'b'])      # the heavy new host is each one's next pick
        self.admin('/delHost', 'service=web&group=main&name=a')
        self.assertEqual(self.names() + self.names(), ['b', 'b', 'b', 'b'])

    def test_host_admin_down_and_up(self):
        self.admin('/addHost', 'service=web&group=main&name=b&ip=%s' % self.b.address)
        self.admin('/hostAdminDown', 'service=web&group=main&name=a')
        self.assertEqual(self.names() + self.names(), ['b', 'b', 'b', 'b'])
        self.admin('/hostAdminDown', 'service=web&group=main&name=b')
        self.admin('/hostAdminUp', 'service=web&group=main&name=a')
        self.assertEqual(self.names() + self.names(), ['a', 'a', 'a', 'a'])

    def test_enable_group(self):
        self.admin('/enableGroup', 'service=web&group=green')
        self.assertEqual(self.names(), ['g', 'g'])
        self.admin('/enableGroup', 'service=web&group=main')
        self.assertEqual(self.names(), ['a', 'a'])

    def test_rollback_is_the_masters(self):
        self.admin('/addHost', 'service=web&group=green&name=dead&ip=127.0.0.1:%d' % free_port())
        self.admin('/delHost', 'service=web&group=green&name=g')
        self.balancer.call(self.balancer.director.health.set_state, *self.running('green', 'dead') +
                           (pydirector.schedulers.DOWN, 'test'))
        mark = LOG.mark()
        answer = self.admin('/enableGroup', 'service=web&group=green&rollback=0.3')
        self.assertIn('back to main unless a host is up within 0.3 s', answer)
        LOG.wait_for('service web: rollback to group main', mark)
        self.balancer.master.sync(10)
        self.assertEqual(self.names(), ['a', 'a'])
        rollbacks = [l for l in LOG.since(mark) if 'rollback to group' in l]
        self.assertEqual(len(rollbacks), 1, rollbacks)      # the master's; no worker decided its own

    def running(self, group, host):
        service = self.balancer.director.services['web']
        group = service.groups[group]
        return (service, group, group.scheduler.get_host(host))

    def test_a_worker_that_does_not_answer_is_named(self):
        self.server.loop_timeout = 0.5
        stuck = self.pids()[1]
        os.kill(stuck, signal.SIGSTOP)
        try:
            text = self.admin('/addHost', 'service=web&group=main&name=b&ip=%s' % self.b.address, expect=503)
        finally:
            os.kill(stuck, signal.SIGCONT)
        self.assertEqual(text, 'ERROR worker 2 (pid %d) did not answer within 0.5 s\n' % stuck)
        self.balancer.master.sync(10)           # it catches up once running again
        self.assertIn('b', [h['name'] for h in self.balancer.snapshot()['services'][0]['groups'][0]['hosts']])


class LimitsTest(WorkersCase):

    def test_host_maxconns_holds_across_workers(self):
        lock = threading.Lock()
        state = {'open': 0, 'most': 0, 'served': 0}

        def counting(conn, backend):
            with lock:
                state['open'] += 1
                state['most'] = max(state['most'], state['open'])
            try:
                time.sleep(0.05)        # hold the place a moment, so that clients wait for it
                data = conn.recv(100)
                conn.sendall(data)
            finally:
                with lock:
                    state['open'] -= 1
                    state['served'] += 1
        b = self.backend(counting)
        self.start(service_xml([('one', b.address, 'maxconns="5"')], extra='    <timeouts queue="60"/>\n'))
        port = self.balancer.port()
        answers = []

        def client(i):
            try:
                answers.append(exchange(port, b'%d' % i, timeout=60))
            except OSError as e:
                answers.append(e)
        threads = [threading.Thread(target=client, args=(i,)) for i in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        self.assertEqual(sorted(answers), sorted(b'%d' % i for i in range(40)))
        self.assertEqual(state['served'], 40)
        self.assertLessEqual(state['most'], 5)
        self.assertEqual(self.balancer.host('one')['open'], 0)

    def test_service_maxconns_holds_across_workers(self):
        b = self.backend(support.hold_open)
        self.start(service_xml([('one', b.address)]).replace('<service name="web"', '<service name="web" maxconns="3"'))
        pids = self.pids()
        held = []
        for pid in (pids[0], pids[1], pids[0]):
            opened = len(held) + 1
            held.append(self.via(pid, handled=lambda sock: wait_until(lambda: b.open == opened))[0])
        for pid in pids:
            self.assertEqual(self.via(pid, handled=recv_all)[1], b'')   # full: closed at once, in either worker
        for sock in held:
            sock.close()
        wait_until(lambda: self.balancer.open_pairs() == 0)

    def test_leastconns_sees_every_workers_connections(self):
        a = self.backend(name_then_echo, 'a')
        b = self.backend(name_then_echo, 'b')
        self.start(service_xml([('a', a.address), ('b', b.address)], scheduler='leastconns'))
        first, second = self.pids()
        held = [self.via(first) for _ in range(3)]
        self.assertEqual([name for _, name in held], ['a', 'b', 'a'])
        # The second worker holds nothing; a is the busier host everywhere.
        wait_until(lambda: self.name_via(second) == 'b', 5)

    def test_a_queued_client_is_served_when_another_worker_frees_a_place(self):
        b = self.backend(name_then_echo, 'one')
        self.start(service_xml([('one', b.address, 'maxconns="1"')], extra='    <timeouts queue="30"/>\n'))
        first, second = self.pids()
        held, name = self.via(first)
        self.assertEqual(name, 'one')
        waiting, _ = self.via(second, handled=lambda sock: wait_until(
            lambda: self.balancer.snapshot()['services'][0]['queued'] == 1))
        held.close()
        waiting.settimeout(10)
        self.assertEqual(read_line(waiting), 'one')
        waiting.close()


class StickyTest(WorkersCase):

    def test_a_client_keeps_its_host_whichever_worker_accepts(self):
        names = ['h%d' % i for i in range(4)]
        backends = [self.backend(say_name, n) for n in names]
        self.start(service_xml([(n, b.address) for n, b in zip(names, backends)], scheduler='roundrobin,sticky'))
        first, second = self.pids()
        director = self.balancer.director
        for last in range(1, 9):
            client = '127.0.0.%d' % last
            got = self.name_via(first, source=client)
            # The documented window: the entry reaches the other workers through the master.
            wait_until(lambda: self.balancer.call(director.explain, 'web', client)['sticky'])
            self.balancer.master.sync(10)
            self.assertEqual([self.name_via(second, source=client), self.name_via(first, source=client)],
                             [got, got], client)


class ReloadTest(WorkersCase):

    def test_reload_adds_a_listen_and_a_host_and_cuts_nothing(self):
        directory = tempfile.mkdtemp(prefix='pydirector-workers-')
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, 'live.xml')
        e = EchoServer()
        self.addCleanup(e.close)
        one = self.backend(say_name, 'one')
        two = self.backend(say_name, 'two')
        port, new_port = free_port(), free_port()
        bg = service_xml([('echo', e.address)], name='bg')
        self.start(config_xml(bg, service_xml([('one', one.address)], listen_port=port)), path=path)
        background = Background(self.balancer.port('bg'), 40, interval=0.05)
        self.addCleanup(background.stop)
        background.start()
        with open(path, 'w') as f:
            f.write(config_xml(bg, service_xml([('one', one.address), ('two', two.address, 'weight="1000"')],
                                           listen_port=port),
                               service_xml([('two', two.address)], name='more', listen_port=new_port)))
        message = self.balancer.call(self.balancer.director.reload)
        self.assertIn('+host two', message)
        self.assertIn('+service more', message)
        for pid in self.pids():
            self.assertEqual(self.name_via(pid, new_port), 'two')   # the new socket reached each
            self.assertEqual(self.name_via(pid, port), 'two')       # and the new host
        self.assertEqual(background.finish(), [])                   # not one cut


class LogTest(WorkersCase):

    def test_lines_whole_in_one_file_and_reopened_everywhere(self):
        directory = tempfile.mkdtemp(prefix='pydirector-workers-')
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, 'access.log')
        e = EchoServer()
        self.addCleanup(e.close)
        self.start(service_xml([('echo', e.address)]), '  <logging file="%s"/>\n' % path)
        port = self.balancer.port()
        # Lines from both workers at once, all the while.
        streams = []
        for seed, pid in enumerate(self.pids()):
            with only(self.pids(), pid):
                streams.append(Background(port, 50, seed=seed, interval=0.01))
                self.addCleanup(streams[-1].stop)
                streams[-1].start()
        wait_until(lambda: sum(b.round_trips() for b in streams) >= 1000, 30)
        self.assertEqual([b.finish() for b in streams], [[], []])
        wait_until(lambda: self.balancer.open_pairs() == 0)
        line = re.compile(r'\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ \S.*\Z')

        def lines():
            with open(path) as f:
                return f.read().splitlines()
        wait_until(lambda: len([l for l in lines() if ' access ' in l]) >= 100)
        self.assertEqual([l for l in lines() if not line.match(l) or l.count(' access ') > 1], [])
        os.rename(path, path + '.1')
        self.balancer.call(self.balancer.director.close_log)     # as SIGUSR1 does: in every process
        def echoed(sock):
            sock.sendall(b'x')
            sock.shutdown(socket.SHUT_WR)
            return recv_all(sock)
        clients = [self.via(pid, handled=echoed) for pid in self.pids()]
        self.assertEqual([data for _, data in clients], [b'x', b'x'])
        ports = [sock.getsockname()[1] for sock, _ in clients]
        wait_until(lambda: os.path.exists(path) and all(
            [l for l in lines() if 'client=127.0.0.1:%d ' % p in l] for p in ports))


class ChannelTest(BalancerCase):
    """The master-worker channel on a real socketpair and two loops."""

    def loop(self):
        loop = pydirector.Loop()
        thread = threading.Thread(target=loop.run, daemon=True)
        thread.start()
        wait_until(lambda: loop.thread_ident is not None)

        def stop():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)
            loop.close()
        self.addCleanup(stop)
        return loop

    def pair(self):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        got, lost = [], []
        sender_loop, receiver_loop = self.loop(), self.loop()
        sender = sender_loop.call(pydirector.Channel, sender_loop, a, lambda m, fds: None, lambda: lost.append('a'))
        receiver = receiver_loop.call(pydirector.Channel, receiver_loop, b, lambda m, fds: got.append((m, fds)),
                                      lambda: lost.append('b'))
        self.addCleanup(receiver_loop.call, receiver.close)
        self.addCleanup(sender_loop.call, sender.close)
        return sender_loop, sender, receiver_loop, receiver, got, lost

    def test_messages_whole_and_in_order_with_sockets_along(self):
        sender_loop, sender, _, _, got, lost = self.pair()
        big = 'x' * (8 << 20)       # far more than the socket buffer: sent in pieces as it drains
        listener = socket.socket()
        listener.bind(('127.0.0.1', 0))
        listener.listen(1)
        self.addCleanup(listener.close)

        def send():
            sender.send({'n': 0, 'big': big})
            for n in range(1, 500):
                sender.send({'n': n})
            sender.send({'n': 500, 'fds': 1}, [listener.fileno()])
        sender_loop.call(send)
        wait_until(lambda: len(got) == 501, 30)
        self.assertEqual([m['n'] for m, _ in got], list(range(501)))
        self.assertEqual(got[0][0]['big'], big)
        self.assertEqual([len(fds) for _, fds in got], [0] * 500 + [1])
        received = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, got[-1][1][0])
        self.addCleanup(received.close)
        self.assertEqual(received.getsockname(), listener.getsockname())   # the same socket, another fd
        self.assertEqual(lost, [])

    def test_a_bad_length_or_a_closed_peer_is_lost_once(self):
        _, sender, receiver_loop, receiver, got, lost = self.pair()
        receiver_loop.call(lambda: sender.sock.send(b'\xff\xff\xff\xff'))     # 4 GiB announced
        # The receiver gives up on nonsense; the sender then sees its peer close: each once.
        wait_until(lambda: sorted(lost) == ['a', 'b'])   # (either may be told first)
        self.assertEqual(got, [])
        LOG.wait_for('bad message: a message of 4294967295 bytes', self.mark)

    def test_a_listening_socket_a_worker_gets_is_non_blocking(self):
        # PyPy makes a socket built on an fd blocking: a worker then blocked in accept()
        # after its first client, and served nobody (every worker suite hung on PyPy).
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(('127.0.0.1', 0))
        listener.listen(1)
        listener.setblocking(True)
        host, port = listener.getsockname()
        got = pydirector.listen_sockets([[host, port, listener.family, os.dup(listener.fileno())]], ())
        sock = got[pydirector.address_key(host, port)]
        self.addCleanup(sock.close)
        self.assertTrue(fcntl.fcntl(sock.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK)
        self.assertTrue(fcntl.fcntl(listener.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK)   # one flag for both


class ConfigTest(unittest.TestCase):

    def parse(self, attrs):
        return pydirector.parse_config(config_xml(service_xml([('one', '127.0.0.1:1')], listen_port=2000),
                                                  **attrs), 'w.xml')

    def test_workers_attribute(self):
        self.assertIsNone(self.parse({}).workers)
        self.assertEqual(self.parse({'workers': '4'}).workers, 4)
        self.assertEqual(self.parse({'workers': 'auto'}).workers, 'auto')
        self.assertIn('<pdconfig workers="4">', self.parse({'workers': '4'}).to_xml())
        for bad in ('0', '-1', 'many', '1.5', '100000'):
            with self.assertRaises(pydirector.ConfigError) as caught:
                self.parse({'workers': bad})
            self.assertEqual(str(caught.exception),
                             "w.xml:1: <pdconfig> workers %r: must be 'auto' or a number 1-1024" % bad)

    def test_auto_is_the_cpus_this_process_may_use(self):
        expected = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
        self.assertEqual(pydirector.worker_count('auto'), expected)
        self.assertIsNone(pydirector.worker_count(None))

    def test_a_platform_without_what_workers_need_is_an_error(self):
        with mock.patch.object(pydirector, 'workers_unsupported', lambda: 'AF_UNIX sockets'):
            with self.assertRaises(pydirector.ConfigError) as caught:
                self.parse({'workers': '2'})
        self.assertEqual(str(caught.exception), "w.xml:1: <pdconfig> workers 2: this platform has no AF_UNIX "
                                                "sockets, which worker processes need")
        self.assertIsNone(pydirector.workers_unsupported())      # this one has all of it

    def test_running_xml_keeps_workers(self):
        config = self.parse({'workers': 'auto'})
        director = pydirector.Director(config, resolve_names=False)
        self.addCleanup(director.loop.close)
        self.assertIn('<pdconfig workers="auto">', director.running_xml())
        self.assertEqual(pydirector.ConfigDiff(director.running_config(), config).settings, [])

    def test_a_change_of_workers_is_not_applied(self):
        old, new = self.parse({}), self.parse({'workers': '2'})
        self.assertIn('<pdconfig> workers (default) -> 2', pydirector_admin.plan_changes(old, new).lines()[0])

    def test_command_line(self):
        out = subprocess.run([sys.executable, support.PYDIRECTOR, '--workers', 'none', '-c', 'x.xml'],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
        self.assertEqual(out.returncode, 2)
        self.assertIn("--workers 'none': must be 'auto' or a number 1-1024", out.stdout.decode())
        directory = tempfile.mkdtemp(prefix='pydirector-workers-')
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, 'w.xml')
        with open(path, 'w') as f:
            f.write(config_xml(service_xml([('one', '127.0.0.1:1')], listen_port=2000), workers='3'))
        out = subprocess.run([sys.executable, support.PYDIRECTOR, '--check', path],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
        self.assertEqual(out.returncode, 0)
        self.assertIn('\nworkers: 3\n', out.stdout.decode())


@unittest.skipUnless(os.path.isdir('/proc/self/fd'), 'needs Linux /proc')
class LifeCycleTest(BalancerCase):
    """A real master process (pydirector.py --workers 2), signalled."""

    def spawn(self, xml, port, args=('--workers', '2')):
        proc = SpawnedBalancer(xml, args=list(args))
        self.addCleanup(proc.close)
        wait_until(lambda: len(self.worker_pids(proc)) == 2 or proc.proc.poll() is not None, 60)
        self.assertIsNone(proc.proc.poll(), proc.output())
        self.addCleanup(self.kill_workers, proc)
        return proc

    def worker_pids(self, proc):
        return [int(p) for p in re.findall(r'worker \d+ \(pid (\d+)\) ready', proc.output())]

    def kill_workers(self, proc):
        for pid in self.worker_pids(proc):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)

    def test_sigterm_with_1000_open_connections(self):
        e = EchoServer()
        self.addCleanup(e.close)
        port = free_port()
        drain = 2
        proc = self.spawn(config_xml(service_xml([('echo', e.address)], listen_port=port), drain=str(drain)), port)
        support.raise_open_files(4096)
        active = Background(port, 100, seed=1, interval=0.05)
        self.addCleanup(active.stop)
        active.start()
        idle = Background(port, 900, seed=2, interval=3600)     # one round trip, then quiet
        self.addCleanup(idle.stop)
        idle.start()
        self.assertEqual(e.open, 1000)
        pids = self.worker_pids(proc)
        held = [len(tcp_inodes(port) & socket_inodes(pid)) for pid in pids]
        self.assertEqual(sum(held), 1000)
        self.assertTrue(all(held), held)            # across both workers
        proc.signal(signal.SIGTERM)
        wait_until(lambda: 'stopping: ' in proc.output(), 5)
        wait_until(lambda: not accepts(port), 5)
        self.assertEqual(active.finish(), [])       # the active ones finish whole during the drain
        self.assertEqual(proc.wait(drain + 15), 0)
        out = proc.output()
        self.assertNotIn('Traceback', out)
        for number in (1, 2):
            self.assertIn('worker %d: stopping: ' % number, out)
        self.assertEqual([pid for pid in pids if alive(pid)], [])
        idle.stop()

    def test_sigkill_the_master(self):
        b = support.Backend(name_then_echo, 'one')
        self.addCleanup(b.close)
        port = free_port()
        proc = self.spawn(config_xml(service_xml([('one', b.address)], listen_port=port), drain='1'), port)
        pids = self.worker_pids(proc)
        held = [connect(port) for _ in range(4)]
        for sock in held:
            self.addCleanup(sock.close)
            self.assertEqual(read_line(sock), 'one')
        proc.proc.kill()
        proc.proc.wait(10)
        # The workers see their channel close: no one accepts any more...
        wait_until(lambda: not accepts(port), 5)
        # ...the open connections still flow until the drain ends...
        held[0].sendall(b'still\n')
        self.assertEqual(read_line(held[0]), 'still')
        # ...and then every worker has gone.
        wait_until(lambda: not any(alive(pid) for pid in pids), 10)
        for sock in held:
            sock.settimeout(5)
            self.assertEqual(recv_all(sock), b'')

    def test_fds_back_to_baseline_in_every_process(self):
        e = EchoServer()
        self.addCleanup(e.close)
        port = free_port()
        proc = self.spawn(config_xml(service_xml([('echo', e.address)], listen_port=port)), port)
        processes = [proc.proc.pid] + self.worker_pids(proc)
        baseline = dict((pid, fd_count(pid)) for pid in processes)
        for _ in range(3):
            background = Background(port, 200, interval=0.02)
            background.start()
            self.assertEqual(background.finish(), [])
        for pid in processes:
            wait_until(lambda: fd_count(pid) <= baseline[pid], 5,
                       message='pid %d: fds not back to %d' % (pid, baseline[pid]))

    def test_sighup_reload_reaches_the_workers(self):
        one, two = support.Backend(say_name, 'one'), support.Backend(say_name, 'two')
        for b in (one, two):
            self.addCleanup(b.close)
        port = free_port()
        proc = self.spawn(config_xml(service_xml([('one', one.address)], listen_port=port)), port)
        with open(proc.config_path, 'w') as f:
            f.write(config_xml(service_xml([('two', two.address)], listen_port=port)))
        proc.signal(signal.SIGHUP)
        wait_until(lambda: 'reloaded ' in proc.output(), 10)
        # A signal has no answer to wait for: each worker takes the new config a moment later.
        wait_until(lambda: set(exchange(port) for _ in range(10)) == {b'two'}, 10)
        proc.signal(signal.SIGTERM)
        self.assertEqual(proc.wait(15), 0)

    def test_the_bundle_runs_workers(self):
        directory = tempfile.mkdtemp(prefix='pydirector-bundle-')
        self.addCleanup(shutil.rmtree, directory, True)
        bundle = os.path.join(directory, 'pydirector.pyz')
        subprocess.check_call([sys.executable, os.path.join(support.REPO, 'tools', 'bundle.py'), '--output', bundle],
                              stdout=subprocess.DEVNULL, timeout=120)
        b = support.Backend(say_name, 'one')
        self.addCleanup(b.close)
        port = free_port()
        config = os.path.join(directory, 'c.xml')
        with open(config, 'w') as f:
            f.write(config_xml(service_xml([('one', b.address)], listen_port=port), workers='2'))
        log = open(os.path.join(directory, 'out.log'), 'wb')
        self.addCleanup(log.close)
        proc = subprocess.Popen([sys.executable, bundle, '-c', config], stdout=log, stderr=subprocess.STDOUT)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())

        def output():
            with open(os.path.join(directory, 'out.log')) as f:
                return f.read()
        wait_until(lambda: output().count(') ready') == 2 or proc.poll() is not None, 60)
        self.assertEqual(exchange(port), b'one', output())
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(15), 0)
        self.assertNotIn('Traceback', output())


if __name__ == '__main__':
    unittest.main()
