"""/healthz: the admin page keepalived's vrrp_script reads (contrib/keepalived.conf).

Real HTTP against an in-process balancer with real backends: no credentials,
OK or DOWN N, DOWN when the loop is stuck, the same request limits as every
other page, and every other page still behind credentials.  With curl
installed, the exact command contrib/keepalived.conf runs.
"""

import base64
import http.client
import os
import re
import socket
import subprocess
import threading
import unittest

import support
from support import Backend, Balancer, config_xml, exchange, free_port, service_xml, wait_until

import pydirector
import pydirector_admin

PASSWORD = 'secret'
_HASH = []


def password_hash():
    if not _HASH:
        _HASH.append(pydirector.hash_password(PASSWORD))
    return _HASH[0]


def contrib_check_command():
    """The curl command of contrib/keepalived.conf's vrrp_script, as a list."""
    with open(os.path.join(support.REPO, 'contrib', 'keepalived.conf')) as f:
        match = re.search(r'^\s*script\s+"([^"]*/healthz)"', f.read(), re.M)
    return match.group(1).split()


class HealthzTest(unittest.TestCase):
    """Service web: group main (n1, a dead port) enabled, group spare (s1); service
    mail: group main with one dead port.  Every host starts up, as hosts do."""

    def setUp(self):
        self.n1 = Backend(support.say_name, 'n1')
        self.s1 = Backend(support.say_name, 's1')
        self.addCleanup(self.n1.close)
        self.addCleanup(self.s1.close)
        web = service_xml(None, groups=[
            ('main', 'roundrobin', [('n1', self.n1.address), ('dead', '127.0.0.1:%d' % free_port())]),
            ('spare', 'roundrobin', [('s1', self.s1.address)]),
        ], enable='main')
        mail = service_xml([('gone', '127.0.0.1:%d' % free_port())], name='mail')
        self.start(web + mail)

    def start(self, services):
        """The balancer and its admin server (on an ephemeral port)."""
        admin = ('  <admin listen="127.0.0.1:%d">\n    <user name="admin" password="%s" access="full"/>\n  </admin>\n'
                 % (free_port(), password_hash()))
        self.bal = Balancer(config_xml(services + admin))
        self.addCleanup(self.bal.stop)
        a = self.bal.config.admin
        self.server = pydirector_admin.start(self.bal.director, pydirector.Admin(a.listen, a.host, 0, a.users))
        self.addCleanup(self.server.stop)
        self.port = self.server.server_address[1]

    def fetch(self, path, method='GET', credentials=False, source='127.0.0.1'):
        conn = http.client.HTTPConnection('127.0.0.1', self.port, timeout=10, source_address=(source, 0))
        headers = {}
        if credentials:
            headers['Authorization'] = 'Basic ' + base64.b64encode(('admin:' + PASSWORD).encode()).decode()
        body = None
        if method == 'GET' and '?' in path and path.split('?')[0] in pydirector_admin.ACTIONS:
            path, _, body = path.partition('?')       # a change: POST it as a form
            method = 'POST'
            headers['Content-Type'] = 'application/x-www-form-urlencoded'
        try:
            conn.request(method, path, body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.getheader('Content-Type'), resp.read()
        finally:
            conn.close()

    def raw(self, data):
        sock = socket.create_connection(('127.0.0.1', self.port), timeout=10)
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            return support.recv_all(sock)
        finally:
            sock.close()

    def health(self, service, host):
        return self.bal.host(host, service)['health']

    def test_ok_without_credentials(self):
        self.assertEqual(self.fetch('/healthz'), (200, 'text/plain; charset=utf-8', b'OK\n'))
        # Credentials, even wrong ones, change nothing: they are not looked at.
        conn = http.client.HTTPConnection('127.0.0.1', self.port, timeout=10)
        conn.request('GET', '/healthz', headers={'Authorization': 'Basic ' + base64.b64encode(b'x:y').decode()})
        self.assertEqual(conn.getresponse().read(), b'OK\n')
        conn.close()

    def test_head(self):
        conn = http.client.HTTPConnection('127.0.0.1', self.port, timeout=10)
        conn.request('HEAD', '/healthz')
        resp = conn.getresponse()
        self.assertEqual((resp.status, resp.getheader('Content-Length'), resp.read()), (200, '3', b''))
        conn.close()

    def test_down_counts_the_services_with_no_host_up(self):
        # mail's only host refuses: the first client marks it down.
        self.assertEqual(exchange(self.bal.port('mail')), b'')
        wait_until(lambda: self.health('mail', 'gone') == 'down')
        self.assertEqual(self.fetch('/healthz'), (503, 'text/plain; charset=utf-8', b'DOWN 1\n'))
        # web loses its dead host but keeps n1: still one service down.
        wait_until(lambda: exchange(self.bal.port('web')) == b'n1' and self.health('web', 'dead') == 'down')
        self.assertEqual(self.fetch('/healthz')[2], b'DOWN 1\n')
        # A draining host takes no new client: draining n1, the last host up, would leave
        # web with none (though the inactive group spare has one), so it takes force=1.
        status, _, body = self.fetch('/hostAdminDown?service=web&group=main&name=n1', credentials=True)
        self.assertEqual((status, body), (409, b'ERROR refusing to drain host n1: it is the last host up in '
                                               b'the enabled group main of service web; force=1 does it anyway\n'))
        self.assertEqual(self.fetch('/healthz')[2], b'DOWN 1\n')
        status, _, body = self.fetch('/hostAdminDown?service=web&group=main&name=n1&force=1', credentials=True)
        self.assertEqual(status, 200, body)
        self.assertEqual(self.fetch('/healthz'), (503, 'text/plain; charset=utf-8', b'DOWN 2\n'))
        status, _, body = self.fetch('/enableGroup?service=web&group=spare', credentials=True)
        self.assertEqual(status, 200, body)
        self.assertEqual(self.fetch('/healthz')[2], b'DOWN 1\n')
        self.assertEqual(self.fetch('/healthz', 'HEAD')[:2], (503, 'text/plain; charset=utf-8'))

    def test_stuck_loop_is_down_without_a_count(self):
        release = threading.Event()
        self.addCleanup(release.set)
        self.bal.director.loop.call_soon_threadsafe(release.wait, 30)
        self.assertEqual(self.fetch('/healthz'), (503, 'text/plain; charset=utf-8', b'DOWN\n'))
        self.assertFalse(release.is_set())    # answered while the loop was still stuck
        release.set()
        self.assertEqual(self.fetch('/healthz')[2], b'OK\n')

    def test_stopping_is_down(self):
        # SIGTERM's drain: no new clients are taken, so the address must go elsewhere.
        self.server.stop()
        self.bal.stop()
        held = Backend(support.hold_open, 'held')
        self.addCleanup(held.close)
        self.start(service_xml([('held', held.address)]) + service_xml([('n1', self.n1.address)], name='mail'))
        client = socket.create_connection(('127.0.0.1', self.bal.port()), timeout=10)
        self.addCleanup(client.close)
        wait_until(lambda: held.open == 1)
        self.assertEqual(self.fetch('/healthz')[2], b'OK\n')
        self.bal.call(self.bal.director.begin_stop, 30)
        self.assertEqual(self.fetch('/healthz'), (503, 'text/plain; charset=utf-8', b'DOWN 2\n'))

    def test_every_other_page_needs_credentials(self):
        # Each from an address of its own: past 5 failed logins an address is told to wait (429).
        paths = sorted((set(pydirector_admin.PAGES) | set(pydirector_admin.ACTIONS)) - {'/healthz'})
        for number, path in enumerate(paths + ['/healthz/', '/HEALTHZ', '/nothing']):
            status, _, body = self.fetch(path, source='127.0.3.%d' % (number + 1))
            self.assertEqual((status, body), (401, b'ERROR credentials needed\n'), path)

    def test_same_request_rules_and_limits(self):
        status, _, body = self.fetch('/healthz', 'POST')
        self.assertEqual((status, body), (405, b'ERROR POST is not allowed on /healthz\n'))
        status, _, body = self.fetch('/healthz?verbose=1')
        self.assertEqual((status, body), (400, b'ERROR unknown parameter verbose\n'))
        answer = self.raw(b'GET /healthz?' + b'a' * 9000 + b' HTTP/1.0\r\n\r\n')
        self.assertTrue(answer.startswith(b'HTTP/1.0 414 '), answer[:100])
        answer = self.raw(b'GET /healthz HTTP/1.0\r\n' + b'X-Big: ' + b'b' * 9000 + b'\r\n\r\n')
        self.assertTrue(answer.startswith(b'HTTP/1.0 431 '), answer[:100])

    def test_not_behind_busy_workers(self):
        # One worker, waiting on a stuck loop for a page, and no queue: the next page is
        # refused as busy, but /healthz is answered by the reader (DOWN: the loop is stuck).
        self.assertEqual(self.fetch('/running.txt', credentials=True)[0], 200)     # cached: no check below
        wait_until(lambda: self.server.busy == 0)
        self.server.max_workers, self.server.max_queued = 1, 0
        release = threading.Event()
        self.addCleanup(release.set)
        self.bal.director.loop.call_soon_threadsafe(release.wait, 30)
        first = []
        thread = threading.Thread(target=lambda: first.append(self.fetch('/running.txt', credentials=True)))
        thread.start()
        wait_until(lambda: self.server.busy == 1)
        self.assertEqual(self.fetch('/running.txt', credentials=True),
                         (503, 'text/plain; charset=utf-8', b'ERROR the admin server is busy; try again\n'))
        self.assertEqual(self.fetch('/healthz'), (503, 'text/plain; charset=utf-8', b'DOWN\n'))
        release.set()
        self.assertEqual(self.fetch('/healthz'), (200, 'text/plain; charset=utf-8', b'OK\n'))
        thread.join(10)
        self.assertEqual(first[0][0], 200)

    def test_contrib_check_command(self):
        """The vrrp_script's curl, pointed at this server: exit 0 on OK, non-zero on DOWN."""
        if support.find_binary('curl') is None:
            self.skipTest('curl is not installed (.ci/run installs it)')
        argv = contrib_check_command()
        url = argv[-1]
        self.assertRegex(url, r'^http://127\.0\.0\.1:7001/healthz$')
        argv[-1] = 'http://127.0.0.1:%d/healthz' % self.port
        self.assertEqual(subprocess.call(argv), 0)
        self.assertEqual(exchange(self.bal.port('mail')), b'')
        wait_until(lambda: self.health('mail', 'gone') == 'down')
        self.assertEqual(subprocess.call(argv, stderr=subprocess.DEVNULL), 22)   # curl --fail: HTTP >= 400


if __name__ == '__main__':
    unittest.main()
