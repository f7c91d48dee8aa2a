"""systemd's notify protocol: READY, RELOADING, STOPPING, WATCHDOG (contrib/pydirector.service).

A fake notify socket stands in for systemd: a real AF_UNIX datagram socket
the test binds, at a path or an abstract '@name', read message by message.
The balancer is a real subprocess for the sequence (signals, the admin's
/reload); the Notifier alone, on a loop in this process, for the watchdog's
tie to the loop and for the environment it reads.
"""

import base64
import http.client
import itertools
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
import unittest

import support
from support import Backend, LOG, SpawnedBalancer, accepts, config_xml, free_port, service_xml, wait_until

import pydirector

_names = itertools.count()


def monotonic_usec():
    return int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6)


class NotifySocket(object):
    """What systemd listens on: .env is the NOTIFY_SOCKET value to hand the balancer."""

    def __init__(self, abstract=False):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.dir = None
        if abstract:
            name = 'pydirector-test-notify-%d-%d' % (os.getpid(), next(_names))
            self.sock.bind('\0' + name)
            self.env = '@' + name
        else:
            self.dir = tempfile.mkdtemp(prefix='pydirector-notify-')
            self.env = os.path.join(self.dir, 'notify')
            self.sock.bind(self.env)

    def next(self, timeout=10):
        """The next message as text; socket.timeout when none comes in time."""
        self.sock.settimeout(timeout)
        return self.sock.recv(65536).decode('utf-8')

    def waiting(self):
        """Every message already queued, without waiting."""
        messages = []
        self.sock.setblocking(False)
        try:
            while True:
                messages.append(self.sock.recv(65536).decode('utf-8'))
        except BlockingIOError:
            return messages

    def close(self):
        self.sock.close()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)


class NotifySequenceTest(unittest.TestCase):
    """pydirector.py as a subprocess under a fake systemd: the exact messages, in order."""

    def start(self, abstract=False, admin='', env=None):
        self.notify = NotifySocket(abstract)
        self.addCleanup(self.notify.close)
        self.backend = Backend(support.hold_open, 'b1')
        self.addCleanup(self.backend.close)
        self.port = free_port()
        self.xml = config_xml(service_xml([('b1', self.backend.address)], listen_port=self.port) + admin)
        full_env = {'NOTIFY_SOCKET': self.notify.env}
        full_env.update(env or {})
        self.proc = SpawnedBalancer(self.xml, env=full_env)
        self.addCleanup(self.proc.close)
        self.assertEqual(self.notify.next(), 'READY=1', self.proc.output())
        self.assertTrue(accepts(self.port), 'READY=1 before listening')

    def expect_reload(self, trigger):
        before = monotonic_usec()
        trigger()
        message = self.notify.next()
        after = monotonic_usec()
        match = re.match(r'RELOADING=1\nMONOTONIC_USEC=([0-9]+)\Z', message)
        self.assertTrue(match, message)
        self.assertTrue(before <= int(match.group(1)) <= after, (before, message, after))
        self.assertEqual(self.notify.next(), 'READY=1')

    def stop(self, signum=signal.SIGTERM):
        self.proc.signal(signum)
        self.assertEqual(self.notify.next(), 'STOPPING=1')
        self.assertEqual(self.proc.wait(), 0, self.proc.output())
        self.assertEqual(self.notify.waiting(), [])   # the process is gone: nothing else came

    def test_ready_reload_stop_at_a_path(self):
        self.start()
        self.expect_reload(lambda: self.proc.signal(signal.SIGHUP))
        self.stop()

    def test_abstract_name_admin_reload_failed_reload_and_a_second_stop(self):
        password = 'secret'
        admin_port = free_port()
        admin = ('  <admin listen="127.0.0.1:%d">\n    <user name="admin" password="%s" access="full"/>\n'
                 '  </admin>\n' % (admin_port, pydirector.hash_password(password)))
        self.start(abstract=True, admin=admin)
        wait_until(lambda: accepts(admin_port))

        def admin_reload():
            conn = http.client.HTTPConnection('127.0.0.1', admin_port, timeout=10)
            auth = base64.b64encode(('admin:' + password).encode()).decode()
            conn.request('POST', '/reload', '', headers={'Authorization': 'Basic ' + auth})
            self.assertEqual(conn.getresponse().status, 200)
            conn.close()
        self.expect_reload(admin_reload)

        # A broken file: the old config keeps running, so READY=1 follows all the same.
        with open(self.proc.config_path, 'w') as f:
            f.write('<pdconfig>')
        self.expect_reload(lambda: self.proc.signal(signal.SIGHUP))
        # READY=1 may reach the socket before the log line is written.
        wait_until(lambda: 'reload failed' in self.proc.output(),
                   message='no "reload failed" in the log')

        # A held connection makes the first SIGTERM drain; the second stops at once.
        client = socket.create_connection(('127.0.0.1', self.port), timeout=10)
        self.addCleanup(client.close)
        wait_until(lambda: self.backend.open == 1)
        self.proc.signal(signal.SIGTERM)
        self.assertEqual(self.notify.next(), 'STOPPING=1')
        self.proc.signal(signal.SIGTERM)
        self.assertEqual(self.proc.wait(), 0, self.proc.output())
        self.assertEqual(self.notify.waiting(), [])   # STOPPING=1 once

    def test_watchdog_pings_after_ready(self):
        self.start(env={'WATCHDOG_USEC': '100000'})
        for _ in range(3):
            self.assertEqual(self.notify.next(), 'WATCHDOG=1')
        self.proc.signal(signal.SIGTERM)
        wait_until(lambda: self.proc.proc.poll() is not None, 15)
        rest = self.notify.waiting()
        self.assertEqual([m for m in rest if m != 'WATCHDOG=1'], ['STOPPING=1'])

    def test_no_notify_socket_no_messages(self):
        # The fake socket exists but the balancer is not told of it: nothing arrives.
        self.notify = NotifySocket()
        self.addCleanup(self.notify.close)
        port = free_port()
        proc = SpawnedBalancer(config_xml(service_xml([('b1', '127.0.0.1:%d' % free_port())],
                                                      listen_port=port)),
                               env={'NOTIFY_SOCKET': '', 'WATCHDOG_USEC': '100000'}, wait_port=port)
        self.addCleanup(proc.close)
        proc.signal(signal.SIGTERM)
        self.assertEqual(proc.wait(), 0, proc.output())
        self.assertEqual(self.notify.waiting(), [])


class NotifierTest(unittest.TestCase):
    """The Notifier in this process: what it takes from the environment, and its watchdog."""

    def test_environment(self):
        pid = str(os.getpid())
        cases = [
            ({}, None, None),
            ({'NOTIFY_SOCKET': '/nonexistent/notify'}, '/nonexistent/notify', None),
            ({'NOTIFY_SOCKET': '@sd'}, '\0sd', None),
            ({'NOTIFY_SOCKET': '@sd', 'WATCHDOG_USEC': '3000000'}, '\0sd', 1.5),
            ({'NOTIFY_SOCKET': '@sd', 'WATCHDOG_USEC': '3000000', 'WATCHDOG_PID': pid}, '\0sd', 1.5),
            ({'NOTIFY_SOCKET': '@sd', 'WATCHDOG_USEC': '3000000', 'WATCHDOG_PID': '1'}, '\0sd', None),
            ({'NOTIFY_SOCKET': '@sd', 'WATCHDOG_USEC': '0'}, '\0sd', None),
            ({'NOTIFY_SOCKET': '@sd', 'WATCHDOG_USEC': '-5'}, '\0sd', None),
            ({'WATCHDOG_USEC': '3000000'}, None, None),
        ]
        for environ, address, watchdog in cases:
            notifier = pydirector.Notifier(environ)
            self.assertEqual((notifier.address, notifier.watchdog), (address, watchdog), environ)
            if address is None:
                self.assertIsNone(notifier.sock)     # no socket at all,
                notifier.ready()                     # and nothing to send to
            notifier.close()

    def test_bad_address_is_logged_and_ignored(self):
        mark = LOG.mark()
        notifier = pydirector.Notifier({'NOTIFY_SOCKET': 'vsock:2:1234'})
        self.assertIsNone(notifier.address)
        LOG.wait_for('NOTIFY_SOCKET=vsock:2:1234 is not a path or @name: systemd is told nothing', mark)

    def test_send_failure_is_logged_once(self):
        where = tempfile.mkdtemp(prefix='pydirector-notify-')
        self.addCleanup(shutil.rmtree, where, True)
        path = os.path.join(where, 'nobody-listens')
        notifier = pydirector.Notifier({'NOTIFY_SOCKET': path})
        self.addCleanup(notifier.close)
        mark = LOG.mark()
        notifier.ready()
        notifier.ready()
        lines = [l for l in LOG.since(mark) if 'cannot notify systemd' in l]
        self.assertEqual(len(lines), 1, lines)
        self.assertIn('(not logged again)', lines[0])

    def test_watchdog_pings_stop_while_the_loop_is_stuck(self):
        notify = NotifySocket()
        self.addCleanup(notify.close)
        loop = pydirector.Loop()
        thread = threading.Thread(target=loop.run, daemon=True)
        notifier = pydirector.Notifier({'NOTIFY_SOCKET': notify.env, 'WATCHDOG_USEC': '40000'})
        self.addCleanup(notifier.close)
        notifier.start_watchdog(loop)
        thread.start()

        def finish():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()
        self.addCleanup(finish)
        self.assertEqual([notify.next(), notify.next()], ['WATCHDOG=1', 'WATCHDOG=1'])
        stuck, release = threading.Event(), threading.Event()
        self.addCleanup(release.set)

        def block():
            stuck.set()
            release.wait(30)
        loop.call_soon_threadsafe(block)
        self.assertTrue(stuck.wait(10))
        notify.waiting()          # pings sent before the loop got stuck
        with self.assertRaises(socket.timeout):
            notify.next(timeout=0.2)    # ten ping intervals: none while the loop is stuck
        release.set()
        self.assertEqual(notify.next(), 'WATCHDOG=1')


if __name__ == '__main__':
    unittest.main()
