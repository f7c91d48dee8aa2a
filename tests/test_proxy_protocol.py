"""PROXY protocol: the codec byte for byte, then pydirector between real
nginx / HAProxy peers and raw clients (send_proxy on hosts, accept_proxy on
listens)."""

import ipaddress
import random
import socket
import time
import unittest

import support
from support import (BalancerCase, LOG, ExternalServer, connect, echo,
                     find_binary, free_port, recv_all, report_proxy_header, service_xml,
                     wait_until)

codec = support.proxy_codec()
proxy_header_v1 = codec.proxy_header_v1
proxy_header_v2 = codec.proxy_header_v2
parse_proxy_header = codec.parse_proxy_header

SIG = bytes.fromhex('0d0a0d0a000d0a515549540a')


def v2(ver_cmd, fam, block):
    return SIG + bytes([ver_cmd, fam]) + len(block).to_bytes(2, 'big') + block


# -- building headers --------------------------------------------------------

class TestBuildV1(unittest.TestCase):

    def test_spec_example_tcp4(self):
        self.assertEqual(proxy_header_v1(('192.168.0.1', 56324), ('192.168.0.11', 443)),
                         b'PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n')

    def test_tcp6_compressed_lower_case(self):
        self.assertEqual(proxy_header_v1(('2001:DB8:0:0:0:0:0:1', 1234, 0, 0), ('::1', 80, 0, 0)),
                         b'PROXY TCP6 2001:db8::1 ::1 1234 80\r\n')

    def test_longest_lines_of_the_spec(self):
        four = proxy_header_v1(('255.255.255.255', 65535), ('255.255.255.255', 65535))
        self.assertEqual(four, b'PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n')
        self.assertEqual(len(four), 56)
        full = ':'.join(['ffff'] * 8)
        six = proxy_header_v1((full, 65535, 0, 0), (full, 65535, 0, 0))
        self.assertEqual(six, ('PROXY TCP6 %s %s 65535 65535\r\n' % (full, full)).encode())
        self.assertEqual(len(six), 104)

    def test_mapped_ipv4_on_both_sides_is_tcp4(self):
        # A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d.
        self.assertEqual(proxy_header_v1(('::ffff:10.1.2.3', 5000, 0, 0), ('::ffff:127.0.0.1', 80, 0, 0)),
                         b'PROXY TCP4 10.1.2.3 127.0.0.1 5000 80\r\n')

    def test_mapped_and_plain_ipv4_is_tcp4(self):
        self.assertEqual(proxy_header_v1(('10.1.2.3', 5000), ('::ffff:127.0.0.1', 80, 0, 0)),
                         b'PROXY TCP4 10.1.2.3 127.0.0.1 5000 80\r\n')

    def test_ipv4_client_ipv6_server_maps_the_client_in_hex(self):
        # Hex groups only, as version 1 asks (Python 3.13 prints '::ffff:10.0.0.1').
        self.assertEqual(proxy_header_v1(('10.0.0.1', 5), ('2001:db8::80', 80, 0, 0)),
                         b'PROXY TCP6 ::ffff:a00:1 2001:db8::80 5 80\r\n')
        self.assertEqual(proxy_header_v1(('::ffff:10.0.0.1', 5, 0, 0), ('::1', 80, 0, 0)),
                         b'PROXY TCP6 ::ffff:a00:1 ::1 5 80\r\n')

    def test_ipv6_client_ipv4_server_maps_the_server(self):
        self.assertEqual(proxy_header_v1(('2001:db8::7', 4242, 0, 0), ('127.0.0.1', 8080)),
                         b'PROXY TCP6 2001:db8::7 ::ffff:7f00:1 4242 8080\r\n')

    def test_scope_id_is_dropped(self):
        self.assertEqual(proxy_header_v1(('fe80::1%eth0', 7, 0, 2), ('fe80::2%eth0', 8, 0, 2)),
                         b'PROXY TCP6 fe80::1 fe80::2 7 8\r\n')

    def test_unknown_when_nothing_fits(self):
        for client, server in [('/run/pd.sock', ''), (None, ('127.0.0.1', 80)),
                               (('127.0.0.1', 80), ('not-an-ip', 80)), ((), ())]:
            self.assertEqual(proxy_header_v1(client, server), b'PROXY UNKNOWN\r\n', (client, server))

    def test_bad_port_is_an_error(self):
        for port in (-1, 65536, '80', None, True):
            with self.assertRaises(ValueError, msg=port):
                proxy_header_v1(('127.0.0.1', port), ('127.0.0.1', 80))

    def test_ipv6_text_matches_rfc5952(self):
        rng = random.Random(5952)
        for _ in range(500):
            # Many zero groups, so runs of every length and position turn up.
            groups = [rng.choice([0, 0, 0, 1, 0xffff, rng.randrange(65536)]) for _ in range(8)]
            ip = ipaddress.IPv6Address(':'.join('%x' % g for g in groups))
            if ip.ipv4_mapped is not None:
                continue
            line = proxy_header_v1((str(ip), 1, 0, 0), ('::1', 2, 0, 0))
            self.assertEqual(line.split(b' ')[2].decode(), str(ip))


class TestBuildV2(unittest.TestCase):

    def test_tcp4_exact_bytes(self):
        self.assertEqual(
            proxy_header_v2(('192.168.0.1', 56324), ('192.168.0.11', 443)),
            bytes.fromhex('0d0a0d0a000d0a515549540a' '21' '11' '000c'
                          'c0a80001' 'c0a8000b' 'dc04' '01bb'))

    def test_tcp6_exact_bytes(self):
        self.assertEqual(
            proxy_header_v2(('2001:db8::1', 1234, 0, 0), ('::1', 80, 0, 0)),
            bytes.fromhex('0d0a0d0a000d0a515549540a' '21' '21' '0024'
                          '20010db8000000000000000000000001'
                          '00000000000000000000000000000001' '04d2' '0050'))

    def test_mixed_families(self):
        self.assertEqual(proxy_header_v2(('::ffff:10.1.2.3', 5000, 0, 0), ('127.0.0.1', 80))[12:],
                         bytes.fromhex('2111000c' '0a010203' '7f000001' '1388' '0050'))
        self.assertEqual(proxy_header_v2(('10.0.0.1', 5), ('::1', 80, 0, 0))[12:],
                         bytes.fromhex('21210024' '00000000000000000000ffff0a000001'
                                       '00000000000000000000000000000001' '0005' '0050'))

    def test_unspecified_when_nothing_fits(self):
        self.assertEqual(proxy_header_v2('/run/pd.sock', ''), SIG + b'\x21\x00\x00\x00')


# -- parsing -----------------------------------------------------------------

VALID = [
    # (header, accept values it fits, expected source, expected dest)
    (b'PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n', ('v1', 'any'),
     ('192.168.0.1', 56324), ('192.168.0.11', 443)),
    (b'PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n', ('v1', 'any'),
     ('0.0.0.0', 0), ('255.255.255.255', 65535)),
    (b'PROXY TCP6 2001:DB8::0001 ::1 1 2\r\n', ('v1', 'any'), ('2001:db8::1', 1), ('::1', 2)),
    # inet_ntop-based senders (HAProxy) write mapped addresses with a dotted tail.
    (b'PROXY TCP6 ::ffff:10.0.0.1 ::1 1 2\r\n', ('v1', 'any'), ('::ffff:10.0.0.1', 1), ('::1', 2)),
    (b'PROXY UNKNOWN\r\n', ('v1', 'any'), None, None),
    (b'PROXY UNKNOWN ffff:f...f:ffff whatever is here is ignored\r\n', ('v1', 'any'), None, None),
    (v2(0x21, 0x11, bytes.fromhex('0a000001 7f000001 1388 0050')), ('v2', 'any'),
     ('10.0.0.1', 5000), ('127.0.0.1', 80)),
    (v2(0x21, 0x21, bytes(15) + b'\x07' + bytes(15) + b'\x01' + b'\x00\x07\x00\x08'), ('v2', 'any'),
     ('::7', 7), ('::1', 8)),
    # TLVs after the addresses are skipped: NOOP (4) and a custom one (0xe0).
    (v2(0x21, 0x11, bytes.fromhex('0a000001 7f000001 1388 0050') + b'\x04\x00\x02ab' + b'\xe0\x00\x01x'),
     ('v2', 'any'), ('10.0.0.1', 5000), ('127.0.0.1', 80)),
    (v2(0x20, 0x00, b''), ('v2', 'any'), None, None),                        # LOCAL
    (v2(0x20, 0x11, bytes(12)), ('v2', 'any'), None, None),                  # LOCAL with addresses
    (v2(0x21, 0x00, b''), ('v2', 'any'), None, None),                        # PROXY, UNSPEC
    (v2(0x21, 0x12, bytes(12)), ('v2', 'any'), None, None),                  # UDP: use the real peer
    (v2(0x21, 0x31, b'/a'.ljust(108, b'\0') + b'/b'.ljust(108, b'\0')), ('v2', 'any'), None, None),
]


class TestParse(unittest.TestCase):

    def test_valid_headers(self):
        for header, accepts_, source, dest in VALID:
            for accept in accepts_:
                self.assertEqual(parse_proxy_header(header, accept), (len(header), source, dest),
                                 (header, accept))

    def test_payload_after_the_header_is_not_consumed(self):
        for header, accepts_, source, dest in VALID:
            data = header + b'GET / HTTP/1.0\r\n\r\n'
            self.assertEqual(parse_proxy_header(data, 'any'), (len(header), source, dest))
            self.assertEqual(parse_proxy_header(bytearray(data), 'any'), (len(header), source, dest))

    def test_one_byte_at_a_time(self):
        for header, accepts_, source, dest in VALID:
            for accept in accepts_:
                data = bytearray()
                for i, byte in enumerate(header):
                    data.append(byte)
                    result = parse_proxy_header(data, accept)
                    if i < len(header) - 1:
                        self.assertIsNone(result, (bytes(data), accept))
                self.assertEqual(result, (len(header), source, dest))

    def test_empty_needs_more(self):
        for accept in ('v1', 'v2', 'any'):
            self.assertIsNone(parse_proxy_header(b'', accept))

    def test_round_trips(self):
        rng = random.Random(1)
        for _ in range(300):
            if rng.random() < 0.5:
                client = (str(ipaddress.IPv4Address(rng.getrandbits(32))), rng.randrange(65536))
                server = (str(ipaddress.IPv4Address(rng.getrandbits(32))), rng.randrange(65536))
            else:
                client = (socket.inet_ntop(socket.AF_INET6, rng.getrandbits(128).to_bytes(16, 'big')),
                          rng.randrange(65536), 0, 0)
                server = (socket.inet_ntop(socket.AF_INET6, rng.getrandbits(128).to_bytes(16, 'big')),
                          rng.randrange(65536), 0, 0)
                if ipaddress.ip_address(client[0]).ipv4_mapped or ipaddress.ip_address(server[0]).ipv4_mapped:
                    continue
            for build in (proxy_header_v1, proxy_header_v2):
                header = build(client, server)
                self.assertEqual(parse_proxy_header(header + b'x', 'any'),
                                 (len(header), client[:2], server[:2]), header)

    def test_round_trip_of_mixed_families(self):
        # IPv4 client behind an IPv6 listener: the header is TCP6 with the client mapped.
        for build in (proxy_header_v1, proxy_header_v2):
            header = build(('10.0.0.1', 5), ('::1', 80, 0, 0))
            self.assertEqual(parse_proxy_header(header, 'any'),
                             (len(header), ('::ffff:10.0.0.1', 5), ('::1', 80)))

    def test_longest_v1_line_and_one_byte_more(self):
        line = b'PROXY UNKNOWN ' + b'f' * 91 + b'\r\n'
        self.assertEqual(len(line), 107)
        self.assertEqual(parse_proxy_header(line, 'v1'), (107, None, None))
        self.assertIsNone(parse_proxy_header(line[:106], 'v1'))
        with self.assertRaisesRegex(ValueError, 'no CRLF within 107'):
            parse_proxy_header(line[:105] + b'ff\r\n', 'v1')

    def test_header_max(self):
        self.assertEqual(codec.PROXY_HEADER_MAX, 16 + 65535)
        header = v2(0x21, 0x11, bytes(12) + b'\xe0' + (65535 - 15).to_bytes(2, 'big')
                    + bytes(65535 - 15))
        self.assertEqual(len(header), codec.PROXY_HEADER_MAX)
        self.assertEqual(parse_proxy_header(header, 'v2'),
                         (codec.PROXY_HEADER_MAX, ('0.0.0.0', 0), ('0.0.0.0', 0)))
        self.assertIsNone(parse_proxy_header(header[:-1], 'v2'))

    def test_lower_limit(self):
        header = v2(0x21, 0x11, bytes(12) + b'\x04\x00\x05hello')
        self.assertEqual(parse_proxy_header(header, 'v2', limit=len(header))[0], len(header))
        with self.assertRaisesRegex(ValueError, 'longer than'):
            # Decided from the length field: the rest need not arrive.
            parse_proxy_header(header[:16], 'v2', limit=len(header) - 1)

    def test_bad_accept_value(self):
        with self.assertRaises(ValueError):
            parse_proxy_header(b'PROXY ', 'v3')


# (accept, bytes that are still fine, the byte(s) that prove the header wrong, message)
REJECTED = [
    ('any', b'', b'G', 'not a PROXY protocol header'),
    ('any', b'', b'\x16', 'not a PROXY protocol header'),      # a TLS ClientHello
    ('v1', b'', b'\r', 'only v1'),
    ('v2', b'', b'P', 'only v2'),
    ('v1', b'PRO', b'Z', 'signature'),
    ('any', b'PROXY', b'\t', 'signature'),
    ('v1', b'PROXY TCP', b'5', 'unknown protocol'),
    ('v1', b'PROXY UNKNOWN', b'X', 'unknown protocol'),
    ('v1', b'PROXY ', b'\r\n', 'unknown protocol'),
    ('v1', b'PROXY TCP4', b'\r\n', 'fields'),
    ('v1', b'PROXY TCP4 ', b':', 'IPv6 address in a TCP4'),     # family mismatch
    ('v1', b'PROXY TCP4 1.2.3.25', b'6', 'IPv4'),
    ('v1', b'PROXY TCP4 1.2.3.0', b'1', 'IPv4'),               # leading zero (octal?)
    ('v1', b'PROXY TCP4 1.2.3.4', b'.', 'IPv4'),
    ('v1', b'PROXY TCP4 1.2.', b'.', 'IPv4'),
    ('v1', b'PROXY TCP4 1.2.3', b' ', 'IPv4'),
    ('v1', b'PROXY TCP4 1.2.3.4 ', b' ', 'empty field'),
    ('v1', b'PROXY TCP4 ', b'\xff', 'unexpected byte'),
    ('v1', b'PROXY TCP4 1.2.3.4 5.6.7.8 6553', b'6', 'port'),
    ('v1', b'PROXY TCP4 1.2.3.4 5.6.7.8 0', b'8', 'port'),
    ('v1', b'PROXY TCP4 1.2.3.4 5.6.7.8 1 2', b' ', 'too many fields'),
    ('v1', b'PROXY TCP4 1.2.3.4 5.6.7.8 1', b'\r', 'fields'),
    ('v1', b'PROXY TCP4 1.2.3.4 5.6.7.8 1 2', b'\n', 'LF without CR'),
    ('v1', b'PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r', b'\r', 'CR without LF'),
    ('v1', b'PROXY TCP6 ::', b'g', 'unexpected byte'),
    ('v1', b'PROXY TCP6 ::', b'%', 'unexpected byte'),           # no scope ids on the wire
    ('v1', b'PROXY TCP6 1.2.3.4', b' ', 'IPv4 address in a TCP6'),   # family mismatch
    ('v1', b'PROXY TCP6 1::2::3', b' ', 'IPv6'),
    ('v1', b'PROXY TCP6 ::1 ::2 1 2', b'\r\n', None),            # fine: control case below
    ('v1', b'PROXY UNKNOWN ' + b'a' * 92, b'a', 'no CRLF within 107'),
    ('v2', b'\r\n\r\n\x00', b'X', 'signature'),
    ('any', SIG[:11], b'\r', 'signature'),
    ('v2', SIG, b'\x11', 'version 1'),
    ('v2', SIG, b'\x31', 'version 3'),
    ('any', SIG, b'\x22', 'command'),
    ('v2', SIG + b'\x21', b'\x41', 'family'),
    ('v2', SIG + b'\x21', b'\x13', 'family'),
    ('v2', SIG + b'\x21\x11\x00', b'\x0b', 'needs 12'),          # too short for IPv4 addresses
    ('v2', SIG + b'\x21\x21\x00', b'\x20', 'needs 36'),
    ('v2', SIG + b'\x21\x31\x00', b'\xd7', 'needs 216'),
]


class TestReject(unittest.TestCase):

    def test_rejected_at_the_first_wrong_byte(self):
        for accept, good, bad, message in REJECTED:
            for n in range(len(good) + 1):
                self.assertIsNone(parse_proxy_header(good[:n], accept), (accept, good[:n]))
            if message is None:
                self.assertIsNotNone(parse_proxy_header(good + bad, accept))
                continue
            with self.assertRaisesRegex(ValueError, message, msg=(accept, good + bad)):
                parse_proxy_header(good + bad, accept)
            # More bytes do not make it acceptable.
            with self.assertRaises(ValueError):
                parse_proxy_header(good + bad + b'\r\n' + bytes(64), accept)

    def test_whole_malformed_lines(self):
        for line in [b'PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n',
                     b'PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n',
                     b'PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n',
                     b'PROXY TCP4 1.2.3.4 ::1 1 2\r\n',
                     b'PROXY TCP6 ::1 5.6.7.8 1 2\r\n',
                     b'PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n',
                     b'PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n',
                     b'PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n',
                     b'PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n\r\n',
                     b'PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n',
                     b'proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n',
                     b'PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n',
                     b'PROXY TCP6 ::1 ::1 ::1 2\r\n',
                     b'PROXY TCP6 ' + b'1' * 46 + b' ::1 1 2\r\n']:
            with self.assertRaises(ValueError, msg=line):
                parse_proxy_header(line, 'any')

    def test_v1_and_v2_only(self):
        with self.assertRaises(ValueError):
            parse_proxy_header(proxy_header_v1(('1.2.3.4', 1), ('5.6.7.8', 2)), 'v2')
        with self.assertRaises(ValueError):
            parse_proxy_header(proxy_header_v2(('1.2.3.4', 1), ('5.6.7.8', 2)), 'v1')


# -- real peers: shared set-up -----------------------------------------------

def listen_attrs(xml, attrs):
    """Add attributes to the first <listen> of a service_xml() result."""
    return xml.replace('"/>', '" %s/>' % attrs, 1)


class PeersTestCase(BalancerCase):
    """Backends, a balancer and external servers per test, all torn down after."""

    binaries = ()

    @classmethod
    def setUpClass(cls):
        if cls.binaries:
            found = dict((name, find_binary(name)) for name in ('nginx', 'haproxy'))
            missing = [b for b in cls.binaries if not found[b]]
            if missing:
                raise unittest.SkipTest('%s not installed (.ci/run installs it: apt-get install nginx-light haproxy)'
                                        % ' and '.join(missing))
            cls.paths = found

    def setUp(self):
        BalancerCase.setUp(self)
        self.servers = []
        self.addCleanup(lambda: [s.close() for s in self.servers])

    def external(self, argv, files, tries=3):
        """Start a server whose config takes {port}; a port taken meanwhile gets another try."""
        for attempt in range(tries):
            port = free_port()
            try:
                server = ExternalServer(argv, dict((k, v.replace('{port}', str(port)))
                                                   for k, v in files.items()), port)
            except AssertionError:
                if attempt == tries - 1:
                    raise
                continue
            self.servers.append(server)
            return server

    def access_line(self, client_port):
        return LOG.wait_for('client=127.0.0.1:%d ' % client_port, self.mark, timeout=10)[0]


def read_report(sock):
    """The first line a report_proxy_header backend sends, split into words."""
    data = b''
    while b'\n' not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    line, _, rest = data.partition(b'\n')
    return line.decode().split(), rest


def assert_closed(test, sock, timeout=10):
    """The balancer closed this client: EOF (or a reset) with no data."""
    sock.settimeout(timeout)
    try:
        data = recv_all(sock)
    except ConnectionResetError:
        data = b''
    test.assertEqual(data, b'')


# -- nginx as a backend that reads the PROXY header ---------------------------

NGINX_CONF = '''
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
lock_file {dir}/nginx.lock;
error_log {dir}/error.log info;
events { worker_connections 64; }
http {
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    log_format pp '$proxy_protocol_addr:$proxy_protocol_port $server_pair $remote_addr';
    server {
        listen 127.0.0.1:{port} proxy_protocol;
        access_log {dir}/access.log pp;
        default_type text/plain;
        set $server_pair "$proxy_protocol_server_addr:$proxy_protocol_server_port";
        location / {
            return 200 "$proxy_protocol_addr:$proxy_protocol_port $server_pair\\n";
        }
    }
}
'''


class TestNginxBackend(PeersTestCase):
    """pydirector with send_proxy in front of `listen ... proxy_protocol`: nginx must see the client."""

    binaries = ('nginx',)

    def nginx(self):
        return self.external([self.paths['nginx'], '-p', '{dir}/', '-c', '{dir}/nginx.conf'],
                             {'nginx.conf': NGINX_CONF})

    def check(self, version):
        nginx = self.nginx()
        listen_port = free_port()
        self.start(service_xml([('one', '127.0.0.1:%d' % nginx.port, 'send_proxy="%s"' % version)],
                               listen_port=listen_port))
        for _ in range(2):  # a second connection: no state left over from the first
            sock = connect(listen_port)
            try:
                sock.sendall(b'GET / HTTP/1.0\r\nHost: test\r\n\r\n')
                reply = recv_all(sock)
                client = sock.getsockname()
            finally:
                sock.close()
            head, _, body = reply.partition(b'\r\n\r\n')
            self.assertTrue(head.startswith(b'HTTP/1.1 200'), reply)
            expected = '127.0.0.1:%d 127.0.0.1:%d' % (client[1], listen_port)
            self.assertEqual(body.decode(), expected + '\n')
            wait_until(lambda: expected + ' 127.0.0.1' in nginx.read('access.log'), 10,
                       message='nginx access log: %r' % nginx.read('access.log'))

    def test_send_proxy_v1(self):
        self.check('v1')

    def test_send_proxy_v2(self):
        self.check('v2')

    def test_without_send_proxy_nginx_refuses(self):
        # Control: the same nginx drops a connection that lacks the header, so the two
        # tests above really depend on pydirector writing it.
        nginx = self.nginx()
        sock = connect(nginx.port)
        try:
            sock.sendall(b'GET / HTTP/1.0\r\nHost: test\r\n\r\n')
            self.assertNotIn(b'200', recv_all(sock))
        finally:
            sock.close()


# -- HAProxy in front of pydirector -------------------------------------------

HAPROXY_CONF = '''
global
    maxconn 100
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    server s1 127.0.0.1:%d %s
'''


class TestHAProxyFront(PeersTestCase):
    """client -> haproxy (send-proxy / send-proxy-v2) -> pydirector (accept_proxy) -> backend."""

    binaries = ('haproxy',)

    def haproxy(self, balancer_port, send):
        return self.external([self.paths['haproxy'], '-db', '-f', '{dir}/haproxy.cfg'],
                             {'haproxy.cfg': HAPROXY_CONF % (balancer_port, send)})

    def chain(self, haproxy_send, accept, send_proxy):
        listen_port = free_port()
        front = self.haproxy(listen_port, haproxy_send)
        reporter = self.backend(report_proxy_header)
        attrs = 'send_proxy="%s"' % send_proxy if send_proxy else ''
        self.start(listen_attrs(service_xml([('one', reporter.address, attrs)], listen_port=listen_port),
                                'accept_proxy="%s" trusted="127.0.0.0/8"' % accept))
        return front, reporter, listen_port

    def check_end_to_end(self, haproxy_send, accept, send_proxy):
        front, reporter, listen_port = self.chain(haproxy_send, accept, send_proxy)
        sock = connect(front.port)
        try:
            client = sock.getsockname()
            sock.sendall(b'hello through two proxies')
            words, rest = read_report(sock)
            sock.shutdown(socket.SHUT_WR)
            rest += recv_all(sock)
        finally:
            sock.close()
        # Both ends as haproxy saw them: the client, and haproxy's own frontend.
        self.assertEqual(words, ['PROXY', '127.0.0.1', str(client[1]), '127.0.0.1', str(front.port)])
        self.assertEqual(rest, b'hello through two proxies')
        self.assertIn('end=done', self.access_line(client[1]))

    def test_v1_in_v1_out(self):
        self.check_end_to_end('send-proxy', 'v1', 'v1')

    def test_v2_in_v2_out(self):
        self.check_end_to_end('send-proxy-v2', 'v2', 'v2')

    def test_v1_in_any_v2_out(self):
        self.check_end_to_end('send-proxy', 'any', 'v2')

    def test_v2_in_any_v1_out(self):
        self.check_end_to_end('send-proxy-v2', 'any', 'v1')

    def test_header_stripped_for_a_plain_backend(self):
        listen_port = free_port()
        front = self.haproxy(listen_port, 'send-proxy-v2')
        b = self.backend(echo)
        self.start(listen_attrs(service_xml([('one', b.address)], listen_port=listen_port),
                                'accept_proxy="v2" trusted="127.0.0.0/8"'))
        sock = connect(front.port)
        try:
            client = sock.getsockname()
            sock.sendall(b'just the payload')
            sock.shutdown(socket.SHUT_WR)
            self.assertEqual(recv_all(sock), b'just the payload')
        finally:
            sock.close()
        self.assertIn('end=done', self.access_line(client[1]))

    def test_wrong_version_is_refused(self):
        front, reporter, listen_port = self.chain('send-proxy-v2', 'v1', 'v1')
        sock = connect(front.port)
        try:
            client = sock.getsockname()
            sock.sendall(b'hello')
            assert_closed(self, sock)
        finally:
            sock.close()
        self.assertIn('end=bad-proxy', LOG.wait_for('end=bad-proxy', self.mark, timeout=10)[0])
        self.assertEqual(reporter.accepted, 0)
        self.assertFalse([l for l in LOG.since(self.mark) if 'client=127.0.0.1:%d ' % client[1] in l])


# -- raw clients against accept_proxy -----------------------------------------

class TestAcceptProxyRawClient(PeersTestCase):
    """accept_proxy spoken to by hand: bad, missing, untrusted, fragmented headers."""

    def balancer_with(self, accept='any', trusted='127.0.0.0/8', send_proxy='v1', connect_timeout=None):
        self.reporter = self.backend(report_proxy_header)
        attrs = 'send_proxy="%s"' % send_proxy if send_proxy else ''
        extra = '    <timeouts connect="%s"/>\n' % connect_timeout if connect_timeout else ''
        xml = service_xml([('one', self.reporter.address, attrs)], extra=extra)
        listen = 'accept_proxy="%s"' % accept
        if trusted is not None:
            listen += ' trusted="%s"' % trusted
        self.start(listen_attrs(xml, listen))
        return self.balancer.port()

    def refused(self, port, data, end):
        sock = connect(port)
        try:
            if data:
                sock.sendall(data)
            assert_closed(self, sock)
        finally:
            sock.close()
        LOG.wait_for('end=%s' % end, self.mark, timeout=10)
        self.assertEqual(self.reporter.accepted, 0)

    def test_no_header(self):
        self.refused(self.balancer_with('v1'), b'GET / HTTP/1.0\r\n\r\n', 'bad-proxy')

    def test_garbage_header(self):
        self.refused(self.balancer_with('any'), b'PROXY TCP4 300.1.1.1 1.1.1.1 1 2\r\nhello', 'bad-proxy')

    def test_v2_header_on_a_v1_listen(self):
        self.refused(self.balancer_with('v1'),
                     proxy_header_v2(('203.0.113.7', 4242), ('127.0.0.1', 80)), 'bad-proxy')

    def test_silent_client_times_out(self):
        started = time.monotonic()
        self.refused(self.balancer_with('v1', connect_timeout='0.5'), b'', 'bad-proxy')
        self.assertLess(time.monotonic() - started, 8)

    def test_partial_header_then_silence_times_out(self):
        self.refused(self.balancer_with('v1', connect_timeout='0.5'), b'PROXY TCP4 1.2.3.4 ', 'bad-proxy')

    def test_untrusted_peer(self):
        port = self.balancer_with('any', trusted='10.0.0.0/8')
        self.refused(port, proxy_header_v1(('203.0.113.7', 4242), ('127.0.0.1', port)) + b'hi',
                     'denied')

    def header_reaches_backend(self, port, header, payload, pieces=1, send_proxy_source=None):
        sock = connect(port)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            step = max(1, len(header) // pieces)
            chunks = [header[i:i + step] for i in range(0, len(header), step)]
            for chunk in chunks:
                sock.sendall(chunk)
                if len(chunks) > 1:
                    time.sleep(0.05)  # separate TCP segments: the scenario, not synchronisation
            sock.sendall(payload)
            words, rest = read_report(sock)
            sock.shutdown(socket.SHUT_WR)
            rest += recv_all(sock)
        finally:
            sock.close()
        return words, rest

    def test_header_split_across_segments(self):
        port = self.balancer_with('v1')
        header = proxy_header_v1(('203.0.113.7', 4242), ('192.0.2.1', 443))
        words, rest = self.header_reaches_backend(port, header, b'payload', pieces=5)
        # send_proxy passes on both addresses the front proxy gave.
        self.assertEqual(words, ['PROXY', '203.0.113.7', '4242', '192.0.2.1', '443'])
        self.assertEqual(rest, b'payload')
        self.assertIn('end=done', LOG.wait_for('client=203.0.113.7:4242 ', self.mark, timeout=10)[0])

    def test_v2_header_split_across_segments(self):
        port = self.balancer_with('v2', send_proxy='v2')
        header = proxy_header_v2(('198.51.100.9', 999), ('192.0.2.1', 443))
        words, rest = self.header_reaches_backend(port, header, b'x' * 100000, pieces=3)
        self.assertEqual(words, ['PROXY', '198.51.100.9', '999', '192.0.2.1', '443'])
        self.assertEqual(rest, b'x' * 100000)

    def test_ipv6_header_over_ipv4_v2_in_v1_out(self):
        port = self.balancer_with('any', send_proxy='v1')
        header = proxy_header_v2(('2001:db8::7', 4242, 0, 0), ('2001:db8::80', 80, 0, 0))
        words, rest = self.header_reaches_backend(port, header, b'six')
        self.assertEqual(words, ['PROXY', '2001:db8::7', '4242', '2001:db8::80', '80'])
        self.assertEqual(rest, b'six')
        self.assertEqual(self.reporter.received, [b'PROXY TCP6 2001:db8::7 2001:db8::80 4242 80\r\n'])
        LOG.wait_for('client=[2001:db8::7]:4242 ', self.mark, timeout=10)

    def test_ipv6_listener_without_accept_proxy(self):
        # No header read: the real IPv6 peer and the listener address go to the backend.
        try:
            probe = socket.socket(socket.AF_INET6)
            probe.bind(('::1', 0))
            probe.close()
        except OSError:
            self.skipTest('no IPv6 loopback')
        self.reporter = self.backend(report_proxy_header)
        port = free_port()
        xml = service_xml([('one', self.reporter.address, 'send_proxy="v2"')], listen_port=port)
        self.start(xml.replace('<listen ip="127.0.0.1:%d"' % port, '<listen ip="[::1]:%d"' % port))
        sock = socket.create_connection(('::1', port), timeout=10)
        try:
            client = sock.getsockname()
            sock.sendall(b'v6')
            words, rest = read_report(sock)
            sock.shutdown(socket.SHUT_WR)
            rest += recv_all(sock)
        finally:
            sock.close()
        self.assertEqual(words, ['PROXY', '::1', str(client[1]), '::1', str(port)])
        self.assertEqual(rest, b'v6')
        self.assertEqual(self.reporter.received[0][12:16], b'\x21\x21\x00\x24')

    def test_unknown_header_uses_the_real_peer(self):
        port = self.balancer_with('v1')
        sock = connect(port)
        try:
            client = sock.getsockname()
            sock.sendall(b'PROXY UNKNOWN\r\nhello')
            words, rest = read_report(sock)
            sock.shutdown(socket.SHUT_WR)
            rest += recv_all(sock)
        finally:
            sock.close()
        # UNKNOWN: the real peer, and the listener it reached.
        self.assertEqual(words, ['PROXY', '127.0.0.1', str(client[1]), '127.0.0.1', str(port)])
        self.assertEqual(rest, b'hello')

    def test_trusted_any_peer_when_list_is_empty(self):
        port = self.balancer_with('v1', trusted=None)
        words, rest = self.header_reaches_backend(
            port, proxy_header_v1(('203.0.113.8', 1), ('127.0.0.1', port)), b'ok')
        self.assertEqual(words[:3], ['PROXY', '203.0.113.8', '1'])


if __name__ == '__main__':
    unittest.main()
