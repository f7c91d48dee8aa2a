"""Runtime changes never silently lost (issue 27): a reload keeps the admin state
of the hosts that stay and says which runtime changes it undid; saveConfig
writes the running config to the file, atomically, refusing (409) a file
changed since it was loaded; the last reload's outcome shows on /running,
running.json and /metrics; an XML error names the line the broken element
starts on.

Real processes: `pydirector.py -c FILE` with its admin, once on its own and
once as a master of two workers (<pdconfig workers="2">), driven over HTTP
and SIGHUP, with real backends that say their name.
"""

import os
import signal
import stat
import subprocess
import sys
import time

import support
from support import (AdminClient, BalancerCase, PYDIRECTOR, SpawnedBalancer, WorkersMixin, accepts, config_xml, exchange,
                     free_port, say_name, service_xml, wait_until)

import pydirector

PASSWORD = 'secret'
HASH = pydirector.hash_password(PASSWORD, iterations=support.FAST_HASH_ITERATIONS)
OTHER_HASH = pydirector.hash_password('other', iterations=support.FAST_HASH_ITERATIONS)


class RuntimeCase(AdminClient, BalancerCase):
    """A balancer process with service 'web' (group main: n1 n2; group spare: s1) and its admin."""
    admin_password = PASSWORD

    def setUp(self):
        BalancerCase.setUp(self)
        self.n1 = self.backend(say_name, 'n1')
        self.n2 = self.backend(say_name, 'n2')
        self.n3 = self.backend(say_name, 'n3')
        self.s1 = self.backend(say_name, 's1')
        self.listen = free_port()
        self.admin_port = free_port()

    def xml(self, main=None, extra_root=None):
        """The config: main is the hosts of group main ([(name, address[, attrs])])."""
        main = main if main is not None else [('n1', self.n1.address), ('n2', self.n2.address)]
        root = dict(extra_root or {})
        if self.workers:
            root['workers'] = str(self.workers)
        admin = ('  <admin listen="127.0.0.1:%d">\n    <user name="admin" password="%s" access="full"/>\n'
                 '    <user name="viewer" password="%s" access="readonly"/>\n  </admin>\n'
                 % (self.admin_port, HASH, HASH))
        return config_xml(service_xml(None, listen_port=self.listen, groups=[
            ('main', 'roundrobin', main), ('spare', 'leastconns', [('s1', self.s1.address)])]) + admin, **root)

    def start_process(self, xml=None):
        self.proc = SpawnedBalancer(xml or self.xml())
        self.addCleanup(self.proc.close)
        self.path = self.proc.config_path
        wait_until(lambda: accepts(self.admin_port) and self.output().count(') ready') == (self.workers or 0)
                   or self.proc.proc.poll() is not None, 30)
        self.assertIsNone(self.proc.proc.poll(), self.output())
        self.started = time.time()
        return self.proc

    def output(self):
        return self.proc.output()

    def rewrite(self, xml):
        with open(self.path, 'w') as f:
            f.write(xml)

    def host(self, name, group='main'):
        for g in self.running()['services'][0]['groups']:
            if g['name'] == group:
                for h in g['hosts']:
                    if h['name'] == name:
                        return h
        return None

    def metrics(self):
        return dict(line.split(' ', 1) for line in self.fetch('/metrics')[1].splitlines()
                    if line.startswith('pydirector_config_'))

    def sighup(self, count):
        """SIGHUP, then wait for the count-th 'reload' line of the log (reloaded or failed)."""
        self.proc.signal(signal.SIGHUP)
        return wait_until(lambda: [l for l in self.output().splitlines()
                                   if 'reloaded ' in l or 'reload failed' in l][count - 1:], 15)[0]

    def names(self, count=8):
        return set(exchange(self.listen) for _ in range(count))


class TestRuntimeChanges(RuntimeCase):

    def test_save_config_round_trip(self):
        self.start_process()
        os.chmod(self.path, 0o640)
        with open(self.path, 'rb') as f:
            original = f.read()
        self.change('/addHost', service='web', group='main', name='n3', ip=self.n3.address, weight='3',
                    maxconns='7', send_proxy='v1')
        self.change('/changeScheduler', service='web', group='main', scheduler='leastconns')
        self.change('/newGroup', service='web', group='canary', scheduler='hash,sticky')
        self.change('/addHost', service='web', group='canary', name='c1', ip='127.0.0.1:9')
        self.change('/delHost', service='web', group='main', name='n2')
        self.change('/enableGroup', service='web', group='spare')
        self.change('/addUser', name='bob', password_hash=OTHER_HASH, access='readonly')
        running = self.fetch('/running.xml')[1]

        body = self.change('/saveConfig')
        real = os.path.realpath(self.path)
        self.assertEqual(body, 'OK saved the running config to %s; the previous file is %s.bak' % (self.path, real))
        # (The answer may reach us before the log line is written.)
        wait_until(lambda: body[3:] in self.output(), message='not logged: %r' % body[3:])
        with open(self.path + '.bak', 'rb') as f:
            self.assertEqual(f.read(), original)
        with open(self.path) as f:
            self.assertEqual(f.read(), running)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o640)
        self.assertEqual(sorted(os.listdir(os.path.dirname(self.path))), ['stderr.log', 'test.xml', 'test.xml.bak'])
        # What it wrote passes --check and loads to the running state, users and hashes too.
        check = subprocess.run([sys.executable, PYDIRECTOR, '--check', self.path], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, timeout=30)
        self.assertEqual(check.returncode, 0, check.stderr)
        saved = pydirector.load_config(self.path)
        self.assertEqual(pydirector.config_tree_text(saved),
                         pydirector.config_tree_text(pydirector.parse_config(running, 'running.xml')))
        self.assertEqual(saved.admin.user('bob').password, OTHER_HASH)
        self.assertEqual(saved.service('web').group('main').host('n3').send_proxy, 'v1')
        # It is the file as last loaded now: a reload finds nothing to change or undo.
        self.assertEqual(self.change('/reload'), 'OK reloaded %s: no changes' % self.path)
        self.assertEqual(self.change('/saveConfig'),
                         'OK the config file %s holds the running config already: not written' % self.path)
        self.assertEqual(self.names(), {b's1'})

        # Changed on disk since: 409, and nothing written.
        self.change('/hostAdminDown', service='web', group='spare', name='s1', force='1')
        self.change('/addHost', service='web', group='spare', name='n1', ip=self.n1.address)
        edited = running.replace('<pdconfig', '<!-- edited by hand -->\n<pdconfig', 1)
        self.rewrite(edited)
        body = self.change('/saveConfig', 409)
        self.assertEqual(body, 'ERROR %s changed on disk since it was last loaded; reload it, or saveConfig '
                               'with force=1 to write over it' % self.path)
        with open(self.path) as f:
            self.assertEqual(f.read(), edited)
        self.change('/saveConfig', 400, force='yes')
        # force=1 writes over it, and keeps the hand edit as the .bak.
        self.change('/saveConfig', force='1')
        with open(self.path + '.bak') as f:
            self.assertEqual(f.read(), edited)
        self.assertEqual(pydirector.load_config(self.path).service('web').group('spare').host('n1').ip,
                         self.n1.address)
        # The admin state is no part of the file, and a reload keeps it.
        self.assertEqual(self.change('/reload'), 'OK reloaded %s: no changes' % self.path)
        self.assertEqual(self.host('s1', 'spare')['admin'], 'draining')
        self.assertEqual(self.names(), {b'n1'})

    def test_save_config_refuses_a_missing_file(self):
        self.start_process()
        os.unlink(self.path)
        self.assertEqual(self.change('/saveConfig', 409),
                         'ERROR %s is missing; reload it, or saveConfig with force=1 to write over it' % self.path)
        self.assertFalse(os.path.exists(self.path))
        self.assertEqual(self.change('/saveConfig', force='1'), 'OK saved the running config to %s' % self.path)
        self.assertEqual(self.change('/reload'), 'OK reloaded %s: no changes' % self.path)

    def test_reload_keeps_admin_state(self):
        self.start_process()
        self.change('/hostAdminDown', service='web', group='main', name='n1')
        self.assertEqual(self.names(), {b'n2'})
        # SIGHUP, the file changing n1's weight and adding n3: n1 stays drained.
        self.rewrite(self.xml([('n1', self.n1.address, 'weight="2"'), ('n2', self.n2.address),
                               ('n3', self.n3.address)]))
        line = self.sighup(1)
        self.assertIn('web: host n1 weight 2, +host n3', line)
        self.assertNotIn('undid', line)
        self.assertEqual((self.host('n1')['admin'], self.host('n1')['weight']), ('draining', 2))
        self.assertEqual(self.names(), {b'n2', b'n3'})
        # /reload the same; then n1 at a new address is another host, and the drain goes, said so.
        self.assertEqual(self.change('/reload'), 'OK reloaded %s: no changes' % self.path)
        self.assertEqual(self.host('n1')['admin'], 'draining')
        self.rewrite(self.xml([('n1', self.s1.address), ('n2', self.n2.address), ('n3', self.n3.address)]))
        self.assertEqual(self.change('/reload'),
                         'OK reloaded %s: web: host n1 ip %s; undid: host web/main/n1 draining (by admin): '
                         'dropped, its ip changed' % (self.path, self.s1.address))
        self.assertEqual(self.host('n1')['admin'], 'enabled')
        self.assertEqual(self.names(), {b's1', b'n2', b'n3'})

    def test_reload_reports_undone_runtime_changes(self):
        self.start_process()
        self.change('/addHost', service='web', group='main', name='extra', ip=self.n3.address, weight='4')
        self.change('/delHost', service='web', group='main', name='n2')
        self.change('/changeScheduler', service='web', group='main', scheduler='leastconns')
        self.change('/newGroup', service='web', group='canary', scheduler='random')
        self.change('/addHost', service='web', group='canary', name='c1', ip='127.0.0.1:9')
        self.change('/delGroup', service='web', group='spare')
        self.change('/addUser', name='bob', password_hash=OTHER_HASH, access='full')
        # The new file keeps one runtime change (extra), not as it runs (weight 1, not 4).
        self.rewrite(self.xml([('n1', self.n1.address), ('n2', self.n2.address), ('extra', self.n3.address)]))
        undone = ['group web/main (changed at runtime): scheduler leastconns -> roundrobin',
                  'host web/main/extra (added at runtime): weight 4 -> 1',
                  'group web/canary (added at runtime): removed',
                  'user bob (added at runtime): removed',
                  'host web/main/n2 (deleted at runtime): back',
                  'group web/spare (deleted at runtime): back']
        body = self.change('/reload')
        self.assertTrue(body.endswith('; undid: ' + ', '.join(undone)), body)
        # (The answer may reach us before the log line is written.)
        wait_until(lambda: body[3:] in self.output(), message='not logged: %r' % body[3:])
        self.assertRegex(self.output(), r'WARNING reloaded .*; undid: ')
        self.assertEqual(self.running()['reload']['undone'], undone)
        self.assertEqual(self.names(), {b'n1', b'n2', b'n3'})
        # Now the file and the running config agree: nothing more to undo.
        self.change('/enableGroup', service='web', group='spare')
        self.change('/addUser', name='viewer', password_hash=OTHER_HASH, access='readonly')
        body = self.change('/reload')
        self.assertEqual(body, 'OK reloaded %s: web: enabled group main (was spare); admin users; undid: '
                               'enable web (changed at runtime): group spare -> main, '
                               'user viewer (changed at runtime): password replaced' % self.path)
        self.assertNotIn(OTHER_HASH, self.output())
        self.assertEqual(self.change('/reload'), 'OK reloaded %s: no changes' % self.path)
        self.assertEqual(self.running()['reload']['undone'], [])

    def test_reload_outcome_on_running_json_and_metrics(self):
        self.start_process()
        first = self.running()['reload']
        self.assertEqual((first['ok'], first['error'], first['undone']), (True, None, []))
        self.assertLessEqual(first['success_time'], self.started)
        self.assertEqual(first['time'], first['success_time'])
        metrics = self.metrics()
        self.assertEqual(metrics['pydirector_config_last_reload_successful'], '1')
        self.assertEqual(float(metrics['pydirector_config_last_reload_success_timestamp_seconds']),
                         round(first['success_time'], 3))
        # An unclosed <host> on line 6: the error names line 6, not where expat noticed it.
        good = self.xml()
        lines = good.splitlines(True)
        self.assertIn('<host name="n2"', lines[5])
        self.rewrite(''.join(lines[:5] + [lines[5].replace('/>', '>')] + lines[6:]))
        error = ('%s:6: XML error: <host> started here is not closed (expat noticed at line 7: '
                 'mismatched tag </group>)' % self.path)
        self.assertEqual(self.change('/reload', 400), 'ERROR ' + error)
        failed = self.running()['reload']
        self.assertEqual((failed['ok'], failed['error'], failed['success_time']), (False, error, first['success_time']))
        self.assertGreaterEqual(failed['time'], first['time'])
        metrics = self.metrics()
        self.assertEqual(metrics['pydirector_config_last_reload_successful'], '0')
        self.assertEqual(float(metrics['pydirector_config_last_reload_success_timestamp_seconds']),
                         round(first['success_time'], 3))
        page = self.fetch('/running')[1]
        self.assertIn('The reload of %s at ' % self.path, page)
        self.assertIn('failed: %s:6: XML error: &lt;host&gt; started here is not closed' % self.path, page)
        # SIGHUP's reload runs in a thread of its own: its failure shows the same way.
        self.rewrite(good.replace('name="n2"', 'name="n2" bogus="1"'))
        self.assertIn('reload failed: %s:6: <host> has unknown attribute' % self.path, self.sighup(2))
        self.assertIn('%s:6: <host> has unknown attribute' % self.path,
                      wait_until(lambda: self.running()['reload']['error'], 10))
        self.assertEqual(self.names(), {b'n1', b'n2'})
        # Fixed: a success again, with its time.
        self.rewrite(good)
        self.assertEqual(self.change('/reload'), 'OK reloaded %s: no changes' % self.path)
        ok = self.running()['reload']
        self.assertEqual((ok['ok'], ok['error']), (True, None))
        self.assertGreater(ok['success_time'], first['success_time'])
        self.assertEqual(self.metrics()['pydirector_config_last_reload_successful'], '1')
        self.assertIn('Config %s loaded at ' % self.path, self.fetch('/running')[1])


class TestRuntimeChangesWorkers(WorkersMixin, TestRuntimeChanges):
    """The same with a master and two worker processes: the master's running config is saved."""
