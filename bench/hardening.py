#!/usr/bin/env python3
"""Before/after figures for issue 17 (hardening) and issue 25's admin floods (F5, F6),
measured as the issues describe.  Run by hand, from the repo root:

    python3 bench/hardening.py                        old = the commit before each item's fixes, new = this checkout
    python3 bench/hardening.py --only reload,pipes    some of: reload, probe, password, pipes, f5, f6
    python3 bench/hardening.py --old DIR --new DIR    any two checkouts (a pydirector.py in each)

For each item it runs the old balancer, then the new one, back to back, on the same
loopback setup, and prints one table (with ratios new/old where both are numbers):

- reload: SIGHUP with the config path swapped for a FIFO (do requests still get an
  answer; how long SIGTERM then takes to stop it), /dev/zero (the balancer's memory
  growth over one second), and a valid 12,000-host file (the longest data-plane stall a
  client doing back-to-back requests sees while it is read, and how long the reload took);
- probe: an unrelated service's connections/s and p99 latency over 6 s, with a health
  check of a backend that streams bytes forever after the request, and without it;
- password: data-plane requests/s and p50 over 5 s, back to back (its capacity) and paced
  at 200/s (the issue's ~177/s), without a flood and then, on the same balancer, with 64
  concurrent clients sending wrong admin passwords (from one address, and from 64);
- pipes: 20 clients that stop reading after 3 MiB of a bulk download: the pipe buffer
  bytes the balancer holds (F_GETPIPE_SZ of each pipe, and FIONREAD: bytes in them) and
  its file descriptors;
- f5 (issue 25): 150 clients sending wrong admin passwords from 100 source addresses,
  while /healthz is checked once a second as keepalived does and an operator already
  logged in (cached credentials) asks for /running.txt once a second: how many of each
  got 200 within 1 s, the slowest, and the data plane (as for password) against no
  flood; one process, and workers="2";
- f6 (issue 25): 1,000 admin GETs a second from one address, paced (a new connection
  each, whatever the answers), without credentials and with `Authorization: Basic !!`:
  the data plane against no flood, the answers, and the balancer's log lines about
  that address per 10 s; one process, and workers="2".

The machine is shared and small (2 cores): compare each old/new pair, not absolute
numbers.  Every balancer, backend and load process runs on its own (python3 by default,
--python), started here and killed at the end.  Stdlib only.
"""

import argparse
import base64
import fcntl
import json
import os
import selectors
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.append(os.path.join(REPO, 'tools'))
import processes  # noqa: E402
from processes import cpu_seconds, free_port, rss_bytes  # noqa: E402
ITEMS = ('reload', 'probe', 'password', 'pipes', 'f5', 'f6')
# The commit before each item's fixes: the default old tree (--old-commit or --old: all items).
OLD_COMMITS = {'reload': 'cdbcd1a', 'probe': 'cdbcd1a', 'password': 'cdbcd1a', 'pipes': 'cdbcd1a',
               'f5': 'fd5593f', 'f6': 'fd5593f'}
PASSWORD = 'right one'
F_GETPIPE_SZ = getattr(fcntl, 'F_GETPIPE_SZ', 1032)
PACED_RATE = 200          # requests a second of the paced data-plane client (the was ~177/s)
REQUEST = b'GET / HTTP/1.0\r\n\r\n'
ANSWER = b'HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok'


# ---------------------------------------------------------------------------
# Helper processes: `hardening.py --serve KIND ...` runs one of these.
# ---------------------------------------------------------------------------

def serve_answer(port):
    """Each connection: read the request, answer 200 'ok', close.  One thread, a selector."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(('127.0.0.1', port))
    listener.listen(1024)
    listener.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            if key.fileobj is listener:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    continue
                conn.setblocking(False)
                selector.register(conn, selectors.EVENT_READ)
                continue
            conn = key.fileobj
            try:
                data = conn.recv(65536)
                if data:
                    conn.send(ANSWER)
            except OSError:
                pass
            selector.unregister(conn)
            conn.close()


def serve_stream(port, wait_for_request):
    """Each connection: (read the request, then) send 64 KiB chunks until the peer goes away."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(('127.0.0.1', port))
    listener.listen(128)
    chunk = b'x' * 65536

    def stream(conn):
        try:
            if wait_for_request:
                conn.recv(65536)
            while True:
                conn.sendall(chunk)
        except OSError:
            pass
        finally:
            conn.close()
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=stream, args=(conn,), daemon=True).start()


class FloodStats(object):
    """What a flood's answers were, written to `path` as JSON once a second (if a path)."""

    def __init__(self, path):
        self.path = path
        self.lock = threading.Lock()
        self.statuses = {}      # status line's code (or 'none') -> count
        self.sent = 0

    def answered(self, data):
        status = data[9:12].decode('latin-1') if data[:5] == b'HTTP/' else 'none'
        with self.lock:
            self.statuses[status] = self.statuses.get(status, 0) + 1

    def write_forever(self):
        while True:
            time.sleep(1.0)
            if self.path:
                with self.lock:
                    text = json.dumps({'sent': self.sent, 'statuses': self.statuses})
                with open(self.path + '.new', 'w') as f:
                    f.write(text)
                os.rename(self.path + '.new', self.path)


def read_stats(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {'sent': 0, 'statuses': {}}


def admin_request(auth):
    """An admin GET of /running.txt; auth: the Authorization value, or '-' for none."""
    header = '' if auth == '-' else 'Authorization: %s\r\n' % auth
    return ('GET /running.txt HTTP/1.0\r\n%s\r\n' % header).encode()


WRONG_PASSWORD = 'Basic ' + base64.b64encode(b'admin:wrong password').decode()


def serve_flood(port, clients, addresses, stats_path=''):
    """`clients` threads, each sending wrong-password admin requests as fast as answers come,
    from the given source addresses in turn (a comma-separated list)."""
    sources = addresses.split(',')
    request = admin_request(WRONG_PASSWORD)
    stats = FloodStats(stats_path)

    def attacker(source):
        while True:
            data = b''
            try:
                sock = socket.socket()
                sock.bind((source, 0))
                sock.settimeout(30)
                sock.connect(('127.0.0.1', port))
                sock.sendall(request)
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            except OSError:
                time.sleep(0.01)
            finally:
                sock.close()
            stats.answered(data)
    for i in range(clients):
        threading.Thread(target=attacker, args=(sources[i % len(sources)],), daemon=True).start()
    stats.write_forever()


def serve_paced(port, rate, source, auth, stats_path=''):
    """`rate` admin requests a second from one address, each on a new connection, sent on
    time however slowly they are answered (at most 5,000 open at once).  One thread."""
    request = admin_request(auth)
    stats = FloodStats(stats_path)
    threading.Thread(target=stats.write_forever, daemon=True).start()
    selector = selectors.DefaultSelector()
    interval = 1.0 / rate
    next_at = time.monotonic()
    while True:
        now = time.monotonic()
        while next_at <= now:
            next_at += interval
            if len(selector.get_map()) >= 5000:
                continue
            sock = socket.socket()
            sock.setblocking(False)
            try:
                sock.bind((source, 0))
                sock.connect_ex(('127.0.0.1', port))
            except OSError:
                sock.close()
                continue
            stats.sent += 1
            selector.register(sock, selectors.EVENT_WRITE, [b''])
        for key, mask in selector.select(max(0.0, next_at - time.monotonic())):
            sock, got = key.fileobj, key.data
            try:
                if mask & selectors.EVENT_WRITE:
                    sock.send(request)
                    selector.modify(sock, selectors.EVENT_READ, got)
                    continue
                chunk = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                chunk = b''
            if chunk:
                got[0] += chunk
                continue
            selector.unregister(sock)
            sock.close()
            stats.answered(got[0])


def serve(argv):
    kind = argv[0]
    if kind == 'answer':
        serve_answer(int(argv[1]))
    elif kind == 'stream':
        serve_stream(int(argv[1]), argv[2] == 'request')
    elif kind == 'flood':
        serve_flood(int(argv[1]), int(argv[2]), argv[3], *argv[4:])
    elif kind == 'paced':
        serve_paced(int(argv[1]), float(argv[2]), argv[3], argv[4], *argv[5:])
    raise SystemExit('unknown helper %r' % kind)


# ---------------------------------------------------------------------------
# Running things
# ---------------------------------------------------------------------------

class Run(object):
    """Everything one measurement starts, in a temp dir; stop() kills it all."""

    def __init__(self, python):
        self.python = python
        self.dir = tempfile.mkdtemp(prefix='pydirector-hardening-')
        self.procs = []

    def helper(self, *args):
        proc = subprocess.Popen([self.python, os.path.abspath(__file__), '--serve'] + [str(a) for a in args],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def balancer(self, tree, xml):
        self.config = os.path.join(self.dir, 'live.xml')
        with open(self.config, 'w') as f:
            f.write(xml)
        self.log_path = os.path.join(self.dir, 'balancer.log')
        log = open(self.log_path, 'wb')
        proc = subprocess.Popen([self.python, os.path.join(tree, 'pydirector.py'), '-c', self.config],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)
        log.close()
        self.procs.append(proc)
        self.proc = proc
        return proc

    def log(self):
        with open(self.log_path, 'rb') as f:
            return f.read().decode('utf-8', 'replace')

    def stop(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def wait_listening(port, proc=None, timeout=15):
    if processes.wait_listening(port, timeout, proc):
        return
    if proc is not None and proc.poll() is not None:
        raise RuntimeError('exited with %s before listening on %d' % (proc.returncode, port))
    raise RuntimeError('nothing listens on %d after %g s' % (port, timeout))


def request(port, timeout=5.0):
    """One request through the balancer; its latency in seconds, or None if it failed."""
    start = time.perf_counter()
    try:
        sock = socket.create_connection(('127.0.0.1', port), timeout=timeout)
        try:
            sock.sendall(REQUEST)
            data = b''
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        finally:
            sock.close()
    except OSError:
        return None
    return time.perf_counter() - start if data == ANSWER else None


def paced(port, seconds, rate):
    """Requests at a steady `rate` a second (as a service with spare capacity sees them):
    (answered, failed, latencies, seconds it took)."""
    latencies, failed = [], 0
    start = time.monotonic()
    for i in range(int(seconds * rate)):
        delay = start + i / float(rate) - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        latency = request(port)
        if latency is None:
            failed += 1
        else:
            latencies.append(latency)
    return len(latencies), failed, latencies, time.monotonic() - start


def back_to_back(port, seconds):
    """Requests one after the other for `seconds`: (answered, failed, latencies)."""
    latencies, failed = [], 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        latency = request(port)
        if latency is None:
            failed += 1
        else:
            latencies.append(latency)
    return len(latencies), failed, latencies


def percentile(values, p):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100.0 * (len(values) - 1))))]


def service(name, port, hosts, extra='', scheduler='roundrobin'):
    lines = ''.join('      <host name="%s" ip="%s"/>\n' % h for h in hosts)
    return ('  <service name="%s">\n    <listen ip="127.0.0.1:%d"/>\n    <group name="main" scheduler="%s">\n'
            '%s    </group>\n%s  </service>\n' % (name, port, scheduler, lines, extra))


def pdconfig(*parts, workers=None):
    root = '<pdconfig workers="%s">' % workers if workers else '<pdconfig>'
    return '%s\n%s  <logging access="off"/>\n</pdconfig>\n' % (root, ''.join(parts))


def wait_for_line(run, text, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in run.log():
            return True
        time.sleep(0.05)
    return False


def stop_time(proc, limit=10.0):
    """SIGTERM, then the seconds until it exited (or a text: still running after limit, killed)."""
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        return 'no exit in %g s' % limit
    return time.monotonic() - start


# ---------------------------------------------------------------------------
# 1. reload: a FIFO, /dev/zero, a 12,000-host file
# ---------------------------------------------------------------------------

def reload_fifo(tree, python):
    run = Run(python)
    try:
        backend_port, listen = free_port(), free_port()
        run.helper('answer', backend_port)
        wait_listening(backend_port)
        proc = run.balancer(tree, pdconfig(service('web', listen, [('one', '127.0.0.1:%d' % backend_port)])))
        wait_listening(listen, proc)
        os.unlink(run.config)
        os.mkfifo(run.config)
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        answered = sum(request(listen, timeout=1.0) is not None for _ in range(10))
        return {'answered': answered, 'asked': 10, 'sigterm_s': stop_time(proc)}
    finally:
        run.stop()


def reload_dev_zero(tree, python):
    run = Run(python)
    try:
        backend_port, listen = free_port(), free_port()
        run.helper('answer', backend_port)
        wait_listening(backend_port)
        proc = run.balancer(tree, pdconfig(service('web', listen, [('one', '127.0.0.1:%d' % backend_port)])))
        wait_listening(listen, proc)
        before = rss_bytes(proc.pid)
        os.unlink(run.config)
        os.symlink('/dev/zero', run.config)
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        grown = rss_bytes(proc.pid) - before
        answered = sum(request(listen, timeout=1.0) is not None for _ in range(5))
        return {'rss_growth_mb_per_s': grown / 1e6, 'answered': answered, 'asked': 5}
    finally:
        run.stop()


def reload_big(tree, python, hosts=12000):
    run = Run(python)
    try:
        backend_port, listen, big_listen = free_port(), free_port(), free_port()
        run.helper('answer', backend_port)
        wait_listening(backend_port)
        web = service('web', listen, [('one', '127.0.0.1:%d' % backend_port)])
        proc = run.balancer(tree, pdconfig(web))
        wait_listening(listen, proc)
        many = [('h%d' % i, '10.%d.%d.%d:80' % (i >> 16, (i >> 8) & 255, i & 255)) for i in range(hosts)]
        with open(run.config + '.new', 'w') as f:
            f.write(pdconfig(web, service('big', big_listen, many)))
        os.rename(run.config + '.new', run.config)
        results = {}
        stop = threading.Event()

        def client():
            latencies, failed = [], 0
            while not stop.is_set():
                latency = request(listen, timeout=60)
                if latency is None:
                    failed += 1
                else:
                    latencies.append(latency)
            results['latencies'], results['failed'] = latencies, failed
        thread = threading.Thread(target=client)
        thread.start()
        time.sleep(0.5)
        start = time.monotonic()
        proc.send_signal(signal.SIGHUP)
        done = wait_for_line(run, 'reloaded %s' % run.config, 300)
        took = time.monotonic() - start
        time.sleep(0.5)
        stop.set()
        thread.join(120)
        latencies = results['latencies']
        return {'reload_s': took if done else None, 'longest_stall_ms': 1000 * max(latencies),
                'p99_ms': 1000 * percentile(latencies, 99), 'requests': len(latencies), 'failed': results['failed']}
    finally:
        run.stop()


# ---------------------------------------------------------------------------
# 2. probe: an unrelated service while a streaming backend is health-checked
# ---------------------------------------------------------------------------

def probe_load(tree, python, streaming, seconds=6.0):
    run = Run(python)
    try:
        backend_port, stream_port, listen, checked_listen = free_port(), free_port(), free_port(), free_port()
        run.helper('answer', backend_port)
        run.helper('stream', stream_port, 'request')
        wait_listening(backend_port)
        wait_listening(stream_port)
        target = stream_port if streaming else backend_port
        check = ('    <check interval="1" timeout="2" send="GET / HTTP/1.0\\r\\n\\r\\n" expect="200"/>\n')
        proc = run.balancer(tree, pdconfig(service('web', listen, [('one', '127.0.0.1:%d' % backend_port)]),
                                           service('checked', checked_listen, [('s', '127.0.0.1:%d' % target)],
                                                   extra=check)))
        wait_listening(listen, proc)
        time.sleep(1.5)         # the first probes are under way (spread over the first interval)
        cpu = cpu_seconds(proc.pid)
        answered, failed, latencies = back_to_back(listen, seconds)
        return {'conn_per_s': answered / seconds, 'p99_ms': 1000 * percentile(latencies, 99), 'failed': failed,
                'balancer_cpu': (cpu_seconds(proc.pid) - cpu) / seconds}
    finally:
        run.stop()


# ---------------------------------------------------------------------------
# 3. password: the data plane during a flood of wrong admin passwords
# ---------------------------------------------------------------------------

def password_hash(tree, python):
    result = subprocess.run([python, os.path.join(tree, 'pydirector.py'), '--hash-password'],
                            input=PASSWORD + '\n', stdout=subprocess.PIPE, universal_newlines=True, timeout=60)
    return result.stdout.strip()


def data_plane(port, seconds):
    """Back-to-back requests for `seconds`, then paced ones: the figures of both."""
    answered, failed, latencies = back_to_back(port, seconds)
    figures = {'back-to-back req/s': answered / seconds, 'back-to-back p50_ms': 1000 * percentile(latencies, 50)}
    answered, paced_failed, latencies, took = paced(port, seconds, PACED_RATE)
    figures.update({'paced req/s': answered / took, 'paced p50_ms': 1000 * percentile(latencies, 50),
                    'failed': failed + paced_failed})
    return figures


def admin_balancer(run, tree, stored, workers=None):
    """A balancer with service web (one backend that answers) and an admin: (listen port, admin port)."""
    backend_port, listen, admin_port = free_port(), free_port(), free_port()
    run.helper('answer', backend_port)
    wait_listening(backend_port)
    admin = ('  <admin listen="127.0.0.1:%d">\n    <user name="admin" password="%s" access="full"/>\n'
             '  </admin>\n' % (admin_port, stored))
    proc = run.balancer(tree, pdconfig(service('web', listen, [('one', '127.0.0.1:%d' % backend_port)]), admin,
                                       workers=workers))
    wait_listening(listen, proc)
    wait_listening(admin_port, proc)
    return listen, admin_port


def compare_data_plane(quiet, flood):
    """Figures of the data plane without and with a flood, and their ratios."""
    figures = {}
    for key in quiet:
        figures['no flood: ' + key] = quiet[key]
        figures['flood: ' + key] = flood[key]
    for key in ('back-to-back req/s', 'paced req/s'):
        figures['flood/no flood: ' + key] = flood[key] / quiet[key] if quiet[key] else None
    return figures


def password_flood(tree, python, stored, clients, addresses, seconds=5.0):
    """The data plane without a flood, then (same balancer) with one: both, and their ratio."""
    run = Run(python)
    try:
        listen, admin_port = admin_balancer(run, tree, stored)
        quiet = data_plane(listen, seconds)
        run.helper('flood', admin_port, clients, ','.join(addresses))
        time.sleep(2.0)     # the flood in full swing (and past the first five failures)
        cpu = cpu_seconds(run.proc.pid)
        flood = data_plane(listen, seconds)
        figures = {'balancer_cpu in the flood': (cpu_seconds(run.proc.pid) - cpu) / (2 * seconds)}
        figures.update(compare_data_plane(quiet, flood))
        return figures
    finally:
        run.stop()


# ---------------------------------------------------------------------------
# 6. Issue 25: floods of the admin (F5: wrong passwords from many addresses,
#    F6: requests without credentials from one), with /healthz and an operator
# ---------------------------------------------------------------------------

def admin_get(port, path, auth=None, timeout=5.0):
    """(status or None, seconds) of one admin GET from 127.0.0.1."""
    start = time.monotonic()
    try:
        sock = socket.create_connection(('127.0.0.1', port), timeout=timeout)
        try:
            header = 'Authorization: %s\r\n' % auth if auth else ''
            sock.sendall(('GET %s HTTP/1.0\r\n%s\r\n' % (path, header)).encode())
            data = b''
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        finally:
            sock.close()
        status = int(data[9:12]) if data[:5] == b'HTTP/' else None
    except (OSError, ValueError):
        status = None
    return status, time.monotonic() - start


class Poller(object):
    """A GET of path once a second, in a thread, as keepalived checks /healthz: each (status, seconds)."""

    def __init__(self, port, path, auth=None):
        self.results = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, args=(port, path, auth), daemon=True)
        self.thread.start()

    def run(self, port, path, auth):
        next_at = time.monotonic()
        while not self.stop.is_set():
            self.results.append(admin_get(port, path, auth))
            next_at += 1.0
            self.stop.wait(max(0.0, next_at - time.monotonic()))

    def figures(self, name):
        self.stop.set()
        self.thread.join(10)
        good = [took for status, took in self.results if status == 200 and took <= 1.0]
        return {'%s: asked' % name: len(self.results), '%s: 200 within 1 s' % name: len(good),
                '%s: slowest s' % name: max(took for _, took in self.results) if self.results else None}


def flood_figures(stats, seconds):
    """A flood's answers a second and its share of each status (from a FloodStats file)."""
    total = sum(stats['statuses'].values())
    figures = {'flood: answers/s': total / seconds}
    for status, count in stats['statuses'].items():
        figures['flood: share %s' % status] = count / float(total)
    return figures


def f5_flood(tree, python, stored, workers, seconds=5.0, clients=150, addresses=100):
    """Issue 25 F5: wrong passwords from `clients` clients over `addresses` addresses; /healthz
    and a logged-in operator polled once a second from its start; the data plane after 2 s."""
    run = Run(python)
    try:
        listen, admin_port = admin_balancer(run, tree, stored, workers)
        operator = 'Basic ' + base64.b64encode(('admin:' + PASSWORD).encode()).decode()
        if admin_get(admin_port, '/running.txt', operator, timeout=30)[0] != 200:    # logged in: cached
            raise RuntimeError('the operator cannot log in')
        quiet = data_plane(listen, seconds)
        stats_path = os.path.join(run.dir, 'flood.json')
        sources = ['127.0.%d.%d' % (1 + i // 250, 1 + i % 250) for i in range(addresses)]
        run.helper('flood', admin_port, clients, ','.join(sources), stats_path)
        started = time.monotonic()
        pollers = Poller(admin_port, '/healthz'), Poller(admin_port, '/running.txt', operator)
        time.sleep(2.0)     # the flood in full swing
        flood = data_plane(listen, seconds)
        time.sleep(1.0)     # a last flood stats write
        figures = pollers[0].figures('healthz')
        figures.update(pollers[1].figures('operator'))
        figures.update(compare_data_plane(quiet, flood))
        figures.update(flood_figures(read_stats(stats_path), time.monotonic() - started))
        return figures
    finally:
        run.stop()


def log_lines_about(run, address, start_at):
    """Lines of the balancer's log after byte start_at that name address."""
    with open(run.log_path, 'rb') as f:
        f.seek(start_at)
        return [line for line in f.read().decode('utf-8', 'replace').splitlines() if address in line]


def f6_flood(tree, python, stored, auth, workers, seconds=5.0, rate=1000, source='127.0.0.2'):
    """Issue 25 F6: `rate` admin GETs a second from one address (auth: '-' none), paced;
    the data plane against no flood, the answers, and the log lines about that address."""
    run = Run(python)
    try:
        listen, admin_port = admin_balancer(run, tree, stored, workers)
        quiet = data_plane(listen, seconds)
        stats_path = os.path.join(run.dir, 'flood.json')
        log_at = os.path.getsize(run.log_path)
        started = time.monotonic()
        run.helper('paced', admin_port, rate, source, auth, stats_path)
        time.sleep(2.0)     # the flood in full swing (and past the first five failures)
        flood = data_plane(listen, seconds)
        time.sleep(1.0)     # a last flood stats write
        took = time.monotonic() - started
        figures = compare_data_plane(quiet, flood)
        stats = read_stats(stats_path)
        figures['flood: sent/s'] = stats['sent'] / took
        figures.update(flood_figures(stats, took))
        figures['log lines about it per 10 s'] = 10 * len(log_lines_about(run, source, log_at)) / took
        return figures
    finally:
        run.stop()


# ---------------------------------------------------------------------------
# 5. pipes: slow readers of bulk downloads
# ---------------------------------------------------------------------------

def pipe_figures(pid):
    """(pipes, capacity bytes, bytes held, fds) of a process, from /proc/PID/fd."""
    seen = {}
    fds = 0
    for name in os.listdir('/proc/%d/fd' % pid):
        fds += 1
        path = '/proc/%d/fd/%s' % (pid, name)
        try:
            target = os.readlink(path)
        except OSError:
            continue
        if not target.startswith('pipe:') or target in seen:
            continue
        try:
            # Opens the same pipe (not the fd): a reader that never reads, closed at once.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            size = fcntl.fcntl(fd, F_GETPIPE_SZ)
            held = struct.unpack('i', fcntl.ioctl(fd, termios.FIONREAD, b'\0\0\0\0'))[0]
        finally:
            os.close(fd)
        seen[target] = (size, held)
    sizes = [s for s, _ in seen.values()]
    return len(seen), sum(sizes), sum(h for _, h in seen.values()), fds


def slow_readers(tree, python, clients=20, read=3 << 20):
    run = Run(python)
    socks = []
    try:
        stream_port, listen = free_port(), free_port()
        run.helper('stream', stream_port, 'none')
        wait_listening(stream_port)
        proc = run.balancer(tree, pdconfig(service('bulk', listen, [('s', '127.0.0.1:%d' % stream_port)])))
        wait_listening(listen, proc)
        fds_before = len(os.listdir('/proc/%d/fd' % proc.pid))
        rss_before = rss_bytes(proc.pid)
        for _ in range(clients):
            sock = socket.create_connection(('127.0.0.1', listen), timeout=30)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            socks.append(sock)
        for sock in socks:
            got = 0
            while got < read:
                got += len(sock.recv(min(65536, read - got)))
        # Now nobody reads: wait until what the balancer holds stops growing.
        last, steady = None, 0
        deadline = time.monotonic() + 20
        while steady < 4 and time.monotonic() < deadline:
            time.sleep(0.25)
            now = pipe_figures(proc.pid)
            steady = steady + 1 if now == last else 0
            last = now
        pipes, capacity, held, fds = last
        return {'pipes': pipes, 'pipe_capacity_mb': capacity / 1e6, 'pipe_held_mb': held / 1e6,
                'fds_added': fds - fds_before, 'rss_growth_mb': (rss_bytes(proc.pid) - rss_before) / 1e6}
    finally:
        for sock in socks:
            sock.close()
        run.stop()


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------

def show(value):
    if value is None:
        return '-'
    if isinstance(value, float):
        return '%.3g' % value if abs(value) < 1000 else '%.0f' % value
    return str(value)


def ratio(old, new):
    if isinstance(old, (int, float)) and isinstance(new, (int, float)) and old:
        return '%.3g' % (new / float(old))
    return ''


def median(values):
    """The median of the numbers; a run's text ('killed after 10 s') or None (no figure) wins."""
    for value in values:
        if not isinstance(value, (int, float)):
            return value
    return statistics.median(values) if values else None


def measure(items, olds, new, python, rounds):
    """olds: item name -> the old tree for it."""
    rows = []   # (item, what, old, new)

    def pair(item, label, fn, *args):
        """Old then new, `rounds` times over; each figure is the median of its rounds."""
        old = olds[item.split()[1]]     # '3 password': the old tree of item password
        runs = {old: [], new: []}
        for round_ in range(rounds):
            for tree in (old, new):
                print('%s: %s (round %d, %s) ...' % (item, label, round_ + 1, 'old' if tree == old else 'new'),
                      file=sys.stderr)
                try:
                    runs[tree].append(fn(tree, python, *args))
                except Exception as e:   # one failed setup should not lose the rest of the table
                    print('  failed: %s' % e, file=sys.stderr)
                    runs[tree].append({})
        keys = sorted(set().union(*[set(r) for r in runs[old] + runs[new]]))
        for key in keys:
            rows.append((item, '%s: %s' % (label, key), median([r.get(key) for r in runs[old]]),
                         median([r.get(key) for r in runs[new]])))

    if 'reload' in items:
        pair('1 reload', 'SIGHUP onto a FIFO', reload_fifo)
        pair('1 reload', 'SIGHUP onto /dev/zero', reload_dev_zero)
        pair('1 reload', 'SIGHUP of a 12,000-host file', reload_big)
    if 'probe' in items:
        pair('2 probe', 'no streaming backend', probe_load, False)
        pair('2 probe', 'streaming backend checked', probe_load, True)
    if set(items) & {'password', 'f5', 'f6'}:
        stored = password_hash(new, python)
    if 'password' in items:
        pair('3 password', '64 clients, one address', password_flood, stored, 64, ['127.0.0.1'])
        pair('3 password', '64 clients, 64 addresses', password_flood, stored, 64,
             ['127.0.%d.%d' % (1 + i // 250, 1 + i % 250) for i in range(64)])
    if 'pipes' in items:
        pair('5 pipes', '20 readers stopped after 3 MiB', slow_readers)
    for workers, mode in ((None, 'one process'), (2, 'workers="2"')):
        if 'f5' in items:
            pair('6 f5', '150 clients, 100 addresses, wrong passwords; %s' % mode, f5_flood, stored, workers)
        if 'f6' in items:
            pair('6 f6', '1,000/s from one address, no credentials; %s' % mode, f6_flood, stored, '-', workers)
            pair('6 f6', "1,000/s from one address, 'Basic !!'; %s" % mode, f6_flood, stored, 'Basic !!', workers)
    return rows


def table(rows, old, new):
    lines = ['| item | figure | old (%s) | new (%s) | new/old |' % (old, new), '|---|---|---|---|---|']
    for item, what, a, b in rows:
        lines.append('| %s | %s | %s | %s | %s |' % (item, what, show(a), show(b), ratio(a, b)))
    return '\n'.join(lines)


def old_tree(commit):
    path = tempfile.mkdtemp(prefix='pydirector-old-')
    archive = subprocess.Popen(['git', '-C', REPO, 'archive', commit], stdout=subprocess.PIPE)
    subprocess.run(['tar', '-x', '-C', path], stdin=archive.stdout, check=True, timeout=60)
    archive.stdout.close()
    if archive.wait(60) != 0:
        raise SystemExit('git archive %s failed' % commit)
    return path


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ['--serve']:
        serve(argv[1:])
        return 0
    p = argparse.ArgumentParser(description='Before/after figures for issue 17 (hardening).')
    p.add_argument('--old', help='a checkout with the old pydirector.py, for every item (default: --old-commit)')
    p.add_argument('--old-commit', help='the commit before the fixes, for every item (default: each '
                   "item's own: %s)" % ', '.join('%s %s' % kv for kv in sorted(OLD_COMMITS.items())))
    p.add_argument('--new', default=REPO, help='the checkout with the fixes (default: this one)')
    p.add_argument('--python', default=sys.executable, help='the Python that runs everything (3.10+ for splice)')
    p.add_argument('--only', help='comma-separated: ' + ','.join(ITEMS))
    p.add_argument('--rounds', type=int, default=3, help='old/new pairs per figure, medians reported (default 3)')
    p.add_argument('--json', help='also write the rows here')
    args = p.parse_args(argv)
    items = args.only.split(',') if args.only else ITEMS
    for item in items:
        if item not in ITEMS:
            p.error('unknown item %r' % item)
    commits = dict((item, args.old or args.old_commit or OLD_COMMITS[item]) for item in items)
    trees = {}      # commit (or --old) -> its tree
    try:
        for commit in set(commits.values()):
            trees[commit] = args.old or old_tree(commit)
        rows = measure(items, dict((item, trees[commits[item]]) for item in items), args.new, args.python,
                       args.rounds)
    finally:
        if not args.old:
            for tree in trees.values():
                shutil.rmtree(tree, ignore_errors=True)
    print(table(rows, ', '.join(sorted(set(commits.values()))), 'this checkout' if args.new == REPO else args.new))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump([{'item': i, 'figure': w, 'old': a, 'new': b} for i, w, a, b in rows], f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
