"""Production operations on real sockets: reload, access log, health timeline,
blue/green switches with drain and rollback."""

import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import unittest

from support import (BalancerCase, Backend, LOG, WorkersMixin, config_xml, connect, echo, exchange, free_port,
                     say_name, service_xml, single_process, wait_until)

import pydirector


class OpsTestCase(BalancerCase):
    """A balancer loaded from a file (so reload() can read it again), per test."""

    def setUp(self):
        BalancerCase.setUp(self)
        self.dir = tempfile.mkdtemp(prefix='pydirector-ops-')
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, 'live.xml')

    def backend(self, handler=say_name, name='backend'):
        return BalancerCase.backend(self, handler, name)

    def start(self, xml):
        return BalancerCase.start(self, xml, path=self.path)

    def rewrite(self, xml):
        with open(self.path, 'w') as f:
            f.write(xml)

    def reload(self):
        return self.balancer.call(self.balancer.director.reload)

    def access_lines(self):
        return [l for l in LOG.since(self.mark) if l.startswith('access ')]


class TestReload(OpsTestCase):

    def test_hosts_added_removed_and_changed_keep_the_rest(self):
        one, two, three = self.backend(name='one'), self.backend(name='two'), self.backend(name='three')
        port = free_port()
        self.start(config_xml(service_xml([('one', one.address), ('two', two.address)], listen_port=port)))
        for _ in range(4):
            exchange(port)
        before = self.balancer.host('one')
        self.rewrite(config_xml(service_xml(
            [('one', one.address, 'weight="3"'), ('three', three.address)],
            scheduler='leastconnsrr', listen_port=port)))
        message = self.reload()
        self.assertEqual(message, 'reloaded %s: web: scheduler main roundrobin->leastconnsrr, -host two, '
                         'host one weight 3, +host three' % self.path)
        self.assertIn(message, LOG.since(self.mark))
        after = self.balancer.host('one')
        self.assertEqual((after['total'], after['weight']), (before['total'], 3))
        names = {exchange(port) for _ in range(6)}
        self.assertEqual(names, {b'one', b'three'})
        self.assertEqual(self.reload(), 'reloaded %s: no changes' % self.path)

    @single_process('exact round-robin sequences: each worker keeps its own rotation')
    def test_new_order_weights_and_maxconns_reach_the_scheduler(self):
        # The reload hands them to the scheduler (update_host, reorder),
        # which keeps its own structures: set on the Host behind its back,
        # they would not be seen.
        one, two = self.backend(name='one'), self.backend(name='two')
        port = free_port()
        self.start(config_xml(service_xml([('one', one.address), ('two', two.address)],
                                          listen_port=port)))
        self.assertEqual([exchange(port) for _ in range(4)], [b'one', b'two'] * 2)
        self.rewrite(config_xml(service_xml(
            [('two', two.address, 'weight="3"'), ('one', one.address)], listen_port=port)))
        self.assertIn('host two weight 3', self.reload())
        # 3:1 in the file's new order: two two one two.
        self.assertEqual(b''.join(exchange(port) for _ in range(8)), b'twotwoonetwo' * 2)
        self.rewrite(config_xml(service_xml(
            [('two', two.address, 'maxconns="1"'), ('one', one.address)],
            scheduler='leastconns', listen_port=port)))
        self.assertIn('host two maxconns 1', self.reload())
        held = connect(port)             # leastconns, idle: the first host, two
        self.addCleanup(held.close)
        wait_until(lambda: self.balancer.host('two')['open'] == 1)
        self.assertEqual({exchange(port) for _ in range(3)}, {b'one'}, 'two is full')
        self.rewrite(config_xml(service_xml(
            [('two', two.address), ('one', one.address)], scheduler='leastconns', listen_port=port)))
        self.assertIn('host two maxconns 0', self.reload())
        self.assertEqual(exchange(port), b'one', 'fewest open: one has none')

    def test_invalid_file_changes_nothing(self):
        one = self.backend(name='one')
        port = free_port()
        xml = config_xml(service_xml([('one', one.address)], listen_port=port))
        self.start(xml)
        self.rewrite(xml.replace('<group', '<group bogus="1"', 1))
        with self.assertRaises(pydirector.AdminError) as caught:
            self.reload()
        self.assertEqual(caught.exception.status, 400)
        self.assertRegex(caught.exception.message, '^%s:[0-9]+: ' % re.escape(self.path))
        LOG.wait_for('reload failed: %s:' % self.path, self.mark)
        self.assertEqual(exchange(port), b'one')

    def test_port_in_use_changes_nothing(self):
        one = self.backend(name='one')
        port, busy = free_port(), socket.socket()
        busy.bind(('127.0.0.1', 0))
        busy.listen(1)
        self.addCleanup(busy.close)
        self.start(config_xml(service_xml([('one', one.address)], listen_port=port)))
        self.rewrite(config_xml(service_xml([('one', one.address)], listen_port=port),
                                service_xml([('one', one.address)], name='api',
                                            listen_port=busy.getsockname()[1])))
        with self.assertRaises(pydirector.AdminError) as caught:
            self.reload()
        self.assertIn('cannot listen on 127.0.0.1:%d' % busy.getsockname()[1], caught.exception.message)
        self.assertEqual([s['name'] for s in self.balancer.snapshot()['services']], ['web'])
        self.assertEqual(exchange(port), b'one')

    def test_services_and_listeners_come_and_go(self):
        one, two, three = self.backend(name='one'), self.backend(name='two'), self.backend(echo, 'three')
        web_port, api_port, new_port = free_port(), free_port(), free_port()
        self.start(config_xml(service_xml([('one', one.address)], listen_port=web_port),
                              service_xml([('three', three.address)], name='old', listen_port=free_port())))
        held = connect(self.balancer.port('old'))
        held.sendall(b'x')
        self.assertEqual(held.recv(10), b'x')
        self.rewrite(config_xml(service_xml([('one', one.address)], listen_port=new_port),
                                service_xml([('two', two.address)], name='api', listen_port=api_port)))
        message = self.reload()
        self.assertIn('+service api', message)
        self.assertIn('-service old', message)
        self.assertIn('web: listen 127.0.0.1:%d' % new_port, message)
        self.assertEqual(exchange(api_port), b'two')
        self.assertEqual(exchange(new_port), b'one')
        wait_until(lambda: not _accepts(web_port))
        self.rewrite(config_xml(service_xml([('two', two.address)], name='api', listen_port=api_port)))
        self.assertIn('-service web', self.reload())
        wait_until(lambda: not _accepts(new_port))
        self.assertEqual(exchange(api_port), b'two')
        # The connection made before both reloads is still whole.
        held.sendall(b'y')
        self.assertEqual(held.recv(10), b'y')
        held.shutdown(socket.SHUT_WR)
        self.assertEqual(held.recv(10), b'')
        held.close()

    def test_a_removed_service_closes_its_queued_clients(self):
        one = self.backend(echo, 'one')
        port = free_port()
        other = service_xml([('one', one.address)], name='other')
        self.start(config_xml(service_xml([('one', one.address, 'maxconns="1"')], listen_port=port,
                                          extra='    <timeouts queue="30"/>\n'), other))
        held = connect(port)
        self.addCleanup(held.close)
        held.sendall(b'1')
        self.assertEqual(held.recv(10), b'1')
        queued = connect(port)
        self.addCleanup(queued.close)
        wait_until(lambda: self.balancer.snapshot()['services'][0]['queued'] == 1)
        self.rewrite(config_xml(other))
        self.assertIn('-service web', self.reload())
        self.assertEqual(queued.recv(10), b'')      # closed at once, not after its queue timeout
        LOG.wait_for('end=shutdown', self.mark)
        held.sendall(b'2')
        self.assertEqual(held.recv(10), b'2')       # an open connection finishes as ever

    def test_reload_under_live_traffic_cuts_nothing(self):
        one, two = Backend(echo, 'one'), Backend(echo, 'two')
        self.addCleanup(one.close)
        self.addCleanup(two.close)
        port = free_port()
        self.start(config_xml(service_xml([('one', one.address)], listen_port=port)))
        errors, done = [], threading.Event()

        def client(n):
            try:
                while not done.is_set():
                    sock = connect(port)
                    payload = os.urandom(2000 + n)
                    for i in range(0, len(payload), 500):
                        sock.sendall(payload[i:i + 500])
                    sock.shutdown(socket.SHUT_WR)
                    got = b''
                    while True:
                        chunk = sock.recv(65536)
                        if not chunk:
                            break
                        got += chunk
                    sock.close()
                    if got != payload:
                        errors.append('client %d: %d of %d bytes' % (n, len(got), len(payload)))
            except OSError as e:
                errors.append('client %d: %s' % (n, e))

        threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        try:
            for i in range(6):
                hosts = [('one', one.address)] if i % 2 else [('one', one.address), ('two', two.address)]
                self.rewrite(config_xml(service_xml(hosts, listen_port=port,
                                                    scheduler='roundrobin' if i % 3 else 'leastconns')))
                self.reload()
        finally:
            done.set()
            for t in threads:
                t.join(20)
        self.assertEqual(errors, [])
        self.assertFalse([l for l in LOG.since(self.mark) if 'TRACEBACK' in l])

    def test_sighups_during_a_reload_make_one_more_not_one_each(self):
        # 300 SIGHUPs back to back once started 300 threads queued on the reload
        # lock.  Held here, the first reload waits; the 299 signals behind it make
        # one more reload, which reads the file as it is when it runs.
        one, two = self.backend(name='one'), self.backend(name='two')
        port = free_port()
        self.start(config_xml(service_xml([('one', one.address)], listen_port=port)))
        director = self.balancer.director

        def reloading():
            return [t for t in threading.enumerate() if t.name == 'pydirector-reload']
        with director.reload_lock:
            # As main()'s SIGHUP handler does, on the loop, once per signal.
            director.loop.call(lambda: [director.reload_in_background() for _ in range(300)])
            self.assertEqual(len(reloading()), 1)
            self.rewrite(config_xml(service_xml([('two', two.address)], listen_port=port)))
        wait_until(lambda: not reloading(), 30)
        self.balancer.sync()
        self.assertEqual(len([l for l in LOG.since(self.mark) if 'reloaded %s' % self.path in l]), 2)
        self.assertEqual({exchange(port) for _ in range(4)}, {b'two'})
        # A signal after that starts a reload of its own.
        self.rewrite(config_xml(service_xml([('one', one.address)], listen_port=port)))
        director.loop.call(director.reload_in_background)
        wait_until(lambda: {exchange(port) for _ in range(4)} == {b'one'}, 10)


def _accepts(port):
    try:
        socket.create_connection(('127.0.0.1', port), timeout=1).close()
        return True
    except OSError:
        return False


class TestAccessLog(OpsTestCase):

    def test_one_line_per_connection_with_counts(self):
        b = self.backend(echo, 'one')
        port = free_port()
        self.start(config_xml(service_xml([('one', b.address)], listen_port=port)))
        self.assertEqual(exchange(port, b'hello'), b'hello')
        line = LOG.wait_for('access service=web', self.mark)[-1]
        self.assertRegex(line, r'^access service=web client=127\.0\.0\.1:[0-9]+ sni=- host=one '
                         r'backend=%s failovers=0 bytes_in=5 bytes_out=5 duration=[0-9.]+ end=done$'
                         % re.escape(b.address))

    def test_no_backend_and_failover_are_logged(self):
        b = self.backend(echo, 'two')
        dead = '127.0.0.1:%d' % free_port()
        port = free_port()
        self.start(config_xml(service_xml([('one', dead), ('two', b.address)], listen_port=port)))
        self.assertEqual(exchange(port, b'x'), b'x')
        self.assertIn(' failovers=1 ', LOG.wait_for('access service=web', self.mark)[-1])
        mark = LOG.mark()
        self.balancer.call(self.balancer.director.host_admin_down, 'web', 'main', 'two', force='1')
        self.assertEqual(exchange(port), b'')
        line = LOG.wait_for('access service=web', mark)[-1]
        self.assertIn(' host=- backend=- failovers=0 bytes_in=0 bytes_out=0 ', line)
        self.assertTrue(line.endswith(' end=no-backend'), line)

    def test_values_are_escaped(self):
        self.assertEqual(pydirector.log_value('web'), 'web')
        self.assertEqual(pydirector.log_value('[::1]:80'), '[::1]:80')
        self.assertEqual(pydirector.log_value('a b\nend=done "x"'), r'"a b\nend=done \"x\""')

    def test_access_off(self):
        b = self.backend(echo, 'one')
        port = free_port()
        self.start(config_xml(service_xml([('one', b.address)], listen_port=port)))
        self.balancer.director.access_log = False
        self.assertEqual(exchange(port, b'hi'), b'hi')
        wait_until(lambda: self.balancer.open_pairs() == 0)
        self.assertEqual(self.access_lines(), [])


class TestTimeline(OpsTestCase):

    def test_state_changes_are_kept_with_the_next_probe(self):
        b = self.backend(echo, 'one')
        port = free_port()
        self.start(config_xml(service_xml(
            [('one', b.address)], listen_port=port,
            extra='    <check interval="0.2" timeout="0.5" rise="1" fall="1"/>\n')))
        call = self.balancer.call
        director = self.balancer.director
        call(director.host_admin_down, 'web', 'main', 'one', force='1')
        call(director.host_admin_up, 'web', 'main', 'one')
        host = self.balancer.host('one')
        self.assertEqual([(t['from'], t['to'], t['why']) for t in host['timeline']],
                         [('up', 'draining', 'by admin'), ('draining', 'up', 'by admin')])
        self.assertIsNotNone(host['next_probe'])
        self.assertLess(abs(host['next_probe'] - host['timeline'][-1]['when']), 5)


class TestBlueGreen(OpsTestCase):

    def two_groups(self, blue, green, green_extra=''):
        port = free_port()
        groups = [('main', 'roundrobin', [('one', blue.address)]),
                  ('upgrade', 'roundrobin', [('two', green)])]
        self.start(config_xml(service_xml(None, listen_port=port, groups=groups,
                                          extra='    <check interval="0.2" timeout="0.5" rise="1" fall="1"/>\n')))
        return port

    def test_drain_closes_what_is_left_on_the_old_group(self):
        blue, green = self.backend(echo, 'blue'), self.backend(echo, 'green')
        port = self.two_groups(blue, green.address)
        old = connect(port)
        old.sendall(b'a')
        self.assertEqual(old.recv(10), b'a')
        answer = self.balancer.call(self.balancer.director.enable_group, 'web', 'upgrade', drain='0.3')
        self.assertIn('connections left on main close in 0.3 s', answer)
        switch = self.balancer.snapshot()['services'][0]['switch']
        self.assertEqual((switch['from'], switch['to']), ('main', 'upgrade'))
        self.assertIsNotNone(switch['drain_until'])
        new = connect(port)
        new.sendall(b'b')
        self.assertEqual(new.recv(10), b'b')
        old.settimeout(5)
        self.assertEqual(old.recv(10), b'')   # closed at the deadline
        LOG.wait_for('end=drained', self.mark)
        new.sendall(b'c')
        self.assertEqual(new.recv(10), b'c')  # the new group's connection is untouched
        new.close()
        old.close()
        wait_until(lambda: self.balancer.snapshot()['services'][0]['switch'] is None)

    def test_rollback_when_the_new_group_never_comes_up(self):
        blue = self.backend(echo, 'blue')
        port = self.two_groups(blue, '127.0.0.1:%d' % free_port())
        call, director = self.balancer.call, self.balancer.director
        wait_until(lambda: self.balancer.host('two')['state'] == 'down')
        answer = call(director.enable_group, 'web', 'upgrade', rollback='0.5', force='1')
        self.assertIn('back to main unless a host is up within 0.5 s', answer)
        LOG.wait_for('service web: rollback to group main: group upgrade had no host up within 0.5 s',
                     self.mark)
        self.assertEqual(self.balancer.snapshot()['services'][0]['enabled'], 'main')
        self.assertEqual(exchange(port, b'ok'), b'ok')

    def test_no_rollback_when_a_host_comes_up(self):
        blue = self.backend(echo, 'blue')
        green_port = free_port()
        self.two_groups(blue, '127.0.0.1:%d' % green_port)
        call, director = self.balancer.call, self.balancer.director
        wait_until(lambda: self.balancer.host('two')['state'] == 'down')
        call(director.enable_group, 'web', 'upgrade', rollback='3', force='1')
        green = Backend(echo, 'green')  # cannot choose its port: move the host there instead
        self.addCleanup(green.close)
        call(director.add_host, 'web', 'upgrade', 'three', green.address)
        wait_until(lambda: self.balancer.snapshot()['services'][0]['switch'] is None, 8)
        self.assertEqual(self.balancer.snapshot()['services'][0]['enabled'], 'upgrade')
        self.assertNotIn('rollback to group', '\n'.join(LOG.since(self.mark)))

    def test_bad_values_are_refused(self):
        blue = self.backend(echo, 'blue')
        self.two_groups(blue, blue.address)
        for bad in ('-1', 'soon', 'nan'):
            with self.assertRaises(pydirector.AdminError) as caught:
                self.balancer.call(self.balancer.director.enable_group, 'web', 'upgrade', drain=bad)
            self.assertEqual(caught.exception.status, 400)
        self.assertEqual(self.balancer.snapshot()['services'][0]['enabled'], 'main')


def connect_from(source_ip, port, host='127.0.0.1'):
    sock = socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET)
    sock.settimeout(10)
    sock.bind((source_ip, 0))
    sock.connect((host, port))
    return sock


def closed_by_peer(sock, timeout=5):
    """True when the peer closed (FIN or RST) within timeout without sending anything."""
    sock.settimeout(timeout)
    try:
        return sock.recv(10) == b''
    except ConnectionResetError:
        return True


class TestLimits(OpsTestCase):

    def test_service_maxconns_refuses_at_once(self):
        b = self.backend(echo, 'one')
        port = free_port()
        self.start(config_xml(service_xml([('one', b.address)], listen_port=port).replace(
            '<service name="web"', '<service name="web" maxconns="2"')))
        held = [connect(port), connect(port)]
        for sock in held:
            sock.sendall(b'x')
            self.assertEqual(sock.recv(10), b'x')
        extra = connect(port)
        self.assertTrue(closed_by_peer(extra, 2))
        self.assertIn(' end=full', LOG.wait_for('end=full', self.mark)[-1])
        self.assertEqual(b.accepted, 2)
        for sock in held + [extra]:
            sock.close()
        wait_until(lambda: self.balancer.snapshot()['services'][0]['open'] == 0)
        self.assertEqual(exchange(port, b'again'), b'again')

    def test_queue_serves_in_order_and_times_out(self):
        b = self.backend(echo, 'one')
        port = free_port()
        self.start(config_xml(service_xml([('one', b.address, 'maxconns="1"')], listen_port=port,
                                          extra='    <timeouts queue="3"/>\n')))
        first = connect(port)
        first.sendall(b'1')
        self.assertEqual(first.recv(10), b'1')
        waiting = []
        for name in (b'2', b'3'):
            sock = connect(port)
            sock.sendall(name)
            waiting.append(sock)
            wait_until(lambda: self.balancer.snapshot()['services'][0]['queued'] == len(waiting))
        first.close()
        self.assertEqual(waiting[0].recv(10), b'2')
        self.assertEqual(self.balancer.snapshot()['services'][0]['queued'], 1)
        waiting[0].close()
        self.assertEqual(waiting[1].recv(10), b'3')
        waiting[1].close()

    def test_queue_timeout_closes_the_client(self):
        b = self.backend(echo, 'one')
        port = free_port()
        self.start(config_xml(service_xml([('one', b.address, 'maxconns="1"')], listen_port=port,
                                          extra='    <timeouts queue="0.3"/>\n')))
        first = connect(port)
        first.sendall(b'1')
        self.assertEqual(first.recv(10), b'1')
        late = connect(port)
        self.assertTrue(closed_by_peer(late, 5))
        LOG.wait_for('end=queue-timeout', self.mark)
        first.sendall(b'2')
        self.assertEqual(first.recv(10), b'2')
        first.close()
        late.close()


class TestAllowDeny(OpsTestCase):

    def test_ipv4_rules(self):
        b = self.backend(echo, 'one')
        port = free_port()
        self.start(config_xml(service_xml([('one', b.address)], listen_port=port,
                                          extra='    <deny cidr="127.0.0.2"/>\n'
                                                '    <allow cidr="127.0.0.0/30"/>\n')))
        for source, allowed in (('127.0.0.1', True), ('127.0.0.2', False), ('127.0.0.3', True),
                                ('127.0.0.9', False)):
            sock = connect_from(source, port)
            if allowed:
                sock.sendall(b'hi')
                sock.shutdown(socket.SHUT_WR)
                self.assertEqual(sock.recv(10), b'hi', source)
            else:   # closed unread, before any backend: nothing to send it
                self.assertTrue(closed_by_peer(sock), source)
            sock.close()
        self.assertEqual(b.accepted, 2)
        self.assertEqual(self.balancer.snapshot()['services'][0]['denied'], 2)
        # Both lines, not the first: with workers each comes from its own process's
        # buffered access log, a flush apart.
        wait_until(lambda: len([l for l in LOG.since(self.mark) if 'end=denied' in l]) >= 2)
        self.assertEqual(len(LOG.wait_for('end=denied', self.mark)), 2)

    def test_ipv6_rules(self):
        try:
            probe = socket.socket(socket.AF_INET6)
            probe.bind(('::1', 0))
            probe.close()
        except OSError:
            self.skipTest('no IPv6 loopback here')
        b = self.backend(echo, 'one')
        port = free_port()
        xml = service_xml([('one', b.address)], listen_port=port,
                          extra='    <deny cidr="::1/128"/>\n').replace(
            '<listen ip="127.0.0.1:%d"/>' % port, '<listen ip="127.0.0.1:%d"/><listen ip="[::1]:%d"/>' % (port, port))
        self.start(config_xml(xml))
        six = connect_from('::1', port, '::1')
        self.assertTrue(closed_by_peer(six))
        six.close()
        self.assertEqual(exchange(port, b'v4'), b'v4')
        self.assertEqual(b.accepted, 1)


class TestPrivilegeDrop(BalancerCase):

    def setUp(self):
        BalancerCase.setUp(self)
        if not hasattr(os, 'getuid') or os.getuid() != 0:
            self.skipTest('needs root to test dropping privileges')
        import pwd
        try:
            self.nobody = pwd.getpwnam('nobody')
        except KeyError:
            self.skipTest('no user nobody here')

    def test_runs_as_the_user_after_binding(self):
        from support import BalancerProcess
        b = Backend(echo, 'one')
        self.addCleanup(b.close)
        port = free_port()
        proc = BalancerProcess(config_xml(service_xml([('one', b.address)], listen_port=port), user='nobody'),
                               wait_port=port)
        self.addCleanup(proc.close)
        wait_until(lambda: 'running as uid %d' % self.nobody.pw_uid in proc.output(), 10)
        with open('/proc/%d/status' % proc.proc.pid) as f:
            uids = [l.split()[1:] for l in f if l.startswith('Uid:')][0]
        self.assertEqual(set(uids), {str(self.nobody.pw_uid)})
        self.assertEqual(exchange(port, b'as nobody'), b'as nobody')

    def test_refuses_to_stay_root_and_unknown_users(self):
        from support import BalancerProcess
        for user, message in (('root', 'refusing to run as root'), ('no-such-user-here', "<pdconfig> user 'no-such-user-here': no such user on this system")):
            port = free_port()
            proc = BalancerProcess(config_xml(service_xml([('one', '127.0.0.1:1')], listen_port=port), user=user))
            self.addCleanup(proc.close)
            self.assertEqual(proc.wait(10), 1)
            self.assertIn(message, proc.output())
            self.assertFalse(_accepts(port))


class TestExplain(OpsTestCase):

    def test_explain_matches_the_next_pick_and_changes_nothing(self):
        one, two = self.backend(name='one'), self.backend(name='two')
        port = free_port()
        self.start(config_xml(service_xml([('one', one.address), ('two', two.address)], listen_port=port,
                                          scheduler='hash', extra='    <deny cidr="10.0.0.0/8"/>\n')))
        call, director = self.balancer.call, self.balancer.director
        answer = call(director.explain, 'web', '127.0.0.1')
        self.assertEqual(answer['scheduler'], 'hash')
        self.assertTrue(answer['allowed'])
        self.assertEqual([name for name, _ in answer['ranking']][0], answer['host'])
        for _ in range(3):
            self.assertEqual(call(director.explain, 'web', '127.0.0.1'), answer)
            self.assertEqual(exchange(port).decode(), answer['host'])
        call(director.host_admin_down, 'web', 'main', answer['host'])
        again = call(director.explain, 'web', '127.0.0.1')
        self.assertIn([answer['host'], 'draining'], [list(x) for x in again['skipped']])
        self.assertNotEqual(again['host'], answer['host'])
        denied = call(director.explain, 'web', '10.1.2.3')
        self.assertFalse(denied['allowed'])
        self.assertIn('denied by the allow/deny rules', denied['reason'])
        for bad in (('nope', '127.0.0.1'), ('web', 'not-an-ip')):
            with self.assertRaises(pydirector.AdminError):
                call(director.explain, *bad)


class TestAccessLogEndings(OpsTestCase):
    """Every way a connection ends gets its one access line with the right end=."""

    def end_of(self, client_port):
        lines = LOG.wait_for('client=127.0.0.1:%d ' % client_port, self.mark)
        self.assertEqual(len(lines), 1, lines)
        return lines[0].rsplit(' end=', 1)[1]

    def test_resets_idle_and_shutdown(self):
        import struct
        linger = struct.pack('ii', 1, 0)

        def reset_at_once(conn, backend):
            conn.recv(10)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)

        quiet = self.backend(lambda conn, backend: conn.recv(10) and conn.recv(10), 'quiet')
        resetting = self.backend(reset_at_once, 'resetting')
        self.start(config_xml(
            service_xml([('quiet', quiet.address)], listen_port=free_port()),
            service_xml([('resetting', resetting.address)], name='rst', listen_port=free_port()),
            service_xml([('quiet', quiet.address)], name='idle', listen_port=free_port(),
                        extra='    <timeouts idle="0.2"/>\n')))
        ends = {}
        # the client resets
        sock = connect(self.balancer.port())
        sock.sendall(b'a')
        wait_until(lambda: quiet.open == 1)
        port = sock.getsockname()[1]
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        sock.close()
        ends['client-reset'] = self.end_of(port)
        # the backend resets
        sock = connect(self.balancer.port('rst'))
        sock.sendall(b'b')
        port = sock.getsockname()[1]
        ends['backend-reset'] = self.end_of(port)
        sock.close()
        # nothing moves for longer than idle
        sock = connect(self.balancer.port('idle'))
        port = sock.getsockname()[1]
        ends['idle-timeout'] = self.end_of(port)
        sock.close()
        # still open when the balancer stops at once
        sock = connect(self.balancer.port())
        sock.sendall(b'c')
        wait_until(lambda: quiet.open >= 1)
        port = sock.getsockname()[1]
        self.balancer.call(self.balancer.director.stop_now)
        ends['shutdown'] = self.end_of(port)
        sock.close()
        self.assertEqual(ends, {k: k for k in ends})


class TestSyslog(BalancerCase):

    def test_udp_and_unix_socket(self):
        from support import BalancerProcess
        b = Backend(echo, 'one')
        self.addCleanup(b.close)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(('127.0.0.1', 0))
        self.addCleanup(udp.close)
        folder = tempfile.mkdtemp(prefix='pydirector-syslog-')
        self.addCleanup(shutil.rmtree, folder, True)
        path = os.path.join(folder, 'log')
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        unix.bind(path)
        self.addCleanup(unix.close)
        for target, receiver in (('127.0.0.1:%d' % udp.getsockname()[1], udp), (path, unix)):
            port = free_port()
            xml = config_xml(service_xml([('one', b.address)], listen_port=port)).replace(
                '</pdconfig>', '  <logging syslog="%s" facility="local3"/>\n</pdconfig>' % target)
            proc = BalancerProcess(xml, wait_port=port)
            self.addCleanup(proc.close)
            self.assertEqual(exchange(port, b'x'), b'x')
            receiver.settimeout(5)
            got = []
            while not any(b' access service=web ' in g for g in got):
                got.append(receiver.recv(4096))
            # <PRI>: facility local3 (19) * 8 + info (6) = 158
            line = [g for g in got if b' access service=web ' in g][0]
            self.assertTrue(line.startswith(b'<158>pydirector['), line)
            proc.signal(signal.SIGTERM)
            self.assertEqual(proc.wait(10), 0)


class TestTimerHeap(unittest.TestCase):
    """Regression: cancelled hour-long idle timers piled up in the heap (RSS grew
    by ~10 MB a minute at 1,500 connections a second in the G2 soak)."""

    def test_cancelled_timers_do_not_pile_up(self):
        loop = pydirector.Loop()
        self.addCleanup(loop.close)
        fired = []
        live = [loop.call_later(3600, fired.append, n) for n in range(3000)]
        for n in range(100000):
            loop.call_later(3600, fired.append, n).cancel()
        self.assertLess(len(loop._timers), 2 * 3000 + 1024)
        self.assertEqual(sum(1 for e in loop._timers if e[2].callback is not None), 3000)
        soon = loop.call_later(0, loop.stop)
        loop.run()
        self.assertIsNone(soon.callback)
        self.assertEqual(fired, [])
        self.assertTrue(all(t.callback is not None for t in live))


class TestHostDownClosesConnections(OpsTestCase):
    """<check on_down="close">: a host the checks take down loses its clients (G6 soak)."""

    def run_case(self, on_down):
        b = self.backend(echo, 'one')
        port = free_port()
        attr = ' on_down="%s"' % on_down if on_down else ''
        self.start(config_xml(service_xml([('one', b.address)], listen_port=port,
                                          extra='    <check interval="0.1" timeout="0.5" rise="1" fall="1"%s/>\n' % attr)))
        sock = connect(port)
        sock.sendall(b'x')
        self.assertEqual(sock.recv(10), b'x')
        b.sock.close()          # no more accepts: probes are refused; the open stream goes on
        LOG.wait_for('host one (%s) in web/main down' % b.address, self.mark)
        return sock

    def test_close(self):
        sock = self.run_case('close')
        self.assertTrue(closed_by_peer(sock, 5))
        self.assertTrue(LOG.wait_for('end=host-down', self.mark))
        sock.close()

    def test_keep_is_the_default(self):
        sock = self.run_case(None)
        sock.sendall(b'y')
        self.assertEqual(sock.recv(10), b'y')
        sock.close()


# The same operations with a master and two worker processes.

class TestReloadWorkers(WorkersMixin, TestReload):
    pass


class TestAccessLogWorkers(WorkersMixin, TestAccessLog):
    pass


class TestTimelineWorkers(WorkersMixin, TestTimeline):
    pass


class TestBlueGreenWorkers(WorkersMixin, TestBlueGreen):
    pass


class TestLimitsWorkers(WorkersMixin, TestLimits):
    pass


class TestAllowDenyWorkers(WorkersMixin, TestAllowDeny):
    pass


class TestExplainWorkers(WorkersMixin, TestExplain):
    pass


class TestAccessLogEndingsWorkers(WorkersMixin, TestAccessLogEndings):
    pass


class TestSyslogWorkers(WorkersMixin, TestSyslog):
    pass


class TestHostDownClosesConnectionsWorkers(WorkersMixin, TestHostDownClosesConnections):
    pass


if __name__ == '__main__':
    unittest.main()
