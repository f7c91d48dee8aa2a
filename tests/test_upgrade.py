"""Upgrade (issue 27): SIGUSR2, or the admin's POST /upgrade, runs the code on disk in
place -- the same PID -- without losing a connection: the new code passes its
--check first, an old generation (a fork) serves until the new one has taken
the state over, started its workers and probed every host once, then drains.
A new code that fails, at any point, leaves the old one serving.

Real processes: a copy of the tree (support.CodeTree) with a VERSION of its own,
run as `pydirector.py -c FILE` in a session of its own (support.GroupBalancer,
so that the old generation, which is not the test's child, is found and
ended), once on its own and once as a master of two workers; real backends
that say their name or echo, real clients (support.NewClients, one connection
after another; support.Background, long streams checked byte for byte).
The storms here are short; tools/soak.py's and bench/upgrade.py's run 60 s.
"""

import inspect
import json
import os
import re
import signal
import threading
import time
import unittest

import support
from support import (AdminClient, BalancerCase, Background, CodeTree, GroupBalancer, NewClients, WorkersMixin, accepts,
                     config_xml, exchange, fd_count, free_port, say_name, service_xml, single_process, wait_until,
                     when_upgrading)

import pydirector
import test_systemd

PASSWORD = 'secret'
HASH = pydirector.hash_password(PASSWORD, iterations=support.FAST_HASH_ITERATIONS)
NAMES = (b'n1', b'n2', b'n3', b's1')


class UpgradeCase(AdminClient, BalancerCase):
    """A balancer process run from a CodeTree at version 1.0.0: service web (group
    main: n1 n2, group spare: s1, which say their name), service echo (e1, for
    streams) and its admin."""
    admin_password = PASSWORD
    admin_timeout = 60

    def setUp(self):
        BalancerCase.setUp(self)
        self.n1 = self.backend(say_name, 'n1')
        self.n2 = self.backend(say_name, 'n2')
        self.n3 = self.backend(say_name, 'n3')
        self.s1 = self.backend(say_name, 's1')
        self.e1 = support.EchoServer(name='e1')
        self.addCleanup(self.e1.close)
        self.listen = free_port()
        self.echo_port = free_port()
        self.admin_port = free_port()
        self.tree = CodeTree('1.0.0')
        self.addCleanup(self.tree.close)

    def xml(self, scheduler='roundrobin', main=None, **root):
        """The config; main: the hosts of group main ([(name, address)]; n1 n2 if None)."""
        root.setdefault('drain', '30')
        if self.workers:
            root['workers'] = str(self.workers)
        admin = ('  <admin listen="127.0.0.1:%d">\n    <user name="admin" password="%s" access="full"/>\n'
                 '  </admin>\n' % (self.admin_port, HASH))
        web = service_xml(None, listen_port=self.listen, groups=[
            ('main', scheduler, main or [('n1', self.n1.address), ('n2', self.n2.address)]),
            ('spare', 'roundrobin', [('s1', self.s1.address)])],
            extra='    <check interval="0.5" timeout="1"/>\n')
        streams = service_xml([('e1', '127.0.0.1:%d' % self.e1.port)], name='echo', listen_port=self.echo_port)
        return config_xml(web + streams + admin, **root)

    def start_process(self, xml=None, env=None):
        self.proc = GroupBalancer(self.tree, xml or self.xml(), env=env)
        self.addCleanup(self.proc.close)
        self.pid = self.proc.pid
        wait_until(lambda: self.proc.proc.poll() is not None or accepts(self.admin_port) and self.serving('1.0.0'),
                   60)
        self.assertIsNone(self.proc.proc.poll(), self.output())
        return self.proc

    def output(self):
        return self.proc.output()

    def host(self, name, group='main', running=None, service=0):
        for g in (running or self.running())['services'][service]['groups']:
            for h in g['hosts']:
                if g['name'] == group and h['name'] == name:
                    return h
        return None

    def serving(self, version):
        """Whether `version` runs, no upgrade is under way, and every worker is up."""
        try:
            running = self.running()
        except (OSError, ValueError):
            return False
        return (running['version'] == version and running['generation']['upgrading'] is None and
                all(w['up'] for w in running['workers'] or ()))

    def processes(self):
        """The pids of the balancer's process group (zombies too)."""
        return sorted(self.proc.processes())

    def expected_processes(self):
        running = self.running()
        return sorted([self.pid] + [w['pid'] for w in running['workers'] or ()])

    def upgrade(self, version, via='signal', change=None):
        """Install `version` and upgrade to it; return once it serves and the old
        generation has drained and gone, with its workers."""
        mark = len(self.output())
        self.tree.install(version, change)
        if via == 'signal':
            os.kill(self.pid, signal.SIGUSR2)
        else:
            self.assertEqual(self.change('/upgrade'),
                             'OK upgrading: the new code passed its check and takes over once ready')
        wait_until(lambda: self.serving(version), 60, message='%s does not serve: %s' % (version, self.output()[mark:]))
        return mark

    def unusual_ends(self):
        """The access lines of connections that did not end as the client asked, and
        the warnings and errors: what a failure message shows."""
        return '\n'.join(l for l in self.output().splitlines()
                         if (' access ' in l and 'end=done' not in l) or ' WARNING ' in l or ' ERROR ' in l)

    def old_gone(self, mark):
        wait_until(lambda: 'has drained: exiting' in self.output()[mark:], 60)
        wait_until(lambda: self.processes() == self.expected_processes(), 30,
                   message='processes %r, expected %r' % (self.processes(), self.expected_processes()))


class TestUpgrade(UpgradeCase):

    def test_under_load_nothing_lost(self):
        """New clients all the while, and streams opened before, byte-exact to their end;
        the same PID, the new version, no process or fd left over."""
        self.start_process()
        self.assertEqual(self.running()['generation']['number'], 1)
        streams = Background(self.echo_port, 20, interval=0.05).start()
        self.addCleanup(streams.stop)
        clients = NewClients(self.listen, lambda answer: answer in (b'n1', b'n2')).start()
        self.addCleanup(clients.stop)
        fds = fd_count(self.pid)
        mark = self.upgrade('1.0.1')
        before = clients.count()
        wait_until(lambda: clients.count() > before + 20, 30)    # and then some, on the new code
        self.assertEqual(streams.finish(), [])
        total, failures = clients.stop()
        self.assertEqual(failures, [], 'of %d' % total)
        self.old_gone(mark)
        # What the old generation counted as it drained (the streams' bytes, counted at their end) came over.
        sent = sum(stream.sent for stream in streams.streams)
        wait_until(lambda: self.host('e1', 'main', service=1)['bytes_in'] == sent, 10,
                   message='bytes in: %r, sent %d' % (self.host('e1', 'main', service=1), sent))
        running = self.running()
        self.assertEqual((running['pid'], running['version'], running['generation']['number']), (self.pid, '1.0.1', 2))
        self.assertEqual(running['upgrade']['from'], '1.0.0')
        self.assertTrue(running['upgrade']['ok'])
        self.assertIsNone(self.proc.proc.poll())
        wait_until(lambda: fd_count(self.pid) <= fds, 10, message='fds of the balancer: %d, were %d' % (
            fd_count(self.pid), fds))
        self.assertRegex(self.output(), r'upgrade: pydirector 1\.0\.1 serves \(pid %d, generation 2, upgraded '
                                        r'from pydirector 1\.0\.0\)' % self.pid)
        page = self.fetch('/running')[1]
        self.assertIn('Running pydirector 1.0.1 (pid %d) since ' % self.pid, page)
        self.assertIn(' Upgraded from pydirector 1.0.0 at ', page)
        metrics = self.fetch('/metrics')[1]
        self.assertIn('\npydirector_generation 2\n', metrics)
        self.assertIn('\npydirector_upgrade_last_successful 1\n', metrics)
        self.assertNotIn('Traceback', self.output())

    def test_a_udp_service_goes_on_answering(self):
        """A UDP listen socket is handed on too: a client of the old generation and
        new ones are answered throughout, and nothing failed to listen."""
        from test_udp import UdpBackend, ask, client, udp_service
        backend = UdpBackend('u1')
        self.addCleanup(backend.close)
        port = free_port()
        xml = self.xml().replace('  <admin ', udp_service([('u1', backend.address)], listen_port=port,
                                                         extra='    <timeouts idle="2"/>\n') + '  <admin ', 1)
        self.start_process(xml)
        held = client()
        self.addCleanup(held.close)
        self.assertEqual(ask(port, b'before', held), b'u1:before')
        mark = self.upgrade('1.0.1')
        self.assertEqual(ask(port, b'after', held), b'u1:after')
        for n in range(5):
            self.assertEqual(ask(port, b'new%d' % n), b'u1:new%d' % n)
        self.old_gone(mark)
        self.assertEqual(ask(port, b'last', held), b'u1:last')
        self.assertNotIn('cannot listen', self.output())
        self.assertNotIn('Traceback', self.output())

    def test_admin_changes_sticky_entries_and_counts_survive(self):
        self.start_process(self.xml('roundrobin,sticky'))
        # Sticky entries: client addresses until one is on n1 and one on n2.
        first = {}
        for last in range(2, 20):
            client = '127.0.0.%d' % last
            first[client] = self.exchange_from(client)
            if set(first.values()) == {b'n1', b'n2'}:
                break
        for client, name in first.items():
            wait_until(lambda: self.explain(client)['sticky']['host'] == name.decode(), 10)   # the master's too
        sticky = dict((client, self.explain(client)['sticky']) for client in first)
        # Admin changes: n1 draining takes only its sticky clients from now on.
        self.change('/hostAdminDown', service='web', group='main', name='n1', force='1')
        self.change('/addHost', service='web', group='main', name='n3', ip=self.n3.address)
        self.change('/setHost', service='web', group='main', name='n2', weight='3')
        self.change('/newGroup', service='web', group='canary', scheduler='random')
        self.change('/addHost', service='web', group='canary', name='c1', ip='127.0.0.1:9')
        self.change('/delGroup', service='web', group='spare')
        accepted = wait_until(lambda: self.running()['services'][0]['accepted'] == len(first) and len(first), 10)
        self.upgrade('1.1.0', via='admin')
        after = self.running()
        self.assertEqual(self.host('n1', running=after)['admin'], 'draining')
        self.assertEqual([t['to'] for t in self.host('n1', running=after)['timeline']], ['draining'])
        self.assertEqual(self.host('n2', running=after)['weight'], 3)
        self.assertEqual(self.host('n3', running=after)['ip'], self.n3.address)
        self.assertEqual([g['name'] for g in after['services'][0]['groups']], ['main', 'canary'])
        self.assertEqual(self.host('c1', 'canary', after)['ip'], '127.0.0.1:9')
        self.assertIn('name="n3"', self.fetch('/running.xml')[1])
        self.assertNotIn('name="n3"', self.fetch('/config.xml')[1])    # the file as loaded is the same file
        # Counted once: the old generation's totals, then what the new one adds.
        self.assertEqual(after['services'][0]['accepted'], accepted)
        self.assertEqual(sum(self.host(n, running=after)['total'] for n in ('n1', 'n2')), accepted)
        # Each client goes where it went, its entry's expiry counted on: even to n1, draining.
        for client, name in first.items():
            entry = self.explain(client)['sticky']
            self.assertEqual(entry['host'], sticky[client]['host'], client)
            self.assertLessEqual(entry['expires_in'], sticky[client]['expires_in'])
            self.assertEqual(self.exchange_from(client), name, client)
        wait_until(lambda: self.running()['services'][0]['accepted'] == 2 * accepted, 10)

    def exchange_from(self, client):
        """Connect from a client address of 127/8; what comes back."""
        import socket
        sock = socket.socket()
        try:
            sock.settimeout(10)
            sock.bind((client, 0))
            sock.connect(('127.0.0.1', self.listen))
            return support.recv_all(sock)
        finally:
            sock.close()

    def explain(self, client):
        return json.loads(self.fetch('/explain?service=web&format=json&client=' + client)[1])

    def test_a_pending_switch_and_health_go_along(self):
        xml = self.xml().replace('<check interval="0.5" timeout="1"/>', '<check interval="30" timeout="1"/>')
        self.start_process(xml)
        self.n2.close()     # refused from now on: down by the first client it is given to
        wait_until(lambda: b'n1' == exchange(self.listen) and self.host('n2')['state'] == 'down', 10)
        self.change('/enableGroup', service='web', group='spare', drain='600')
        down = self.host('n2')
        self.upgrade('1.2.0')
        after = self.host('n2')
        # Still down, with its timeline (the new generation's round of checks finds it down too).
        self.assertEqual((after['state'], after['timeline']), (down['state'], down['timeline']))
        switch = self.running()['services'][0]['switch']
        self.assertEqual((switch['from'], switch['to']), ('main', 'spare'))
        self.assertGreater(switch['drain_until'], time.time() + 500)
        self.assertEqual(exchange(self.listen), b's1')

    @single_process('the same with workers: mode-blind')
    def test_a_broken_new_code_changes_nothing(self):
        self.start_process()
        clients = NewClients(self.listen, lambda answer: answer in (b'n1', b'n2'), threads=2).start()
        self.addCleanup(clients.stop)
        # A syntax error: refused by its --check, with file and line, before anything changes.
        self.tree.install('2.0.0', lambda text: text + '\ndef broken(:\n')
        status, body = self.fetch('/upgrade', {})
        self.assertEqual(status, 400, body)
        self.assertRegex(body, r'^ERROR upgrade refused: the new code fails its check: %s:[0-9]+: SyntaxError: '
                         % re.escape(self.tree.path()))
        running = self.running()
        self.assertEqual((running['version'], running['pid'], running['upgrade']['ok']), ('1.0.0', self.pid, False))
        self.assertIn('SyntaxError', running['upgrade']['error'])
        metrics = self.fetch('/metrics')[1]
        self.assertIn('\npydirector_upgrade_last_successful 0\n', metrics)
        self.assertIn('The upgrade at ', self.fetch('/running')[1])
        # An import error in the admin's module, and a config the new code refuses.
        self.tree.install('2.0.0')
        self.tree.install(None, lambda text: 'import no_such_module\n' + text, name='pydirector_admin.py')
        status, body = self.fetch('/upgrade', {})
        self.assertEqual(status, 400, body)
        self.assertIn("No module named 'no_such_module'", body)
        self.tree.install(None, name='pydirector_admin.py')
        self.tree.install('2.0.0', lambda text: text.replace("Attr('drain'", "Attr('drain_seconds'"))
        status, body = self.fetch('/upgrade', {})
        self.assertEqual(status, 400, body)
        self.assertTrue(body.startswith("ERROR upgrade refused: the new code fails its check: %s:1: <pdconfig> "
                                        "has unknown attribute 'drain'" % self.proc.config_path), body)
        total, failures = clients.stop()
        self.assertEqual(failures, [], 'of %d' % total)
        self.assertEqual(self.running()['version'], '1.0.0')
        self.assertEqual(self.processes(), self.expected_processes())

    def test_new_generation_killed_mid_handover(self):
        """SIGKILL of the new generation (the PID) while it takes over: the old one serves on,
        as the balancer now (its admin again too), and no client notices."""
        self.start_process()
        clients = NewClients(self.listen, lambda answer: answer in (b'n1', b'n2'), threads=2).start()
        self.addCleanup(clients.stop)
        mark = len(self.output())
        self.tree.install('3.0.0', when_upgrading('time.sleep(60)'))
        os.kill(self.pid, signal.SIGUSR2)
        line = wait_until(lambda: re.search(r'upgrade: pid ([0-9]+) serves as the old generation',
                                            self.output()[mark:]), 60)
        old = int(line.group(1))
        time.sleep(0.2)
        os.kill(self.pid, signal.SIGKILL)
        self.assertEqual(self.proc.proc.wait(10), -signal.SIGKILL)
        wait_until(lambda: 'upgrade failed: the new generation (pid %d) exited before it was ready' % self.pid
                   in self.output(), 10)
        running = wait_until(lambda: self.serving('1.0.0') and self.running(), 30)
        self.assertEqual(running['pid'], old)
        self.assertFalse(running['upgrade']['ok'])
        before = clients.count()
        wait_until(lambda: clients.count() > before + 20, 30)
        total, failures = clients.stop()
        self.assertEqual(failures, [], 'of %d' % total)

    def test_new_generation_never_ready(self):
        """Not ready within upgrade_timeout: the old generation kills it and serves on."""
        self.start_process(self.xml(upgrade_timeout='3'))
        mark = len(self.output())
        self.tree.install('3.1.0', when_upgrading('time.sleep(60)'))
        self.assertEqual(self.change('/upgrade'), 'OK upgrading: the new code passed its check and takes over once ready')
        wait_until(lambda: re.search(r'upgrade failed: the new generation \(pid %d\) was not ready within 3 s '
                                     r'\(upgrade_timeout\): killed it' % self.pid, self.output()[mark:]), 30)
        running = wait_until(lambda: self.serving('1.0.0') and self.running(), 30)
        self.assertIn('was not ready within 3 s', running['upgrade']['error'])
        self.assertEqual(exchange(self.listen, timeout=10) in (b'n1', b'n2'), True)

    @single_process('the same with workers: mode-blind')
    def test_one_upgrade_at_a_time(self):
        self.start_process()
        # A new code slow to load: its --check takes a while, and so does its start.
        self.tree.install('4.0.0', lambda text: text.replace('\nimport schedulers\n',
                                                             '\nimport schedulers\ntime.sleep(1)\n'))
        mark = len(self.output())
        os.kill(self.pid, signal.SIGUSR2)
        wait_until(lambda: 'upgrade: checking' in self.output()[mark:], 10)
        self.assertRegex(self.change('/upgrade', 409), r'^ERROR an upgrade is running \((checking|starting|taking over)\)$')
        # (An admin connection open at the fork may be closed: serving() asks again.)
        wait_until(lambda: self.serving('4.0.0'), 60)
        self.assertEqual(self.running()['generation']['number'], 2)

    def test_storm_of_upgrades_and_reloads(self):
        """Short storms for CI (bench/upgrade.py runs the 60 s ones): upgrades one after
        another, the file changed meanwhile, then SIGHUP every 300 ms, all under load."""
        self.start_process()
        clients = NewClients(self.listen, lambda answer: answer in NAMES).start()
        self.addCleanup(clients.stop)
        fds = fd_count(self.pid)
        self.upgrade('5.0.0')
        # The file changed since the old generation loaded it: the new one applies it, as a reload.
        with open(self.proc.config_path, 'w') as f:
            f.write(self.xml(main=[('n1', self.n1.address), ('n2', self.n2.address), ('n3', self.n3.address)]))
        mark = self.upgrade('5.0.1')
        self.assertIn('reloaded %s: web: +host n3' % self.proc.config_path, self.output()[mark:])
        self.assertEqual(self.host('n3')['ip'], self.n3.address)
        self.assertIn('name="n3"', self.fetch('/config.xml')[1])
        self.old_gone(mark)
        for _ in range(8):
            self.proc.signal(signal.SIGHUP)
            time.sleep(0.3)
        wait_until(lambda: 'reloaded %s: no changes' % self.proc.config_path in self.output()[mark:], 10)
        total, failures = clients.stop()
        self.assertEqual(failures, [], 'of %d; %s' % (total, self.unusual_ends()))
        self.assertEqual(self.running()['generation']['number'], 3)
        wait_until(lambda: fd_count(self.pid) <= fds, 10)
        self.assertEqual(self.processes(), self.expected_processes())

    @single_process('the same with workers: mode-blind')
    def test_systemd_sees_the_main_pid_serve_throughout(self):
        notify = test_systemd.NotifySocket()
        self.addCleanup(notify.close)
        self.start_process(env={'NOTIFY_SOCKET': notify.env})
        self.assertEqual(notify.next(), 'READY=1')
        mark = self.upgrade('6.0.0')
        self.assertRegex(notify.next(), r'RELOADING=1\nMONOTONIC_USEC=[0-9]+\Z')
        old = int(re.search(r'upgrade: pid ([0-9]+) serves as the old generation', self.output()[mark:]).group(1))
        # The old generation is the main process while it alone serves; then the PID again.
        self.assertEqual(notify.next(), 'MAINPID=%d' % old)
        self.assertEqual(notify.next(), 'MAINPID=%d\nREADY=1' % self.pid)
        self.old_gone(mark)
        self.assertEqual([m for m in notify.waiting() if m != 'WATCHDOG=1'], [])
        self.proc.signal(signal.SIGTERM)
        self.assertEqual(notify.next(), 'STOPPING=1')
        self.assertEqual(self.proc.exited_with(30), 0, self.output())


    @single_process('the same with workers: mode-blind')
    def test_a_stop_while_the_new_code_starts_stops_both(self):
        """SIGTERM (and SIGUSR2) to the PID while the new code starts wait for it to handle
        them, blocked across the exec: the new generation stops, and tells the old one to."""
        self.start_process()
        mark = len(self.output())
        self.tree.install('8.0.0', when_upgrading('time.sleep(2)'))
        os.kill(self.pid, signal.SIGUSR2)
        wait_until(lambda: 'serves as the old generation' in self.output()[mark:], 60)
        os.kill(self.pid, signal.SIGUSR2)
        os.kill(self.pid, signal.SIGTERM)
        self.assertEqual(self.proc.exited_with(60), 0, self.output()[mark:])
        wait_until(lambda: not self.processes(), 30, message='left: %r' % self.processes())
        tail = self.output()[mark:]
        # (Signals are handled in their number's order on CPython: SIGUSR2's comes first.)
        self.assertRegex(tail, r'upgrade refused: (an upgrade is running \(taking over\)|stopping: no upgrade)')
        self.assertIn('has drained: exiting', tail)
        self.assertNotIn('upgrade failed', tail)

    @single_process('the same with workers: mode-blind')
    def test_a_state_version_unknown_is_refused(self):
        """A new code that reads the state in no version the old one writes is refused by
        it, and the old one serves on."""
        self.start_process()
        self.tree.install('7.0.0', lambda text: text.replace('HANDOVER_VERSIONS = (1,)', 'HANDOVER_VERSIONS = (2,)'))
        os.kill(self.pid, signal.SIGUSR2)
        wait_until(lambda: 'upgrade failed: pydirector 7.0.0 reads the state in version(s) 2; this one writes 1; '
                           'pydirector 1.0.0 (pid ' in self.output(), 60)
        self.assertEqual(self.proc.exited_with(30), 1)
        self.assertIn('upgrade: cannot take over from the old generation: the old generation refused: pydirector '
                      '7.0.0 reads the state in version(s) 2', self.output())
        running = wait_until(lambda: self.serving('1.0.0') and self.running(), 30)
        self.assertNotEqual(running['pid'], self.pid)
        self.assertEqual((running['upgrade']['ok'], running['upgrade']['to']), (False, '7.0.0'))
        self.assertIn(exchange(self.listen), (b'n1', b'n2'))


class SignalMaskTest(BalancerCase):
    """Our threads leave the process's signals to the main thread: one another thread
    took between an upgrade's fork and its exec was lost (1 run in 10 of
    test_a_stop_while_the_new_code_starts_stops_both; on 3.6, a probe pool thread
    that never ran a job took them)."""

    def blocked(self):
        return set(signal.pthread_sigmask(signal.SIG_BLOCK, []))

    def thread_masks(self):
        """{thread id: the signal numbers it blocks} of this process's threads, from /proc."""
        masks = {}
        for tid in os.listdir('/proc/self/task'):
            try:
                with open('/proc/self/task/%s/status' % tid) as f:
                    line = [l for l in f if l.startswith('SigBlk:')][0]
            except (OSError, IndexError):
                continue    # (gone meanwhile)
            bits = int(line.split()[1], 16)
            masks[tid] = set(n for n in range(1, 65) if bits >> (n - 1) & 1)
        return masks

    def test_our_threads_block_the_process_signals(self):
        seen = []
        pydirector.start_thread(lambda: seen.append(self.blocked()), 'test').join(10)
        self.assertLessEqual(set(pydirector.PROCESS_SIGNALS), seen[0])
        self.assertFalse(set(pydirector.PROCESS_SIGNALS) & self.blocked())    # the creator's mask is as it was

    def test_the_probe_pool_threads_block_them_whether_or_not_they_ran_a_job(self):
        self.start(service_xml([('a', '127.0.0.1:9')]))
        manager = self.balancer.director.manager
        before = set(self.thread_masks())
        # One quick job after another: 3.6's pool starts a thread for each submit
        # until it has all of them, and most of those never get a job.
        for _ in range(pydirector.PROBE_WORKERS):
            done = threading.Event()
            self.balancer.call(manager.submit, done.set)
            self.assertTrue(done.wait(10))
        wanted = set(int(n) for n in pydirector.PROCESS_SIGNALS)
        new = dict((tid, mask) for tid, mask in self.thread_masks().items() if tid not in before)
        self.assertTrue(new)
        self.assertEqual([tid for tid, mask in new.items() if not wanted <= mask], [])


class HandoverTableTest(unittest.TestCase):
    """Generated from pydirector.HANDOVER, as test_workers' MessageTableTest from MESSAGES."""

    def test_every_row_has_its_handler_on_its_side_taking_its_fields(self):
        sides = {pydirector.NEW: pydirector.OldGeneration, pydirector.OLD: pydirector.Takeover}
        for kind, row in pydirector.HANDOVER.items():
            with self.subTest(kind=kind):
                self.assertEqual(row.kind, kind)
                if row.handler is None:
                    self.assertIn(kind, ('state', 'refused'))   # the answer Takeover.receive reads
                    continue
                params = list(inspect.signature(getattr(sides[row.direction], row.handler)).parameters)[1:]
                self.assertEqual(set(params), row.fields)
        for side, direction in sides.items():
            for name in dir(direction):
                if name.startswith('on_') and name != 'on_message':
                    self.assertIn((side, name), [(r.direction, r.handler) for r in pydirector.HANDOVER.values()])

    def test_the_state_has_every_field_its_row_names(self):
        balancer = support.Balancer(config_xml(service_xml([('n1', '127.0.0.1:9')])))
        self.addCleanup(balancer.stop)
        state = balancer.call(pydirector.generation_state, balancer.director, [7])
        self.assertEqual(set(state) | {'version'}, pydirector.HANDOVER['state'].fields)
        self.assertEqual(state['children'], [7, os.getpid()])
        json.dumps(state)       # all of it goes as JSON


class TestUpgradeWorkers(WorkersMixin, TestUpgrade):
    """The same with a master and two worker processes: the old workers drain, the new ones serve."""


if __name__ == '__main__':
    import unittest
    unittest.main()
