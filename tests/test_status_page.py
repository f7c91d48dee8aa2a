"""The status page an operator reads at a glance: the summary per service, each
host's counts (connect errors, retries, live bytes, last probe, downtime), the
history and its sparklines, running.csv, the metrics, the confirmations before
a delete (in a real headless Chromium), and the workers' numbers in ps."""

import csv
import io
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import time
import unittest
import urllib.parse

import support
from support import BalancerCase, WorkersMixin, config_xml, exchange, service_xml, wait_until

import pydirector
import pydirector_admin
import test_admin
from test_admin import PASSWORD, admin_xml, parse_prometheus

SAMPLES = pydirector.HISTORY_SAMPLES


def refused_address():
    """A bound socket that does not listen: a connect to it is refused; listen() on it later
    (support.AdoptedBackend) brings that host to life on the same port."""
    sock = socket.socket()
    sock.bind(('127.0.0.1', 0))
    return sock, '127.0.0.1:%d' % sock.getsockname()[1]


def host_of(snapshot, name):
    return [h for s in snapshot['services'] for g in s['groups'] for h in g['hosts'] if h['name'] == name][0]


def counted(director):
    """The new connections and errors every service and host had, as its history saw them."""
    snapshot = pydirector.expand_history(director.snapshot())
    things = [s for s in snapshot['services']] + [h for s in snapshot['services'] for g in s['groups']
                                                  for h in g['hosts']]
    return dict((thing['name'], dict((name, sum(thing['history'][name])) for name in ('connections', 'errors')))
                for thing in things)


# ---------------------------------------------------------------------------
# The history itself: a Director built but not running (its loop never runs).
# ---------------------------------------------------------------------------

class HistoryTest(BalancerCase):

    def director(self, hosts):
        config = pydirector.parse_config(config_xml(service_xml(hosts)), 'test.xml')
        director = pydirector.Director(config, resolve_names=False)
        self.addCleanup(director.loop.close)
        director.history.start()
        self.addCleanup(director.history.stop)
        return director

    def test_each_sample_counts_what_came_since_the_one_before(self):
        director = self.director([('a', '127.0.0.1:1'), ('b', '127.0.0.1:2')])
        service = director.services['web']
        a, b = service.groups['main'].scheduler.hosts
        history = director.history
        for step in range(5):
            a.total += step
            a.connect_errors += 1
            service.accepted += step
            service.refused += 2
            b.open = step
            history.sample()
        snapshot = pydirector.expand_history(director.snapshot())
        intervals = snapshot['history']['intervals']
        self.assertEqual(len(intervals), 5)
        series = host_of(snapshot, 'a')['history']
        self.assertEqual(series['connections'], [0, 1, 2, 3, 4])
        self.assertEqual(series['errors'], [1] * 5)
        self.assertEqual(host_of(snapshot, 'b')['history']['open'], [0, 1, 2, 3, 4])
        web = snapshot['services'][0]
        # A service's errors: its clients refused and its hosts' failed connects.
        self.assertEqual(web['history']['errors'], [3] * 5)
        self.assertAlmostEqual(web['rate'], 4 / intervals[-1], delta=0.01 * 4 / intervals[-1])
        self.assertAlmostEqual(host_of(snapshot, 'a')['rate_peak'], 4 / intervals[-1], delta=0.01 * 4 / intervals[-1])
        self.assertEqual(len(snapshot['history']['times']), 5)

    def test_the_ring_keeps_the_last_samples_in_fixed_memory(self):
        director = self.director([('a', '127.0.0.1:1')])
        history = director.history
        host = director.services['web'].groups['main'].scheduler.hosts[0]
        sizes = (len(history.samples), history.samples.buffer_info())
        self.assertEqual(len(history.samples), 2 * SAMPLES * len(pydirector.HISTORY_SERIES))   # the service, the host
        for step in range(SAMPLES + 20):
            host.open = step
            history.sample()
        self.assertEqual((len(history.samples), history.samples.buffer_info()), sizes)   # the same array, no bigger
        snapshot = pydirector.expand_history(director.snapshot())
        self.assertEqual(host_of(snapshot, 'a')['history']['open'], list(range(20, SAMPLES + 20)))
        self.assertEqual(len(snapshot['history']['intervals']), SAMPLES)

    def test_a_host_keeps_its_history_when_others_come_and_go(self):
        director = self.director([('a', '127.0.0.1:1'), ('b', '127.0.0.1:2')])
        service = director.services['web']
        group = service.groups['main']
        a = group.scheduler.hosts[0]
        for step in range(3):
            a.open = step + 1
            director.history.sample()
        director.remove_host(service, group, group.scheduler.get_host('b'))
        director.add_running_host(service, group, pydirector.host_config(name='c', ip='127.0.0.1:3'), False)
        director.history.sample()
        snapshot = pydirector.expand_history(director.snapshot())
        self.assertEqual(host_of(snapshot, 'a')['history']['open'], [1, 2, 3, 3])
        # A host new since is counted from when it came: nothing before it.
        self.assertEqual(host_of(snapshot, 'c')['history']['open'], [0, 0, 0, 0])
        self.assertEqual(len(director.history.samples), 3 * SAMPLES * len(pydirector.HISTORY_SERIES))


# ---------------------------------------------------------------------------
# Each host's counts, through real sockets: in one process, and with a master
# and two workers (where the counts are the workers', summed by the master).
# ---------------------------------------------------------------------------

class HostCountsTest(BalancerCase):
    """Service web, roundrobin over dead (refuses) and live (echoes)."""
    extra = ''      # more of the service

    def setUp(self):
        BalancerCase.setUp(self)
        self.live = self.backend(support.echo, 'live')
        self.dead, address = refused_address()
        self.addCleanup(self.dead.close)
        self.bal = self.start(service_xml([('dead', address), ('live', self.live.address)], extra=self.extra))

    def test_a_failover_counts_a_connect_error_and_a_retry(self):
        # roundrobin tries dead first: refused, the client goes on to live.
        self.assertEqual(exchange(self.bal.port(), b'ping'), b'ping')
        wait_until(lambda: self.bal.host('live')['total'] == 1)
        snapshot = self.bal.snapshot()
        dead, live = host_of(snapshot, 'dead'), host_of(snapshot, 'live')
        self.assertEqual((dead['connect_errors'], dead['retries'], dead['total']), (1, 0, 0))
        self.assertEqual((live['connect_errors'], live['retries'], live['total']), (0, 1, 1))
        web = snapshot['services'][0]
        self.assertEqual((web['failovers'], web['errors'], web['hosts_up'], web['hosts_total'], web['state']),
                         (1, 1, 1, 2, 'degraded'))
        metrics = pydirector_admin.render_metrics(snapshot)
        labels = '{service="web",group="main",host="%s",address="%s"}'
        self.assertIn('pydirector_host_connect_errors_total%s 1\n' % (labels % ('dead', dead['ip'])), metrics)
        self.assertIn('pydirector_host_retries_total%s 1\n' % (labels % ('live', live['ip'])), metrics)
        self.assertIn('pydirector_service_errors_total{service="web"} 1\n', metrics)
        rows = list(csv.DictReader(io.StringIO(pydirector_admin.render_running_csv(snapshot))))
        self.assertEqual([(r['host'], r['connect_errors'], r['retries'], r['state']) for r in rows],
                         [('dead', '1', '0', 'down'), ('live', '0', '1', 'up')])
        # The history (a master's: the sum of its workers') saw the same.
        self.bal.call(self.bal.director.history.sample)
        seen = self.bal.call(counted, self.bal.director)
        self.assertEqual(seen['web'], {'connections': 1, 'errors': 1})
        self.assertEqual(seen['dead'], {'connections': 0, 'errors': 1})
        self.assertEqual(seen['live'], {'connections': 1, 'errors': 0})

    def test_bytes_of_an_open_connection_show_before_it_closes(self):
        sock = support.connect(self.bal.port())
        try:
            sock.sendall(b'x' * 1000)
            self.assertEqual(support.recv_all(sock, 1000), b'x' * 1000)
            # With workers, a worker adds them up every half second.
            wait_until(lambda: (self.bal.host('live')['live_bytes_in'], self.bal.host('live')['live_bytes_out'])
                       == (1000, 1000), message='live bytes %r' % (self.bal.host('live'),))
            live = self.bal.host('live')
            self.assertEqual((live['bytes_in'], live['bytes_out'], live['open']), (0, 0, 1))
            metrics = pydirector_admin.render_metrics(self.bal.snapshot())
            self.assertRegex(metrics, r'pydirector_host_live_bytes_in\{[^}]*host="live"[^}]*\} 1000\n')
        finally:
            sock.close()
        wait_until(lambda: (self.bal.host('live')['bytes_in'], self.bal.host('live')['live_bytes_in']) == (1000, 0))


class HostCountsWorkersTest(WorkersMixin, HostCountsTest):
    pass


class ChecksTest(BalancerCase):
    """The last probe of each host, what it found and how long it took; time down in all."""
    extra = '    <check interval="0.2" timeout="1" fall="1" rise="1"/>\n'
    setUp = HostCountsTest.setUp

    def test_last_check_and_downtime(self):
        wait_until(lambda: self.bal.host('dead')['health'] == 'down' and self.bal.host('live')['last_check'])
        dead, live = self.bal.host('dead'), self.bal.host('live')
        self.assertEqual((dead['last_check']['ok'], dead['last_check']['reason']), (False, 'connection refused'))
        self.assertEqual((live['last_check']['ok'], live['last_check']['reason']), (True, 'probe ok'))
        for check in (dead['last_check'], live['last_check']):
            self.assertTrue(0 <= check['took'] < 1, check)
            self.assertLessEqual(check['when'], self.bal.snapshot()['now'])
        self.assertEqual(live['downtime'], 0)
        wait_until(lambda: self.bal.host('dead')['downtime'] > dead['downtime'])    # down, and counting
        metrics = pydirector_admin.render_metrics(self.bal.snapshot())
        self.assertRegex(metrics, r'pydirector_host_last_check_success\{[^}]*host="dead"[^}]*\} 0\n')
        self.assertRegex(metrics, r'pydirector_host_last_check_duration_seconds\{[^}]*host="live"[^}]*\} [0-9.]+\n')
        self.assertRegex(metrics, r'pydirector_host_downtime_seconds_total\{[^}]*host="dead"[^}]*\} [0-9.]+\n')
        # Back up: its downtime stops.
        revived = support.AdoptedBackend(self.dead, support.echo, 'dead')
        self.addCleanup(revived.close)
        wait_until(lambda: self.bal.host('dead')['health'] == 'up')
        stopped = self.bal.host('dead')['downtime']
        self.assertGreater(stopped, 0)
        wait_until(lambda: self.bal.host('dead')['last_check']['when'] > self.bal.host('dead')['since'] + 0.3)
        self.assertEqual(self.bal.host('dead')['downtime'], stopped)
        self.assertTrue(self.bal.host('dead')['last_check']['ok'])


class ChecksWorkersTest(WorkersMixin, ChecksTest):
    pass


# ---------------------------------------------------------------------------
# The page, running.csv and running.json over HTTP.
# ---------------------------------------------------------------------------

class StatusPageTest(test_admin.AdminCase):

    def test_summary_row_per_service_coloured_and_linked(self):
        self.wait_dead_down()
        body = self.fetch('/running').body
        self.assertTrue(re.search(r'<table class="summary">.*<tr class="row-degraded"><td><a href="#service-web">'
                                  r'web</a></td><td class="degraded">degraded</td><td class="n">2/3</td>', body, re.S))
        self.assertIn('<section id="service-web">\n<h2>Service web</h2>', body)
        self.assertIn('<tr class="row-down"><td>dead</td>', body)
        self.assertIn('<tr class="row-up"><td>n1</td>', body)
        self.assertIn('<span class="note">no samples yet</span>', body)

    def test_sparklines_once_the_history_has_samples(self):
        exchange(self.bal.port())
        self.bal.call(self.bal.director.history.sample)
        exchange(self.bal.port())
        self.bal.call(self.bal.director.history.sample)
        body = self.fetch('/running').body
        # The summary's, the service's and one per host (four of them).
        self.assertEqual(body.count('<svg class="spark"'), 6)
        svg = re.search(r'<svg class="spark".*?</svg>', body).group(0)
        self.assertRegex(svg, r'<title>last 15 min: up to [0-9.]+ new connections/s, 0 errors/s, 0 open</title>')
        self.assertRegex(svg, r'<polyline fill="none" stroke="#1f5fbf" stroke-width="1.5" points="[0-9., ]+"/>')
        data = json.loads(self.fetch('/running.json').body)
        self.assertEqual(len(data['history']['times']), 2)
        self.assertEqual((data['history']['step'], data['history']['samples']), (pydirector.HISTORY_STEP, SAMPLES))
        self.assertEqual(len(data['services'][0]['history']['connections']), 2)
        self.assertEqual(len(data['history']['intervals']), 2)

    def test_scheduler_is_a_select_and_deletes_ask_first(self):
        body = self.fetch('/running').body
        self.assertIn('<select name="scheduler" aria-label="scheduler"><option>hash</option>', body)
        self.assertIn('<option selected>leastconns</option>', body)      # spare's
        self.assertEqual(body.count('<option>roundrobin,sticky</option>'), 3)     # main's, spare's, new group's
        for action, question in [('delHost', 'Delete host n1 from web/main?'),
                                 ('delAllHosts', 'Delete every host of group web/spare?'),
                                 ('delGroup', 'Delete group web/spare?'), ('delUser', 'Delete user viewer?')]:
            self.assertIn('action="/%s" data-confirm="%s">' % (action, question), body)
        # The one script there is may run, none other.
        resp = self.fetch('/running')
        policy = resp.headers['Content-Security-Policy']
        self.assertIn("script-src '%s';" % pydirector_admin.SCRIPT_HASH, policy)
        script = re.search(r'<script>(.*?)</script>', resp.body).group(1)
        self.assertEqual(script, pydirector_admin.CONFIRM_SCRIPT)
        self.assertIn(pydirector_admin.SCRIPT_HASH, policy)

    def test_running_csv(self):
        self.wait_dead_down()
        self.change('/addHost', method='POST', body={'service': 'web', 'group': 'spare', 'ip': '127.0.0.1:9',
                                                     'name': 'x", =HYPERLINK(1)'})
        resp = self.fetch('/running.csv')
        self.assertEqual(resp.headers['Content-Type'], 'text/csv; charset=utf-8')
        lines = resp.body.split('\r\n')
        self.assertEqual(lines[0].split(','), [name for name, _ in pydirector_admin.CSV_COLUMNS])
        rows = list(csv.DictReader(io.StringIO(resp.body)))
        self.assertEqual([(r['group'], r['host'], r['state']) for r in rows],
                         [('main', 'n1', 'up'), ('main', 'n2', 'up'), ('main', 'dead', 'down'), ('spare', 's1', 'up'),
                          ('spare', 'x", =HYPERLINK(1)', 'up')])
        dead = rows[2]
        self.assertEqual((dead['reason'], dead['connect_errors'], dead['live_bytes_in']),
                         ('connection refused', '1', '0'))
        self.assertGreater(float(dead['downtime']), -1)
        self.assertEqual(dead['last_check_ok'], '')     # no probe has ended yet
        self.assertIn('href="/running.csv"', self.fetch('/').body)
        self.assertEqual(self.fetch('/running.csv?x=1').status, 400)

    def test_metrics_of_the_new_counts(self):
        self.wait_dead_down()
        samples = parse_prometheus(self, self.fetch('/metrics').body)
        dead = (('service', 'web'), ('group', 'main'), ('host', 'dead'),
                ('address', '127.0.0.1:%d' % self.dead_port))
        self.assertEqual(samples[('pydirector_host_connect_errors_total', dead)], 1)
        self.assertEqual(samples[('pydirector_host_retries_total', dead)], 0)
        self.assertEqual(samples[('pydirector_host_current_connection_rate', dead)], 0)
        self.assertEqual(samples[('pydirector_service_hosts_up', (('service', 'web'),))], 2)
        self.assertEqual(samples[('pydirector_service_hosts', (('service', 'web'),))], 3)
        self.assertEqual(samples[('pydirector_service_errors_total', (('service', 'web'),))], 1)


# ---------------------------------------------------------------------------
# In a real browser.
# ---------------------------------------------------------------------------

SUMMARY_JS = '''Array.from(document.querySelectorAll('table.summary tr')).slice(1).map(function (row) {
  return [row.className, row.cells[0].innerText, row.cells[1].innerText, row.cells[2].innerText,
          row.querySelector('a').getAttribute('href'), row.querySelectorAll('svg polyline').length];
})'''

# Records each question the page asks and answers it as told (window.answer).
CONFIRM_JS = '''window.asked = []; window.answer = false;
window.confirm = function (question) { window.asked.push(question); return window.answer; };'''

DELETE_JS = '''(function () {
  var form = document.querySelector('form[action="/delHost"] input[name="name"][value="n2"]').form;
  form.querySelector('button').click();
  return true;
})()'''


@unittest.skipUnless(os.path.exists(support.CHROMIUM), '%s not installed (CI installs Debian chromium)'
                     % support.CHROMIUM)
class ChromiumStatusTest(test_admin.AdminCase):
    """/running in headless Chromium: the summary, a sparkline, a delete that asks
    first.  PYDIRECTOR_SCREENSHOT=FILE also writes the page as a PNG there (docs/running.png)."""

    def backends(self):
        """Hosts that say their name and then echo: a client stays as long as it likes."""
        self.n1 = self.backend(test_admin.name_then_echo, 'n1')
        self.n2 = self.backend(test_admin.name_then_echo, 'n2')
        self.s1 = self.backend(test_admin.name_then_echo, 's1')
        self.dead_port = support.free_port()

    def fill_history(self):
        """For the screenshot: a history worth looking at, traffic that rises and falls
        and clients that stay, sampled faster than the balancer would."""
        held = []
        try:
            for step in range(120):
                for _ in range(2 + (step % 40 if step % 80 < 40 else 40 - step % 40) // 4):
                    exchange(self.bal.port(), b'hello' * 20)
                if step % 12 == 0:
                    held.append(support.connect(self.bal.port()))
                    held[-1].sendall(b'a long one\n' * 100)
                time.sleep(0.02)
                self.bal.call(self.bal.director.history.sample)
        finally:
            for sock in held:
                sock.close()
        wait_until(lambda: self.bal.open_pairs() == 0)

    def test_summary_sparkline_and_confirmation(self):
        self.wait_dead_down()
        for _ in range(3):      # a history to draw
            exchange(self.bal.port())
            time.sleep(0.02)
            self.bal.call(self.bal.director.history.sample)
        profile = tempfile.mkdtemp(prefix='pydirector-chromium-')
        self.addCleanup(shutil.rmtree, profile, True)
        browser = support.DevTools([], profile)
        self.addCleanup(browser.close)
        browser.open_page()
        page = 'http://admin:%s@127.0.0.1:%d/running' % (urllib.parse.quote(PASSWORD, safe=''), self.port)
        browser.navigate(page)
        self.assertEqual(browser.evaluate(SUMMARY_JS),
                         [['row-degraded', 'web', 'degraded', '2/3', '#service-web', 2]])
        # The link leads to the service's section.
        self.assertEqual(browser.evaluate("document.querySelector(document.querySelector('table.summary a')"
                                          ".getAttribute('href')).querySelector('h2').innerText"), 'Service web')
        self.assertEqual(browser.evaluate("getComputedStyle(document.querySelector('tr.row-degraded'))"
                                          ".backgroundColor"), 'rgb(255, 244, 220)')
        spark = browser.evaluate("(function () { var s = document.querySelector('table.summary svg'); "
                                 "var b = s.getBoundingClientRect(); return [b.width, b.height, "
                                 "s.querySelector('title').textContent]; })()")
        self.assertEqual(spark[:2], [pydirector_admin.SPARK_WIDTH, pydirector_admin.SPARK_HEIGHT])
        self.assertRegex(spark[2], r'^last 15 min: up to [0-9.]+ new connections/s')
        shot = os.environ.get('PYDIRECTOR_SCREENSHOT')
        if shot:
            self.fill_history()
            browser.navigate(page)
            with open(shot, 'wb') as f:
                f.write(browser.screenshot(1600, 1200))
            browser.navigate(page)
        # Delete asks first; "Cancel" sends nothing.
        browser.evaluate(CONFIRM_JS)
        browser.evaluate(DELETE_JS)
        self.assertEqual(browser.evaluate('window.asked'), ['Delete host n2 from web/main?'])
        self.assertEqual(browser.evaluate('location.pathname + location.search'), '/running')
        self.assertEqual(self.bal.host('n2')['name'], 'n2')
        # "OK" deletes.
        browser.evaluate('window.answer = true')
        del browser.events[:]
        browser.evaluate(DELETE_JS)
        browser.wait_for(lambda events: any(e['method'] == 'Page.loadEventFired' for e in events))
        self.assertIn('OK removed host n2', browser.evaluate("document.querySelector('p.msg').innerText"))
        self.assertRaises(KeyError, self.bal.host, 'n2')


# ---------------------------------------------------------------------------
# Workers in ps.
# ---------------------------------------------------------------------------

def command_line(pid):
    with open('/proc/%d/cmdline' % pid, 'rb') as f:
        return f.read().decode().split('\0')[:-1]


@unittest.skipUnless(support.HAVE_PROC, 'reads /proc/PID/cmdline')
class WorkerNumberTest(BalancerCase):
    """ps shows `pydirector.py --worker N --channel FD`: N is the worker's number, as in
    its log lines and on /running, and a restarted worker keeps it."""
    workers = 2

    def test_ps_shows_the_worker_number(self):
        backend = self.backend(support.say_name, 'one')
        bal = self.start(service_xml([('one', backend.address)]))
        for worker in bal.master.workers:
            argv = command_line(worker.pid)
            self.assertEqual(argv[-4:-2], ['--worker', str(worker.index)], argv)
            self.assertEqual(argv[-2], '--channel')
        first = bal.master.workers[0]
        old = first.pid
        os.kill(old, signal.SIGKILL)
        wait_until(lambda: first.pid != old and first.ready, 30)
        self.assertEqual(command_line(first.pid)[-4:-2], ['--worker', '1'])
        self.assertEqual([(w['worker'], w['pid']) for w in bal.snapshot()['workers']],
                         [(w.index, w.pid) for w in bal.master.workers])
        support.LOG.wait_for('worker 1 (pid %d) ready' % first.pid, self.mark)


if __name__ == '__main__':
    unittest.main()
