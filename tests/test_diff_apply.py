"""`pydirector_admin.py diff` and `apply`: plans checked line by line, and applied over real
HTTP to a fleet of two in-process balancers that run the same config file.

The plan rules themselves (order, what needs a reload) are tested on parsed configs first;
then the command line runs as a subprocess against the fleet, and in-process where a test
has to step in between planning and applying.
"""

import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import unittest

import support
from support import BalancerCase, config_xml, free_port, service_xml, wait_until

import pydirector
import pydirector_admin

ADMIN_SCRIPT = os.path.join(support.REPO, 'pydirector_admin.py')
PASSWORD = 'fleet pw'       # a space: percent-encoded in the URLs
_HASHES = {}


def password_hash(password=PASSWORD):
    # Few iterations: each admin request checks one (once, then cached), and tests make many.
    if password not in _HASHES:
        _HASHES[password] = pydirector.hash_password(password, iterations=1000)
    return _HASHES[password]


def admin_block(users, listen='127.0.0.1:7001'):
    """users: [(name, password, access)]."""
    return ('  <admin listen="%s">\n%s  </admin>\n' % (listen, ''.join(
        '    <user name="%s" password="%s" access="%s"/>\n' % (name, password_hash(pw), access)
        for name, pw, access in users)))


LISTEN = free_port()
OLD_USERS = [('admin', PASSWORD, 'full'), ('viewer', PASSWORD, 'readonly'), ('gone', PASSWORD, 'readonly')]
NEW_USERS = [('admin', PASSWORD, 'full'), ('viewer', 'viewer pw', 'full'), ('ops', PASSWORD, 'readonly')]


def old_xml():
    return config_xml(service_xml(None, listen_port=LISTEN, groups=[
        ('main', 'roundrobin', [('one', '127.0.0.1:1001'), ('two', '127.0.0.1:1002'),
                                ('three', '127.0.0.1:1003', 'weight="2"')]),
        ('old', 'roundrobin', [('x', '127.0.0.1:1004')]),
    ], enable='main') + admin_block(OLD_USERS))


def new_xml(service_extra='', admin=None, groups=None, enable='blue'):
    if groups is None:
        groups = [
            ('main', 'hash, sticky', [('one', '127.0.0.1:1001'), ('two', '127.0.0.1:1012'),
                                      ('four', '127.0.0.1:1005', 'weight="2"')]),
            ('blue', 'roundrobin', [('b1', '127.0.0.1:1006', 'maxconns="5"')]),
        ]
    return config_xml(service_xml(None, listen_port=LISTEN, groups=groups, enable=enable, extra=service_extra) +
                      (admin if admin is not None else admin_block(NEW_USERS)))


# What `diff` prints for old_xml() -> new_xml(), in order.
PLAN = [
    'changeScheduler service=web group=main scheduler=hash,sticky',
    'addHost service=web group=main name=four ip=127.0.0.1:1005 weight=2',
    'newGroup service=web group=blue scheduler=roundrobin',
    'addHost service=web group=blue name=b1 ip=127.0.0.1:1006 maxconns=5',
    'enableGroup service=web group=blue',
    '# web/main host two: ip 127.0.0.1:1002 -> 127.0.0.1:1012; delete and add again',
    'delHost service=web group=main name=two',
    'addHost service=web group=main name=two ip=127.0.0.1:1012',
    'delHost service=web group=main name=three',
    'delGroup service=web group=old',
    'addUser name=viewer password_hash=pbkdf2_sha256$1000$... access=full',
    'addUser name=ops password_hash=pbkdf2_sha256$1000$... access=readonly',
    'delUser name=gone',
]


def tree(xml):
    return pydirector.config_tree(pydirector.parse_config(xml, 'x.xml'))


def plan_lines(old, new, user='admin', **kwargs):
    return pydirector_admin.plan_changes(tree(old), tree(new), user, **kwargs).lines()


def cannot(what):
    return pydirector_admin.CANNOT % what


def spec(text):
    return ','.join(part.strip() for part in text.split(','))


def summary(config):
    """What the admin API manages, in a form where order does not matter, built without the
    code under test: {service: (enabled, {group: (scheduler, {host: (ip, weight, maxconns)})})}
    and {user: (hash, access)}."""
    services = {}
    for service in config.services:
        groups = {}
        for group in service.groups:
            groups[group.name] = (spec(group.scheduler), dict((h.name, (h.ip, h.weight, h.maxconns))
                                                        for h in group.hosts))
        services[service.name] = (service.enabled, groups, [l.text for l in service.listens])
    users = dict((u.name, (u.password, u.access)) for u in config.admin.users)
    return services, users


# ---------------------------------------------------------------------------
# The plan, from parsed configs

class PlanTest(unittest.TestCase):

    def test_plan_order(self):
        self.assertEqual(plan_lines(old_xml(), new_xml()), PLAN)

    def test_no_changes(self):
        self.assertEqual(plan_lines(old_xml(), old_xml()), ['# no changes'])
        # Order of groups and hosts is no difference: addHost and newGroup can only append.
        shuffled = config_xml(service_xml(None, listen_port=LISTEN, groups=[
            ('old', 'roundrobin', [('x', '127.0.0.1:1004')]),
            ('main', 'roundrobin', [('three', '127.0.0.1:1003', 'weight="2"'), ('one', '127.0.0.1:1001'),
                                    ('two', '127.0.0.1:1002')]),
        ], enable='main') + admin_block(OLD_USERS))
        self.assertEqual(plan_lines(old_xml(), shuffled), ['# no changes'])

    def test_drain_and_rollback_go_with_enable_group(self):
        lines = plan_lines(old_xml(), new_xml(), drain='5', rollback='30')
        self.assertIn('enableGroup service=web group=blue drain=5 rollback=30', lines)

    def test_changed_host_in_the_group_that_stays_enabled(self):
        # The group keeps its other hosts meanwhile: delete and add again before anything else is removed.
        new = new_xml(enable='main')
        lines = plan_lines(old_xml(), new)
        self.assertEqual(lines[:7], [
            'changeScheduler service=web group=main scheduler=hash,sticky',
            'addHost service=web group=main name=four ip=127.0.0.1:1005 weight=2',
            '# web/main host two: ip 127.0.0.1:1002 -> 127.0.0.1:1012; delete and add again',
            'delHost service=web group=main name=two',
            'addHost service=web group=main name=two ip=127.0.0.1:1012',
            'newGroup service=web group=blue scheduler=roundrobin',
            'addHost service=web group=blue name=b1 ip=127.0.0.1:1006 maxconns=5',
        ])
        self.assertNotIn('enableGroup', ' '.join(lines))

    def test_changed_weight_and_maxconns_are_set_in_place(self):
        new = old_xml().replace('name="one" ip="127.0.0.1:1001" ', 'name="one" ip="127.0.0.1:1001" weight="3"')
        self.assertEqual(plan_lines(old_xml(), new), ['setHost service=web group=main name=one weight=3'])
        # Back to a default: setHost is given the default's value.
        new = old_xml().replace('weight="2"', 'maxconns="9"')
        self.assertEqual(plan_lines(old_xml(), new), ['setHost service=web group=main name=three weight=1 maxconns=9'])
        # The only host of the enabled group too: nothing is deleted.
        old = config_xml(service_xml([('solo', '127.0.0.1:1001')], listen_port=LISTEN) + admin_block(OLD_USERS))
        new = old.replace('ip="127.0.0.1:1001"', 'ip="127.0.0.1:1001" weight="5"')
        self.assertEqual(plan_lines(old, new), ['setHost service=web group=main name=solo weight=5'])

    def test_what_set_host_cannot_change_is_deleted_and_added_again(self):
        new = old_xml().replace('name="one" ip="127.0.0.1:1001" ', 'name="one" ip="127.0.0.1:1001" weight="3" '
                                                                  'send_proxy="v1" backup="on"')
        self.assertEqual(plan_lines(old_xml(), new), [
            '# web/main host one: weight 1 -> 3, send_proxy none -> v1, backup off -> on; delete and add again',
            'delHost service=web group=main name=one',
            'addHost service=web group=main name=one ip=127.0.0.1:1001 weight=3 send_proxy=v1 backup=on',
        ])

    def test_only_host_of_the_enabled_group_cannot_change(self):
        old = config_xml(service_xml([('solo', '127.0.0.1:1001')], listen_port=LISTEN) + admin_block(OLD_USERS))
        new = old.replace('127.0.0.1:1001', '127.0.0.1:1002')
        self.assertEqual(plan_lines(old, new), [cannot(
            'web/main: host solo changes but is the only host of the enabled group, which delHost refuses '
            'to empty')])
        # With a second host added in the same plan it can.
        new = new.replace('</group>', '  <host name="pair" ip="127.0.0.1:1003"/>\n    </group>')
        self.assertEqual(plan_lines(old, new)[0], 'addHost service=web group=main name=pair ip=127.0.0.1:1003')

    def test_enabled_group_left_without_hosts(self):
        new = new_xml(groups=[('main', 'roundrobin', []), ('old', 'roundrobin', [('x', '127.0.0.1:1004')])],
                      enable='main', admin=admin_block(OLD_USERS))
        self.assertEqual(plan_lines(old_xml(), new), [cannot(
            'web/main: the enabled group would have no host, and delHost refuses to remove the last one')])

    def test_calling_user_changes_last(self):
        users = [('admin', 'new admin pw', 'full'), ('viewer', PASSWORD, 'readonly'), ('ops', PASSWORD, 'full')]
        new = old_xml().replace(admin_block(OLD_USERS), admin_block(users))
        self.assertEqual(plan_lines(old_xml(), new, user='admin'), [
            'addUser name=ops password_hash=pbkdf2_sha256$1000$... access=full',
            'delUser name=gone',
            'addUser name=admin password_hash=pbkdf2_sha256$1000$... access=full',
        ])
        self.assertEqual(plan_lines(old_xml(), new, user='viewer')[0],
                         'addUser name=admin password_hash=pbkdf2_sha256$1000$... access=full')

    def test_no_full_access_user_left(self):
        new = old_xml().replace(admin_block(OLD_USERS), admin_block([('viewer', PASSWORD, 'readonly')]))
        self.assertEqual(plan_lines(old_xml(), new), [cannot(
            'no user has full access, and delUser refuses to remove the last one')])

    def test_what_the_admin_api_cannot_do(self):
        new = config_xml(
            service_xml(None, listen_port=LISTEN + 1, groups=[('main', 'roundrobin', [('one', '127.0.0.1:1001')])],
                        extra='    <check interval="2"/>\n    <timeouts connect="1"/>\n') +
            service_xml([('a', '127.0.0.1:2001')], name='api', listen_port=LISTEN + 2) +
            admin_block(OLD_USERS, listen='127.0.0.1:7002') + '  <logging file="x.log"/>\n', drain='3')
        lines = plan_lines(old_xml(), new)
        problems = [l for l in lines if l.startswith('# cannot')]
        self.assertEqual(problems, [cannot(what) for what in [
            '<pdconfig> drain (default) -> 3',
            'service web: <listen ip="127.0.0.1:%d"/> -> <listen ip="127.0.0.1:%d"/>' % (LISTEN, LISTEN + 1),
            'service web: (none) -> <check interval="2"/>',
            'service web: (none) -> <timeouts connect="1"/>',
            'service api is added',
            '(none) -> <logging file="x.log"/>',
            '<admin> listen 127.0.0.1:7001 -> 127.0.0.1:7002',
        ]])
        self.assertIn('delHost service=web group=main name=two', lines)
        removed = config_xml(service_xml([('a', '127.0.0.1:2001')], name='api', listen_port=LISTEN + 2) +
                             admin_block(OLD_USERS))
        self.assertIn(cannot('service web is removed'), plan_lines(old_xml(), removed))

    def test_issue4_settings(self):
        # send_proxy is addHost's; the rest of issue 4's settings need a reload.
        old = config_xml(service_xml(None, listen_port=LISTEN, groups=[
            ('main', 'roundrobin', [('one', '127.0.0.1:1001'), ('two', '127.0.0.1:1002')])]) +
            admin_block(OLD_USERS))
        new = config_xml(service_xml(None, listen_port=LISTEN, groups=[
            ('main', 'roundrobin', [('one', '127.0.0.1:1001', 'send_proxy="v1"'), ('two', '127.0.0.1:1002'),
                                    ('three', '127.0.0.1:1003', 'send_proxy="v2"')])],
            extra='    <allow cidr="10.0.0.0/8"/>\n    <deny cidr="::1"/>\n'
                  '    <timeouts queue="9"/>\n').replace(
                '<service name="web">', '<service name="web" maxconns="50">').replace(
                '<listen ip="127.0.0.1:%d"/>' % LISTEN,
                '<listen ip="127.0.0.1:%d" accept_proxy="v2" trusted="127.0.0.0/8"/>' % LISTEN) +
            admin_block(OLD_USERS) + '  <logging access="off"/>\n', user='nobody')
        self.assertEqual(plan_lines(old, new), [cannot(what) for what in [
            '<pdconfig> user (default) -> nobody',
            'service web: maxconns (default) -> 50',
            'service web: <listen ip="127.0.0.1:%d"/> -> <listen ip="127.0.0.1:%d" accept_proxy="v2" '
            'trusted="127.0.0.0/8"/>' % (LISTEN, LISTEN),
            'service web: (none) -> <allow cidr="10.0.0.0/8"/> <deny cidr="::1"/>',
            'service web: (none) -> <timeouts queue="9"/>',
            '(none) -> <logging access="off"/>',
        ]] + [
            'addHost service=web group=main name=three ip=127.0.0.1:1003 send_proxy=v2',
            '# web/main host one: send_proxy none -> v1; delete and add again',
            'delHost service=web group=main name=one',
            'addHost service=web group=main name=one ip=127.0.0.1:1001 send_proxy=v1',
        ])

    def test_sni_changes_need_a_reload(self):
        def two(api, www):
            return config_xml(
                service_xml([('one', '127.0.0.1:1001')], name='api', listen_port=LISTEN).replace(
                    '"/>', '" sni="%s"/>' % api, 1),
                service_xml([('two', '127.0.0.1:1002')], name='www', listen_port=LISTEN).replace(
                    '"/>', '" sni="%s"/>' % www, 1), admin_block(OLD_USERS))
        old = two('api.example.com', 'www.example.com,moved.example.com')
        self.assertEqual(plan_lines(old, two('API.example.com.', 'www.example.com, moved.example.com')),
                         ['# no changes'])
        listen = '<listen ip="127.0.0.1:%d" sni="%%s"/>' % LISTEN
        self.assertEqual(plan_lines(old, two('api.example.com,moved.example.com', 'www.example.com')), [
            cannot('service api: %s -> %s' % (listen % 'api.example.com', listen % 'api.example.com,moved.example.com')),
            cannot('service www: %s -> %s' % (listen % 'www.example.com,moved.example.com', listen % 'www.example.com')),
        ])

    def test_new_features_need_a_reload(self):
        # Attributes addHost cannot set, on a new host, cannot be planned either (a future
        # attribute; to_xml of this version does not write one, so the tree is edited).
        old, new = tree(old_xml()), tree(new_xml())
        new.find('service/group/host').set('colour', 'red')
        problems = pydirector_admin.plan_changes(old, new, 'admin').problems
        self.assertEqual(problems, ['web/main: host one has colour, which addHost cannot set'])
        old, new = tree(old_xml()), tree(new_xml())
        new.find("admin/user[@name='viewer']").set('colour', 'red')
        problems = pydirector_admin.plan_changes(old, new, 'admin').problems
        self.assertEqual(problems, ['user viewer has colour, which addUser cannot set'])

    def test_values_are_quoted_when_needed(self):
        step = pydirector_admin.Step('x', [('a', 'plain'), ('b', 'two words'), ('c', ''), ('d', 'q"uote')])
        self.assertEqual(step.line(), 'x a=plain b="two words" c="" d="q\\"uote"')


# ---------------------------------------------------------------------------
# A fleet: two balancers running the same file

class Member(object):
    """One balancer of the fleet, in-process, with its admin server on an ephemeral port.

    Only the first binds its service's listen address: both run the same file, so the
    second would find the port taken.  The admin API does not care either way."""

    def __init__(self, xml, bind):
        self.config = pydirector.parse_config(xml, 'fleet.xml')
        self.director = pydirector.Director(self.config)
        if bind:
            self.director.start()
        self.thread = threading.Thread(target=self.director.loop.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.director.loop.thread_ident is not None)
        a = self.config.admin
        self.admin = pydirector_admin.start(self.director, pydirector.Admin(a.listen, a.host, 0, a.users))
        self.port = self.admin.server_address[1]

    def url(self, user='admin', password=PASSWORD, scheme='http'):
        return '%s://%s:%s@127.0.0.1:%d' % (scheme, user, password.replace(' ', '%20'), self.port)

    def shown(self, user='admin'):
        return 'http://%s@127.0.0.1:%d' % (user, self.port)

    def call(self, fn, *args, **kwargs):
        return self.director.loop.call(fn, *args, **kwargs)

    def running(self):
        return self.call(lambda: self.director.running_config().to_xml())

    def stop(self):
        self.admin.stop()
        self.director.loop.call_soon_threadsafe(self.director.stop_now)
        self.thread.join(10)
        self.director.loop.close()


class FleetCase(BalancerCase):

    def setUp(self):
        BalancerCase.setUp(self)
        self.members = []
        for bind in (True, False):
            member = Member(old_xml(), bind)
            self.addCleanup(member.stop)
            self.members.append(member)
        self.a, self.b = self.members
        self.dir = tempfile.mkdtemp(prefix='pydirector-diff-')
        self.addCleanup(shutil.rmtree, self.dir)

    def write(self, xml, name='new.xml'):
        path = os.path.join(self.dir, name)
        with open(path, 'w') as f:
            f.write(xml)
        return path

    def run_cli(self, *args):
        proc = subprocess.Popen([sys.executable, ADMIN_SCRIPT] + list(args), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd=self.dir)
        out, err = proc.communicate(timeout=60)
        return proc.returncode, out.decode(), err.decode()

    def run_main(self, *args):
        """The same command line in this process (no interpreter start-up): (status, out, err)."""
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = pydirector_admin.main(list(args), out, err)
            except SystemExit as e:
                rc = e.code
        return rc, out.getvalue(), err.getvalue()

    def urls(self, *members, **kwargs):
        args = []
        for member in members or self.members:
            args.extend(['--url', member.url(**kwargs)])
        return args

    def assertMatches(self, member, xml):
        self.assertEqual(summary(pydirector.parse_config(member.running(), 'running.xml')),
                         summary(pydirector.parse_config(xml, 'new.xml')))


class FleetTest(FleetCase):

    def test_diff_apply_diff(self):
        path = self.write(new_xml())
        before = [m.running() for m in self.members]
        rc, out, err = self.run_cli('diff', *self.urls() + [path])
        self.assertEqual((rc, err), (1, ''))
        self.assertEqual(out.splitlines(), ['# balancer ' + self.a.shown()] + PLAN +
                         ['# balancer ' + self.b.shown()] + PLAN)
        self.assertEqual([m.running() for m in self.members], before)    # diff changes nothing
        self.assertNotIn(PASSWORD.replace(' ', '%20'), out)

        rc, out, err = self.run_cli('apply', *self.urls() + [path])
        self.assertEqual((rc, err), (0, ''), out)
        lines = out.splitlines()
        self.assertEqual(lines[-1], '# applied: %s, %s now run %s' % (self.a.shown(), self.b.shown(), path))
        # Every call is echoed, then the balancer's answer.
        for member in self.members:
            start = lines.index('# balancer ' + member.shown())
            section = lines[start + 1:start + 1 + 2 * len(PLAN) - 1]
            calls = [l for l in section if not l.startswith('  ')]
            self.assertEqual(calls, PLAN)
            answers = [l for l in section if l.startswith('  ')]
            self.assertEqual(len(answers), len(PLAN) - 1)
            self.assertTrue(all(a.startswith('  OK ') for a in answers), answers)
        for member in self.members:
            self.assertMatches(member, new_xml())
        # The bound balancer now sends new clients to the new enabled group.
        self.assertEqual(self.a.call(lambda: self.a.director.services['web'].enabled.name), 'blue')

        rc, out, err = self.run_cli('diff', *self.urls() + [path])
        self.assertEqual((rc, out, err), (0, '# balancer %s\n# no changes\n# balancer %s\n# no changes\n'
                                          % (self.a.shown(), self.b.shown()), ''))
        rc, out, err = self.run_cli('apply', '--url', self.a.url(), path)
        self.assertEqual((rc, out, err), (0, '# no changes\n# applied: %s now runs %s\n' % (self.a.shown(), path), ''))

    def test_password_from_the_environment(self):
        path = self.write(old_xml())
        url = 'http://admin@127.0.0.1:%d' % self.a.port
        os.environ['PYDIRECTOR_ADMIN_PASSWORD'] = PASSWORD
        try:
            self.assertEqual(self.run_main('diff', '--url', url, path), (0, '# no changes\n', ''))
        finally:
            del os.environ['PYDIRECTOR_ADMIN_PASSWORD']
        rc, out, err = self.run_main('diff', '--url', url, path)
        self.assertEqual(rc, 2)
        self.assertIn('user admin was refused (401 ERROR bad credentials)', err)

    def test_apply_sets_a_new_weight_in_place(self):
        path = self.write(old_xml().replace('weight="2"', 'weight="5" maxconns="4"'))
        host = self.a.call(lambda: self.a.director.services['web'].groups['main'].scheduler.get_host('three'))
        self.a.call(self.a.director.health.set_state, self.a.director.services['web'],
                    self.a.director.services['web'].groups['main'], host, pydirector.schedulers.DRAINING, 'test')
        self.a.call(lambda: setattr(host, 'total', 42))
        rc, out, err = self.run_main('apply', '--url', self.a.url(), path)
        self.assertEqual((rc, err), (0, ''), out)
        self.assertEqual(out.splitlines()[0], 'setHost service=web group=main name=three weight=5 maxconns=4')
        # The same Host, with its counters and state: changed, not deleted and added again.
        self.assertIs(self.a.call(lambda: self.a.director.services['web'].groups['main'].scheduler.get_host('three')),
                      host)
        self.assertEqual((host.weight, host.maxconns, host.total, host.admin), (5, 4, 42, 'draining'))
        self.assertEqual(self.run_main('diff', '--url', self.a.url(), path), (0, '# no changes\n', ''))

    def test_apply_reads_back(self):
        # Someone changes balancer a while apply runs: the read-back sees it.
        path = self.write(new_xml())
        real = pydirector_admin.apply_plans

        def apply_then_meddle(*args):
            status = real(*args)
            self.a.call(self.a.director.host_admin_down, 'web', 'blue', 'b1', force='1')  # not in any config: fine
            self.a.call(self.a.director.add_host, 'web', 'blue', 'late', '127.0.0.1:1077')
            return status
        pydirector_admin.apply_plans = apply_then_meddle
        try:
            rc, out, err = self.run_main('apply', '--url', self.a.url(), path)
        finally:
            pydirector_admin.apply_plans = real
        self.assertEqual(rc, 1)
        self.assertEqual(err.splitlines(), [
            'apply: all calls made, but the running config still differs from %s:' % path,
            '# balancer ' + self.a.shown(),
            'delHost service=web group=blue name=late'])

    def test_users_copied_from_the_file_can_log_in(self):
        path = self.write(new_xml())
        self.assertEqual(self.run_main('apply', '--url', self.a.url(), path)[0], 0)
        # viewer's new password (from the hash in new.xml) works, and viewer now has full access.
        rc, out, err = self.run_main('diff', '--url', self.a.url('viewer', 'viewer pw'), path)
        self.assertEqual((rc, out, err), (0, '# no changes\n', ''))
        rc, out, err = self.run_main('diff', '--url', self.a.url('gone'), path)
        self.assertEqual(rc, 2)

    def test_apply_stops_at_the_first_failure(self):
        # Between planning and applying someone adds host 'four' to balancer b by hand, under
        # another address: b refuses the plan's addHost four.  a is done, b is half way.
        path = self.write(new_xml())
        real = pydirector_admin.make_plans

        def plan_then_race(*args):
            plans = real(*args)
            self.b.call(self.b.director.add_host, 'web', 'main', 'four', '127.0.0.1:1099')
            return plans
        pydirector_admin.make_plans = plan_then_race
        out, err = io.StringIO(), io.StringIO()
        try:
            rc = pydirector_admin.main(['apply'] + self.urls() + [path], out, err)
        finally:
            pydirector_admin.make_plans = real
        self.assertEqual(rc, 1)
        self.assertEqual(err.getvalue().splitlines(), [
            'apply: stopped at the first failure, on %s:' % self.b.shown(),
            '  addHost service=web group=main name=four ip=127.0.0.1:1005 weight=2',
            "  answered: 409 ERROR host 'four' already exists in web/main",
            'apply: succeeded before it: %s: all %d call(s); %s: 1 of %d call(s)' % (
                self.a.shown(), len(PLAN) - 1, self.b.shown(), len(PLAN) - 1),
            'apply: run diff again to see what is left',
        ])
        lines = out.getvalue().splitlines()
        self.assertEqual(lines[-2:], ['addHost service=web group=main name=four ip=127.0.0.1:1005 weight=2',
                                      "  FAILED: 409 ERROR host 'four' already exists in web/main"])
        self.assertMatches(self.a, new_xml())
        b = pydirector.parse_config(self.b.running(), 'b.xml')
        self.assertEqual(b.service('web').group('main').scheduler, 'hash,sticky')    # the one call made
        self.assertIsNone(b.service('web').group('blue'))                          # nothing after it
        self.assertEqual(b.service('web').enabled, 'main')
        # diff now shows b's remaining work, with four as a changed host.
        rc, out, err = self.run_main('diff', '--url', self.b.url(), path)
        self.assertEqual(rc, 1)
        self.assertIn('# web/main host four: ip 127.0.0.1:1099 -> 127.0.0.1:1005, weight 1 -> 2; '
                      'delete and add again', out)

    def test_apply_refuses_what_needs_a_reload(self):
        path = self.write(new_xml(service_extra='    <timeouts idle="60"/>\n'))
        before = [m.running() for m in self.members]
        rc, out, err = self.run_cli('diff', *self.urls() + [path])
        self.assertEqual(rc, 1)
        self.assertEqual(out.splitlines()[1], cannot('service web: (none) -> <timeouts idle="60"/>'))
        self.assertEqual(out.splitlines()[2:2 + len(PLAN)], PLAN)
        rc, out, err = self.run_cli('apply', *self.urls() + [path])
        self.assertEqual(rc, 1)
        self.assertEqual(err, 'apply: nothing changed: 2 difference(s) cannot be made through the admin API '
                              '(the "# cannot apply" lines); copy %s to the balancer(s) and reload it there '
                              '(/reload or SIGHUP)\n' % path)
        self.assertEqual([m.running() for m in self.members], before)

    def test_bad_urls_and_credentials(self):
        path = self.write(new_xml())
        dead = free_port()
        cases = [
            (['--url', 'ftp://admin:x@127.0.0.1:1'],
             "diff: bad URL 'ftp://admin:x@127.0.0.1:1': want http://USER:PASSWORD@HOST:PORT (or https://...)"),
            (['--url', 'http://127.0.0.1:notaport'], "diff: bad URL 'http://127.0.0.1:notaport': "),
            (['--url', self.a.url(password='wrong')],
             'diff: %s: user admin was refused (401 ERROR bad credentials); check the user and password '
             'in the URL' % self.a.shown()),
            (['--url', 'http://127.0.0.1:%d' % self.a.port],
             'diff: http://127.0.0.1:%d: credentials needed; put them in the URL: '
             'http://USER:PASSWORD@127.0.0.1:%d' % (self.a.port, self.a.port)),
            (['--url', self.a.url('viewer')],
             'diff: %s answered 403: ERROR user viewer has read-only access' % self.a.shown('viewer')),
            (['--url', self.a.url(), '--url', 'http://admin:x@127.0.0.1:%d' % dead],
             'diff: cannot reach http://admin@127.0.0.1:%d: Connection refused' % dead),
        ]
        for args, message in cases:
            rc, out, err = self.run_main('diff', *args + [path])
            self.assertEqual((rc, out), (2, ''), args)
            self.assertTrue(err.startswith(message), (err, message))
            self.assertEqual(len(err.splitlines()), 1, err)
            self.assertNotIn('Traceback', err)
            self.assertNotIn(PASSWORD.replace(' ', '%20'), err)

    def test_bad_new_file_and_usage(self):
        bad = self.write('<pdconfig>\n  <service name="web"/>\n</pdconfig>\n', 'bad.xml')
        rc, out, err = self.run_main('apply', '--url', self.a.url(), bad)
        self.assertEqual((rc, out, err), (1, '', "apply: %s:2: service 'web' has no <listen>\n" % bad))
        rc, out, err = self.run_main('diff', '--url', self.a.url(), bad)
        self.assertEqual((rc, out, err), (2, '', "diff: %s:2: service 'web' has no <listen>\n" % bad))
        rc, out, err = self.run_main('diff', bad)
        self.assertEqual(rc, 2)
        self.assertIn('the following arguments are required: --url', err)
        rc, out, err = self.run_main('diff', '--url', self.a.url(), '--drain', 'soon', bad)
        self.assertEqual(rc, 2)
        self.assertIn("--drain 'soon': must be a number of seconds >= 0 and <= 86400", err)
        self.assertEqual(self.run_main()[0], 2)
        self.assertEqual(self.run_cli('diff')[0], 2)
        rc, out, err = self.run_cli('--help')
        self.assertEqual((rc, err), (0, ''))
        self.assertIn('diff', out)
        self.assertIn('apply', out)


class ImportTest(unittest.TestCase):

    def test_import_does_nothing(self):
        # pydirector.py imports the module to serve <admin>: importing must only define things.
        code = ('import sys, threading; sys.argv = ["x", "diff"]; import pydirector_admin; '
                'print(threading.active_count(), sorted(m for m in ("pydirector_admin", "pydirector") '
                'if m in sys.modules))')
        out = subprocess.check_output([sys.executable, '-c', code], cwd=support.REPO, stderr=subprocess.STDOUT)
        self.assertEqual(out.decode(), "1 ['pydirector', 'pydirector_admin']\n")


class HttpsTest(FleetCase):

    def setUp(self):
        if not shutil.which('openssl'):
            self.skipTest('openssl command not found: cannot make a test certificate')
        FleetCase.setUp(self)
        cert, key = os.path.join(self.dir, 'cert.pem'), os.path.join(self.dir, 'key.pem')
        subprocess.check_call(['openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', key,
                               '-out', cert, '-days', '2', '-subj', '/CN=localhost'],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        a = self.a.config.admin
        self.tls = pydirector_admin.start(self.a.director, pydirector.Admin(
                                          a.listen, a.host, 0, a.users, certfile=cert, keyfile=key))
        self.addCleanup(self.tls.stop)
        self.tls_url = 'https://admin:%s@127.0.0.1:%d' % (PASSWORD.replace(' ', '%20'), self.tls.server_address[1])

    def test_self_signed_needs_insecure(self):
        path = self.write(old_xml())
        rc, out, err = self.run_cli('diff', '--url', self.tls_url, path)
        self.assertEqual(rc, 2)
        self.assertRegex(err, r'^diff: https://admin@127\.0\.0\.1:\d+: the TLS certificate does not verify '
                              r'\(.*\); --insecure skips the check\n$')
        rc, out, err = self.run_main('diff', '--insecure', '--url', self.tls_url, path)
        self.assertEqual((rc, out, err), (0, '# no changes\n', ''))
        # Plain HTTP spoken to the TLS port: a clear message, not a traceback.
        rc, out, err = self.run_main('diff', '--url', self.tls_url.replace('https', 'http'), path)
        self.assertEqual(rc, 2)
        self.assertNotIn('Traceback', err)
        self.assertTrue(err.startswith('diff: '), err)


if __name__ == '__main__':
    unittest.main()
