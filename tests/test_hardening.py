"""Issue 17, hardening: what a hostile backend, a careless operator and a page in
the operator's browser could do.  One class per item of the issue, each on real
sockets and processes: the config file a reload reads (1), a backend that
streams forever at its health check (2), a flood of wrong passwords (3),
cross-site changes, in real Chromium too (4), splice pipes (5), status checks
(6), names that can never work (7), and the small ones (8).
"""

import base64
import fcntl
import hashlib
import http.client
import http.server
import json
import os
import re
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.parse

import support
from support import (BalancerCase, BalancerProcess, LOG, PYDIRECTOR, WorkersMixin, config_xml, connect, exchange,
                     free_port, recv_all, service_xml, wait_until)

import pydirector
import pydirector_admin

PASSWORD = 'pass word'
FAST_HASH = pydirector.hash_password(PASSWORD, iterations=1000)   # where the check's cost is not the point
CONFIG_LIMIT = 64 << 20                 # the documented cap on a config file's size
HTTP_GET = 'GET / HTTP/1.0\\r\\n\\r\\n'          # as a <check send=...> attribute writes it
F_GETPIPE_SZ = getattr(fcntl, 'F_GETPIPE_SZ', 1032)   # Linux; fcntl names it from Python 3.10


def basic(user, password):
    return 'Basic ' + base64.b64encode(('%s:%s' % (user, password)).encode()).decode()


def admin_block(password_hash=FAST_HASH, extra=''):
    return ('  <admin listen="127.0.0.1:%d"%s>\n'
            '    <user name="admin" password="%s" access="full"/>\n'
            '  </admin>\n' % (free_port(), extra, password_hash))


def start_admin(test, get_changes=False):
    """The admin server of the test's balancer, on a port of its own; stopped by a cleanup."""
    a = test.balancer.config.admin
    admin = pydirector.Admin(a.listen, a.host, 0, a.users)
    admin.get_changes = get_changes     # an attribute, not an argument: the old code runs these tests too
    server = pydirector_admin.start(test.balancer.director, admin)
    test.addCleanup(server.stop)
    return server


def fetch(port, path, method='GET', body=None, user='admin', password=PASSWORD, source='127.0.0.1',
          headers=None, timeout=15):
    """(status, headers, body text) of one admin request, sent from the address source."""
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=timeout, source_address=(source, 0))
    sent = {'Authorization': basic(user, password)} if user is not None else {}
    if body is not None:
        sent['Content-Type'] = 'application/x-www-form-urlencoded'
    sent.update(headers or {})
    try:
        conn.request(method, path, body, sent)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read().decode('utf-8', 'replace')
    finally:
        conn.close()


def set_for_test(test, module, name, value):
    """module.name = value until the test ends (a name the old code lacks is removed again)."""
    missing = object()
    saved = getattr(module, name, missing)
    setattr(module, name, value)
    test.addCleanup(lambda: delattr(module, name) if saved is missing else setattr(module, name, saved))


def run_pydirector(args, timeout=20):
    return subprocess.run([sys.executable, PYDIRECTOR] + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=timeout)


def big_config(listen_port, hosts):
    """A valid config with one group of `hosts` hosts: slow to parse (seconds at 12,000)."""
    lines = ''.join('      <host name="h%d" ip="10.%d.%d.%d:80"/>\n' % (i, i >> 16, (i >> 8) & 255, i & 255)
                    for i in range(hosts))
    return ('<pdconfig>\n  <service name="web">\n    <listen ip="127.0.0.1:%d"/>\n'
            '    <group name="main" scheduler="roundrobin">\n%s    </group>\n  </service>\n</pdconfig>\n'
            % (listen_port, lines))


def address_space_limit(limit):
    """A preexec_fn: cap the child's memory, so a regression that reads /dev/zero dies, not the machine."""
    def apply():
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return apply


# ---------------------------------------------------------------------------
# 1. The config file a reload reads: off the loop, only a regular file, capped.
# ---------------------------------------------------------------------------

class ConfigFileTest(BalancerCase):
    """A reload (SIGHUP, /reload) or --check on a FIFO, /dev/zero or a huge file is refused
    at once; a big valid file parses while the loop goes on serving; SIGTERM always works."""

    def setUp(self):
        BalancerCase.setUp(self)
        self.one = self.backend(support.say_name, 'one')
        self.dir = tempfile.mkdtemp(prefix='pydirector-harden-')
        self.addCleanup(shutil.rmtree, self.dir, True)

    def process(self, preexec_fn=None):
        listen = free_port()
        xml = config_xml(service_xml([('one', self.one.address)], listen_port=listen))
        if preexec_fn is None:
            proc = BalancerProcess(xml, wait_port=listen)
        else:
            proc = support.SpawnedBalancer(xml, wait_port=listen, preexec_fn=preexec_fn)
        self.addCleanup(proc.close)
        return proc, listen

    def assert_refused_and_serving(self, proc, listen, why):
        """The reload failed with `why`, the service still answers, and SIGTERM stops it at once."""
        line = 'reload failed: %s: %s' % (proc.config_path, why)
        wait_until(lambda: line in proc.output(), 20, message='no %r in %r' % (line, proc.output()[-2000:]))
        self.assertEqual(exchange(listen, timeout=5), b'one')
        proc.signal(signal.SIGTERM)
        self.assertEqual(proc.wait(20), 0)
        self.assertNotIn('Traceback', proc.output())

    def test_sighup_onto_a_fifo(self):
        # The old loop blocked in open() until something wrote to the FIFO: no service, no SIGTERM.
        proc, listen = self.process()
        os.unlink(proc.config_path)
        os.mkfifo(proc.config_path)
        proc.signal(signal.SIGHUP)
        self.assert_refused_and_serving(proc, listen, 'not a regular file')

    def test_sighup_onto_a_symlink_to_dev_zero(self):
        # The old reload read /dev/zero into memory until killed (capped here at 2 GiB to be safe).
        proc, listen = self.process(preexec_fn=address_space_limit(2 << 30))
        os.unlink(proc.config_path)
        os.symlink('/dev/zero', proc.config_path)
        proc.signal(signal.SIGHUP)
        self.assert_refused_and_serving(proc, listen, 'not a regular file')

    def test_sighup_onto_a_file_over_the_cap(self):
        proc, listen = self.process()
        os.truncate(proc.config_path, CONFIG_LIMIT + 1)    # sparse: costs no disk
        proc.signal(signal.SIGHUP)
        self.assert_refused_and_serving(proc, listen, 'larger than 64 MiB')

    def test_check_refuses_a_fifo_at_once(self):
        fifo = os.path.join(self.dir, 'fifo.xml')
        os.mkfifo(fifo)
        try:
            result = run_pydirector(['--check', fifo], timeout=20)
        except subprocess.TimeoutExpired:
            self.fail('--check waited on a FIFO')
        self.assertEqual((result.returncode, result.stderr), (1, 'pydirector: %s: not a regular file\n' % fifo))

    def test_check_refuses_a_file_over_the_cap(self):
        path = os.path.join(self.dir, 'huge.xml')
        with open(path, 'w') as f:
            f.write('<pdconfig>\n')
        os.truncate(path, CONFIG_LIMIT + 1)
        result = run_pydirector(['--check', path])
        self.assertEqual((result.returncode, result.stderr), (1, 'pydirector: %s: larger than 64 MiB\n' % path))
        # At the cap exactly it is read, and judged as XML.
        os.truncate(path, CONFIG_LIMIT)
        result = run_pydirector(['--check', path])
        self.assertEqual(result.returncode, 1)
        self.assertIn('%s:2: XML error' % path, result.stderr)

    def test_sigterm_right_after_sighup_of_a_big_file(self):
        # 20,000 hosts take the parser half a minute: the old loop sat in it, deaf to SIGTERM.
        proc, listen = self.process()
        with open(proc.config_path, 'w') as f:
            f.write(big_config(listen, 20000))
        proc.signal(signal.SIGHUP)
        proc.signal(signal.SIGTERM)
        try:
            self.assertEqual(proc.wait(20), 0)      # a hang guard: the old code took the whole parse
        except subprocess.TimeoutExpired:
            self.fail('SIGTERM did not stop pydirector during a reload: %s' % proc.output()[-2000:])
        output = proc.output()
        self.assertIn('stopped', output)
        self.assertNotIn('Traceback', output)

    def admin_balancer(self):
        path = os.path.join(self.dir, 'live.xml')
        balancer = self.start(service_xml([('one', self.one.address)]) + admin_block(), path=path)
        return balancer, start_admin(self).server_address[1], path

    def test_the_loop_serves_while_a_reload_parses(self):
        balancer, admin_port, path = self.admin_balancer()
        parsing, release = threading.Event(), threading.Event()
        self.addCleanup(release.set)
        real = pydirector.parse_config

        def slow_parse(data, path='<config>'):
            parsing.set()
            release.wait(30)
            return real(data, path)
        pydirector.parse_config = slow_parse
        self.addCleanup(setattr, pydirector, 'parse_config', real)
        answers = []
        reload = threading.Thread(target=lambda: answers.append(fetch(admin_port, '/reload', 'POST', '')))
        reload.start()
        self.addCleanup(reload.join, 30)
        self.assertTrue(parsing.wait(10), 'the reload never read the file')
        # The file is being parsed (it cannot finish until release): the service and the
        # admin pages answer meanwhile, as the loop is not the thread parsing it.
        try:
            self.assertEqual(exchange(balancer.port(), timeout=5), b'one')
            self.assertEqual(fetch(admin_port, '/running.txt', timeout=5)[0], 200)
        except socket.timeout:
            self.fail('the loop did not answer while a reload parsed the file')
        release.set()
        reload.join(30)
        self.assertEqual(answers[0][0], 200, answers)
        self.assertEqual(answers[0][2], 'OK reloaded %s: no changes\n' % path)

    def test_admin_reload_onto_a_fifo(self):
        balancer, admin_port, path = self.admin_balancer()
        os.unlink(path)
        os.mkfifo(path)

        def unblock():
            # If a reader is stuck in open() (the old code), let it go: open for writing and close.
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        self.addCleanup(unblock)
        status, _, body = fetch(admin_port, '/reload', 'POST', '', timeout=10)
        self.assertEqual((status, body), (400, 'ERROR %s: not a regular file\n' % path))
        self.assertEqual(exchange(balancer.port(), timeout=5), b'one')


# ---------------------------------------------------------------------------
# 2. A health check against a backend that streams forever.
# ---------------------------------------------------------------------------

def stream_forever(conn, backend):
    """Read the check's request, then send bytes until the prober goes away."""
    conn.recv(65536)
    chunk = b'x' * 65536
    while True:
        conn.sendall(chunk)


def answer_with(data):
    def handler(conn, backend):
        conn.recv(65536)
        conn.sendall(data)
    return handler


class StreamingBackendTest(BalancerCase):
    """A probe reads at most PROBE_READ_LIMIT bytes and stops once the answer decides,
    so a backend that streams forever is down for a clear reason and costs no CPU."""

    def setUp(self):
        BalancerCase.setUp(self)
        self.flood = self.backend(stream_forever, 'flood')

    def test_probe_returns_once_the_limit_is_read(self):
        # The old probe read until its timeout, copying what it had at every chunk.
        result = pydirector.probe('127.0.0.1', self.flood.port, 20.0, b'GET / HTTP/1.0\r\n\r\n', b'200')
        self.assertEqual(result[:2], (False, "b'200' not in the first 16384 bytes"))

    def test_status_check_gives_up_at_the_first_bytes(self):
        result = pydirector.probe('127.0.0.1', self.flood.port, 20.0, b'GET / HTTP/1.0\r\n\r\n',
                                  status=((200, 399),))
        self.assertEqual(result[:2], (False, "not an HTTP answer: b'%s'" % ('x' * 40)))

    def test_host_goes_down_and_the_balancer_stays_idle(self):
        listen = free_port()
        check = '    <check interval="0.1" timeout="1" rise="1" fall="1" send="%s" expect="200"/>\n' % HTTP_GET
        proc = BalancerProcess(config_xml(service_xml([('flood', self.flood.address)], listen_port=listen,
                                                      extra=check)), wait_port=listen)
        self.addCleanup(proc.close)
        stat = '/proc/%d/stat' % proc.proc.pid
        wait_until(lambda: self.flood.accepted >= 1, 10)
        cpu, wall, probes = support.cpu_seconds_of(stat), time.monotonic(), self.flood.accepted
        wait_until(lambda: self.flood.accepted >= probes + 5, 30)
        share = (support.cpu_seconds_of(stat) - cpu) / (time.monotonic() - wall)
        # Each old probe took a core for its whole timeout; now it reads 16 KiB and hangs up.
        self.assertLess(share, 0.15, 'the balancer used %.0f%% of a core while probing' % (100 * share))
        line = ("host flood (%s) in web/main down: b'200' not in the first 16384 bytes (1 failed probes)"
                % self.flood.address)
        wait_until(lambda: line in proc.output(), 10, message=proc.output()[-2000:])


# ---------------------------------------------------------------------------
# 3. Wrong passwords: one check at a time, per-address backoff, unknown users alike.
# ---------------------------------------------------------------------------

class CountingChecks(object):
    """Stands in for pydirector_admin.check_password: counts the calls, what they checked
    against and how many ran at once; gate (an Event) holds each call until set."""

    def __init__(self, gate=None):
        self.real = pydirector_admin.check_password
        self.lock = threading.Lock()
        self.stored = []
        self.running = 0
        self.most = 0
        self.gate = gate
        self.entered = threading.Event()

    def __call__(self, password, stored):
        with self.lock:
            self.stored.append(stored)
            self.running += 1
            self.most = max(self.most, self.running)
        self.entered.set()
        try:
            if self.gate is not None:
                self.gate.wait(30)
            return self.real(password, stored)
        finally:
            with self.lock:
                self.running -= 1

    @property
    def calls(self):
        with self.lock:
            return len(self.stored)


_DEFAULT_HASH = []


def default_hash():
    """One hash of the default strength for the whole file (a check of it costs ~0.1-0.3 s)."""
    if not _DEFAULT_HASH:
        _DEFAULT_HASH.append(pydirector.hash_password(PASSWORD))
    return _DEFAULT_HASH[0]


class PasswordFloodTest(BalancerCase):
    """Admin logins as an attacker makes them, against a user whose hash has the default
    strength.  Clients send from loopback addresses of their own (127.0.0.N), where the
    per-address limits are the point."""

    def setUp(self):
        BalancerCase.setUp(self)
        self.stored = default_hash()
        self.start(service_xml([('one', '127.0.0.1:9')]) + admin_block(self.stored))
        self.server = start_admin(self)
        self.server.refusal_delay = 0    # what is answered, here; test_a_waiting_address_is_held_back: when
        self.port = self.server.server_address[1]

    def counting(self, gate=None):
        checks = CountingChecks(gate)
        pydirector_admin.check_password = checks
        self.addCleanup(setattr, pydirector_admin, 'check_password', checks.real)
        return checks

    def login(self, source, password='wrong', user='admin'):
        return fetch(self.port, '/running.txt', user=user, password=password, source=source)

    def test_429_after_five_failures_then_a_doubling_wait(self):
        checks = self.counting()
        answers = [self.login('127.0.0.2') for _ in range(6)]
        self.assertEqual([a[0] for a in answers], [401] * 5 + [429])
        self.assertEqual(checks.calls, 5)       # a 429 costs no check
        status, headers, body = answers[5]
        self.assertEqual(headers.get('Retry-After'), '1')
        self.assertEqual(body, 'ERROR too many failed logins from 127.0.0.2; try again in 1 s\n')
        # Another address is not slowed down by this one.
        self.assertEqual(self.login('127.0.0.7')[0], 401)
        self.assertEqual(checks.calls, 6)
        # Once the wait is over, one more try is checked; failing, it doubles the wait.
        deadline = time.monotonic() + 10
        while True:
            before = time.monotonic()
            status = self.login('127.0.0.2')[0]
            after = time.monotonic()
            if status != 429 or after > deadline:
                break
        self.assertEqual(status, 401)
        self.assertEqual(checks.calls, 7)
        count, until = self.server.passwords.failures['127.0.0.2']
        self.assertEqual(count, 6)
        self.assertTrue(before + 2 <= until <= after + 2, (before, until, after))   # now 2 s

    def test_a_flood_is_checked_one_at_a_time(self):
        checks = self.counting()
        answers = []

        def attacker(source):
            for _ in range(2):
                answers.append(self.login(source)[0])
        threads = [threading.Thread(target=attacker, args=('127.0.0.%d' % (20 + i),)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        self.assertEqual(len(answers), 16)
        self.assertEqual(set(answers) - {401, 429}, set(), answers)   # 429: no turn at once, or told to wait
        self.assertEqual(checks.most, 1)        # PASSWORD_CHECKS
        self.assertLessEqual(checks.calls, 16)

    def test_a_cached_login_passes_during_a_lockout(self):
        self.assertEqual(self.login('127.0.0.3', PASSWORD)[0], 200)     # checked once, then cached
        checks = self.counting()
        answers = [self.login('127.0.0.3')[0] for _ in range(6)]
        self.assertEqual(answers, [401] * 5 + [429])
        for _ in range(10):
            self.server.passwords._failed('127.0.0.3')      # a minute to wait: no race with the clock
        self.assertEqual(self.login('127.0.0.3')[0], 429)
        status, _, body = self.login('127.0.0.3', PASSWORD)
        self.assertEqual(status, 200)
        self.assertIn('service web', body)
        self.assertEqual(checks.calls, 5)       # the cached success cost nothing

    def test_an_unknown_user_costs_a_check_and_counts(self):
        checks = self.counting()
        self.assertEqual(self.login('127.0.0.4', user='nobody')[0], 401)
        self.assertEqual(checks.calls, 1)
        # As slow as a known user: a hash of the same strength is checked.
        iterations = pydirector._parse_pbkdf2(checks.stored[0])[0]
        self.assertEqual(iterations, pydirector._parse_pbkdf2(self.stored)[0])
        answers = [self.login('127.0.0.4', user='nobody%d' % i)[0] for i in range(5)]
        self.assertEqual(answers, [401] * 4 + [429])
        self.assertEqual(checks.calls, 5)

    def test_a_waiting_address_is_held_back(self):
        # A client told to wait that retries at once gets its next answer no sooner than
        # refusal_delay (a timer in the reader, which answers it: no worker, no call to the balancer's loop),
        # so 64 of them cost the data plane nothing; cached credentials are not held.
        self.server.refusal_delay = 0.5
        self.assertEqual(self.login('127.0.0.8', PASSWORD)[0], 200)     # cached from here on
        for _ in range(12):
            self.server.passwords._failed('127.0.0.8')      # told to wait for a minute
        calls = []
        director = self.balancer.director
        real = director.users_list
        director.users_list = lambda: calls.append(1) or real()
        self.addCleanup(delattr, director, 'users_list')
        answers = []
        waiting = threading.Thread(target=lambda: answers.append(self.login('127.0.0.8')))
        started = time.monotonic()
        waiting.start()
        wait_until(lambda: [p for p in self.server.reader.pending.values() if p.held], 5)
        self.assertEqual(calls, [])                 # held in the reader: nothing asked of the loop
        status, _, body = self.login('127.0.0.8', PASSWORD)
        self.assertEqual(status, 200)               # meanwhile, and not held
        self.assertIn('service web', body)
        waiting.join(10)
        self.assertEqual(answers[0][0], 429)
        self.assertGreaterEqual(time.monotonic() - started, 0.5)
        self.assertEqual(len(calls), 1)             # the operator's: the 429 came from the reader too

    def test_the_wait_stops_doubling_at_a_minute(self):
        checks = pydirector_admin.PasswordChecks()
        for _ in range(40):
            checks._failed('10.0.0.1')
        self.assertGreater(checks.blocked_for('10.0.0.1'), pydirector_admin.MAX_BACKOFF - 1)
        self.assertLessEqual(checks.blocked_for('10.0.0.1'), pydirector_admin.MAX_BACKOFF)
        self.assertEqual(checks.blocked_for('10.0.0.2'), 0)


# ---------------------------------------------------------------------------
# 3b. Issue 25 F5, F6: floods of failed logins from many addresses and of requests
#     without credentials: /healthz and a logged-in operator are never behind them,
#     every failed authentication is throttled per address, and logged once per interval.
# ---------------------------------------------------------------------------

class Flood(object):
    """Clients each sending one admin request after another, a connection each, from
    its source address, as fast as the answers come: the statuses they got."""

    def __init__(self, port, clients, sources, request):
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.statuses = {}
        self.threads = [threading.Thread(target=self.run, args=(port, sources[i % len(sources)], request))
                        for i in range(clients)]
        for thread in self.threads:
            thread.start()

    def run(self, port, source, request):
        while not self.stop.is_set():
            sock = socket.socket()
            try:
                sock.settimeout(15)
                sock.bind((source, 0))
                sock.connect(('127.0.0.1', port))
                sock.sendall(request)
                answer = recv_all(sock)
            except OSError:
                answer = b''
            finally:
                sock.close()
            status = int(answer[9:12]) if answer[:9] in (b'HTTP/1.0 ', b'HTTP/1.1 ') else None
            with self.lock:
                self.statuses[status] = self.statuses.get(status, 0) + 1

    def answers(self):
        with self.lock:
            return sum(self.statuses.values())

    def close(self):
        self.stop.set()
        for thread in self.threads:
            thread.join(30)


def timed_fetch(port, path, timeout, **kwargs):
    """(status, body, seconds) of fetch(); status None when no answer came within timeout."""
    started = time.monotonic()
    try:
        status, _, body = fetch(port, path, timeout=timeout, **kwargs)
    except (OSError, http.client.HTTPException):
        status, body = None, ''
    return status, body, time.monotonic() - started


class LoginFloodTest(BalancerCase):
    """Floods as the red team made them (issue 25), in small: the admin's limits are
    lowered to 4 workers and 4 queued requests where the point is that they fill."""

    def setUp(self):
        BalancerCase.setUp(self)
        self.start(service_xml([('one', '127.0.0.1:9')]) + admin_block(default_hash()))
        self.server = start_admin(self)
        self.port = self.server.server_address[1]

    def flood(self, clients, sources, auth):
        headers = 'Authorization: %s\r\n' % auth if auth is not None else ''
        flood = Flood(self.port, clients, sources, ('GET /running.txt HTTP/1.0\r\n%s\r\n' % headers).encode())
        self.addCleanup(flood.close)
        return flood

    def handed_to_workers(self):
        """A list that grows by one for each request the reader hands to a worker."""
        taken = []
        real = self.server.take
        self.server.take = lambda request, operator: taken.append(request.address) or real(request, operator)
        self.addCleanup(delattr, self.server, 'take')
        return taken

    def test_f5_healthz_and_a_logged_in_operator_answer_during_a_password_flood(self):
        # Wrong passwords from 24 clients over 16 addresses, against 4 workers and a queue
        # of 4: every worker waited its turn to check (5 s) and /healthz answered 503, so
        # keepalived gave the address up; the operator waited too.
        self.assertEqual(fetch(self.port, '/running.txt', source='127.0.0.2')[0], 200)     # logged in: cached
        self.server.max_workers, self.server.max_queued = 4, 4
        flood = self.flood(24, ['127.0.1.%d' % i for i in range(1, 17)], basic('admin', 'wrong'))
        wait_until(lambda: flood.answers() >= 48, 30)
        # The target is 1 s (bench/hardening.py --only f5 measures it); 2 s here, keepalived's
        # own limit (contrib/keepalived.conf), so a loaded test machine cannot fail it.
        for _ in range(3):
            status, body, took = timed_fetch(self.port, '/healthz', 2.0, user=None)
            self.assertEqual((status, body), (200, 'OK\n'), 'after %.2f s' % took)
            status, body, took = timed_fetch(self.port, '/running.txt', 2.0, source='127.0.0.2')
            self.assertEqual(status, 200, 'after %.2f s: %r' % (took, body))
            self.assertIn('service web', body)
        flood.close()
        self.assertNotIn(None, flood.statuses)      # every request answered
        self.assertGreater(flood.statuses.get(429, 0), flood.statuses.get(401, 0), flood.statuses)

    def test_f5_no_turn_to_check_is_429_at_once(self):
        gate = threading.Event()
        self.addCleanup(gate.set)
        checks = CountingChecks(gate)
        pydirector_admin.check_password = checks
        self.addCleanup(setattr, pydirector_admin, 'check_password', checks.real)
        first = []
        holder = threading.Thread(target=lambda: first.append(fetch(self.port, '/running.txt', password='x',
                                                                    source='127.0.0.5')))
        holder.start()
        self.assertTrue(checks.entered.wait(10))
        status, body, took = timed_fetch(self.port, '/running.txt', 10, password='y', source='127.0.0.6')
        self.assertEqual((status, body), (429, 'ERROR too many logins being checked; try again in 1 s\n'))
        self.assertLess(took, 1.0)      # not after a wait for the turn (5 s)
        gate.set()
        holder.join(30)
        self.assertEqual(first[0][0], 401)
        self.assertEqual(checks.calls, 1)

    def test_f5_healthz_is_answered_with_every_worker_busy(self):
        # The one worker is checking a password (held), nothing may queue: /healthz still says OK.
        gate = threading.Event()
        self.addCleanup(gate.set)
        checks = CountingChecks(gate)
        pydirector_admin.check_password = checks
        self.addCleanup(setattr, pydirector_admin, 'check_password', checks.real)
        self.server.max_workers, self.server.max_queued = 1, 0
        holder = threading.Thread(target=fetch, args=(self.port, '/running.txt'), kwargs={'password': 'x'})
        holder.start()
        self.addCleanup(holder.join, 30)
        self.assertTrue(checks.entered.wait(10))
        self.assertEqual(fetch(self.port, '/healthz', user=None, timeout=5)[::2], (200, 'OK\n'))
        self.assertEqual(fetch(self.port, '/healthz', 'HEAD', user=None, timeout=5)[::2], (200, ''))
        gate.set()

    def test_f6_requests_without_credentials_are_told_to_wait(self):
        for source, auth in (('127.0.0.9', None), ('127.0.0.10', 'Basic !!'),
                             ('127.0.0.11', basic('admin', 'wrong'))):
            sent = {'Authorization': auth} if auth is not None else {}
            answers = [fetch(self.port, '/running.txt', user=None, source=source, headers=sent)
                       for _ in range(6)]
            self.assertEqual([a[0] for a in answers], [401] * 5 + [429], (source, auth))
            self.assertEqual(answers[5][1].get('Retry-After'), '1')
            self.assertEqual(answers[5][2], 'ERROR too many failed logins from %s; try again in 1 s\n' % source)
        # A request refused before its credentials are looked at (a bad Content-Length) counts too.
        answers = [fetch(self.port, '/running.txt', user=None, source='127.0.0.12',
                         headers={'Content-Length': 'x'})[0] for _ in range(6)]
        self.assertEqual(answers, [400] * 5 + [429])
        # Another address is not slowed down by these, nor is a logged-in operator on theirs.
        self.assertEqual(fetch(self.port, '/running.txt', user=None, source='127.0.0.13')[0], 401)

    def test_f6_a_login_forgives_its_address(self):
        # wget asks without credentials first, every time, then again with them: a script
        # running wget over and over is never told to wait.
        for _ in range(pydirector_admin.FREE_FAILURES * 2):
            self.assertEqual(fetch(self.port, '/running.txt', user=None, source='127.0.0.14')[0], 401)
            self.assertEqual(fetch(self.port, '/running.txt', source='127.0.0.14')[0], 200)

    def test_f6_a_throttled_flood_costs_no_worker_and_a_log_line_an_interval(self):
        # 'Authorization: Basic !!' as fast as the answers come: one WARNING per request
        # before, and never a 429.  Now the reader answers the address's requests (429)
        # once it is told to wait, without a worker, and the log has one line, then one
        # summary per interval.
        self.server.refusal_delay = 0
        set_for_test(self, pydirector_admin, 'LOG_INTERVAL', 0.5)
        taken = self.handed_to_workers()
        mark = LOG.mark()
        flood = self.flood(4, ['127.0.0.15'], 'Basic !!')
        wait_until(lambda: flood.statuses.get(429, 0) >= 200, 15)
        flood.close()
        self.assertEqual(set(flood.statuses) - {401, 429}, set(), flood.statuses)
        self.assertLessEqual(len(taken), pydirector_admin.FREE_FAILURES + 8)    # + one a second after the wait
        # Every request is in the log: the first line, then the summaries' counts.
        total = sum(flood.statuses.values())
        summary = re.compile(r'^admin: 127\.0\.0\.15: (\d+) more failed logins: (.*)$')

        def lines():
            return [l for l in LOG.since(mark) if '127.0.0.15' in l and '"GET ' not in l]    # not the debug lines

        def counted():
            found = [summary.match(l) for l in lines()]
            return sum(int(m.group(1)) for m in found if m)
        wait_until(lambda: 1 + counted() == total, 5, message='%r, %r' % (total, lines()))
        self.assertEqual(lines()[0], 'admin: malformed credentials from 127.0.0.15')
        for line in lines()[1:]:
            m = summary.match(line)
            self.assertIsNotNone(m, line)
            parts = [p.split(' ', 1) for p in m.group(2).split(', ')]
            self.assertEqual(sum(int(n) for n, _ in parts), int(m.group(1)), line)
            self.assertLessEqual(set(kind for _, kind in parts), {'told to wait', 'malformed credentials'}, line)

    def test_f6_a_held_request_past_the_cap_is_answered_not_cut(self):
        # 1,000 requests a second held a second each fill the table of connections still
        # being read (max_pending): the oldest held one then gets its 429 at once, where
        # it was closed unanswered.
        self.server.refusal_delay = 60
        for _ in range(12):
            self.server.passwords._failed('127.0.0.16')      # told to wait for a minute
        self.addCleanup(setattr, self.server, 'max_pending', self.server.max_pending)
        self.server.max_pending = 2
        held = []
        for _ in range(2):
            sock = socket.socket()
            self.addCleanup(sock.close)
            sock.settimeout(10)
            sock.bind(('127.0.0.16', 0))
            sock.connect(('127.0.0.1', self.port))
            sock.sendall(b'GET /running.txt HTTP/1.0\r\n\r\n')
            held.append(sock)
            wait_until(lambda: len([p for p in list(self.server.reader.pending.values()) if p.held]) == len(held))
        status, _, body = fetch(self.port, '/running.txt', source='127.0.0.17')
        self.assertEqual(status, 200, body)
        answer = recv_all(held[0])
        self.assertTrue(answer.startswith(b'HTTP/1.0 429 '), answer)
        self.assertTrue(answer.endswith(b'ERROR too many failed logins from 127.0.0.16; try again in 60 s\n'), answer)

    def test_f6_healthz_asks_the_loop_once_for_many(self):
        # /healthz needs no credentials, so anyone may send many: they share one question
        # to the balancer's loop at a time, and a stuck loop is DOWN within the second.
        calls = []
        director = self.balancer.director
        real = director.services_down
        director.services_down = lambda: calls.append(1) or real()
        self.addCleanup(delattr, director, 'services_down')
        release = threading.Event()
        self.addCleanup(release.set)
        director.loop.call_soon_threadsafe(release.wait, 30)
        answers = []
        threads = [threading.Thread(target=lambda: answers.append(timed_fetch(self.port, '/healthz', 10, user=None)))
                   for _ in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        self.assertEqual(sorted(set(a[:2] for a in answers)), [(503, 'DOWN\n')])
        self.assertLess(max(a[2] for a in answers), 3.0)
        # Those answered DOWN while a question is out are not kept past the pending cap.
        self.addCleanup(setattr, self.server, 'max_pending', self.server.max_pending)
        self.server.max_pending = 2
        for _ in range(3):
            self.assertEqual(fetch(self.port, '/healthz', user=None)[::2], (503, 'DOWN\n'))
        self.assertLessEqual(len(self.server.reader.health.waiting), 2)
        release.set()
        wait_until(lambda: fetch(self.port, '/healthz', user=None)[2] == 'OK\n', 5)
        self.assertLessEqual(len(calls), 3, calls)


class LoginFloodWorkersTest(WorkersMixin, LoginFloodTest):
    """The same with a master and two worker processes: the admin is the master's."""

# ---------------------------------------------------------------------------
# 4. Changes are POST-only (GET with <admin get_changes="on">), in real Chromium too.
# ---------------------------------------------------------------------------

class PostOnlyTest(BalancerCase):
    """A change as GET is 405 and changes nothing, unless <admin get_changes="on">."""

    def setUp(self):
        BalancerCase.setUp(self)
        self.start(service_xml([('n1', '127.0.0.1:9'), ('n2', '127.0.0.1:10')]) + admin_block())

    def admin_state(self, name):
        return self.balancer.host(name)['admin']

    def test_get_is_405_and_names_the_way_out(self):
        port = start_admin(self).server_address[1]
        status, headers, body = fetch(port, '/hostAdminDown?service=web&group=main&name=n1')
        self.assertEqual((status, headers.get('Allow')), (405, 'POST'))
        self.assertEqual(body, 'ERROR changes are POST requests: wget --post-data=... or curl -d ... '
                               '(<admin get_changes="on"> allows GET with a query string)\n')
        self.assertEqual(self.admin_state('n1'), 'enabled')
        status, _, body = fetch(port, '/hostAdminDown', 'POST', 'service=web&group=main&name=n1')
        self.assertEqual((status, body), (200, 'OK draining host n1 in web/main (0 open)\n'))
        self.assertEqual(self.admin_state('n1'), 'draining')

    def test_get_changes_on_allows_get_with_a_query_string(self):
        port = start_admin(self, get_changes=True).server_address[1]
        status, _, body = fetch(port, '/hostAdminDown?service=web&group=main&name=n2')
        self.assertEqual((status, body), (200, 'OK draining host n2 in web/main (0 open)\n'))
        self.assertEqual(self.admin_state('n2'), 'draining')
        # Still not from another site.
        status, _, body = fetch(port, '/hostAdminUp?service=web&group=main&name=n2',
                                headers={'Referer': 'http://evil.example/'})
        self.assertEqual(status, 403)
        self.assertEqual(self.admin_state('n2'), 'draining')
        self.assertEqual(fetch(port, '/hostAdminUp?service=web&group=main&name=n2')[0], 200)
        self.assertEqual(self.admin_state('n2'), 'enabled')

    def test_get_changes_in_the_config(self):
        xml = config_xml(service_xml([('n1', '127.0.0.1:9')]) + admin_block(extra=' get_changes="on"'))
        config = pydirector.parse_config(xml, 'x.xml')
        self.assertTrue(config.admin.get_changes)
        self.assertIn('get_changes="on"', config.to_xml())
        self.assertTrue(pydirector.parse_config(config.to_xml(), 'running.xml').admin.get_changes)
        self.assertFalse(pydirector.parse_config(xml.replace('"on"', '"off"'), 'x.xml').admin.get_changes)
        with self.assertRaises(pydirector.ConfigError) as cm:
            pydirector.parse_config(xml.replace('"on"', '"yes"'), 'x.xml')
        self.assertIn("<admin> get_changes 'yes': must be 'on' or 'off'", str(cm.exception))


CHROMIUM = support.CHROMIUM
DevTools = support.DevTools


ATTACK_PAGE = '''<!doctype html>
<html><body>
<iframe name="sink" id="sink"></iframe>
<form id="form" method="POST" action="%(admin)s/hostAdminDown" target="sink">
<input type="hidden" name="service" value="web"><input type="hidden" name="group" value="main">
<input type="hidden" name="name" value="n1"></form>
<script>
var left = 3, results = {};
function settled(what, how) {
  results[what] = how;
  if (--left == 0) { new Image().src = '/done?' + encodeURIComponent(JSON.stringify(results)); }
}
var img = new Image();
img.referrerPolicy = 'no-referrer';
img.onload = function () { settled('img', 'load'); };
img.onerror = function () { settled('img', 'error'); };
img.src = '%(admin)s/hostAdminDown?service=web&group=main&name=n1';
fetch('%(admin)s/hostAdminDown', {method: 'POST', credentials: 'include',
      headers: {'Content-Type': 'application/x-www-form-urlencoded'}, body: 'service=web&group=main&name=n1'})
  .then(function () { settled('fetch', 'answered'); }, function () { settled('fetch', 'failed'); });
document.getElementById('sink').onload = function () { settled('form', 'load'); };
document.getElementById('form').submit();
</script>
</body></html>
'''


class AttackerSite(object):
    """The other origin: serves ATTACK_PAGE and records the page's /done beacon."""

    def __init__(self, admin_origin):
        site = self
        self.page = (ATTACK_PAGE % {'admin': admin_origin}).encode()
        self.beacon = []
        self.done = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.startswith('/done?'):
                    site.beacon.append(json.loads(urllib.parse.unquote(self.path[len('/done?'):])))
                    site.done.set()
                    body = b''
                else:
                    body = site.page
                self.send_response(200)
                self.send_header('Content-Type', 'text/html')
                self.send_header('Content-Length', str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
        self.server = Server(('127.0.0.1', 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@unittest.skipUnless(os.path.exists(CHROMIUM), '%s not installed (CI installs Debian chromium)' % CHROMIUM)
class ChromiumCrossSiteTest(BalancerCase):
    """An operator's browser with cached Basic credentials for a plain-HTTP admin
    opens a page on another site, which tries an <img> GET, a form POST and a
    fetch() POST of a change.  Nothing changes.

    The admin is reached as http://lb1.example:PORT (the host resolver maps the
    names to 127.0.0.1): a browser sends no Sec-Fetch-* headers to a plain-HTTP
    origin that is not localhost, which is the case the issue is about.  The
    profile allows third-party cookies, as Chrome does by default; without that
    (Debian Chromium's new profiles) cached credentials are not sent cross-site
    at all and the test would prove nothing: the control below checks they are."""

    def setUp(self):
        BalancerCase.setUp(self)
        self.bal = self.start(service_xml([('n1', '127.0.0.1:9'), ('n2', '127.0.0.1:10')]) + admin_block())

    def attack(self, get_changes):
        """Log in, open the attacker's page; the page's requests to the admin, by kind."""
        server = start_admin(self, get_changes)
        admin = 'http://lb1.example:%d' % server.server_address[1]
        site = AttackerSite(admin)
        self.addCleanup(site.close)
        profile = tempfile.mkdtemp(prefix='pydirector-chromium-')
        self.addCleanup(shutil.rmtree, profile, True)
        os.mkdir(os.path.join(profile, 'Default'))
        with open(os.path.join(profile, 'Default', 'Preferences'), 'w') as f:
            json.dump({'profile': {'cookie_controls_mode': 0, 'block_third_party_cookies': False}}, f)
        browser = DevTools(['--host-resolver-rules=MAP lb1.example 127.0.0.1, MAP evil.example 127.0.0.1',
                            '--disable-features=HttpsUpgrades'], profile)
        self.addCleanup(browser.close)
        browser.open_page()
        # A top-level navigation with credentials in the URL caches them for the origin.
        browser.navigate('http://admin:%s@lb1.example:%d/running' % (
            urllib.parse.quote(PASSWORD, safe=''), server.server_address[1]))
        text = browser.send('Runtime.evaluate', {'expression': 'document.body.innerText'})['result']['value']
        self.assertIn('Service web', text)
        browser.navigate('http://evil.example:%d/attack.html' % site.port)
        self.assertTrue(site.done.wait(60), 'the attack page did not finish')

        def admin_requests(events):
            found = [r for r in browser.requests().values()
                     if r.get('url', '').startswith(admin + '/hostAdminDown') and 'status' in r and 'headers' in r]
            return found if len(found) == 3 else None
        found = browser.wait_for(admin_requests)
        kinds = {}
        for request in found:
            kind = 'img' if request['method'] == 'GET' else (
                'fetch' if request['headers'].get('sec-fetch-mode') == 'cors' or 'accept' not in request['headers']
                or 'text/html' not in request['headers'].get('accept', '') else 'form')
            kinds[kind] = request
        # The browser did send the cached credentials with every one of them.
        for request in found:
            self.assertEqual(request['headers'].get('authorization'), basic('admin', PASSWORD), request)
            self.assertNotIn('sec-fetch-site', request['headers'])
        return kinds, found

    def test_no_change_from_another_site(self):
        kinds, found = self.attack(get_changes=False)
        self.assertEqual(sorted(r['status'] for r in found), [403, 403, 405], found)
        self.assertEqual(kinds['img']['status'], 405)     # POST-only: the <img> cannot change anything
        self.assertEqual(self.bal.host('n1')['admin'], 'enabled')

    def test_control_get_changes_on_lets_the_img_through(self):
        # The control: with 1.0's GET changes allowed, the same page does drain n1 (so the
        # test above is not passing because the browser sent nothing).  POSTs stay refused.
        kinds, found = self.attack(get_changes=True)
        self.assertEqual(sorted(r['status'] for r in found), [200, 403, 403], found)
        self.assertEqual(kinds['img']['status'], 200)
        self.assertEqual(self.bal.host('n1')['admin'], 'draining')


# ---------------------------------------------------------------------------
# 5. Splice pipes: the default size, and at most MAX_PIPES of them.
# ---------------------------------------------------------------------------

def pseudo_random(n, seed):
    import random
    return random.Random(seed).getrandbits(8 * n).to_bytes(n, 'little')


@unittest.skipIf(pydirector.splice is None, 'os.splice needs Linux and Python 3.10+')
class SplicePipeTest(BalancerCase):
    """A bulk direction moves through a pipe of the kernel's default size (64 KiB, as
    much as a plain direction holds), and past MAX_PIPES pipes directions stay plain."""

    def setUp(self):
        BalancerCase.setUp(self)
        self.bal = self.start(service_xml([('digest', self.backend(support.digest_until_eof, 'digest').address)]))

    def start_upload(self, size, seed):
        """A client that has sent size bytes (past SPLICE_AFTER) and holds its connection open."""
        sock = connect(self.bal.port())
        self.addCleanup(sock.close)
        data = pseudo_random(size, seed)
        sock.sendall(data)
        return sock, data

    def pairs(self):
        return self.bal.call(lambda: sorted(self.bal.director.pairs, key=lambda p: p.client_port))

    def pipes(self):
        """Pipes the balancer holds now, counted from its connections."""
        return self.bal.call(lambda: sum((p.splice_up is not None) + (p.splice_down is not None)
                                         for p in self.bal.director.pairs))

    def finish(self, sock, data, more):
        sock.sendall(more)
        sock.shutdown(socket.SHUT_WR)
        whole = data + more
        self.assertEqual(recv_all(sock).decode(), '%s %d' % (hashlib.sha256(whole).hexdigest(), len(whole)))

    def test_a_pipe_keeps_the_default_size(self):
        sock, data = self.start_upload(3 << 20, 1)
        pair = wait_until(lambda: [p for p in self.pairs() if p.splice_up is not None and p.bytes_in >= 3 << 20], 10)[0]
        sizes = self.bal.call(lambda: (fcntl.fcntl(pair.splice_up.r, F_GETPIPE_SZ),
                                       fcntl.fcntl(pair.splice_up.w, F_GETPIPE_SZ)))
        r, w = os.pipe()
        default = fcntl.fcntl(r, F_GETPIPE_SZ)
        os.close(r)
        os.close(w)
        self.assertEqual(sizes, (default, default))     # the old code asked for 1 MiB
        self.assertLessEqual(default, pydirector.BUFFER_SIZE)
        self.finish(sock, data, pseudo_random(1 << 20, 2))
        wait_until(lambda: self.pipes() == 0 and getattr(pydirector.Splice, 'count', 0) == 0, 5)

    def test_past_max_pipes_a_direction_stays_plain(self):
        set_for_test(self, pydirector, 'MAX_PIPES', 1)
        first, first_data = self.start_upload(3 << 20, 3)
        wait_until(lambda: [p for p in self.pairs() if p.splice_up is not None], 10)
        second, second_data = self.start_upload(3 << 20, 4)
        port = second.getsockname()[1]
        wait_until(lambda: [p for p in self.pairs() if p.client_port == port and p.bytes_in >= 3 << 20], 10)
        plain = self.bal.call(lambda: [(p.splice_up, p.splice_down) for p in self.bal.director.pairs
                                       if p.client_port == port])
        self.assertEqual(plain, [(None, None)])
        self.assertEqual(self.pipes(), 1)
        self.assertEqual(getattr(pydirector.Splice, 'count', 1), 1)
        self.finish(second, second_data, pseudo_random(1 << 20, 5))
        self.finish(first, first_data, pseudo_random(1 << 20, 6))
        wait_until(lambda: self.pipes() == 0 and getattr(pydirector.Splice, 'count', 0) == 0, 5)


# ---------------------------------------------------------------------------
# 6. <check status>: the status code on the first line, not a substring.
# ---------------------------------------------------------------------------

ANSWER_503 = (b'HTTP/1.0 503 Service Unavailable\r\nContent-Length: 1200\r\n\r\n' + b'busy ' * 240)
ANSWER_200 = b'HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok'
ANSWER_SSH = b'SSH-2.0-OpenSSH_9.2\r\n'


class StatusCheckTest(BalancerCase):
    """A 503 whose headers happen to hold '200' passes expect="200" (a substring match,
    as documented) and fails status="200-399"; an answer that is not HTTP fails status."""

    def setUp(self):
        BalancerCase.setUp(self)
        self.backends = [self.backend(answer_with(ANSWER_503), 'busy'), self.backend(answer_with(ANSWER_200), 'fine'),
                         self.backend(answer_with(ANSWER_SSH), 'ssh')]
        busy, fine, ssh = self.backends
        check = '    <check interval="0.1" timeout="2" rise="1" fall="1" send="%s" %s/>\n'
        self.bal = self.start(
            service_xml([('busy', busy.address)], name='expect', extra=check % (HTTP_GET, 'expect="200"')),
            service_xml([('fine', fine.address), ('busy', busy.address), ('ssh', ssh.address)], name='status',
                        extra=check % (HTTP_GET, 'status="200-399"')),
            admin_block())
        self.server = start_admin(self)

    def test_expect_alone_is_a_substring_match(self):
        busy = self.backends[0]
        start = busy.accepted
        wait_until(lambda: busy.accepted >= start + 4, 10)     # probed by both services meanwhile
        self.assertEqual(self.bal.host('busy', 'expect')['state'], 'up')

    def test_status_takes_the_503_down(self):
        wait_until(lambda: self.bal.host('busy', 'status')['state'] == 'down', 10)
        self.assertEqual(self.bal.host('busy', 'status')['reason'], 'status 503, not 200-399 (1 failed probes)')
        wait_until(lambda: self.bal.host('ssh', 'status')['state'] == 'down', 10)
        self.assertEqual(self.bal.host('ssh', 'status')['reason'],
                         "not an HTTP answer: b'SSH-2.0-OpenSSH_9.2\\r\\n' (1 failed probes)")
        self.assertEqual(self.bal.host('fine', 'status')['state'], 'up')

    def test_explain_shows_the_check_and_why_a_host_is_down(self):
        wait_until(lambda: self.bal.host('busy', 'status')['state'] == 'down', 10)
        wait_until(lambda: self.bal.host('ssh', 'status')['state'] == 'down', 10)
        status, _, body = fetch(self.server.server_address[1], '/explain?service=status&client=10.0.0.1')
        self.assertEqual(status, 200)
        lines = body.splitlines()
        self.assertIn('check: send GET / HTTP/1.0\\r\\n\\r\\n, then status 200-399 on the first line', lines)
        self.assertIn('host: fine %s' % self.backends[1].address, lines)
        self.assertIn('skipped: busy (down: status 503, not 200-399 (1 failed probes))', lines)
        self.assertIn("skipped: ssh (down: not an HTTP answer: b'SSH-2.0-OpenSSH_9.2\\\\r\\\\n' (1 failed probes))",
                      lines)
        status, _, body = fetch(self.server.server_address[1], '/explain?service=expect&client=10.0.0.1')
        self.assertIn('check: send GET / HTTP/1.0\\r\\n\\r\\n, then expect 200 anywhere in the answer',
                      body.splitlines())

    def test_judge_answer(self):
        judge = pydirector.judge_answer
        ok = ((200, 399),)
        self.assertEqual(judge(bytearray(ANSWER_200), ok, None, False), (True, 'probe ok (status 200)'))
        self.assertEqual(judge(bytearray(ANSWER_503), ok, b'200', False), (False, 'status 503, not 200-399'))
        self.assertEqual(judge(bytearray(b'HTTP/1.1 204 No Content\r\n'), ((200, 200), (204, 204)), b'x', False),
                         None)   # the status passed; expect may still come
        self.assertIsNone(judge(bytearray(b'HTTP/1.'), ok, None, False))        # the first line is not whole yet
        self.assertEqual(judge(bytearray(b'HTTP/1.0 200'), ok, None, True), (True, 'probe ok (status 200)'))
        self.assertEqual(judge(bytearray(b'<html>'), ok, None, False), (False, "not an HTTP answer: b'<html>'"))
        self.assertEqual(judge(bytearray(b'HTTP/1.0 2000 OK\r\n'), ok, None, False)[0], False)
        self.assertEqual(judge(bytearray(b'x' * 10), None, b'200', False), None)
        self.assertEqual(judge(bytearray(b'x' * 10), None, b'200', True), (False, "expected b'200', got b'xxxxxxxxxx'"))

    def test_status_in_the_config(self):
        base = config_xml(service_xml([('one', '127.0.0.1:9')], extra='    <check %s/>\n'))
        line = base[:base.index('<check')].count('\n') + 1
        config = pydirector.parse_config(base % 'status="200,204,300-399"', 'x.xml')
        self.assertEqual(config.services[0].check.status, ((200, 200), (204, 204), (300, 399)))
        self.assertIn('status="200,204,300-399"', config.to_xml())
        for text in ('abc', '99', '200-', '399-200', '600', '200;300', ''):
            with self.assertRaises(pydirector.ConfigError) as cm:
                pydirector.parse_config(base % ('status="%s"' % text), 'x.xml')
            self.assertEqual(str(cm.exception), "x.xml:%d: <check> status %r: must be HTTP status codes and "
                                                "ranges, like '200-399' or '200,204'" % (line, text))

    def test_readme_and_sample_use_status(self):
        with open(os.path.join(support.REPO, 'README.md')) as f:
            readme = f.read()
        self.assertIn('status="200-399"', readme)
        self.assertNotIn('send="GET / HTTP/1.0\\r\\n\\r\\n" expect="200"/>', readme)
        with open(os.path.join(support.REPO, 'sample.xml')) as f:
            self.assertIn('status="200-399"', f.read())


# ---------------------------------------------------------------------------
# 7. Names that can never work: ':' in a user name, a user or group this system lacks.
# ---------------------------------------------------------------------------

NO_SUCH_USER = 'pd-no-such-user'
NO_SUCH_GROUP = 'pd-no-such-group'


class UnusableNamesTest(BalancerCase):

    def setUp(self):
        BalancerCase.setUp(self)
        self.dir = tempfile.mkdtemp(prefix='pydirector-harden-')
        self.addCleanup(shutil.rmtree, self.dir, True)

    def write(self, text):
        path = os.path.join(self.dir, 'names.xml')
        with open(path, 'w') as f:
            f.write(text)
        return path

    def test_colon_in_a_user_name_in_the_config(self):
        xml = ('<pdconfig>\n' + service_xml([('one', '127.0.0.1:9')]) +
               '  <admin listen="127.0.0.1:%d">\n    <user name="admin" password="%s" access="readonly"/>\n'
               '    <user name="ops:team" password="%s" access="full"/>\n  </admin>\n</pdconfig>\n'
               % (free_port(), FAST_HASH, FAST_HASH))
        with self.assertRaises(pydirector.ConfigError) as cm:
            pydirector.parse_config(xml, 'x.xml')
        line = xml[:xml.index('<user name="ops:team"')].count('\n') + 1
        self.assertEqual(str(cm.exception),
                         "x.xml:%d: user name 'ops:team' contains ':', which HTTP Basic credentials cannot carry" % line)

    def test_colon_in_a_user_name_from_add_user(self):
        bal = self.start(service_xml([('one', '127.0.0.1:9')]) + admin_block())
        server = start_admin(self)
        status, _, body = fetch(server.server_address[1], '/addUser', 'POST',
                                'name=ops%3Ateam&password=x&access=full')
        self.assertEqual((status, body), (400, "ERROR user name 'ops:team' contains ':', which HTTP Basic "
                                               "credentials cannot carry\n"))
        self.assertEqual([u['name'] for u in bal.snapshot()['users']], ['admin'])

    def check(self, root_attrs, *args):
        import pwd
        try:
            pwd.getpwnam(NO_SUCH_USER)
            self.skipTest('this system has a user %s' % NO_SUCH_USER)
        except KeyError:
            pass
        # An XML declaration first, so <pdconfig> is on line 2: the error names its line.
        path = self.write('<?xml version="1.0"?>\n<pdconfig %s>\n%s</pdconfig>\n' % (
            root_attrs, service_xml([('one', '127.0.0.1:9')])))
        return path, run_pydirector(['--check', path] + list(args))

    def test_check_refuses_a_user_this_system_lacks(self):
        path, result = self.check('user="%s"' % NO_SUCH_USER)
        self.assertEqual((result.returncode, result.stderr), (1, "pydirector: %s:2: <pdconfig> user '%s': no such "
                                                                 "user on this system\n" % (path, NO_SUCH_USER)))
        self.assertEqual(result.stdout, '')

    def test_check_refuses_a_group_this_system_lacks(self):
        path, result = self.check('user="0" group="%s"' % NO_SUCH_GROUP)
        self.assertEqual((result.returncode, result.stderr), (1, "pydirector: %s:2: <pdconfig> group '%s': no such "
                                                                 "group on this system\n" % (path, NO_SUCH_GROUP)))

    def test_check_names_the_option_that_named_it(self):
        path, result = self.check('user="0"', '--user', NO_SUCH_USER)
        self.assertEqual((result.returncode, result.stderr),
                         (1, "pydirector: --user '%s': no such user on this system\n" % NO_SUCH_USER))
        path, result = self.check('', '--user', '0', '--group', NO_SUCH_GROUP)
        self.assertEqual((result.returncode, result.stderr),
                         (1, "pydirector: --group '%s': no such group on this system\n" % NO_SUCH_GROUP))

    def test_check_passes_a_user_that_exists(self):
        path, result = self.check('user="%d"' % os.getuid())
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn('runs as: user %d' % os.getuid(), result.stdout)


# ---------------------------------------------------------------------------
# 8. Small ones: one line for a bad PROXY header; a failed bind says which address.
# ---------------------------------------------------------------------------

class SmallOnesTest(BalancerCase):

    def test_a_bad_proxy_header_is_logged_once_and_its_timer_goes(self):
        backend = self.backend(support.say_name, 'one')
        listen = free_port()
        xml = config_xml(service_xml([('one', backend.address)], listen_port=listen,
                                     extra='    <timeouts connect="0.3"/>\n').replace(
            '<listen ip="127.0.0.1:%d"/>' % listen, '<listen ip="127.0.0.1:%d" accept_proxy="v1"/>' % listen))
        bal = self.start(xml)
        loop = bal.director.loop
        mark = LOG.mark()
        sock = connect(listen)
        self.addCleanup(sock.close)
        port = sock.getsockname()[1]
        sock.sendall(b'GET / HTTP/1.0\r\n\r\n')
        self.assertEqual(recv_all(sock), b'')        # closed at once
        line = 'client 127.0.0.1:%d in web: bad PROXY header: ' % port
        LOG.wait_for(line, mark)

        def header_timers():
            return [entry[2] for entry in loop._timers if entry[2].callback is not None and
                    type(getattr(entry[2].callback, '__self__', None)).__name__ in ('Pair', 'ProxyHeaderReader')]
        wait_until(lambda: bal.open_pairs() == 0, 2)
        self.assertEqual(bal.call(header_timers), [])      # nothing keeps the Pair alive
        # Wait past the connect timeout (a timer on the same loop, due after the header's would be).
        passed = threading.Event()
        bal.call(loop.call_later, 0.5, passed.set)
        self.assertTrue(passed.wait(5))
        lines = [l for l in LOG.since(mark) if l.startswith(line)]
        self.assertEqual(lines, [line + 'not a PROXY protocol header (first byte 0x47)'])

    def test_starting_twice_on_one_port_names_the_address(self):
        listen = free_port()
        xml = config_xml(service_xml([('one', '127.0.0.1:9')], listen_port=listen))
        first = BalancerProcess(xml, wait_port=listen)
        self.addCleanup(first.close)
        second = BalancerProcess(xml)
        self.addCleanup(second.close)
        self.assertEqual(second.wait(10), 1)
        self.assertIn('ERROR cannot listen on 127.0.0.1:%d: Address already in use\n' % listen, second.output())

    def test_admin_port_in_use_names_the_address(self):
        taken = socket.socket()
        taken.bind(('127.0.0.1', 0))
        taken.listen(1)
        self.addCleanup(taken.close)
        port = taken.getsockname()[1]
        xml = config_xml(service_xml([('one', '127.0.0.1:9')]) +
                         '  <admin listen="127.0.0.1:%d">\n    <user name="admin" password="%s" access="full"/>\n'
                         '  </admin>\n' % (port, FAST_HASH))
        proc = BalancerProcess(xml)
        self.addCleanup(proc.close)
        self.assertEqual(proc.wait(10), 1)
        self.assertIn('ERROR admin cannot listen on 127.0.0.1:%d: Address already in use\n' % port, proc.output())


if __name__ == '__main__':
    unittest.main()
