"""Fault scenarios (issue 6), one named test each, on real sockets.

During every scenario BACKGROUND client connections stream checksummed bytes
through the same balancer (service 'bg', or the scenario's own service) to an
echo backend; each must come back intact.  After every scenario the balancer
holds no connection, its fds and threads are back to their baseline, it does
not spin, and it logged no traceback.

The issue asks for 500 background connections; the default is 100 so that CI
stays quick; run PYDIRECTOR_FAULT_BACKGROUND=500 python3 -m unittest ... for the
full load.
"""

import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from unittest import mock

import support
from support import (BalancerCase, LOG, AdoptedBackend, Background, Balancer, Blackhole, EchoServer,
                     SpawnedBalancer, WorkersMixin, accepts, config_xml, cpu_seconds_of, digest_until_eof,
                     exchange, fd_count, free_port, recv_all, rss_bytes, service_xml, single_process,
                     thread_count, wait_until)

import pydirector

# The issue asks for 500; the default keeps CI (9 Pythons on 2 cores) quick.
BACKGROUND = int(os.environ.get('PYDIRECTOR_FAULT_BACKGROUND', '100'))

HAVE_PROC = os.path.exists('/proc/self/stat') and os.path.exists('/proc/thread-self')
RESET = struct.pack('ii', 1, 0)     # SO_LINGER on, 0 s: close() sends RST


def digest(data):
    return ('%s %d' % (hashlib.sha256(data).hexdigest(), len(data))).encode()


def pseudo_random(n, seed):
    return random.Random(seed).getrandbits(8 * n).to_bytes(n, 'little')


def reset_close(sock):
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
    sock.close()


def push_until_stalled(conn, limit, stall=0.5, stop=None):
    """Write as fast as the peer takes it, up to `limit` bytes; return the count once
    nothing more has been taken for `stall` seconds (flow control) or on an error."""
    import select
    conn.setblocking(False)
    poller = select.poll()
    poller.register(conn, select.POLLOUT)
    chunk = b'x' * 65536
    pushed = 0
    while pushed < limit and not (stop is not None and stop.is_set()):
        if not poller.poll(stall * 1000):
            break
        try:
            pushed += conn.send(chunk[:limit - pushed])
        except (BlockingIOError, InterruptedError):
            continue
        except OSError:
            break
    return pushed


@unittest.skipUnless(HAVE_PROC, 'needs Linux /proc')
class FaultCase(BalancerCase):
    """Backends, a balancer (in-process or a subprocess) and the background traffic;
    every resource is closed by a cleanup and the leak checks (BalancerCase's, and
    an idle loop that does not spin) run last."""

    def setUp(self):
        BalancerCase.setUp(self)
        self.proc = None
        self.background = None

    # -- building blocks -----------------------------------------------------

    def echo_server(self, name='echo'):
        e = EchoServer(name=name)
        self.addCleanup(e.close)
        return e

    def client(self, port, timeout=10, rcvbuf=None):
        sock = socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        sock.connect(('127.0.0.1', port))
        self.addCleanup(sock.close)
        return sock

    def bg_service(self, port=None):
        """Service 'bg': the background traffic's own service and echo backend."""
        self.bg_echo = self.echo_server('bg-echo')
        return service_xml([('echo', self.bg_echo.address)], name='bg', listen_port=port)

    def start(self, *services, **root):
        """An in-process balancer running these services plus 'bg', with the background going."""
        background = root.pop('background', 'bg')
        if background == 'bg':
            services = services + (self.bg_service(),)
        BalancerCase.start(self, *services, **root)
        self.loop_stat = '/proc/%s/stat' % self.balancer.call(lambda: os.readlink('/proc/thread-self'))
        self.worker_fds = dict((pid, fd_count(pid)) for pid in self.balancer.worker_pids()) if self.workers else {}
        self.addCleanup(self.check_balancer)
        if background:
            self.start_background(self.balancer.port(background))
        return self.balancer

    def start_process(self, *services, **root):
        """A subprocess balancer (for signals, rlimits, RSS); services must give listen_port."""
        background = root.pop('background', 'bg')
        log_path = root.pop('log_path', None)
        bg_port = None
        if background == 'bg':
            bg_port = free_port()
            services = services + (self.bg_service(bg_port),)
        xml = config_xml(*services, **root)
        self.proc = SpawnedBalancer(xml, args=['--workers', str(self.workers)] if self.workers else ())
        self.addCleanup(self.proc.close)
        pid = self.proc.proc.pid
        # Not a probe connection (it would linger as a pair for a moment): the log line
        # that follows binding every listener (and with workers, each one's "ready").
        wait_until(lambda: xml.count('<service ') == (read_text(log_path) if log_path else
                                                     self.proc.output()).count(' listening on ')
                   and len(self.worker_pids(log_path)) == (self.workers or 0)
                   or self.proc.proc.poll() is not None, 30)
        self.assertIsNone(self.proc.proc.poll(), self.proc.output())
        # The listeners and the loop's wake-up socketpair; a master's channel to each worker.
        idle_sockets = xml.count('<listen ') + 2 + (self.workers or 0)
        self.assertEqual(self.sockets_of(pid), idle_sockets)
        self.proc_fds = fd_count(pid)
        self.worker_fds = dict((wpid, fd_count(wpid)) for wpid in self.worker_pids(log_path))
        self.addCleanup(self.check_process)
        if background == 'bg':
            self.start_background(bg_port)
        elif background:
            self.start_background(background)
        return self.proc

    def worker_pids(self, log_path=None):
        """The pids of a subprocess master's workers, from their "ready" lines."""
        text = read_text(log_path) if log_path else self.proc.output()
        return [int(pid) for pid in re.findall(r'worker \d+ \(pid (\d+)\) ready', text)]

    def check_workers(self):
        """Every worker: its fds back to what it had once started, not spinning."""
        for pid, fds in self.worker_fds.items():
            wait_until(lambda: fd_count(pid) <= fds, 5, message='worker %d fds not back to %d' % (pid, fds))
            path = '/proc/%d/stat' % pid
            before, started = cpu_seconds_of(path), time.monotonic()
            time.sleep(0.2)   # the measurement window itself
            self.assertLess((cpu_seconds_of(path) - before) / (time.monotonic() - started), 0.5,
                            'idle worker %d spins' % pid)

    def sockets_of(self, pid):
        count = 0
        for f in os.listdir('/proc/%d/fd' % pid):
            try:
                count += os.readlink('/proc/%d/fd/%s' % (pid, f)).startswith('socket:')
            except OSError:
                pass   # closed meanwhile
        return count

    def start_background(self, port, count=None, seed=1):
        self.background = Background(port, BACKGROUND if count is None else count, seed=seed)
        self.addCleanup(self.background.stop)
        self.background.start()
        return self.background

    def finish_background(self, background=None):
        background = background or self.background
        if background is None or not background.count:
            return
        rounds = background.round_trips()
        problems = background.finish()
        self.assertEqual(problems, [], 'background connections hurt: %d of %d' % (
            len(problems), background.count))
        self.assertGreaterEqual(rounds, background.count)

    def web_pairs(self, service='web'):
        """The service's open pairs (with workers: as many Nones as their counters say)."""
        if self.workers:
            return [None] * self.balancer.call(lambda: self.balancer.master.read_counts() or
                                               self.balancer.director.services[service].open)
        return self.balancer.call(lambda: [p for p in self.balancer.director.pairs
                                           if p.service.name == service])

    def log_since(self):
        return self.log_lines()

    def loop_cpu(self, seconds):
        """The share of one CPU the in-process balancer's loop thread used over `seconds`."""
        before = cpu_seconds_of(self.loop_stat)
        started = time.monotonic()
        time.sleep(seconds)   # the measurement window itself
        return (cpu_seconds_of(self.loop_stat) - before) / (time.monotonic() - started)

    def process_cpu(self, seconds):
        path = '/proc/%d/stat' % self.proc.proc.pid
        before = cpu_seconds_of(path)
        started = time.monotonic()
        time.sleep(seconds)   # the measurement window itself
        return (cpu_seconds_of(path) - before) / (time.monotonic() - started)

    # -- the checks after every scenario ---------------------------------------

    def check_balancer(self):
        """In-process balancer, before it stops: no pair left, no spinning."""
        if self.background is not None:
            self.background.stop()
        if not self.balancer.thread.is_alive():
            return   # the scenario stopped it
        wait_until(lambda: self.balancer.open_pairs() == 0, 5,
                   message='connections left open in the balancer')
        self.assertLess(self.loop_cpu(0.2), 0.5, 'the idle loop thread spins')
        self.check_workers()

    def check_process(self):
        """Subprocess balancer, before it is killed: fds back, threads bounded, no spin."""
        if self.proc.proc.poll() is not None:
            return   # the scenario stopped it (and checked how)
        if self.background is not None:
            self.background.stop()
        pid = self.proc.proc.pid
        wait_until(lambda: fd_count(pid) <= self.proc_fds, 5,
                   message='balancer fds not back to %d' % self.proc_fds)
        self.assertLessEqual(thread_count(pid), 2 + pydirector.PROBE_WORKERS)
        self.assertLess(self.process_cpu(0.2), 0.5, 'the idle balancer spins')
        self.check_workers()
        self.assertNotIn('Traceback', self.proc.output())


def recv_exact(sock, n):
    data = b''
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def reset_after_200k(conn, backend):
    """Answer a little of what comes, then reset mid-stream."""
    got = 0
    while got < 200000:
        data = conn.recv(65536)
        if not data:
            return
        got += len(data)
        conn.sendall(data[:1000])
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)   # Backend closes it


def stream_until_cut(port, seconds=10):
    """Send and read as fast as possible until the stream is cut: 'reset' or 'eof'."""
    sock = socket.create_connection(('127.0.0.1', port), timeout=5)
    sock.setblocking(False)
    chunk = b'y' * 8192
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            try:
                sock.send(chunk)
            except BlockingIOError:
                time.sleep(0.001)
            try:
                if sock.recv(65536) == b'':
                    return 'eof'
            except BlockingIOError:
                pass
        return 'never cut'
    except OSError:     # ECONNRESET, or EPIPE after it
        return 'reset'
    finally:
        sock.close()


def read_text(path):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ''


def answer_or_nothing(sock, limit=None):
    """What a client gets before it is closed; a reset counts as nothing."""
    try:
        return recv_all(sock, limit)
    except OSError:
        return b''


def echoes(port, data, timeout=10):
    try:
        return exchange(port, data, timeout=timeout) == data
    except OSError:
        return False


class TestFaults(FaultCase):

    def test_01_backend_refuses(self):
        good = self.backend(digest_until_eof)
        dead = free_port()
        self.start(service_xml([('one', '127.0.0.1:%d' % dead), ('two', good.address)]))
        payload = pseudo_random(100000, 1)
        # Sent before any backend answered: it must reach the host that does.
        self.assertEqual(exchange(self.balancer.port(), payload), digest(payload))
        LOG.wait_for('host one (127.0.0.1:%d) in web/main down: connection refused' % dead, self.mark)
        self.assertEqual(self.balancer.snapshot()['services'][0]['failovers'], 1)
        self.assertEqual(self.balancer.host('one')['open'], 0)
        self.finish_background()

    def test_02_backend_syn_blackhole(self):
        hole = Blackhole()
        self.addCleanup(hole.close)
        good = self.echo_server('two')
        self.start(service_xml([('one', hole.address), ('two', good.address)],
                               extra='    <timeouts connect="0.2" idle="30"/>\n'))
        sock = self.client(self.balancer.port())
        started = time.monotonic()
        sock.sendall(b'early')
        self.assertEqual(recv_exact(sock, 5), b'early')
        elapsed = time.monotonic() - started
        self.assertGreater(elapsed, 0.15)
        self.assertLess(elapsed, 10)     # not held until the 30 s idle timeout
        LOG.wait_for('host one (%s) in web/main down: connect timeout' % hole.address, self.mark)
        time.sleep(0.5)   # the point: stay quiet well past the connect timeout
        sock.sendall(b'later')
        self.assertEqual(recv_exact(sock, 5), b'later')
        sock.close()
        self.finish_background()

    def test_03_backend_resets_mid_stream(self):
        def reset(conn, backend):
            conn.sendall(b'partial')
            conn.recv(10)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)   # Backend closes it
        b = self.backend(reset)
        busy = self.backend(reset_after_200k)
        self.start(service_xml([('one', b.address)]), service_xml([('busy', busy.address)], name='busy'))
        sock = self.client(self.balancer.port())
        self.assertEqual(recv_exact(sock, 7), b'partial')
        sock.sendall(b'go')
        started = time.monotonic()
        with self.assertRaises(ConnectionResetError):   # a cut stream must not look whole
            while sock.recv(100):
                pass
        self.assertLess(time.monotonic() - started, 5)  # passed on, not left to the socket's timeout
        sock.close()
        wait_until(lambda: not self.web_pairs(), 2, message='a half-open pair is left')
        wait_until(lambda: b.open == 0, 2)
        # Now while the clients are busy talking: a reset backend and a readable client
        # often come in the same batch of events.
        mark = LOG.mark()
        port = self.balancer.port('busy')
        outcomes = []
        threads = [threading.Thread(target=lambda: outcomes.append(stream_until_cut(port)))
                   for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        self.assertEqual(sorted(set(outcomes)), ['reset'])
        wait_until(lambda: not self.web_pairs('busy'), 2, message='a half-open pair is left')
        wait_until(lambda: busy.open == 0, 2)
        self.assertEqual([l for l in LOG.since(mark) if l.startswith('TRACEBACK')][:1], [])
        self.finish_background()

    def test_04_client_half_close(self):
        answer = pseudo_random(1 << 20, 4)

        def answer_after_eof(conn, backend):
            got = recv_all(conn)
            conn.sendall(digest(got) + b'\n' + answer)
        b = self.backend(answer_after_eof)
        self.start(service_xml([('one', b.address)]))
        payload = pseudo_random(300000, 40)
        sock = self.client(self.balancer.port())
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)       # our side is done; the answer must still come
        got = recv_all(sock)
        sock.close()
        self.assertEqual(len(got), len(digest(payload)) + 1 + len(answer))
        self.assertEqual(got, digest(payload) + b'\n' + answer)
        self.finish_background()

    def test_05_backend_half_close(self):
        greeting = pseudo_random(1 << 20, 5)

        def greet_then_listen(conn, backend):
            conn.sendall(greeting)
            conn.shutdown(socket.SHUT_WR)   # the backend is done talking, not listening
            backend.received.append(digest(recv_all(conn)))
        b = self.backend(greet_then_listen)
        self.start(service_xml([('one', b.address)]))
        sock = self.client(self.balancer.port())
        self.assertEqual(recv_all(sock), greeting)          # all of it, then EOF
        payload = pseudo_random(1 << 20, 50)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        self.assertEqual(recv_all(sock), b'')
        sock.close()
        wait_until(lambda: b.received, 10)
        self.assertEqual(b.received, [digest(payload)])
        self.finish_background()

    def test_06_backend_writes_then_closes(self):
        blob = pseudo_random(1 << 20, 6)
        written = threading.Event()

        def write_and_close(conn, backend):
            conn.sendall(blob)
            written.set()
        b = self.backend(write_and_close)
        self.start(service_xml([('one', b.address)]))
        sock = self.client(self.balancer.port())
        # Read only after the backend has closed: its FIN is queued behind every byte.
        self.assertTrue(written.wait(10))
        wait_until(lambda: b.open == 0, 5)
        got = recv_all(sock)
        sock.close()
        self.assertEqual(len(got), len(blob))
        self.assertEqual(hashlib.sha256(got).hexdigest(), hashlib.sha256(blob).hexdigest())
        self.finish_background()

    def test_07_client_leaves_during_backend_connect(self):
        hole = Blackhole()
        self.addCleanup(hole.close)
        quick = self.echo_server('quick')
        self.start(service_xml([('one', hole.address)], extra='    <timeouts connect="0.3"/>\n'),
                   service_xml([('q', quick.address)], name='quick'))
        for port, count in ((self.balancer.port('web'), 20), (self.balancer.port('quick'), 50)):
            for i in range(count):
                sock = socket.create_connection(('127.0.0.1', port), timeout=5)
                if i % 2:
                    reset_close(sock)
                else:
                    sock.close()
        wait_until(lambda: not self.web_pairs('quick') and quick.open == 0, 5,
                   message='clients that left still hold pairs or backend connections')
        # The silent host's attempts end at the connect timeout: then nothing is left.
        wait_until(lambda: not self.web_pairs(), 3, message='pairs leaked after the connect timeout')
        self.assertEqual(self.balancer.host('one')['open'], 0)
        self.finish_background()

    def test_08_slow_readers_cost_flat_memory(self):
        pushed = []
        done = threading.Event()

        def firehose(conn, backend):
            # "Push 1 GiB": flow control must stop us long before that.
            n = push_until_stalled(conn, 1 << 30, stall=0.5)
            with backend.lock:
                pushed.append(n)
            done.wait(30)
        b = self.backend(firehose)
        self.addCleanup(done.set)
        web_port = free_port()
        proc = self.start_process(service_xml([('one', b.address)], listen_port=web_port))
        pid = proc.proc.pid
        rss_before = rss_bytes(pid)
        clients = [self.client(web_port, rcvbuf=65536) for _ in range(50)]   # never read
        wait_until(lambda: len(pushed) == 50, 60, interval=0.05,
                   message='backends still pushing: flow control does not hold')
        growth = rss_bytes(pid) - rss_before
        self.assertLess(growth, 50 * 1024 * 1024, 'balancer RSS grew by %d bytes' % growth)
        # Bounded by the kernel's socket buffers on the way, not by the 1 GiB on offer.
        self.assertLess(max(pushed), 64 * 1024 * 1024)
        self.assertGreater(min(pushed), 0)
        for sock in clients:
            reset_close(sock)
        done.set()
        self.finish_background()

    def test_09_stalled_peer_idle_timeout_still_fires(self):
        stalled = threading.Event()
        ended = threading.Event()

        def firehose(conn, backend):
            push_until_stalled(conn, 1 << 30, stall=0.3)
            stalled.set()
            conn.setblocking(True)
            try:
                while conn.recv(65536):
                    pass
            except OSError:
                pass
            ended.set()
        b = self.backend(firehose)
        self.start(service_xml([('one', b.address)], extra='    <timeouts connect="1" idle="0.5"/>\n'))
        sock = self.client(self.balancer.port(), rcvbuf=65536)   # and never read
        self.assertTrue(stalled.wait(30))
        self.assertTrue(ended.wait(5), 'buffers full both ways and the idle timeout never fired')
        LOG.wait_for('in web: idle for', self.mark)
        wait_until(lambda: not self.web_pairs(), 2)
        reset_close(sock)
        self.finish_background()

    @single_process('lowers the fd limit of the process it starts, the master')
    def test_10_emfile_at_accept(self):
        import resource
        echo = self.echo_server('one')
        web_port = free_port()
        # Probes run all along: running out of fds is ours, not the host's fault.
        check = '    <check interval="0.1" timeout="0.5" rise="1" fall="2"/>\n'
        proc = self.start_process(service_xml([('one', echo.address)], listen_port=web_port, extra=check))
        pid = proc.proc.pid
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        # What the background traffic costs by itself, so the check below sees only the exhaustion.
        baseline = self.process_cpu(0.6)
        # Room for a few more clients than the background already holds, then EMFILE.
        held = fd_count(pid)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (held + 12, hard))
        self.addCleanup(lambda: proc.proc.poll() is None and
                        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard)))
        flood = []
        self.addCleanup(lambda: [c.close() for c in flood])
        while 'pausing accepts' not in proc.output() and len(flood) < 300:
            c = socket.socket()
            c.settimeout(5)
            c.connect(('127.0.0.1', web_port))   # the kernel completes these from the backlog
            flood.append(c)
            if len(flood) > 20:
                time.sleep(0.01)
        wait_until(lambda: 'pausing accepts' in proc.output(), 5)
        self.assertLess(self.process_cpu(0.6) - baseline, 0.2, 'spinning while out of file descriptors')
        for c in flood:
            c.close()
        flood[:] = []
        # The fds come back once the balancer has worked through the closed clients still
        # in the listen backlog: each takes an fd again when accepted.  A client connecting
        # before then queues behind them and may meet EMFILE at its connect.
        wait_until(lambda: support.accept_queue_length(web_port) == 0 and fd_count(pid) <= held + 4, 15)
        sock = self.client(web_port, timeout=5)
        sock.sendall(b'back')
        self.assertEqual(answer_or_nothing(sock, 4), b'back', 'not served after the fds came back: %s'
                         % [l for l in proc.output().splitlines() if 'web' in l][-3:])
        sock.close()
        wait_until(lambda: 'accepting again' in proc.output(), 5)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        self.finish_background()
        self.assertNotIn('in web/main down', proc.output())
        self.assertNotIn('Traceback', proc.output())

    @unittest.skipUnless(shutil.which('unshare'), 'needs unshare(1)')
    def test_11_eaddrnotavail_does_not_mark_backend_down(self):
        try:
            subprocess.check_call(['unshare', '-rn', 'true'], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, timeout=10)
        except (subprocess.CalledProcessError, OSError, subprocess.TimeoutExpired):
            self.skipTest('unshare -rn (a user and network namespace) is not allowed here')
        code = ('import sys; sys.path[:0] = [%r]; import test_faults; test_faults.namespace_scenario()'
                % os.path.dirname(os.path.abspath(__file__)))
        result = subprocess.run(['unshare', '-rn', sys.executable, '-c', code], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
        if result.returncode == 3:
            self.skipTest(result.stdout.strip())
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        got = json.loads(result.stdout.strip().splitlines()[-1])
        self.assertGreater(got['ports'], 0)
        with self.subTest('a client connect that gets EADDRNOTAVAIL'):
            self.assertEqual(got['extra_client_answer'], '', 'the client should be closed')
            self.assertTrue(any('cannot connect to host a' in l and 'cannot assign requested address' in l
                                for l in got['log']), got['log'][-10:])
            self.assertEqual(got['a_health'], ['up', ''])
            self.assertTrue(got['served_after_release'])
        with self.subTest('a health probe that gets EADDRNOTAVAIL'):
            self.assertEqual(got['c_health'][0], 'up', 'probe failures from our own port exhaustion '
                             'took the host down: %r (%d of %d ports held)' % (
                                 got['c_health'], got['held_c'], got['ports']))
        self.assertEqual(got['background'], [])
        self.assertEqual(got['tracebacks'], [])
        self.assertEqual(got['pairs_left'], 0)

    @single_process('reads the pairs of the balancer')
    def test_12_hangup_with_only_write_interest_does_not_spin(self):
        # (a) The client half-closes and stops reading: its socket is watched for writing
        # only; then it resets.
        stop = threading.Event()
        self.addCleanup(stop.set)

        def firehose(conn, backend):
            push_until_stalled(conn, 1 << 30, stall=10, stop=stop)

        release = threading.Event()
        self.addCleanup(release.set)

        def half_close_then_reset(conn, backend):
            conn.shutdown(socket.SHUT_WR)     # and never read
            release.wait(10)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
        pusher = self.backend(firehose)
        deaf = self.backend(half_close_then_reset)
        self.start(service_xml([('one', pusher.address)]),
                   service_xml([('two', deaf.address)], name='deaf'))
        def watched(service, side):
            def check():
                pairs = self.web_pairs(service)
                if len(pairs) != 1:
                    return None
                events = side.replace('_sock', '_events')     # what the pair asked the loop for
                return self.balancer.call(lambda: getattr(pairs[0], events))
            return check

        sock = self.client(self.balancer.port(), rcvbuf=65536)
        sock.shutdown(socket.SHUT_WR)
        wait_until(lambda: watched('web', 'client_sock')() == pydirector.EVENT_WRITE, 10)
        reset_close(sock)
        wait_until(lambda: not self.web_pairs(), 2, message='a reset client was not noticed')
        self.assertLess(self.loop_cpu(0.3), 0.5)

        # (b) The mirror image: the backend half-closes and never reads, the client
        # pushes; the backend socket is watched for writing only; then the backend resets.
        sock = self.client(self.balancer.port('deaf'))
        pusher_thread = threading.Thread(target=push_until_stalled, args=(sock, 1 << 30, 10, stop))
        pusher_thread.start()
        self.addCleanup(pusher_thread.join, 15)
        wait_until(lambda: watched('deaf', 'backend_sock')() == pydirector.EVENT_WRITE, 10)
        release.set()
        wait_until(lambda: not self.web_pairs('deaf'), 2, message='a reset backend was not noticed')
        pusher_thread.join(15)
        self.assertLess(self.loop_cpu(0.3), 0.5)
        self.finish_background()

    def test_13_signals_in_a_tight_loop_during_load(self):
        echo = self.echo_server('one')
        web_port = free_port()
        log_dir = tempfile.mkdtemp(prefix='pydirector-faults-')
        self.addCleanup(shutil.rmtree, log_dir, True)
        log_path = os.path.join(log_dir, 'pydir.log')
        proc = self.start_process(service_xml([('one', echo.address)], listen_port=web_port),
                                  '  <logging file="%s"/>\n' % log_path, log_path=log_path)
        results = []

        def clients():
            for i in range(40):
                payload = pseudo_random(20000 + i, 1300 + i)
                results.append(echoes(web_port, payload))
        t = threading.Thread(target=clients)
        t.start()
        for _ in range(2000):
            os.kill(proc.proc.pid, signal.SIGUSR1)
        t.join(30)
        self.assertEqual(results, [True] * 40)
        self.assertIsNone(proc.proc.poll())
        # It still reopens the log as logrotate expects.
        wait_until(lambda: 'log file reopened' in read_text(log_path), 5)
        os.rename(log_path, log_path + '.1')
        proc.signal(signal.SIGUSR1)
        wait_until(lambda: 'log file reopened' in read_text(log_path), 5)
        self.finish_background()
        for path in (log_path, log_path + '.1'):
            self.assertNotIn('Traceback', read_text(path))
        self.assertNotIn('Traceback', proc.output())

    def test_14_all_backends_down_then_back(self):
        holes = [Blackhole(), Blackhole()]
        for hole in holes:
            self.addCleanup(hole.close)
        self.start(service_xml([('one', holes[0].address), ('two', holes[1].address)],
                               extra='    <timeouts connect="0.3"/>\n'
                                     '    <check interval="0.2" timeout="0.3" rise="2" fall="2"/>\n'))
        port = self.balancer.port()
        sock = self.client(port)
        started = time.monotonic()
        sock.sendall(b'anyone?')
        self.assertEqual(answer_or_nothing(sock), b'')
        self.assertLess(time.monotonic() - started, 5)   # two connect timeouts, not the client's 10 s
        wait_until(lambda: all(self.balancer.host(n)['health'] == 'down' for n in ('one', 'two')), 5)
        mark = LOG.mark()
        client = self.client(port)
        self.assertEqual(answer_or_nothing(client), b'')
        LOG.wait_for('no host available in group main', mark)       # no host to try: at once
        # Closed without trying a host (no connect timeout waited for): host=-, no failover.
        LOG.wait_for('client=127.0.0.1:%d sni=- host=- backend=- failovers=0' % client.getsockname()[1], mark)
        # Both come back on the same ports; nobody tells the balancer.
        for hole, name in zip(holes, ('one', 'two')):
            revived = AdoptedBackend(hole.sock, support.echo, name)
            self.addCleanup(revived.close)
        for hole, name in zip(holes, ('one', 'two')):
            LOG.wait_for('host %s (%s) in web/main up: answered 2 probe(s)' % (name, hole.address),
                         self.mark, timeout=10)
        self.balancer.sync()
        for i in range(4):
            self.assertTrue(echoes(port, pseudo_random(5000, 1400 + i)))
        least = 1 if self.workers else 2    # each worker keeps its own rotation
        self.assertEqual([self.balancer.host(n)['total'] >= least for n in ('one', 'two')], [True, True])
        self.finish_background()

    def test_15_health_check_flapping(self):
        # What the host answers each probe, in order (G good, B bad); then good for ever.
        script = 'GBGBBGBGGBBGG'
        answers = []

        def scripted(conn, backend):
            with backend.lock:
                answer = script[len(answers)] if len(answers) < len(script) else 'G'
                answers.append(answer)
            conn.recv(1024)
            conn.sendall(b'HTTP/1.0 200 OK\r\n\r\n' if answer == 'G' else b'HTTP/1.0 503 Busy\r\n\r\n')
        flappy = self.backend(scripted, 'flappy')
        rise, fall = 2, 2
        check = ('    <check interval="0.05" timeout="1" rise="%d" fall="%d" '
                 'send="GET / HTTP/1.0\\r\\n\\r\\n" expect="200 OK"/>\n' % (rise, fall))
        self.start(service_xml([('flappy', flappy.address)], extra=check))
        wait_until(lambda: len(answers) >= len(script) + 2, 15, interval=0.05)
        self.finish_background()
        self.balancer.stop()    # no more probes while we compare
        # The state changes rise/fall allow for exactly these answers.
        expected, state, run = [], 'up', 0
        for answer in answers:
            if (answer == 'B') == (state == 'up'):
                run += 1
                if run == (fall if state == 'up' else rise):
                    state = 'down' if state == 'up' else 'up'
                    expected.append(state)
                    run = 0
            else:
                run = 0
        prefix = 'host flappy (%s) in web/main ' % flappy.address
        logged = [l[len(prefix):].split(':')[0] for l in self.log_since() if l.startswith(prefix)]
        self.assertEqual(logged, expected, 'answers %s' % ''.join(answers))
        self.assertGreaterEqual(len(expected), 4)

    def test_16_admin_drains_and_deletes_hosts_with_live_streams(self):
        a, b, c = self.echo_server('a'), self.echo_server('b'), self.echo_server('c')
        self.start(service_xml([('a', a.address), ('b', b.address), ('c', c.address)]))
        port = self.balancer.port()
        streams = Background(port, 200, seed=16)
        self.addCleanup(streams.stop)
        streams.start()
        opens = sorted([a.open, b.open, c.open])
        if self.workers:    # each worker's rotation is even to within one
            self.assertEqual((sum(opens), opens[-1] - opens[0] <= self.workers), (200, True), opens)
        else:
            self.assertEqual(opens, [66, 67, 67])
        director = self.balancer.director
        self.balancer.call(director.host_admin_down, 'web', 'main', 'a')
        self.balancer.call(director.del_host, 'web', 'main', 'b')
        before = (a.accepted, b.accepted, c.accepted)
        for i in range(30):
            self.assertTrue(echoes(port, pseudo_random(3000, 1600 + i)))
        self.assertEqual((a.accepted, b.accepted, c.accepted), (before[0], before[1], before[2] + 30))
        # The streams on the drained and the deleted host go on, then end whole.
        rounds = streams.round_trips()
        wait_until(lambda: streams.round_trips() >= rounds + 400, 10)
        self.assertEqual(streams.finish(), [])
        wait_until(lambda: a.open == b.open == c.open == 0, 5)
        self.assertEqual(self.balancer.host('a')['open'], 0)
        self.finish_background()

    def test_17_enable_group_under_load(self):
        a, b, c, d = (self.echo_server(n) for n in 'abcd')
        self.start(service_xml(None, groups=[('blue', 'roundrobin', [('a', a.address), ('b', b.address)]),
                                             ('green', 'roundrobin', [('c', c.address), ('d', d.address)])],
                               enable='blue'))
        port = self.balancer.port()
        streams = Background(port, 200, seed=17)
        self.addCleanup(streams.stop)
        streams.start()
        racing = []

        def race():
            for i in range(40):
                racing.append(echoes(port, pseudo_random(2000, 1700 + i)))
        t = threading.Thread(target=race)
        t.start()
        self.balancer.call(self.balancer.director.enable_group, 'web', 'green')
        t.join(30)
        self.assertEqual(racing, [True] * 40)
        blue = a.accepted + b.accepted
        green = c.accepted + d.accepted
        for i in range(10):
            self.assertTrue(echoes(port, pseudo_random(2000, 1750 + i)))
        self.assertEqual((a.accepted + b.accepted, c.accepted + d.accepted), (blue, green + 10))
        rounds = streams.round_trips()
        wait_until(lambda: streams.round_trips() >= rounds + 400, 10)
        self.assertEqual(streams.finish(), [])       # the old group's streams were left alone
        self.finish_background()

    def test_18_reload_under_load(self):
        one, two = self.echo_server('one'), self.echo_server('two')
        web_port = free_port()
        proc = self.start_process(service_xml([('one', one.address)], listen_port=web_port),
                                  background=web_port)
        with open(proc.config_path, 'w') as f:
            f.write(config_xml(service_xml([('one', one.address), ('two', two.address)],
                                           listen_port=web_port)))
        proc.signal(signal.SIGHUP)
        wait_until(lambda: 'reloaded ' in proc.output(), 5,
                   message='no "reloaded" line after SIGHUP: %s' % proc.output()[-500:])
        line = [l for l in proc.output().splitlines() if 'reloaded ' in l][0]
        self.assertIn('+host two', line)
        for i in range(10):
            self.assertTrue(echoes(web_port, pseudo_random(2000, 1800 + i)))
        # With workers the master logs its line, then sends the reload down each worker's
        # channel: a worker may take a client or two under the old config first.
        wait_until(lambda: echoes(web_port, pseudo_random(2000, 1900)) and two.accepted >= 4, 10)
        self.finish_background()    # not one of them was cut by the reload

    @single_process('counts in one log line; test_workers has its own')
    def test_19_sigterm_with_1000_open_connections(self):
        echo = self.echo_server('one')
        web_port = free_port()
        drain = 2
        proc = self.start_process(service_xml([('one', echo.address)], listen_port=web_port),
                                  background=web_port, drain=str(drain))
        idle_count = max(0, 1000 - BACKGROUND)
        idle = Background(web_port, idle_count, seed=19, interval=3600)   # one round trip, then quiet
        self.addCleanup(idle.stop)
        idle.start()
        self.assertEqual(echo.open, 1000 if BACKGROUND <= 1000 else BACKGROUND)
        started = time.monotonic()
        proc.signal(signal.SIGTERM)
        wait_until(lambda: 'stopping: ' in proc.output(), 10)
        self.assertFalse(accepts(web_port))
        self.finish_background()     # the active ones finish whole during the drain
        self.assertEqual(proc.wait(drain + 10), 0)
        # The idle ones were cut at the drain deadline, not waited for (they would never end).
        self.assertLess(time.monotonic() - started, drain + 8)
        out = proc.output()
        self.assertIn('stopping: %d connection(s) open, waiting up to %d s' % (max(1000, BACKGROUND), drain),
                      out)
        if idle_count:
            self.assertIn('closing %d connection(s) still open' % idle_count, out)
        self.assertNotIn('Traceback', out)

    def test_20_same_host_twice_and_a_name_that_stops_resolving(self):
        echo = self.echo_server('one')
        spare = self.echo_server('spare')
        with self.subTest('the same address twice in one group of the config'):
            with self.assertRaises(pydirector.ConfigError) as caught:
                pydirector.parse_config(config_xml(service_xml([('one', echo.address),
                                                                ('again', echo.address)])), 'twice.xml')
            self.assertIn("hosts 'one' and 'again' have the same ip", str(caught.exception))
        resolvable = threading.Event()
        resolvable.set()
        real_getaddrinfo = socket.getaddrinfo

        def getaddrinfo(host, *args, **kwargs):
            if host == 'flaky.test':     # a name whose DNS entry goes away at run time
                if not resolvable.is_set():
                    raise socket.gaierror(socket.EAI_NONAME, 'Name or service not known')
                host = '127.0.0.1'
            return real_getaddrinfo(host, *args, **kwargs)
        patcher = mock.patch.object(socket, 'getaddrinfo', getaddrinfo)
        patcher.start()
        self.addCleanup(patcher.stop)
        check = '    <check interval="0.1" timeout="1" rise="1" fall="2"/>\n'
        # Two spellings of one address are two hosts, and both serve.
        self.start(service_xml([('one', echo.address), ('again', 'localhost:%d' % echo.port),
                                ('flaky', 'flaky.test:%d' % spare.port)], extra=check))
        port = self.balancer.port()
        director = self.balancer.director
        for i in range(6):
            self.assertTrue(echoes(port, pseudo_random(2000, 2000 + i)))
        totals = [self.balancer.host(n)['total'] for n in ('one', 'again', 'flaky')]
        if self.workers:    # each worker keeps its own rotation
            self.assertEqual((sum(totals), min(totals) > 0), (6, True), totals)
        else:
            self.assertEqual(totals, [2, 2, 2])
        with self.subTest('the same address added again through the admin'):
            try:
                self.balancer.call(director.add_host, 'web', 'main', 'twin', echo.address)
            except pydirector.AdminError:
                pass   # refusing it, as the config does, is fine too
            running = self.balancer.call(lambda: director.running_config().to_xml())
            try:
                self.balancer.call(director.del_host, 'web', 'main', 'twin')
            except pydirector.AdminError:
                pass
            try:
                pydirector.parse_config(running, 'running.xml')
            except pydirector.ConfigError as e:
                self.fail('running.xml no longer loads: %s' % e)
        with self.subTest('a name that stops resolving'):
            resolvable.clear()
            LOG.wait_for('host flaky (flaky.test:%d) in web/main down: cannot resolve flaky.test'
                         % spare.port, self.mark)
            self.balancer.sync()
            for i in range(4):
                self.assertTrue(echoes(port, pseudo_random(2000, 2010 + i)))
            self.assertEqual(self.balancer.host('flaky')['total'], totals[2])
        with self.subTest('a name that never resolved, added at run time'):
            self.balancer.call(director.add_host, 'web', 'main', 'ghost', 'nonexistent.invalid:80')
            for i in range(4):
                self.assertTrue(echoes(port, pseudo_random(2000, 2020 + i)))
            self.assertEqual(self.balancer.host('ghost')['total'], 0)
            wait_until(lambda: 'cannot resolve' in self.balancer.host('ghost')['reason'], 5)
            LOG.wait_for('cannot resolve nonexistent.invalid', self.mark, timeout=2)
        self.finish_background()

    @single_process('reads the pairs of the balancer')
    def test_21_backend_never_reads(self):
        release = threading.Event()
        self.addCleanup(release.set)

        def never_read(conn, backend):
            release.wait(30)
        b = self.backend(never_read)
        self.start(service_xml([('one', b.address)], extra='    <timeouts connect="1" idle="1"/>\n'))
        sock = self.client(self.balancer.port())
        pushed = push_until_stalled(sock, 1 << 30, stall=0.3)
        self.assertLess(pushed, 64 * 1024 * 1024)
        held = self.balancer.call(lambda: [p.pending()[0] for p in self.web_pairs()])
        self.assertEqual(len(held), 1)
        self.assertLessEqual(held[0], max(pydirector.BUFFER_SIZE, pydirector.SPLICE_SIZE))
        LOG.wait_for('in web: idle for', self.mark, timeout=5)
        wait_until(lambda: not self.web_pairs(), 2)
        release.set()
        sock.close()
        self.finish_background()


# -- scenario 11 runs in its own network namespace ----------------------------

def bring_loopback_up():
    import fcntl
    SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        request = struct.pack('16sH22x', b'lo', 0)
        flags = struct.unpack('16sH22x', fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack('16sH22x', b'lo', flags | IFF_UP))
    finally:
        sock.close()


def namespace_scenario():
    """Run by test_11 as `unshare -rn python -c ...`: in a fresh network namespace with a
    tiny ephemeral port range, fill the range towards a backend, then connect once more.
    Prints one JSON line of what it saw; exit status 3 means "cannot set this up"."""
    try:
        bring_loopback_up()
        with open('/proc/sys/net/ipv4/ip_local_port_range', 'w') as f:
            f.write('40000 40009')
    except OSError as e:
        print('cannot set up the namespace: %s' % e)
        sys.exit(3)
    # How many connections to one address:port the range allows (the kernel's parity rules
    # decide): every source port below is bound by hand, outside the range.
    target = socket.socket()
    target.bind(('127.0.0.1', 30099))
    target.listen(64)
    probes = []
    while len(probes) < 100:
        s = socket.socket()
        if s.connect_ex(('127.0.0.1', 30099)):
            s.close()
            break
        probes.append(s)
    ports = len(probes)
    for s in probes:
        s.close()
    target.close()
    a = EchoServer('127.0.0.1', 30001, 'a')
    c = EchoServer('127.0.0.1', 30003, 'c')
    bg_hosts = [EchoServer('127.0.0.1', 30010 + i, 'bg%d' % i) for i in range(4)]
    xml = config_xml(
        service_xml([('a', a.address)], listen_port=30000),
        service_xml([('c', c.address)], name='checked', listen_port=30002,
                    extra='    <check interval="0.1" timeout="0.5" rise="1" fall="2"/>\n'),
        service_xml([(e.name, e.address) for e in bg_hosts], name='bg', listen_port=30004))
    balancer = Balancer(xml)
    mark = LOG.mark()
    background = Background(30004, 3 * ports, seed=11, source_ports=31000)
    background.start()
    held = []

    def client(port, source_port):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(('127.0.0.1', source_port))
        sock.settimeout(5)
        sock.connect(('127.0.0.1', port))
        return sock
    def hold(port, source_port):
        try:
            sock = client(port, source_port)
            sock.sendall(b'x')
            if recv_exact(sock, 1) == b'x':
                held.append(sock)
                return True
        except OSError:
            pass
        sock.close()
        return False
    for i in range(ports):      # every port towards a in use
        if not hold(30000, 32000 + i):
            print('could not fill the ports towards a')
            sys.exit(3)
    # The same towards c, whose probes take a port for a moment now and then: retry.
    held_c = 0
    for i in range(ports + 50):
        if held_c == ports:
            break
        held_c += hold(30002, 33000 + i)
    extra = client(30000, 34000)
    extra.sendall(b'anyone?')
    answer = answer_or_nothing(extra)
    extra.close()
    a_health = [balancer.host('a')['health'], balancer.host('a')['reason']]
    # Give the probes of c time to run into the same wall (2 x fall at 0.1 s intervals).
    try:
        wait_until(lambda: balancer.host('c', 'checked')['health'] != 'up', 1.0, 0.05)
    except AssertionError:
        pass    # c may rightly stay up: its probes got no verdict
    c_health = [balancer.host('c', 'checked')['health'], balancer.host('c', 'checked')['reason']]
    # Free one port towards a: a reset is passed on as a reset, so no TIME_WAIT keeps it.
    reset_close(held.pop(0))
    wait_until(lambda: a.open == ports - 1, 5)
    try:
        sock = client(30000, 34001)
        sock.sendall(b'back')
        served = recv_exact(sock, 4) == b'back'
        sock.close()
    except OSError:
        served = False
    for sock in held:
        sock.close()
    problems = background.finish()
    try:
        wait_until(lambda: balancer.open_pairs() == 0, 5)
    except AssertionError:
        pass
    pairs_left = balancer.open_pairs()
    log = LOG.since(mark)
    balancer.stop()
    for server in [a, c] + bg_hosts:
        server.close()
    print(json.dumps({'ports': ports, 'held_c': held_c, 'extra_client_answer': answer.decode('latin-1'),
                      'a_health': a_health, 'c_health': c_health, 'served_after_release': served,
                      'background': problems, 'pairs_left': pairs_left,
                      'tracebacks': [l for l in log if l.startswith('TRACEBACK')],
                      'log': [l for l in log if 'TRACEBACK' not in l and not l.startswith('access ')][-40:]}))


class TestFaultsWorkers(WorkersMixin, TestFaults):
    """The scenarios again with a master and two worker processes."""


if __name__ == '__main__':
    unittest.main()
