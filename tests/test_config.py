"""Config tests: good files, 1.0 files, round trips, and bad files with their exact messages."""

import importlib
import ipaddress
import os
import shutil
import tempfile
import unittest
import warnings

import support  # noqa: F401  (puts the repository on sys.path, run alone too)
import pydirector
from pydirector import (
    DEFAULT_CHECK, Check, Config, ConfigError, Host, Service, Group, Listen, Logging, Timeouts,
    acl_allows, check_name, check_password, hash_password, is_legacy_hash, load_config,
    parse_address, parse_config, parse_network)


def have_crypt():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', DeprecationWarning)
            importlib.import_module('crypt')
    except ImportError:
        return False
    return True


HAVE_CRYPT = have_crypt()

# crypt.crypt('secret', 'iy') and friends, made once with glibc.
DES_SECRET = 'iya2/im3qjwhU'
MD5_SECRET = '$1$abcdefgh$cHJi5PXp/ki/ktXzqlk6I1'
SHA512_SECRET = ('$6$saltsalt$TVLlQcbpFVof5W3Yz4DTP6gRstiNuHwwTt6GLc1E5n0U0aDehy0S5knV8wiOQSpT0Y77v'
                 'wPZN.Pq.H91p5hVO1')

# A Python Director 1.0 file, as 1.0 users wrote them.
SAMPLE_1_0 = """\
<pdconfig>
  <service name="web">
    <listen ip="0.0.0.0:8080"/>           <!-- one or more; "*:8080" = all interfaces -->
    <group name="main" scheduler="leastconns">
      <host name="one" ip="10.0.0.1:80"/>
      <host name="two" ip="10.0.0.2:80"/>
    </group>
    <group name="upgrade" scheduler="roundrobin">
      <client ip="10.0.1.1:80"/>
      <client ip="10.0.1.2:80" weight="2"/>
    </group>
    <enable group="main"/>
  </service>
  <admin listen="localhost:7001">
    <user name="anthony" password="iy910VlMkG1DE" access="full"/>
  </admin>
  <logging file="pydir.log"/>
</pdconfig>
"""

EXTENDED = """\
<?xml version="1.0" encoding="UTF-8"?>
<!-- everything new since 1.0 -->
<pdconfig drain="2.5">
  <service name="web">
    <listen ip="*:8080"/>
    <listen ip="[::]:8080"/>
    <listen ip="[::1]:8081"/>
    <group name="main" scheduler="roundrobin,sticky">
      <host name="a" ip="backend.example:80" weight="3" maxconns="100"/>
      <host name="b" ip="[2001:db8::1]:8080"/>
    </group>
    <group name="spare" scheduler="hash"/>
    <check interval="1.5" timeout="0.25" rise="1" fall="5"
           send="GET / HTTP/1.0\\r\\n\\r\\n" expect="HTTP/1.0 200"/>
    <timeouts connect="0.5" idle="60"/>
  </service>
  <service name="smtp">
    <listen ip="127.0.0.1:2525"/>
    <group name="mx" scheduler="leastconns">
      <host name="mx1" ip="10.0.0.25:25"/>
    </group>
    <check expect="220 "/>
  </service>
  <admin listen="127.0.0.1:7001" certfile="/etc/pd/cert.pem" keyfile="/etc/pd/key.pem">
    <user name="ops" password="PBKDF2" access="full"/>
    <user name="watcher" password="PBKDF2" access="readonly"/>
  </admin>
</pdconfig>
"""

# Made once by hash_password('right', iterations=1000); kept fixed so the file is stable.
PBKDF2_RIGHT = 'pbkdf2_sha256$1000$xu5uu/A7NiIxNdZWjYAy3w$cdJfkueTyP3W/GvvGIK0V4GT+3lA5HUlkLjl5r4H39I'


class OneZeroTest(unittest.TestCase):
    """Python Director 1.0 files must load unchanged."""

    def load(self):
        return parse_config(SAMPLE_1_0, 'sample.xml')

    @unittest.skipUnless(HAVE_CRYPT, 'needs the crypt module')
    def test_sample_loads(self):
        config = self.load()
        self.assertEqual(config.path, 'sample.xml')
        self.assertEqual([s.name for s in config.services], ['web'])
        web = config.service('web')
        self.assertEqual([(l.text, l.host, l.port) for l in web.listens], [('0.0.0.0:8080', '0.0.0.0', 8080)])
        self.assertEqual([g.name for g in web.groups], ['main', 'upgrade'])
        self.assertEqual(web.enabled, 'main')
        main = web.group('main')
        self.assertEqual(main.scheduler, 'leastconns')
        self.assertEqual([(h.name, h.ip, h.host, h.port, h.weight, h.maxconns) for h in main.hosts],
                         [('one', '10.0.0.1:80', '10.0.0.1', 80, 1, 0),
                          ('two', '10.0.0.2:80', '10.0.0.2', 80, 1, 0)])
        self.assertEqual(main.line, 4)
        self.assertEqual(main.hosts[1].line, 6)
        self.assertIsNone(web.check)
        self.assertEqual((web.timeouts.connect, web.timeouts.idle), (3.0, 3600.0))
        self.assertEqual(config.admin.listen, 'localhost:7001')
        self.assertEqual((config.admin.host, config.admin.port), ('localhost', 7001))
        self.assertIsNone(config.admin.certfile)
        user = config.admin.users[0]
        self.assertEqual((user.name, user.password, user.access), ('anthony', 'iy910VlMkG1DE', 'full'))
        self.assertEqual(config.logging.file, 'pydir.log')
        self.assertEqual(config.drain, 10.0)
        self.assertIsNone(config.service('nope'))
        self.assertIsNone(web.group('nope'))

    @unittest.skipUnless(HAVE_CRYPT, 'needs the crypt module')
    def test_client_and_nameless_hosts(self):
        upgrade = self.load().service('web').group('upgrade')
        self.assertEqual([(h.name, h.ip, h.weight) for h in upgrade.hosts],
                         [('host.0', '10.0.1.1:80', 1), ('host.1', '10.0.1.2:80', 2)])

    @unittest.skipUnless(HAVE_CRYPT, 'needs the crypt module')
    def test_to_xml_writes_host_not_client(self):
        xml = self.load().to_xml()
        self.assertNotIn('<client', xml)
        self.assertIn('<host name="host.0" ip="10.0.1.1:80"/>', xml)
        self.assertIn('<host name="host.1" ip="10.0.1.2:80" weight="2"/>', xml)

    @unittest.skipIf(HAVE_CRYPT, 'crypt is available here')
    def test_crypt_hash_without_crypt_module(self):
        with self.assertRaises(ConfigError) as cm:
            self.load()
        self.assertEqual(str(cm.exception),
                         "sample.xml:15: user 'anthony': this is a crypt() hash, which needs the crypt "
                         "module (gone in Python 3.13); make a new one with --hash-password")

    def test_notes_are_comments(self):
        xml = ('<pdconfig><note>1.0 allowed notes</note>\n'
               '<service name="s"><note>anywhere <b>at all</b></note><listen ip="*:1"/>\n'
               '<group name="g" scheduler="random"><note/><host ip="1.2.3.4:5"/></group>'
               '</service></pdconfig>')
        config = parse_config(xml)
        self.assertEqual(config.services[0].groups[0].hosts[0].name, 'host.0')
        self.assertNotIn('note', config.to_xml())

    def test_empty_host_name_gets_default(self):
        # 1.0 tested "if not name", so name="" also got host.N.
        config = parse_config('<pdconfig><service name="s"><listen ip="*:1"/>'
                              '<group name="g" scheduler="random"><host ip="1.2.3.4:5"/>'
                              '<host name="" ip="1.2.3.4:6"/></group></service></pdconfig>')
        self.assertEqual([h.name for h in config.services[0].groups[0].hosts], ['host.0', 'host.1'])


class ExtendedTest(unittest.TestCase):

    def load(self):
        return parse_config(EXTENDED.replace('PBKDF2', PBKDF2_RIGHT), 'ext.xml')

    def test_extended_features(self):
        config = self.load()
        self.assertEqual(config.drain, 2.5)
        self.assertIsNone(config.logging.file)
        web = config.service('web')
        self.assertEqual([(l.text, l.host, l.port) for l in web.listens],
                         [('*:8080', '0.0.0.0', 8080), ('[::]:8080', '::', 8080), ('[::1]:8081', '::1', 8081)])
        self.assertEqual(web.enabled, 'main')           # no <enable>: the first group
        main = web.group('main')
        self.assertEqual(main.scheduler, 'roundrobin,sticky')
        a, b = main.hosts
        self.assertEqual((a.host, a.port, a.weight, a.maxconns), ('backend.example', 80, 3, 100))
        self.assertEqual((b.ip, b.host, b.port), ('[2001:db8::1]:8080', '2001:db8::1', 8080))
        self.assertEqual(web.group('spare').hosts, [])
        check = web.check
        self.assertEqual((check.interval, check.timeout, check.rise, check.fall), (1.5, 0.25, 1, 5))
        self.assertEqual(check.send, b'GET / HTTP/1.0\r\n\r\n')
        self.assertEqual(check.send_text, 'GET / HTTP/1.0\\r\\n\\r\\n')
        self.assertEqual(check.expect, b'HTTP/1.0 200')
        self.assertEqual(check.line, 13)
        self.assertEqual((web.timeouts.connect, web.timeouts.idle, web.timeouts.line), (0.5, 60.0, 15))
        smtp = config.service('smtp')
        self.assertEqual((smtp.check.interval, smtp.check.send, smtp.check.expect), (5.0, None, b'220 '))
        self.assertEqual((smtp.timeouts.connect, smtp.timeouts.idle), (3.0, 3600.0))
        admin = config.admin
        self.assertEqual((admin.certfile, admin.keyfile), ('/etc/pd/cert.pem', '/etc/pd/key.pem'))
        self.assertEqual([(u.name, u.access) for u in admin.users], [('ops', 'full'), ('watcher', 'readonly')])
        self.assertTrue(check_password('right', admin.user('ops').password))

    def test_round_trip(self):
        config = self.load()
        xml = config.to_xml()
        again = parse_config(xml, 'running.xml')
        self.assertEqual(again.to_xml(), xml)
        self.assertEqual(again.service('web').check.send, b'GET / HTTP/1.0\r\n\r\n')
        self.assertEqual(again.drain, 2.5)

    @unittest.skipUnless(HAVE_CRYPT, 'needs the crypt module')
    def test_round_trip_1_0(self):
        xml = parse_config(SAMPLE_1_0).to_xml()
        self.assertEqual(parse_config(xml).to_xml(), xml)

    def test_to_xml_layout(self):
        xml = ('<pdconfig><service name="s &amp; &quot;t&quot;"><listen ip="*:1"/>'
               '<group name="g" scheduler="random"><host name="h&lt;1&gt;" ip="1.2.3.4:5" maxconns="0"/>'
               '</group><group name="empty" scheduler="hash"/><enable group="empty"/>'
               '<check send="a\\tb\\x00&#9;" rise="2"/><timeouts connect="3" idle="7200"/>'
               '</service><logging/></pdconfig>')
        self.assertEqual(parse_config(xml).to_xml(), (
            '<pdconfig>\n'
            '  <service name="s &amp; &quot;t&quot;">\n'
            '    <listen ip="*:1"/>\n'
            '    <group name="g" scheduler="random">\n'
            '      <host name="h&lt;1&gt;" ip="1.2.3.4:5"/>\n'
            '    </group>\n'
            '    <group name="empty" scheduler="hash"/>\n'
            '    <enable group="empty"/>\n'
            '    <check send="a\\tb\\x00&#9;"/>\n'
            '    <timeouts idle="7200"/>\n'
            '  </service>\n'
            '</pdconfig>\n'))

    def test_defaults_not_written(self):
        xml = ('<pdconfig drain="10"><service name="s"><listen ip="*:1"/>'
               '<group name="g" scheduler="random"/><check interval="5" timeout="2" rise="2" fall="3"/>'
               '<timeouts connect="3.0" idle="3600"/></service></pdconfig>')
        out = parse_config(xml).to_xml()
        self.assertIn('<pdconfig>\n', out)
        self.assertIn('    <check/>\n', out)
        self.assertNotIn('timeouts', out)

    def test_built_from_code(self):
        # The director builds running.xml from objects it makes itself.
        host = Host(name='h', ip='[::1]:80', weight=5, maxconns=7)
        service = Service([Listen(text='*:1')], [Group([host], name='g', scheduler='random')],
                          check=Check(send=b'\x00\\hi\r\n\xff'), timeouts=Timeouts(connect=1.25, idle=3600.0),
                          name='s')
        config = Config('mem', [service])
        self.assertEqual(service.enabled, 'g')
        self.assertEqual((host.host, host.port), ('::1', 80))
        xml = config.to_xml()
        self.assertIn('<host name="h" ip="[::1]:80" weight="5" maxconns="7"/>', xml)
        self.assertIn('<check send="\\x00\\\\hi\\r\\n\\xff"/>', xml)
        self.assertIn('<timeouts connect="1.25"/>', xml)
        again = parse_config(xml)
        self.assertEqual(again.services[0].check.send, b'\x00\\hi\r\n\xff')
        self.assertEqual(again.to_xml(), xml)

    def test_changed_bytes_win_over_old_text(self):
        config = parse_config('<pdconfig><service name="s"><listen ip="*:1"/><group name="g" scheduler="random"/>'
                              '<check send="PING\\r\\n"/></service></pdconfig>')
        config.services[0].check.send = b'QUIT\n'
        self.assertIn('<check send="QUIT\\n"/>', config.to_xml())

    def test_check_escapes(self):
        cases = [
            ('\\r\\n\\t\\\\', b'\r\n\t\\'),
            ('\\x00\\x7F\\xff', b'\x00\x7f\xff'),
            ('caf\u00e9', 'caf\u00e9'.encode('utf-8')),
            ('a&#10;b', b'a\nb'),             # an XML character reference is a real newline
            ('plain', b'plain'),
        ]
        for text, expected in cases:
            with self.subTest(text=text):
                config = parse_config('<pdconfig><service name="s"><listen ip="*:1"/>'
                                      '<group name="g" scheduler="random"/>'
                                      '<check send="%s" expect="%s"/></service></pdconfig>' % (text, text))
                check = config.services[0].check
                self.assertEqual((check.send, check.expect), (expected, expected))
                xml = config.to_xml()
                self.assertEqual(parse_config(xml).services[0].check.send, expected)
                self.assertEqual(parse_config(xml).to_xml(), xml)

    def test_empty_send_means_connect_only(self):
        config = parse_config('<pdconfig><service name="s"><listen ip="*:1"/><group name="g" scheduler="random"/>'
                              '<check send="" expect=""/></service></pdconfig>')
        self.assertEqual((config.services[0].check.send, config.services[0].check.expect), (None, None))

    def test_default_check(self):
        self.assertEqual((DEFAULT_CHECK.interval, DEFAULT_CHECK.timeout, DEFAULT_CHECK.rise, DEFAULT_CHECK.fall,
                          DEFAULT_CHECK.send, DEFAULT_CHECK.expect), (5.0, 2.0, 2, 3, None, None))

    def test_str_bytes_and_encodings(self):
        body = '<pdconfig><service name="caf\u00e9"><listen ip="*:1"/><group name="g" scheduler="random"/></service></pdconfig>'
        for data in (body, body.encode('utf-8'),
                     ('<?xml version="1.0" encoding="ISO-8859-1"?>' + body).encode('latin-1')):
            with self.subTest(data=data[:45]):
                self.assertEqual(parse_config(data).services[0].name, 'caf\u00e9')

    def test_drain_zero_allowed(self):
        config = parse_config('<pdconfig drain="0"><service name="s"><listen ip="*:1"/>'
                              '<group name="g" scheduler="random"/></service></pdconfig>')
        self.assertEqual(config.drain, 0.0)
        self.assertIn('<pdconfig drain="0">', config.to_xml())


# Every issue-4 attribute at once (line numbers matter below).
ISSUE4 = """\
<pdconfig user="pydirector" group="1001">
  <service name="web" maxconns="500">
    <listen ip="127.0.0.1:8080" accept_proxy="any" trusted="127.0.0.0/8, ::1,10.1.2.3/16"/>
    <listen ip="127.0.0.1:8081" accept_proxy="v1"/>
    <listen ip="[::1]:8080"/>
    <allow cidr="10.0.0.1"/>
    <deny cidr="10.0.0.0/8"/>
    <group name="main" scheduler="roundrobin">
      <host name="one" ip="10.0.0.1:80" send_proxy="v2"/>
      <host name="two" ip="10.0.0.2:80" send_proxy="v1"/>
      <host name="three" ip="10.0.0.3:80"/>
    </group>
    <allow cidr="2001:DB8::/32"/>
    <timeouts queue="0.5"/>
  </service>
  <service name="plain">
    <listen ip="127.0.0.1:9090"/>
    <group name="g" scheduler="random"/>
  </service>
  <logging file="pd.log" access="off" syslog="/dev/log" facility="local3"/>
</pdconfig>
"""


def state(value):
    """An object's attributes, recursively, minus line numbers (which
    to_xml does not keep): what "equal configs" means here."""
    if isinstance(value, (list, tuple)):
        return [state(item) for item in value]
    if hasattr(value, '__dict__'):
        return {key: state(item) for key, item in vars(value).items() if key != 'line'}
    return value


def net(text):
    return ipaddress.ip_network(text)


class Issue4ConfigTest(unittest.TestCase):
    """user/group, service maxconns, allow/deny, PROXY protocol, queue timeout, syslog."""

    def load(self):
        return parse_config(ISSUE4, 'i4.xml')

    def test_values(self):
        config = self.load()
        self.assertEqual((config.user, config.group), ('pydirector', '1001'))
        web = config.service('web')
        self.assertEqual(web.maxconns, 500)
        self.assertEqual(web.acl, [('allow', net('10.0.0.1/32')), ('deny', net('10.0.0.0/8')),
                                   ('allow', net('2001:db8::/32'))])
        a, b, c = web.listens
        self.assertEqual((a.accept_proxy, a.trusted),
                         ('any', [net('127.0.0.0/8'), net('::1/128'), net('10.1.0.0/16')]))
        self.assertEqual((b.accept_proxy, b.trusted), ('v1', []))
        self.assertEqual((c.accept_proxy, c.trusted), (None, []))
        self.assertEqual([h.send_proxy for h in web.group('main').hosts], ['v2', 'v1', None])
        self.assertEqual((web.timeouts.queue, web.timeouts.connect, web.timeouts.line), (0.5, 3.0, 14))
        plain = config.service('plain')
        self.assertEqual((plain.maxconns, plain.acl, plain.timeouts.queue), (0, [], 5.0))
        log = config.logging
        self.assertEqual((log.file, log.access, log.syslog, log.syslog_address, log.facility, log.line),
                         ('pd.log', False, '/dev/log', '/dev/log', 'local3', 20))

    def test_defaults(self):
        config = parse_config('<pdconfig><service name="s"><listen ip="*:1"/>'
                              '<group name="g" scheduler="random"><host ip="1.2.3.4:5"/></group>'
                              '</service></pdconfig>')
        self.assertEqual((config.user, config.group), (None, None))
        service = config.services[0]
        self.assertEqual((service.maxconns, service.acl, service.timeouts.queue), (0, [], 5.0))
        self.assertEqual((service.listens[0].accept_proxy, service.listens[0].trusted), (None, []))
        self.assertIsNone(service.groups[0].hosts[0].send_proxy)
        log = config.logging
        self.assertEqual((log.file, log.access, log.syslog, log.syslog_address, log.facility),
                         (None, True, None, None, 'daemon'))

    def test_round_trip(self):
        config = self.load()
        xml = config.to_xml()
        again = parse_config(xml, 'running.xml')
        self.assertEqual(again.to_xml(), xml)
        self.assertEqual(state(again), dict(state(config), path='running.xml'))

    def test_to_xml_layout(self):
        # Networks as ipaddress writes them, host bits gone; all rules after
        # the listens, still in file order.
        self.assertEqual(self.load().to_xml(), (
            '<pdconfig user="pydirector" group="1001">\n'
            '  <service name="web" maxconns="500">\n'
            '    <listen ip="127.0.0.1:8080" accept_proxy="any" trusted="127.0.0.0/8,::1,10.1.0.0/16"/>\n'
            '    <listen ip="127.0.0.1:8081" accept_proxy="v1"/>\n'
            '    <listen ip="[::1]:8080"/>\n'
            '    <allow cidr="10.0.0.1"/>\n'
            '    <deny cidr="10.0.0.0/8"/>\n'
            '    <allow cidr="2001:db8::/32"/>\n'
            '    <group name="main" scheduler="roundrobin">\n'
            '      <host name="one" ip="10.0.0.1:80" send_proxy="v2"/>\n'
            '      <host name="two" ip="10.0.0.2:80" send_proxy="v1"/>\n'
            '      <host name="three" ip="10.0.0.3:80"/>\n'
            '    </group>\n'
            '    <enable group="main"/>\n'
            '    <timeouts queue="0.5"/>\n'
            '  </service>\n'
            '  <service name="plain">\n'
            '    <listen ip="127.0.0.1:9090"/>\n'
            '    <group name="g" scheduler="random"/>\n'
            '    <enable group="g"/>\n'
            '  </service>\n'
            '  <logging file="pd.log" access="off" syslog="/dev/log" facility="local3"/>\n'
            '</pdconfig>\n'))

    def test_defaults_not_written(self):
        xml = ('<pdconfig><service name="s" maxconns="0"><listen ip="*:1"/>'
               '<group name="g" scheduler="random"/><timeouts queue="5.0"/></service>'
               '<logging access="on"/></pdconfig>')
        out = parse_config(xml).to_xml()
        self.assertEqual(out, '<pdconfig>\n  <service name="s">\n    <listen ip="*:1"/>\n'
                              '    <group name="g" scheduler="random"/>\n    <enable group="g"/>\n'
                              '  </service>\n</pdconfig>\n')
        xml = ('<pdconfig><service name="s"><listen ip="*:1"/><group name="g" scheduler="random"/>'
               '</service><logging syslog="/dev/log" facility="daemon"/></pdconfig>')
        self.assertIn('\n  <logging syslog="/dev/log"/>\n', parse_config(xml).to_xml())

    def test_syslog_addresses(self):
        cases = [
            ('/dev/log', '/dev/log'),
            ('/var/run/syslog', '/var/run/syslog'),
            ('loghost:514', ('loghost', 514)),
            ('192.0.2.9:1514', ('192.0.2.9', 1514)),
            ('[::1]:514', ('::1', 514)),
        ]
        for text, address in cases:
            with self.subTest(text=text):
                config = parse_config('<pdconfig><service name="s"><listen ip="*:1"/>'
                                      '<group name="g" scheduler="random"/></service>'
                                      '<logging syslog="%s"/></pdconfig>' % text)
                self.assertEqual((config.logging.syslog, config.logging.syslog_address), (text, address))
                self.assertIn('<logging syslog="%s"/>' % text, config.to_xml())

    def test_accounts(self):
        for text in ('pd', '_pd', 'www-data', 'svc.pd', 'MACHINE$', '0', '65534', '4294967294'):
            with self.subTest(text=text):
                config = parse_config('<pdconfig user="%s" group="%s"><service name="s"><listen ip="*:1"/>'
                                      '<group name="g" scheduler="random"/></service></pdconfig>' % (text, text))
                self.assertEqual((config.user, config.group), (text, text))
                self.assertIn('<pdconfig user="%s" group="%s">' % (text, text), config.to_xml())

    def test_built_from_code(self):
        # Keywords from the tables, with their defaults for what is not given.
        host = Host(name='h', ip='10.0.0.1:80', weight=1, maxconns=0)
        service = Service([Listen(text='*:1')], [Group([host], name='g', scheduler='random')], 'g', None,
                          Timeouts(connect=3.0, idle=3600.0), name='s')
        config = Config('mem', [service], logging=Logging(file='x.log'), drain=10.0)
        self.assertEqual((host.send_proxy, service.maxconns, service.acl, service.timeouts.queue),
                         (None, 0, [], 5.0))
        self.assertEqual((config.user, config.group, config.logging.access, config.logging.facility),
                         (None, None, True, 'daemon'))
        before = config.to_xml()
        self.assertNotIn('proxy', before)
        # ... and the new keywords are written out.
        host.send_proxy = 'v1'
        service.maxconns = 3
        service.acl = [('deny', net('192.0.2.0/24'))]
        service.listens[0] = Listen(text='*:1', accept_proxy='v2', trusted=[net('::1/128')])
        service.timeouts = Timeouts(queue=30)
        config = Config('mem', [service], logging=Logging(syslog='log:514', access=False), user='u', group='g')
        xml = config.to_xml()
        for text in ('<pdconfig user="u" group="g">', '<service name="s" maxconns="3">',
                     '<listen ip="*:1" accept_proxy="v2" trusted="::1"/>', '<deny cidr="192.0.2.0/24"/>',
                     '<host name="h" ip="10.0.0.1:80" send_proxy="v1"/>', '<timeouts queue="30"/>',
                     '<logging access="off" syslog="log:514"/>'):
            self.assertIn(text, xml)
        self.assertEqual(config.logging.syslog_address, ('log', 514))
        self.assertEqual(parse_config(xml).to_xml(), xml)

    def test_service_allows(self):
        web = self.load().service('web')
        self.assertTrue(web.allows('10.0.0.1'))
        self.assertFalse(web.allows('10.0.0.2'))
        self.assertTrue(web.allows('2001:db8::5'))
        self.assertFalse(web.allows('192.0.2.1'))       # there are allow rules: a whitelist
        self.assertTrue(self.load().service('plain').allows('192.0.2.1'))


class AclTest(unittest.TestCase):

    def rules(self, *pairs):
        return [(action, parse_network(text)) for action, text in pairs]

    def check(self, rules, cases):
        for ip, expected in cases:
            with self.subTest(ip=ip):
                self.assertIs(acl_allows(rules, ip), expected)

    def test_ipv4(self):
        self.check(self.rules(('allow', '10.0.0.0/8')),
                   [('10.1.2.3', True), ('10.255.255.255', True), ('11.0.0.1', False)])

    def test_ipv6(self):
        self.check(self.rules(('deny', '2001:db8::/32')),
                   [('2001:db8::1', False), ('2001:0DB8:0::9', False), ('2001:db9::1', True), ('::1', True),
                    ('10.0.0.1', True)])

    def test_ipv4_mapped(self):
        self.check(self.rules(('allow', '10.0.0.0/8')),
                   [('::ffff:10.0.0.1', True), ('::ffff:a00:2', True), ('::ffff:11.0.0.1', False)])
        self.check(self.rules(('deny', '10.0.0.0/8')), [('::ffff:10.0.0.1', False), ('::ffff:11.0.0.1', True)])

    def test_other_version_never_matches(self):
        self.check(self.rules(('deny', '0.0.0.0/0')), [('::1', True), ('127.0.0.1', False)])
        self.check(self.rules(('allow', '0.0.0.0/0')), [('::1', False), ('127.0.0.1', True)])
        self.check(self.rules(('deny', '::/0')), [('::1', False), ('127.0.0.1', True)])

    def test_first_match_wins(self):
        self.check(self.rules(('allow', '10.0.0.1'), ('deny', '10.0.0.0/8')),
                   [('10.0.0.1', True), ('10.0.0.2', False), ('192.0.2.1', False)])
        self.check(self.rules(('deny', '10.0.0.0/8'), ('allow', '10.0.0.1')),
                   [('10.0.0.1', False), ('10.0.0.2', False), ('192.0.2.1', False)])
        self.check(self.rules(('deny', '10.0.0.1'), ('allow', '0.0.0.0/0'), ('allow', '::/0')),
                   [('10.0.0.1', False), ('10.0.0.2', True), ('::1', True)])

    def test_allow_only_is_a_whitelist(self):
        self.check(self.rules(('allow', '127.0.0.0/8'), ('allow', '::1')),
                   [('127.0.0.1', True), ('::1', True), ('::2', False), ('192.0.2.1', False)])

    def test_deny_only_is_a_blacklist(self):
        self.check(self.rules(('deny', '192.0.2.0/24'), ('deny', 'fe80::/10')),
                   [('192.0.2.7', False), ('fe80::1', False), ('fe80::1%eth0', False),
                    ('198.51.100.1', True), ('::1', True)])

    def test_no_rules(self):
        self.check([], [('192.0.2.1', True), ('::1', True)])

    def test_garbage_refused(self):
        garbage = ['', 'x', 'localhost', '10.0.0.256', '010.0.0.1', '10.0.0', ' 10.0.0.1', '10.0.0.1 ',
                   '10.0.0.1%eth0', '10.0.0.1:80', '[::1]', '::1::2', '1', None, 10, b'10.0.0.1']
        for rules in ([], self.rules(('deny', '192.0.2.0/24')), self.rules(('allow', '0.0.0.0/0'))):
            self.check(rules, [(ip, False) for ip in garbage])

    def test_address_objects(self):
        rules = self.rules(('allow', '10.0.0.0/8'))
        self.check(rules, [(ipaddress.ip_address('10.0.0.1'), True), (ipaddress.ip_address('::1'), False),
                           (ipaddress.ip_address('::ffff:10.0.0.1'), True)])

    def test_parse_network(self):
        cases = [
            ('10.0.0.0/8', '10.0.0.0/8'),
            ('10.1.2.3/8', '10.0.0.0/8'),           # host bits masked off
            ('10.0.0.1', '10.0.0.1/32'),
            ('0.0.0.0/0', '0.0.0.0/0'),
            ('2001:DB8::1/32', '2001:db8::/32'),
            ('::1', '::1/128'),
            ('::ffff:10.0.0.0/104', '::ffff:a00:0/104'),
        ]
        for text, expected in cases:
            with self.subTest(text=text):
                self.assertEqual(parse_network(text), ipaddress.ip_network(expected))
        for text in ('', '/8', '10.0.0.0/', '10.0.0.0/33', '10.0.0.0/08', '10.0.0.0/255.0.0.0',
                     '010.0.0.0/8', '10.0.0', '1', 'fe80::1%eth0/64', '::/129', 'host/8', ' 10.0.0.0/8'):
            with self.subTest(text=text):
                with self.assertRaises(ValueError) as cm:
                    parse_network(text)
                self.assertEqual(str(cm.exception),
                                 '%r is not an IP network (like 10.0.0.0/8, 2001:db8::/32 or 127.0.0.1)' % text)


class LoadConfigTest(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)

    def test_load_file(self):
        path = os.path.join(self.dir, 'pd.xml')
        with open(path, 'w') as f:
            f.write('<pdconfig>\n<service name="s">\n<listen ip="*:1"/>\n'
                    '<group name="g" scheduler="random"/>\n</service>\n</pdconfig>\n')
        config = load_config(path)
        self.assertEqual(config.path, path)
        self.assertEqual(config.services[0].line, 2)

    def test_missing_file(self):
        path = os.path.join(self.dir, 'x.xml')
        with self.assertRaises(ConfigError) as cm:
            load_config(path)
        self.assertEqual(str(cm.exception), path + ': cannot read config: No such file or directory')
        self.assertEqual((cm.exception.path, cm.exception.line), (path, None))

    def test_directory(self):
        with self.assertRaises(ConfigError) as cm:
            load_config(self.dir)
        self.assertEqual(str(cm.exception), self.dir + ': not a regular file')

    def test_error_names_file_as_given(self):
        path = os.path.join(self.dir, 'bad.xml')
        with open(path, 'w') as f:
            f.write('<pdconfig>\n<servce/>\n</pdconfig>\n')
        with self.assertRaises(ConfigError) as cm:
            load_config(path)
        self.assertEqual(str(cm.exception),
                         path + ':2: unknown element <servce> in <pdconfig> (expected: admin, logging, service)')
        self.assertEqual((cm.exception.line, cm.exception.message),
                         (2, 'unknown element <servce> in <pdconfig> (expected: admin, logging, service)'))


# Lines 1-3 of most bad files below; the next element is on line 4.
HEAD = '<pdconfig>\n<service name="web">\n<listen ip="127.0.0.1:8080"/>\n'
GROUP = '<group name="main" scheduler="roundrobin">\n<host name="one" ip="10.0.0.1:80"/>\n</group>\n'
TAIL = '</service>\n</pdconfig>\n'
ADMIN = '<admin listen="127.0.0.1:7001">\n'
USER = '<user name="ops" password="%s" access="full"/>\n' % PBKDF2_RIGHT


def listen(ip):
    return '<pdconfig>\n<service name="web">\n<listen ip="%s"/>\n' % ip + GROUP + TAIL


def host(attrs):
    return HEAD + '<group name="main" scheduler="roundrobin">\n<host %s/>\n</group>\n' % attrs + TAIL


def check(attrs):
    return HEAD + GROUP + '<check %s/>\n' % attrs + TAIL


def listen_with(attrs):
    return '<pdconfig>\n<service name="web">\n<listen ip="127.0.0.1:8080" %s/>\n' % attrs + GROUP + TAIL


def logging_with(attrs):
    return HEAD + GROUP + '</service>\n<logging %s/>\n</pdconfig>\n' % attrs


NOT_A_NETWORK = 'is not an IP network (like 10.0.0.0/8, 2001:db8::/32 or 127.0.0.1)'


BAD = [
    # XML itself
    # An element never closed is named where it starts, not where expat noticed (issue 27).
    ('<pdconfig>\n<service>\n</pdconfig>',
     'x.xml:2: XML error: <service> started here is not closed (expat noticed at line 3: mismatched tag </pdconfig>)'),
    (HEAD + '<group name="main" scheduler="roundrobin">\n<host name="one" ip="10.0.0.1:80"/>\n'
     '<host name="two" ip="10.0.0.2:80">\n<host name="three" ip="10.0.0.3:80"/>\n</group>\n' + TAIL,
     'x.xml:6: XML error: <host> started here is not closed (expat noticed at line 8: mismatched tag </group>)'),
    (HEAD + '<group name="main" scheduler="roundrobin">\n<host name="one"\n ip="10.0.0.1:80"\n'
     '<host name="two" ip="10.0.0.2:80"/>\n</group>\n' + TAIL,
     'x.xml:5: XML error: the tag <host> started here is broken '
     '(expat noticed at line 7: not well-formed (invalid token))'),
    (HEAD + '<group name="main" scheduler="roundrobin">\n<host name="one" ip="10.0.0.1:80"/>\n',
     'x.xml:4: XML error: <group> started here is not closed (the file ends at line 6)'),
    (b'<pdconfig>\n\xff\xfe</pdconfig>', 'x.xml:2: XML error: not well-formed (invalid token)'),
    ('', 'x.xml:1: XML error: no element found'),
    ('<?xml version="1.0"?>\n<!DOCTYPE pdconfig [\n<!ENTITY lol "lol">\n]>\n<pdconfig/>',
     'x.xml:2: DOCTYPE/ENTITY declarations are not allowed'),
    ('<!DOCTYPE pdconfig SYSTEM "http://example.invalid/pd.dtd">\n<pdconfig/>',
     'x.xml:1: DOCTYPE/ENTITY declarations are not allowed'),
    ('<pdconfig>\n<service name="&lol;"/>\n</pdconfig>', 'x.xml:2: XML error: undefined entity'),
    (HEAD + '<group name="main" scheduler="random">\n  hello\n</group>\n' + TAIL,
     "x.xml:5: unexpected text 'hello' in <group>"),
    # structure
    ('<config>\n</config>', 'x.xml:1: the root element must be <pdconfig>, not <config>'),
    ('<pdconfig>\n</pdconfig>', 'x.xml:1: <pdconfig> has no <service>'),
    ('<pdconfig bogus="1">\n</pdconfig>', "x.xml:1: <pdconfig> has unknown attribute 'bogus' (known: drain, group, upgrade_timeout, user, worker_timeout, workers)"),
    (HEAD + '<group name="main" scheduler="roundrobin">\n<hots ip="10.0.0.1:80"/>\n</group>\n' + TAIL,
     'x.xml:5: unknown element <hots> in <group> (expected: discover, host)'),
    (HEAD + '<grup name="main"/>\n' + TAIL,
     'x.xml:4: unknown element <grup> in <service> (expected: allow, check, clients, deny, enable, group, listen, timeouts, udp)'),
    (HEAD + '<group name="main" scheduler="roundrobin">\n<host ip="10.0.0.1:80"><x/></host>\n</group>\n' + TAIL,
     'x.xml:5: unknown element <x> in <host> (expected: none)'),
    ('<pdconfig>\n<service name="web">\n' + GROUP + TAIL, "x.xml:2: service 'web' has no <listen>"),
    (HEAD + TAIL, "x.xml:2: service 'web' has no <group>"),
    ('<pdconfig>\n<service>\n</service>\n</pdconfig>', "x.xml:2: <service> needs attribute 'name'"),
    # services, groups, hosts
    (HEAD + '<group name="main" scheduler="leastconn"/>\n' + TAIL,
     "x.xml:4: group 'main': unknown scheduler 'leastconn' "
     "(known: hash, leastconns, leastconnsrr, random, roundrobin)"),
    (HEAD + '<group name="main"/>\n' + TAIL, "x.xml:4: <group> needs attribute 'scheduler'"),
    (host('name="one" ip="10.0.0.1:80" wieght="2"'),
     "x.xml:5: <host> has unknown attribute 'wieght' (known: backup, ip, maxconns, name, send_proxy, weight)"),
    (HEAD + '<group name="main" scheduler="roundrobin">\n<client name="one" colour="red" ip="10.0.0.1:80"/>\n'
     '</group>\n' + TAIL,
     "x.xml:5: <client> has unknown attribute 'colour' (known: backup, ip, maxconns, name, send_proxy, weight)"),
    (host('name="one"'), "x.xml:5: <host> needs attribute 'ip'"),
    (HEAD + GROUP + '<group name="main" scheduler="random"/>\n' + TAIL,
     "x.xml:7: service 'web': duplicate group 'main'"),
    (HEAD + '<group name="main" scheduler="roundrobin">\n<host name="one" ip="10.0.0.1:80"/>\n'
     '<host name="one" ip="10.0.0.2:80"/>\n</group>\n' + TAIL,
     "x.xml:6: group 'main': duplicate host 'one'"),
    (HEAD + '<group name="main" scheduler="roundrobin">\n<host name="one" ip="10.0.0.1:80"/>\n'
     '<host name="two" ip="10.0.0.1:80"/>\n</group>\n' + TAIL,
     "x.xml:6: group 'main': hosts 'one' and 'two' have the same ip '10.0.0.1:80'"),
    (HEAD + GROUP + TAIL.replace('</pdconfig>\n', '') + '<service name="web">\n</service>\n</pdconfig>',
     "x.xml:8: duplicate service 'web'"),
    (HEAD + GROUP + '</service>\n<service name="b">\n<listen ip="127.0.0.1:8080"/>\n' + GROUP + TAIL,
     "x.xml:9: listen '127.0.0.1:8080' is already used by service 'web'"),
    (HEAD + '<listen ip="*:9000"/>\n<listen ip="0.0.0.0:9000"/>\n' + GROUP + TAIL,
     "x.xml:5: listen '0.0.0.0:9000' is already used by service 'web'"),
    (HEAD + GROUP + '<enable group="mian"/>\n' + TAIL, "x.xml:7: service 'web': <enable> names unknown group 'mian'"),
    (HEAD + GROUP + '<enable group="main"/>\n<enable group="main"/>\n' + TAIL,
     "x.xml:8: service 'web': more than one <enable>"),
    (HEAD + GROUP + '<enable/>\n' + TAIL, "x.xml:7: <enable> needs attribute 'group'"),
    # names
    ('<pdconfig>\n<service name="a&#10;b">\n</service>\n</pdconfig>',
     "x.xml:2: service name 'a\\nb' contains a control character"),
    ('<pdconfig>\n<service name="">\n</service>\n</pdconfig>', 'x.xml:2: service name is empty'),
    (HEAD + '<group name="   " scheduler="random"/>\n' + TAIL, "x.xml:4: group name '   ' is only whitespace"),
    (host('name="a&#9;b" ip="10.0.0.1:80"'), "x.xml:5: host name 'a\\tb' contains a control character"),
    (host('name="x\u202ey" ip="10.0.0.1:80"'), "x.xml:5: host name 'x\\u202ey' contains a control character"),
    # addresses
    (listen('127.0.0.1:0'), "x.xml:3: <listen> ip '127.0.0.1:0': port must be 1-65535"),
    (listen('127.0.0.1:65536'), "x.xml:3: <listen> ip '127.0.0.1:65536': port must be 1-65535"),
    (listen('127.0.0.1:http'), "x.xml:3: <listen> ip '127.0.0.1:http': port must be 1-65535"),
    (listen('127.0.0.1'), "x.xml:3: <listen> ip '127.0.0.1' needs host:port"),
    (listen(':8080'), "x.xml:3: <listen> ip ':8080' needs host:port"),
    (listen('127.0.0.1:'), "x.xml:3: <listen> ip '127.0.0.1:' needs host:port"),
    (listen('::1:8080'), "x.xml:3: <listen> ip '::1:8080': IPv6 addresses need brackets, like '[::1]:80'"),
    (listen('[10.0.0.1]:80'), "x.xml:3: <listen> ip '[10.0.0.1]:80': '10.0.0.1' is not an IPv6 address"),
    (listen('10.0.0.300:80'), "x.xml:3: <listen> ip '10.0.0.300:80': '10.0.0.300' is not an IP address"),
    (listen('bad host:80'), "x.xml:3: <listen> ip 'bad host:80': 'bad host' is not a host name or IP address"),
    (host('ip="*:80"'), "x.xml:5: <host> ip '*:80': '*' is for listening; a host needs an address"),
    (host('ip="10.0.0.1:-1"'), "x.xml:5: <host> ip '10.0.0.1:-1': port must be 1-65535"),
    # numbers
    (host('ip="10.0.0.1:80" weight="0"'), "x.xml:5: <host> weight '0': must be an integer 1-1000"),
    (host('ip="10.0.0.1:80" weight="1001"'), "x.xml:5: <host> weight '1001': must be an integer 1-1000"),
    (host('ip="10.0.0.1:80" weight="2.5"'), "x.xml:5: <host> weight '2.5': must be an integer 1-1000"),
    (host('ip="10.0.0.1:80" maxconns="-1"'), "x.xml:5: <host> maxconns '-1': must be an integer >= 0"),
    (check('interval="0"'), "x.xml:7: <check> interval '0': must be a number of seconds > 0 and <= 86400"),
    (check('timeout="86401"'), "x.xml:7: <check> timeout '86401': must be a number of seconds > 0 and <= 86400"),
    (check('interval="nan"'), "x.xml:7: <check> interval 'nan': must be a number of seconds > 0 and <= 86400"),
    (check('rise="x"'), "x.xml:7: <check> rise 'x': must be an integer 1-100"),
    (check('fall="101"'), "x.xml:7: <check> fall '101': must be an integer 1-100"),
    (check('on_down="kill"'), "x.xml:7: <check> on_down 'kill': must be 'keep' or 'close'"),
    (check('send="GET \\q"'), "x.xml:7: <check> send: unknown escape '\\q' (use \\r \\n \\t \\\\ or \\xNN)"),
    (check('expect="\\x4"'), "x.xml:7: <check> expect: unknown escape '\\x4' (use \\r \\n \\t \\\\ or \\xNN)"),
    (check('send="abc\\"'), "x.xml:7: <check> send: ends with a lone '\\' (write \\\\ for a backslash)"),
    (check('prot="80"'),
     "x.xml:7: <check> has unknown attribute 'prot' "
     "(known: dns, expect, fall, interval, on_down, port, rise, send, slowstart, status, timeout)"),
    (check('port="0"'), "x.xml:7: <check> port '0': must be an integer 1-65535"),
    (check('port="http"'), "x.xml:7: <check> port 'http': must be an integer 1-65535"),
    (HEAD + GROUP + '<check/>\n<check/>\n' + TAIL, "x.xml:8: service 'web': more than one <check>"),
    (HEAD + GROUP + '<timeouts connect="abc"/>\n' + TAIL,
     "x.xml:7: <timeouts> connect 'abc': must be a number of seconds > 0 and <= 86400"),
    (HEAD + GROUP + '<timeouts idle="100000"/>\n' + TAIL,
     "x.xml:7: <timeouts> idle '100000': must be a number of seconds > 0 and <= 86400"),
    (HEAD + GROUP + '<timeouts/>\n<timeouts/>\n' + TAIL, "x.xml:8: service 'web': more than one <timeouts>"),
    ('<pdconfig drain="-1">\n</pdconfig>',
     "x.xml:1: <pdconfig> drain '-1': must be a number of seconds >= 0 and <= 86400"),
    # admin, users, logging
    (HEAD + GROUP + '</service>\n' + ADMIN + USER + '</admin>\n' + ADMIN + USER + '</admin>\n</pdconfig>',
     'x.xml:11: more than one <admin>'),
    (HEAD + GROUP + '</service>\n' + ADMIN + '</admin>\n</pdconfig>', 'x.xml:8: <admin> has no <user>'),
    (HEAD + GROUP + '</service>\n<admin>\n' + USER + '</admin>\n</pdconfig>',
     "x.xml:8: <admin> needs attribute 'listen'"),
    (HEAD + GROUP + '</service>\n<admin listen="127.0.0.1:8080">\n' + USER + '</admin>\n</pdconfig>',
     "x.xml:8: listen '127.0.0.1:8080' is already used by service 'web'"),
    (HEAD + GROUP + '</service>\n<admin listen="localhost">\n' + USER + '</admin>\n</pdconfig>',
     "x.xml:8: <admin> listen 'localhost' needs host:port"),
    (HEAD + GROUP + '</service>\n<admin listen="127.0.0.1:7001" certfile="c.pem">\n' + USER + '</admin>\n</pdconfig>',
     'x.xml:8: <admin> needs both certfile and keyfile, or neither'),
    (HEAD + GROUP + '</service>\n<admin listen="127.0.0.1:7001" secure="yes">\n' + USER + '</admin>\n</pdconfig>',
     'x.xml:8: <admin secure=...> is no longer supported; use certfile=... keyfile=... for HTTPS'),
    (HEAD + GROUP + '</service>\n' + ADMIN + '<user name="ops" password="%s" access="admin"/>\n' % PBKDF2_RIGHT
     + '</admin>\n</pdconfig>', "x.xml:9: user 'ops': access must be 'full' or 'readonly', not 'admin'"),
    (HEAD + GROUP + '</service>\n' + ADMIN + '<user name="ops" access="full"/>\n</admin>\n</pdconfig>',
     "x.xml:9: <user> needs attribute 'password'"),
    (HEAD + GROUP + '</service>\n' + ADMIN + '<user name="ops" password="secret" access="full"/>\n'
     '</admin>\n</pdconfig>',
     "x.xml:9: user 'ops': password must be a hash; make one with: python3 pydirector.py --hash-password"),
    (HEAD + GROUP + '</service>\n' + ADMIN + '<user name="ops" password="pbkdf2_sha256$0$abcd$abcd" access="full"/>\n'
     '</admin>\n</pdconfig>',
     "x.xml:9: user 'ops': password must be a hash; make one with: python3 pydirector.py --hash-password"),
    (HEAD + GROUP + '</service>\n' + ADMIN + USER + USER + '</admin>\n</pdconfig>', "x.xml:10: duplicate user 'ops'"),
    (HEAD + GROUP + '</service>\n' + ADMIN + '<user name="" password="x" access="full"/>\n</admin>\n</pdconfig>',
     'x.xml:9: user name is empty'),
    (HEAD + GROUP + '</service>\n<logging/>\n<logging/>\n</pdconfig>', 'x.xml:9: more than one <logging>'),
    (HEAD + GROUP + '</service>\n<logging level="debug"/>\n</pdconfig>',
     "x.xml:8: <logging> has unknown attribute 'level' (known: access, facility, file, syslog)"),
    # issue 4
    ('<pdconfig user="py director">\n</pdconfig>',
     "x.xml:1: <pdconfig> user 'py director': must be a user name or a numeric id"),
    ('<pdconfig group="4294967295">\n</pdconfig>',
     "x.xml:1: <pdconfig> group '4294967295': must be a group name or a numeric id"),
    ('<pdconfig user="pd" group="a&#10;b">\n</pdconfig>',
     "x.xml:1: <pdconfig> group 'a\\nb': must be a group name or a numeric id"),
    ('<pdconfig user="">\n</pdconfig>', "x.xml:1: <pdconfig> user '': must be a user name or a numeric id"),
    (HEAD.replace('"web"', '"web" maxconns="-1"') + GROUP + TAIL,
     "x.xml:2: <service> maxconns '-1': must be an integer >= 0"),
    (HEAD + GROUP + '<timeouts queue="0"/>\n' + TAIL,
     "x.xml:7: <timeouts> queue '0': must be a number of seconds > 0 and <= 86400"),
    (HEAD + '<allow cidr="10.0.0.0/33"/>\n' + GROUP + TAIL, "x.xml:4: <allow> cidr '10.0.0.0/33' " + NOT_A_NETWORK),
    (HEAD + GROUP + '<deny cidr="010.0.0.0/8"/>\n' + TAIL, "x.xml:7: <deny> cidr '010.0.0.0/8' " + NOT_A_NETWORK),
    (HEAD + '<deny/>\n' + GROUP + TAIL, "x.xml:4: <deny> needs attribute 'cidr'"),
    (HEAD + '<allow cidr="::1" ip="::1"/>\n' + GROUP + TAIL, "x.xml:4: <allow> has unknown attribute 'ip' (known: cidr)"),
    (host('ip="10.0.0.1:80" send_proxy="v3"'), "x.xml:5: <host> send_proxy 'v3': must be 'v1' or 'v2'"),
    (host('ip="10.0.0.1:80" send_proxy=""'), "x.xml:5: <host> send_proxy '': must be 'v1' or 'v2'"),
    (listen_with('accept_proxy="yes"'), "x.xml:3: <listen> accept_proxy 'yes': must be 'v1', 'v2' or 'any'"),
    (listen_with('trusted="127.0.0.1"'), 'x.xml:3: <listen> trusted is only used with accept_proxy'),
    (listen_with('accept_proxy="v1" trusted="127.0.0.1,,::1"'), "x.xml:3: <listen> trusted '' " + NOT_A_NETWORK),
    (listen_with('accept_proxy="v2" trusted="localhost"'), "x.xml:3: <listen> trusted 'localhost' " + NOT_A_NETWORK),
    (listen_with('proxy="v1"'), "x.xml:3: <listen> has unknown attribute 'proxy' (known: accept_proxy, ip, sni, trusted)"),
    (logging_with('access="yes"'), "x.xml:8: <logging> access 'yes': must be 'on' or 'off'"),
    (logging_with('syslog="loghost"'),
     "x.xml:8: <logging> syslog 'loghost': must be a socket path starting with '/', or host:port"),
    (logging_with('syslog="*:514"'),
     "x.xml:8: <logging> syslog '*:514': must be a socket path starting with '/', or host:port"),
    (logging_with('syslog="/dev/log" facility="dæmon"'),
     "x.xml:8: <logging> facility 'dæmon': not a syslog facility (like daemon, user or local0-local7)"),
    (logging_with('facility="local0"'), 'x.xml:8: <logging> facility is only used with syslog'),
]


class BadConfigTest(unittest.TestCase):

    def test_bad_configs(self):
        self.assertGreaterEqual(len(BAD), 25)
        for xml, message in BAD:
            with self.subTest(message=message):
                with self.assertRaises(ConfigError) as cm:
                    parse_config(xml, 'x.xml')
                self.assertEqual(str(cm.exception), message)

    def test_messages_are_distinct(self):
        # Each bad file tests something the others do not.
        self.assertEqual(len(set(m for _, m in BAD)), len(BAD) - 1)   # two wrong-hash cases share one

    def test_line_of_multiline_start_tag(self):
        with self.assertRaises(ConfigError) as cm:
            parse_config(HEAD + '<group\n  name="main"\n  scheduler="nope"/>\n' + TAIL, 'x.xml')
        self.assertEqual(cm.exception.line, 4)

    def test_default_path(self):
        with self.assertRaises(ConfigError) as cm:
            parse_config('<x/>')
        self.assertEqual(str(cm.exception), '<config>:1: the root element must be <pdconfig>, not <x>')


def shared(*listens, **kw):
    """Services a, b, c... each with one listen (attrs as given); the listens are on
    lines 3, 9, 15... (six lines a service)."""
    services = ''.join('<service name="%s">\n<listen %s/>\n' % (chr(ord('a') + i), attrs) + GROUP + '</service>\n'
                       for i, attrs in enumerate(listens))
    return '<pdconfig>\n' + services + kw.get('tail', '') + '</pdconfig>\n'


class SniConfigTest(unittest.TestCase):
    """<listen sni>: names, the shared address, and the errors of issue 13."""

    def test_shared_address(self):
        config = parse_config(shared('ip="*:443" sni="API.example.com.,*.api.example.com"',
                                     'ip="0.0.0.0:443" sni="www.example.com, b\u00fccher.example"',
                                     'ip="*:443" sni="*"',
                                     'ip="*:444"'), 'x.xml')
        self.assertEqual([l.sni for s in config.services for l in s.listens],
                         [['api.example.com', '*.api.example.com'], ['www.example.com', 'xn--bcher-kva.example'],
                          ['*'], None])
        again = parse_config(config.to_xml(), 'running.xml')
        self.assertEqual(again.to_xml(), config.to_xml())
        self.assertIn('<listen ip="*:443" sni="api.example.com,*.api.example.com"/>', config.to_xml())
        summary = pydirector.summary(config)
        self.assertIn('service a: listen *:443 (sni api.example.com, *.api.example.com); ', summary)
        self.assertIn('service b: listen 0.0.0.0:443 (sni www.example.com, b\u00fccher.example -> '
                      'xn--bcher-kva.example); ', summary)
        self.assertIn('service d: listen *:444; ', summary)

    def test_one_service_with_sni(self):
        config = parse_config(shared('ip="*:443" sni="a.example.com" accept_proxy="v2" trusted="10.0.0.0/8"'), 'x.xml')
        self.assertEqual(config.services[0].listens[0].sni, ['a.example.com'])
        # Overlapping is not claiming twice: the most specific pattern wins at run time.
        parse_config(shared('ip="*:443" sni="*.example.com"', 'ip="*:443" sni="a.example.com,*.a.example.com"'), 'x')

    def test_errors(self):
        share = '(services share an address only when every listen on it has sni)'
        for xml, message in [
                (shared('ip="*:443" sni="a.example.com,*.b.example.com"', 'ip="*:443" sni="c.example.com,A.example.com."'),
                 "x.xml:9: listen '*:443': server name 'a.example.com' is already claimed by service 'a' "
                 "on this address"),
                (shared('ip="*:443" sni="*.b.example.com"', 'ip="0.0.0.0:443" sni="*.B.example.com"'),
                 "x.xml:9: listen '0.0.0.0:443': server name '*.b.example.com' is already claimed by "
                 "service 'a' on this address"),
                (shared('ip="*:443" sni="a.example.com"', 'ip="*:443" sni="*"', 'ip="*:443" sni="c.example.com,*"'),
                 "x.xml:15: listen '*:443': a second '*' on this address: service 'b' has it already"),
                (shared('ip="*:443" sni="a.example.com"', 'ip="*:443"'),
                 "x.xml:9: listen '*:443' has no sni, but service 'a' listens there with sni " + share),
                (shared('ip="*:443"', 'ip="*:443" sni="b.example.com"'),
                 "x.xml:9: listen '*:443' is already used by service 'a', which has no sni " + share),
                (shared('ip="*:443" sni="a.example.com"', 'ip="*:443" sni="b.example.com"', 'ip="*:443"'),
                 "x.xml:15: listen '*:443' has no sni, but service 'a' listens there with sni " + share),
                (shared('ip="*:443"', 'ip="*:443"'), "x.xml:9: listen '*:443' is already used by service 'a'"),
                ('<pdconfig>\n<service name="a">\n<listen ip="*:443" sni="a.example.com"/>\n'
                 '<listen ip="*:443" sni="b.example.com"/>\n' + GROUP + TAIL,
                 "x.xml:4: service 'a' listens on '*:443' twice: give all its names in one sni"),
                (shared('ip="*:443" sni="a.example.com" accept_proxy="v2"', 'ip="*:443" sni="b.example.com"'),
                 "x.xml:9: listen '*:443': accept_proxy must be the same on every listen of a shared address "
                 "(service 'a' has 'v2', this one 'none')"),
                (shared('ip="*:443" sni="a.example.com" accept_proxy="v2"',
                        'ip="*:443" sni="b.example.com" accept_proxy="v2" trusted="10.0.0.0/8"'),
                 "x.xml:9: listen '*:443': trusted must be the same on every listen of a shared address "
                 "(service 'a' has 'none', this one '10.0.0.0/8')"),
                (shared('ip="127.0.0.1:7001" sni="a.example.com"', tail=ADMIN + USER + '</admin>\n'),
                 "x.xml:8: listen '127.0.0.1:7001' is already used by service 'a'"),
                (shared('ip="127.0.0.1:8443" sni=""'),
                 'x.xml:3: <listen> sni is empty: give names, "*.domain" patterns or "*"'),
                (shared('ip="127.0.0.1:8443" sni="a.example.com,,b.example.com"'),
                 "x.xml:3: <listen> sni 'a.example.com,,b.example.com' has an empty name"),
                (shared('ip="127.0.0.1:8443" sni="a..example.com"'), "x.xml:3: <listen> sni 'a..example.com': an empty label"),
                (shared('ip="127.0.0.1:8443" sni="a.*.example.com"'),
                 "x.xml:3: <listen> sni 'a.*.example.com': '*' may only be the whole name ('*') or its whole "
                 "first label ('*.example.com')"),
                (shared('ip="127.0.0.1:8443" sni="a.example.com,A.EXAMPLE.com"'),
                 "x.xml:3: <listen> sni lists 'a.example.com' twice"),
                (shared('ip="127.0.0.1:8443" sni="a b"'),
                 "x.xml:3: <listen> sni 'a b': character ' ' is not allowed in a host name"),
                # International names (issue 25 F8): the A-label is the name.
                (shared('ip="*:443" sni="Fa\u00df.de"', 'ip="*:443" sni="b.example,xn--fa-hia.de"'),
                 "x.xml:9: listen '*:443': server name 'xn--fa-hia.de' is already claimed by service 'a' "
                 "on this address"),
                (shared('ip="127.0.0.1:8443" sni="a.example,\ufb01.de"'),
                 "x.xml:3: <listen> sni '\ufb01.de': character '\ufb01' (U+FB01): clients map it in ways not "
                 "repeated here; write the name as they send it (lower case) or as its A-label"),
                (shared('ip="127.0.0.1:8443" sni="*.xn--wca.de"'),
                 "x.xml:3: <listen> sni '*.xn--wca.de': label 'xn--wca' decodes to '\u00dc', which clients "
                 "send as 'xn--tda'")]:
            with self.subTest(message=message):
                with self.assertRaises(ConfigError) as cm:
                    parse_config(xml, 'x.xml')
                self.assertEqual(str(cm.exception), message)


class PasswordTest(unittest.TestCase):

    def test_hash_format(self):
        stored = hash_password('s3cret')
        algorithm, iterations, salt, digest = stored.split('$')
        self.assertEqual(algorithm, 'pbkdf2_sha256')
        self.assertGreaterEqual(int(iterations), 200000)
        self.assertEqual(len(salt), 22)             # 16 bytes, base64 without padding
        self.assertNotIn('=', stored)
        self.assertTrue(check_password('s3cret', stored))
        self.assertFalse(check_password('s3creT', stored))

    def test_salted(self):
        self.assertNotEqual(hash_password('x', iterations=1000), hash_password('x', iterations=1000))

    def test_right_and_wrong(self):
        stored = hash_password('p\u00e4ss word', iterations=1000)
        self.assertTrue(check_password('p\u00e4ss word', stored))
        self.assertTrue(check_password('p\u00e4ss word'.encode('utf-8'), stored))
        self.assertFalse(check_password('pass word', stored))
        self.assertFalse(check_password('', stored))

    def test_fixed_hash(self):
        self.assertTrue(check_password('right', PBKDF2_RIGHT))
        self.assertFalse(check_password('wrong', PBKDF2_RIGHT))

    def test_garbage_stored(self):
        for stored in ('', 'secret', 'pbkdf2_sha256$1000$!!$!!', 'pbkdf2_sha256$x$ab$ab', None):
            with self.subTest(stored=stored):
                self.assertFalse(check_password('secret', stored))

    def test_is_legacy_hash(self):
        for stored in ('iy910VlMkG1DE', DES_SECRET, MD5_SECRET, SHA512_SECRET):
            self.assertTrue(is_legacy_hash(stored), stored)
        for stored in ('secret', 'iy910VlMkG1D', 'iy910VlMkG1D!', PBKDF2_RIGHT, '', None, '$6$x$short'):
            self.assertFalse(is_legacy_hash(stored), stored)

    @unittest.skipUnless(HAVE_CRYPT, 'needs the crypt module')
    def test_legacy_crypt(self):
        for stored in (DES_SECRET, MD5_SECRET, SHA512_SECRET):
            with self.subTest(stored=stored):
                self.assertTrue(check_password('secret', stored))
                self.assertFalse(check_password('Secret', stored))
                self.assertFalse(check_password('sec\0ret', stored))

    @unittest.skipIf(HAVE_CRYPT, 'crypt is available here')
    def test_legacy_crypt_unavailable(self):
        self.assertFalse(check_password('secret', DES_SECRET))

    def test_no_deprecation_warning(self):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            check_password('secret', DES_SECRET)
        self.assertEqual([w for w in caught if issubclass(w.category, DeprecationWarning)], [])


class AddressAndNameTest(unittest.TestCase):

    def test_parse_address(self):
        cases = [
            ('10.0.0.1:80', ('10.0.0.1', 80)),
            ('*:8080', ('0.0.0.0', 8080)),
            ('[::]:80', ('::', 80)),
            ('[::1]:65535', ('::1', 65535)),
            ('[fe80::1%eth0]:80', ('fe80::1%eth0', 80)),
            ('localhost:1', ('localhost', 1)),
            ('backend.example.:80', ('backend.example.', 80)),
            ('db_1.internal:5432', ('db_1.internal', 5432)),
        ]
        for text, expected in cases:
            with self.subTest(text=text):
                self.assertEqual(parse_address(text), expected)

    def test_parse_address_errors(self):
        cases = [
            ('x', "'x' needs host:port"),
            ('[::1]', "'[::1]' needs host:port"),
            ('[]:80', "'[]:80' needs host:port"),
            ('[::1:80', "'[::1:80' needs host:port"),
            ('h:+80', "'h:+80': port must be 1-65535"),
            ('h:080000', "'h:080000': port must be 1-65535"),
            ('h:\u0668\u0660', "'h:\u0668\u0660': port must be 1-65535"),
        ]
        for text, message in cases:
            with self.subTest(text=text):
                with self.assertRaises(ValueError) as cm:
                    parse_address(text)
                self.assertEqual(str(cm.exception), message)

    def test_check_name(self):
        check_name('web', 'service name')
        check_name('caf\u00e9 1', 'service name')
        cases = [
            ('', 'host name is empty'),
            (None, 'host name is empty'),
            (' \t', "host name ' \\t' is only whitespace"),
            ('a\nb', "host name 'a\\nb' contains a control character"),
            ('a\rb', "host name 'a\\rb' contains a control character"),
            ('a\u2028b', "host name 'a\\u2028b' contains a control character"),
        ]
        for text, message in cases:
            with self.subTest(text=text):
                with self.assertRaises(ValueError) as cm:
                    check_name(text, 'host name')
                self.assertEqual(str(cm.exception), message)


if __name__ == '__main__':
    unittest.main()
