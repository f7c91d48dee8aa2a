#!/usr/bin/env python3
"""Issue 25 F4: a log target that takes no more lines must not stop the data plane.
Run by hand, from the repo root:

    python3 bench/stuck_logs.py                          stderr, syslog and a full disk; one process, then 2 workers
    python3 bench/stuck_logs.py --target stderr --workers 0 --clients 800
    python3 bench/stuck_logs.py --tree DIR               the pydirector.py of another checkout

Each run starts a backend (echo) and `pydirector.py -c FILE` (with an admin) whose log
goes where nobody takes it:

- stderr: a pipe this script never reads (until the clients are done);
- syslog: <logging syslog="DIR/log">, a unix datagram socket bound and never read;
- full: <logging file="/dev/full">, every write fails with ENOSPC (stderr to a file).

Then --clients clients (--concurrency at a time, each within --timeout seconds) send
a few bytes and must get them back.  The host's name is --name-length characters long,
so that each access line is ~3.7 KB and the lines overflow the 1 MiB each process may
hold: some must be dropped.  Reported: clients served; the dropped count
(pydirector_log_lines_dropped_total on /metrics); for stderr and syslog, once the
target is read again, the access lines that arrived and the counts the "N line(s)
dropped" lines give, which must add up to the clients served; for full, the error
lines on stderr and whether any traceback was printed.  Stdlib only.
"""

import argparse
import base64
import http.client
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.append(os.path.join(REPO, 'tools'))
from processes import accepts, free_port  # noqa: E402
TARGETS = ('stderr', 'syslog', 'full')
PASSWORD = 'bench'
DROPPED = re.compile(r'log to [^:]*: (\d+) line\(s\) dropped')


def echo_server():
    """A thread per connection: echo until EOF.  Returns (port, stop)."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(('127.0.0.1', 0))
    listener.listen(1024)

    def serve(conn):
        with conn:
            conn.settimeout(30)
            try:
                while True:
                    data = conn.recv(65536)
                    if not data:
                        break
                    conn.sendall(data)
            except OSError:
                pass

    def run():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()
    threading.Thread(target=run, daemon=True).start()
    return listener.getsockname()[1], listener.close


def exchange(port, timeout):
    try:
        with socket.create_connection(('127.0.0.1', port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(b'ping')
            sock.shutdown(socket.SHUT_WR)
            got = b''
            while True:
                data = sock.recv(4096)
                if not data:
                    break
                got += data
            return got == b'ping'
    except OSError:
        return False


def run_clients(port, count, concurrency, timeout, deadline):
    """(served, failed): `count` exchanges, `concurrency` at a time; any not done by deadline failed."""
    lock = threading.Lock()
    state = {'next': 0, 'ok': 0}

    def worker():
        while time.monotonic() < deadline:
            with lock:
                if state['next'] >= count:
                    return
                state['next'] += 1
            if exchange(port, timeout):
                with lock:
                    state['ok'] += 1
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + timeout + 1)
    return state['ok'], count - state['ok']


def metric(admin_port, name):
    """The value of one sample on /metrics, or None (absent, or no answer)."""
    auth = 'Basic ' + base64.b64encode(('admin:' + PASSWORD).encode()).decode()
    conn = http.client.HTTPConnection('127.0.0.1', admin_port, timeout=10)
    try:
        conn.request('GET', '/metrics', headers={'Authorization': auth})
        body = conn.getresponse().read().decode()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()
    for line in body.splitlines():
        if line.startswith(name + ' '):
            return int(float(line.split()[1]))
    return None


class Reader(object):
    """Reads what the balancer logs once asked to (a pipe or a datagram socket), counting
    access lines and the drops the notes tell of."""

    def __init__(self, fd=None, sock=None):
        self.fd = fd
        self.sock = sock
        self.rest = b''
        self.access = 0
        self.noted = 0
        self.lines = 0

    def take(self, quiet=2.0, limit=60.0):
        """Read until nothing came for `quiet` seconds (or `limit` passed)."""
        end = time.monotonic() + limit
        fileno = self.fd if self.fd is not None else self.sock.fileno()
        while time.monotonic() < end:
            ready, _, _ = select.select([fileno], [], [], quiet)
            if not ready:
                return
            if self.sock is not None:
                self.count(self.sock.recv(1 << 17).rstrip(b'\0') + b'\n')
            else:
                data = os.read(self.fd, 1 << 17)
                if not data:
                    return
                self.count(data)

    def count(self, data):
        lines = (self.rest + data).split(b'\n')
        self.rest = lines.pop()
        for raw in lines:
            self.lines += 1
            line = raw.decode('utf-8', 'replace')
            if ' access service=web ' in line:
                self.access += 1
            match = DROPPED.search(line)
            if match:
                self.noted += int(match.group(1))


def run(tree, python, target, workers, clients, concurrency, timeout, name_length):
    work = tempfile.mkdtemp(prefix='pydirector-stuck-logs-')
    backend_port, stop_backend = echo_server()
    port, admin_port = free_port(), free_port()
    stored = subprocess.run([python, os.path.join(tree, 'pydirector.py'), '--hash-password'],
                            input=PASSWORD + '\n', stdout=subprocess.PIPE, universal_newlines=True,
                            check=True).stdout.strip()
    logging_xml = ''
    receiver = None
    if target == 'syslog':
        path = os.path.join(work, 'log')
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        receiver.bind(path)
        logging_xml = '  <logging syslog="%s"/>\n' % path
    elif target == 'full':
        logging_xml = '  <logging file="/dev/full"/>\n'
    config = os.path.join(work, 'stuck.xml')
    with open(config, 'w') as f:
        f.write('<pdconfig%s>\n  <service name="web">\n    <listen ip="127.0.0.1:%d"/>\n'
                '    <group name="main" scheduler="roundrobin">\n'
                '      <host name="%s" ip="127.0.0.1:%d"/>\n    </group>\n  </service>\n'
                '  <admin listen="127.0.0.1:%d">\n    <user name="admin" password="%s" access="full"/>\n'
                '  </admin>\n%s</pdconfig>\n' % (
                    ' workers="%d"' % workers if workers else '', port, 'h' * name_length, backend_port,
                    admin_port, stored, logging_xml))
    stderr_path = os.path.join(work, 'stderr.log')
    read_end = None
    if target == 'stderr':
        read_end, write_end = os.pipe()
        err = write_end
    else:
        err = open(stderr_path, 'wb')
    proc = subprocess.Popen([python, os.path.join(tree, 'pydirector.py'), '-c', config],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, cwd=work)
    if target == 'stderr':
        os.close(write_end)
    else:
        err.close()
    result = {'target': target, 'workers': workers, 'clients': clients}
    try:
        deadline = time.monotonic() + 30
        while not accepts(port) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if workers:
            time.sleep(1.0)     # every worker accepting, not only the first
        started = time.monotonic()
        served, failed = run_clients(port, clients, concurrency, timeout, started + 120)
        result.update(served=served, failed=failed, seconds=time.monotonic() - started,
                      connections=clients + 1)     # and the probe that found it listening: each has its access line
        time.sleep(0.5)         # the last access lines (50 ms batches) and the workers' counters (50 ms ticks)
        result['dropped'] = metric(admin_port, 'pydirector_log_lines_dropped_total')
        reader = None
        if target == 'stderr':
            reader = Reader(fd=read_end)
        elif target == 'syslog':
            reader = Reader(sock=receiver)
        if reader is not None:
            reader.take()
            result.update(access_lines=reader.access, noted=reader.noted)
            result['dropped_after'] = metric(admin_port, 'pydirector_log_lines_dropped_total')
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if reader is not None:
            reader.take(quiet=0.5, limit=10)
            result.update(access_lines=reader.access, noted=reader.noted)
        if target == 'full':
            with open(stderr_path, 'rb') as f:
                text = f.read().decode('utf-8', 'replace')
            result['error_lines'] = len([l for l in text.splitlines() if 'cannot write' in l])
            result['tracebacks'] = text.count('Traceback')
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        stop_backend()
        if read_end is not None:
            os.close(read_end)
        if receiver is not None:
            receiver.close()
        shutil.rmtree(work, True)
    return result


def describe(r):
    text = '%-6s workers=%d: served %d of %d in %.1f s' % (r['target'], r['workers'], r['served'], r['clients'],
                                                        r['seconds'])
    text += '; dropped (metrics) %s' % r.get('dropped')
    if 'access_lines' in r:
        dropped = r.get('dropped_after')
        total = r['access_lines'] + (dropped or 0)
        text += '; after reading: %d access lines + %s dropped = %d of %d connections (%s), notes say %d dropped' % (
            r['access_lines'], dropped, total, r['connections'], 'right' if total == r['connections'] else 'WRONG',
            r['noted'])
    if 'error_lines' in r:
        text += '; stderr: %d error line(s), %d traceback(s)' % (r['error_lines'], r['tracebacks'])
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description='Issue 25 F4: the data plane while the log target takes nothing.')
    p.add_argument('--tree', default=REPO, help='a checkout holding pydirector.py (default: this one)')
    p.add_argument('--python', default=sys.executable, help='the Python that runs pydirector')
    p.add_argument('--target', help='comma-separated: ' + ','.join(TARGETS) + ' (default: all)')
    p.add_argument('--workers', help='comma-separated worker counts, 0 for one process (default: 0,2)')
    p.add_argument('--clients', type=int, default=800)
    p.add_argument('--concurrency', type=int, default=20)
    p.add_argument('--timeout', type=float, default=5.0, help='seconds a client may take (default 5)')
    p.add_argument('--name-length', type=int, default=3500, help='characters of the host name (default 3500)')
    args = p.parse_args(argv)
    targets = args.target.split(',') if args.target else TARGETS
    counts = [int(n) for n in (args.workers or '0,2').split(',')]
    bad = False
    for target in targets:
        for workers in counts:
            r = run(os.path.abspath(args.tree), args.python, target, workers, args.clients, args.concurrency,
                    args.timeout, args.name_length)
            print(describe(r), flush=True)
            bad = bad or r['served'] != r['clients']
    return 1 if bad else 0


if __name__ == '__main__':
    sys.exit(main())
