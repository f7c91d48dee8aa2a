"""Log targets that take nothing (issue 25, F4) and lines in time order (issue 30).

A log reader that stops reading, a syslog socket nobody reads or a full disk must
not stop the data plane: every client is served, lines past the 1 MiB a target may
hold are dropped and counted (pydirector_log_lines_dropped_total), a line says how
many once the target takes lines again, and a failing write is reported once per
interval, without a traceback.  Each scenario runs pydirector for real, as one
process and as a master with two workers, with real clients and a real pipe or
socket.
"""

import base64
import fcntl
import http.client
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

import support
from support import (PYDIRECTOR, Backend, BalancerCase, config_xml, echo, exchange, free_port, service_xml,
                     wait_until)

import pydirector

PASSWORD = 'pass word'
FAST_HASH = pydirector.hash_password(PASSWORD, iterations=1000)
CLIENTS = 800
LONG_NAME = 'h' * 3500      # an access line of ~3.7 KB: 800 of them pass the 1 MiB a process may hold
DROPPED = re.compile(r'log to [^:]*: (\d+) line\(s\) dropped')
STAMP = re.compile(r'(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) [A-Z]+ ')


def serve_clients(port, count, seconds=60, parallel=8):
    """How many of `count` clients (parallel at a time) got their bytes echoed, each within
    5 s, all within `seconds`."""
    deadline = time.monotonic() + seconds
    lock = threading.Lock()
    state = {'left': count, 'served': 0}

    def run():
        while time.monotonic() < deadline:
            with lock:
                if not state['left']:
                    return
                state['left'] -= 1
            try:
                ok = exchange(port, b'ping', timeout=5) == b'ping'
            except OSError:
                ok = False
            if ok:
                with lock:
                    state['served'] += 1
    threads = [threading.Thread(target=run) for _ in range(parallel)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return state['served']


class LogReader(object):
    """What the balancer wrote to a pipe or a datagram socket we read only when asked."""

    def __init__(self, fd=None, sock=None):
        self.fd = fd
        self.sock = sock
        self.rest = b''
        self.lines = []

    def read(self):
        """Whatever is there now, without waiting; returns self."""
        while select.select([self.fd if self.sock is None else self.sock], [], [], 0)[0]:
            if self.sock is not None:
                self.add(self.sock.recv(1 << 17).rstrip(b'\0') + b'\n')
            else:
                data = os.read(self.fd, 1 << 17)
                if not data:
                    break
                self.add(data)
        return self

    def add(self, data):
        lines = (self.rest + data).split(b'\n')
        self.rest = lines.pop()
        self.lines.extend(line.decode('utf-8', 'replace') for line in lines)

    def access(self):
        return len([l for l in self.lines if ' access service=web ' in l])

    def noted(self):
        return sum(int(m.group(1)) for m in map(DROPPED.search, self.lines) if m)


class StuckTargetCase(BalancerCase):
    """pydirector as a process whose log goes where nobody takes it."""

    workers = 0

    def setUp(self):
        BalancerCase.setUp(self)
        self.dir = tempfile.mkdtemp(prefix='pydirector-logs-')
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.backend_port = int(self.backend(echo, 'one').address.rsplit(':', 1)[1])

    def spawn(self, logging_xml='', stderr=None, host_name=LONG_NAME, extra=''):
        """Start it; return once its admin answers and every worker accepts."""
        self.port, self.admin_port = free_port(), free_port()
        root = {'workers': self.workers} if self.workers else {}
        xml = config_xml(
            service_xml([(host_name, '127.0.0.1:%d' % self.backend_port)], listen_port=self.port) + extra +
            '  <admin listen="127.0.0.1:%d">\n    <user name="admin" password="%s" access="full"/>\n'
            '  </admin>\n' % (self.admin_port, FAST_HASH) + logging_xml, **root)
        path = os.path.join(self.dir, 'test.xml')
        with open(path, 'w') as f:
            f.write(xml)
        if stderr is None:
            stderr = open(os.path.join(self.dir, 'stderr.log'), 'wb')
            self.addCleanup(stderr.close)
        self.proc = subprocess.Popen([sys.executable, PYDIRECTOR, '-c', path], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=stderr, cwd=self.dir)
        self.addCleanup(self.stop)
        wait_until(lambda: self.proc.poll() is not None or self.running(), 30)
        self.assertIsNone(self.proc.poll(), 'pydirector exited: %s' % self.stderr_text())
        if self.workers:
            wait_until(lambda: all(w['up'] for w in self.running()['workers']), 30)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def stderr_text(self):
        path = os.path.join(self.dir, 'stderr.log')
        if not os.path.exists(path):
            return ''
        with open(path, 'rb') as f:
            return f.read().decode('utf-8', 'replace')

    def fetch(self, path):
        auth = 'Basic ' + base64.b64encode(('admin:' + PASSWORD).encode()).decode()
        conn = http.client.HTTPConnection('127.0.0.1', self.admin_port, timeout=10)
        try:
            conn.request('GET', path, headers={'Authorization': auth})
            answer = conn.getresponse()
            return answer.status, answer.read().decode()
        finally:
            conn.close()

    def running(self):
        try:
            status, body = self.fetch('/running.json')
        except OSError:
            return None
        return json.loads(body) if status == 200 else None

    def dropped(self):
        """pydirector_log_lines_dropped_total, once running.json says the same (a drop may
        come between the two pages)."""
        def both():
            status, body = self.fetch('/metrics')
            self.assertEqual(status, 200)
            value = [int(l.split()[1]) for l in body.splitlines()
                     if l.startswith('pydirector_log_lines_dropped_total ')]
            return value if value == [self.running()['log_lines_dropped']] else None
        return wait_until(both, 10)[0]

    def check_drops_add_up(self, reader):
        """Read the target again: every client's access line arrives or is counted dropped,
        and the lines saying how many were dropped say the same."""
        wait_until(lambda: reader.read().access() + reader.noted() >= CLIENTS, 30,
                   message='lines missing: %d access lines, %d noted as dropped' % (reader.access(), reader.noted()))
        self.assertEqual(reader.access() + reader.noted(), CLIENTS)
        wait_until(lambda: self.dropped() == reader.noted(), 5,
                   message='dropped %d, notes say %d' % (self.dropped(), reader.noted()))
        self.assertGreater(reader.noted(), 0)      # the test did pass the bound
        self.assertEqual([l for l in reader.lines if 'Traceback' in l], [])


class StuckStderrTest(StuckTargetCase):

    def test_stderr_pipe_nobody_reads(self):
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, read_end)
        try:
            self.spawn(stderr=write_end)
            served = serve_clients(self.port, CLIENTS)
            # Our copy of the pipe shares its open file description with pydirector's stderr
            # (as a terminal's shell would): it must still block.
            self.assertFalse(fcntl.fcntl(write_end, fcntl.F_GETFL) & os.O_NONBLOCK)
        finally:
            os.close(write_end)
        self.assertEqual(served, CLIENTS)
        fcntl.fcntl(read_end, fcntl.F_SETFL, os.O_NONBLOCK)
        self.check_drops_add_up(LogReader(fd=read_end))

    def test_stderr_socket_nobody_reads(self):
        # As systemd gives it: a stream socket to the journal.
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        try:
            self.spawn(stderr=theirs.fileno())
            served = serve_clients(self.port, CLIENTS)
            self.assertFalse(fcntl.fcntl(theirs.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK)
        finally:
            theirs.close()
        self.assertEqual(served, CLIENTS)
        self.check_drops_add_up(LogReader(fd=ours.fileno()))


class StuckSyslogTest(StuckTargetCase):

    def test_syslog_socket_nobody_reads(self):
        path = os.path.join(self.dir, 'log')
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(receiver.close)
        receiver.bind(path)
        self.spawn('  <logging syslog="%s"/>\n' % path)
        self.assertEqual(serve_clients(self.port, CLIENTS), CLIENTS)
        self.check_drops_add_up(LogReader(sock=receiver))


    def test_syslogd_restarted(self):
        # Its socket goes and a new one is bound at the path: the next line connects again.
        path = os.path.join(self.dir, 'log')
        first = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(first.close)
        first.bind(path)
        self.spawn('  <logging syslog="%s"/>\n' % path, host_name='one')
        self.assertEqual(exchange(self.port, b'x'), b'x')
        wait_until(lambda: LogReader(sock=first).read().access() == 1)
        first.close()
        os.unlink(path)
        second = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(second.close)
        second.bind(path)
        self.assertEqual(exchange(self.port, b'x'), b'x')
        got = LogReader(sock=second)
        wait_until(lambda: got.read().access() == 1)
        self.assertEqual([l for l in got.lines if 'dropped' in l or 'cannot' in l], [])


class FullDiskTest(StuckTargetCase):

    def test_one_error_line_and_no_traceback(self):
        self.spawn('  <logging file="/dev/full"/>\n', host_name='one')
        for _ in range(10):         # ten 50 ms batches of access lines, each failing
            self.assertEqual(serve_clients(self.port, 10, parallel=2), 10)
            time.sleep(pydirector.ACCESS_FLUSH)
        self.assertEqual([l for l in self.stderr_text().splitlines() if 'Traceback' in l], [])
        errors = [l for l in self.stderr_text().splitlines() if 'cannot write' in l]
        self.assertEqual(len(errors), 1 + self.workers, errors)     # once per process in 10 s
        self.assertRegex(errors[0], r' ERROR (worker \d: )?log to /dev/full: cannot write: no space left on device ')
        wait_until(lambda: self.dropped() >= 100)


class StuckStderrWorkersTest(StuckStderrTest):
    workers = 2


class StuckSyslogWorkersTest(StuckSyslogTest):
    workers = 2


class FullDiskWorkersTest(FullDiskTest):
    workers = 2


class TimeOrderTest(StuckTargetCase):
    """Issue 30: a WARNING at :38,688 came out before an access line at :38,654."""

    def test_lines_come_out_in_time_order(self):
        dead, down_port = '127.0.0.1:%d' % free_port(), free_port()
        self.spawn(host_name='one', extra=service_xml([('dead', dead)], name='down', listen_port=down_port))
        for _ in range(40):
            # A client served (its access line waits up to 50 ms), then at once one with
            # no host to go to (a warning on the loop thread).
            self.assertEqual(exchange(self.port, b'x'), b'x')
            self.assertEqual(exchange(down_port), b'')
        wait_until(lambda: self.stderr_text().count(' access service=') >= 80)
        stamps = [m.group(1) for m in map(STAMP.match, self.stderr_text().splitlines()) if m]
        self.assertGreater(len(stamps), 120)
        late = [(a, b) for a, b in zip(stamps, stamps[1:]) if b < a]
        self.assertEqual(late, [])


class LogTargetTest(BalancerCase):
    """A target on a FIFO whose reader takes nothing, in this process: the bookkeeping."""

    def test_full_fifo_drops_counts_and_says_so(self):
        folder = tempfile.mkdtemp(prefix='pydirector-logs-')
        self.addCleanup(shutil.rmtree, folder, True)
        path = os.path.join(folder, 'fifo')
        os.mkfifo(path)
        reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self.addCleanup(os.close, reader)
        target = pydirector.StreamTarget(path)
        self.addCleanup(target.close)
        before = pydirector.log_output.dropped
        line = 'x' * 999 + '\n'
        started = time.monotonic()
        with pydirector.log_output.lock:
            for _ in range(3000):               # ~3 MB: the pipe takes 64 KiB, the target 1 MiB
                target.put([line])
                target.write()
        self.assertLess(time.monotonic() - started, 5)      # never waited for the reader
        dropped = pydirector.log_output.dropped - before
        self.assertEqual(dropped, target.dropped)
        self.assertLessEqual(target.size, pydirector.LOG_BUFFER)
        self.assertGreater(dropped, 1000)
        got = LogReader(fd=reader)
        while True:         # the reader catches up; the loop would call write() on room
            got.read()
            with pydirector.log_output.lock:
                target.write()
                if not target.pending:
                    break
        got.read()
        self.assertEqual(len([l for l in got.lines if l == line[:-1]]), 3000 - dropped)
        self.assertEqual(got.noted(), dropped)
        # The note came where the lines went missing: after the ones taken before.
        note = [i for i, l in enumerate(got.lines) if DROPPED.search(l)]
        self.assertEqual(len(note), 1)
        self.assertTrue(all(l == line[:-1] for l in got.lines[:note[0]]))


class HotRecordsTest(unittest.TestCase):
    """PyPy 7.3.11 aborts, with no message, once its JIT compiles a loop that keeps
    the number _thread.get_ident() returns, as a LogRecord keeps it in `thread`
    (the suite on PyPy died so, flushing 1,000 access lines into LOG's records).
    The program's setup_logging turns that off: we never log thread names."""

    def test_records_made_in_a_hot_loop_after_the_programs_logging_setup(self):
        script = ('import logging, sys\n'
                  'sys.path.insert(0, %r)\n'
                  'import pydirector\n'
                  'pydirector.setup_logging(pydirector.parse_config(%r, "test.xml"))\n'
                  'def make(count):\n'
                  '    for _ in range(count):\n'
                  '        record = logging.LogRecord("pydirector", logging.INFO, "", 0, "line", (), None)\n'
                  '    return record.thread\n'
                  'print(make(5000))\n') % (support.REPO, config_xml(service_xml([('a', '127.0.0.1:9')])))
        proc = subprocess.run([sys.executable, '-c', script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=60)
        self.assertEqual((proc.returncode, proc.stdout), (0, b'None\n'), proc.stderr.decode(errors='replace'))


if __name__ == '__main__':
    unittest.main()
