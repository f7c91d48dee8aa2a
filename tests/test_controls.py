"""The server controls (issue 28), on real sockets: blue/green that cannot leave a
service down (rollback judged by probes made after the switch, 409 for a switch to
a group with no host up and for draining the last host up, force=1), setHost
(weight, maxconns, ready/drain/maint in place), backup hosts, slow start, and
--check refusing a host that points back at the balancer's own listen.

Each test starts pydirector in-process with its admin server on an ephemeral port
and drives it over HTTP as an operator would; the suites that change state run a
second time with two worker processes (WorkersMixin).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

import support
from support import (AdoptedBackend, BalancerCase, LOG, WorkersMixin, admin_request, config_xml, exchange, free_port,
                     say_name, service_xml, wait_until)

import pydirector
import pydirector_admin

PASSWORD = 'secret'
_HASH = []


def admin_xml():
    if not _HASH:
        _HASH.append(pydirector.hash_password(PASSWORD, iterations=support.FAST_HASH_ITERATIONS))
    return ('  <admin listen="127.0.0.1:%d">\n    <user name="admin" password="%s" access="full"/>\n'
            '  </admin>\n' % (free_port(), _HASH[0]))


def check(interval=0.1, **extra):
    attrs = dict(interval=interval, timeout=1, rise=1, fall=1, **extra)
    return '    <check %s/>\n' % ' '.join('%s="%s"' % item for item in sorted(attrs.items()))


def name_then_echo(conn, backend):
    conn.sendall(backend.name.encode() + b'\n')
    support.echo(conn, backend)


def revive(port, name, handler=say_name):
    """A backend on the very port of one that was closed: the host comes back."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(('127.0.0.1', port))
    return AdoptedBackend(sock, handler, name)


class ControlsCase(BalancerCase):
    """A balancer from service XML plus its admin server; helpers speak HTTP to it."""

    def start_with_admin(self, services):
        balancer = self.start(config_xml(services + admin_xml()))
        a = balancer.config.admin
        self.server = pydirector_admin.start(balancer.director, pydirector.Admin(a.listen, a.host, 0, a.users))
        self.addCleanup(self.server.stop)
        return balancer

    def request(self, method, path, params=None):
        return admin_request(self.server.server_address[1], method, path, params, PASSWORD, timeout=20)

    def change(self, path, expect=200, **params):
        status, text = self.request('POST', path, params)
        self.assertEqual(status, expect, text)
        return text

    def page(self, path):
        status, text = self.request('GET', path)
        self.assertEqual(status, 200, text)
        return text

    def service(self):
        return json.loads(self.page('/running.json'))['services'][0]

    def names(self, count, port=None):
        return [exchange(port or self.balancer.port()).decode() for _ in range(count)]

    def running(self, group, host):
        """The master's (service, group, host) objects, to look at on the loop."""
        service = self.balancer.director.services['web']
        group = service.groups[group]
        return service, group, group.scheduler.get_host(host)


# ---------------------------------------------------------------------------
# Blue/green: a rollback judged on probes made after the switch; 409 and force=1.

class RollbackTest(ControlsCase):

    def start_two_groups(self, extra):
        self.blue = self.backend(say_name, 'blue')
        self.green = self.backend(say_name, 'green')
        return self.start_with_admin(service_xml(None, groups=[
            ('main', 'roundrobin', [('b1', self.blue.address)]),
            ('green', 'roundrobin', [('g1', self.green.address)]),
        ], enable='main', extra=extra))

    def assert_rolled_back(self, mark):
        LOG.wait_for('service web: rollback to group main: group green had no host up within', mark, timeout=10)
        self.balancer.sync()
        self.assertEqual((self.service()['enabled'], self.service()['switch']), ('main', None))
        self.assertEqual(self.names(2), ['blue', 'blue'])
        self.assertEqual(self.request('GET', '/healthz'), (200, 'OK\n'))

    def test_new_group_dies_right_after_the_switch(self):
        self.start_two_groups(check(interval=0.1))
        mark = LOG.mark()
        answer = self.change('/enableGroup', service='web', group='green', rollback='2')
        self.assertIn('back to main unless a host is up within 2 s', answer)
        self.green.close()
        self.assert_rolled_back(mark)

    def test_its_only_host_was_dead_but_not_yet_detected(self):
        # The case: probes far apart, the host killed a moment before the switch.
        # Its state still says up, so the switch is taken (no 409) -- with its window.
        balancer = self.start_two_groups(check(interval=30))
        service, group, g1 = self.running('green', 'g1')
        health = balancer.director.health
        balancer.call(health.probe_now, g1)
        wait_until(lambda: balancer.call(lambda: health.states[g1].passed > 0 and
                                         not health.states[g1].in_flight))
        self.green.close()
        mark = LOG.mark()
        answer = self.change('/enableGroup', service='web', group='green', rollback='1.5')
        self.assertEqual(answer, 'OK enabled group green in service web (was main); back to main unless a host '
                                 'is up within 1.5 s\n')
        self.assertIsNotNone(self.service()['switch']['rollback_until'])
        self.assert_rolled_back(mark)
        self.assertEqual(self.request('GET', '/healthz'), (200, 'OK\n'))

    def test_no_rollback_when_the_new_group_stays_up(self):
        self.start_two_groups(check(interval=0.1))
        mark = LOG.mark()
        self.change('/enableGroup', service='web', group='green', rollback='0.5')
        wait_until(lambda: self.service()['switch'] is None, 10)
        self.assertEqual(self.service()['enabled'], 'green')
        self.assertEqual(self.names(2), ['green', 'green'])
        self.assertFalse([l for l in LOG.since(mark) if 'rollback to group' in l])


class RefusalTest(ControlsCase):

    def setUp(self):
        ControlsCase.setUp(self)
        self.n1, self.n2 = self.backend(say_name, 'n1'), self.backend(say_name, 'n2')
        self.start_with_admin(service_xml(None, groups=[
            ('main', 'roundrobin', [('n1', self.n1.address), ('n2', self.n2.address)]),
            ('dark', 'roundrobin', [('d1', '127.0.0.1:%d' % free_port())]),
        ], enable='main', extra=check()))

    def test_switch_to_a_group_with_no_host_up(self):
        wait_until(lambda: self.balancer.host('d1')['state'] == 'down', 10)
        self.assertEqual(self.change('/enableGroup', 409, service='web', group='dark'),
                         'ERROR refusing to enable group dark of service web: it has no host up (1 down); '
                         'force=1 enables it anyway\n')
        self.assertEqual(self.service()['enabled'], 'main')
        self.change('/enableGroup', 400, service='web', group='dark', force='yes')
        self.change('/enableGroup', service='web', group='dark', force='1')
        self.balancer.sync()
        self.assertEqual(self.service()['enabled'], 'dark')
        self.change('/enableGroup', service='web', group='main')
        # (With workers, each its own roundrobin: two clients may both get n1.)
        self.assertLessEqual(set(self.names(2)), {'n1', 'n2'})

    def test_draining_or_maint_for_the_last_host_up(self):
        self.change('/hostAdminDown', service='web', group='main', name='n1')
        self.assertEqual(self.change('/hostAdminDown', 409, service='web', group='main', name='n2'),
                         'ERROR refusing to drain host n2: it is the last host up in the enabled group main of '
                         'service web; force=1 does it anyway\n')
        self.change('/setHost', 409, service='web', group='main', name='n2', state='drain')
        self.assertIn('put into maint host n2',
                      self.change('/setHost', 409, service='web', group='main', name='n2', state='maint'))
        self.assertEqual(self.names(2), ['n2', 'n2'])
        self.assertEqual(self.request('GET', '/healthz'), (200, 'OK\n'))
        # Inactive groups and hosts not up are no one's last: no rule.
        self.change('/setHost', service='web', group='dark', name='d1', state='maint')
        self.change('/setHost', service='web', group='main', name='n2', state='maint', force='1')
        self.assertEqual(self.request('GET', '/healthz'), (503, 'DOWN 1\n'))
        self.change('/hostAdminUp', service='web', group='main', name='n1')
        self.assertEqual(self.request('GET', '/healthz'), (200, 'OK\n'))


class RollbackWorkersTest(WorkersMixin, RollbackTest):
    pass


class RefusalWorkersTest(WorkersMixin, RefusalTest):
    pass


# ---------------------------------------------------------------------------
# setHost: weight, maxconns and state in place.

class SetHostTest(ControlsCase):

    def setUp(self):
        ControlsCase.setUp(self)
        self.a, self.b = self.backend(name_then_echo, 'a'), self.backend(name_then_echo, 'b')
        self.start_with_admin(service_xml([('a', self.a.address), ('b', self.b.address)], extra=check(interval=5)))

    def names(self, count, port=None):
        return [name.split(b'\n')[0].decode() for name in
                (exchange(self.balancer.port()) for _ in range(count))]

    def test_weight_three_to_one(self):
        if not self.workers:
            self.assertEqual(sorted(self.names(4)), ['a', 'a', 'b', 'b'])
        self.assertEqual(self.change('/setHost', service='web', group='main', name='a', weight='3'),
                         'OK set host a in web/main: weight 3 (was 1) (0 open)\n')
        names = self.names(40)
        if self.workers:    # each worker has its rotation: 3:1 in each, to a turn or two
            self.assertLessEqual(abs(names.count('a') - 30), 2 * self.workers, names)
        else:
            self.assertEqual(names.count('a'), 30, names)
        self.assertIn('<host name="a" ip="%s" weight="3"/>' % self.a.address, self.page('/running.xml'))

    def test_health_totals_and_connections_are_kept(self):
        held = support.connect(self.balancer.port())
        self.addCleanup(held.close)
        first = held.recv(2).decode().strip()
        self.names(4)

        def counted():      # a worker counts an open connection at its next full write (0.5 s)
            host = self.balancer.host(first)
            return host if host['open'] == 1 else None
        before = wait_until(counted, 10)
        self.change('/setHost', service='web', group='main', name=first, weight='5', maxconns='7')
        after = self.balancer.host(first)
        self.assertEqual([after[k] for k in ('health', 'total', 'open', 'since', 'state_changes')],
                         [before[k] for k in ('health', 'total', 'open', 'since', 'state_changes')])
        self.change('/setHost', service='web', group='main', name=first, state='drain')
        held.sendall(b'still here')
        self.assertEqual(support.recv_all(held, 10), b'still here')
        after = self.balancer.host(first)
        self.assertEqual((after['health'], after['total'], after['open']), ('up', before['total'], 1))
        self.assertEqual((after['weight'], after['maxconns'], after['admin']), (5, 7, 'draining'))
        self.assertEqual(after['state_changes'], before['state_changes'] + 1)   # enabled -> draining, no more
        xml = self.page('/running.xml')
        self.assertIn('<host name="%s" ip="%s" weight="5" maxconns="7"/>' % (first, getattr(self, first).address),
                      xml)
        pydirector.parse_config(xml, 'running.xml')
        self.change('/setHost', service='web', group='main', name=first, state='ready')
        self.assertEqual(self.balancer.host(first)['total'], before['total'])
        held.close()

    def test_refusals(self):
        self.assertEqual(self.change('/setHost', 400, service='web', group='main', name='a'),
                         'ERROR setHost needs weight, maxconns or state\n')
        self.assertEqual(self.change('/setHost', 400, service='web', group='main', name='a', weight='0'),
                         "ERROR weight '0': must be an integer 1-1000\n")
        self.assertEqual(self.change('/setHost', 400, service='web', group='main', name='a', state='up'),
                         "ERROR state must be 'ready', 'drain' or 'maint', not 'up'\n")
        self.change('/setHost', 404, service='web', group='main', name='zz', weight='2')
        self.assertEqual(self.balancer.host('a')['weight'], 1)


class SetHostWorkersTest(WorkersMixin, SetHostTest):
    pass


class MaintTest(ControlsCase):
    """maint: no client and no probe reaches the host; ready brings both back."""

    INTERVAL = 0.2

    def test_maint_host_sees_no_connection_at_all(self):
        n1, n2 = self.backend(say_name, 'n1'), self.backend(say_name, 'n2')
        self.start_with_admin(service_xml([('n1', n1.address), ('n2', n2.address)],
                                          extra=check(interval=self.INTERVAL)))
        wait_until(lambda: n1.accepted >= 2, 10)        # probed
        self.change('/setHost', service='web', group='main', name='n1', state='maint')
        service, group, host = self.running('main', 'n1')
        health = self.balancer.director.health
        wait_until(lambda: not self.balancer.call(lambda: health.states[host].in_flight))
        seen = n1.accepted
        window = threading.Event()
        deadline = time.monotonic() + 3 * self.INTERVAL
        names = []
        while time.monotonic() < deadline:
            names.append(exchange(self.balancer.port()).decode())
            window.wait(0.02)
        self.assertEqual(set(names), {'n2'})
        window.wait(max(0.0, deadline - time.monotonic()))
        self.assertEqual(n1.accepted, seen, 'a client or a probe reached the host in maint')
        # Shown as maint everywhere.
        self.assertIn('disabled n1 %s maint - 0 ' % n1.address, self.page('/running.txt'))
        shown = self.balancer.host('n1')
        self.assertEqual((shown['admin'], shown['state'], shown['next_probe']), ('maint', 'maint', None))
        metrics = self.page('/metrics')
        self.assertIn('pydirector_host_maint{service="web",group="main",host="n1",address="%s"} 1' % n1.address,
                      metrics)
        self.assertIn('pydirector_host_draining{service="web",group="main",host="n1",address="%s"} 0'
                      % n1.address, metrics)
        self.assertIn('<td class="maint">maint', self.page('/running'))
        # Ready again: probed at once, and clients come.
        self.change('/setHost', service='web', group='main', name='n1', state='ready')
        wait_until(lambda: n1.accepted > seen, 5)
        wait_until(lambda: 'n1' in self.names(2), 5)


class MaintWorkersTest(WorkersMixin, MaintTest):
    pass


# ---------------------------------------------------------------------------
# Backup hosts and slow start.

class BackupTest(ControlsCase):

    def test_backup_takes_over_and_hands_back(self):
        n1, b1 = self.backend(say_name, 'n1'), self.backend(say_name, 'b1')
        port = n1.port
        self.start_with_admin(service_xml([('n1', n1.address), ('b1', b1.address, 'backup="on"')],
                                          extra=check()))
        self.assertEqual(self.names(4), ['n1'] * 4)
        explained = self.balancer.call(self.balancer.director.explain, 'web', '10.0.0.1')
        self.assertIn(['b1', 'backup'], explained['skipped'])
        self.assertEqual(self.balancer.host('b1')['backup'], True)
        n1.close()
        wait_until(lambda: self.balancer.host('n1')['state'] == 'down', 10)
        self.balancer.sync()
        self.assertEqual(self.names(3), ['b1'] * 3)
        explained = self.page('/explain?service=web&client=10.0.0.1')
        self.assertIn('host: b1 %s' % b1.address, explained)
        self.assertIn('; a backup host: no normal host is up', explained)
        back = revive(port, 'n1')
        self.addCleanup(back.close)
        wait_until(lambda: self.balancer.host('n1')['state'] == 'up', 10)
        self.balancer.sync()
        self.assertEqual(self.names(3), ['n1'] * 3)


class BackupWorkersTest(WorkersMixin, BackupTest):
    pass


class SlowStartTest(ControlsCase):
    """A host back from down takes clearly less than its share in the first fifth
    of its slowstart, and its share once it is over."""

    SLOWSTART = 5.0

    def test_returning_host_ramps_up(self):
        a, b = self.backend(say_name, 'a'), self.backend(say_name, 'b')
        port = a.port
        self.start_with_admin(service_xml([('a', a.address), ('b', b.address)],
                                          extra=check(slowstart=self.SLOWSTART)))
        if not self.workers:    # each worker has its own rotation: any 4 in a row only in one process
            self.assertEqual(sorted(self.names(4)), ['a', 'a', 'b', 'b'])
        a.close()
        wait_until(lambda: self.balancer.host('a')['state'] == 'down', 10)
        back = revive(port, 'a')
        self.addCleanup(back.close)
        wait_until(lambda: self.balancer.host('a')['state'] == 'up', 10)
        came_back = time.monotonic()        # the ramp began a little before: a tick at most
        self.balancer.sync()
        names = []
        while time.monotonic() - came_back < self.SLOWSTART / 5 - 0.2 and len(names) < 200:
            names.append(exchange(self.balancer.port()).decode())
        self.assertGreaterEqual(len(names), 10, 'too few clients in the first fifth to tell')
        self.assertLess(names.count('a') / len(names), 0.25, names)     # its share is 0.5
        explained = self.page('/explain?service=web&client=10.0.0.1')
        self.assertRegex(explained, r'\nslow start: a at effective weight 0\.\d+ of 1, \d\.\d s left\n')
        self.assertLess(self.balancer.host('a')['effective_weight'], 1)
        wait_until(lambda: self.balancer.host('a')['effective_weight'] == 1, self.SLOWSTART + 5)
        self.balancer.sync()
        wait_until(lambda: self.balancer.call(lambda: not any(
            g.scheduler.ramping for s in self.balancer.director.services.values() for g in s.groups.values())))
        names = self.names(40)
        self.assertLessEqual(abs(names.count('a') - 20), 2 * (self.workers or 0), names)
        self.assertNotIn('slow start', self.page('/explain?service=web&client=10.0.0.1'))


class SlowStartWorkersTest(WorkersMixin, SlowStartTest):
    pass


# ---------------------------------------------------------------------------
# --check, reload and addHost: a host that is this balancer's own listen.

class LoopCheckTest(ControlsCase):

    def check_file(self, xml):
        directory = tempfile.mkdtemp(prefix='pydirector-controls-')
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, 'lb.xml')
        with open(path, 'w') as f:
            f.write(xml)
        result = subprocess.run([sys.executable, support.PYDIRECTOR, '--check', path], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, timeout=30)
        return path, result.returncode, result.stdout.decode(), result.stderr.decode()

    def test_a_host_at_its_own_listen_is_an_error(self):
        port = free_port()
        for ip in ('127.0.0.1:%d' % port, 'localhost:%d' % port, '127.0.0.9:%d' % port):
            for listen in ('127.0.0.1:%d' % port, '*:%d' % port):
                if ip.startswith('127.0.0.9') and not listen.startswith('*'):
                    continue    # another address: no loop
                with self.subTest(ip=ip, listen=listen):
                    xml = config_xml(service_xml([('ok', '127.0.0.1:1'), ('self', ip)], listen_port=port)
                                     .replace('127.0.0.1:%d"/>' % port, listen + '"/>', 1))
                    path, rc, out, err = self.check_file(xml)
                    line = xml.splitlines().index([l for l in xml.splitlines() if 'name="self"' in l][0]) + 1
                    self.assertEqual((rc, out), (1, ''))
                    self.assertEqual(err, "pydirector: %s:%d: service 'web' group 'main': host 'self' ip %r is a "
                                          "listen of service 'web' itself: a loop (each client would come back "
                                          "here until file descriptors run out)\n" % (path, line, ip))

    def test_a_loop_through_two_services_is_an_error_a_chain_a_warning(self):
        front, back = free_port(), free_port()
        chain = config_xml(service_xml([('next', '127.0.0.1:%d' % back)], name='front', listen_port=front) +
                           service_xml([('real', '127.0.0.1:1')], name='back', listen_port=back))
        path, rc, out, err = self.check_file(chain)
        self.assertEqual((rc, err), (0, ''))
        self.assertIn("%s:5: warning: service 'front' group 'main': host 'next' ip '127.0.0.1:%d' is a listen of "
                      "service 'back' of this balancer: its clients cross it twice\n" % (path, back), out)
        looped = chain.replace("127.0.0.1:1", "127.0.0.1:%d" % front)
        path, rc, out, err = self.check_file(looped)
        self.assertEqual(rc, 1)
        self.assertIn("whose hosts lead back to service 'front': a loop", err)

    def test_an_enabled_group_without_hosts_is_a_warning(self):
        xml = config_xml(service_xml(None, groups=[('main', 'roundrobin', [('a', '127.0.0.1:1')]),
                                                   ('empty', 'roundrobin', [])], enable='empty'))
        path, rc, out, err = self.check_file(xml)
        self.assertEqual((rc, err), (0, ''))
        self.assertTrue(out.startswith('%s: OK\n' % path), out)
        self.assertTrue(out.endswith("%s:7: warning: service 'web': the enabled group 'empty' has no hosts: every "
                                     "client is refused\n" % path), out)

    def test_add_host_and_reload_refuse_a_loop(self):
        directory = tempfile.mkdtemp(prefix='pydirector-controls-')
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, 'lb.xml')
        a = self.backend(say_name, 'a')
        port = free_port()
        xml = config_xml(service_xml([('a', a.address)], listen_port=port) + admin_xml())
        balancer = self.start(xml, path=path)
        a_config = balancer.config.admin
        self.server = pydirector_admin.start(balancer.director, pydirector.Admin(a_config.listen, a_config.host, 0,
                                                                                 a_config.users))
        self.addCleanup(self.server.stop)
        answer = self.change('/addHost', 400, service='web', group='main', name='me', ip='localhost:%d' % port)
        self.assertIn("host 'me' ip 'localhost:%d' is a listen of service 'web' itself: a loop" % port, answer)
        with open(path, 'w') as f:
            f.write(xml.replace(a.address, '127.0.0.1:%d' % port))
        status, text = self.request('POST', '/reload', {})
        self.assertEqual(status, 400, text)
        self.assertIn('%s:5: ' % path, text)
        self.assertEqual(exchange(port), b'a')


if __name__ == '__main__':
    unittest.main()
