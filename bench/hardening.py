#!/usr/bin/env python3
"""Before/after figures for issue 17 (hardening), measured as the issue describes.
Run by hand, from the repo root:

    python3 bench/hardening.py                        old = commit cdbcd1a, new = this checkout
    python3 bench/hardening.py --only reload,pipes    some of: reload, probe, password, pipes
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
  its file descriptors.

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
ITEMS = ('reload', 'probe', 'password', 'pipes')
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


def serve_flood(port, clients, addresses):
    """`clients` threads, each sending wrong-password admin requests as fast as answers come,
    from the given source addresses in turn (a comma-separated list)."""
    sources = addresses.split(',')
    auth = 'Basic ' + base64.b64encode(b'admin:wrong password').decode()
    request = ('GET /running.txt HTTP/1.0\r\nAuthorization: %s\r\n\r\n' % auth).encode()

    def attacker(source):
        while True:
            try:
                sock = socket.socket()
                sock.bind((source, 0))
                sock.settimeout(30)
                sock.connect(('127.0.0.1', port))
                sock.sendall(request)
                while sock.recv(65536):
                    pass
            except OSError:
                time.sleep(0.01)
            finally:
                sock.close()
    for i in range(clients):
        threading.Thread(target=attacker, args=(sources[i % len(sources)],), daemon=True).start()
    while True:
        time.sleep(3600)


def serve(argv):
    kind = argv[0]
    if kind == 'answer':
        serve_answer(int(argv[1]))
    elif kind == 'stream':
        serve_stream(int(argv[1]), argv[2] == 'request')
    elif kind == 'flood':
        serve_flood(int(argv[1]), int(argv[2]), argv[3])
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


def free_port():
    sock = socket.socket()
    sock.bind(('127.0.0.1', 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def wait_listening(port, proc=None, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError('exited with %s before listening on %d' % (proc.returncode, port))
        try:
            socket.create_connection(('127.0.0.1', port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)
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


def pdconfig(*parts):
    return '<pdconfig>\n%s  <logging access="off"/>\n</pdconfig>\n' % ''.join(parts)


def cpu_seconds(pid):
    with open('/proc/%d/stat' % pid) as f:
        fields = f.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / float(os.sysconf('SC_CLK_TCK'))


def rss_bytes(pid):
    with open('/proc/%d/status' % pid) as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) * 1024
    return 0


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


def password_flood(tree, python, stored, clients, addresses, seconds=5.0):
    """The data plane without a flood, then (same balancer) with one: both, and their ratio."""
    run = Run(python)
    try:
        backend_port, listen, admin_port = free_port(), free_port(), free_port()
        run.helper('answer', backend_port)
        wait_listening(backend_port)
        admin = ('  <admin listen="127.0.0.1:%d">\n    <user name="admin" password="%s" access="full"/>\n'
                 '  </admin>\n' % (admin_port, stored))
        proc = run.balancer(tree, pdconfig(service('web', listen, [('one', '127.0.0.1:%d' % backend_port)]), admin))
        wait_listening(listen, proc)
        wait_listening(admin_port, proc)
        quiet = data_plane(listen, seconds)
        run.helper('flood', admin_port, clients, ','.join(addresses))
        time.sleep(2.0)     # the flood in full swing (and past the first five failures)
        cpu = cpu_seconds(proc.pid)
        flood = data_plane(listen, seconds)
        figures = {'balancer_cpu in the flood': (cpu_seconds(proc.pid) - cpu) / (2 * seconds)}
        for key in quiet:
            figures['no flood: ' + key] = quiet[key]
            figures['flood: ' + key] = flood[key]
        for key in ('back-to-back req/s', 'paced req/s'):
            figures['flood/no flood: ' + key] = flood[key] / quiet[key] if quiet[key] else None
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


def measure(items, old, new, python, rounds):
    rows = []   # (item, what, old, new)

    def pair(item, label, fn, *args):
        """Old then new, `rounds` times over; each figure is the median of its rounds."""
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
    if 'password' in items:
        stored = password_hash(new, python)
        pair('3 password', '64 clients, one address', password_flood, stored, 64, ['127.0.0.1'])
        pair('3 password', '64 clients, 64 addresses', password_flood, stored, 64,
             ['127.0.%d.%d' % (1 + i // 250, 1 + i % 250) for i in range(64)])
    if 'pipes' in items:
        pair('5 pipes', '20 readers stopped after 3 MiB', slow_readers)
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
    p.add_argument('--old', help='a checkout with the old pydirector.py (default: --old-commit)')
    p.add_argument('--old-commit', default='cdbcd1a', help='the commit before the fixes (default cdbcd1a)')
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
    old = args.old or old_tree(args.old_commit)
    try:
        rows = measure(items, old, args.new, args.python, args.rounds)
    finally:
        if not args.old:
            shutil.rmtree(old, ignore_errors=True)
    print(table(rows, args.old or args.old_commit, 'this checkout' if args.new == REPO else args.new))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump([{'item': i, 'figure': w, 'old': a, 'new': b} for i, w, a, b in rows], f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
