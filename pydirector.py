#!/usr/bin/env python3
"""pydirector: a TCP load balancer in pure standard-library Python.

It takes inbound TCP connections and relays each to one backend host chosen
by a scheduler, failing over transparently when a host does not answer.
A revival of Python Director (Anthony Baxter, 2002-2004).

    python3 pydirector.py -c sample.xml

Sections, in the order a reader meets them: Config, Loop, PROXY protocol, TLS
ClientHello and server names (SNI), Logs, Proxying, Datagrams (UDP services),
Manager (health checks), DNS, systemd, Director, Workers (a master and worker
processes), Upgrade (new code in the same process), Command line.
docs/ARCHITECTURE.md walks through them.
"""

import argparse
import array
import atexit
import base64
import binascii
import collections
import concurrent.futures
import copy
import errno
import functools
import hashlib
import heapq
import hmac
import ipaddress
import itertools
import json
import logging
import logging.handlers
import math
import operator
import os
import random
import re
import select
import selectors
import signal
import socket
import stat
import struct
import sys
import _socket
import tempfile
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

# ---------------------------------------------------------------------------
# Config: the XML file read into plain objects, checked, and written back.
#
# Python Director 1.0 files load unchanged (<client> for <host>, nameless
# hosts, crypt() passwords, <note> comments).  Every problem is a ConfigError
# "FILE:LINE: message" naming the element at fault.
# ---------------------------------------------------------------------------

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


class ConfigElement(object):
    """The base of the value classes: a field for each row of the element's
    attribute table (ELEMENT_ATTRS[TAG]), given as a keyword argument or else
    the row's default.  line: where the element starts in the file (None when
    made by code)."""

    TAG = None

    def __init__(self, line=None, **values):
        self.line = line
        for row in ELEMENT_ATTRS[self.TAG]:
            setattr(self, row.field, values.pop(row.field, row.default))
            if row.spelling:
                setattr(self, row.spelling, values.pop(row.spelling, None))
        if values:
            raise TypeError(f'<{self.TAG}> has no attribute {", ".join(sorted(values))}')

    def xml_attrs(self):
        """[(name, text)] of the attributes running.xml writes for this element."""
        return attr_texts(ELEMENT_ATTRS[self.TAG], vars(self))


class Config(ConfigElement):
    """A whole <pdconfig>: services in file order, the optional admin server,
    logging, and CONFIG_ATTRS: how long to let connections drain on shutdown,
    the user and group to run as (names or numeric ids as text; None: stay as
    started), workers (None: one process; a number or 'auto': a master and
    workers), and the seconds an upgrade's new generation has to be ready
    (upgrade_timeout).  line: where <pdconfig> starts, for errors about its
    attributes."""

    TAG = 'pdconfig'

    def __init__(self, path=None, services=(), admin=None, logging=None, line=None, **values):
        ConfigElement.__init__(self, line, **values)
        self.path = path
        self.services = list(services or ())
        self.admin = admin
        self.logging = logging if logging is not None else Logging()
        self.digest = None      # load_config: the sha256 of the file's bytes, to tell when it changes

    def service(self, name):
        for service in self.services:
            if service.name == name:
                return service
        return None

    def to_xml(self):
        """The config as a file parse_config accepts (running.xml), one
        element per line; defaults are written only where they differ."""
        out = [_xml_tag(0, 'pdconfig', self.xml_attrs(), '>')]
        for service in self.services:
            out.append(_xml_tag(1, 'service', service.xml_attrs(), '>'))
            for listen in service.listens:
                out.append(_xml_tag(2, 'listen', listen.xml_attrs()))
            for action, network in service.acl:
                out.append(_xml_tag(2, action, attr_texts(ACL_ATTRS, {'cidr': network})))
            for group in service.groups:
                if not group.hosts and not group.discovers:
                    out.append(_xml_tag(2, 'group', group.xml_attrs()))
                    continue
                out.append(_xml_tag(2, 'group', group.xml_attrs(), '>'))
                for host in group.hosts:
                    out.append(_xml_tag(3, 'host', host.xml_attrs()))
                for discover in group.discovers:
                    out.append(_xml_tag(3, 'discover', discover.xml_attrs()))
                out.append('    </group>')
            # Always written, though it defaults to the first group: which
            # group is live is the one thing an operator reads running.xml for.
            if service.enabled is not None:
                out.append(_xml_tag(2, 'enable', attr_texts(ENABLE_ATTRS, {'group': service.enabled})))
            if service.check is not None:
                out.append(_xml_tag(2, 'check', service.check.xml_attrs()))
            attrs = service.timeouts.xml_attrs() if service.timeouts is not None else []
            if attrs:
                out.append(_xml_tag(2, 'timeouts', attrs))
            attrs = service.udp.xml_attrs() if service.udp is not None else []
            if attrs:
                out.append(_xml_tag(2, 'udp', attrs))
            if service.clients is not None:
                out.append(_xml_tag(2, 'clients', service.clients.xml_attrs()))
            out.append('  </service>')
        if self.admin is not None:
            out.append(_xml_tag(1, 'admin', self.admin.xml_attrs(), '>'))
            for user in self.admin.users:
                out.append(_xml_tag(2, 'user', user.xml_attrs()))
            out.append('  </admin>')
        attrs = self.logging.xml_attrs() if self.logging is not None else []
        if attrs:
            out.append(_xml_tag(1, 'logging', attrs))
        out.append('</pdconfig>')
        return '\n'.join(out) + '\n'


class Service(ConfigElement):
    """A <service>: SERVICE_ATTRS (its name; maxconns caps its open clients,
    0 = unlimited; protocol 'tcp' or 'udp'), where it listens, its groups of
    hosts, and which group is enabled (a group name).  check is None when the
    file has no <check> (DEFAULT_CHECK applies then); timeouts is always set
    (a UDP service's idle defaults to UDP_IDLE); udp is its <udp> settings,
    always set for a UDP service and None for TCP.  acl is the <allow>/<deny>
    rules in file order, as ('allow' or 'deny', ipaddress network) pairs.
    clients: its <clients> limits, or None."""

    TAG = 'service'

    def __init__(self, listens=(), groups=(), enabled=None, check=None, timeouts=None, acl=(), line=None,
                 udp=None, clients=None, **values):
        ConfigElement.__init__(self, line, **values)
        self.clients = clients
        self.listens = list(listens or ())
        self.groups = list(groups or ())
        if enabled is None and self.groups:
            enabled = self.groups[0].name
        self.enabled = enabled
        self.check = check
        datagrams = self.protocol == 'udp'
        self.timeouts = timeouts if timeouts is not None else Timeouts(idle=UDP_IDLE) if datagrams else Timeouts()
        self.udp = (udp or Udp()) if datagrams else None
        self.acl = list(acl or ())

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


class Listen(ConfigElement):
    """One <listen>: text is its ip as written, host and port what to bind
    ('*' becomes '0.0.0.0', '[::]' becomes '::').  accept_proxy is None, or
    'v1', 'v2' or 'any': the PROXY protocol header versions read from each
    peer first; trusted lists the networks that may send one (empty: any).
    sni is None, or the server name patterns (parse_sni) this service takes
    on the address: the client's TLS hello then picks the service, and
    several services may share the address.  protocol is its service's
    ('tcp' or 'udp'): a TCP and a UDP service may listen on one address."""

    TAG = 'listen'

    def __init__(self, line=None, protocol='tcp', **values):
        ConfigElement.__init__(self, line, **values)
        self.protocol = protocol
        self.host, self.port = parse_address(self.text)
        self.trusted = list(self.trusted or ())
        self.sni = list(self.sni) if self.sni else None

    @property
    def key(self):
        """What makes two listens the same address (one socket); a UDP one is another
        socket than a TCP one on the same address."""
        return listen_key(self.host, self.port, self.protocol)

    def __repr__(self):
        return f'Listen({self.text!r})'


class Group(ConfigElement):
    """A <group> of hosts and the scheduler spec that picks among them; discovers:
    its <discover> elements, whose hosts come from DNS at run time."""

    TAG = 'group'

    def __init__(self, hosts=(), discovers=(), line=None, **values):
        ConfigElement.__init__(self, line, **values)
        self.hosts = list(hosts or ())
        self.discovers = list(discovers or ())

    def host(self, name):
        for host in self.hosts:
            if host.name == name:
                return host
        return None

    def __repr__(self):
        return f'Group({self.name!r}, {self.scheduler!r})'


class Host(ConfigElement):
    """A backend <host>: ip as written, host (no brackets) and port to
    connect to.  Names are not resolved here; that happens at run time.
    maxconns 0 is unlimited; send_proxy is None, 'v1' or 'v2': the PROXY
    header version to send it; backup: it takes clients only while no
    other host of its group is up (HAProxy's backup).  discovered: None for a
    host of the file or of addHost; for one a <discover> found, that
    discover's key (Discover.key; such hosts are the discover's, never
    written to running.xml)."""

    TAG = 'host'

    def __init__(self, line=None, discovered=None, **values):
        ConfigElement.__init__(self, line, **values)
        self.host, self.port = parse_address(self.ip)
        self.discovered = discovered

    def __repr__(self):
        return f'Host({self.name!r}, {self.ip!r})'


class Discover(ConfigElement):
    """A <discover> in a group: hosts from DNS.  name is the name asked, type
    'a' (its A and AAAA records, each at port) or 'srv' (each target's
    address, port and weight; port, if given, replaces the records' ports);
    resolver the server asked ('ADDR' or 'ADDR:PORT'; None: the first
    nameserver of /etc/resolv.conf).  An answer is asked again after its
    TTL, clamped to [min_ttl, max_ttl]; a failed query after interval.  keep
    'last' keeps the hosts of the last good answer through a failure,
    'empty' removes them.  See the DNS section."""

    TAG = 'discover'

    @property
    def key(self):
        """What tells two discovers of a group apart: the name asked, as DNS compares it."""
        return self.name.lower().rstrip('.')

    def __repr__(self):
        return f'Discover({self.name!r}, {self.type!r})'


class Check(ConfigElement):
    """How the manager probes a service's hosts.  send and expect are bytes
    (or None: connect only); send_text and expect_text keep the escaped
    text from the file so to_xml writes it back as the operator wrote it.
    status: None, or the ranges ((low, high), ...) of HTTP status codes the
    answer's first line must carry; expect: bytes that must appear anywhere
    in the answer (a substring).  on_down 'close': a host the checks take
    down loses its connections.  port: probe that port of the host's address.
    slowstart: seconds over which a host that comes back takes its full
    weight (0: at once)."""

    TAG = 'check'


class Timeouts(ConfigElement):
    """Seconds allowed to connect to a host, for a connection to sit idle,
    and for a client to wait in the queue while every host is full."""

    TAG = 'timeouts'


class Udp(ConfigElement):
    """The <udp> settings of a UDP service: responses (None: a session lasts until
    it is idle; N: it ends after N replies per request datagram, 0: send and
    forget) and sessions, the most this process holds (the least recently
    used is evicted past it)."""

    TAG = 'udp'


class Clients(ConfigElement):
    """A service's per-client limits (see Client limits): maxconns open
    connections and rate new connections a second (burst at once) per client
    address, IPv6 clients counted per v6prefix; mode 'log' refuses nothing
    and counts what it would refuse.  table: the addresses tracked at most."""

    TAG = 'clients'


class Admin(ConfigElement):
    """The <admin> web server: where it listens (host and port to bind: from
    listen unless given), its users, the TLS certificate and key (both None
    for plain HTTP), and whether changes may come as GET (1.0's style)."""

    TAG = 'admin'

    def __init__(self, listen, host=None, port=None, users=(), line=None, **values):
        ConfigElement.__init__(self, line, listen=listen, **values)
        if host is None:
            host, port = parse_address(listen)
        self.host = host
        self.port = port
        self.users = list(users or ())

    def user(self, name):
        for user in self.users:
            if user.name == name:
                return user
        return None


class User(ConfigElement):
    """An admin <user>; password is the stored hash, access 'full' or 'readonly'."""

    TAG = 'user'

    def __repr__(self):
        return f'User({self.name!r}, access={self.access!r})'


class Logging(ConfigElement):
    """Where the log goes: a file path, or None for stderr; and/or syslog.
    syslog is the text as written (None: no syslog) and syslog_address what
    SysLogHandler takes: the socket path, or (host, port) for UDP.  access
    is whether to log one line per client connection."""

    TAG = 'logging'

    @property
    def syslog_address(self):
        return parse_syslog(self.syslog) if self.syslog is not None else None


def load_config(path):
    """Read and check the config file at path; ConfigError for anything wrong.
    Only a regular file is read (see read_config_file), so --check and a reload
    never hang on a FIFO or read /dev/zero forever."""
    data = read_config_file(path)
    config = parse_config(data, path)
    config.digest = hashlib.sha256(data).hexdigest()
    return config


MAX_CONFIG_BYTES = 64 << 20     # a config file larger than this is refused
CONFIG_READ_TIMEOUT = 10.0      # seconds a config file may take to read


def read_config_file(path, limit=MAX_CONFIG_BYTES, timeout=CONFIG_READ_TIMEOUT):
    """The bytes of the config file at path: only a regular file, at most limit
    bytes, read within timeout.  A FIFO, a device or /dev/zero is refused at once,
    not waited on.  ConfigError 'FILE: why' otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, 'O_NONBLOCK', 0) | getattr(os, 'O_CLOEXEC', 0))
    except OSError as e:
        raise ConfigError(f'cannot read config: {e.strerror or e}', path)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError('not a regular file', path)
        if info.st_size > limit:
            raise ConfigError(f'larger than {limit >> 20} MiB', path)
        deadline = time.monotonic() + timeout
        chunks = []
        size = 0
        while True:
            try:
                chunk = os.read(fd, 1 << 20)
            except OSError as e:
                raise ConfigError(f'cannot read config: {e.strerror or e}', path)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise ConfigError(f'larger than {limit >> 20} MiB', path)
            if time.monotonic() > deadline:
                raise ConfigError(f'not read within {timeout:g} s', path)
        return b''.join(chunks)
    finally:
        os.close(fd)


def write_config_file(path, data, previous):
    """Replace the config file at path with data, so that path always holds a
    whole file: each of PATH.bak (previous: the bytes the file held, None for no
    file) and then PATH is written to a temp file beside it, with the old
    file's mode and owner, fsync'ed and renamed into place; then the directory
    is fsync'ed.  A symlink's target is what is replaced.  Returns the path of
    the .bak (None when there was no file); OSError if it cannot."""
    path = os.path.realpath(path)
    try:
        like = os.stat(path)
    except FileNotFoundError:
        like = None
    backup = None
    if previous is not None:
        backup = path + '.bak'
        _write_beside(backup, previous, like)
    _write_beside(path, data, like)
    fd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return backup


def _write_beside(path, data, like):
    fd, temp = tempfile.mkstemp(dir=os.path.dirname(path), prefix='.%s.' % os.path.basename(path))
    try:
        with os.fdopen(fd, 'wb') as f:
            if like is not None:
                os.fchmod(f.fileno(), stat.S_IMODE(like.st_mode))
                try:
                    os.fchown(f.fileno(), like.st_uid, like.st_gid)
                except OSError:
                    pass    # only root gives files away: then the file is ours
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise


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


_CONTROL_CATEGORIES = frozenset(['Cc', 'Cf', 'Zl', 'Zp'])


def has_control_chars(text):
    """True if text holds a character that could forge a log line or hide text on a
    page: C0/C1 controls (CR, LF, tab...), invisible format characters (bidi
    overrides), the Unicode line and paragraph separators."""
    return any(unicodedata.category(ch) in _CONTROL_CATEGORIES for ch in text)


def check_name(text, what):
    """ValueError unless text is usable as a name; what is e.g. 'host name'.
    Names end up in log lines and admin pages, so control characters are refused."""
    if not text:
        raise ValueError(f'{what} is empty')
    if not text.strip():
        raise ValueError(f'{what} {text!r} is only whitespace')
    if has_control_chars(text):
        raise ValueError(f'{what} {text!r} contains a control character')


def parse_integer(text, what, default, low, high=None):
    """An integer attribute or parameter: text (None: default) -> int, or ValueError
    "WHAT 'TEXT': must be an integer LOW-HIGH"."""
    if text is None:
        return default
    if isinstance(text, str) and re.fullmatch(r'-?[0-9]{1,12}', text):
        value = int(text)
        if value >= low and (high is None or value <= high):
            return value
    want = f'{low}-{high}' if high is not None else f'>= {low}'
    raise ValueError(f'{what} {text!r}: must be an integer {want}')


MAX_SECONDS = 86400

_SECONDS = re.compile(r'(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?')


def parse_seconds(text, what, default=None, zero_ok=False):
    """A number of seconds (config attributes, admin parameters, command-line options):
    text (None: default) -> float, or ValueError "WHAT 'TEXT': must be a number of
    seconds > 0 and <= 86400" (">= 0" when zero_ok)."""
    if text is None:
        return default
    if isinstance(text, str) and _SECONDS.fullmatch(text):
        value = float(text)
        if (value > 0 or zero_ok and value == 0) and value <= MAX_SECONDS:
            return value
    low = '>= 0' if zero_ok else '> 0'
    raise ValueError(f'{what} {text!r}: must be a number of seconds {low} and <= {MAX_SECONDS}')


def parse_choice(text, what, choices):
    """text if it is one of choices (or None), else ValueError "WHAT 'TEXT': must be 'a' or 'b'"."""
    if text is None or text in choices:
        return text
    shown = ', '.join(repr(c) for c in choices[:-1]) + ' or ' + repr(choices[-1])
    raise ValueError(f'{what} {text!r}: must be {shown}')


MAX_WORKERS = 1024


def parse_workers(text, what='workers'):
    """<pdconfig workers> and --workers: None (absent: one process), 'auto' or a
    number 1-MAX_WORKERS of worker processes; ValueError when it is neither, or
    when this platform lacks what workers need (never a silent single process)."""
    if text is None:
        return None
    if text != 'auto':
        try:
            text = parse_integer(text, what, None, 1, MAX_WORKERS)
        except ValueError:
            raise ValueError(f"{what} {text!r}: must be 'auto' or a number 1-{MAX_WORKERS}") from None
    missing = workers_unsupported()
    if missing:
        raise ValueError(f'{what} {text!r}: this platform has no {missing}, which worker processes need')
    return text


WORKER_TIMEOUT_MIN = 1.0   # seconds: a loop's heartbeat comes every 50 ms, but a burst may hold it longer


def parse_worker_timeout(text, what='worker_timeout'):
    """<pdconfig worker_timeout>: seconds a worker's loop may go without its heartbeat
    before the master kills it (default 5), at least WORKER_TIMEOUT_MIN."""
    try:
        value = parse_seconds(text, what, 5.0)
    except ValueError:
        value = None
    if value is None or value < WORKER_TIMEOUT_MIN:
        raise ValueError(f'{what} {text!r}: must be a number of seconds >= {WORKER_TIMEOUT_MIN:g} '
                         f'and <= {MAX_SECONDS}')
    return value


def workers_unsupported():
    """What this platform lacks for worker processes (None: nothing)."""
    needs = [('AF_UNIX sockets', hasattr(socket, 'AF_UNIX')),
             ('socket.sendmsg with SCM_RIGHTS', hasattr(socket.socket, 'sendmsg') and hasattr(socket, 'SCM_RIGHTS')),
             ('subprocess pass_fds (POSIX)', os.name == 'posix')]
    try:
        import fcntl
        import mmap
        needs.append(('fcntl.lockf', hasattr(fcntl, 'lockf')))
        needs.append(('shared mmap', hasattr(mmap, 'MAP_SHARED')))
    except ImportError:
        needs.append(('fcntl and mmap', False))
    for what, present in needs:
        if not present:
            return what
    return None


def worker_count(setting):
    """The number of workers a workers setting means: 'auto' is the CPUs this
    process may run on (os.sched_getaffinity, else os.cpu_count()); None: none."""
    if setting != 'auto':
        return setting
    if hasattr(os, 'sched_getaffinity'):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def parse_status(text, what='status'):
    """'200-399' or '200,204,300-399' -> ((200, 399),) ...; ValueError otherwise."""
    ranges = []
    for part in text.split(','):
        match = re.fullmatch(r'\s*([1-5][0-9][0-9])(?:\s*-\s*([1-5][0-9][0-9]))?\s*', part)
        if match is None or (match.group(2) and int(match.group(2)) < int(match.group(1))):
            raise ValueError(f"{what} {text!r}: must be HTTP status codes and ranges, like '200-399' or '200,204'")
        low = int(match.group(1))
        ranges.append((low, int(match.group(2) or low)))
    return tuple(ranges)


def status_text(ranges):
    return ','.join('%d' % low if low == high else '%d-%d' % (low, high) for low, high in ranges)


def check_text(check, protocol='tcp'):
    """What decides a probe, in words (explain, /running): None for no <check>."""
    if check is None:
        return None
    parts = []
    if check.dns:
        parts.append('send a DNS query for %s, then an answer with its id and rcode NOERROR' % check.dns)
    if check.send:
        parts.append('send %s' % _escape_bytes(check.send))
    if check.status:
        parts.append('status %s on the first line' % status_text(check.status))
    if check.expect:
        parts.append('expect %s anywhere in the answer' % _escape_bytes(check.expect))
    if protocol == 'udp':
        if not parts:
            parts.append('send an empty datagram; down only on an ICMP error within %g s'
                         % min(check.timeout, UDP_PROBE_SILENCE))
        elif check.send and not check.status and not check.expect:
            parts.append('any answer')
        if check.port:
            parts.insert(0, 'to port %d' % check.port)
    elif check.port:
        parts.insert(0, 'connect to port %d' % check.port)
    elif not check.status and not check.expect and not check.dns:
        parts.append('connect')
    return ', then '.join(parts)


def address_key(host, port):
    """What makes two host addresses the same, as the config and addHost compare them."""
    try:
        return (ipaddress.ip_address(host).compressed, port)
    except ValueError:
        return (host.lower().rstrip('.'), port)


def listen_key(host, port, protocol='tcp'):
    """What makes two listens one socket: the address, and for UDP the protocol too."""
    key = address_key(host, port)
    return key if protocol == 'tcp' else key + (protocol,)


def host_config(**texts):
    """The one check of a backend host, whichever way it comes: the config file, the
    admin's addHost, a reload, diff/apply (which read running.xml back).  Takes the
    attributes as written ({name: text}, absent: the default) and returns a Host;
    ValueError says what is wrong.  All of them read HOST_ATTRS, so whatever one
    path accepts, every other accepts, and running.xml loads."""
    return Host(**read_values(HOST_ATTRS, texts))


def user_config(**texts):
    """The one check of an admin user (config file, addUser, reload): returns a User,
    or ValueError.  password is the stored hash."""
    return User(**read_values(USER_ATTRS, texts))


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


def password_hash_problem(stored):
    """Why stored cannot be a user's password hash here, or None.  The config file
    and the admin's addUser both ask this, so a user added either way loads again."""
    if _parse_pbkdf2(stored) is not None:
        return None
    if not is_legacy_hash(stored):
        return 'password must be a hash; make one with: python3 pydirector.py --hash-password'
    if _crypt_module() is None:
        return ('this is a crypt() hash, which needs the crypt module (gone in Python 3.13); '
                'make a new one with --hash-password')
    return None


# -- the attributes of each element ---------------------------------------------
#
# One table per element: each row is one attribute, the one place it is
# described.  The value classes above take their fields from it, the reader
# checks and parses by it, to_xml (running.xml, which workers are configured
# from) writes by it, and --check shows it.  A new attribute is a row here
# plus the code that uses it; tests/test_schema.py covers the row by itself.

class Attr(object):
    """One attribute of a config element.

    name: as the file spells it; field: the value class's attribute (name
    unless told).  parse(text, name) -> the value, or ValueError saying what
    is wrong, which the file's message puts after '<tag> '; error: a message
    format of its own instead, over the values read before ("user {name!r}:
    {error}"), for messages that name the element themselves.  default: the
    value when absent; running.xml writes only what differs from it.
    write(value) -> the text running.xml writes.  required: never absent in a
    file.  spelling: the field that keeps the text as written, which write
    gets too (send's escapes come back as the operator wrote them).  example:
    a valid text other than the default, which the generated test sets.
    secret: its value is never shown in a message (a reload's list of what it undid).
    unit: what --check writes after the value (None: 's' after a number of seconds)."""

    def __init__(self, name, parse=None, default=None, write=None, example=None, required=False,
                 field=None, spelling=None, error=None, secret=False, unit=None):
        self.name = name
        self.field = field or name
        self.parse = parse or as_written
        self.default = default
        self.write = write or value_text
        self.example = example
        self.required = required
        self.spelling = spelling
        self.error = error
        self.secret = secret
        self.unit = unit

    def __repr__(self):
        return f'Attr({self.name!r})'


class AttrError(ValueError):
    """A bad attribute: str() is the message as the admin gives it; text(tag)
    as the config file's error gives it."""

    def __init__(self, message, named=False):
        ValueError.__init__(self, message)
        self.named = named      # the message names its element already

    def text(self, tag):
        return str(self) if self.named else f'<{tag}> {self}'


def read_values(table, texts):
    """{field: value} for each row of table, from texts ({name: text as written},
    absent: the row's default); AttrError for the first that is wrong."""
    values = {}
    for row in table:
        text = texts.get(row.name)
        if text is None:
            if row.required:
                raise AttrError(f'needs attribute {row.name!r}')
            value = row.default
        else:
            try:
                value = row.parse(text, row.name)
            except ValueError as e:
                if row.error is None:
                    raise AttrError(str(e)) from None
                raise AttrError(row.error.format(error=e, **values), named=True) from None
        values[row.field] = value
        if row.spelling:
            values[row.spelling] = text if value is not None else None
    return values


def attr_texts(table, values):
    """[(name, text)] as running.xml writes values ({field: value}): each set
    attribute that differs from its default."""
    return [(row.name, text) for row, _, text in written_attrs(table, values)]


def written_attrs(table, values, every=False):
    """(row, value, text) of each attribute attr_texts writes (every: each set one,
    default or not)."""
    for row in table:
        value = values.get(row.field, row.default)
        if value is None or value == row.default and not every:
            continue
        text = row.write(value, values.get(row.spelling)) if row.spelling else row.write(value)
        if text is not None:
            yield row, value, text


def default_texts(table):
    """{name: its default as running.xml would write it, 'none' for no value}: what a
    difference shows for an attribute running.xml leaves out."""
    return dict((row.name, value_text(row.default) if row.default not in (None, ()) else 'none')
                for row in table)


def value_text(value):
    """A value as running.xml writes it: seconds as few digits as keep it, switches on/off."""
    if isinstance(value, bool):
        return 'on' if value else 'off'
    if isinstance(value, float):
        return _format_seconds(value)
    return str(value)


# Parsers for rows: (text, name) -> value, ValueError naming the attribute.

def as_written(text, what):
    return text


def optional_text(text, what):
    return text or None     # an empty path means none, as 1.0 wrote it


def integer(low, high=None):
    return lambda text, what: parse_integer(text, what, None, low, high)


def seconds_or_zero(text, what):
    return parse_seconds(text, what, zero_ok=True)


def choice(*choices):
    return lambda text, what: parse_choice(text, what, choices)


def switch(text, what):
    return parse_choice(text, what, ('on', 'off')) == 'on'


def _named(parse):
    """parse(text, what) made a row parser whose ValueError starts with the attribute's name."""
    def parse_attr(text, what):
        try:
            return parse(text, what)
        except ValueError as e:
            raise ValueError(f'{what} {e}') from None
    return parse_attr


def _address_text(text, what):
    parse_address(text)
    return text


def _host_address(text, what):
    host, _ = parse_address(text)
    if text.startswith('*:'):
        raise ValueError(f"{text!r}: '*' is for listening; a host needs an address")
    if host in ('0.0.0.0', '::'):
        raise ValueError(f"{text!r}: {host!r} means any address, for listening; a host needs an address")
    return text


def _network(text, what):
    return parse_network(text)


def _networks(text, what):
    return [parse_network(part.strip()) for part in text.split(',')]


def _networks_text(networks):
    return ','.join(map(_network_text, networks)) or None


def _account(text, what):
    check_account(text, what)
    return text


def _syslog(text, what):
    parse_syslog(text)
    return text


def _facility(text, what):
    if text not in logging.handlers.SysLogHandler.facility_names:
        raise ValueError(f'{what} {text!r}: not a syslog facility (like daemon, user or local0-local7)')
    return text


def _sni(text, what):
    try:
        return parse_sni(text)
    except ValueError as e:
        message = str(e)
        raise ValueError(message if message.startswith('sni') else 'sni ' + message) from None


def _escapes(text, what):
    if not text:
        return None         # empty means nothing: connect only
    try:
        return _unescape_bytes(text)
    except ValueError as e:
        raise ValueError(f'{what}: {e}') from None


def _name(what):
    def parse(text, _):
        check_name(text, what)
        return text
    return parse


def _user_name(text, what):
    check_name(text, 'user name')
    if ':' in text:
        # RFC 7617: the user-id of Basic credentials ends at the first colon.
        raise ValueError(f"user name {text!r} contains ':', which HTTP Basic credentials cannot carry")
    return text


def _password(text, what):
    problem = password_hash_problem(text)
    if problem:
        raise ValueError(problem)
    return text


def _access(text, what):
    if text not in ('full', 'readonly'):
        raise ValueError(f"access must be 'full' or 'readonly', not {text!r}")
    return text


def _scheduler(text, what):
    schedulers.parse_spec(text)
    return text     # as written: running.xml keeps the operator's spelling


def _dns_name(text, what):
    # ASCII only: a name goes on the wire as it is written (an IDN as its xn-- A-labels).
    if not _HOST_NAME.fullmatch(text) or len(text.rstrip('.')) > 253:
        raise ValueError(f'{what} {text!r}: not a DNS name (letters, digits, - and _, in labels of '
                         f'1-63 separated by dots, at most 253 in all)')
    return text


def resolver_address(text):
    """'10.0.0.2', '10.0.0.2:5353', 'fd00::2' or '[fd00::2]:53' -> (ip, port): a DNS
    server by number (its name would need a resolver); ValueError otherwise."""
    host, port = text, 53
    if not _is_ip(text):
        host, port = parse_address(text)
        if not _is_ip(host):
            raise ValueError(f'{text!r}: must be an IP address, with :PORT or without (port 53)')
    return host, port


def _is_ip(text):
    try:
        ipaddress.ip_address(text.partition('%')[0])
        return True
    except ValueError:
        return False


def _resolver(text, what):
    resolver_address(text)
    return text


UDP_IDLE = 60.0             # a UDP service's default <timeouts idle>: Envoy's; nginx waits 10 min
UDP_SESSIONS = 10000        # the default <udp sessions>: the most sessions a process holds per service
MAX_RATE = 1e6      # new connections a second, <clients rate>


def _rate(text, what):
    if _SECONDS.fullmatch(text):
        value = float(text)
        if 0 < value <= MAX_RATE:
            return value
    raise ValueError(f'{what} {text!r}: must be a number of new connections a second > 0 and <= {MAX_RATE:g}')


CONFIG_ATTRS = (
    Attr('drain', seconds_or_zero, 10.0, example='2.5'),
    Attr('user', _named(_account), example='0'),        # ids that exist everywhere: --check looks them up
    Attr('group', _named(_account), example='0'),
    Attr('workers', parse_workers, example='3'),
    Attr('worker_timeout', parse_worker_timeout, 5.0, example='7'),
    # Seconds the new generation of an upgrade has to be ready before the old one gives it up.
    Attr('upgrade_timeout', parse_seconds, 60.0, example='20'),
)
SERVICE_ATTRS = (
    Attr('name', _name('service name'), required=True, error='{error}', example='caf\u00e9 & "co"'),
    Attr('maxconns', integer(0), 0, example='500'),
    Attr('protocol', choice('tcp', 'udp'), 'tcp', example='udp'),
)
LISTEN_ATTRS = (
    Attr('ip', _named(_address_text), required=True, field='text', example='127.0.0.1:8443'),
    Attr('sni', _sni, write=','.join, example='www.example.com,*.example.com'),
    Attr('accept_proxy', choice('v1', 'v2', 'any'), example='v2'),
    Attr('trusted', _named(_networks), (), write=_networks_text, example='10.0.0.0/8,::1'),
)
ACL_ATTRS = (     # <allow> and <deny>
    Attr('cidr', _named(_network), required=True, write=_network_text, example='10.0.0.0/8'),
)
GROUP_ATTRS = (
    Attr('name', _name('group name'), required=True, error='{error}', example='blue'),
    Attr('scheduler', _scheduler, required=True, error='group {name!r}: {error}', example='leastconns,sticky'),
)
HOST_ATTRS = (    # the name is optional in a file (1.0 named hosts host.N), not in addHost
    Attr('name', _name('host name'), error='{error}', example='one'),
    Attr('ip', _named(_host_address), required=True, example='127.0.0.1:9'),
    Attr('weight', integer(1, 1000), 1, example='3'),
    Attr('maxconns', integer(0), 0, example='100'),
    Attr('send_proxy', choice('v1', 'v2'), example='v1'),
    Attr('backup', switch, False, example='on'),
)
DISCOVER_ATTRS = (   # hosts from DNS: see the DNS section
    Attr('name', _dns_name, required=True, example='_web._tcp.service.consul'),
    Attr('type', choice('a', 'srv'), 'a', example='srv'),
    Attr('resolver', _named(_resolver), example='127.0.0.1:8600'),
    Attr('port', integer(1, 65535), example='8080'),     # type a: required; srv: replaces the records' ports
    Attr('interval', parse_seconds, 5.0, example='2'),
    Attr('min_ttl', parse_seconds, 1.0, example='2'),
    Attr('max_ttl', parse_seconds, 300.0, example='60'),
    Attr('keep', choice('last', 'empty'), 'last', example='empty'),
)
ENABLE_ATTRS = (
    Attr('group', required=True, example='blue'),     # GROUP_ATTRS' example: a group of the service
)
CHECK_ATTRS = (
    Attr('interval', parse_seconds, 5.0, example='1.5'),
    Attr('timeout', parse_seconds, 2.0, example='0.25'),
    Attr('rise', integer(1, 100), 2, example='4'),
    Attr('fall', integer(1, 100), 3, example='1'),
    Attr('send', _escapes, spelling='send_text', write=_bytes_text, example='GET / HTTP/1.0\\r\\n\\r\\n'),
    Attr('status', parse_status, write=status_text, example='200-299,302'),
    Attr('expect', _escapes, spelling='expect_text', write=_bytes_text, example='caf\u00e9\\x00'),
    Attr('on_down', choice('keep', 'close'), 'keep', example='close'),
    Attr('port', integer(1, 65535), example='7'),    # probe this port on the host's address
    Attr('dns', _dns_name, example='svc.example.com'),  # a DNS query, its answer's id and rcode checked
    Attr('slowstart', seconds_or_zero, 0.0, example='30'),
)
TIMEOUTS_ATTRS = (
    Attr('connect', parse_seconds, 3.0, example='0.5'),
    Attr('idle', parse_seconds, 3600.0, example='60'),
    Attr('queue', parse_seconds, 5.0, example='30'),
)
UDP_ATTRS = (
    Attr('responses', integer(0), example='1'),
    Attr('sessions', integer(1, 1000000), UDP_SESSIONS, example='500'),
)
CLIENTS_ATTRS = (    # per client address: see Client limits
    Attr('maxconns', integer(0), 0, example='5'),
    Attr('rate', _rate, example='20', unit='/s'),
    Attr('burst', integer(1, 10 ** 9), example='40'),      # default: rate (at least 1)
    Attr('mode', choice('enforce', 'log'), 'enforce', example='log'),
    # One host holds a whole /64; a longer prefix would let it pick a new "client" per connection.
    Attr('v6prefix', integer(1, 64), 64, example='56'),
    Attr('table', integer(1, 10 ** 7), 100000, example='1000'),
)
ADMIN_ATTRS = (
    Attr('listen', _named(_address_text), required=True, example='127.0.0.1:7001'),
    Attr('certfile', optional_text, example='/etc/pydirector/cert.pem'),
    Attr('keyfile', optional_text, example='/etc/pydirector/key.pem'),
    Attr('get_changes', switch, False, example='on'),
)
USER_ATTRS = (
    Attr('name', _user_name, required=True, error='{error}', example='ops'),
    Attr('password', _password, required=True, error='user {name!r}: {error}', secret=True,
         example='pbkdf2_sha256$1000$xu5uu/A7NiIxNdZWjYAy3w$cdJfkueTyP3W/GvvGIK0V4GT+3lA5HUlkLjl5r4H39I'),
    Attr('access', _access, required=True, error='user {name!r}: {error}', example='readonly'),
)
LOGGING_ATTRS = (
    Attr('file', optional_text, example='/dev/stderr'),     # harmless where a worker opens it
    Attr('access', switch, True, example='off'),
    Attr('syslog', _named(_syslog), example='127.0.0.1:514'),
    Attr('facility', _facility, 'daemon', example='local3'),
)

# Element -> its table (what the reader checks, the value classes hold, to_xml writes).
ELEMENT_ATTRS = {
    'pdconfig': CONFIG_ATTRS, 'service': SERVICE_ATTRS, 'listen': LISTEN_ATTRS,
    'allow': ACL_ATTRS, 'deny': ACL_ATTRS, 'group': GROUP_ATTRS, 'host': HOST_ATTRS,
    'discover': DISCOVER_ATTRS, 'enable': ENABLE_ATTRS, 'check': CHECK_ATTRS, 'timeouts': TIMEOUTS_ATTRS,
    'udp': UDP_ATTRS, 'clients': CLIENTS_ATTRS, 'admin': ADMIN_ATTRS, 'user': USER_ATTRS, 'logging': LOGGING_ATTRS,
}

# Attributes a protocol="udp" service refuses: they speak TCP (TLS hellos, PROXY headers).
TCP_ONLY = (('listen', 'sni'), ('listen', 'accept_proxy'), ('host', 'send_proxy'))
# <check> attributes that dns="name" replaces: it writes its own query and judges the answer.
DNS_CHECK_REPLACES = ('send', 'expect', 'status')

DEFAULT_CHECK = Check()     # probes of a down host in a service with no <check>


# -- reading the XML ----------------------------------------------------------

def _read_xml(data, path):
    """Parse with expat into ElementTree elements; returns (root, lines),
    lines mapping each element to the line its start tag is on."""
    builder = ElementTree.TreeBuilder()
    parser = expat.ParserCreate()
    lines = {}
    open_tags = []
    open_lines = []     # where each element open now starts, for an error about it

    def start(tag, attrs):
        line = lines[builder.start(tag, attrs)] = parser.CurrentLineNumber
        open_tags.append(tag)
        open_lines.append(line)

    def end(tag):
        builder.end(tag)
        open_tags.pop()
        open_lines.pop()

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
        raise _xml_error(data, path, e, parser.ErrorByteIndex, list(zip(open_tags, open_lines))) from None
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


_TAG_MISMATCH = expat.errors.codes[expat.errors.XML_ERROR_TAG_MISMATCH]
_NO_ELEMENTS = expat.errors.codes[expat.errors.XML_ERROR_NO_ELEMENTS]
_XML_NAME = re.compile(rb'[A-Za-z_][A-Za-z0-9_.:-]*')    # the names a config's tags use


def _xml_error(data, path, error, index, open_elements):
    """The ConfigError for an expat error, at the line where the broken element
    starts.  Expat names where it noticed: for an element never closed, where
    its parent ends (or the end of the file); for a start tag missing its '>'
    or a quote, the next tag.  index: expat's byte offset of the error;
    open_elements: [(tag, line)] of the elements open then."""
    what = expat.ErrorString(error.code)
    noticed = error.lineno
    raw = data.encode('utf-8', 'surrogatepass') if isinstance(data, str) else data
    # Bytes are read as ASCII below: not in UTF-16, where '<' may be half a character.
    ascii = raw.find(b'\0', 0, index) < 0
    if error.code in (_TAG_MISMATCH, _NO_ELEMENTS) and open_elements:
        tag, line = open_elements[-1]
        if error.code == _NO_ELEMENTS:
            why = f'the file ends at line {noticed}'
        else:
            closing = _XML_NAME.match(raw, index) if ascii else None
            why = f'expat noticed at line {noticed}: {what}' + (
                f' </{closing.group(0).decode()}>' if closing else '')
        return ConfigError(f'XML error: <{tag}> started here is not closed ({why})', path, line)
    start = raw.rfind(b'<', 0, index) if ascii else -1
    if start >= 0 and raw.find(b'>', start, index) < 0:
        # Inside a tag that has not reached its '>': it may have started lines before.
        line = raw.count(b'\n', 0, start) + 1
        tag = _XML_NAME.match(raw, start + 1)
        if line != noticed and tag:
            return ConfigError(f'XML error: the tag <{tag.group(0).decode()}> started here is broken '
                               f'(expat noticed at line {noticed}: {what})', path, line)
    return ConfigError(f'XML error: {what}', path, noticed)


_CHILDREN = {
    'pdconfig': ('service', 'admin', 'logging'),
    'service': ('listen', 'group', 'enable', 'check', 'timeouts', 'udp', 'clients', 'allow', 'deny'),
    'group': ('host', 'discover'),
    'admin': ('user',),
}


class _ConfigReader(object):
    """Walks the element tree, checking as it goes, and builds the Config."""

    def __init__(self, path, lines):
        self.path = path
        self.lines = lines
        self.listens = {}       # address_key -> [(who, Listen or None for the admin)]
        self.matchers = {}      # address_key -> SniMatcher of the service names there
        self.service_names = set()  # for duplicates, without a scan per service

    def error(self, elem, message):
        return ConfigError(message, self.path, self.lines.get(elem))

    def values(self, elem, texts=None):
        """elem's attributes read by its table ({field: value}), texts: elem's own unless
        given.  Unknown or missing attributes, and any child of a leaf, are errors."""
        table = ELEMENT_ATTRS['host' if elem.tag == 'client' else elem.tag]
        if elem.tag not in _CHILDREN:
            for _ in self.children(elem):    # a leaf: refuses any child element
                pass
        known = sorted(row.name for row in table)
        for name in elem.attrib:
            if name not in known:
                raise self.error(elem, f"<{elem.tag}> has unknown attribute {name!r} "
                                       f"(known: {', '.join(known)})")
        for row in table:
            if row.required and row.name not in elem.attrib:
                raise self.error(elem, f'<{elem.tag}> needs attribute {row.name!r}')
        try:
            return read_values(table, elem.attrib if texts is None else texts)
        except AttrError as e:
            raise self.error(elem, e.text(elem.tag)) from None

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

    def claim_listen(self, elem, text, host, port, owner, listen=None, service=None):
        """Take an address for owner ('<admin>', or "service 'web'" with its Listen and name).
        Services share one only when every listen on it has sni, each name
        (and '*') belongs to one of them, and they agree on the PROXY settings:
        the hello is read before the service is known."""
        key = listen.key if listen is not None else address_key(host, port)
        claims = self.listens.setdefault(key, [])
        if claims:
            other, first = claims[0]
            if first is None or listen is None or (not first.sni and not listen.sni):
                raise self.error(elem, f'listen {text!r} is already used by {other}')
            share = 'services share an address only when every listen on it has sni'
            if not first.sni:
                raise self.error(elem, f'listen {text!r} is already used by {other}, which has no sni ({share})')
            if not listen.sni:
                raise self.error(elem, f'listen {text!r} has no sni, but {other} listens there with sni ({share})')
            if any(who == owner for who, _ in claims):
                raise self.error(elem, f'{owner} listens on {text!r} twice: give all its names in one sni')
            for what in ('accept_proxy', 'trusted'):
                mine, theirs = getattr(listen, what), getattr(first, what)
                if mine != theirs:
                    shown = [','.join(map(_network_text, v)) if what == 'trusted' else v for v in (theirs, mine)]
                    raise self.error(elem, f'listen {text!r}: {what} must be the same on every listen of a '
                                           f'shared address ({other} has {shown[0] or "none"!r}, '
                                           f'this one {shown[1] or "none"!r})')
        if listen is not None and listen.sni:
            matcher = self.matchers.setdefault(key, SniMatcher())
            for pattern in listen.sni:
                try:
                    matcher.add(pattern, service)
                except ValueError as e:
                    raise self.error(elem, f'listen {text!r}: {e}') from None
        claims.append((owner, listen))

    def read(self, root):
        if root.tag != 'pdconfig':
            raise self.error(root, f'the root element must be <pdconfig>, not <{root.tag}>')
        values = self.values(root)
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
        for host, message in host_loops(services)[0][:1]:
            raise ConfigError(message, self.path, host.line)
        return Config(self.path, services, admin, logging_, self.lines[root], **values)

    def service(self, elem, services):
        values = self.values(elem)
        name = values['name']
        if name in self.service_names:
            raise self.error(elem, f'duplicate service {name!r}')
        self.service_names.add(name)
        protocol = values['protocol']
        listens, groups, enable, check, timeouts, acl, udp, clients = [], [], None, None, None, [], None, None
        group_names = set()
        for tag, child in self.children(elem):
            if tag == 'listen':
                listens.append(self.listen(child, name, protocol))
            elif tag in ('allow', 'deny'):
                acl.append((tag, self.values(child)['cidr']))
            elif tag == 'udp':
                if protocol != 'udp':
                    raise self.error(child, f'service {name!r}: <udp> is only for a service with protocol="udp"')
                if udp is not None:
                    raise self.error(child, f'service {name!r}: more than one <udp>')
                udp = Udp(self.lines[child], **self.values(child))
            elif tag == 'group':
                group = self.group(child, protocol, name)
                if group.name in group_names:
                    raise self.error(child, f'service {name!r}: duplicate group {group.name!r}')
                group_names.add(group.name)
                groups.append(group)
            elif tag == 'enable':
                if enable is not None:
                    raise self.error(child, f'service {name!r}: more than one <enable>')
                self.values(child)
                enable = child
            elif tag == 'check':
                if check is not None:
                    raise self.error(child, f'service {name!r}: more than one <check>')
                check = Check(self.lines[child], **self.values(child))
                both = [what for what in DNS_CHECK_REPLACES if check.dns and what in child.attrib]
                if both:
                    raise self.error(child, f'<check> dns writes its own query and judges the answer: '
                                            f'give dns or {"/".join(DNS_CHECK_REPLACES)}, not both '
                                            f'(this one has {", ".join(both)})')
            elif tag == 'clients':
                if clients is not None:
                    raise self.error(child, f'service {name!r}: more than one <clients>')
                if protocol == 'udp':
                    # (A UDP session is no connection; better refused than silently ignored.)
                    raise self.error(child, f'<clients> needs TCP: service {name!r} is protocol="udp"')
                clients = self.clients(child)
            else:
                if timeouts is not None:
                    raise self.error(child, f'service {name!r}: more than one <timeouts>')
                settings = self.values(child)
                if protocol == 'udp' and 'idle' not in child.attrib:
                    settings['idle'] = UDP_IDLE
                timeouts = Timeouts(self.lines[child], **settings)
        if not listens:
            raise self.error(elem, f'service {name!r} has no <listen>')
        if not groups:
            raise self.error(elem, f'service {name!r} has no <group>')
        enabled = groups[0].name
        if enable is not None:
            enabled = enable.get('group')
            if not any(g.name == enabled for g in groups):
                raise self.error(enable, f'service {name!r}: <enable> names unknown group {enabled!r}')
        return Service(listens, groups, enabled, check, timeouts, acl, self.lines[elem], udp, clients=clients,
                       **values)
    def clients(self, elem):
        clients = Clients(self.lines[elem], **self.values(elem))
        if not clients.maxconns and clients.rate is None:
            raise self.error(elem, '<clients> needs maxconns or rate (or both): it limits nothing')
        if clients.burst is not None and clients.rate is None:
            raise self.error(elem, '<clients> burst is only used with rate')
        return clients

    def refuse_tcp_only(self, elem, tag, protocol, service_name):
        """A UDP service's <listen> or <host> with an attribute only TCP has: an error at its line."""
        if protocol != 'udp':
            return
        for where, name in TCP_ONLY:
            if where == tag and name in elem.attrib:
                raise self.error(elem, f'<{elem.tag}> {name} needs TCP: service {service_name!r} '
                                       f'is protocol="udp"')

    def listen(self, elem, service_name, protocol='tcp'):
        self.refuse_tcp_only(elem, 'listen', protocol, service_name)
        listen = Listen(self.lines[elem], protocol, **self.values(elem))
        if listen.trusted and listen.accept_proxy is None:
            raise self.error(elem, '<listen> trusted is only used with accept_proxy')
        self.claim_listen(elem, listen.text, listen.host, listen.port, f'service {service_name!r}', listen,
                          service_name)
        return listen

    def group(self, elem, protocol='tcp', service_name=None):
        group = Group(line=self.lines[elem], **self.values(elem))
        hosts = []
        # Dicts, not a scan per host, so a group of 10,000 loads in linear
        # time; when a host clashes twice, the earlier host is named, as a scan would.
        by_name, by_ip = {}, {}
        for tag, child in self.children(elem):
            if tag == 'discover':
                group.discovers.append(self.discover(child, group))
                continue
            index = len(hosts)
            self.refuse_tcp_only(child, 'host', protocol, service_name)
            host = self.host(child, index)
            ip_key = address_key(host.host, host.port)     # as addHost compares them
            same_name, same_ip = by_name.get(host.name), by_ip.get(ip_key)
            if same_name is not None and (same_ip is None or same_name[0] <= same_ip[0]):
                raise self.error(child, f'group {group.name!r}: duplicate host {host.name!r}')
            if same_ip is not None:
                raise self.error(child, f'group {group.name!r}: hosts {same_ip[1].name!r} and '
                                        f'{host.name!r} have the same ip {host.ip!r}')
            by_name[host.name] = by_ip[ip_key] = (index, host)
            hosts.append(host)
        group.hosts = hosts
        return group

    def discover(self, elem, group):
        discover = Discover(self.lines[elem], **self.values(elem))
        if discover.type == 'a' and discover.port is None:
            raise self.error(elem, f'<discover> {discover.name!r}: type a needs port (the port of every address)')
        if discover.min_ttl > discover.max_ttl:
            raise self.error(elem, f'<discover> {discover.name!r}: min_ttl {discover.min_ttl:g} is more than '
                                   f'max_ttl {discover.max_ttl:g}')
        if any(other.key == discover.key for other in group.discovers):
            raise self.error(elem, f'group {group.name!r}: duplicate discover {discover.name!r}')
        return discover

    def host(self, elem, index):
        texts = dict(elem.attrib)
        texts['name'] = texts.get('name') or f'host.{index}'     # as 1.0 named hosts without a name
        return Host(self.lines[elem], **self.values(elem, texts))

    def logging(self, elem):
        values = self.values(elem)
        if values['syslog'] is None and 'facility' in elem.attrib:
            raise self.error(elem, '<logging> facility is only used with syslog')
        return Logging(self.lines[elem], **values)

    def admin(self, elem):
        if 'secure' in elem.attrib:
            # Python Director 0.x/1.0 used M2Crypto here; silently serving
            # plain HTTP instead would be worse than refusing.
            raise self.error(elem, "<admin secure=...> is no longer supported; "
                                   "use certfile=... keyfile=... for HTTPS")
        values = self.values(elem)
        admin = Admin(line=self.lines[elem], **values)
        self.claim_listen(elem, admin.listen, admin.host, admin.port, '<admin>')
        if (admin.certfile is None) != (admin.keyfile is None):
            raise self.error(elem, '<admin> needs both certfile and keyfile, or neither')
        for _, child in self.children(elem):
            user = User(self.lines[child], **self.values(child))
            if admin.user(user.name) is not None:
                raise self.error(child, f'duplicate user {user.name!r}')
            admin.users.append(user)
        if not admin.users:
            raise self.error(elem, '<admin> has no <user>')
        return admin


# -- what a valid config may still do wrong ------------------------------------

def _same_machine_names(host):
    """The addresses a host of a listen or <host> stands for, as far as can be told
    without a lookup: an IP itself; localhost (RFC 6761) both loopbacks."""
    name = host.lower().rstrip('.')
    if name == 'localhost' or name.endswith('.localhost'):
        return {'127.0.0.1', '::1'}
    try:
        return {ipaddress.ip_address(name).compressed}
    except ValueError:
        return {name}


def reaches_listen(listen, host, port):
    """Whether connecting to host:port lands on listen: the same address, or a
    loopback address of the family a wildcard listen takes."""
    if listen.port != port:
        return False
    targets = _same_machine_names(host)
    if listen.host not in ('0.0.0.0', '::'):
        return bool(targets & _same_machine_names(listen.host))
    for text in targets:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            continue
        if ip.is_loopback and ip.version == (4 if listen.host == '0.0.0.0' else 6):
            return True
    return False


def host_loops(services):
    """([(Host, error)], [(Host, warning)]) for the hosts of services (configs) that point
    at a listen of these same services.  A host whose service is reached again that
    way is a loop: each client would come back until the file descriptors run out.
    A host that only points on at another service is not, but its clients cross
    the balancer twice: a warning."""
    by_port = {}
    for service in services:
        for listen in service.listens:
            by_port.setdefault(listen.port, []).append((service.name, listen))
    edges = collections.OrderedDict()     # service name -> [(Host, Group, service names it reaches)]
    for service in services:
        for group in service.groups:
            for host in group.hosts:
                targets = []
                for name, listen in by_port.get(host.port, ()):
                    if name not in targets and reaches_listen(listen, host.host, host.port):
                        targets.append(name)
                if targets:
                    edges.setdefault(service.name, []).append((host, group, targets))

    def leads_to(start, goal):
        seen, todo = set(), [start]
        while todo:
            name = todo.pop()
            if name == goal:
                return True
            if name not in seen:
                seen.add(name)
                todo.extend(t for _, _, targets in edges.get(name, ()) for t in targets)
        return False

    errors, warnings = [], []
    for name, hosts in edges.items():
        for host, group, targets in hosts:
            where = 'service %r group %r: host %r ip %r' % (name, group.name, host.name, host.ip)
            back = [t for t in targets if leads_to(t, name)]
            if name in back:
                errors.append((host, '%s is a listen of service %r itself: a loop (each client would '
                                     'come back here until file descriptors run out)' % (where, name)))
            elif back:
                errors.append((host, '%s is a listen of service %r, whose hosts lead back to service %r: '
                                     'a loop' % (where, back[0], name)))
            else:
                warnings.append((host, '%s is a listen of service %r of this balancer: its clients cross '
                                       'it twice' % (where, targets[0])))
    return errors, warnings


def config_warnings(config):
    """'FILE:LINE: warning: ...' for what a config may do but probably should not: an
    enabled group with no hosts (every client refused), a host that points on at
    another service of this balancer."""
    lines = []

    def warn(element, message):
        where = '%s:%s' % (config.path, element.line) if element.line is not None else str(config.path)
        lines.append('%s: warning: %s' % (where, message))

    for service in config.services:
        group = service.group(service.enabled)
        if group is not None and not group.hosts:
            warn(group, 'service %r: the enabled group %r has no hosts: every client is refused'
                 % (service.name, group.name))
    for host, message in host_loops(config.services)[1]:
        warn(host, message)
    return lines


# -- differences between two configs --------------------------------------------
#
# A reload and pydirector_admin's diff/apply ask the same question of two
# configs: what differs?  Both read the answer from ConfigDiff, which compares
# the configs as to_xml() writes them (one canonical form, whatever the files
# looked like), so an attribute a later version adds is a difference without
# anyone teaching this code about it.  A reload makes every difference; diff
# and apply make the ones an admin call can and report the rest.

def config_tree(config):
    """A Config as the element tree of its to_xml(), schedulers spelt one way."""
    root = ElementTree.fromstring(config.to_xml())
    for group in root.iter('group'):
        # 'hash, sticky' in a file runs (and shows in running.xml) as 'hash,sticky'.
        name, sticky = schedulers.parse_spec(group.get('scheduler'))
        group.set('scheduler', name + (',sticky' if sticky else ''))
    return root


def config_tree_text(config):
    """The canonical text of a config: equal for configs that run the same."""
    return ElementTree.tostring(config_tree(config))


def by_name(parent, tag, key='name'):
    items = collections.OrderedDict()
    if parent is not None:
        for elem in parent.findall(tag):
            items[elem.get(key)] = elem
    return items


def render_element(elem):
    """'<tag a="1" b="2"/>' (children inside), for naming a difference."""
    attrs = ''.join(' %s="%s"' % (k, v) for k, v in elem.attrib.items())
    children = ''.join(render_element(child) for child in elem)
    if children:
        return '<%s%s>%s</%s>' % (elem.tag, attrs, children, elem.tag)
    return '<%s%s/>' % (elem.tag, attrs)


def attribute_changes(old, new, skip=(), defaults=None):
    """[(key, 'key old -> new'), ...] for the attributes that differ, skipping `skip`."""
    defaults = defaults or {}
    changes = []
    keys = list(old.attrib) + [k for k in new.attrib if k not in old.attrib]
    for key in keys:
        if key in skip or old.get(key) == new.get(key):
            continue
        fallback = defaults.get(key, '(default)')
        changes.append((key, '%s %s -> %s' % (key, old.get(key, fallback), new.get(key, fallback))))
    return changes


def element_changes(old_parent, new_parent, skip_tags):
    """[(tag, 'old elements -> new elements'), ...] for the children of two elements other
    than skip_tags, grouped by tag (allow and deny together: their order matters across both)."""
    def buckets(parent):
        found = collections.OrderedDict()
        for child in parent:
            if child.tag in skip_tags:
                continue
            key = 'acl' if child.tag in ('allow', 'deny') else child.tag
            found.setdefault(key, []).append(render_element(child))
        return found
    old, new = buckets(old_parent), buckets(new_parent)
    changes = []
    for key in list(old) + [k for k in new if k not in old]:
        if old.get(key) != new.get(key):
            changes.append((key, '%s -> %s' % (' '.join(old.get(key) or ['(none)']),
                                               ' '.join(new.get(key) or ['(none)']))))
    return changes


def enabled_group(service):
    enable = service.find('enable')
    if enable is not None:
        return enable.get('group')
    first = service.find('group')
    return first.get('name') if first is not None else None


class GroupDiff(object):
    """How one group that both configs have differs: settings [(key, text)]
    (its attributes, and its <discover> elements), scheduler (old, new) or
    None, the hosts added (elements, in the new order), removed (names) and
    changed ((name, old element, new element)), and whether the order of the
    hosts differs."""

    def __init__(self, old, new):
        self.old, self.new = old, new
        self.settings = (attribute_changes(old, new, skip=('name', 'scheduler')) +
                         element_changes(old, new, ('host',)))
        self.scheduler = None
        if old.get('scheduler') != new.get('scheduler'):
            self.scheduler = (old.get('scheduler'), new.get('scheduler'))
        self.old_hosts, self.new_hosts = by_name(old, 'host'), by_name(new, 'host')
        self.added = [host for name, host in self.new_hosts.items() if name not in self.old_hosts]
        self.removed = [name for name in self.old_hosts if name not in self.new_hosts]
        self.changed = [(name, self.old_hosts[name], host) for name, host in self.new_hosts.items()
                        if name in self.old_hosts and self.old_hosts[name].attrib != host.attrib]
        kept = [name for name in self.new_hosts if name in self.old_hosts]
        self.reordered = kept != [name for name in self.old_hosts if name in self.new_hosts]


class ServiceDiff(object):
    """How one service that both configs have differs: settings [(key, text)]
    (attributes and elements other than its groups: listen, check, timeouts,
    acl, maxconns...), groups added (elements) and removed (names), a
    GroupDiff per group in both (new order), and the enabled group (old, new)."""

    def __init__(self, old, new):
        self.old, self.new = old, new
        self.settings = (attribute_changes(old, new, skip=('name',)) +
                         element_changes(old, new, ('group', 'enable')))
        self.old_groups, self.new_groups = by_name(old, 'group'), by_name(new, 'group')
        self.added = [group for name, group in self.new_groups.items() if name not in self.old_groups]
        self.removed = [name for name in self.old_groups if name not in self.new_groups]
        self.groups = collections.OrderedDict(
            (name, GroupDiff(self.old_groups[name], group)) for name, group in self.new_groups.items()
            if name in self.old_groups)
        self.enabled = (enabled_group(old), enabled_group(new))


class ConfigDiff(object):
    """What differs between two configs (Configs, or element trees as config_tree
    makes them): settings of <pdconfig> and its other elements [(key, text)],
    services added and removed (names), a ServiceDiff per service in both, and
    the <admin> block: admin (old element, new element), its settings, and the
    users added or changed (elements) and removed (names)."""

    def __init__(self, old, new):
        if isinstance(old, Config):
            old, new = config_tree(old), config_tree(new)
        self.old, self.new = old, new
        self.settings = [(key, '<pdconfig> ' + text) for key, text in attribute_changes(old, new)]
        self.settings += element_changes(old, new, ('service', 'admin'))
        old_services, new_services = by_name(old, 'service'), by_name(new, 'service')
        self.service_order = list(new_services)
        self.services_added = [name for name in new_services if name not in old_services]
        self.services_removed = [name for name in old_services if name not in new_services]
        self.services = collections.OrderedDict(
            (name, ServiceDiff(old_services[name], service)) for name, service in new_services.items()
            if name in old_services)
        self.admin = (old.find('admin'), new.find('admin'))
        self.admin_settings = []
        self.users_changed, self.users_removed = [], []
        old_admin, new_admin = self.admin
        if old_admin is not None and new_admin is not None:
            self.admin_settings = ([(key, '<admin> ' + text) for key, text in attribute_changes(old_admin, new_admin)]
                                   + [(key, '<admin> ' + text) for key, text in
                                      element_changes(old_admin, new_admin, ('user',))])
        old_users, new_users = by_name(old_admin, 'user'), by_name(new_admin, 'user')
        self.users_changed = [user for name, user in new_users.items()
                              if name not in old_users or old_users[name].attrib != user.attrib]
        self.users_removed = [name for name in old_users if name not in new_users]
        self.old_users = old_users
        self.new_users = new_users


def config_items(root):
    """{path: element} of every element of a config_tree, in file order; a path is
    ((tag, name), ...) from the root down, name an element's own or else its index
    among its parent's children of that tag."""
    items = collections.OrderedDict()

    def walk(elem, path):
        items[path] = elem
        seen = collections.Counter()
        for child in elem:
            name = child.get('name')
            if name is None:
                name = seen[child.tag]
                seen[child.tag] += 1
            walk(child, path + ((child.tag, name),))
    walk(root, ())
    return items


def undone_changes(loaded, running, new):
    """What a reload from running to new undoes of the changes made at run time
    (config_trees; loaded: the file as last loaded, so a runtime change is where
    running differs from it), one text each: 'host web/main/extra (added at
    runtime): removed'.  A change the new file makes too is kept, not undone; an
    element added or deleted at run time is named without its children."""
    before, now, after = config_items(loaded), config_items(running), config_items(new)

    def same(a, b):
        return a is b is None or a is not None and b is not None and a.attrib == b.attrib

    texts, whole = [], []
    for path in list(now) + [p for p in before if p not in now]:
        old, ran, comes = before.get(path), now.get(path), after.get(path)
        if same(old, ran) or same(ran, comes) or any(path[:len(w)] == w for w in whole):
            continue
        if old is None or ran is None or comes is None:
            whole.append(path)
        tag = path[-1][0] if path else 'pdconfig'
        where = '/'.join(name for _, name in path if isinstance(name, str))
        origin = 'added' if old is None else 'deleted' if ran is None else 'changed'
        if comes is None:
            outcome = 'removed'
        elif ran is None:
            outcome = 'back'
        else:
            table = ELEMENT_ATTRS.get(tag, ())
            secret = set(row.name for row in table if row.secret)
            outcome = ', '.join(key + ' replaced' if key in secret else text
                                for key, text in attribute_changes(ran, comes, defaults=default_texts(table)))
        texts.append('%s %s (%s at runtime): %s' % (tag, where, origin, outcome))
    return texts


# ---------------------------------------------------------------------------
# Loop: a poller, a timer heap and a thread-safe call queue.
# Only the loop thread touches balancer state; other threads hand it callables.
#
# On Linux the poller is select.epoll itself: a dict from fd to handler and
# epoll's own masks, with nothing in between.  Elsewhere (or with
# PYDIRECTOR_SELECTOR=selectors) it is the selectors module, behind the same
# API; both run the whole test suite.
# ---------------------------------------------------------------------------

# The signals the main (loop) thread handles.  Every other thread of ours blocks
# them, so the kernel always hands them to the main thread: one blocked in
# epoll_wait wakes at once, and while an upgrade execs (the main thread has them
# blocked too) they stay pending for the new code instead of being lost in a
# thread that is about to vanish.
PROCESS_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
CAN_MASK = hasattr(signal, 'pthread_sigmask')


def signals_blocked(fn, *args):
    """fn(*args) with the process's signals blocked in this thread: a thread it
    starts (with its creator's mask) never takes them."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, PROCESS_SIGNALS) if CAN_MASK else None
    try:
        return fn(*args)
    finally:
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def start_thread(target, name, args=()):
    """A daemon thread that never takes the process's signals."""
    thread = threading.Thread(target=target, name=name, args=args, daemon=True)
    signals_blocked(thread.start)
    return thread


EVENT_READ = getattr(select, 'EPOLLIN', 1)
EVENT_WRITE = getattr(select, 'EPOLLOUT', 4)
# Set in a handler's mask when the poller reports an error or hang-up on the
# socket; read and write readiness are set too then, so the next recv or send
# tells what happened.  The portable path cannot tell, so it always sets it
# with EVENT_WRITE: a handler that skips a check on a clean mask stays right.
EVENT_ERROR = getattr(select, 'EPOLLERR', 8) | getattr(select, 'EPOLLHUP', 16)
_EVENT_ANY = EVENT_READ | EVENT_WRITE


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


def describe(handler):
    """What a handler belongs to, for a log line: its object's repr, or the function."""
    owner = getattr(handler, '__self__', None)
    return repr(owner) if owner is not None else getattr(handler, '__name__', repr(handler))


class BaseLoop(object):
    """The event loop: one thread, one poller, no locks on the hot path.

    add(fd, events, handler) watches a file descriptor; handler(mask) runs when
    it is ready, mask holding EVENT_READ / EVENT_WRITE / EVENT_ERROR.  forget(fd)
    drops a descriptor about to be closed (closing removes it from the poller),
    remove(fd) one that stays open.  A handler that raises is logged once with
    its traceback, its descriptor is dropped, and its object's close_on_error()
    is called: one connection's bug closes that connection, never the loop.

    Other threads use call_soon_threadsafe() or call(); a byte on a socketpair
    wakes the poller (the self-pipe trick asyncio uses).
    """

    def __init__(self):
        self.now = time.monotonic()
        self.running = False
        self.thread_ident = None
        self._handlers = {}          # fd -> handler
        self._stale = set()          # fds dropped since the last poll
        self._timers = []
        self._timer_seq = 0
        self._compact_at = TIMER_COMPACT_MIN
        self._calls = collections.deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.add(self._wake_r.fileno(), EVENT_READ, self._on_wake)

    # -- timers and calls ---------------------------------------------------

    def call_later(self, delay, callback, *args):
        # Running, the loop's clock is read once per iteration: a timer set by a
        # handler counts from when its batch of events came (at most one
        # iteration early), at no call of its own.
        timer = Timer((self.now if self.running else time.monotonic()) + delay, callback, args)
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

    def call_soon(self, callback, *args):
        """From the loop thread: run callback at the end of this iteration."""
        self._calls.append((callback, args))

    def call_soon_threadsafe(self, callback, *args):
        # deque.append is atomic, so any thread (or a signal handler) may call this.
        self._calls.append((callback, args))
        self.wake()

    def wake(self):
        try:
            self._wake_w.send(b'\0')
        except OSError:
            pass  # the socket buffer is full: the loop is already due to wake

    def call(self, fn, *args, timeout=5.0, **kwargs):
        """Run fn on the loop thread and return its result (or raise its exception).

        From the loop thread itself fn runs at once.  timeout bounds the wait for
        fn to start: a stuck loop gives LoopTimeout, never a hang, and then fn
        never runs.  Once it has started it runs to its end and its answer is
        returned, however long that took: a change made is never reported as not.
        """
        if threading.get_ident() == self.thread_ident:
            return fn(*args, **kwargs)
        future = concurrent.futures.Future()

        def run():
            if not future.set_running_or_notify_cancel():
                return      # the caller gave up before it started
            try:
                result = fn(*args, **kwargs)
            except BaseException as e:  # handed back to the caller's thread
                future.set_exception(e)
            else:
                future.set_result(result)

        self.call_soon_threadsafe(run)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            if future.cancel():
                raise LoopTimeout('the event loop did not answer within %.1f s' % timeout) from None
        return future.result()

    def stop(self):
        self.running = False
        self.wake()

    def _on_wake(self, mask):
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    # -- running --------------------------------------------------------------

    def _timeout(self):
        """Seconds the poller may wait: 0 with calls queued, else until the next timer."""
        if self._calls:
            return 0
        if self._timers:
            return max(0.0, self._timers[0][0] - time.monotonic())
        return None

    def _run_due(self):
        """Timers that are due, then the calls queued so far (not those they queue)."""
        timers = self._timers
        now = self.now
        while timers and timers[0][0] <= now:
            timer = heapq.heappop(timers)[2]
            if timer.callback is not None:
                callback, args = timer.callback, timer.args
                timer.cancel()
                self._run_guarded(callback, args)
        calls = self._calls
        for _ in range(len(calls)):
            callback, args = calls.popleft()
            self._run_guarded(callback, args)

    def _run_guarded(self, callback, args):
        try:
            callback(*args)
        except Exception:
            log.exception('unexpected error in %s', describe(callback))

    def _handler_failed(self, fd, handler):
        """A handler raised: log once, stop watching its fd, and close what it belongs to."""
        log.exception('unexpected error in %s; closing it', describe(handler))
        close = getattr(getattr(handler, '__self__', None), 'close_on_error', None)
        if close is not None:
            try:
                close()     # the owner drops its own fds
            except Exception:
                log.exception('closing %s after its error failed too', describe(handler))
        if self._handlers.get(fd) is handler:
            self.remove(fd)     # whatever it left, it must not fire again

    def run(self):
        self.thread_ident = threading.get_ident()
        self.now = time.monotonic()
        self.running = True
        while self.running:
            self._run_once()

    def close(self):
        self._close_poller()
        self._wake_r.close()
        self._wake_w.close()


class EpollLoop(BaseLoop):
    """The loop on select.epoll (Linux), level-triggered."""

    def __init__(self):
        self._epoll = select.epoll()
        BaseLoop.__init__(self)

    def add(self, fd, events, handler):
        self._epoll.register(fd, events)
        self._handlers[fd] = handler

    def modify(self, fd, events, handler):
        self._epoll.modify(fd, events)
        self._handlers[fd] = handler

    def remove(self, fd):
        self._epoll.unregister(fd)
        self.forget(fd)

    def forget(self, fd):
        # Closing the fd takes it out of the epoll set; no epoll_ctl needed.  Its
        # number may come back for a new socket before this batch of events ends.
        del self._handlers[fd]
        self._stale.add(fd)

    def run(self):
        # BaseLoop.run's loop, its steps written out: an iteration's own cost is paid
        # per event when the load is light, so every call saved here counts.
        self.thread_ident = threading.get_ident()
        self.running = True
        poll = self._epoll.poll
        handlers = self._handlers
        stale = self._stale
        timers = self._timers
        calls = self._calls
        monotonic = time.monotonic
        heappop = heapq.heappop
        run_guarded = self._run_guarded
        now = self.now = monotonic()
        while self.running:
            if calls:
                timeout = 0
            elif timers:
                # From the clock of this iteration's start, not a fresh reading: a
                # timer is late by at most the time its batch took to run.
                timeout = timers[0][0] - now
                if timeout < 0:
                    timeout = 0
            else:
                timeout = -1
            events = poll(timeout)
            now = self.now = monotonic()
            if stale:
                stale.clear()   # closed before this poll: nothing of theirs is in this batch
            for fd, mask in events:
                if fd in stale:
                    continue    # closed by an earlier event of this batch (its number may be reused)
                try:
                    handler = handlers[fd]
                except KeyError:
                    self._drop_unknown(fd)
                    continue
                if mask & EVENT_ERROR:
                    mask |= _EVENT_ANY
                try:
                    handler(mask)
                except Exception:
                    self._handler_failed(fd, handler)
            while timers and timers[0][0] <= now:
                timer = heappop(timers)[2]
                callback = timer.callback
                if callback is not None:
                    args = timer.args
                    timer.callback = timer.args = None
                    run_guarded(callback, args)
            if calls:
                for _ in range(len(calls)):
                    callback, args = calls.popleft()
                    run_guarded(callback, args)

    def _drop_unknown(self, fd):
        # Forgotten but never closed would wake a level-triggered poll forever.
        log.error('fd %d is watched with no handler; dropping it', fd)
        try:
            self._epoll.unregister(fd)
        except OSError:
            pass

    def _close_poller(self):
        self._epoll.close()


class SelectorLoop(BaseLoop):
    """The portable loop, on selectors.DefaultSelector."""

    _TO_SELECTOR = {EVENT_READ: selectors.EVENT_READ, EVENT_WRITE: selectors.EVENT_WRITE,
                    EVENT_READ | EVENT_WRITE: selectors.EVENT_READ | selectors.EVENT_WRITE}
    _FROM_SELECTOR = {selectors.EVENT_READ: EVENT_READ,
                      selectors.EVENT_WRITE: EVENT_WRITE | EVENT_ERROR,
                      selectors.EVENT_READ | selectors.EVENT_WRITE: EVENT_READ | EVENT_WRITE | EVENT_ERROR}

    def __init__(self):
        self._selector = selectors.DefaultSelector()
        BaseLoop.__init__(self)

    def add(self, fd, events, handler):
        self._selector.register(fd, self._TO_SELECTOR[events], handler)
        self._handlers[fd] = handler

    def modify(self, fd, events, handler):
        self._selector.modify(fd, self._TO_SELECTOR[events], handler)
        self._handlers[fd] = handler

    def remove(self, fd):
        self._selector.unregister(fd)
        del self._handlers[fd]
        self._stale.add(fd)

    forget = remove     # the selector keeps its own map, which closing does not clear

    def _run_once(self):
        events = self._selector.select(self._timeout())
        self.now = time.monotonic()
        stale = self._stale
        if stale:
            stale.clear()   # closed before this poll: nothing of theirs is in this batch
        if events:
            convert = self._FROM_SELECTOR
            for key, mask in events:
                fd = key.fd
                if fd in stale:
                    continue
                handler = self._handlers.get(fd)
                if handler is None:
                    continue
                try:
                    handler(convert[mask])
                except Exception:
                    self._handler_failed(fd, handler)
        self._run_due()

    def _close_poller(self):
        self._selector.close()


def _loop_class():
    if os.environ.get('PYDIRECTOR_SELECTOR', '') == 'selectors' or not hasattr(select, 'epoll'):
        return SelectorLoop
    return EpollLoop


Loop = _loop_class()
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


# ---------------------------------------------------------------------------
# TLS ClientHello and server names (SNI): one listen address in front of
# several TLS services, the service chosen by the name the client asks for
# (RFC 6066 server_name), read from the hello and never answered: the
# balancer holds no key and the backend does the handshake.
#
# The hello travels in TLS records (RFC 8446 5.1): a 5-byte header (content
# type 22 = handshake, a version, a 16-bit length) and a fragment of the
# handshake message.  One message may span several records and the records
# any split of TCP segments.  The message is a 4-byte header (type 1 =
# ClientHello, a 24-bit length) and a body: version, random, session id,
# cipher suites, compression methods, extensions; server_name is extension 0.
#
# As with the PROXY header, None means "need more bytes" and ValueError means
# "this can never become a valid hello", raised at the first byte that proves
# it.  Every length is checked against its container when it is read, so a
# length that lies costs neither an over-read nor an allocation, and nothing
# is held past TLS_HELLO_MAX bytes.
#
# Refused on purpose: SSLv2-format hellos (obsolete, and with no extensions
# they carry no name), any record but a handshake one before or inside the
# hello (an alert first, say), zero-length records (RFC 8446 forbids them for
# handshakes), and more handshake bytes after the hello in its last record (a
# client waits for the server's answer).  Records after the hello (0-RTT
# early data) are not looked at.
# ---------------------------------------------------------------------------

TLS_HELLO_MAX = 16384       # record bytes of one hello, headers and all records together
_TLS_FRAGMENT_MAX = 16384   # no TLS record carries more (RFC 8446 5.1)
_TLS_HANDSHAKE = 22
_TLS_RECORD_NAMES = {20: 'change_cipher_spec', 21: 'alert', 23: 'application_data', 24: 'heartbeat'}
_TLS_VERSIONS = (1, 2, 3, 4)   # the minor of 0x0301-0x0304 (TLS 1.0-1.3)
_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0
_NAME_HOST_NAME = 0         # the one name type RFC 6066 defines
# version, random, empty session id, one cipher suite, one compression method
_HELLO_BODY_MIN = 2 + 32 + 1 + 2 + 2 + 1 + 1
_HOST_NAME_MAX = 253        # the longest DNS name, in text without the trailing dot
_HOST_NAME_BYTES = frozenset(b'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.')
_HOST_NAME_CHARS = frozenset('abcdefghijklmnopqrstuvwxyz0123456789-_.')


def parse_client_hello(data, limit=TLS_HELLO_MAX):
    """Read a TLS ClientHello from the start of data (bytes or bytearray).

    Returns None while more bytes are needed, else (consumed, server_name):
    consumed is the length in bytes of the records that carried the hello,
    server_name the first host_name of its server_name extension as
    lower-case ASCII (A-labels) without a trailing dot, or None when the hello
    names no host.  Raises ValueError as soon as data cannot be the start of
    a valid hello, or when the hello would take more than limit bytes.

    This reads from the start each time; a connection that calls it after
    every recv should use one ClientHelloReader instead."""
    return ClientHelloReader(limit).read(data)


class ClientHelloReader(object):
    """parse_client_hello for one connection, reading each byte once.

    Call read(data) after each recv with everything received so far, the
    hello's first byte at data[0] (a bytearray the caller extends, say: the
    prefix must not change between calls).  It answers as
    parse_client_hello does, doing work only for the bytes that are new: the
    handshake fragments are copied once out of their records, and the body is
    walked field by field as far as the bytes go, so a hello that comes a byte
    at a time costs a microsecond or so a byte, not a fresh parse each time.
    Once it has answered (a result or a ValueError), it keeps that answer."""

    __slots__ = ('limit', '_pos', '_record_left', '_handshake', '_size', '_step', '_at',
                 '_sni_seen', '_server_name', '_result', '_error')

    def __init__(self, limit=TLS_HELLO_MAX):
        self.limit = limit
        self._pos = 0               # the next byte of data to look at
        self._record_left = 0       # fragment bytes of the current record not read yet
        self._handshake = bytearray()   # the handshake message, out of its records
        self._size = None           # its length, header included, once known
        self._step = 'version'      # the next field of the body
        self._at = 4                # where that field starts in _handshake
        self._sni_seen = False
        self._server_name = None
        self._result = None
        self._error = None

    def read(self, data):
        if self._result is not None:
            return self._result
        if self._error is not None:
            raise ValueError(self._error)
        try:
            complete = self._read_records(data)
            if self._size is not None:
                self._read_body()
        except ValueError as e:
            self._error = str(e)    # not e: its traceback would keep the frames and data alive
            raise
        if not complete:
            return None
        # Every byte of the message is in, so the walk has reached its end (or raised).
        self._result = self._pos, self._server_name
        return self._result

    def _read_records(self, data):
        """Copy handshake bytes out of the records in data; True once the message is whole."""
        pos, end = self._pos, len(data)
        handshake = self._handshake
        while pos < end:
            left = self._record_left
            if not left:
                header = data[pos:pos + 5]
                self._check_record_header(header, pos == 0)
                if len(header) < 5:
                    break
                left = header[3] << 8 | header[4]
                if not left:
                    raise ValueError('malformed ClientHello: an empty TLS record')
                if left > _TLS_FRAGMENT_MAX:
                    raise ValueError('malformed ClientHello: a TLS record of %d bytes (at most %d)'
                                     % (left, _TLS_FRAGMENT_MAX))
                if pos + 5 + left > self.limit:
                    raise ValueError('TLS hello over %d bytes' % self.limit)
                pos += 5
                self._record_left = left
            take = min(left, end - pos)
            handshake += data[pos:pos + take]
            pos += take
            self._record_left = left - take
            if self._size is None and handshake:
                self._check_handshake_header(handshake)
            if self._size is not None and len(handshake) >= self._size:
                if len(handshake) > self._size or self._record_left:
                    raise ValueError('malformed ClientHello: more handshake bytes after it in its record')
                self._pos = pos
                return True
        self._pos = pos
        return False

    def _check_record_header(self, header, first):
        kind = header[0]
        if kind != _TLS_HANDSHAKE:
            name = _TLS_RECORD_NAMES.get(kind)
            if not first:
                raise ValueError('malformed ClientHello: a TLS %s record inside it'
                                 % (name or 'type %d' % kind))
            if name:
                raise ValueError('not a TLS hello: a TLS %s record first' % name)
            if kind & 0x80:
                raise ValueError('not TLS: first byte 0x%02x (an SSLv2-format hello? '
                                 'not supported: it has no server name)' % kind)
            shown = " '%c'" % kind if 0x20 < kind < 0x7f else ''
            raise ValueError('not TLS: first byte 0x%02x%s' % (kind, shown))
        if (len(header) > 1 and header[1] != 3) or (len(header) > 2 and header[2] not in _TLS_VERSIONS):
            raise ValueError('not TLS: record version 0x%s' % bytes(header[1:3]).hex())

    def _check_handshake_header(self, handshake):
        if handshake[0] != _CLIENT_HELLO:
            raise ValueError('not a ClientHello: handshake message type %d' % handshake[0])
        # The smallest length the bytes so far allow: refuse a huge one before it arrives.
        known = bytes(handshake[1:4])
        length = int.from_bytes(known + b'\0' * (3 - len(known)), 'big')
        if 4 + length + 5 > self.limit:
            raise ValueError('TLS hello over %d bytes' % self.limit)
        if len(handshake) < 4:
            return
        if length < _HELLO_BODY_MIN:
            raise ValueError('malformed ClientHello: %d bytes is too short' % length)
        self._size = 4 + length

    def _read_body(self):
        """Walk the fields of the body that have arrived; each length is checked
        against the message when it is read, before its bytes arrive."""
        hs, size = self._handshake, self._size
        have = len(hs)
        step, at = self._step, self._at
        while step != 'end':
            if step == 'version':
                if not self._have(at, 2, 'its version'):
                    break
                if hs[at] != 3 or hs[at + 1] not in _TLS_VERSIONS:
                    raise ValueError('malformed ClientHello: version 0x%02x%02x' % (hs[at], hs[at + 1]))
                step, at = 'session_id', at + 2 + 32    # past the random
            elif step == 'session_id':
                if not self._have(at, 1, 'the session id length'):
                    break
                length = hs[at]
                if length > 32:
                    raise ValueError('malformed ClientHello: a session id of %d bytes (at most 32)' % length)
                step, at = 'cipher_suites', self._skip(at, 1, length, 'the session id')
            elif step == 'cipher_suites':
                if not self._have(at, 2, 'the cipher suites length'):
                    break
                length = hs[at] << 8 | hs[at + 1]
                if length < 2 or length % 2:
                    raise ValueError('malformed ClientHello: cipher suites of %d bytes' % length)
                step, at = 'compression_methods', self._skip(at, 2, length, 'the cipher suites')
            elif step == 'compression_methods':
                if not self._have(at, 1, 'the compression methods length'):
                    break
                length = hs[at]
                if not length:
                    raise ValueError('malformed ClientHello: no compression method')
                at = self._skip(at, 1, length, 'the compression methods')
                step = 'end' if at == size else 'extensions'   # TLS 1.0 may end here
            elif step == 'extensions':
                if not self._have(at, 2, 'the extensions length'):
                    break
                length = hs[at] << 8 | hs[at + 1]
                if at + 2 + length != size:
                    raise ValueError('malformed ClientHello: extensions of %d bytes where %d remain'
                                     % (length, size - at - 2))
                step, at = 'extension', at + 2
            elif step == 'extension':
                if at == size:
                    step = 'end'
                    break
                if not self._have(at, 4, 'an extension header'):
                    break
                kind = hs[at] << 8 | hs[at + 1]
                length = hs[at + 2] << 8 | hs[at + 3]
                if kind == _EXT_SERVER_NAME:
                    if self._sni_seen:
                        raise ValueError('malformed ClientHello: two server_name extensions')
                    self._skip(at, 4, length, 'the server_name extension')
                    step = 'server_name'
                else:
                    at = self._skip(at, 4, length, 'extension %d' % kind)
            elif step == 'server_name':
                end = at + 4 + (hs[at + 2] << 8 | hs[at + 3])
                if have < end:
                    break
                self._server_name = _server_name_of(hs[at + 4:end])
                self._sni_seen = True
                step, at = 'extension', end
        self._step, self._at = step, at

    def _have(self, at, count, what):
        """Whether the count bytes at `at` have arrived; ValueError if the message ends first."""
        if at + count > self._size:
            raise ValueError('malformed ClientHello: it ends inside %s' % what)
        return len(self._handshake) >= at + count

    def _skip(self, at, header, length, what):
        """Where a field of `header` length bytes and `length` data bytes ends; it must fit."""
        end = at + header + length
        if end > self._size:
            raise ValueError('malformed ClientHello: %s (%d bytes) runs past its end' % (what, length))
        return end


def _server_name_of(data):
    """The first host_name in a server_name extension's data; None when it has none
    (only name types other than host_name, which RFC 6066 does not define)."""
    if len(data) < 2 or data[0] << 8 | data[1] != len(data) - 2:
        raise ValueError('malformed ClientHello: the server_name list does not fill its extension')
    if len(data) == 2:
        raise ValueError('malformed ClientHello: an empty server_name list')
    at, name = 2, None
    while at < len(data):
        if at + 3 > len(data):
            raise ValueError('malformed ClientHello: a server_name entry runs past its list')
        kind, length = data[at], data[at + 1] << 8 | data[at + 2]
        end = at + 3 + length
        if end > len(data):
            raise ValueError('malformed ClientHello: a server name (%d bytes) runs past its list' % length)
        if not length:
            raise ValueError('malformed ClientHello: an empty server name')
        if kind == _NAME_HOST_NAME and name is None:
            name = _host_name_from_wire(bytes(data[at + 3:end]))
        at = end
    return name


def _host_name_from_wire(raw):
    for byte in raw:
        if byte not in _HOST_NAME_BYTES:
            # Only bytes we know are harmless go into the message (and so the log).
            raise ValueError('malformed ClientHello: byte 0x%02x in the server name' % byte)
    name = raw.decode('ascii').lower()
    if name.endswith('.'):
        name = name[:-1]
    problem = _host_name_problem(name)
    if problem:
        raise ValueError('malformed ClientHello: server name %r: %s' % (name[:80], problem))
    return name


def _host_name_problem(name):
    """Why a lower-case ASCII name without its trailing dot is not a host name, or None.
    Letters, digits, '-' and '_' (which some real hosts have) in labels of 1-63."""
    if not name:
        return 'an empty name'
    if len(name) > _HOST_NAME_MAX:
        return 'longer than %d characters' % _HOST_NAME_MAX
    for char in name:
        if char not in _HOST_NAME_CHARS:
            return 'character %r is not allowed in a host name' % char
    for label in name.split('.'):
        if not label:
            return 'an empty label'
        if len(label) > 63:
            return 'a label longer than 63 characters'
    return None


def normalize_server_name(text):
    """A host name as an admin request or a client writes it, in the form names
    are compared in: as clients send it (lower case, each international label
    as its A-label: 'Fa\u00df.de' -> 'xn--fa-hia.de'), no trailing dot.  An
    xn-- label is taken as it is, as in a hello; sni patterns check theirs
    (sni_pattern).  Raises ValueError saying what is wrong."""
    return _normalized(text, text)


def _normalized(name, shown):
    if len(name) > _HOST_NAME_MAX + 1:      # a trailing dot; this bounds the work below
        raise ValueError('%r: longer than %d characters' % (shown, _HOST_NAME_MAX))
    if not _is_ascii(name):
        try:
            name = '.'.join(_a_label(label) for label in name.translate(_IDNA_DOTS).split('.'))
        except ValueError as e:
            raise ValueError('%r: %s' % (shown, e)) from None
    if name.endswith('.'):
        name = name[:-1]
    name = name.lower()
    problem = _host_name_problem(name)
    if problem:
        raise ValueError('%r: %s' % (shown, problem))
    return name


def _config_name(name, shown):
    """_normalized, with each xn-- label one a client could send: a name in the
    config that no client sends is a mistake to report."""
    name = _normalized(name, shown)
    for label in name.split('.'):
        if label.startswith('xn--'):
            _check_a_label(label, shown)
    return name


def _is_ascii(text):
    return not text or max(text) < '\x80'


# International names.  Clients send what UTS #46 non-transitional processing
# makes of a name (curl with libidn2, browsers): each label mapped (lower
# case...), NFC, checked, and if it is not ASCII then 'xn--' + punycode.
# Python's 'idna' codec is IDNA 2003 instead, which makes 'fa\u00df.de' the
# other name 'fass.de'.  The stdlib has NFC, case and punycode but not the
# UTS #46 mapping table, so a config label keeps only characters the stdlib
# can judge as the table does: letters, marks and digits (the RFC 5892
# categories) already in the form clients send, and capitals whose lower
# case is their case fold (\u00dc -> \u00fc).  Anything else (ligatures,
# full-width forms, joiners, symbols, \u1e9e...) is refused, never guessed:
# a name mapped otherwise than clients map it would route them elsewhere.
# Bidi and CONTEXTJ/CONTEXTO rules are not checked: a name that breaks them is
# one clients refuse to send, so accepting it misroutes no one.
_IDNA_DOTS = {0x3002: '.', 0xff0e: '.', 0xff61: '.'}     # full stops UTS #46 maps to '.'
_IDNA_DEVIATIONS = frozenset('\u00df\u03c2')  # \u00df, final \u03c2: kept (IDNA 2003 made them ss, \u03c3)
_IDNA_JOINERS = frozenset('\u200c\u200d')     # kept by non-transitional clients, dropped by others
_IDNA_CATEGORIES = frozenset(('Ll', 'Lu', 'Lo', 'Lm', 'Mn', 'Mc', 'Nd'))
# Letters and marks of those categories that RFC 5892 disallows (2.6, old
# Hangul jamo) or that clients drop (Default_Ignorable_Code_Point).
_IDNA_REFUSED = ((0x034f, 0x034f), (0x0640, 0x0640), (0x07fa, 0x07fa), (0x1100, 0x11ff), (0x17b4, 0x17b5),
                 (0x180b, 0x180f), (0x302e, 0x302f), (0x3031, 0x3035), (0x303b, 0x303b), (0xa960, 0xa97f),
                 (0xd7b0, 0xd7ff), (0xfe00, 0xfe0f), (0xe0100, 0xe01ef))


def _a_label(label, joiners=False):
    """One label as clients send it: ASCII ones as they are, others mapped and
    checked (_u_label) and then their A-label.  ValueError says what is wrong."""
    if _is_ascii(label):
        return label
    label = _u_label(label, joiners)
    return label if _is_ascii(label) else 'xn--' + label.encode('punycode').decode('ascii')


def _check_a_label(label, shown):
    """An xn-- label must be one a client could send: punycode that decodes to a
    valid label, already mapped, that encodes back to the same label."""
    try:
        decoded = label[4:].encode('ascii').decode('punycode')
    except (UnicodeError, IndexError):      # IndexError: Python 3.6's decoder, on a bad last digit
        raise ValueError('%r: label %r is not valid punycode' % (shown, label)) from None
    try:
        if _is_ascii(decoded):
            raise ValueError('an A-label stands for a name that is not ASCII')
        again = _a_label(decoded, joiners=True)
    except ValueError as e:
        raise ValueError('%r: label %r decodes to %r: %s' % (shown, label, decoded, e)) from None
    if again != label:
        raise ValueError('%r: label %r decodes to %r, which clients send as %r' % (shown, label, decoded, again))


def _u_label(label, joiners):
    """A label that is not ASCII, mapped as UTS #46 maps it and checked."""
    if len(label) > 63:
        raise ValueError('a label longer than 63 characters')
    mapped = []
    for char in unicodedata.normalize('NFC', label):
        if char < '\x80':
            char = char.lower()
        else:
            problem = _idna_char_problem(char, joiners)
            if problem:
                folded = _folded(char)
                if char.lower() == folded:
                    char = folded           # a capital (or no change: checked again below)
                elif unicodedata.category(char) in _IDNA_CATEGORIES or unicodedata.category(char) == 'Lt':
                    raise ValueError('character %s: clients map it in ways not repeated here; write the '
                                     'name as they send it (lower case) or as its A-label' % _char(char))
                else:
                    raise ValueError('character %s %s' % (_char(char), problem))
        mapped.append(char)
    label = unicodedata.normalize('NFC', ''.join(mapped))
    for char in label:
        problem = _idna_char_problem(char, joiners)
        if problem:
            raise ValueError('character %s %s' % (_char(char), problem))
    if unicodedata.category(label[0]).startswith('M'):
        problem = 'starts with a combining mark'
    elif label.startswith('-') or label.endswith('-'):
        problem = "starts or ends with '-'"
    elif label[2:4] == '--':
        problem = "has '--' in positions 3 and 4"
    else:
        return label
    raise ValueError('label %r %s' % (label, problem))


def _folded(char):
    # RFC 5892's stability test; the UTS #46 table maps what fails it (mostly to this).
    return unicodedata.normalize('NFKC', unicodedata.normalize('NFKC', char).casefold())


def _idna_char_problem(char, joiners):
    """Why char may not be in a label as clients send it, or None."""
    if char < '\x80':
        if char in _HOST_NAME_CHARS and char != '_':
            return None
        return "is not allowed in an international label (letters, digits and '-')"
    if char in _IDNA_JOINERS:
        return None if joiners else 'is dropped by some clients and kept by others: give the name as its A-label'
    category = unicodedata.category(char)
    if category == 'Cn':
        return "is not assigned in Unicode %s (this Python's)" % unicodedata.unidata_version
    point = ord(char)
    if (category not in _IDNA_CATEGORIES or any(low <= point <= high for low, high in _IDNA_REFUSED)
            or (_folded(char) != char and char not in _IDNA_DEVIATIONS)):
        return 'is not allowed in an international name'
    return None


def _char(char):
    return '%r (U+%04X)' % (char, ord(char))


def sni_pattern(text):
    """One sni pattern, normalised: '*' (the default service of the address),
    '*.' + a name (one or more labels under that name), or an exact name."""
    if text == '*':
        return text
    if text.startswith('*.') and '*' not in text[2:]:
        return '*.' + _config_name(text[2:], text)
    if '*' in text:
        raise ValueError("%r: '*' may only be the whole name ('*') or its whole first label "
                         "('*.example.com')" % text)
    return _config_name(text, text)


def parse_sni(text):
    """The patterns of one sni="..." attribute, normalised, in their order.

    Comma-separated, spaces around each allowed: 'api.example.com, *.api.example.com'.
    Raises ValueError naming the first problem: an empty list or name, a bad
    name or label, '*' anywhere but a leading '*.' label or alone, a name given
    twice (once normalised: 'A.example.com' and 'a.example.com.' are one name)."""
    if not text.strip():
        raise ValueError('sni is empty: give names, "*.domain" patterns or "*"')
    patterns = []
    for item in text.split(','):
        item = item.strip()
        if not item:
            raise ValueError('sni %r has an empty name' % text)
        pattern = sni_pattern(item)
        if pattern in patterns:
            raise ValueError('sni lists %r twice' % pattern)
        patterns.append(pattern)
    return patterns


class SniMatcher(object):
    """Which service a server name lands on, for one shared listen address.

    add() each pattern of each listen there; match() a name.  The most
    specific pattern wins, whatever the order of the config: an exact name,
    then the wildcard with the longest suffix ('*.a.example.com' before
    '*.example.com'), then '*'.  '*.example.com' matches a.example.com and
    a.b.example.com, not example.com.  Services are any objects but None;
    messages name them by their .name."""

    def __init__(self):
        self.exact = {}         # name -> service
        self.wildcards = {}     # the suffix of '*.suffix' -> service
        self.default = None     # the service with '*'

    def add(self, pattern, service):
        """Give pattern (as parse_sni returns it, or any text sni_pattern takes)
        to service.  ValueError if another service on the address has it (a
        second '*', or the same name or wildcard twice)."""
        pattern = sni_pattern(pattern)
        owner = self.owner(pattern)
        if owner is not None:
            if pattern == '*':
                raise ValueError("a second '*' on this address: service %r has it already"
                                 % _service_label(owner))
            raise ValueError('server name %r is already claimed by service %r on this address'
                             % (pattern, _service_label(owner)))
        if pattern == '*':
            self.default = service
        elif pattern.startswith('*.'):
            self.wildcards[pattern[2:]] = service
        else:
            self.exact[pattern] = service

    def owner(self, pattern):
        """The service that has exactly this normalised pattern, or None."""
        if pattern == '*':
            return self.default
        if pattern.startswith('*.'):
            return self.wildcards.get(pattern[2:])
        return self.exact.get(pattern)

    def match(self, name):
        """(service, pattern) for a server name as ClientHelloReader gives it
        (normalised; None for a hello without one), or None when no pattern
        matches and the address has no '*'.  Normalise other text first
        (normalize_server_name)."""
        if name is not None:
            service = self.exact.get(name)
            if service is not None:
                return service, name
            if self.wildcards:
                dot = name.find('.')
                while dot >= 0:     # longest suffix first
                    suffix = name[dot + 1:]
                    service = self.wildcards.get(suffix)
                    if service is not None:
                        return service, '*.' + suffix
                    dot = name.find('.', dot + 1)
        if self.default is not None:
            return self.default, '*'
        return None

    def patterns(self):
        """[(pattern, service)], most specific first (the order match tries them)."""
        found = sorted(self.exact.items())
        found += [('*.' + suffix, service) for suffix, service in
                  sorted(self.wildcards.items(), key=lambda item: (-item[0].count('.'), item[0]))]
        if self.default is not None:
            found.append(('*', self.default))
        return found


def sni_text(patterns):
    """sni patterns for people: each with an international label shown as
    written and as sent ('fa\u00df.de -> xn--fa-hia.de'), comma-separated."""
    shown = []
    for pattern in patterns:
        written = '.'.join(label[4:].encode('ascii').decode('punycode') if label.startswith('xn--') else label
                           for label in pattern.split('.'))
        shown.append(pattern if written == pattern else '%s -> %s' % (written, pattern))
    return ', '.join(shown)


def _service_label(service):
    return getattr(service, 'name', service)


# ---------------------------------------------------------------------------
# Logs: one escaping style for everything a client or an operator supplies,
# and the access log, written in batches without a LogRecord per connection.
# ---------------------------------------------------------------------------

def escape_text(value):
    """value as text that cannot start a forged line or hide characters: a
    backslash and every unprintable character are escaped as repr() does."""
    text = str(value)
    if text.isprintable() and '\\' not in text:
        return text
    return ''.join(c if c.isprintable() and c != '\\' else repr(c)[1:-1] for c in text)


_PLAIN_VALUE = re.compile(r'[A-Za-z0-9._:/@+\[\]-]+\Z')


def log_value(value):
    """One key=value field: as is when plain, else quoted, escaped as escape_text()
    does and with '"' escaped too, so it cannot forge another field or line."""
    text = str(value)
    if _PLAIN_VALUE.match(text):
        return text
    return '"%s"' % escape_text(text).replace('"', '\\"')


def format_address(host, port):
    """'1.2.3.4:80', '[::1]:80', '*:80' (an empty host, as a wildcard bind gives)."""
    if ':' in host:
        return '[%s]:%s' % (host, port)
    return '%s:%s' % (host or '*', port)


def not_too_often(logged, kind, now, interval):
    """For a line logged at most once per interval per kind: None to leave this one
    out (counted), else how many were left out since the last.  logged: {kind:
    [loop time of its last line, lines left out since]}, kept by the caller."""
    last = logged.get(kind)
    if last is not None and now - last[0] < interval:
        last[1] += 1
        return None
    logged[kind] = [now, 0]
    return last[1] if last is not None else 0


def oserror_text(e):
    """'connection refused' for an OSError with an errno, else its text."""
    return error_text(e.errno) if e.errno else str(e)


def left_out_text(count):
    return ' (%d more like it not logged since the last such line)' % count if count else ''


def error_text(err):
    """'connection refused' from an errno (log lines read better in lower case)."""
    text = os.strerror(err)
    return text[:1].lower() + text[1:]


LOG_FORMAT = '%(asctime)s %(levelname)s %(message)s'
LOG_PREFIX = ''         # before each message of a worker's log lines ('worker 2: '), access lines aside


class LogFormatter(logging.Formatter):
    """LOG_FORMAT, with the date text made once a second."""

    def formatTime(self, record, datefmt=None):
        return clock_text(record.created)


def stream_formatter():
    """'DATE TIME,MS LEVEL message', a worker's message after its LOG_PREFIX."""
    return LogFormatter(LOG_FORMAT.replace('%(message)s', LOG_PREFIX + '%(message)s'))


_clock = [None, '']     # the second, and its date text


def clock_text(when):
    """'2026-12-01 21:40:00,123' for an epoch time, as LOG_FORMAT's asctime gives."""
    second = int(when)
    if second != _clock[0]:
        _clock[0] = second
        _clock[1] = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(second))
    return '%s,%03d' % (_clock[1], (when - second) * 1000)


ACCESS_FLUSH = 0.05      # seconds an access line may wait in memory before it is written
LOG_BUFFER = 1 << 20     # bytes of lines a log target may hold while it takes none; past it, lines are dropped
LOG_ERROR_INTERVAL = 10.0    # seconds: a log target's failing writes are reported at most this often
LOG_EXIT_WAIT = 1.0      # seconds an exiting process waits, in all, for slow log targets to take their lines
LOG_FILE_WRITE = 1 << 18     # bytes of one write to a regular file (to a pipe: PIPE_BUF, so lines stay whole)
LOG_HANDED = 10000       # records other threads may have waiting for the loop (past it: dropped)


# How a client's connection ended: the access log's end= field.  One line a reason:
# its constant, which the code closes with, its text and what it means, which
# README's table says in the same words (tests/test_tables.py holds them together).
END_REASONS = collections.OrderedDict()


def end_reason(text, meaning):
    END_REASONS[text] = meaning
    return text


END_DONE = end_reason('done', 'both sides closed, every byte passed on')
END_CLIENT_RESET = end_reason('client-reset', 'the client reset it (the backend, if any, was reset too)')
END_BACKEND_RESET = end_reason('backend-reset', 'the backend reset it (the client was reset too)')
END_IDLE_TIMEOUT = end_reason('idle-timeout', 'no byte either way for `<timeouts idle>`')
END_NO_BACKEND = end_reason('no-backend', 'no host took it: none was eligible, or every one tried failed')
END_HOST_DOWN = end_reason('host-down', 'its host went down by its checks, with `<check on_down="close">`')
END_FULL = end_reason('full', "refused at once: the service's `maxconns` or its queue was full")
END_QUEUE_TIMEOUT = end_reason('queue-timeout', 'no host had room within `<timeouts queue>`')
END_DENIED = end_reason('denied', 'refused by the allow/deny rules, or not a `trusted` PROXY sender')
END_BAD_PROXY = end_reason('bad-proxy', 'a bad PROXY header, or none within `<timeouts connect>`')
END_DRAINED = end_reason('drained', "still on the old group when `enableGroup`'s drain time ran out")
END_SHUTDOWN = end_reason('shutdown', 'still open when the balancer stopped, or still waiting (queued, or '
                                      'reading its hello) when a reload removed its service or listen')
END_ERROR = end_reason('error', 'a bug in its handling (logged with the traceback)')
END_BAD_HELLO = end_reason('bad-hello', 'on a listen with `sni`: no TLS hello, a malformed or too big one, '
                                        'or the client closed before it ended')
END_HELLO_TIMEOUT = end_reason('hello-timeout', 'on a listen with `sni`: no whole hello within `<timeouts connect>`')
END_UNKNOWN_SNI = end_reason('unknown-sni', 'on a listen with `sni`: the hello named no service here')
END_LIMITED = end_reason('limited', 'refused at once (reset) by its service\'s `<clients>` limits: '
                                    'too many open or too many new from its address')
END_IDLE = end_reason('idle', 'a UDP session: no datagram either way for `<timeouts idle>`')
END_RESPONSES = end_reason('responses', 'a UDP session: its `<udp responses>` replies came back (with 0: its '
                                        'datagram was sent)')
END_EVICTED = end_reason('evicted', "a UDP session: the least recently used, pushed out of its service's full "
                                    '`<udp sessions>` table (or for an fd)')


class AccessLog(object):
    """The access log: one line per finished client connection, on the
    'pydirector.access' logger's handlers, at INFO.

    Lines are formatted here, straight from the connection, and kept in a
    list; they go to the log targets (LogTarget, which write a batch at a
    time) every ACCESS_FLUSH seconds, before any other record the loop thread
    logs (so lines come out in time order), and at every stop, reload and log
    reopen.  A SIGKILL loses at most the last ACCESS_FLUSH seconds of lines.
    A handler this does not know (a test's recorder) gets a LogRecord per
    line, as logging would give it.
    """

    def __init__(self, loop):
        self.loop = loop
        self.enabled = True
        self.kept = []              # (closed Pair or TLSHelloReader, how it ended, time.time())
        self.timer = None
        self.logger = logging.getLogger('pydirector.access')
        self.escaped = {}           # text -> log_value(text), for names and addresses
        self.host_texts = {}        # Host -> its 'host=NAME backend=IP:PORT', escaped
        log_output.attach(self)

    def value(self, text):
        escaped = self.escaped.get(text)
        if escaped is None:
            if len(self.escaped) >= 10000:
                self.escaped.clear()
            escaped = self.escaped[text] = log_value(text)
        return escaped

    def connection(self, pair, how):
        """Keep a closed pair (or UDP Session) for its line, formatted when the batch is
        written; how: one of END_REASONS.  Or a TLSHelloReader: a client of a listen with
        sni closed before any service was chosen (service=-, bytes_in the bytes it sent,
        none relayed)."""
        # The wall clock now, as a LogRecord's: not the loop's time (read as this iteration
        # began), so a record logged before in this iteration cannot carry a later time.
        self.kept.append((pair, how, time.time()))
        if self.timer is None:
            self.timer = self.loop.call_later(ACCESS_FLUSH, self.flush)

    PREFIX = len('2026-12-01 21:40:00,123 INFO ')

    def take_lines(self):
        """The kept connections' lines, whole ('DATE TIME,MS INFO access ...\n'), which
        are forgotten.  One format per line: this is the access log's whole cost."""
        kept, self.kept = self.kept, []
        value = self.value
        escaped = self.escaped
        hosts = self.host_texts
        if len(hosts) > 10000:
            hosts.clear()
        offset = time.time() - time.monotonic()     # wall time -> loop time, for durations
        lines = []
        append = lines.append
        second, date = None, ''
        for pair, how, when in kept:
            if int(when) != second:
                second = int(when)
                date = clock_text(second)[:-4]      # without its ',mmm'
            if type(pair) is Pair:
                host = pair.host or (pair.tried[-1] if pair.tried else None)
                service = pair.service.name
                failovers = len(pair.tried) - 1 if pair.tried else 0
                bytes_in, bytes_out = pair.bytes_in, pair.bytes_out
            elif type(pair) is Session:
                append(self.session_line(pair, how, when - offset, '%s,%03d' % (date, (when - second) * 1000)))
                continue
            else:   # a TLSHelloReader: no service, nothing relayed
                host, service, failovers, bytes_in, bytes_out = None, '-', 0, pair.received, 0
            host_text = hosts.get(host)
            if host_text is None:
                host_text = hosts[host] = ('host=%s backend=%s' % (value(host.name), value(host.ip)) if host
                                           else 'host=- backend=-')
            ip = pair.client_ip
            sni = pair.sni
            # The client's address came from the kernel or a checked PROXY header: always plain.
            append('%s,%03d INFO access service=%s client=%s:%d sni=%s %s failovers=%d bytes_in=%d '
                   'bytes_out=%d duration=%.3f end=%s\n' % (
                       date, (when - second) * 1000, escaped.get(service) or value(service),
                       '[%s]' % ip if ':' in ip else ip, pair.client_port,
                       '-' if sni is None else value(sni), host_text, failovers,
                       bytes_in, bytes_out, when - offset - pair.started, how))
        return lines

    def session_line(self, session, how, now, stamp):
        """The line of an ended UDP session: its datagrams and bytes each way (now: its end, in loop time)."""
        host = session.host or (session.tried[-1] if session.tried else None)
        host_text = self.host_texts.get(host)
        if host_text is None:
            host_text = self.host_texts[host] = ('host=%s backend=%s' % (self.value(host.name), self.value(host.ip))
                                                 if host else 'host=- backend=-')
        ip = session.client_ip
        return ('%s INFO access service=%s client=%s:%d protocol=udp %s failovers=%d datagrams_in=%d '
                'datagrams_out=%d bytes_in=%d bytes_out=%d duration=%.3f end=%s\n' % (
                    stamp, self.value(session.service.name), '[%s]' % ip if ':' in ip else ip, session.client_port,
                    host_text, max(0, len(session.tried) - 1), session.datagrams_in, session.datagrams_out,
                    session.bytes_in, session.bytes_out, now - session.started, how))

    def flush(self):
        """Hand what is kept to the log targets; from the loop thread, or once the loop has stopped."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.kept:
            return
        lines = self.take_lines()
        if not self.logger.isEnabledFor(logging.INFO):
            return
        for handler in self.handlers():
            if isinstance(handler, LogTarget):
                log_output.put(handler, handler.access_texts(lines))
                continue
            try:
                for line in lines:
                    record = self.logger.makeRecord(self.logger.name, logging.INFO, '', 0,
                                                    line[self.PREFIX:-1], (), None)
                    handler.handle(record)
            except Exception:
                handler.handleError(None)

    def handlers(self):
        """The handlers logging would call for a record of this logger, in its order."""
        found = []
        logger = self.logger
        while logger is not None:
            found.extend(h for h in logger.handlers if h.level <= logging.INFO)
            if not logger.propagate:
                break
            logger = logger.parent
        return found


class DropNote(bytes):
    """A target's line saying how many lines it dropped (`count`): if it is dropped
    in turn, its count goes back to the lines no note has told of."""


SEND_FLAGS = getattr(socket, 'MSG_DONTWAIT', 0)


class LogTarget(logging.Handler):
    """One place log lines go: stderr, the file of <logging file>, or syslog.
    Nothing written to it ever blocks: a log reader that stops reading, a
    syslog socket nobody reads or a full disk must not stop the data plane.

    Lines (each a whole line, or a datagram) wait in `pending`, in order,
    until the target takes them: each batch is written at once as far as
    the kernel takes it without waiting, and the rest when the loop says the
    target has room.  At most LOG_BUFFER bytes wait; past that, new lines are
    dropped and counted (log_output.dropped, the admin's
    pydirector_log_lines_dropped_total) until half of them have gone out, and
    then a line says how many were dropped.  A write that fails (a full disk,
    syslog gone) drops what waits the same way and is reported at most once
    per LOG_ERROR_INTERVAL, without a traceback, on the other targets and on
    stderr.  pending changes only under log_output.lock, and log_output
    decides the order of the lines.
    """

    label = 'log'
    datagrams = False       # one item per send (syslog); else whole lines joined up to `piece` bytes
    piece = select.PIPE_BUF     # the kernel keeps a pipe write of at most PIPE_BUF bytes whole
    watchable = True        # the loop can watch it for room (anything but a regular file)
    check_first = False     # a blocking descriptor we share: write only once poll says there is room

    def __init__(self):
        logging.Handler.__init__(self)
        self.pending = collections.deque()
        self.size = 0           # bytes in pending
        self.dropping = False   # lines are dropped until half of LOG_BUFFER is free (or a write works)
        self.unreported = 0     # lines dropped that no note has told of yet
        self.dropped = 0        # lines this target dropped, ever
        self.reported = None    # when a failing write was last reported (monotonic)
        self.watched = None     # the loop watching the descriptor for room
        self.poller = None
        self.closed = False

    def emit(self, record):
        try:
            log_output.add(self, self.text(record))
        except Exception:
            self.handleError(record)

    # -- pending lines (under log_output.lock) ------------------------------------

    def put(self, texts):
        """Queue these texts, or drop and count those past LOG_BUFFER."""
        if self.closed:
            self.drop(len(texts))
            return
        if self.dropping:
            if self.size > LOG_BUFFER // 2:
                self.drop(len(texts))
                return
            self.resume()
        room = LOG_BUFFER - self.size
        pending = self.pending
        for index, text in enumerate(texts):
            data = text.encode('utf-8', 'backslashreplace')
            if len(data) > room:
                self.dropping = True
                self.drop(len(texts) - index)
                break
            room -= len(data)
            pending.append(data)
        self.size = LOG_BUFFER - room

    def drop(self, count):
        self.unreported += count
        self.dropped += count
        log_output.dropped += count

    def resume(self):
        """Taking lines again: first the line saying how many were dropped."""
        self.dropping = False
        if self.unreported:
            record = logging.LogRecord('pydirector', logging.WARNING, '', 0, 'log to %s: %d line(s) dropped',
                                       (self.label, self.unreported), None)
            note = DropNote(self.text(record).encode('utf-8', 'backslashreplace'))
            note.count = self.unreported
            self.unreported = 0
            self.pending.append(note)
            self.size += len(note)

    def write(self):
        """Write what waits, as far as the target takes it without waiting; then
        have the loop watch for room while some is left."""
        pending = self.pending
        while pending and not self.closed:
            if self.check_first and not self.has_room(0):
                break
            data = pending[0] if self.datagrams else self.joined()
            try:
                sent = self.send(data)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EMSGSIZE and self.datagrams:    # this one line is too long for syslog
                    self.size -= len(pending.popleft())
                    self.drop(1)
                    continue
                self.failed(e)
                break
            self.sent(sent)
            if sent < len(data) and (self.watchable or not sent):
                break
            if self.dropping and self.size <= LOG_BUFFER // 2:
                self.resume()
        self.update_watch()

    def joined(self):
        """The first waiting lines, whole, in one piece of at most `piece` bytes (or one longer line)."""
        pending = self.pending
        first = pending[0]
        if len(pending) == 1 or len(first) >= self.piece:
            return first
        parts = []
        total = 0
        for data in pending:
            total += len(data)
            if total > self.piece:
                break
            parts.append(data)
        return b''.join(parts)

    def sent(self, count):
        """count bytes of the first waiting lines went out."""
        pending = self.pending
        self.size -= count
        while count:
            first = pending[0]
            if count < len(first):
                pending[0] = first[count:]      # a note begun is told: the rest is plain bytes
                return
            count -= len(first)
            pending.popleft()

    def failed(self, error):
        """A write failed for another reason than no room: what waits is dropped, the
        next line to go out is the note, and the failure is reported."""
        count = 0
        for data in self.pending:
            if type(data) is DropNote:
                self.unreported += data.count
            else:
                count += 1
        self.pending.clear()
        self.size = 0
        self.drop(count)
        self.dropping = True
        self.reset()
        log_output.report(self, 'cannot write: %s' % (error_text(error.errno) if error.errno else error))

    def reset(self):
        """After a failed write (syslog: connect again at the next line)."""

    def close_fd(self):
        """Close the descriptor (not logging's Handler.release, which is its lock's)."""

    def update_watch(self):
        if self.pending and self.watchable and not self.closed:
            if self.watched is None:
                loop = log_output.loop()
                if loop is not None and loop.running and threading.get_ident() == loop.thread_ident:
                    try:
                        loop.add(self.fileno(), EVENT_WRITE, self.on_writable)
                    except (OSError, ValueError, TypeError):
                        return      # it cannot be polled: the next line tries again
                    self.watched = loop
        elif self.watched is not None:
            self.unwatch()

    def unwatch(self):
        loop, self.watched = self.watched, None
        if loop is not None:
            try:
                loop.remove(self.fileno())
            except (KeyError, ValueError, OSError):
                pass    # that loop is closed

    def on_writable(self, mask):
        with log_output.lock:
            self.write()

    def has_room(self, timeout):
        """Whether the target takes a write now, waiting up to timeout seconds."""
        fd = self.fileno()
        if fd is None:
            return False
        if self.poller is None:
            self.poller = select.poll()
            self.poller.register(fd, select.POLLOUT)
        return bool(self.poller.poll(timeout * 1000))

    def finish(self, deadline):
        """At exit: write what waits, waiting for room until deadline (monotonic)."""
        self.write()
        while self.pending and self.watchable and not self.closed:
            left = deadline - time.monotonic()
            if left <= 0 or not self.has_room(left):
                break
            self.write()

    def close(self):
        """What it takes now is written, the rest dropped and counted."""
        with log_output.lock:
            if not self.closed:
                self.write()
                self.drop(sum(1 for data in self.pending if type(data) is not DropNote))
                self.pending.clear()
                self.size = 0
                self.unwatch()
                self.closed = True
                self.close_fd()
        logging.Handler.close(self)


class StreamTarget(LogTarget):
    """stderr (no path) or the file of <logging file>: 'DATE TIME,MS LEVEL message' lines."""

    def __init__(self, path=None):
        LogTarget.__init__(self)
        self.path = path
        self.label = escape_text(path) if path else 'stderr'
        self.fd = None
        self.sock = None
        self.setFormatter(stream_formatter())
        self.use(*self.open())

    def open(self):
        """A descriptor of our own, and whether to poll before each write (see own_stderr)."""
        if not self.path:
            return own_stderr()
        # O_NONBLOCK: on a FIFO or a device; a regular file never waits for a reader.
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_NOCTTY |
                       os.O_CLOEXEC, 0o666), False

    def use(self, fd, check_first):
        mode = os.fstat(fd).st_mode
        self.fd = fd
        self.poller = None
        self.watchable = not stat.S_ISREG(mode)
        self.piece = select.PIPE_BUF if self.watchable else LOG_FILE_WRITE
        self.check_first = check_first
        if stat.S_ISSOCK(mode):
            # stderr under systemd: a stream socket to the journal, which other processes
            # share; MSG_DONTWAIT makes our sends alone non-blocking.
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fd)
            self.check_first = check_first or not SEND_FLAGS

    def fileno(self):
        return self.fd

    def send(self, data):
        if self.sock is not None:
            return self.sock.send(data, SEND_FLAGS)
        return os.write(self.fd, data)

    def text(self, record):
        return self.format(record) + '\n'

    def access_texts(self, lines):
        return lines

    def reopen(self):
        """SIGUSR1 (logrotate): the file again by its name; what waits goes there."""
        if not self.path:
            return
        with log_output.lock:
            try:
                opened = self.open()
            except OSError as e:
                log_output.report(self, 'cannot reopen: %s' % error_text(e.errno))
                return
            self.unwatch()
            self.close_fd()
            self.use(*opened)
            self.write()

    def close_fd(self):
        if self.sock is not None:
            self.sock.close()
        elif self.fd is not None:
            os.close(self.fd)
        self.fd = self.sock = None


def own_stderr():
    """stderr as a descriptor of our own, and whether to poll before each write.

    O_NONBLOCK belongs to the open file description, which our stderr shares
    with whoever else holds it: the terminal's shell, the other processes of
    a pipeline, our workers.  Set there, their reads and writes would fail
    with EAGAIN.  So a pipe or a terminal is opened again through
    /proc/self/fd (Linux): a new description of the same pipe or terminal,
    ours alone, made non-blocking.  A regular file never waits (its copy
    shares the offset, as before); a socket (systemd's journal) is sent to
    with MSG_DONTWAIT.  Where none of that works (no /proc, or a terminal of
    another user after dropping privileges) each write of at most PIPE_BUF
    bytes waits for poll to say there is room, which only a writer filling
    the pipe in between could still block.
    """
    import fcntl
    fd = sys.stderr.fileno()
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode) or stat.S_ISSOCK(mode) or fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK:
        return os.dup(fd), False
    try:
        return os.open('/proc/self/fd/%d' % fd, os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC), False
    except OSError:
        return os.dup(fd), True


class SyslogTarget(LogTarget):
    """<logging syslog>: a datagram per line, '<PRI>pydirector[PID]: message\\0' as
    logging.handlers.SysLogHandler words it, to a unix socket (datagram, else
    stream, as SysLogHandler tries) or over UDP.  A unix socket that fails is
    connected again at the next line (syslogd restarted)."""

    datagrams = True

    def __init__(self, address, facility, text):
        LogTarget.__init__(self)
        self.address = address
        self.label = 'syslog ' + escape_text(text)
        self.facility = logging.handlers.SysLogHandler.facility_names[facility]
        self.sock = None
        self.to = None          # the UDP address
        self.setFormatter(logging.Formatter('pydirector[%d]: %s%%(message)s' % (os.getpid(), LOG_PREFIX)))
        self.access_prefix = '<%d>pydirector[%d]: ' % (self.priority('INFO'), os.getpid())
        if isinstance(address, str):
            try:
                self.connect()
            except OSError:
                pass    # syslogd may start after us (C's openlog ignores this too): the first line tries again
        else:           # resolved once, here: never on the loop
            host, port = address
            family, kind, proto, _, self.to = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM)[0]
            self.sock = socket.socket(family, kind, proto)
            self.sock.setblocking(False)

    def priority(self, levelname):
        names = logging.handlers.SysLogHandler
        return (self.facility << 3) | names.priority_names[names.priority_map.get(levelname, 'warning')]

    def connect(self):
        error = None
        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
            sock = socket.socket(socket.AF_UNIX, kind)
            sock.setblocking(False)
            try:
                sock.connect(self.address)
            except OSError as e:
                sock.close()
                error = e
                continue
            self.sock = sock
            self.poller = None
            return
        raise error

    def fileno(self):
        return self.sock.fileno() if self.sock is not None else None

    def send(self, data):
        if self.to is not None:
            return self.sock.sendto(data, self.to)
        if self.sock is None:
            self.connect()
        try:
            return self.sock.send(data)
        except BlockingIOError:
            raise
        except OSError:     # syslogd restarted: its socket is a new one (SysLogHandler too retries once)
            self.reset()
            self.connect()
            return self.sock.send(data)

    def reset(self):
        if self.to is None and self.sock is not None:
            self.unwatch()
            self.close_fd()

    def text(self, record):
        return '<%d>%s\000' % (self.priority(record.levelname), self.format(record))

    def access_texts(self, lines):
        prefix = self.access_prefix
        start = AccessLog.PREFIX
        return [prefix + line[start:-1] + '\000' for line in lines]

    def close_fd(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class LogOutput(object):
    """This process's log lines on their way to the targets, in time order.

    A record the loop thread logs goes after the access lines kept so far
    (AccessLog.flush first) and is written at once, as far as each target
    takes it.  A record of another thread (the admin's, a reload's) is
    handed to the loop, which puts it in line the same way; with no loop
    running, it is written from its own thread.  `dropped` counts the lines
    every target dropped (a master adds its workers': Master.log_lines_dropped).
    """

    def __init__(self):
        self.lock = threading.RLock()
        self.access = None                  # the AccessLog of the loop that writes
        self.handed = collections.deque()   # (target, text) other threads logged, for the loop
        self.handing = False                # a call to take them is queued on the loop
        self.dropped = 0
        self.fallback = None                # stderr for reports, when stderr is no target itself
        self.reporting = False

    def attach(self, access):
        self.access = access
        access.loop.call_soon(self.write_all)   # lines logged before the loop ran, if there was no room

    def loop(self):
        return self.access.loop if self.access is not None else None

    def targets(self):
        found = [h for h in _log_handlers if isinstance(h, LogTarget)]
        return found + [self.fallback] if self.fallback is not None else found

    def add(self, target, text):
        """A record's text for a target (LogTarget.emit)."""
        access = self.access
        if access is not None:
            loop = access.loop
            if threading.get_ident() == loop.thread_ident:
                access.flush()      # the connections that closed before this record come first
            elif loop.running:
                with self.lock:
                    if len(self.handed) >= LOG_HANDED:
                        target.drop(1)      # the loop is not taking them: memory stays bounded
                        return
                    self.handed.append((target, text))
                    if self.handing:
                        return
                    self.handing = True
                loop.call_soon_threadsafe(self.take_handed)
                return
        self.put(target, [text])

    def put(self, target, texts):
        with self.lock:
            if self.handed:
                self.put_handed()
            target.put(texts)
            target.write()

    def take_handed(self):
        """On the loop: what other threads logged, after the access lines kept so far."""
        if self.access is not None:
            self.access.flush()
        with self.lock:
            self.put_handed()

    def put_handed(self):
        handed = list(self.handed)
        self.handed.clear()
        self.handing = False
        targets = []
        for target, text in handed:
            target.put([text])
            if target not in targets:
                targets.append(target)
        for target in targets:
            target.write()

    def write_all(self):
        with self.lock:
            for target in self.targets():
                target.write()

    def report(self, target, problem):
        """A target's writes fail: said at most once per LOG_ERROR_INTERVAL, without a
        traceback, on every other target and on stderr (where systemd keeps it)."""
        now = time.monotonic()
        if self.reporting or (target.reported is not None and now - target.reported < LOG_ERROR_INTERVAL):
            return
        target.reported = now
        self.reporting = True
        try:
            others = [t for t in self.targets() if t is not target]
            if not any(isinstance(t, StreamTarget) and not t.path for t in others + [target]):
                try:
                    self.fallback = StreamTarget()
                    others.append(self.fallback)
                except (AttributeError, ValueError, OSError):
                    pass    # no stderr
            record = logging.LogRecord('pydirector', logging.ERROR, '', 0, 'log to %s: %s (%d line(s) dropped so far)',
                                       (target.label, problem, target.dropped), None)
            for other in others:
                other.put([other.text(record)])
                other.write()
        finally:
            self.reporting = False

    def finish(self, wait=LOG_EXIT_WAIT):
        """At exit: what every target holds, waiting up to `wait` seconds in all for room."""
        deadline = time.monotonic() + wait
        with self.lock:
            if self.handed:
                self.put_handed()
            for target in self.targets():
                target.finish(deadline)


log_output = LogOutput()
_log_handlers = []   # the handlers we installed, so a reload replaces only those


def lighten_logging():
    """The logging module's documented optimisations: we log neither the caller's
    file and line nor thread and process names, so don't collect them per record.
    It also keeps PyPy 7.3.11 up: its JIT aborts the process (no message) on a hot
    loop that keeps the number _thread.get_ident() returns, as a LogRecord's
    `thread` does."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def setup_logging(config, verbose=False):
    """The process's logging, once: OSError if the log file cannot be opened."""
    lighten_logging()
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    configure_log_handlers(config.logging)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    atexit.register(log_output.finish)      # before logging's own shutdown, which closes the targets


def stderr_target():
    try:
        return StreamTarget()
    except (AttributeError, ValueError, OSError):   # no stderr of the OS's (pythonw, a StringIO)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(stream_formatter())
        return handler


def configure_log_handlers(logging_config):
    """Install targets for <logging>: a file (else stderr), and syslog when asked.
    The new ones are made before the old ones go: OSError (a file that cannot
    be opened, a syslog host with no address) changes nothing."""
    made = []
    if logging_config.file:
        made.append(StreamTarget(logging_config.file))
    elif logging_config.syslog is None:
        made.append(stderr_target())
    if logging_config.syslog is not None:
        try:
            made.append(SyslogTarget(logging_config.syslog_address, logging_config.facility,
                                     logging_config.syslog))
        except OSError:
            for handler in made:
                handler.close()
            raise
    root = logging.getLogger()
    for handler in _log_handlers:
        root.removeHandler(handler)
        handler.close()
    _log_handlers[:] = made
    for handler in made:
        root.addHandler(handler)


def reopen_logs():
    """SIGUSR1, for logrotate: the log file again, by its name."""
    for handler in _log_handlers:
        if isinstance(handler, StreamTarget):
            handler.reopen()
# ---------------------------------------------------------------------------
# Proxying: a Listener accepts clients, a Pair relays one client to one backend.
# ---------------------------------------------------------------------------

# Data-plane sockets are the C-level _socket.socket: socket.socket's Python
# wrapper adds frames to every accept, close and enum lookup, and we use none
# of what it offers (makefile, context manager).
SOCK_STREAM = socket.SOCK_STREAM
SOCK_NONBLOCK = getattr(socket, 'SOCK_NONBLOCK', 0)   # Linux: no extra syscall to unblock
SOCK_STREAM_NONBLOCK = SOCK_STREAM | SOCK_NONBLOCK
IPPROTO_TCP, TCP_NODELAY = socket.IPPROTO_TCP, socket.TCP_NODELAY
SOL_SOCKET, SO_ERROR, SO_LINGER = socket.SOL_SOCKET, socket.SO_ERROR, socket.SO_LINGER
SHUT_WR = socket.SHUT_WR
# Linux copies TCP_NODELAY from a listening socket to the sockets it accepts;
# elsewhere each accepted socket is set on its own.
NODELAY_INHERITED = sys.platform.startswith('linux')

LISTEN_EXCLUSIVE = getattr(select, 'EPOLLEXCLUSIVE', 0) if Loop is EpollLoop else 0
BUFFER_SIZE = 65536       # one recv; also the most a Pair holds per direction
ACCEPT_BATCH = 64         # accepts per readable event, so one busy listener can't starve the rest
ACCEPT_PAUSE = 0.25       # seconds to stop accepting when out of file descriptors

# os.splice (Linux, Python 3.10+) moves bulk bytes without copying them
# through Python.  SPLICE_AFTER: bytes one direction must carry before it
# switches (None: never, as on platforms without splice).
splice = getattr(os, 'splice', None)
SPLICE_AFTER = 1 << 20 if splice is not None else None
SPLICE_SIZE = BUFFER_SIZE  # the most one splice moves: a pipe holds what a plain direction would
SPLICE_FLAGS = getattr(os, 'SPLICE_F_MOVE', 0) | getattr(os, 'SPLICE_F_NONBLOCK', 0)
MAX_PIPES = 1024           # pipes open at once (two fds each); past it, directions stay plain

# Errors that say "this machine is out of something", not "the backend is bad".
LOCAL_CONNECT_ERRORS = frozenset([errno.EADDRNOTAVAIL, errno.EMFILE, errno.ENFILE,
                                  errno.ENOBUFS, errno.ENOMEM, errno.EAGAIN])
OUT_OF_FDS = frozenset([errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM])

LINGER_RESET = b'\x01\x00\x00\x00\x00\x00\x00\x00'  # struct linger {on, 0 s}: close sends RST


def listen_socket(host, port, backlog=None, protocol='tcp', reuseport=False):
    """A bound, listening, non-blocking TCP socket ('' or '*' for every IPv4
    address), or with protocol 'udp' a bound UDP one (reuseport: with
    SO_REUSEPORT, so that more sockets may bind the address, one per worker);
    OSError (with the address in its text) says why not."""
    host = '0.0.0.0' if host in ('', '*') else host
    kind = socket.SOCK_DGRAM if protocol == 'udp' else socket.SOCK_STREAM
    try:
        infos = socket.getaddrinfo(host, port, 0, kind, 0, socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise OSError(e.errno, 'cannot listen on %s: %s' % (format_address(host, port), e.strerror)) from None
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, kind)
    try:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # (Not on UDP: there Linux lets a second socket bind the same address with it.)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # As nginx does: [::]:80 means IPv6 only, so *:80 can be bound beside it.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind == socket.SOCK_STREAM and family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(IPPROTO_TCP, TCP_NODELAY, 1)    # accepted sockets inherit it (Linux)
        sock.bind(sockaddr)
        if kind == socket.SOCK_STREAM:
            if backlog is None:
                backlog = socket.SOMAXCONN if socket.SOMAXCONN > 4096 else 4096
            sock.listen(backlog)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, 'cannot listen on %s: %s' % (format_address(host, port), e.strerror)) from None
    return sock


class Listener(object):
    """One listening socket: of one service, or, on a listen with sni, of every
    service on that address.  There sni is the SniMatcher of their names
    (service is None) and each client's TLS hello picks the service; the
    counters of the clients closed before one was chosen live here, per
    address: unmatched (a name no service claims) and bad[kind]."""

    def __init__(self, director, service, sock, listen):
        self.director = director
        self.reading_elsewhere = 0      # a master's: clients of its workers reading their hello
        self.loop = director.loop
        self.service = service
        self.sock = sock
        self.fd = sock.fileno()
        self.unmatched = 0
        self.bad = {}           # kind (HELLO_PROBLEMS) -> clients closed for it
        self.logged = {}        # kind -> [loop time of its last log line, lines left out since]
        self.configure(listen)
        self.paused = False
        # A master's listeners are its workers' to accept on: it holds them, never watches them.
        self.registered = director.accept
        if self.registered:
            self.add_to_loop()

    def add_to_loop(self):
        # EPOLLEXCLUSIVE (Linux 4.5+): of the workers waiting on a shared listening
        # socket, a new client wakes one, not every one (the thundering herd).
        self.loop.add(self.fd, EVENT_READ | (LISTEN_EXCLUSIVE if self.director.worker is not None else 0),
                      self._on_readable)

    def __repr__(self):
        return '<Listener %s>' % self.text

    def configure(self, listen, sni=None, hello_timeout=None):
        """Take (new) settings from its <listen> (the first of a shared address's:
        they agree on the PROXY settings), and on a listen with sni the matcher
        and the seconds a client has for its hello; a reload may call this again."""
        self.listen = listen
        self.text = listen.text
        self.accept_proxy = listen.accept_proxy
        self.trusted = [('allow', net) for net in listen.trusted]
        self.sni = sni
        self.hello_timeout = hello_timeout

    def _on_readable(self, mask):
        accept = self.sock._accept
        family = self.sock.family
        new_socket = _socket.socket
        on_accept = self.director.on_accept if self.sni is None else self.director.on_accept_sni
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
            client_sock = new_socket(family, SOCK_STREAM, 0, fd)
            client_sock.setblocking(False)
            if not NODELAY_INHERITED:
                try:
                    client_sock.setsockopt(IPPROTO_TCP, TCP_NODELAY, 1)
                except OSError:
                    pass
            on_accept(self, client_sock, client_addr)

    def pause(self, err):
        """Out of fds: a pending client stays queued and would wake us forever; look again shortly."""
        if self.sock.fileno() < 0 or not self.registered:
            return
        if not self.paused:
            log.warning('listen %s: %s; pausing accepts', self.text, error_text(err))
            self.paused = True
        self.loop.remove(self.fd)
        self.registered = False
        self.loop.call_later(ACCEPT_PAUSE, self._resume)

    def _resume(self):
        if self.sock.fileno() >= 0 and not self.registered:  # not closed by a stop meanwhile
            self.add_to_loop()
            self.registered = True

    def close(self):
        if self.sock.fileno() >= 0:
            if self.registered:
                # Not forget: a worker's listening socket is open in other processes too,
                # so closing this fd would leave it in our epoll set, waking us for clients.
                self.loop.remove(self.fd)
                self.registered = False
            self.sock.close()

    close_on_error = close

    # -- listens with sni ---------------------------------------------------

    def match(self, server_name):
        """(service, pattern) for a hello's server name, or None: no service takes it.
        The matcher of now, so a reload meanwhile counts; (service, None) if the
        address lost its sni since."""
        if self.sni is None:
            return (self.service, None) if self.service is not None else None
        return self.sni.match(server_name)

    def complain(self, kind, client_ip, client_port, why):
        """Count a client closed before a service was chosen, and log it: at most
        one line a second per kind, as a flood of them would drown the log."""
        if kind == 'unmatched':
            self.unmatched += 1
        else:
            self.bad[kind] = self.bad.get(kind, 0) + 1
        left_out = not_too_often(self.logged, kind, self.loop.now, HELLO_LOG_INTERVAL)
        if left_out is not None:
            log.warning('listen %s: client %s: %s%s', self.text, format_address(client_ip, client_port), why,
                        left_out_text(left_out))


PROXY_HEADER, QUEUED = 'proxy-header', 'queued'
CONNECTING, STREAMING, CLOSED = 'connecting', 'streaming', 'closed'
PROXY_HEADER_LIMIT = 4096  # bytes of PROXY header (TLVs included) we accept; HAProxy's buffer is as small
QUEUE_LIMIT = 1000        # clients a service may hold waiting for a free host (in total, over workers)


class ProxyHeaderReader(object):
    """The PROXY protocol header a front proxy sends before the client's bytes:
    read it (within <timeouts connect>), then hand the Pair the real client's
    address and whatever came after the header."""
    __slots__ = ('pair', 'accept', 'data', 'timer')

    def __init__(self, pair, accept):
        self.pair = pair
        self.accept = accept
        self.data = b''
        loop = pair.loop
        loop.add(pair.client_fd, EVENT_READ, self._on_readable)
        pair.client_events = EVENT_READ
        self.timer = loop.call_later(pair.service.timeouts.connect, self._fail, 'no header in time')

    def __repr__(self):
        return '<ProxyHeaderReader of %r>' % (self.pair,)

    def _on_readable(self, mask):
        pair = self.pair
        try:
            data = pair.client_sock.recv(BUFFER_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pair.abort(END_CLIENT_RESET)
            return
        if not data:
            self._fail('closed before the header ended')
            return
        data = self.data + data
        try:
            header = parse_proxy_header(data, self.accept, PROXY_HEADER_LIMIT)
        except ValueError as e:
            self._fail(str(e))
            return
        if header is None:
            self.data = data
            return
        self.cancel()
        size, source, dest = header
        pair.header_read(source, dest, data[size:])

    def _fail(self, why):
        self.cancel()
        pair = self.pair
        log.warning('client %s:%s in %s: bad PROXY header: %s',
                    pair.client_ip, pair.client_port, pair.service.name, why)
        pair.close(END_BAD_PROXY)

    def cancel(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def close_on_error(self):
        self.pair.close_on_error()


HELLO_LOG_INTERVAL = 1.0   # seconds between log lines of one kind of bad client, per address
# Why a client of a listen with sni was closed before any service was chosen
# (the 'bad' counters; 'unmatched', a good hello that names no service, is counted apart).
HELLO_PROBLEMS = ('not-tls', 'malformed', 'too-big', 'truncated', 'timeout', 'bad-proxy', 'untrusted-proxy')


def hello_problem(message):
    """The kind of a ClientHelloReader's ValueError, from its text."""
    if message.startswith('TLS hello over'):
        return 'too-big'
    if message.startswith('malformed'):
        return 'malformed'
    return 'not-tls'


class TLSHelloReader(object):
    """A client of a listen with sni, before its service is known: read the
    PROXY header first when the listen takes one, then the client's TLS
    ClientHello, within the listener's hello_timeout and TLS_HELLO_MAX bytes
    (plus the header's).  The hello names a service (Listener.match), and
    the director hands the client to a Pair with every byte read still to
    send (Pair.to_backend), so the backend sees the stream from its first
    byte and does the handshake itself.  Bad input ends here: the client is
    closed, counted and logged by its Listener, and never reaches a backend."""
    __slots__ = ('director', 'listener', 'sock', 'fd', 'client_ip', 'client_port', 'proxy_dest',
                 'proxy', 'data', 'hello', 'timer', 'started', 'received', 'sni', 'watching')

    def __init__(self, director, listener, client_sock, client_addr):
        self.director = director
        self.listener = listener
        self.sock = client_sock
        self.fd = client_sock.fileno()
        self.client_ip = client_addr[0]
        self.client_port = client_addr[1]
        self.proxy_dest = None
        self.proxy = listener.accept_proxy   # the PROXY versions to read first; None once read
        self.data = bytearray()              # what the hello reader sees: all bytes after the header
        self.hello = ClientHelloReader()
        self.received = 0
        self.sni = None
        loop = director.loop
        self.started = loop.now
        loop.add(self.fd, EVENT_READ, self._on_readable)
        self.watching = True
        self.timer = loop.call_later(listener.hello_timeout, self._on_timeout)

    def __repr__(self):
        return '<TLSHelloReader %s:%s on %s>' % (self.client_ip, self.client_port, self.listener.text)

    def _on_readable(self, mask):
        data = self.data
        room = TLS_HELLO_MAX + 5 - len(data) + (PROXY_HEADER_LIMIT if self.proxy is not None else 0)
        try:
            chunk = self.sock.recv(room)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.refuse('truncated', 'reset after %d bytes, before its TLS hello ended' % self.received,
                        END_CLIENT_RESET)
            return
        if not chunk:
            self.refuse('truncated', 'closed after %d bytes, before its %s ended' % (
                self.received, 'PROXY header' if self.proxy is not None else 'TLS hello'), END_BAD_HELLO)
            return
        self.received += len(chunk)
        data += chunk
        if self.proxy is not None and not self._read_proxy_header():
            return
        try:
            result = self.hello.read(data)
        except ValueError as e:
            message = str(e)
            self.refuse(hello_problem(message), 'bad TLS hello: %s' % message, END_BAD_HELLO)
            return
        if result is None:
            if len(data) >= TLS_HELLO_MAX + 5:     # cannot happen: the reader refuses first
                self.refuse('too-big', 'TLS hello over %d bytes' % TLS_HELLO_MAX, END_BAD_HELLO)
            return
        self.sni = name = result[1]
        match = self.listener.match(name)
        if match is None:
            self.refuse('unmatched', 'TLS hello for %r, which no service here takes (and none has \'*\')' % name
                        if name is not None else 'TLS hello without a server name, and no service here has \'*\'',
                        END_UNKNOWN_SNI)
            return
        self.timer.cancel()
        self.timer = None
        self.director.loop.remove(self.fd)
        self.watching = False
        self.director.hello_read(self, match[0])

    def _read_proxy_header(self):
        """True once the header is read (its bytes dropped from data), False while it is not."""
        data = self.data
        try:
            header = parse_proxy_header(data, self.proxy, PROXY_HEADER_LIMIT)
        except ValueError as e:
            self.refuse('bad-proxy', 'bad PROXY header: %s' % e, END_BAD_PROXY)
            return False
        if header is None:
            return False
        size, source, dest = header
        if source is not None:
            self.client_ip, self.client_port = source[0], source[1]
            self.proxy_dest = dest
        del data[:size]
        self.proxy = None
        return bool(data)

    def _on_timeout(self):
        self.timer = None
        self.refuse('timeout', 'no whole %s within %g s (%d bytes came)' % (
            'PROXY header' if self.proxy is not None else 'TLS hello', self.listener.hello_timeout,
            self.received), END_HELLO_TIMEOUT)

    def refuse(self, kind, why, how):
        """Close the client for bad input (kind: HELLO_PROBLEMS or 'unmatched'); its listener
        counts and logs it, the access log gets its line (end=how)."""
        self.close(how)
        self.listener.complain(kind, self.client_ip, self.client_port, why)

    def close(self, how):
        if self.sock is None:
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.watching:
            self.director.loop.forget(self.fd)
            self.watching = False
        self.sock.close()
        self.sock = None
        self.director.hello_closed(self, how)

    def close_on_error(self):
        self.close(END_ERROR)


class Pair(object):
    """One client connection and the backend connection made for it.

    PROXY_HEADER: a ProxyHeaderReader reads the header a front proxy sends first.
    QUEUED: every eligible host is at its maxconns; waiting for a slot.
    CONNECTING: the backend connect is in flight; the client is not read yet,
    so whatever it already sent waits in the kernel and reaches whichever
    backend accepts (that makes failover transparent).
    STREAMING: bytes flow both ways.  A direction's pending bytes are at most
    one recv (to_backend, to_client; or in a Splice's pipe); while they wait,
    the other side is not read (flow control).  EOF on one side is passed on
    with shutdown(SHUT_WR) once its bytes are out; the pair closes when both
    directions are done, or at once on a reset.
    """
    __slots__ = ('director', 'loop', 'service', 'group', 'host', 'client_sock', 'backend_sock',
                 'client_fd', 'backend_fd', 'client_ip', 'client_port', 'state', 'tried',
                 'to_client', 'to_backend', 'client_eof', 'backend_eof', 'client_events',
                 'backend_events', 'timer', 'last_active', 'bytes_in', 'bytes_out', 'started',
                 'proxy_dest', 'header', 'splice_up', 'splice_down', 'sni', 'limit')

    def __init__(self, director, service, client_sock, client_addr):
        self.director = director
        self.loop = loop = director.loop
        self.service = service
        self.group = service.enabled
        self.host = None
        self.client_sock = client_sock
        self.backend_sock = None
        self.client_fd = client_sock.fileno()
        self.backend_fd = -1
        self.client_ip = client_addr[0]
        self.client_port = client_addr[1]
        self.state = CONNECTING
        self.tried = []
        self.to_client = self.to_backend = b''
        self.client_eof = self.backend_eof = False
        self.client_events = self.backend_events = 0
        self.timer = None
        self.last_active = self.started = loop.now
        self.bytes_in = self.bytes_out = 0
        self.proxy_dest = None    # the address a PROXY header said the client connected to
        self.header = None        # the ProxyHeaderReader while one reads
        self.splice_up = None     # a Splice once client->backend moves in bulk
        self.splice_down = None   # and backend->client
        self.sni = None           # the server name of its TLS hello, on a listen with sni
        self.limit = None         # its ClientEntry, in a service with <clients>

    def __repr__(self):
        return '<Pair %s:%s in %s, %s>' % (self.client_ip, self.client_port, self.service.name, self.state)

    # -- before connecting --------------------------------------------------

    def read_proxy_header(self, accept):
        self.state = PROXY_HEADER
        self.header = ProxyHeaderReader(self, accept)

    def header_read(self, source, dest, rest):
        """From the ProxyHeaderReader: source is the real client (None: keep the peer's)."""
        self.header = None
        self.loop.remove(self.client_fd)
        self.client_events = 0
        self.to_backend = rest
        if source is not None:
            self.client_ip, self.client_port = source[0], source[1]
            self.proxy_dest = dest
        self.state = CONNECTING
        self.director.route(self)

    def wait_in_queue(self):
        service = self.service
        queue = service.queue
        counts = self.director.worker_counts
        if len(queue) >= QUEUE_LIMIT if counts is None else counts.queue_full(service):
            service.refused += 1
            self.close(END_FULL)
            return
        self.state = QUEUED
        queue.append(self)
        self.timer = self.loop.call_later(service.timeouts.queue, self._on_queue_timeout)
        if counts is not None:
            counts.queue_changed(service)

    def leave_queue(self):
        """A slot is free: connect (the director has taken us off the queue)."""
        self.timer.cancel()
        self.timer = None
        self.state = CONNECTING
        self.connect_next()

    def _on_queue_timeout(self):
        self.timer = None
        log.info('client %s:%s in %s: no host free within %g s',
                 self.client_ip, self.client_port, self.service.name, self.service.timeouts.queue)
        self.close(END_QUEUE_TIMEOUT)

    # -- connecting -------------------------------------------------------

    def connect_next(self):
        """Try the next host the scheduler offers; close the client when none is left."""
        scheduler = self.group.scheduler
        tried = self.tried
        worker = self.director.worker
        if worker is None:
            host = scheduler.pick(self.client_ip, tried)
        else:
            host = worker.pick(self, scheduler)     # limits and sticky entries shared with the other workers
        if host is None:
            self.director.no_host(self)
            return
        if tried:
            self.service.failovers += 1
            host.retries += 1
        tried.append(host)
        self.host = host
        scheduler.connection_started(host)
        address = host.address
        if address is None:  # a name the manager has not resolved yet
            self._connect_failed(errno.EHOSTUNREACH)
            return
        try:
            sock = _socket.socket(address[0], SOCK_STREAM_NONBLOCK)
        except OSError as e:
            self._connect_failed(e.errno)
            return
        if not SOCK_NONBLOCK:
            sock.setblocking(False)
        try:
            sock.setsockopt(IPPROTO_TCP, TCP_NODELAY, 1)    # relayed small writes go at once
        except OSError:
            pass
        self.backend_sock = sock
        fd = self.backend_fd = sock.fileno()
        err = sock.connect_ex(address[1])
        if err and err != errno.EINPROGRESS:
            self._connect_failed(err)
            return
        loop = self.loop
        self.timer = loop.call_later(self.service.timeouts.connect, self._on_timer)
        loop.add(fd, EVENT_WRITE, self._on_backend_event)
        self.backend_events = EVENT_WRITE

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
            self.close(END_IDLE_TIMEOUT)
        else:
            # Re-arming once per idle period is cheaper than a timer per byte.
            self.timer = self.loop.call_later(limit - idle_for, self._on_timer)

    def _connect_failed(self, err):
        host = self.host
        reason = 'connect timeout' if err is None else error_text(err)
        self._drop_backend()
        self.group.scheduler.connection_ended(host)
        host.total -= 1  # an attempt that never connected is not a served connection
        if err not in LOCAL_CONNECT_ERRORS:
            host.connect_errors += 1    # ours running out of ports or fds is not the host's error
        self.host = None
        if self.director.worker_counts is not None:
            # The close will not name this host: its line is brought up to date now.
            self.director.worker_counts.publish((host,))
        if err in OUT_OF_FDS:
            self.director.pause_accepting(err)
        if err in LOCAL_CONNECT_ERRORS:
            # Our side ran out of ports or fds: the backend did nothing wrong.
            log.warning('client %s:%s in %s: cannot connect to host %s (%s): %s',
                        self.client_ip, self.client_port, self.service.name,
                        host.name, host.ip, reason)
        else:
            self.director.connect_failed(self, host, reason)
        self.connect_next()

    def _connected(self):
        self.state = STREAMING
        loop = self.loop
        now = self.last_active = loop.now
        # The connect timer goes on as the first idle check, unless that is too late.
        idle = self.service.timeouts.idle
        timer = self.timer
        if timer is None or timer.when > now + idle:
            if timer is not None:
                timer.cancel()
            self.timer = loop.call_later(idle, self._on_timer)
        if self.host.send_proxy is not None:
            self.to_backend = self._proxy_header() + self.to_backend
        if self.to_backend:
            self._flush(True)   # a PROXY header, or bytes read with one
        else:
            # What _update_interest would decide for a fresh pair, without asking.
            loop.modify(self.backend_fd, EVENT_READ, self._on_backend_event)
            loop.add(self.client_fd, EVENT_READ, self._on_client_event)
            self.backend_events = self.client_events = EVENT_READ

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
        if mask & EVENT_READ:
            if self.splice_up is None:
                self._relay(self.client_sock, self.backend_sock, True)
            else:
                self.splice_up.pull(self, self.client_sock, self.backend_sock, True)
        if mask & EVENT_WRITE and self.state is STREAMING:
            self._flush(False)

    def _on_backend_event(self, mask):
        if self.state is not STREAMING:
            if mask & EVENT_WRITE:      # CONNECTING: the connect is done, one way or the other
                if mask & EVENT_ERROR:
                    err = self.backend_sock.getsockopt(SOL_SOCKET, SO_ERROR)
                    if err:
                        self._connect_failed(err)
                        return
                self._connected()
            return
        if mask & EVENT_READ:
            if self.splice_down is None:
                self._relay(self.backend_sock, self.client_sock, False)
            else:
                self.splice_down.pull(self, self.backend_sock, self.client_sock, False)
        if mask & EVENT_WRITE and self.state is STREAMING:
            self._flush(True)

    def _relay(self, source, dest, upstream):
        """Read once from source and send straight on; keep only what dest refused."""
        try:
            data = source.recv(BUFFER_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.abort(END_CLIENT_RESET if upstream else END_BACKEND_RESET)
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
            self.abort(END_BACKEND_RESET if upstream else END_CLIENT_RESET)
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
        to_client = self.to_client or (self.splice_down is not None and self.splice_down.pending)
        to_backend = self.to_backend or (self.splice_up is not None and self.splice_up.pending)
        if upstream:
            self.client_eof = True
            done, other, sock = self.backend_eof, to_backend, self.backend_sock
        else:
            self.backend_eof = True
            done, other, sock = self.client_eof, to_client, self.client_sock
        if done and not to_client and not to_backend:
            self.close(END_DONE)      # both ends done: close() sends the FIN a shutdown would
            return
        if not other:
            try:
                sock.shutdown(SHUT_WR)      # pass the EOF on: nothing of this direction waits
            except OSError:
                pass    # the peer is gone already; the read side will tell us
        self._update_interest()

    def _pending(self, upstream):
        """Bytes still held for the backend (upstream) or for the client."""
        if upstream:
            return self.to_backend or (self.splice_up is not None and self.splice_up.pending)
        return self.to_client or (self.splice_down is not None and self.splice_down.pending)

    def _flush(self, upstream):
        """dest became writable: send what it refused before, then resume reading the source."""
        pipe = self.splice_up if upstream else self.splice_down
        if upstream:
            dest, pending = self.backend_sock, self.to_backend
        else:
            dest, pending = self.client_sock, self.to_client
        if pipe is not None and not pending:
            pipe.push(self, dest, upstream)
            return
        if not pending:
            self._update_interest()
            return
        try:
            sent = dest.send(pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.abort(END_BACKEND_RESET if upstream else END_CLIENT_RESET)
            return
        self.last_active = self.loop.now
        if upstream:
            self.to_backend = pending[sent:]
        else:
            self.to_client = pending[sent:]
        self._sent_all_or_wait(upstream, dest, True)

    def _sent_all_or_wait(self, upstream, dest, was_pending):
        """After a send: pass on an EOF that was waiting for these bytes; re-decide the interest."""
        pending = self._pending(upstream)
        if not pending and (self.client_eof if upstream else self.backend_eof):
            self._shutdown(dest)
        if pending or was_pending:
            self._update_interest()

    def _shutdown(self, sock):
        try:
            sock.shutdown(SHUT_WR)
        except OSError:
            pass  # the peer is gone already; the read side will tell us

    def _update_interest(self):
        """The one place that decides what each socket is watched for."""
        if self.state is not STREAMING:
            return
        # _pending(), inlined: this runs on every partial send.
        to_client = self.to_client or (self.splice_down is not None and self.splice_down.pending)
        to_backend = self.to_backend or (self.splice_up is not None and self.splice_up.pending)
        if self.client_eof and self.backend_eof and not to_client and not to_backend:
            self.close(END_DONE)
            return
        client = backend = 0
        if to_client:
            client = EVENT_WRITE
        elif not self.backend_eof:
            backend = EVENT_READ
        if to_backend:
            backend |= EVENT_WRITE
        elif not self.client_eof:
            client |= EVENT_READ
        self._set_events(client, backend)

    def _set_events(self, client, backend):
        loop = self.loop
        if client != self.client_events:
            if not self.client_events:
                loop.add(self.client_fd, client, self._on_client_event)
            elif not client:
                loop.remove(self.client_fd)
            else:
                loop.modify(self.client_fd, client, self._on_client_event)
            self.client_events = client
        if backend != self.backend_events:
            if not self.backend_events:
                loop.add(self.backend_fd, backend, self._on_backend_event)
            elif not backend:
                loop.remove(self.backend_fd)
            else:
                loop.modify(self.backend_fd, backend, self._on_backend_event)
            self.backend_events = backend

    def pending(self):
        """(bytes held for the backend, bytes held for the client), in Python or in a pipe."""
        return tuple(len(data) + (pipe.pending if pipe is not None else 0)
                     for data, pipe in ((self.to_backend, self.splice_up), (self.to_client, self.splice_down)))

    # -- closing ----------------------------------------------------------

    def _drop_backend(self):
        timer = self.timer
        if timer is not None:
            timer.callback = timer.args = None  # timer.cancel(), written out: once a connection
            self.timer = None
        sock = self.backend_sock
        if sock is not None:
            if self.backend_events:
                self.loop.forget(self.backend_fd)
                self.backend_events = 0
            sock.close()
            self.backend_sock = None
            self.backend_fd = -1

    def abort(self, how):
        """A reset on one side: reset the other too, so it cannot mistake a cut stream for a whole one."""
        for sock in (self.client_sock, self.backend_sock):
            if sock is not None:
                try:
                    sock.setsockopt(SOL_SOCKET, SO_LINGER, LINGER_RESET)
                except OSError:
                    pass
        self.close(how)

    def close_on_error(self):
        self.abort(END_ERROR)

    def close(self, how=END_NO_BACKEND):
        state = self.state
        if state is CLOSED:
            return
        if state is QUEUED:
            self.service.queue.remove(self)
        elif state is PROXY_HEADER:
            self.header.cancel()
        self.state = CLOSED
        self._drop_backend()
        if self.client_events:
            self.loop.forget(self.client_fd)
            self.client_events = 0
        host = self.host
        if host is not None:
            self.group.scheduler.connection_ended(host)
            host.bytes_in += self.bytes_in
            host.bytes_out += self.bytes_out
            if state is not STREAMING:
                host.total -= 1  # closed before the backend answered: not a served connection
        if self.splice_up is not None:
            self.splice_up.close()
        if self.splice_down is not None:
            self.splice_down.close()
        self.director.pair_closed(self, how)
        # Last: once the client sees its end, the counters (a worker's shared ones too) say so.
        self.client_sock.close()


class Splice(object):
    """The pipe one direction of a bulk Pair moves its bytes through with
    os.splice: socket -> pipe -> socket, never copied into Python.  It costs
    two fds and kernel memory, so a Pair takes one only after SPLICE_AFTER
    bytes, and at most MAX_PIPES exist at once (HAProxy's maxpipes).  The
    pipe keeps its default size (64 KiB on Linux) and one splice moves at
    most SPLICE_SIZE, so a direction holds no more than a plain one does."""
    __slots__ = ('r', 'w', 'pending')

    count = 0             # pipes open now

    def __init__(self, r, w):
        self.r = r
        self.w = w
        self.pending = 0      # bytes in the pipe not yet sent on

    @classmethod
    def open(cls):
        """A new pipe, or None when pipes or fds run short (the plain path carries on)."""
        if cls.count >= MAX_PIPES:
            return None
        try:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        Splice.count += 1
        return cls(r, w)

    def pull(self, pair, source, dest, upstream):
        """source is readable: move what it has into the pipe, then on to dest."""
        try:
            size = splice(source.fileno(), self.w, SPLICE_SIZE, flags=SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pair.abort(END_CLIENT_RESET if upstream else END_BACKEND_RESET)
            return
        if not size:
            pair._source_eof(upstream)
            return
        pair.last_active = pair.loop.now
        if upstream:
            pair.bytes_in += size
        else:
            pair.bytes_out += size
        self.pending = size
        self.push(pair, dest, upstream)

    def push(self, pair, dest, upstream):
        """Move what the pipe holds on to dest; as with a plain direction, pending bytes stop the source."""
        was_pending = pair._pending(upstream)
        try:
            sent = splice(self.r, dest.fileno(), self.pending, flags=SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            pair.abort(END_BACKEND_RESET if upstream else END_CLIENT_RESET)
            return
        self.pending -= sent
        pair._sent_all_or_wait(upstream, dest, was_pending)

    def close(self):
        os.close(self.r)
        os.close(self.w)
        Splice.count -= 1
# ---------------------------------------------------------------------------
# Datagrams: UDP services (<service protocol="udp">), on the same loop,
# schedulers, health checks and admin as TCP.
#
# A DatagramListener reads client datagrams.  Each client (its address, on
# one listen) has a Session, the UDP analogue of a Pair: it owns one socket
# connected to the host the scheduler picked, so that replies map back to
# the client and an ICMP error from the host surfaces (ECONNREFUSED).  A
# session ends after <udp responses> replies per request datagram (0: once
# its request is sent), when idle for <timeouts idle>, or when evicted from
# its service's bounded table (SessionTable, least recently used first).
# Nothing a flood of clients sends grows memory or fds past that table.
# ---------------------------------------------------------------------------

SOCK_DGRAM_NONBLOCK = socket.SOCK_DGRAM | SOCK_NONBLOCK
DATAGRAM_MAX = 65535       # the largest datagram read (one over IPv4 carries at most 65,507 bytes)
DATAGRAM_BATCH = 64        # datagrams a listener reads per readable event, so a flood cannot starve the rest
BATCH_STREAK = 4           # readable events that each find a whole batch before the listener reads twice as many
REPLY_BATCH = 16           # replies a session reads per readable event
KEEP_REQUEST = 1232        # bytes: a request up to this size is kept until its reply, to re-send it to
                           # another host after an ICMP error (DNS's EDNS size); a longer one is not
SWEEP_GRAIN = 0.05         # seconds: the idle sweep of a table runs at most this often
UDP_LOG_INTERVAL = 1.0     # seconds between a service's lines of one kind (evictions, drops, no host)
REUSEPORT = hasattr(socket, 'SO_REUSEPORT')
# What a connected UDP socket reports of an ICMP error: the host's port is closed, or it
# cannot be reached.  Each marks the host down, as a failed TCP connect does.
ICMP_ERRORS = frozenset([errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH,
                         getattr(errno, 'EHOSTDOWN', errno.EHOSTUNREACH)])

# One buffer for every datagram: the loop handles one at a time, and sends it on from
# here, never copied (but for the small copy KEEP_REQUEST allows).
_datagram = bytearray(DATAGRAM_MAX)
_datagram_view = memoryview(_datagram)


class DatagramListener(object):
    """The socket of one UDP listen address: the Listener of a UDP service.

    A single process reads its one socket.  A master holds one socket per
    worker (socks, bound with SO_REUSEPORT: the kernel hashes each client's
    addresses to one socket of the group, so all of a client's datagrams
    reach one worker and its session) and reads none; each worker reads the
    one of its slot, which outlives it: a restarted worker gets the same
    socket back, and the kernel's spread does not change.

    A readable event reads `batch` datagrams at most: one while they come one
    at a time, doubling (up to DATAGRAM_BATCH) after BATCH_STREAK events that
    each found a whole batch, and back to what one found when it ran dry.
    Reading until the socket is empty costs a failed read (and Python's
    exception) per event, which at a low rate is one per datagram."""

    sni = None              # as a TCP Listener without sni, to the code both serve
    accept_proxy = None

    def __init__(self, director, service, sock, listen):
        self.director = director
        self.loop = director.loop
        self.service = service
        self.sock = sock
        self.socks = [sock]
        self.fd = sock.fileno()
        self.batch = 1
        self.streak = 0
        self.configure(listen)
        self.registered = director.accept
        if self.registered:
            self.add_to_loop()
        self.widen(director.master.count if director.master is not None else director.udp_slots)

    def add_to_loop(self):
        self.loop.add(self.fd, EVENT_READ, self._on_readable)

    def __repr__(self):
        return '<DatagramListener %s>' % self.text

    def configure(self, listen, sni=None, hello_timeout=None):
        self.listen = listen
        self.text = listen.text

    def widen(self, count):
        """A master's: a socket per worker, each bound to the address in its
        SO_REUSEPORT group.  Without SO_REUSEPORT every worker reads the one socket
        (a client's datagrams may then reach several workers, a session in each)."""
        while REUSEPORT and len(self.socks) < count:
            self.socks.append(listen_socket(self.listen.host, self.listen.port, protocol='udp', reuseport=True))

    def socket_for(self, worker):
        """The socket worker number `worker` reads (from 1)."""
        return self.socks[worker - 1] if worker <= len(self.socks) else self.sock

    def _on_readable(self, mask):
        receive = self.sock.recvfrom_into
        table = self.service.udp
        sessions = table.sessions
        count = 0
        batch = self.batch
        try:
            for count in range(batch):
                try:
                    size, client = receive(_datagram)
                except (BlockingIOError, InterruptedError):
                    self.batch = count or 1
                    self.streak = 0
                    return
                except OSError as e:
                    log.debug('listen %s: %s', self.text, e)    # an error queued on the socket: it is read now
                    continue
                # SessionTable.datagram, written out: this is once a datagram.
                key = (client, self)
                session = sessions.get(key)
                if session is not None:
                    sessions.move_to_end(key)
                    session.forward(size)
                else:
                    table.open(key, self, size)
            count += 1
            self.streak += 1
            if self.streak >= BATCH_STREAK and batch < DATAGRAM_BATCH:
                self.batch = batch * 2
                self.streak = 0
        finally:
            self.service.datagrams_in += count

    def pause(self, err):
        """Out of fds: a TCP listener stops accepting; here sessions make room (SessionTable.evict)."""

    def close(self):
        if self.sock.fileno() < 0:
            return
        # Their replies would go out through this socket.
        self.director.end_sessions(lambda session: session.listener is self, END_SHUTDOWN)
        if self.registered:
            self.loop.remove(self.fd)   # not forget: in a worker the socket is the master's too
            self.registered = False
        for sock in self.socks:
            sock.close()

    close_on_error = close


class SessionTable(object):
    """A UDP service's sessions in this process, least recently used first.

    Keyed by (client address, listener).  A datagram either way moves its
    session to the end, so the idle sweep and eviction only ever look at the
    front: each costs what it ends, never a scan, and one timer serves the
    whole table.  At most `limit` (<udp sessions>) are held; a new client
    past it evicts the oldest.  What it counts goes into its RunningService
    (evicted, dropped, datagrams_in, datagrams_out: rows of COUNTERS)."""

    def __init__(self, director, service):
        self.director = director
        self.loop = director.loop
        self.service = service
        self.sessions = collections.OrderedDict()
        self.timer = None
        self.logged = {}            # kind -> [loop time of its last line, lines left out since]
        self.configure(service.config)

    def __repr__(self):
        return '<SessionTable %s: %d>' % (self.service.name, len(self.sessions))

    def configure(self, config):
        """The service's (new) <udp> settings; a smaller limit evicts at once, and the
        sweep is due by the (new) idle timeout, not the one it was armed for."""
        self.limit = config.udp.sessions
        self.responses = config.udp.responses
        while len(self.sessions) > self.limit:
            self.evict()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
            self.arm()

    def open(self, key, listener, size):
        """A new client: the service's rules, a place in the table, a host, then its datagram."""
        service = self.service
        director = self.director
        acl = service.config.acl
        if acl and not acl_allows(acl, key[0][0]):
            service.denied += 1
            return
        maxconns = service.config.maxconns
        service.open += 1
        counts = director.worker_counts
        if maxconns and (service.open > maxconns if counts is None else counts.service_full(service)):
            service.open -= 1
            service.refused += 1
            self.complain('full', '%d sessions open (maxconns): dropping the datagrams of new clients' % maxconns)
            return
        while len(self.sessions) >= self.limit and self.evict():
            pass
        session = Session(self, listener, key)
        problem = session.connect_next()
        if problem is not None:
            service.open -= 1
            service.refused += 1
            self.complain('no-host', problem)
            return
        service.accepted += 1
        if self.responses != 0:
            self.sessions[key] = session
            session.watch()
            if self.timer is None:
                self.arm()
        session.forward(size)

    def evict(self, spare=None):
        """End the least recently used session (but spare) to make room; False if there is none."""
        for session in self.sessions.values():
            if session is not spare:
                break
        else:
            return False
        self.service.evicted += 1
        self.complain('evicted', '%d sessions held (<udp sessions>): evicting the least recently used'
                      % len(self.sessions))
        session.close(END_EVICTED)
        return True

    def touch(self, session):
        session.last_active = self.loop.now
        self.sessions.move_to_end(session.key)

    def arm(self):
        """The one timer: when the least recently used session would be idle for long enough."""
        if self.sessions:
            oldest = next(iter(self.sessions.values()))
            due = oldest.last_active + self.service.timeouts.idle - self.loop.now
            self.timer = self.loop.call_later(max(due, SWEEP_GRAIN), self.sweep)

    def sweep(self):
        self.timer = None
        sessions = self.sessions
        since = self.loop.now - self.service.timeouts.idle
        while sessions:
            session = next(iter(sessions.values()))
            if session.last_active > since:
                break
            session.close(END_IDLE)
        self.arm()

    def drop(self, why):
        self.service.dropped += 1
        self.complain('dropped', 'dropped a datagram: %s' % why)

    def complain(self, kind, text):
        left_out = not_too_often(self.logged, kind, self.loop.now, UDP_LOG_INTERVAL)
        if left_out is not None:
            log.warning('service %s: %s%s', self.service.name, text, left_out_text(left_out))

    def close_all(self, how):
        for session in list(self.sessions.values()):
            session.close(how)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def snapshot(self):
        service = self.service
        return {'responses': self.responses, 'sessions_max': self.limit, 'evicted': service.evicted,
                'dropped': service.dropped, 'datagrams_in': service.datagrams_in,
                'datagrams_out': service.datagrams_out}


class Session(object):
    """One client of a UDP service (its address, on one listen) and the socket
    connected to its host, the UDP analogue of a Pair.

    Requests go out on that socket, replies come back on it and are sent to
    the client from the listen's socket.  owed counts the replies still due
    (<udp responses> per request); at 0 the session ends.  An ICMP error
    (ECONNREFUSED) marks the host down, and the request it refused (request,
    kept until a reply comes when at most KEEP_REQUEST bytes) goes once to
    another host.  closed: ended, its socket too."""
    __slots__ = ('table', 'service', 'group', 'listener', 'key', 'client_ip', 'client_port', 'host', 'sock',
                 'fd', 'tried', 'owed', 'request', 'started', 'last_active', 'datagrams_in', 'datagrams_out',
                 'bytes_in', 'bytes_out', 'closed')

    def __init__(self, table, listener, key):
        self.table = table
        self.service = table.service
        self.group = table.service.enabled
        self.listener = listener
        self.key = key
        self.client_ip, self.client_port = key[0][0], key[0][1]
        self.host = None
        self.sock = None
        self.fd = -1                # while watched
        self.tried = ()
        self.owed = 0
        self.request = None
        self.started = self.last_active = table.loop.now
        self.datagrams_in = self.datagrams_out = self.bytes_in = self.bytes_out = 0
        self.closed = False

    def __repr__(self):
        return '<Session %s in %s>' % (format_address(self.client_ip, self.client_port), self.service.name)

    def connect_next(self):
        """Connect a socket to the next host the scheduler offers (a UDP connect sends
        nothing: it fixes the peer, so that only its replies and errors come back).
        None once connected, else why not."""
        director = self.table.director
        scheduler = self.group.scheduler
        worker = director.worker
        while True:
            host = scheduler.pick(self.client_ip, self.tried) if worker is None else worker.pick(self, scheduler)
            if host is None:
                if self.tried:
                    return 'no host left after %d failed' % len(self.tried)
                return 'no host available in group %s: dropping the datagrams of new clients' % self.group.name
            if self.tried:
                self.service.failovers += 1
            self.tried += (host,)
            scheduler.connection_started(host)
            err = self._connect(host)
            if not err:
                return None
            self._forget_host(host)
            reason = error_text(err)
            if err in LOCAL_CONNECT_ERRORS:
                return 'cannot open a socket to host %s (%s): %s' % (host.name, host.ip, reason)
            director.connect_failed(self, host, reason)

    def _connect(self, host):
        address = host.address
        if address is None:     # a name the manager has not resolved yet
            return errno.EHOSTUNREACH
        for _ in range(2):
            try:
                sock = _socket.socket(address[0], SOCK_DGRAM_NONBLOCK)
                break
            except OSError as e:
                # Out of fds: the oldest session gives up its socket, once.
                if e.errno not in OUT_OF_FDS or not self.table.evict(spare=self):
                    return e.errno
        else:
            return errno.EMFILE
        if not SOCK_NONBLOCK:
            sock.setblocking(False)
        err = sock.connect_ex(address[1])
        if err:
            sock.close()
            return err
        self.sock = sock
        self.host = host
        return 0

    def _forget_host(self, host):
        """The host this session leaves (it refused, or could not be reached): not served by it."""
        self._drop_socket()
        self.group.scheduler.connection_ended(host)
        if not self.datagrams_out:
            host.total -= 1
        self.host = None
        if self.table.director.worker_counts is not None:
            self.table.director.worker_counts.publish((host,))

    def watch(self):
        self.fd = self.sock.fileno()
        self.table.loop.add(self.fd, EVENT_READ, self._on_readable)

    def forward(self, size):
        """A request datagram, the first `size` bytes of the shared buffer, to the host."""
        table = self.table
        self.datagrams_in += 1
        self.bytes_in += size
        self.last_active = table.loop.now
        data = _datagram_view[:size]
        try:
            self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            table.drop('the socket to host %s is full' % self.host.name)
            return
        except OSError as e:
            # ECONNREFUSED: an ICMP error that an earlier datagram met; unreachable() re-sends this one.
            self.request = bytes(data) if size <= KEEP_REQUEST else None
            self._failed(e)
            return
        responses = table.responses
        if responses == 0:
            self.close(END_RESPONSES)     # sent and forgotten
            return
        if responses is not None:
            self.owed += responses
        self.request = bytes(data) if size <= KEEP_REQUEST else None

    def _on_readable(self, mask):
        table = self.table
        receive = self.sock.recv_into
        send = self.listener.sock.sendto
        client = self.key[0]
        counted = table.responses is not None
        for _ in range(REPLY_BATCH):
            try:
                size = receive(_datagram)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self._failed(e)
                return
            self.datagrams_out += 1
            self.bytes_out += size
            self.service.datagrams_out += 1
            self.request = None
            try:
                send(_datagram_view[:size], client)
            except OSError as e:    # a full buffer, a client that cannot be reached: lost, as UDP may
                table.drop('to client %s: %s' % (format_address(self.client_ip, self.client_port),
                                                  oserror_text(e)))
            if counted:
                self.owed -= 1
                if self.owed <= 0:
                    self.close(END_RESPONSES)
                    return
        table.touch(self)

    def _failed(self, e):
        """A send or receive on the host's socket failed: an ICMP error (unreachable), or the end."""
        if e.errno in ICMP_ERRORS:
            self.unreachable(error_text(e.errno))
        else:
            self.table.drop('host %s: %s' % (self.host.name, oserror_text(e)))
            self.close(END_ERROR)

    def unreachable(self, reason):
        """An ICMP error came back (the host's port is closed: ECONNREFUSED): the host is
        down, and the request it refused goes once to another host, as a TCP client fails over."""
        host = self.host
        director = self.table.director
        request, self.request = self.request, None
        self._forget_host(host)
        director.connect_failed(self, host, reason)
        if request is None:
            self.close(END_ERROR)
            return
        problem = self.connect_next()
        if problem is not None:
            log.warning('client %s in %s: %s', format_address(self.client_ip, self.client_port),
                        self.service.name, problem)
            self.close(END_ERROR)
            return
        if self.table.sessions.get(self.key) is self:
            self.watch()
        try:
            self.sock.send(request)
        except OSError as e:
            self._failed(e)     # unreachable too: that host is down, and the request is not kept

    def _drop_socket(self):
        if self.sock is not None:
            if self.fd >= 0:
                self.table.loop.forget(self.fd)
                self.fd = -1
            self.sock.close()
            self.sock = None

    def close(self, how):
        if self.closed:
            return
        self.closed = True
        table = self.table
        if table.sessions.get(self.key) is self:
            del table.sessions[self.key]
        self._drop_socket()
        self.service.open -= 1
        host = self.host
        if host is not None:
            self.group.scheduler.connection_ended(host)
            host.bytes_in += self.bytes_in
            host.bytes_out += self.bytes_out
        table.director.session_closed(self, how)

    def close_on_error(self):
        self.close(END_ERROR)
# Client limits: a service's <clients maxconns rate burst mode>, per client
# address (nginx's limit_conn and limit_req, HAProxy's src_conn_cur and
# src_conn_rate).
#
# A ClientLimits per service keeps a bounded table: client key -> ClientEntry,
# its open connections and its rate's theoretical arrival time (GCRA: the
# token bucket as one number, refilled by arithmetic at each new connection,
# never by a timer).  admit(key, now) counts a new connection or says no;
# release(entry, now) counts it closed.  A key is the address text for IPv4
# and an int for IPv6, which counts per v6prefix (client_key).  An entry with
# no open connection and a full bucket is dropped: it holds nothing.  When
# the table is full, its entry idle longest is evicted, and counted.
#
# With workers, each worker also writes its entries into a ClientShare, a
# table in shared memory where every worker writes only its own row and
# reads the others' lines of a key, so the limits hold in total.  No lock: two
# workers admitting the same client at the same instant may both pass, one
# connection over the limit.
# ---------------------------------------------------------------------------

V4_MAPPED = b'\0' * 10 + b'\xff\xff'
CLIENT_SWEEP_MIN = 1024     # new entries before the first sweep of dropped-able entries


def client_key(ip, v6prefix=64):
    """The key a client address counts under: the IPv4 address text itself (an
    IPv4-mapped IPv6 address too), or for IPv6 an int holding its first v6prefix
    bits and v6prefix (so keys of two prefix lengths never meet)."""
    if ':' not in ip:
        return ip
    raw = socket.inet_pton(socket.AF_INET6, ip.partition('%')[0])
    if raw[:12] == V4_MAPPED:
        return socket.inet_ntoa(raw[12:])
    return (int.from_bytes(raw[:8], 'big') >> (64 - v6prefix)) << 7 | v6prefix


def client_key_text(key):
    """'192.0.2.7' or '2001:db8:1:2::/64': what a key stands for."""
    if isinstance(key, str):
        return key
    prefix = key & 127
    return '%s/%d' % (ipaddress.IPv6Address((key >> 7) << (128 - prefix)), prefix)


class ClientEntry(object):
    """One client's place in a ClientLimits table: its open connections and its
    rate's theoretical arrival time (loop seconds; the bucket is full once it is
    past).  With workers, where: (k1, k2, home) of its key in the ClientShare,
    and at: the offset of its line in this worker's row (-1: not there)."""
    __slots__ = ('key', 'open', 'tat', 'where', 'at')

    def __init__(self, key, where=None):
        self.key = key
        self.open = 0
        self.tat = 0.0
        self.where = where
        self.at = -1

    def __repr__(self):
        return '<ClientEntry %s open %d>' % (client_key_text(self.key), self.open)


class ClientLimits(object):
    """The per-client limits of one service (a <clients>): see the section's
    comment.  counts is the object whose limited, limited_dry and
    client_evictions it counts (the RunningService).  UDP sessions may count
    against it too: admit a key, release the entry."""

    def __init__(self, config, counts):
        self.table = collections.OrderedDict()     # key -> ClientEntry, idle longest first
        self.counts = counts
        self.share = None       # a worker's ClientShare, once its service has a slot
        self.k1 = 0             # the service's part of a shared key (its slot * 256)
        self.why = None         # of the last refusal: 'maxconns' or 'rate'
        self.inserts = 0        # new entries since the last sweep
        self.sweep_after = CLIENT_SWEEP_MIN
        self.configure(config)

    def configure(self, config):
        """Take (new) settings: a reload changes them in place, entries and all."""
        self.config = config
        self.maxconns = config.maxconns
        rate = config.rate or 0.0
        self.interval = 1.0 / rate if rate else 0.0
        self.burst = config.burst if config.burst is not None else max(1, int(math.ceil(rate)))
        # The bucket holds burst: a connection passes while its arrival time is at most
        # burst - 1 intervals ahead.  The margin absorbs the sums' rounding.
        self.tau = (self.burst - 1) * self.interval + self.interval * 1e-3
        self.enforce = config.mode == 'enforce'
        self.v6prefix = config.v6prefix
        self.size = config.table
        while len(self.table) > self.size:
            self.evict(time.monotonic())

    def key(self, ip):
        return client_key(ip, self.v6prefix)

    # -- the hot path -----------------------------------------------------------

    def admit(self, key, now):
        """A new connection of client `key`: its entry with the connection counted, or
        None when a limit refuses it (why says which; counted as limited, or in mode
        log as limited_dry: the caller lets it through then, uncounted)."""
        if self.share is not None:
            return self._admit_shared(key, now)
        table = self.table
        entry = table.get(key)
        if entry is None:
            # A new client passes (maxconns and burst are at least 1).
            if len(table) >= self.size or self.inserts >= self.sweep_after:
                self.make_room(now)
            self.inserts += 1
            entry = table[key] = ClientEntry(key)
            entry.open = 1
            if self.interval:
                entry.tat = now + self.interval
            return entry
        table.move_to_end(key)      # a client refused is not idle: its entry is kept longest
        if self.maxconns and entry.open >= self.maxconns:
            return self.refuse('maxconns')
        interval = self.interval
        if interval:
            tat = entry.tat
            if tat < now:
                tat = now
            elif tat - now > self.tau:
                return self.refuse('rate')
            entry.tat = tat + interval
        entry.open += 1
        return entry

    def take(self, key, now):
        """Count a connection that is open already, limits or not (a reload brought them)."""
        entry = self.table.get(key)
        if entry is None:
            if len(self.table) >= self.size:
                self.make_room(now)
            entry = self.table[key] = ClientEntry(key)
        entry.open += 1
        return entry

    def refuse(self, why):
        self.why = why
        if self.enforce:
            self.counts.limited += 1
        else:
            self.counts.limited_dry += 1
        return None

    def release(self, entry, now):
        """A connection admit counted has closed."""
        entry.open -= 1
        if entry.at >= 0:
            self.share.view[entry.at + 2] = entry.open
        if not entry.open and entry.tat <= now and self.table.get(entry.key) is entry:
            self.drop(entry)

    def _admit_shared(self, key, now):
        """admit, counting every worker's connections and arrivals of the key."""
        share = self.share
        table = self.table
        entry = table.get(key)
        if entry is None:
            where = share.where(self.k1, key)
            own, tat = 0, 0.0
        else:
            table.move_to_end(key)
            where, own, tat = entry.where, entry.open, entry.tat
        others, their_tat = share.others(where)
        if self.maxconns and own + others >= self.maxconns:
            return self.refuse('maxconns')
        interval = self.interval
        if interval:
            their_tat /= 1e6
            if their_tat > tat:
                tat = their_tat
            if tat < now:
                tat = now
            elif tat - now > self.tau:
                return self.refuse('rate')
            tat += interval
        if entry is None:
            if len(table) >= self.size or self.inserts >= self.sweep_after:
                self.make_room(now)
            self.inserts += 1
            entry = table[key] = ClientEntry(key, where)
            entry.open = 1
            entry.tat = tat
            share.publish(self, entry, now)
            return entry
        entry.open = own + 1
        entry.tat = tat
        at = entry.at
        if at >= 0:
            view = share.view
            view[at + 2] = own + 1
            view[at + 3] = int(tat * 1e6) or 1
        return entry

    # -- bounds -------------------------------------------------------------------

    def drop(self, entry):
        """Take an entry out of the table (its pairs, if any, keep it to release)."""
        del self.table[entry.key]
        if entry.at >= 0:
            self.share.remove(entry)

    def evict(self, now, entry=None):
        """Make room: the entry idle longest goes (or this one); counted if it held anything."""
        if entry is None:
            entry = self.table.popitem(last=False)[1]
        else:
            del self.table[entry.key]
        if entry.open or entry.tat > now:
            self.counts.client_evictions += 1
        if entry.at >= 0:
            self.share.remove(entry)

    def make_room(self, now):
        """Before a new entry: every so often drop the entries that hold nothing (after
        as many new entries as the table held at the last sweep: linear in all), and
        evict while the table is full."""
        table = self.table
        if self.inserts >= self.sweep_after:
            for entry in [e for e in table.values() if not e.open and e.tat <= now]:
                self.drop(entry)
            self.inserts = 0
            self.sweep_after = max(CLIENT_SWEEP_MIN, len(table))
        while len(table) >= self.size:
            self.evict(now)

    def attach(self, share, slot):
        """A worker's share and its service's slot there (None, None: none): the
        entries are written there anew when either changed."""
        k1 = slot * 256 if slot is not None else 0
        if share is self.share and k1 == self.k1:
            return
        self.detach()
        self.share, self.k1 = share, k1
        if share is not None:
            now = time.monotonic()
            for entry in list(self.table.values()):
                entry.where = share.where(k1, entry.key)
                share.publish(self, entry, now)

    def detach(self):
        share = self.share
        if share is not None:
            for entry in self.table.values():
                if entry.at >= 0:
                    share.remove(entry)
        self.share = None
        self.k1 = 0

    # -- what the pages show ---------------------------------------------------

    def state(self, key, now, others=(0, 0.0)):
        """[open, new connections it may open now, the limit that refuses it now or None];
        others: (open, arrival time) of the other workers."""
        entry = self.table.get(key)
        open_ = (entry.open if entry is not None else 0) + others[0]
        tat = max(entry.tat if entry is not None else 0.0, others[1])
        left = None
        if self.interval:
            ahead = max(tat - now, 0.0)
            left = 0 if ahead > self.tau else int((self.tau - ahead) / self.interval) + 1
        why = None
        if self.maxconns and open_ >= self.maxconns:
            why = 'maxconns'
        elif left == 0:
            why = 'rate'
        return [open_, left, why]

    def top(self, count=10):
        """[[client, open]] of the clients with the most open connections."""
        busiest = heapq.nlargest(count, (e for e in self.table.values() if e.open), key=operator.attrgetter('open'))
        return [[client_key_text(e.key), e.open] for e in busiest]

    def settings_text(self):
        parts = []
        if self.maxconns:
            parts.append('maxconns %d' % self.maxconns)
        if self.interval:
            parts.append('rate %s/s burst %d' % (value_text(self.config.rate), self.burst))
        return ', '.join(parts)

    def refusal_text(self, why):
        if why == 'maxconns':
            return '%d connections open (clients maxconns %d)' % (self.maxconns, self.maxconns)
        return 'over %s new connections a second (clients rate %s, burst %d)' % (
            value_text(self.config.rate), value_text(self.config.rate), self.burst)


CLIENT_WINDOW = 8           # index places a key may take after its home (linear probing)
CLIENT_LINES = 1 << 18      # client entries a worker may have in the share


class ClientShare(object):
    """The client entries of every worker, in shared memory (a file each process
    maps, like SharedCounters), so the limits hold in total.

    Each worker has a row and writes only that row; the master reads them all.
    A row is a header line [lines used], an index of 2 * CLIENT_LINES places and
    CLIENT_LINES lines [k1, k2, open, arrival time in µs of the monotonic clock,
    which every process shares (1: none, as the entry is live)].  A key's
    (k1, k2) is (its service's slot * 256 + its IPv6 prefix length or 0 for
    IPv4, the address or prefix as an int64): exact, never a hash.  Its home is
    a hash of that; its index place is the first free one of CLIENT_WINDOW from
    home, holding line + 1 (0: never used, so a reader stops there; -1: freed).
    Readers take what they find: a line changing under them reads as another
    key's or as nothing.  The file is sparse: only what is used takes memory.
    """

    def __init__(self, fd, rows, row, lines=CLIENT_LINES):
        import mmap
        self.fd = fd
        self.rows = rows
        self.row = row
        self.lines = lines
        self.places = 2 * lines
        self.bits = self.places.bit_length() - 1
        self.index = 4                                  # offsets within a row
        self.first_line = 4 + self.places + CLIENT_WINDOW
        self.row_size = self.first_line + 4 * lines
        self.memory = mmap.mmap(fd, rows * self.row_size * 8)
        self.view = memoryview(self.memory).cast('q')
        self.base = row * self.row_size if row is not None else None
        self.other_rows = [r * self.row_size for r in range(rows) if r != row]
        self.free = []          # this worker's lines freed, to take again
        self.used = 0           # lines taken from the top so far
        self.holders = {}       # line offset -> (ClientLimits, ClientEntry) of this worker's lines

    @classmethod
    def create(cls, rows, lines=CLIENT_LINES):
        """A new file for `rows` workers (the master's, which has no row)."""
        if hasattr(os, 'memfd_create'):
            fd = os.memfd_create('pydirector-clients')
        else:
            fd, path = tempfile.mkstemp(prefix='pydirector-clients-')
            os.unlink(path)
        os.ftruncate(fd, rows * (4 + 2 * lines + CLIENT_WINDOW + 4 * lines) * 8)
        return cls(fd, rows, None, lines)

    def where(self, k1, key):
        """(k1, k2, home offset in a row) of a key of the service whose part is k1."""
        if isinstance(key, str):
            k2 = int.from_bytes(socket.inet_aton(key), 'big')
        else:
            k1 += key & 127
            k2 = key >> 7
            if k2 >> 63:
                k2 -= 1 << 64
        home = ((k2 ^ (k1 << 40)) * 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF) >> (64 - self.bits)
        return k1, k2, self.index + home

    def others(self, where, rows=None):
        """(open connections, latest arrival time in µs) of a key in the other workers' rows
        (rows: these row offsets instead)."""
        k1, k2, home = where
        view = self.view
        first = self.first_line - 4
        open_ = tat = 0
        for base in self.other_rows if rows is None else rows:
            place = base + home
            end = place + CLIENT_WINDOW
            while place < end:
                line = view[place]
                if line > 0:
                    at = base + first + 4 * line
                    if view[at] == k1 and view[at + 1] == k2:
                        open_ += view[at + 2]
                        if view[at + 3] > tat:
                            tat = view[at + 3]
                        break
                elif not line:
                    break
                place += 1
        return open_, tat

    def publish(self, limits, entry, now):
        """Give an entry of this worker a line and an index place.  With no place free
        in its window, the entry idle longest of those there is evicted; with no line
        free (more clients than CLIENT_LINES), the limits' own idle longest."""
        view = self.view
        k1, k2, home = entry.where
        place = self._free_place(home)
        if place is None:
            victims = [self.holders[self._line_offset(view[self.base + at])]
                       for at in range(home, home + CLIENT_WINDOW)]
            owner, victim = min(victims, key=lambda v: (v[1].open, v[1].tat))
            owner.evict(now, victim)
            place = self._free_place(home)
        if self.free:
            number = self.free.pop()
        elif self.used < self.lines:
            number = self.used
            self.used += 1
            view[self.base] = self.used
        else:
            for other in list(limits.table.values()):
                if other.at >= 0:
                    limits.evict(now, other)
                    break
            if not self.free:
                return      # every line is another service's: this one counts here only
            number = self.free.pop()
        at = self.base + self.first_line + 4 * number
        view[at] = k1
        view[at + 1] = k2
        view[at + 2] = entry.open
        view[at + 3] = int(entry.tat * 1e6) or 1
        view[self.base + place] = number + 1
        entry.at = at
        self.holders[at] = (limits, entry)

    def _free_place(self, home):
        view = self.view
        base = self.base
        for place in range(home, home + CLIENT_WINDOW):
            if view[base + place] <= 0:
                return place
        return None

    def _line_offset(self, value):
        return self.base + self.first_line + 4 * (value - 1)

    def remove(self, entry):
        """Free an entry's line and index place."""
        at = entry.at
        entry.at = -1
        del self.holders[at]
        view = self.view
        base = self.base
        number = (at - base - self.first_line) // 4
        view[at:at + 4] = _ZERO_CLIENT_LINE
        self.free.append(number)
        k1, k2, home = entry.where
        value = number + 1
        for place in range(base + home, base + home + CLIENT_WINDOW):
            if view[place] == value:
                break
        else:
            return
        # Freed: -1, which a reader passes over; or 0, never used, which ends its search,
        # when the place after is 0 too (and so are the freed places before it).
        if place + 1 < base + self.first_line and view[place + 1] != 0:
            view[place] = -1
            return
        view[place] = 0
        place -= 1
        while place >= base + self.index and view[place] == -1:
            view[place] = 0
            place -= 1

    def clear_row(self, row):
        """The master: a worker has gone, and so have its connections."""
        base = row * self.row_size
        used = self.view[base]
        self.view[base:base + self.first_line] = memoryview(bytes(self.first_line * 8)).cast('q')
        if used:
            start = base + self.first_line
            self.view[start:start + 4 * used] = memoryview(bytes(32 * used)).cast('q')

    def totals(self, slot):
        """{(k1, k2): [open, latest arrival µs]} of one service's keys over every row (the master)."""
        view = self.view
        found = {}
        for row in range(self.rows):
            base = row * self.row_size
            start = base + self.first_line
            used = view[base]
            tats = view[start + 3:start + 4 * used:4].tolist()
            for number in itertools.compress(range(used), tats):
                at = start + 4 * number
                k1 = view[at]
                if k1 >> 8 != slot:
                    continue
                key = (k1, view[at + 1])
                total = found.get(key)
                if total is None:
                    total = found[key] = [0, 0]
                total[0] += view[at + 2]
                total[1] = max(total[1], view[at + 3])
        return found

    def close(self):
        if self.view is not None:
            self.view.release()
            self.memory.close()
            self.view = None
            os.close(self.fd)


_ZERO_CLIENT_LINE = memoryview(bytes(32)).cast('q')


def shared_key_text(k1, k2):
    """A ClientShare key as client_key_text shows it."""
    prefix = k1 & 255
    if not prefix:
        return socket.inet_ntoa(k2.to_bytes(4, 'big'))
    return client_key_text((k2 % (1 << 64)) << 7 | prefix)


# ---------------------------------------------------------------------------
# Manager: the health checks.  A loop timer picks the probes due; threads run
# them with blocking sockets and hand each result to the loop, never touching
# balancer state themselves.  The DNS queries of <discover> (Discovery) run in
# the same threads.
# ---------------------------------------------------------------------------

MANAGER_TICK = 0.1        # how often the manager looks for hosts due a probe
PROBE_WORKERS = 8         # probes run in parallel so one blackholed host can't delay the rest
PROBE_READ_LIMIT = 16384  # bytes of an answer a probe reads at most, whatever the host sends
_HTTP_STATUS = re.compile(rb'HTTP/[0-9]\.[0-9] ([0-9]{3})(?:[ \r\n]|\Z)')


def judge_answer(data, status, expect, complete):
    """The verdict on what a probed host answered so far: (ok, reason), or None
    while more bytes could change it.  status: ranges of HTTP status codes the
    answer's first line must carry; expect: bytes it must contain.  complete:
    the host closed, or PROBE_READ_LIMIT bytes came: decide now."""
    found = []
    if status:
        end = data.find(b'\n')
        if end < 0 and not complete and len(data) < 512:
            if not b'HTTP/'.startswith(bytes(data[:5])):
                return False, 'not an HTTP answer: %r' % bytes(data[:40])
            return None
        match = _HTTP_STATUS.match(data)
        if match is None:
            return False, 'not an HTTP answer: %r' % bytes(data[:40])
        code = int(match.group(1))
        if not any(low <= code <= high for low, high in status):
            return False, 'status %d, not %s' % (code, status_text(status))
        found.append('status %d' % code)
    if expect:
        if expect not in data:
            if not complete:
                return None
            if len(data) >= PROBE_READ_LIMIT:
                return False, '%r not in the first %d bytes' % (expect, PROBE_READ_LIMIT)
            return False, 'expected %r, got %r' % (expect, bytes(data[:60]))
        found.append('found %r' % expect)
    return True, 'probe ok' + (' (%s)' % ', '.join(found) if found else '')


def probe(host, port, timeout, send=None, expect=None, status=None, check_port=None, protocol='tcp',
          dns=None):
    """Connect (and send, then check the answer) once.  Returns (ok, reason,
    address); ok is None when our side ran out of something (fds, ports): no
    verdict on the host.  At most PROBE_READ_LIMIT bytes are read, and reading
    stops as soon as the answer decides, so a host streaming junk costs little.
    check_port: probe that port on the host's address instead (address is still
    the host's, with its own port: what clients connect to).  dns: a name, to
    send a query for it instead of send and judge the answer (judge_dns).
    protocol 'udp': see probe_datagram."""
    deadline = time.monotonic() + timeout
    udp = protocol == 'udp'
    kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
    try:
        infos = socket.getaddrinfo(host, port, 0, kind)
    except (socket.gaierror, UnicodeError) as e:
        return False, 'cannot resolve %s: %s' % (host, e), None
    family, _, _, _, sockaddr = infos[0]
    address = (family, sockaddr)
    if check_port:
        sockaddr = (sockaddr[0], check_port) + tuple(sockaddr[2:])
    judge = waiting_for = None
    if dns:
        query_id, qname = _query_ids.getrandbits(16), dns_name(dns)
        query = dns_query(query_id, qname, DNS_A, edns=False)
        send = query if udp else struct.pack('!H', len(query)) + query    # RFC 1035 4.2.2: length first over TCP
        judge = functools.partial(judge_dns, query_id=query_id, qname=qname, framed=not udp)
        waiting_for = 'the DNS answer'
    elif expect or status:
        judge = functools.partial(judge_answer, status=status, expect=expect)
    try:
        sock = socket.socket(family, kind)
    except OSError as e:
        return None, oserror_text(e), address
    try:
        sock.settimeout(timeout)
        if udp:
            return probe_datagram(sock, sockaddr, deadline, timeout, send, judge) + (address,)
        try:
            sock.connect(sockaddr)
        except socket.timeout:
            return False, 'connect timeout', address
        except OSError as e:
            return (None if e.errno in LOCAL_CONNECT_ERRORS else False), oserror_text(e), address
        try:
            if send:
                sock.sendall(send)
            if judge is None:
                return True, 'probe ok', address
            got = bytearray()
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout
                sock.settimeout(left)
                chunk = sock.recv(min(4096, PROBE_READ_LIMIT - len(got)))
                got += chunk
                verdict = judge(got, complete=not chunk or len(got) >= PROBE_READ_LIMIT)
                if verdict is not None:
                    return verdict + (address,)
        except socket.timeout:
            return False, 'timeout waiting for %s' % (waiting_for or (
                'the status line' if status and b'\n' not in got else repr(expect))), address
        except OSError as e:
            return False, oserror_text(e), address
    finally:
        sock.close()


UDP_PROBE_SILENCE = 0.5   # seconds a UDP probe with nothing to ask waits for an ICMP error


def probe_datagram(sock, sockaddr, deadline, timeout, send, judge):
    """A UDP probe on sock: (ok, reason).  With something to send (send, a DNS query)
    it waits for an answer, which judge (if any) decides; without, it sends an empty
    datagram, and only an ICMP error (a closed port: ECONNREFUSED) within
    UDP_PROBE_SILENCE says down, since a UDP service need not answer at all."""
    try:
        sock.connect(sockaddr)
        sock.send(send or b'')
        if not send:
            sock.settimeout(min(timeout, UDP_PROBE_SILENCE))
            try:
                sock.recv(1)
            except socket.timeout:
                return True, 'probe ok (no ICMP error)'
            return True, 'probe ok (answered)'
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout
            sock.settimeout(left)
            data = sock.recv(DATAGRAM_MAX)
            if judge is None:
                return True, 'probe ok (answered)'
            verdict = judge(data, complete=True)    # a datagram is a whole answer
            if verdict is not None:
                return verdict
    except socket.timeout:
        return False, 'no answer within %g s' % timeout
    except OSError as e:
        return (None if e.errno in LOCAL_CONNECT_ERRORS else False), oserror_text(e)


# Looked up now: concurrent.futures imports it at first use, which fails (a dead
# manager, no more probes) when the process has just run out of file descriptors.
ThreadPoolExecutor = concurrent.futures.ThreadPoolExecutor


class Manager(object):
    """Runs the probes the director says are due and hands each result back to the loop;
    starts and stops the Discovery, whose queries run in the same pool (submit).

    The tick that asks which hosts are due is a loop timer; only the probes
    themselves run in threads, in a pool started at the first probe.  A
    balancer with nothing to probe runs no thread at all, which on Python 3.6
    (its GIL is made at the first thread) spares every blocking call a lock.
    """

    def __init__(self, director):
        self.director = director
        self.stopped = threading.Event()
        self.pool = None
        self.timer = None

    def start(self):
        self.timer = self.director.loop.call_later(MANAGER_TICK, self.tick)
        self.director.discovery.start()

    def tick(self):
        self.timer = self.director.loop.call_later(MANAGER_TICK, self.tick)
        for target in self.director.health.due():
            if not self.submit(self._probe, target):
                return

    def submit(self, fn, *args):
        """Run fn(*args) in the pool (a probe, a DNS query); False once that cannot be."""
        if self.stopped.is_set():
            return False
        if self.pool is None:
            self.pool = ThreadPoolExecutor(PROBE_WORKERS)
        try:
            # The pool starts its threads in submit: they leave signals to the main thread.
            # (Not 3.7's initializer: 3.6 has none, and blocking in a job missed the
            # threads 3.6 starts that never get one, so an upgrade lost a SIGTERM.)
            signals_blocked(self.pool.submit, fn, *args)
        except RuntimeError:    # the interpreter is exiting under us: so are we
            self.stop()
            return False
        return True

    def _probe(self, target):
        if self.stopped.is_set():
            return
        token, host, port, check, protocol = target
        began = time.monotonic()
        try:
            ok, reason, address = probe(host, port, check.timeout, check.send, check.expect, check.status,
                                        check.port, protocol, check.dns)
        except Exception as e:  # a bug here must not kill probing for good
            log.exception('probe of %s:%s failed unexpectedly', host, port)
            ok, reason, address = False, 'probe error: %s' % e, None
        self.director.loop.call_soon_threadsafe(self.director.health.result, token, ok, reason, address,
                                                time.monotonic() - began)

    def after_fork(self):
        """In an upgrade's old generation, forked by the loop thread: the pool's threads
        stayed in the parent, with what they were probing or asking, which is asked again;
        a pool is started afresh at the next probe."""
        self.pool = None
        stopped, self.stopped = self.stopped, threading.Event()
        if stopped.is_set():
            self.stopped.set()
        self.director.health.probes_lost()
        discovery = self.director.discovery
        if discovery.asking:
            discovery.stop()
            discovery.start()

    def stop(self):
        # Probes out finish in their threads (each within its check's timeout); their
        # results reach a loop that has stopped listening, and are dropped.
        self.stopped.set()
        self.director.discovery.stop()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.pool is not None:
            self.pool.shutdown(wait=False)


# ---------------------------------------------------------------------------
# DNS: a small stub resolver for <discover> (hosts from DNS), and the query
# and verdict of a <check dns> (judge_dns), speaking the wire format itself:
# RFC 1035, EDNS0 (RFC 6891), SRV (RFC 2782).  It blocks, with deadlines, so
# it runs in the manager's threads, never on the loop (Discovery, in the
# Director section, applies what it finds).  Each query has
# a random ID and a socket of its own (so a random source port too); a
# datagram counts as the answer only when its ID and question are the query's.
# Whatever a datagram holds, malformed or not ours, it is ignored with a
# reason, never raised; an answer marked truncated is asked again over TCP.
# ---------------------------------------------------------------------------

DNS_A, DNS_CNAME, DNS_AAAA, DNS_SRV, DNS_OPT = 1, 5, 28, 33, 41
DNS_IN = 1
DNS_TYPES = {DNS_A: 'A', DNS_CNAME: 'CNAME', DNS_AAAA: 'AAAA', DNS_SRV: 'SRV'}
# rcode -> (name, how a failure of that kind is counted)
DNS_RCODES = {1: ('FORMERR', 'error'), 2: ('SERVFAIL', 'servfail'), 3: ('NXDOMAIN', 'nxdomain'),
              4: ('NOTIMP', 'error'), 5: ('REFUSED', 'error')}
DNS_FAILURES = ('timeout', 'refused', 'servfail', 'nxdomain', 'empty', 'error')     # the kinds, for pages
DNS_PAYLOAD = 4096          # the UDP answer size EDNS0 offers the server
DNS_TIMEOUT = 2.0           # seconds one query waits for its answer
DNS_DEADLINE = 10.0         # seconds one discovery may take in all (an SRV answer's targets too)
MAX_DISCOVERED = 1000       # hosts from DNS a group holds at most; more are left out, and logged
RESOLV_CONF = '/etc/resolv.conf'
_HEADER = struct.Struct('!HHHHHH')
_RR_FIXED = struct.Struct('!HHIH')
_query_ids = random.SystemRandom()


class DnsError(Exception):
    """A query that got no usable answer, or a message that cannot be read:
    str() is the reason, kind how it is counted (one of DNS_FAILURES)."""

    def __init__(self, reason, kind='error'):
        Exception.__init__(self, reason)
        self.kind = kind


class DnsRecord(object):
    """A resource record: name (wire form, uncompressed), type, ttl, and value:
    the address text (A, AAAA), the target name (CNAME), (priority, weight,
    port, target) (SRV), or None for a type not read."""
    __slots__ = ('name', 'type', 'ttl', 'value')

    def __init__(self, name, rtype, ttl, value):
        self.name = name
        self.type = rtype
        self.ttl = ttl
        self.value = value


class DnsMessage(object):
    """A parsed DNS message.  question: (name, type, class) when there is exactly
    one, else None; records: the answer section, extra: the additional one."""
    __slots__ = ('id', 'flags', 'question', 'records', 'extra')

    @property
    def rcode(self):
        return self.flags & 0xF

    @property
    def truncated(self):
        return bool(self.flags & 0x0200)


def dns_name(text):
    """A name as written ('web.example.com', a trailing dot or not) in wire form;
    ValueError when it cannot be one."""
    out = bytearray()
    stripped = text.rstrip('.')
    for label in stripped.split('.') if stripped else ():
        raw = label.encode('ascii')
        if not 0 < len(raw) <= 63:
            raise ValueError('%r: a label of %d characters' % (text, len(raw)))
        out.append(len(raw))
        out += raw
    out.append(0)
    if len(out) > 255:
        raise ValueError('%r: longer than 255 octets' % text)
    return bytes(out).lower()     # as read_dns_name gives names, to compare


def dns_name_text(wire):
    """A wire-form name as text, for pages and logs: 'one.example', '.' for the root;
    bytes other than printable ASCII escaped."""
    labels = []
    at = 0
    while wire[at]:
        size = wire[at]
        labels.append(escape_text(wire[at + 1:at + 1 + size].decode('ascii', 'backslashreplace')))
        at += 1 + size
    return '.'.join(labels) or '.'


def dns_query(query_id, qname, qtype, edns=True):
    """A query message: recursion desired, one question, and an EDNS0 OPT record
    offering DNS_PAYLOAD bytes (edns False: without it, for a server that
    answers FORMERR to it)."""
    header = _HEADER.pack(query_id, 0x0100, 1, 0, 0, 1 if edns else 0)
    opt = b'\0' + _RR_FIXED.pack(DNS_OPT, DNS_PAYLOAD, 0, 0) if edns else b''
    return header + qname + struct.pack('!HH', qtype, DNS_IN) + opt


def read_dns_name(data, at):
    """(name in wire form, lower-cased, uncompressed; offset after it) of the name
    at offset at, following compression pointers.  A pointer must point before the
    labels it ends, so each jump goes back and no message can make it loop.
    DnsError for a name running past the end, a reserved label type, or one
    longer than 255 octets."""
    out = bytearray()
    end = None
    start = at
    while True:
        if at >= len(data):
            raise DnsError('a name runs past the end of the message')
        size = data[at]
        if size >= 0xC0:
            if at + 1 >= len(data):
                raise DnsError('a name runs past the end of the message')
            target = (size & 0x3F) << 8 | data[at + 1]
            if target >= start:
                raise DnsError('a compression pointer that does not point back')
            if end is None:
                end = at + 2
            at = start = target
            continue
        if size > 63:
            raise DnsError('a label of a reserved type (0x%02x)' % size)
        if at + 1 + size > len(data):
            raise DnsError('a name runs past the end of the message')
        out += data[at:at + 1 + size]
        at += 1 + size
        if len(out) > 255:
            raise DnsError('a name longer than 255 octets')
        if size == 0:
            return bytes(out).lower(), at if end is None else end


def _read_record(data, at):
    name, at = read_dns_name(data, at)
    if at + 10 > len(data):
        raise DnsError('a record runs past the end of the message')
    rtype, rclass, ttl, size = _RR_FIXED.unpack_from(data, at)
    at += 10
    end = at + size
    if end > len(data):
        raise DnsError('a record runs past the end of the message')
    value = None
    if rclass == DNS_IN and rtype in DNS_TYPES:
        what = DNS_TYPES[rtype]
        if rtype == DNS_A or rtype == DNS_AAAA:
            if size != (4 if rtype == DNS_A else 16):
                raise DnsError('an %s record of %d bytes' % (what, size))
            value = str(ipaddress.ip_address(bytes(data[at:end])))
        else:
            fixed = 6 if rtype == DNS_SRV else 0
            if size < fixed + 1:
                raise DnsError('a %s record of %d bytes' % (what, size))
            target, after = read_dns_name(data, at + fixed)
            if after != end:
                raise DnsError('a %s record whose name does not fill it' % what)
            value = struct.unpack_from('!HHH', data, at) + (target,) if fixed else target
    # RFC 2181 8: a TTL with the top bit set is read as zero.
    return DnsRecord(name, rtype, ttl if ttl < 0x80000000 else 0, value), end


def parse_dns_message(data, records=True):
    """A DnsMessage from bytes; records False reads the header and question only
    (a truncated answer's records may be cut short).  DnsError for anything that
    cannot be read: counts larger than the message, records past its end, names
    that loop... (each record takes at least 11 bytes, so a count costs at most
    what the message's length allows)."""
    if len(data) < 12:
        raise DnsError('shorter than a DNS header')
    message = DnsMessage()
    message.id, message.flags, questions, answers, authority, additional = _HEADER.unpack_from(data)
    at = 12
    message.question = None
    message.records = message.extra = ()
    for _ in range(questions):
        name, at = read_dns_name(data, at)
        if at + 4 > len(data):
            raise DnsError('a question runs past the end of the message')
        qtype, qclass = struct.unpack_from('!HH', data, at)
        at += 4
        message.question = (name, qtype, qclass) if questions == 1 else None
    if not records:
        return message
    sections = []
    for count in (answers, authority, additional):
        section = []
        for _ in range(count):
            record, at = _read_record(data, at)
            section.append(record)
        sections.append(section)
    message.records, _, message.extra = sections
    return message


def dns_problem(message, query_id, qname, qtype):
    """Why a message is not the answer to our query (None: it is)."""
    if message.id != query_id:
        return 'wrong ID'
    if not message.flags & 0x8000:
        return 'not a response'
    if message.flags & 0x7800:
        return 'not a standard query (opcode %d)' % (message.flags >> 11 & 0xF)
    if message.question != (qname, qtype, DNS_IN):
        return 'a question not ours'
    return None


def judge_dns(data, query_id, qname, framed, complete):
    """A health check's verdict (<check dns>) on what answered its query for qname's A
    records: (ok, reason), or None while more may come.  It must be the answer to the
    query (dns_problem) and say NOERROR.  framed: over TCP, after its 2-byte length.
    Over UDP a datagram with another ID is not ours (a late answer to an earlier
    probe): None, wait for ours."""
    if framed:
        size = struct.unpack_from('!H', data)[0] if len(data) >= 2 else None
        if size is None or len(data) < 2 + size:
            return (False, 'a DNS answer cut short (%d bytes)' % len(data)) if complete else None
        data = data[2:2 + size]
    try:
        message = parse_dns_message(data, records=False)
    except DnsError as e:
        return False, 'not a DNS answer: %s' % e
    problem = dns_problem(message, query_id, qname, DNS_A)
    if problem == 'wrong ID' and not framed:
        return None
    if problem is not None:
        return False, 'not the DNS answer: %s' % problem
    if message.rcode:
        return False, 'DNS answer %s' % DNS_RCODES.get(message.rcode, ('rcode %d' % message.rcode,))[0]
    return True, 'probe ok (DNS NOERROR, %d answer record(s))' % _HEADER.unpack_from(data)[3]


def default_resolver(path=RESOLV_CONF):
    """(ip, 53) of the first nameserver in resolv.conf; 127.0.0.1 when it names
    none, as the C library does."""
    try:
        with open(path, 'rb') as f:
            lines = f.read(65536).decode('ascii', 'replace').splitlines()
    except OSError:
        lines = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 2 and fields[0] == 'nameserver' and _is_ip(fields[1]):
            return fields[1], 53
    return '127.0.0.1', 53


class DnsClient(object):
    """Queries to one server (ip, port) until a deadline (time.monotonic()), each
    within timeout.  ignored: the reason for each datagram that was not our
    answer; tcp: the answers that came over TCP."""

    def __init__(self, server, deadline, timeout=DNS_TIMEOUT):
        infos = socket.getaddrinfo(server[0], server[1], 0, socket.SOCK_DGRAM, 0, socket.AI_NUMERICHOST)
        self.family, self.sockaddr = infos[0][0], infos[0][4]
        self.where = format_address(server[0], server[1])
        self.deadline = deadline
        self.timeout = timeout
        self.ignored = []
        self.tcp = 0

    def ask(self, qname, qtype):
        """The answer (DnsMessage, records read) to qname's records of qtype: over UDP,
        then over TCP when truncated, and again without EDNS0 after a FORMERR.
        DnsError when none comes in time."""
        edns = True
        while True:
            query_id = _query_ids.getrandbits(16)
            query = dns_query(query_id, qname, qtype, edns)
            message = self._udp(query, query_id, qname, qtype)
            if message.truncated:
                self.tcp += 1
                message = self._tcp(query, query_id, qname, qtype)
            if message.rcode == 1 and edns:
                edns = False        # RFC 6891 7: a server that does not know EDNS0
                continue
            return message

    def _time_left(self, until):
        left = min(until, self.deadline) - time.monotonic()
        if left <= 0:
            raise DnsError('no answer from %s within %g s' % (self.where, self.timeout), 'timeout')
        return left

    def _failed(self, error):
        if isinstance(error, socket.timeout):
            return DnsError('no answer from %s within %g s' % (self.where, self.timeout), 'timeout')
        if isinstance(error, ConnectionRefusedError):
            return DnsError('%s refused the query (nothing listens there)' % self.where, 'refused')
        return DnsError('%s: %s' % (self.where, error_text(error.errno) if error.errno else error))

    def _udp(self, query, query_id, qname, qtype):
        until = time.monotonic() + self.timeout
        sock = socket.socket(self.family, socket.SOCK_DGRAM)
        try:
            # Connected: only the server's datagrams arrive, and its port's ICMP error too.
            sock.connect(self.sockaddr)
            sock.send(query)
            while True:
                sock.settimeout(self._time_left(until))
                data = sock.recv(65535)
                try:
                    message = parse_dns_message(data, records=False)
                    problem = dns_problem(message, query_id, qname, qtype)
                    if problem is None and not message.truncated:
                        message = parse_dns_message(data)
                except DnsError as e:
                    problem = 'malformed: %s' % e
                if problem is None:
                    return message
                self.ignored.append('%s from %s' % (problem, self.where))
        except OSError as e:
            raise self._failed(e) from None
        finally:
            sock.close()

    def _tcp(self, query, query_id, qname, qtype):
        until = time.monotonic() + self.timeout
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            sock.settimeout(self._time_left(until))
            sock.connect(self.sockaddr)
            sock.sendall(struct.pack('!H', len(query)) + query)
            size = struct.unpack('!H', self._read(sock, 2, until))[0]
            data = self._read(sock, size, until)
        except OSError as e:
            raise self._failed(e) from None
        finally:
            sock.close()
        try:
            message = parse_dns_message(data)
        except DnsError as e:
            raise DnsError('a malformed answer over TCP from %s: %s' % (self.where, e)) from None
        problem = dns_problem(message, query_id, qname, qtype)
        if problem is not None:
            raise DnsError('an answer over TCP from %s with %s' % (self.where, problem))
        return message

    def _read(self, sock, size, until):
        data = bytearray()
        while len(data) < size:
            sock.settimeout(self._time_left(until))
            chunk = sock.recv(size - len(data))
            if not chunk:
                raise DnsError('%s closed the TCP connection mid-answer' % self.where)
            data += chunk
        return bytes(data)

    def answers(self, qname, qtype):
        """(the records of qtype that answer qname, following the answer's CNAMEs;
        the least TTL of those and of the CNAMEs followed, None without records;
        the message).  An error rcode (NXDOMAIN too) is a DnsError."""
        message = self.ask(qname, qtype)
        if message.rcode:
            name, kind = DNS_RCODES.get(message.rcode, ('rcode %d' % message.rcode, 'error'))
            raise DnsError('%s for %s %s from %s' % (name, dns_name_text(qname), DNS_TYPES[qtype], self.where),
                           kind)
        aliases = {}
        for record in message.records:
            if record.type == DNS_CNAME and record.value is not None:
                aliases.setdefault(record.name, record)
        name, ttls = qname, []
        for _ in range(len(aliases)):
            alias = aliases.get(name)
            if alias is None:
                break
            ttls.append(alias.ttl)
            name = alias.value
        found = [record for record in message.records if record.type == qtype and record.name == name
                 and record.value is not None]
        ttls.extend(record.ttl for record in found)
        return found, min(ttls) if found else None, message

    def addresses(self, qname):
        """([address text], ttl) of qname's A and AAAA records; DnsError when it has none."""
        found, ttls = [], []
        for qtype in (DNS_A, DNS_AAAA):
            records, ttl, _ = self.answers(qname, qtype)
            found.extend(record.value for record in records)
            if ttl is not None:
                ttls.append(ttl)
        if not found:
            raise DnsError('no A or AAAA record for %s' % dns_name_text(qname), 'empty')
        return found, min(ttls)

    def services(self, qname, port=None):
        """([(address, port, weight)], ttl, notes) of qname's SRV records: those of the
        lowest priority, each target's addresses from the additional section or
        else asked; port, if given, replaces the records'.  notes: what was left
        out, and why.  DnsError when no target has an address."""
        records, ttl, message = self.answers(qname, DNS_SRV)
        shown = dns_name_text(qname)
        if not records:
            raise DnsError('no SRV record for %s' % shown, 'empty')
        # RFC 2782: the target '.' means the service is decidedly not there.
        usable = [r for r in records if r.value[3] != b'\0' and r.value[2]]
        if not usable:
            raise DnsError('the SRV records of %s say the service is not available (target ".")' % shown, 'empty')
        notes = []
        lowest = min(r.value[0] for r in usable)
        chosen = [r for r in usable if r.value[0] == lowest]
        if len(chosen) < len(usable):
            notes.append('%d record(s) of a priority after %d left out' % (len(usable) - len(chosen), lowest))
        extra = {}
        for record in message.extra:
            if record.type in (DNS_A, DNS_AAAA) and record.value is not None:
                extra.setdefault(record.name, []).append(record)
        ttls = [ttl]
        places = {}     # target -> its addresses
        for record in chosen:
            target = record.value[3]
            if target in places:
                continue
            if len(places) >= MAX_DISCOVERED:
                notes.append('targets past the first %d left out' % MAX_DISCOVERED)
                break
            if target in extra:
                places[target] = [r.value for r in extra[target]]
                ttls.extend(r.ttl for r in extra[target])
                continue
            try:
                places[target], target_ttl = self.addresses(target)
                ttls.append(target_ttl)
            except DnsError as e:
                if e.kind not in ('nxdomain', 'empty'):
                    raise       # a failure to ask is no answer: the last good one stays
                places[target] = []
                notes.append('target %s left out: %s' % (dns_name_text(target), e))
        weights = srv_weights([r.value[1] for r in chosen])
        found = [(address, port or r.value[2], weight) for r, weight in zip(chosen, weights)
                 for address in places.get(r.value[3], ())]
        if not found:
            raise DnsError('no target of the SRV records of %s has an address' % shown, 'empty')
        return found, min(ttls), notes


def srv_weights(weights):
    """SRV weights (0-65535) as host weights (1-1000), in the same proportions where
    they fit: weight 0 (RFC 2782: picked very rarely) is the least, 1."""
    top = max(weights)
    if top <= 1000:
        return [max(1, w) for w in weights]
    return [max(1, int(round(w * 1000.0 / top))) for w in weights]


class DnsAnswer(object):
    """What one discovery found: backends [(address, port, weight)], each address
    and port once, in address order; ttl (seconds, the least of the records
    used); or error, a DnsError.  server: the server asked ('ip:port'); ignored:
    a reason per datagram ignored; tcp: answers that came over TCP; notes: what
    was left out of the answer, and why."""

    def __init__(self):
        self.backends = []
        self.ttl = None
        self.error = None
        self.server = None
        self.ignored = []
        self.tcp = 0
        self.notes = []


def discover_hosts(discover, resolv_conf=RESOLV_CONF):
    """Ask DNS what a <discover> finds now: a DnsAnswer.  Blocking, within DNS_DEADLINE."""
    answer = DnsAnswer()
    try:
        server = resolver_address(discover.resolver) if discover.resolver else default_resolver(resolv_conf)
        answer.server = format_address(*server)
        client = DnsClient(server, time.monotonic() + DNS_DEADLINE)
    except (ValueError, OSError) as e:
        answer.error = DnsError('cannot ask %s: %s' % (answer.server or discover.resolver, e))
        return answer
    try:
        qname = dns_name(discover.name)
        if discover.type == 'a':
            addresses, answer.ttl = client.addresses(qname)
            found = [(address, discover.port, 1) for address in addresses]
        else:
            found, answer.ttl, answer.notes = client.services(qname, discover.port)
        unique = collections.OrderedDict()
        for address, port, weight in found:
            unique.setdefault((address, port), weight)
        answer.backends = sorted(((a, p, w) for (a, p), w in unique.items()),
                                 key=lambda b: (ipaddress.ip_address(b[0]).version, ipaddress.ip_address(b[0]), b[1]))
    except DnsError as e:
        answer.error = e
    except ValueError as e:     # a name that cannot go on the wire: the config reader lets none through
        answer.error = DnsError(str(e))
    answer.ignored = client.ignored
    answer.tcp = client.tcp
    return answer


# ---------------------------------------------------------------------------
# systemd: readiness, reloads, the stop and the watchdog, told to a Type=notify unit.
# ---------------------------------------------------------------------------

class Notifier(object):
    """Tells systemd how pydirector stands: sd_notify(3)'s protocol, without libsystemd.

    $NOTIFY_SOCKET names an AF_UNIX datagram socket, a path or '@name' (the
    abstract namespace); each message is one datagram of NAME=value lines.
    Without it (not started by a Type=notify unit) every method does nothing.
    WATCHDOG=1 goes out from a timer on the loop, every half $WATCHDOG_USEC:
    a loop that stops running its timers stops the pings, and systemd
    restarts the service.  With workers the master's loop runs whether they
    serve or not: it pings only while one does (serving).

    An upgrade (see Upgrade) keeps the main PID, and says RELOADING=1 then
    READY=1 around it.  Meanwhile the old generation, a child, serves: the
    main process names it MAINPID before it execs the new code, and the old
    one names the main PID again, with READY=1, once the new one serves (or
    says READY=1 alone, as the main process still, when the new one failed).
    So systemd always watches a process that serves, and a new generation
    that dies before it is ready takes nothing down with it (NotifyAccess=main
    suffices: each MAINPID= comes from the main process of the moment).
    """

    def __init__(self, environ=None):
        environ = os.environ if environ is None else environ
        text = environ.get('NOTIFY_SOCKET', '')
        self.address = None
        if text.startswith('/'):
            self.address = text
        elif text.startswith('@') and len(text) > 1:
            self.address = '\0' + text[1:]
        elif text:   # e.g. systemd 254's vsock:CID:PORT, for virtual machines
            log.warning('NOTIFY_SOCKET=%s is not a path or @name: systemd is told nothing', log_value(text))
        self.watchdog = None      # seconds between pings, when systemd asks for them
        usec = environ.get('WATCHDOG_USEC', '')
        pid = environ.get('WATCHDOG_PID', '')
        if self.address and usec.isdigit() and int(usec) > 0 and pid in ('', str(os.getpid())):
            self.watchdog = int(usec) / 2e6
        self.sock = None
        if self.address:
            # Made now, once: the loop (pings, stop) and a reload's thread both send.
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.sock.setblocking(False)    # a full queue loses a message, never stalls the loop
        self.stopped = False
        self.failed = False

    def send(self, *lines):
        if self.sock is None:
            return
        try:
            self.sock.sendto('\n'.join(lines).encode('utf-8'), self.address)
        except OSError as e:
            if not self.failed:
                self.failed = True
                log.warning('cannot notify systemd at %s: %s (not logged again)',
                            log_value(self.address.replace('\0', '@')), e)

    def ready(self):
        self.send('READY=1')

    def reloading(self):
        # MONOTONIC_USEC lets systemd (Type=notify-reload) match this message to its reload.
        self.send('RELOADING=1', 'MONOTONIC_USEC=%d' % (time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6))

    def main_pid(self, pid, ready=False):
        self.send(*['MAINPID=%d' % pid] + (['READY=1'] if ready else []))

    def stopping(self):
        if not self.stopped:
            self.stopped = True
            self.send('STOPPING=1')

    def start_watchdog(self, loop, serving=None):
        if self.watchdog is None:
            return
        fed = [False]

        def ping():
            if serving is None or serving():
                self.send('WATCHDOG=1')
                fed[0] = True
            elif fed[0]:
                fed[0] = False
                log.error('no worker is serving: not feeding the systemd watchdog')
            loop.call_later(self.watchdog, ping)
        loop.call_later(0, ping)

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


# ---------------------------------------------------------------------------
# Director: the running services, and every change to them.  All of it runs
# on the loop thread; the admin server and the probe threads reach it through
# loop.call() / loop.call_soon_threadsafe().  In parts: the running objects
# and host health (here), blue/green switches, reload, the Director itself
# (life cycle, accepting, the queue), and its admin actions and pages.
# ---------------------------------------------------------------------------

class AdminError(Exception):
    """A refused admin request: status is the HTTP status the admin answers with."""

    def __init__(self, status, message):
        Exception.__init__(self, message)
        self.status = status
        self.message = message


class RunningGroup(object):
    """A group of hosts at run time: its name, its config (a Group, whose hosts
    are not kept up to date: the scheduler holds them), its scheduler, and its
    hosts by address_key, so addHost finds a duplicate at once."""

    def __init__(self, config, scheduler):
        self.name = config.name
        self.config = config
        self.scheduler = scheduler
        self.addresses = dict((address_key(*parse_address(h.ip)), h) for h in scheduler.hosts)

    def __repr__(self):
        return '<RunningGroup %s %s>' % (self.name, self.scheduler.spec)


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
        # <clients>: the per-client limits (None: none), what they refused (limited) or in
        # mode log would have (limited_dry), the entries they evicted, and for the
        # refusal log line when it was last written and how many refusals it left out.
        self.limits = ClientLimits(config.clients, self) if config.clients is not None else None
        self.limited = self.limited_dry = self.client_evictions = 0
        self.limited_logged = [-1e9, 0]
        self.client_entries = 0            # a master's: its workers' entries
        self.queue = collections.deque()   # Pairs waiting for a host below its maxconns
        self.waiting = 0                   # a master's: clients its workers hold in their queues
        self.switch = None                 # the pending blue/green Switch, if any
        self.udp = None                    # a UDP service's SessionTable
        # A UDP service's: sessions evicted, datagrams not relayed (a full socket buffer, a
        # client that cannot be reached...), datagrams from clients and to them.
        self.evicted = self.dropped = self.datagrams_in = self.datagrams_out = 0

    def __repr__(self):
        return '<RunningService %s>' % self.name


def listens_by_address(services):
    """address key -> [(service, Listen)] for every listen of the running services
    (or of Service configs), in file order: one socket per key, shared by the
    services whose listens have sni."""
    found = collections.OrderedDict()
    for service in services:
        config = getattr(service, 'config', service)
        for listen in config.listens:
            found.setdefault(listen.key, []).append((service, listen))
    return found


def host_state(host):
    """One word for a host, as /running shows it: up, down, draining or maint."""
    if host.health == schedulers.DOWN:
        return 'down'
    if host.admin != schedulers.ENABLED:
        return host.admin
    return 'up'


def host_states_text(group):
    """'2 down, 1 maint' for a group's hosts ('no hosts' for none)."""
    counts = collections.Counter(host_state(h) for h in group.scheduler.hosts)
    return ', '.join('%d %s' % (counts[state], state) for state in sorted(counts)) or 'no hosts'


# setHost's states (HAProxy's set server state) -> the admin state they set.
SET_HOST_STATES = collections.OrderedDict([
    ('ready', schedulers.ENABLED), ('drain', schedulers.DRAINING), ('maint', schedulers.MAINT)])
ADMIN_STATE_NAMES = dict((admin, name) for name, admin in SET_HOST_STATES.items())


def parse_force(value):
    """An admin call's force: '1' goes past a rule's 409; '0', empty or absent does not."""
    if value in (None, '', '0', False):
        return False
    if value in ('1', True):
        return True
    raise AdminError(400, 'force must be 1 or 0, not %r' % (value,))


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


TIMELINE_LENGTH = 10     # state changes kept per host for /running
DARK_INTERVAL = 1.0      # seconds between probes of a group with no host up


class ProbeState(object):
    """The health bookkeeping of one host."""
    __slots__ = ('service', 'group', 'host', 'next_due', 'in_flight', 'timeline', 'changes',
                 'once', 'started', 'passed', 'last_check', 'downtime', 'down_since')

    def __init__(self, service, group, host, next_due, now):
        self.service = service
        self.group = group
        self.host = host
        self.next_due = next_due
        self.in_flight = False
        self.timeline = collections.deque(maxlen=TIMELINE_LENGTH)
        self.changes = 0          # state changes in all, for /metrics (the timeline keeps 10)
        self.once = False         # probe it at its next due time even if up and unchecked
        self.started = 0          # the number (Health.probes) of the probe in flight
        self.passed = 0           # the number of the last probe that passed
        self.last_check = None    # (epoch it ended, ok (None: not made), reason, seconds it took)
        self.downtime = 0.0       # seconds down before down_since
        self.down_since = now if host.health == schedulers.DOWN else None     # loop time

    def down_for(self, now):
        """Seconds the host has been down in all, while this state kept it."""
        return self.downtime + (now - self.down_since if self.down_since is not None else 0.0)


class Health(object):
    """Host health: when each host is probed, what the probes found, and
    set_state(), the one way a host's health or admin state changes.

    Kept apart, as HAProxy does: health (up / down, from failed connects and
    probes) and admin state (enabled / draining / maint, from the operator;
    a host in maint is not probed at all).  The
    probe schedule is a heap of (due, seq, ProbeState); an entry whose state
    was rescheduled or forgotten since is dropped when it comes up, so a tick
    costs what is due, not what is watched.  First probes are spread over
    the first interval (HAProxy's spread-checks), so a big pool is not probed
    in lockstep.
    """

    def __init__(self, director):
        self.director = director
        self.loop = director.loop
        self.states = {}          # Host -> ProbeState
        self.heap = []
        self.seq = 0
        self.probes = 0           # probes handed out so far: each one's number
        self.spread = random.Random()
        # A worker never probes (its master does) and logs the master's changes only
        # at debug level: the master's log line is the one.
        self.probing = True
        self.quiet = False

    def check(self, service):
        return service.check or DEFAULT_CHECK

    def watch(self, service, group, host, spread=True):
        """Start keeping a host's health.  An up host with a <check> is first probed
        at a random point of its first interval; a down one, or an unchecked one, at once."""
        now = self.loop.now
        due = now
        if spread and host.health == schedulers.UP and service.check is not None:
            due += self.spread.random() * service.check.interval
        state = self.states[host] = ProbeState(service, group, host, due, now)
        self._schedule(state, due)

    def forget(self, host):
        self.states.pop(host, None)

    def moved(self, host, service, group):
        """A reload kept the host under a new service or group object."""
        state = self.states.get(host)
        if state is not None:
            state.service, state.group = service, group

    def _schedule(self, state, due):
        if not self.probing:
            return
        state.next_due = due
        self.seq += 1
        heapq.heappush(self.heap, (due, self.seq, state))

    def probe_now(self, host):
        """Probe the host at once, even an up host of a service with no <check>
        (once; a probe out already is followed by another at once)."""
        state = self.states[host]
        state.once = True
        self._schedule(state, self.loop.now)

    def probe_round(self):
        """Probe every host now but those in maint (an upgrade's new generation proves
        its checks before it serves); the count of probes before them, for round_over."""
        first = self.probes
        for host in self.states:
            if host.admin != schedulers.MAINT:
                self.probe_now(host)
        return first

    def round_over(self, first):
        """Whether every host probe_round asked for (still there, not in maint) has had
        its probe, handed out after the first `first`, come back."""
        return all(state.started > first and not state.in_flight for host, state in self.states.items()
                   if host.admin != schedulers.MAINT)

    def probes_lost(self):
        """The probes out will never come back (their threads stayed in the parent of a
        fork: an upgrade's old generation): each is made again, at once."""
        for state in self.states.values():
            if state.in_flight:
                state.in_flight = False
                self._schedule(state, self.loop.now)

    def passed_since(self, host, probes):
        """Whether a probe handed out after the first `probes` (self.probes then) has passed."""
        state = self.states.get(host)
        return state is not None and state.passed > probes

    def due(self):
        """Called by the manager each tick: the probes to run now, marked in flight."""
        now = self.loop.now
        heap = self.heap
        states = self.states
        due = []
        dark = {}
        while heap and heap[0][0] <= now:
            when, _, state = heapq.heappop(heap)
            host = state.host
            if states.get(host) is not state or state.next_due != when or state.in_flight:
                continue    # forgotten, rescheduled since, or a probe is out already
            if host.admin == schedulers.MAINT:
                continue    # not probed in maint; leaving it plans a probe
            check = self.check(state.service)
            if host.health == schedulers.UP and state.service.check is None and not state.once:
                continue    # nothing to check until a failed connect takes it down
            state.once = False
            self.probes += 1
            state.started = self.probes
            interval = check.interval
            if host.health == schedulers.DOWN and self._group_is_dark(state.service, state.group, dark):
                interval = min(interval, DARK_INTERVAL)
            state.next_due = now + interval     # rescheduled when the result comes
            state.in_flight = True
            name, port = parse_address(host.ip)
            due.append((host, name, port, check, state.service.config.protocol))
        return due

    def _group_is_dark(self, service, group, seen):
        """The enabled group has no host up: its hosts are probed every second.
        seen keeps the answer per group for one tick: a dark group of thousands
        would otherwise be scanned once per host due."""
        if service.enabled is not group:
            return False
        dark = seen.get(group)
        if dark is None:
            dark = seen[group] = not any(h.health == schedulers.UP for h in group.scheduler.hosts)
        return dark

    def result(self, host, ok, reason, address, took=0.0):
        """A probe's outcome, from the manager; took: the seconds it took."""
        state = self.states.get(host)
        if state is None:
            return  # the host was removed while the probe ran
        state.in_flight = False
        state.last_check = (time.time(), ok, reason, took)
        if host.admin == schedulers.MAINT:
            return  # it went into maint while the probe ran: not probed, nor judged
        self._schedule(state, self.loop.now if state.once else max(state.next_due, self.loop.now))
        if address is not None and address != host.address:
            host.address = address
            self.director.address_changed(state.service, state.group, host)
        check = self.check(state.service)
        if ok is None:
            log.debug('probe of host %s (%s) not made: %s', host.name, host.ip, reason)
        elif ok:
            host.probe_fail = 0
            state.passed = state.started
            if host.health == schedulers.DOWN:
                host.probe_ok += 1
                if host.probe_ok >= check.rise:
                    self.set_state(state.service, state.group, host, schedulers.UP,
                                   'answered %d probe(s)' % host.probe_ok)
        else:
            host.probe_ok = 0
            if host.health == schedulers.UP:
                host.probe_fail += 1
                if host.probe_fail >= check.fall:
                    self.set_state(state.service, state.group, host, schedulers.DOWN,
                                   '%s (%d failed probes)' % (reason, host.probe_fail))
                    if check.on_down == 'close':
                        self.director.close_host_connections(state.service, state.group, host)
            elif not (host.reason or '').startswith(reason):
                # Still down, for a new reason (a name that stopped resolving...): say so once.
                log.info('host %s (%s) in %s/%s still down: %s', host.name, host.ip,
                         state.service.name, state.group.name, reason)
                host.reason = reason

    def set_state(self, service, group, host, state, cause):
        """The one way a host's health or admin state changes: tells the scheduler, logs once.
        A host that comes back (up again, or out of maint) ramps up over the check's slowstart."""
        scheduler = group.scheduler
        when = time.time()
        before = host_state(host)
        was_maint = host.admin == schedulers.MAINT
        slowstart = self.check(service).slowstart
        if state == schedulers.UP:
            changed = scheduler.mark_up(host, when, slowstart)
        elif state == schedulers.DOWN:
            changed = scheduler.mark_down(host, cause, when)
        else:
            changed = scheduler.set_admin(host, state, when, slowstart)
        if not changed:
            return False
        host.probe_ok = host.probe_fail = 0
        probe_state = self.states.get(host)
        after = host_state(host)
        if probe_state is not None:
            now = self.loop.now
            if host.health == schedulers.DOWN:
                if probe_state.down_since is None:
                    probe_state.down_since = now
            elif probe_state.down_since is not None:
                probe_state.downtime += now - probe_state.down_since
                probe_state.down_since = None
        if probe_state is not None and after != before:
            probe_state.timeline.append((when, before, after, cause))
            probe_state.changes += 1
            if state == schedulers.DOWN and not probe_state.in_flight:
                self._schedule(probe_state, self.loop.now + self.check(service).interval)
        if was_maint and host.admin != schedulers.MAINT and probe_state is not None and not probe_state.in_flight:
            self._schedule(probe_state, self.loop.now)      # probes start again at once
        if host in scheduler.ramping:
            self.director.ramp_started()
        log.log(logging.DEBUG if self.quiet else logging.INFO, 'host %s (%s) in %s/%s %s: %s',
                host.name, host.ip, service.name, group.name, state, cause)
        self.director.state_changed(service, group, host, state, cause)
        if after == 'up':
            self.director.host_up(service, group)
        return True

    def next_probe(self, service, host):
        """Epoch time of the host's next probe; None when it is not probed (up, no <check>)."""
        state = self.states.get(host)
        if state is None or (host.health == schedulers.UP and service.check is None) or (
                host.admin == schedulers.MAINT):
            return None
        return round(self.director.epoch_offset + max(state.next_due, self.loop.now), 3)

    def timeline(self, host):
        state = self.states.get(host)
        if state is None:
            return [], 0
        return ([{'when': when, 'from': old, 'to': new, 'why': why} for when, old, new, why in state.timeline],
                state.changes)

    def checks(self, host):
        """The host's last probe ({'when', 'ok', 'reason', 'took'}; None before the first)
        and its time down in all, in seconds, for the pages."""
        state = self.states.get(host)
        if state is None:
            return None, 0.0
        last = state.last_check
        if last is not None:
            last = {'when': last[0], 'ok': last[1], 'reason': last[2], 'took': round(last[3], 6)}
        return last, round(state.down_for(self.loop.now), 3)


HISTORY_STEP = 5.0           # seconds between two samples of the history
HISTORY_SAMPLES = 180        # samples kept per service and host: 15 minutes
HISTORY_SERIES = ('connections', 'errors', 'open')


class History(object):
    """The last HISTORY_SAMPLES samples, one every HISTORY_STEP, of each service
    and host: new connections and errors since the sample before, and the
    connections open then.  A host's errors are its failed connects, a
    service's those of its hosts plus the clients it refused.  In a master the
    counts are its workers' sums (Master.read_counts), so the master's history
    is the merge of theirs; workers keep none.

    Memory is fixed per thing: the samples live in one array of C ints, thing
    after thing (HISTORY_SAMPLES of each series, in HISTORY_SERIES order; a
    ring, the same place newest for all), with the running totals and peaks
    beside it, and a sample is a few strided slice assignments over every thing
    at once: C loops, not a Python loop per host (but the one gathering the
    counts).  The layout is made again only when the services or hosts change
    (a reload, an addHost, discovery), copying each run of things kept in order
    with one slice.  A snapshot copies each thing's block as it is (a memcpy);
    expand_history makes the lists from it off the loop, in the admin's thread.
    """

    def __init__(self, director, step=None):
        self.director = director
        self.loop = director.loop
        self.step = step or HISTORY_STEP
        self.timer = None
        self.things = []            # services and hosts, in the order of their blocks
        self.index = {}             # thing -> its place in things
        self.samples = array.array('i')
        self.totals = array.array('q')      # each thing's connections then errors, at the last sample
        self.peaks = array.array('d')       # the most new connections per second of any sample
        self.times = array.array('d', bytes(8 * HISTORY_SAMPLES))     # epoch of each sample
        self.last = -1              # the place of the newest sample
        self.taken = 0              # samples taken so far
        self.since = None           # epoch of the last sample (or of the start)
        self.started = None         # epoch of the start

    def start(self):
        things, counts = self.gather()
        self.layout(things, counts)
        self.since = self.started = time.time()
        self.timer = self.loop.call_later(self.step, self.tick)

    def stop(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def tick(self):
        self.timer = self.loop.call_later(self.step, self.tick)
        self.sample()

    def gather(self):
        """The services and their hosts, and [connections, errors, open] of each: lists."""
        director = self.director
        if director.master is not None:
            director.master.read_counts()
        things = []
        connections, errors, opens = counts = [], [], []
        for service in director.services.values():
            hosts = []
            for group in service.groups.values():
                hosts += group.scheduler.hosts
            failed = [h.connect_errors for h in hosts]
            things.append(service)
            connections.append(service.accepted)
            errors.append(service.refused + sum(failed))
            opens.append(service.open)
            things += hosts
            connections += [h.total for h in hosts]
            errors += failed
            opens += [h.open for h in hosts]
        return things, counts

    def layout(self, things, counts):
        """Blocks for these things: a kept one's samples, totals and peak go along."""
        size = HISTORY_SAMPLES * len(HISTORY_SERIES)
        n = len(things)
        before = len(self.things)
        samples = array.array('i', bytes(4 * size * n))
        totals = array.array('q', counts[0] + counts[1])
        peaks = array.array('d', bytes(8 * n))
        old = self.index
        was = [old.get(thing, -1) for thing in things]
        # memoryviews: each run is copied once, with no array made for it on the way.
        into = (memoryview(samples), memoryview(totals), memoryview(peaks))
        fro = (memoryview(self.samples), memoryview(self.totals), memoryview(self.peaks))
        at = 0
        while at < n:
            first = was[at]
            if first < 0:
                at += 1
                continue
            end = at + 1
            while end < n and was[end] == first + end - at:
                end += 1
            last = first + end - at
            into[0][at * size:end * size] = fro[0][first * size:last * size]
            into[1][at:end] = fro[1][first:last]
            into[1][n + at:n + end] = fro[1][before + first:before + last]
            into[2][at:end] = fro[2][first:last]
            at = end
        for view in into + fro:
            view.release()
        self.things = things
        self.index = dict(zip(things, range(n)))
        self.samples, self.totals, self.peaks = samples, totals, peaks

    def sample(self):
        things, (connections, errors, opens) = self.gather()
        if things != self.things:
            self.layout(things, [connections, errors])
        now = time.time()
        interval = max(now - self.since, 1e-3)
        self.since = now
        last = self.last = (self.last + 1) % HISTORY_SAMPLES
        self.times[last] = now
        self.taken += 1
        totals = array.array('q', connections + errors)
        change = array.array('i', map(operator.sub, totals, self.totals))
        n = len(things)
        size = HISTORY_SAMPLES * len(HISTORY_SERIES)
        samples = self.samples
        samples[last::size] = change[:n]
        samples[HISTORY_SAMPLES + last::size] = change[n:]
        samples[2 * HISTORY_SAMPLES + last::size] = array.array('i', opens)
        self.totals = totals
        self.peaks = array.array('d', map(max, self.peaks, map(operator.truediv, change[:n],
                                                                 itertools.repeat(interval))))

    def snapshot(self):
        """The samples' times and the seconds each covers, oldest first, and where the
        newest is in a block and how many there are (ring), for expand_history."""
        count = min(self.taken, HISTORY_SAMPLES)
        times = self.oldest_first(self.times, self.last, count).tolist()
        first = self.started if self.taken == count else times[0] - self.step if times else None
        return {'step': self.step, 'samples': HISTORY_SAMPLES, 'times': [round(t, 3) for t in times],
                'intervals': [round(max(b - a, 1e-3), 3) for a, b in zip([first] + times, times)],
                'ring': [self.last, count]}

    @staticmethod
    def oldest_first(ring, last, count):
        """The last count values of a ring of HISTORY_SAMPLES whose newest is at last."""
        return (ring[last + 1:] + ring[:last + 1])[HISTORY_SAMPLES - count:]

    def rates(self, thing, series=True):
        """A service's or host's new connections per second in the last sample, the most
        of any sample since it was first counted, and (with series; else None) its block
        of samples as it is (a copy), which expand_history reads."""
        at = self.index.get(thing)
        if at is None:
            return 0.0, 0.0, None
        size = HISTORY_SAMPLES * len(HISTORY_SERIES)
        rate = peak = 0.0
        if self.taken:
            last = self.last
            interval = self.since - (self.times[last - 1] if self.taken > 1 else self.started)
            rate = round(max(0, self.samples[at * size + last]) / max(interval, 1e-3), 3)
            peak = round(self.peaks[at], 3)
        return rate, peak, self.samples[at * size:(at + 1) * size] if series else None


def expand_history(snapshot):
    """A snapshot's history as lists, off the loop (the admin's thread): each service's
    and host's 'history' becomes {'connections': [...], 'errors': [...], 'open': [...]},
    oldest first: the new connections and errors of each sample (divide by its
    interval for a rate) and the connections open at its end.  Done once; a snapshot
    taken without series keeps none."""
    ring = snapshot['history'].pop('ring', None)
    if ring is None:
        return snapshot
    last, count = ring
    things = list(snapshot['services'])
    for service in snapshot['services']:
        for group in service['groups']:
            things += group['hosts']
    for thing in things:
        block = thing.get('history')
        if block is not None:
            thing['history'] = dict(
                (name, History.oldest_first(block[k * HISTORY_SAMPLES:(k + 1) * HISTORY_SAMPLES], last,
                                            count).tolist()) for k, name in enumerate(HISTORY_SERIES))
    return snapshot


class Switch(object):
    """A blue/green switch still in its drain or rollback window: it owns the
    timers that close what is left on the old group (drain) and switch back
    when the new group has no host up at the end of the window (rollback).

    The new group is judged by what its probes find after the switch, never
    by the state it had then, which may be stale (a host killed a moment
    before is still up until a probe says otherwise): each of its hosts is
    probed at once (with a <check> or not), and at the end of the window
    some host must be up, by a probe that started after the switch."""

    def __init__(self, director, service, from_group, to_group, drain, rollback):
        self.director = director
        self.service = service
        self.from_group = from_group
        self.to_group = to_group
        self.drain_until = None      # epoch: connections left on from_group are closed then
        self.rollback_until = None   # epoch: switch back unless to_group has a host up then
        self.timers = []
        loop = director.loop
        self.probes = director.health.probes     # the new group is judged on the probes after these
        if drain is not None:
            self.drain_until = time.time() + drain
            self.timers.append(loop.call_later(drain, self._drain))
        if rollback is not None and director.worker is None:
            # A worker's switch does not roll back on its own: its master decides, for all.
            self.rollback_until = time.time() + rollback
            self.timers.append(loop.call_later(rollback, self._check_rollback, rollback))
            for host in to_group.scheduler.hosts:
                director.health.probe_now(host)

    @property
    def pending(self):
        return self.drain_until is not None or self.rollback_until is not None

    def cancel(self):
        for timer in self.timers:
            timer.cancel()
        self.timers = []

    def _done(self):
        if not self.pending and self.service.switch is self:
            self.service.switch = None

    def _drain(self):
        service = self.service
        if service.enabled is not self.from_group:
            doomed = [p for p in self.director.pairs if p.service is service and p.group is self.from_group]
            log.info('service %s: drain of group %s over, closing %d connection(s)',
                     service.name, self.from_group.name, len(doomed))
            for pair in doomed:
                pair.close(END_DRAINED)
            self.director.end_sessions(lambda s: s.service is service and s.group is self.from_group, END_DRAINED)
        self.drain_until = None
        self._done()

    def confirmed(self):
        """A host of the new group is up now, by a probe that started after the switch."""
        health = self.director.health
        return any(host_state(h) == 'up' and health.passed_since(h, self.probes)
                   for h in self.to_group.scheduler.hosts)

    def _check_rollback(self, window):
        service = self.service
        self.rollback_until = None
        if service.enabled is self.to_group and not self.confirmed():
            log.warning('service %s: rollback to group %s: group %s had no host up within %g s',
                        service.name, self.from_group.name, self.to_group.name, window)
            service.enabled = self.from_group
            self.cancel()
            service.switch = None
            self.director.rolled_back(service, self.from_group)
            return
        self._done()

    def snapshot(self):
        return {'from': self.from_group.name, 'to': self.to_group.name,
                'drain_until': self.drain_until, 'rollback_until': self.rollback_until}
class DiscoverState(object):
    """One <discover> of a running group: key (service name, group name, the
    discover's key), its config, when it is asked next, and what it found."""

    def __init__(self, key, config):
        self.key = key
        self.config = config
        self.timer = None
        self.next_query = None      # epoch of the next query; None while one runs, or never
        self.server = None          # 'ip:port' last asked
        self.answered = None        # epoch of the last good answer
        self.ttl = None             # that answer's TTL, as the server gave it
        self.found = 0              # backends in it, before any were left out
        self.left_out = 0           # over MAX_DISCOVERED
        self.notes = []             # what else it left out, and why
        self.failing = False        # the last query failed
        self.error = None           # the last failure's reason (kept once answered again)
        self.error_time = None
        self.answers = 0
        self.failures = collections.Counter()   # by kind (DNS_FAILURES)
        self.ignored = 0            # datagrams that were not the answer (wrong ID or question, malformed)
        self.tcp = 0                # answers that came over TCP, the UDP one being truncated

    def carry(self, other):
        """A changed discover: the counts go on, the answer goes with the old config."""
        self.answers, self.failures, self.ignored, self.tcp = other.answers, other.failures, other.ignored, other.tcp

    def where(self):
        return 'discover %s in %s/%s' % (self.config.name, self.key[0], self.key[1])


class Discovery(object):
    """The <discover> elements of the running groups: hosts from DNS (see the DNS
    section).  Each is asked in a manager thread (discover_hosts), when its last
    answer's TTL has run out, clamped to [min_ttl, max_ttl], or its interval after
    a failure; each answer is applied on the loop by Actions.set_discovered, which
    a master replays in its workers.  Only a process that runs the manager asks
    (Director.start): a worker's hosts from DNS come from its master, as the
    discovered sets (sets, restore) in its config and reload messages and as
    replayed set_discovered calls."""

    def __init__(self, director):
        self.director = director
        self.loop = director.loop
        self.states = collections.OrderedDict()
        self.asking = False

    def start(self):
        self.asking = True
        for state in self.states.values():
            self.schedule(state, 0)

    def stop(self):
        self.asking = False
        for state in self.states.values():
            self._cancel(state)

    def _cancel(self, state):
        if state.timer is not None:
            state.timer.cancel()
            state.timer = None
        state.next_query = None

    def sync(self):
        """A state for each <discover> of the running groups: kept where it did not
        change, new (and asked at once) where it is new or changed.  Hosts of a
        discover gone are removed.  At start, after a reload or a group deleted;
        returns what changed, in words, for the reload's line."""
        director = self.director
        old, self.states = self.states, collections.OrderedDict()
        changes = []
        for service in director.services.values():
            for group in service.groups.values():
                keys = set()
                for config in group.config.discovers:
                    key = (service.name, group.name, config.key)
                    keys.add(config.key)
                    state = old.pop(key, None)
                    if state is not None and state.config.xml_attrs() == config.xml_attrs():
                        self.states[key] = state
                        continue
                    new = self.states[key] = DiscoverState(key, config)
                    if state is not None:
                        new.carry(state)
                        self._cancel(state)
                    changes.append('%sdiscover %s/%s' % ('+' if state is None else '', group.name, config.name))
                    if self.asking:
                        self.schedule(new, 0)
                for host in [h for h in group.scheduler.hosts if h.config.discovered not in keys | {None}]:
                    director.remove_host(service, group, host)
        for state in old.values():
            self._cancel(state)
            changes.append('-discover %s/%s' % (state.key[1], state.config.name))
        return changes

    def schedule(self, state, delay):
        self._cancel(state)
        state.next_query = time.time() + delay
        state.timer = self.loop.call_later(delay, self.ask, state)

    def ask(self, state):
        state.timer = None
        state.next_query = None
        if self.asking and self.states.get(state.key) is state:
            self.director.manager.submit(self._resolve, state)

    def _resolve(self, state):
        """In a manager thread: ask, and hand the answer to the loop."""
        try:
            answer = discover_hosts(state.config)
        except Exception as e:      # a bug here must not end discovery for good
            log.exception('%s failed unexpectedly', state.where())
            answer = DnsAnswer()
            answer.error = DnsError('discovery error: %s' % e)
        self.loop.call_soon_threadsafe(self.answered, state, answer)

    def answered(self, state, answer):
        """On the loop: what discover_hosts found for state, made the group's hosts."""
        director = self.director
        if not self.asking or self.states.get(state.key) is not state:
            return      # stopping, or the discover changed or went while it was asked
        service = director.services.get(state.key[0])
        group = service.groups.get(state.key[1]) if service is not None else None
        if group is None:
            return
        config = state.config
        where = state.where()
        state.server = answer.server
        state.ignored += len(answer.ignored)
        state.tcp += answer.tcp
        if answer.ignored:
            # One line per query, however many datagrams: a flood of forgeries is one line.
            log.warning('%s: ignored %d DNS message(s) that were not the answer: %s', where,
                        len(answer.ignored), '; '.join(answer.ignored[:3]) + ('...' if len(answer.ignored) > 3 else ''))
        if answer.error is not None:
            self.failed(state, service, group, answer.error)
            self.schedule(state, config.interval)
            return
        if state.failing:
            log.info('%s answers again (ttl %d s)', where, answer.ttl)
        state.failing = False
        state.answers += 1
        state.answered = time.time()
        state.ttl = answer.ttl
        state.notes = answer.notes
        state.found = len(answer.backends)
        backends = self.room(state, group, answer.backends)
        held = dict((h.ip, h.weight) for h in self.hosts_of(group, config.key))
        if dict(map(tuple, backends)) != held:     # the same answer again changes nothing, and tells no worker
            director.set_discovered(service.name, group.name, config.key, backends)
        self.schedule(state, min(max(answer.ttl, config.min_ttl), config.max_ttl))

    def failed(self, state, service, group, error):
        """A query that got no usable answer: keep="last" keeps the hosts, "empty" removes them."""
        config = state.config
        repeated = state.failing and state.error == str(error)
        state.failing = True
        state.error, state.error_time = str(error), time.time()
        state.failures[error.kind] += 1
        hosts = len(self.hosts_of(group, config.key))
        if config.keep == 'empty' and hosts:
            self.director.set_discovered(service.name, group.name, config.key, [])
            what = 'keep="empty": removed its %d host(s)' % hosts
        elif state.answers:
            what = 'keeping the %d host(s) of its last answer' % hosts
        else:
            what = 'no hosts from it yet'
        # Said once, and again when the reason changes; counted every time.
        log.log(logging.DEBUG if repeated and not (config.keep == 'empty' and hosts) else logging.WARNING,
                '%s failed (%s): %s; %s', state.where(), error.kind, error, what)

    def room(self, state, group, backends):
        """The backends as set_discovered takes them ([['ip:port', weight]]): not those
        whose address another host of the group holds (a <host>, another discover's),
        and at most what the group has room for: MAX_DISCOVERED less what its other
        discovers hold.  Those it holds already come first, so a cut does not churn."""
        key = state.config.key
        others = sum(1 for h in group.scheduler.hosts if h.config.discovered not in (None, key))
        room = max(0, MAX_DISCOVERED - others)
        found = []
        for address, port, weight in backends:
            holder = group.addresses.get(address_key(address, port))
            if holder is None or holder.config.discovered == key:
                found.append([format_address(address, port), weight])
        left_out = max(0, len(found) - room)
        if left_out:
            held = set(h.ip for h in self.hosts_of(group, key))
            found.sort(key=lambda b: b[0] not in held)
            found = found[:room]
        if left_out != state.left_out:
            if left_out:
                log.warning('%s: %d backend(s), more than the group has room for (%d in all from DNS): '
                            '%d left out', state.where(), len(backends), MAX_DISCOVERED, left_out)
            state.left_out = left_out
        return found

    def hosts_of(self, group, key):
        return [h for h in group.scheduler.hosts if h.config.discovered == key]

    def snapshot(self, service, group):
        """The discovers of a group, for the pages."""
        found = []
        for config in group.config.discovers:
            state = self.states.get((service.name, group.name, config.key))
            if state is None:
                continue
            failures = dict.fromkeys(DNS_FAILURES, 0)
            failures.update(state.failures)
            found.append({
                'name': config.name, 'type': config.type, 'port': config.port, 'keep': config.keep,
                'resolver': config.resolver, 'server': state.server,
                'hosts': len(self.hosts_of(group, config.key)), 'found': state.found,
                'left_out': state.left_out, 'notes': list(state.notes),
                'last_answer': state.answered, 'ttl': state.ttl, 'next_query': state.next_query,
                'failing': state.failing, 'last_error': state.error, 'last_error_time': state.error_time,
                'answers': state.answers, 'failures': failures, 'ignored': state.ignored, 'tcp': state.tcp,
            })
        return found

    def sets(self):
        """[[service, group, discover key, backends]] of the hosts from DNS, for a worker."""
        found = []
        for service in self.director.services.values():
            for group in service.groups.values():
                for config in group.config.discovers:
                    found.append([service.name, group.name, config.key,
                                  [[h.ip, h.weight] for h in self.hosts_of(group, config.key)]])
        return found

    def restore(self, sets):
        """In a worker: the hosts from DNS as its master has them (sets), every
        discover's (one not in sets has none)."""
        given = dict(((s, g, d), backends) for s, g, d, backends in sets)
        director = self.director
        for service in director.services.values():
            for group in service.groups.values():
                for config in group.config.discovers:
                    director.apply_discovered(service, group, config.key,
                                              given.get((service.name, group.name, config.key), []))


class Reload(object):
    """Bring the running services in line with a new Config, read and checked
    off the loop (Director.reload); this part runs on the loop.

    It makes every difference a ConfigDiff of the running state and the new
    file shows (diff and apply read the same ConfigDiff).  New listen
    addresses are bound first, so a port in use changes nothing.  Hosts that
    did not change keep their Host object, health, admin state and counters
    (a host whose ip changed is a new host); open connections are never cut,
    and those of removed hosts and services are left to finish.  apply()
    returns the one-line summary of what changed, and of the changes made at
    run time it undid (undone_changes: what the admin changed since the file
    was last loaded, director.config, that the new file does not do too).
    """

    def __init__(self, director, new):
        self.director = director
        self.new = new
        self.changes = []
        self.undone = []

    def apply(self):
        director = self.director
        new = self.new
        diff = ConfigDiff(director.running_config(), new)
        self.undone = undone_changes(config_tree(director.config), diff.old, diff.new)
        listeners = self._bind()
        changes = self.changes
        services = collections.OrderedDict()
        for service_config in new.services:
            service = director.services.get(service_config.name)
            if service is None:
                service = director.build_service(service_config, resolve_names=False)
                changes.append('+service %s' % service.name)
                service_diff = None
            else:
                service_diff = diff.services[service.name]
                part = self._update_service(service, service_config, service_diff)
                if part:
                    changes.append('%s: %s' % (service.name, ', '.join(part)))
            if service_diff is not None and any(key == 'listen' for key, _ in service_diff.settings):
                changes.append('%s: listen %s' % (service.name, ', '.join(
                    l.text + (' sni %s' % ','.join(l.sni) if l.sni else '') for l in service_config.listens)))
            service.listeners = []
            services[service.name] = service
        # One listener per address; on a listen with sni, a new matcher of the new
        # services: clients reading their hello now get the new names.
        for key, entries in listens_by_address(services.values()).items():
            director.attach(listeners.pop(key), entries)
        for name in diff.services_removed:
            self._retire_service(director.services[name])
            changes.append('-service %s' % name)
        for listener in listeners.values():   # left over: listened on by no service now
            for reader in [r for r in director.hellos if r.listener is listener]:
                reader.close(END_SHUTDOWN)
            if director.master is not None:
                director.master.retire(listener)   # its workers may listen on it still
            else:
                listener.close()
        director.services = services
        changes.extend(director.discovery.sync())
        self._rest(diff)
        director.config = new
        director.loaded_xml = new.to_xml()
        director.reloaded = time.time()
        message = 'reloaded %s: %s' % (new.path, '; '.join(changes) or 'no changes')
        return message + ('; undid: ' + ', '.join(self.undone) if self.undone else '')

    def _bind(self):
        """address key -> Listener for every listen address of the new config, reusing
        open sockets (those of the old listens at the same address); all or nothing."""
        director = self.director
        current = {}
        for service in director.services.values():
            for listener in service.listeners:
                current[listener.listen.key] = listener
        opened = {}
        try:
            for key, entries in listens_by_address(self.new.services).items():
                if key not in current:
                    listen = entries[0][1]
                    opened[key] = director.new_listener(listen)
        except OSError as e:
            for listener in opened.values():
                listener.close()
            raise AdminError(400, str(e))
        current.update(opened)
        return current

    def _update_service(self, service, config, diff):
        """Bring a running service in line with its new config; the list of changes."""
        director = self.director
        changes = [key for key, _ in diff.settings if key != 'listen']
        service.config = config
        service.timeouts = config.timeouts
        service.check = config.check
        director.datagram_settings(service)
        self._update_limits(service, config.clients)
        groups = collections.OrderedDict()
        for group_config in config.groups:
            group = service.groups.get(group_config.name)
            if group is None:
                group = director.build_group(service, group_config, resolve_names=False)
                changes.append('+group %s' % group.name)
            else:
                changes.extend(self._update_group(service, group, group_config, diff.groups[group.name]))
            groups[group.name] = group
        enabled = groups[config.enabled]
        if enabled is not service.enabled:
            director.end_switch(service)
            changes.append('enabled group %s (was %s)' % (enabled.name, service.enabled.name))
            service.enabled = enabled
        for name in diff.removed:
            for host in service.groups[name].scheduler.hosts:
                director.health.forget(host)
            changes.append('-group %s' % name)
        service.groups = groups
        return changes

    def _update_limits(self, service, clients):
        """New <clients> settings, in place: the table and its counts stay.  Limits new to
        the service count the clients connected already (those it has routed)."""
        limits = service.limits
        pairs = [pair for pair in self.director.pairs if pair.service is service]
        if clients is None:
            if limits is not None:
                limits.detach()
                service.limits = None
                for pair in pairs:
                    pair.limit = None
        elif limits is not None:
            limits.configure(clients)
        else:
            limits = service.limits = ClientLimits(clients, service)
            now = self.director.loop.now
            for pair in pairs:
                if pair.state is not PROXY_HEADER:
                    pair.limit = limits.take(limits.key(pair.client_ip), now)

    def _update_group(self, service, group, config, diff):
        director = self.director
        changes = []
        group.config = config
        if diff.scheduler is not None:
            new = director.make_scheduler(config.scheduler)
            new.take_state_from(group.scheduler)
            changes.append('scheduler %s %s->%s' % (group.name, group.scheduler.spec, new.spec))
            group.scheduler = new
        scheduler = group.scheduler
        changed = dict((name, (old, new)) for name, old, new in diff.changed)
        moved = set(name for name, (old, new) in changed.items() if old.get('ip') != new.get('ip'))
        for name in diff.removed + sorted(moved):
            host = scheduler.get_host(name)
            director.remove_host(service, group, host)
            if name not in moved:
                changes.append('-host %s' % name)
            elif host.admin != schedulers.ENABLED:
                # A new address is a new host: the state an operator gave the old one goes.
                self.undone.append('host %s/%s/%s %s (by admin): dropped, its ip changed'
                                   % (service.name, group.name, name, host.admin))
        added = set(host.get('name') for host in diff.added) | moved
        for host_config in config.hosts:
            name = host_config.name
            if name in added:
                # A host of the file comes before one from DNS with its name or address.
                key = address_key(host_config.host, host_config.port)
                for taken in (scheduler.get_host(name), group.addresses.get(key)):
                    if taken is not None and taken.config.discovered and scheduler.get_host(taken.name) is taken:
                        director.remove_host(service, group, taken)
                director.add_running_host(service, group, host_config, resolve_names=False)
                changes.append('host %s ip %s' % (name, host_config.ip) if name in moved else '+host %s' % name)
            elif name in changed:
                host = scheduler.get_host(name)
                for row in HOST_ATTRS:
                    value = getattr(host_config, row.field)
                    if row.name not in ('name', 'ip') and getattr(host.config, row.field) != value:
                        changes.append('host %s %s %s' % (name, row.name, value))
                host.config = host_config
                # Through the scheduler: it keeps its own structures over weights and limits.
                scheduler.update_host(host, weight=host_config.weight, maxconns=host_config.maxconns,
                                      backup=host_config.backup)
                host.send_proxy = host_config.send_proxy
        if diff.reordered or added:
            # The file's order is the scheduler's order (roundrobin ties, leastconns ties); hosts from DNS after.
            scheduler.reorder([h.name for h in config.hosts] +
                              [h.name for h in scheduler.hosts if h.config.discovered is not None])
        return changes

    def _retire_service(self, service):
        """A service gone from the file: stop listening; its open connections finish."""
        director = self.director
        director.end_switch(service)
        for group in service.groups.values():
            for host in group.scheduler.hosts:
                director.health.forget(host)
        while service.queue:
            service.queue[0].close(END_SHUTDOWN)     # which takes it off the queue
        if service.udp is not None:
            service.udp.close_all(END_SHUTDOWN)       # a session is no stream to finish
        if service.limits is not None:
            service.limits.detach()
        log.info('service %s removed (%d connection(s) left to finish)', service.name, service.open)

    def _rest(self, diff):
        """Users, logging and the settings a reload cannot change in a running process."""
        director = self.director
        changes = self.changes
        new = self.new
        if new.admin is not None:
            director.users = collections.OrderedDict((u.name, u) for u in new.admin.users)
            if diff.users_changed or diff.users_removed:
                changes.append('admin users')
        old_admin, new_admin = diff.admin
        if (old_admin is None) != (new_admin is None) or diff.admin_settings:
            changes.append('admin listen/TLS not changed (needs a restart)')
        keys = [key for key, _ in diff.settings]
        if 'user' in keys or 'group' in keys:
            changes.append('user/group not changed (needs a restart)')
        if 'workers' in keys:
            changes.append('workers not changed (needs a restart)')
        if 'logging' in keys:
            director.access.flush()
            try:
                configure_log_handlers(new.logging)
                changes.append('logging')
            except OSError as e:
                log.error('the log stays where it was: %s', e)
                changes.append('logging not changed (%s)' % e)
            director.access.enabled = new.logging.access
        if 'drain' in keys:
            changes.append('drain %g s' % new.drain)
        if 'worker_timeout' in keys:
            changes.append('worker_timeout %g s' % new.worker_timeout)
        if 'upgrade_timeout' in keys:
            changes.append('upgrade_timeout %g s' % new.upgrade_timeout)


def replayed(method):
    """An admin change a master makes in each worker too, once it is made here
    (with the same arguments, by the same method: see Master.replay)."""
    name = method.__name__

    @functools.wraps(method)
    def change(self, *args, **kwargs):
        result = method(self, *args, **kwargs)
        if self.master is not None:
            self.master.replay(name, args, kwargs)
        return result
    return change


class Actions(object):
    """The Director's admin actions and pages.  Each action is one method, run
    on the loop, that returns what it did or raises AdminError; pydirector_admin
    maps its change URLs onto them (its ACTIONS table)."""

    # -- finding things ---------------------------------------------------

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
        if name is not None:
            host = group.scheduler.get_host(name)
            if host is not None:
                return service, group, host
        elif ip is not None:
            for host in group.scheduler.hosts:
                if host.ip == ip:
                    return service, group, host
        raise AdminError(404, 'no host %r in %s/%s' % (name if name is not None else ip, service.name, group.name))

    # -- changes ------------------------------------------------------------

    @replayed
    def add_host(self, service, group, name, ip, weight=None, maxconns=None, send_proxy=None, backup=None):
        service, group = self._group(service, group)
        try:
            new = host_config(name=name, ip=ip, weight=weight or None, maxconns=maxconns or None,
                              send_proxy=send_proxy or None, backup=backup or None)
        except ValueError as e:
            raise AdminError(400, str(e))
        if new.send_proxy and service.config.protocol == 'udp':
            raise AdminError(400, 'send_proxy needs TCP: service %s is protocol="udp"' % service.name)
        if group.scheduler.get_host(name) is not None:
            raise AdminError(409, 'host %r already exists in %s/%s' % (name, service.name, group.name))
        other = group.addresses.get(address_key(new.host, new.port))
        if other is not None:   # as the config refuses: running.xml must load
            raise AdminError(409, 'host %s in %s/%s already has ip %s' % (other.name, service.name, group.name, ip))
        self._refuse_loop(service, group, new)
        self.add_running_host(service, group, new, resolve_names=False)
        log.info('host %s (%s) added to %s/%s', name, ip, service.name, group.name)
        return 'added host %s (%s) to %s/%s' % (name, ip, service.name, group.name)

    @replayed
    def del_host(self, service, group, name=None, ip=None):
        if name is None and ip is None:
            raise AdminError(400, 'delHost needs name or ip')
        service, group, host = self._host(service, group, name, ip)
        if group is service.enabled and len(group.scheduler.hosts) == 1:
            raise AdminError(409, 'refusing to remove the last host of the enabled group %s' % group.name)
        self.remove_host(service, group, host)
        return 'removed host %s (%s) from %s/%s' % (host.name, host.ip, service.name, group.name)

    @replayed
    def set_discovered(self, service, group, discover, backends):
        """What a <discover> found (Discovery, on the master), made the group's hosts
        from it by apply_discovered; a worker makes the same change when replayed."""
        service, group = self._group(service, group)
        added, removed = self.apply_discovered(service, group, discover, backends)
        return 'discover %s in %s/%s: %d added, %d removed' % (discover, service.name, group.name,
                                                              len(added), len(removed))

    @replayed
    def del_all_hosts(self, service, group):
        service, group = self._group(service, group)
        if group is service.enabled:
            raise AdminError(409, 'refusing to remove every host of the enabled group %s' % group.name)
        hosts = list(group.scheduler.hosts)
        for host in hosts:
            self.remove_host(service, group, host)
        return 'removed %d host(s) from %s/%s' % (len(hosts), service.name, group.name)

    def _refuse_loop(self, service, group, host):
        """As the config refuses it: a new host that would send clients back here."""
        config = self.running_config()
        for service_config in config.services:
            if service_config.name == service.name:
                service_config.group(group.name).hosts.append(host)
        for looped, message in host_loops(config.services)[0]:
            if looped is host:
                raise AdminError(400, message)

    @replayed
    def enable_group(self, service, group, drain=None, rollback=None, force=None):
        """Switch new connections to group.  drain: seconds after which connections
        still on the old group are closed.  rollback: seconds after which the switch
        is undone unless the new group has a host up by its probes since.  A group
        with no host up is refused (409) unless force."""
        service, group = self._group(service, group)
        force = parse_force(force)
        try:
            drain = parse_seconds(drain or None, 'drain', zero_ok=True)
            rollback = parse_seconds(rollback or None, 'rollback', zero_ok=True)
        except ValueError as e:
            raise AdminError(400, str(e))
        old = service.enabled
        if group is not old and not force and self.worker is None and not any(
                host_state(h) == 'up' for h in group.scheduler.hosts):
            # (A worker takes its master's word: the master has checked.)
            raise AdminError(409, 'refusing to enable group %s of service %s: it has no host up (%s); '
                                  'force=1 enables it anyway' % (group.name, service.name, host_states_text(group)))
        self.end_switch(service)
        service.enabled = group
        log.info('service %s: group %s enabled (was %s)', service.name, group.name, old.name)
        message = 'enabled group %s in service %s (was %s)' % (group.name, service.name, old.name)
        if group is old or (drain is None and rollback is None):
            return message
        switch = service.switch = Switch(self, service, old, group, drain, rollback)
        if drain is not None:
            message += '; connections left on %s close in %g s' % (old.name, drain)
        if switch.rollback_until is not None:
            message += '; back to %s unless a host is up within %g s' % (old.name, rollback)
        return message

    @replayed
    def change_scheduler(self, service, group, scheduler):
        service, group = self._group(service, group)
        try:
            new = self.make_scheduler(scheduler)
        except ValueError as e:
            raise AdminError(400, str(e))
        old = group.scheduler.spec
        new.take_state_from(group.scheduler)  # same Host objects: counters and state carry over
        group.scheduler = new
        log.info('%s/%s: scheduler %s (was %s)', service.name, group.name, new.spec, old)
        return 'changed scheduler of %s/%s to %s (was %s)' % (service.name, group.name, new.spec, old)

    @replayed
    def set_host(self, service, group, name, weight=None, maxconns=None, state=None, force=None):
        """Change a host in place (HAProxy's set server weight / maxconn / state): its
        health, counters and connections stay.  state: ready, drain (only its sticky
        clients come) or maint (no clients, no probes).  Draining or maint for the last
        host up of the enabled group is refused (409) unless force."""
        service, group, host = self._host(service, group, name)
        force = parse_force(force)
        asked = dict((key, value) for key, value in (('weight', weight), ('maxconns', maxconns))
                     if value not in (None, ''))
        if not asked and state in (None, ''):
            raise AdminError(400, 'setHost needs weight, maxconns or state')
        texts = dict(attr_texts(HOST_ATTRS, vars(host.config)))
        texts.update(asked)
        try:
            new = host_config(**texts)
        except ValueError as e:
            raise AdminError(400, str(e))
        admin = None
        if state not in (None, ''):
            admin = SET_HOST_STATES.get(state)
            if admin is None:
                raise AdminError(400, "state must be 'ready', 'drain' or 'maint', not %r" % state)
            self._refuse_last_up(service, group, host, admin, force)
        changes = ['%s %s (was %s)' % (key, getattr(new, key), getattr(host, key))
                   for key in ('weight', 'maxconns') if getattr(new, key) != getattr(host, key)]
        host.config = new
        group.scheduler.update_host(host, weight=new.weight, maxconns=new.maxconns)
        if changes:
            log.info('host %s (%s) in %s/%s: %s', host.name, host.ip, service.name, group.name, ', '.join(changes))
        if admin is not None and admin != host.admin:
            changes.append('state %s (was %s)' % (state, ADMIN_STATE_NAMES.get(host.admin, host.admin)))
            self.health.set_state(service, group, host, admin, 'by admin')
        return 'set host %s in %s/%s: %s (%d open)' % (host.name, service.name, group.name,
                                                        ', '.join(changes) or 'no change', host.open)

    def _refuse_last_up(self, service, group, host, admin, force):
        """Draining or maint for the enabled group's last host up leaves the service none."""
        if admin == schedulers.ENABLED or force or self.worker is not None:
            return
        if group is not service.enabled or host_state(host) != 'up':
            return
        if any(host_state(h) == 'up' for h in group.scheduler.hosts if h is not host):
            return
        raise AdminError(409, 'refusing to %s host %s: it is the last host up in the enabled group %s of '
                              'service %s; force=1 does it anyway' % (
                                  'drain' if admin == schedulers.DRAINING else 'put into maint', host.name,
                                  group.name, service.name))

    def host_admin_down(self, service, group, name, force=None):
        """Python Director 1.0's call: setHost state=drain (no new clients, as 1.0 had it)."""
        service, group, host = self._host(service, group, name)
        self._refuse_last_up(service, group, host, schedulers.DRAINING, parse_force(force))
        self.health.set_state(service, group, host, schedulers.DRAINING, 'by admin')
        return 'draining host %s in %s/%s (%d open)' % (host.name, service.name, group.name, host.open)

    def host_admin_up(self, service, group, name):
        """Python Director 1.0's call: setHost state=ready (out of drain or maint)."""
        service, group, host = self._host(service, group, name)
        self.health.set_state(service, group, host, schedulers.ENABLED, 'by admin')
        return 'enabled host %s in %s/%s' % (host.name, service.name, group.name)

    def retry_host(self, service, group, name):
        service, group, host = self._host(service, group, name)
        self.health.probe_now(host)
        return 'probing host %s in %s/%s now' % (host.name, service.name, group.name)

    def add_user(self, name, password_hash, access):
        try:
            user = user_config(name=name, password=password_hash, access=access)
        except ValueError as e:
            raise AdminError(400, str(e))
        verb = 'changed' if name in self.users else 'added'
        self.users[name] = user
        log.info('admin user %s %s (%s)', escape_text(name), verb, access)
        return '%s user %s (%s)' % (verb, name, access)

    def del_user(self, name):
        user = self.users.get(name)
        if user is None:
            raise AdminError(404, 'no user %r' % name)
        if user.access == 'full' and not any(u.access == 'full' for u in self.users.values() if u is not user):
            raise AdminError(409, 'refusing to delete the last full-access user')
        del self.users[name]
        log.info('admin user %s deleted', escape_text(name))
        return 'deleted user %s' % name

    @replayed
    def new_group(self, service, group, scheduler):
        service = self._service(service)
        try:
            check_name(group, 'group name')
            sched = self.make_scheduler(scheduler)
        except ValueError as e:
            raise AdminError(400, str(e))
        if group in service.groups:
            raise AdminError(409, 'group %r already exists in service %s' % (group, service.name))
        service.groups[group] = RunningGroup(Group(name=group, scheduler=sched.spec), sched)
        log.info('service %s: new group %s (%s)', service.name, group, sched.spec)
        return 'created group %s in service %s (%s)' % (group, service.name, sched.spec)

    @replayed
    def del_group(self, service, group):
        service, group = self._group(service, group)
        if group is service.enabled:
            raise AdminError(409, 'refusing to delete the enabled group %s' % group.name)
        for host in list(group.scheduler.hosts):
            self.health.forget(host)
        del service.groups[group.name]
        self.discovery.sync()
        log.info('service %s: group %s deleted', service.name, group.name)
        return 'deleted group %s from service %s' % (group.name, service.name)

    @replayed
    def close_log(self):
        self.access.flush()
        reopen_logs()
        log.info('log file reopened')
        return 'log reopened'

    # -- pages --------------------------------------------------------------

    def users_list(self):
        return [(u.name, u.password, u.access) for u in self.users.values()]

    def services_down(self):
        """For /healthz: the services whose enabled group has no host up; all of them
        once stopping (draining, no new clients) or while no worker serves, so a VRRP
        peer takes the address."""
        if self.stopping or not self.serving():
            return len(self.services)
        return sum(1 for service in self.services.values()
                   if not any(host_state(host) == 'up' for host in service.enabled.scheduler.hosts))

    def serving(self):
        """Whether clients are served: in one process, while this loop runs (it runs
        this); with workers, while at least one of them runs its loop (Master.live)."""
        return self.master is None or bool(self.master.live())

    def loaded_config_xml(self):
        """The config file as last loaded (at start or by the last reload)."""
        return self.loaded_xml

    def snapshot(self, series=True):
        """Everything the admin pages show, as plain dicts and lists (nothing live).
        A master's counters are its workers' sums (Master.read_counts).  series: each
        service's and host's samples too, as copies of the history's arrays, which
        expand_history makes lists of (off the loop)."""
        if self.master is not None:
            self.master.read_counts()
        else:
            self.count_live()
        services = []
        health = self.health
        history = self.history
        for service in self.services.values():
            groups = []
            connect_errors = 0
            for group in service.groups.values():
                hosts = []
                for host in group.scheduler.hosts:
                    timeline, changes = health.timeline(host)
                    last_check, downtime = health.checks(host)
                    connect_errors += host.connect_errors
                    rate, peak, samples = history.rates(host, series)
                    hosts.append({
                        'name': host.name, 'ip': host.ip, 'weight': host.weight, 'maxconns': host.maxconns,
                        'effective_weight': host.effective_weight, 'backup': host.backup,
                        'health': host.health, 'admin': host.admin, 'state': host_state(host),
                        'reason': host.reason, 'since': host.since,
                        'open': host.open, 'total': host.total,
                        'bytes_in': host.bytes_in, 'bytes_out': host.bytes_out,
                        'send_proxy': host.send_proxy, 'timeline': timeline,
                        'next_probe': health.next_probe(service, host), 'state_changes': changes,
                        'discovered': host.config.discovered,
                        'connect_errors': host.connect_errors, 'retries': host.retries,
                        'live_bytes_in': host.live_in, 'live_bytes_out': host.live_out,
                        'last_check': last_check, 'downtime': downtime,
                        'rate': rate, 'rate_peak': peak, 'history': samples,
                    })
                groups.append({'name': group.name, 'scheduler': group.scheduler.spec,
                               'enabled': group is service.enabled, 'hosts': hosts,
                               'discover': self.discovery.snapshot(service, group)})
            enabled = [host_state(h) for h in service.enabled.scheduler.hosts]
            up = enabled.count('up')
            rate, peak, samples = history.rates(service, series)
            services.append({
                'name': service.name, 'listen': [l.text for l in service.config.listens],
                'listens': [{'ip': l.text, 'sni': l.sni, 'accept_proxy': l.accept_proxy}
                            for l in service.config.listens],
                'enabled': service.enabled.name, 'accepted': service.accepted,
                'failovers': service.failovers, 'refused': service.refused, 'groups': groups,
                'maxconns': service.config.maxconns, 'open': service.open,
                'queued': len(service.queue) + service.waiting, 'denied': service.denied,
                'switch': service.switch.snapshot() if service.switch is not None else None,
                'check': check_text(service.check, service.config.protocol),
                'protocol': service.config.protocol,
                'udp': service.udp.snapshot() if service.udp is not None else None,
                'limited': service.limited, 'limited_dry': service.limited_dry,
                'client_evictions': service.client_evictions, 'clients': self.clients_snapshot(service),
                'connect_errors': connect_errors, 'errors': connect_errors + service.refused,
                # Of the enabled group: the hosts that take its clients.
                'hosts_up': up, 'hosts_total': len(enabled),
                'state': 'up' if up == len(enabled) and up else 'down' if not up else 'degraded',
                'rate': rate, 'rate_peak': peak, 'history': samples,
            })
        return {
            'version': VERSION, 'hostname': socket.gethostname(), 'pid': os.getpid(),
            'started': self.started, 'now': time.time(), 'services': services, 'history': history.snapshot(),
            # The code running: since when, and how the last upgrade went (see Upgrade).
            'generation': {'number': self.generation, 'started': self.generation_started,
                           'upgrading': self.upgrader.busy if self.upgrader is not None else None},
            'upgrade': dict(self.last_upgrade) if self.last_upgrade is not None else None,
            'config_path': self.config.path, 'reloaded': self.reloaded, 'reload': dict(self.last_reload),
            'users': [{'name': u.name, 'access': u.access} for u in self.users.values()],
            'sni': self.sni_snapshot(),
            'workers': self.master.snapshot() if self.master is not None else None,
            'log_lines_dropped': log_output.dropped + (self.master.log_lines_dropped()
                                                       if self.master is not None else 0),
        }

    def clients_snapshot(self, service):
        """A service's <clients> for the pages (None: none): its settings, the entries its
        table holds (with workers: every worker's) and the clients with the most open
        connections (with workers: their totals, from the ClientShare)."""
        limits = service.limits
        if limits is None:
            return None
        config = limits.config
        answer = {'maxconns': config.maxconns, 'rate': config.rate, 'burst': limits.burst if config.rate else None,
                  'mode': config.mode, 'v6prefix': config.v6prefix, 'table': config.table}
        slot = self.master.slot_of.get(service) if self.master is not None else None
        if slot is None:
            answer.update(entries=len(limits.table), top=limits.top())
            return answer
        totals = sorted(self.master.clients.totals(slot).items(), key=lambda item: -item[1][0])
        answer.update(entries=service.client_entries,
                      top=[[shared_key_text(*key), total[0]] for key, total in totals[:10] if total[0]])
        return answer

    def client_state(self, service, client_ip):
        """Whether a client is over its service's <clients> limits now, and why (None: none)."""
        limits = service.limits
        if limits is None:
            return None
        key = limits.key(client_ip)
        now = time.monotonic()
        others = (0, 0.0)
        slot = self.master.slot_of.get(service) if self.master is not None else None
        if slot is not None:
            open_, tat = self.master.clients.others(self.master.clients.where(slot * 256, key))
            others = (open_, tat / 1e6)
        open_, left, why = limits.state(key, now, others)
        return {'key': client_key_text(key), 'open': open_, 'left': left, 'limited': why,
                'mode': limits.config.mode, 'settings': limits.settings_text(),
                'reason': limits.refusal_text(why) if why else None}

    def sni_snapshot(self):
        """Per listen address with sni: its names and the services they land on (most
        specific first), the hello deadline, the clients reading their hello now, and
        those closed before a service was chosen (unmatched, bad by kind)."""
        reading = collections.Counter(reader.listener for reader in self.hellos)
        found = []
        seen = set()
        for service in self.services.values():
            for listener in service.listeners:
                if listener.sni is None or listener in seen:
                    continue
                seen.add(listener)
                bad = dict.fromkeys(HELLO_PROBLEMS, 0)
                bad.update(listener.bad)
                found.append({
                    'address': listener.text,
                    'names': [[pattern, owner.name] for pattern, owner in listener.sni.patterns()],
                    'hello_timeout': listener.hello_timeout, 'accept_proxy': listener.accept_proxy,
                    'reading': reading[listener] + listener.reading_elsewhere,
                    'unmatched': listener.unmatched, 'bad': bad,
                })
        return found

    def explain(self, service, client, sni=None, listen=None):
        """Which host `client` would get now, and why; changes nothing.

        On a listen with sni the server name comes first.  With listen (any
        spelling of the address) sni is the name a hello carries there (None:
        a hello without one); with service and sni, the name is matched at the
        first listen with sni of that service.  The answer is then about the
        service the name lands on (service None: the client would be closed),
        and sni_reason says why.  service alone explains that service as before."""
        try:
            client_ip = str(ipaddress.ip_address(client))
        except ValueError:
            raise AdminError(400, 'client must be an IP address, not %r' % client)
        if self.master is not None:
            self.master.read_counts()      # leastconns explains with every worker's connections
        if sni is not None:
            try:
                sni = normalize_server_name(sni)
            except ValueError as e:
                raise AdminError(400, 'sni %s' % e)
        routing = None
        if listen is not None and service is not None:
            raise AdminError(400, 'give service or listen, not both')
        if listen is not None:
            routing = self._explain_listen(self._listener_at(listen), sni)
        elif service is None:
            raise AdminError(400, 'explain needs service or listen')
        elif sni is not None:
            asked = self._service(service)
            for listener in asked.listeners:
                if listener.sni is not None:
                    routing = self._explain_listen(listener, sni)
                    break
            else:
                routing = {'listen': None, 'sni': sni, 'sni_pattern': None, 'service': asked,
                           'sni_reason': 'the listens of service %s have no sni: the name does '
                                         'not choose its clients\' service' % asked.name}
        if routing is None:
            answer = self._explain_service(self._service(service), client_ip)
            answer.update(listen=None, sni=None, sni_pattern=None, sni_reason=None)
            return answer
        chosen = routing.pop('service')
        if chosen is None:
            answer = {'service': None, 'group': None, 'client': client_ip, 'allowed': False,
                      'scheduler': None, 'host': None, 'address': None, 'reason': routing['sni_reason'],
                      'sticky': None, 'ranking': None, 'skipped': [], 'check': None, 'ramping': [], 'from_dns': {},
                      'protocol': None, 'sessions': None, 'clients': None}
        else:
            answer = self._explain_service(chosen, client_ip)
        answer.update(routing)
        return answer

    def _listener_at(self, text):
        """The open listener at an address as an admin request gives it; AdminError if none."""
        try:
            host, port = parse_address(text)
        except ValueError as e:
            raise AdminError(400, 'listen %s' % e)
        key = address_key(host, port)
        for service in self.services.values():
            for listener in service.listeners:
                if listener.listen.key[:2] == key:    # TCP's first, then UDP's (service order)
                    return listener
        raise AdminError(404, 'no listen at %r' % text)

    def _explain_listen(self, listener, name):
        """Which service a hello naming `name` lands on at listener, and why."""
        shown = 'server name %r' % name if name is not None else 'a hello without a server name'
        where = listener.text
        if listener.sni is None:
            return {'listen': where, 'sni': name, 'sni_pattern': None, 'service': listener.service,
                    'sni_reason': 'listen %s has no sni: every client goes to service %s'
                                  % (where, listener.service.name)}
        match = listener.sni.match(name)
        if match is None:
            why = ('no service on %s takes %s, and none has \'*\': the client is closed before any '
                   'backend is contacted' % (where, shown))
            return {'listen': where, 'sni': name, 'sni_pattern': None, 'service': None, 'sni_reason': why}
        service, pattern = match
        if pattern == '*':
            why = ('%s matches no name or \'*.\' pattern on %s, so it goes to service %s, which has \'*\''
                   % (shown, where, service.name))
        elif pattern.startswith('*.'):
            why = ('%s matches %r of service %s on %s (exact names first, then the longest \'*.\' '
                   'suffix, then \'*\')' % (shown, pattern, service.name, where))
        else:
            why = '%s is claimed exactly by service %s on %s' % (shown, service.name, where)
        return {'listen': where, 'sni': name, 'sni_pattern': pattern, 'service': service, 'sni_reason': why}

    def _explain_service(self, service, client_ip):
        group = service.enabled
        scheduler = group.scheduler
        allowed = not service.config.acl or acl_allows(service.config.acl, client_ip)
        protocol = service.config.protocol
        answer = {'service': service.name, 'group': group.name, 'client': client_ip,
                  'allowed': allowed, 'scheduler': scheduler.spec,
                  'host': None, 'address': None, 'reason': '', 'sticky': None,
                  'ranking': None, 'skipped': [], 'check': check_text(service.check, protocol),
                  # slow start: [host, effective weight, weight, seconds left] of each ramping host
                  'ramping': [[h.name, effective, h.weight, left] for h, effective, left in scheduler.ramps()],
                  'protocol': protocol, 'sessions': None}
        if service.udp is not None and self.master is None:
            # The client's open sessions keep their hosts: only a new client address is picked for.
            answer['sessions'] = [[format_address(s.client_ip, s.client_port), s.listener.text, s.host.name]
                                  for s in service.udp.sessions.values()
                                  if s.host is not None and s.client_ip == client_ip]
        detail = scheduler.explain(client_ip)
        host = detail.get('host')
        answer.update((k, v) for k, v in detail.items() if k in ('reason', 'sticky', 'ranking', 'skipped'))
        # A down host's reason says which part of its check failed (status, expect, connect).
        for entry in answer['skipped']:
            other = scheduler.get_host(entry[0])
            if entry[1] == 'down' and other is not None and other.reason:
                entry[1] = 'down: %s' % other.reason
        if host is not None:
            answer['host'] = host.name
            answer['address'] = host.ip
        # Which hosts came from DNS, and from which <discover>.
        answer['from_dns'] = dict((h.name, h.config.discovered) for h in scheduler.hosts
                                  if h.config.discovered is not None)
        answer['clients'] = self.client_state(service, client_ip)
        if not allowed:
            answer['reason'] = 'denied by the allow/deny rules of service %s (would be: %s)' % (
                service.name, answer['reason'])
        return answer

    def running_config(self):
        """The running state as a Config, so it serialises to a loadable running.xml
        (which is also how workers are configured).  Copies of the config objects
        with what runs in place of what was read: the hosts, groups, schedulers,
        enabled groups and users.  Every other attribute is carried over as read,
        so none is lost on the way to the workers."""
        services = []
        for service in self.services.values():
            groups = []
            for group in service.groups.values():
                config = copy.copy(group.config)
                config.scheduler = group.scheduler.spec
                # A <discover> is written, not the hosts it found (they are the DNS's).
                config.hosts = [host.config for host in group.scheduler.hosts if host.config.discovered is None]
                groups.append(config)
            config = copy.copy(service.config)
            config.groups = groups
            config.enabled = service.enabled.name
            services.append(config)
        config = copy.copy(self.config)
        config.services = services
        if config.admin is not None:
            config.admin = copy.copy(config.admin)
            config.admin.users = list(self.users.values())
        return config

    def running_xml(self):
        return self.running_config().to_xml()


class Director(Actions):
    """Owns the running services: builds them from the config, starts and stops,
    accepts clients and finds them hosts.  Health, Switch and Reload are its
    parts; Actions holds what the admin calls."""

    def __init__(self, config, loop=None, rng=None, notifier=None, accept=True, resolve_names=True):
        self.loop = loop or Loop()
        # With worker processes (see Workers): a master's Director holds the truth and
        # does not accept (accept False; master is its side of the workers, a Master);
        # a worker's reports to its master (worker, its link to the master, a Worker),
        # counts in shared memory (worker_counts, a WorkerCounts) and listens on the
        # master's sockets (listen_sockets: address key -> socket).
        self.accept = accept
        self.master = None
        self.worker = None
        self.worker_counts = None
        self.listen_sockets = None
        self.udp_slots = 1          # a master's: sockets per UDP listen, one per worker (see DatagramListener)
        self.udp_reuseport = not accept     # a master's UDP sockets are SO_REUSEPORT groups
        self.notifier = notifier or Notifier({})    # main() passes the real one
        self.upgrader = None        # main()'s Upgrade: this process's upgrades (the admin's /upgrade)
        self.inherited = {}         # an upgrade's new generation: the old one's sockets (see Takeover)
        self.config = config
        self.loaded_xml = config.to_xml()
        self.rng = rng
        self.started = time.time()
        # The code running now came with the generation: 1 at start, one more each upgrade.
        self.generation = 1
        self.generation_started = self.started
        self.last_upgrade = None    # the last upgrade's outcome, for the pages: see Upgrade
        self.services = collections.OrderedDict()
        self.users = collections.OrderedDict((u.name, u) for u in config.admin.users) if config.admin else {}
        self.pairs = set()
        self.hellos = set()       # TLSHelloReaders: clients of listens with sni, before their service
        self.health = Health(self)
        self.history = History(self)    # started by start(): a worker keeps none, its master does
        self.live_hosts = {}            # hosts with open connections at the last count_live
        self.discovery = Discovery(self)
        self.access = AccessLog(self.loop)
        self.access.enabled = config.logging.access
        self.manager = None
        self.stopping = False
        self.stop_timer = None
        self.ramp_timer = None      # the next slow start step (see ramp_started)
        self.reloaded = None
        # The last reload's outcome, for the pages; the config loaded at start counts as one.
        self.last_reload = {'time': self.started, 'ok': True, 'error': None, 'success_time': self.started,
                            'undone': []}
        self.reload_lock = threading.Lock()
        self.reload_state = threading.Lock()    # over the two below: SIGHUPs coalesce
        self.reload_wanted = False
        self.reload_thread = False
        self.epoch_offset = time.time() - time.monotonic()   # loop time -> wall time, for pages
        for service_config in config.services:
            self.build_service(service_config, resolve_names=resolve_names)
        self.discovery.sync()

    # -- building ---------------------------------------------------------

    def make_scheduler(self, spec, hosts=()):
        return schedulers.make_scheduler(spec, hosts=hosts, clock=time.monotonic, rng=self.rng)

    def running_host(self, config, resolve_names):
        """A scheduler Host for a config Host; a name is resolved now only at start."""
        c = config
        live = schedulers.Host(c.name, c.ip, weight=c.weight, maxconns=c.maxconns, backup=c.backup)
        live.config = c
        live.send_proxy = c.send_proxy
        address = resolve_now(c.host, c.port)
        if address is None and resolve_names:
            try:
                address = resolve(c.host, c.port)
            except (socket.gaierror, UnicodeError) as e:
                live.health = schedulers.DOWN
                live.reason = 'cannot resolve %s: %s' % (c.host, e)
                live.since = time.time()
        elif address is None:
            live.health = schedulers.DOWN
            live.reason = 'not resolved yet'
            live.since = time.time()
        live.address = address
        return live

    def build_service(self, service_config, resolve_names):
        service = RunningService(service_config)
        self.datagram_settings(service)
        for group_config in service_config.groups:
            group = self.build_group(service, group_config, resolve_names)
            service.groups[group.name] = group
        service.enabled = service.groups[service_config.enabled]
        self.services[service.name] = service
        return service

    def build_group(self, service, group_config, resolve_names):
        hosts = [self.running_host(h, resolve_names) for h in group_config.hosts]
        group = RunningGroup(group_config, self.make_scheduler(group_config.scheduler, hosts))
        for host in hosts:
            self.health.watch(service, group, host)
        return group

    def datagram_settings(self, service):
        """A UDP service's table of sessions, made or given its (new) <udp> settings;
        a service that is TCP (now) has none."""
        if service.config.protocol == 'udp':
            if service.udp is None:
                service.udp = SessionTable(self, service)
            else:
                service.udp.configure(service.config)
        elif service.udp is not None:
            service.udp.close_all(END_SHUTDOWN)
            service.udp = None

    def add_running_host(self, service, group, config, resolve_names, checked_first=False):
        """checked_first: the host is down until its health checks pass (a host from DNS
        in a service with a <check>)."""
        host = self.running_host(config, resolve_names)
        if checked_first and host.health == schedulers.UP:
            host.health = schedulers.DOWN
            host.reason = 'new from DNS, not checked yet'
            host.since = time.time()
        group.scheduler.add_host(host)
        group.addresses[address_key(config.host, config.port)] = host
        self.health.watch(service, group, host)
        return host

    def remove_host(self, service, group, host):
        # Open connections keep their Host object and finish; the scheduler just stops offering it.
        group.scheduler.remove_host(host.name)
        key = address_key(*parse_address(host.ip))
        if group.addresses.get(key) is host:    # not a host of the file that took its address
            del group.addresses[key]
        self.health.forget(host)
        log.info('host %s (%s) removed from %s/%s (%d connection(s) left to finish)',
                 host.name, host.ip, service.name, group.name, host.open)

    def apply_discovered(self, service, group, discover, backends):
        """Make group's hosts from a <discover> (its key) these: [['ip:port', weight]].
        A host from DNS is known by its address and port, which its name says
        (discover-address-port): one that stays keeps its health, admin state and
        counters (its weight follows the answer); one gone is removed as a reload
        removes a host (no new clients, its connections finish); a new one is down
        until its health checks pass if the service has a <check>.  An address or
        name another host of the group holds (one of the file) is left to it.
        Returns (names added, names removed)."""
        scheduler = group.scheduler
        mine = collections.OrderedDict((h.name, h) for h in scheduler.hosts if h.config.discovered == discover)
        wanted = collections.OrderedDict()
        for ip, weight in backends:
            host, port = parse_address(ip)
            wanted['%s-%s-%d' % (discover, host, port)] = (ip, weight)
        removed = []
        for name, host in mine.items():
            if name not in wanted or group.addresses.get(address_key(host.config.host, host.config.port)) is not host:
                self.remove_host(service, group, host)
                removed.append(name)
        added = []
        for name, (ip, weight) in wanted.items():
            host = scheduler.get_host(name)
            if host is not None:
                if host.config.discovered == discover and host.weight != weight:
                    host.config = Host(name=name, ip=ip, weight=weight, discovered=discover)
                    scheduler.update_host(host, weight=weight)
                continue
            config = Host(name=name, ip=ip, weight=weight, discovered=discover)
            if address_key(config.host, config.port) not in group.addresses:
                self.add_running_host(service, group, config, False, checked_first=service.check is not None)
                added.append(name)
        if added or removed:
            shown = ['+' + n for n in added[:5]] + ['-' + n for n in removed[:5]]
            more = len(added) + len(removed) - len(shown)
            # A worker's are its master's: said there.
            log.log(logging.DEBUG if self.health.quiet else logging.INFO, 'discover %s in %s/%s: %d host(s) from '
                    'DNS: %s%s', discover, service.name, group.name, len(wanted), ', '.join(shown),
                    ' and %d more' % more if more else '')
        return added, removed

    # -- starting and stopping ---------------------------------------------

    def bind(self):
        """Open every listening socket, or none: on an error close what was opened and raise.
        Services that share an address (with sni) share its one socket."""
        try:
            for entries in listens_by_address(self.services.values()).values():
                listen = entries[0][1]
                self.attach(self.new_listener(listen), entries)
        except Exception:
            self._close_listeners()
            for service in self.services.values():
                service.listeners = []
            raise

    def start(self):
        self.bind()
        self.manager = Manager(self)
        self.manager.start()
        self.history.start()
        for service in self.services.values():
            log.info('service %s listening on %s, group %s enabled',
                     service.name, ', '.join(l.text for l in service.listeners), service.enabled.name)

    def new_listener(self, listen):
        """The listener of a listen address: a Listener, or for UDP a DatagramListener."""
        kind = DatagramListener if listen.protocol == 'udp' else Listener
        return kind(self, None, self.listen_socket(listen), listen)

    def listen_socket(self, listen):
        """A listening socket for a listen address: bound now, or in a worker the master's."""
        if self.listen_sockets is None and listen.protocol == 'udp':
            # A master's is the first of an SO_REUSEPORT group, a socket per worker
            # (DatagramListener.widen); a removed one its workers still read is no
            # obstacle then, so never reused.  An upgrade's new generation takes the
            # old one's first socket (the rest of the group it binds beside it).
            sock = self.inherited.pop(('listen', socket.SOCK_DGRAM, address_key(listen.host, listen.port)), None)
            if sock is not None:
                return sock
            return listen_socket(listen.host, listen.port, protocol='udp',
                                 reuseport=REUSEPORT and self.udp_reuseport)
        if self.listen_sockets is None:
            # A master reuses a listen's socket it removed but its workers may still hold;
            # an upgrade's new generation takes the old one's.
            sock = self.master.reuse(listen.key) if self.master is not None else None
            if sock is None:
                sock = self.inherited.pop(('listen', socket.SOCK_STREAM, listen.key), None)
            return sock if sock is not None else listen_socket(listen.host, listen.port)
        sock = self.listen_sockets.pop(listen.key, None)
        if sock is None:
            raise OSError(errno.EINVAL, 'cannot listen on %s: the master sent no socket for it' % listen.text)
        return sock

    def attach(self, listener, entries):
        """Point a listener at the services on its address: entries is
        [(RunningService, Listen)] as listens_by_address gives them.  On a listen
        with sni the clients' hellos choose among them, within the longest
        <timeouts connect> of theirs (none of them gets less than it asked for)."""
        first = entries[0][1]
        if first.sni is None:
            listener.service = entries[0][0]
            listener.configure(first)
        else:
            matcher = SniMatcher()
            for service, listen in entries:
                for pattern in listen.sni:
                    matcher.add(pattern, service)
            listener.service = None
            listener.configure(first, matcher, max(service.timeouts.connect for service, _ in entries))
        for service, _ in entries:
            service.listeners.append(listener)

    def start_accepting(self):
        """Accept on every listener from now on (an upgrade's new generation in one
        process, once it is ready: until then the old generation accepts)."""
        self.accept = True
        for service in self.services.values():
            for listener in service.listeners:
                if not listener.registered and listener.sock.fileno() >= 0:
                    listener.add_to_loop()
                    listener.registered = True

    def listen_addresses(self, service_name):
        """The (host, port) each listener of a service is bound to (tests use it)."""
        return [l.sock.getsockname()[:2] for l in self.services[service_name].listeners]

    def begin_stop(self, drain, handover=False):
        """Stop accepting; let open connections finish for up to `drain` seconds.
        handover: an upgrade's new generation serves from now on, so the clients
        still sending their TLS hello are served too, not closed."""
        if self.stopping:
            return
        self.stopping = True
        self.notifier.stopping()
        self._close_listeners(handover)
        if self.manager is not None:
            self.manager.stop()
        if self.master is not None:
            self.master.stop(drain, handover)    # the master stops once its last worker has
            return
        log.info('stopping: %d connection(s) open, waiting up to %g s', len(self.pairs) + len(self.hellos), drain)
        if not self.pairs and not self.hellos:
            self._stopped()
        else:
            self.stop_timer = self.loop.call_later(drain, self.stop_now)

    def stop_now(self):
        self.stopping = True
        self.notifier.stopping()
        self._close_listeners()
        if self.manager is not None:
            self.manager.stop()
        if self.master is not None:
            self.master.stop_now()
            return
        if self.pairs:
            log.info('closing %d connection(s) still open', len(self.pairs))
        for pair in list(self.pairs):
            pair.close(END_SHUTDOWN)
        self._stopped()

    def _stopped(self):
        self.access.flush()
        self.loop.stop()

    def _close_listeners(self, keep_hellos=False):
        for service in self.services.values():
            for listener in service.listeners:
                listener.close()
        if keep_hellos:
            return
        # Clients still sending their hello have no service yet: nothing to drain.
        for reader in list(self.hellos):
            reader.close(END_SHUTDOWN)

    # -- reload -------------------------------------------------------------

    def reload(self):
        """Re-read the config file (in this thread: never call it on the loop) and
        apply the difference on the loop.  AdminError 400 when the file is bad."""
        with self.reload_lock:
            self.notifier.reloading()
            try:
                path = self.config.path
                try:
                    new = load_config(path)
                except ConfigError as e:
                    log.error('reload failed: %s', e)
                    self.loop.call_soon_threadsafe(self.reload_failed, str(e))
                    raise AdminError(400, str(e))
                try:
                    return self.loop.call(self.apply_reload, new, timeout=60.0)
                except LoopTimeout:
                    self.loop.call_soon_threadsafe(self.reload_failed, 'the loop did not answer within 60 s')
                    raise
            finally:
                self.notifier.ready()   # after a failed reload too: the old config keeps running

    def save_config(self, force=None):
        """Write the running config to the config file (write_config_file: atomically,
        the previous file kept as FILE.bak), which is then the file as last loaded.
        AdminError 409 when the file changed on disk since it was last loaded, unless
        force is '1'.  In this thread (never on the loop): the loop only hands over
        the running config."""
        if force not in (None, '0', '1'):
            raise AdminError(400, 'force must be 1 or 0, not %r' % force)
        with self.reload_lock:
            xml, loaded, path = self.loop.call(self._running_and_loaded, timeout=60.0)
            previous = problem = None
            try:
                if os.path.lexists(path):
                    previous = read_config_file(path)
                else:
                    problem = '%s is missing' % path
            except ConfigError as e:
                problem = str(e)
            if previous is not None and hashlib.sha256(previous).hexdigest() != loaded.digest:
                problem = '%s changed on disk since it was last loaded' % path
            if problem is not None and force != '1':
                raise AdminError(409, '%s; reload it, or saveConfig with force=1 to write over it' % problem)
            data = xml.encode('utf-8')
            try:
                saved = parse_config(data, path)
            except ConfigError as e:    # a bug: running.xml must always load
                raise AdminError(500, 'the running config does not load: %s' % e)
            saved.digest = hashlib.sha256(data).hexdigest()
            if problem is None and config_tree_text(saved) == config_tree_text(loaded):
                return 'the config file %s holds the running config already: not written' % path
            try:
                backup = write_config_file(path, data, previous)
            except OSError as e:
                raise AdminError(500, 'cannot write %s: %s' % (path, e.strerror or e))
            self.loop.call(self._loaded, saved, timeout=60.0)
            return 'saved the running config to %s%s' % (path, '' if backup is None else
                                                          '; the previous file is %s' % backup)

    def upgrade(self):
        """The admin's /upgrade: run the program as it is on disk now, without losing a
        connection (see Upgrade).  In this thread, never on the loop: the new code's
        check takes a while."""
        if self.upgrader is None:
            raise AdminError(409, 'only pydirector started from its command line can upgrade')
        return self.upgrader.request()

    def after_fork(self):
        """In an upgrade's old generation, forked by the loop thread (see Upgrade): the
        other threads stayed in the parent, with the locks they held."""
        self.reload_lock = threading.Lock()
        self.reload_state = threading.Lock()
        self.reload_wanted = self.reload_thread = False
        if self.manager is not None:
            self.manager.after_fork()
        if self.master is not None:
            self.master.after_fork()

    def _running_and_loaded(self):
        return self.running_xml(), self.config, self.config.path

    def _loaded(self, config):
        """The config file now holds config: runtime changes count from it."""
        self.config = config
        self.loaded_xml = config.to_xml()

    def reload_in_background(self):
        """SIGHUP: read the file in a thread of its own, so the loop never waits on it.
        Those that come while it runs make one more reload after it, not one each:
        that one reads the file as it is by then."""
        with self.reload_state:
            self.reload_wanted = True
            if self.reload_thread:
                return
            self.reload_thread = True
        start_thread(self._reload_while_wanted, 'pydirector-reload')

    def _reload_while_wanted(self):
        while True:
            with self.reload_state:
                if not self.reload_wanted:
                    self.reload_thread = False
                    return
                self.reload_wanted = False
            try:
                self.reload()
            except (AdminError, LoopTimeout):
                pass    # logged; the old config keeps running
            except Exception:
                log.exception('reload failed unexpectedly')

    def apply_reload(self, new):
        """On the loop: make the running services what the new Config says."""
        reload = Reload(self, new)
        try:
            message = reload.apply()
        except AdminError as e:
            log.error('reload failed: %s', e.message)
            self.reload_failed(e.message)
            raise
        self.access.flush()
        self.last_reload = {'time': self.reloaded, 'ok': True, 'error': None, 'success_time': self.reloaded,
                            'undone': reload.undone}
        # Undone runtime changes are a warning: someone's change is gone.
        level = logging.WARNING if reload.undone else logging.INFO
        log.log(logging.DEBUG if self.worker is not None else level, '%s', message)
        if self.worker is None:
            for line in config_warnings(new):
                log.warning('%s', line)
        if self.master is not None:
            self.master.reloaded()
        return message

    def reload_failed(self, error):
        """On the loop: the last reload failed (error: 'FILE:LINE: why'); the config
        running stays, and so does the time of the last success."""
        self.last_reload = dict(self.last_reload, time=time.time(), ok=False, error=error, undone=[])

    # -- connections --------------------------------------------------------

    def on_accept(self, listener, client_sock, client_addr):
        service = listener.service
        service.accepted += 1
        service.open += 1
        pair = Pair(self, service, client_sock, client_addr)
        self.pairs.add(pair)
        maxconns = service.config.maxconns
        if maxconns and (service.open > maxconns if self.worker_counts is None else self.worker_counts.service_full(service)):
            self.refuse_full(service, pair)
        elif listener.accept_proxy is None:
            self.route(pair)
        elif listener.trusted and not acl_allows(listener.trusted, pair.client_ip):
            service.denied += 1
            log.warning('client %s:%s in %s: not a trusted proxy', pair.client_ip, pair.client_port, service.name)
            pair.close(END_DENIED)
        else:
            pair.read_proxy_header(listener.accept_proxy)

    def on_accept_sni(self, listener, client_sock, client_addr):
        """A client of a listen with sni: its hello comes first (TLSHelloReader, then hello_read)."""
        reader = TLSHelloReader(self, listener, client_sock, client_addr)
        self.hellos.add(reader)
        if listener.trusted and not acl_allows(listener.trusted, reader.client_ip):
            reader.refuse('untrusted-proxy', 'not a trusted proxy', END_DENIED)

    def hello_read(self, reader, service):
        """From a TLSHelloReader: the hello chose service.  From here the client is
        any other of the service's: maxconns, allow/deny, the scheduler, failover;
        the bytes read so far go to the backend first, and again after a failover."""
        self.hellos.discard(reader)
        client_sock, reader.sock = reader.sock, None
        service.accepted += 1
        service.open += 1
        pair = Pair(self, service, client_sock, (reader.client_ip, reader.client_port))
        pair.started = reader.started
        pair.sni = reader.sni
        pair.proxy_dest = reader.proxy_dest
        pair.to_backend = bytes(reader.data)
        pair.bytes_in = len(pair.to_backend)
        self.pairs.add(pair)
        maxconns = service.config.maxconns
        if maxconns and (service.open > maxconns if self.worker_counts is None else self.worker_counts.service_full(service)):
            self.refuse_full(service, pair)
        else:
            self.route(pair)

    def hello_closed(self, reader, how):
        self.hellos.discard(reader)
        if self.access.enabled:
            self.access.connection(reader, how)
        self._check_drained()

    def refuse_full(self, service, pair):
        """A client over the service's maxconns: closed at once, logged once a second."""
        service.refused += 1
        if self.loop.now - service.full_logged >= 1.0:   # one line a second, not one per client
            service.full_logged = self.loop.now
            log.warning('service %s: %d connections open (maxconns), refusing new clients',
                        service.name, service.config.maxconns)
        pair.close(END_FULL)

    def route(self, pair):
        """A client whose address is known: check the service's rules and its
        per-client limits, then find it a host."""
        service = pair.service
        acl = service.config.acl
        if acl and not acl_allows(acl, pair.client_ip):
            service.denied += 1
            pair.close(END_DENIED)
            return
        limits = service.limits
        if limits is not None:
            ip = pair.client_ip
            entry = limits.admit(ip if ':' not in ip else limits.key(ip), self.loop.now)   # client_key, inlined
            if entry is None and self.client_limited(service, limits, pair):
                return
            pair.limit = entry
        pair.connect_next()

    def client_limited(self, service, limits, pair):
        """A client over its limits (limits.why): reset at once, before any backend is
        asked (True), or in mode log let through (False).  Logged at most once a second
        per service, saying how many refusals the line leaves out."""
        logged = service.limited_logged
        if self.loop.now - logged[0] < 1.0:
            logged[1] += 1
        else:
            log.warning('service %s: client %s %s: %s%s', service.name, format_address(pair.client_ip, pair.client_port),
                        'refused' if limits.enforce else 'would be refused (clients mode log)',
                        limits.refusal_text(limits.why),
                        ' (%d more since the last such line)' % logged[1] if logged[1] else '')
            logged[:] = [self.loop.now, 0]
        if not limits.enforce:
            return False
        pair.abort(END_LIMITED)
        return True

    def no_host(self, pair):
        """The scheduler has no host for this client: queue it if every host is only full."""
        service = pair.service
        if not pair.tried and pair.group.scheduler.full_only(()):
            pair.wait_in_queue()
            return
        if pair.tried:
            log.warning('client %s:%s in %s: gave up after %d host(s) failed',
                        pair.client_ip, pair.client_port, service.name, len(pair.tried))
        else:
            service.refused += 1
            log.warning('client %s:%s in %s: no host available in group %s',
                        pair.client_ip, pair.client_port, service.name, pair.group.name)
        pair.close()

    def connect_failed(self, pair, host, reason):
        """A backend refused or timed out: the host is down until its probes say otherwise.
        A worker marks it down at once and tells its master, which decides for all."""
        if self.health.set_state(pair.service, pair.group, host, schedulers.DOWN, reason) and self.worker is not None:
            self.worker.report_down(pair.service, pair.group, host, reason)

    # Hooks for a master (workers set): what changes here is told to every worker.

    def state_changed(self, service, group, host, state, cause):
        """From Health.set_state: a host's health or admin state changed."""
        if self.master is not None:
            self.master.send_all('host', service=service.name, group=group.name, host=host.name,
                                 state=state, cause=cause)

    def address_changed(self, service, group, host):
        """From Health: a probe resolved a host's name to a new address."""
        if self.master is not None:
            self.master.send_all('address', service=service.name, group=group.name, host=host.name,
                                 address=address_to_json(host.address))

    def rolled_back(self, service, group):
        """From Switch: the switch was undone, group is enabled again."""
        if self.master is not None:
            self.master.replay('enable_group', (service.name, group.name), {})

    def host_up(self, service, group):
        """From Health: a host of group came up."""
        if service.queue:
            self._serve_queue(service)

    def ramp_started(self):
        """From Health: a host began a slow start ramp; its steps are made on a timer
        (not by the picks), until no scheduler has a ramp left."""
        if self.ramp_timer is None:
            self.ramp_timer = self.loop.call_later(0, self._step_ramps)

    def _step_ramps(self):
        self.ramp_timer = None
        due = None
        for service in self.services.values():
            for group in service.groups.values():
                at = group.scheduler.step_ramps()
                if at is not None and (due is None or at < due):
                    due = at
        if due is not None:
            # The schedulers' clock is time.monotonic, as the loop's.
            self.ramp_timer = self.loop.call_later(max(0.0, due - time.monotonic()), self._step_ramps)

    def _serve_queue(self, service):
        """Hand freed slots to waiting clients, first come first served (in a worker:
        across workers, so a place goes to another's client that has waited longer)."""
        queue = service.queue
        counts = self.worker_counts
        while queue and not service.enabled.scheduler.full_only(()) and (
                counts is None or counts.first_in_line(service)):
            queue.popleft().leave_queue()
        if counts is not None:
            counts.queue_changed(service)

    def end_switch(self, service):
        if service.switch is not None:
            service.switch.cancel()
            service.switch = None

    def pause_accepting(self, err):
        """File descriptors are per process: when one accept or connect runs out, every listener waits."""
        for service in self.services.values():
            for listener in service.listeners:
                listener.pause(err)

    def close_host_connections(self, service, group, host):
        """<check on_down="close"> (HAProxy's on-marked-down shutdown-sessions): a host
        that stopped answering probes holds its clients hostage; reset them so they retry."""
        if self.master is not None:
            self.master.send_all('close_host', service=service.name, group=group.name, host=host.name)
        doomed = [pair for pair in self.pairs if pair.host is host and pair.state is STREAMING]
        if doomed:
            log.info('host %s (%s) down: closing its %d connection(s)', host.name, host.ip, len(doomed))
        for pair in doomed:
            pair.abort(END_HOST_DOWN)
        self.end_sessions(lambda session: session.host is host, END_HOST_DOWN)

    def count_live(self):
        """Set each host's live_in and live_out: what its open connections have relayed
        so far (bytes_in and bytes_out count a connection once it closes).  Added up
        when they are read, a page or a worker's publish, so a read costs nothing
        more.  Returns the hosts whose counts it set."""
        live = {}
        for pair in self.pairs:
            host = pair.host
            if host is not None:
                counts = live.get(host)
                if counts is None:
                    live[host] = [pair.bytes_in, pair.bytes_out]
                else:
                    counts[0] += pair.bytes_in
                    counts[1] += pair.bytes_out
        gone = [host for host in self.live_hosts if host not in live]
        for host in gone:
            host.live_in = host.live_out = 0
        for host, (sent, received) in live.items():
            host.live_in, host.live_out = sent, received
        self.live_hosts = live
        return gone + list(live)

    def pair_closed(self, pair, how):
        self.pairs.discard(pair)
        service = pair.service
        service.open -= 1
        if pair.limit is not None and service.limits is not None:
            service.limits.release(pair.limit, self.loop.now)
        if service.queue and pair.host is not None:
            self._serve_queue(service)
        if self.worker_counts is not None:
            self.worker_counts.closed(pair)
        if self.access.enabled:
            self.access.connection(pair, how)
        self._check_drained()

    def _check_drained(self):
        if self.stopping and not self.pairs and not self.hellos and self.master is None:
            if self.stop_timer is not None:
                self.stop_timer.cancel()
            self._stopped()

    # UDP sessions (see Datagrams); a stop ends them with their listeners, at once.

    def session_closed(self, session, how):
        if self.worker_counts is not None:
            self.worker_counts.closed(session)
        if self.access.enabled:
            self.access.connection(session, how)

    def end_sessions(self, which, how):
        """End the UDP sessions for which which(session) is true."""
        for service in self.services.values():
            if service.udp is not None:
                for session in [s for s in service.udp.sessions.values() if which(s)]:
                    session.close(how)
# ---------------------------------------------------------------------------
# Workers: a master process and N data-plane worker processes (<pdconfig
# workers="N|auto">, --workers).
#
# The master reads the config, binds every listen, drops privileges, runs the
# manager and the admin, and alone owns configuration, host health and admin
# state; its Director accepts nothing.  Each worker is a new interpreter
# (spawned, never forked: a fork of a process running threads may inherit a
# lock some other thread held), handed the master's listening sockets, one end
# of a Channel and the SharedCounters file.  It builds its Director from the
# config the master sends first and then accepts on those sockets, which
# every worker shares: a worker that exits loses no connection the kernel
# has queued.  Every change the master makes goes down each Channel as a
# command, applied by the same Director method on the worker's own loop; a
# worker sends up what it saw (a failed connect, a new sticky entry).
# Counters go up through the shared file, where limits are checked too.
# ---------------------------------------------------------------------------

CHANNEL_MAX = 256 << 20     # bytes of one message (a config with many hosts and sticky entries)
CHANNEL_READ = 262144       # bytes one read takes
CHANNEL_FDS = 64            # file descriptors one read may bring (listening sockets), and one send takes
CHANNEL_BACKLOG = 64 << 20  # bytes waiting for a peer that does not read: past it, the peer is given up


class Channel(object):
    """One end of the AF_UNIX socketpair between the master and a worker.

    A message is a 4-byte big-endian length and that much JSON; listening
    sockets travel with one as SCM_RIGHTS (socket.sendmsg, 3.3+), and the
    message says how many ('fds').  They go CHANNEL_FDS at a time, each batch
    with one byte of the message (the last with the rest): one read takes at
    most one batch, as Linux ends a read after data that brought fds.  Both
    ends are non-blocking and watched by their loop: what the kernel refuses
    waits in the outbox, with write interest registered only while it does.
    on_message(message, fds) gets each message whole, in order, with the
    sockets sent along with it; on_lost() is called once, when the peer has
    gone or sent nonsense.  A read whose fds were cut off is nonsense too: the
    messages after it would take the wrong sockets.
    """

    def __init__(self, loop, sock, on_message, on_lost, inbox=b'', fds=()):
        self.loop = loop
        self.sock = sock
        sock.setblocking(False)
        self.fd = sock.fileno()
        self.on_message = on_message
        self.on_lost = on_lost
        self.inbox = bytearray(inbox)
        self.fds = list(fds)                # received, not yet taken by a message
        self.outbox = collections.deque()   # [data, fds] the kernel has not taken yet
        self.waiting = 0                    # bytes in the outbox
        self.events = EVENT_READ
        self.closed = False
        loop.add(self.fd, EVENT_READ, self._on_event)
        if inbox:
            loop.call_soon(self._deliver)   # read with the first message: no event will say so

    def __repr__(self):
        return '<Channel fd %d>' % self.fd

    def send(self, message, fds=()):
        if self.closed:
            return
        if fds:
            message['fds'] = len(fds)
        data = self.encode(message)
        self.waiting += len(data)
        idle = not self.outbox
        fds = list(fds)
        while len(fds) > CHANNEL_FDS:       # (a message is far longer than its count of batches)
            self.outbox.append([data[:1], fds[:CHANNEL_FDS]])
            data, fds = data[1:], fds[CHANNEL_FDS:]
        self.outbox.append([data, fds])
        if idle:
            self._flush()
        elif self.waiting > CHANNEL_BACKLOG:
            # A peer that reads nothing (stopped, stuck): memory is not to grow without end.
            log.error('%r: %d bytes wait for a peer that does not read; giving it up', self, self.waiting)
            self.lost()

    def _flush(self):
        outbox = self.outbox
        while outbox:
            data, fds = outbox[0]
            try:
                if fds:
                    sent = self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                       array.array('i', fds).tobytes())])
                    outbox[0][1] = []       # they went with the first byte
                else:
                    sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.lost()
                return
            self.waiting -= sent
            if sent < len(data):
                outbox[0][0] = memoryview(data)[sent:]
                break
            outbox.popleft()
        self._watch(EVENT_READ | (EVENT_WRITE if outbox else 0))

    def _watch(self, events):
        if events != self.events and not self.closed:
            self.loop.modify(self.fd, events, self._on_event)
            self.events = events

    def _on_event(self, mask):
        if mask & EVENT_WRITE and self.outbox:
            self._flush()
        if mask & EVENT_READ and not self.closed:
            self._read()

    def _read(self):
        for _ in range(16):         # then let the loop serve the rest
            try:
                data, fds = self.recv(self.sock)
            except (BlockingIOError, InterruptedError):
                return
            except ValueError as e:
                log.error('%r: %s', self, e)
                self.lost()
                return
            except OSError:
                self.lost()
                return
            self.fds.extend(fds)
            if not data:
                self.lost()
                return
            self.inbox += data
            if not self._deliver():
                return

    @staticmethod
    def encode(message):
        """A message as it goes on the wire: its length, then its JSON."""
        data = json.dumps(message, separators=(',', ':')).encode('utf-8')
        return len(data).to_bytes(4, 'big') + data

    @staticmethod
    def recv(sock):
        """One read: (bytes, the fds that came with them); ValueError if fds were cut off."""
        data, ancillary, flags, _ = sock.recvmsg(CHANNEL_READ, socket.CMSG_SPACE(CHANNEL_FDS * 4))
        fds = array.array('i')
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
        if flags & getattr(socket, 'MSG_CTRUNC', 0):
            for fd in fds:
                os.close(fd)
            raise ValueError('file descriptors sent along were cut off')
        return data, list(fds)

    def _deliver(self):
        inbox = self.inbox
        start = 0
        try:
            while len(inbox) - start >= 4:
                size = int.from_bytes(inbox[start:start + 4], 'big')
                if size > CHANNEL_MAX:
                    raise ValueError('a message of %d bytes' % size)
                end = start + 4 + size
                if len(inbox) < end:
                    break
                message = json.loads(bytes(inbox[start + 4:end]).decode('utf-8'))
                start = end
                count = message.get('fds', 0) if isinstance(message, dict) else 0
                fds, self.fds = self.fds[:count], self.fds[count:]
                self.on_message(message, fds)
                if self.closed:
                    return False
        except ValueError as e:
            log.error('%r: bad message: %s', self, e)
            self.lost()
            return False
        finally:
            del inbox[:start]
        return True

    def lost(self):
        """Close this end and tell the owner, once."""
        if self.closed:
            return
        self.close()
        self.on_lost()

    def close(self):
        if self.closed:
            return
        self.closed = True
        self.loop.forget(self.fd)
        self.sock.close()
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        self.outbox.clear()
        self.waiting = 0

    close_on_error = lost

    @classmethod
    def receive(cls, sock, timeout):
        """The first message, read blocking (before the loop runs): (message, the bytes
        after it, the fds that came with those), for the Channel made next.  A message
        the master sent meanwhile may have come in the same read, with its sockets."""
        sock.settimeout(timeout)
        data = b''
        fds = []
        try:
            while True:
                if len(data) >= 4:
                    size = int.from_bytes(data[:4], 'big')
                    if size > CHANNEL_MAX:
                        raise ValueError('a message of %d bytes' % size)
                    if len(data) >= 4 + size:
                        return json.loads(data[4:4 + size].decode('utf-8')), data[4 + size:], fds
                chunk, more = cls.recv(sock)
                fds.extend(more)
                if not chunk:
                    raise ValueError('the channel closed before the first message')
                data += chunk
        except Exception:
            for fd in fds:
                os.close(fd)
            raise


COUNTER_FIELDS = 16     # int64s in a line: 128 bytes, two cache lines of its own, so no two processes write one
HEARTBEAT_SLOT = 0      # slot 0 is the processes' own: see the 'process' rows below


class Counter(object):
    """A field of a counted thing's line in the SharedCounters: a row of COUNTERS.

    kind: of the thing ('service', 'host', 'address'; 'process', the line of
    each process in slot 0); a kind's fields take the places of its line in
    the table's order.  gauge: a value of now (open connections, a queue),
    not a count that only grows: a worker that dies takes it along, where its
    counts are kept (SharedCounters.fold).  value: what a worker writes, the
    attribute of its running object by that name or a function of (its
    WorkerCounts, the object); None: code of its own writes it.  into: where
    the master puts the sum over every process, the attribute by that name
    or a function of (the object, the sum, the host's group); by default the
    attribute value names, if it names one (else nowhere).  at_close: a
    service's field written as each of its clients closes (WorkerCounts.closed),
    not only at the next tick.
    """

    __slots__ = ('kind', 'name', 'value', 'gauge', 'into', 'at_close')

    def __init__(self, kind, name, value, gauge=False, into=None, at_close=True):
        self.kind = kind
        self.name = name
        self.value = value
        self.gauge = gauge
        self.into = into if into is not None or not isinstance(value, str) else value
        self.at_close = at_close


def worker_open(counts, host):
    """A worker's own connections to a host: its Host counts the other workers' too."""
    return host.open - counts.others.get(host, 0)


def hellos_reading(counts, listener):
    """A listener's clients reading their hello (counted once a publish, which resets counts.reading)."""
    if counts.reading is None:
        counts.reading = collections.Counter(reader.listener for reader in counts.director.hellos)
    return counts.reading[listener]


def _set_bad(kind):
    def into(listener, value, group):
        listener.bad[kind] = value
    return into


COUNTERS = (
    Counter('process', 'heartbeat', None, gauge=True),     # when its loop last ran its tick (monotonic µs; 0: not yet)
    Counter('process', 'log_dropped', None),    # the log lines its targets dropped (log_output.dropped), a count
    Counter('service', 'open', 'open', gauge=True),
    Counter('service', 'accepted', 'accepted'),
    Counter('service', 'failovers', 'failovers'),
    Counter('service', 'refused', 'refused'),
    Counter('service', 'denied', 'denied'),
    # <clients>: at each tick, so that a service without them pays nothing as clients close.
    Counter('service', 'limited', 'limited', at_close=False),           # refused
    Counter('service', 'limited_dry', 'limited_dry', at_close=False),   # that mode log would have refused
    Counter('service', 'client_evictions', 'client_evictions', at_close=False),
    Counter('service', 'client_entries', lambda counts, service: len(service.limits.table)
            if service.limits is not None else 0, gauge=True, into='client_entries', at_close=False),
    Counter('service', 'queued', lambda counts, service: len(service.queue), gauge=True, into='waiting'),
    # When the first client of this process's queue came (monotonic µs; 0: none): whose turn it is.
    Counter('service', 'head', lambda counts, service: queue_head(service), gauge=True),
    # A UDP service's (a TCP one's stay 0): sessions evicted, datagrams dropped, from clients and to them.
    Counter('service', 'evicted', 'evicted'),
    Counter('service', 'dropped', 'dropped'),
    Counter('service', 'datagrams_in', 'datagrams_in'),
    Counter('service', 'datagrams_out', 'datagrams_out'),
    Counter('host', 'open', worker_open, gauge=True,
            into=lambda host, value, group: group.scheduler.set_open(host, value)),   # its structures kept in step
    Counter('host', 'total', 'total'),
    Counter('host', 'bytes_in', 'bytes_in'),
    Counter('host', 'bytes_out', 'bytes_out'),
    Counter('host', 'connect_errors', 'connect_errors'),
    Counter('host', 'retries', 'retries'),
    # The bytes of its open connections so far, as Director.count_live last added them up.
    Counter('host', 'live_in', 'live_in', gauge=True),
    Counter('host', 'live_out', 'live_out', gauge=True),
    Counter('address', 'reading', hellos_reading, gauge=True, into='reading_elsewhere'),
    Counter('address', 'unmatched', 'unmatched'),
) + tuple(Counter('address', 'bad ' + kind, lambda counts, listener, kind=kind: listener.bad.get(kind, 0),
                  into=_set_bad(kind)) for kind in HELLO_PROBLEMS)


def _counter_places():
    places = {}
    for row in COUNTERS:
        places[row.kind, row.name] = sum(1 for key in places if key[0] == row.kind)
    return places


COUNTER_PLACE = _counter_places()       # (kind, name) -> its place in the kind's line
GAUGES = dict((kind, frozenset(COUNTER_PLACE[kind, row.name] for row in COUNTERS if row.kind == kind and row.gauge))
              for kind in set(row.kind for row in COUNTERS))


def _reads():
    reads = collections.defaultdict(list)
    for row in COUNTERS:
        if isinstance(row.into, str):
            reads[row.kind].append((COUNTER_PLACE[row.kind, row.name],
                                    lambda thing, value, group, name=row.into: setattr(thing, name, value)))
        elif row.into is not None:
            reads[row.kind].append((COUNTER_PLACE[row.kind, row.name], row.into))
    return reads


COUNTER_READS = _reads()    # kind -> [(place, a function of (object, sum, group) that puts it)]: Master.read_counts
# The places the limits and the pages read by themselves.
HEARTBEAT = COUNTER_PLACE['process', 'heartbeat']
LOG_DROPPED = COUNTER_PLACE['process', 'log_dropped']
SERVICE_OPEN, SERVICE_ACCEPTED, SERVICE_QUEUED, SERVICE_HEAD = (
    COUNTER_PLACE['service', name] for name in ('open', 'accepted', 'queued', 'head'))
HOST_OPEN = COUNTER_PLACE['host', 'open']


class SharedCounters(object):
    """Counters every process of a master and its workers sees: a file each of
    them maps (mmap, MAP_SHARED), unlinked from the start and passed by fd.

    Each counted thing (a service, a host, a listen address) has a slot the
    master gives it, and each process a row: the line of (slot, row) is
    COUNTER_FIELDS int64s at ((slot * rows) + row) * COUNTER_FIELDS, so a
    thing's lines lie together and no two processes write the same cache
    line.  Row i-1 is worker i's, written only by it; the last row is the
    master's, holding what workers that died had counted, so that totals
    never go back.  Slot 0 is no thing's: there each worker stamps its
    heartbeat.  A thing with a limit is checked and taken under
    fcntl.lockf on byte `slot` of the file: two workers never both take the
    last free place.
    """

    def __init__(self, fd, rows, row, size):
        import fcntl
        import mmap
        self._fcntl = fcntl
        self._mmap = mmap
        self.fd = fd
        self.rows = rows
        self.row = row
        self.memory = None
        self.view = None
        self.remap(size)

    @classmethod
    def create(cls, rows, capacity):
        """A new file for `rows` processes and `capacity` slots (the master's)."""
        directory = '/dev/shm' if os.path.isdir('/dev/shm') and os.access('/dev/shm', os.W_OK) else None
        if hasattr(os, 'memfd_create'):         # Linux, 3.8+: no file system at all
            fd = os.memfd_create('pydirector-counters')
        else:
            import tempfile
            fd, path = tempfile.mkstemp(prefix='pydirector-counters-', dir=directory)
            os.unlink(path)
        size = capacity * rows * COUNTER_FIELDS * 8
        os.ftruncate(fd, size)
        return cls(fd, rows, rows - 1, size)

    def remap(self, size):
        """Map the file again at its new size (the master grew it)."""
        if self.view is not None:
            self.view.release()
            self.memory.close()
        self.memory = self._mmap.mmap(self.fd, size)
        self.view = memoryview(self.memory).cast('q')
        self.size = size
        self.capacity = size // (self.rows * COUNTER_FIELDS * 8)

    def grow(self, capacity):
        """The master: room for `capacity` slots (existing lines stay where they are)."""
        size = capacity * self.rows * COUNTER_FIELDS * 8
        os.ftruncate(self.fd, size)
        self.remap(size)

    def line(self, slot, row):
        return (slot * self.rows + row) * COUNTER_FIELDS

    def lock(self, slot):
        self._fcntl.lockf(self.fd, self._fcntl.LOCK_EX, 1, slot)

    def unlock(self, slot):
        self._fcntl.lockf(self.fd, self._fcntl.LOCK_UN, 1, slot)

    def sums(self, slot):
        """The fields of a slot summed over every row."""
        view = self.view
        base = slot * self.rows * COUNTER_FIELDS
        total = list(view[base:base + COUNTER_FIELDS])
        for row in range(1, self.rows):
            at = base + row * COUNTER_FIELDS
            for field, value in enumerate(view[at:at + COUNTER_FIELDS]):
                if value:
                    total[field] += value
        return total

    def zero(self, slot, row):
        at = self.line(slot, row)
        self.view[at:at + COUNTER_FIELDS] = _ZERO_LINE

    def fold(self, row, kinds):
        """A worker died: add its counts (all but the gauges) to the master's row and
        clear its row.  kinds: slot -> 'host', 'service' or 'address'."""
        view = self.view
        mine = self.rows - 1
        for slot in range(self.capacity):
            at = self.line(slot, row)
            values = view[at:at + COUNTER_FIELDS]
            if not any(values):
                continue
            gauges = GAUGES.get(kinds.get(slot), ())
            into = self.line(slot, mine)
            for field, value in enumerate(values):
                if value and field not in gauges:
                    view[into + field] += value
            self.zero(slot, row)

    def close(self):
        if self.view is not None:
            self.view.release()
            self.memory.close()
            self.view = None
            os.close(self.fd)


_ZERO_LINE = memoryview(bytes(COUNTER_FIELDS * 8)).cast('q')

def queue_head(service):
    """When the first client in a service's queue was accepted, in µs of the monotonic
    clock (one clock for every process on Linux), or 0: the queue is empty."""
    return int(service.queue[0].started * 1e6) if service.queue else 0


def counted_things(services):
    """(running object, slot key, the host's group or None) of everything counted:
    each service, host and TCP listen address once (a UDP one has no hellos to count).
    The key names it in every process: ('service', name), ('host', service, group,
    name), ('address', host, port) as Listen.key compares addresses."""
    found = []
    seen = set()
    for service in services:
        found.append((service, ('service', service.name), None))
        for group in service.groups.values():
            for host in group.scheduler.hosts:
                found.append((host, ('host', service.name, group.name, host.name), group))
        for listener in service.listeners:
            if listener not in seen and listener.listen.protocol == 'tcp':
                seen.add(listener)
                found.append((listener, ('address',) + listener.listen.key, None))
    return found


class WorkerCounts(object):
    """A worker's side of the SharedCounters (its Director's `worker_counts`).

    It writes its own row: the line of a closed client's service and host at
    once, the open count of every host whose load matters elsewhere (a host
    with maxconns, a host of a group whose scheduler reads_load: leastconns)
    each tick while connections come and go, and everything else every
    TICKS_FULL ticks, the bytes of the open connections too
    (Director.count_live).  In a worker, a
    Host's `open` counts every worker's connections to it: its own, kept
    exactly, plus the others' as last read (others[host]), re-read each tick
    for the hosts whose load matters, so the scheduler sees the whole load.
    A host or service with maxconns is checked and taken under its lock.
    """

    TICK = 0.05         # seconds: others' loads re-read, queues re-checked, our heartbeat stamped
    TICKS_FULL = 10     # every counter written every this many ticks (0.5 s)
    HEAD_FRESH = 0.5    # seconds: a worker silent for longer cannot serve its queue, so takes no turn

    def __init__(self, director, counters, clients=None):
        self.director = director
        self.counters = counters
        self.clients = clients  # the ClientShare, where the services' ClientLimits write
        self.attached = set()   # the ClientLimits written there
        self.slots = {}         # ('host', service, group, name) / ('service', name) / ('address', key) -> slot
        self.slot_of = {}       # running object -> slot
        self.own = {}           # running object -> the index of its line in this worker's row
        self.elsewhere = {}     # running object -> [the index of its line in each other row]
        self.kind_of = {}       # running object -> its kind ('service', 'host', 'address')
        self.others = {}        # host -> the other workers' open connections to it, as last read
        self.group_of = {}      # host -> its running group (whose scheduler keeps its load)
        self.aware = []         # hosts whose load other workers need (maxconns, reads_load)
        self.counted_services = []
        self.reading = None     # listener -> clients reading their hello, while a publish writes
        # kind -> [(place, a function giving its value from the running object)], as COUNTERS says.
        self.fields = collections.defaultdict(list)
        self.service_fields = []    # those written as a client closes
        for row in COUNTERS:
            if row.value is not None:
                get = operator.attrgetter(row.value) if isinstance(row.value, str) else row.value.__get__(self)
                self.fields[row.kind].append((COUNTER_PLACE[row.kind, row.name], get))
                if row.kind == 'service' and row.at_close:
                    self.service_fields.append((COUNTER_PLACE[row.kind, row.name], get))
        self.host_fields = self.fields['host']
        self.ticks = 0
        self.seen = None        # what the director had counted at the last tick
        self.seen_full = None
        row = counters.row
        self.heartbeat = counters.line(HEARTBEAT_SLOT, row) + HEARTBEAT
        # The other workers' heartbeats, in the order of each elsewhere list.
        self.heartbeats = [counters.line(HEARTBEAT_SLOT, r) + HEARTBEAT for r in range(counters.rows - 1) if r != row]
        self.process_line = counters.line(HEARTBEAT_SLOT, row)
        self.timer = director.loop.call_later(self.TICK, self.tick)

    def update(self, entries):
        """Slots from the master ([kind, names..., slot]: see counted_things), then the
        map of running objects again."""
        for entry in entries or ():
            self.slots[tuple(entry[:-1])] = entry[-1]
        self.rebuild()

    def remap(self, size):
        """The master grew the file: the lines stay where they were."""
        self.counters.remap(size)

    def rebuild(self):
        counters = self.counters
        row = counters.row
        old = self.slot_of
        self.slot_of, self.own, self.elsewhere, self.kind_of, self.group_of = {}, {}, {}, {}, {}
        self.aware = []
        for thing, key, group in counted_things(self.director.services.values()):
            if group is not None:
                self.group_of[thing] = group
            slot = self.slots.get(key)
            if slot is None or slot >= counters.capacity:
                continue
            self.slot_of[thing] = slot
            self.kind_of[thing] = key[0]
            self.own[thing] = counters.line(slot, row)
            self.elsewhere[thing] = [counters.line(slot, r) for r in range(counters.rows - 1) if r != row]
            if group is not None and (thing.maxconns or group.scheduler.reads_load):
                self.aware.append(thing)
        self.counted_services = [s for s in self.director.services.values() if s in self.own]
        self.attach_limits()
        for thing, slot in old.items():
            if self.slot_of.get(thing) != slot:
                counters.zero(slot, row)      # no longer ours to count: the master may reuse it
                if thing in self.others and thing not in self.slot_of:
                    self.set_others(thing, 0)
                    del self.others[thing]
        self.publish(list(self.slot_of))

    def attach_limits(self):
        """Each service's client limits write to the share under its slot (without one yet,
        they count in this worker alone); limits gone with a reload leave it."""
        share = self.clients
        if share is None:
            return
        current = set()
        for service in self.director.services.values():
            limits = service.limits
            if limits is not None:
                slot = self.slot_of.get(service)
                limits.attach(share if slot is not None else None, slot)
                current.add(limits)
        for limits in self.attached - current:
            limits.detach()
        self.attached = current

    def set_others(self, host, count):
        change = count - self.others.get(host, 0)
        if change:
            group = self.group_of.get(host)
            if group is not None:
                group.scheduler.set_open(host, host.open + change)    # which keeps its structures in step
            else:
                host.open += change     # in no scheduler any more
            self.others[host] = count

    def read_others(self, host, view):
        total = 0
        for at in self.elsewhere[host]:
            total += view[at + HOST_OPEN]
        return total

    # -- limits -------------------------------------------------------------

    def take_host(self, host):
        """A host with maxconns was picked: take one of its places across every worker,
        or (False) learn that it is full and let the scheduler see so."""
        slot = self.slot_of.get(host)
        if slot is None:
            return True
        counters = self.counters
        view = counters.view
        counters.lock(slot)
        try:
            others = self.read_others(host, view)
            own = worker_open(self, host)
            self.set_others(host, others)
            if own + others >= host.maxconns:
                return False
            view[self.own[host] + HOST_OPEN] = own + 1     # connection_started counts it here next
            return True
        finally:
            counters.unlock(slot)

    def service_full(self, service):
        """A client was accepted (counted in service.open already): over the service's
        maxconns across every worker?  If not, its place is taken."""
        slot = self.slot_of.get(service)
        if slot is None:
            return service.open > service.config.maxconns
        counters = self.counters
        view = counters.view
        counters.lock(slot)
        try:
            others = 0
            for at in self.elsewhere[service]:
                others += view[at + SERVICE_OPEN]
            if service.open + others > service.config.maxconns:
                return True
            view[self.own[service] + SERVICE_OPEN] = service.open
            return False
        finally:
            counters.unlock(slot)

    def first_in_line(self, service):
        """Whether this worker's first queued client has waited longest of any worker's
        (their rows say at once: queue_changed): only then may it take a free place.  A
        worker whose loop has not run for HEAD_FRESH (stopped, stuck) could not take the
        place: its head is passed over, and the place is not left idle."""
        at = self.own.get(service)
        if at is None:
            return True
        view = self.counters.view
        head = queue_head(service)
        fresh = int((time.monotonic() - self.HEAD_FRESH) * 1e6)
        for other, beat in zip(self.elsewhere[service], self.heartbeats):
            theirs = view[other + SERVICE_HEAD]
            if theirs and theirs < head and view[beat] >= fresh:
                return False
        return True

    def queue_full(self, service):
        """A client is to wait in the service's queue: is the queue full, counting every
        worker's (QUEUE_LIMIT holds in total)?  If not, its place is counted, under the
        service's lock, so two workers never both take the last one."""
        at = self.own.get(service)
        waiting = len(service.queue)
        if at is None:
            return waiting >= QUEUE_LIMIT
        slot = self.slot_of[service]
        counters = self.counters
        view = counters.view
        counters.lock(slot)
        try:
            for other in self.elsewhere[service]:
                waiting += view[other + SERVICE_QUEUED]
            if waiting >= QUEUE_LIMIT:
                return True
            view[at + SERVICE_QUEUED] = len(service.queue) + 1
            return False
        finally:
            counters.unlock(slot)

    def queue_changed(self, service):
        """A client joined or left this worker's queue: the other workers see it at once
        (whose turn it is, the queue limit), not at the next tick."""
        at = self.own.get(service)
        if at is not None:
            view = self.counters.view
            view[at + SERVICE_QUEUED] = len(service.queue)
            view[at + SERVICE_HEAD] = queue_head(service)

    # -- writing our row --------------------------------------------------------

    def closed(self, pair):
        """A client closed: its service's and host's lines now, before the master is asked."""
        view = self.counters.view
        own = self.own
        service = pair.service
        at = own.get(service)
        if at is not None:
            for place, get in self.service_fields:
                view[at + place] = get(service)
        host = pair.host
        if host is not None:
            at = own.get(host)
            if at is not None:
                for place, get in self.host_fields:
                    view[at + place] = get(host)

    def publish(self, things):
        view = self.counters.view
        own = self.own
        kind_of = self.kind_of
        fields = self.fields
        self.reading = None
        for thing in things:
            at = own.get(thing)
            if at is not None:
                for place, get in fields[kind_of[thing]]:
                    view[at + place] = get(thing)

    def publish_open(self, hosts):
        view = self.counters.view
        for host in hosts:
            at = self.own.get(host)
            if at is not None:
                view[at + HOST_OPEN] = worker_open(self, host)

    def beat(self):
        """Our heartbeat: the master kills a worker whose loop stops stamping it."""
        self.counters.view[self.heartbeat] = int(time.monotonic() * 1e6)

    def tick(self):
        """Every TICK: the heartbeat; our loads out and the others' in (hosts whose load
        matters), while clients come and go; every counter now and then; queued clients
        served when a place freed in any worker."""
        director = self.director
        self.beat()
        self.ticks += 1
        self.counters.view[self.process_line + LOG_DROPPED] = log_output.dropped
        # What changed since the last tick; a UDP session may serve many datagrams.
        now = (sum(s.accepted + s.datagrams_in + s.datagrams_out for s in director.services.values()),
               len(director.pairs), len(director.hellos))
        if now != self.seen:
            self.seen = now
            self.publish_open(self.aware)
            self.publish(self.counted_services)
        if self.ticks % self.TICKS_FULL == 0:
            live = director.count_live()    # bytes move with no client coming or going
            if now != self.seen_full:
                self.seen_full = now
                self.publish(list(self.slot_of))
            elif live:
                self.publish(live)
        if self.aware:
            view = self.counters.view
            for host in self.aware:
                self.set_others(host, self.read_others(host, view))
        for service in director.services.values():
            if service.queue:
                director._serve_queue(service)
        self.timer = director.loop.call_later(self.TICK, self.tick)

    def stop(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.director.count_live()
        self.publish(list(self.slot_of))
        self.counters.view[self.process_line + LOG_DROPPED] = log_output.dropped


WORKER_FIRST_MESSAGE = 60.0     # seconds a new worker waits for its config

DOWN, UP = 'down', 'up'         # a message from the master to a worker, from a worker to the master


class Message(object):
    """A kind of message between the master and a worker: a row of MESSAGES.

    A DOWN message is the master's to a worker, handled by Worker.<handler>; an
    UP one a worker's to its master, handled by Master.<handler>, given the
    WorkerProcess first.  Each field goes to the handler as a keyword argument
    (an optional one may be left out), and with fds the sockets sent along go
    as `fds`.  A DOWN message sent to every worker (Master.send_all) carries a
    sequence number too, 'seq', which the worker acknowledges once applied
    (Master.sync waits for that).  quiet: the master logs the change itself,
    so the worker applying it logs at debug level only (Worker.not_repeated).
    """

    __slots__ = ('kind', 'direction', 'handler', 'fields', 'optional', 'fds', 'quiet')

    def __init__(self, kind, direction, handler, fields='', optional='', fds=False, quiet=False):
        self.kind = kind
        self.direction = direction
        self.handler = handler
        self.fields = frozenset(fields.split())
        self.optional = frozenset(optional.split() + (['seq'] if direction == DOWN else []))
        self.fds = fds
        self.quiet = quiet

    def problem(self, names, fds):
        """What is wrong with a message of these field names (and sockets), or None."""
        missing = self.fields.difference(names)
        if missing:
            return 'no %s' % ', '.join(sorted(missing))
        unknown = names - self.fields - self.optional
        if unknown:
            return 'unknown %s' % ', '.join(sorted(unknown))
        if fds and not self.fds:
            return 'sockets sent along'
        return None


MESSAGES = dict((row.kind, row) for row in (
    # The first, read by run_worker before its loop runs: everything a worker starts from.
    Message('config', DOWN, None, 'seq generation worker workers xml path listens counters clients slots hosts '
                                  'sticky discovered'),
    Message('call', DOWN, 'on_call', 'method args kwargs slots', quiet=True),   # a replayed Actions method
    Message('host', DOWN, 'on_host', 'service group host state cause', quiet=True),
    Message('address', DOWN, 'on_address', 'service group host address'),
    Message('close_host', DOWN, 'on_close_host', 'service group host'),
    Message('sticky', DOWN, 'on_sticky', 'entries'),
    Message('reload', DOWN, 'on_reload', 'xml path generation hosts discovered listens slots', 'repair', fds=True,
            quiet=True),
    Message('counters', DOWN, 'on_counters', 'size'),
    Message('stop', DOWN, 'on_stop', 'drain', 'handover'),
    Message('stop_now', DOWN, 'on_stop_now'),
    Message('ready', UP, 'on_ready', 'pid seq generation'),
    Message('ack', UP, 'on_ack', 'seq generation'),
    Message('failed', UP, 'on_failed', 'what error repair'),
    Message('connect_failed', UP, 'on_connect_failed', 'service group host cause'),
    Message('new_sticky', UP, 'on_new_sticky', 'entries'),
))


def new_message(kind, direction, fields, fds=(), table=MESSAGES):
    """fields (a dict of its own) as a message of this kind for Channel.send, checked
    against its row (in MESSAGES, or the table given: HANDOVER): ValueError says what
    is wrong."""
    row = table.get(kind)
    if row is None or row.direction != direction:
        raise ValueError('no %s message %r' % (direction, kind))
    problem = row.problem(fields.keys(), fds)
    if problem is not None:
        raise ValueError('%s message: %s' % (kind, problem))
    fields['t'] = kind
    return fields


class MessageError(ValueError):
    """A message that is not what its row in MESSAGES says (or has no row)."""


def received(message, direction, fds, table=MESSAGES):
    """(row, fields) of a message the other side sent: the fields are what its handler
    takes (a DOWN message's 'seq' left out).  MessageError if it is no such message;
    the sockets that came with it are closed then."""
    kind = message.pop('t', None)
    message.pop('fds', None)
    if direction == DOWN:
        message.pop('seq', None)
    row = table.get(kind)
    if row is None or row.direction != direction or row.handler is None:
        problem = 'unknown message %r' % (kind,)
    else:
        problem = row.problem(message.keys(), fds)
        if problem is not None:
            problem = '%s message: %s' % (kind, problem)
    if problem is not None:
        for fd in fds:
            os.close(fd)
        raise MessageError(problem)
    if row.fds:
        message['fds'] = fds
    return row, message


class Worker(object):
    """A worker process's link to its master (its Director's `worker`).

    It applies each command from the master (on_message: the handler of its
    row in MESSAGES) with the Director's own methods, acknowledging each by
    its sequence number once applied, with the config generation it runs (the
    master's count of reloads); one it cannot apply it reports ('failed'),
    and runs no generation until the master has sent it the whole config
    again.  It tells the master of the hosts it found down and the sticky
    entries it made.  If the master goes (its channel closes: it exited or
    was killed), the worker stops accepting, lets its connections finish for
    up to <pdconfig drain>, and exits.
    """

    def __init__(self, director, sock, first, inbox, fds):
        self.director = director
        self.loop = director.loop
        self.index = first['worker']
        self.acked = first['seq']
        self.generation = first['generation']
        self.ack_due = False
        self.sticky_out = []
        self.applying = False       # while a change from the master is made: its info lines are the master's
        director.worker = self
        self.channel = Channel(self.loop, sock, self.on_message, self.master_gone, inbox, fds)
        log.addFilter(self.not_repeated)

    def not_repeated(self, record):
        """A logging filter: the master has logged what it asked for already."""
        return record.levelno > logging.INFO or not self.applying

    def send(self, kind, **fields):
        self.channel.send(new_message(kind, UP, fields))

    # -- from the master ------------------------------------------------------

    def on_message(self, message, fds):
        what = message.get('method', message.get('t'))
        repair = message.get('repair', False)
        seq = message.get('seq')
        try:
            row, fields = received(message, DOWN, fds)
            self.applying = row.quiet
            getattr(self, row.handler)(**fields)
        except Exception as e:
            # The master made this change already: a worker that cannot has strayed from it.
            # It says so, and the master sends it the whole config again (or restarts it).
            error = e.message if isinstance(e, AdminError) else str(e)
            if isinstance(e, (AdminError, ConfigError, MessageError)):
                log.error('cannot apply %s from the master: %s', log_value(what), escape_text(error))
            else:
                log.exception('cannot apply %s from the master', log_value(what))
            self.generation = None
            self.send('failed', what=what, error=error or type(e).__name__, repair=repair)
        finally:
            self.applying = False
        if seq is not None:
            self.acked = seq
            if not self.ack_due:
                self.ack_due = True
                self.loop.call_soon(self.send_ack)

    def send_ack(self):
        self.ack_due = False
        self.send('ack', seq=self.acked, generation=self.generation)

    def on_call(self, method, args, kwargs, slots):
        try:
            getattr(self.director, method)(*args, **kwargs)
        finally:
            self.director.worker_counts.update(slots)

    def on_host(self, service, group, host, state, cause):
        service, group, host = self.director._host(service, group, host)
        self.director.health.set_state(service, group, host, state, cause)

    def on_address(self, service, group, host, address):
        _, _, host = self.director._host(service, group, host)
        host.address = address_from_json(address)

    def on_close_host(self, service, group, host):
        self.director.close_host_connections(*self.director._host(service, group, host))

    def on_sticky(self, entries):
        stick_entries(self.director, entries)

    def on_reload(self, xml, path, generation, hosts, discovered, listens, slots, fds, repair=False):
        """A reload, or the master's repair of this worker: the whole running config and
        every listening socket (those this worker holds already are closed again)."""
        director = self.director
        if director.stopping:
            # Draining (to be restarted): new listeners would take clients.
            for fd in fds:
                os.close(fd)
            return
        director.listen_sockets = {}
        try:
            director.listen_sockets = listen_sockets(listens, fds)
            director.apply_reload(parse_config(xml, path))
            director.discovery.restore(discovered)
        finally:
            for sock in director.listen_sockets.values():
                sock.close()
            director.listen_sockets = {}
            director.worker_counts.update(slots)
        apply_host_states(director, hosts)
        self.generation = generation

    def on_counters(self, size):
        self.director.worker_counts.remap(size)

    def on_stop(self, drain, handover=False):
        self.director.begin_stop(drain, handover)

    def on_stop_now(self):
        self.director.stop_now()

    def master_gone(self):
        director = self.director
        if not director.stopping:
            log.warning('the master has gone: not accepting, letting %d connection(s) finish within %g s',
                        len(director.pairs), director.config.drain)
            director.begin_stop(director.config.drain)

    # -- to the master --------------------------------------------------------

    def report_down(self, service, group, host, reason):
        self.send('connect_failed', service=service.name, group=group.name, host=host.name, cause=reason)

    def pick(self, pair, scheduler):
        """Pair.connect_next's pick in a worker: a host with maxconns is taken across
        workers (another is picked while the one picked is full everywhere), and a new
        sticky entry is told to the master, which tells every worker."""
        client_ip = pair.client_ip
        sticky = scheduler.sticky
        if sticky:
            before = scheduler.sticky_host(client_ip)
        host = scheduler.pick(client_ip, pair.tried)
        while host is not None and host.maxconns and not self.director.worker_counts.take_host(host):
            host = scheduler.pick(client_ip, pair.tried)
        if sticky and host is not None and host is not before:
            if not self.sticky_out:
                self.loop.call_soon(self.send_sticky)
            self.sticky_out.append([pair.service.name, pair.group.name, client_ip, host.name])
        return host

    def send_sticky(self):
        entries, self.sticky_out = self.sticky_out, []
        self.send('new_sticky', entries=entries)


def address_to_json(address):
    return None if address is None else [address[0], list(address[1])]


def address_from_json(value):
    return None if value is None else (value[0], tuple(value[1]))


def listen_entries(listeners, fds=None):
    """What a worker is told of listeners: [host, port, family, fd], and 'udp' after a UDP
    one's (listen_sockets reads them); without fds each fd is None: it comes with the message."""
    return [[l.listen.host, l.listen.port, l.sock.family, fds[i] if fds else None] +
            ([] if l.listen.protocol == 'tcp' else [l.listen.protocol]) for i, l in enumerate(listeners)]


def listen_sockets(listens, fds):
    """listen key -> socket for the listening sockets a worker got: [[host, port, family, fd]],
    or [host, port, family, fd, 'udp'] for the UDP socket of its slot (fd None: the next of
    fds, which came with the message)."""
    found = {}
    fds = list(fds)
    try:
        for entry in listens:
            host, port, family, fd = entry[:4]
            protocol = entry[4] if len(entry) > 4 else 'tcp'
            if fd is None:
                if not fds:
                    raise ValueError('fewer sockets came than the message says')
                fd = fds.pop(0)
            kind = socket.SOCK_DGRAM if protocol == 'udp' else socket.SOCK_STREAM
            sock = socket.socket(family, kind, 0, fd)
            # PyPy makes a socket built on an fd blocking (CPython leaves the flag alone),
            # and the flag belongs to the listening socket every process shares.
            sock.setblocking(False)
            found[listen_key(host, port, protocol)] = sock
    except ValueError:
        for sock in found.values():
            sock.close()
        raise
    finally:
        for fd in fds:
            os.close(fd)
    return found


def sticky_entries(director):
    """[service, group, client ip, host, seconds since last used, host ip] of every sticky table."""
    now = time.monotonic()
    return [[service.name, group.name, ip, host.name, now - used, host.ip]
            for service in director.services.values() for group in service.groups.values()
            if group.scheduler.sticky for ip, host, used in group.scheduler.sticky_entries()]


def stick_entries(director, entries):
    """Sticky entries from the other side: [service, group, client ip, host], used now,
    or with a fifth, the seconds since, and a sixth, the host's ip; those of a host
    gone (or of another ip by that name) are passed over.  How many were taken."""
    now = time.monotonic()
    taken = 0
    for entry in entries:
        try:
            _, group, host = director._host(entry[0], entry[1], entry[3])
        except AdminError:
            continue
        if len(entry) > 5 and host.ip != entry[5]:
            continue
        group.scheduler.stick(entry[2], host, now - entry[4] if len(entry) > 4 else now)
        taken += 1
    return taken


def apply_host_states(director, states):
    """The master's word on each host: [[service, group, host, health, reason, admin, address]]."""
    health = director.health
    for service_name, group_name, name, state, reason, admin, address in states:
        try:
            service, group, host = director._host(service_name, group_name, name)
        except AdminError:
            continue
        if address is not None:
            host.address = address_from_json(address)
        health.set_state(service, group, host, state, reason or 'as the master has it')
        health.set_state(service, group, host, admin, 'as the master has it')


def run_worker(channel_fd, verbose=False):
    """`pydirector.py --worker N --channel FD`, as the master spawns worker N (the
    number is for ps; the first message says it too): FD is its end of its channel;
    the first message says the rest.  Returns the exit status."""
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, channel_fd)
        first, inbox, fds = Channel.receive(sock, WORKER_FIRST_MESSAGE)
        problem = MESSAGES['config'].problem(set(first) - {'t'}, ()) if first.get('t') == 'config' else 'not a config'
        if problem is not None:
            raise ValueError(problem)
        config = parse_config(first['xml'], first['path'])
    except (OSError, ValueError, ConfigError, KeyError) as e:
        print('pydirector worker: no config from the master: %s' % e, file=sys.stderr)
        return 1
    global LOG_PREFIX
    LOG_PREFIX = 'worker %d: ' % first['worker']
    try:
        setup_logging(config, verbose)
    except OSError as e:
        print('pydirector worker: cannot open the log: %s' % e, file=sys.stderr)
        return 1
    raise_fd_limit()
    director = Director(config, notifier=Notifier({}), resolve_names=False)
    director.health.probing = False
    director.health.quiet = True
    director.listen_sockets = listen_sockets(first['listens'], ())
    fd, size = first['counters']
    clients_fd, lines = first['clients']
    director.worker_counts = WorkerCounts(director, SharedCounters(fd, first['workers'] + 1, first['worker'] - 1, size),
                                          ClientShare(clients_fd, first['workers'], first['worker'] - 1, lines))
    worker = Worker(director, sock, first, inbox, fds)
    director.discovery.restore(first['discovered'])     # the hosts from DNS, before their states
    apply_host_states(director, first['hosts'])
    stick_entries(director, first['sticky'])
    # As the master's: a whole process group is signalled (Ctrl-C, systemd).  A reload is the master's.
    handle_signals(director, reload=False)
    try:
        director.bind()
    except OSError as e:
        log.error('%s', e.strerror or e)
        return 1
    director.worker_counts.update(first['slots'])
    director.worker_counts.beat()
    worker.send('ready', pid=os.getpid(), seq=worker.acked, generation=worker.generation)
    try:
        director.loop.run()
    finally:
        director.access.flush()
        director.worker_counts.stop()
    return 0


WORKER_QUICK_DEATH = 1.0    # seconds: a worker that dies sooner after starting is restarted after a pause
WORKER_MAX_PAUSE = 30.0     # the longest such pause (it doubles from 1 s)
WORKER_STOP_GRACE = 5.0     # seconds past the drain before a worker still running is killed
WORKER_REAP_WAIT = 5.0      # seconds between a worker's channel closing and a kill, if it has not exited
HEARTBEAT_CHECK = 0.25      # seconds between the master's looks at its workers' heartbeats


def worker_command():
    """How to start a worker: this interpreter on this file, or on the .pyz holding it."""
    here = os.path.abspath(__file__)
    archive = os.path.dirname(here)
    return [sys.executable, archive if os.path.isfile(archive) else here]


class WorkerProcess(object):
    """The master's record of one worker, numbered from 1."""

    def __init__(self, index):
        self.index = index
        self.proc = None
        self.pid = None
        self.channel = None
        self.ready = False
        self.acked = 0          # the last command it has applied
        self.generation = None  # the config generation it runs, as it last said (None: none whole)
        self.restarts = 0
        self.started = None     # epoch time of its start
        self.quick_deaths = 0   # deaths in a row soon after starting
        self.timer = None       # a pending restart or reap
        self.stuck = False      # killed for its silent heartbeat, not reaped yet

    def __repr__(self):
        return 'worker %d (pid %s)' % (self.index, self.pid)


class Master(object):
    """The master's side of its workers (its Director's `master`).

    It spawns them (start), sends each a config first and then every change the
    Director makes (send_all, from the Director's hooks, replay and reloaded;
    the messages are the rows of MESSAGES, and what the workers send up goes
    to the handler its row names, on_message), each with a sequence number the
    worker acknowledges once it has applied it; sync() waits for that, so an
    admin change answers only after every live worker has made it.  Each reload makes a new config
    generation, which every worker says it runs; one that could not apply a
    change is sent the whole config again, and restarted if it cannot apply
    that either (repair).  A worker that dies is restarted at once (after a
    pause if it keeps dying at start), logged and counted, and what it had
    counted is kept.  The master assigns the SharedCounters slots and reads
    the sums there for the pages (read_counts).
    """

    def __init__(self, director, count, verbose=False, output=None, command=None):
        self.director = director
        self.loop = director.loop
        self.count = count
        self.verbose = verbose
        self.output = output            # the workers' stdout and stderr (None: the master's)
        self.command = command or worker_command()
        self.seq = 0
        self.generation = 1             # of the running config: one more each reload
        self.workers = [WorkerProcess(i) for i in range(1, count + 1)]
        self.changed = threading.Condition()
        self.stopping = False
        self.stop_timer = None
        self.when_ready = None          # called once, when every worker is first ready
        self.slot_of = {}               # the master's running object -> slot
        self.kind_of = {HEARTBEAT_SLOT: 'process'}     # slot -> 'host', 'service', 'address' or 'process'
        self.free = []                  # [(seq, slot)]: reusable once every worker applied seq
        self.freed = []                 # slots of things gone, until the message telling of it is sent
        self.next_slot = HEARTBEAT_SLOT + 1
        self.sent_listeners = set()
        self.retired = []               # [listen key, socket, seq] of removed listens (see retire)
        self.beat_timer = None
        for listener in self.listeners():
            if isinstance(listener, DatagramListener):
                listener.widen(count)       # OSError if it cannot: before anything else is made
        self.counters = SharedCounters.create(count + 1, max(256, 2 * len(counted_things(director.services.values()))))
        self.clients = ClientShare.create(count)     # a row per worker, none of the master's
        self.assign()
        director.master = self

    # -- the workers' lives ---------------------------------------------------

    def start(self):
        """Spawn every worker (on the loop thread, or before the loop runs)."""
        self.sent_listeners = set(self.listeners())
        for worker in self.workers:
            self.spawn(worker)
        self.beat_timer = self.loop.call_later(HEARTBEAT_CHECK, self.check_heartbeats)

    def listeners(self):
        found = []
        for service in self.director.services.values():
            for listener in service.listeners:
                if listener not in found:
                    found.append(listener)
        return found

    @staticmethod
    def listen_fds(listeners, worker):
        """The fd of each listener's socket a worker gets: a TCP listen's one, which every
        worker shares; a UDP listen's of the worker's slot (DatagramListener.socket_for)."""
        return [(l.socket_for(worker.index) if isinstance(l, DatagramListener) else l.sock).fileno()
                for l in listeners]

    def spawn(self, worker):
        import subprocess
        worker.timer = None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        listeners = self.listeners()
        listen_fds = self.listen_fds(listeners, worker)
        listens = listen_entries(listeners, listen_fds)
        env = dict((k, v) for k, v in os.environ.items()
                   if k not in ('NOTIFY_SOCKET', 'WATCHDOG_USEC', 'WATCHDOG_PID', 'LISTEN_FDS', 'LISTEN_PID'))
        try:
            worker.proc = subprocess.Popen(
                # ps shows which worker it is: the number its log lines and /running give.
                self.command + ['--worker', str(worker.index), '--channel', str(theirs.fileno())] +
                (['-v'] if self.verbose else []),
                pass_fds=[theirs.fileno(), self.counters.fd, self.clients.fd] + listen_fds,
                stdin=subprocess.DEVNULL, stdout=self.output, stderr=self.output, env=env)
        except OSError as e:
            ours.close()
            theirs.close()
            log.error('cannot start worker %d: %s', worker.index, e)
            self.restart_later(worker)
            return
        theirs.close()
        worker.pid = worker.proc.pid
        worker.started = time.time()
        worker.ready = False
        worker.generation = None
        worker.stuck = False
        worker.acked = self.seq     # it starts from everything sent so far
        worker.channel = Channel(self.loop, ours, lambda m, fds: self.on_message(worker, m, fds),
                                 lambda: self.lost(worker))
        self.send_to(worker, 'config', seq=self.seq, generation=self.generation, worker=worker.index,
                     workers=self.count, xml=self.director.running_xml(), path=self.director.config.path,
                     listens=listens, counters=[self.counters.fd, self.counters.size],
                     clients=[self.clients.fd, self.clients.lines],
                     slots=self.slot_entries(self.slot_of), hosts=self.host_states(),
                     sticky=self.sticky_entries(), discovered=self.director.discovery.sets())

    # -- reports up -------------------------------------------------------------

    def on_message(self, worker, message, fds):
        try:
            row, fields = received(message, UP, fds)
        except MessageError as e:
            log.error('%r sent %s', worker, escape_text(e))
            return
        getattr(self, row.handler)(worker, **fields)

    def on_ready(self, worker, pid, seq, generation):
        with self.changed:
            worker.ready = True
            worker.acked = max(worker.acked, seq)
            worker.generation = generation
            self.changed.notify_all()
        log.info('%r ready', worker)
        if self.when_ready is not None and all(w.ready for w in self.workers):
            when_ready, self.when_ready = self.when_ready, None
            when_ready()

    def on_ack(self, worker, seq, generation):
        with self.changed:
            worker.acked = max(worker.acked, seq)
            worker.generation = generation
            self.changed.notify_all()
        self.let_go()

    def on_connect_failed(self, worker, service, group, host, cause):
        """A failed connect there: the master decides, and tells every worker."""
        try:
            service, group, host = self.director._host(service, group, host)
        except AdminError:
            return      # removed since
        self.director.health.set_state(service, group, host, schedulers.DOWN, cause)

    def on_new_sticky(self, worker, entries):
        """New sticky entries a worker made: kept here and told to every worker (the one
        that made them too, so that all end with the last one the master saw)."""
        stick_entries(self.director, entries)
        self.send_all('sticky', entries=entries)

    def on_failed(self, worker, what, error, repair):
        """A worker could not apply what the master sent (it said so): it has strayed
        from the master's config.  It is sent the whole running config again, with
        every listening socket (repair); one that cannot apply that either is
        restarted, once its connections have finished (its row of counters is its own)."""
        error = escape_text(error)
        if self.stopping:
            log.error('%r could not apply %s: %s', worker, log_value(what), error)
        elif repair:
            log.error('%r could not apply the running config either: %s; restarting it', worker, error)
            self.send_to(worker, 'stop', drain=self.director.config.drain)
        else:
            log.error('%r could not apply %s: %s; sending it the running config again',
                      worker, log_value(what), error)
            self.repair(worker)

    def repair(self, worker):
        """The whole running config to one worker, every listening socket with it."""
        listeners = self.listeners()
        # The number of what was sent last: it has that too once it acknowledges this.
        self.send_to(worker, 'reload', self.listen_fds(listeners, worker), seq=self.seq, repair=True,
                     slots=self.slot_entries(self.slot_of), **self.reload_fields(listeners))

    def lost(self, worker):
        """Its channel closed: it has exited, or is about to."""
        with self.changed:
            worker.channel = None
            worker.ready = False
            self.changed.notify_all()
        self.reap(worker, self.loop.now + WORKER_REAP_WAIT)

    def reap(self, worker, deadline):
        status = worker.proc.poll()
        if status is None:
            if self.loop.now >= deadline:
                log.warning('%r closed its channel but has not exited: killing it', worker)
                worker.proc.kill()
                deadline = float('inf')
            worker.timer = self.loop.call_later(0.01, self.reap, worker, deadline)
            return
        self.counters.fold(worker.index - 1, self.kind_of)
        self.clients.clear_row(worker.index - 1)
        worker.proc = None
        self.let_go()
        if self.stopping:
            log.info('%r exited', worker)
            self.check_stopped()
            return
        how = 'with status %d' % status if status >= 0 else 'on signal %d (%s)' % (
            -status, signal.Signals(-status).name if -status in signal.Signals._value2member_map_ else '?')
        worker.restarts += 1
        quick = time.time() - worker.started < WORKER_QUICK_DEATH
        worker.quick_deaths = worker.quick_deaths + 1 if quick else 0
        log.warning('%r exited %s; restarting it (restart %d)', worker, how, worker.restarts)
        if worker.quick_deaths > 2:
            self.restart_later(worker)
        else:
            self.spawn(worker)

    def silence(self, worker):
        """Seconds since the worker's loop last stamped its heartbeat (WorkerCounts.beat,
        every tick); None until it is ready and after it has gone.  The clock is the
        monotonic one, which every process shares."""
        if not worker.ready or worker.proc is None:
            return None
        beat = self.counters.view[self.counters.line(HEARTBEAT_SLOT, worker.index - 1) + HEARTBEAT]
        return round(max(0.0, time.monotonic() - beat / 1e6), 3) if beat else None

    def live(self):
        """The workers serving clients: ready, and their loop ran within worker_timeout."""
        timeout = self.director.config.worker_timeout
        found = []
        for worker in self.workers:
            silent = self.silence(worker)
            if silent is not None and silent <= timeout and not worker.stuck:
                found.append(worker)
        return found

    def check_heartbeats(self):
        """Every HEARTBEAT_CHECK: a worker whose loop has not run for worker_timeout (a
        handler that never returns, a stopped process) accepts no client, even one the
        kernel woke it for, and frees no place: kill it, and reap starts another like
        for any worker that died.  The listening sockets are the master's: the clients
        waiting there go to the other workers or to the new one."""
        self.beat_timer = self.loop.call_later(HEARTBEAT_CHECK, self.check_heartbeats)
        timeout = self.director.config.worker_timeout
        for worker in self.workers:
            silent = self.silence(worker)
            if silent is not None and silent > timeout and not worker.stuck:
                worker.stuck = True
                log.error('%r has not run its loop for %.1f s (worker_timeout %g s): killing it',
                          worker, silent, timeout)
                worker.proc.kill()      # SIGKILL: a stopped process dies too

    def restart_later(self, worker):
        pause = min(WORKER_MAX_PAUSE, 2.0 ** max(0, worker.quick_deaths - 3))
        log.warning('worker %d keeps dying as it starts: next try in %g s', worker.index, pause)
        worker.timer = self.loop.call_later(pause, self.spawn, worker)

    # -- commands down --------------------------------------------------------

    def send_all(self, kind, fds=(), **fields):
        """A message to every worker, with the next sequence number; that number.
        fds: the sockets sent along, or a function of the worker giving its own."""
        message = new_message(kind, DOWN, fields, fds)
        self.seq += 1
        message['seq'] = self.seq
        for worker in self.workers:
            if worker.channel is not None:
                worker.channel.send(message, fds(worker) if callable(fds) else fds)
        if 'slots' in message:      # the change that freed them: once applied everywhere, reusable
            self.free.extend((self.seq, slot) for slot in self.freed)
            self.freed = []
        return self.seq

    def send_to(self, to, kind, fds=(), **fields):
        """A message to one worker (a number in it is the caller's)."""
        to.channel.send(new_message(kind, DOWN, fields, fds), fds)

    def replay(self, method, args, kwargs):
        """An Actions method the master has just run (see replayed): the same call in every worker."""
        self.send_all('call', method=method, args=list(args), kwargs=kwargs, slots=self.assign())

    def reloaded(self):
        """The master reloaded: every worker reloads to its running config, the next
        generation, taking the new listening sockets with it (those removed every
        process closes itself)."""
        current = self.listeners()
        new = [l for l in current if l not in self.sent_listeners]
        self.sent_listeners = set(current)
        self.generation += 1
        seq = self.send_all('reload', lambda worker: self.listen_fds(new, worker), slots=self.assign(),
                            **self.reload_fields(new))
        for entry in self.retired:
            if entry[2] is None:
                entry[2] = seq
        self.let_go()

    def reload_fields(self, listeners):
        """Of a reload to the running config, sending the sockets of these listeners."""
        return dict(xml=self.director.running_xml(), path=self.director.config.path,
                    generation=self.generation, hosts=self.host_states(),
                    discovered=self.director.discovery.sets(),
                    listens=listen_entries(listeners))

    def retire(self, listener):
        """A listen a reload removed: its socket is kept until every worker has let
        go of it, so that a reload adding it back meanwhile takes it (reuse) rather
        than fail to bind the address a worker still listens on."""
        for sock in getattr(listener, 'socks', [listener.sock]):
            self.retired.append([listener.listen.key, sock, None])

    def reuse(self, key):
        """A retired socket of this address, or None."""
        for entry in reversed(self.retired):
            if entry[0] == key:
                return entry[1].dup()
        return None

    def let_go(self):
        """Close the retired sockets every worker has let go of."""
        if self.retired:
            applied = self.applied()
            for entry in [e for e in self.retired if e[2] is not None and e[2] <= applied]:
                self.retired.remove(entry)
                entry[1].close()

    def applied(self):
        """The last message every worker still running has applied."""
        return min([w.acked for w in self.workers if w.proc is not None] or [self.seq])

    def sync(self, timeout):
        """From a thread other than the loop's: wait until every live worker has applied
        what the master sent so far; AdminError 503 naming a worker that did not."""
        if threading.get_ident() == self.loop.thread_ident:
            return
        target = self.seq
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                late = [w for w in self.workers if w.channel is not None and w.acked < target]
                if not late:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AdminError(503, '%r did not answer within %g s' % (late[0], timeout))
                self.changed.wait(left)

    def wait_ready(self, timeout):
        """From another thread: wait until every worker is ready (False if not in time)."""
        with self.changed:
            return self.changed.wait_for(lambda: all(w.ready for w in self.workers), timeout)

    def after_fork(self):
        """In an upgrade's old generation (forked by the loop thread; see Upgrade): it goes
        on managing its workers through their channels, but they are the children of the
        process that forked it, which reaps them: a ForeignProcess stands for each."""
        self.changed = threading.Condition()    # an admin thread may have held it
        for worker in self.workers:
            if worker.proc is not None:
                worker.proc = ForeignProcess(worker.proc.pid)

    def pids(self):
        """The workers running now."""
        return [w.proc.pid for w in self.workers if w.proc is not None]

    # -- stopping ---------------------------------------------------------------

    def stop(self, drain, handover=False):
        self.stopping = True
        self.read_counts()
        log.info('stopping: %d connection(s) open in %d worker(s), waiting up to %g s',
                 sum(s.open for s in self.director.services.values()), self.count, drain)
        self.send_all('stop', drain=drain, **({'handover': True} if handover else {}))
        self._stop_within(drain + WORKER_STOP_GRACE)

    def stop_now(self):
        self.stopping = True
        self.send_all('stop_now')
        self._stop_within(WORKER_STOP_GRACE)

    def _stop_within(self, seconds):
        if self.stop_timer is not None:
            self.stop_timer.cancel()
        self.stop_timer = self.loop.call_later(seconds, self.kill_all)
        for worker in self.workers:
            if worker.proc is None and worker.timer is not None:
                worker.timer.cancel()       # a restart that was to come
                worker.timer = None
        self.check_stopped()

    def kill_all(self):
        for worker in self.workers:
            if worker.proc is not None:
                log.warning('%r still running: killing it', worker)
                worker.proc.kill()

    def check_stopped(self):
        if all(w.proc is None for w in self.workers):
            if self.stop_timer is not None:
                self.stop_timer.cancel()
                self.stop_timer = None
            self.director._stopped()

    def close(self):
        """Once the loop has stopped: let go of the channels and the counters."""
        if self.beat_timer is not None:
            self.beat_timer.cancel()
            self.beat_timer = None
        for worker in self.workers:
            if worker.channel is not None:
                worker.channel.close()
                worker.channel = None
            if worker.proc is not None:
                worker.proc.kill()
                worker.proc.wait()
                worker.proc = None
        for entry in self.retired:
            entry[1].close()
        self.retired = []
        self.counters.close()
        self.clients.close()

    # -- counters ---------------------------------------------------------------

    def assign(self):
        """Give each counted thing of the running config a slot; the [kind, names...,
        slot] of those new since last time.  Slots of things gone are reused once every
        worker has applied the change that removed them (and cleared its line)."""
        things = counted_things(self.director.services.values())
        current = set(thing for thing, _, _ in things)
        for thing in [t for t in self.slot_of if t not in current]:
            self.freed.append(self.slot_of.pop(thing))
        applied = self.applied()
        new = {}
        for thing, key, _ in things:
            if thing in self.slot_of:
                continue
            reusable = [entry for entry in self.free if entry[0] <= applied]
            if reusable:
                self.free.remove(reusable[0])
                slot = reusable[0][1]
            else:
                if self.next_slot >= self.counters.capacity:
                    self.counters.grow(2 * self.counters.capacity)
                    self.send_all('counters', size=self.counters.size)
                slot = self.next_slot
                self.next_slot += 1
            for row in range(self.counters.rows):
                self.counters.zero(slot, row)
            self.slot_of[thing] = slot
            self.kind_of[slot] = key[0]
            new[thing] = slot
        return self.slot_entries(new)

    def slot_entries(self, slots):
        return [list(key) + [slots[thing]] for thing, key, _ in counted_things(self.director.services.values())
                if thing in slots]

    def read_counts(self):
        """The sums of every row into the master's running objects, for the pages
        (a host's open count through its scheduler, which explain asks), as
        COUNTERS says where."""
        sums = self.counters.sums
        slot_of = self.slot_of
        for thing, key, group in counted_things(self.director.services.values()):
            slot = slot_of.get(thing)
            if slot is not None:
                values = sums(slot)
                for place, into in COUNTER_READS[key[0]]:
                    into(thing, values[place], group)

    def log_lines_dropped(self):
        """What the workers' log targets dropped, dead workers' too."""
        return self.counters.sums(HEARTBEAT_SLOT)[LOG_DROPPED]

    def open_connections(self, worker):
        """A worker's open client connections, as its row says."""
        view = self.counters.view
        total = 0
        for thing, slot in self.slot_of.items():
            if isinstance(thing, RunningService):
                total += view[self.counters.line(slot, worker.index - 1) + SERVICE_OPEN]
        return total

    def snapshot(self):
        live = self.live()
        return [{'worker': w.index, 'pid': w.pid, 'up': w in live, 'started': w.started, 'restarts': w.restarts,
                 'generation': w.generation, 'behind': w.ready and w.generation != self.generation,
                 'open': self.open_connections(w),
                 'accepted': self.row_accepted(w),
                 'heartbeat': self.silence(w)} for w in self.workers]

    def row_accepted(self, worker):
        view = self.counters.view
        return sum(view[self.counters.line(slot, worker.index - 1) + SERVICE_ACCEPTED]
                   for thing, slot in self.slot_of.items() if isinstance(thing, RunningService))

    def host_states(self):
        return [[service.name, group.name, host.name, host.health, host.reason, host.admin,
                 address_to_json(host.address)]
                for service in self.director.services.values() for group in service.groups.values()
                for host in group.scheduler.hosts]

    def sticky_entries(self):
        return sticky_entries(self.director)


# ---------------------------------------------------------------------------
# Upgrade: new code without losing a connection (SIGUSR2, or the admin's
# POST /upgrade), as nginx's binary upgrade and HAProxy's master re-exec do.
#
# The process runs its program again in place: the same PID, the program
# path and the arguments it was started with, so the files on disk now take
# effect.  First the new code must pass its own --check, in a child, with
# nothing changed yet (that catches a syntax error, an import error, a bad
# config).  Then the loop thread forks.  The child is the old generation: it
# keeps everything -- the loop, the listening sockets, every open
# connection, the old workers' channels -- and goes on serving.  The parent,
# which keeps the PID, execs the program with the listening sockets
# (PYDIRECTOR_LISTEN_FDS, 'FD=ROLE:HOST:PORT ...', as nginx passes its own)
# and one end of a socketpair (PYDIRECTOR_UPGRADE_FD) left open.  The new
# generation (Takeover) reads the config, takes the running state over from
# the old one through the socketpair (HANDOVER: versioned JSON,
# acknowledged), applies each item where service, group, host name and
# address still match, starts its workers, runs one round of health checks,
# accepts, and only then tells the old one to stop accepting; the old one
# drains for <pdconfig drain> and exits (OldGeneration).  Until then any
# failure of the new one -- it exits, is killed, says it failed, or is not
# ready within <pdconfig upgrade_timeout> -- leaves the old one serving, and
# it starts its admin again on the listening socket it kept.
#
# Only the loop thread goes on in the child of a fork: the admin's threads
# and the probe pool's stay in the parent (which execs), with any lock they
# held.  So the fork comes from the loop thread once the admin has answered
# what it was asked (the /upgrade itself too), and the child makes anew what
# other threads may have held (after_fork, Director.after_fork).
# ---------------------------------------------------------------------------

LISTEN_FDS_ENV = 'PYDIRECTOR_LISTEN_FDS'    # the listening sockets an upgrade hands on: 'FD=ROLE:HOST:PORT ...'
UPGRADE_FD_ENV = 'PYDIRECTOR_UPGRADE_FD'    # the new generation's end of the handover socketpair
HANDOVER_VERSIONS = (1,)        # the versions of the handed-over state this code reads and writes
UPGRADE_CHECK_TIMEOUT = 30.0    # seconds the new code's --check may take
UPGRADE_ADMIN_WAIT = 2.0        # seconds the admin's requests in flight have to be answered before the fork
UPGRADE_STATE_WAIT = 30.0       # seconds the new generation waits for the old one's state
REAP_INTERVAL = 0.25            # seconds between looks for the children an upgrade left this process

OLD, NEW = 'old', 'new'         # a handover message from the old generation, from the new one

HANDOVER = dict((row.kind, row) for row in (
    # The new generation's first: the versions of the state it reads, its code's version, its pid.
    Message('hello', NEW, 'on_hello', 'versions version pid'),
    # The answer, read by Takeover.receive before the loop runs (see generation_state); or
    # 'refused' when no version is both's.
    Message('state', OLD, None, 'version code_version pid started generation config hosts sticky counts '
                                'switches discovered children last_reload'),
    Message('refused', OLD, None, 'error'),
    Message('taken', NEW, 'on_taken'),                  # the state is applied
    Message('stop', NEW, 'on_stop'),                    # it serves: stop accepting, drain, exit
    Message('failed', NEW, 'on_failed', 'error'),       # it gives up: the old generation goes on
    Message('finished', OLD, 'on_finished', 'counts'),  # drained: what it counted since the state
))


def program_argv():
    """How to run this program again, as it was started: this interpreter with its
    options, this file (or the .pyz holding it) and the same arguments."""
    import subprocess
    flags = getattr(subprocess, '_args_from_interpreter_flags', list)()
    return [sys.executable] + flags + worker_command()[1:] + sys.argv[1:]


_TRACEBACK_PLACE = re.compile(r'File "(.*)", line ([0-9]+)')


def check_new_code(argv, timeout=UPGRADE_CHECK_TIMEOUT):
    """None if the program on disk now loads and accepts its config (its own --check,
    with the arguments it runs with, in a child); else what is wrong, in one line."""
    import subprocess
    try:
        done = subprocess.run(argv + ['--check'], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 'its --check did not finish within %g s' % timeout
    except OSError as e:
        return 'cannot run %s: %s' % (argv[0], e.strerror or e)
    if done.returncode == 0:
        return None
    lines = [line.strip() for line in done.stderr.decode('utf-8', 'replace').splitlines() if line.strip()]
    if not lines:
        return 'its --check exited with status %d' % done.returncode
    last = lines[-1][len('pydirector: '):] if lines[-1].startswith('pydirector: ') else lines[-1]
    places = [m for m in map(_TRACEBACK_PLACE.match, lines) if m]
    # A traceback's last place is where it went wrong: a syntax error's file and line.
    return '%s:%s: %s' % (places[-1].group(1), places[-1].group(2), last) if places else last


def socket_of(fd):
    """A socket object for a descriptor an upgrade handed on, of its own family and type
    (Python 3.6 does not find them itself), non-blocking as every listener is; and
    that type (SOCK_STREAM, SOCK_DGRAM)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
    try:
        kind = probe.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        if hasattr(socket, 'SO_DOMAIN'):
            family = probe.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
        else:
            family = socket.AF_INET6 if len(probe.getsockname()) == 4 else socket.AF_INET
    finally:
        probe.detach()
    sock = socket.socket(family, kind, 0, fd)
    sock.setblocking(False)
    return sock, kind


def handed_sockets_text(entries):
    """PYDIRECTOR_LISTEN_FDS for [(fd, role, host, port)]."""
    return ' '.join('%d=%s:%s' % (fd, role, format_address(host, port)) for fd, role, host, port in entries)


def inherited_sockets(text):
    """(role, socket type, address key) -> socket of the sockets an upgrade handed on
    (PYDIRECTOR_LISTEN_FDS): 'listen' ones (a listen's, TCP or UDP alike) and the
    admin's.  ValueError when the text is not what handed_sockets_text writes."""
    found = {}
    try:
        for entry in text.split():
            fd_text, _, rest = entry.partition('=')
            role, _, address = rest.partition(':')
            host, port = parse_address(address)
            sock, kind = socket_of(int(fd_text))
            found[(role, kind, address_key(host, port))] = sock
    except (ValueError, OSError) as e:
        for sock in found.values():
            sock.close()
        raise ValueError('%s=%r: %s' % (LISTEN_FDS_ENV, text, e))
    return found


def open_fds():
    """This process's file descriptors (from /proc: Linux; elsewhere those below 1024)."""
    try:
        return [int(name) for name in os.listdir('/proc/self/fd')]
    except OSError:
        return list(range(1024))


def after_fork():
    """In the child of a fork made while other threads ran: only the forking thread
    goes on, and a lock another thread held then would stay held for good.  The
    locks a loop thread takes are made anew: logging's (Python 3.8 and later do it
    themselves, 3.6 and 3.7 do not) and LogOutput's."""
    logging._lock = threading.RLock()
    for ref in list(logging._handlerList):
        handler = ref()
        if handler is not None:
            handler.createLock()
    log_output.lock = threading.RLock()


def process_running(pid):
    """Whether a process runs (an exited one its parent has not reaped yet does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open('/proc/%d/stat' % pid) as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except (OSError, IndexError):
        return True     # no /proc: running, as far as can be told


class ForeignProcess(object):
    """A worker of an upgrade's old generation: the child of the process that forked
    the old generation, which reaps it, so Popen cannot wait for it.  It stands in
    for its Popen in WorkerProcess (Master.after_fork)."""

    def __init__(self, pid):
        self.pid = pid
        self.returncode = None

    def poll(self):
        if self.returncode is None and not process_running(self.pid):
            self.returncode = 0     # (its status is its parent's to read)
        return self.returncode

    def kill(self):
        try:
            os.kill(self.pid, signal.SIGKILL)
        except OSError:
            pass

    def wait(self, timeout=WORKER_STOP_GRACE):
        deadline = time.monotonic() + timeout
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.returncode


class Reaper(object):
    """Waits for the children an upgrade left this process as they exit: its old
    generation, and the old workers, which stay the children of the PID across the
    exec.  Only those it is told of: a waitpid(-1) would take a worker's exit status
    from its Popen."""

    def __init__(self, loop):
        self.loop = loop
        self.pids = set()
        self.timer = None

    def add(self, pids):
        self.pids.update(pids)
        if self.pids and self.timer is None:
            self.timer = self.loop.call_later(REAP_INTERVAL, self.reap)

    def reap(self):
        self.timer = None
        for pid in list(self.pids):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid      # not a child of this process (any more)
            if done:
                self.pids.discard(pid)
        self.add(())

    def clear(self):
        """After a fork, in the child: the children are the parent's."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.pids = set()


# -- the state an old generation hands over (HANDOVER 'state', version 1) -------

def generation_state(director, children):
    """Everything an upgrade's new generation takes over, as it is now: the config
    (as last loaded and as running, which holds the changes made at run time), each
    host's health and admin state with its probe counts and timeline, the sticky
    entries, the counter totals, pending group switches, the hosts from DNS, and
    the processes the PID must reap (this one, its workers, older generations')."""
    config = director.config
    master = director.master
    now = time.time()
    switches = []
    for service in director.services.values():
        switch = service.switch
        if switch is not None and switch.pending:
            switches.append({'service': service.name, 'from': switch.from_group.name, 'to': switch.to_group.name,
                             'drain': None if switch.drain_until is None else max(0.0, switch.drain_until - now),
                             'rollback': None if switch.rollback_until is None else
                             max(0.0, switch.rollback_until - now)})
    hosts = []
    for service in director.services.values():
        for group in service.groups.values():
            for host in group.scheduler.hosts:
                timeline, changes = director.health.timeline(host)
                hosts.append({'service': service.name, 'group': group.name, 'name': host.name, 'ip': host.ip,
                              'address': address_to_json(host.address),
                              'health': host.health, 'admin': host.admin, 'reason': host.reason,
                              'since': host.since, 'probe_ok': host.probe_ok, 'probe_fail': host.probe_fail,
                              'timeline': timeline, 'changes': changes})
    return {
        'code_version': VERSION, 'pid': os.getpid(), 'started': director.started,
        'generation': director.generation,
        'config': {'path': config.path, 'digest': config.digest, 'loaded': director.loaded_xml,
                   'running': director.running_xml(), 'reloaded': director.reloaded},
        'hosts': hosts, 'sticky': sticky_entries(director), 'counts': counter_totals(director),
        'switches': switches, 'discovered': director.discovery.sets(),
        'children': list(children) + [os.getpid()] + (master.pids() if master is not None else []),
        'last_reload': director.last_reload,
    }


def counter_totals(director):
    """[[slot key, host ip or None, {field: total}]] of what was counted (COUNTERS' rows
    that are no gauge), by counted_things' keys; a master's are its workers' sums."""
    if director.master is not None:
        director.master.read_counts()
    found = []
    for thing, key, _ in counted_things(director.services.values()):
        values = {}
        for row in COUNTERS:
            if row.kind == key[0] and not row.gauge and row.value is not None:
                value = getattr(thing, row.value) if isinstance(row.value, str) else row.value(None, thing)
                if value:
                    values[row.name] = value
        if values:
            found.append([list(key), getattr(thing, 'ip', None), values])
    return found


def counts_since(now, before):
    """counter_totals entries: what `now` counted past `before`."""
    earlier = dict((json.dumps([key, ip]), values) for key, ip, values in before)
    found = []
    for key, ip, values in now:
        old = earlier.get(json.dumps([key, ip]), {})
        more = dict((name, value - old.get(name, 0)) for name, value in values.items() if value > old.get(name, 0))
        if more:
            found.append([key, ip, more])
    return found


def add_counts(director, entries):
    """Add counter_totals entries to what this process counts, where the counted thing
    (and a host's ip) is the same: onto its running objects in one process, into the
    master's own row of the SharedCounters with workers (the row that keeps what
    workers gone had counted, so that no total goes back)."""
    given = dict((json.dumps([key, ip]), values) for key, ip, values in entries)
    master = director.master
    for thing, key, group in counted_things(director.services.values()):
        values = given.get(json.dumps([list(key), getattr(thing, 'ip', None)]))
        if not values:
            continue
        slot = master.slot_of.get(thing) if master is not None else None
        for row in COUNTERS:
            value = values.get(row.name) if row.kind == key[0] and not row.gauge else None
            if not value:
                continue
            if master is not None:
                if slot is not None:
                    counters = master.counters
                    counters.view[counters.line(slot, counters.rows - 1) + COUNTER_PLACE[row.kind, row.name]] += value
            elif isinstance(row.value, str):
                setattr(thing, row.value, getattr(thing, row.value) + value)
            else:
                row.into(thing, row.value(None, thing) + value, group)


def take_host_states(director, entries):
    """Each host's address, health, admin state, probe counts and timeline as the old
    generation had them, where service, group, name and ip are the same; how many."""
    taken = 0
    for entry in entries:
        try:
            _, group, host = director._host(entry['service'], entry['group'], entry['name'])
        except AdminError:
            continue
        if host.ip != entry['ip']:
            continue
        if entry['address'] is not None:
            host.address = address_from_json(entry['address'])   # a name as the old one resolved it
        scheduler = group.scheduler
        # Through the scheduler, which keeps its structures in step; said once, by the old one.
        if entry['health'] == schedulers.DOWN:
            scheduler.mark_down(host, entry['reason'], entry['since'])
        else:
            scheduler.mark_up(host, entry['since'])
        scheduler.set_admin(host, entry['admin'], entry['since'])
        host.reason, host.since = entry['reason'], entry['since']
        host.probe_ok, host.probe_fail = entry['probe_ok'], entry['probe_fail']
        state = director.health.states.get(host)
        if state is not None:
            state.timeline.extend((t['when'], t['from'], t['to'], t['why']) for t in entry['timeline'])
            state.changes = entry['changes']
        taken += 1
    return taken


def take_switches(director, entries):
    """Group switches still in their drain or rollback window, for what is left of it."""
    for entry in entries:
        service = director.services.get(entry['service'])
        if service is None:
            continue
        from_group, to_group = service.groups.get(entry['from']), service.groups.get(entry['to'])
        if from_group is not None and service.enabled is to_group:
            service.switch = Switch(director, service, from_group, to_group, entry['drain'], entry['rollback'])


# -- this process's upgrades -----------------------------------------------------

class Upgrade(object):
    """The upgrades of a process started from the command line (main makes it; the
    Director's `upgrader`).  request() checks the new code and begins; on the loop,
    once the admin has answered what it was asked, fork() makes the old generation
    (the child: become_old, then OldGeneration) and the new (run_new: the parent
    execs the program; its main then runs a Takeover).  One at a time: `busy` says
    what runs now, and a request meanwhile is refused (409)."""

    def __init__(self, director, notifier):
        self.director = director
        self.loop = director.loop
        self.notifier = notifier
        self.admin = None           # the AdminServer, when the config has <admin>
        self.admin_address = None   # (host, port) of its <admin listen>
        self.master = None
        self.lock = threading.Lock()
        self.busy = None            # 'checking', 'starting' (until the exec), 'taking over' (a new generation)
        self.old = None             # an OldGeneration: this process is the old one of an upgrade
        self.takeover = None        # a Takeover: this process is the new one, not serving yet
        self.argv = None
        self.quiet_until = None
        self.reaper = Reaper(self.loop)
        director.upgrader = self

    # -- asked for ----------------------------------------------------------------

    def request(self):
        """Check the new code, then begin (in a thread of the caller's: never the loop's).
        What the admin answers; AdminError 409 while one runs, 400 when the new code
        fails its check (nothing has changed then)."""
        with self.lock:
            if self.old is not None:
                raise AdminError(409, 'this is the old generation of an upgrade (pid %d): it drains and exits'
                                 % os.getpid())
            if self.busy is not None:
                raise AdminError(409, 'an upgrade is running (%s)' % self.busy)
            if self.director.stopping:
                raise AdminError(409, 'stopping: no upgrade')
            self.busy = 'checking'
        begun = False
        try:
            self.notifier.reloading()
            argv = program_argv()
            log.info('upgrade: checking the new code: %s --check', log_value(worker_command()[1]))
            error = check_new_code(argv)
            if error is not None:
                error = 'the new code fails its check: %s' % error
                self.loop.call_soon_threadsafe(self.failed, error)
                raise AdminError(400, 'upgrade refused: %s' % error)
            message = self.loop.call(self.begin, argv, timeout=60.0)
            begun = True
            return message
        finally:
            if not begun:
                with self.lock:
                    if self.busy == 'checking':
                        self.busy = None
                self.notifier.ready()   # the old code keeps running

    def request_in_background(self):
        """SIGUSR2: request() in a thread of its own, its refusal logged."""
        def run():
            try:
                self.request()
            except AdminError as e:
                if e.status == 409:
                    log.warning('upgrade refused: %s', e.message)     # (failed() logs the rest)
            except LoopTimeout as e:
                log.error('upgrade failed: %s', e)
        start_thread(run, 'pydirector-upgrade')

    def failed(self, error, to=None):
        """On the loop: an upgrade that failed; the code running keeps running."""
        self.director.last_upgrade = {'time': time.time(), 'ok': False, 'error': error, 'from': VERSION,
                                      'to': to}
        log.error('upgrade failed: %s; pydirector %s (pid %d) goes on serving', escape_text(error), VERSION,
                  os.getpid())

    # -- the fork -----------------------------------------------------------------

    def begin(self, argv):
        """On the loop: the new code passed its check.  The admin stops accepting (its
        socket stays open: connections wait there for the new generation's admin);
        the fork comes once it has answered what it was asked."""
        if self.director.stopping:
            raise AdminError(409, 'stopping: no upgrade')
        if self.busy != 'checking':     # a new generation's takeover began meanwhile
            raise AdminError(409, 'an upgrade is running (%s)' % self.busy)
        self.busy = 'starting'
        self.argv = argv
        if self.admin is not None:
            self.admin.pause()
        self.quiet_until = self.loop.now + UPGRADE_ADMIN_WAIT
        self.loop.call_soon(self.when_quiet)
        log.info('upgrade: the new code passed its check; starting it (this generation serves until it is ready)')
        return 'upgrading: the new code passed its check and takes over once ready'

    def when_quiet(self):
        if self.director.stopping:
            return self.not_started('stopping')
        if self.admin is not None and self.admin.requests_in_flight() and self.loop.now < self.quiet_until:
            self.loop.call_later(0.01, self.when_quiet)
            return
        self.fork()

    def not_started(self, error):
        if self.admin is not None:
            self.admin.resume()
        self.busy = None
        self.notifier.ready()
        self.failed(error)

    def fork(self):
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as e:
            return self.not_started('cannot make the handover socketpair: %s' % error_text(e.errno))
        handed = self.handed_sockets()
        env = dict(os.environ)
        env[LISTEN_FDS_ENV] = handed_sockets_text(handed)
        env[UPGRADE_FD_ENV] = str(ours.fileno())
        # From before the fork until the new code handles them, a signal for the PID
        # stays pending (no other thread takes it: start_thread): one that came
        # between the fork and the exec would otherwise be lost.
        if CAN_MASK:
            signal.pthread_sigmask(signal.SIG_BLOCK, PROCESS_SIGNALS)
        try:
            with warnings.catch_warnings():
                # 3.12+ warns of a fork while threads run: the child makes anew what it needs of theirs.
                warnings.simplefilter('ignore', DeprecationWarning)
                pid = os.fork()
        except OSError as e:
            if CAN_MASK:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, PROCESS_SIGNALS)
            ours.close()
            theirs.close()
            return self.not_started('cannot fork: %s' % error_text(e.errno))
        if pid == 0:
            if CAN_MASK:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, PROCESS_SIGNALS)     # the old generation's own
            ours.close()
            self.become_old(theirs, os.getppid())
            return
        theirs.close()
        self.run_new(pid, ours, handed, env)

    def handed_sockets(self):
        """[(fd, role, host, port)] of the sockets the new generation takes: every
        listener's, by its listen address, and the admin's."""
        found = []
        seen = set()
        for service in self.director.services.values():
            for listener in service.listeners:
                if listener not in seen and listener.sock.fileno() >= 0:
                    seen.add(listener)
                    found.append((listener.sock.fileno(), 'listen', listener.listen.host, listener.listen.port))
        if self.admin is not None:
            found.append((self.admin.socket.fileno(), 'admin') + self.admin_address)
        return found

    def run_new(self, old_pid, sock, handed, env):
        """The parent of the fork, which keeps the PID: the old generation (old_pid)
        has the loop and all on it now.  Run the program again here, with sock and the
        handed sockets left open across the exec.  Never returns; logs nothing (the old
        generation's log has those lines): if the exec fails, the old one sees the
        socketpair close and goes on serving."""
        try:
            self.notifier.failed = True     # (a failing send logs nothing here either)
            self.notifier.main_pid(old_pid)
            passed = set([sock.fileno()] + [entry[0] for entry in handed])
            for fd in open_fds():
                # Only these go across: PyPy's mmap, for one, leaves its copy of an fd inheritable.
                if fd > 2:
                    try:
                        os.set_inheritable(fd, fd in passed)
                    except OSError:
                        pass    # (the directory listing's own fd, closed since)
            # (The signals are blocked since the fork: across the exec they wait for main.)
            os.execve(self.argv[0], self.argv, env)
        except BaseException as e:
            try:
                os.write(2, ('pydirector: upgrade: cannot run %s: %s\n' % (self.argv[0], e)).encode('utf-8',
                                                                                                    'replace'))
            finally:
                os._exit(1)

    def become_old(self, sock, new_pid):
        """The child of the fork: the old generation, with everything on the loop."""
        after_fork()
        self.lock = threading.Lock()
        self.director.after_fork()
        admin_socket = None
        if self.admin is not None:
            admin_socket = self.admin.forget()
            self.admin = None
        children = sorted(self.reaper.pids)
        self.reaper.clear()
        self.old = OldGeneration(self, sock, new_pid, admin_socket, children)

    def restart_admin(self, sock):
        """An old generation serving on after a failed upgrade: its admin again, on the
        listening socket it kept."""
        config = self.director.config.admin
        if sock is None or config is None:
            if sock is not None:
                sock.close()
            return
        import pydirector_admin
        try:
            self.admin = pydirector_admin.start(self.director, config, sock)
        except OSError as e:
            log.error('admin cannot serve again: %s', e)

    # -- stopping -----------------------------------------------------------------

    def stopping(self):
        """SIGTERM or SIGINT: a new generation still taking over tells the old one to stop too."""
        if self.takeover is not None:
            self.takeover.serve(stopping=True)

    def finish(self):
        """main, once the loop has stopped: the admin and the workers go.  An old
        generation tells the new one what it counted since its state, and exits here."""
        old = self.old
        if old is not None:
            old.report()
        if self.admin is not None:
            self.admin.stop()
            self.admin = None
        if self.master is not None:
            self.master.close()
        if old is not None:
            old.exit()


class OldGeneration(object):
    """An upgrade's old generation: the process Upgrade.fork forked, which has all the
    running state.  It serves until the new generation says 'stop', then stops
    accepting (its listening sockets stay open in the new one, so no client waiting
    in their queues is lost), drains for <pdconfig drain> and exits.  If the new one
    goes first (it exits or is killed: the socketpair closes), says it failed, or is
    not ready within <pdconfig upgrade_timeout> (then it is killed), the upgrade
    failed: this process serves on, as the balancer now, and starts its admin again."""

    def __init__(self, upgrade, sock, new_pid, admin_socket, children):
        self.upgrade = upgrade
        self.director = upgrade.director
        self.loop = upgrade.loop
        self.new_pid = new_pid
        self.admin_socket = admin_socket
        self.children = children
        self.version = None             # the new code's, once it has said hello
        self.stopping = False
        self.sent_counts = []
        self.channel = Channel(self.loop, sock, self.on_message, self.lost)
        timeout = self.director.config.upgrade_timeout
        self.timer = self.loop.call_later(timeout, self.too_late, timeout)
        log.info('upgrade: pid %d serves as the old generation until the new one (pid %d) is ready',
                 os.getpid(), new_pid)

    def send(self, kind, **fields):
        self.channel.send(new_message(kind, OLD, fields, table=HANDOVER))

    def on_message(self, message, fds):
        try:
            row, fields = received(message, NEW, fds, HANDOVER)
        except MessageError as e:
            return self.fail('the new generation sent %s' % e)
        getattr(self, row.handler)(**fields)

    def on_hello(self, versions, version, pid):
        self.version = version
        common = [v for v in HANDOVER_VERSIONS if v in versions]
        if not common:
            error = ('pydirector %s reads the state in version(s) %s; this one writes %s' % (
                version, ', '.join(map(str, versions)) or 'none', ', '.join(map(str, HANDOVER_VERSIONS))))
            self.send('refused', error=error)
            return self.fail(error)
        state = generation_state(self.director, self.children)
        self.sent_counts = state['counts']
        self.send('state', version=max(common), **state)
        log.info('upgrade: handed the running state over to pydirector %s (pid %d)', log_value(version), pid)

    def on_taken(self):
        log.debug('upgrade: the new generation took the state over')

    def on_stop(self):
        director = self.director
        self.stopping = True
        self.timer.cancel()
        if self.admin_socket is not None:
            self.admin_socket.close()
            self.admin_socket = None
        # systemd watches the main PID again, and hears no more from this process.
        director.notifier.main_pid(self.new_pid, ready=True)
        director.notifier.close()
        if director.master is not None:
            director.master.read_counts()
        log.info('upgrade: pydirector %s serves; the old generation (pid %d) stops accepting and lets %d '
                 'connection(s) finish within %g s', log_value(self.version), os.getpid(),
                 sum(s.open for s in director.services.values()) + len(director.hellos), director.config.drain)
        director.begin_stop(director.config.drain, handover=True)

    def on_failed(self, error):
        self.fail('the new generation failed: %s' % error)

    def lost(self):
        if not self.stopping:
            self.fail('the new generation (pid %d) exited before it was ready' % self.new_pid)

    def too_late(self, timeout):
        try:
            os.kill(self.new_pid, signal.SIGKILL)
        except OSError:
            pass
        self.fail('the new generation (pid %d) was not ready within %g s (upgrade_timeout): killed it'
                  % (self.new_pid, timeout))

    def fail(self, error):
        upgrade = self.upgrade
        if upgrade.old is not self:
            return
        self.timer.cancel()
        self.channel.close()
        upgrade.old = None
        upgrade.busy = None
        upgrade.failed(error, self.version)
        director = self.director
        if director.stopping:
            if self.admin_socket is not None:
                self.admin_socket.close()
            return
        director.notifier.ready()       # the main process for systemd now: see Notifier
        upgrade.restart_admin(self.admin_socket)
        self.admin_socket = None

    def report(self):
        """Drained (the loop has stopped): what was counted since the state went to the
        new generation, which adds it to its totals."""
        if self.channel.closed:
            return
        counts = counts_since(counter_totals(self.director), self.sent_counts)
        sock = self.channel.sock
        try:
            sock.settimeout(1.0)
            sock.sendall(Channel.encode(new_message('finished', OLD, {'counts': counts}, table=HANDOVER)))
        except OSError:
            pass

    def exit(self):
        """The end of an old generation: without the exit hooks of a process whose other
        threads stayed in the parent of its fork (they would wait on locks those held)."""
        log.info('the old generation (pid %d, pydirector %s) has drained: exiting', os.getpid(), VERSION)
        self.director.access.flush()
        log_output.finish()
        os._exit(0)


class Takeover(object):
    """An upgrade's new generation (main, when PYDIRECTOR_UPGRADE_FD says it is one):
    it takes the old generation's sockets and running state, then serves once its
    workers are ready and a round of health checks is done, and tells the old one
    to stop.  A failure before the loop runs is told to the old one (give_up),
    which goes on serving."""

    def __init__(self, sock, sockets):
        self.sock = sock
        self.sockets = sockets          # (role, socket type, address key) -> socket: inherited_sockets
        self.state = None
        self.rest = b''                 # what came after the state, for the Channel
        self.loaded = None              # the config the old generation had last loaded from the file
        self.file_config = None         # the file as read now, when it changed since
        self.upgrade = None
        self.channel = None
        self.first_probe = None
        self.deadline = None
        self.serving = False

    @classmethod
    def from_environ(cls, environ=None):
        """The new generation's side, if the environment says this process is one (both
        variables are taken out of it: no worker or later upgrade is to see them)."""
        environ = os.environ if environ is None else environ
        fd_text = environ.pop(UPGRADE_FD_ENV, None)
        sockets_text = environ.pop(LISTEN_FDS_ENV, '')
        if fd_text is None:
            return None
        sockets = inherited_sockets(sockets_text)
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, int(fd_text))
        except (ValueError, OSError) as e:
            for each in sockets.values():
                each.close()
            raise ValueError('%s=%r: %s' % (UPGRADE_FD_ENV, fd_text, e))
        return cls(sock, sockets)

    def take(self, role, key, kind=socket.SOCK_STREAM):
        """The socket handed on for this role and address (None if none was)."""
        return self.sockets.pop((role, kind, key), None)

    def send_now(self, kind, **fields):
        """Before the loop runs: a message, sent whole."""
        self.sock.sendall(Channel.encode(new_message(kind, NEW, fields, table=HANDOVER)))

    def receive(self, file_config, timeout=UPGRADE_STATE_WAIT):
        """Say hello and read the old generation's state; the config to start from
        (see starting_config).  OSError or ValueError says what went wrong."""
        self.sock.settimeout(timeout)
        self.send_now('hello', versions=list(HANDOVER_VERSIONS), version=VERSION, pid=os.getpid())
        message, self.rest, fds = Channel.receive(self.sock, timeout)
        for fd in fds:
            os.close(fd)
        kind = message.pop('t', None) if isinstance(message, dict) else None
        if kind == 'refused':
            raise ValueError('the old generation refused: %s' % message.get('error'))
        if kind != 'state':
            raise ValueError('the old generation sent %r, not its state' % (kind,))
        if message.get('version') not in HANDOVER_VERSIONS:
            raise ValueError('the old generation sent its state in version %r; this code reads %s' % (
                message.get('version'), ', '.join(map(str, HANDOVER_VERSIONS))))
        problem = HANDOVER['state'].problem(set(message), ())
        if problem is not None:
            raise ValueError('its state has %s' % problem)
        self.state = message
        return self.starting_config(file_config)

    def starting_config(self, file_config):
        """The old generation's running config, which holds the changes made at run
        time; the file as read now goes over it later (started) if it changed since
        the old one last loaded it, as a reload would.  If this code cannot read what
        the old one ran, the file, and those changes are lost (said in the log)."""
        given = self.state['config']
        path = file_config.path
        try:
            running = parse_config(given['running'], path)
            self.loaded = parse_config(given['loaded'], path)
        except ConfigError as e:
            log.warning('upgrade: the running config of the old generation does not load here (%s): starting '
                        'from %s, without the changes made at run time', e, log_value(path))
            return file_config
        self.loaded.digest = given['digest']
        if file_config.digest != given['digest']:
            self.file_config = file_config
        return running

    def restore(self, director):
        """Before the Director starts: the old generation's state, where it still fits."""
        state = self.state
        for key in [k for k in self.sockets if k[0] == 'listen']:
            director.inherited[key] = self.sockets.pop(key)
        director.started = state['started']
        director.generation = state['generation'] + 1
        director.last_reload = state['last_reload']
        director.reloaded = state['config']['reloaded']
        if self.loaded is not None:
            director.config = self.loaded
            director.loaded_xml = self.loaded.to_xml()
        director.discovery.restore(state['discovered'])
        hosts = take_host_states(director, state['hosts'])
        sticky = stick_entries(director, state['sticky'])
        take_switches(director, state['switches'])
        log.info('upgrade: pydirector %s (pid %d) takes over from pydirector %s (pid %d): %d of %d host state(s), '
                 '%d sticky entr(ies)', VERSION, os.getpid(), log_value(state['code_version']), state['pid'],
                 hosts, len(state['hosts']), sticky)

    def started(self, director):
        """The Director has bound what it listens on: the sockets of listens gone are
        closed here (the old generation holds its own until it stops), and the file,
        if it changed, is applied over the running config."""
        for sock in director.inherited.values():
            sock.close()
        director.inherited = {}
        if self.file_config is not None:
            try:
                director.apply_reload(self.file_config)
            except AdminError:
                pass    # logged: the running config stays

    def close_unused(self):
        for sock in self.sockets.values():
            sock.close()
        self.sockets = {}

    def give_up(self, error):
        """Before the loop runs: this generation cannot go on.  The old one, told so,
        goes on serving."""
        self.close_unused()
        try:
            self.sock.settimeout(2.0)
            self.send_now('failed', error=str(error))
        except OSError:
            pass
        self.sock.close()
        return 1

    def start(self, upgrade, master):
        """Once the Director runs its config (main): counters, then the channel on the
        loop, the state acknowledged; serve when the workers are ready and the round of
        health checks is done."""
        self.close_unused()
        self.upgrade = upgrade
        director = upgrade.director
        add_counts(director, self.state['counts'])
        upgrade.takeover = self
        upgrade.reaper.add(self.state['children'])
        self.channel = Channel(director.loop, self.sock, self.on_message, self.lost, self.rest)
        self.send('taken')
        if master is not None:
            master.when_ready = self.checks
        else:
            director.loop.call_soon(self.checks)

    def send(self, kind, **fields):
        if self.channel is not None:
            self.channel.send(new_message(kind, NEW, fields, table=HANDOVER))

    def checks(self):
        """The workers are ready (or there are none): one round of health checks, as long
        as the longest check timeout allows."""
        if self.serving:
            return
        health = self.upgrade.director.health
        self.first_probe = health.probe_round()
        longest = max([health.check(s).timeout for s in self.upgrade.director.services.values()] or [0.0])
        self.deadline = self.upgrade.loop.now + longest + 2 * MANAGER_TICK + 0.5
        self.wait_checks()

    def wait_checks(self):
        loop = self.upgrade.loop
        if self.serving:
            return
        if not self.upgrade.director.health.round_over(self.first_probe) and loop.now < self.deadline:
            loop.call_later(0.02, self.wait_checks)
            return
        self.serve()

    def serve(self, stopping=False):
        """Accept, and tell the old generation to stop accepting (also when this one is
        stopping before it was ready: then both stop)."""
        if self.serving:
            return
        self.serving = True
        upgrade = self.upgrade
        director = upgrade.director
        upgrade.takeover = None
        upgrade.busy = None
        self.send('stop')
        if stopping:
            return
        if director.master is None:
            director.start_accepting()
        state = self.state
        director.last_upgrade = {'time': time.time(), 'ok': True, 'error': None, 'from': state['code_version'],
                                 'to': VERSION}
        log.info('upgrade: pydirector %s serves (pid %d, generation %d, upgraded from pydirector %s); the old '
                 'generation (pid %d) stops accepting', VERSION, os.getpid(), director.generation,
                 log_value(state['code_version']), state['pid'])

    def on_message(self, message, fds):
        try:
            row, fields = received(message, OLD, fds, HANDOVER)
        except MessageError as e:
            log.error('upgrade: the old generation sent %s', e)
            return
        getattr(self, row.handler)(**fields)

    def on_finished(self, counts):
        add_counts(self.upgrade.director, counts)

    def lost(self):
        self.channel = None
        if not self.serving:
            log.warning('upgrade: the old generation (pid %d) went before the handover ended', self.state['pid'])


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------



def handle_signals(director, reload=True, upgrade=None):
    """The signals of a process (main's, and run_worker's): SIGTERM and SIGINT drain
    for <pdconfig drain> (as now loaded) and stop, a second one stops at once;
    SIGUSR1 reopens the logs; SIGHUP reloads (reload False: ignored); SIGUSR2
    upgrades (with an Upgrade; else ignored, as in a worker, which
    `systemctl kill -s USR2` may reach too)."""
    def on_signal(signum, frame):
        # Only hand the loop a call: handlers must not touch state mid-event.
        director.loop.call_soon_threadsafe(handle, signum)

    def handle(signum):
        if signum == signal.SIGUSR1:
            director.close_log()
        elif signum == signal.SIGHUP:
            director.reload_in_background()
        elif signum == signal.SIGUSR2:
            upgrade.request_in_background()
        else:
            if upgrade is not None:
                upgrade.stopping()
            if director.stopping:
                log.info('second stop signal: stopping now')
                director.stop_now()
            else:
                director.begin_stop(director.config.drain)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, on_signal)
    signal.signal(signal.SIGHUP, on_signal if reload else signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, on_signal if upgrade is not None else signal.SIG_IGN)
    # An upgrade's new code starts with these blocked (Upgrade.run_new): what came meanwhile is handled now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, PROCESS_SIGNALS)


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


def shown_attrs(element, skip=(), every=False):
    """An element's attributes in words for --check, as its table writes them:
    ['weight 3', 'interval 1.5s', ...]; those that differ from their defaults
    (every: each set one), but skip."""
    return ['%s %s%s' % (row.name, text, row.unit if row.unit is not None else 's' if isinstance(value, float) else '')
            for row, value, text in written_attrs(ELEMENT_ATTRS[element.TAG], vars(element), every)
            if row.name not in skip]


def summary(config):
    """The one-screen --check summary."""
    def extra(parts, before=' (', after=')', sep=', '):
        return before + sep.join(parts) + after if parts else ''

    lines = ['%s: OK' % config.path]
    for service in config.services:
        parts = ['listen ' + ', '.join(l.text + extra((['sni ' + sni_text(l.sni)] if l.sni else []) +
                                                      shown_attrs(l, skip=('ip', 'sni')))
                                       for l in service.listens)]
        parts += shown_attrs(service, skip=('name',))
        if service.acl:
            parts.append('%d allow/deny rule(s)' % len(service.acl))
        parts.append('timeouts ' + ', '.join(shown_attrs(service.timeouts, every=True)))
        if service.check:
            parts.append('check ' + ', '.join(shown_attrs(service.check, every=True)))
        if service.udp is not None:
            parts.append('udp ' + (', '.join(shown_attrs(service.udp, every=True))))
        if service.clients:
            parts.append('clients ' + ', '.join(shown_attrs(service.clients, every=True)))
        lines.append('service %s: %s' % (service.name, '; '.join(parts)))
        for group in service.groups:
            mark = ' (enabled)' if group.name == service.enabled else ''
            lines.append('  group %s%s: scheduler %s, %d host(s)' % (group.name, mark, group.scheduler, len(group.hosts)))
            for host in group.hosts:
                lines.append('    host %s %s%s' % (host.name, host.ip,
                                                   extra(shown_attrs(host, skip=('name', 'ip')), ' ', '', ' ')))
            for discover in group.discovers:
                lines.append('    discover %s: %s' % (discover.name, ', '.join(
                    shown_attrs(discover, skip=('name',), every=True))))
    if config.admin:
        lines.append('admin: listen %s%s; %d user(s)' % (
            config.admin.listen, extra(shown_attrs(config.admin, skip=('listen',))), len(config.admin.users)))
    lines.append('logging: %s' % (', '.join(shown_attrs(config.logging)) or 'stderr'))
    root = shown_attrs(config, skip=('user', 'group', 'workers'))
    if root:
        lines.append('pdconfig: %s' % ', '.join(root))
    if config.workers is not None:
        lines.append('workers: %s' % (config.workers if config.workers != 'auto' else
                                      'auto (%d here)' % worker_count('auto')))
    if config.user:
        lines.append('runs as: user %s%s' % (config.user, ' group %s' % config.group if config.group else ''))
    lines.extend(config_warnings(config))
    return '\n'.join(lines)


def privilege_ids(config, user=None, group=None):
    """(uid, gid) to switch to after binding, or None to stay as started: the
    --user and --group options (user, group) over <pdconfig user= group=>;
    without a group, the user's own.  A user or group this system does not know
    is a ConfigError before anything starts, --check included: at <pdconfig>'s
    line when the file names it, else naming the option."""
    import grp
    import pwd
    name = user or config.user
    if not name:
        return None
    group_name = group or config.group

    def unknown(what, text, from_file):
        message = '%s %r: no such %s on this system' % (what, text, what)
        if from_file:
            return ConfigError('<pdconfig> ' + message, config.path, config.line)
        return ConfigError('--' + message)

    def lookup(by_id, by_name, text):
        # Not on this system, or not a name at all (a NUL, an id past 32 bits on the command line).
        try:
            return by_id(int(text)) if re.match(r'[0-9]+\Z', text) else by_name(text)
        except (KeyError, ValueError, OverflowError):
            return None

    entry = lookup(pwd.getpwuid, pwd.getpwnam, name)
    if entry is None:
        raise unknown('user', name, not user)
    gid = entry.pw_gid
    if group_name:
        group_entry = lookup(grp.getgrgid, grp.getgrnam, group_name)
        if group_entry is None:
            raise unknown('group', group_name, not group)
        gid = group_entry.gr_gid
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
    """A password from the prompt (twice) or from stdin's first line; SystemExit with a
    one-line message on Ctrl-C, Ctrl-D, end of input or an empty password."""
    import getpass
    try:
        if sys.stdin.isatty():
            first = getpass.getpass('Password: ')
            if getpass.getpass('Again: ') != first:
                raise SystemExit('pydirector: the passwords differ')
        else:
            first = sys.stdin.readline()
            if not first:
                raise SystemExit('pydirector: no password on stdin')
            first = first.rstrip('\r\n')
    except (EOFError, KeyboardInterrupt):
        print(file=sys.stderr)      # end the prompt's line
        raise SystemExit('pydirector: no password given')
    if not first:
        raise SystemExit('pydirector: an empty password is refused')
    return first


def workers_option(text):
    try:
        return parse_workers(text, '--workers')
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def parse_args(argv):
    parser = argparse.ArgumentParser(prog=os.path.basename(sys.argv[0]) or 'pydirector.py', description='A TCP load balancer in pure Python.')
    parser.add_argument('config_file', nargs='?', help='the XML config (same as -c)')
    parser.add_argument('-c', '--config', help='the XML config file')
    parser.add_argument('--check', action='store_true', help='validate the config, print a summary, bind nothing')
    parser.add_argument('--hash-password', action='store_true',
                        help='read a password (prompt or stdin) and print its hash for <user password=...>')
    parser.add_argument('--user', help='switch to this user after binding (overrides <pdconfig user=>)')
    parser.add_argument('--group', help='and to this group (default: the user\'s own)')
    parser.add_argument('--workers', type=workers_option, metavar='N|auto',
                        help='a master and N worker processes (auto: one per CPU); overrides <pdconfig workers=>')
    # How the master starts a worker: its number, and the fd of its end of the channel.
    parser.add_argument('--worker', type=int, metavar='N', help=argparse.SUPPRESS)
    parser.add_argument('--channel', type=int, metavar='FD', help=argparse.SUPPRESS)
    parser.add_argument('-v', '--verbose', action='store_true', help='log debug detail')
    parser.add_argument('--version', action='version', version='pydirector ' + VERSION)
    args = parser.parse_args(argv)
    if args.config and args.config_file and args.config != args.config_file:
        parser.error('give the config once: -c FILE or FILE')
    args.config = args.config or args.config_file
    if (args.worker is None) != (args.channel is None):
        parser.error('--worker N goes with --channel FD')
    if not args.config and not args.hash_password and args.worker is None:
        parser.error('a config file is needed: -c FILE')
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker is not None:
        return run_worker(args.channel, args.verbose)
    if args.hash_password:
        print(hash_password(read_password()))
        return 0
    try:
        takeover = Takeover.from_environ()      # an upgrade's new generation: see Upgrade
    except ValueError as e:
        print('pydirector: upgrade: %s' % e, file=sys.stderr)
        return 1

    try:
        config = load_config(args.config)
        # Here, not at startup only: --check must refuse what startup would.
        ids = privilege_ids(config, args.user, args.group)
    except ConfigError as e:
        print('pydirector: %s' % e, file=sys.stderr)
        return 1 if takeover is None else takeover.give_up(e)
    if args.check:
        if config.admin is not None:
            # An upgrade checks the new code with --check: the admin's module must import too.
            sys.modules.setdefault('pydirector', sys.modules[__name__])
            import pydirector_admin  # noqa: F401
        try:
            print(summary(config))
            sys.stdout.flush()
        except BrokenPipeError:     # `--check x.xml | head`: the reader had enough
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    workers = worker_count(args.workers if args.workers is not None else config.workers)
    try:
        setup_logging(config, args.verbose)
    except OSError as e:
        print('pydirector: cannot open the log: %s' % e, file=sys.stderr)
        return 1 if takeover is None else takeover.give_up('cannot open the log: %s' % e)
    for line in config_warnings(config):
        log.warning('%s', line)
    raise_fd_limit()
    notifier = Notifier()
    if takeover is not None:
        try:
            config = takeover.receive(config)
        except (OSError, ValueError) as e:
            log.error('upgrade: cannot take over from the old generation: %s', e)
            return takeover.give_up(e)
    director = Director(config, notifier=notifier, accept=workers is None and takeover is None)
    director.udp_slots = workers or 1     # bound at start, with the rest: root may be dropped after
    director.udp_reuseport = workers is not None
    upgrade = Upgrade(director, notifier)
    if takeover is not None:
        upgrade.busy = 'taking over'    # (a SIGUSR2 from now on is refused until it serves)
        takeover.restore(director)
    handle_signals(director, upgrade=upgrade)   # before binding: once a port answers, a signal must find its handler
    try:
        director.start()
    except OSError as e:
        error = e.strerror if (e.strerror or '').startswith('cannot listen') else 'cannot listen: %s' % e
        log.error('%s', error)
        return 1 if takeover is None else takeover.give_up(error)
    if takeover is not None:
        takeover.started(director)
    config = director.config
    if config.admin is None:
        log.info('no <admin> in %s: the admin interface is off', log_value(config.path))
    else:
        # Run as a script this module is __main__; the admin must see these same classes.
        sys.modules.setdefault('pydirector', sys.modules[__name__])
        import pydirector_admin
        upgrade.admin_address = (config.admin.host, config.admin.port)
        handed = takeover.take('admin', address_key(*upgrade.admin_address)) if takeover is not None else None
        try:
            upgrade.admin = pydirector_admin.start(director, config.admin, handed)
        except OSError as e:
            if (e.strerror or '').startswith('cannot listen'):
                error = 'admin %s' % e.strerror
            else:
                error = 'admin cannot listen on %s: %s' % (config.admin.listen, e)
            log.error('%s', error)
            director.stop_now()
            return 1 if takeover is None else takeover.give_up(error)
    if ids is not None:
        try:
            drop_privileges(*ids)
        except OSError as e:
            log.error('cannot drop privileges: %s', e)
            director.stop_now()
            upgrade.finish()
            return 1 if takeover is None else takeover.give_up('cannot drop privileges: %s' % e)
        log.info('running as uid %d, gid %d', os.getuid(), os.getgid())

    master = None
    if workers is not None:
        # Spawned now, as the user the master became; ready once they all accept.
        try:
            master = upgrade.master = Master(director, workers, verbose=args.verbose)
        except OSError as e:
            log.error('%s', e.strerror or e)
            director.stop_now()
            upgrade.finish()
            return 1 if takeover is None else takeover.give_up(e.strerror or str(e))
    if takeover is not None:
        takeover.start(upgrade, master)     # serves once ready; the old generation says READY=1
    elif master is None:
        notifier.ready()    # listening, admin too, privileges dropped
    else:
        master.when_ready = notifier.ready
    if master is not None:
        master.start()
        log.info('started %d worker(s)', workers)
    notifier.start_watchdog(director.loop, director.serving)
    try:
        director.loop.run()
    finally:
        director.access.flush()     # a fatal error too: what was logged is written
        upgrade.finish()            # (an upgrade's old generation exits there)
    log.info('stopped')
    return 0


if __name__ == '__main__':
    sys.exit(main())
