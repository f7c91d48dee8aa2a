"""Shared test helpers.  Everything listens on 127.0.0.1, on ports from free_port().

In groups, in this order:
- waiting and ports: wait_until, free_port (a block of ports per test process);
- log capture: LOG (every line the balancer logs), WorkerLog (its workers' lines);
- backends: Backend and its handlers (echo, say_name, hold_open, digest_until_eof,
  report_proxy_header, https_say_name), Blackhole, AdoptedBackend, EchoServer,
  TLSBackend with make_cert's certificates;
- balancers: config text (service_xml, config_xml), in this process (Balancer,
  BalancerCase, WorkersMixin, single_process) and as a subprocess (BalancerProcess,
  SpawnedBalancer);
- clients: connect, exchange, recv_all, raw_exchanges, Background, tls_connect,
  tls_exchange;
- /proc and processes: open_fds, accept_queue_length, raise_open_files, and from
  tools/processes.py (which bench/ and tools/ share) accepts, fd_count, thread_count,
  cpu_seconds, cpu_seconds_of, rss_bytes, process_state, child_pids, stop_process;
- external programs and recorded data: need_program, find_binary, ExternalServer,
  openssl_client, curl_client, need_curl_idn, client_hello.
"""

import atexit
import collections
import errno
import fcntl
import functools
import gc
import hashlib
import heapq
import http.client
import logging
import os
import random
import re
import selectors
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.parse

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
TOOLS = os.path.join(REPO, 'tools')
if TOOLS not in sys.path:
    sys.path.append(TOOLS)

import pydirector  # noqa: E402
import processes  # noqa: E402  (tools/processes.py: what bench/ and tools/ use too)
from processes import (accepts, child_pids, cpu_seconds, cpu_seconds_of, fd_count,  # noqa: E402
                       process_state, rss_bytes, stop_process, thread_count)

PYDIRECTOR = os.path.join(REPO, 'pydirector.py')

# What the tests and their children (balancers, Chromium: TMPDIR) put in temporary
# files goes in one directory of this run, removed as it ends: a balancer's log is
# read after it stops, so not sooner.  A run that was killed leaves its directory;
# the next run removes it.  Locks shared with other runs stay in SHARED_TMP.
SHARED_TMP = tempfile.gettempdir()
for _name in os.listdir(SHARED_TMP):
    _match = re.match(r'pydirector-tests-(\d+)-', _name)
    if _match and not pydirector.process_running(int(_match.group(1))):
        shutil.rmtree(os.path.join(SHARED_TMP, _name), ignore_errors=True)
RUN_TMP = tempfile.mkdtemp(prefix='pydirector-tests-%d-' % os.getpid())
tempfile.tempdir = os.environ['TMPDIR'] = RUN_TMP


def _remove_run_tmp(owner=os.getpid()):
    if os.getpid() == owner:    # not in a forked child that exits normally
        shutil.rmtree(RUN_TMP, ignore_errors=True)


atexit.register(_remove_run_tmp)


# -- waiting and ports --------------------------------------------------------

def wait_until(predicate, timeout=5.0, interval=0.005, message=None):
    """Poll predicate until it returns something true; return that, or fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(message or 'timed out waiting for %r' % (predicate,))
        time.sleep(interval)


def _port_block():
    """The block of ports this process hands out: PORT_BLOCK ports below the kernel's
    ephemeral range (which bind(0) and connect() draw from, so no kernel-chosen port
    ever lands in it), claimed with a lock file so that suites running side by side
    (CI runs several Pythons at once) never share a block.  None if every block is taken."""
    try:
        with open('/proc/sys/net/ipv4/ip_local_port_range') as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    first = max(1024, low - PORT_BLOCKS * PORT_BLOCK)
    for start in range(first, low - PORT_BLOCK + 1, PORT_BLOCK):
        path = os.path.join(SHARED_TMP, 'pydirector-test-ports-%d.lock' % start)
        try:
            # Read-only is enough for flock, and works on a file another user made.
            lock = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError:
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock)
            continue
        _port_state['lock'] = lock      # held until the process exits
        return start
    return None


PORT_BLOCK = 500
PORT_BLOCKS = 24
_port_state = {'next': 0}
_port_lock = threading.Lock()


def free_port():
    """A port nothing listens on (connecting to it is refused), and that no other test
    process is handed: from this process's own block (see _port_block), skipping ports
    in use.  Outside any block (all taken), the kernel's choice, as a last resort."""
    with _port_lock:
        if 'start' not in _port_state:
            _port_state['start'] = _port_block()
        start = _port_state['start']
        for _ in range(PORT_BLOCK if start is not None else 0):
            port = start + _port_state['next'] % PORT_BLOCK
            _port_state['next'] += 1
            sock = socket.socket()
            try:
                sock.bind(('127.0.0.1', port))
            except OSError:
                continue        # still used here (a balancer of this process), or by something else
            finally:
                sock.close()
            return port
    return processes.free_port()


_port_state['start'] = _port_block()    # now, so its lock file's fd is there before any test counts fds


# -- log capture --------------------------------------------------------------

class LogRecorder(logging.Handler):
    """Keeps every record the balancer logs, so tests can wait for an exact line."""

    def __init__(self):
        logging.Handler.__init__(self, logging.DEBUG)
        self.lines = []
        self.lines_lock = threading.Lock()

    def emit(self, record):
        with self.lines_lock:
            self.lines.append(record.getMessage())
            if record.exc_info:
                self.lines.append('TRACEBACK ' + self.format(record))

    def add_line(self, text):
        """A line logged by another process (a worker: see WorkerLog)."""
        with self.lines_lock:
            self.lines.append(text)

    def mark(self):
        with self.lines_lock:
            return len(self.lines)

    def since(self, mark=0):
        with self.lines_lock:
            return list(self.lines[mark:])

    def wait_for(self, text, mark=0, timeout=5.0):
        return wait_until(lambda: [l for l in self.since(mark) if text in l], timeout,
                          message='no log line containing %r; got %r' % (text, self.since(mark)[-10:]))


pydirector.lighten_logging()     # what the program's setup_logging does, for the in-process balancers
LOG = LogRecorder()
logging.getLogger('pydirector').addHandler(LOG)
logging.getLogger('pydirector').setLevel(logging.DEBUG)
logging.getLogger('pydirector').propagate = False


class WorkerLog(object):
    """The workers' stderr, in a file: each line they log goes into LOG as if logged
    here ('DATE LEVEL worker N: message' becomes 'message'; a traceback, 'TRACEBACK ...'),
    so tests wait for worker lines as for the master's."""

    LINE = re.compile(r'\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ (?:worker \d+: )?(.*)\Z')

    def __init__(self):
        fd, self.path = tempfile.mkstemp(prefix='pydirector-workers-', suffix='.log')
        os.close(fd)
        self.file = open(self.path, 'ab')       # O_APPEND: every worker's writes land whole
        self.reader = open(self.path, 'rb')
        self.rest = b''
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, name='worker-log', daemon=True)
        self.thread.start()

    def run(self):
        while not self.stopping.wait(0.01):
            self.read()

    def read(self):
        data = self.rest + self.reader.read()
        lines = data.split(b'\n')
        self.rest = lines.pop()
        for raw in lines:
            line = raw.decode('utf-8', 'replace')
            if line.startswith('Traceback (most recent call last)'):
                LOG.add_line('TRACEBACK ' + line)
                continue
            match = self.LINE.match(line)
            if match:
                LOG.add_line(match.group(1))
            elif line and not line.startswith(' '):
                LOG.add_line(line)

    def text(self):
        with open(self.path, 'rb') as f:
            return f.read().decode('utf-8', 'replace')

    def close(self):
        if self.stopping.is_set():
            return
        self.stopping.set()
        self.thread.join(10)
        self.read()
        self.file.close()
        self.reader.close()
        os.unlink(self.path)


# -- backends -----------------------------------------------------------------

class Backend(object):
    """A real TCP server on 127.0.0.1; each connection runs handler(sock, backend) in a thread."""

    def __init__(self, handler, name='backend', family=socket.AF_INET, host='127.0.0.1'):
        self.handler = handler
        self.name = name
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.open = 0
        self.received = []          # what each finished connection sent us, for handlers that record
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.threads = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def address(self):
        return '127.0.0.1:%d' % self.port

    def _serve(self):
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.accepted += 1
                self.open += 1
            t = threading.Thread(target=self._run, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()

    def _run(self, conn):
        try:
            conn.settimeout(30)
            self.handler(conn, self)
        except OSError:
            pass
        finally:
            conn.close()
            with self.lock:
                self.open -= 1

    def close(self):
        self.closed.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(5)


def echo(conn, backend):
    """Echo everything back; pass the client's EOF on as ours."""
    while True:
        data = conn.recv(65536)
        if not data:
            break
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


def say_name(conn, backend):
    """Send our name and close: the reg-test way to see which host a client got."""
    conn.sendall(backend.name.encode())


def hold_open(conn, backend):
    """Keep the connection open until the client closes it."""
    while conn.recv(65536):
        pass


def digest_until_eof(conn, backend):
    """Read to EOF and answer with 'sha256 length'."""
    h = hashlib.sha256()
    n = 0
    while True:
        data = conn.recv(65536)
        if not data:
            break
        h.update(data)
        n += len(data)
    conn.sendall(('%s %d' % (h.hexdigest(), n)).encode())


def proxy_codec():
    """The module holding the PROXY protocol codec."""
    return pydirector


def report_proxy_header(conn, backend):
    """Read a PROXY header (v1 or v2), answer 'PROXY src_ip src_port dst_ip dst_port\\n'
    ('PROXY LOCAL\\n' when it names no addresses, 'BAD reason\\n' when it is malformed),
    then echo the rest of the stream.  The raw header goes to backend.received."""
    codec = proxy_codec()
    data = b''
    while True:
        try:
            result = codec.parse_proxy_header(data, 'any')
        except ValueError as e:
            conn.sendall(('BAD %s\n' % e).encode())
            return
        if result is not None:
            break
        chunk = conn.recv(65536)
        if not chunk:
            conn.sendall(b'BAD no header before EOF\n')
            return
        data += chunk
    consumed, source, dest = result
    with backend.lock:
        backend.received.append(data[:consumed])
    if source is None:
        conn.sendall(b'PROXY LOCAL\n')
    else:
        conn.sendall(('PROXY %s %d %s %d\n' % (source + dest)).encode())
    if data[consumed:]:
        conn.sendall(data[consumed:])
    echo(conn, backend)


def https_say_name(conn, backend):
    """Answer one HTTP request with our name as the body (for curl), then close."""
    head = b''
    while b'\r\n\r\n' not in head and len(head) < 65536:
        chunk = conn.recv(65536)
        if not chunk:
            return
        head += chunk
    body = backend.name.encode()
    conn.sendall(b'HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n'
                 b'Connection: close\r\n\r\n%s' % (len(body), body))


class Blackhole(object):
    """A listening socket whose backlog is full and which never accepts: SYNs go unanswered."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(('127.0.0.1', 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.fillers = []
        # Fill the accept queue; once full, Linux drops further SYNs on the floor.
        for _ in range(8):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(('127.0.0.1', self.port))
            self.fillers.append(s)
        probe = socket.socket()
        probe.settimeout(0.3)
        try:
            probe.connect(('127.0.0.1', self.port))
            raise RuntimeError('the blackhole accepted a connection; backlog not full')
        except socket.timeout:
            pass
        finally:
            probe.close()

    @property
    def address(self):
        return '127.0.0.1:%d' % self.port

    def close(self):
        for s in self.fillers:
            s.close()
        self.sock.close()


class AdoptedBackend(Backend):
    """A Backend serving a listening socket made elsewhere: e.g. a Blackhole's, to bring
    that host back to life on the very same port."""

    def __init__(self, sock, handler, name='backend', backlog=128):
        self.handler = handler
        self.name = name
        self.sock = sock
        self.sock.listen(backlog)   # Linux takes a new backlog on a listening socket
        self.port = sock.getsockname()[1]
        self.accepted = 0
        self.open = 0
        self.received = []
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.threads = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()


class EchoServer(object):
    """An echo backend serving every connection from one selector thread, so hundreds of
    connections cost no threads.  The client's EOF is passed on as ours once all is sent."""

    def __init__(self, host='127.0.0.1', port=0, name='echo'):
        self.name = name
        self.sock = socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(1024)
        self.sock.setblocking(False)
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.open = 0
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.sock, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = socket.socketpair()
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)
        self.conns = {}            # sock -> [pending bytes, client_eof]
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name='echo-server', daemon=True)
        self.thread.start()

    @property
    def address(self):
        return '%s:%d' % (self.host, self.port)

    def _run(self):
        while not self.stopping:
            for key, mask in self.selector.select(0.5):
                if key.fileobj is self.sock:
                    self._accept()
                elif key.fileobj is self._wake_r:
                    return
                else:
                    self._event(key.fileobj, mask)

    def _accept(self):
        for _ in range(64):
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.setblocking(False)
            self.accepted += 1
            self.open += 1
            self.conns[conn] = [b'', False]
            self.selector.register(conn, selectors.EVENT_READ, None)

    def _drop(self, conn):
        self.selector.unregister(conn)
        del self.conns[conn]
        conn.close()
        self.open -= 1

    def _event(self, conn, mask):
        state = self.conns[conn]
        try:
            if mask & selectors.EVENT_READ:
                data = conn.recv(65536)
                if not data:
                    state[1] = True
                else:
                    state[0] += data
            if state[0]:
                sent = conn.send(state[0])
                state[0] = state[0][sent:]
        except BlockingIOError:
            pass
        except OSError:
            self._drop(conn)
            return
        if state[0]:
            self.selector.modify(conn, selectors.EVENT_WRITE, None)
        elif state[1]:
            try:
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self._drop(conn)
        else:
            self.selector.modify(conn, selectors.EVENT_READ, None)

    def close(self):
        self.stopping = True
        try:
            self._wake_w.send(b'x')
        except OSError:
            pass
        self.thread.join(10)
        for conn in list(self.conns):
            conn.close()
        self.conns.clear()
        self.open = 0
        self.selector.close()
        self.sock.close()
        self._wake_r.close()
        self._wake_w.close()


_certs = {}           # name -> (cert path, key path), made once per process
_cert_names = {}      # DER of each certificate -> its name
_cert_lock = threading.Lock()
_cert_dir = []


def make_cert(name):
    """A self-signed certificate for name (CN and subjectAltName DNS:name) and its key,
    made with `openssl req` once per process: (cert_path, key_path).  Skips the test
    when openssl is missing."""
    with _cert_lock:
        if name in _certs:
            return _certs[name]
        openssl = need_program('openssl')
        if not _cert_dir:
            _cert_dir.append(tempfile.mkdtemp(prefix='pydirector-certs-'))
            atexit.register(shutil.rmtree, _cert_dir[0], True)
        base = os.path.join(_cert_dir[0], 'cert%d' % len(_certs))   # names may hold '*'
        cert, key = base + '.pem', base + '.key'
        done = subprocess.run([openssl, 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '30',
                               '-subj', '/CN=' + name, '-addext', 'subjectAltName=DNS:' + name,
                               '-keyout', key, '-out', cert],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
        if done.returncode:
            raise AssertionError('openssl req failed for %r: %s' % (name, done.stdout.decode('utf-8', 'replace')))
        with open(cert) as f:
            _cert_names[ssl.PEM_cert_to_DER_cert(f.read())] = name
        _certs[name] = cert, key
        return _certs[name]


def cert_name(der):
    """The name make_cert made a certificate (DER bytes) for; None for any other."""
    with _cert_lock:
        return _cert_names.get(der)


class TLSBackend(Backend):
    """A TLS server (Python ssl, a thread per connection) on 127.0.0.1.

    names: one name or a list; each gets its certificate from make_cert.  It
    presents the certificate of the name the client asks for (SNI) when that is
    one of names, else of names[0]; then runs handler(tls_sock, backend): echo by
    default, say_name (self.name is names[0]) and https_say_name work too.
    server_names lists the SNI of each handshake (None: the client sent none);
    handshakes counts the ones that succeeded."""

    def __init__(self, names, handler=echo, family=socket.AF_INET, host='127.0.0.1'):
        self.names = [names] if isinstance(names, str) else list(names)
        self.contexts = {}
        for name in self.names:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*make_cert(name))
            self.contexts[name] = context
        self.context = self.contexts[self.names[0]]
        if hasattr(self.context, 'sni_callback'):
            self.context.sni_callback = self._on_server_name
        else:   # 3.6
            self.context.set_servername_callback(self._on_server_name)
        self.tls_handler = handler
        self.server_names = []
        self.handshakes = 0
        self._local = threading.local()
        Backend.__init__(self, self._serve_tls, self.names[0], family, host)

    def _on_server_name(self, tls, server_name, context):
        self._local.server_name = server_name
        if server_name in self.contexts:
            tls.context = self.contexts[server_name]

    def _serve_tls(self, conn, backend):
        self._local.server_name = None
        tls = self.context.wrap_socket(conn, server_side=True)
        try:
            with self.lock:
                self.server_names.append(self._local.server_name)
                self.handshakes += 1
            self.tls_handler(tls, self)
            try:
                tls.unwrap()    # close_notify: Python 3.6 on OpenSSL 3 calls an EOF without it an error
            except (OSError, ValueError):
                pass            # the client has gone already
        finally:
            tls.close()


# -- balancers: config text, in this process, as a subprocess -----------------

def service_xml(hosts, name='web', scheduler='roundrobin', listen_port=None, extra='', groups=None,
                enable=None):
    """One service's XML.  hosts: list of (name, 'ip:port') or (name, ip, attrs)."""
    listen_port = listen_port or free_port()
    if groups is None:
        groups = [('main', scheduler, hosts)]
    body = []
    for group_name, group_scheduler, group_hosts in groups:
        lines = []
        for h in group_hosts:
            attrs = h[2] if len(h) > 2 else ''
            lines.append('      <host name="%s" ip="%s" %s/>' % (h[0], h[1], attrs))
        body.append('    <group name="%s" scheduler="%s">\n%s\n    </group>' % (
            group_name, group_scheduler, '\n'.join(lines)))
    enable_line = '    <enable group="%s"/>\n' % enable if enable else ''
    return ('  <service name="%s">\n    <listen ip="127.0.0.1:%d"/>\n%s\n%s%s  </service>\n' % (
        name, listen_port, '\n'.join(body), extra, enable_line))


def config_xml(*services, **root):
    attrs = ''.join(' %s="%s"' % kv for kv in sorted(root.items()))
    return '<pdconfig%s>\n%s</pdconfig>\n' % (attrs, ''.join(services))


FAST_HASH_ITERATIONS = 1000     # admin users in tests: the default strength costs a core for 0.2 s a login


class Balancer(object):
    """pydirector in this process: its loop runs in a thread, tests talk to real sockets.

    workers=N: this process is the master (its Director, manager and admin here)
    of N real worker processes (pydirector.Master), which accept; call() then
    returns once every worker has made the change too, and WorkerLog brings
    their log lines here."""

    def __init__(self, xml, rng=None, path=None, workers=None):
        if path:  # a real file, so director.reload() can read it again
            with open(path, 'w') as f:
                f.write(xml)
            self.config = pydirector.load_config(path)
        else:
            self.config = pydirector.parse_config(xml, 'test.xml')
        workers = workers or pydirector.worker_count(self.config.workers)
        self.director = pydirector.Director(self.config, rng=rng, accept=not workers)
        self.director.start()
        self.master = self.worker_log = None
        if workers:
            self.worker_log = WorkerLog()
            self.master = pydirector.Master(self.director, workers, output=self.worker_log.file)
        self.thread = threading.Thread(target=self.director.loop.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.director.loop.thread_ident is not None)
        if self.master is not None:
            self.director.loop.call(self.master.start)
            if not self.master.wait_ready(60):
                raise AssertionError('the workers did not start: %s' % self.worker_log.text()[-3000:])

    def port(self, service='web', index=0):
        return self.director.listen_addresses(service)[index][1]

    def call(self, fn, *args, **kwargs):
        """fn on the loop; with workers, once each has applied what it changed."""
        result = self.director.loop.call(fn, *args, **kwargs)
        if self.master is not None:
            self.master.sync(10)
        return result

    def worker_pids(self):
        return [w.pid for w in self.master.workers]

    def sync(self):
        """With workers: return once each has applied what the master has told it so far
        (a state change its checks made, say); at once without."""
        if self.master is not None:
            self.master.sync(10)

    def snapshot(self):
        return self.call(self.director.snapshot)

    def host(self, name, service='web'):
        """The snapshot dict of one host, searched across the service's groups."""
        for s in self.snapshot()['services']:
            if s['name'] == service:
                for g in s['groups']:
                    for h in g['hosts']:
                        if h['name'] == name:
                            return h
        raise KeyError(name)

    def open_pairs(self):
        if self.master is not None:     # every worker's, as their counters say
            return self.call(lambda: self.master.read_counts() or sum(
                s.open for s in self.director.services.values()))
        return self.call(lambda: len(self.director.pairs))

    def stop(self):
        if self.thread.is_alive():
            self.director.loop.call_soon_threadsafe(self.director.stop_now)
            self.thread.join(10)
        if self.master is not None:
            self.master.close()
        self.director.loop.close()
        if self.worker_log is not None:
            self.worker_log.close()


def single_process(why):
    """A test of something only one process has (its internals, a patched module
    global, an order across processes): skipped in a suite run with workers."""
    def decorate(test):
        @functools.wraps(test)
        def run(self, *args, **kwargs):
            if self.workers:
                self.skipTest('one process only: %s' % why)
            return test(self, *args, **kwargs)
        return run
    return decorate


class WorkersMixin(object):
    """A suite again with a master (this process) and two worker processes, as
    CPython's test_selectors runs one suite per selector: class X(WorkersMixin, Suite).

    PYDIRECTOR_TEST_WORKERS=0 skips these second runs (CI keeps them to its
    default Python, inside its time); tests/test_workers.py runs regardless."""
    workers = 2

    def setUp(self):
        if os.environ.get('PYDIRECTOR_TEST_WORKERS') == '0':
            self.skipTest('worker runs of this suite are off (PYDIRECTOR_TEST_WORKERS=0)')
        super(WorkersMixin, self).setUp()


class BalancerCase(unittest.TestCase):
    """The base of every suite that runs the balancer.

    backend() and start() make real backends and an in-process balancer, each
    closed by a cleanup.  After each test, before anything is torn down, no
    client connection may be left open in the balancer; and last of all,
    every fd and thread the test made must be gone and no traceback logged,
    so a leak or a swallowed bug fails the test that caused it.
    """

    workers = None      # WorkersMixin: a master and worker processes

    def setUp(self):
        self.mark = LOG.mark()
        self.base_fds = fd_count() if HAVE_PROC else None
        self.base_threads = threading.active_count()
        self.balancer = None
        self.addCleanup(self.check_no_leaks)

    def backend(self, handler=None, name='backend', **kwargs):
        b = Backend(handler or echo, name, **kwargs)
        self.addCleanup(b.close)
        return b

    def start(self, *services, **root):
        """An in-process balancer running these services (root: <pdconfig> attributes;
        path=FILE writes the config there first, so that reload() can read it again)."""
        path = root.pop('path', None)
        xml = services[0] if len(services) == 1 and services[0].startswith('<pdconfig') else \
            config_xml(*services, **root)
        self.balancer = Balancer(xml, path=path, workers=self.workers)
        self.addCleanup(self.balancer.stop)
        self.addCleanup(self.check_pairs_closed, self.balancer)
        return self.balancer

    def log_lines(self):
        return LOG.since(self.mark)

    def take_tracebacks(self):
        """The tracebacks logged so far, which the test expected: the final check skips them."""
        lines = [l for l in LOG.since(self.mark) if l.startswith('TRACEBACK')]
        self.mark = LOG.mark()
        return lines

    def check_pairs_closed(self, balancer):
        if balancer.thread.is_alive() and balancer.director.loop.running:   # not stopped by the test
            wait_until(lambda: balancer.open_pairs() == 0, 5, message='connections left open in the balancer')

    def fds_back(self):
        if fd_count() <= self.base_fds:
            return True
        # A socket dropped without close() is closed when it is freed: on CPython at
        # once (reference counting), on PyPy only by a collection.  Collect, so that
        # both count only what something still holds (a socket the test or a library
        # such as urllib dropped is not a leak; one the balancer keeps is).
        gc.collect()
        return fd_count() <= self.base_fds

    def check_no_leaks(self):
        try:
            wait_until(lambda: threading.active_count() <= self.base_threads, 10)
        except AssertionError:
            raise AssertionError('threads left: %r' % threading.enumerate())
        if self.base_fds is not None:
            wait_until(self.fds_back, 5, message='fds not back to %d: %r' % (self.base_fds, open_fds()))
        tracebacks = [l for l in LOG.since(self.mark) if l.startswith('TRACEBACK')]
        self.assertEqual(tracebacks, [])


class BalancerProcess(object):
    """`python3 pydirector.py -c FILE` for signals and the command line; log in self.log_path.
    preexec_fn (e.g. a lower RLIMIT_NOFILE) and env (added to ours) go to the process."""

    def __init__(self, xml, args=(), wait_port=None, preexec_fn=None, env=None, directory=None):
        self.start(xml, PYDIRECTOR, args, env, directory, preexec_fn=preexec_fn)
        if wait_port:
            wait_until(lambda: accepts(wait_port) or self.proc.poll() is not None, 10)
            if self.proc.poll() is not None:
                raise AssertionError('pydirector exited: %s' % self.output())

    def start(self, xml, program, args, env, directory, **popen):
        self.dir = directory or tempfile.mkdtemp(prefix='pydirector-test-')
        self.config_path = os.path.join(self.dir, 'test.xml')
        self.log_path = os.path.join(self.dir, 'stderr.log')
        with open(self.config_path, 'w') as f:
            f.write(xml)
        self.log_file = open(self.log_path, 'wb')
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.proc = subprocess.Popen([sys.executable, program, '-c', self.config_path] + list(args),
                                     stdout=self.log_file, stderr=subprocess.STDOUT, cwd=self.dir, env=full_env,
                                     **popen)

    def output(self):
        with open(self.log_path, 'rb') as f:
            return f.read().decode('utf-8', 'replace')

    def signal(self, signum):
        self.proc.send_signal(signum)

    def wait(self, timeout=15):
        return self.proc.wait(timeout)

    def close(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.log_file.close()


SpawnedBalancer = BalancerProcess     # (its old name, where a test needed preexec_fn or env)


# -- clients ------------------------------------------------------------------

class AdminClient(object):
    """A test's calls to a balancer process's admin at self.admin_port, as admin with
    self.admin_password."""
    admin_timeout = 30

    def fetch(self, path, params=None):
        """GET path, or POST params as a form: (status, body)."""
        return admin_request(self.admin_port, 'GET' if params is None else 'POST', path, params,
                             self.admin_password, timeout=self.admin_timeout)

    def change(self, path, expect=200, **params):
        """POST a change: its answer's line, checked to say OK (or ERROR, expect not 200)."""
        status, body = self.fetch(path, params)
        self.assertEqual(status, expect, body)
        self.assertTrue(body.startswith('OK ' if expect == 200 else 'ERROR '), body)
        return body.rstrip('\n')

    def running(self):
        return json.loads(self.fetch('/running.json')[1])


def admin_request(port, method, path, params=None, password='secret', user='admin', timeout=30):
    """(status, body text) of one admin request as user; params go as a POST form."""
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=timeout)
    headers = {'Authorization': 'Basic ' + base64.b64encode(('%s:%s' % (user, password)).encode()).decode()}
    body = None
    if params is not None:
        body = urllib.parse.urlencode(params)
        headers['Content-Type'] = 'application/x-www-form-urlencoded'
    try:
        conn.request(method, path, body, headers)
        answer = conn.getresponse()
        return answer.status, answer.read().decode('utf-8')
    finally:
        conn.close()


def connect(port, host='127.0.0.1', timeout=10):
    sock = socket.create_connection((host, port), timeout=timeout)
    return sock


def recv_all(sock, limit=None):
    """Read to EOF (or `limit` bytes)."""
    chunks = []
    n = 0
    while limit is None or n < limit:
        data = sock.recv(65536)
        if not data:
            break
        chunks.append(data)
        n += len(data)
    return b''.join(chunks)


def exchange(port, data=b'', shut=True, timeout=10):
    """Connect, send data, half-close, read the whole answer."""
    sock = connect(port, timeout=timeout)
    try:
        if data:
            sock.sendall(data)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)
    finally:
        sock.close()


class RawResponse(object):
    """One answer read off a raw socket: status (None when there was no
    'HTTP/x.y NNN' status line), headers as (name, value) pairs, body bytes."""

    def __init__(self, data, error=None):
        self.data = data
        self.error = error          # an OSError text when the exchange broke, else None
        self.status = None
        self.headers = []
        self.body = data
        head, sep, body = data.partition(b'\r\n\r\n')
        match = re.match(rb'HTTP/\d\.\d (\d{3}) ', head)
        if match and sep:
            self.status = int(match.group(1))
            self.body = body
            for line in head.split(b'\r\n')[1:]:
                name, _, value = line.decode('latin-1').partition(':')
                self.headers.append((name.strip(), value.strip()))

    def header(self, name):
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def __repr__(self):
        return '<RawResponse %s %r>' % (self.status, self.data[:120])


def raw_exchanges(port, requests, parallel=8, timeout=10.0, host='127.0.0.1'):
    """Send each request (bytes) on its own connection, half-close, read to EOF.

    Runs `parallel` connections at once from one thread with a selector
    (cheaper than a thread each, so the server under test gets the CPU).
    Returns one RawResponse per request, in order."""
    results = [None] * len(requests)
    selector = selectors.DefaultSelector()
    queue = collections.deque(enumerate(requests))
    deadline_of = {}

    def start(index, data):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        err = sock.connect_ex((host, port))
        state = {'index': index, 'out': memoryview(data), 'chunks': [], 'sock': sock, 'error': None}
        if err not in (0, errno.EINPROGRESS):
            state['error'] = os.strerror(err)
            finish(state, register=False)
            return
        deadline_of[sock] = time.monotonic() + timeout
        selector.register(sock, selectors.EVENT_WRITE, state)

    def finish(state, register=True):
        sock = state['sock']
        if register:
            selector.unregister(sock)
            deadline_of.pop(sock, None)
        sock.close()
        results[state['index']] = RawResponse(b''.join(state['chunks']), state['error'])

    def writable(state):
        sock = state['sock']
        try:
            while state['out']:
                sent = sock.send(state['out'][:65536])
                state['out'] = state['out'][sent:]
        except BlockingIOError:
            return
        except OSError as e:      # the server answered and closed before reading it all
            state['error'] = 'send: %s' % e
            state['out'] = b''
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        selector.modify(sock, selectors.EVENT_READ, state)

    def readable(state):
        try:
            data = state['sock'].recv(65536)
        except BlockingIOError:
            return
        except OSError as e:
            state['error'] = 'recv: %s' % e
            data = b''
        if data:
            state['chunks'].append(data)
        else:
            finish(state)

    try:
        while queue or deadline_of:
            while queue and len(deadline_of) < parallel:
                start(*queue.popleft())
            for key, mask in selector.select(0.5):
                if key.events & selectors.EVENT_WRITE:
                    writable(key.data)
                else:
                    readable(key.data)
            now = time.monotonic()
            for key in list(selector.get_map().values()):
                if deadline_of.get(key.fileobj, now) < now:
                    key.data['error'] = 'timed out'
                    finish(key.data)
    finally:
        for key in list(selector.get_map().values()):
            key.fileobj.close()
        selector.close()
    return results


class _Stream(object):
    """One Background connection: what it sent, what is still due back, and how it ended."""
    __slots__ = ('index', 'sock', 'rng', 'out', 'due_back', 'sent', 'received', 'rounds',
                 'state', 'sent_hash', 'received_hash', 'events', 'error')

    def __init__(self, index, sock, seed):
        self.index = index
        self.sock = sock
        self.rng = random.Random(seed)
        self.out = b''
        self.due_back = bytearray()
        self.sent = 0
        self.received = 0
        self.rounds = 0
        self.state = 'connecting'
        self.sent_hash = hashlib.sha256()
        self.received_hash = hashlib.sha256()
        self.events = 0
        self.error = None


class Background(object):
    """`count` client connections to 127.0.0.1:port, all driven by one selector thread.

    Each sends chunks of deterministic pseudo-random bytes (seeded per connection),
    one at a time, about every `interval` seconds, and checks that exactly those
    bytes come back from an echo backend.  finish() half-closes every connection
    after its current round trip, waits for the echo's EOF, and returns a list of
    problems (empty: every byte of every connection came back intact, then EOF).
    source_ports: bind each client to port source_ports + i (for a tiny port range).
    """

    def __init__(self, port, count, seed=1, interval=None, host='127.0.0.1', source_ports=None,
                 max_chunk=4096):
        self.port = port
        self.host = host
        self.count = count
        self.seed = seed
        self.interval = interval if interval is not None else max(0.05, count / 1000.0)
        self.source_ports = source_ports
        self.max_chunk = max_chunk
        self.streams = []
        self.selector = selectors.DefaultSelector()
        self.finishing = False
        self.stopping = False
        self.timers = []           # heap of (when, index)
        self.thread = None

    # -- the test's side ---------------------------------------------------

    def start(self, timeout=30):
        """Connect everything and wait until each connection has completed one round trip."""
        for i in range(self.count):
            sock = socket.socket()
            if self.source_ports:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((self.host, self.source_ports + i))
            sock.setblocking(False)
            stream = _Stream(i, sock, self.seed * 1000003 + i)
            self.streams.append(stream)
            err = sock.connect_ex((self.host, self.port))
            if err not in (0, errno.EINPROGRESS):
                stream.error = 'connect: %s' % os.strerror(err)
                stream.state = 'failed'
                sock.close()
                continue
            self._watch(stream, selectors.EVENT_WRITE)
        self.thread = threading.Thread(target=self._run, name='background', daemon=True)
        self.thread.start()
        try:
            wait_until(lambda: all(s.rounds or s.state == 'failed' for s in self.streams), timeout,
                       interval=0.02)
        except AssertionError:
            raise AssertionError('background connections did not all get going: %s' % self.summary())
        problems = self.problems()
        if problems:
            raise AssertionError('background connections failed at start: %s' % problems[:5])
        return self

    def round_trips(self):
        return sum(s.rounds for s in self.streams)

    def finish(self, timeout=30):
        """Half-close every connection after its current round trip; wait for all the echoes."""
        self.finishing = True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(s.state in ('done', 'failed') for s in self.streams):
                break
            time.sleep(0.01)
        self.stop()
        problems = self.problems()
        for s in self.streams:
            if s.state not in ('done', 'failed'):
                problems.append('#%d: still %s after %g s (%d of %d bytes back)' % (
                    s.index, s.state, timeout, s.received, s.sent))
        return problems

    def problems(self):
        return ['#%d: %s' % (s.index, s.error) for s in self.streams if s.error]

    def summary(self):
        states = {}
        for s in self.streams:
            states[s.state] = states.get(s.state, 0) + 1
        return states

    def stop(self):
        """Stop the driver thread and close every socket (cleanup; finish() calls it)."""
        self.stopping = True
        if self.thread is not None:
            self.thread.join(10)
        for s in self.streams:
            if s.events:
                try:
                    self.selector.unregister(s.sock)
                except (KeyError, ValueError):
                    pass
                s.events = 0
            s.sock.close()
        self.selector.close()

    # -- the driver thread ---------------------------------------------------

    def _watch(self, stream, events):
        if events == stream.events:
            return
        if not stream.events:
            self.selector.register(stream.sock, events, stream)
        elif not events:
            self.selector.unregister(stream.sock)
        else:
            self.selector.modify(stream.sock, events, stream)
        stream.events = events

    def _fail(self, stream, error):
        stream.error = '%s after %d round trips, %d of %d bytes back' % (
            error, stream.rounds, stream.received, stream.sent)
        stream.state = 'failed'
        self._watch(stream, 0)
        stream.sock.close()

    def _run(self):
        while not self.stopping:
            now = time.monotonic()
            wait = 0.05
            if self.timers:
                wait = max(0.0, min(wait, self.timers[0][0] - now))
            for key, mask in self.selector.select(wait):
                self._event(key.data, mask)
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now:
                _, index = heapq.heappop(self.timers)
                stream = self.streams[index]
                if stream.state == 'idle':
                    self._next_round(stream)
            if self.finishing:
                for stream in self.streams:
                    if stream.state == 'idle':
                        self._next_round(stream)

    def _next_round(self, stream):
        if self.finishing:
            stream.state = 'closing'
            try:
                stream.sock.shutdown(socket.SHUT_WR)
            except OSError as e:
                self._fail(stream, 'shutdown: %s' % e)
                return
            self._watch(stream, selectors.EVENT_READ)
            return
        stream.state = 'streaming'
        n = stream.rng.randint(1, self.max_chunk)
        data = stream.rng.getrandbits(8 * n).to_bytes(n, 'little')
        stream.sent_hash.update(data)
        stream.sent += n
        stream.due_back += data
        stream.out += data
        self._send(stream)

    def _send(self, stream):
        try:
            sent = stream.sock.send(stream.out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as e:
            self._fail(stream, 'send: %s' % e)
            return
        stream.out = stream.out[sent:]
        self._watch(stream, selectors.EVENT_READ | (selectors.EVENT_WRITE if stream.out else 0))

    def _event(self, stream, mask):
        if stream.state == 'connecting':
            err = stream.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._fail(stream, 'connect: %s' % os.strerror(err))
                return
            self._next_round(stream)
            return
        if mask & selectors.EVENT_WRITE and stream.out:
            self._send(stream)
            if stream.state == 'failed':
                return
        if not mask & selectors.EVENT_READ:
            return
        try:
            data = stream.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._fail(stream, 'recv: %s' % e)
            return
        if not data:
            if stream.state == 'closing' and not stream.due_back:
                if stream.sent_hash.digest() != stream.received_hash.digest():
                    self._fail(stream, 'checksum mismatch')
                    return
                stream.state = 'done'
                self._watch(stream, 0)
                stream.sock.close()
            else:
                self._fail(stream, 'EOF while %s' % stream.state)
            return
        expected = bytes(stream.due_back[:len(data)])
        if data != expected:
            self._fail(stream, 'wrong bytes at offset %d' % stream.received)
            return
        del stream.due_back[:len(data)]
        stream.received += len(data)
        stream.received_hash.update(data)
        if stream.state == 'streaming' and not stream.due_back and not stream.out:
            stream.rounds += 1
            stream.state = 'idle'
            self._watch(stream, selectors.EVENT_READ)   # an early EOF or reset still shows
            delay = self.interval * (0.5 + stream.rng.random())
            if stream.rounds == 1 and not self.finishing:
                delay = self.interval * stream.rng.random()   # spread the herd out
            heapq.heappush(self.timers, (time.monotonic() + delay, stream.index))


def _host_port(host, port):
    return '[%s]:%d' % (host, port) if ':' in host else '%s:%d' % (host, port)


def tls_connect(port, server_hostname=None, host='127.0.0.1', timeout=10):
    """A TLS client socket (Python ssl, no verification), connected and through the
    handshake, sending SNI only with server_hostname: (tls_sock, the name of the
    certificate the server presented, see cert_name)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        tls = context.wrap_socket(sock, server_hostname=server_hostname)
    except BaseException:
        sock.close()
        raise
    return tls, cert_name(tls.getpeercert(binary_form=True))


def tls_exchange(port, data=b'', server_hostname=None, expect=None, host='127.0.0.1', timeout=10):
    """Python ssl: connect, send data, read until EOF or `expect` bytes: (certificate
    name, bytes received).  One thread does both: an SSL object must not be read and
    written from two threads at once (OpenSSL's rule; doing it lost bytes now and then
    under load).  data goes in pieces of 16 KiB, and after each whatever came back is
    read without waiting, so a big echo cannot stall both ways."""
    tls, name = tls_connect(port, server_hostname, host, timeout)
    try:
        chunks, n = [], 0

        def drain():
            received = 0
            tls.setblocking(False)
            try:
                while True:
                    chunk = tls.recv(65536)
                    if not chunk:
                        return received, True
                    chunks.append(chunk)
                    received += len(chunk)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                return received, False
            finally:
                tls.settimeout(timeout)

        eof = False
        for at in range(0, len(data), 16384):
            tls.sendall(data[at:at + 16384])
            got, eof = drain()
            n += got
            if eof:
                break
        while not eof and (expect is None or n < expect):
            chunk = tls.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            n += len(chunk)
        return name, b''.join(chunks)
    finally:
        tls.close()


# -- /proc and processes ------------------------------------------------------

HAVE_PROC = os.path.isdir('/proc/self/fd')


def open_fds():
    """What this process's fds are (for a leak message)."""
    found = {}
    for fd in os.listdir('/proc/self/fd'):
        try:
            found[int(fd)] = os.readlink('/proc/self/fd/' + fd)
        except OSError:
            pass
    return found


def accept_queue_length(port):
    """Connections waiting in the accept queue of the socket listening on `port`
    (Linux /proc/net/tcp*), or None where that cannot be read."""
    found = None
    for name in ('/proc/net/tcp', '/proc/net/tcp6'):
        try:
            with open(name) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 4 and fields[3] == '0A' and int(fields[1].rsplit(':', 1)[1], 16) == port:
                found = (found or 0) + int(fields[4].split(':')[1], 16)
    return found


def raise_open_files(wanted):
    """Raise this process's RLIMIT_NOFILE soft limit towards `wanted`; return the limit now in force."""
    try:
        import resource
    except ImportError:
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


# -- external programs and recorded data --------------------------------------

# Daemons often live in sbin, which a non-root PATH may lack.
SBIN_PATH = os.pathsep.join([os.environ.get('PATH', os.defpath), '/usr/local/sbin', '/usr/sbin', '/sbin'])


def find_binary(name):
    """The path of an installed program, or None.  Tests never install anything:
    .ci/run does (apt), and a test whose program is missing skips saying so."""
    return shutil.which(name, path=SBIN_PATH)


def need_program(name):
    """The path of a program the test drives, or skip the test saying it is missing."""
    path = find_binary(name)
    if path is None:
        raise unittest.SkipTest('%s is not installed (.ci/run installs it with apt)' % name)
    return path


class ExternalServer(object):
    """A third-party server (nginx, haproxy) run in the foreground in its own temp dir.

    files: {name: text} written to the dir first ('{dir}' in the text is replaced
    by the dir); argv may use '{dir}' too.  Waits until port accepts; close() stops it."""

    def __init__(self, argv, files, port, timeout=10):
        self.dir = tempfile.mkdtemp(prefix='pydirector-ext-')
        for name, text in files.items():
            with open(os.path.join(self.dir, name), 'w') as f:
                f.write(text.replace('{dir}', self.dir))
        self.port = port
        self.log_path = os.path.join(self.dir, 'output.log')
        self.log_file = open(self.log_path, 'wb')
        self.proc = subprocess.Popen([a.replace('{dir}', self.dir) for a in argv], cwd=self.dir,
                                     stdin=subprocess.DEVNULL, stdout=self.log_file,
                                     stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: self.proc.poll() is not None or accepts(port), timeout, 0.02)
        except AssertionError:
            self.close()
            raise AssertionError('%s did not listen on %d: %s' % (argv[0], port, self.output()))
        if self.proc.poll() is not None:
            self.close()
            raise AssertionError('%s exited with %s: %s' % (argv[0], self.proc.returncode,
                                                          self.output()))

    def path(self, name):
        return os.path.join(self.dir, name)

    def read(self, name):
        try:
            with open(self.path(name), 'rb') as f:
                return f.read().decode('utf-8', 'replace')
        except OSError:
            return ''

    def output(self):
        return self.read('output.log')

    def close(self):
        stop_process(self.proc)
        self.log_file.close()
        shutil.rmtree(self.dir, ignore_errors=True)


_SUBJECT_CN = re.compile(r'^\*?\s*subject\s*[=:].*?\bCN\s*=\s*([^,/\r\n]+)', re.M)


def openssl_client(port, servername=None, host='127.0.0.1', timeout=20):
    """`openssl s_client -connect HOST:PORT -servername NAME` (-noservername without a
    name), stdin at EOF: the CN of the subject it printed, or None (no handshake)."""
    argv = [need_program('openssl'), 's_client', '-connect', _host_port(host, port)]
    argv += ['-servername', servername] if servername else ['-noservername']
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=timeout)
    found = _SUBJECT_CN.search(done.stdout.decode('utf-8', 'replace'))
    return found.group(1).strip() if found else None


def curl_client(port, name, path='/', host='127.0.0.1', timeout=20):
    """`curl --connect-to ::HOST:PORT -k https://NAME:PORT/PATH`: (the CN of the
    certificate it saw or None, the body it got).  NAME may be international
    (need_curl_idn): curl then sends its A-label, as browsers do; --connect-to
    sends any name to HOST, where --resolve would need the A-label spelled out."""
    address = '[%s]' % host if ':' in host else host
    url = 'https://%s:%d%s' % (name, port, path)
    done = subprocess.run([need_program('curl'), '-sS', '-v', '-k', '--max-time', str(timeout),
                           '--connect-to', '::%s:%d' % (address, port), url],
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=timeout + 5, env=dict(os.environ, LC_ALL='C.UTF-8'))  # libidn2 reads UTF-8 names
    found = _SUBJECT_CN.search(done.stderr.decode('utf-8', 'replace'))
    return (found.group(1).strip() if found else None), done.stdout


def need_curl_idn():
    """Skip the test unless curl is installed and built with IDN (libidn2), which
    turns an international name into the A-label it sends."""
    curl = need_program('curl')
    done = subprocess.run([curl, '-V'], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=30)
    features = [l for l in done.stdout.decode('utf-8', 'replace').splitlines() if l.startswith('Features:')]
    if not features or 'IDN' not in features[0].split():
        raise unittest.SkipTest('curl here has no IDN support (`curl -V` lists no IDN feature): '
                                'it cannot send an international name')


# ---------------------------------------------------------------------------
# A real browser: headless Chromium driven over the DevTools protocol
# (test_hardening's cross-site tests, test_status_page).
# ---------------------------------------------------------------------------

import base64     # noqa: E402
import json       # noqa: E402
import select     # noqa: E402

CHROMIUM = '/usr/bin/chromium'

# Puts the read and write ends of the DevTools pipe at fds 3 and 4, where
# --remote-debugging-pipe looks for them, then becomes Chromium.  (A wrapper
# process rather than a preexec_fn, which is unsafe with threads running.)
_PIPE_FDS = ('import fcntl, os, sys\n'
             'a = fcntl.fcntl(int(sys.argv[1]), fcntl.F_DUPFD, 10)\n'
             'b = fcntl.fcntl(int(sys.argv[2]), fcntl.F_DUPFD, 10)\n'
             'os.dup2(a, 3)\nos.dup2(b, 4)\nos.close(a)\nos.close(b)\n'
             'os.execv(sys.argv[3], sys.argv[3:])\n')


class DevTools(object):
    """Headless Chromium driven over the Chrome DevTools Protocol on a pipe (JSON
    messages ended by NUL bytes): no websocket, no library."""

    def __init__(self, flags, profile):
        to_browser, self.to_browser = os.pipe()
        self.from_browser, from_browser_w = os.pipe()
        argv = [sys.executable, '-c', _PIPE_FDS, str(to_browser), str(from_browser_w), CHROMIUM,
                '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                '--disable-background-networking', '--disable-component-update', '--disable-sync',
                '--user-data-dir=' + profile, '--remote-debugging-pipe'] + list(flags) + ['about:blank']
        self.proc = subprocess.Popen(argv, pass_fds=(to_browser, from_browser_w), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser_w)
        self.buffer = b''
        self.last_id = 0
        self.events = []
        self.session = None

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        os.close(self.to_browser)
        os.close(self.from_browser)

    def send(self, method, params=None, timeout=60):
        """Call a method (in the attached page once there is one) and return its result."""
        self.last_id += 1
        message = {'id': self.last_id, 'method': method, 'params': params or {}}
        if self.session is not None:
            message['sessionId'] = self.session
        os.write(self.to_browser, json.dumps(message).encode() + b'\0')
        deadline = time.monotonic() + timeout
        while True:
            reply = self.read(deadline)
            if reply.get('id') == self.last_id:
                if 'error' in reply:
                    raise AssertionError('%s: %s' % (method, reply['error']))
                return reply.get('result', {})

    def read(self, deadline):
        while b'\0' not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.from_browser], [], [], left)[0]:
                raise AssertionError('Chromium did not answer in time')
            data = os.read(self.from_browser, 65536)
            if not data:
                raise AssertionError('Chromium closed the DevTools pipe')
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b'\0')
        message = json.loads(line.decode('utf-8'))
        if 'method' in message:
            self.events.append(message)
        return message

    def wait_for(self, predicate, timeout=60):
        """Read events until predicate(all events so far) is true; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate(self.events)
            if value:
                return value
            self.read(deadline)

    def open_page(self):
        page = [t for t in self.send('Target.getTargets')['targetInfos'] if t['type'] == 'page'][0]
        self.session = self.send('Target.attachToTarget', {'targetId': page['targetId'], 'flatten': True})['sessionId']
        self.send('Page.enable')
        self.send('Network.enable')

    def navigate(self, url):
        del self.events[:]
        self.send('Page.navigate', {'url': url})
        self.wait_for(lambda events: any(e['method'] == 'Page.loadEventFired' for e in events))

    def evaluate(self, expression):
        """The value of a JavaScript expression in the page (JSON-able; a promise is awaited)."""
        result = self.send('Runtime.evaluate', {'expression': expression, 'returnByValue': True,
                                                'awaitPromise': True})
        if 'exceptionDetails' in result:
            raise AssertionError('%s: %s' % (expression, result['exceptionDetails']))
        return result['result'].get('value')

    def screenshot(self, width, height):
        """The page as a PNG (bytes), width x height CSS pixels from its top."""
        self.send('Emulation.setDeviceMetricsOverride', {'width': width, 'height': height, 'deviceScaleFactor': 1,
                                                         'mobile': False})
        data = self.send('Page.captureScreenshot', {'format': 'png'})['data']
        return base64.b64decode(data)

    def requests(self):
        """{request id: {'url', 'method', 'headers' (as sent), 'status'}} seen since the last navigate."""
        seen = {}
        for event in self.events:
            params = event.get('params', {})
            entry = seen.setdefault(params.get('requestId'), {})
            if event['method'] == 'Network.requestWillBeSent':
                entry.update(url=params['request']['url'], method=params['request']['method'])
            elif event['method'] == 'Network.requestWillBeSentExtraInfo':
                entry['headers'] = dict((k.lower(), v) for k, v in params['headers'].items())
            elif event['method'] == 'Network.responseReceivedExtraInfo':
                entry['status'] = params['statusCode']
        return seen

# -- upgrades (tests/test_upgrade.py): a tree to run from, a process group, clients --------

class CodeTree(object):
    """pydirector's three modules copied to a directory of their own, to run a balancer
    from and upgrade in place: install() puts a pydirector.py with the VERSION given
    there as a deploy would (written beside it, then renamed over it), change(text)
    having changed it first (a syntax error, a sleep...)."""

    FILES = ('pydirector.py', 'schedulers.py', 'pydirector_admin.py')

    def __init__(self, version):
        self.dir = tempfile.mkdtemp(prefix='pydirector-tree-')
        for name in self.FILES:
            shutil.copy(os.path.join(REPO, name), os.path.join(self.dir, name))
        self.install(version)

    def path(self, name='pydirector.py'):
        return os.path.join(self.dir, name)

    def install(self, version, change=None, name='pydirector.py'):
        with open(os.path.join(REPO, name)) as f:
            text = f.read()
        if name == 'pydirector.py':
            text, count = re.subn(r"^VERSION = '[^']*'$", "VERSION = '%s'" % version, text, flags=re.M)
            assert count == 1
        if change is not None:
            text = change(text)
        with open(self.path(name) + '.new', 'w') as f:
            f.write(text)
        os.replace(self.path(name) + '.new', self.path(name))

    def close(self):
        shutil.rmtree(self.dir, ignore_errors=True)


def when_upgrading(code):
    """A change for CodeTree.install: `code` (one line) runs first thing in main() when
    the process is an upgrade's new generation."""
    def change(text):
        head = 'def main(argv=None):\n'
        assert text.count(head) == 1
        return text.replace(head, head + "    if os.environ.get('PYDIRECTOR_UPGRADE_FD'):\n        %s\n" % code)
    return change


def process_group(pgid):
    """{pid: state} of the processes of a process group, from /proc ('Z': not reaped yet)."""
    found = {}
    for name in os.listdir('/proc'):
        if not name.isdigit():
            continue
        try:
            with open('/proc/%s/stat' % name) as f:
                fields = f.read().rsplit(')', 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:
            found[int(name)] = fields[0]
    return found


class GroupBalancer(BalancerProcess):
    """`python3 TREE/pydirector.py -c FILE ARGS` (a CodeTree's) in a session of its own:
    every process it makes -- workers, an upgrade's old generation, which are not all
    its children -- is in its process group, where processes() finds them and close()
    ends them all."""

    def __init__(self, tree, xml, args=(), env=None):
        # (PYTHONFAULTHANDLER: exited_with's SIGABRT shows each thread's stack)
        self.start(xml, tree.path(), args, dict({'PYTHONFAULTHANDLER': '1'}, **(env or {})), None,
                   start_new_session=True)
        self.pid = self.proc.pid

    def processes(self):
        return process_group(self.pid)

    def exited_with(self, timeout):
        """The PID's exit status, once it exits within timeout; else an AssertionError
        with what each process of the group was doing: its signal masks, and its
        threads' stacks (faulthandler, on a SIGABRT), after the output so far."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        states = []
        for pid in sorted(self.processes()):
            try:
                with open('/proc/%d/status' % pid) as f:
                    lines = [l for l in f.read().splitlines() if l.startswith(('State', 'Threads', 'Sig', 'Shd'))]
            except OSError as e:
                lines = [str(e)]
            states.append('pid %d: %s' % (pid, '; '.join(lines)))
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGABRT)
            except OSError:
                pass
        wait_until(lambda: self.proc.poll() is not None, 10)
        raise AssertionError('pid %d still runs after %g s:\n%s\n%s' % (
            self.pid, timeout, '\n'.join(states), self.output()))

    def close(self):
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except OSError:
            pass
        self.proc.wait(10)
        # The others are not our children: their parent (or init) reaps them.
        wait_until(lambda: not self.processes(), 10, message='processes left: %r' % self.processes())
        self.log_file.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class NewClients(object):
    """`threads` threads, each making one client connection after another to
    127.0.0.1:port until stop(): send `data`, half-close, read to EOF; an answer that
    check(answer) refuses, or any error, is a failure, kept with its time."""

    def __init__(self, port, check, threads=4, data=b'', timeout=10):
        self.port = port
        self.check = check
        self.data = data
        self.timeout = timeout
        self.total = 0
        self.failures = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def start(self):
        for thread in self.threads:
            thread.start()
        wait_until(lambda: self.total >= len(self.threads), 30, message='no client got through')
        return self

    def _run(self):
        while not self.stopping.is_set():
            try:
                answer = exchange(self.port, self.data, timeout=self.timeout)
                problem = None if self.check(answer) else 'answer %r' % answer[:100]
            except OSError as e:
                problem = repr(e)
            with self.lock:
                self.total += 1
                if problem is not None:
                    self.failures.append('%.3f %s' % (time.time(), problem))

    def count(self):
        with self.lock:
            return self.total

    def stop(self):
        """(connections made, the failures)."""
        self.stopping.set()
        for thread in self.threads:
            thread.join(30)
        return self.total, self.failures

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')
HELLO_FIXTURES = ('openssl', 'openssl-tls12', 'python', 'python-nosni', 'python-idna', 'curl',
                  'curl-idna', 'chromium')


def client_hello(name):
    """A real ClientHello from tests/data/hello-NAME.hex: (bytes, the server name the
    client was asked to send, or None).  tools/capture_hellos.py made them."""
    with open(os.path.join(DATA, 'hello-%s.hex' % name)) as f:
        lines = f.read().splitlines()
    server_name = [l.split(':', 1)[1].strip() for l in lines if l.startswith('# server_name:')][0]
    data = bytes.fromhex(''.join(l for l in lines if not l.startswith('#')))
    return data, (None if server_name == 'none' else server_name)
