"""The config schema (issue 26): tests generated from the attribute tables.

Each element's attributes are rows of one table (pydirector.ELEMENT_ATTRS).
Here every row of every table is set to its example, a valid text other than
its default, in one config per protocol (VARIANTS: a UDP service refuses the
rows only TCP has, and dns= replaces send/expect/status; those rows are set
in the other config).  Each value must come back from running.xml
as it went in: written by a Director in this process, by a Director built
from that running.xml as a worker builds one, and by real worker processes
(with workers="2"); and running.xml must pass `--check`, whose summary shows
every optional attribute.  A new row is covered here with no change.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import unittest
from unittest import mock
from xml.etree import ElementTree
from xml.sax.saxutils import quoteattr

import support
from support import LOG, BalancerCase, WorkersMixin, echo, exchange, free_port, service_xml, wait_until

import pydirector

TABLES = pydirector.ELEMENT_ATTRS

# The full configs, and the (tag, attribute) rows each leaves out: those the other sets.
VARIANTS = {
    'tcp': set([('service', 'protocol'), ('check', 'dns')]),
    # trusted is only used with accept_proxy; dns writes its own query and judges the answer.
    'udp': set(pydirector.TCP_ONLY) | set([('listen', 'trusted')]) |
           set(('check', name) for name in pydirector.DNS_CHECK_REPLACES),
}
ONLY_IN = {'udp': 'udp', 'clients': 'tcp'}        # elements only one variant has


def tags(variant):
    return [tag for tag in TABLES if ONLY_IN.get(tag, variant) == variant]


def example_texts(tag, variant):
    return dict((row.name, row.example) for row in TABLES[tag] if (tag, row.name) not in VARIANTS[variant])


def attrs(tag, variant='tcp', **texts):
    """' name="example" ...' for every row of tag's table the variant sets; texts replace examples."""
    values = example_texts(tag, variant)
    values.update(texts)
    return ''.join(' %s=%s' % (name, quoteattr(text)) for name, text in values.items())


def full_config(listen=None, variant='tcp'):
    """Every element once, every attribute at its example (listen: its ip instead)."""
    listen_attrs = attrs('listen', variant, ip=listen) if listen else attrs('listen', variant)
    return ('<pdconfig%s>\n' % attrs('pdconfig', variant) +
            '  <service%s>\n' % attrs('service', variant) +
            '    <listen%s/>\n' % listen_attrs +
            '    <allow%s/>\n' % attrs('allow', variant) +
            '    <deny%s/>\n' % attrs('deny', variant) +
            '    <group%s>\n' % attrs('group', variant) +
            '      <host%s/>\n' % attrs('host', variant) +
            '      <discover%s/>\n' % attrs('discover', variant) +
            '    </group>\n' +
            '    <enable%s/>\n' % attrs('enable', variant) +
            '    <check%s/>\n' % attrs('check', variant) +
            '    <timeouts%s/>\n' % attrs('timeouts', variant) +
            ''.join('    <%s%s/>\n' % (tag, attrs(tag, variant)) for tag in ('clients', 'udp')
                    if ONLY_IN[tag] == variant) +
            '  </service>\n' +
            '  <admin%s>\n' % attrs('admin', variant) +
            '    <user%s/>\n' % attrs('user', variant) +
            '  </admin>\n' +
            '  <logging%s/>\n' % attrs('logging', variant) +
            '</pdconfig>\n')


def expected_values(tag, listen=None, variant='tcp'):
    """{field: value} of tag's examples, as the reader reads them (listen: full_config's)."""
    texts = example_texts(tag, variant)
    if tag == 'listen' and listen:
        texts['ip'] = listen
    return pydirector.read_values(TABLES[tag], texts)


def director_xml(config):
    """running.xml as a Director built from config writes it (not accepting, names not
    resolved: as a worker builds its own from the master's running.xml)."""
    director = pydirector.Director(config, accept=False, resolve_names=False)
    try:
        return director.running_xml()
    finally:
        director.loop.close()


def check_values(test, xml, where, listen=None, variant='tcp'):
    """Each element of xml (one of each) carries every example's value (listen: full_config's)."""
    root = ElementTree.fromstring(xml)
    for tag in tags(variant):
        found = list(root.iter(tag))
        test.assertEqual(len(found), 1, '%s: <%s> %d times' % (where, tag, len(found)))
        with test.subTest(where=where, tag=tag, variant=variant):
            test.assertEqual(pydirector.read_values(TABLES[tag], found[0].attrib),
                             expected_values(tag, listen, variant))


class SchemaTest(unittest.TestCase):
    """The tables themselves, and what reads them: one process, no sockets."""

    def test_every_row_has_an_example_that_is_not_its_default(self):
        for tag, table in TABLES.items():
            self.assertEqual(len(set(row.name for row in table)), len(table), tag)
            for row in table:
                with self.subTest(tag=tag, attr=row.name):
                    self.assertIsNotNone(row.example, 'give the row an example')
                    value = pydirector.read_values([row], {row.name: row.example})[row.field]
                    self.assertNotEqual(value, row.default)
                    self.assertIsNotNone(value)

    def test_the_full_config_has_every_element(self):
        # A new element (not a new row) needs a line in full_config().
        found = set()
        for variant in VARIANTS:
            root = ElementTree.fromstring(full_config(variant=variant))
            found.update(elem.tag for elem in root.iter())
            self.assertEqual(set(tags(variant)), set(elem.tag for elem in root.iter()))
        self.assertEqual(set(TABLES), found)

    def test_every_row_is_set_in_a_full_config(self):
        for tag, table in TABLES.items():
            for row in table:
                with self.subTest(tag=tag, attr=row.name):
                    self.assertTrue(any(tag in tags(v) and (tag, row.name) not in VARIANTS[v] for v in VARIANTS))

    def test_values_survive_running_xml(self):
        for variant in VARIANTS:
            config = pydirector.parse_config(full_config(variant=variant), 'full.xml')
            xml = config.to_xml()
            check_values(self, xml, 'to_xml', variant=variant)
            master = director_xml(config)      # Actions.running_config: what the workers get
            self.assertEqual(master, xml)
            check_values(self, master, 'running.xml', variant=variant)
            worker = director_xml(pydirector.parse_config(master, 'running.xml'))
            self.assertEqual(worker, master)
            check_values(self, worker, 'a worker', variant=variant)

    def test_value_objects_hold_every_field(self):
        for variant in VARIANTS:
            config = pydirector.parse_config(full_config(variant=variant), 'full.xml')
            service = config.services[0]
            objects = {'pdconfig': config, 'service': service, 'listen': service.listens[0],
                       'group': service.groups[0], 'host': service.groups[0].hosts[0],
                       'discover': service.groups[0].discovers[0], 'check': service.check,
                       'timeouts': service.timeouts, 'clients': service.clients, 'admin': config.admin, 'user': config.admin.users[0],
                       'logging': config.logging, 'udp': service.udp}
            for tag in tags(variant):
                if tag in ('allow', 'deny', 'enable'):
                    continue
                obj = objects[tag]
                values = expected_values(tag, variant=variant)
                set_here = set(row.field for row in TABLES[tag] if (tag, row.name) not in VARIANTS[variant])
                for field, value in values.items():
                    if field not in set_here:
                        continue
                    with self.subTest(tag=tag, field=field, variant=variant):
                        self.assertEqual(getattr(obj, field), value)
                # Built from code with the same keywords, it writes the same attributes.
                self.assertEqual(type(obj)(**values).xml_attrs(), obj.xml_attrs())
            self.assertEqual(service.acl, [('allow', expected_values('allow')['cidr']),
                                           ('deny', expected_values('deny')['cidr'])])
            self.assertEqual(service.enabled, expected_values('enable')['group'])

    def test_unknown_attribute_names_the_known_ones(self):
        for variant in VARIANTS:
            self.check_unknown_attribute(variant)

    def check_unknown_attribute(self, variant):
        xml = full_config(variant=variant)
        for tag in tags(variant):
            table = TABLES[tag]
            with self.subTest(tag=tag, variant=variant):
                bad = re.sub(r'<%s ' % tag, '<%s bogus="1" ' % tag, xml, count=1)
                with self.assertRaises(pydirector.ConfigError) as cm:
                    pydirector.parse_config(bad, 'x.xml')
                line = bad[:bad.index('bogus=')].count('\n') + 1
                self.assertEqual(str(cm.exception), "x.xml:%d: <%s> has unknown attribute 'bogus' (known: %s)"
                                 % (line, tag, ', '.join(sorted(row.name for row in table))))

    def test_values_survive_save_config(self):
        for variant in VARIANTS:
            self.check_save_config(variant)

    def check_save_config(self, variant):
        # saveConfig writes running.xml over the file: every value, the password hash too.
        directory = tempfile.mkdtemp(prefix='pydirector-schema-')
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, 'full.xml')
        with open(path, 'w', encoding='utf-8') as f:
            f.write(full_config(variant=variant))
        director = pydirector.Director(pydirector.load_config(path), accept=False, resolve_names=False)
        with open(path, 'a', encoding='utf-8') as f:
            f.write('<!-- changed on disk: saveConfig needs force=1 -->\n')
        thread = threading.Thread(target=director.loop.run)
        thread.start()
        try:
            with self.assertRaises(pydirector.AdminError) as cm:
                director.save_config()
            self.assertEqual(cm.exception.status, 409)
            director.save_config(force='1')
            running = director.loop.call(director.running_xml)
        finally:
            director.loop.call_soon_threadsafe(director.loop.stop)
            thread.join(10)
            director.loop.close()
        with open(path, encoding='utf-8') as f:
            saved = f.read()
        self.assertEqual(saved, running)
        check_values(self, saved, 'saveConfig', variant=variant)
        with open(path + '.bak', encoding='utf-8') as f:
            self.assertEqual(f.read(), full_config(variant=variant) +
                             '<!-- changed on disk: saveConfig needs force=1 -->\n')

    def test_running_xml_passes_check(self):
        for variant in VARIANTS:
            self.check_running_xml(variant)

    def check_running_xml(self, variant):
        directory = tempfile.mkdtemp(prefix='pydirector-schema-')
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, 'running.xml')
        with open(path, 'w', encoding='utf-8') as f:
            f.write(director_xml(pydirector.parse_config(full_config(variant=variant), 'full.xml')))
        result = subprocess.run([sys.executable, support.PYDIRECTOR, '--check', path], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, timeout=30)
        out = result.stdout.decode('utf-8')
        self.assertEqual((result.returncode, result.stderr), (0, b''))
        self.assertTrue(out.startswith('%s: OK\n' % path), out)
        # The summary shows every attribute a file may leave out, as running.xml writes it.
        for tag in tags(variant):
            for row in TABLES[tag]:
                if row.required or tag == 'host' and row.name == 'name' or (tag, row.name) in VARIANTS[variant]:
                    continue        # names and addresses: the summary's own words
                values = expected_values(tag, variant=variant)
                text = dict(pydirector.attr_texts([row], values))[row.name]
                if (tag, row.name) == ('listen', 'sni'):    # names shown as written and as sent
                    text = pydirector.sni_text(values['sni'])
                with self.subTest(tag=tag, attr=row.name, variant=variant):
                    self.assertRegex(out, r'\b%s:? %s' % (re.escape(row.name), re.escape(text)))


@unittest.skipIf(pydirector.workers_unsupported(), 'no worker processes here')
class WorkerViewTest(BalancerCase):
    """Real worker processes get the master's running.xml and build their Director
    from it; each writes what it built (its own running.xml) before it binds."""

    workers = 2

    def test_every_value_reaches_the_workers(self):
        self.check_workers('tcp')

    def test_every_value_of_a_udp_service_reaches_the_workers(self):
        self.check_workers('udp')

    def check_workers(self, variant):
        directory = tempfile.mkdtemp(prefix='pydirector-schema-')
        self.addCleanup(shutil.rmtree, directory)
        # The real worker code, told to say what it built: Director.bind, wrapped.
        code = ('import os, sys\n'
                'sys.path.insert(0, %r)\n'
                'import pydirector\n'
                'out = sys.argv.pop(1)\n'
                'bind = pydirector.Director.bind\n'
                'def bind_and_tell(self):\n'
                '    path = os.path.join(out, "worker-%%d.xml" %% os.getpid())\n'
                '    with open(path + ".part", "w", encoding="utf-8") as f:\n'
                '        f.write(self.running_xml())\n'
                '    os.rename(path + ".part", path)\n'
                '    return bind(self)\n'
                'pydirector.Director.bind = bind_and_tell\n'
                'sys.exit(pydirector.main(sys.argv[1:]))\n' % support.REPO)
        command = [sys.executable, '-c', code, directory]
        listen = '127.0.0.1:%d' % free_port()
        with mock.patch.object(pydirector, 'worker_command', lambda: command):
            self.start(full_config(listen, variant))
        master = self.balancer.call(self.balancer.director.running_xml)
        check_values(self, master, 'the master', listen, variant)
        views = {}
        for pid in self.balancer.worker_pids():
            with open(os.path.join(directory, 'worker-%d.xml' % pid), encoding='utf-8') as f:
                views[pid] = f.read()
        self.assertEqual(len(views), 2)
        for pid, xml in views.items():
            self.assertEqual(xml, master, 'worker %d' % pid)


# ---------------------------------------------------------------------------
# A row added the table's way: <check port="N">, the probe to that port on
# the host's address (HAProxy's `port` on a server line).
# ---------------------------------------------------------------------------

HTTP_OK = b'HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok'


def answer_ok(conn, backend):
    conn.recv(65536)
    conn.sendall(HTTP_OK)


class CheckPortTest(BalancerCase):
    """The host's own port echoes (so an HTTP check there fails); its health
    answers on another port.  Probes go there, clients still go to the host."""

    def start_checked(self, check_port, fall=1):
        service = self.backend(echo, 'service')
        check = ('    <check interval="0.1" timeout="2" rise="1" fall="%d" send="GET / HTTP/1.0\\r\\n\\r\\n" '
                 'status="200-399" port="%d"/>\n' % (fall, check_port))
        balancer = self.start(service_xml([('one', service.address)], extra=check))
        return balancer, service

    def test_probes_go_to_the_check_port(self):
        health = self.backend(answer_ok, 'health')
        balancer, service = self.start_checked(health.port)
        wait_until(lambda: health.accepted >= 3, 10)          # three probes, each passed
        self.assertEqual(balancer.host('one')['state'], 'up')
        self.assertEqual(service.accepted, 0)                  # not one probe reached the host's port
        # Clients still reach the host's own port, in every worker too: the probe's
        # address (the host's, resolved) is not the check port.
        self.assertEqual(exchange(balancer.port(), b'ping'), b'ping')
        self.assertEqual(service.accepted, 1)
        self.assertEqual(balancer.snapshot()['services'][0]['check'],
                         'connect to port %d, then send GET / HTTP/1.0\\r\\n\\r\\n, '
                         'then status 200-399 on the first line' % health.port)

    def test_a_closed_check_port_takes_the_host_down(self):
        closed = free_port()
        balancer, service = self.start_checked(closed)
        wait_until(lambda: balancer.host('one')['state'] == 'down', 10)
        self.assertEqual(balancer.host('one')['reason'], 'connection refused (1 failed probes)')
        self.assertEqual(service.accepted, 0)
        LOG.wait_for('host one (%s) in web/main down: connection refused' % service.address, self.mark)


class CheckPortWorkersTest(WorkersMixin, CheckPortTest):
    pass


if __name__ == '__main__':
    unittest.main()
