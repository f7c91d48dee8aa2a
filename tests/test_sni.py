"""TLS server names (issue 13, the pure parts): the ClientHello reader on real
hellos (tests/data, captured by tools/capture_hellos.py) and on every kind of
bad input, a fuzz run with fixed seeds, the sni patterns and their matcher,
and the TLS test helpers (certificates, backends, clients) proved directly."""

import os
import random
import socket
try:
    import tracemalloc
except ImportError:     # PyPy has none
    tracemalloc = None
import unittest

import support
from support import pydirector

TLS_HELLO_MAX = pydirector.TLS_HELLO_MAX


# -- building hellos -----------------------------------------------------------

def u16(n):
    return n.to_bytes(2, 'big')


def extension(kind, data):
    return u16(kind) + u16(len(data)) + data


def server_name_ext(*names):
    """A server_name extension; each name is bytes (a host_name) or (name_type, bytes)."""
    entries = b''
    for name in names:
        kind, name = name if isinstance(name, tuple) else (0, name)
        entries += bytes([kind]) + u16(len(name)) + name
    return extension(0, u16(len(entries)) + entries)


def hello_body(extensions=b'', version=b'\x03\x03', session_id=bytes(32),
               suites=b'\x13\x01\x13\x02\x00\xff', methods=b'\x00'):
    """A ClientHello body; extensions=None leaves the extensions block out (TLS 1.0 style)."""
    body = (version + bytes(range(32)) + bytes([len(session_id)]) + session_id +
            u16(len(suites)) + suites + bytes([len(methods)]) + methods)
    if extensions is not None:
        body += u16(len(extensions)) + extensions
    return body


def message(body, kind=1):
    return bytes([kind]) + len(body).to_bytes(3, 'big') + body


def records(handshake, sizes=(16384,), version=b'\x03\x01'):
    """handshake in TLS records of sizes[0], sizes[1], ... bytes (the last size repeats)."""
    out, at, i = b'', 0, 0
    while at < len(handshake):
        size = sizes[min(i, len(sizes) - 1)]
        fragment = handshake[at:at + size]
        out += b'\x16' + version + u16(len(fragment)) + fragment
        at += size
        i += 1
    return out


def hello(*names, **kw):
    """A whole one-record hello naming names (none: no server_name extension)."""
    extra = kw.pop('extra', b'')
    extensions = (server_name_ext(*names) if names else b'') + extra
    return records(message(hello_body(extensions, **kw)))


def handshake_of(data):
    """The handshake bytes of a hello, out of its records (a well-formed one)."""
    out, at = b'', 0
    while at < len(data):
        length = int.from_bytes(data[at + 3:at + 5], 'big')
        out += data[at + 5:at + 5 + length]
        at += 5 + length
    return out


def fixtures():
    return [(name,) + support.client_hello(name) for name in support.HELLO_FIXTURES]


# -- a second, plain reading of the spec: the fuzz test's oracle --------------

class Bad(Exception):
    pass


def reference(data, limit=TLS_HELLO_MAX):
    """('ok', consumed, name), 'bad' or 'short', reading complete input only, the
    obvious way (no increments, no early answers)."""
    pos, handshake, size = 0, b'', None
    while size is None or len(handshake) < size:
        if pos + 5 > len(data):
            return 'short'
        kind, major, minor = data[pos], data[pos + 1], data[pos + 2]
        length = int.from_bytes(data[pos + 3:pos + 5], 'big')
        if kind != 22 or major != 3 or minor not in (1, 2, 3, 4) or not 0 < length <= 16384:
            return 'bad'
        if pos + 5 + length > limit:
            return 'bad'
        if pos + 5 + length > len(data):
            return 'short'
        handshake += data[pos + 5:pos + 5 + length]
        pos += 5 + length
        if size is None and len(handshake) >= 4:
            if handshake[0] != 1:
                return 'bad'
            size = 4 + int.from_bytes(handshake[1:4], 'big')
            if size + 5 > limit or size - 4 < 41:
                return 'bad'
    if len(handshake) != size:
        return 'bad'
    try:
        return 'ok', pos, reference_body(handshake[4:])
    except Bad:
        return 'bad'


def reference_body(body):
    state = {'at': 0}

    def take(n):
        at = state['at']
        if at + n > len(body):
            raise Bad()
        state['at'] = at + n
        return body[at:at + n]

    version = take(2)
    if version[0] != 3 or version[1] not in (1, 2, 3, 4):
        raise Bad()
    take(32)
    n = take(1)[0]
    if n > 32:
        raise Bad()
    take(n)
    n = int.from_bytes(take(2), 'big')
    if n < 2 or n % 2:
        raise Bad()
    take(n)
    n = take(1)[0]
    if not n:
        raise Bad()
    take(n)
    if state['at'] == len(body):
        return None
    if int.from_bytes(take(2), 'big') != len(body) - state['at']:
        raise Bad()
    name, seen = None, False
    while state['at'] < len(body):
        kind = int.from_bytes(take(2), 'big')
        data = take(int.from_bytes(take(2), 'big'))
        if kind == 0:
            if seen:
                raise Bad()
            seen, name = True, reference_server_name(data)
    return name


def reference_server_name(data):
    if len(data) < 2 or int.from_bytes(data[:2], 'big') != len(data) - 2 or len(data) == 2:
        raise Bad()
    names, at = [], 2
    while at < len(data):
        if at + 3 > len(data):
            raise Bad()
        n = int.from_bytes(data[at + 1:at + 3], 'big')
        if not n or at + 3 + n > len(data):
            raise Bad()
        if data[at] == 0:
            names.append(data[at + 3:at + 3 + n])
        at += 3 + n
    if not names:
        return None
    raw = names[0]
    allowed = b'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.'
    if any(b not in allowed for b in raw):
        raise Bad()
    name = raw.decode('ascii').lower()
    if name.endswith('.'):
        name = name[:-1]
    if not name or len(name) > 253 or any(not 0 < len(l) <= 63 for l in name.split('.')):
        raise Bad()
    return name


def outcome(read, data):
    """What a read gives: its result, 'need' (None) or 'error' (a ValueError)."""
    try:
        result = read(data)
    except ValueError:
        return 'error'
    return 'need' if result is None else result


def read_in_pieces(data, cuts, limit=TLS_HELLO_MAX):
    """Feed a ClientHelloReader the prefixes of data ending at cuts, then all of it,
    as a connection would after each recv; the last answer ('need', 'error' or a
    result), and whether an earlier one was already final."""
    reader = pydirector.ClientHelloReader(limit)
    buffer = bytearray()
    last = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        buffer += data[last:cut]
        last = cut
        answer = outcome(reader.read, buffer)
        if answer != 'need' and cut != len(data):
            # A final answer before the end: later bytes cannot change it.
            buffer += data[last:]
            return answer, outcome(reader.read, buffer)
    return answer, answer


# -- the reader on real hellos -------------------------------------------------

class RealHelloTest(unittest.TestCase):
    """Each captured hello: the right name and length, however it arrives."""

    def test_fixtures_are_there(self):
        sizes = {name: len(data) for name, data, _ in fixtures()}
        self.assertEqual(sorted(sizes), sorted(support.HELLO_FIXTURES))
        # Chromium sends a post-quantum key share: the big one, the reason for the 16 KiB bound.
        self.assertGreater(sizes['chromium'], 1500)

    def test_whole(self):
        for name, data, server_name in fixtures():
            with self.subTest(client=name):
                self.assertEqual(pydirector.parse_client_hello(data), (len(data), server_name))
                self.assertEqual(pydirector.parse_client_hello(bytearray(data)), (len(data), server_name))

    def test_the_names(self):
        names = {name: server_name for name, _, server_name in fixtures()}
        self.assertEqual(names['python-nosni'], None)
        self.assertEqual(names['python-idna'], 'xn--bcher-kva.example')
        self.assertEqual(names['chromium'], 'chromium.example.com')

    def test_records_after_the_hello_are_not_read(self):
        # A 0-RTT client may send change_cipher_spec and early data right behind the hello.
        after = b'\x14\x03\x03\x00\x01\x01' + b'\x17\x03\x03\x00\x05hello' + b'junk'
        for name, data, server_name in fixtures():
            with self.subTest(client=name):
                self.assertEqual(pydirector.parse_client_hello(data + after), (len(data), server_name))

    def test_every_prefix_needs_more(self):
        for name, data, _ in fixtures():
            with self.subTest(client=name):
                for cut in range(len(data)):
                    self.assertIsNone(pydirector.parse_client_hello(data[:cut]), cut)

    def test_split_in_two_at_every_byte(self):
        for name, data, server_name in fixtures():
            with self.subTest(client=name):
                for cut in range(1, len(data)):
                    reader = pydirector.ClientHelloReader()
                    buffer = bytearray(data[:cut])
                    self.assertIsNone(reader.read(buffer), cut)
                    buffer += data[cut:]
                    self.assertEqual(reader.read(buffer), (len(data), server_name), cut)

    def test_a_byte_at_a_time(self):
        for name, data, server_name in fixtures():
            with self.subTest(client=name):
                reader = pydirector.ClientHelloReader()
                buffer = bytearray()
                for i, byte in enumerate(data):
                    buffer.append(byte)
                    answer = reader.read(buffer)
                    if i < len(data) - 1:
                        self.assertIsNone(answer, i)
                self.assertEqual(answer, (len(data), server_name))
                self.assertEqual(reader.read(buffer), answer)    # it keeps its answer

    def test_random_splits(self):
        for seed in range(20):
            rng = random.Random(seed)
            for name, data, server_name in fixtures():
                cuts = [rng.randrange(1, len(data)) for _ in range(rng.randrange(1, 12))]
                self.assertEqual(read_in_pieces(data, cuts), ((len(data), server_name),) * 2,
                                 (seed, name, cuts))

    def test_several_records(self):
        """The same handshake message re-fragmented into records of many sizes."""
        for name, data, server_name in fixtures():
            handshake = handshake_of(data)
            for sizes in [(1,), (2,), (3,), (4,), (5,), (7, 1), (100,), (len(handshake) - 1,),
                          (1, len(handshake))]:
                with self.subTest(client=name, sizes=sizes):
                    again = records(handshake, sizes, b'\x03\x03')
                    self.assertEqual(pydirector.parse_client_hello(again), (len(again), server_name))
                    rng = random.Random(len(sizes))
                    cuts = [rng.randrange(1, len(again)) for _ in range(8)]
                    self.assertEqual(read_in_pieces(again, cuts)[0], (len(again), server_name))

    def test_random_records_and_splits(self):
        for seed in range(30):
            rng = random.Random(seed)
            for name, data, server_name in fixtures():
                handshake = handshake_of(data)
                sizes = [rng.randrange(1, 600) for _ in range(20)]
                again = records(handshake, sizes, rng.choice([b'\x03\x01', b'\x03\x03']))
                if len(again) > TLS_HELLO_MAX:
                    continue
                cuts = [rng.randrange(1, len(again)) for _ in range(rng.randrange(1, 20))]
                self.assertEqual(read_in_pieces(again, cuts), ((len(again), server_name),) * 2)

    def test_tiny_records_a_byte_at_a_time(self):
        # 1-byte records, fed a byte at a time: each byte is looked at once.
        data = records(handshake_of(support.client_hello('chromium')[0]), (1,))
        self.assertLess(len(data), TLS_HELLO_MAX)
        reader = pydirector.ClientHelloReader()
        buffer = bytearray()
        for byte in data[:-1]:
            buffer.append(byte)
            self.assertIsNone(reader.read(buffer))
        buffer.append(data[-1])
        self.assertEqual(reader.read(buffer), (len(data), 'chromium.example.com'))


# -- the reader on synthetic hellos: every rule ---------------------------------

class HelloRulesTest(unittest.TestCase):

    def assertBad(self, data, text=None, limit=TLS_HELLO_MAX):
        with self.assertRaises(ValueError) as caught:
            pydirector.parse_client_hello(data, limit)
        if text is not None:
            self.assertIn(text, str(caught.exception))
        # Fed in pieces the answer is the same, at the latest with the last byte.
        for seed in range(3):
            rng = random.Random(seed)
            cuts = [rng.randrange(1, max(2, len(data))) for _ in range(4)]
            self.assertEqual(read_in_pieces(data, cuts, limit)[1], 'error')
        return str(caught.exception)

    def assertName(self, data, name):
        self.assertEqual(pydirector.parse_client_hello(data), (len(data), name))

    def test_synthetic_hello(self):
        self.assertName(hello(b'www.example.com'), 'www.example.com')
        self.assertName(hello(), None)                         # no server_name extension
        self.assertName(records(message(hello_body(None))), None)   # no extensions at all
        self.assertName(hello(b'x.example', version=b'\x03\x01', session_id=b''), 'x.example')
        self.assertName(records(message(hello_body(server_name_ext(b'a.example'))), version=b'\x03\x04'),
                        'a.example')

    def test_name_normalised(self):
        self.assertName(hello(b'WWW.Example.COM'), 'www.example.com')
        self.assertName(hello(b'www.example.com.'), 'www.example.com')
        self.assertName(hello(b'under_score.example'), 'under_score.example')
        self.assertName(hello(b'localhost'), 'localhost')
        self.assertName(hello(b'a' * 63 + b'.example'), 'a' * 63 + '.example')
        long_name = b'.'.join([b'a' * 63] * 3 + [b'b' * 61])
        self.assertEqual(len(long_name), 253)
        self.assertName(hello(long_name), long_name.decode())

    def test_several_names_the_first_host_name(self):
        self.assertName(hello(b'first.example', b'second.example'), 'first.example')
        self.assertName(hello((7, b'\x01\x02'), b'host.example'), 'host.example')
        self.assertName(hello((7, b'\x01\x02')), None)     # a name type RFC 6066 does not define
        # Only the first host_name is checked as a name; the rest only for their lengths.
        self.assertName(hello(b'ok.example', b'\x00bad'), 'ok.example')

    def test_not_tls(self):
        for data, text in [
                (b'GET / HTTP/1.1\r\nHost: example.com\r\n\r\n', "first byte 0x47 'G'"),
                (b'SSH-2.0-OpenSSH_9.2\r\n', "first byte 0x53 'S'"),
                (b'PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n', "first byte 0x50 'P'"),
                (b'\x00' * 10, 'first byte 0x00'),
                (b'\x16\x02\x00\x00\x10', 'record version 0x0200'),
                (b'\x16\x03\x00\x00\x10', 'record version 0x0300'),   # SSL 3.0: no extensions
                (b'\x16\x03\x05', 'record version 0x0305'),
                (b'\x16\x04', 'record version 0x04')]:
            with self.subTest(data=data):
                message_ = self.assertBad(data, text)
                self.assertTrue(message_.startswith('not TLS'), message_)

    def test_the_first_bytes_that_prove_it(self):
        for data in [b'G', b'\x00', b'\x15', b'\x80', b'\x16\x02', b'\x16\x03\x05']:
            with self.assertRaises(ValueError):
                pydirector.parse_client_hello(data)

    def test_sslv2_hello(self):
        # What a 2000s client sent to speak SSLv2 or better: a 2-byte header with the top bit set.
        sslv2 = b'\x80\x2e\x01\x03\x01\x00\x15\x00\x00\x00\x10' + bytes(21) + bytes(16)
        self.assertIn('SSLv2', self.assertBad(sslv2, 'not TLS: first byte 0x80'))

    def test_other_records_first(self):
        for kind, name in [(21, 'alert'), (20, 'change_cipher_spec'), (23, 'application_data'),
                           (24, 'heartbeat')]:
            with self.subTest(record=name):
                self.assertBad(bytes([kind]) + b'\x03\x03\x00\x02\x02\x28' + hello(b'a.example'),
                               'not a TLS hello: a TLS %s record first' % name)

    def test_other_record_inside_the_hello(self):
        handshake = message(hello_body(server_name_ext(b'a.example')))
        data = records(handshake[:20]) + b'\x15\x03\x03\x00\x02\x02\x28' + records(handshake[20:])
        self.assertBad(data, 'a TLS alert record inside it')

    def test_record_lengths(self):
        handshake = message(hello_body(server_name_ext(b'a.example')))
        self.assertBad(b'\x16\x03\x01\x00\x00' + records(handshake), 'an empty TLS record')
        self.assertBad(records(handshake[:10]) + b'\x16\x03\x01\x00\x00', 'an empty TLS record')
        self.assertBad(b'\x16\x03\x01\x40\x01' + bytes(100), 'a TLS record of 16385 bytes')
        self.assertBad(b'\x16\x03\x01\xff\xff', 'a TLS record of 65535 bytes')

    def test_not_a_client_hello(self):
        server_hello = records(message(hello_body(b''), kind=2))
        self.assertBad(server_hello, 'handshake message type 2')
        self.assertBad(b'\x16\x03\x01\x00\x01\x00', 'handshake message type 0')

    def test_more_handshake_bytes_in_the_last_record(self):
        handshake = message(hello_body(server_name_ext(b'a.example')))
        self.assertBad(records(handshake + b'\x0b\x00\x00\x00'), 'more handshake bytes after it')
        # The record says so before the bytes come.
        self.assertBad(b'\x16\x03\x01' + u16(len(handshake) + 1) + handshake,
                       'more handshake bytes after it')

    def test_handshake_length_lies(self):
        body = hello_body(server_name_ext(b'a.example'))
        too_short = b'\x01' + (len(body) - 1).to_bytes(3, 'big') + body
        self.assertBad(records(too_short))
        too_long = b'\x01' + (len(body) + 50).to_bytes(3, 'big') + body
        self.assertBad(records(too_long) + b'\x17\x03\x03\x00\x01x', 'application_data record inside it')
        self.assertBad(records(b'\x01\x00\x00\x10' + body[:16]), '16 bytes is too short')

    def test_body_lengths_that_lie(self):
        sni = server_name_ext(b'a.example')
        for body, text in [
                (hello_body(sni, version=b'\x02\x00'), 'version 0x0200'),
                (hello_body(sni, session_id=bytes(33)), 'a session id of 33 bytes'),
                (hello_body(sni, suites=b''), 'cipher suites of 0 bytes'),
                (hello_body(sni, suites=b'\x13\x01\x13'), 'cipher suites of 3 bytes'),
                (hello_body(sni, methods=b''), 'no compression method'),
                (hello_body(sni)[:-1], None),
                (hello_body(sni) + b'\x00', 'extensions of'),
                (hello_body(sni)[:39] + b'\xff\xfe', None),
                (hello_body(None) + b'\x00', 'it ends inside the extensions length'),
                (hello_body(extension(16, b'h2'))[:-2] + b'\x00', None)]:
            with self.subTest(body=body[-8:]):
                self.assertBad(records(message(body)), text)

    def test_extension_lengths_that_lie(self):
        sni = server_name_ext(b'a.example')
        bad_ext = u16(16) + u16(200) + b'h2'
        self.assertBad(records(message(hello_body(sni + bad_ext))), 'extension 16 (200 bytes) runs past')
        block = sni + extension(16, b'h2')
        body = hello_body(None) + u16(len(block) + 4) + block
        self.assertBad(records(message(body)), 'extensions of')
        # An extension header cut short by the end of the block.
        body = hello_body(None) + u16(len(block) + 2) + block + b'\x00\x17'
        self.assertBad(records(message(body)), 'it ends inside an extension header')

    def test_server_name_extension_lies(self):
        def ext(data):
            return records(message(hello_body(extension(0, data))))
        for data, text in [
                (b'', 'does not fill its extension'),
                (b'\x00', 'does not fill its extension'),
                (b'\x00\x00', 'an empty server_name list'),
                (b'\x00\x0b\x00\x00\x09a.example', 'does not fill its extension'),
                (b'\x00\x0d\x00\x00\x09a.example', 'does not fill its extension'),
                (b'\x00\x0c\x00\x00\x0aa.example', 'runs past its list'),
                (b'\x00\x02\x00\x00', 'a server_name entry runs past its list'),
                (b'\x00\x03\x00\x00\x00', 'an empty server name'),
                (b'\x00\x0c\x00\x00\x09a.example\x00', 'does not fill its extension')]:
            with self.subTest(data=data):
                self.assertBad(ext(data), text)

    def test_two_server_name_extensions(self):
        self.assertBad(hello(b'a.example', extra=server_name_ext(b'b.example')),
                       'two server_name extensions')

    def test_bad_names(self):
        for name, text in [
                (b'a.example\x00.evil', 'byte 0x00'),
                (b'caf\xc3\xa9.example', 'byte 0xc3'),
                (b'a b.example', 'byte 0x20'),
                (b'a\r\nb', 'byte 0x0d'),
                (b'*.example', 'byte 0x2a'),
                (b'a..example', 'an empty label'),
                (b'.example', 'an empty label'),
                (b'.', 'an empty name'),
                (b'a.example..', 'an empty label'),
                (b'a' * 64 + b'.example', 'a label longer than 63'),
                (b'.'.join([b'a' * 63] * 4), 'longer than 253')]:
            with self.subTest(name=name):
                message_ = self.assertBad(hello(name), text)
                self.assertNotIn('\r', message_)
                self.assertNotIn('\x00', message_)

    def test_the_bound(self):
        def padded(total, sizes=(16384,)):
            """A hello of exactly total record bytes (a padding extension, RFC 7685)."""
            padding = 0
            while True:
                data = records(message(hello_body(server_name_ext(b'a.example') +
                                                  extension(21, bytes(padding)))), sizes)
                if len(data) == total:
                    return data
                padding += total - len(data)
        at_bound = padded(TLS_HELLO_MAX, (8000,))
        self.assertEqual(len(at_bound), TLS_HELLO_MAX)
        self.assertName(at_bound, 'a.example')
        self.assertBad(padded(TLS_HELLO_MAX + 1, (8000,)), 'TLS hello over 16384 bytes')
        # One record: 16384 bytes in all leaves 16379 for the message.
        self.assertName(padded(TLS_HELLO_MAX), 'a.example')
        self.assertBad(padded(TLS_HELLO_MAX + 1), 'TLS hello over 16384 bytes')

    def test_the_bound_before_the_bytes_come(self):
        # The handshake header alone says 20000 bytes: refused at once, nothing waited for.
        self.assertBad(b'\x16\x03\x01\x40\x00\x01\x00\x4e\x20', 'TLS hello over 16384 bytes')
        self.assertBad(b'\x16\x03\x01\x40\x00\x01\x01', 'TLS hello over 16384 bytes')
        self.assertBad(b'\x16\x03\x01\x40\x00\x01\xff\xff\xff', 'TLS hello over 16384 bytes')
        # A message that fits, in records whose headers take it past the bound: refused at
        # the header of the record that would end past it.
        body = hello_body(extension(21, bytes(16370 - 4 - len(hello_body(extension(21, b''))))))
        data = records(message(body), (8000,))
        self.assertEqual(len(data), 16370 + 15)
        self.assertIsNone(pydirector.parse_client_hello(data[:2 * 8005 + 4]))
        self.assertBad(data[:2 * 8005 + 5], 'TLS hello over 16384 bytes')

    def test_a_smaller_limit(self):
        data, _ = support.client_hello('chromium')
        self.assertBad(data, 'TLS hello over 1000 bytes', limit=1000)
        self.assertEqual(pydirector.parse_client_hello(data, len(data))[0], len(data))

    def test_data_types(self):
        data = hello(b'a.example')
        for kind in (bytes, bytearray, memoryview):
            self.assertEqual(pydirector.parse_client_hello(kind(data)), (len(data), 'a.example'))

    def test_reader_keeps_its_error(self):
        reader = pydirector.ClientHelloReader()
        with self.assertRaises(ValueError):
            reader.read(b'GET')
        with self.assertRaises(ValueError) as caught:
            reader.read(hello(b'a.example'))
        self.assertEqual(str(caught.exception), "not TLS: first byte 0x47 'G'")


# -- fuzz: real hellos, mutated ----------------------------------------------------

def length_fields(data):
    """(offset, width) of each length field of a one-record, well-formed hello."""
    fields = [(3, 2), (6, 3)]
    at = 9 + 2 + 32
    fields.append((at, 1))
    at += 1 + data[at]
    fields.append((at, 2))
    at += 2 + int.from_bytes(data[at:at + 2], 'big')
    fields.append((at, 1))
    at += 1 + data[at]
    if at == len(data):
        return fields
    fields.append((at, 2))
    at += 2
    while at < len(data):
        kind, length = int.from_bytes(data[at:at + 2], 'big'), int.from_bytes(data[at + 2:at + 4], 'big')
        fields.append((at + 2, 2))
        if kind == 0:
            fields += [(at + 4, 2), (at + 7, 2)]
        at += 4 + length
    return fields


def mutate(rng, data, fields):
    """One mutation of a real hello, of a kind chosen by rng."""
    data = bytearray(data)
    how = rng.randrange(8)
    if how == 0:        # flip a few bits
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif how == 1:      # a length field set to something else
        at, width = rng.choice(fields)
        old = int.from_bytes(data[at:at + width], 'big')
        new = rng.choice([0, 1, old - 1, old + 1, old - rng.randrange(1, 64), old + rng.randrange(1, 64),
                          rng.randrange(1 << (8 * width)), (1 << (8 * width)) - 1])
        data[at:at + width] = (new % (1 << (8 * width))).to_bytes(width, 'big')
    elif how == 2:      # cut short
        del data[rng.randrange(len(data)):]
    elif how == 3:      # bytes inserted
        at = rng.randrange(len(data) + 1)
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 17)))
    elif how == 4:      # bytes deleted
        at = rng.randrange(len(data))
        del data[at:at + rng.randrange(1, 17)]
    elif how == 5:      # a byte set
        data[rng.randrange(len(data))] = rng.choice([0, 0xff, 0x16, 0x03, rng.randrange(256)])
    elif how == 6:      # re-split into records, then one more mutation of the record layer
        handshake = handshake_of(bytes(data))
        data = bytearray(records(handshake, [rng.randrange(1, 700) for _ in range(10)],
                                 rng.choice([b'\x03\x01', b'\x03\x03'])))
        if rng.random() < 0.5:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    else:               # a run of bytes repeated (an extension twice, say)
        at = rng.randrange(len(data))
        piece = data[at:at + rng.randrange(1, 64)]
        data[at:at] = piece
    return bytes(data)


class FuzzTest(unittest.TestCase):
    """Thousands of mutated real hellos: only None, a result or ValueError; the same
    answer whole and in pieces; a result only where the plain reading agrees."""

    CASES = 1000    # per fixture

    def test_mutations(self):
        counts = {'need': 0, 'error': 0, 'result': 0}
        for index, (name, original, _) in enumerate(fixtures()):
            fields = length_fields(original)
            rng = random.Random(1300 + index)
            for case in range(self.CASES):
                data = mutate(rng, original, fields)
                if rng.random() < 0.3:
                    data = mutate(rng, data, fields)
                whole = outcome(pydirector.parse_client_hello, data)    # any other exception fails
                cuts = [rng.randrange(1, max(2, len(data))) for _ in range(rng.randrange(1, 6))]
                self.assertEqual(read_in_pieces(data, cuts)[1], whole, (name, case, data.hex()))
                expected = reference(data)
                if isinstance(whole, tuple) or expected[0] == 'ok':
                    self.assertEqual(whole, tuple(expected[1:]), (name, case, data.hex()))
                    self.assertLessEqual(whole[0], len(data))
                counts['result' if isinstance(whole, tuple) else whole] += 1
        # The mutations reach every kind of answer.
        for kind, count in counts.items():
            self.assertGreater(count, 100, (kind, counts))

    def test_memory_is_bounded(self):
        """Lengths that lie allocate nothing big: what a read holds is what it was given."""
        if tracemalloc is None:
            self.skipTest('no tracemalloc on this Python (PyPy): the same code is measured on CPython')
        hellos = fixtures()
        peaks = []
        for seed in range(200):
            rng = random.Random(seed)
            name, original, _ = hellos[seed % len(hellos)]
            data = bytearray(mutate(rng, original, length_fields(original)))
            at, width = rng.choice(length_fields(original))
            data[at:at + width] = rng.choice([b'\xff', b'\x7f']) * width
            data = bytes(data)
            tracemalloc.start()
            try:
                outcome(pydirector.parse_client_hello, data)
                reader = pydirector.ClientHelloReader()
                buffer = bytearray()
                for cut in range(0, len(data) + 97, 97):     # as a connection reads
                    buffer += data[cut - 97:cut] if cut else b''
                    outcome(reader.read, buffer)
                peaks.append(tracemalloc.get_traced_memory()[1])
            finally:
                tracemalloc.stop()
        # The hellos are at most 2 KB, and so is what the reader holds; a length
        # believed would be 16 MB or 64 KB.
        self.assertLess(max(peaks), 16384)

    def test_huge_claims_hold_nothing(self):
        # A record of 16379 bytes, the most the bound leaves one; a message of 0x3f?? bytes
        # may still fit, 0x3fff cannot.
        reader = pydirector.ClientHelloReader()
        self.assertIsNone(reader.read(b'\x16\x03\x01\x3f\xfb\x01\x00\x3f'))
        with self.assertRaises(ValueError):
            reader.read(b'\x16\x03\x01\x3f\xfb\x01\x00\x3f\xff')
        with self.assertRaises(ValueError):
            pydirector.parse_client_hello(b'\x16\x03\x01\x3f\xfc')


# -- sni patterns --------------------------------------------------------------------

class SniPatternTest(unittest.TestCase):

    def test_parse(self):
        self.assertEqual(pydirector.parse_sni('api.example.com,*.api.example.com'),
                         ['api.example.com', '*.api.example.com'])
        self.assertEqual(pydirector.parse_sni(' WWW.Example.com. , example.com '),
                         ['www.example.com', 'example.com'])
        self.assertEqual(pydirector.parse_sni('*'), ['*'])
        self.assertEqual(pydirector.parse_sni('*,www.example.com'), ['*', 'www.example.com'])
        self.assertEqual(pydirector.parse_sni('b\u00fccher.example,*.B\u00dcCHER.example'),
                         ['xn--bcher-kva.example', '*.xn--bcher-kva.example'])
        self.assertEqual(pydirector.parse_sni('xn--bcher-kva.example'), ['xn--bcher-kva.example'])
        self.assertEqual(pydirector.parse_sni('*.com,under_score.example'), ['*.com', 'under_score.example'])

    def test_parse_errors(self):
        for text, message in [
                ('', 'sni is empty'),
                ('  ', 'sni is empty'),
                ('a.example,,b.example', "sni 'a.example,,b.example' has an empty name"),
                ('a.example,', "has an empty name"),
                ('a..example', "'a..example': an empty label"),
                ('.example', "'.example': an empty label"),
                ('a' * 64 + '.example', 'a label longer than 63 characters'),
                ('.'.join(['a' * 63] * 4), 'longer than 253 characters'),
                ('a b.example', "character ' ' is not allowed"),
                ('a/b', "character '/' is not allowed"),
                ('*.', "'*.': an empty name"),
                ('*.a..b', "'*.a..b': an empty label"),
                ('a*.example', "'a*.example': '*' may only be the whole name"),
                ('a.*.example', "'*' may only be the whole name"),
                ('*.*.example', "'*' may only be the whole name"),
                ('**', "'*' may only be the whole name"),
                ('www.example.com,WWW.example.com.', "sni lists 'www.example.com' twice"),
                ('*,*', "sni lists '*' twice"),
                ('*.a.example,*.A.example', "sni lists '*.a.example' twice"),
                ('\u00fc' * 70 + '.example', 'a label longer than 63 characters'),
                (''.join(chr(0x4e00 + 997 * i) for i in range(20)), 'a label longer than 63 characters'),  # once encoded
                ('*.fa\u00df.de,*.FA\u00df.DE', "sni lists '*.xn--fa-hia.de' twice")]:
            with self.subTest(text=text):
                with self.assertRaises(ValueError) as caught:
                    pydirector.parse_sni(text)
                self.assertIn(message, str(caught.exception))

    # Each checked against the A-label curl 7.88.1 with libidn2 2.3.3 sends (UTS #46
    # non-transitional, as browsers): 'curl -k --connect-to ::127.0.0.1:PORT https://NAME/'.
    INTERNATIONAL = [
        ('fa\u00df.de', 'xn--fa-hia.de'),               # \u00df kept: IDNA 2003 made it fass.de
        ('FA\u00df.DE', 'xn--fa-hia.de'),
        ('\u03a3\u0391\u03a3.gr', 'xn--mxa9ab.gr'),       # each capital sigma alone: \u03c3\u03b1\u03c3
        ('\u03c3\u03b1\u03c2.gr', 'xn--mxa8ab.gr'),       # a final sigma is kept
        ('\u0130stanbul.tr', 'xn--istanbul-o0e.tr'),    # \u0130 -> i + U+0307
        ('\u0131.tr', 'xn--cfa.tr'),
        ('\u212a.example', 'k.example'),                # the Kelvin sign is a K
        ('\u4f8b\u3048\u3002jp', 'xn--r8jz45g.jp'),       # an ideographic full stop is a dot
        ('\u13a0.de', 'xn--58d.de'),                    # Cherokee folds to its capitals
        ('\u0390.gr', 'xn--owa.gr'),
        ('U\u0308.de', 'xn--tda.de'),                   # NFC
        ('\u00c5\u00c4\u00d6.se', 'xn--4cab6c.se'),
        ('\u041c\u041e\u0421\u041a\u0412\u0410.\u0440\u0444', 'xn--80adxhks.xn--p1ai'),
        ('\u65e5\u672c\u8a9e.jp', 'xn--wgv71a119e.jp'),
        ('\ud55c\uad6d.kr', 'xn--3e0b707e.kr'),
        ('b\u00fccher.Example.COM.', 'xn--bcher-kva.example.com'),
        ('XN--FA-HIA.de', 'xn--fa-hia.de'),              # A-labels as they are, in any case
        ('xn--1ug.example', 'xn--1ug.example')]          # a joiner is allowed in an A-label

    def test_international(self):
        for text, expected in self.INTERNATIONAL:
            with self.subTest(text=text):
                self.assertEqual(pydirector.normalize_server_name(text), expected)
        self.assertEqual(pydirector.parse_sni('*.fa\u00df.de, fass.de'), ['*.xn--fa-hia.de', 'fass.de'])

    def test_international_refused(self):
        """What clients map in ways the stdlib cannot repeat, what they refuse, and A-labels
        no client sends.  curl sends ss.de, fi.de, xn--xxa.de, a.de and xn--58d.de for the first five."""
        mapped = 'clients map it in ways not repeated here'
        for text, message in [
                ('\u1e9e.de', "character '\u1e9e' (U+1E9E): " + mapped),   # capital \u00df: ss or \u00df
                ('\ufb01.de', mapped), ('\u00b5.de', mapped), ('\uff21.de', mapped), ('\uab70.de', mapped),
                ('\u01c5.hr', mapped),
                ('a\u200db.example', "character '\\u200d' (U+200D) is dropped by some clients and kept by others"),
                ('\u0378.example', "character '\\u0378' (U+0378) is not assigned in Unicode"),
                ('\u00fc\u3000.de', "character '\\u3000' (U+3000) is not allowed in an international name"),
                ('\u00fc\x85.de', "character '\\x85' (U+0085) is not allowed in an international name"),
                ('\u2603.de', "character '\u2603' (U+2603) is not allowed"),
                ('\u00bd.de', "character '\u00bd' (U+00BD) is not allowed"),
                ('a\ufe0f\u00fc.de', "character '\ufe0f' (U+FE0F) is not allowed"),   # ignored by clients
                ('\u0640\u0628.example', "character '\u0640' (U+0640) is not allowed"),
                ('a_\u00fc.de', "character '_' (U+005F) is not allowed in an international label"),
                ('a b.\u00fc', "character ' ' is not allowed in a host name"),
                ('-\u00fc.de', "label '-\u00fc' starts or ends with '-'"),
                ('\u00fc-.de', "label '\u00fc-' starts or ends with '-'"),
                ('ab--\u00fc.de', "label 'ab--\u00fc' has '--' in positions 3 and 4"),
                ('\u0308a.de', "label '\u0308a' starts with a combining mark"),
                ('\u00fc..de', "'\u00fc..de': an empty label"),
                ('xn--zz-zz.de', "label 'xn--zz-zz' is not valid punycode"),
                ('xn--a_.de', "label 'xn--a_' is not valid punycode"),     # IndexError in Python 3.6's codec
                ('xn--a-.de', "label 'xn--a-' decodes to 'a': an A-label stands for a name that is not ASCII"),
                ('xn--.de', "label 'xn--' decodes to ''"),
                ('xn--abc.de', "label 'xn--abc' decodes to '\\x82\\x81\\x80': character '\\x82' (U+0082) is not"),
                ('xn---tda.de', "label 'xn---tda' decodes to '\u00fc', which clients send as 'xn--tda'"),
                ('xn--wca.de', "label 'xn--wca' decodes to '\u00dc', which clients send as 'xn--tda'"),   # not mapped yet
                ('xn--fa-hia.xn--ab\u00fc', "label 'xn--ab\u00fc' has '--' in positions 3 and 4"),
                ('a' * 300, 'longer than 253 characters')]:
            with self.subTest(text=text):
                with self.assertRaises(ValueError) as caught:
                    pydirector.parse_sni(text)
                self.assertIn(message, str(caught.exception))
                self.assertTrue(str(caught.exception).startswith(repr(text)[:40]), str(caught.exception))
        # A hello may carry any xn-- label (curl -k https://xn--a-.de/ sends it): explain takes one.
        self.assertEqual(pydirector.normalize_server_name('XN--A-.de'), 'xn--a-.de')

    def test_sni_text(self):
        self.assertEqual(pydirector.sni_text(pydirector.parse_sni('FA\u00df.de,*.B\u00fccher.example,www.example.com,*')),
                         'fa\u00df.de -> xn--fa-hia.de, *.b\u00fccher.example -> *.xn--bcher-kva.example, '
                         'www.example.com, *')

    def test_normalize(self):
        n = pydirector.normalize_server_name
        self.assertEqual(n('Example.COM.'), 'example.com')
        self.assertEqual(n('b\u00fccher.example'), 'xn--bcher-kva.example')
        self.assertEqual(n('B\u00dcCHER.example.'), 'xn--bcher-kva.example')
        for bad in ['', '.', 'a..b', 'a b', '*.example', 'a' * 64]:
            with self.assertRaises(ValueError):
                n(bad)


class SniMatcherTest(unittest.TestCase):

    def matcher(self, table):
        m = pydirector.SniMatcher()
        for service, text in table:
            for pattern in pydirector.parse_sni(text):
                m.add(pattern, service)
        return m

    TABLE = [('api', 'api.example.com,*.api.example.com'), ('www', 'www.example.com,example.com'),
             ('wild', '*.example.com'), ('deep', '*.eu.example.com'), ('other', '*')]

    def test_match(self):
        m = self.matcher(self.TABLE)
        for name, service, pattern in [
                ('api.example.com', 'api', 'api.example.com'),
                ('v1.api.example.com', 'api', '*.api.example.com'),
                ('a.b.c.api.example.com', 'api', '*.api.example.com'),
                ('www.example.com', 'www', 'www.example.com'),      # exact before *.example.com
                ('example.com', 'www', 'example.com'),
                ('mail.example.com', 'wild', '*.example.com'),
                ('x.y.example.com', 'wild', '*.example.com'),        # one or more labels
                ('eu.example.com', 'wild', '*.example.com'),         # *.eu.example.com wants one more
                ('fr.eu.example.com', 'deep', '*.eu.example.com'),   # the longer suffix first
                ('a.fr.eu.example.com', 'deep', '*.eu.example.com'),
                ('example.org', 'other', '*'),
                ('com', 'other', '*'),
                ('xexample.com', 'other', '*'),                     # a label boundary, not a string suffix
                (None, 'other', '*')]:                              # a hello without a name
            with self.subTest(name=name):
                self.assertEqual(m.match(name), (service, pattern))

    def test_order_does_not_matter(self):
        forward = self.matcher(self.TABLE)
        backward = self.matcher(list(reversed(self.TABLE)))
        names = ['api.example.com', 'v1.api.example.com', 'www.example.com', 'mail.example.com',
                 'fr.eu.example.com', 'example.org', None]
        self.assertEqual([forward.match(n) for n in names], [backward.match(n) for n in names])
        self.assertEqual(forward.patterns(), backward.patterns())

    def test_patterns_most_specific_first(self):
        self.assertEqual([p for p, _ in self.matcher(self.TABLE).patterns()],
                         ['api.example.com', 'example.com', 'www.example.com',
                          '*.api.example.com', '*.eu.example.com', '*.example.com', '*'])

    def test_without_default(self):
        m = self.matcher([('api', 'api.example.com'), ('wild', '*.example.com')])
        self.assertIsNone(m.match('example.com'))
        self.assertIsNone(m.match('example.org'))
        self.assertIsNone(m.match(None))
        self.assertEqual(m.match('a.example.com'), ('wild', '*.example.com'))

    def test_idna_config_matches_the_wire(self):
        data, name = support.client_hello('python-idna')
        m = self.matcher([('shop', 'b\u00fccher.example'), ('other', '*')])
        self.assertEqual(m.match(pydirector.parse_client_hello(data)[1]), ('shop', 'xn--bcher-kva.example'))

    def test_curl_idna_hello_lands_on_the_sharp_s(self):
        """curl asked for fa\u00df.de sends xn--fa-hia.de (IDNA 2003 would say fass.de)."""
        data, name = support.client_hello('curl-idna')
        self.assertEqual(pydirector.parse_client_hello(data)[1], 'xn--fa-hia.de')
        m = self.matcher([('sharp', 'FA\u00df.de'), ('ss', 'fass.de'), ('other', '*')])
        self.assertEqual(m.match(pydirector.parse_client_hello(data)[1]), ('sharp', 'xn--fa-hia.de'))
        self.assertEqual(m.match('fass.de'), ('ss', 'fass.de'))

    def test_real_hellos_land(self):
        m = self.matcher([('o', 'openssl.example.com'), ('c', '*.example.com'), ('d', '*')])
        landed = {name: m.match(pydirector.parse_client_hello(data)[1])[0] for name, data, _ in fixtures()}
        self.assertEqual(landed, {'openssl': 'o', 'openssl-tls12': 'c', 'python': 'c', 'python-nosni': 'd',
                                  'python-idna': 'd', 'curl': 'c', 'curl-idna': 'd', 'chromium': 'c'})

    def test_claimed_twice(self):
        class Service(object):
            def __init__(self, name):
                self.name = name
        api, www = Service('api'), Service('www')
        m = pydirector.SniMatcher()
        for pattern in ['api.example.com', '*.example.com', '*']:
            m.add(pattern, api)
        for pattern, message in [
                ('API.example.com.', "server name 'api.example.com' is already claimed by service 'api'"),
                ('*.Example.com', "server name '*.example.com' is already claimed by service 'api'"),
                ('*', "a second '*' on this address: service 'api' has it already")]:
            with self.subTest(pattern=pattern):
                with self.assertRaises(ValueError) as caught:
                    m.add(pattern, www)
                self.assertIn(message, str(caught.exception))
        # Overlapping is not claiming twice: the most specific wins.
        m.add('www.example.com', www)
        m.add('*.b.example.com', www)
        self.assertIs(m.match('www.example.com')[0], www)
        self.assertIs(m.match('a.b.example.com')[0], www)
        self.assertIs(m.match('b.example.com')[0], api)
        self.assertIs(m.owner('*.example.com'), api)
        self.assertIsNone(m.owner('nobody.example.com'))


# -- the TLS helpers, proved without the balancer ----------------------------------

class TLSHelpersTest(unittest.TestCase):
    """Clients straight to TLS backends: the certificate each saw, bytes through TLS."""

    @classmethod
    def setUpClass(cls):
        support.need_program('openssl')
        cls.backend = support.TLSBackend(['a.sni.test', 'b.sni.test'])
        cls.http = support.TLSBackend(['web.sni.test'], handler=support.https_say_name)

    @classmethod
    def tearDownClass(cls):
        cls.backend.close()
        cls.http.close()

    def test_certificates_are_their_names(self):
        cert, key = support.make_cert('c.sni.test')
        self.assertEqual(support.make_cert('c.sni.test'), (cert, key))   # made once
        self.assertTrue(os.path.exists(key))
        with open(cert) as f:
            der = support.ssl.PEM_cert_to_DER_cert(f.read())
        self.assertEqual(support.cert_name(der), 'c.sni.test')
        self.assertIsNone(support.cert_name(b'not a certificate'))

    def test_python_client(self):
        for server_hostname, seen in [('b.sni.test', 'b.sni.test'), (None, 'a.sni.test'),
                                      ('a.sni.test', 'a.sni.test'), ('other.test', 'a.sni.test')]:
            with self.subTest(server_hostname=server_hostname):
                before = len(self.backend.server_names)
                tls, name = support.tls_connect(self.backend.port, server_hostname)
                tls.close()
                # Without SNI, or with a name it lacks, the backend shows its first name's certificate.
                self.assertEqual(name, seen)
                support.wait_until(lambda: len(self.backend.server_names) > before)
                self.assertEqual(self.backend.server_names[before], server_hostname)

    def test_64k_echo_through_tls(self):
        data = bytes(random.Random(13).getrandbits(8) for _ in range(65536))
        name, echoed = support.tls_exchange(self.backend.port, data, 'a.sni.test', expect=len(data))
        self.assertEqual(name, 'a.sni.test')
        self.assertEqual(len(echoed), len(data))
        self.assertTrue(echoed == data, 'the echo differs')

    def test_say_name_through_tls(self):
        backend = support.TLSBackend('n.sni.test', handler=support.say_name)
        try:
            self.assertEqual(support.tls_exchange(backend.port, server_hostname='n.sni.test'),
                             ('n.sni.test', b'n.sni.test'))
        finally:
            backend.close()

    def test_openssl_client(self):
        self.assertEqual(support.openssl_client(self.backend.port, 'b.sni.test'), 'b.sni.test')
        self.assertEqual(support.openssl_client(self.backend.port), 'a.sni.test')
        self.assertIsNone(support.openssl_client(support.free_port(), 'b.sni.test'))  # refused

    def test_curl_client(self):
        support.need_program('curl')
        self.assertEqual(support.curl_client(self.http.port, 'web.sni.test'),
                         ('web.sni.test', b'web.sni.test'))
        support.wait_until(lambda: 'web.sni.test' in self.http.server_names)

    def test_ipv6(self):
        try:
            backend = support.TLSBackend('v6.sni.test', family=socket.AF_INET6, host='::1')
        except OSError as e:
            raise unittest.SkipTest('no IPv6 loopback: %s' % e)
        try:
            self.assertEqual(support.tls_exchange(backend.port, b'six', 'v6.sni.test', expect=3, host='::1'),
                             ('v6.sni.test', b'six'))
            self.assertEqual(support.openssl_client(backend.port, 'v6.sni.test', host='::1'), 'v6.sni.test')
            backend.tls_handler = support.https_say_name
            support.need_program('curl')
            self.assertEqual(support.curl_client(backend.port, 'v6.sni.test', host='::1'),
                             ('v6.sni.test', b'v6.sni.test'))
        finally:
            backend.close()


if __name__ == '__main__':
    unittest.main()
