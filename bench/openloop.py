#!/usr/bin/env python3
"""An open-loop generator of new connections: each one at its own time, whatever the
others are doing, so a stall in the server shows in the latency instead of slowing
the load (a closed-loop client such as ab or hey waits, and measures less).

    python3 bench/openloop.py --port 8080 --rate 5000 --seconds 10
    pypy3 bench/openloop.py --port 8080 --rate 20000 --seconds 10 --procs 2 --json

Connection n of the run is due at T0 + n/rate (the processes interleave: process i
takes n = i, i + procs, ...).  Each one connects (non-blocking), sends
`GET PATH HTTP/1.0`, reads to EOF and checks for a 200 answer.  Its latency is
counted from the moment it was *due*, not from when the generator got round to it
(wrk2's rule against coordinated omission); how late the generator started it is
reported apart (`late_*`), with the rate it achieved, so a run shows whether the
generator kept its rate.  Between due times it waits in epoll (millisecond ticks)
and, for the last millisecond, in time.sleep(), so starts are not bunched into
millisecond bursts.

Prints one summary (text, or one JSON object with --json): connections due,
started, answered 200, failed (by reason), the achieved start rate, and p50, p90,
p99, p99.9 and max of the latency, of the latency from the actual start, and of
the lateness, in milliseconds.  A first --warmup seconds at the same rate are run
and not counted (a JIT, the server's and ours, warms up).

Stdlib only, Python 3.6+, Linux (epoll).  Run it with pypy3 where there is one: it
then costs a fraction of CPython's CPU per connection.
"""

import argparse
import array
import errno
import json
import os
import resource
import select
import socket
import sys
import time

SOCK_NONBLOCK = getattr(socket, 'SOCK_NONBLOCK', 0)
EPOLLIN, EPOLLOUT, EPOLLERR, EPOLLHUP = select.EPOLLIN, select.EPOLLOUT, select.EPOLLERR, select.EPOLLHUP
PERCENTILES = (50, 90, 99, 99.9, 100)


def percentile(ordered, pct):
    """Nearest rank: the smallest value with at least pct% of them at or below it."""
    if not ordered:
        return None
    rank = max(1, int(-(-len(ordered) * pct // 100)))
    return ordered[min(rank, len(ordered)) - 1]


def spread(values):
    ordered = sorted(values)
    return dict(('p%g' % p if p < 100 else 'max', None if not ordered else percentile(ordered, p) * 1000.0)
                for p in PERCENTILES)


class Run(object):
    """One process's share of the connections."""

    def __init__(self, address, request, rate, index, procs, t0, warmup, seconds, timeout):
        self.address = address
        self.family = socket.AF_INET6 if ':' in address[0] else socket.AF_INET
        self.request = request
        self.interval = procs / float(rate)         # between this process's own starts
        self.next_due = t0 + index / float(rate)
        self.counted_from = t0 + warmup
        self.end = t0 + warmup + seconds
        self.timeout = timeout
        self.epoll = select.epoll()
        self.conns = {}             # fd -> [sock, due, started, head, tail, counted]
        self.latency = array.array('d')          # seconds from due to the answer's end
        self.service = array.array('d')          # seconds from the actual start
        self.late = array.array('d')             # seconds between due and the actual start
        self.due = self.started = self.ok = 0
        self.failed = {}

    def fail(self, conn, why):
        if conn[5]:
            self.failed[why] = self.failed.get(why, 0) + 1

    def start(self, due, now):
        counted = due >= self.counted_from
        if counted:
            self.due += 1
            self.started += 1
            self.late.append(now - due)
        conn = [None, due, now, b'', b'', counted]
        try:
            sock = conn[0] = socket.socket(self.family, socket.SOCK_STREAM | SOCK_NONBLOCK)
        except OSError as e:        # out of fds: the server has fallen far behind
            self.fail(conn, 'socket: %s' % (e.strerror or e))
            return
        if not SOCK_NONBLOCK:
            sock.setblocking(False)
        err = sock.connect_ex(self.address)
        if err not in (0, errno.EINPROGRESS):
            self.fail(conn, 'connect: ' + os.strerror(err))
            sock.close()
            return
        fd = sock.fileno()
        self.conns[fd] = conn
        # On loopback the handshake is usually over when connect returns: send at once,
        # which saves a wait for writability (and its syscalls) per connection.
        try:
            sock.send(self.request)
        except OSError:
            self.epoll.register(fd, EPOLLOUT)
            return
        self.epoll.register(fd, EPOLLIN)

    def on_event(self, fd, mask):
        conn = self.conns.get(fd)
        if conn is None:
            return
        sock = conn[0]
        if mask & EPOLLOUT:
            try:
                sock.send(self.request)     # a few bytes: the kernel takes them whole
            except OSError as e:
                self.finish(fd, conn, 'connect: %s' % (e.strerror or e))
                return
            self.epoll.modify(fd, EPOLLIN)
            return
        while True:
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self.finish(fd, conn, 'recv: %s' % (e.strerror or e))
                return
            if not data:
                break
            if len(conn[3]) < 16:
                conn[3] = (conn[3] + data)[:16]
            conn[4] = (conn[4] + data)[-21:]
        now = time.monotonic()
        if not conn[3].startswith(b'HTTP/1.1 200') and not conn[3].startswith(b'HTTP/1.0 200'):
            self.finish(fd, conn, 'answer: %r' % conn[3][:12] if conn[3] else 'closed without an answer')
            return
        if conn[5]:
            self.ok += 1
            self.latency.append(now - conn[1])
            self.service.append(now - conn[2])
        self.finish(fd, conn, None)

    def finish(self, fd, conn, why):
        if why is not None:
            self.fail(conn, why)
        del self.conns[fd]
        conn[0].close()     # which takes it out of the epoll set

    def expire(self, now):
        for fd, conn in list(self.conns.items()):
            if now - conn[2] > self.timeout:
                self.finish(fd, conn, 'no answer within %g s' % self.timeout)

    def run(self):
        poll, monotonic, sleep = self.epoll.poll, time.monotonic, time.sleep
        on_event = self.on_event
        next_expire = monotonic() + 0.1
        while True:
            now = monotonic()
            while self.next_due <= now and self.next_due < self.end:
                self.start(self.next_due, now)
                self.next_due += self.interval
            if self.next_due >= self.end:
                if not self.conns or now > self.end + self.timeout + 1:
                    break
                wait = 0.05
            else:
                wait = self.next_due - now
            if now >= next_expire:
                self.expire(now)
                next_expire = now + 0.1
            if wait >= 0.002:
                events = poll(wait - 0.001)     # epoll rounds its timeout up to a millisecond
            else:
                events = poll(0)
                if not events:
                    sleep(wait)                 # the last stretch: finer than epoll's tick
                    continue
            for fd, mask in events:
                on_event(fd, mask)
        self.expire(float('inf'))
        self.epoll.close()

    def report(self):
        return {'due': self.due, 'started': self.started, 'ok': self.ok, 'failed': self.failed}


def child(run, write_fd):
    """Run, then send the counts and the three arrays up the pipe."""
    try:
        run.run()
        head = json.dumps(run.report()).encode()
        body = run.latency.tobytes() + run.service.tobytes() + run.late.tobytes()
        sizes = '%d %d %d %d\n' % (len(head), len(run.latency), len(run.service), len(run.late))
        with os.fdopen(write_fd, 'wb') as out:
            out.write(sizes.encode() + head + body)
        return 0
    except BaseException:
        import traceback
        traceback.print_exc()
        return 1


def read_child(read_fd):
    with os.fdopen(read_fd, 'rb') as f:
        data = f.read()
    line, _, rest = data.partition(b'\n')
    if not line:
        return None
    head_size, n_latency, n_service, n_late = (int(x) for x in line.split())
    report = json.loads(rest[:head_size].decode())
    arrays = []
    at = head_size
    for n in (n_latency, n_service, n_late):
        a = array.array('d')
        a.frombytes(rest[at:at + 8 * n])
        at += 8 * n
        arrays.append(a)
    return report, arrays


def generate(host, port, rate, seconds, procs=1, path='/small', warmup=1.0, timeout=10.0):
    """Run the generator (procs forked processes): the summary as a dict."""
    address = (host, port)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > 65536:
        hard = 65536
    if soft < hard:     # connections in flight when the server falls behind
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    request = ('GET %s HTTP/1.0\r\nHost: bench\r\n\r\n' % path).encode()
    t0 = time.monotonic() + 0.2      # CLOCK_MONOTONIC: one clock for every process
    children = []
    for index in range(procs):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            status = 1
            try:
                status = child(Run(address, request, rate, index, procs, t0, warmup, seconds, timeout), write_fd)
            finally:
                os._exit(status)
        os.close(write_fd)
        children.append((pid, read_fd))
    reports, latency, service, late = [], [], [], []
    for pid, read_fd in children:
        got = read_child(read_fd)
        os.waitpid(pid, 0)
        if got is None:
            raise RuntimeError('a generator process failed')
        reports.append(got[0])
        latency.extend(got[1][0])
        service.extend(got[1][1])
        late.extend(got[1][2])
    failed = {}
    for r in reports:
        for why, n in r['failed'].items():
            failed[why] = failed.get(why, 0) + n
    due = sum(r['due'] for r in reports)
    ok = sum(r['ok'] for r in reports)
    return {
        'rate_asked': rate, 'seconds': seconds, 'procs': procs, 'warmup': warmup,
        'due': due, 'started': sum(r['started'] for r in reports), 'ok': ok, 'failed': failed,
        'rate_started': due / float(seconds),       # every due connection is started, late or not
        'rate_answered': ok / float(seconds),
        'late_over_1ms': sum(1 for x in late if x > 0.001),
        'latency_ms': spread(latency), 'service_ms': spread(service), 'late_ms': spread(late),
    }


def text(result):
    def row(name, cells):
        return '%-22s %s' % (name, '  '.join('%s %8.3f' % (k, cells[k]) if cells[k] is not None else '%s -' % k
                                             for k in ('p50', 'p90', 'p99', 'p99.9', 'max')))
    lines = ['asked %d/s for %g s (%d process(es)): %d due, %d answered 200 (%.0f/s), %d failed%s' % (
        result['rate_asked'], result['seconds'], result['procs'], result['due'], result['ok'],
        result['rate_answered'], sum(result['failed'].values()),
        (': ' + ', '.join('%s x%d' % kv for kv in sorted(result['failed'].items()))) if result['failed'] else ''),
        row('latency from due (ms)', result['latency_ms']),
        row('from start (ms)', result['service_ms']),
        row('start lateness (ms)', result['late_ms']),
        'started more than 1 ms late: %d of %d' % (result['late_over_1ms'], result['due'])]
    return '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description='Open new connections at a fixed rate; report the latency spread.')
    p.add_argument('--host', default='127.0.0.1')
    p.add_argument('--port', type=int, required=True)
    p.add_argument('--rate', type=float, required=True, help='new connections per second, in all')
    p.add_argument('--seconds', type=float, default=10.0, help='counted seconds (default 10)')
    p.add_argument('--warmup', type=float, default=1.0, help='seconds run first and not counted (default 1)')
    p.add_argument('--procs', type=int, default=1, help='generator processes (default 1)')
    p.add_argument('--path', default='/small')
    p.add_argument('--timeout', type=float, default=10.0, help='seconds a connection may take (default 10)')
    p.add_argument('--json', action='store_true', help='print one JSON object')
    args = p.parse_args(argv)
    if args.rate <= 0 or args.seconds <= 0 or args.procs < 1:
        p.error('--rate and --seconds must be positive, --procs at least 1')
    result = generate(args.host, args.port, args.rate, args.seconds, args.procs, args.path, args.warmup,
                      args.timeout)
    print(json.dumps(result, sort_keys=True) if args.json else text(result))
    return 0 if not result['failed'] else 1


if __name__ == '__main__':
    sys.exit(main())
