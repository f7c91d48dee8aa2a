#!/usr/bin/env python3
"""pydirector: a TCP load balancer in pure standard-library Python.

It takes inbound TCP connections and relays each to one backend host chosen
by a scheduler, failing over transparently when a host does not answer.
A revival of Python Director (Anthony Baxter, 2002-2004).

    python3 pydirector.py -c sample.xml

Sections, in the order a reader meets them: Config, Loop, Proxying, Manager,
Director, Command line.
"""

import argparse
import base64
import binascii
import collections
import concurrent.futures
import errno
import fcntl
import hashlib
import heapq
import hmac
import ipaddress
import logging
import logging.handlers
import os
import re
import selectors
import signal
import socket
import sys
import _socket
import threading
import time
import unicodedata
import warnings
from xml.etree import ElementTree
from xml.parsers import expat
from xml.sax import saxutils

import schedulers

VERSION = '2.0.0'

log = logging.getLogger('pydirector')
access_log = logging.getLogger('pydirector.access')

# CONFIG-SECTION-START
# ---------------------------------------------------------------------------
# Config: the XML file read into plain objects, checked, and written back.
#
# Python Director 1.0 files load unchanged (<client> for <host>, nameless
# hosts, crypt() passwords, <note> comments).  Every problem is a ConfigError
# "FILE:LINE: message" naming the element at fault.
# ---------------------------------------------------------------------------

import logging.handlers         # SysLogHandler.facility_names, to check <logging facility>


class ConfigError(Exception):
    """A config file that cannot be used.  str() is 'FILE:LINE: message'
    ('FILE: message' when there is no line); the parts are kept as
    .path, .line and .message."""

    def __init__(self, message, path=None, line=None):
        self.message = message
        self.path = path
        self.line = line
        if path is not None and line is not None:
            text = f'{path}:{line}: {message}'
        elif path is not None:
            text = f'{path}: {message}'
        else:
            text = message
        Exception.__init__(self, text)


class Config(object):
    """A whole <pdconfig>: services in file order, the optional admin server,
    logging, how long to let connections drain on shutdown, and the user and
    group to run as (names or numeric ids as text; None: stay as started)."""

    def __init__(self, path=None, services=None, admin=None, logging=None, drain=10.0,
                 user=None, group=None):
        self.path = path
        self.services = list(services or [])
        self.admin = admin
        self.logging = logging if logging is not None else Logging()
        self.drain = drain
        self.user = user
        self.group = group

    def service(self, name):
        for service in self.services:
            if service.name == name:
                return service
        return None

    def to_xml(self):
        """The config as a file parse_config accepts (running.xml), one
        element per line; defaults are written only where they differ."""
        out = []
        root = [('drain', _format_seconds(self.drain) if self.drain != 10.0 else None),
                ('user', self.user), ('group', self.group)]
        out.append(_xml_tag(0, 'pdconfig', root, '>'))
        for service in self.services:
            out.append(_xml_tag(1, 'service', [
                ('name', service.name), ('maxconns', service.maxconns or None)], '>'))
            for listen in service.listens:
                out.append(_xml_tag(2, 'listen', [
                    ('ip', listen.text), ('accept_proxy', listen.accept_proxy),
                    ('trusted', ','.join(map(_network_text, listen.trusted)) or None)]))
            for action, network in service.acl:
                out.append(_xml_tag(2, action, [('cidr', _network_text(network))]))
            for group in service.groups:
                attrs = [('name', group.name), ('scheduler', group.scheduler)]
                if not group.hosts:
                    out.append(_xml_tag(2, 'group', attrs))
                    continue
                out.append(_xml_tag(2, 'group', attrs, '>'))
                for host in group.hosts:
                    out.append(_xml_tag(3, 'host', [
                        ('name', host.name), ('ip', host.ip),
                        ('weight', host.weight if host.weight != 1 else None),
                        ('maxconns', host.maxconns if host.maxconns != 0 else None),
                        ('send_proxy', host.send_proxy)]))
                out.append('    </group>')
            # Always written, though it defaults to the first group: which
            # group is live is the one thing an operator reads running.xml for.
            if service.enabled is not None:
                out.append(_xml_tag(2, 'enable', [('group', service.enabled)]))
            if service.check is not None:
                out.append(_xml_tag(2, 'check', service.check._xml_attrs()))
            attrs = service.timeouts._xml_attrs() if service.timeouts is not None else []
            if any(value is not None for _, value in attrs):
                out.append(_xml_tag(2, 'timeouts', attrs))
            out.append('  </service>')
        if self.admin is not None:
            admin = self.admin
            out.append(_xml_tag(1, 'admin', [
                ('listen', admin.listen), ('certfile', admin.certfile),
                ('keyfile', admin.keyfile)], '>'))
            for user in admin.users:
                out.append(_xml_tag(2, 'user', [
                    ('name', user.name), ('password', user.password), ('access', user.access)]))
            out.append('  </admin>')
        attrs = self.logging._xml_attrs() if self.logging is not None else []
        if any(value is not None for _, value in attrs):
            out.append(_xml_tag(1, 'logging', attrs))
        out.append('</pdconfig>')
        return '\n'.join(out) + '\n'


class Service(object):
    """A <service>: where it listens, its groups of hosts, and which group is
    enabled (a group name).  check is None when the file has no <check>
    (DEFAULT_CHECK applies then); timeouts is always set.  maxconns caps the
    service's open clients (0 = unlimited); acl is the <allow>/<deny> rules
    in file order, as ('allow' or 'deny', ipaddress network) pairs."""

    def __init__(self, name, listens=None, groups=None, enabled=None, check=None,
                 timeouts=None, line=None, maxconns=0, acl=None):
        self.name = name
        self.listens = list(listens or [])
        self.groups = list(groups or [])
        if enabled is None and self.groups:
            enabled = self.groups[0].name
        self.enabled = enabled
        self.check = check
        self.timeouts = timeouts if timeouts is not None else Timeouts()
        self.line = line
        self.maxconns = maxconns
        self.acl = list(acl or [])

    def group(self, name):
        for group in self.groups:
            if group.name == name:
                return group
        return None

    def allows(self, ip_text):
        """True if this service's <allow>/<deny> rules let ip_text in."""
        return acl_allows(self.acl, ip_text)

    def __repr__(self):
        return f'Service({self.name!r})'


class Listen(object):
    """One <listen ip="...">: text as written, host and port to bind
    ('*' becomes '0.0.0.0', '[::]' becomes '::').  accept_proxy is None, or
    'v1', 'v2' or 'any': the PROXY protocol header versions read from each
    peer first; trusted lists the networks that may send one (empty: any)."""

    def __init__(self, text, host, port, line=None, accept_proxy=None, trusted=None):
        self.text = text
        self.host = host
        self.port = port
        self.line = line
        self.accept_proxy = accept_proxy
        self.trusted = list(trusted or [])

    def __repr__(self):
        return f'Listen({self.text!r})'


class Group(object):
    """A <group> of hosts and the scheduler spec that picks among them."""

    def __init__(self, name, scheduler, hosts=None, line=None):
        self.name = name
        self.scheduler = scheduler
        self.hosts = list(hosts or [])
        self.line = line

    def host(self, name):
        for host in self.hosts:
            if host.name == name:
                return host
        return None

    def __repr__(self):
        return f'Group({self.name!r}, {self.scheduler!r})'


class Host(object):
    """A backend <host>: ip as written, host (no brackets) and port to
    connect to.  Names are not resolved here; that happens at run time.
    send_proxy is None, 'v1' or 'v2': the PROXY header version to send it."""

    def __init__(self, name, ip, host, port, weight=1, maxconns=0, line=None, send_proxy=None):
        self.name = name
        self.ip = ip
        self.host = host
        self.port = port
        self.weight = weight
        self.maxconns = maxconns     # 0 = unlimited
        self.line = line
        self.send_proxy = send_proxy

    def __repr__(self):
        return f'Host({self.name!r}, {self.ip!r})'


class Check(object):
    """How the manager probes a service's hosts.  send and expect are bytes
    (or None: connect only); send_text and expect_text keep the escaped
    text from the file so to_xml writes it back as the operator wrote it."""

    def __init__(self, interval=5.0, timeout=2.0, rise=2, fall=3, send=None, expect=None,
                 line=None, send_text=None, expect_text=None, on_down='keep'):
        self.interval = interval
        self.timeout = timeout
        self.rise = rise
        self.fall = fall
        self.send = send
        self.expect = expect
        self.line = line
        self.send_text = send_text
        self.expect_text = expect_text
        self.on_down = on_down    # 'close': a host the checks take down loses its connections

    def _xml_attrs(self):
        return [
            ('interval', _format_seconds(self.interval) if self.interval != 5.0 else None),
            ('timeout', _format_seconds(self.timeout) if self.timeout != 2.0 else None),
            ('rise', self.rise if self.rise != 2 else None),
            ('fall', self.fall if self.fall != 3 else None),
            ('send', _bytes_text(self.send, self.send_text)),
            ('expect', _bytes_text(self.expect, self.expect_text)),
            ('on_down', self.on_down if self.on_down != 'keep' else None),
        ]


DEFAULT_CHECK = Check()


class Timeouts(object):
    """Seconds allowed to connect to a host, for a connection to sit idle,
    and for a client to wait in the queue while every host is full."""

    def __init__(self, connect=3.0, idle=3600.0, line=None, queue=5.0):
        self.connect = connect
        self.idle = idle
        self.line = line
        self.queue = queue

    def _xml_attrs(self):
        return [
            ('connect', _format_seconds(self.connect) if self.connect != 3.0 else None),
            ('idle', _format_seconds(self.idle) if self.idle != 3600.0 else None),
            ('queue', _format_seconds(self.queue) if self.queue != 5.0 else None),
        ]


class Admin(object):
    """The <admin> web server: where it listens, its users, and the TLS
    certificate and key (both None for plain HTTP)."""

    def __init__(self, listen, host, port, users=None, certfile=None, keyfile=None, line=None):
        self.listen = listen
        self.host = host
        self.port = port
        self.users = list(users or [])
        self.certfile = certfile
        self.keyfile = keyfile
        self.line = line

    def user(self, name):
        for user in self.users:
            if user.name == name:
                return user
        return None


class User(object):
    """An admin <user>; password is the stored hash, access 'full' or 'readonly'."""

    def __init__(self, name, password, access='full', line=None):
        self.name = name
        self.password = password
        self.access = access
        self.line = line

    def __repr__(self):
        return f'User({self.name!r}, access={self.access!r})'


class Logging(object):
    """Where the log goes: a file path, or None for stderr; and/or syslog.
    syslog is the text as written (None: no syslog) and syslog_address what
    SysLogHandler takes: the socket path, or (host, port) for UDP.  access
    is whether to log one line per client connection."""

    def __init__(self, file=None, line=None, access=True, syslog=None, facility='daemon'):
        self.file = file
        self.line = line
        self.access = access
        self.syslog = syslog
        self.facility = facility

    @property
    def syslog_address(self):
        return parse_syslog(self.syslog) if self.syslog is not None else None

    def _xml_attrs(self):
        return [
            ('file', self.file or None),
            ('access', 'off' if not self.access else None),
            ('syslog', self.syslog),
            ('facility', self.facility if self.facility != 'daemon' else None),
        ]


def load_config(path):
    """Read and check the config file at path; ConfigError for anything wrong."""
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f'cannot read config: {e.strerror or e}', path)
    return parse_config(data, path)


def parse_config(data, path='<config>'):
    """Check and read a config from bytes or str; path is only for messages."""
    root, lines = _read_xml(data, path)
    return _ConfigReader(path, lines).read(root)


# -- addresses, names, numbers ----------------------------------------------

_HOST_NAME = re.compile(r'[A-Za-z0-9_-]{1,63}(\.[A-Za-z0-9_-]{1,63})*\.?')


def parse_address(text):
    """'host:port', '[v6]:port' or '*:port' -> (host, port).  host is the name
    or address without brackets ('*' gives '0.0.0.0'); names are not
    resolved.  ValueError says what is wrong, starting with the text quoted."""
    if text.startswith('['):
        close = text.find(']')
        if close < 0 or text[close + 1:close + 2] != ':' or close == 1:
            raise ValueError(f'{text!r} needs host:port')
        host, port_text = text[1:close], text[close + 2:]
        address, _, scope = host.partition('%')
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            raise ValueError(f'{text!r}: {host!r} is not an IPv6 address') from None
        if '%' in host and not re.fullmatch(r'[A-Za-z0-9_.-]+', scope):
            raise ValueError(f'{text!r}: {host!r} is not an IPv6 address')
    else:
        host, colon, port_text = text.rpartition(':')
        if not colon or not host:
            raise ValueError(f'{text!r} needs host:port')
        if ':' in host:
            # '::1:80' is ambiguous without brackets, so refuse to guess.
            raise ValueError(f"{text!r}: IPv6 addresses need brackets, like '[::1]:80'")
        if host == '*':
            host = '0.0.0.0'
        elif re.fullmatch(r'[0-9.]+', host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise ValueError(f'{text!r}: {host!r} is not an IP address') from None
        elif not _HOST_NAME.fullmatch(host) or len(host) > 253:
            raise ValueError(f'{text!r}: {host!r} is not a host name or IP address')
    if not port_text:
        raise ValueError(f'{text!r} needs host:port')
    if not re.fullmatch(r'[0-9]{1,5}', port_text) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f'{text!r}: port must be 1-65535')
    return host, int(port_text)


def check_name(text, what):
    """ValueError unless text is usable as a name; what is e.g. 'host name'.
    Names end up in log lines and admin pages, so control characters
    (newlines especially, which could forge log lines) are refused."""
    if not text:
        raise ValueError(f'{what} is empty')
    if not text.strip():
        raise ValueError(f'{what} {text!r} is only whitespace')
    if any(unicodedata.category(ch) in ('Cc', 'Cf', 'Zl', 'Zp') for ch in text):
        raise ValueError(f'{what} {text!r} contains a control character')


def check_account(text, what):
    """ValueError unless text is a user or group name, or a numeric id;
    what is 'user' or 'group'.  Whether it exists is checked at run time."""
    if not (re.fullmatch(r'[A-Za-z_][A-Za-z0-9_.-]*\$?', text)
            or re.fullmatch(r'[0-9]{1,10}', text) and int(text) < 2 ** 32 - 1):
        raise ValueError(f'{text!r}: must be a {what} name or a numeric id')


_IPV4_DOTTED = re.compile(r'(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}')


def parse_network(text):
    """'10.0.0.0/8', '2001:db8::/32' or one address -> an ipaddress network.
    Host bits are masked off ('10.1.2.3/8' is 10.0.0.0/8), as nginx and
    HAProxy do.  Zero-padded IPv4 ('010.0.0.1') is refused on every Python,
    not just those since 3.9.5: some tools read it as octal."""
    address, slash, prefix = text.partition('/')
    ok = (bool(address) and '%' not in address
          and (not slash or re.fullmatch(r'0|[1-9][0-9]{0,2}', prefix) is not None)
          and (':' in address or _IPV4_DOTTED.fullmatch(address) is not None))
    if ok:
        try:
            return ipaddress.ip_network(text, strict=False)
        except ValueError:
            pass
    raise ValueError(f'{text!r} is not an IP network (like 10.0.0.0/8, 2001:db8::/32 or 127.0.0.1)')


def _network_text(network):
    # A one-address network is written as the bare address.
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return network.with_prefixlen


def acl_allows(rules, ip_text):
    """True if a client at ip_text may connect under rules, a list of
    ('allow' or 'deny', network) pairs: the first rule whose network holds
    the address decides; when none does, the client is refused if there is
    any 'allow' rule (a whitelist) and let in otherwise (a blacklist).
    An IPv4-mapped IPv6 address (::ffff:10.0.0.1) counts as its IPv4
    address; an address never matches a network of the other version.
    ip_text may be an ipaddress address; anything unparsable is refused."""
    if isinstance(ip_text, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        address = ip_text
    else:
        if not isinstance(ip_text, str):
            return False
        if ':' in ip_text:
            ip_text = ip_text.partition('%')[0]     # a link-local scope, as getpeername gives
        elif _IPV4_DOTTED.fullmatch(ip_text) is None:
            return False
        try:
            address = ipaddress.ip_address(ip_text)
        except ValueError:
            return False
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for action, network in rules:
        if network.version == address.version and address in network:
            return action == 'allow'
    return not any(action == 'allow' for action, _ in rules)


def parse_syslog(text):
    """<logging syslog>: '/dev/log' (a unix socket path, returned as is) or
    'host:port' / '[v6]:port' for UDP, returned as (host, port)."""
    if text.startswith('/'):
        return text
    try:
        host, port = parse_address(text)
    except ValueError:
        host = None
    if host is None or text.startswith('*:'):
        raise ValueError(f"{text!r}: must be a socket path starting with '/', or host:port")
    return host, port


_SECONDS = re.compile(r'(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?')


def _format_seconds(value):
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


_BYTE_ESCAPES = {'r': 13, 'n': 10, 't': 9, '\\': 92}


def _unescape_bytes(text):
    """Check send/expect text: \\r \\n \\t \\\\ \\xNN -> bytes; the rest as UTF-8."""
    out = bytearray()
    i = 0
    while i < len(text):
        ch = text[i]
        if ch != '\\':
            out += ch.encode('utf-8')
            i += 1
            continue
        code = text[i + 1:i + 2]
        if code in _BYTE_ESCAPES:
            out.append(_BYTE_ESCAPES[code])
            i += 2
        elif code == 'x' and re.fullmatch(r'[0-9A-Fa-f]{2}', text[i + 2:i + 4]):
            out.append(int(text[i + 2:i + 4], 16))
            i += 4
        elif not code:
            raise ValueError("ends with a lone '\\' (write \\\\ for a backslash)")
        else:
            shown = text[i:i + 4] if code == 'x' else text[i:i + 2]
            raise ValueError(f"unknown escape '{shown}' (use \\r \\n \\t \\\\ or \\xNN)")
    return bytes(out)


def _escape_bytes(data):
    """The inverse of _unescape_bytes, for send/expect set from code."""
    out = []
    for byte in data:
        ch = chr(byte)
        if ch == '\\':
            out.append('\\\\')
        elif ch in '\r\n\t':
            out.append({'\r': '\\r', '\n': '\\n', '\t': '\\t'}[ch])
        elif 32 <= byte < 127:
            out.append(ch)
        else:
            out.append(f'\\x{byte:02x}')
    return ''.join(out)


def _bytes_text(data, text):
    if not data:
        return None
    # Keep the operator's spelling unless the bytes were changed since.
    if text is not None:
        try:
            if _unescape_bytes(text) == data:
                return text
        except ValueError:
            pass
    return _escape_bytes(data)


def _xml_attr(value):
    # Always double quotes; escaping newlines and tabs keeps them through a
    # reparse (XML would otherwise fold them into spaces).
    return '"' + saxutils.escape(str(value), {
        '"': '&quot;', '\n': '&#10;', '\r': '&#13;', '\t': '&#9;'}) + '"'


def _xml_tag(depth, tag, attrs, end='/>'):
    parts = [f'{name}={_xml_attr(value)}' for name, value in attrs if value is not None]
    return '  ' * depth + '<' + ' '.join([tag] + parts) + end


# -- passwords ----------------------------------------------------------------
#
# Stored as 'pbkdf2_sha256$ITERATIONS$SALT$HASH': PBKDF2-HMAC-SHA256 with a
# 16-byte random salt; SALT and HASH are standard base64 without '=' padding.
# Python Director 1.0 stored unix crypt() hashes; those still verify where
# the crypt module exists (it is gone in Python 3.13).

_PASSWORD_ITERATIONS = 260000
_PBKDF2_HASH = re.compile(r'pbkdf2_sha256\$([1-9][0-9]{0,7})\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)')
_CRYPT_CHARS = '[./0-9A-Za-z]'
_CRYPT_HASH = re.compile(
    f'{_CRYPT_CHARS}{{13}}'                                                # DES
    f'|\\$1\\${_CRYPT_CHARS}{{0,8}}\\${_CRYPT_CHARS}{{22}}'                # MD5
    f'|\\$5\\$(?:rounds=[0-9]+\\$)?{_CRYPT_CHARS}{{0,16}}\\${_CRYPT_CHARS}{{43}}'  # SHA-256
    f'|\\$6\\$(?:rounds=[0-9]+\\$)?{_CRYPT_CHARS}{{0,16}}\\${_CRYPT_CHARS}{{86}}')  # SHA-512


def _b64(data):
    return base64.b64encode(data).decode('ascii').rstrip('=')


def _unb64(text):
    return base64.b64decode(text + '=' * (-len(text) % 4), validate=True)


def _password_bytes(password):
    return password if isinstance(password, bytes) else password.encode('utf-8')


def _parse_pbkdf2(stored):
    """(iterations, salt, hash) from a hash_password() string, or None."""
    match = _PBKDF2_HASH.fullmatch(stored) if isinstance(stored, str) else None
    if match is None:
        return None
    try:
        salt, digest = _unb64(match.group(2)), _unb64(match.group(3))
    except (binascii.Error, ValueError):
        return None
    return int(match.group(1)), salt, digest


def _crypt_module():
    """The crypt module, or None (Python 3.13 removed it).  Imported only
    when a 1.0 hash needs it, with its deprecation warning silenced."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', DeprecationWarning)
            import crypt
    except ImportError:
        return None
    return crypt


def hash_password(password, iterations=_PASSWORD_ITERATIONS):
    """A new 'pbkdf2_sha256$...' hash of password (str or bytes) for <user password>."""
    salt = os.urandom(16)
    digest = hashlib.pbkdf2_hmac('sha256', _password_bytes(password), salt, iterations)
    return f'pbkdf2_sha256${iterations}${_b64(salt)}${_b64(digest)}'


def check_password(password, stored):
    """True if password matches stored: a hash_password() hash, or a 1.0
    crypt() hash where the crypt module exists.  False for anything else."""
    parsed = _parse_pbkdf2(stored)
    if parsed is not None:
        iterations, salt, digest = parsed
        got = hashlib.pbkdf2_hmac('sha256', _password_bytes(password), salt, iterations, len(digest))
        return hmac.compare_digest(got, digest)
    if not is_legacy_hash(stored):
        return False
    crypt = _crypt_module()
    if crypt is None:
        return False
    try:
        if isinstance(password, bytes):
            password = password.decode('utf-8')
        got = crypt.crypt(password, stored)
    except (ValueError, UnicodeError):     # a NUL in the password, undecodable bytes
        return False
    if not got:
        return False
    return hmac.compare_digest(got.encode('ascii', 'replace'), stored.encode('ascii'))


def is_legacy_hash(stored):
    """True for a unix crypt() hash as Python Director 1.0 stored them:
    13-character DES, or the $1$ (MD5), $5$ and $6$ (SHA) forms."""
    return isinstance(stored, str) and _CRYPT_HASH.fullmatch(stored) is not None


# -- reading the XML ----------------------------------------------------------

def _read_xml(data, path):
    """Parse with expat into ElementTree elements; returns (root, lines),
    lines mapping each element to the line its start tag is on."""
    builder = ElementTree.TreeBuilder()
    parser = expat.ParserCreate()
    lines = {}
    open_tags = []

    def start(tag, attrs):
        lines[builder.start(tag, attrs)] = parser.CurrentLineNumber
        open_tags.append(tag)

    def end(tag):
        builder.end(tag)
        open_tags.pop()

    def text(chunk):
        # 1.0 files may carry free text in <note> elements.
        if chunk.strip() and 'note' not in open_tags:
            shown = chunk.strip()
            shown = shown if len(shown) <= 30 else shown[:27] + '...'
            where = open_tags[-1] if open_tags else 'pdconfig'
            raise ConfigError(f'unexpected text {shown!r} in <{where}>', path, parser.CurrentLineNumber)

    def refuse(*args):
        # No DTDs at all: entity expansion ("billion laughs") and external
        # entities are how XML parsers get attacked, and configs need neither.
        raise ConfigError('DOCTYPE/ENTITY declarations are not allowed', path, parser.CurrentLineNumber)

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = text
    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    try:
        parser.Parse(data, True)
    except expat.ExpatError as e:
        raise ConfigError(f'XML error: {expat.ErrorString(e.code)}', path, e.lineno) from None
    except UnicodeError as e:
        # A str with a lone surrogate cannot be UTF-8 at all; and Python 3.6's
        # pyexpat decodes names itself, so bad bytes in a tag name land here.
        if isinstance(e, UnicodeEncodeError) and isinstance(data, str):
            line = data.count('\n', 0, e.start) + 1
        else:
            line = parser.CurrentLineNumber
        raise ConfigError(f'XML error: {e}', path, line) from None
    except (LookupError, ValueError) as e:
        # encoding="..." that Python does not know (LookupError) or that expat
        # cannot use (ValueError: multi-byte encodings are not supported).
        raise ConfigError(f'XML error: unusable encoding: {e}', path, parser.CurrentLineNumber) from None
    return builder.close(), lines


_CHILDREN = {
    'pdconfig': ('service', 'admin', 'logging'),
    'service': ('listen', 'group', 'enable', 'check', 'timeouts', 'allow', 'deny'),
    'group': ('host',),
    'admin': ('user',),
}


class _ConfigReader(object):
    """Walks the element tree, checking as it goes, and builds the Config."""

    def __init__(self, path, lines):
        self.path = path
        self.lines = lines
        self.listens = {}       # (host, port) -> who listens there, for duplicates
        self.service_names = set()  # for duplicates, without a scan per service

    def error(self, elem, message):
        return ConfigError(message, self.path, self.lines.get(elem))

    def attrs(self, elem, known, required=()):
        if elem.tag not in _CHILDREN:
            for _ in self.children(elem):    # a leaf: refuses any child element
                pass
        for name in elem.attrib:
            if name not in known:
                raise self.error(elem, f"<{elem.tag}> has unknown attribute {name!r} "
                                       f"(known: {', '.join(sorted(known))})")
        for name in required:
            if name not in elem.attrib:
                raise self.error(elem, f'<{elem.tag}> needs attribute {name!r}')
        return elem.attrib

    def children(self, elem):
        """elem's child elements, refusing unknown ones.  1.0 allowed <note>
        in containers and called <host> <client>."""
        allowed = _CHILDREN.get(elem.tag, ())
        for child in elem:
            tag = 'host' if child.tag == 'client' and elem.tag == 'group' else child.tag
            if tag == 'note' and allowed:
                continue
            if tag not in allowed:
                expected = ', '.join(sorted(allowed)) or 'none'
                raise self.error(child, f'unknown element <{child.tag}> in <{elem.tag}> '
                                        f'(expected: {expected})')
            yield tag, child

    def name(self, elem, what, text):
        try:
            check_name(text, what)
        except ValueError as e:
            raise self.error(elem, str(e)) from None
        return text

    def address(self, elem, attr):
        try:
            return parse_address(elem.get(attr))
        except ValueError as e:
            raise self.error(elem, f'<{elem.tag}> {attr} {e}') from None

    def integer(self, elem, attr, default, low, high=None):
        text = elem.get(attr)
        if text is None:
            return default
        if re.fullmatch(r'-?[0-9]+', text):
            value = int(text)
            if value >= low and (high is None or value <= high):
                return value
        want = f'{low}-{high}' if high is not None else f'>= {low}'
        raise self.error(elem, f'<{elem.tag}> {attr} {text!r}: must be an integer {want}')

    def choice(self, elem, attr, choices):
        text = elem.get(attr)
        if text is None or text in choices:
            return text
        shown = ', '.join(repr(c) for c in choices[:-1]) + ' or ' + repr(choices[-1])
        raise self.error(elem, f'<{elem.tag}> {attr} {text!r}: must be {shown}')

    def networks(self, elem, attr):
        """A comma-separated list of networks; None when attr is absent."""
        text = elem.get(attr)
        if text is None:
            return None
        try:
            return [parse_network(part.strip()) for part in text.split(',')]
        except ValueError as e:
            raise self.error(elem, f'<{elem.tag}> {attr} {e}') from None

    def account(self, elem, attr):
        text = elem.get(attr)
        if text is not None:
            try:
                check_account(text, attr)
            except ValueError as e:
                raise self.error(elem, f'<{elem.tag}> {attr} {e}') from None
        return text

    def seconds(self, elem, attr, default, zero_ok=False):
        text = elem.get(attr)
        if text is None:
            return default
        if _SECONDS.fullmatch(text):
            value = float(text)
            if (value > 0 or zero_ok and value == 0) and value <= 86400:
                return value
        low = '>= 0' if zero_ok else '> 0'
        raise self.error(elem, f'<{elem.tag}> {attr} {text!r}: must be a number of seconds '
                               f'{low} and <= 86400')

    def claim_listen(self, elem, text, host, port, owner):
        try:
            key = (ipaddress.ip_address(host).compressed, port)
        except ValueError:
            key = (host.lower().rstrip('.'), port)
        if key in self.listens:
            raise self.error(elem, f'listen {text!r} is already used by {self.listens[key]}')
        self.listens[key] = owner

    def read(self, root):
        if root.tag != 'pdconfig':
            raise self.error(root, f'the root element must be <pdconfig>, not <{root.tag}>')
        self.attrs(root, ('drain', 'group', 'user'))
        drain = self.seconds(root, 'drain', 10.0, zero_ok=True)
        user, group = self.account(root, 'user'), self.account(root, 'group')
        services, admin, logging_ = [], None, None
        for tag, elem in self.children(root):
            if tag == 'service':
                services.append(self.service(elem, services))
            elif tag == 'admin':
                if admin is not None:
                    raise self.error(elem, 'more than one <admin>')
                admin = self.admin(elem)
            else:
                if logging_ is not None:
                    raise self.error(elem, 'more than one <logging>')
                logging_ = self.logging(elem)
        if not services:
            raise self.error(root, '<pdconfig> has no <service>')
        return Config(self.path, services, admin, logging_, drain, user, group)

    def service(self, elem, services):
        self.attrs(elem, ('maxconns', 'name'), ('name',))
        name = self.name(elem, 'service name', elem.get('name'))
        if name in self.service_names:
            raise self.error(elem, f'duplicate service {name!r}')
        self.service_names.add(name)
        maxconns = self.integer(elem, 'maxconns', 0, 0)
        listens, groups, enable, check, timeouts, acl = [], [], None, None, None, []
        group_names = set()
        for tag, child in self.children(elem):
            if tag == 'listen':
                listens.append(self.listen(child, name))
            elif tag in ('allow', 'deny'):
                self.attrs(child, ('cidr',), ('cidr',))
                try:
                    acl.append((tag, parse_network(child.get('cidr'))))
                except ValueError as e:
                    raise self.error(child, f'<{tag}> cidr {e}') from None
            elif tag == 'group':
                group = self.group(child)
                if group.name in group_names:
                    raise self.error(child, f'service {name!r}: duplicate group {group.name!r}')
                group_names.add(group.name)
                groups.append(group)
            elif tag == 'enable':
                if enable is not None:
                    raise self.error(child, f'service {name!r}: more than one <enable>')
                self.attrs(child, ('group',), ('group',))
                enable = child
            elif tag == 'check':
                if check is not None:
                    raise self.error(child, f'service {name!r}: more than one <check>')
                check = self.check(child)
            else:
                if timeouts is not None:
                    raise self.error(child, f'service {name!r}: more than one <timeouts>')
                self.attrs(child, ('connect', 'idle', 'queue'))
                timeouts = Timeouts(self.seconds(child, 'connect', 3.0),
                                    self.seconds(child, 'idle', 3600.0), self.lines[child],
                                    queue=self.seconds(child, 'queue', 5.0))
        if not listens:
            raise self.error(elem, f'service {name!r} has no <listen>')
        if not groups:
            raise self.error(elem, f'service {name!r} has no <group>')
        enabled = groups[0].name
        if enable is not None:
            enabled = enable.get('group')
            if not any(g.name == enabled for g in groups):
                raise self.error(enable, f'service {name!r}: <enable> names unknown group {enabled!r}')
        return Service(name, listens, groups, enabled, check, timeouts, self.lines[elem],
                       maxconns=maxconns, acl=acl)

    def listen(self, elem, service_name):
        self.attrs(elem, ('accept_proxy', 'ip', 'trusted'), ('ip',))
        host, port = self.address(elem, 'ip')
        text = elem.get('ip')
        self.claim_listen(elem, text, host, port, f'service {service_name!r}')
        accept_proxy = self.choice(elem, 'accept_proxy', ('v1', 'v2', 'any'))
        trusted = self.networks(elem, 'trusted')
        if trusted is not None and accept_proxy is None:
            raise self.error(elem, '<listen> trusted is only used with accept_proxy')
        return Listen(text, host, port, self.lines[elem], accept_proxy, trusted)

    def group(self, elem):
        self.attrs(elem, ('name', 'scheduler'), ('name', 'scheduler'))
        name = self.name(elem, 'group name', elem.get('name'))
        scheduler = elem.get('scheduler')
        try:
            schedulers.parse_spec(scheduler)
        except ValueError as e:
            raise self.error(elem, f'group {name!r}: {e}') from None
        hosts = []
        # Dicts, not a scan per host, so a group of 10,000 loads in linear
        # time; when a host clashes twice, the earlier host is named, as a scan would.
        by_name, by_ip = {}, {}
        for index, (_, child) in enumerate(self.children(elem)):
            host = self.host(child, index)
            ip_key = (host.host.lower(), host.port)
            same_name, same_ip = by_name.get(host.name), by_ip.get(ip_key)
            if same_name is not None and (same_ip is None or same_name[0] <= same_ip[0]):
                raise self.error(child, f'group {name!r}: duplicate host {host.name!r}')
            if same_ip is not None:
                raise self.error(child, f'group {name!r}: hosts {same_ip[1].name!r} and '
                                        f'{host.name!r} have the same ip {host.ip!r}')
            by_name[host.name] = by_ip[ip_key] = (index, host)
            hosts.append(host)
        return Group(name, scheduler, hosts, self.lines[elem])

    def host(self, elem, index):
        self.attrs(elem, ('ip', 'maxconns', 'name', 'send_proxy', 'weight'), ('ip',))
        name = elem.get('name')
        if not name:
            name = f'host.{index}'      # as 1.0 named hosts without a name
        else:
            self.name(elem, 'host name', name)
        ip = elem.get('ip')
        host, port = self.address(elem, 'ip')
        if ip.startswith('*:'):
            raise self.error(elem, f"<{elem.tag}> ip {ip!r}: '*' is for listening; a host needs an address")
        weight = self.integer(elem, 'weight', 1, 1, 1000)
        maxconns = self.integer(elem, 'maxconns', 0, 0)
        send_proxy = self.choice(elem, 'send_proxy', ('v1', 'v2'))
        return Host(name, ip, host, port, weight, maxconns, self.lines[elem], send_proxy)

    def check(self, elem):
        self.attrs(elem, ('expect', 'fall', 'interval', 'on_down', 'rise', 'send', 'timeout'))
        interval = self.seconds(elem, 'interval', 5.0)
        timeout = self.seconds(elem, 'timeout', 2.0)
        rise = self.integer(elem, 'rise', 2, 1, 100)
        fall = self.integer(elem, 'fall', 3, 1, 100)
        data = {}
        for attr in ('send', 'expect'):
            text = elem.get(attr) or None       # empty means "nothing": connect only
            try:
                data[attr] = _unescape_bytes(text) if text is not None else None
            except ValueError as e:
                raise self.error(elem, f'<check> {attr}: {e}') from None
            data[attr + '_text'] = text
        on_down = self.choice(elem, 'on_down', ('keep', 'close')) or 'keep'
        return Check(interval, timeout, rise, fall, data['send'], data['expect'],
                     self.lines[elem], data['send_text'], data['expect_text'], on_down)

    def logging(self, elem):
        self.attrs(elem, ('access', 'facility', 'file', 'syslog'))
        access = self.choice(elem, 'access', ('on', 'off')) != 'off'
        syslog = elem.get('syslog')
        if syslog is not None:
            try:
                parse_syslog(syslog)
            except ValueError as e:
                raise self.error(elem, f'<logging> syslog {e}') from None
        facility = elem.get('facility')
        if facility is not None:
            if syslog is None:
                raise self.error(elem, '<logging> facility is only used with syslog')
            if facility not in logging.handlers.SysLogHandler.facility_names:
                raise self.error(elem, f'<logging> facility {facility!r}: not a syslog facility '
                                       f'(like daemon, user or local0-local7)')
        return Logging(elem.get('file') or None, self.lines[elem], access, syslog, facility or 'daemon')

    def admin(self, elem):
        if 'secure' in elem.attrib:
            # Python Director 0.x/1.0 used M2Crypto here; silently serving
            # plain HTTP instead would be worse than refusing.
            raise self.error(elem, "<admin secure=...> is no longer supported; "
                                   "use certfile=... keyfile=... for HTTPS")
        self.attrs(elem, ('certfile', 'keyfile', 'listen'), ('listen',))
        listen = elem.get('listen')
        host, port = self.address(elem, 'listen')
        self.claim_listen(elem, listen, host, port, '<admin>')
        certfile = elem.get('certfile') or None
        keyfile = elem.get('keyfile') or None
        if (certfile is None) != (keyfile is None):
            raise self.error(elem, '<admin> needs both certfile and keyfile, or neither')
        users = []
        for _, child in self.children(elem):
            user = self.user(child)
            if any(u.name == user.name for u in users):
                raise self.error(child, f'duplicate user {user.name!r}')
            users.append(user)
        if not users:
            raise self.error(elem, '<admin> has no <user>')
        return Admin(listen, host, port, users, certfile, keyfile, self.lines[elem])

    def user(self, elem):
        self.attrs(elem, ('access', 'name', 'password'), ('name', 'password', 'access'))
        name = self.name(elem, 'user name', elem.get('name'))
        access = elem.get('access')
        if access not in ('full', 'readonly'):
            raise self.error(elem, f"user {name!r}: access must be 'full' or 'readonly', not {access!r}")
        password = elem.get('password')
        if _parse_pbkdf2(password) is None:
            if not is_legacy_hash(password):
                raise self.error(elem, f'user {name!r}: password must be a hash; '
                                       f'make one with: python3 pydirector.py --hash-password')
            if _crypt_module() is None:
                raise self.error(elem, f'user {name!r}: this is a crypt() hash, which needs the '
                                       f'crypt module (gone in Python 3.13); '
                                       f'make a new one with --hash-password')
        return User(name, password, access, self.lines[elem])
# CONFIG-SECTION-END


# ---------------------------------------------------------------------------
# Loop: a selector, a timer heap and a thread-safe call queue.
# Only the loop thread touches balancer state; other threads hand it callables.
# ---------------------------------------------------------------------------

EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE


class LoopTimeout(Exception):
    """The loop did not run a call handed to it in time (it is stuck or busy)."""


TIMER_COMPACT_MIN = 1024     # heap size below which cancelled timers are left to expire


class Timer(object):
    """A call scheduled on the loop; cancel() makes it a no-op."""
    __slots__ = ('when', 'callback', 'args')

    def __init__(self, when, callback, args):
        self.when = when
        self.callback = callback
        self.args = args

    def cancel(self):
        self.callback = None
        self.args = None


class Loop(object):
    """The event loop: one thread, one selector, no locks on the hot path.

    Handlers are registered as the selector key's data: a callable taking the
    event mask.  Other threads use call_soon_threadsafe() or call(); a byte on
    a socketpair wakes the selector (the self-pipe trick asyncio uses).
    """

    def __init__(self):
        self.selector = selectors.DefaultSelector()
        self.now = time.monotonic()
        self.running = False
        self.thread_ident = None
        self._timers = []
        self._timer_seq = 0
        self._compact_at = TIMER_COMPACT_MIN
        self._calls = collections.deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.selector.register(self._wake_r, EVENT_READ, self._on_wake)

    def call_later(self, delay, callback, *args):
        timer = Timer(time.monotonic() + delay, callback, args)
        self._timer_seq += 1
        heapq.heappush(self._timers, (timer.when, self._timer_seq, timer))
        if len(self._timers) >= self._compact_at:
            self._compact_timers()
        return timer

    def _compact_timers(self):
        # A cancelled timer stays in the heap until it is due: an idle timer an
        # hour away, once per closed connection, would pile up.  Drop them whenever
        # the heap has doubled; that keeps it under twice the live timers.
        live = [entry for entry in self._timers if entry[2].callback is not None]
        heapq.heapify(live)
        self._timers[:] = live
        self._compact_at = max(TIMER_COMPACT_MIN, 2 * len(live))

    def call_soon_threadsafe(self, callback, *args):
        # deque.append is atomic, so any thread (or a signal handler) may call this.
        self._calls.append((callback, args))
        self.wake()

    def wake(self):
        try:
            self._wake_w.send(b'\0')
        except OSError:
            pass  # the socket buffer is full: the loop is already due to wake

    def call(self, fn, *args, **kwargs):
        """Run fn on the loop thread and return its result (or raise its exception).

        From the loop thread itself fn runs at once.  timeout= (default 5 s)
        bounds the wait: a stuck loop gives LoopTimeout, never a hang.
        """
        timeout = kwargs.pop('timeout', 5.0)
        if threading.get_ident() == self.thread_ident:
            return fn(*args, **kwargs)
        done = threading.Event()
        outcome = {}

        def run():
            if outcome.get('abandoned'):
                return
            try:
                outcome['result'] = fn(*args, **kwargs)
            except BaseException as e:  # handed back to the caller's thread
                outcome['error'] = e
            done.set()

        self.call_soon_threadsafe(run)
        if not done.wait(timeout):
            outcome['abandoned'] = True
            raise LoopTimeout('the event loop did not answer within %.1f s' % timeout)
        if 'error' in outcome:
            raise outcome['error']
        return outcome['result']

    def stop(self):
        self.running = False
        self.wake()

    def _on_wake(self, mask):
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def run(self):
        self.thread_ident = threading.get_ident()
        self.running = True
        select = self.selector.select
        timers = self._timers
        calls = self._calls
        monotonic = time.monotonic
        while self.running:
            if calls:
                timeout = 0
            elif timers:
                timeout = max(0.0, timers[0][0] - monotonic())
            else:
                timeout = None
            events = select(timeout)
            self.now = monotonic()
            for key, mask in events:
                try:
                    key.data(mask)
                except Exception:
                    # Handlers close their own connection on errors; this is the last guard.
                    log.exception('unexpected error in an event handler')
            while timers and timers[0][0] <= self.now:
                timer = heapq.heappop(timers)[2]
                if timer.callback is not None:
                    callback, args = timer.callback, timer.args
                    timer.cancel()
                    self._run_guarded(callback, args)
            for _ in range(len(calls)):
                callback, args = calls.popleft()
                self._run_guarded(callback, args)

    def _run_guarded(self, callback, args):
        try:
            callback(*args)
        except Exception:
            log.exception('unexpected error in %s', getattr(callback, '__name__', callback))

    def close(self):
        self.selector.close()
        self._wake_r.close()
        self._wake_w.close()


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
# PROXY-PROTOCOL-SECTION-END


# ---------------------------------------------------------------------------
# Proxying: a Listener accepts clients, a Pair relays one client to one backend.
# ---------------------------------------------------------------------------

# Data-plane sockets are the C-level _socket.socket: socket.socket's Python
# wrapper adds frames to every accept, close and enum lookup, and we use none
# of what it offers (makefile, context manager).
SOCK_STREAM = socket.SOCK_STREAM
SOCK_NONBLOCK = getattr(socket, 'SOCK_NONBLOCK', 0)   # Linux: no extra syscall to unblock
SOCK_STREAM_NONBLOCK = SOCK_STREAM | SOCK_NONBLOCK

# os.splice (Linux, Python 3.10+) moves bulk bytes without copying them
# through Python.  SPLICE_AFTER: bytes one direction must carry before it
# switches (None: never, as on platforms without splice).
splice = getattr(os, 'splice', None)
SPLICE_AFTER = 1 << 20 if splice is not None else None
SPLICE_SIZE = 1 << 20      # pipe size asked for, and the most one splice moves
SPLICE_FLAGS = getattr(os, 'SPLICE_F_MOVE', 0) | getattr(os, 'SPLICE_F_NONBLOCK', 0)
F_SETPIPE_SZ = getattr(fcntl, 'F_SETPIPE_SZ', 1031)

BUFFER_SIZE = 65536       # one recv; also the most a Pair holds per direction
ACCEPT_BATCH = 64         # accepts per readable event, so one busy listener can't starve the rest
ACCEPT_PAUSE = 0.25       # seconds to stop accepting when out of file descriptors

# Errors that say "this machine is out of something", not "the backend is bad".
LOCAL_CONNECT_ERRORS = frozenset([errno.EADDRNOTAVAIL, errno.EMFILE, errno.ENFILE,
                                  errno.ENOBUFS, errno.ENOMEM, errno.EAGAIN])
OUT_OF_FDS = frozenset([errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM])


_PLAIN_VALUE = re.compile(r'[A-Za-z0-9._:/@+\[\]-]+\Z')


def log_value(text):
    """A log field that cannot forge another field or line: quoted and escaped unless plain."""
    text = str(text)
    if _PLAIN_VALUE.match(text):
        return text
    escaped = text.encode('unicode_escape').decode('ascii').replace('"', '\\"')
    return '"%s"' % escaped


def format_address(ip, port):
    """'1.2.3.4:80' or '[::1]:80'."""
    return ('[%s]:%s' if ':' in ip else '%s:%s') % (ip, port)


def error_text(err):
    """'connection refused' from an errno (log lines read better in lower case)."""
    text = os.strerror(err)
    return text[:1].lower() + text[1:]


class Listener(object):
    """One listening socket of a service."""

    def __init__(self, director, service, sock, listen):
        self.director = director
        self.service = service
        self.sock = sock
        self.configure(listen)
        self.paused = False
        self.registered = True
        director.loop.selector.register(sock, EVENT_READ, self._on_readable)

    def configure(self, listen):
        """Take (new) settings from its <listen>; a reload may call this again."""
        self.listen = listen
        self.text = listen.text
        self.accept_proxy = listen.accept_proxy
        self.trusted = [('allow', net) for net in listen.trusted]

    def _on_readable(self, mask):
        accept = self.sock._accept
        family = self.sock.family
        new_socket = _socket.socket
        on_accept = self.director.on_accept
        for _ in range(ACCEPT_BATCH):
            try:
                fd, client_addr = accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in OUT_OF_FDS:
                    self.director.pause_accepting(e.errno)
                    return
                # ECONNABORTED and friends: that client gave up already.
                log.debug('accept on %s: %s', self.text, e)
                continue
            if self.paused:
                self.paused = False
                log.info('listen %s: accepting again', self.text)
            on_accept(self, new_socket(family, SOCK_STREAM, 0, fd), client_addr)

    def pause(self, err):
        """Out of fds: a pending client stays queued and would wake us forever; look again shortly."""
        if self.sock.fileno() < 0 or not self.registered:
            return
        if not self.paused:
            log.warning('listen %s: %s; pausing accepts', self.text, error_text(err))
            self.paused = True
        self.director.loop.selector.unregister(self.sock)
        self.registered = False
        self.director.loop.call_later(ACCEPT_PAUSE, self._resume)

    def _resume(self):
        if self.sock.fileno() >= 0 and not self.registered:  # not closed by a stop meanwhile
            self.director.loop.selector.register(self.sock, EVENT_READ, self._on_readable)
            self.registered = True

    def close(self):
        if self.sock.fileno() >= 0:
            if self.registered:
                self.director.loop.selector.unregister(self.sock)
                self.registered = False
            self.sock.close()


PROXY_HEADER, QUEUED = 'proxy-header', 'queued'
PROXY_HEADER_LIMIT = 4096  # bytes of PROXY header (TLVs included) we accept; HAProxy's buffer is as small
CONNECTING, STREAMING, CLOSED = 'connecting', 'streaming', 'closed'
QUEUE_LIMIT = 1000        # clients a service may hold waiting for a free host


class Pair(object):
    """One client connection and the backend connection made for it.

    PROXY_HEADER: reading the PROXY protocol header a front proxy sends first.
    QUEUED: every eligible host is at its maxconns; waiting for a slot.
    CONNECTING: the backend connect is in flight; the client is not read yet,
    so whatever it already sent waits in the kernel and reaches whichever
    backend accepts (that makes failover transparent).
    STREAMING: bytes flow both ways.  A direction's pending bytes are at most
    one recv; while they wait, the other side is not read (flow control).
    EOF on one side is passed on with shutdown(SHUT_WR) once its bytes are
    out; the pair closes when both directions are done, or at once on a reset.
    """
    __slots__ = ('director', 'loop', 'service', 'group', 'host', 'client_sock', 'backend_sock',
                 'client_ip', 'client_port', 'state', 'tried', 'to_client', 'to_backend',
                 'client_eof', 'backend_eof', 'client_events', 'backend_events', 'timer',
                 'last_active', 'bytes_in', 'bytes_out', 'started', 'proxy_dest',
                 'proxy_accept', 'splice_up', 'splice_down')

    def __init__(self, director, service, client_sock, client_addr):
        self.director = director
        self.loop = director.loop
        self.service = service
        self.group = service.enabled
        self.host = None
        self.client_sock = client_sock
        self.backend_sock = None
        self.client_ip = client_addr[0]
        self.client_port = client_addr[1]
        self.state = CONNECTING
        self.tried = []
        self.to_client = b''
        self.to_backend = b''
        self.client_eof = False
        self.backend_eof = False
        self.client_events = 0
        self.backend_events = 0
        self.timer = None
        self.last_active = self.loop.now
        self.bytes_in = 0
        self.bytes_out = 0
        self.started = self.loop.now
        self.proxy_dest = None    # the address a PROXY header said the client connected to
        self.proxy_accept = None  # 'v1', 'v2' or 'any' while reading that header
        self.splice_up = None     # a Splice once client->backend moves in bulk
        self.splice_down = None   # and backend->client

    # -- the PROXY protocol header from a front proxy ---------------------

    def read_proxy_header(self, accept):
        """Read the header before anything else; what follows it waits in to_backend."""
        self.state = PROXY_HEADER
        self.loop.selector.register(self.client_sock, EVENT_READ, self._on_proxy_readable)
        self.client_events = EVENT_READ
        self.proxy_accept = accept
        self.timer = self.loop.call_later(self.service.timeouts.connect, self._bad_proxy, 'no header in time')

    def _on_proxy_readable(self, mask):
        if self.state is not PROXY_HEADER:
            return
        try:
            data = self.client_sock.recv(BUFFER_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.abort('client-reset')
            return
        if not data:
            self._bad_proxy('closed before the header ended')
            return
        data = self.to_backend + data
        try:
            header = parse_proxy_header(data, self.proxy_accept, PROXY_HEADER_LIMIT)
        except ValueError as e:
            self._bad_proxy(str(e))
            return
        if header is None:
            self.to_backend = data
            return
        size, source, dest = header
        self.to_backend = data[size:]
        if source is not None:
            self.client_ip, self.client_port = source[0], source[1]
            self.proxy_dest = dest
        self.timer.cancel()
        self.timer = None
        self._set_events(0, 0)
        self.state = CONNECTING
        self.director.route(self)

    def _bad_proxy(self, why):
        self.timer = None
        log.warning('client %s:%s in %s: bad PROXY header: %s',
                    self.client_ip, self.client_port, self.service.name, why)
        self.close('bad-proxy')

    # -- connecting -------------------------------------------------------

    def connect_next(self):
        """Try the next host the scheduler offers; close the client when none is left."""
        scheduler = self.group.scheduler
        host = scheduler.pick(self.client_ip, self.tried)
        if host is None:
            if not self.tried and scheduler.full_only(()):
                self._wait_in_queue()
                return
            if self.tried:
                log.warning('client %s:%s in %s: gave up after %d host(s) failed',
                            self.client_ip, self.client_port, self.service.name, len(self.tried))
            else:
                self.service.refused += 1
                log.warning('client %s:%s in %s: no host available in group %s',
                            self.client_ip, self.client_port, self.service.name, self.group.name)
            self.close()
            return
        if self.tried:
            self.service.failovers += 1
        self.tried.append(host)
        self.host = host
        scheduler.connection_started(host)
        if host.address is None:  # a name the manager has not resolved yet
            self._connect_failed(errno.EHOSTUNREACH)
            return
        try:
            sock = _socket.socket(host.address[0], SOCK_STREAM_NONBLOCK)
        except OSError as e:
            self._connect_failed(e.errno)
            return
        if not SOCK_NONBLOCK:
            sock.setblocking(False)
        self.backend_sock = sock
        err = sock.connect_ex(host.address[1])
        if err not in (0, errno.EINPROGRESS):
            self._connect_failed(err)
            return
        self.timer = self.loop.call_later(self.service.timeouts.connect, self._on_timer)
        self._set_events(0, EVENT_WRITE)

    def _wait_in_queue(self):
        queue = self.service.queue
        if len(queue) >= QUEUE_LIMIT:
            self.service.refused += 1
            self.close('full')
            return
        self.state = QUEUED
        queue.append(self)
        self.timer = self.loop.call_later(self.service.timeouts.queue, self._on_queue_timeout)

    def _on_queue_timeout(self):
        self.timer = None
        log.info('client %s:%s in %s: no host free within %g s',
                 self.client_ip, self.client_port, self.service.name, self.service.timeouts.queue)
        self.close('queue-timeout')

    def _on_timer(self):
        """A pair's one timer: the connect timeout, then (re-armed) the idle check."""
        if self.state is CONNECTING:
            self.timer = None
            self._connect_failed(None)
            return
        idle_for = self.loop.now - self.last_active
        limit = self.service.timeouts.idle
        if idle_for >= limit:
            self.timer = None
            log.info('client %s:%s in %s: idle for %.0f s, closing',
                     self.client_ip, self.client_port, self.service.name, idle_for)
            self.close('idle-timeout')
        else:
            # Re-arming once per idle period is cheaper than a timer per byte.
            self.timer = self.loop.call_later(limit - idle_for, self._on_timer)

    def _connect_failed(self, err):
        host = self.host
        if err is None:
            reason = 'connect timeout'
        else:
            reason = error_text(err)
        self._drop_backend()
        self.group.scheduler.connection_ended(host)
        host.total -= 1  # an attempt that never connected is not a served connection
        self.host = None
        if err in OUT_OF_FDS:
            self.director.pause_accepting(err)
        if err in LOCAL_CONNECT_ERRORS:
            # Our side ran out of ports or fds: the backend did nothing wrong.
            log.warning('client %s:%s in %s: cannot connect to host %s (%s): %s',
                        self.client_ip, self.client_port, self.service.name,
                        host.name, host.ip, reason)
        else:
            self.director.set_host_state(self.service, self.group, host, schedulers.DOWN, reason)
        self.connect_next()

    def _on_backend_connected(self):
        err = self.backend_sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._connect_failed(err)
            return
        try:
            self.backend_sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self.state = STREAMING
        now = self.last_active = self.loop.now
        # The connect timer goes on as the first idle check, unless that is too late.
        idle = self.service.timeouts.idle
        if self.timer is None or self.timer.when > now + idle:
            if self.timer is not None:
                self.timer.cancel()
            self.timer = self.loop.call_later(idle, self._on_timer)
        if self.host.send_proxy is not None:
            self.to_backend = self._proxy_header() + self.to_backend
        if self.to_backend:
            self._flush(True)   # a PROXY header, or bytes read with one
        else:
            self._update_interest()

    def _proxy_header(self):
        dest = self.proxy_dest
        if dest is None:
            try:
                dest = self.client_sock.getsockname()
            except OSError:
                dest = None
        build = proxy_header_v2 if self.host.send_proxy == 'v2' else proxy_header_v1
        return build((self.client_ip, self.client_port), dest)

    # -- streaming --------------------------------------------------------

    def _on_client_event(self, mask):
        if self.state is not STREAMING:
            return   # closed by an earlier event of the same select() batch
        if mask & EVENT_READ:
            if self.splice_up is None:
                self._relay(self.client_sock, self.backend_sock, True)
            else:
                self._splice_in(self.splice_up, self.client_sock, self.backend_sock, True)
        if mask & EVENT_WRITE and self.state is STREAMING:
            self._flush(False)

    def _on_backend_event(self, mask):
        if self.state is not STREAMING:
            if self.state is CONNECTING:
                self._on_backend_connected()
            return   # else closed by an earlier event of the same select() batch
        if mask & EVENT_READ:
            if self.splice_down is None:
                self._relay(self.backend_sock, self.client_sock, False)
            else:
                self._splice_in(self.splice_down, self.backend_sock, self.client_sock, False)
        if mask & EVENT_WRITE and self.state is STREAMING:
            self._flush(True)

    def _relay(self, source, dest, upstream):
        """Read once from source and send straight on; keep only what dest refused."""
        try:
            data = source.recv(BUFFER_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.abort('client-reset' if upstream else 'backend-reset')
            return
        if not data:
            self._source_eof(upstream)
            return
        self.last_active = self.loop.now
        size = len(data)
        try:
            sent = dest.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.abort('backend-reset' if upstream else 'client-reset')
            return
        if upstream:
            self.bytes_in += size
            if sent < size:
                self.to_backend = data[sent:]
                self._update_interest()
            elif size == BUFFER_SIZE and SPLICE_AFTER is not None and self.bytes_in >= SPLICE_AFTER:
                self.splice_up = Splice.open()
        else:
            self.bytes_out += size
            if sent < size:
                self.to_client = data[sent:]
                self._update_interest()
            elif size == BUFFER_SIZE and SPLICE_AFTER is not None and self.bytes_out >= SPLICE_AFTER:
                self.splice_down = Splice.open()

    def _source_eof(self, upstream):
        if upstream:
            self.client_eof = True
            if not self.to_backend:
                self._shutdown(self.backend_sock)
        else:
            self.backend_eof = True
            if not self.to_client:
                self._shutdown(self.client_sock)
        self._update_interest()

    # -- the splice fast path: bulk bytes go socket -> pipe -> socket in the kernel

    def _splice_in(self, pipe, source, dest, upstream):
        try:
            size = splice(source.fileno(), pipe.w, SPLICE_SIZE, flags=SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.abort('client-reset' if upstream else 'backend-reset')
            return
        if not size:
            self._source_eof(upstream)
            return
        self.last_active = self.loop.now
        if upstream:
            self.bytes_in += size
        else:
            self.bytes_out += size
        pipe.pending = size
        self._splice_out(pipe, dest, upstream)

    def _splice_out(self, pipe, dest, upstream):
        """Move what the pipe holds on to dest; like _flush, pending bytes stop the source."""
        was_pending = upstream and self.to_backend or not upstream and self.to_client
        try:
            sent = splice(pipe.r, dest.fileno(), pipe.pending, flags=SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.abort('backend-reset' if upstream else 'client-reset')
            return
        pending = pipe.pending = pipe.pending - sent
        # to_backend / to_client hold the pipe's byte count: what _update_interest reads.
        if upstream:
            self.to_backend = pending
            if not pending and self.client_eof:
                self._shutdown(dest)
        else:
            self.to_client = pending
            if not pending and self.backend_eof:
                self._shutdown(dest)
        if pending or was_pending:
            self._update_interest()

    def _flush(self, upstream):
        """dest became writable: send what it refused before, then resume reading the source."""
        pipe = self.splice_up if upstream else self.splice_down
        if pipe is not None:
            self._splice_out(pipe, self.backend_sock if upstream else self.client_sock, upstream)
            return
        if upstream:
            dest, pending = self.backend_sock, self.to_backend
        else:
            dest, pending = self.client_sock, self.to_client
        if not pending:
            self._update_interest()
            return
        try:
            sent = dest.send(pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.abort('backend-reset' if upstream else 'client-reset')
            return
        self.last_active = self.loop.now
        pending = pending[sent:]
        if upstream:
            self.to_backend = pending
            if not pending and self.client_eof:
                self._shutdown(dest)
        else:
            self.to_client = pending
            if not pending and self.backend_eof:
                self._shutdown(dest)
        self._update_interest()

    def _shutdown(self, sock):
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the peer is gone already; the read side will tell us

    def _update_interest(self):
        """The one place that decides what each socket is watched for."""
        if self.state is not STREAMING:
            return
        if (self.client_eof and self.backend_eof and not self.to_client and not self.to_backend):
            self.close('done')
            return
        client = 0
        backend = 0
        if self.to_client:
            client = EVENT_WRITE
        elif not self.backend_eof:
            backend = EVENT_READ
        if self.to_backend:
            backend |= EVENT_WRITE
        elif not self.client_eof:
            client |= EVENT_READ
        self._set_events(client, backend)

    def _set_events(self, client, backend):
        selector = self.loop.selector
        if client != self.client_events:
            if not self.client_events:
                selector.register(self.client_sock, client, self._on_client_event)
            elif not client:
                selector.unregister(self.client_sock)
            else:
                selector.modify(self.client_sock, client, self._on_client_event)
            self.client_events = client
        if backend != self.backend_events:
            if not self.backend_events:
                selector.register(self.backend_sock, backend, self._on_backend_event)
            elif not backend:
                selector.unregister(self.backend_sock)
            else:
                selector.modify(self.backend_sock, backend, self._on_backend_event)
            self.backend_events = backend

    def pending(self):
        """(bytes held for the backend, bytes held for the client), in Python or in a pipe."""
        return tuple(len(x) if isinstance(x, bytes) else x for x in (self.to_backend, self.to_client))

    # -- closing ----------------------------------------------------------

    def _drop_backend(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.backend_sock is not None:
            if self.backend_events:
                self.loop.selector.unregister(self.backend_sock)
                self.backend_events = 0
            self.backend_sock.close()
            self.backend_sock = None

    def abort(self, how):
        """A reset on one side: reset the other too, so it cannot mistake a cut stream for a whole one."""
        for sock in (self.client_sock, self.backend_sock):
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
                except OSError:
                    pass
        self.close(how)

    def close(self, how='no-backend'):
        if self.state is CLOSED:
            return
        if self.state is QUEUED:
            self.service.queue.remove(self)
        was_streaming = self.state is STREAMING
        self.state = CLOSED
        self._drop_backend()
        if self.client_events:
            self.loop.selector.unregister(self.client_sock)
            self.client_events = 0
        self.client_sock.close()
        host = self.host
        if host is not None:
            self.group.scheduler.connection_ended(host)
            host.bytes_in += self.bytes_in
            host.bytes_out += self.bytes_out
            if not was_streaming:
                host.total -= 1  # closed before the backend answered: not a served connection
        self.to_client = self.to_backend = b''
        for pipe in (self.splice_up, self.splice_down):
            if pipe is not None:
                pipe.close()
        self.director.pair_closed(self, how)


class Splice(object):
    """The pipe one direction of a bulk Pair moves its bytes through with
    os.splice: socket -> pipe -> socket, never copied into Python.  It costs
    two fds, so a Pair takes one only after SPLICE_AFTER bytes."""
    __slots__ = ('r', 'w', 'pending')

    def __init__(self, r, w):
        self.r = r
        self.w = w
        self.pending = 0      # bytes in the pipe not yet sent on

    @classmethod
    def open(cls):
        """A new pipe, or None when fds run short (the plain path carries on)."""
        try:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            fcntl.fcntl(w, F_SETPIPE_SZ, SPLICE_SIZE)
        except OSError:
            pass   # the default 64 KiB pipe works, with more syscalls
        return cls(r, w)

    def close(self):
        os.close(self.r)
        os.close(self.w)


LINGER_RESET = b'\x01\x00\x00\x00\x00\x00\x00\x00'  # struct linger {on, 0 s}: close sends RST


# ---------------------------------------------------------------------------
# Manager: the health-check thread.  It probes with blocking sockets and hands
# each result to the loop; it never touches balancer state itself.
# ---------------------------------------------------------------------------

MANAGER_TICK = 0.1        # how often the manager asks the loop which hosts are due
PROBE_WORKERS = 8         # probes run in parallel so one blackholed host can't delay the rest


def probe(host, port, timeout, send, expect):
    """Connect (and send/expect) once.  Returns (ok, reason, address); ok is
    None when our side ran out of something (fds, ports): no verdict on the host."""
    deadline = time.monotonic() + timeout
    try:
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        return False, 'cannot resolve %s: %s' % (host, e), None
    family, _, _, _, sockaddr = infos[0]
    address = (family, sockaddr)
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        return None, error_text(e.errno) if e.errno else str(e), address
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(sockaddr)
        except socket.timeout:
            return False, 'connect timeout', address
        except OSError as e:
            reason = error_text(e.errno) if e.errno else str(e)
            return (None if e.errno in LOCAL_CONNECT_ERRORS else False), reason, address
        try:
            if send:
                sock.sendall(send)
            if expect:
                got = b''
                while expect not in got:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False, 'timeout waiting for %r' % expect, address
                    sock.settimeout(left)
                    chunk = sock.recv(4096)
                    if not chunk:
                        return False, 'expected %r, got %r' % (expect, got[:60]), address
                    got += chunk
        except socket.timeout:
            return False, 'timeout waiting for %r' % expect, address
        except OSError as e:
            return False, error_text(e.errno) if e.errno else str(e), address
        return True, 'probe ok', address
    finally:
        sock.close()


class Manager(threading.Thread):
    """Re-checks down hosts (and, with <check>, up ones) and reports to the loop."""

    def __init__(self, director):
        threading.Thread.__init__(self, name='pydirector-manager', daemon=True)
        self.director = director
        self.stopped = threading.Event()
        self.running = 0
        self.lock = threading.Lock()

    def run(self):
        loop = self.director.loop
        with concurrent.futures.ThreadPoolExecutor(PROBE_WORKERS) as pool:
            while not self.stopped.wait(MANAGER_TICK):
                try:
                    due = loop.call(self.director.probes_due)
                except LoopTimeout:
                    continue
                for target in due:
                    pool.submit(self._probe, target)

    def _probe(self, target):
        if self.stopped.is_set():
            return
        token, host, port, check = target
        try:
            ok, reason, address = probe(host, port, check.timeout, check.send, check.expect)
        except Exception as e:  # a bug here must not kill probing for good
            log.exception('probe of %s:%s failed unexpectedly', host, port)
            ok, reason, address = False, 'probe error: %s' % e, None
        self.director.loop.call_soon_threadsafe(self.director.probe_result, token, ok, reason, address)

    def stop(self):
        self.stopped.set()


# ---------------------------------------------------------------------------
# Director: the running services, and every change to them.  All of it runs
# on the loop thread; the admin server and the manager reach it through
# loop.call() / loop.call_soon_threadsafe().
# ---------------------------------------------------------------------------

class AdminError(Exception):
    """A refused admin request: status is the HTTP status the admin answers with."""

    def __init__(self, status, message):
        Exception.__init__(self, message)
        self.status = status
        self.message = message


class RunningGroup(object):
    """A group of hosts at run time: its name and its scheduler (which holds the hosts)."""

    def __init__(self, name, scheduler):
        self.name = name
        self.scheduler = scheduler


class RunningService(object):
    """A service at run time: listeners, groups, the enabled group, counters."""

    def __init__(self, config):
        self.name = config.name
        self.config = config
        self.timeouts = config.timeouts
        self.check = config.check
        self.groups = collections.OrderedDict()
        self.enabled = None
        self.listeners = []
        self.accepted = 0
        self.failovers = 0
        self.refused = 0
        self.denied = 0
        self.open = 0
        self.full_logged = -1e9          # when "maxconns reached" was last logged
        self.queue = collections.deque()   # Pairs waiting for a host below its maxconns
        self.switch = None                 # the pending blue/green Switch, if any


class Switch(object):
    """A blue/green switch still in its drain or rollback window."""

    def __init__(self, from_group, to_group):
        self.from_group = from_group
        self.to_group = to_group
        self.drain_until = None      # epoch: connections left on from_group are closed then
        self.rollback_until = None   # epoch: switch back unless to_group had a host up by then
        self.confirmed = False       # to_group has had a host up
        self.timers = []


TIMELINE_LENGTH = 10     # state changes kept per host for /running


class ProbeState(object):
    """The director's bookkeeping for one host's health checks."""
    __slots__ = ('service', 'group', 'host', 'next_due', 'in_flight', 'timeline', 'changes')

    def __init__(self, service, group, host, next_due):
        self.service = service
        self.group = group
        self.host = host
        self.next_due = next_due
        self.in_flight = False
        self.timeline = collections.deque(maxlen=TIMELINE_LENGTH)
        self.changes = 0          # state changes in all, for /metrics (the timeline keeps 10)


def _same(a, b):
    """Two config objects (or plain values) equal, ignoring the line they were read from."""
    if type(a) is not type(b) or not hasattr(a, '__dict__'):
        return a == b
    return ({k: v for k, v in vars(a).items() if k != 'line'} ==
            {k: v for k, v in vars(b).items() if k != 'line'})


def _optional_seconds(value, what):
    """An admin's optional seconds value: None, or a number >= 0 (AdminError 400 otherwise)."""
    if value is None or value == '':
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise AdminError(400, '%s must be a number of seconds' % what)
    if not 0 <= seconds < 1e9:
        raise AdminError(400, '%s must be 0 or more seconds' % what)
    return seconds


def host_state(host):
    """One word for a host, as /running shows it: up, down, draining or disabled."""
    if host.health == schedulers.DOWN:
        return 'down'
    if host.admin != schedulers.ENABLED:
        return host.admin
    return 'up'


def resolve_now(host, port):
    """The sockaddr for a numeric address, or None for a name (which would block the loop)."""
    try:
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError):
        return None
    return (infos[0][0], infos[0][4])


def resolve(host, port):
    """(family, sockaddr) for a host; raises socket.gaierror.  Blocking: not for the loop."""
    infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    return (infos[0][0], infos[0][4])


class Director(object):
    """Owns the running services; every admin action is one method here, run on the loop."""

    def __init__(self, config, loop=None, rng=None):
        self.loop = loop or Loop()
        self.config = config
        self.loaded_xml = config.to_xml()
        self.rng = rng
        self.started = time.time()
        self.services = collections.OrderedDict()
        self.users = collections.OrderedDict((u.name, u) for u in config.admin.users) if config.admin else {}
        self.pairs = set()
        self.probes = {}          # Host -> ProbeState
        self.manager = None
        self.stopping = False
        self.stop_timer = None
        self.reloaded = None
        self.epoch_offset = time.time() - time.monotonic()   # loop time -> wall time, for pages
        self.access_log = config.logging.access
        for service_config in config.services:
            self._build_service(service_config, resolve_names=True)

    # -- building ---------------------------------------------------------

    def _make_host(self, name, ip, host, port, weight, maxconns, resolve_names, send_proxy=None):
        live = schedulers.Host(name, ip, weight=weight, maxconns=maxconns)
        live.send_proxy = send_proxy
        address = resolve_now(host, port)
        if address is None and resolve_names:
            try:
                address = resolve(host, port)
            except (socket.gaierror, UnicodeError) as e:
                live.health = schedulers.DOWN
                live.reason = 'cannot resolve %s: %s' % (host, e)
                live.since = time.time()
        elif address is None:
            live.health = schedulers.DOWN
            live.reason = 'not resolved yet'
            live.since = time.time()
        live.address = address
        return live

    def _make_scheduler(self, spec, hosts=()):
        return schedulers.make_scheduler(spec, hosts=hosts, clock=time.monotonic, rng=self.rng)

    def _build_service(self, service_config, resolve_names):
        service = RunningService(service_config)
        for group_config in service_config.groups:
            group = self._build_group(service, group_config, resolve_names)
            service.groups[group.name] = group
        service.enabled = service.groups[service_config.enabled]
        self.services[service.name] = service
        return service

    def _build_group(self, service, group_config, resolve_names):
        hosts = [self._make_host(h.name, h.ip, h.host, h.port, h.weight, h.maxconns, resolve_names,
                                 send_proxy=h.send_proxy)
                 for h in group_config.hosts]
        group = RunningGroup(group_config.name, self._make_scheduler(group_config.scheduler, hosts))
        for host in hosts:
            self._watch(service, group, host)
        return group

    def _watch(self, service, group, host):
        self.probes[host] = ProbeState(service, group, host, self.loop.now)

    # -- starting and stopping ---------------------------------------------

    def bind(self):
        """Open every listening socket, or none: on an error close what was opened and raise."""
        opened = []
        try:
            for service in self.services.values():
                for listen in service.config.listens:
                    sock = listen_socket(listen.host, listen.port)
                    opened.append(sock)
                    service.listeners.append(Listener(self, service, sock, listen))
        except Exception:
            for service in self.services.values():
                for listener in service.listeners:
                    listener.close()
                service.listeners = []
            for sock in opened:
                sock.close()
            raise

    def start(self):
        self.bind()
        self.manager = Manager(self)
        self.manager.start()
        for service in self.services.values():
            log.info('service %s listening on %s, group %s enabled',
                     service.name, ', '.join(l.text for l in service.listeners), service.enabled.name)

    def listen_addresses(self, service_name):
        """The (host, port) each listener of a service is bound to (tests use it)."""
        return [l.sock.getsockname()[:2] for l in self.services[service_name].listeners]

    def begin_stop(self, drain):
        """Stop accepting; let open connections finish for up to `drain` seconds."""
        if self.stopping:
            return
        self.stopping = True
        self._close_listeners()
        if self.manager is not None:
            self.manager.stop()
        log.info('stopping: %d connection(s) open, waiting up to %g s', len(self.pairs), drain)
        if not self.pairs:
            self.loop.stop()
        else:
            self.stop_timer = self.loop.call_later(drain, self.stop_now)

    def stop_now(self):
        self.stopping = True
        self._close_listeners()
        if self.manager is not None:
            self.manager.stop()
        if self.pairs:
            log.info('closing %d connection(s) still open', len(self.pairs))
        for pair in list(self.pairs):
            pair.close('shutdown')
        self.loop.stop()

    def _close_listeners(self):
        for service in self.services.values():
            for listener in service.listeners:
                listener.close()

    # -- connections --------------------------------------------------------

    def on_accept(self, listener, client_sock, client_addr):
        service = listener.service
        service.accepted += 1
        service.open += 1
        client_sock.setblocking(False)
        try:
            client_sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        pair = Pair(self, service, client_sock, client_addr)
        self.pairs.add(pair)
        maxconns = service.config.maxconns
        if maxconns and service.open > maxconns:
            service.refused += 1
            if self.loop.now - service.full_logged >= 1.0:   # one line a second, not one per client
                service.full_logged = self.loop.now
                log.warning('service %s: %d connections open (maxconns), refusing new clients',
                            service.name, maxconns)
            pair.close('full')
        elif listener.accept_proxy is None:
            self.route(pair)
        elif listener.trusted and not acl_allows(listener.trusted, pair.client_ip):
            service.denied += 1
            log.warning('client %s:%s in %s: not a trusted proxy', pair.client_ip, pair.client_port, service.name)
            pair.close('denied')
        else:
            pair.read_proxy_header(listener.accept_proxy)

    def route(self, pair):
        """A client whose address is known: check the service's rules, then find it a host."""
        service = pair.service
        if service.config.acl and not acl_allows(service.config.acl, pair.client_ip):
            service.denied += 1
            pair.close('denied')
            return
        pair.connect_next()

    def _serve_queue(self, service):
        """Hand freed slots to waiting clients, first come first served."""
        queue = service.queue
        while queue and not service.enabled.scheduler.full_only(()):
            pair = queue.popleft()
            pair.timer.cancel()
            pair.timer = None
            pair.state = CONNECTING
            pair.connect_next()

    def pause_accepting(self, err):
        """File descriptors are per process: when one accept or connect runs out, every listener waits."""
        for service in self.services.values():
            for listener in service.listeners:
                listener.pause(err)

    def pair_closed(self, pair, how):
        self.pairs.discard(pair)
        service = pair.service
        service.open -= 1
        if service.queue and pair.host is not None:
            self._serve_queue(service)
        if self.access_log:
            host = pair.host or (pair.tried[-1] if pair.tried else None)
            access_log.info(
                'access service=%s client=%s host=%s backend=%s failovers=%d bytes_in=%d '
                'bytes_out=%d duration=%.3f end=%s',
                log_value(pair.service.name), log_value(format_address(pair.client_ip, pair.client_port)),
                log_value(host.name) if host else '-', log_value(host.ip) if host else '-',
                max(0, len(pair.tried) - 1), pair.bytes_in, pair.bytes_out,
                self.loop.now - pair.started, how)
        if self.stopping and not self.pairs:
            if self.stop_timer is not None:
                self.stop_timer.cancel()
            self.loop.stop()

    # -- host state -------------------------------------------------------

    def set_host_state(self, service, group, host, state, cause):
        """The one way a host's health or admin state changes: tells the scheduler, logs once."""
        scheduler = group.scheduler
        when = time.time()
        before = host_state(host)
        if state == schedulers.UP:
            changed = scheduler.mark_up(host, when)
        elif state == schedulers.DOWN:
            changed = scheduler.mark_down(host, cause, when)
        else:
            changed = scheduler.set_admin(host, state, when)
        if changed:
            host.probe_ok = host.probe_fail = 0
            probe_state = self.probes.get(host)
            after = host_state(host)
            if probe_state is not None and after != before:
                probe_state.timeline.append((when, before, after, cause))
                probe_state.changes += 1
                if state == schedulers.DOWN:
                    probe_state.next_due = self.loop.now + self._check(service).interval
            if host_state(host) == 'up':
                if service.switch is not None and service.switch.to_group is group:
                    service.switch.confirmed = True
                if service.queue:
                    self._serve_queue(service)
            log.info('host %s (%s) in %s/%s %s: %s', host.name, host.ip, service.name, group.name, state, cause)
        return changed

    def _check(self, service):
        return service.check or DEFAULT_CHECK

    def probes_due(self):
        """Called by the manager each tick: the probes to run now, marked in flight."""
        now = self.loop.now
        due = []
        for state in self.probes.values():
            if state.in_flight or now < state.next_due:
                continue
            host = state.host
            check = self._check(state.service)
            if host.health == schedulers.UP and state.service.check is None:
                state.next_due = now + check.interval
                continue
            interval = check.interval
            if host.health == schedulers.DOWN and self._group_is_dark(state.service, state.group):
                interval = min(interval, 1.0)
            state.next_due = now + interval
            state.in_flight = True
            name, port = parse_address(host.ip)
            due.append((host, name, port, check))
        return due

    def _close_host_connections(self, host):
        """<check on_down="close"> (HAProxy's on-marked-down shutdown-sessions): a host
        that stopped answering probes holds its clients hostage; reset them so they retry."""
        doomed = [pair for pair in self.pairs if pair.host is host and pair.state is STREAMING]
        if doomed:
            log.info('host %s (%s) down: closing its %d connection(s)', host.name, host.ip, len(doomed))
        for pair in doomed:
            pair.abort('host-down')

    def _group_is_dark(self, service, group):
        """The enabled group has no host up: its hosts are probed every second."""
        if service.enabled is not group:
            return False
        return not any(h.health == schedulers.UP for h in group.scheduler.hosts)

    def probe_result(self, host, ok, reason, address):
        state = self.probes.get(host)
        if state is None:
            return  # the host was removed while the probe ran
        state.in_flight = False
        if address is not None:
            host.address = address
        check = self._check(state.service)
        if ok is None:
            log.debug('probe of host %s (%s) not made: %s', host.name, host.ip, reason)
        elif ok:
            host.probe_fail = 0
            if host.health == schedulers.DOWN:
                host.probe_ok += 1
                if host.probe_ok >= check.rise:
                    self.set_host_state(state.service, state.group, host, schedulers.UP,
                                        'answered %d probe(s)' % host.probe_ok)
        else:
            host.probe_ok = 0
            if host.health == schedulers.UP:
                host.probe_fail += 1
                if host.probe_fail >= check.fall:
                    self.set_host_state(state.service, state.group, host, schedulers.DOWN,
                                        '%s (%d failed probes)' % (reason, host.probe_fail))
                    if check.on_down == 'close':
                        self._close_host_connections(host)
            elif not (host.reason or '').startswith(reason):
                # Still down, for a new reason (a name that stopped resolving...): say so once.
                log.info('host %s (%s) in %s/%s still down: %s', host.name, host.ip,
                         state.service.name, state.group.name, reason)
                host.reason = reason

    # -- admin actions (each runs on the loop; AdminError when refused) ------

    def _service(self, name):
        service = self.services.get(name)
        if service is None:
            raise AdminError(404, 'no service %r' % name)
        return service

    def _group(self, service_name, group_name):
        service = self._service(service_name)
        group = service.groups.get(group_name)
        if group is None:
            raise AdminError(404, 'no group %r in service %s' % (group_name, service.name))
        return service, group

    def _host(self, service_name, group_name, name=None, ip=None):
        service, group = self._group(service_name, group_name)
        for host in group.scheduler.hosts:
            if (name is not None and host.name == name) or (name is None and ip is not None and host.ip == ip):
                return service, group, host
        raise AdminError(404, 'no host %r in %s/%s' % (name if name is not None else ip, service.name, group.name))

    def snapshot(self):
        services = []
        for service in self.services.values():
            groups = []
            for group in service.groups.values():
                hosts = []
                for host in group.scheduler.hosts:
                    probe_state = self.probes.get(host)
                    hosts.append({
                        'name': host.name, 'ip': host.ip, 'weight': host.weight, 'maxconns': host.maxconns,
                        'health': host.health, 'admin': host.admin, 'state': host_state(host),
                        'reason': host.reason, 'since': host.since,
                        'open': host.open, 'total': host.total,
                        'bytes_in': host.bytes_in, 'bytes_out': host.bytes_out,
                        'send_proxy': host.send_proxy,
                        'timeline': [{'when': when, 'from': old, 'to': new, 'why': why}
                                     for when, old, new, why in probe_state.timeline] if probe_state else [],
                        'next_probe': self._next_probe(service, host, probe_state),
                        'state_changes': probe_state.changes if probe_state else 0,
                    })
                groups.append({'name': group.name, 'scheduler': group.scheduler.spec,
                               'enabled': group is service.enabled, 'hosts': hosts})
            services.append({
                'name': service.name, 'listen': [l.text for l in service.listeners] or
                [l.text for l in service.config.listens],
                'enabled': service.enabled.name, 'accepted': service.accepted,
                'failovers': service.failovers, 'refused': service.refused, 'groups': groups,
                'maxconns': service.config.maxconns, 'open': service.open,
                'queued': len(service.queue), 'denied': service.denied,
                'switch': self._switch_snapshot(service.switch),
            })
        return {
            'version': VERSION, 'hostname': socket.gethostname(), 'pid': os.getpid(),
            'started': self.started, 'now': time.time(), 'services': services,
            'config_path': self.config.path, 'reloaded': self.reloaded,
            'users': [{'name': u.name, 'access': u.access} for u in self.users.values()],
        }

    def _next_probe(self, service, host, probe_state):
        """Epoch time of the host's next probe; None when it is not probed (up, no <check>)."""
        if probe_state is None or (host.health == schedulers.UP and service.check is None):
            return None
        return round(self.epoch_offset + max(probe_state.next_due, self.loop.now), 3)

    @staticmethod
    def _switch_snapshot(switch):
        if switch is None:
            return None
        return {'from': switch.from_group.name, 'to': switch.to_group.name,
                'drain_until': switch.drain_until, 'rollback_until': switch.rollback_until}

    def explain(self, service, client):
        """Which host `client` would get now, and why; changes nothing."""
        service = self._service(service)
        try:
            client_ip = str(ipaddress.ip_address(client))
        except ValueError:
            raise AdminError(400, 'client must be an IP address, not %r' % client)
        group = service.enabled
        scheduler = group.scheduler
        answer = {'service': service.name, 'group': group.name, 'client': client_ip,
                  'allowed': self._allowed(service, client_ip), 'scheduler': scheduler.spec,
                  'host': None, 'address': None, 'reason': '', 'sticky': None,
                  'ranking': None, 'skipped': []}
        detail = scheduler.explain(client_ip)
        host = detail.get('host')
        answer.update((k, v) for k, v in detail.items() if k in ('reason', 'sticky', 'ranking', 'skipped'))
        if host is not None:
            answer['host'] = host.name
            answer['address'] = host.ip
        if not answer['allowed']:
            answer['reason'] = 'denied by the allow/deny rules of service %s (would be: %s)' % (
                service.name, answer['reason'])
        return answer

    def _allowed(self, service, client_ip):
        rules = service.config.acl
        return not rules or acl_allows(rules, client_ip)

    def users_list(self):
        return [(u.name, u.password, u.access) for u in self.users.values()]

    def add_host(self, service, group, name, ip, weight=None, maxconns=None, send_proxy=None):
        service, group = self._group(service, group)
        try:
            check_name(name, 'host name')
            host_name, port = parse_address(ip)
            weight = 1 if weight in (None, '') else int(weight)
            maxconns = 0 if maxconns in (None, '') else int(maxconns)
        except ValueError as e:
            raise AdminError(400, str(e))
        if not 1 <= weight <= 1000:
            raise AdminError(400, 'weight must be 1-1000')
        if maxconns < 0:
            raise AdminError(400, 'maxconns must be 0 or more')
        if send_proxy in ('', None):
            send_proxy = None
        elif send_proxy not in ('v1', 'v2'):
            raise AdminError(400, "send_proxy must be 'v1' or 'v2'")
        if group.scheduler.get_host(name) is not None:
            raise AdminError(409, 'host %r already exists in %s/%s' % (name, service.name, group.name))
        for other in group.scheduler.hosts:
            if other.ip == ip:   # as the config refuses: running.xml must load again
                raise AdminError(409, 'host %s in %s/%s already has ip %s' % (other.name, service.name, group.name, ip))
        host = self._make_host(name, ip, host_name, port, weight, maxconns, resolve_names=False,
                               send_proxy=send_proxy)
        group.scheduler.add_host(host)
        self._watch(service, group, host)
        log.info('host %s (%s) added to %s/%s', name, ip, service.name, group.name)
        return 'added host %s (%s) to %s/%s' % (name, ip, service.name, group.name)

    def del_host(self, service, group, name=None, ip=None):
        if name is None and ip is None:
            raise AdminError(400, 'delHost needs name or ip')
        service, group, host = self._host(service, group, name, ip)
        if group is service.enabled and len(group.scheduler.hosts) == 1:
            raise AdminError(409, 'refusing to remove the last host of the enabled group %s' % group.name)
        self._remove_host(service, group, host)
        return 'removed host %s (%s) from %s/%s' % (host.name, host.ip, service.name, group.name)

    def _remove_host(self, service, group, host):
        # Open connections keep their Host object and finish; the scheduler just stops offering it.
        group.scheduler.remove_host(host.name)
        self.probes.pop(host, None)
        log.info('host %s (%s) removed from %s/%s (%d connection(s) left to finish)',
                 host.name, host.ip, service.name, group.name, host.open)

    def del_all_hosts(self, service, group):
        service, group = self._group(service, group)
        if group is service.enabled:
            raise AdminError(409, 'refusing to remove every host of the enabled group %s' % group.name)
        hosts = list(group.scheduler.hosts)
        for host in hosts:
            self._remove_host(service, group, host)
        return 'removed %d host(s) from %s/%s' % (len(hosts), service.name, group.name)

    def enable_group(self, service, group, drain=None, rollback=None):
        """Switch new connections to group.  drain: seconds after which connections
        still on the old group are closed.  rollback: seconds within which the new
        group must have a host up, or the switch is undone."""
        service, group = self._group(service, group)
        drain = _optional_seconds(drain, 'drain')
        rollback = _optional_seconds(rollback, 'rollback')
        old = service.enabled
        self._end_switch(service)
        service.enabled = group
        log.info('service %s: group %s enabled (was %s)', service.name, group.name, old.name)
        message = 'enabled group %s in service %s (was %s)' % (group.name, service.name, old.name)
        if group is old or (drain is None and rollback is None):
            return message
        switch = service.switch = Switch(old, group)
        if drain is not None:
            switch.drain_until = time.time() + drain
            switch.timers.append(self.loop.call_later(drain, self._drain_group, service, switch))
            message += '; connections left on %s close in %g s' % (old.name, drain)
        if rollback is not None:
            switch.confirmed = any(host_state(h) == 'up' for h in group.scheduler.hosts)
            if not switch.confirmed:
                switch.rollback_until = time.time() + rollback
                switch.timers.append(self.loop.call_later(rollback, self._check_rollback, service, switch, rollback))
                message += '; back to %s unless a host is up within %g s' % (old.name, rollback)
        return message

    def _end_switch(self, service):
        if service.switch is not None:
            for timer in service.switch.timers:
                timer.cancel()
            service.switch = None

    def _drain_group(self, service, switch):
        if service.enabled is not switch.from_group:
            doomed = [p for p in self.pairs if p.service is service and p.group is switch.from_group]
            log.info('service %s: drain of group %s over, closing %d connection(s)',
                     service.name, switch.from_group.name, len(doomed))
            for pair in doomed:
                pair.close('drained')
        switch.drain_until = None
        if switch.rollback_until is None and service.switch is switch:
            service.switch = None

    def _check_rollback(self, service, switch, window):
        switch.rollback_until = None
        if switch.confirmed or any(host_state(h) == 'up' for h in switch.to_group.scheduler.hosts):
            switch.confirmed = True
        elif service.enabled is switch.to_group:
            log.warning('service %s: rollback to group %s: group %s had no host up within %g s',
                        service.name, switch.from_group.name, switch.to_group.name, window)
            service.enabled = switch.from_group
            self._end_switch(service)
            return
        if switch.drain_until is None and service.switch is switch:
            service.switch = None

    def change_scheduler(self, service, group, scheduler):
        service, group = self._group(service, group)
        try:
            new = self._make_scheduler(scheduler)
        except ValueError as e:
            raise AdminError(400, str(e))
        old = group.scheduler.spec
        new.take_state_from(group.scheduler)  # same Host objects: counters and state carry over
        group.scheduler = new
        log.info('%s/%s: scheduler %s (was %s)', service.name, group.name, new.spec, old)
        return 'changed scheduler of %s/%s to %s (was %s)' % (service.name, group.name, new.spec, old)

    def host_admin_down(self, service, group, name):
        service, group, host = self._host(service, group, name)
        self.set_host_state(service, group, host, schedulers.DRAINING, 'by admin')
        return 'draining host %s in %s/%s (%d open)' % (host.name, service.name, group.name, host.open)

    def host_admin_up(self, service, group, name):
        service, group, host = self._host(service, group, name)
        self.set_host_state(service, group, host, schedulers.ENABLED, 'by admin')
        return 'enabled host %s in %s/%s' % (host.name, service.name, group.name)

    def retry_host(self, service, group, name):
        service, group, host = self._host(service, group, name)
        self.probes[host].next_due = self.loop.now
        return 'probing host %s in %s/%s now' % (host.name, service.name, group.name)

    def add_user(self, name, password_hash, access):
        try:
            check_name(name, 'user name')
        except ValueError as e:
            raise AdminError(400, str(e))
        if access not in ('full', 'readonly'):
            raise AdminError(400, "access must be 'full' or 'readonly'")
        verb = 'changed' if name in self.users else 'added'
        self.users[name] = User(name, password_hash, access)
        log.info('admin user %s %s (%s)', name, verb, access)
        return '%s user %s (%s)' % (verb, name, access)

    def del_user(self, name):
        user = self.users.get(name)
        if user is None:
            raise AdminError(404, 'no user %r' % name)
        if user.access == 'full' and not any(u.access == 'full' for u in self.users.values() if u is not user):
            raise AdminError(409, 'refusing to delete the last full-access user')
        del self.users[name]
        log.info('admin user %s deleted', name)
        return 'deleted user %s' % name

    def new_group(self, service, group, scheduler):
        service = self._service(service)
        try:
            check_name(group, 'group name')
            sched = self._make_scheduler(scheduler)
        except ValueError as e:
            raise AdminError(400, str(e))
        if group in service.groups:
            raise AdminError(409, 'group %r already exists in service %s' % (group, service.name))
        service.groups[group] = RunningGroup(group, sched)
        log.info('service %s: new group %s (%s)', service.name, group, sched.spec)
        return 'created group %s in service %s (%s)' % (group, service.name, sched.spec)

    def del_group(self, service, group):
        service, group = self._group(service, group)
        if group is service.enabled:
            raise AdminError(409, 'refusing to delete the enabled group %s' % group.name)
        for host in list(group.scheduler.hosts):
            self.probes.pop(host, None)
        del service.groups[group.name]
        log.info('service %s: group %s deleted', service.name, group.name)
        return 'deleted group %s from service %s' % (group.name, service.name)

    # -- reload -------------------------------------------------------------

    def reload(self):
        """Re-read the config file and apply the difference.  Open connections are
        never cut; hosts that did not change keep their state and counters."""
        path = self.config.path
        try:
            new = load_config(path)
        except ConfigError as e:
            log.error('reload failed: %s', e)
            raise AdminError(400, str(e))
        listeners = self._bind_for(new)   # first, so a port in use changes nothing
        changes = []
        services = collections.OrderedDict()
        for service_config in new.services:
            service = self.services.get(service_config.name)
            if service is None:
                service = self._build_service(service_config, resolve_names=False)
                changes.append('+service %s' % service.name)
            else:
                part = self._update_service(service, service_config)
                if part:
                    changes.append('%s: %s' % (service.name, ', '.join(part)))
            old_listens = [(l.text, l.accept_proxy, l.trusted) for l in service.listeners]
            service.listeners = []
            for listen in service_config.listens:
                listener = listeners.pop(listen.text)
                listener.service = service
                listener.configure(listen)
                service.listeners.append(listener)
            if old_listens and old_listens != [(l.text, l.accept_proxy, l.trusted) for l in service.listeners]:
                changes.append('%s: listen %s' % (service.name, ', '.join(l.text for l in service.listeners)))
            services[service.name] = service
        for name, service in self.services.items():
            if name not in services:
                self._retire_service(service)
                changes.append('-service %s' % name)
        for listener in listeners.values():
            listener.close()   # left over: listened on by no service now
        self.services = services
        changes.extend(self._reload_rest(new))
        self.config = new
        self.loaded_xml = new.to_xml()
        self.reloaded = time.time()
        message = 'reloaded %s: %s' % (path, '; '.join(changes) or 'no changes')
        log.info('%s', message)
        return message

    def _bind_for(self, new):
        """text -> Listener for every listen of `new`, reusing open sockets; all or nothing."""
        current = {}
        for service in self.services.values():
            for listener in service.listeners:
                current[listener.text] = listener
        opened = {}
        try:
            for service_config in new.services:
                for listen in service_config.listens:
                    if listen.text not in current and listen.text not in opened:
                        sock = listen_socket(listen.host, listen.port)
                        opened[listen.text] = Listener(self, None, sock, listen)
        except OSError as e:
            for listener in opened.values():
                listener.close()
            log.error('reload failed: cannot listen on %s: %s', listen.text, e)
            raise AdminError(400, 'cannot listen on %s: %s' % (listen.text, e))
        current.update(opened)
        return current

    def _update_service(self, service, config):
        """Bring a running service in line with its new config; the list of changes."""
        changes = []
        old = service.config
        for what in ('timeouts', 'check', 'maxconns', 'acl'):
            if not _same(getattr(old, what), getattr(config, what)):
                changes.append(what)
        service.config = config
        service.timeouts = config.timeouts
        service.check = config.check
        groups = collections.OrderedDict()
        for group_config in config.groups:
            group = service.groups.get(group_config.name)
            if group is None:
                group = self._build_group(service, group_config, resolve_names=False)
                changes.append('+group %s' % group.name)
            else:
                changes.extend(self._update_group(service, group, group_config))
            groups[group.name] = group
        enabled = groups[config.enabled]
        if enabled is not service.enabled:
            self._end_switch(service)
            changes.append('enabled group %s (was %s)' % (enabled.name, service.enabled.name))
            service.enabled = enabled
        for name, group in service.groups.items():
            if name not in groups:
                for host in group.scheduler.hosts:
                    self.probes.pop(host, None)
                changes.append('-group %s' % name)
        service.groups = groups
        return changes

    def _update_group(self, service, group, config):
        changes = []
        if group.scheduler.spec != config.scheduler:
            new = self._make_scheduler(config.scheduler)
            new.take_state_from(group.scheduler)
            changes.append('scheduler %s %s->%s' % (group.name, group.scheduler.spec, new.spec))
            group.scheduler = new
        scheduler = group.scheduler
        wanted = collections.OrderedDict((h.name, h) for h in config.hosts)
        moved = set()
        for host in list(scheduler.hosts):
            host_config = wanted.get(host.name)
            if host_config is None or host_config.ip != host.ip:
                self._remove_host(service, group, host)
                if host_config is None:
                    changes.append('-host %s' % host.name)
                else:
                    moved.add(host.name)
        for name, host_config in wanted.items():
            host = scheduler.get_host(name)
            if host is None:
                host = self._make_host(host_config.name, host_config.ip, host_config.host, host_config.port,
                                       host_config.weight, host_config.maxconns, resolve_names=False,
                                       send_proxy=host_config.send_proxy)
                scheduler.add_host(host)
                self._watch(service, group, host)
                changes.append('host %s ip %s' % (name, host.ip) if name in moved else '+host %s' % name)
                continue
            for what in ('weight', 'maxconns', 'send_proxy'):
                value = getattr(host_config, what, None)
                if getattr(host, what, None) != value:
                    changes.append('host %s %s %s' % (name, what, value))
            # Through the scheduler, which keeps its eligible set and weights in step.
            scheduler.update_host(host, weight=host_config.weight, maxconns=host_config.maxconns)
            host.send_proxy = host_config.send_proxy
        # The file's order is the scheduler's order (roundrobin ties, leastconns ties).
        scheduler.reorder(list(wanted))
        return changes

    def _retire_service(self, service):
        """A service gone from the file: stop listening; its open connections finish."""
        self._end_switch(service)
        for group in service.groups.values():
            for host in group.scheduler.hosts:
                self.probes.pop(host, None)
        while service.queue:
            service.queue.popleft().close('shutdown')
        log.info('service %s removed (%d connection(s) left to finish)', service.name, service.open)

    def _reload_rest(self, new):
        """Users, logging and the settings a reload cannot change in a running process."""
        changes = []
        old = self.config
        if new.admin is not None:
            users = collections.OrderedDict((u.name, u) for u in new.admin.users)
            if [(u.name, u.password, u.access) for u in users.values()] != self.users_list():
                changes.append('admin users')
            self.users = users
        if (old.admin is None) != (new.admin is None) or (
                old.admin and (old.admin.listen, old.admin.certfile, old.admin.keyfile) !=
                (new.admin.listen, new.admin.certfile, new.admin.keyfile)):
            changes.append('admin listen/TLS not changed (needs a restart)')
        if (old.user, old.group) != (new.user, new.group):
            changes.append('user/group not changed (needs a restart)')
        if not _same(old.logging, new.logging):
            configure_log_handlers(new.logging)
            self.access_log = new.logging.access
            changes.append('logging')
        if old.drain != new.drain:
            changes.append('drain %g s' % new.drain)
        return changes

    def close_log(self):
        reopen_logs()
        log.info('log file reopened')
        return 'log reopened'

    def running_config(self):
        """The running state as a Config, so it serialises to a loadable running.xml."""
        services = []
        for service in self.services.values():
            groups = []
            for group in service.groups.values():
                hosts = []
                for host in group.scheduler.hosts:
                    host_name, port = parse_address(host.ip)
                    hosts.append(Host(host.name, host.ip, host_name, port, host.weight, host.maxconns,
                                      send_proxy=host.send_proxy))
                groups.append(Group(group.name, group.scheduler.spec, hosts))
            old = service.config
            services.append(Service(service.name, old.listens, groups, service.enabled.name,
                                    old.check, old.timeouts, maxconns=old.maxconns, acl=old.acl))
        admin = None
        if self.config.admin is not None:
            old = self.config.admin
            admin = Admin(old.listen, old.host, old.port, list(self.users.values()), old.certfile, old.keyfile)
        return Config(self.config.path, services, admin, self.config.logging, self.config.drain,
                      self.config.user, self.config.group)


def listen_socket(host, port):
    """A bound, listening, non-blocking socket; OSError says why not."""
    infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # As nginx does: [::]:80 means IPv6 only, so *:80 can be bound beside it.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(socket.SOMAXCONN if socket.SOMAXCONN > 4096 else 4096)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

LOG_FORMAT = '%(asctime)s %(levelname)s %(message)s'


_log_handlers = []   # the handlers we installed, so a reload replaces only those


class LogFormatter(logging.Formatter):
    """LOG_FORMAT, with the date text made once a second: with an access line
    per connection, strftime per record is a cost worth saving."""

    _second = None
    _date = ''

    def formatTime(self, record, datefmt=None):
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._date = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(second))
        return '%s,%03d' % (self._date, record.msecs)


def lighten_logging():
    """The logging module's documented optimisations: we log neither the caller's
    file and line nor thread and process names, so don't collect them per record."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def setup_logging(config, verbose=False):
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    configure_log_handlers(config.logging)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def configure_log_handlers(logging_config):
    """Install handlers for <logging>: a file (else stderr), and syslog when asked."""
    root = logging.getLogger()
    for handler in _log_handlers:
        root.removeHandler(handler)
        handler.close()
    del _log_handlers[:]
    if logging_config.file:
        handler = logging.FileHandler(logging_config.file)
    elif logging_config.syslog is None:
        handler = logging.StreamHandler(sys.stderr)
    else:
        handler = None
    if handler is not None:
        handler.setFormatter(LogFormatter(LOG_FORMAT))
        _log_handlers.append(handler)
    if logging_config.syslog is not None:
        handler = logging.handlers.SysLogHandler(
            address=logging_config.syslog_address, facility=logging_config.facility)
        handler.setFormatter(logging.Formatter('pydirector[%d]: %%(message)s' % os.getpid()))
        _log_handlers.append(handler)
    for handler in _log_handlers:
        root.addHandler(handler)


def reopen_logs():
    """For logrotate: a FileHandler reopens its file on the next record after close()."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.close()


def raise_fd_limit():
    """Each client costs two fds; take the hard limit the administrator allows."""
    try:
        import resource
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as e:
        log.warning('cannot raise the open-file limit from %d to %d: %s', soft, hard, e)


def summary(config):
    """The one-screen --check summary."""
    lines = ['%s: OK' % config.path]
    for service in config.services:
        lines.append('service %s: listen %s; timeouts connect %gs idle %gs%s%s%s' % (
            service.name, ', '.join(l.text + (' (PROXY %s)' % l.accept_proxy if l.accept_proxy else '')
                                    for l in service.listens),
            service.timeouts.connect, service.timeouts.idle,
            '; check every %gs' % service.check.interval if service.check else '',
            '; maxconns %d' % service.maxconns if service.maxconns else '',
            '; %d allow/deny rule(s)' % len(service.acl) if service.acl else ''))
        for group in service.groups:
            mark = ' (enabled)' if group.name == service.enabled else ''
            lines.append('  group %s%s: scheduler %s, %d host(s)' % (group.name, mark, group.scheduler, len(group.hosts)))
            for host in group.hosts:
                extra = ''
                if host.weight != 1:
                    extra += ' weight %d' % host.weight
                if host.maxconns:
                    extra += ' maxconns %d' % host.maxconns
                if host.send_proxy:
                    extra += ' send_proxy %s' % host.send_proxy
                lines.append('    host %s %s%s' % (host.name, host.ip, extra))
    if config.admin:
        lines.append('admin: listen %s; %d user(s)' % (config.admin.listen, len(config.admin.users)))
    lines.append('logging: %s%s%s' % (config.logging.file or ('stderr' if not config.logging.syslog else ''),
                                      ' syslog %s' % config.logging.syslog if config.logging.syslog else '',
                                      '' if config.logging.access else ', no access log'))
    if config.user:
        lines.append('runs as: user %s%s' % (config.user, ' group %s' % config.group if config.group else ''))
    return '\n'.join(lines)


def privilege_ids(user, group):
    """(uid, gid) to switch to, from names or numbers; ValueError says what is unknown."""
    import grp
    import pwd
    try:
        entry = pwd.getpwuid(int(user)) if re.match(r'[0-9]+\Z', user) else pwd.getpwnam(user)
    except KeyError:
        raise ValueError('no user %r on this system' % user)
    gid = entry.pw_gid
    if group:
        try:
            gid = grp.getgrgid(int(group)).gr_gid if re.match(r'[0-9]+\Z', group) else grp.getgrnam(group).gr_gid
        except KeyError:
            raise ValueError('no group %r on this system' % group)
    return entry.pw_uid, gid


def drop_privileges(uid, gid):
    """Become uid/gid for good, after binding and opening logs as root."""
    if os.getuid() == 0:
        os.setgroups([gid])
        os.setgid(gid)
        os.setuid(uid)
    elif (os.getuid(), os.getgid()) != (uid, gid):
        raise OSError('only root can switch to uid %d, gid %d (running as uid %d)' % (uid, gid, os.getuid()))
    if os.getuid() == 0 or os.geteuid() == 0:
        raise OSError('asked to drop privileges, but still root: refusing to run as root')


def read_password():
    import getpass
    if sys.stdin.isatty():
        first = getpass.getpass('Password: ')
        if getpass.getpass('Again: ') != first:
            raise SystemExit('pydirector: the passwords differ')
        return first
    return sys.stdin.readline().rstrip('\r\n')


def parse_args(argv):
    parser = argparse.ArgumentParser(prog=os.path.basename(sys.argv[0]) or 'pydirector.py', description='A TCP load balancer in pure Python.')
    parser.add_argument('config_file', nargs='?', help='the XML config (same as -c)')
    parser.add_argument('-c', '--config', help='the XML config file')
    parser.add_argument('--check', action='store_true', help='validate the config, print a summary, bind nothing')
    parser.add_argument('--hash-password', action='store_true',
                        help='read a password (prompt or stdin) and print its hash for <user password=...>')
    parser.add_argument('--user', help='switch to this user after binding (overrides <pdconfig user=>)')
    parser.add_argument('--group', help='and to this group (default: the user\'s own)')
    parser.add_argument('-v', '--verbose', action='store_true', help='log debug detail')
    parser.add_argument('--version', action='version', version='pydirector ' + VERSION)
    args = parser.parse_args(argv)
    if args.config and args.config_file and args.config != args.config_file:
        parser.error('give the config once: -c FILE or FILE')
    args.config = args.config or args.config_file
    if not args.config and not args.hash_password:
        parser.error('a config file is needed: -c FILE')
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.hash_password:
        print(hash_password(read_password()))
        return 0
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print('pydirector: %s' % e, file=sys.stderr)
        return 1
    if args.check:
        print(summary(config))
        return 0
    user = args.user or config.user
    ids = None
    if user:
        try:
            ids = privilege_ids(user, args.group or config.group)
        except ValueError as e:
            print('pydirector: %s' % e, file=sys.stderr)
            return 1
    lighten_logging()
    setup_logging(config, args.verbose)
    raise_fd_limit()
    director = Director(config)

    def on_signal(signum, frame):
        # Only hand the loop a call: handlers must not touch state mid-event.
        director.loop.call_soon_threadsafe(handle_signal, signum)

    def handle_signal(signum):
        if signum in (signal.SIGTERM, signal.SIGINT):
            if director.stopping:
                log.info('second stop signal: stopping now')
                director.stop_now()
            else:
                director.begin_stop(config.drain)
        elif signum == signal.SIGUSR1:
            director.close_log()
        elif signum == signal.SIGHUP:
            try:
                director.reload()
            except AdminError:
                pass   # logged by reload(); keep running on the old config

    # Before binding: once a port answers, a signal must find its handler.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP):
        signal.signal(signum, on_signal)
    try:
        director.start()
    except OSError as e:
        log.error('cannot listen: %s', e)
        return 1
    admin_server = None
    if config.admin is not None:
        # Run as a script this module is __main__; the admin must see these same classes.
        sys.modules.setdefault('pydirector', sys.modules[__name__])
        import pydirector_admin
        try:
            admin_server = pydirector_admin.start(director, config.admin)
        except OSError as e:
            log.error('admin cannot listen on %s: %s', config.admin.listen, e)
            director.stop_now()
            return 1
    if ids is not None:
        try:
            drop_privileges(*ids)
        except OSError as e:
            log.error('cannot drop privileges: %s', e)
            director.stop_now()
            if admin_server is not None:
                admin_server.stop()
            return 1
        log.info('running as uid %d, gid %d', os.getuid(), os.getgid())

    try:
        director.loop.run()
    finally:
        if admin_server is not None:
            admin_server.stop()
    log.info('stopped')
    return 0


if __name__ == '__main__':
    sys.exit(main())
