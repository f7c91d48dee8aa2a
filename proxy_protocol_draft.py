"""Draft of pydirector's PROXY protocol section (the lead pastes it into
pydirector.py after the Loop section).  Standard library only; pydirector.py
already imports both modules below."""

import ipaddress
import socket

# PROXY-PROTOCOL-SECTION-START
# ---------------------------------------------------------------------------
# PROXY protocol: the header a proxy puts in front of a relayed stream to say
# who the real client was (HAProxy's proxy-protocol.txt, versions 1 and 2).
#
# Version 1 is one text line, "PROXY TCP4 src dst sport dport\r\n", at most
# 107 bytes.  Version 2 is a 12-byte binary signature, a version/command byte,
# a family/transport byte, a 16-bit length and that many bytes of addresses
# (then optional TLVs, which we skip).  The parser works on whatever prefix
# has arrived: None means "need more bytes", ValueError means "this can never
# become a valid header", decided at the first byte that proves it.
# ---------------------------------------------------------------------------

PROXY_V1_SIGNATURE = b'PROXY '
PROXY_V1_MAX = 107        # the longest line the spec allows, CRLF included
PROXY_V2_SIGNATURE = b'\r\n\r\n\x00\r\nQUIT\n'
PROXY_V2_FIXED = 16       # signature, version/command, family, length
PROXY_V2_MAX_LENGTH = 65535   # the length field is 16 bits: nothing longer can be announced
PROXY_HEADER_MAX = PROXY_V2_FIXED + PROXY_V2_MAX_LENGTH  # the most a reader may need to hold

_V2_LOCAL, _V2_PROXY = 0x20, 0x21
_V2_UNSPEC, _V2_TCP4, _V2_TCP6 = 0x00, 0x11, 0x21
# Family/transport bytes a PROXY command may carry, and their address block size.
# UDP and UNIX are valid but say nothing usable about a TCP client: we fall back
# to the real peer, as the spec allows.
_V2_ADDRESS_SIZE = {0x00: 0, 0x11: 12, 0x12: 12, 0x21: 36, 0x22: 36, 0x31: 216, 0x32: 216}

_V1_PROTOCOLS = (b'TCP4', b'TCP6', b'UNKNOWN')
_V1_FIELD_BYTES = frozenset(b'0123456789abcdefABCDEF.: \r\n')
_DIGITS = frozenset(b'0123456789')
_HEX_COLON_DOT = frozenset(b'0123456789abcdefABCDEF:.')


def _ip_of(addr):
    """The ipaddress object of a socket address tuple, or None (AF_UNIX, unknown, junk)."""
    if not isinstance(addr, tuple) or len(addr) < 2 or not isinstance(addr[0], str):
        return None
    try:
        # getpeername() of a link-local IPv6 peer gives 'fe80::1%eth0': the scope is local detail.
        return ipaddress.ip_address(addr[0].split('%', 1)[0])
    except ValueError:
        return None


def _port_of(addr):
    port = addr[1]
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError('bad port %r' % (port,))
    return port


def _as_ipv4(ip):
    if ip.version == 4:
        return ip
    return ip.ipv4_mapped  # None unless ::ffff:a.b.c.d


def _as_ipv6(ip):
    if ip.version == 6:
        return ip
    return ipaddress.IPv6Address(b'\0' * 10 + b'\xff\xff' + ip.packed)


def _header_addresses(client_addr, server_addr):
    """(4 or 6 or None, client ip, server ip, client port, server port) for a header.

    Both IPv4 (plain or mapped into IPv6, as a dual-stack listener sees v4
    clients) -> IPv4.  Otherwise IPv6 for both, an IPv4 side mapped into IPv6.
    None when an address is not IP at all."""
    client, server = _ip_of(client_addr), _ip_of(server_addr)
    if client is None or server is None:
        return None, None, None, 0, 0
    ports = _port_of(client_addr), _port_of(server_addr)
    client4, server4 = _as_ipv4(client), _as_ipv4(server)
    if client4 is not None and server4 is not None:
        return (4, client4, server4) + ports
    return (6, _as_ipv6(client), _as_ipv6(server)) + ports


def _ipv6_hex_text(ip):
    """RFC 5952 text in hex groups only: version 1 asks for that, and Python 3.13
    started writing mapped addresses as '::ffff:1.2.3.4'."""
    packed = ip.packed  # not .exploded: 3.13 explodes mapped addresses with a dotted tail too
    groups = ['%x' % int.from_bytes(packed[i:i + 2], 'big') for i in range(0, 16, 2)]
    best_start, best_len, start = -1, 1, None   # only runs of two or more zeros collapse
    for i, g in enumerate(groups + ['end']):
        if g == '0':
            if start is None:
                start = i
        elif start is not None:
            if i - start > best_len:
                best_start, best_len = start, i - start
            start = None
    if best_start < 0:
        return ':'.join(groups)
    return (':'.join(groups[:best_start]) + '::' + ':'.join(groups[best_start + best_len:]))


def proxy_header_v1(client_addr, server_addr):
    """b'PROXY TCP4 client server cport sport\\r\\n' for a connection from
    client_addr to server_addr (socket address tuples); b'PROXY UNKNOWN\\r\\n'
    when one of them is not an IP address."""
    family, client, server, client_port, server_port = _header_addresses(client_addr, server_addr)
    if family is None:
        return b'PROXY UNKNOWN\r\n'
    if family == 4:
        texts = str(client), str(server)
    else:
        texts = _ipv6_hex_text(client), _ipv6_hex_text(server)
    return ('PROXY TCP%d %s %s %d %d\r\n' % ((family,) + texts + (client_port, server_port))).encode('ascii')


def proxy_header_v2(client_addr, server_addr):
    """The binary header: PROXY command, TCP over IPv4 or IPv6, no TLVs; when
    an address is not IP, PROXY with an unspecified family and no addresses
    (the receiver then uses the real peer)."""
    family, client, server, client_port, server_port = _header_addresses(client_addr, server_addr)
    if family is None:
        return PROXY_V2_SIGNATURE + bytes([_V2_PROXY, _V2_UNSPEC, 0, 0])
    block = (client.packed + server.packed +
             client_port.to_bytes(2, 'big') + server_port.to_bytes(2, 'big'))
    return (PROXY_V2_SIGNATURE + bytes([_V2_PROXY, _V2_TCP4 if family == 4 else _V2_TCP6]) +
            len(block).to_bytes(2, 'big') + block)


def parse_proxy_header(data, accept='any', limit=PROXY_HEADER_MAX):
    """Read a PROXY header from the start of data (bytes or bytearray).

    accept is 'v1', 'v2' or 'any'.  Returns None while more bytes are needed,
    else (consumed, source, dest): consumed is the header's length in bytes,
    source and dest are (ip_text, port), or both None for v1 UNKNOWN and v2
    LOCAL / non-TCP families (use the real peer then).  Raises ValueError as
    soon as data cannot be the start of an acceptable header, or when a v2
    header announces more than limit bytes in all."""
    if accept not in ('v1', 'v2', 'any'):
        raise ValueError('accept must be v1, v2 or any, not %r' % (accept,))
    if not data:
        return None
    first = data[0]
    if first == PROXY_V1_SIGNATURE[0]:
        if accept == 'v2':
            raise ValueError('a PROXY v1 header or other text where only v2 is accepted')
        return _parse_v1(data)
    if first == PROXY_V2_SIGNATURE[0]:
        if accept == 'v1':
            raise ValueError('a PROXY v2 header or other binary where only v1 is accepted')
        return _parse_v2(data, limit)
    raise ValueError('not a PROXY protocol header (first byte 0x%02x)' % first)


def _parse_v1(data):
    size = min(len(data), len(PROXY_V1_SIGNATURE))
    if data[:size] != PROXY_V1_SIGNATURE[:size]:
        raise ValueError('bad PROXY v1 signature')
    if size < len(PROXY_V1_SIGNATURE):
        return None
    end = data.find(b'\r\n', 0, PROXY_V1_MAX)
    line = bytes(data[len(PROXY_V1_SIGNATURE):end if end >= 0 else PROXY_V1_MAX])
    fields = line.split(b' ')
    protocol = fields[0].split(b'\r', 1)[0]
    if end < 0 and len(fields) == 1 and b'\r' not in fields[0]:
        # Still reading the protocol name: is it the start of one we know?
        if not any(p.startswith(protocol) for p in _V1_PROTOCOLS):
            raise ValueError('PROXY v1: unknown protocol %r' % protocol.decode('latin-1'))
    elif protocol not in _V1_PROTOCOLS:
        raise ValueError('PROXY v1: unknown protocol %r' % protocol.decode('latin-1'))
    if protocol == b'UNKNOWN':
        # The sender may put anything before the CRLF; the receiver ignores it.
        if end >= 0:
            return end + 2, None, None
    else:
        _check_v1_fields(protocol, line, end >= 0)
        if end >= 0:
            return end + 2, _v1_address(fields[1], fields[3]), _v1_address(fields[2], fields[4])
    if len(data) >= PROXY_V1_MAX:
        raise ValueError('PROXY v1: no CRLF within %d bytes' % PROXY_V1_MAX)
    return None


def _check_v1_fields(protocol, line, complete):
    """Reject a TCP4/TCP6 line, whole or partial, at the first wrong byte we can see."""
    for i, byte in enumerate(line[len(protocol):], len(protocol)):
        if byte not in _V1_FIELD_BYTES:
            raise ValueError('PROXY v1: unexpected byte 0x%02x' % byte)
        if byte == 0x0a:  # b'\n' (complete lines stop before their CRLF)
            raise ValueError('PROXY v1: LF without CR')
        if byte == 0x0d and i + 1 < len(line):  # CRLF is past the line, so this CR is alone
            raise ValueError('PROXY v1: CR without LF')
    fields = line.rstrip(b'\r').split(b' ')
    if len(fields) > 5:
        raise ValueError('PROXY v1: too many fields')
    if complete and len(fields) < 5:
        raise ValueError('PROXY v1: %d fields where 5 are needed' % len(fields))
    if not complete and line.endswith(b'\r') and len(fields) < 5:
        raise ValueError('PROXY v1: line ends after %d fields, 5 are needed' % len(fields))
    last = len(fields) - 1
    for i, field in enumerate(fields[1:], 1):
        whole = complete or i < last or line.endswith(b'\r')
        if whole and not field:
            raise ValueError('PROXY v1: empty field %d' % (i + 1))
        if i in (1, 2):
            if protocol == b'TCP4':
                _check_ipv4_text(field, whole)
            else:
                _check_ipv6_text(field, whole)
        else:
            _check_port_text(field, whole)


def _check_ipv4_text(field, whole):
    """Four decimal numbers 0-255 without leading zeros ('01' could be read as octal)."""
    if b':' in field:
        raise ValueError('PROXY v1: an IPv6 address in a TCP4 line')
    parts = field.split(b'.')
    if len(field) > 15 or len(parts) > 4 or (whole and len(parts) != 4):
        raise ValueError('PROXY v1: bad IPv4 address %r' % field.decode('latin-1'))
    for j, part in enumerate(parts):
        last_partial = not whole and j == len(parts) - 1
        if not part and not last_partial:
            raise ValueError('PROXY v1: bad IPv4 address %r' % field.decode('latin-1'))
        if (not set(part) <= _DIGITS or len(part) > 3 or (len(part) > 1 and part[:1] == b'0')
                or (part and int(part) > 255)):
            raise ValueError('PROXY v1: bad IPv4 address %r' % field.decode('latin-1'))


def _check_ipv6_text(field, whole):
    # The longest form, eight full groups or six with a dotted IPv4 tail, is 45 bytes.
    if not set(field) <= _HEX_COLON_DOT or len(field) > 45:
        raise ValueError('PROXY v1: bad IPv6 address %r' % field.decode('latin-1'))
    if not whole:
        return
    if b':' not in field:
        raise ValueError('PROXY v1: an IPv4 address in a TCP6 line')
    try:
        socket.inet_pton(socket.AF_INET6, field.decode('ascii'))
    except (OSError, ValueError):
        raise ValueError('PROXY v1: bad IPv6 address %r' % field.decode('latin-1'))


def _check_port_text(field, whole):
    if (not set(field) <= _DIGITS or len(field) > 5 or (len(field) > 1 and field[:1] == b'0')
            or (field and int(field) > 65535) or (whole and not field)):
        raise ValueError('PROXY v1: bad port %r' % field.decode('latin-1'))


def _v1_address(ip_field, port_field):
    text = ip_field.decode('ascii')
    if ':' in text:
        # Normalised the way accept() writes addresses ('FE80::01' -> 'fe80::1').
        text = socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, text))
    return text, int(port_field)


def _parse_v2(data, limit):
    size = min(len(data), len(PROXY_V2_SIGNATURE))
    if data[:size] != PROXY_V2_SIGNATURE[:size]:
        raise ValueError('bad PROXY v2 signature')
    if len(data) <= len(PROXY_V2_SIGNATURE):
        return None
    version_command = data[12]
    if version_command >> 4 != 2:
        raise ValueError('PROXY protocol version %d is not supported' % (version_command >> 4))
    if version_command not in (_V2_LOCAL, _V2_PROXY):
        raise ValueError('PROXY v2: unknown command %d' % (version_command & 0x0f))
    if len(data) < 14:
        return None
    family = data[13]
    if version_command == _V2_PROXY and family not in _V2_ADDRESS_SIZE:
        raise ValueError('PROXY v2: unknown address family/transport 0x%02x' % family)
    if len(data) < PROXY_V2_FIXED:
        return None
    length = int.from_bytes(bytes(data[14:16]), 'big')
    consumed = PROXY_V2_FIXED + length
    if consumed > limit:
        raise ValueError('PROXY v2: header of %d bytes is longer than %d' % (consumed, limit))
    if version_command == _V2_PROXY and length < _V2_ADDRESS_SIZE[family]:
        raise ValueError('PROXY v2: %d address bytes where family 0x%02x needs %d'
                         % (length, family, _V2_ADDRESS_SIZE[family]))
    if len(data) < consumed:
        return None
    if version_command == _V2_LOCAL or family not in (_V2_TCP4, _V2_TCP6):
        return consumed, None, None
    if family == _V2_TCP4:
        af, size = socket.AF_INET, 4
    else:
        af, size = socket.AF_INET6, 16
    block = bytes(data[PROXY_V2_FIXED:PROXY_V2_FIXED + 2 * size + 4])
    source = socket.inet_ntop(af, block[:size]), int.from_bytes(block[2 * size:2 * size + 2], 'big')
    dest = socket.inet_ntop(af, block[size:2 * size]), int.from_bytes(block[2 * size + 2:], 'big')
    return consumed, source, dest
