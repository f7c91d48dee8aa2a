"""The command line, signals and resource limits, with pydirector as a subprocess."""

import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
import unittest

import support
from support import (BalancerCase, Backend, BalancerProcess, accepts, PYDIRECTOR, config_xml, connect, cpu_seconds, echo,
                     free_port, recv_all, service_xml, thread_count, wait_until)


def run(*args, **kwargs):
    return subprocess.run([sys.executable, PYDIRECTOR] + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=30, **kwargs)


class TestCommandLine(BalancerCase):

    def setUp(self):
        BalancerCase.setUp(self)
        self.dir = support.tempfile.mkdtemp(prefix='pydirector-cli-')

    def write(self, name, text):
        path = os.path.join(self.dir, name)
        with open(path, 'w') as f:
            f.write(text)
        return path

    def test_check_prints_summary_and_binds_nothing(self):
        port = free_port()
        path = self.write('ok.xml', config_xml(service_xml([('one', '127.0.0.1:9')], listen_port=port)))
        result = run('--check', path)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn('%s: OK' % path, result.stdout)
        self.assertIn('service web: listen 127.0.0.1:%d' % port, result.stdout)
        self.assertIn('group main (enabled): scheduler roundrobin, 1 host(s)', result.stdout)
        self.assertFalse(accepts(port))

    def test_sample_config_checks(self):
        result = run('--check', os.path.join(support.REPO, 'sample.xml'))
        self.assertEqual(result.returncode, 0, result.stderr)

    def test_sample_admin_block_as_the_readme_says(self):
        # Uncommented, with the hash --hash-password prints in place of the placeholder.
        with open(os.path.join(support.REPO, 'sample.xml')) as f:
            sample = f.read()
        block = re.search(r'  <!--\n(  <admin .*?</admin>\n)  -->\n', sample, re.S)
        self.assertIsNotNone(block, 'no commented <admin> block in sample.xml')
        self.assertIn('pbkdf2_sha256$...', block.group(1))
        stored = run('--hash-password', input='secret\n').stdout.strip()
        path = self.write('sample.xml', sample.replace(block.group(0),
                                                       block.group(1).replace('pbkdf2_sha256$...', stored)))
        result = run('--check', path)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn('admin: listen 127.0.0.1:7001', result.stdout)

    def test_check_into_a_closed_pipe(self):
        reader, writer = os.pipe()
        os.close(reader)
        try:
            result = subprocess.run([sys.executable, PYDIRECTOR, '--check', os.path.join(support.REPO, 'sample.xml')],
                                    stdout=writer, stderr=subprocess.PIPE, universal_newlines=True, timeout=30)
        finally:
            os.close(writer)
        self.assertEqual((result.returncode, result.stderr), (0, ''))

    def test_bad_config_exits_1_with_file_and_line(self):
        port = free_port()
        xml = config_xml(service_xml([('one', '127.0.0.1:9')], listen_port=port, scheduler='leastconn'))
        path = self.write('bad.xml', xml)
        for args in (['--check', path], ['-c', path], [path]):
            result = run(*args)
            self.assertEqual(result.returncode, 1)
            self.assertEqual(result.stderr.strip(),
                             "pydirector: %s:4: group 'main': unknown scheduler 'leastconn' "
                             "(known: hash, leastconns, leastconnsrr, random, roundrobin)" % path)
            self.assertFalse(accepts(port))

    def test_missing_config_file(self):
        result = run('-c', os.path.join(self.dir, 'nope.xml'))
        self.assertEqual(result.returncode, 1)
        self.assertIn('nope.xml: cannot read config', result.stderr)

    def test_version_and_help(self):
        result = run('--version')
        self.assertEqual(result.returncode, 0)
        self.assertIn('pydirector 2.', result.stdout)
        result = run('--help')
        self.assertEqual(result.returncode, 0)
        self.assertIn('--check', result.stdout)

    def test_hash_password_from_stdin(self):
        result = run('--hash-password', input='s3cret\n')
        self.assertEqual(result.returncode, 0, result.stderr)
        stored = result.stdout.strip()
        self.assertTrue(stored.startswith('pbkdf2_sha256$'))
        import pydirector
        self.assertTrue(pydirector.check_password('s3cret', stored))
        self.assertFalse(pydirector.check_password('s3cret ', stored))

    def test_hash_password_refuses_no_password(self):
        for given in ('', '\n', '\r\n'):
            result = run('--hash-password', input=given)
            self.assertEqual(result.returncode, 1, given)
            self.assertEqual(result.stdout, '')
            self.assertEqual(result.stderr, 'pydirector: no password on stdin\n' if not given
                             else 'pydirector: an empty password is refused\n')

    def test_hash_password_prompt_ctrl_d_and_ctrl_c(self):
        import fcntl
        import pty
        import termios

        def on_a_terminal(steps):
            """Run --hash-password on a terminal of its own; at each (prompt, keys) step wait
            for the prompt, then type the keys.  (exit status, what the terminal showed)"""
            controller, terminal = pty.openpty()
            self.addCleanup(os.close, controller)

            def take_terminal():
                os.setsid()
                fcntl.ioctl(0, termios.TIOCSCTTY, 0)

            proc = subprocess.Popen([sys.executable, PYDIRECTOR, '--hash-password'], stdin=terminal,
                                    stdout=terminal, stderr=terminal, preexec_fn=take_terminal)
            self.addCleanup(proc.kill)
            os.close(terminal)
            shown = b''
            deadline = time.monotonic() + 20

            def read_more():
                if not select.select([controller], [], [], max(0, deadline - time.monotonic()))[0]:
                    raise AssertionError('the terminal showed only %r' % shown)
                try:
                    return os.read(controller, 1024)
                except OSError:     # EIO: the child has closed the terminal
                    return b''

            for prompt, keys in steps:
                while prompt not in shown:
                    shown += read_more()
                os.write(controller, keys)
            while True:
                chunk = read_more()
                if not chunk:
                    break
                shown += chunk
            return proc.wait(20), shown.decode().replace('\r\n', '\n')

        # Each prompt flushes what was typed ahead, so the keys wait for theirs.
        for steps in ([(b'Password: ', b'\x04')], [(b'Password: ', b'\x03')],
                      [(b'Password: ', b'secret\n'), (b'Again: ', b'\x04')]):
            status, shown = on_a_terminal(steps)
            self.assertEqual(status, 1, shown)
            self.assertTrue(shown.endswith('pydirector: no password given\n'), shown)
            self.assertNotIn('Traceback', shown)

    def test_port_in_use_exits_1(self):
        taken = socket.socket()
        taken.bind(('127.0.0.1', 0))
        taken.listen(1)
        self.addCleanup(taken.close)
        port = taken.getsockname()[1]
        free = free_port()
        xml = config_xml(service_xml([('one', '127.0.0.1:9')], listen_port=free),
                         service_xml([('one', '127.0.0.1:9')], name='b', listen_port=port))
        result = run(self.write('busy.xml', xml))
        self.assertEqual(result.returncode, 1)
        self.assertIn('cannot listen', result.stderr)
        self.assertFalse(accepts(free))  # all or nothing


class TestSignals(BalancerCase):

    def setUp(self):
        BalancerCase.setUp(self)
        self.backend = Backend(echo)
        self.addCleanup(self.backend.close)

    def start(self, **root):
        self.port = free_port()
        xml = config_xml(service_xml([('one', self.backend.address)], listen_port=self.port), **root)
        proc = BalancerProcess(xml, wait_port=self.port)
        self.addCleanup(proc.close)
        wait_until(lambda: self.backend.open == 0)  # the readiness probe's connection is gone
        return proc

    def test_sigterm_drains_open_connections_then_exits_0(self):
        proc = self.start()
        sock = connect(self.port)
        sock.sendall(b'before')
        self.assertEqual(sock.recv(10), b'before')
        proc.signal(signal.SIGTERM)
        wait_until(lambda: not accepts(self.port), 5)          # no new clients...
        sock.sendall(b'during')                                  # ...but the open one goes on
        self.assertEqual(sock.recv(10), b'during')
        self.assertIsNone(proc.proc.poll())
        sock.shutdown(socket.SHUT_WR)
        self.assertEqual(recv_all(sock), b'')
        sock.close()
        self.assertEqual(proc.wait(10), 0)
        out = proc.output()
        # The readiness probe's own connection may still be counted: 1 or 2.
        self.assertRegex(out, r'stopping: [0-9]+ connection\(s\) open, waiting up to 10 s')
        self.assertRegex(out, r'no <admin> in \S+\.xml: the admin interface is off')
        self.assertNotIn('Traceback', out)

    def test_drain_deadline_closes_what_is_left(self):
        proc = self.start(drain='0.5')
        sock = connect(self.port)
        sock.sendall(b'x')
        self.assertEqual(sock.recv(1), b'x')
        started = time.monotonic()
        proc.signal(signal.SIGTERM)
        self.assertEqual(proc.wait(10), 0)
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual(recv_all(sock), b'')
        sock.close()
        self.assertIn('closing 1 connection(s) still open', proc.output())

    def test_second_sigterm_stops_at_once(self):
        proc = self.start(drain='60')
        sock = connect(self.port)
        sock.sendall(b'x')
        self.assertEqual(sock.recv(1), b'x')
        proc.signal(signal.SIGTERM)
        wait_until(lambda: 'stopping:' in proc.output())
        proc.signal(signal.SIGTERM)
        self.assertEqual(proc.wait(10), 0)
        self.assertIn('second stop signal', proc.output())
        sock.close()

    def test_sigterm_drains_for_the_drain_a_reload_set(self):
        proc = self.start(drain='60')
        sock = connect(self.port)
        sock.sendall(b'x')
        self.assertEqual(sock.recv(1), b'x')
        with open(proc.config_path) as f:
            xml = f.read()
        with open(proc.config_path, 'w') as f:
            f.write(xml.replace('drain="60"', 'drain="0.5"'))
        proc.signal(signal.SIGHUP)
        wait_until(lambda: 'drain 0.5 s' in proc.output())
        proc.signal(signal.SIGTERM)
        self.assertEqual(proc.wait(10), 0)      # not the 60 s it started with
        self.assertRegex(proc.output(), r'stopping: [0-9]+ connection\(s\) open, waiting up to 0\.5 s')
        self.assertEqual(recv_all(sock), b'')
        sock.close()

    def test_sigint_with_nothing_open_exits_at_once(self):
        proc = self.start()
        proc.signal(signal.SIGINT)
        self.assertEqual(proc.wait(10), 0)

    def test_sigusr1_and_sighup_do_not_stop_it(self):
        proc = self.start()
        for signum in (signal.SIGUSR1, signal.SIGHUP, signal.SIGUSR1):
            proc.signal(signum)
        wait_until(lambda: 'log file reopened' in proc.output() and 'no changes' in proc.output())
        self.assertIn('reloaded %s: no changes' % proc.config_path, proc.output())
        sock = connect(self.port)
        sock.sendall(b'alive')
        self.assertEqual(sock.recv(10), b'alive')
        sock.close()
        self.assertIsNone(proc.proc.poll())


@unittest.skipUnless(os.path.exists('/proc/self/stat'), 'needs /proc')
class TestOutOfFileDescriptors(BalancerCase):

    def test_emfile_pauses_accepting_without_spinning_and_recovers(self):
        import resource
        backend = Backend(echo)
        self.addCleanup(backend.close)
        port = free_port()
        xml = config_xml(service_xml([('one', backend.address)], listen_port=port))
        limit = 40

        def low_limit():
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
        proc = BalancerProcess.__new__(BalancerProcess)
        proc.dir = support.tempfile.mkdtemp(prefix='pydirector-emfile-')
        proc.config_path = os.path.join(proc.dir, 'test.xml')
        proc.log_path = os.path.join(proc.dir, 'stderr.log')
        with open(proc.config_path, 'w') as f:
            f.write(xml)
        proc.log_file = open(proc.log_path, 'wb')
        proc.proc = subprocess.Popen([sys.executable, PYDIRECTOR, '-c', proc.config_path],
                                     stdout=proc.log_file, stderr=subprocess.STDOUT, preexec_fn=low_limit)
        self.addCleanup(proc.close)
        wait_until(lambda: accepts(port), 10)
        clients = []
        self.addCleanup(lambda: [c.close() for c in clients])
        for _ in range(limit):
            c = socket.socket()
            c.settimeout(5)
            c.connect(('127.0.0.1', port))   # the kernel completes these from the backlog
            clients.append(c)
        wait_until(lambda: 'pausing accepts' in proc.output(), 10)
        before = cpu_seconds(proc.proc.pid)
        started = time.monotonic()
        time.sleep(1.0)  # the point: measure CPU over a second of exhaustion
        used = (cpu_seconds(proc.proc.pid) - before) / (time.monotonic() - started)
        self.assertLess(used, 0.2)
        for c in clients:
            c.close()
        clients[:] = []
        # Clients still queued from the flood are served first; a new one is answered within 2 s.
        def echoed():
            try:
                with connect(port, timeout=1) as sock:
                    sock.sendall(b'back')
                    return sock.recv(10) == b'back'
            except OSError:
                return False
        wait_until(echoed, 10, interval=0.05)
        wait_until(lambda: 'accepting again' in proc.output())
        self.assertNotIn('Traceback', proc.output())


@unittest.skipUnless(os.path.isdir('/proc/self/task'), 'needs /proc')
class TestThreads(BalancerCase):

    def test_no_thread_until_a_probe_is_due(self):
        """No admin and nothing to probe: the loop's thread alone, so Python 3.6 (whose GIL
        is made at the first thread) runs without one.  With a <check>, the probes run in threads."""
        backend = Backend(echo)
        self.addCleanup(backend.close)
        port = free_port()
        proc = BalancerProcess(config_xml(service_xml([('one', backend.address)], listen_port=port)),
                               wait_port=port)
        self.addCleanup(proc.close)
        # Traffic for half a second: several of the manager's 0.1 s ticks pass meanwhile.
        listening = time.monotonic()
        while time.monotonic() - listening < 0.5:
            with connect(port) as sock:
                sock.sendall(b'ping')
                self.assertEqual(sock.recv(10), b'ping')
            self.assertEqual(thread_count(proc.proc.pid), 1)
        proc.close()
        # With a <check>, probes start at once, in their own threads, and still take a host down.
        port = free_port()
        check = '    <check interval="0.1" timeout="0.5" fall="1"/>\n'
        proc = BalancerProcess(config_xml(service_xml([('one', backend.address)], listen_port=port, extra=check)),
                               wait_port=port)
        self.addCleanup(proc.close)
        wait_until(lambda: thread_count(proc.proc.pid) > 1)
        backend.close()
        wait_until(lambda: 'failed probes' in proc.output())
        self.assertNotIn('Traceback', proc.output())


if __name__ == '__main__':
    unittest.main()
