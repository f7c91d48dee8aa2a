#!/usr/bin/env python3
"""Soak scenarios for pydirector (issue 6): long runs by hand, short ones in CI.

    python3 tools/soak.py g1 --minutes 30   # 2,000 checksummed echo streams: bytes, RSS drift, fds
    python3 tools/soak.py g2 --minutes 10   # 1,500 new connections/s: failures, connect-to-first-byte
    python3 tools/soak.py g3                # 9,000 concurrent connections + one past maxconns
    python3 tools/soak.py g6 --minutes 10   # SIGKILL / SIGSTOP one of 3 backends every 2 s, 500 clients
    python3 tools/soak.py g1 --workers 2    # any of them with a master and 2 worker processes

Every scenario starts `PYTHON pydirector.py -c generated.xml` as a subprocess
(--python picks the interpreter), its own tiny backends (separate processes
running this file's `backend` command) and a selectors-based client in this
process.  It prints a table (criterion, figure, limit, pass/fail) and one JSON
line, and exits 1 when a criterion fails.  --scale multiplies the load
(streams, connections/s, connections, clients); --duration / --minutes set
the length.  Standard library only, Python 3.6+, Linux (/proc is read for the
balancer's RSS, fds and CPU).  With --workers N the balancer is a master and N
worker processes (`--workers N`); its RSS, fds and CPU are the sums over all of
them, and the run waits for every worker's "ready" line before it starts.

The wire protocol of the backends: on accept they send `soak NAME\\n`.  In
`echo` mode they then echo every byte and, after the client's EOF, send
`SHA256HEX LENGTH\\n` of what they received and close; in `greet` mode they
close right after the greeting.  So a client checks both directions on its
own: the echo against what it sent (byte for byte and by sha256), the
trailer against its own digest.
"""

import argparse
import array
import collections
import errno
import hashlib
import heapq
import json
import os
import random
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

try:
    import resource
except ImportError:  # not Linux: the scenarios need /proc anyway
    resource = None

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.append(HERE)
from processes import child_pids, cpu_seconds, fd_count, free_port, rss_bytes, stop_process  # noqa: E402
PYDIRECTOR = os.path.join(REPO, 'pydirector.py')
THIS = os.path.abspath(__file__)

EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE

BLOCK_SIZE = 1 << 20          # the pseudo-random data every stream sends a window of
MAX_RECV = 65536
BACKEND_HIGH_WATER = 256 * 1024
GREETING_PREFIX = b'soak '
WORKERS = None                # --workers: run the balancer as a master and this many workers


# ---------------------------------------------------------------------------
# Small helpers: limits, /proc figures, percentiles
# ---------------------------------------------------------------------------

def raise_nofile():
    """Take the hard open-file limit as our soft one; return the new soft limit."""
    if resource is None:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return soft
    return hard


def proc_pipe_bytes(pid):
    """Kernel memory a process's pipes may hold (the sum of their F_GETPIPE_SZ), which RSS does
    not show: the balancer's splice pipes.  0 where it cannot be read."""
    import fcntl
    seen = set()
    total = 0
    try:
        names = os.listdir('/proc/%d/fd' % pid)
    except OSError:
        return 0
    for name in names:
        path = '/proc/%d/fd/%s' % (pid, name)
        try:
            target = os.readlink(path)
            if not target.startswith('pipe:') or target in seen:
                continue
            seen.add(target)
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)   # the same pipe; a reader that never reads
        except OSError:
            continue
        try:
            total += fcntl.fcntl(fd, getattr(fcntl, 'F_GETPIPE_SZ', 1032))
        except OSError:
            pass
        finally:
            os.close(fd)
    return total


def run_delay(pid):
    """Seconds the process's main thread has spent runnable but waiting for a CPU (schedstat)."""
    try:
        with open('/proc/%d/schedstat' % pid) as f:
            return int(f.read().split()[1]) / 1e9
    except (IOError, OSError, IndexError, ValueError):
        return None


def cpu_pressure():
    """Total microseconds some task on this machine waited for a CPU (PSI), or None."""
    try:
        with open('/proc/pressure/cpu') as f:
            for line in f:
                if line.startswith('some '):
                    return int(line.rsplit('total=', 1)[1])
    except (IOError, OSError, IndexError, ValueError):
        pass
    return None


def self_cpu():
    if resource is None:
        return 0.0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(sorted_values, fraction):
    """Nearest-rank percentile of an already sorted sequence (None when empty)."""
    if not sorted_values:
        return None
    index = max(0, min(len(sorted_values) - 1, int(round(fraction * len(sorted_values) + 0.5)) - 1))
    return sorted_values[index]


def median(values):
    values = sorted(values)
    return percentile(values, 0.5)


def mib(n):
    return '%.1f MiB' % (n / 1048576.0)


_DATA = None


def data_block():
    """1 MiB of seeded pseudo-random bytes, plus its first 64 KiB again so any
    (offset < 1 MiB, length <= 64 KiB) slice needs no wrap-around."""
    global _DATA
    if _DATA is None:
        block = random.Random(20021113).getrandbits(BLOCK_SIZE * 8).to_bytes(BLOCK_SIZE, 'little')
        _DATA = memoryview(block + block[:MAX_RECV])
    return _DATA


# ---------------------------------------------------------------------------
# The backend: a separate process (so a scenario can SIGKILL or SIGSTOP it)
# ---------------------------------------------------------------------------

class BackendConnection(object):
    """One accepted connection in the backend process: echo mode, or (echo=False) greet and wait for EOF."""
    __slots__ = ('sel', 'sock', 'echo', 'out', 'digest', 'count', 'eof', 'events')

    def __init__(self, sel, sock, greeting, echo=True):
        self.sel = sel
        self.sock = sock
        self.echo = echo
        self.out = bytearray(greeting)
        self.digest = hashlib.sha256()
        self.count = 0
        self.eof = False
        self.events = 0
        self.on_event(0)

    def on_event(self, mask):
        if mask & EVENT_READ:
            try:
                data = self.sock.recv(MAX_RECV)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                self.close()
                return
            if data:
                if self.echo:
                    self.digest.update(data)
                    self.count += len(data)
                    self.out += data
            elif data is not None:
                self.eof = True
                if self.echo:
                    self.out += ('%s %d\n' % (self.digest.hexdigest(), self.count)).encode()
        if self.out:
            try:
                sent = self.sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.close()
                return
            del self.out[:sent]
        if self.eof and not self.out:
            self.close()
            return
        events = 0
        if not self.eof and len(self.out) < BACKEND_HIGH_WATER:
            events |= EVENT_READ
        if self.out:
            events |= EVENT_WRITE
        if events != self.events:
            if not self.events:
                self.sel.register(self.sock, events, self.on_event)
            else:
                self.sel.modify(self.sock, events, self.on_event)
            self.events = events

    def close(self):
        if self.events:
            self.sel.unregister(self.sock)
            self.events = 0
        self.sock.close()


def serve_backend(name, mode, port, watch_stdin):
    """Run a backend until killed (or, with watch_stdin, until our parent goes away)."""
    raise_nofile()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(('127.0.0.1', port))
    listener.listen(4096)
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, EVENT_READ, None)
    if watch_stdin:
        # The parent holds our stdin open; EOF there means it died: don't outlive it.
        try:
            sel.register(sys.stdin.fileno(), EVENT_READ, 'stdin')
        except (OSError, ValueError):
            pass  # a file or /dev/null cannot be polled: nothing to watch
    greeting = GREETING_PREFIX + name.encode() + b'\n'
    sys.stdout.write('PORT %d\n' % listener.getsockname()[1])
    sys.stdout.flush()
    while True:
        for key, mask in sel.select():
            if key.data is None:
                for _ in range(64):
                    try:
                        sock, _addr = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError as e:
                        if e.errno in (errno.EMFILE, errno.ENFILE):
                            time.sleep(0.01)
                        break
                    sock.setblocking(False)
                    if mode == 'greet':
                        try:
                            sock.send(greeting)
                        except OSError:
                            pass
                        sock.close()
                    else:
                        BackendConnection(sel, sock, greeting, echo=(mode == 'echo'))
            elif key.data == 'stdin':
                if not os.read(sys.stdin.fileno(), 4096):
                    return
            else:
                key.data(mask)


class BackendProcess(object):
    """A backend process on 127.0.0.1; restart() brings it back on the same port after a kill."""

    def __init__(self, name, mode, workdir, python=None, wait=True):
        self.name = name
        self.mode = mode
        self.workdir = workdir
        self.python = python or sys.executable
        self.port = 0
        self.proc = None
        self.stderr = open(os.path.join(workdir, 'backend-%s.log' % name), 'ab')
        self.spawn()
        if wait:
            self.wait_ready()

    def spawn(self):
        args = [self.python, THIS, 'backend', '--name', self.name, '--mode', self.mode,
                '--port', str(self.port), '--watch-stdin']
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr)

    def wait_ready(self, timeout=20.0):
        """Read the 'PORT n' line; respawn while the port is still taken (after a kill)."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.proc.stdout.readline()
            if line.startswith(b'PORT '):
                self.port = int(line.split()[1])
                return
            self.proc.wait()
            if time.monotonic() > deadline:
                raise RuntimeError('backend %s did not start (exit %s); see %s'
                                   % (self.name, self.proc.returncode, self.stderr.name))
            time.sleep(0.05)
            self.proc.stdin.close()
            self.proc.stdout.close()
            self.spawn()

    @property
    def pid(self):
        return self.proc.pid

    def kill(self):
        self.proc.kill()
        self.proc.wait()

    def stop(self):
        os.kill(self.proc.pid, signal.SIGSTOP)

    def cont(self):
        os.kill(self.proc.pid, signal.SIGCONT)

    def restart(self):
        self.proc.stdin.close()
        self.proc.stdout.close()
        self.spawn()
        self.wait_ready()

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
            except OSError:
                pass
            self.proc.kill()
            self.proc.wait()
        if self.proc is not None:
            for pipe in (self.proc.stdin, self.proc.stdout):
                try:
                    pipe.close()
                except OSError:
                    pass
        self.stderr.close()


# ---------------------------------------------------------------------------
# The balancer as a subprocess, and its log
# ---------------------------------------------------------------------------

def _raise_nofile_in_child():
    raise_nofile()


HOST_STATE_RE = re.compile(r'^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \w+ host (\S+) \(([^)]*)\) in '
                           r'(\S+)/(\S+) (up|down): (.*)$')


def log_time(stamp, millis):
    """A logging asctime ('2026-11-23 18:02:03', '123') as epoch seconds (local time, as logged)."""
    return time.mktime(time.strptime(stamp, '%Y-%m-%d %H:%M:%S')) + int(millis) / 1000.0


class BalancerProcess(object):
    """`PYTHON pydirector.py -c soak.xml` with its open-file limit raised; log in workdir."""

    def __init__(self, workdir, service_xml, python=None, drain=5, script=None):
        self.workdir = workdir
        self.python = python or sys.executable
        self.script = script or PYDIRECTOR
        self.config_path = os.path.join(workdir, 'soak.xml')
        self.log_path = os.path.join(workdir, 'pydirector.log')
        self.stderr_path = os.path.join(workdir, 'pydirector.stderr')
        self.proc = None
        self.exit_code = None
        self.started = time.monotonic()
        self.pressure0 = self.delay0 = None
        last_error = None
        for _ in range(3):  # a free port can be taken between our check and the bind
            self.port = free_port()
            xml = ('<pdconfig drain="%d">\n%s  <logging file="%s"/>\n</pdconfig>\n'
                   % (drain, service_xml.replace('LISTEN_PORT', str(self.port)), self.log_path))
            with open(self.config_path, 'w') as f:
                f.write(xml)
            stderr = open(self.stderr_path, 'ab')
            workers = ['--workers', str(WORKERS)] if WORKERS else []
            self.proc = subprocess.Popen([self.python, self.script, '-c', self.config_path] + workers,
                                         stdin=subprocess.DEVNULL, stdout=stderr, stderr=subprocess.STDOUT,
                                         cwd=workdir, preexec_fn=_raise_nofile_in_child)
            stderr.close()
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                text = self.log_text()
                if 'listening on' in text and text.count(') ready') >= (WORKERS or 0):
                    self.started = time.monotonic()
                    self.pressure0 = cpu_pressure()
                    self.delay0 = run_delay(self.proc.pid)
                    return
                time.sleep(0.02)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError('pydirector did not start within 20 s; see %s' % self.workdir)
            last_error = (self.stderr_text() + self.log_text()).strip()
            if 'cannot listen' not in last_error:
                break
        raise BalancerStartError(last_error)

    @property
    def pid(self):
        return self.proc.pid

    def log_text(self):
        try:
            with open(self.log_path, 'rb') as f:
                return f.read().decode('utf-8', 'replace')
        except IOError:
            return ''

    def stderr_text(self):
        try:
            with open(self.stderr_path, 'rb') as f:
                return f.read().decode('utf-8', 'replace')
        except IOError:
            return ''

    def pids(self):
        """The balancer's processes: the master and its workers (or the one process)."""
        return [self.pid] + (child_pids(self.pid) if WORKERS else [])

    def total(self, figure):
        found = 0
        for pid in self.pids():
            try:
                found += figure(pid)
            except (OSError, IOError):
                pass    # a worker restarted meanwhile
        return found

    def rss(self):
        return self.total(rss_bytes)

    def fds(self):
        return self.total(fd_count)

    def pipe_bytes(self):
        return self.total(proc_pipe_bytes)

    def cpu(self):
        return self.total(cpu_seconds)

    def wait_fds(self, target, timeout=10.0):
        """Poll until the balancer has `target` fds open (or fewer); return the last count."""
        deadline = time.monotonic() + timeout
        while True:
            count = self.fds()
            if count <= target or time.monotonic() > deadline:
                return count
            time.sleep(0.05)

    def problems(self):
        """Log lines that should never appear: tracebacks, ERROR and CRITICAL records."""
        bad = []
        for line in (self.log_text() + self.stderr_text()).splitlines():
            if 'Traceback' in line or ' ERROR ' in line or ' CRITICAL ' in line:
                bad.append(line)
        return bad

    def access_summary(self):
        """From the access log (one line per finished client): Counter of end=, bytes_in, bytes_out.
        None when the balancer writes no access lines."""
        ends = collections.Counter()
        totals = {'bytes_in': 0, 'bytes_out': 0}
        try:
            with open(self.log_path, 'rb') as f:
                for line in f:
                    if b' access ' not in line:
                        continue
                    for field in line.split():
                        if field.startswith(b'end='):
                            ends[field[4:].decode('ascii', 'replace')] += 1
                        elif field.startswith(b'bytes_in=') or field.startswith(b'bytes_out='):
                            name, _, value = field.partition(b'=')
                            totals[name.decode()] += int(value)
        except IOError:
            return None
        if not ends:
            return None
        return ends, totals['bytes_in'], totals['bytes_out']

    def host_events(self):
        """[(epoch, host, 'up'|'down', cause)] from the log, in order."""
        events = []
        for line in self.log_text().splitlines():
            match = HOST_STATE_RE.match(line)
            if match:
                events.append((log_time(match.group(1), match.group(2)), match.group(3),
                               match.group(7), match.group(8)))
        return events

    def stop(self, timeout=30.0):
        """SIGTERM, wait for the drain; return the exit status (None if it had to be killed)."""
        self.exit_code = stop_process(self.proc, timeout)
        return self.exit_code

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class BalancerStartError(Exception):
    pass


def service_xml(backends, scheduler='roundrobin', service_attrs='', extra=''):
    """The <service> block; LISTEN_PORT is filled in by BalancerProcess."""
    hosts = '\n'.join('      <host name="%s" ip="127.0.0.1:%d"/>' % (b.name, b.port) for b in backends)
    return ('  <service name="soak"%s>\n    <listen ip="127.0.0.1:LISTEN_PORT"/>\n'
            '    <group name="main" scheduler="%s">\n%s\n    </group>\n%s  </service>\n'
            % (service_attrs, scheduler, hosts, extra))


class Rig(object):
    """Owns a scenario's temp dir, backend processes and balancer; cleans all of them up.

    keep: True keeps the temp dir (config, logs), False removes it, None keeps it
    only when the run failed.
    """

    def __init__(self, python=None, keep=None):
        self.python = python or sys.executable
        self.script = PYDIRECTOR
        self.keep = keep
        self.workdir = tempfile.mkdtemp(prefix='pydirector-soak-')
        self.backends = []
        self.balancer = None
        self.failed = False

    def start_backends(self, count, mode):
        """b1..bN, started side by side (interpreter start-up is slow on a busy box)."""
        started = [BackendProcess('b%d' % (i + 1), mode, self.workdir, wait=False) for i in range(count)]
        self.backends.extend(started)
        for b in started:
            b.wait_ready()
        return started

    def start_balancer(self, xml):
        self.balancer = BalancerProcess(self.workdir, xml, self.python, script=self.script)
        return self.balancer

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.balancer is not None:
            self.balancer.close()
        for b in self.backends:
            b.close()
        if exc_type is not None:
            self.failed = True
        if self.keep or (self.failed and self.keep is None):
            sys.stderr.write('soak: logs kept in %s\n' % self.workdir)
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return False


# ---------------------------------------------------------------------------
# The client: one selectors loop, a timer heap, checksummed echo streams
# ---------------------------------------------------------------------------

def wall_offset(wall=time.time, mono=time.monotonic, tries=20):
    """time.time() - time.monotonic(), read between two monotonic readings, keeping the
    closest pair: a loaded box can preempt between the two calls for tens of ms, and
    G6 compares client stamps with fault times only milliseconds apart."""
    best = None
    for _ in range(tries):
        before = mono()
        now = wall()
        after = mono()
        if best is None or after - before < best[0]:
            best = (after - before, now - (before + after) / 2.0)
        if best[0] < 0.0001:
            break
    return best[1]


class Engine(object):
    """A tiny event loop for the client side (this process)."""

    def __init__(self):
        self.selector = selectors.DefaultSelector()
        self.timers = []
        self.sequence = 0
        # Wall-clock stamps (comparable with the balancer's log) from the monotonic clock.
        self.wall_offset = wall_offset()

    def call_at(self, when, callback):
        self.sequence += 1
        entry = [when, self.sequence, callback]
        heapq.heappush(self.timers, entry)
        return entry

    def run_once(self, max_wait):
        timeout = max_wait
        if self.timers:
            timeout = max(0.0, min(timeout, self.timers[0][0] - time.monotonic()))
        for key, mask in self.selector.select(timeout):
            key.data(mask)
        now = time.monotonic()
        timers = self.timers
        while timers and timers[0][0] <= now:
            entry = heapq.heappop(timers)
            if entry[2] is not None:
                entry[2]()

    def wall(self, mono):
        return mono + self.wall_offset

    def close(self):
        self.selector.close()


class StreamStats(object):
    """Counts over many streams (scenarios that run hundreds of thousands keep no per-stream list)."""

    def __init__(self, keep_records=False):
        self.started = 0
        self.ok = 0
        self.failed = 0
        self.bytes_sent = 0
        self.bytes_echoed = 0
        self.bytes_missing = 0      # of failed streams: what they should have got back and did not
        self.corrupt = 0
        self.failures = collections.Counter()
        self.examples = []
        self.records = [] if keep_records else None

    def add(self, stream):
        self.bytes_sent += stream.sent
        self.bytes_echoed += stream.echoed
        if stream.error is None:
            self.ok += 1
        else:
            self.failed += 1
            self.bytes_missing += stream.length - stream.echoed
            kind = stream.error.split(':')[0]
            self.failures[kind] += 1
            if kind == 'corrupt' or kind == 'digest':
                self.corrupt += 1
            if len(self.examples) < 10:
                self.examples.append('%s (backend %s, %d/%d bytes echoed)' % (
                    stream.error, stream.backend, stream.echoed, stream.length))
        if self.records is not None:
            self.records.append((stream.backend, stream.error, stream.started, stream.ended,
                                 stream.first_byte))


class Stream(object):
    """One checksummed echo connection through the balancer.

    Sends `length` bytes of the pseudo-random block (from `offset`) with at most
    `window` bytes unechoed, optionally paced to `rate` bytes/s or pausing
    `think` seconds whenever the echo catches up; reads the greeting, the echo
    (compared byte for byte as it arrives, and by sha256 at the end) and the
    backend's sha256 trailer.  `hold_at`: stop sending there until release().
    """
    __slots__ = ('engine', 'stats', 'on_done', 'port', 'sock', 'length', 'offset', 'chunk',
                 'window', 'rate', 'think', 'hold_at', 'on_held', 'sent', 'echoed', 'sent_hash',
                 'echo_hash', 'inbuf', 'phase', 'backend', 'events', 'timer', 'next_send', 'shut',
                 'started', 'first_byte', 'ended', 'last_progress', 'error', 'held')

    def __init__(self, engine, port, length, offset, chunk=16384, window=65536, rate=0.0, think=0.0,
                 hold_at=None, on_held=None, on_done=None):
        self.engine = engine
        self.on_done = on_done
        self.port = port
        self.length = length
        self.offset = offset
        self.chunk = min(chunk, MAX_RECV)
        self.window = window
        self.rate = rate
        self.think = think
        self.hold_at = hold_at
        self.on_held = on_held
        self.held = False
        self.sent = 0
        self.echoed = 0
        self.sent_hash = hashlib.sha256()
        self.echo_hash = hashlib.sha256()
        self.inbuf = b''
        self.backend = None
        self.events = 0
        self.timer = None
        self.next_send = 0.0
        self.shut = False
        self.first_byte = None
        self.ended = None
        self.error = None
        self.sock = None
        self.started = self.last_progress = time.monotonic()
        self.phase = 'connecting'
        try:
            self.sock = socket.socket()
            self.sock.setblocking(False)
            err = self.sock.connect_ex(('127.0.0.1', port))
        except OSError as e:
            err = e.errno
        if err not in (0, errno.EINPROGRESS):
            self.fail('connect: %s' % os.strerror(err))
            return
        self._set_events(EVENT_WRITE)

    # -- events -------------------------------------------------------------

    def _on_event(self, mask):
        if self.phase == 'connecting':
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.fail('connect: %s' % os.strerror(err))
                return
            self.phase = 'greeting'
            self.last_progress = time.monotonic()
            self._set_events(EVENT_READ)
            self.pump()
            return
        if mask & EVENT_READ:
            self._on_readable()
        if mask & EVENT_WRITE and self.phase != 'done':
            self.pump()

    def _on_readable(self):
        try:
            data = self.sock.recv(MAX_RECV)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.fail('reset: %s in phase %s' % (os.strerror(e.errno or 0), self.phase))
            return
        now = time.monotonic()
        if not data:
            if self.phase == 'eof':
                self.finish()
            else:
                self.fail('eof-early: in phase %s' % self.phase)
            return
        self.last_progress = now
        if self.first_byte is None:
            self.first_byte = now
        view = memoryview(data)
        while view:
            phase = self.phase
            if phase == 'echo':
                n = min(len(view), self.sent - self.echoed)
                if n == 0:
                    self.fail('corrupt: %d byte(s) beyond what was sent, at %d' % (len(view), self.echoed))
                    return
                part = view[:n]
                start = (self.offset + self.echoed) % BLOCK_SIZE
                expected = data_block()[start:start + n]
                if expected != part:
                    at = next(i for i in range(n) if expected[i] != part[i])
                    self.fail('corrupt: echo differs at byte %d' % (self.echoed + at))
                    return
                self.echo_hash.update(part)
                self.echoed += n
                view = view[n:]
                if self.echoed == self.length:
                    self.phase = 'trailer'
                elif self.echoed == self.sent:
                    if self.think and not self.held:
                        self.next_send = now + self.think
                    if self.hold_at is not None and self.echoed == self.hold_at and not self.held:
                        self.held = True
                        if self.on_held is not None:
                            self.on_held(self)
            elif phase == 'greeting' or phase == 'trailer':
                self.inbuf += bytes(view)
                view = view[len(view):]
                end = self.inbuf.find(b'\n')
                if end < 0:
                    if len(self.inbuf) > 200:
                        self.fail('corrupt: no newline in %s' % phase)
                    return
                line, rest = self.inbuf[:end], self.inbuf[end + 1:]
                self.inbuf = b''
                if phase == 'greeting':
                    if not line.startswith(GREETING_PREFIX):
                        self.fail('corrupt: greeting %r' % line[:40])
                        return
                    self.backend = line[len(GREETING_PREFIX):].decode('ascii', 'replace')
                    self.phase = 'echo' if self.length else 'trailer'
                else:
                    expected_line = ('%s %d' % (self.sent_hash.hexdigest(), self.sent)).encode()
                    if line != expected_line:
                        self.fail('digest: backend got %r, we sent %r' % (line[:80], expected_line))
                        return
                    self.phase = 'eof'
                view = memoryview(rest)
            else:  # 'eof': the trailer was the last thing the backend may send
                self.fail('corrupt: %d byte(s) after the trailer' % len(view))
                return
        self.pump()

    # -- sending ------------------------------------------------------------

    def pump(self):
        """Send what the window, the pace and a hold allow; ask for writability only when refused."""
        if self.phase in ('connecting', 'done'):
            return
        want_write = False
        data = data_block()
        while self.sent < self.length:
            if self.held:
                break
            now = time.monotonic()
            if self.next_send > now:
                if self.timer is None:
                    self.timer = self.engine.call_at(self.next_send, self._on_timer)
                break
            limit = self.length if self.hold_at is None else self.hold_at
            room = min(self.window - (self.sent - self.echoed), limit - self.sent, self.chunk)
            if room <= 0:
                break
            start = (self.offset + self.sent) % BLOCK_SIZE
            try:
                count = self.sock.send(data[start:start + room])
            except (BlockingIOError, InterruptedError):
                count = 0
            except OSError as e:
                self.fail('reset: send: %s in phase %s' % (os.strerror(e.errno or 0), self.phase))
                return
            if count:
                self.sent_hash.update(data[start:start + count])
                self.sent += count
                self.last_progress = now
                if self.rate:
                    self.next_send = max(self.next_send, now) + count / self.rate
            if count < room:
                want_write = True
                break
        if self.sent == self.length and not self.shut:
            self.shut = True
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the read side reports what happened
        self._set_events(EVENT_READ | EVENT_WRITE if want_write else EVENT_READ)

    def _on_timer(self):
        self.timer = None
        self.pump()

    def release(self, think=None):
        """Send the rest after a hold_at stop."""
        self.held = False
        self.hold_at = None
        if think is not None:
            self.think = think
        self.last_progress = time.monotonic()
        self.pump()

    # -- ending -------------------------------------------------------------

    def finish(self):
        if self.sent != self.length or self.echoed != self.length:
            self.fail('eof-early: %d sent, %d echoed of %d' % (self.sent, self.echoed, self.length))
        elif self.echo_hash.digest() != self.sent_hash.digest():
            self.fail('digest: echo sha256 differs')  # cannot happen after the byte compare; belt and braces
        else:
            self._end(None)

    def fail(self, error):
        if self.phase != 'done':
            self._end(error)

    def _end(self, error):
        self.error = error
        self.phase = 'done'
        self.ended = time.monotonic()
        if self.timer is not None:
            self.timer[2] = None
            self.timer = None
        if self.sock is not None:
            self._set_events(0)
            self.sock.close()
        if self.on_done is not None:
            self.on_done(self)

    def _set_events(self, events):
        if events != self.events:
            selector = self.engine.selector
            if not self.events:
                selector.register(self.sock, events, self._on_event)
            elif not events:
                selector.unregister(self.sock)
            else:
                selector.modify(self.sock, events, self._on_event)
            self.events = events


def sweep_stalled(streams, stall_timeout, now):
    """Fail streams with no progress for stall_timeout seconds (held ones are waiting on us)."""
    for stream in list(streams):
        if not stream.held and now - stream.last_progress > stall_timeout:
            stream.fail('stalled: %.0f s without progress in phase %s' % (now - stream.last_progress,
                                                                          stream.phase))


# ---------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------

class Report(object):
    """Rows of (criterion, figure, limit, pass|fail|info) plus free-form figures for the JSON."""

    def __init__(self, scenario, params):
        self.scenario = scenario
        self.params = params
        if WORKERS:
            params['workers'] = WORKERS
        self.rows = []
        self.figures = collections.OrderedDict()
        self.notes = []

    def check(self, criterion, figure, limit, ok):
        self.rows.append((criterion, str(figure), str(limit), 'pass' if ok else 'FAIL'))
        return ok

    def info(self, criterion, figure):
        self.rows.append((criterion, str(figure), '-', 'info'))

    def row(self, criterion):
        for row in self.rows:
            if row[0] == criterion:
                return row
        raise KeyError(criterion)

    @property
    def ok(self):
        return all(row[3] != 'FAIL' for row in self.rows)

    def failed(self):
        return [row[0] for row in self.rows if row[3] == 'FAIL']

    def table(self):
        header = ('criterion', 'figure', 'limit', 'result')
        widths = [max(len(header[i]), max([len(r[i]) for r in self.rows] or [0])) for i in range(4)]
        lines = ['%s  %s' % (self.scenario.upper(), ' '.join('%s=%s' % kv for kv in self.params.items()))]
        for row in [header] + self.rows:
            lines.append('  '.join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        for note in self.notes:
            lines.append('note: ' + note)
        lines.append('%s: %s' % (self.scenario.upper(), 'PASS' if self.ok else 'FAIL (%s)' % ', '.join(self.failed())))
        return '\n'.join(lines)

    def as_dict(self):
        return collections.OrderedDict([
            ('scenario', self.scenario), ('ok', self.ok), ('params', self.params),
            ('rows', [dict(zip(('criterion', 'figure', 'limit', 'result'), r)) for r in self.rows]),
            ('figures', self.figures), ('notes', self.notes)])


def _say(progress, text):
    if progress:
        progress('[%s] %s' % (time.strftime('%H:%M:%S'), text))


def _finish_balancer(report, balancer, base_fds, fd_timeout=10.0, access=None):
    """The end-of-run checks every scenario shares: fds back, clean stop, a clean log.

    access: (ends, bytes_in) the balancer's access log should show, e.g.
    ({'done': 1000}, 123456); None to only report what it shows.  Skipped when
    the balancer writes no access log.
    """
    end_fds = balancer.wait_fds(base_fds, fd_timeout)
    report.check('balancer fds back to baseline', '%d (baseline %d)' % (end_fds, base_fds),
                 '<= %d' % base_fds, end_fds <= base_fds)
    # Every pair is closed once the fds are back; its access line is written within
    # the balancer's flush interval (50 ms) after that, so allow it a moment.
    summary = balancer.access_summary()
    deadline = time.monotonic() + 2.0
    while summary is not None and access is not None and time.monotonic() < deadline and (
            dict(summary[0]) != access[0] or (access[1] is not None and summary[1] != access[1])):
        time.sleep(0.05)
        summary = balancer.access_summary()
    if summary is not None:
        ends, bytes_in, bytes_out = summary
        report.figures['access_log'] = {'ends': dict(ends), 'bytes_in': bytes_in, 'bytes_out': bytes_out}
        figure = '%s, bytes_in %d' % (', '.join('%s %d' % kv for kv in sorted(ends.items())), bytes_in)
        if access is None:
            report.info('balancer access log', figure)
        else:
            want_ends, want_in = access
            limit = '%s, bytes_in %s' % (', '.join('%s %d' % kv for kv in sorted(want_ends.items())),
                                         '-' if want_in is None else want_in)
            report.check('balancer access log agrees', figure, limit,
                         dict(ends) == want_ends and (want_in is None or bytes_in == want_in))
    report.figures['fds_baseline'] = base_fds
    report.figures['fds_end'] = end_fds
    report.figures['balancer_cpu_s'] = round(balancer.cpu(), 2)
    # Other work on the box shows up in the figures: say how much there was.
    elapsed = time.monotonic() - balancer.started
    pressure, delay = cpu_pressure(), run_delay(balancer.pid)
    parts = []
    if pressure is not None and balancer.pressure0 is not None:
        share = (pressure - balancer.pressure0) / 1e6 / elapsed
        report.figures['cpu_pressure_some'] = round(share, 3)
        parts.append('some task waited for a CPU %.0f%% of the time (PSI)' % (share * 100))
    if delay is not None and balancer.delay0 is not None:
        report.figures['balancer_run_delay_s'] = round(delay - balancer.delay0, 2)
        parts.append('the balancer waited %.1f s in the run queue' % (delay - balancer.delay0))
    if parts:
        report.info('CPU contention over %.0f s' % elapsed, '; '.join(parts))
    code = balancer.stop()
    problems = balancer.problems()
    report.check('balancer log: tracebacks / ERROR lines', len(problems), 0, not problems)
    for line in problems[:5]:
        report.notes.append('log: ' + line[:300])
    report.check('balancer exit status after SIGTERM', code, 0, code == 0)


# ---------------------------------------------------------------------------
# G1: long-lived bidirectional streams, every byte checked; RSS and fds
# ---------------------------------------------------------------------------

def run_g1(streams=2000, duration=1800.0, rate=8e6, backends=2, python=None, seed=1,
           stream_seconds=None, warmup=None, rss_limit=0.10, stall=60.0, idle_timeout=None, progress=None,
           keep=None):
    """`streams` concurrent echo streams for `duration` s, each replaced when it ends.

    rate: bytes/s all streams together send (the echo doubles what the balancer
    relays); 0 = as fast as they go.  Streams average `stream_seconds` at their
    pace, so many thousands complete over a long run.  idle_timeout: write
    <timeouts idle=N/> (the balancer's default is 3600 s).
    """
    if stream_seconds is None:
        stream_seconds = min(20.0, max(0.5, duration / 30.0))
    if warmup is None:
        warmup = min(300.0, duration * 0.1)
    per_stream = rate / float(streams) if rate else 0.0
    mean_length = int(per_stream * stream_seconds) if rate else 256 * 1024
    mean_length = max(mean_length, 1024)
    params = collections.OrderedDict([
        ('pydirector', PYDIRECTOR), ('streams', streams), ('duration_s', duration), ('rate_Bps', rate),
        ('backends', backends), ('mean_stream_bytes', mean_length), ('warmup_s', warmup),
        ('idle_timeout', idle_timeout),
        ('python', python or sys.executable)])
    report = Report('g1', params)
    raise_nofile()
    rng = random.Random(seed)
    data_block()
    with Rig(python, keep) as rig:
        hosts = rig.start_backends(backends, 'echo')
        extra = '    <timeouts idle="%g"/>\n' % idle_timeout if idle_timeout else ''
        balancer = rig.start_balancer(service_xml(hosts, 'leastconns', extra=extra))
        base_fds = balancer.fds()
        engine = Engine()
        stats = StreamStats()
        open_streams = set()
        to_start = []
        samples = []   # (t, rss, fds, open streams)
        pipe_peak = 0

        def done(stream):
            open_streams.discard(stream)
            stats.add(stream)
            to_start.append(1)

        def start():
            stats.started += 1
            length = rng.randint(1, 2 * mean_length)
            s = Stream(engine, balancer.port, length, rng.randrange(BLOCK_SIZE),
                       chunk=rng.randint(512, 32768), window=65536, rate=per_stream, on_done=done)
            if s.phase != 'done':
                open_streams.add(s)

        t0 = time.monotonic()
        end = t0 + duration
        ramp = min(2.0, duration / 4.0)
        launched = 0
        sample_every = max(0.2, min(5.0, duration / 200.0))
        next_sample = t0
        report_every = max(10.0, duration / 20.0)
        next_report = t0 + report_every
        next_sweep = t0 + 1
        draining = False
        while True:
            now = time.monotonic()
            if now >= next_sample:
                samples.append((now - t0, balancer.rss(), balancer.fds(), len(open_streams)))
                pipe_peak = max(pipe_peak, balancer.pipe_bytes())
                next_sample += sample_every
            if now < end:
                target = streams if now - t0 >= ramp else int(streams * (now - t0) / ramp) + 1
                while launched < target:
                    launched += 1
                    start()
                for _ in range(len(to_start)):  # replacements; one that fails at once waits a turn
                    to_start.pop()
                    start()
            elif not draining:
                draining = True
                del to_start[:]
                for s in list(open_streams):  # let the last streams finish at full speed
                    s.rate = 0.0
                    s.next_send = 0.0
                    s.pump()
                drain_deadline = now + stall
            if draining and (not open_streams or now > drain_deadline):
                break
            if now >= next_sweep:
                sweep_stalled(open_streams, stall, now)
                next_sweep = now + 1
            if now >= next_report:
                _say(progress, 'g1 %.0fs: %d open, %d ok, %d failed, %s echoed, balancer rss %s fds %d' % (
                    now - t0, len(open_streams), stats.ok, stats.failed, mib(stats.bytes_echoed),
                    mib(samples[-1][1]), samples[-1][2]))
                next_report += report_every
            engine.run_once(0.05)
        for s in list(open_streams):
            s.fail('stalled: still open %.0f s after the end' % stall)
        elapsed = time.monotonic() - t0
        engine.close()

        report.check('streams failed', '%d of %d' % (stats.failed, stats.ok + stats.failed), 0,
                     stats.failed == 0 and stats.ok > 0)
        report.check('bytes lost or corrupted', '%d lost, %d corrupt stream(s)' % (stats.bytes_missing, stats.corrupt),
                     0, stats.bytes_missing == 0 and stats.corrupt == 0)
        for example in stats.examples[:5]:
            report.notes.append('failure: ' + example)
        if stats.failures:
            report.notes.append('failures by kind: %s' % dict(stats.failures))
        report.info('streams completed (sha256 checked both ways)', '{:,}'.format(stats.ok))
        report.info('bytes echoed through the balancer', '%s each way, %.2f MB/s' % (
            mib(stats.bytes_echoed), stats.bytes_echoed / elapsed / 1e6))
        during = [s for s in samples if s[0] <= duration]
        after_warmup = [s for s in during if s[0] >= warmup]
        if len(after_warmup) >= 2:
            n = max(1, len(after_warmup) // 10)
            base_rss = median([s[1] for s in after_warmup[:n]])
            end_rss = median([s[1] for s in after_warmup[-n:]])
            peak_rss = max(s[1] for s in after_warmup)
            drift = (end_rss - base_rss) / float(base_rss)
            report.check('RSS drift after warm-up', '%+.1f%% (%s -> %s, peak %s)' % (
                drift * 100, mib(base_rss), mib(end_rss), mib(peak_rss)),
                '< %g%%' % (rss_limit * 100), abs(drift) < rss_limit)
            report.figures['rss_after_warmup'] = base_rss
            report.figures['rss_end'] = end_rss
            report.figures['rss_peak'] = peak_rss
        else:
            report.check('RSS drift after warm-up', 'too few samples', '< %g%%' % (rss_limit * 100), False)
        report.figures['rss_start'] = samples[0][1] if samples else None
        report.figures['fds_peak'] = max(s[2] for s in samples) if samples else None
        # Spliced streams hold their bytes in pipes, kernel memory outside RSS.
        report.info('pipe buffers at most (outside RSS)', mib(pipe_peak))
        report.figures['pipe_bytes_peak'] = pipe_peak
        report.figures['client_cpu_s'] = round(self_cpu(), 2)
        report.figures['streams_ok'] = stats.ok
        report.figures['streams_failed'] = stats.failed
        report.figures['bytes_echoed'] = stats.bytes_echoed
        report.figures['elapsed_s'] = round(elapsed, 1)
        report.figures['rss_samples'] = [(round(s[0], 1), s[1], s[2], s[3])
                                         for s in samples[::max(1, len(samples) // 60)]]
        _finish_balancer(report, balancer, base_fds,
                         access=None if stats.failed else ({'done': stats.ok}, stats.bytes_sent))
        report.info('balancer CPU', '%.1f s over %.0f s' % (report.figures['balancer_cpu_s'], elapsed))
        rig.failed = not report.ok
    return report


# ---------------------------------------------------------------------------
# G2: new connections per second, connect-to-first-byte
# ---------------------------------------------------------------------------

class Hit(object):
    """One short connection: connect, time the first byte, read to EOF (half-closing first
    when run.client_closes)."""
    __slots__ = ('run', 'sock', 'started', 'got')

    def __init__(self, run, port):
        self.run = run
        self.got = 0
        self.started = time.monotonic()
        try:
            self.sock = socket.socket()
        except OSError as e:
            run.failed('client socket: %s' % os.strerror(e.errno or 0))
            return
        self.sock.setblocking(False)
        err = self.sock.connect_ex(('127.0.0.1', port))
        if err not in (0, errno.EINPROGRESS):
            self.sock.close()
            run.failed('connect: %s' % os.strerror(err))
            return
        # A failed non-blocking connect is reported as readable too (EPOLLERR), so READ is enough.
        run.engine.selector.register(self.sock, EVENT_READ, self.on_event)
        run.open.add(self)

    def on_event(self, mask):
        while True:
            try:
                data = self.sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self.end('reset: %s' % os.strerror(e.errno or 0))
                return
            if not data:
                self.end(None if self.got else 'eof before the first byte')
                return
            if not self.got:
                self.run.latencies.append(time.monotonic() - self.started)
                if not data.startswith(GREETING_PREFIX):
                    self.end('corrupt greeting %r' % data[:40])
                    return
                if self.run.client_closes:
                    try:
                        self.sock.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass  # the next recv says what happened
            self.got += len(data)

    def end(self, error):
        self.run.engine.selector.unregister(self.sock)
        self.sock.close()
        self.run.open.discard(self)
        if error is None:
            self.run.ok += 1
        else:
            self.run.failed(error)


class HitRun(object):
    def __init__(self, engine, client_closes):
        self.engine = engine
        self.client_closes = client_closes
        self.open = set()
        self.ok = 0
        self.failures = collections.Counter()
        self.examples = []
        self.latencies = array.array('d')

    def failed(self, error):
        self.failures[error.split(':')[0]] += 1
        if len(self.examples) < 10:
            self.examples.append(error)


def run_g2(rate=1500.0, duration=600.0, backends=2, python=None, latency_limit=0.020,
           rate_margin=0.98, timeout=10.0, idle_timeout=None, first_close='client', progress=None, keep=None):
    """Open `rate` new connections per second (open loop) for `duration` s.

    first_close: 'client' (the client half-closes after the greeting; the
    backend closes on EOF) or 'backend' (it closes right after the greeting,
    HTTP/1.0 style).  With one client address on loopback, 'backend' leaves
    TIME_WAIT on the listening sides, and once the ~28k ephemeral ports come
    round again (every ~19 s at 1,500/s) some SYNs meet those TIME_WAIT
    entries and are retransmitted 1 s later: a test-rig artefact that
    'client' avoids (TIME_WAIT then sits on the connecting side, which the
    kernel reuses safely).  idle_timeout: write <timeouts idle=N/> (the
    balancer's default is 3600 s).
    """
    params = collections.OrderedDict([
        ('pydirector', PYDIRECTOR), ('rate_per_s', rate), ('duration_s', duration), ('backends', backends),
        ('latency_limit_ms', latency_limit * 1000), ('idle_timeout', idle_timeout), ('first_close', first_close),
        ('python', python or sys.executable)])
    report = Report('g2', params)
    raise_nofile()
    with Rig(python, keep) as rig:
        hosts = rig.start_backends(backends, 'greet' if first_close == 'backend' else 'hello')
        extra = '    <timeouts idle="%g"/>\n' % idle_timeout if idle_timeout else ''
        balancer = rig.start_balancer(service_xml(hosts, 'roundrobin', extra=extra))
        base_fds = balancer.fds()
        rss0 = balancer.rss()
        cpu0 = balancer.cpu()
        client_cpu0 = self_cpu()
        engine = Engine()
        run = HitRun(engine, first_close == 'client')
        # The schedule is `total` connections, one every 1/rate s.  If we fall behind it, the
        # last one starts late and the achieved rate (total over the time it took) shows it.
        total = max(1, int(rate * duration))
        started = 0
        max_burst = max(1, int(rate * 0.02))   # never more than 20 ms worth at once
        max_open = 8000
        behind = 0.0                           # how far (s) the schedule slipped at worst
        t0 = time.monotonic()
        last_start = t0
        report_every = max(10.0, duration / 20.0)
        next_report = t0 + report_every
        next_sweep = t0 + 0.5
        while True:
            now = time.monotonic()
            if started < total:
                due = min(total, int((now - t0) * rate) + 1) - started
                if due > 1:
                    behind = max(behind, due / rate)
                for _ in range(min(due, max_burst, max_open - len(run.open))):
                    started += 1
                    Hit(run, balancer.port)
                last_start = time.monotonic()
                wait = t0 + started / rate - last_start
            else:
                if not run.open:
                    break
                if now > last_start + timeout + 5:
                    break
                wait = 0.05
            if now >= next_sweep:
                for hit in [h for h in run.open if now - h.started > timeout]:
                    hit.end('timeout: no EOF within %g s (%d bytes)' % (timeout, hit.got))
                next_sweep = now + 0.5
            if now >= next_report:
                _say(progress, 'g2 %.0fs: %d started, %d ok, %d failed, %d open' % (
                    now - t0, started, run.ok, sum(run.failures.values()), len(run.open)))
                next_report += report_every
            engine.run_once(max(0.0, min(wait, 0.05)))
        for hit in list(run.open):
            hit.end('timeout: still open at the end')
        engine.close()
        rss1 = balancer.rss()
        cpu = balancer.cpu() - cpu0
        failures = sum(run.failures.values())
        lat = sorted(run.latencies)
        p50, p99, p999 = percentile(lat, 0.5), percentile(lat, 0.99), percentile(lat, 0.999)
        worst = lat[-1] if lat else None

        def ms(v):
            return '-' if v is None else '%.1f ms' % (v * 1000)
        spent = last_start - t0 + 1.0 / rate   # the schedule's own length is total / rate
        achieved = started / spent
        report.check('connections failed', '%d of %d' % (failures, started), 0, failures == 0 and started > 0)
        if run.failures:
            report.notes.append('failures by kind: %s' % dict(run.failures))
        for example in run.examples[:5]:
            report.notes.append('failure: ' + example)
        report.check('new connections/s achieved', '%.0f/s (%d in %.1f s; schedule slipped %.2f s at worst)' % (
            achieved, started, spent, behind), '>= %.0f/s' % (rate * rate_margin), achieved >= rate * rate_margin)
        report.check('p99 connect-to-first-byte',
                     '%s (p50 %s, p99.9 %s, max %s)' % (ms(p99), ms(p50), ms(p999), ms(worst)),
                     '< %s' % ms(latency_limit), p99 is not None and p99 < latency_limit)
        # Latencies are stored in (about) the order connections started: tenths of the list are
        # tenths of the run, which shows whether the tail grows as the run goes on.
        tenths = []
        for i in range(10):
            part = sorted(run.latencies[len(run.latencies) * i // 10:len(run.latencies) * (i + 1) // 10])
            if part:
                tenths.append(round(percentile(part, 0.99) * 1000, 1))
        report.info('p99 by tenth of the run (ms)', ' '.join('%g' % v for v in tenths))
        report.info('balancer RSS', '%s at start, %s at the end' % (mib(rss0), mib(rss1)))
        report.info('balancer CPU per connection', '%.0f us (%.1f s for %d)' % (
            cpu / max(1, started) * 1e6, cpu, started))
        report.info('client CPU (this process)', '%.1f s' % (self_cpu() - client_cpu0))
        report.figures.update([('started', started), ('ok', run.ok), ('failed', failures),
                               ('p50_ms', p50 and p50 * 1000), ('p99_ms', p99 and p99 * 1000),
                               ('p999_ms', p999 and p999 * 1000), ('max_ms', worst and worst * 1000),
                               ('achieved_per_s', achieved), ('p99_ms_by_tenth', tenths),
                               ('rss_start', rss0), ('rss_end', rss1)])
        _finish_balancer(report, balancer, base_fds, access=None if failures else ({'done': started}, 0))
        rig.failed = not report.ok
    return report


# ---------------------------------------------------------------------------
# G3: thousands of concurrent connections, and one past the service maxconns
# ---------------------------------------------------------------------------

def probe_refusal(port, timeout=5.0):
    """Connect once more: ('refused', seconds) when closed unserved, ('served', s) or ('hang', s)."""
    started = time.monotonic()
    sock = socket.socket()
    sock.settimeout(timeout)
    try:
        sock.connect(('127.0.0.1', port))
        data = sock.recv(4096)
    except socket.timeout:
        return 'hang', time.monotonic() - started, ''
    except OSError as e:
        return 'refused', time.monotonic() - started, 'connection %s' % os.strerror(e.errno or 0).lower()
    finally:
        sock.close()
    elapsed = time.monotonic() - started
    if data:
        return 'served', elapsed, data[:40].decode('ascii', 'replace').strip()
    return 'refused', elapsed, 'EOF'


def run_g3(connections=9000, hold=10.0, backends=2, python=None, maxconns_on='service', seed=3,
           ramp=256, refuse_limit=1.0, progress=None, keep=None):
    """Hold `connections` checksummed streams open at once, try one more, then finish them all.

    maxconns_on: 'service' (<service maxconns=N>), 'host' (split over the hosts'
    maxconns) or 'none'.  If the balancer rejects <service maxconns>, the run
    goes on without it and the refusal criterion fails saying so.
    """
    params = collections.OrderedDict([
        ('pydirector', PYDIRECTOR), ('connections', connections), ('hold_s', hold), ('backends', backends),
        ('maxconns_on', maxconns_on), ('python', python or sys.executable)])
    report = Report('g3', params)
    nofile = raise_nofile()
    rng = random.Random(seed)
    data_block()
    if nofile is not None and nofile < connections + 100:
        report.notes.append('client open-file limit %d < %d: expect connect failures' % (nofile, connections + 100))
    with Rig(python, keep) as rig:
        hosts = rig.start_backends(backends, 'echo')
        unsupported = None
        if maxconns_on == 'host':
            per_host, spare = divmod(connections, backends)
            for i, b in enumerate(hosts):
                b.maxconns = per_host + (1 if i < spare else 0)
            xml = service_xml(hosts, 'leastconns')
            for b in hosts:
                xml = xml.replace('ip="127.0.0.1:%d"/>' % b.port,
                                  'ip="127.0.0.1:%d" maxconns="%d"/>' % (b.port, b.maxconns))
        elif maxconns_on == 'service':
            xml = service_xml(hosts, 'leastconns', ' maxconns="%d"' % connections)
        else:
            xml = service_xml(hosts, 'leastconns')
        try:
            balancer = rig.start_balancer(xml)
        except BalancerStartError as e:
            if maxconns_on != 'service' or 'maxconns' not in str(e):
                raise
            unsupported = str(e).splitlines()[-1]
            report.notes.append('this pydirector rejects <service maxconns>: %s' % unsupported)
            balancer = rig.start_balancer(service_xml(hosts, 'leastconns'))
        base_fds = balancer.fds()
        base_rss = balancer.rss()
        engine = Engine()
        stats = StreamStats()
        open_streams = set()
        held = []

        def done(stream):
            open_streams.discard(stream)
            stats.add(stream)

        def on_held(stream):
            held.append(stream)

        t0 = time.monotonic()
        launched = 0
        deadline = t0 + 120 + connections / 100.0
        next_sweep = t0 + 1
        next_report = t0 + 10
        # Phase 1: open them all, each one sending a first message and waiting for its echo.
        while len(held) + stats.failed < connections and time.monotonic() < deadline:
            while launched < connections and launched - len(held) - stats.failed < ramp:
                launched += 1
                stats.started += 1
                first = rng.randint(1, 4096)
                s = Stream(engine, balancer.port, first + rng.randint(1, 16384), rng.randrange(BLOCK_SIZE),
                           chunk=16384, window=65536, hold_at=first, on_held=on_held, on_done=done)
                if s.phase != 'done':
                    open_streams.add(s)
            engine.run_once(0.05)
            now = time.monotonic()
            if now >= next_sweep:
                sweep_stalled(open_streams, 30.0, now)
                next_sweep = now + 1
            if now >= next_report:
                _say(progress, 'g3 %.0fs: %d held open, %d failed' % (now - t0, len(held), stats.failed))
                next_report = now + 10
        open_time = time.monotonic() - t0
        all_open = len([s for s in held if s.phase != 'done'])
        full_fds = balancer.fds()
        full_rss = balancer.rss()
        _say(progress, 'g3: %d open after %.1f s; balancer fds %d, rss %s' % (
            all_open, open_time, full_fds, mib(full_rss)))
        report.check('connections open at once (first message echoed)', '%d in %.1f s' % (all_open, open_time),
                     connections, all_open == connections)
        # Phase 2: hold them, and try one more while they are all open.
        hold_end = time.monotonic() + hold
        outcome = probe_refusal(balancer.port)
        while time.monotonic() < hold_end:
            engine.run_once(0.1)
        if maxconns_on == 'none':
            report.info('connection past the limit', 'no maxconns configured; it was %s after %.3f s' % outcome[:2])
        elif unsupported:
            report.check('connection past maxconns closed at once', 'not supported: <service maxconns> rejected',
                         'closed < %g s' % refuse_limit, False)
        else:
            report.check('connection past maxconns closed at once', '%s after %.3f s (%s)' % outcome,
                         'closed < %g s' % refuse_limit, outcome[0] == 'refused' and outcome[1] < refuse_limit)
        # Phase 3: finish every stream, checking every byte.
        for s in held:
            s.release()
        deadline = time.monotonic() + 120
        while open_streams and time.monotonic() < deadline:
            engine.run_once(0.05)
            now = time.monotonic()
            if now >= next_sweep:
                sweep_stalled(open_streams, 30.0, now)
                next_sweep = now + 1
        for s in list(open_streams):
            s.fail('stalled: still open at the end')
        report.check('checksummed streams failed', '%d of %d' % (stats.failed, stats.ok + stats.failed), 0,
                     stats.failed == 0 and stats.ok == connections)
        if stats.failures:
            report.notes.append('failures by kind: %s' % dict(stats.failures))
        for example in stats.examples[:5]:
            report.notes.append('failure: ' + example)
        # Phase 4: with everything closed, a new client is served again.
        fds_now = balancer.wait_fds(base_fds)
        after = Stream(engine, balancer.port, 1000, 0, on_done=lambda s: None)
        deadline = time.monotonic() + 10
        while after.phase != 'done' and time.monotonic() < deadline:
            engine.run_once(0.05)
        after.fail('stalled: no answer within 10 s')
        report.check('a new client is served afterwards', after.error or 'served', 'served', after.error is None)
        engine.close()
        report.info('balancer memory per open connection', '%.1f KiB (rss %s -> %s, fds %d -> %d)' % (
            (full_rss - base_rss) / 1024.0 / max(1, all_open), mib(base_rss), mib(full_rss), base_fds, full_fds))
        report.figures.update([('open_at_once', all_open), ('open_seconds', round(open_time, 2)),
                               ('refusal', outcome[0]), ('refusal_s', round(outcome[1], 4)),
                               ('rss_base', base_rss), ('rss_full', full_rss), ('fds_full', full_fds),
                               ('fds_after_close', fds_now), ('service_maxconns_supported', unsupported is None)])
        expected = None
        if report.ok and maxconns_on == 'service' and not unsupported:
            expected = ({'done': connections + 1, 'full': 1}, stats.bytes_sent + after.sent)
        _finish_balancer(report, balancer, base_fds, access=expected)
        rig.failed = not report.ok
    return report


# ---------------------------------------------------------------------------
# G6: SIGKILL or SIGSTOP one of 3 backends every period, under load
# ---------------------------------------------------------------------------

LOG_RESOLUTION = 0.001    # the balancer's log stamps are in ms


class Fault(object):
    __slots__ = ('host', 'kind', 'at', 'recovered', 'detected', 'back_up')

    def __init__(self, host, kind, at):
        self.host = host
        self.kind = kind
        self.at = at                # epoch seconds
        self.recovered = None       # when restarted (kill) or continued (stop)
        self.detected = None        # the balancer's first 'down' line for it after `at`
        self.back_up = None         # its first 'up' line after recovering

    def undetected_until(self):
        """The end of the window where new clients may still be sent to the faulty host."""
        if self.detected is not None and (self.recovered is None or self.detected < self.recovered):
            return self.detected
        return self.recovered


class FaultDriver(threading.Thread):
    """Every `period` s: SIGKILL (then restart) or SIGSTOP (then SIGCONT) the next backend."""

    def __init__(self, backends, period, fault_seconds, cycles, first_at):
        threading.Thread.__init__(self, name='soak-faults', daemon=True)
        self.backends = backends
        self.period = period
        self.fault_seconds = fault_seconds
        self.cycles = cycles
        self.first_at = first_at
        self.faults = []
        self.errors = []
        self.stopped = threading.Event()

    def run(self):
        i = 0
        next_at = self.first_at
        while (self.cycles is None or i < self.cycles) and not self.stopped.is_set():
            if self.stopped.wait(max(0.0, next_at - time.monotonic())):
                return
            backend = self.backends[i % len(self.backends)]
            kind = 'kill' if i % 2 == 0 else 'stop'
            try:
                fault = Fault(backend.name, kind, time.time())
                if kind == 'kill':
                    backend.kill()
                else:
                    backend.stop()
                self.faults.append(fault)
                self.stopped.wait(self.fault_seconds)
                if kind == 'kill':
                    backend.restart()
                else:
                    backend.cont()
                fault.recovered = time.time()
            except Exception as e:  # report it; the run carries on with what is left
                self.errors.append('%s %s: %r' % (kind, backend.name, e))
            i += 1
            next_at += self.period

    def stop(self):
        self.stopped.set()
        self.join(30)


def run_g6(clients=500, duration=600.0, period=2.0, fault_seconds=1.5, cycles=None, check_interval=0.5,
           check_timeout=0.5, python=None, seed=6, orphan_limit=1.0, stop_orphans_must_close=True,
           progress=None, keep=None):
    """`clients` echo streams in a loop while a FaultDriver hurts one of 3 backends every `period` s.

    Each stream sends 2-6 messages of up to 16 KiB, pausing 50-400 ms after
    each echo, so many are open (orphans) when their backend is hit.  With
    `cycles`, the run ends after that many faults (plus one period).
    """
    if cycles is not None:
        duration = period * (cycles + 1)
    params = collections.OrderedDict([
        ('pydirector', PYDIRECTOR), ('clients', clients), ('duration_s', duration), ('period_s', period),
        ('fault_s', fault_seconds),
        ('cycles', cycles), ('check', 'interval=%g timeout=%g fall=1 rise=1' % (check_interval, check_timeout)),
        ('python', python or sys.executable)])
    report = Report('g6', params)
    raise_nofile()
    rng = random.Random(seed)
    data_block()
    with Rig(python, keep) as rig:
        hosts = rig.start_backends(3, 'echo')
        check = ('    <check interval="%g" timeout="%g" fall="1" rise="1" expect="soak" on_down="close"/>\n'
                 '    <timeouts connect="1"/>\n' % (check_interval, check_timeout))
        balancer = rig.start_balancer(service_xml(hosts, 'leastconns', extra=check))
        base_fds = balancer.fds()
        engine = Engine()
        stats = StreamStats(keep_records=True)
        open_streams = set()
        to_start = []

        def done(stream):
            open_streams.discard(stream)
            stats.add(stream)
            to_start.append(1)

        def start():
            stats.started += 1
            messages = rng.randint(2, 6)
            size = rng.randint(1, 16384)
            s = Stream(engine, balancer.port, messages * size, rng.randrange(BLOCK_SIZE), chunk=size,
                       window=size, think=rng.uniform(0.05, 0.4), on_done=done)
            if s.phase != 'done':
                open_streams.add(s)

        t0 = time.monotonic()
        end = t0 + duration
        driver = FaultDriver(hosts, period, fault_seconds, cycles, t0 + min(period, duration / 4.0))
        driver.start()
        ramp = min(1.0, period / 2.0)
        launched = 0
        next_sweep = t0 + 1
        report_every = max(10.0, duration / 20.0)
        next_report = t0 + report_every
        ending = False
        try:
            while True:
                now = time.monotonic()
                if now < end:
                    target = clients if now - t0 >= ramp else int(clients * (now - t0) / ramp) + 1
                    while launched < target:
                        launched += 1
                        start()
                    for _ in range(len(to_start)):
                        to_start.pop()
                        start()
                else:
                    if not ending:  # the last streams skip their pauses, so the run ends promptly
                        ending = True
                        del to_start[:]
                        for s in list(open_streams):
                            s.think = 0.0
                            s.next_send = 0.0
                            s.pump()
                    if not open_streams or now > end + 30:
                        break
                if now >= next_sweep:
                    sweep_stalled(open_streams, 10.0, now)
                    next_sweep = now + 1
                if now >= next_report:
                    _say(progress, 'g6 %.0fs: %d faults, %d open, %d ok, %d failed' % (
                        now - t0, len(driver.faults), len(open_streams), stats.ok, stats.failed))
                    next_report += report_every
                engine.run_once(0.05)
        finally:
            driver.stop()
        for s in list(open_streams):
            s.fail('stalled: still open at the end')
        engine.close()
        g6_classify(report, driver, balancer, stats, engine, orphan_limit, stop_orphans_must_close)
        _finish_balancer(report, balancer, base_fds)
        rig.failed = not report.ok
    return report


def g6_classify(report, driver, balancer, stats, engine, orphan_limit, stop_orphans_must_close):
    """Sort every stream into orphan / at risk / ordinary and turn that into rows."""
    faults = driver.faults
    events = balancer.host_events()
    for fault in faults:
        for when, host, state, cause in events:
            if host != fault.host:
                continue
            if state == 'down' and fault.detected is None and when >= fault.at - 0.005:
                fault.detected = when
            if (state == 'up' and fault.recovered is not None and fault.back_up is None
                    and when >= fault.recovered - 0.005):
                fault.back_up = when
    wall = engine.wall
    orphans = {'kill': [], 'stop': []}    # (fault, record)
    at_risk = []
    ordinary = []
    for record in stats.records:
        backend, error, started, ended, first_byte = record
        start_w, end_w = wall(started), wall(ended)
        orphan_of = None
        for fault in faults:
            # Open when its host was hit: a known host that matches, or one we never heard from.
            if start_w < fault.at <= end_w and (backend == fault.host or backend is None):
                if backend is None and error is None:
                    continue
                orphan_of = fault
                break
        if orphan_of is not None:
            orphans[orphan_of.kind].append((orphan_of, record))
            continue
        # The log's stamps are cut to the ms: a stream within 1 ms of a detection line may be
        # the very connect that caused it, so it counts as at risk.
        risky = any(fault.at <= start_w <= (fault.undetected_until() or fault.at + 1e9) + LOG_RESOLUTION
                    for fault in faults)
        (at_risk if risky else ordinary).append(record)

    report.info('faults applied', '%d (%d SIGKILL, %d SIGSTOP)' % (
        len(faults), len([f for f in faults if f.kind == 'kill']), len([f for f in faults if f.kind == 'stop'])))
    for error in driver.errors[:5]:
        report.notes.append('fault driver: ' + error)
    for kind in ('kill', 'stop'):
        lat = sorted(f.detected - f.at for f in faults if f.kind == kind and f.detected is not None)
        missed = len([f for f in faults if f.kind == kind and f.detected is None])
        if lat or missed:
            report.info('%s detected by the balancer' % ('SIGKILL' if kind == 'kill' else 'SIGSTOP'),
                        '%d of %d; after median %.2f s, max %.2f s' % (
                            len(lat), len(lat) + missed, median(lat) if lat else 0, lat[-1] if lat else 0))
    bad = [r for r in ordinary if r[1] is not None]
    after_detection = [r for r in ordinary if any(
        f.detected is not None and f.detected + LOG_RESOLUTION < wall(r[2]) <= (f.recovered or 1e18) for f in faults)]
    served_after = len([r for r in after_detection if r[1] is None])
    report.check('connections made after detection served', '%d of %d' % (served_after, len(after_detection)),
                 '100%', served_after == len(after_detection))
    report.check('other connections (not orphans, not in an undetected window) failed',
                 '%d of %d' % (len(bad), len(ordinary)), 0, not bad and ordinary)
    for r in bad[:5]:
        report.notes.append('failure: %s (backend %s, started %.3f)' % (r[1], r[0], wall(r[2])))
    risky_ok = len([r for r in at_risk if r[1] is None])
    report.info('connections made before detection served', '%d of %d' % (risky_ok, len(at_risk)))
    # The error up to ' in phase', e.g. 'connect: Connection reset by peer' (the balancer accepted,
    # then reset, before this loop saw the connect finish).
    risky_failures = collections.Counter(
        r[1].split(' in phase')[0] + (' (host %s)' % r[0] if r[0] else ' (no greeting)')
        for r in at_risk if r[1] is not None)
    if risky_failures:
        report.notes.append('before-detection failures: %s' % dict(risky_failures))

    kill = orphans['kill']
    closed = sorted((wall(r[3]) - f.at) for f, r in kill if r[1] is not None)
    finished = len(kill) - len(closed)
    worst = closed[-1] if closed else 0.0
    late = [t for t in closed if t > orphan_limit]
    report.check('SIGKILL orphans closed', '%d closed: median %.3f s, p99 %.3f s, max %.3f s after the kill, '
                 '%d later than %g s; %d finished first' % (
                     len(closed), median(closed) or 0, percentile(closed, 0.99) or 0, worst, len(late),
                     orphan_limit, finished), '<= %g s' % orphan_limit, not late)
    stop = orphans['stop']
    # A stop orphan either ends before SIGCONT (closed by the balancer, or its last bytes were
    # already on their way) or stalls until SIGCONT and is then finished (or failed) by the host.
    stop_closed = [wall(r[3]) - f.at for f, r in stop
                   if r[1] is not None and (f.recovered is None or wall(r[3]) < f.recovered)]
    finished = len([1 for f, r in stop if r[1] is None and f.recovered is not None and wall(r[3]) < f.recovered])
    resumed = [wall(r[3]) - f.at for f, r in stop
               if r[1] is None and (f.recovered is None or wall(r[3]) >= f.recovered)]
    failed_later = len(stop) - len(stop_closed) - finished - len(resumed)
    late_closed = len([t for t in stop_closed if t > orphan_limit])
    stalled = len(resumed) + failed_later + late_closed
    figure = ('%d of %d closed by the balancer (max %.2f s); %d stalled until SIGCONT then finished '
              '(up to %.2f s after the stop); %d failed after SIGCONT; %d finished before SIGCONT' % (
                  len(stop_closed), len(stop), max(stop_closed) if stop_closed else 0, len(resumed),
                  max(resumed) if resumed else 0, failed_later, finished))
    if stop_orphans_must_close:
        report.check('SIGSTOP orphans closed', figure, '<= %g s' % orphan_limit, stalled == 0)
    else:
        report.info('SIGSTOP orphans', figure)
    if stop and stalled:
        report.notes.append('connections to a SIGSTOPped host are kept open by the balancer (marking a host '
                            'down does not close its connections): they stall until SIGCONT or the idle timeout')
    report.figures.update([
        ('faults', [collections.OrderedDict([('host', f.host), ('kind', f.kind), ('at', round(f.at, 3)),
                                             ('detected_after', f.detected and round(f.detected - f.at, 3)),
                                             ('recovered_after', f.recovered and round(f.recovered - f.at, 3)),
                                             ('up_after', f.back_up and round(f.back_up - f.at, 3))])
                    for f in faults]),
        ('streams', len(stats.records)), ('ok', stats.ok), ('failed', stats.failed),
        ('kill_orphans', len(kill)), ('kill_orphans_closed_max_s', round(worst, 3)),
        ('stop_orphans', len(stop)), ('stop_orphans_closed', len(stop_closed)),
        ('stop_orphans_resumed', len(resumed)), ('at_risk', len(at_risk)), ('at_risk_ok', risky_ok),
        ('ordinary', len(ordinary)), ('ordinary_failed', len(bad)), ('after_detection', len(after_detection))])
    if stats.failures:
        report.notes.append('stream endings other than ok, by kind: %s' % dict(stats.failures))


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(prog='soak.py', description='pydirector soak scenarios (issue 6).')
    sub = parser.add_subparsers(dest='scenario')
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('--python', default=sys.executable, help='interpreter for pydirector.py (default: this one)')
    common.add_argument('--pydirector', default=PYDIRECTOR,
                        help='the pydirector.py to run (default: the one beside tools/)')
    common.add_argument('--duration', type=float, help='seconds')
    common.add_argument('--minutes', type=float, help='minutes (instead of --duration)')
    common.add_argument('--scale', type=float, default=1.0, help='multiply the load (default 1)')
    common.add_argument('--json', help='also write the JSON report to this file')
    common.add_argument('--keep', action='store_true',
                        help='keep the temp dir (config, logs) even on success (it is always kept on failure)')
    common.add_argument('--quiet', action='store_true', help='no progress lines on stderr')
    common.add_argument('--workers', type=int, help='a master and N worker processes (pydirector --workers N)')
    g1 = sub.add_parser('g1', parents=[common], help='2,000 checksummed echo streams for 30 min')
    g1.add_argument('--streams', type=int)
    g1.add_argument('--rate', type=float, default=8e6, help='bytes/s sent by all streams together (0 = flat out)')
    g1.add_argument('--backends', type=int, default=2)
    g1.add_argument('--stream-seconds', type=float, help='average life of one stream at its pace')
    g1.add_argument('--warmup', type=float, help='seconds before RSS drift is measured (default 10%%, max 300)')
    g1.add_argument('--rss-limit', type=float, default=0.10, help='allowed RSS drift (fraction, default 0.10)')
    g1.add_argument('--idle-timeout', type=float, help='<timeouts idle=N/> for the service (default: none written)')
    g2 = sub.add_parser('g2', parents=[common], help='1,500 new connections/s for 10 min')
    g2.add_argument('--rate', type=float, help='new connections per second (default 1500 x scale)')
    g2.add_argument('--backends', type=int, default=2)
    g2.add_argument('--latency-limit', type=float, default=20.0, help='p99 connect-to-first-byte limit, ms')
    g2.add_argument('--idle-timeout', type=float, help='<timeouts idle=N/> for the service (default: none written)')
    g2.add_argument('--first-close', choices=('client', 'backend'), default='client',
                    help='who closes first after the greeting (see run_g2)')
    g3 = sub.add_parser('g3', parents=[common], help='9,000 concurrent connections and one past maxconns')
    g3.add_argument('--connections', type=int)
    g3.add_argument('--backends', type=int, default=2)
    g3.add_argument('--maxconns-on', choices=('service', 'host', 'none'), default='service')
    g6 = sub.add_parser('g6', parents=[common], help='SIGKILL/SIGSTOP a backend every 2 s under 500 clients')
    g6.add_argument('--clients', type=int)
    g6.add_argument('--period', type=float, default=2.0)
    g6.add_argument('--fault-seconds', type=float, default=1.5, help='how long a backend stays killed/stopped')
    g6.add_argument('--cycles', type=int, help='stop after this many faults (instead of --duration)')
    g6.add_argument('--check-interval', type=float, default=0.5)
    g6.add_argument('--check-timeout', type=float, default=0.5)
    g6.add_argument('--allow-stop-orphans', action='store_true',
                    help='report SIGSTOP orphans that stay open without failing the run')
    backend = sub.add_parser('backend', help='(internal) run one backend process')
    backend.add_argument('--name', required=True)
    backend.add_argument('--mode', choices=('echo', 'greet', 'hello'), default='echo')
    backend.add_argument('--port', type=int, default=0)
    backend.add_argument('--watch-stdin', action='store_true')
    args = parser.parse_args(argv)
    if not args.scenario:
        parser.error('name a scenario: g1, g2, g3 or g6')
    return args


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None):
    global PYDIRECTOR
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.scenario == 'backend':
        serve_backend(args.name, args.mode, args.port, args.watch_stdin)
        return 0
    PYDIRECTOR = os.path.abspath(args.pydirector)
    global WORKERS
    WORKERS = getattr(args, 'workers', None)
    # A plain `kill` (or Ctrl-C in a shell that ignores SIGINT for background jobs) still
    # unwinds through Rig, so the balancer and the backends go with us.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, _exit_on_signal)
    duration = args.duration
    if args.minutes is not None:
        duration = args.minutes * 60.0
    progress = None if args.quiet else (lambda text: sys.stderr.write(text + '\n'))
    common = dict(python=args.python, progress=progress, keep=True if args.keep else None)
    scale = args.scale
    if args.scenario == 'g1':
        report = run_g1(streams=args.streams or max(1, int(2000 * scale)), duration=duration or 1800.0,
                        rate=args.rate * scale if args.streams is None else args.rate,
                        backends=args.backends, stream_seconds=args.stream_seconds, warmup=args.warmup,
                        rss_limit=args.rss_limit, idle_timeout=args.idle_timeout, **common)
    elif args.scenario == 'g2':
        report = run_g2(rate=args.rate or 1500.0 * scale, duration=duration or 600.0, backends=args.backends,
                        latency_limit=args.latency_limit / 1000.0, idle_timeout=args.idle_timeout,
                        first_close=args.first_close, **common)
    elif args.scenario == 'g3':
        report = run_g3(connections=args.connections or max(1, int(9000 * scale)), hold=duration or 10.0,
                        backends=args.backends, maxconns_on=args.maxconns_on, **common)
    else:
        report = run_g6(clients=args.clients or max(3, int(500 * scale)), duration=duration or 600.0,
                        period=args.period, fault_seconds=args.fault_seconds, cycles=args.cycles,
                        check_interval=args.check_interval, check_timeout=args.check_timeout,
                        stop_orphans_must_close=not args.allow_stop_orphans, **common)
    print(report.table())
    text = json.dumps(report.as_dict())
    print('JSON ' + text)
    if args.json:
        with open(args.json, 'w') as f:
            f.write(text + '\n')
    return 0 if report.ok else 1


if __name__ == '__main__':
    sys.exit(main())
