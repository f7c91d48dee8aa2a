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
import errno
import fcntl
import inspect
import json
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
                     echo, exchange, fd_count, free_port, process_state, recv_all, say_name, service_xml, wait_until)

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


def listening_inode(port):
    """The inode of the socket listening on this port (/proc/net/tcp)."""
    with open('/proc/net/tcp') as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[3] == '0A' and int(fields[1].rsplit(':', 1)[1], 16) == port:
                return fields[9]
    return None


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


def alive(pid):
    try:
        return process_state(pid) != 'Z'
    except OSError:
        return False


def stop(pid):
    """SIGSTOP pid and wait until it has stopped (out of epoll_wait); SIGCONT is resume's."""
    os.kill(pid, signal.SIGSTOP)
    wait_until(lambda: process_state(pid) == 'T', 5)


def resume(pid):
    """SIGCONT pid, unless the master has killed it since."""
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


class WorkersCase(BalancerCase):
    """A master here and two worker processes, per test."""
    workers = 2

    def start(self, *services, **root):
        # Steering stops workers (SIGSTOP) for as long as a test takes, on a busy box
        # too: not what a stuck worker is, unless a test says so.
        root.setdefault('worker_timeout', '60')
        return BalancerCase.start(self, *services, **root)

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
        self.admin('/hostAdminDown', 'service=web&group=main&name=b', expect=409)     # the last host up
        self.admin('/hostAdminDown', 'service=web&group=main&name=b&force=1')
        self.admin('/hostAdminUp', 'service=web&group=main&name=a')
        self.assertEqual(self.names() + self.names(), ['a', 'a', 'a', 'a'])

    def test_set_host_reaches_every_worker(self):
        self.admin('/addHost', 'service=web&group=main&name=b&ip=%s' % self.b.address)
        answer = self.admin('/setHost', 'service=web&group=main&name=a&weight=3')
        self.assertEqual(answer, 'OK set host a in web/main: weight 3 (was 1) (0 open)\n')
        for pid in self.pids():
            # Any 4 picks in a row of a 3:1 round robin: a three times, b once.
            names = [self.name_via(pid) for _ in range(8)]
            self.assertEqual(sorted(names), ['a'] * 6 + ['b'] * 2, (pid, names))
        self.admin('/setHost', 'service=web&group=main&name=a&state=maint')
        self.assertEqual(self.names() + self.names(), ['b', 'b', 'b', 'b'])
        self.admin('/setHost', 'service=web&group=main&name=b&state=drain', expect=409)

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
        answer = self.admin('/enableGroup', 'service=web&group=green&rollback=0.3&force=1')
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


class QueueTest(WorkersCase):
    """One queue over every worker (issue 25, F7): each worker publishes its queue at
    every change, a worker whose loop does not run takes no turn, and the limit holds
    in total."""

    def start_queue(self, *hosts):
        backends = [self.backend(name_then_echo, name) for name in hosts]
        self.start(service_xml([(name, b.address, 'maxconns="1"') for name, b in zip(hosts, backends)],
                               extra='    <timeouts queue="30"/>\n'))

    def queued(self):
        return self.balancer.snapshot()['services'][0]['queued']

    def queue_via(self, pid, count):
        """A client that worker pid accepts and queues (count: the queue over every worker then)."""
        return self.via(pid, handled=lambda sock: wait_until(lambda: self.queued() == count))[0]

    def served_within(self, sock, seconds, since):
        sock.settimeout(10)
        self.assertEqual(read_line(sock), 'h1')
        waited = time.monotonic() - since
        self.assertLess(waited, seconds, 'served %.2f s after the place freed' % waited)

    def test_a_queue_that_a_host_coming_up_emptied_is_out_of_line(self):
        self.start_queue('h1', 'h2')
        director = self.balancer.director
        self.balancer.call(director.host_admin_down, 'web', 'main', 'h2')
        first, second = self.pids()
        held, name = self.via(second)
        self.assertEqual(name, 'h1')
        early = self.queue_via(first, 1)
        # Not synchronisation: the scenario.  Past a full publish of the first worker's
        # counters (every TICKS_FULL ticks), only a change to them would publish its queue again.
        time.sleep(1.2 * pydirector.WorkerCounts.TICK * pydirector.WorkerCounts.TICKS_FULL)
        # h2 comes back: the first worker's client takes it, and its queue is empty at once
        # (it was left saying 1 client, waiting since then, until some other counter moved).
        self.balancer.call(director.host_admin_up, 'web', 'main', 'h2')
        self.assertEqual(self.queued(), 0)
        self.assertEqual(read_line(early), 'h2')
        late = self.queue_via(second, 1)
        # So the second worker's client is first in line when h1 frees.
        freed = time.monotonic()
        held.close()
        self.served_within(late, 1.0, freed)
        for sock in (early, late):
            sock.close()

    def test_a_stopped_workers_client_does_not_hold_up_the_others(self):
        self.start_queue('h1')
        first, second = self.pids()
        held, _ = self.via(second)
        early = self.queue_via(first, 1)
        late = self.queue_via(second, 2)
        stop(first)
        try:
            # The first worker's client has waited longest, but its loop is not running:
            # the place goes to the second worker's, not to no one until the queue timeout.
            freed = time.monotonic()
            held.close()
            self.served_within(late, 1.0, freed)
        finally:
            resume(first)
        late.close()
        early.settimeout(10)
        self.assertEqual(read_line(early), 'h1')     # its turn once running again
        early.close()

    def test_the_queue_limit_holds_over_every_worker(self):
        support.raise_open_files(4096)
        self.start_queue('h1')
        first, second = self.pids()
        held, _ = self.via(second)
        waiting = []
        with only(self.pids(), first):
            for _ in range(pydirector.QUEUE_LIMIT):
                sock = connect(self.balancer.port())
                self.addCleanup(sock.close)
                waiting.append(sock)
            wait_until(lambda: self.queued() == pydirector.QUEUE_LIMIT, 30)
        # The queue is full, all of it in the first worker: the second refuses at once too.
        for _ in range(3):
            sock, answer = self.via(second, handled=recv_all)
            self.assertEqual(answer, b'')
            sock.close()
        self.assertEqual(self.balancer.snapshot()['services'][0]['refused'], 3)
        self.assertEqual(self.queued(), pydirector.QUEUE_LIMIT)
        for sock in waiting:
            sock.close()
        held.close()        # the queue drains through h1 (each waiting client has gone)
        wait_until(lambda: self.balancer.open_pairs() == 0, 60)


@unittest.skipUnless(os.path.isdir('/proc/self/fd'), 'needs Linux /proc')
class StuckWorkerTest(AdminWorkersCase):
    """A worker whose loop stops (issue 25, F3 and F9): its heartbeat goes silent, the
    master kills it after <pdconfig worker_timeout> and starts another, which takes
    the clients waiting on the listening sockets; meanwhile /healthz and the systemd
    watchdog count only the workers that serve."""

    def stop_all(self):
        pids = self.pids()
        for pid in pids:
            self.addCleanup(resume, pid)
            stop(pid)
        return pids

    def test_stopped_workers_are_killed_and_restarted_and_waiting_clients_served(self):
        b = self.backend(name_then_echo, 'one')
        self.start(service_xml([('one', b.address)]), worker_timeout='1')
        mark = LOG.mark()
        old = self.stop_all()
        since = time.monotonic()
        clients = []
        for _ in range(5):      # taken by the kernel: they wait in the listening socket
            clients.append(connect(self.balancer.port(), timeout=20))
            self.addCleanup(clients[-1].close)
        for index, pid in enumerate(old, 1):
            LOG.wait_for('worker %d (pid %d) has not run its loop for ' % (index, pid), mark, timeout=10)
            LOG.wait_for('worker %d (pid %d) exited on signal 9 (SIGKILL); restarting it' % (index, pid), mark)
        for sock in clients:
            self.assertEqual(read_line(sock), 'one')
            sock.sendall(b'still here')
            sock.shutdown(socket.SHUT_WR)
            self.assertEqual(recv_all(sock), b'still here')
            sock.close()
        self.assertLess(time.monotonic() - since, 10)
        # The log line comes before the new process: one may still be starting.
        wait_until(lambda: all(n != o for n, o in zip(self.pids(), old)), 10)
        self.assertEqual([w['restarts'] for w in self.balancer.snapshot()['workers']], [1, 1])

    def test_no_worker_serving_is_down_for_healthz_and_the_watchdog(self):
        from test_systemd import NotifySocket
        b = self.backend(say_name, 'one')
        self.start(service_xml([('one', b.address)]), self.admin_xml(), worker_timeout='1')
        self.start_admin(self.balancer)
        notify = NotifySocket()
        self.addCleanup(notify.close)
        notifier = pydirector.Notifier({'NOTIFY_SOCKET': notify.env, 'WATCHDOG_USEC': '100000'})
        self.addCleanup(notifier.close)
        director = self.balancer.director
        director.loop.call(notifier.start_watchdog, director.loop, director.serving)    # as main() does
        self.assertEqual(notify.next(), 'WATCHDOG=1')
        self.assertEqual(self.admin('/healthz'), 'OK\n')
        # Every worker stops, and those started in their place die at once.
        master = self.balancer.master
        command, master.command = master.command, [sys.executable, '-c', 'raise SystemExit(3)']
        mark = LOG.mark()
        self.stop_all()
        LOG.wait_for('no worker is serving: not feeding the systemd watchdog', mark, timeout=10)
        self.assertEqual(self.admin('/healthz', expect=503), 'DOWN 1\n')
        notify.waiting()
        with self.assertRaises(socket.timeout):
            notify.next(timeout=0.5)        # ten ping intervals
        # Workers that start again: OK, fed, served.
        master.command = command
        wait_until(lambda: self.healthz() == 200, 30)
        notify.waiting()
        self.assertEqual(notify.next(), 'WATCHDOG=1')
        self.assertEqual(exchange(self.balancer.port()), b'one')

    def healthz(self):
        try:
            with urllib.request.urlopen('http://127.0.0.1:%d/healthz' % self.server.server_address[1],
                                        timeout=10) as answer:
                return answer.status
        except urllib.error.HTTPError as e:
            e.close()
            return e.code

    def test_each_workers_heartbeat_on_the_pages(self):
        b = self.backend(say_name, 'one')
        self.start(service_xml([('one', b.address)]), self.admin_xml(), worker_timeout='30')
        self.start_admin(self.balancer)
        second = self.pids()[1]
        self.addCleanup(resume, second)
        stop(second)

        def heartbeats():
            return [w['heartbeat'] for w in json.loads(self.admin('/running.json'))['workers']]
        wait_until(lambda: heartbeats()[1] >= 1.0, 10)
        running, stopped = heartbeats()
        self.assertLess(running, 1.0)
        metrics = self.admin('/metrics')
        ages = dict(re.findall(r'^pydirector_worker_heartbeat_age_seconds\{worker="(\d)"\} ([0-9.]+)$', metrics, re.M))
        self.assertLess(float(ages['1']), 1.0)
        self.assertGreaterEqual(float(ages['2']), 1.0)
        self.assertRegex(self.admin('/running'), r'<td>2</td><td>%d</td><td>up</td>(<td>[^<]*</td>){4}'
                                                 r'<td>\d+\.\d s ago</td>' % second)
        resume(second)
        wait_until(lambda: heartbeats()[1] < 1.0, 10)

    @unittest.skipUnless(hasattr(os, 'sched_setaffinity'), 'needs sched_setaffinity')
    def test_a_client_the_kernel_gave_a_stalled_worker_is_served(self):
        # F9: the kernel wakes one worker for a new client (EPOLLEXCLUSIVE); if that one
        # stalls before it accepts, no other is woken until the next client comes.  The
        # stalled worker is killed after worker_timeout, and the one started in its
        # place takes the client.
        b = self.backend(say_name, 'one')
        self.start(service_xml([('one', b.address)]), worker_timeout='1')
        mark = LOG.mark()
        for attempt in range(40):
            wait_until(lambda: all(w.ready for w in self.balancer.master.workers), 30)
            pids = self.pids()
            index = attempt % 2 + 1
            sock = self.stranded(pids[index - 1])
            if sock is not None:
                break
        else:
            self.skipTest('no client stranded in 40 tries')
        since = time.monotonic()
        sock.settimeout(20)
        self.assertEqual(read_line(sock), 'one')
        self.assertLess(time.monotonic() - since, 10)
        LOG.wait_for('worker %d (pid %d) has not run its loop for ' % (index, pids[index - 1]), mark)

    def stranded(self, pid):
        """A client the kernel hands worker pid, stopped (SIGSTOP) as it wakes: its socket if
        the other worker did not take it within 0.5 s (else None, pid running again)."""
        cpus = os.sched_getaffinity(0)
        cpu = min(cpus)
        # On this thread's CPU, and unable to preempt it: woken for the client, the worker
        # does not run before the SIGSTOP.  (Without these it does, now and then.)
        os.sched_setaffinity(pid, {cpu})
        try:
            os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))
        except (AttributeError, OSError):
            pass
        os.sched_setaffinity(0, {cpu})
        try:
            sock = socket.create_connection(('127.0.0.1', self.balancer.port()), timeout=10)
            os.kill(pid, signal.SIGSTOP)
        finally:
            os.sched_setaffinity(0, cpus)
        self.addCleanup(sock.close)
        self.addCleanup(resume, pid)
        sock.settimeout(0.5)
        try:
            name = read_line(sock)
        except socket.timeout:
            # Stranded means still in the accept queue.  A worker that accepted it just
            # before its SIGSTOP holds it instead: killed for silence, it would close it.
            if support.accept_queue_length(self.balancer.port()) != 0:
                return sock
            name = None
        resume(pid)
        try:
            os.sched_setscheduler(pid, os.SCHED_OTHER, os.sched_param(0))
        except (AttributeError, OSError):
            pass
        try:
            os.sched_setaffinity(pid, cpus)
        except OSError:
            pass        # killed meanwhile, its loop silent too long on a busy box
        if name is not None:
            self.assertEqual(name, 'one')
        sock.close()
        return None


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


    def test_a_reload_adding_200_listens_cuts_nothing(self):
        # More sockets than one read of the channel takes (64): sent in batches.
        directory = tempfile.mkdtemp(prefix='pydirector-workers-')
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, 'live.xml')
        support.raise_open_files(4096)
        e = EchoServer()
        self.addCleanup(e.close)
        one = self.backend(say_name, 'one')
        bg = service_xml([('echo', e.address)], name='bg')
        self.start(config_xml(bg), path=path)
        pids = self.pids()
        streams = []
        for seed, pid in enumerate(pids):      # open connections in each worker
            with only(pids, pid):
                streams.append(Background(self.balancer.port('bg'), 3, seed=seed, interval=0.05))
                self.addCleanup(streams[-1].stop)
                streams[-1].start()
        port = free_port()
        many = service_xml([('one', one.address)], name='many', listen_port=port).replace(
            '    <listen ip="127.0.0.1:%d"/>\n' % port,
            ''.join('    <listen ip="127.0.1.%d:%d"/>\n' % (n, port) for n in range(1, 201)))
        with open(path, 'w') as f:
            f.write(config_xml(bg, many))
        self.assertIn('+service many', self.balancer.call(self.balancer.director.reload))
        for pid in pids:
            with only(pids, pid):
                for n in (1, 64, 65, 128, 129, 200):
                    sock = connect(port, host='127.0.1.%d' % n)
                    self.assertEqual(recv_all(sock), b'one', (pid, n))
                    sock.close()
        self.assertEqual(self.pids(), pids)                                     # none restarted
        self.assertEqual([b.finish() for b in streams], [[], []])               # not one cut
        self.assertEqual([w['restarts'] for w in self.balancer.snapshot()['workers']], [0, 0])

    def test_a_listen_removed_and_added_again_keeps_its_socket(self):
        # A worker that has not yet let go of a removed listen's socket once made the
        # reload adding it back fail ("Address already in use"): the master reuses it.
        directory = tempfile.mkdtemp(prefix='pydirector-workers-')
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, 'live.xml')
        one, two = self.backend(say_name, 'one'), self.backend(say_name, 'two')
        port, extra = free_port(), free_port()
        web = service_xml([('one', one.address)], listen_port=port)
        more = service_xml([('two', two.address)], name='more', listen_port=extra)
        self.start(config_xml(web, more), path=path)
        director = self.balancer.director
        first, second = self.pids()
        os.kill(second, signal.SIGSTOP)     # it applies nothing meanwhile
        try:
            with open(path, 'w') as f:
                f.write(config_xml(web))
            self.assertIn('-service more', director.reload())
            with open(path, 'w') as f:
                f.write(config_xml(web, more))
            self.assertIn('+service more', director.reload())
        finally:
            os.kill(second, signal.SIGCONT)
        self.balancer.sync()
        self.assertEqual([self.name_via(pid, extra) for pid in (first, second)], ['two', 'two'])
        self.assertEqual([l for l in LOG.since(self.mark) if 'already in use' in l or 'cannot apply' in l], [])
        # Removed for good: once every worker has let go, so has the master.
        with open(path, 'w') as f:
            f.write(config_xml(web))
        self.balancer.call(director.reload)
        wait_until(lambda: not accepts(extra))

class StaleWorkerTest(WorkersCase):
    """Issue 25: no worker stays on an old config, and none is left behind silently."""

    def setUp(self):
        WorkersCase.setUp(self)
        directory = tempfile.mkdtemp(prefix='pydirector-workers-')
        self.addCleanup(shutil.rmtree, directory, True)
        self.path = os.path.join(directory, 'live.xml')
        self.gate_path = os.path.join(directory, 'gate')

    def rewrite(self, *services):
        with open(self.path, 'w') as f:
            f.write(config_xml(*services))

    def gate(self):
        """Workers the master starts from now on wait before running until open_gate()."""
        os.mkfifo(self.gate_path)
        master = self.balancer.master
        master.command = ['sh', '-c', 'read line < "$0"; exec "$@"', self.gate_path] + master.command

    def open_gate(self):
        def writer():
            try:
                return os.open(self.gate_path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:
                if e.errno != errno.ENXIO:      # ENXIO: the worker's shell is not reading yet
                    raise
        fd = wait_until(writer, 30)
        os.write(fd, b'go\n')
        os.close(fd)

    def generations(self):
        return [(w['generation'], w['behind']) for w in self.balancer.snapshot()['workers']]

    def test_a_listen_added_while_a_worker_starts_reaches_it(self):
        # The reload that adds a listen reaches a new worker's channel before the worker
        # has read its config: the new socket rides with it, and was once dropped by the
        # worker's first read, leaving that worker on the old config for good.
        one, two, three = (self.backend(say_name, n) for n in ('one', 'two', 'three'))
        port, new_port = free_port(), free_port()
        self.rewrite(service_xml([('one', one.address)], listen_port=port))
        with open(self.path) as f:
            self.start(f.read(), path=self.path)
        self.assertEqual(self.generations(), [(1, False), (1, False)])
        self.gate()
        victim = self.pids()[0]
        mark = LOG.mark()
        os.kill(victim, signal.SIGKILL)
        LOG.wait_for('worker 1 (pid %d) exited on signal 9' % victim, mark)
        # Started again, and held at the gate: the reload goes down its channel now.
        self.rewrite(service_xml([('two', two.address)], listen_port=port),
                     service_xml([('two', two.address)], name='more', listen_port=new_port))
        self.assertIn('+service more', self.balancer.director.reload())
        self.open_gate()
        new = self.pids()[0]
        LOG.wait_for('worker 1 (pid %d) ready' % new, mark, timeout=30)
        self.balancer.sync()
        for pid in self.pids():
            self.assertEqual(self.name_via(pid, new_port), 'two')
            self.assertEqual(self.name_via(pid, port), 'two')
        self.assertEqual(self.generations(), [(2, False), (2, False)])
        # And the next reload, which moves web again, reaches it too.
        self.rewrite(service_xml([('three', three.address)], listen_port=port),
                     service_xml([('two', two.address)], name='more', listen_port=new_port))
        self.balancer.call(self.balancer.director.reload)
        self.assertEqual([self.name_via(pid, port) for pid in self.pids()], ['three', 'three'])
        self.assertEqual(self.generations(), [(3, False), (3, False)])
        self.assertEqual([l for l in LOG.since(mark) if 'cannot apply' in l or 'could not apply' in l], [])

    def test_a_worker_that_cannot_apply_a_change_says_so_and_is_repaired(self):
        a, stray = self.backend(say_name, 'a'), self.backend(say_name, 'stray')
        self.start(service_xml([('a', a.address)]))
        master = self.balancer.master
        first, second = self.pids()
        mark = LOG.mark()

        def stray_worker_1():
            # A change the master never made (worker 1 strays), then one it cannot apply.
            worker = master.workers[0]
            master.send_to(worker, 'call', method='add_host', args=['web', 'main', 'stray', stray.address],
                           kwargs={'weight': 1000}, slots=[], seq=master.seq)
            master.send_to(worker, 'call', method='del_host', args=['web', 'main', 'nosuch'], kwargs={},
                           slots=[], seq=master.seq)
        self.balancer.call(stray_worker_1)
        LOG.wait_for("worker 1 (pid %d) could not apply del_host: no host 'nosuch' in web/main; "
                     "sending it the running config again" % first, mark)
        # Anything sent after the repair is acknowledged once the repair is applied.
        self.balancer.call(lambda: master.send_all('sticky', entries=[]))
        self.assertEqual(self.generations(), [(1, False), (1, False)])
        # Repaired: the master's config again, the stray host gone.
        self.assertEqual([self.name_via(pid) for pid in (first, second, first)], ['a', 'a', 'a'])
        self.assertEqual(self.pids(), [first, second])      # by a resend: nothing restarted

    def test_a_draining_worker_takes_no_new_listen(self):
        # A worker being restarted drains its connections; a reload meanwhile must
        # not make it accept again on the sockets the reload brings.
        a, two = self.backend(name_then_echo, 'a'), self.backend(say_name, 'two')
        port, new_port = free_port(), free_port()
        self.rewrite(service_xml([('a', a.address)], listen_port=port))
        with open(self.path) as f:
            self.start(f.read(), path=self.path)
        master = self.balancer.master
        first, second = self.pids()
        held, _ = self.via(first)
        mark = LOG.mark()
        self.balancer.call(lambda: master.send_to(master.workers[0], 'stop', drain=30))
        LOG.wait_for('stopping: 1 connection(s) open, waiting up to 30 s', mark)
        self.rewrite(service_xml([('a', a.address)], listen_port=port),
                     service_xml([('two', two.address)], name='more', listen_port=new_port))
        self.balancer.call(self.balancer.director.reload)
        inode = listening_inode(new_port)
        self.assertIn(inode, socket_inodes(second))
        self.assertNotIn(inode, socket_inodes(first))
        held.close()
        LOG.wait_for('worker 1 (pid %d) exited with status 0; restarting it' % first, mark, timeout=15)
        new = wait_until(lambda: self.pids()[0] != first and self.pids()[0])
        LOG.wait_for('worker 1 (pid %d) ready' % new, mark, timeout=30)
        self.assertEqual(self.name_via(new, new_port), 'two')

    def test_a_worker_that_cannot_apply_its_repair_is_restarted(self):
        a = self.backend(name_then_echo, 'a')
        self.start(service_xml([('a', a.address)]))
        master = self.balancer.master
        director = self.balancer.director
        first, second = self.pids()
        held, name = self.via(first)
        self.assertEqual(name, 'a')
        running_xml = director.running_xml
        sent = []

        def broken_once():
            if not sent:
                sent.append(1)
                return '<pdconfig><broken/>'
            return running_xml()
        mark = LOG.mark()
        with mock.patch.object(director, 'running_xml', broken_once):
            self.balancer.director.loop.call(lambda: master.send_to(
                master.workers[0], 'call', method='del_host', args=['web', 'main', 'nosuch'], kwargs={}, slots=[],
                seq=master.seq))
            line = LOG.wait_for('worker 1 (pid %d) could not apply the running config either: ' % first, mark)[0]
        self.assertRegex(line, r': test\.xml:1: .*; restarting it\Z')
        # It lets its connection finish first.
        held.sendall(b'still\n')
        self.assertEqual(read_line(held), 'still')
        held.close()
        LOG.wait_for('worker 1 (pid %d) exited with status 0; restarting it (restart 1)' % first, mark, timeout=15)
        new = wait_until(lambda: self.pids()[0] != first and self.pids()[0])
        LOG.wait_for('worker 1 (pid %d) ready' % new, mark, timeout=30)
        self.assertEqual(self.name_via(new), 'a')
        self.assertEqual(self.generations(), [(1, False), (1, False)])


class RunningPageTest(AdminWorkersCase):

    def test_running_shows_each_workers_config_generation(self):
        directory = tempfile.mkdtemp(prefix='pydirector-workers-')
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, 'live.xml')
        one, two = self.backend(say_name, 'one'), self.backend(say_name, 'two')
        port = free_port()
        admin = self.admin_xml()
        self.start(config_xml(service_xml([('one', one.address)], listen_port=port)).replace(
            '</pdconfig>', admin + '</pdconfig>'), path=path)
        self.start_admin(self.balancer)
        self.assertEqual(self.admin('/running').count('<td>generation 1</td>'), 2)
        first, second = self.pids()
        with open(path, 'w') as f:
            f.write(config_xml(service_xml([('two', two.address)], listen_port=port)).replace(
                '</pdconfig>', admin + '</pdconfig>'))
        os.kill(second, signal.SIGSTOP)
        try:
            self.balancer.director.reload()
            wait_until(lambda: [(w['generation'], w['behind']) for w in json.loads(
                self.admin('/running.json'))['workers']] == [(2, False), (1, True)])
            page = self.admin('/running')
            self.assertIn('<td>generation 2</td>', page)
            self.assertIn('<td><strong>generation 1 (behind)</strong></td>', page)
        finally:
            os.kill(second, signal.SIGCONT)
        self.balancer.sync()
        self.assertEqual(self.admin('/running').count('<td>generation 2</td>'), 2)


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

    def listeners(self, count):
        found = []
        for _ in range(count):
            sock = socket.socket()
            self.addCleanup(sock.close)
            sock.bind(('127.0.0.1', 0))
            sock.listen(1)
            found.append(sock)
        return found

    def same_sockets(self, fds, listeners):
        received = [socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd) for fd in fds]
        for sock in received:
            self.addCleanup(sock.close)
        return [s.getsockname() for s in received] == [s.getsockname() for s in listeners]

    def test_more_sockets_than_one_read_takes(self):
        sender_loop, sender, _, _, got, lost = self.pair()
        many = self.listeners(3 * pydirector.CHANNEL_FDS + 5)
        sender_loop.call(lambda: [sender.send({'n': 0}, [s.fileno() for s in many]),
                                  sender.send({'n': 1}, [many[0].fileno()])])
        wait_until(lambda: len(got) == 2)
        self.assertEqual([len(fds) for _, fds in got], [len(many), 1])
        self.assertTrue(self.same_sockets(got[0][1] + got[1][1], many + many[:1]))
        self.assertEqual(lost, [])

    def test_the_first_read_keeps_the_sockets_of_what_follows(self):
        # A worker reads its first message blocking; the next, sent meanwhile, may come
        # in the same read, with the sockets that ride on it.
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(a.close)
        many = self.listeners(100)
        loop = self.loop()
        sender = loop.call(pydirector.Channel, loop, a, lambda m, fds: None, lambda: None)
        self.addCleanup(loop.call, sender.close)
        loop.call(lambda: [sender.send({'t': 'config'}), sender.send({'t': 'reload'}, [s.fileno() for s in many])])
        wait_until(lambda: not sender.outbox)
        first, inbox, fds = pydirector.Channel.receive(b, 5)
        self.assertEqual(first, {'t': 'config'})
        got = []
        receiver_loop = self.loop()
        receiver = receiver_loop.call(pydirector.Channel, receiver_loop, b, lambda m, fds: got.append((m, fds)),
                                      lambda: None, inbox, fds)
        self.addCleanup(receiver_loop.call, receiver.close)
        wait_until(lambda: got)
        self.assertEqual(got[0][0], {'t': 'reload', 'fds': 100})
        self.assertTrue(self.same_sockets(got[0][1], many))

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


class MessageTableTest(unittest.TestCase):
    """Generated from pydirector.MESSAGES: a new row is covered with no change here."""

    def handler(self, row):
        """The handler's parameters after self (and a Master's worker): (required, optional)."""
        side = pydirector.Worker if row.direction == pydirector.DOWN else pydirector.Master
        params = list(inspect.signature(getattr(side, row.handler)).parameters.values())[1:]
        if side is pydirector.Master:
            self.assertEqual(params.pop(0).name, 'worker')
        return (set(p.name for p in params if p.default is p.empty),
                set(p.name for p in params if p.default is not p.empty))

    def test_every_row_has_its_handler_on_its_side_taking_its_fields(self):
        for kind, row in pydirector.MESSAGES.items():
            with self.subTest(kind=kind):
                self.assertEqual(row.kind, kind)
                self.assertIn(row.direction, (pydirector.DOWN, pydirector.UP))
                # Names the wire or the send methods take for themselves (send_to(to, kind, fds)).
                self.assertFalse((row.fields | row.optional) & {'t', 'fds', 'kind', 'to'})
                if row.handler is None:
                    self.assertEqual(kind, 'config')    # the first, which run_worker reads
                    continue
                required, optional = self.handler(row)
                self.assertEqual(required, row.fields | ({'fds'} if row.fds else set()))
                self.assertEqual(optional, row.optional - {'seq'})

    def test_every_handler_has_a_row(self):
        handlers = set((row.direction, row.handler) for row in pydirector.MESSAGES.values())
        for side, direction in ((pydirector.Worker, pydirector.DOWN), (pydirector.Master, pydirector.UP)):
            for name in dir(side):
                if name.startswith('on_') and name != 'on_message':
                    self.assertIn((direction, name), handlers)

    def test_a_message_unlike_its_row_is_not_sent(self):
        new = pydirector.new_message
        down, up = pydirector.DOWN, pydirector.UP
        self.assertEqual(new('stop', down, {'drain': 1}), {'t': 'stop', 'drain': 1})
        self.assertEqual(new('reload', down, dict.fromkeys(['xml', 'path', 'generation', 'hosts', 'discovered',
                                                           'listens', 'slots']),
                             [7])['t'], 'reload')
        for kind, direction, fields, fds, problem in [
                ('stop', down, {}, (), 'stop message: no drain'),
                ('stop', down, {'drain': 1, 'when': 2}, (), 'stop message: unknown when'),
                ('stop', down, {'drain': 1}, [7], 'stop message: sockets sent along'),
                ('stop', up, {'drain': 1}, (), "no up message 'stop'"),
                ('nosuch', down, {}, (), "no down message 'nosuch'")]:
            with self.subTest(kind=kind, fields=fields):
                with self.assertRaises(ValueError) as caught:
                    new(kind, direction, fields, fds)
                self.assertEqual(str(caught.exception), problem)

    def test_a_message_unlike_its_row_is_refused_on_receipt_and_its_sockets_closed(self):
        received = pydirector.received
        row, fields = received({'t': 'stop', 'drain': 1, 'seq': 4}, pydirector.DOWN, [])
        self.assertEqual((row.handler, fields), ('on_stop', {'drain': 1}))      # seq is the dispatcher's
        row, fields = received({'t': 'ack', 'seq': 4, 'generation': 2}, pydirector.UP, [])
        self.assertEqual((row.handler, fields), ('on_ack', {'seq': 4, 'generation': 2}))
        for message, direction, problem in [
                ({'t': 'stop'}, pydirector.DOWN, 'stop message: no drain'),
                ({'t': 'ack', 'seq': 4, 'generation': 2}, pydirector.DOWN, "unknown message 'ack'"),
                ({'t': 'config'}, pydirector.DOWN, "unknown message 'config'"),    # only ever the first
                ({'drain': 1}, pydirector.DOWN, 'unknown message None'),
                ({'t': 'stop', 'drain': 1, 'fds': 1}, pydirector.DOWN, 'stop message: sockets sent along')]:
            with self.subTest(message=message):
                read, write = os.pipe()
                os.close(write)
                with self.assertRaises(pydirector.MessageError) as caught:
                    received(message, direction, [read])
                self.assertEqual(str(caught.exception), problem)
                with self.assertRaises(OSError):
                    os.fstat(read)


class CounterTableTest(BalancerCase):
    """Generated from pydirector.COUNTERS: a new field is covered with no change here,
    unless a function gives its value (then a line saying how to set it up)."""

    def two_sides(self):
        """A master's Director and Master, and a worker's Director and WorkerCounts on
        the same counters, in this process (no worker process, no loop running)."""
        xml = config_xml(service_xml([('one', '127.0.0.1:1'), ('two', '127.0.0.1:2')], listen_port=free_port()))
        master_director = pydirector.Director(pydirector.parse_config(xml, 'test.xml'), accept=False)
        self.addCleanup(master_director.loop.close)
        self.addCleanup(master_director._close_listeners)
        master_director.bind()
        master = pydirector.Master(master_director, 1)
        self.addCleanup(master.close)
        director = pydirector.Director(pydirector.parse_config(xml, 'test.xml'), resolve_names=False)
        self.addCleanup(director.loop.close)
        self.addCleanup(director._close_listeners)
        director.listen_sockets = dict((l.listen.key, l.sock.dup()) for l in master_director.services['web'].listeners)
        director.bind()
        counters = pydirector.SharedCounters(os.dup(master.counters.fd), 2, 0, master.counters.size)
        self.addCleanup(counters.close)
        counts = director.worker_counts = pydirector.WorkerCounts(director, counters)
        self.addCleanup(counts.timer.cancel)
        counts.update(master.slot_entries(master.slot_of))
        return master, master_director, counts, director

    def test_each_field_a_worker_writes_reaches_the_master(self):
        master, master_director, counts, director = self.two_sides()
        service = director.services['web']
        host = service.groups['main'].scheduler.hosts[0]
        listener = service.listeners[0]
        things = {'service': service, 'host': host, 'address': listener}

        class Queued(object):
            started = 12.5

        class Reader(object):
            pass
        reader = Reader()
        reader.listener = listener
        # How each field a function gives is set up, and the value it should give.
        computed = {
            ('service', 'queued'): (lambda: service.queue.extend([Queued(), Queued()]), 2),
            ('service', 'head'): (lambda: None, 12500000),      # the first queued client's start, in µs
            ('host', 'open'): (lambda: (service.groups['main'].scheduler.set_open(host, 7),
                                        counts.others.__setitem__(host, 3)), 4),
            ('address', 'reading'): (lambda: director.hellos.add(reader), 1),
            ('service', 'client_entries'): (lambda: [limits.admit(key, 0.0) for key in ('a', 'b', 'c')], 3),
        }
        limits = service.limits = pydirector.ClientLimits(pydirector.Clients(maxconns=5), service)
        for i, kind in enumerate(pydirector.HELLO_PROBLEMS):
            computed['address', 'bad ' + kind] = (lambda kind=kind, i=i: listener.bad.__setitem__(kind, 50 + i), 50 + i)
        written = {}
        for n, row in enumerate(pydirector.COUNTERS):
            if row.value is None:
                continue
            with self.subTest(kind=row.kind, name=row.name):
                if isinstance(row.value, str):
                    setattr(things[row.kind], row.value, 1000 + n)
                    written[row] = 1000 + n
                else:
                    self.assertIn((row.kind, row.name), computed, 'say here how to set it up')
                    setup, written[row] = computed[row.kind, row.name]
                    setup()
        counts.publish(list(counts.slot_of))
        service.queue.clear()
        director.hellos.clear()
        master.read_counts()
        master_things = {'service': master_director.services['web'], 'address': master_director.services['web'].listeners[0],
                         'host': master_director.services['web'].groups['main'].scheduler.hosts[0]}
        # Where each field a function puts it, to read it back.
        put = {('host', 'open'): lambda host: host.open}
        for kind in pydirector.HELLO_PROBLEMS:
            put['address', 'bad ' + kind] = lambda listener, kind=kind: listener.bad[kind]
        for row, value in written.items():
            with self.subTest(kind=row.kind, name=row.name):
                thing = master_things[row.kind]
                self.assertEqual(master.counters.sums(master.slot_of[thing])[
                    pydirector.COUNTER_PLACE[row.kind, row.name]], value)
                if isinstance(row.into, str):
                    self.assertEqual(getattr(thing, row.into), value)
                elif row.into is not None:
                    self.assertIn((row.kind, row.name), put, 'say here where it goes')
                    self.assertEqual(put[row.kind, row.name](thing), value)

    def test_a_dead_workers_counts_are_kept_and_its_gauges_dropped(self):
        rows = 3
        counters = pydirector.SharedCounters.create(rows, 4)
        self.addCleanup(counters.close)
        kinds = sorted(set(row.kind for row in pydirector.COUNTERS))
        slot_kinds = dict(enumerate(kinds))
        for slot, kind in slot_kinds.items():
            for place in range(pydirector.COUNTER_FIELDS):
                counters.view[counters.line(slot, 0) + place] = 10 + place
                counters.view[counters.line(slot, rows - 1) + place] = 1
        counters.fold(0, slot_kinds)
        for row in pydirector.COUNTERS:
            with self.subTest(kind=row.kind, name=row.name):
                slot = kinds.index(row.kind)
                place = pydirector.COUNTER_PLACE[row.kind, row.name]
                self.assertEqual(counters.view[counters.line(slot, 0) + place], 0)
                self.assertEqual(counters.view[counters.line(slot, rows - 1) + place], 1 if row.gauge else 11 + place)

    def test_each_kind_fits_its_line(self):
        for kind in set(row.kind for row in pydirector.COUNTERS):
            places = sorted(place for (k, _), place in pydirector.COUNTER_PLACE.items() if k == kind)
            self.assertEqual(places, list(range(len(places))))
            self.assertLessEqual(len(places), pydirector.COUNTER_FIELDS)


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

    def test_worker_timeout_attribute(self):
        self.assertEqual(self.parse({}).worker_timeout, 5.0)
        self.assertNotIn('worker_timeout', self.parse({}).to_xml())
        config = self.parse({'worker_timeout': '2.5'})
        self.assertEqual(config.worker_timeout, 2.5)
        self.assertIn('<pdconfig worker_timeout="2.5">', config.to_xml())
        director = pydirector.Director(config, resolve_names=False)
        self.addCleanup(director.loop.close)
        self.assertIn('<pdconfig worker_timeout="2.5">', director.running_xml())
        self.assertIn('<pdconfig> worker_timeout (default) -> 2.5',
                      pydirector_admin.plan_changes(self.parse({}), config).lines()[0])
        for bad in ('0', '0.5', '-1', 'soon', '86401'):
            with self.assertRaises(pydirector.ConfigError) as caught:
                self.parse({'worker_timeout': bad})
            self.assertEqual(str(caught.exception), "w.xml:1: <pdconfig> worker_timeout %r: must be a number "
                                                    "of seconds >= 1 and <= 86400" % bad)

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

    def test_sighup_just_as_a_killed_worker_restarts(self):
        # As issue 25 reproduced it: the reload adding a listen reaches the new worker
        # while it starts; it must serve the new port, and the next reload too.
        one, two = support.Backend(say_name, 'one'), support.Backend(say_name, 'two')
        for b in (one, two):
            self.addCleanup(b.close)
        port, new_port = free_port(), free_port()
        proc = self.spawn(config_xml(service_xml([('one', one.address)], listen_port=port)), port)
        victim, other = self.worker_pids(proc)
        with open(proc.config_path, 'w') as f:
            f.write(config_xml(service_xml([('one', one.address)], listen_port=port),
                               service_xml([('two', two.address)], name='more', listen_port=new_port)))
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: 'restarting it' in proc.output(), 10)
        proc.signal(signal.SIGHUP)
        wait_until(lambda: len(self.worker_pids(proc)) == 3 and 'reloaded ' in proc.output(), 30)
        new = self.worker_pids(proc)[2]
        self.addCleanup(lambda: alive(new) and os.kill(new, signal.SIGKILL))
        for pid in (new, other):
            with only((new, other), pid):
                wait_until(lambda: accepts(new_port) and exchange(new_port) == b'two', 10,
                           message='worker pid %d does not serve the new listen: %s' % (pid, proc.output()))
        self.assertNotIn('could not apply', proc.output())
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
