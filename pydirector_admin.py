"""pydirector_admin: the admin web interface of pydirector.

An operator drives it from a browser, scripts drive it with wget or curl.
pydirector.py imports this module only when the config has <admin>, then
calls start(director, admin_config) and, at shutdown, server.stop().

Threads: one reader thread accepts connections and reads each request
whole (TLS handshake included) on a pydirector Loop of its own, so a slow
client costs a socket, not a thread; /healthz is answered there too,
never behind the workers; other complete requests are answered by at most
32 worker threads (more wait in a short queue, those with credentials that
passed before at its head; past it, 503).  The workers never touch balancer state: every page is rendered from director.snapshot() and every
change is one Director method, both run on the loop thread through
director.loop.call().  A loop that does not answer in time gives 503.

Reading (GET or HEAD):
    /               index: version, host name, start time, links
    /running        the HTML status page: a summary row per service, then
                    each service's groups and hosts with their counts, last
                    probe, downtime and recent state changes, the last 15
                    minutes drawn as sparklines, a pending group switch and
                    a form for every change (?refresh=N reloads it every N
                    seconds; ?msg= shows a result)
    /running.txt    text for scripts, one record per line (see render_running_txt)
    /running.json   everything on /running as JSON, the history's series too
    /running.csv    one line per host, after a header line (see render_running_csv)
    /running.xml    the running configuration; pydirector.py -c accepts it
    /config.xml     the configuration file as last loaded (at start, or by the
                    last reload); both XML pages hold password hashes: full
                    access only
    /metrics        Prometheus text exposition format 0.0.4
    /explain?service=S&client=IP[&format=json]
                    which host that client would get now and why, and
                    whether the service's <clients> limits refuse it now,
                    one fact per line (or the director's dict as JSON);
                    changes nothing
    /explain?service=S&client=IP&sni=NAME, /explain?listen=ADDR&client=IP[&sni=NAME]
                    on a listen with sni: which service a hello naming NAME
                    (none: a hello without a name) lands on and why, then as above
    /healthz        for keepalived and load balancers in front, no credentials:
                    200 "OK" when the balancer loop answers within 1 s and
                    every service's enabled group has a host up (and not
                    draining); else 503 "DOWN N", N the services with none
                    (all of them once stopping, or with workers while none
                    runs its loop), or "DOWN" alone when the loop did not
                    answer

Changing (POST with a form body, as `wget --post-data=...` and `curl -d ...`
send it; the ACTIONS table maps each onto one Director method.  GET with a
query string, Python Director 1.0's style, only where <admin get_changes="on">:
a GET can be made by any page in the operator's browser, and over plain HTTP
nothing tells such a request from the operator's own, so keep that to an
admin on HTTPS or on loopback):
    addHost?service=S&group=G&name=N&ip=H:P[&weight=W][&maxconns=M][&send_proxy=v1|v2][&backup=on]
                    (an ip that is a listen of this balancer's, so that
                    clients would come back, is refused as the config refuses it)
    delHost?service=S&group=G&name=N     (or &ip=H:P instead of name)
    delAllHosts?service=S&group=G
    enableGroup?service=S&group=G[&drain=SECONDS][&rollback=SECONDS][&force=1]
                    drain: close the connections left on the old group after
                    that long; rollback: switch back unless a host of G is up
                    at the end of that window, by probes made since the switch
                    (every host of G is probed at once); a group with no host
                    up is refused (409) unless force=1
    changeScheduler?service=S&group=G&scheduler=X
    setHost?service=S&group=G&name=N[&weight=W][&maxconns=M][&state=ready|drain|maint][&force=1]
                    change a host in place, keeping its health, counters and
                    connections (HAProxy's set server weight / maxconn /
                    state): drain takes no new clients but its sticky ones,
                    maint takes none and stops its probes; drain or maint for
                    the last host up of the enabled group is refused (409)
                    unless force=1
    hostAdminDown?service=S&group=G&name=N[&force=1]   (Python Director 1.0's: setHost state=drain)
    hostAdminUp?service=S&group=G&name=N       (1.0's: setHost state=ready, from drain or maint)
    retryHost?service=S&group=G&name=N         (health-check it now)
    addUser?name=N&password=P&access=full|readonly
                    (or password_hash=H instead of password: a hash as a
                    config file holds it, as `apply` copies users)
    delUser?name=N
    newGroup?service=S&group=G&scheduler=X
    delGroup?service=S&group=G
    closeLog                                   (reopen the log file, for logrotate)
    reload                                     (re-read the config file, as SIGHUP does; the
                    answer ends with the runtime changes it undid: "; undid: ...")
    saveConfig[?force=1]                       (write the running config to the config file,
                    atomically, the previous one kept as FILE.bak; 409 when the file
                    changed on disk since it was last loaded, unless force=1)
    upgrade                                    (run the program as it is on disk now, same pid,
                    without losing a connection, as SIGUSR2 does: answered once the
                    new code has passed its --check and the upgrade has started; 400
                    with the check's error, and nothing changed, when it fails it; 409
                    while an upgrade runs.  The outcome shows on /running and /metrics)

Answers to a change: a browser (its Accept names text/html) is redirected
(303) to /running?msg=... showing the result; anything else gets text/plain
"OK <what was done>" with 200, or "ERROR <why>" with a 4xx status, so
`wget -q -O - --content-on-error URL` prints the result and exits non-zero
on failure (without --content-on-error, wget prints nothing on a 4xx), as
does `curl -sS URL` (add --fail-with-body for the exit status).

Statuses: 400 bad, missing or unknown parameter; 401 no or bad credentials
(with the Basic challenge wget waits for); 403 read-only user, or a
cross-site change; 404 unknown page, service, group, host or user; 405
wrong method (a change as GET: it names --post-data and get_changes); 409
refused by a rule (last host of the enabled group, a group with no host up,
draining the last host up, last full user, a config file changed on disk
for saveConfig, ...; force=1 where the call says); 411/413/414/415/431 a
request we will not read; 429 too many failed logins from this address, or
another password being checked (Retry-After says how long); 503 the
balancer loop did not answer in time, or every worker is busy.  500 means
a config file saveConfig cannot write (the answer says why), or else a bug
here, logged once with its traceback.

Security: every request needs HTTP Basic credentials checked against the
password hashes of the config (pydirector.check_password, deliberately
slow: successful checks are cached in memory, one check runs at a time and
a login that finds it busy is refused at once, 429; an unknown user costs
what a known one does).  Every request that does not authenticate -- no,
malformed or wrong credentials, or a bad request -- counts against its
address: after 5, it is told to wait, 429, for a time that doubles up to a
minute, its requests held a second and answered by the reader unless they
carry credentials that passed before; a login that passes forgives its
address (wget asks without credentials first).  The log has a line for an
address's first failure, then a summary every 10 s while it goes on.  A changing request that
a browser marks as cross-site (Sec-Fetch-Site) or whose Origin or Referer
names another host than Host is refused, so a page elsewhere cannot drive a
logged-in browser; the status page's own forms POST and pass.  Everything
user-supplied is escaped in HTML, parameters with control characters are
refused, and log lines escape what they quote.  Requests are bounded in
size and time.  Past 1024 connections still sending a request (or a quarter
of the open-file limit) the oldest of them is closed, never the new one, so
clients that trickle their requests cannot lock the operator out.

/healthz is the one page without credentials (keepalived's check reads
it); it tells no more than OK or DOWN N.

Command line (the original's compareconf): plan and make a config change
across a fleet through this API, without restarting anything.

    python3 pydirector_admin.py diff  --url http://USER:PW@HOST:7001 [--url ...] NEW.xml
    python3 pydirector_admin.py apply --url http://USER:PW@HOST:7001 [--url ...] NEW.xml

Each --url is one balancer's admin server (https:// too; --insecure skips
certificate checks); the user needs full access.  With http://USER@HOST:PORT
the password comes from $PYDIRECTOR_ADMIN_PASSWORD instead of the command
line.  Both commands fetch each
balancer's /running.xml, read it and NEW.xml with pydirector.parse_config,
and compare the two as to_xml() writes them, so the same thing spelt two
ways is no difference.  Order of groups and hosts is not compared either:
addHost and newGroup can only append.  `diff` prints, per balancer, the
calls that would make its running config NEW.xml, one per line
(`addHost service=web group=main name=four ip=127.0.0.1:8084 weight=2`),
or `# no changes`.  `apply` makes them, one balancer after the other, and
stops at the first refusal (exit 1, saying what was done before it); at the
end it reads every balancer back and fails if anything still differs.

The order of the calls keeps every service serving: first, per group, new
groups with their hosts, scheduler changes, new hosts and changed hosts;
then enableGroup (with --drain/--rollback if given); then delHost and
delGroup, once what they remove no longer takes new connections; users
last (addUser before delUser, as the last full-access user cannot go, and
the calling user's own change at the very end, as later calls would not
pass with its old password).  A host whose weight or maxconns changes is
changed in place by setHost (its health, counters and connections stay); a
host whose ip, send_proxy or backup changes is deleted and added again
(its open connections finish; its counters restart): after the switch when
its group stops being the enabled one, else at once when the group has
other hosts to serve meanwhile.  What no call can do -- a service added or
removed, listen addresses, checks, timeouts, maxconns, allow/deny rules,
PROXY settings, logging, the <admin> block, the only host of the enabled
group changing -- is printed as `# cannot apply through the admin API:
...`, and `apply` then changes nothing: copy the file to the balancer and
call /reload (or send SIGHUP).  Exit status of `diff`: 0 no differences, 1 differences, 2 trouble (as
diff(1) has it); of `apply`: 0 done, 1 failed, 2 usage.
"""

import argparse
import base64
import binascii
import collections
import csv
import email.utils
import hashlib
import html
import http.client
import http.server
import io
import json
import logging
import os
import re
import socket
import ssl
import sys
import threading
import time
import urllib.parse
from xml.etree import ElementTree

import pydirector
from pydirector import (AdminError, attribute_changes, LoopTimeout, VERSION, EVENT_READ, EVENT_WRITE, check_password, escape_text,
                        expand_history, format_address, hash_password, has_control_chars)

log = logging.getLogger('pydirector.admin')

MAX_REQUEST_LINE = 8192       # bytes; longer gets 414
MAX_HEADER_LINE = 8192        # bytes per header line; longer gets 431
MAX_HEADERS = 100
MAX_HEADER_BYTES = 32768      # the whole header block
MAX_BODY = 65536              # POST body; longer gets 413
REQUEST_TIMEOUT = 10.0        # seconds a single socket read or write may wait
LOOP_TIMEOUT = 5.0            # seconds to wait for the balancer loop; then 503
CONNECTION_DEADLINE = 30.0    # seconds a connection may live, TLS handshake included
LINGER_SECONDS = 1.0          # reading what a client still sends after our answer, before closing,
LINGER_BYTES = 262144         # ... and how much of it at most
MAX_PENDING = 1024            # connections still sending their request; past it the oldest is closed
MAX_WORKERS = 32              # requests answered at once, a thread each
MAX_QUEUED = 64               # complete requests waiting for a worker; past it 503
LISTEN_BACKLOG = 128
AUTH_CACHE_SIZE = 1024
PASSWORD_CHECKS = 1           # slow password checks at once: each takes a core while it runs; past it 429
FREE_FAILURES = 5             # failed logins from one address before it is slowed down
MAX_BACKOFF = 60.0            # the longest it is then told to wait (429), doubling from 1 s
REFUSAL_DELAY = 1.0           # seconds a request from an address told to wait is held before it is answered
FAILURE_MEMORY = 10000        # client addresses whose failures are remembered
LOG_INTERVAL = 10.0           # seconds: an address's failed logins get a line, then a summary per interval
LOG_ADDRESSES = 100           # addresses with lines of their own per interval; the rest are summed up
REALM = 'pydirector'
HEALTHZ = '/healthz'
HEALTHZ_LOOP_TIMEOUT = 1.0    # seconds; a loop slower than that is a node to fail over from

# The pages: path -> (handler method, needs full access).  Read with GET or HEAD.
# The two XML pages carry the users' password hashes, so they need full access.
PAGES = {
    '/': ('page_index', False),
    '/running': ('page_running', False),
    '/running.txt': ('page_running_txt', False),
    '/running.json': ('page_running_json', False),
    '/running.csv': ('page_running_csv', False),
    '/running.xml': ('page_running_xml', True),
    '/config.xml': ('page_config_xml', True),
    '/metrics': ('page_metrics', False),
    '/explain': ('page_explain', False),
    HEALTHZ: ('page_healthz', False),       # the one page without credentials
}


class Action(collections.namedtuple('Action', 'method required optional prepare on_loop')):
    """A change: the Director method it calls with the parameters (required ones
    first, then optional ones as keywords), after prepare(params) has turned them
    into its arguments in the worker thread (Reply when refused).  on_loop False:
    the method does its own waiting (reload reads the file in this thread)."""


def _delhost_params(p):
    if p['name'] is None and p['ip'] is None:
        raise Reply(400, 'missing parameter name (or ip)')
    return p


def _adduser_params(p):
    if (p['password'] is None) == (p['password_hash'] is None):
        raise Reply(400, 'give password or password_hash (one of them)')
    if p['password_hash'] is None:
        # Slow by design: here, in the worker, not on the loop.  A hash as a
        # config file holds it is how `diff`/`apply` copy users from a file.
        p['password_hash'] = hash_password(p['password'])
    del p['password']
    return p


def _action(method, required=(), optional=(), prepare=None, on_loop=True):
    return Action(method, tuple(required), tuple(optional), prepare, on_loop)


# The changes: path -> Action.  POST (and GET with a query string where
# <admin get_changes="on">), full access only, and the cross-site check.
ACTIONS = {
    '/addHost': _action('add_host', ('service', 'group', 'name', 'ip'),
                        ('weight', 'maxconns', 'send_proxy', 'backup')),
    '/delHost': _action('del_host', ('service', 'group'), ('name', 'ip'), _delhost_params),
    '/delAllHosts': _action('del_all_hosts', ('service', 'group')),
    '/enableGroup': _action('enable_group', ('service', 'group'), ('drain', 'rollback', 'force')),
    '/changeScheduler': _action('change_scheduler', ('service', 'group', 'scheduler')),
    '/setHost': _action('set_host', ('service', 'group', 'name'), ('weight', 'maxconns', 'state', 'force')),
    '/hostAdminDown': _action('host_admin_down', ('service', 'group', 'name'), ('force',)),
    '/hostAdminUp': _action('host_admin_up', ('service', 'group', 'name')),
    '/retryHost': _action('retry_host', ('service', 'group', 'name')),
    '/addUser': _action('add_user', ('name', 'access'), ('password', 'password_hash'), _adduser_params),
    '/delUser': _action('del_user', ('name',)),
    '/newGroup': _action('new_group', ('service', 'group', 'scheduler')),
    '/delGroup': _action('del_group', ('service', 'group')),
    '/closeLog': _action('close_log'),
    '/reload': _action('reload', on_loop=False),
    '/saveConfig': _action('save_config', optional=('force',), on_loop=False),
    '/upgrade': _action('upgrade', on_loop=False),
}


def start(director, admin_config, sock=None):
    """Bind the admin server (OSError if it cannot), serve it in daemon threads, return it.
    sock: a listening socket to serve on instead (an upgrade handed it on)."""
    context = None
    if admin_config.certfile or admin_config.keyfile:
        context = make_ssl_context(admin_config.certfile, admin_config.keyfile)
    host = admin_config.host
    if host == '*':
        host = ''
    server = AdminServer((host, admin_config.port), director, context,
                         get_changes=getattr(admin_config, 'get_changes', False), sock=sock)
    server.start()
    log.info('admin listening on %s://%s', 'https' if context else 'http',
             format_address(*server.server_address))
    return server


def make_ssl_context(certfile, keyfile):
    """A server-side TLS context (ssl.SSLError and FileNotFoundError are OSErrors)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if hasattr(context, 'minimum_version'):  # Python 3.7+
        context.minimum_version = ssl.TLSVersion.TLSv1_2
    else:
        context.options |= ssl.OP_NO_TLSv1 | ssl.OP_NO_TLSv1_1
    context.load_cert_chain(certfile, keyfile or None)
    return context


class Reply(Exception):
    """Stop handling this request and answer `status` with 'ERROR message'."""

    def __init__(self, status, message, headers=()):
        Exception.__init__(self, message)
        self.status = status
        self.message = message
        self.headers = list(headers)


# ---------------------------------------------------------------------------
# The server: one reader thread accepts connections and reads their requests
# (TLS handshake included) on a pydirector Loop of its own; only complete
# requests reach the worker threads.  A cap on each, a deadline per
# connection, optional TLS, and the password checks with their limits.
# ---------------------------------------------------------------------------

# What the reader hands a worker: the socket, the client's address, every byte
# of the request, and the monotonic time the connection must be done by.
Request = collections.namedtuple('Request', 'sock address data deadline')


class AdminServer(object):
    """The admin HTTP(S) server.  server_address is the (host, port) actually bound."""

    def __init__(self, address, director, ssl_context=None, get_changes=False, sock=None):
        self.director = director
        self.ssl_context = ssl_context
        self.scheme = 'https' if ssl_context is not None else 'http'
        self.get_changes = get_changes
        # Tests lower these on a running server to see the limits act quickly.
        self.max_pending = pending_limit()
        self.max_workers = MAX_WORKERS
        self.max_queued = MAX_QUEUED
        self.request_timeout = REQUEST_TIMEOUT
        self.connection_deadline = CONNECTION_DEADLINE
        self.loop_timeout = LOOP_TIMEOUT
        self.refusal_delay = REFUSAL_DELAY
        self.lock = threading.Lock()
        self.idle = threading.Condition(self.lock)
        self.busy = 0                       # worker threads running
        self.queue = collections.deque()    # complete requests waiting for a worker
        self.answering = {}                 # socket -> deadline, while a worker answers it
        self.passwords = PasswordChecks()
        self.socket = sock if sock is not None else pydirector.listen_socket(address[0], address[1], LISTEN_BACKLOG)
        self.server_address = self.socket.getsockname()[:2]
        self.reader = RequestReader(self)

    def start(self):
        self.reader.start()

    def stop(self):
        """Stop accepting, close the socket, cut open connections and wait for the workers."""
        self.reader.stop()
        with self.lock:
            while self.queue:
                self.queue.popleft().sock.close()
            for sock in self.answering:
                shutdown_socket(sock)
            self.idle.wait_for(lambda: self.busy == 0, timeout=5.0)

    # -- an upgrade (pydirector.Upgrade) ----------------------------------------

    def pause(self):
        """Stop accepting (the socket stays open: connections wait in its queue for the
        admin of the upgrade's new generation); from any thread."""
        self.reader.loop.call_soon_threadsafe(self.reader.stop_accepting)

    def resume(self):
        self.reader.loop.call_soon_threadsafe(self.reader.start_accepting)

    def requests_in_flight(self):
        """Requests accepted and not answered yet (being read, waiting, being answered)."""
        return len(self.reader.pending) + len(self.queue) + self.busy

    def forget(self):
        """In the child of a fork (an upgrade's old generation), where this server's
        threads do not run: close what it holds, waiting for nothing, but its listening
        socket, which is returned (the old generation serves on it again if the upgrade
        fails)."""
        reader = self.reader
        for sock in (list(reader.pending) + list(reader.lingering) + list(reader.returning) +
                     [request.sock for request in self.queue] + list(self.answering)):
            sock.close()
        reader.loop.close()
        return self.socket

    def open_connections(self):
        """Connections not closed yet, whatever their stage (a snapshot, for tests and logs)."""
        reader = self.reader
        return len(reader.pending) + len(reader.lingering) + len(reader.returning) + len(self.queue) + self.busy

    # -- workers ------------------------------------------------------------

    def take(self, request, operator=False):
        """From the reader: answer a complete request in a worker thread, or queue it.
        False when every worker is busy and the queue is full too.  operator: its
        credentials passed before; it goes before every request waiting, and may
        fill the queue to twice its size, so a flood never stands in its way."""
        with self.lock:
            if self.busy >= self.max_workers:
                if len(self.queue) >= self.max_queued * (2 if operator else 1):
                    return False
                if operator:
                    self.queue.appendleft(request)
                else:
                    self.queue.append(request)
                return True
            self.busy += 1
        try:
            pydirector.start_thread(self.work, 'pydirector-admin-worker', (request,))
        except RuntimeError:    # "can't start new thread"
            with self.lock:
                self.busy -= 1
            return False
        return True

    def work(self, request):
        """A worker thread: answer the request, then whatever waits in the queue."""
        while request is not None:
            self.answer(request)
            with self.lock:
                request = self.queue.popleft() if self.queue else None
                if request is None:
                    self.busy -= 1
                    self.idle.notify_all()

    def answer(self, request):
        sock = request.sock
        if time.monotonic() > request.deadline:     # waited in the queue past its deadline
            sock.close()
            return
        with self.lock:
            self.answering[sock] = request.deadline
        try:
            sock.settimeout(self.request_timeout)
            AdminHandler(sock, request.address, self, request.data)
        except Exception:
            self.handle_error(request.address)
        finally:
            with self.lock:
                self.answering.pop(sock, None)
            self.reader.linger(sock)

    def cut_late_answers(self, now):
        """Called by the reader: cut connections whose answer is still going past their deadline.

        The socket timeout bounds each write, but a client reading a byte
        every few seconds would pass it forever; this bounds the total.
        """
        with self.lock:
            for sock, deadline in self.answering.items():
                if deadline < now:
                    log.info('admin: a connection passed its %g s deadline; closing it',
                             self.connection_deadline)
                    shutdown_socket(sock)
                    self.answering[sock] = float('inf')  # cut once; its worker ends on its own

    def handle_error(self, client_address):
        # Resets, timeouts and broken pipes are a client going away, not a bug.
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            log.debug('admin: connection from %s: %s', client_address[0], error)
        else:
            log.exception('admin: unexpected error serving %s', client_address[0])


# Why a request did not authenticate: kind -> (whether it counts toward the wait its
# address is told, the line logged for the first of its kind from an address in an
# interval (None: only summed up, see PasswordChecks.failed)).
FAILURES = {
    'no credentials': (True, None),     # a browser's or wget's first request: not worth a line
    'malformed credentials': (True, 'malformed credentials from %(ip)s'),
    'bad credentials': (True, 'bad credentials for user %(user)s from %(ip)s'),
    'no turn to check': (True, 'too many logins being checked; refused user %(user)s from %(ip)s'),
    'bad request': (True, None),        # refused before its credentials were looked at
    'told to wait': (False, 'too many failed logins from %(ip)s; it is told to wait'),
}


class PasswordChecks(object):
    """check_password, made safe to offer to anyone who can reach the port.

    A check is deliberately slow (PBKDF2, a core for a moment), so: successes
    are cached (a changed hash misses), and a cached success passes at once
    whatever else comes from its address; at most PASSWORD_CHECKS run at
    once, and a login that finds none free is refused at once (429), never
    queued: a queue of them held every worker.  Every request that does not
    authenticate -- no credentials, malformed ones, wrong ones, no turn to
    check them, a bad request -- counts against its address (failed()), and
    after FREE_FAILURES the address is told to wait (429) for a time that
    doubles with each further failure, up to MAX_BACKOFF, without a check
    being made; the reader holds such requests REFUSAL_DELAY and answers
    them itself, unless passed() says they carry cached credentials.  A
    login that passes forgives its address: wget asks without credentials
    first, every time.  An unknown user costs a full check too, so timing
    does not tell which names exist, and counts as a failure like any other.

    The log has one line for an address's first failure (of a kind worth
    one, FAILURES) and then, per LOG_INTERVAL while it goes on, one summary
    of what followed; at most LOG_ADDRESSES addresses get lines of their own
    per interval, the rest are summed up in one.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.cache = {}         # (user, sha256 of the password) -> the stored hash it passed against
        self.turns = threading.BoundedSemaphore(PASSWORD_CHECKS)
        self.failures = collections.OrderedDict()    # client ip -> [count, blocked until], oldest first
        self.logged = {}        # client ip -> {kind: count} since its last line: at most LOG_ADDRESSES
        self.unlisted = 0       # failures from addresses past LOG_ADDRESSES since the last summary
        self.last_summary = time.monotonic()
        self.unknown_user_hash = None

    def blocked_for(self, ip):
        """Seconds this address must still wait before its next attempt (0: none)."""
        with self.lock:
            entry = self.failures.get(ip)
            if entry is None:
                return 0.0
            return max(0.0, entry[1] - time.monotonic())

    def check(self, ip, name, password, stored):
        """True if password is right for a user whose hash is stored (None: no such user).
        Reply(429) for an address told to wait, or when no check can start at once."""
        key = (name, hashlib.sha256(password.encode('utf-8')).digest())
        if stored is not None:
            with self.lock:
                if self.cache.get(key) == stored:
                    self.failures.pop(ip, None)
                    return True     # passed before: an operator is never locked out by a flood
        wait = self.blocked_for(ip)
        if wait > 0:
            self.failed(ip, 'told to wait')
            raise too_many_failures(ip, wait)
        if not self.turns.acquire(blocking=False):
            self.failed(ip, 'no turn to check', name)
            raise Reply(429, 'too many logins being checked; try again in 1 s', [('Retry-After', '1')])
        try:
            if stored is None and self.unknown_user_hash is None:
                self.unknown_user_hash = hash_password('no such user')
            ok = check_password(password, stored or self.unknown_user_hash) and stored is not None
        except Exception:
            log.exception('admin: cannot check the password of user %s', escape_text(name))
            ok = False
        finally:
            self.turns.release()
        if not ok:
            self.failed(ip, 'bad credentials', name)
            return False
        with self.lock:
            if len(self.cache) >= AUTH_CACHE_SIZE:
                self.cache.clear()
            self.cache[key] = stored
            self.failures.pop(ip, None)
        return True

    def passed(self, credentials):
        """Whether (user, password) passed a check before, against whatever hash then."""
        if credentials is None:
            return False
        key = (credentials[0], hashlib.sha256(credentials[1].encode('utf-8')).digest())
        with self.lock:
            return key in self.cache

    def failed(self, ip, kind, user=None):
        """A request from ip did not authenticate, for the reason `kind` (a row of FAILURES):
        count it toward the wait its address is told, and log it or sum it up."""
        counts, line = FAILURES[kind]
        with self.lock:
            if counts:
                self._failed(ip)
            tally = self.logged.get(ip)
            if tally is not None:
                tally[kind] = tally.get(kind, 0) + 1
                return
            if line is None:
                return
            if len(self.logged) >= LOG_ADDRESSES:
                self.unlisted += 1
                return
            self.logged[ip] = {}
        log.warning('admin: ' + line, {'ip': ip, 'user': escape_text(user or '')})

    def _failed(self, ip):
        entry = self.failures.pop(ip, None) or [0, 0.0]
        entry[0] += 1
        if entry[0] >= FREE_FAILURES:
            entry[1] = time.monotonic() + min(MAX_BACKOFF, 2.0 ** (entry[0] - FREE_FAILURES))
        self.failures[ip] = entry
        while len(self.failures) > FAILURE_MEMORY:
            self.failures.popitem(last=False)

    def log_summaries(self, now):
        """Called by the reader's sweep: once per LOG_INTERVAL, a line per address on the
        failures since its last line; one still failing keeps its place for the next."""
        if now - self.last_summary < LOG_INTERVAL:
            return
        with self.lock:
            self.last_summary = now
            logged, self.logged = self.logged, {}
            unlisted, self.unlisted = self.unlisted, 0
            lines = []
            for ip, tally in logged.items():
                if tally:
                    self.logged[ip] = {}
                    kinds = sorted(tally.items(), key=lambda kind_count: -kind_count[1])
                    lines.append('admin: %s: %d more failed logins: %s' % (
                        ip, sum(tally.values()), ', '.join('%d %s' % (n, kind) for kind, n in kinds)))
        for line in lines:
            log.warning(line)
        if unlisted:
            log.warning('admin: %d more failed logins from addresses past the first %d', unlisted, LOG_ADDRESSES)


def too_many_failures(ip, wait):
    """The 429 for an address told to wait `wait` more seconds."""
    seconds = max(1, int(wait + 0.999))
    return Reply(429, 'too many failed logins from %s; try again in %d s' % (ip, seconds),
                 [('Retry-After', '%d' % seconds)])


def basic_credentials(value):
    """(user, password) from an Authorization header's value, or None unless it holds Basic ones."""
    scheme, _, encoded = value.strip().partition(' ')
    if scheme.lower() != 'basic':
        return None
    try:
        raw = base64.b64decode(encoded.strip(), validate=True)
    except (ValueError, binascii.Error):
        return None
    try:
        text = raw.decode('utf-8')
    except UnicodeDecodeError:
        text = raw.decode('latin-1')
    name, colon, password = text.partition(':')
    return (name, password) if colon else None


def pending_limit():
    """MAX_PENDING, or a quarter of the open-file limit if that is lower: clients
    holding admin sockets open must not take the descriptors the balancer needs."""
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return MAX_PENDING
    if soft == resource.RLIM_INFINITY:
        return MAX_PENDING
    return max(16, min(MAX_PENDING, soft // 4))


def shutdown_socket(sock):
    # socket.socket.shutdown, not SSLSocket.shutdown: another thread may be
    # inside an SSL read, and this only needs to wake it with EOF.
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


def send_close_notify(sock):
    """TLS: say the answer is complete, for clients that read to the end (a bare TCP
    close is an error to some); without waiting for theirs, the socket being non-blocking."""
    if isinstance(sock, ssl.SSLSocket):
        try:
            sock.unwrap()
        except OSError:     # ssl.SSLWantReadError: their close_notify is not here, and need not be
            pass


class RequestScanner(object):
    """Finds where a request ends in the bytes received so far, under the same
    limits the handler reads it with: the request line, the header block to
    its blank line, then the body its Content-Length announces.

    The reader feeds it after each recv, and it picks up where it stopped, so
    a request trickled a byte at a time costs no rescans; the handler runs it
    once over the whole request to take the parts apart.  scan() is True once
    the request is whole, or as soon as it must be refused: then `error` is
    the Reply (400, 411, 413, 414, 431) the handler answers with.
    """
    __slots__ = ('at', 'lines', 'line_end', 'head_start', 'head_end', 'header_bytes', 'end', 'error')

    def __init__(self):
        self.at = 0               # the start of the next line to look at
        self.lines = 0            # lines seen, the request line included
        self.line_end = None      # where the request line ends (after its newline)
        self.head_start = 0
        self.head_end = None      # after the blank line
        self.header_bytes = 0
        self.end = None           # where the request ends, body included
        self.error = None

    def scan(self, data):
        while self.end is None and self.error is None:
            first = self.lines == 0
            limit = MAX_REQUEST_LINE if first else MAX_HEADER_LINE
            newline = data.find(b'\n', self.at, self.at + limit)
            if newline < 0:
                if len(data) - self.at > limit:
                    self.error = (Reply(414, 'request line over %d bytes' % MAX_REQUEST_LINE) if first else
                                  Reply(431, 'header line over %d bytes' % MAX_HEADER_LINE))
                    break
                return False
            line = data[self.at:newline + 1]
            self.at = newline + 1
            self.lines += 1
            if first:
                if len(line.split()) != 3:
                    self.error = Reply(400, 'bad request line')
                self.line_end = self.head_start = self.at
                continue
            self.header_bytes += len(line)
            if self.header_bytes > MAX_HEADER_BYTES:
                self.error = Reply(431, 'headers over %d bytes' % MAX_HEADER_BYTES)
            elif line in (b'\r\n', b'\n'):
                self.head_end = self.at
                head = bytes(data[self.head_start:self.at])
                lowered = head.lower()
                if b'content-length' not in lowered and b'transfer-encoding' not in lowered:
                    self.end = self.at      # no body, nor headers to parse for one: a flood's requests cost less
                    break
                try:
                    length = body_length(http.client.parse_headers(io.BytesIO(head)))
                except Reply as e:
                    self.error = e
                except http.client.HTTPException:
                    length = 0      # parse_request refuses these headers itself
                else:
                    self.end = self.at + length
            elif self.lines - 1 > MAX_HEADERS:
                self.error = Reply(431, 'more than %d headers' % MAX_HEADERS)
        return self.error is not None or len(data) >= self.end

    def cut_short(self):
        """The answer for a client that ended its side before the request was whole."""
        if self.head_end is not None:
            return Reply(400, 'request body cut short')
        return Reply(400, 'request cut short')


def body_length(headers):
    """The length of the body the headers announce (0: none); Reply for a body we will not read."""
    if headers.get('Transfer-Encoding'):
        raise Reply(411, 'send a Content-Length, not a chunked body')
    lengths = headers.get_all('Content-Length') or []
    if not lengths:
        return 0
    if len(set(lengths)) != 1 or not is_digits(lengths[0].strip()):
        raise Reply(400, 'bad Content-Length')
    length = int(lengths[0])
    if length > MAX_BODY:
        raise Reply(413, 'request body over %d bytes' % MAX_BODY)
    return length


def request_credentials(data, scanner):
    """The Basic credentials of a whole request (as the reader has it), or None."""
    if scanner.head_end is None:
        return None
    for line in bytes(data[scanner.head_start:scanner.head_end]).split(b'\n'):
        name, colon, value = line.partition(b':')
        if colon and name.strip().lower() == b'authorization':
            return basic_credentials(value.decode('latin-1'))
    return None


def quick_answer(sock, status, text, headers=(), head_only=False):
    """A text/plain answer from the reader thread, worded as AdminHandler.send words
    it: one non-blocking send, which a fresh connection always takes."""
    body = text.encode('utf-8')
    head = ('HTTP/1.0 %d %s\r\nServer: %s\r\nDate: %s\r\nContent-Type: text/plain; charset=utf-8\r\n'
            'Content-Length: %d\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n'
            'Connection: close\r\n%s\r\n' % (status, http.server.BaseHTTPRequestHandler.responses[status][0],
                                             AdminHandler.server_version, email.utils.formatdate(usegmt=True),
                                             len(body), ''.join('%s: %s\r\n' % h for h in headers)))
    try:
        sock.send(head.encode('latin-1') + (b'' if head_only else body))
    except OSError:
        pass


def quick_error(sock, reply):
    """A Reply answered from the reader thread, as AdminHandler.send_error_text words it."""
    quick_answer(sock, reply.status, 'ERROR %s\n' % escape_text(reply.message), reply.headers)


def healthz_answer(down):
    """/healthz's (status, text) for services_down()'s count (None: the loop did not answer
    within HEALTHZ_LOOP_TIMEOUT): OK, else DOWN and how many services have no host up
    (every service once stopping, or with workers while none runs its loop), or DOWN
    alone."""
    if down is None:
        return 503, 'DOWN\n'
    return (503, 'DOWN %d\n' % down) if down else (200, 'OK\n')


def healthz_method(data, scanner):
    """'GET' or 'HEAD' for a whole request of /healthz as keepalived's curl sends it, else None."""
    if scanner.error is not None:
        return None
    method, target, version = bytes(data[:scanner.line_end]).split()
    if target == HEALTHZ.encode() and method in (b'GET', b'HEAD') and version in (b'HTTP/1.0', b'HTTP/1.1'):
        return method.decode()
    return None


class Pending(object):
    """A connection the reader is still reading a request from."""

    __slots__ = ('reader', 'sock', 'fd', 'address', 'data', 'deadline', 'idle_until', 'handshaking',
                 'events', 'scanner', 'held')

    def __init__(self, reader, sock, address, deadline, idle_until, handshaking):
        self.reader = reader
        self.sock = sock
        self.fd = sock.fileno()
        self.address = address
        self.data = bytearray()
        self.deadline = deadline          # the connection's own (CONNECTION_DEADLINE)
        self.idle_until = idle_until      # no byte since request_timeout
        self.handshaking = handshaking    # TLS handshake not done yet
        self.events = EVENT_READ          # 0: not watched (a whole request waiting here, see hand_over)
        self.scanner = RequestScanner()
        self.held = False                 # told to wait: answered 429 after server.refusal_delay

    def __repr__(self):
        return '<admin connection from %s>' % (self.address[0],)

    def due(self):
        return min(self.deadline, self.idle_until)

    def on_event(self, mask):
        self.reader.on_request_data(self)

    def close_on_error(self):
        self.reader.close(self.sock)


class Lingering(object):
    """A connection answered and half-closed: what the client still sends is read and dropped."""

    __slots__ = ('reader', 'sock', 'fd', 'deadline', 'read')

    def __init__(self, reader, sock, deadline):
        self.reader = reader
        self.sock = sock
        self.fd = sock.fileno()
        self.deadline = deadline
        self.read = 0

    def on_event(self, mask):
        try:
            data = socket.socket.recv(self.sock, 16384)  # raw bytes: TLS or not, they are discarded
        except BlockingIOError:
            return
        except OSError:
            data = b''
        self.read += len(data)
        if not data or self.read >= LINGER_BYTES:
            self.reader.close(self.sock)

    def close_on_error(self):
        self.reader.close(self.sock)


SWEEP_INTERVAL = 0.25     # seconds between the reader's deadline checks


class HealthAnswers(object):
    """/healthz, answered by the reader thread itself: keepalived's check never waits
    behind the workers, however many requests they have (a worker-wide queue of
    password checks once took the virtual address down with it).

    Anyone may ask it, without credentials, so it asks the balancer's loop at most
    one question at a time: requests that come while one is out wait for the next,
    each at most HEALTHZ_LOOP_TIMEOUT, then it is DOWN (a stuck loop).
    """

    def __init__(self, reader):
        self.reader = reader
        self.asked = None       # (Pending, head only) waiting for the question out now; None: none out
        self.waiting = []       # those that came after it: for the next question
        self.late_logged = False

    def ask(self, p, head_only):
        pending = self.reader.pending
        if len(self.waiting) >= self.reader.server.max_pending:
            # A loop stuck a long while: drop those answered DOWN meanwhile (live ones are pending).
            self.waiting = [w for w in self.waiting if pending.get(w[0].sock) is w[0]]
        self.waiting.append((p, head_only))
        self.reader.loop.call_later(HEALTHZ_LOOP_TIMEOUT, self.late, p, head_only)
        if self.asked is None:
            self.ask_loop()

    def ask_loop(self):
        self.asked, self.waiting = self.waiting, []
        director = self.reader.server.director
        reply = self.reader.loop.call_soon_threadsafe

        def on_loop():      # on the balancer's loop thread
            down = None
            try:
                down = director.services_down()
            finally:        # a bug is logged by the loop; DOWN meanwhile
                reply(self.answered, down)
        director.loop.call_soon_threadsafe(on_loop)

    def answered(self, down):
        asked, self.asked = self.asked, None
        self.late_logged = False
        for p, head_only in asked:
            self.answer(p, head_only, down)
        if self.waiting:
            self.ask_loop()

    def late(self, p, head_only):
        if self.reader.pending.get(p.sock) is p and not self.late_logged:
            self.late_logged = True     # once per question, not per request
            log.warning('admin: the loop did not answer /healthz within %g s', HEALTHZ_LOOP_TIMEOUT)
        self.answer(p, head_only, None)

    def answer(self, p, head_only, down):
        reader = self.reader
        if reader.pending.get(p.sock) is not p:
            return      # answered already, or closed meanwhile (its deadline, max_pending, a stop)
        del reader.pending[p.sock]
        status, text = healthz_answer(down)
        quick_answer(p.sock, status, text, head_only=head_only)
        reader.half_close(p.sock)


class RequestReader(object):
    """Accepts the admin connections and reads each request whole before a thread is spent on it.

    With a thread per connection, clients trickling their request a byte at a
    time hold every thread, and the operator is locked out (slowloris).  Here
    one thread watches every connection still sending -- TLS handshake
    included -- on a pydirector Loop of its own, and hands only complete
    requests to the workers.  Past server.max_pending the oldest of those
    still sending is closed, never the new one, so the operator always gets
    in.  After the answer the reader takes the socket back for the lingering
    close, so that costs no thread either.
    """

    def __init__(self, server):
        self.server = server
        self.loop = pydirector.Loop()
        self.pending = collections.OrderedDict()     # socket -> Pending, oldest first
        self.lingering = collections.OrderedDict()   # socket -> Lingering, oldest first
        self.returning = set()                       # sockets handed back by workers, not taken yet
        self.health = HealthAnswers(self)
        self.accept_paused = False
        self.last_cut_log = 0.0
        self.closed = False
        self.thread = None
        self.listen_fd = server.socket.fileno()
        self.accepting = True           # False while an upgrade forks (see AdminServer.pause)

    def start(self):
        self.loop.add(self.listen_fd, EVENT_READ, self.on_accept)
        self.loop.call_later(SWEEP_INTERVAL, self.sweep)
        self.thread = pydirector.start_thread(self.run, 'pydirector-admin')

    def run(self):
        try:
            self.loop.run()
        finally:
            self.close_all()

    def stop_accepting(self):
        if self.accepting:
            self.accepting = False
            if not self.accept_paused:
                self.loop.remove(self.listen_fd)

    def start_accepting(self):
        if not self.accepting:
            self.accepting = True
            if not self.accept_paused:
                self.loop.add(self.listen_fd, EVENT_READ, self.on_accept)

    def stop(self):
        if self.thread is None:
            self.close_all()
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.thread = None

    def linger(self, sock):
        """From a worker, after the answer: half-close; the reader reads what the client
        still sends, for LINGER_SECONDS at most, then closes.

        Closing a socket with unread bytes makes the kernel send RST, which
        can destroy an answer still on its way (a 413 or 431 sent before
        the request was read), as Apache's lingering close knows.
        """
        try:
            sock.setblocking(False)
            send_close_notify(sock)
            socket.socket.shutdown(sock, socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        with self.server.lock:
            if self.closed:
                sock.close()
                return
            self.returning.add(sock)
        self.loop.call_soon_threadsafe(self.take_back, sock)

    def take_back(self, sock):
        with self.server.lock:
            if sock not in self.returning:
                return      # closed by close_all meanwhile
            self.returning.discard(sock)
        self.start_lingering(sock)

    # -- deadlines ------------------------------------------------------------

    def sweep(self):
        now = time.monotonic()
        if self.accept_paused:
            self.accept_paused = False
            if self.accepting:
                self.loop.add(self.listen_fd, EVENT_READ, self.on_accept)
        while self.lingering:
            sock, state = next(iter(self.lingering.items()))
            if state.deadline > now:
                break
            self.close(sock)
        late = [p for p in self.pending.values() if p.due() <= now]
        for p in late:
            self.close(p.sock)
        if late:
            log.info('admin: closed %d connection(s) that sent no complete request in time', len(late))
        self.server.cut_late_answers(now)
        self.server.passwords.log_summaries(now)
        self.loop.call_later(SWEEP_INTERVAL, self.sweep)

    def close(self, sock):
        """Forget a socket, whatever stage it is at, and close it."""
        state = self.pending.pop(sock, None) or self.lingering.pop(sock, None)
        if state is not None and getattr(state, 'events', True):
            self.loop.forget(state.fd)
        sock.close()

    def close_all(self):
        with self.server.lock:
            self.closed = True
            returned = list(self.returning)
            self.returning.clear()
        for sock in list(self.pending) + list(self.lingering) + returned:
            self.close(sock)
        self.loop.close()
        self.server.socket.close()

    # -- events ---------------------------------------------------------------

    def on_accept(self, mask):
        listener = self.server.socket
        for _ in range(64):
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as e:
                # Out of file descriptors or memory: pause instead of spinning on it.
                log.warning('admin: cannot accept connections: %s; pausing for a second', e)
                self.loop.remove(self.listen_fd)
                self.accept_paused = True
                return
            self.admit(sock, address)

    def admit(self, sock, address):
        server = self.server
        cut = 0
        while len(self.pending) >= max(1, server.max_pending):
            oldest = next(iter(self.pending.values()))
            if oldest.held:
                self.refuse(oldest)     # its 429 now, not after the whole delay: no need to close it
                continue
            self.close(oldest.sock)
            cut += 1
        now = time.monotonic()
        if cut and now - self.last_cut_log > 10.0:
            self.last_cut_log = now
            log.warning('admin: %d connections are still sending a request; closing the oldest',
                        len(self.pending) + 1)
        sock.setblocking(False)
        handshaking = server.ssl_context is not None
        if handshaking:
            try:
                sock = server.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            except (ssl.SSLError, OSError) as e:
                log.debug('admin: TLS with %s failed: %s', address[0], e)
                sock.close()
                return
        p = Pending(self, sock, address, now + server.connection_deadline, now + server.request_timeout, handshaking)
        self.pending[sock] = p
        self.loop.add(p.fd, EVENT_READ, p.on_event)

    def on_request_data(self, p):
        sock = p.sock
        p.idle_until = time.monotonic() + self.server.request_timeout
        if p.handshaking:
            try:
                sock.do_handshake()
            except ssl.SSLWantReadError:
                return self.watch(p, EVENT_READ)
            except ssl.SSLWantWriteError:
                return self.watch(p, EVENT_WRITE)
            except OSError as e:    # ssl.SSLError included: not TLS, or nothing we share
                log.debug('admin: TLS handshake with %s failed: %s', p.address[0], e)
                self.loop.remove(p.fd)
                del self.pending[sock]
                return self.half_close(sock)
            p.handshaking = False
            self.watch(p, EVENT_READ)
        while True:
            try:
                data = sock.recv(65536)
            except (BlockingIOError, ssl.SSLWantReadError):
                return self.watch(p, EVENT_READ)
            except ssl.SSLWantWriteError:
                return self.watch(p, EVENT_WRITE)
            except OSError as e:
                log.debug('admin: connection from %s: %s', p.address[0], e)
                return self.close(sock)
            if not data:
                return self.cut_short(p)
            p.data += data
            if p.scanner.scan(p.data):
                return self.hand_over(p)
            # A short read took all there was, but for TLS records already decrypted,
            # which the socket no longer shows.
            if len(data) < 65536 and not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                return self.watch(p, EVENT_READ)

    def watch(self, p, events):
        if p.events != events:
            p.events = events
            self.loop.modify(p.fd, events, p.on_event)

    def cut_short(self, p):
        """The client ended its side before the request was complete."""
        if p.data:
            # What the handler would answer, read to the end of what was sent.
            self.server.passwords.failed(p.address[0], 'bad request')
            quick_error(p.sock, p.scanner.cut_short())
        self.close(p.sock)

    def hand_over(self, p):
        """A whole request: /healthz is answered here, a request from an address told
        to wait is held and refused here, the rest go to the workers."""
        if p.events:
            self.loop.remove(p.fd)
            p.events = 0
        method = healthz_method(p.data, p.scanner)
        if method is not None:
            return self.health.ask(p, method == 'HEAD')
        passwords = self.server.passwords
        operator = passwords.passed(request_credentials(p.data, p.scanner))
        if not operator and passwords.blocked_for(p.address[0]) > 0:
            # Told to wait (429).  Hold the request here a while, then answer it here:
            # a client that retries at once then costs a timer, not a worker and a
            # call to the balancer's loop each time, so a flood of them leaves the
            # data plane alone.  Credentials that passed before go through at once:
            # an operator is not slowed down by a flood either.
            p.held = True
            del p.data[:]
            self.loop.call_later(self.server.refusal_delay, self.refuse, p)
            return
        del self.pending[p.sock]
        taken = self.server.take(Request(p.sock, p.address, bytes(p.data), p.deadline), operator)
        if not taken:
            log.warning('admin: all %d workers busy and %d requests waiting; answering 503',
                        self.server.max_workers, len(self.server.queue))
            quick_error(p.sock, Reply(503, 'the admin server is busy; try again'))
            self.half_close(p.sock)

    def refuse(self, p):
        """A held request, answered 429 (see hand_over)."""
        if self.pending.get(p.sock) is not p:
            return      # closed meanwhile (its deadline, max_pending, a stop)
        del self.pending[p.sock]
        ip = p.address[0]
        passwords = self.server.passwords
        passwords.failed(ip, 'told to wait')
        quick_error(p.sock, too_many_failures(ip, passwords.blocked_for(ip)))
        self.half_close(p.sock)

    def half_close(self, sock):
        """Our side is done but the client may still be sending: linger (see linger())."""
        try:
            send_close_notify(sock)
            socket.socket.shutdown(sock, socket.SHUT_WR)
        except OSError:
            return sock.close()
        self.start_lingering(sock)

    def start_lingering(self, sock):
        while len(self.lingering) >= max(1, self.server.max_pending):
            self.close(next(iter(self.lingering)))
        state = self.lingering[sock] = Lingering(self, sock, time.monotonic() + LINGER_SECONDS)
        self.loop.add(state.fd, EVENT_READ, state.on_event)


# ---------------------------------------------------------------------------
# The handler: one request per connection (HTTP/1.0 style, the server closes).
# ---------------------------------------------------------------------------

class SocketWriter(io.BufferedIOBase):
    """A handler's wfile: each write is one sendall, as socketserver's unbuffered writer does."""

    def __init__(self, sock):
        io.BufferedIOBase.__init__(self)
        self.sock = sock

    def writable(self):
        return True

    def write(self, data):
        self.sock.sendall(data)
        return memoryview(data).nbytes


class AdminHandler(http.server.BaseHTTPRequestHandler):
    """Parses under our limits, authenticates, dispatches through PAGES and ACTIONS, answers."""

    server_version = 'pydirector/' + VERSION
    protocol_version = 'HTTP/1.0'

    def __init__(self, request, client_address, server, data):
        self.data = data        # the whole request, as the reader read it
        http.server.BaseHTTPRequestHandler.__init__(self, request, client_address, server)

    def version_string(self):
        return self.server_version  # not the Python version

    def setup(self):
        # The reader has read the whole request already: read it from memory, write to the socket.
        self.connection = self.request
        self.rfile = io.BytesIO(self.data)
        self.wfile = SocketWriter(self.request)

    def handle_one_request(self):
        # Replaces BaseHTTPRequestHandler's: the reader's RequestScanner takes the
        # request apart under our own limits before parse_request sees its head.
        self.command = None
        self.request_version = 'HTTP/1.0'
        self.requestline = ''
        self.close_connection = True
        self.replied = False
        self.authenticated = None       # None: not looked at (yet); see send_error_text
        data = self.data
        if not data:
            return
        try:
            scanner = RequestScanner()
            complete = scanner.scan(data)
            if scanner.line_end is not None:
                self.requestline = data[:scanner.line_end].decode('latin-1').rstrip('\r\n')
            if scanner.error is not None:
                raise scanner.error
            if not complete:
                raise scanner.cut_short()
            self.raw_requestline = data[:scanner.line_end]
            self.rfile = io.BytesIO(data[scanner.head_start:scanner.head_end])
            if self.parse_request():
                self.body = data[scanner.head_end:scanner.end]
                self.handle_request()
        except Reply as e:
            self.send_error_text(e.status, e.message, e.headers)
        except socket.timeout:
            log.debug('admin: %s timed out', self.client_address[0])

    def handle_request(self):
        """Route (404), method (405), auth (401, 429), access (403), cross-site (403), then the page or change."""
        try:
            try:
                url = urllib.parse.urlsplit(self.path)
            except ValueError:      # 'http://[x/': not a URL at all
                raise Reply(400, 'bad request target')
            path = url.path
            page = PAGES.get(path)
            action = ACTIONS.get(path)
            if path == HEALTHZ:     # for keepalived's check; it tells no more than OK or DOWN N
                user, access = None, None
            else:
                user, access = self.authenticate()
            if page is None and action is None:
                raise Reply(404, 'no page %s' % path)
            if page is not None:
                self.check_method(path, ('GET', 'HEAD'))
                method_name, needs_full_access = page
                if needs_full_access and access != 'full':
                    raise Reply(403, 'user %s has read-only access' % user)
                getattr(self, method_name)(self.read_params(url.query, b''), user, access)
                return
            self.check_method(path, ('POST', 'GET') if self.server.get_changes else ('POST',))
            if access != 'full':
                raise Reply(403, 'user %s has read-only access' % user)
            self.check_same_origin()
            self.change(action, url, self.body if self.command == 'POST' else b'', user)
        except Reply as e:
            self.send_error_text(e.status, e.message, e.headers)
        except LoopTimeout:
            log.warning('admin: the loop did not answer in time (%s)', escape_text(self.path))
            self.send_error_text(503, 'the balancer is busy; try again')
        except OSError:
            raise  # the client went away mid-answer: handle_error logs it quietly
        except Exception:
            log.exception('admin: bug while answering %s %s', self.command, escape_text(self.path))
            if not self.replied:
                self.send_error_text(500, 'internal error (logged)')

    def check_method(self, path, allowed):
        if self.command in allowed:
            return
        if self.command == 'GET' and path in ACTIONS:
            raise Reply(405, 'changes are POST requests: wget --post-data=... or curl -d ... '
                             '(<admin get_changes="on"> allows GET with a query string)',
                        [('Allow', ', '.join(allowed))])
        raise Reply(405, '%s is not allowed on %s' % (self.command, path), [('Allow', ', '.join(allowed))])

    def change(self, action, url, body, user):
        """Run one action; log the outcome with the user; answer OK or ERROR."""
        try:
            result = self.run_action(action, self.read_params(url.query, body))
        except (Reply, AdminError) as e:
            log.warning('admin: user %s from %s: %s refused (%d): %s', escape_text(user),
                        self.client_address[0], url.path, e.status, escape_text(e.message))
            self.answer_change(e.status, 'ERROR ' + e.message)
        else:
            log.info('admin: user %s from %s: %s', escape_text(user), self.client_address[0], escape_text(result))
            self.answer_change(200, 'OK ' + result)

    def run_action(self, action, params):
        p = take(params, action.required, action.optional)
        if action.prepare is not None:
            p = action.prepare(p)
        # The parameter names are the Director method's own.
        director = self.server.director
        method = getattr(director, action.method)
        result = method(**p) if not action.on_loop else self.call(method, **p)
        if director.master is not None:
            # A master: the answer waits until every live worker has made the change too.
            director.master.sync(self.server.loop_timeout)
        return result

    # -- request pieces -----------------------------------------------------

    def authenticate(self):
        """(user name, access) from the Basic credentials, or Reply(401 / 429); either
        way, self.server.passwords has counted a failure."""
        self.authenticated = False
        challenge = [('WWW-Authenticate', 'Basic realm="%s"' % REALM)]
        passwords = self.server.passwords
        ip = self.client_address[0]
        header = self.headers.get('Authorization')
        if not header:
            passwords.failed(ip, 'no credentials')
            raise Reply(401, 'credentials needed', challenge)
        credentials = basic_credentials(header)
        if credentials is None:
            passwords.failed(ip, 'malformed credentials')
            raise Reply(401, 'malformed credentials', challenge)
        name, password = credentials
        stored = access = None
        for user_name, user_hash, user_access in self.call(self.server.director.users_list):
            if user_name == name:
                stored, access = user_hash, user_access
                break
        if not passwords.check(ip, name, password, stored):
            raise Reply(401, 'bad credentials', challenge)
        self.authenticated = True
        return name, access

    def check_same_origin(self):
        """Refuse a change a browser made on behalf of another site (CSRF)."""
        site = (self.headers.get('Sec-Fetch-Site') or '').strip().lower()
        if site in ('cross-site', 'same-site'):
            raise Reply(403, 'cross-site request refused')
        host = self.headers.get('Host')
        for header in ('Origin', 'Referer'):
            value = self.headers.get(header)
            if value is not None and not same_host(value, host, self.server.scheme):
                raise Reply(403, '%s is another site than Host; cross-site request refused' % header)

    def read_params(self, query, body):
        """The query string and form body as one dict; each name at most once."""
        pairs = []
        try:
            pairs.extend(urllib.parse.parse_qsl(query, keep_blank_values=True, errors='strict'))
            if body:
                if self.headers.get_content_type() != 'application/x-www-form-urlencoded':
                    raise Reply(415, 'send the form as application/x-www-form-urlencoded')
                pairs.extend(urllib.parse.parse_qsl(body.decode('utf-8'), keep_blank_values=True,
                                                    errors='strict'))
        except UnicodeError:
            raise Reply(400, 'parameters must be UTF-8')
        params = {}
        for name, value in pairs:
            if name in params:
                raise Reply(400, 'parameter %s given twice' % escape_text(name))
            params[name] = value
        return params

    def is_browser(self):
        return 'text/html' in (self.headers.get('Accept') or '')

    def call(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) run on the loop thread; LoopTimeout if it does not answer."""
        return self.server.director.loop.call(fn, *args, timeout=self.server.loop_timeout, **kwargs)

    # -- answers --------------------------------------------------------------

    def send(self, status, body, content_type, headers=()):
        data = body.encode('utf-8') if isinstance(body, str) else body
        self.replied = True
        # parse_request answers early errors before it knows the version, and an
        # HTTP/0.9 answer has no status line or headers (so no nosniff): never that.
        self.request_version = self.protocol_version
        self.send_response(status)
        self.send_header('Content-Type', content_type)
        self.send_header('Content-Length', str(len(data)))
        self.send_header('Cache-Control', 'no-store')
        self.send_header('X-Content-Type-Options', 'nosniff')
        self.send_header('Connection', 'close')
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != 'HEAD':
            self.wfile.write(data)

    def send_html(self, page):
        self.send(200, page, 'text/html; charset=utf-8', [
            ('Content-Security-Policy',
             "default-src 'none'; style-src 'unsafe-inline'; script-src '%s'; form-action 'self'; "
             "frame-ancestors 'none'" % SCRIPT_HASH),
            ('X-Frame-Options', 'DENY'),
            ('Referrer-Policy', 'same-origin'),
        ])

    def send_error_text(self, status, message, headers=()):
        if self.authenticated is None and 400 <= status < 500:
            # Refused before its credentials were looked at: counted as a failed login,
            # or a flood of bad requests would cost what one without credentials did.
            self.server.passwords.failed(self.client_address[0], 'bad request')
        self.send(status, 'ERROR %s\n' % escape_text(message), 'text/plain; charset=utf-8', headers)

    def send_error(self, code, message=None, explain=None):
        # parse_request answers malformed requests through here: keep our format.
        if code >= 500:
            code = 400      # parse_request's 505 for HTTP/2+: the client's mistake, not ours
        if message is None:
            message = self.responses.get(code, ('error',))[0]
        self.send_error_text(code, message)

    def answer_change(self, status, text):
        if self.is_browser():
            location = '/running?' + urllib.parse.urlencode({'msg': escape_text(text)})
            self.send(303, 'See %s\n' % location, 'text/plain; charset=utf-8', [('Location', location)])
        else:
            self.send(status, escape_text(text) + '\n', 'text/plain; charset=utf-8')

    def log_message(self, format, *args):
        # BaseHTTPRequestHandler writes every request to stderr; ours go to the debug log.
        log.debug('admin: %s %s', self.client_address[0], escape_text(format % args))

    # -- reading pages ----------------------------------------------------------

    def page_index(self, params, user, access):
        take(params)
        self.send_html(render_index(self.call(self.server.director.snapshot, series=False), user, access))

    def page_running(self, params, user, access):
        params = take(params, optional=('msg', 'refresh'))
        refresh = None
        if params['refresh'] is not None:
            if not is_digits(params['refresh']) or not 1 <= int(params['refresh']) <= 3600:
                raise Reply(400, 'refresh must be 1-3600 seconds')
            refresh = int(params['refresh'])
        snapshot = self.call(self.server.director.snapshot)
        self.send_html(render_running(snapshot, user, access == 'full', params['msg'], refresh))

    def page_running_txt(self, params, user, access):
        take(params)
        self.send(200, render_running_txt(self.call(self.server.director.snapshot, series=False)),
                  'text/plain; charset=utf-8')

    def page_running_json(self, params, user, access):
        take(params)
        snapshot = expand_history(self.call(self.server.director.snapshot))
        self.send(200, json.dumps(snapshot, indent=1, sort_keys=True) + '\n', 'application/json')

    def page_running_csv(self, params, user, access):
        take(params)
        self.send(200, render_running_csv(self.call(self.server.director.snapshot, series=False)),
                  'text/csv; charset=utf-8', [('Content-Disposition', 'inline; filename="running.csv"')])

    def page_running_xml(self, params, user, access):
        take(params)
        # Serialised on the loop: the running objects are the loop's.
        self.send(200, self.call(self.server.director.running_xml), 'application/xml; charset=utf-8')

    def page_config_xml(self, params, user, access):
        take(params)
        # The file as last loaded: a reload replaces it on the loop.
        self.send(200, self.call(self.server.director.loaded_config_xml), 'application/xml; charset=utf-8')

    def page_metrics(self, params, user, access):
        take(params)
        self.send(200, render_metrics(self.call(self.server.director.snapshot, series=False)),
                  'text/plain; version=0.0.4; charset=utf-8')

    def page_healthz(self, params, user, access):
        """/healthz as the reader answers it (HealthAnswers), for what it leaves to a
        worker: a request of it in another form than keepalived's."""
        take(params)
        try:
            down = self.server.director.loop.call(self.server.director.services_down, timeout=HEALTHZ_LOOP_TIMEOUT)
        except LoopTimeout:
            log.warning('admin: the loop did not answer /healthz within %g s', HEALTHZ_LOOP_TIMEOUT)
            down = None
        self.send(*healthz_answer(down), 'text/plain; charset=utf-8')

    def page_explain(self, params, user, access):
        p = take(params, ('client',), ('service', 'listen', 'sni', 'format'))
        if p['format'] not in (None, 'text', 'json'):
            raise Reply(400, "format must be 'text' or 'json'")
        if p['service'] is None and p['listen'] is None:
            raise Reply(400, 'missing parameter service (or listen)')
        try:
            info = self.call(self.server.director.explain, p['service'], p['client'], p['sni'], p['listen'])
        except AdminError as e:
            raise Reply(e.status, e.message)
        if p['format'] == 'json':
            self.send(200, json.dumps(info, indent=1, sort_keys=True) + '\n', 'application/json')
        else:
            self.send(200, render_explain(info), 'text/plain; charset=utf-8')


def is_digits(text):
    # str.isdigit() is true for '\u00b2' too, which int() refuses: ASCII digits only.
    return text != '' and text.strip('0123456789') == ''


def take(params, required=(), optional=()):
    """The named parameters as a dict (None when absent or empty), or Reply(400)."""
    for name in params:
        if name not in required and name not in optional:
            raise Reply(400, 'unknown parameter %s' % escape_text(name))
    for name in required:
        if not params.get(name):
            raise Reply(400, 'missing parameter %s' % name)
    for name, value in params.items():
        if has_control_chars(value):
            raise Reply(400, 'parameter %s contains control characters' % name)
    return dict((name, params.get(name) or None) for name in tuple(required) + tuple(optional))


def same_host(url, host_header, scheme):
    """Does url (an Origin or Referer) name the host and port of the Host header?"""
    if not host_header:
        return False
    try:
        origin = urllib.parse.urlsplit(url.strip())
        if origin.scheme not in ('http', 'https') or not origin.netloc:
            return False  # includes Origin: null (sandboxed frames, privacy redirects)
        ours = urllib.parse.urlsplit('//' + host_header.strip())
        default = {'http': 80, 'https': 443}
        return ((origin.hostname, origin.port or default[origin.scheme]) ==
                (ours.hostname, ours.port or default[scheme]))
    except ValueError:  # a port that is not a number
        return False


# ---------------------------------------------------------------------------
# Rendering: pure functions of a snapshot.
# ---------------------------------------------------------------------------

def when(epoch):
    if epoch is None:
        return '-'
    return time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(epoch))


def duration(seconds):
    seconds = int(max(0, seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return '%dd %dh %dm' % (days, hours, minutes)
    if hours:
        return '%dh %dm' % (hours, minutes)
    if minutes:
        return '%dm %ds' % (minutes, seconds)
    return '%ds' % seconds


STYLE = """
body { font-family: sans-serif; margin: 1em 2em; color: #222; }
tr.row-up { background: #eef8ee; } tr.row-degraded, tr.row-draining { background: #fff4dc; }
tr.row-down { background: #fce8e8; } tr.row-maint { background: #eeeeee; }
tr.row-down td, tr.row-degraded td { border-color: #bbb; }
table.summary td a { font-weight: bold; }
.degraded { color: #a60; } .spark { vertical-align: middle; }
.key { display: inline-block; width: 1.2em; height: 0.25em; vertical-align: middle; }
td.actions, td.checks { white-space: nowrap; } table.hosts td:nth-child(3) { min-width: 10em; }
h1 { font-size: 1.4em; } h2 { font-size: 1.2em; margin-top: 1.5em; } h3 { font-size: 1.05em; }
table { border-collapse: collapse; margin: 0.4em 0; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: left; vertical-align: top; }
td.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
form.inline { display: inline; margin: 0; }
.msg { padding: 0.4em 0.8em; border: 1px solid; }
.ok { background: #e8f6e8; border-color: #7c7; }
.error { background: #fbe9e9; border-color: #d77; }
.up { color: #070; } .down { color: #b00; } .draining { color: #a60; } .maint { color: #555; }
.enabled { font-weight: bold; }
.switch { background: #fff6e0; border-color: #db7; }
ol.timeline { margin: 0.2em 0; padding-left: 1.2em; font-size: 0.9em; }
.note { color: #666; }
"""


# The pages' one script: it asks before a form with data-confirm (a delete) is
# sent.  Without it, or without JavaScript, the forms work as they did.  Its hash
# is in the pages' Content-Security-Policy, which lets no other script run.
CONFIRM_SCRIPT = ("document.addEventListener('submit', function (event) {"
                  " var question = event.target.getAttribute('data-confirm');"
                  " if (question && !window.confirm(question)) { event.preventDefault(); } });")
SCRIPT_HASH = 'sha256-' + base64.b64encode(hashlib.sha256(CONFIRM_SCRIPT.encode()).digest()).decode()


def page(title, body, refresh_url=None, refresh=None):
    head = ['<!DOCTYPE html>', '<html lang="en"><head><meta charset="utf-8">',
            '<title>%s</title>' % html.escape(title)]
    if refresh:
        head.append('<meta http-equiv="refresh" content="%d; url=%s">' % (refresh, html.escape(refresh_url)))
    head.append('<style>%s</style></head><body>' % STYLE)
    return '\n'.join(head + body + ['<script>%s</script>' % CONFIRM_SCRIPT, '</body></html>', ''])


def form(action, fields, button, inputs='', confirm=None):
    """A POST form to a change endpoint: hidden fields, optional visible inputs, one
    button; confirm: the question the browser asks before sending it."""
    hidden = ''.join('<input type="hidden" name="%s" value="%s">' % (html.escape(k), html.escape(str(v)))
                     for k, v in fields)
    ask = ' data-confirm="%s"' % html.escape(confirm) if confirm else ''
    return '<form class="inline" method="post" action="/%s"%s>%s%s<button type="submit">%s</button></form>' % (
        action, ask, hidden, inputs, html.escape(button))


def scheduler_select(current):
    """The scheduler a group may have: a <select> of every one, with and without sticky."""
    specs = [name + modifier for name in sorted(pydirector.schedulers.SCHEDULERS) for modifier in ('', ',sticky')]
    if current not in specs:
        specs.insert(0, current)
    return '<select name="scheduler" aria-label="scheduler">%s</select> ' % ''.join(
        '<option%s>%s</option>' % (' selected' if spec == current else '', html.escape(spec)) for spec in specs)


def service_anchor(name):
    """The id of a service's section (its link is '#' and this, percent-encoded)."""
    return 'service-' + name


def rate_html(thing):
    """The rate, its peak below it."""
    return '%s<br><span class="note">peak %s</span>' % (number(thing.get('rate', 0.0)),
                                                        number(thing.get('rate_peak', 0.0)))


def rate_text(thing):
    """'12.4 (peak 80.2)': new connections per second in the last sample, and the most."""
    return '%s (peak %s)' % (number(thing.get('rate', 0.0)), number(thing.get('rate_peak', 0.0)))


def number(value):
    """A rate for a person: whole from 100 up, else at most two decimals."""
    if value >= 100:
        return '%d' % round(value)
    return ('%.2f' % value).rstrip('0').rstrip('.') if value else '0'


SPARK_WIDTH, SPARK_HEIGHT = 144, 28


def sparkline(thing, history):
    """The last 15 minutes of a service or host as an inline SVG, drawn here, no script:
    open connections as a grey area (on their own scale), new connections/s in blue
    and errors/s in red (on one scale).  history: the snapshot's (its samples' intervals
    make the counts rates); the drawing is as wide as the samples it keeps, the newest
    at the right edge."""
    samples = history['samples']
    series = thing.get('history') or {}
    opens = series.get('open') or []
    count = len(opens)
    if not count:
        return '<span class="note">no samples yet</span>'
    intervals = history['intervals'][-count:]
    connections, errors = ([max(0, n) / t for n, t in zip(series[name], intervals)]
                           for name in ('connections', 'errors'))
    width, height = SPARK_WIDTH, SPARK_HEIGHT
    top = height - 2.0

    def x(i):
        return round(width * (samples - count + i) / max(samples - 1, 1), 1)

    def points(values, most):
        scale = top / most if most else 0.0
        found = ['%s,%s' % (x(i), round(height - 1 - v * scale, 1)) for i, v in enumerate(values)]
        if len(found) == 1:     # one sample: a dot's worth of line
            found.insert(0, '%s,%s' % (max(0.0, x(0) - 2), found[0].split(',')[1]))
        return ' '.join(found)

    rate_most = max(max(connections), max(errors))
    open_most = max(opens)
    title = 'last %d min: up to %s new connections/s, %s errors/s, %d open' % (
        round(samples * history['step'] / 60.0), number(max(connections)), number(max(errors)), open_most)
    shapes = ['<polygon fill="#e4e4e4" points="%s,%d %s %s,%d"/>' % (
        x(0), height, points(opens, open_most), x(count - 1), height)]
    shapes.append('<polyline fill="none" stroke="#1f5fbf" stroke-width="1.5" points="%s"/>'
                  % points(connections, rate_most))
    if max(errors) > 0:
        shapes.append('<polyline fill="none" stroke="#c00" stroke-width="1.5" points="%s"/>'
                      % points(errors, rate_most))
    return ('<svg class="spark" xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" '
            'role="img" aria-label="%s"><title>%s</title><rect width="%d" height="%d" fill="#fafafa" '
            'stroke="#ddd"/>%s</svg>' % (width, height, width, height, html.escape(title), html.escape(title),
                                       width, height, ''.join(shapes)))


def spark_key(history):
    """What the sparklines draw, said once."""
    minutes = round(history['samples'] * history['step'] / 60.0)
    return ('<p class="note">Sparklines: the last %d minutes, a sample every %g s: '
            '<span class="key" style="background:#1f5fbf"></span> new connections/s, '
            '<span class="key" style="background:#c00"></span> errors/s (failed connects, refused clients), '
            '<span class="key" style="background:#ccc;height:0.8em"></span> open connections.</p>'
            % (minutes, history['step']))


def render_summary(snapshot):
    """One row per service: its state, coloured, and its numbers at a glance; each links to its section."""
    e = html.escape
    history = snapshot['history']
    out = ['<table class="summary"><tr><th>service</th><th>state</th><th>hosts up</th><th>connections/s</th>'
           '<th>open</th><th>errors</th><th>queue</th><th>last 15 min</th></tr>']
    for service in snapshot['services']:
        state = service.get('state', 'up')
        out.append('<tr class="row-%s"><td><a href="#%s">%s</a></td><td class="%s">%s</td><td class="n">%d/%d</td>'
                   '<td class="n">%s</td><td class="n">%d</td><td class="n">%d</td><td class="n">%d</td>'
                   '<td>%s</td></tr>' % (
                       e(state), e(urllib.parse.quote(service_anchor(service['name']))), e(service['name']),
                       e(state), e(state), service.get('hosts_up', 0), service.get('hosts_total', 0),
                       e(rate_text(service)), service['open'], service.get('errors', 0), service['queued'],
                       sparkline(service, history)))
    out.append('</table>')
    out.append(spark_key(snapshot['history']))
    return out


def render_index(snapshot, user, access):
    e = html.escape
    s = snapshot
    links = [('/running', 'status page'), ('/running?refresh=5', 'status page, refreshing every 5 s'),
             ('/running.txt', 'running.txt (for scripts)'), ('/running.json', 'running.json'),
             ('/running.csv', 'running.csv (a line per host, for spreadsheets)'),
             ('/running.xml', 'running.xml (the running config; full access)'),
             ('/config.xml', 'config.xml (the config as loaded; full access)'),
             ('/metrics', 'metrics (Prometheus)')]
    body = [
        '<h1>pydirector %s on %s</h1>' % (e(s['version']), e(s['hostname'])),
        '<p>Started %s (up %s), pid %d.</p>' % (e(when(s['started'])), e(duration(s['now'] - s['started'])),
                                                s['pid']),
        '<p>Logged in as %s (%s access).</p>' % (e(user), e(access)),
        '<ul>',
    ]
    body.extend('<li><a href="%s">%s</a></li>' % (e(href), e(text)) for href, text in links)
    body.append('</ul>')
    body.append('<p class="note">Scripts: every change is a POST with a form body, e.g. '
                '<code>wget -q -O - --content-on-error --user=NAME --password=PW '
                '--post-data=&#x27;service=S&amp;group=G&amp;name=N&#x27; '
                'http://HOST:PORT/hostAdminDown</code> '
                'prints <code>OK ...</code> (or <code>ERROR ...</code>).</p>')
    return page('pydirector on %s' % s['hostname'], body)


def render_host_state(host, now):
    e = html.escape
    state = host['state']
    css = state if state in ('up', 'down', 'draining', 'maint') else 'down'
    text = e(state)
    if host['reason'] and state != 'up':
        text += ': ' + e(host['reason'])
    if host['since'] is not None and state != 'up':
        text += '<br><span class="note">since %s (%s ago)</span>' % (e(when(host['since'])),
                                                                     e(duration(now - host['since'])))
    return '<td class="%s">%s</td>' % (css, text)


def render_checks(host, now):
    """The health column: when the next probe runs, and the last state changes, folded."""
    e = html.escape
    out = []
    last = host.get('last_check')
    if last is not None:
        verdict = 'ok' if last['ok'] else 'not made' if last['ok'] is None else 'failed'
        out.append('<span class="%s">probe %s</span>, %s ms, %s ago%s<br>' % (
            'up' if last['ok'] else 'down', verdict, e('%.1f' % (last['took'] * 1000)),
            e(duration(now - last['when'])), '' if last['ok'] else ':<br>' + e(str(last['reason']))))
    if host['next_probe'] is not None:
        out.append('next probe in %s' % e(duration(host['next_probe'] - now)))
    else:
        out.append('<span class="note">no probe planned</span>')
    if host.get('downtime'):
        out.append('<br>down %s in all' % e(duration(host['downtime'])))
    timeline = host['timeline']
    if timeline:
        items = ''.join('<li>%s %s&rarr;%s: %s</li>' % (
            e(when(change['when'])), e(str(change['from'])), e(str(change['to'])),
            e(str(change['why'] or ''))) for change in reversed(timeline))
        out.append('<details><summary>%d change%s, last %s ago</summary><ol class="timeline">%s</ol></details>' % (
            len(timeline), '' if len(timeline) == 1 else 's', e(duration(now - timeline[-1]['when'])), items))
    else:
        out.append('<br><span class="note">no state changes</span>')
    return '<td class="checks">%s</td>' % (''.join(out) or '-')


def render_group(service, group, now, can_change, history):
    e = html.escape
    sg = [('service', service['name']), ('group', group['name'])]
    mark = ' <span class="enabled">(enabled)</span>' if group['enabled'] else ' (inactive)'
    out = ['<h3>Group %s%s &mdash; scheduler %s</h3>' % (e(group['name']), mark, e(group['scheduler']))]
    if can_change:
        actions = []
        if not group['enabled']:
            actions.append(form('enableGroup', sg, 'enable this group',
                                '<input name="drain" placeholder="drain s" size="7" '
                                'aria-label="close connections on the old group after (seconds)"> '
                                '<input name="rollback" placeholder="rollback s" size="9" '
                                'aria-label="switch back unless a host is up within (seconds)"> '))
        actions.append(form('changeScheduler', sg, 'change scheduler', scheduler_select(group['scheduler'])))
        if not group['enabled']:
            where = '%s/%s' % (service['name'], group['name'])
            actions.append(form('delAllHosts', sg, 'delete all hosts',
                                confirm='Delete every host of group %s?' % where))
            actions.append(form('delGroup', sg, 'delete group', confirm='Delete group %s?' % where))
        out.append('<p>%s</p>' % ' '.join(actions))
    out.append('<table class="hosts"><tr><th>host</th><th>address</th><th>state</th><th>open</th><th>conn/s</th>'
               '<th>total</th><th>connect errors</th><th>retries</th><th>bytes in</th><th>bytes out</th>'
               '<th>weight</th><th>max conns</th><th>health checks</th><th>last 15 min</th>%s</tr>'
               % ('<th>actions</th>' if can_change else ''))
    for host in group['hosts']:
        address = e(host['ip'])
        if host.get('discovered'):
            address += ' <span class="note">(from DNS: %s)</span>' % e(host['discovered'])
        if host.get('send_proxy'):
            address += ' <span class="note">(sends PROXY %s)</span>' % e(host['send_proxy'])
        if host.get('backup'):
            address += ' <span class="note">(backup)</span>'
        cells = ['<td>%s</td>' % e(host['name']), '<td>%s</td>' % address, render_host_state(host, now)]
        weight = str(host['weight'])
        if host.get('effective_weight', host['weight']) != host['weight']:
            weight += ' (slow start: %s)' % explain_number(host['effective_weight'])
        # The bytes of open connections too: a long one counts before it closes.
        numbers = [host['open'], rate_text(host), host['total'], host.get('connect_errors', 0),
                   host.get('retries', 0), host['bytes_in'] + host.get('live_bytes_in', 0),
                   host['bytes_out'] + host.get('live_bytes_out', 0), weight, host['maxconns'] or '-']
        cells.extend('<td class="n">%s</td>' % e(str(n)) for n in numbers)
        cells[4] = '<td class="n">%s</td>' % rate_html(host)
        cells.append(render_checks(host, now))
        cells.append('<td>%s</td>' % sparkline(host, history))
        if can_change:
            sgh = sg + [('name', host['name'])]
            actions = []
            if host['admin'] == 'enabled':
                actions.append(form('hostAdminDown', sgh, 'drain'))
            else:
                actions.append(form('hostAdminUp', sgh, 'enable'))
            if host['admin'] != 'maint':
                actions.append(form('setHost', sgh + [('state', 'maint')], 'maint'))
            if host['health'] == 'down':
                actions.append(form('retryHost', sgh, 'retry now'))
            actions.append('<br>' + form('setHost', sgh, 'set weight',
                                         '<input name="weight" value="%s" size="3" aria-label="weight"> '
                                         % host['weight']))
            actions.append(form('delHost', sgh, 'delete', confirm='Delete host %s from %s/%s?' % (
                host['name'], service['name'], group['name'])))
            cells.append('<td class="actions">%s</td>' % ' '.join(actions))
        out.append('<tr class="row-%s">%s</tr>' % (e(host['state']), ''.join(cells)))
    if not group['hosts']:
        out.append('<tr><td colspan="%d" class="note">no hosts</td></tr>' % (15 if can_change else 14))
    out.append('</table>')
    if group.get('discover'):
        out.extend(render_discover(group['discover'], now))
    if can_change:
        out.append('<p>%s</p>' % form('addHost', sg, 'add host',
                                      '<input name="name" placeholder="name" size="12" aria-label="host name"> '
                                      '<input name="ip" placeholder="host:port" size="20" aria-label="address"> '
                                      '<input name="weight" placeholder="weight" size="6" aria-label="weight"> '
                                      '<input name="maxconns" placeholder="max conns" size="8" '
                                      'aria-label="max conns"> '
                                      '<select name="send_proxy" aria-label="PROXY header to the host">'
                                      '<option value="">no PROXY header</option><option>v1</option>'
                                      '<option>v2</option></select> '
                                      '<label><input type="checkbox" name="backup" value="on"> backup</label> '))
    return out


def render_discover(discovers, now):
    """A group's <discover> elements: what each last found, and how its queries went."""
    e = html.escape
    out = ['<table><tr><th>from DNS</th><th>server</th><th>hosts</th><th>last answer</th><th>TTL</th>'
           '<th>next query</th><th>last error</th><th>answers</th><th>failures</th><th>ignored</th></tr>']
    for d in discovers:
        name = '%s <span class="note">(%s%s, keep %s)</span>' % (
            e(d['name']), e(d['type'].upper()), ' port %d' % d['port'] if d['port'] else '', e(d['keep']))
        hosts = '%d' % d['hosts']
        if d['left_out'] or d['notes']:
            hosts += '<br><span class="note">%s</span>' % e('; '.join(
                (['%d left out: a group holds %d from DNS' % (d['left_out'], pydirector.MAX_DISCOVERED)]
                 if d['left_out'] else []) + d['notes']))
        if d['last_answer'] is None:
            answered = '<span class="note">none yet</span>'
        else:
            answered = '%s (%s ago)' % (e(when(d['last_answer'])), e(duration(now - d['last_answer'])))
        error = '-'
        if d['last_error']:
            error = '<span class="%s">%s</span><br><span class="note">%s</span>' % (
                'down' if d['failing'] else 'note', e(d['last_error']), e(when(d['last_error_time'])))
        failures = ', '.join('%s %d' % (kind, n) for kind, n in sorted(d['failures'].items()) if n) or '0'
        cells = [name, e(d['server'] or d['resolver'] or 'resolv.conf'), hosts, answered,
                 '-' if d['ttl'] is None else '%d s' % d['ttl'],
                 '-' if d['next_query'] is None else 'in %s' % e(duration(d['next_query'] - now)),
                 error, '%d' % d['answers'], e(failures),
                 '%d%s' % (d['ignored'], ' (%d over TCP)' % d['tcp'] if d['tcp'] else '')]
        out.append('<tr>%s</tr>' % ''.join('<td>%s</td>' % cell for cell in cells))
    out.append('</table>')
    return out


def service_counts(service):
    """', open 3, queued 0, denied 2, max conns 100'."""
    return ', open %d, queued %d, denied %d, max conns %s' % (
        service['open'], service['queued'], service['denied'], service['maxconns'] or 'unlimited')


def udp_text(service):
    """The UDP line of a service on /running: its sessions and datagrams."""
    udp = service['udp']
    responses = udp['responses']
    ends = ('when idle' if responses is None else 'once the request is sent (responses 0)' if responses == 0
            else 'after %d repl%s per request' % (responses, 'y' if responses == 1 else 'ies'))
    return ('UDP: a session per client address, ending %s; at most %d sessions per process '
            '(evicted so far: %d). Datagrams from clients %d, to clients %d, dropped %d.'
            % (ends, udp['sessions_max'], udp['evicted'], udp['datagrams_in'], udp['datagrams_out'],
               udp['dropped']))


def render_switch(switch, now):
    """A pending enableGroup with drain and/or rollback deadlines."""
    e = html.escape
    text = 'Switching from group %s to group %s' % (e(str(switch.get('from'))), e(str(switch.get('to'))))
    parts = []
    if switch.get('drain_until') is not None:
        parts.append('connections still on %s are closed at %s (in %s)' % (
            e(str(switch.get('from'))), e(when(switch['drain_until'])), e(duration(switch['drain_until'] - now))))
    if switch.get('rollback_until') is not None:
        parts.append('back to %s at %s (in %s) unless a host of %s is up by then' % (
            e(str(switch.get('from'))), e(when(switch['rollback_until'])),
            e(duration(switch['rollback_until'] - now)), e(str(switch.get('to')))))
    return '<p class="msg switch">%s%s.</p>' % (text, ': ' + '; '.join(parts) if parts else '')


def clients_settings(clients):
    """'maxconns 5, rate 20/s burst 40' of a <clients>."""
    parts = []
    if clients['maxconns']:
        parts.append('maxconns %d' % clients['maxconns'])
    if clients['rate']:
        parts.append('rate %s/s burst %d' % (explain_number(clients['rate']), clients['burst']))
    return ', '.join(parts)


def render_clients(service):
    """A service's per-client limits: settings, what they refused, the busiest clients."""
    e = html.escape
    c = service['clients']
    dry = c['mode'] == 'log'
    text = ('Per-client limits: %s per address (IPv6: per /%d)%s. %s %d; addresses tracked %d of %d; '
            'evicted %d.' % (e(clients_settings(c)), c['v6prefix'], ' <strong>mode log: refusing nothing</strong>'
                             if dry else '', 'Would have refused' if dry else 'Refused',
                             service['limited_dry'] if dry else service['limited'], c['entries'], c['table'],
                             service['client_evictions']))
    out = ['<p>%s</p>' % text]
    if c['top']:
        out.append('<table><tr><th>client</th><th>open</th></tr>%s</table>' % ''.join(
            '<tr><td>%s</td><td>%d</td></tr>' % (e(client), count) for client, count in c['top']))
    return out


def explain_form(service_name, sni=False):
    """A GET form to /explain: where would this client go now, and why (with a
    server name field for a service on a listen with sni)."""
    name = ('<input name="sni" placeholder="server name" size="20" aria-label="server name"> '
            if sni else '')
    return ('<form class="inline" method="get" action="/explain">'
            '<input type="hidden" name="service" value="%s">'
            '<input name="client" placeholder="client IP" size="16" aria-label="client IP"> %s'
            '<button type="submit">explain where this client goes</button></form>'
            % (html.escape(service_name), name))


def listen_text(listen):
    """'*:443 (sni a.example.com, *.a.example.com)' for a service's listen in the snapshot."""
    if not listen.get('sni'):
        return listen['ip']
    return '%s (sni %s)' % (listen['ip'], ', '.join(listen['sni']))


def render_sni(entries):
    """The listen addresses with sni: which name goes where, and what was refused there."""
    e = html.escape
    body = ['<h2>Listen addresses with sni</h2>',
            '<p>The server name of each client\'s TLS hello picks the service: an exact name, '
            'then the longest <code>*.</code> suffix, then <code>*</code>.</p>']
    for entry in entries:
        bad = ', '.join('%s %d' % (kind, count) for kind, count in sorted(entry['bad'].items()) if count)
        body.append('<h3>%s</h3><p>Hello within %s s; reading a hello now: %d; no service for the name: %d; '
                    'bad: %s.</p>' % (e(entry['address']), e('%g' % entry['hello_timeout']), entry['reading'],
                                      entry['unmatched'], e(bad or 'none')))
        body.append('<table><tr><th>server name</th><th>service</th></tr>')
        for pattern, service in entry['names']:
            body.append('<tr><td>%s</td><td>%s</td></tr>' % (e(pattern), e(service)))
        body.append('</table>')
        body.append('<form class="inline" method="get" action="/explain">'
                    '<input type="hidden" name="listen" value="%s">'
                    '<input name="client" placeholder="client IP" size="16" aria-label="client IP"> '
                    '<input name="sni" placeholder="server name" size="20" aria-label="server name"> '
                    '<button type="submit">explain where this hello goes</button></form>' % e(entry['address']))
    return body


def render_running(snapshot, user, can_change, msg=None, refresh=None):
    e = html.escape
    s = expand_history(snapshot)
    now = s['now']
    refresh_links = ' '.join('<a href="/running?refresh=%d">%d s</a>' % (n, n) for n in (2, 5, 30))
    body = [
        '<h1>pydirector %s on %s</h1>' % (e(s['version']), e(s['hostname'])),
        '<p>Started %s (up %s). Status as of %s. <a href="/">index</a> &middot; auto-refresh: %s &middot; '
        '<a href="/running">off</a></p>' % (e(when(s['started'])), e(duration(now - s['started'])),
                                            e(when(now)), refresh_links),
    ]
    if msg:
        body.append('<p class="msg %s">%s</p>' % ('ok' if msg.startswith('OK') else 'error', e(msg)))
    body.append(render_reload(s))
    body.append(render_upgrade(s))
    if not can_change:
        body.append('<p class="note">User %s has read-only access.</p>' % e(user))
    body.extend(render_summary(s))
    history = s['history']
    for service in s['services']:
        body.append('<section id="%s">' % e(service_anchor(service['name'])))
        body.append('<h2>Service %s</h2>' % e(service['name']))
        listens = service.get('listens') or [{'ip': text} for text in service['listen']]
        body.append('<p>Listening on %s%s; enabled group <span class="enabled">%s</span>. '
                    'Accepted %d, failovers %d, refused (no host) %d%s.</p>' % (
                        e(', '.join(listen_text(l) for l in listens)),
                        ' (UDP)' if service.get('udp') else '', e(service['enabled']),
                        service['accepted'], service['failovers'], service['refused'],
                        e(service_counts(service))))
        body.append('<p>Connections/s %s, errors %d. %s</p>' % (
            e(rate_text(service)), service.get('errors', 0), sparkline(service, history)))
        if service.get('udp'):
            body.append('<p>%s</p>' % e(udp_text(service)))
        if service.get('switch'):
            body.append(render_switch(service['switch'], now))
        if service.get('clients'):
            body.extend(render_clients(service))
        body.append('<p>%s</p>' % explain_form(service['name'], any(l.get('sni') for l in listens)))
        for group in service['groups']:
            body.extend(render_group(service, group, now, can_change, history))
        if can_change:
            body.append('<p>%s</p>' % form('newGroup', [('service', service['name'])], 'new group',
                                           '<input name="group" placeholder="group name" size="12" '
                                           'aria-label="group name"> ' + scheduler_select('roundrobin')))
        body.append('</section>')
    if s.get('sni'):
        body.extend(render_sni(s['sni']))
    if s.get('workers'):
        body.append('<h2>Workers</h2><p>The counters above are the sums of these processes.</p>'
                    '<table><tr><th>worker</th><th>pid</th><th>state</th><th>open</th><th>accepted</th>'
                    '<th>restarts</th><th>started</th><th>heartbeat</th><th>config</th></tr>')
        for w in s['workers']:
            # heartbeat: seconds since its loop last ran (None: not running yet); past worker_timeout, stuck.
            beat = w.get('heartbeat')
            state = 'up' if w['up'] else 'starting' if beat is None else 'stuck'
            body.append('<tr><td>%d</td><td>%s</td><td>%s</td><td>%d</td><td>%d</td><td>%d</td><td>%s</td>'
                        '<td>%s</td><td>%s</td></tr>' % (
                            w['worker'], w['pid'] or '-', state, w['open'], w['accepted'],
                            w['restarts'], e(when(w['started'])) if w['started'] else '-',
                            '-' if beat is None else '%.1f s ago' % beat, worker_generation(w)))
        body.append('</table>')
    body.append('<h2>Users</h2><table><tr><th>user</th><th>access</th>%s</tr>'
                % ('<th></th>' if can_change else ''))
    for u in s['users']:
        delete = '<td>%s</td>' % form('delUser', [('name', u['name'])], 'delete',
                                      confirm='Delete user %s?' % u['name']) if can_change else ''
        body.append('<tr><td>%s</td><td>%s</td>%s</tr>' % (e(u['name']), e(u['access']), delete))
    body.append('</table>')
    if can_change:
        body.append('<p>%s</p>' % form('addUser', [], 'add or change user',
                                       '<input name="name" placeholder="name" size="12" aria-label="user name"> '
                                       '<input name="password" type="password" placeholder="password" '
                                       'autocomplete="new-password" aria-label="password"> '
                                       '<select name="access" aria-label="access"><option>readonly</option>'
                                       '<option>full</option></select> '))
        body.append('<h2>Config</h2><p>%s %s %s</p>' % (
            form('reload', [], 'reload the config file'),
            form('saveConfig', [], 'save the running config to the config file'),
            form('upgrade', [], 'upgrade to the code on disk')))
        body.append('<h2>Log</h2><p>%s</p>' % form('closeLog', [], 'reopen the log file'))
    refresh_url = '/running?refresh=%d' % refresh if refresh else None
    return page('pydirector on %s' % s['hostname'], body, refresh_url, refresh)


def render_reload(snapshot):
    """The config file and how its last reload went (a failure in red, with its file:line)."""
    e = html.escape
    r = snapshot.get('reload')
    if r is None:
        return ''
    where = e(snapshot['config_path'] or '-')
    if not r['ok']:
        return ('<p class="msg error">The reload of %s at %s failed: %s. Running the config loaded at %s.</p>'
                % (where, e(when(r['time'])), e(r['error']), e(when(r['success_time']))))
    text = 'Config %s loaded at %s%s.' % (where, e(when(r['success_time'])),
                                          ' (by a reload)' if snapshot.get('reloaded') else '')
    if r['undone']:
        text += ' The reload undid runtime changes: %s.' % e('; '.join(r['undone']))
    return '<p>%s</p>' % text


def render_upgrade(snapshot):
    """The code running, since when, and how the last upgrade went (a failure in red)."""
    e = html.escape
    generation = snapshot.get('generation')
    if generation is None:
        return ''
    text = 'Running pydirector %s (pid %d) since %s, generation %d of this balancer.' % (
        e(snapshot['version']), snapshot['pid'], e(when(generation['started'])), generation['number'])
    if generation.get('upgrading'):
        text += ' An upgrade is under way (%s).' % e(generation['upgrading'])
    u = snapshot.get('upgrade')
    if u is not None and not u['ok']:
        return ('<p>%s</p><p class="msg error">The upgrade at %s failed: %s.</p>'
                % (text, e(when(u['time'])), e(u['error'])))
    if u is not None:
        text += ' Upgraded from pydirector %s at %s.' % (e(u['from']), e(when(u['time'])))
    return '<p>%s</p>' % text


def txt_field(value):
    """One whitespace-free field: whitespace runs become '_', control chars are escaped, empty is '-'."""
    return '_'.join(escape_text(value).split()) or '-'


def worker_generation(worker):
    """The config generation a worker runs, as /running shows it."""
    if worker['generation'] is None:
        return '<strong>none (being repaired)</strong>' if worker['up'] else '-'
    text = 'generation %d' % worker['generation']
    return '<strong>%s (behind)</strong>' % text if worker['behind'] else text


def render_running_txt(snapshot):
    """The original's line format, one record per line, fields separated by one space:

        service NAME LISTEN ENABLEDGROUP [udp]  one line per listen address (udp: a UDP service),
        sni LISTEN NAME,NAME,...              after it when that listen has sni
        group NAME enabled|inactive           then that group's hosts:
        host NAME IP:PORT OPEN TOTAL up       a host taking new connections
        disabled NAME IP:PORT REASON - OPEN TOTAL
                                              a host that is not: down, draining or in maint

    REASON is 'draining' or 'maint' (an operator's setHost or hostAdminDown),
    the health check's reason for a down host, or both joined by ','.  No field ever contains
    whitespace: runs of it become '_' (so 'connection refused' reads
    'connection_refused'), control characters are backslash-escaped, and an
    empty field is '-'.  The original's fields come first, its '-' too, so
    its scripts still read them; the fields after them are new.
    """
    f = txt_field
    lines = []
    for service in snapshot['services']:
        for listen in service.get('listens') or [{'ip': text} for text in service['listen']]:
            lines.append('service %s %s %s%s' % (f(service['name']), f(listen['ip']), f(service['enabled']),
                                                 ' udp' if service.get('udp') else ''))
            if listen.get('sni'):
                lines.append('sni %s %s' % (f(listen['ip']), f(','.join(listen['sni']))))
        for group in service['groups']:
            lines.append('group %s %s' % (f(group['name']), 'enabled' if group['enabled'] else 'inactive'))
            for host in group['hosts']:
                if host['health'] == 'up' and host['admin'] == 'enabled':
                    lines.append('host %s %s %d %d up' % (f(host['name']), f(host['ip']), host['open'], host['total']))
                    continue
                reasons = []
                if host['admin'] != 'enabled':
                    reasons.append(host['admin'])
                if host['health'] != 'up':
                    reasons.append(host['reason'] or host['health'])
                lines.append('disabled %s %s %s - %d %d' % (f(host['name']), f(host['ip']), f(','.join(reasons)),
                                                            host['open'], host['total']))
    return ''.join(line + '\n' for line in lines)


def last_check(field):
    return lambda s, g, h: (h.get('last_check') or {}).get(field)


# running.csv's columns, one line per host: (header, a function of (service, group, host)).
# As in running.json, bytes_in and bytes_out are of closed connections, live_* of open ones.
CSV_COLUMNS = [
    ('service', lambda s, g, h: s['name']), ('group', lambda s, g, h: g['name']),
    ('host', lambda s, g, h: h['name']), ('address', lambda s, g, h: h['ip']),
    ('state', lambda s, g, h: h['state']), ('reason', lambda s, g, h: h['reason']),
    ('weight', lambda s, g, h: h['weight']),
    ('effective_weight', lambda s, g, h: explain_number(h.get('effective_weight', h['weight']))),
    ('maxconns', lambda s, g, h: h['maxconns']), ('backup', lambda s, g, h: int(bool(h.get('backup')))),
    ('open', lambda s, g, h: h['open']), ('total', lambda s, g, h: h['total']),
    ('rate', lambda s, g, h: h['rate']), ('rate_peak', lambda s, g, h: h['rate_peak']),
    ('connect_errors', lambda s, g, h: h['connect_errors']), ('retries', lambda s, g, h: h['retries']),
    ('queue', lambda s, g, h: s['queued']),
    ('bytes_in', lambda s, g, h: h['bytes_in']), ('bytes_out', lambda s, g, h: h['bytes_out']),
    ('live_bytes_in', lambda s, g, h: h['live_bytes_in']), ('live_bytes_out', lambda s, g, h: h['live_bytes_out']),
    ('downtime', lambda s, g, h: h['downtime']), ('state_changes', lambda s, g, h: h['state_changes']),
    ('last_check_time', last_check('when')),
    ('last_check_ok', lambda s, g, h: {None: '', True: 1, False: 0}[(h.get('last_check') or {}).get('ok')]),
    ('last_check_took', last_check('took')), ('last_check_reason', last_check('reason')),
    ('next_probe', lambda s, g, h: h['next_probe']),
]


def render_running_csv(snapshot):
    """running.csv: a header line, then one line per host (RFC 4180, CRLF line ends).
    queue is its service's: clients wait for whichever host of the service frees a
    place first, not for one host.  Control characters are escaped, so a line is a line;
    an absent value (no probe yet) is empty."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([name for name, _ in CSV_COLUMNS])
    for service in snapshot['services']:
        for group in service['groups']:
            for host in group['hosts']:
                writer.writerow(['' if value is None else escape_text(value) if isinstance(value, str) else value
                                 for value in (get(service, group, host) for _, get in CSV_COLUMNS)])
    return out.getvalue()


def explain_number(value):
    if isinstance(value, float):
        return '%.6g' % value
    return str(value)


def render_explain(info):
    """director.explain()'s dict as text, one fact per line ('key: value')."""
    t = escape_text
    lines = ['service: %s' % t(info.get('service') or 'none'), 'client: %s' % t(info.get('client'))]
    if info.get('protocol') == 'udp':
        lines.append('protocol: udp (a new client address gets the host below; an open session keeps its own)')
    if info.get('sni_reason'):
        if info.get('listen'):
            lines.append('listen: %s' % t(info['listen']))
        lines.append('sni: %s' % (t(info['sni']) if info.get('sni') else 'none (a hello without a server name)'))
        lines.append('sni match: %s' % t(info['sni_reason']))
    if info.get('service') is None:
        lines.append('host: none')
        return ''.join(line + '\n' for line in lines)
    allowed = info.get('allowed', True)
    lines.append('allowed: %s' % ('yes' if allowed else 'no, denied by the service\'s allow/deny rules'))
    lines.append('group: %s' % t(info.get('group')))
    lines.append('scheduler: %s' % t(info.get('scheduler')))
    if info.get('host') is None:
        lines.append('host: none')
    elif allowed:
        lines.append('host: %s %s%s' % (t(info['host']), t(info.get('address') or '-'), from_dns(info, info['host'])))
    else:
        lines.append('host: none (if allowed: %s %s)' % (t(info['host']), t(info.get('address') or '-')))
    if info.get('reason'):
        lines.append('reason: %s' % t(info['reason']))
    check = info.get('check')
    if check:
        # check_text() has escaped the bytes already (\r\n, as the config writes them): not twice.
        lines.append('check: %s' % (check if check.isprintable() else t(check)))
    sticky = info.get('sticky')
    if sticky:
        expires = sticky.get('expires_in')
        lines.append('sticky: %s%s' % (t(sticky.get('host')), '' if expires is None else
                                       ', expires in %s s' % explain_number(expires)))
    else:
        lines.append('sticky: none')
    if info.get('ranking') is not None:
        lines.append('ranking: %s' % ', '.join('%s %s' % (t(name), explain_number(score))
                                               for name, score in info['ranking']))
    for name, why in info.get('skipped') or ():
        lines.append('skipped: %s (%s)%s' % (t(name), t(why), from_dns(info, name)))
    if not info.get('skipped'):
        lines.append('skipped: none')
    clients = info.get('clients')
    if clients:
        lines.append('clients: %s, %d open%s (%s, mode %s)' % (
            t(clients['key']), clients['open'], '' if clients['left'] is None else
            ', %d new connection(s) allowed now' % clients['left'], t(clients['settings']), clients['mode']))
        if clients['limited'] is None:
            lines.append('limited: no')
        else:
            lines.append('limited: %s, %s' % ('yes' if clients['mode'] == 'enforce' else
                                              'would be (mode log lets it through)', t(clients['reason'])))
    for name, effective, weight, left in info.get('ramping') or ():
        lines.append('slow start: %s at effective weight %s of %s, %s s left' % (
            t(name), explain_number(effective), weight, explain_number(round(left, 1))))
    discovered = collections.Counter((info.get('from_dns') or {}).values())
    for discover, count in sorted(discovered.items()):
        lines.append('from DNS: %d host(s) of the group from discover %s' % (count, t(discover)))
    for client, listen, host in info.get('sessions') or ():
        lines.append('session: %s on %s goes to %s' % (t(client), t(listen), t(host)))
    return ''.join(line + '\n' for line in lines)


def from_dns(info, host):
    """' (from DNS: NAME)' for a host a <discover> found, else ''."""
    discover = (info.get('from_dns') or {}).get(host)
    return ' (from DNS: %s)' % escape_text(discover) if discover else ''


def metric_label(value):
    """A label value escaped per the Prometheus text format: backslash, double quote, newline."""
    return str(value).replace('\\', '\\\\').replace('"', '\\"').replace('\n', '\\n')


def metric_labels(pairs):
    return '{%s}' % ','.join('%s="%s"' % (k, metric_label(v)) for k, v in pairs)


SERVICE_METRICS = [
    ('pydirector_service_accepted_total', 'counter', 'Client connections accepted (UDP: sessions made).',
     'accepted'),
    ('pydirector_service_failovers_total', 'counter',
     'Times a client was moved on to another host after a failed connect.', 'failovers'),
    ('pydirector_service_refused_total', 'counter', 'Clients closed because no host was available.',
     'refused'),
    ('pydirector_service_open_connections', 'gauge', 'Client connections open now (UDP: sessions).', 'open'),
    ('pydirector_service_queued', 'gauge', 'Clients waiting for a host below its max conns.', 'queued'),
    ('pydirector_service_denied_total', 'counter', 'Clients closed by the service\'s allow/deny rules.',
     'denied'),
    ('pydirector_service_maxconns', 'gauge', 'The service\'s connection limit; 0 means unlimited.', 'maxconns'),
    ('pydirector_service_errors_total', 'counter',
     'Failed connects to the service\'s hosts, plus the clients it refused.', 'errors'),
    ('pydirector_service_hosts_up', 'gauge', 'Hosts of the enabled group that are up and enabled.', 'hosts_up'),
    ('pydirector_service_hosts', 'gauge', 'Hosts of the enabled group.', 'hosts_total'),
    ('pydirector_service_current_connection_rate', 'gauge',
     'New client connections per second, over the last history sample (5 s).', 'rate'),
    ('pydirector_service_max_connection_rate', 'gauge',
     'The most new client connections per second of any history sample since the start.', 'rate_peak'),
]

# A UDP service's (label service): each value is a key of its snapshot's 'udp'.
UDP_METRICS = [
    ('pydirector_service_udp_sessions_max', 'gauge',
     'The most sessions a UDP service holds per process (<udp sessions>).', 'sessions_max'),
    ('pydirector_service_udp_evicted_total', 'counter',
     'UDP sessions ended to make room for a new client (the least recently used).', 'evicted'),
    ('pydirector_service_udp_datagrams_in_total', 'counter', 'Datagrams from clients.', 'datagrams_in'),
    ('pydirector_service_udp_datagrams_out_total', 'counter', 'Datagrams to clients.', 'datagrams_out'),
    ('pydirector_service_udp_dropped_total', 'counter',
     'Datagrams not relayed: a full socket buffer, a client or host that cannot be reached.', 'dropped'),
]

# Services with <clients> only.
CLIENT_METRICS = [
    ('pydirector_service_client_limited_total', 'counter',
     'Clients refused by the per-client limits (<clients>), reset before any backend was asked.', 'limited'),
    ('pydirector_service_client_limited_dry_run_total', 'counter',
     'Clients <clients mode="log"> would have refused (and let through).', 'limited_dry'),
    ('pydirector_service_client_evictions_total', 'counter',
     'Client addresses evicted from the per-client table while full, their counts lost.', 'client_evictions'),
    ('pydirector_service_client_addresses', 'gauge', 'Client addresses the per-client table tracks now.', None),
]

# With worker processes: one sample per worker (label worker="N"); the totals above are their sums.
WORKER_METRICS = [
    ('pydirector_worker_up', 'gauge', '1 if the worker process is running and accepting, else 0.', 'up'),
    ('pydirector_worker_open_connections', 'gauge', 'Client connections the worker has open now.', 'open'),
    ('pydirector_worker_connections_total', 'counter',
     'Client connections the worker process accepted (since it started).', 'accepted'),
    ('pydirector_worker_restarts_total', 'counter', 'Times the worker died and was started again.', 'restarts'),
    ('pydirector_worker_heartbeat_age_seconds', 'gauge',
     'Seconds since the worker\'s loop last stamped its heartbeat; past worker_timeout it is killed.', 'heartbeat'),
]

# Each value is a function of (host snapshot, snapshot time); None leaves the sample out
# (no probe planned, no state change yet).
HOST_METRICS = [
    ('pydirector_host_up', 'gauge', '1 if the host passes its health checks, else 0.',
     lambda h, now: 1 if h['health'] == 'up' else 0),
    ('pydirector_host_draining', 'gauge', '1 if an operator drained the host (no new clients but its sticky ones).',
     lambda h, now: 1 if h['admin'] == 'draining' else 0),
    ('pydirector_host_maint', 'gauge', '1 if an operator put the host in maint (no clients, no probes).',
     lambda h, now: 1 if h['admin'] == 'maint' else 0),
    ('pydirector_host_backup', 'gauge', '1 for a backup host (used only while no other host of its group is up).',
     lambda h, now: 1 if h.get('backup') else 0),
    ('pydirector_host_open_connections', 'gauge', 'Connections open to the host now.',
     lambda h, now: h['open']),
    ('pydirector_host_connections_total', 'counter', 'Connections made to the host.',
     lambda h, now: h['total']),
    ('pydirector_host_bytes_in_total', 'counter', 'Bytes relayed from clients to the host (closed connections).',
     lambda h, now: h['bytes_in']),
    ('pydirector_host_bytes_out_total', 'counter', 'Bytes relayed from the host to clients (closed connections).',
     lambda h, now: h['bytes_out']),
    ('pydirector_host_live_bytes_in', 'gauge',
     'Bytes relayed so far from clients to the host by its open connections.', lambda h, now: h['live_bytes_in']),
    ('pydirector_host_live_bytes_out', 'gauge',
     'Bytes relayed so far from the host to clients by its open connections.', lambda h, now: h['live_bytes_out']),
    ('pydirector_host_connect_errors_total', 'counter', 'Connects to the host that failed (refused, timed out...).',
     lambda h, now: h['connect_errors']),
    ('pydirector_host_retries_total', 'counter',
     'Clients the host took after a failed connect to another host (failovers to it).',
     lambda h, now: h['retries']),
    ('pydirector_host_current_connection_rate', 'gauge',
     'New connections to the host per second, over the last history sample (5 s).', lambda h, now: float(h['rate'])),
    ('pydirector_host_max_connection_rate', 'gauge',
     'The most new connections to the host per second of any history sample since it was first counted.',
     lambda h, now: float(h['rate_peak'])),
    ('pydirector_host_downtime_seconds_total', 'counter', 'Seconds the host has been down (failed health).',
     lambda h, now: float(h['downtime'])),
    ('pydirector_host_last_check_success', 'gauge', '1 if the host\'s last health check passed, 0 if it failed.',
     lambda h, now: None if not h['last_check'] or h['last_check']['ok'] is None else int(h['last_check']['ok'])),
    ('pydirector_host_last_check_duration_seconds', 'gauge', 'How long the host\'s last health check took.',
     lambda h, now: None if not h['last_check'] else float(h['last_check']['took'])),
    ('pydirector_host_last_check_timestamp_seconds', 'gauge',
     'When the host\'s last health check ended, in seconds since the epoch.',
     lambda h, now: None if not h['last_check'] else float(h['last_check']['when'])),
    ('pydirector_host_weight', 'gauge', 'The host\'s scheduler weight.', lambda h, now: h['weight']),
    ('pydirector_host_effective_weight', 'gauge',
     'The part of its weight the host takes now: its weight, less during slow start.',
     lambda h, now: float(h.get('effective_weight', h['weight']))),
    # Only from a true count: the timeline keeps the last few changes, and a counter that
    # stops there would hide exactly the flapping it is for.
    ('pydirector_host_state_changes_total', 'counter', 'Times the host changed state (up, down, draining).',
     lambda h, now: h['state_changes']),
    ('pydirector_host_last_state_change_timestamp_seconds', 'gauge',
     'When the host last changed state, in seconds since the epoch.',
     lambda h, now: float(h['timeline'][-1]['when']) if h['timeline'] else None),
    ('pydirector_host_next_probe_seconds', 'gauge', 'Seconds until the host\'s next health check.',
     lambda h, now: None if h['next_probe'] is None else max(0.0, h['next_probe'] - now)),
]


# One sample per <discover> (labels service, group, discover); failures one per reason.
DISCOVER_METRICS = [
    ('pydirector_discover_hosts', 'gauge', 'Hosts of the group that came from this DNS name.',
     lambda d: d['hosts']),
    ('pydirector_discover_failing', 'gauge', '1 if the last query of the name failed, else 0.',
     lambda d: 1 if d['failing'] else 0),
    ('pydirector_discover_answers_total', 'counter', 'Good answers to the queries of the name.',
     lambda d: d['answers']),
    ('pydirector_discover_failures_total', 'counter',
     'Queries of the name that failed, by reason: timeout, refused, servfail, nxdomain, empty, error.', None),
    ('pydirector_discover_ignored_total', 'counter',
     'DNS messages ignored as not the answer: a wrong ID or question, or malformed.', lambda d: d['ignored']),
    ('pydirector_discover_ttl_seconds', 'gauge', 'The TTL of the last good answer.', lambda d: d['ttl']),
    ('pydirector_discover_last_answer_timestamp_seconds', 'gauge',
     'When the last good answer came, in seconds since the epoch.',
     lambda d: None if d['last_answer'] is None else float(d['last_answer'])),
]


# The code running and its last upgrade: (the snapshot's part, name, type, help, its
# sample's value as text), each family there when its part is.
UPGRADE_METRICS = [
    ('generation', 'pydirector_generation', 'gauge', 'The code generation running: 1 at start, one more each upgrade.',
     lambda g: '%d' % g['number']),
    ('generation', 'pydirector_generation_start_time_seconds', 'gauge',
     'When the code running now took over (the start, or the last upgrade), in seconds since the epoch.',
     lambda g: '%.3f' % g['started']),
    ('upgrade', 'pydirector_upgrade_last_successful', 'gauge', '1 if the last upgrade succeeded, 0 if it failed.',
     lambda u: '%d' % u['ok']),
    ('upgrade', 'pydirector_upgrade_last_timestamp_seconds', 'gauge',
     'When the last upgrade ended (or failed), in seconds since the epoch.', lambda u: '%.3f' % u['time']),
]


def render_metrics(snapshot):
    """Prometheus text exposition format 0.0.4: each family's HELP and TYPE, then its samples."""
    out = []

    def family(name, kind, help_text):
        out.append('# HELP %s %s' % (name, help_text.replace('\\', '\\\\').replace('\n', '\\n')))
        out.append('# TYPE %s %s' % (name, kind))

    family('pydirector_info', 'gauge', 'Version and host name of this balancer; always 1.')
    out.append('pydirector_info%s 1' % metric_labels([('version', snapshot['version']),
                                                       ('hostname', snapshot['hostname'])]))
    family('pydirector_start_time_seconds', 'gauge', 'When the balancer started, in seconds since the epoch.')
    out.append('pydirector_start_time_seconds %.3f' % snapshot['started'])
    for part, name, kind, help_text, value in UPGRADE_METRICS:
        if snapshot.get(part) is not None:
            family(name, kind, help_text)
            out.append('%s %s' % (name, value(snapshot[part])))
    reload = snapshot['reload']     # Prometheus's own names for these
    family('pydirector_config_last_reload_successful', 'gauge',
           '1 if the last config reload succeeded (the load at start counts), 0 if it failed.')
    out.append('pydirector_config_last_reload_successful %d' % reload['ok'])
    family('pydirector_config_last_reload_success_timestamp_seconds', 'gauge',
           'When the config was last loaded successfully (at start or by a reload), in seconds since the epoch.')
    out.append('pydirector_config_last_reload_success_timestamp_seconds %.3f' % reload['success_time'])
    family('pydirector_log_lines_dropped_total', 'counter',
           'Log lines dropped because their target (stderr, the log file, syslog) took no more '
           'or failed; with workers, every process\'s.')
    out.append('pydirector_log_lines_dropped_total %d' % snapshot.get('log_lines_dropped', 0))
    services = snapshot['services']
    for name, kind, help_text, key in SERVICE_METRICS:
        family(name, kind, help_text)
        for service in services:
            value = service[key]
            out.append('%s%s %s' % (name, metric_labels([('service', service['name'])]),
                                    '%.3f' % value if isinstance(value, float) else '%d' % value))
    udp_services = [service for service in services if service.get('udp')]
    for name, kind, help_text, key in UDP_METRICS if udp_services else ():
        family(name, kind, help_text)
        for service in udp_services:
            out.append('%s%s %d' % (name, metric_labels([('service', service['name'])]), service['udp'][key]))
    limited = [service for service in services if service.get('clients')]
    for name, kind, help_text, key in CLIENT_METRICS:
        if limited:
            family(name, kind, help_text)
        for service in limited:
            out.append('%s%s %d' % (name, metric_labels([('service', service['name'])]),
                                    service[key] if key else service['clients']['entries']))
    family('pydirector_group_enabled', 'gauge', '1 for the group that takes a service\'s new connections.')
    for service in services:
        for group in service['groups']:
            out.append('pydirector_group_enabled%s %d' % (
                metric_labels([('service', service['name']), ('group', group['name'])]), group['enabled']))
    now = snapshot['now']
    hosts = [(service, group, host) for service in services for group in service['groups']
             for host in group['hosts']]
    for name, kind, help_text, value in HOST_METRICS:
        samples = []
        for service, group, host in hosts:
            number = value(host, now)
            if number is None:
                continue
            labels = metric_labels([('service', service['name']), ('group', group['name']),
                                    ('host', host['name']), ('address', host['ip'])])
            shown = '%.3f' % number if isinstance(number, float) else '%d' % number
            samples.append('%s%s %s' % (name, labels, shown))
        if hosts and not samples:
            continue
        family(name, kind, help_text)
        out.extend(samples)
    discovers = [(service, group, d) for service in services for group in service['groups']
                 for d in group.get('discover') or ()]
    for name, kind, help_text, value in DISCOVER_METRICS:
        if discovers:
            family(name, kind, help_text)
        for service, group, d in discovers:
            labels = [('service', service['name']), ('group', group['name']), ('discover', d['name'])]
            if name == 'pydirector_discover_failures_total':
                for reason, count in sorted(d['failures'].items()):
                    out.append('%s%s %d' % (name, metric_labels(labels + [('reason', reason)]), count))
                continue
            number = value(d)
            if number is not None:
                out.append('%s%s %s' % (name, metric_labels(labels), '%.3f' % number if isinstance(number, float)
                                        else '%d' % number))
    workers = snapshot.get('workers') or []
    for name, kind, help_text, key in WORKER_METRICS:
        if workers:
            family(name, kind, help_text)
        for worker in workers:
            value = worker.get(key)
            if value is not None:       # no heartbeat before the worker runs
                out.append('%s%s %s' % (name, metric_labels([('worker', worker['worker'])]),
                                        '%.3f' % value if isinstance(value, float) else '%d' % value))
    addresses = snapshot.get('sni') or []
    if addresses:
        family('pydirector_sni_unmatched_total', 'counter',
               'TLS hellos on a listen address with sni whose server name no service there takes '
               '(and none has *): closed.')
        for entry in addresses:
            out.append('pydirector_sni_unmatched_total%s %d' % (
                metric_labels([('address', entry['address'])]), entry['unmatched']))
        family('pydirector_sni_bad_hellos_total', 'counter',
               'Clients of a listen address with sni closed before a service was chosen, by reason: '
               'not-tls, malformed, too-big, truncated, timeout, bad-proxy, untrusted-proxy.')
        for entry in addresses:
            for reason, count in sorted(entry['bad'].items()):
                out.append('pydirector_sni_bad_hellos_total%s %d' % (
                    metric_labels([('address', entry['address']), ('reason', reason)]), count))
        family('pydirector_sni_reading', 'gauge', 'Clients of a listen address with sni still sending their hello.')
        for entry in addresses:
            out.append('pydirector_sni_reading%s %d' % (metric_labels([('address', entry['address'])]),
                                                        entry['reading']))
    return ''.join(line + '\n' for line in out)


# ---------------------------------------------------------------------------
# The command line: plan and apply a config change through the admin API
# (the original's compareconf).  See "Command line" in the module docstring.
# ---------------------------------------------------------------------------

CANNOT = '# cannot apply through the admin API: %s; edit the file on the balancer and reload'
# The host attributes addHost sets and those setHost changes in place: their calls' parameters.
HOST_ATTRS = tuple(name for name in ACTIONS['/addHost'].required + ACTIONS['/addHost'].optional
                   if name not in ('service', 'group'))
SET_HOST_ATTRS = tuple(name for name in ACTIONS['/setHost'].optional if name in HOST_ATTRS)
# A host setting's default as a plan shows it ('weight 1 -> 3', 'send_proxy none -> v1').
HOST_DEFAULTS = pydirector.default_texts(pydirector.HOST_ATTRS)
USER_ATTRS = ('name', 'password', 'access')                         # what addUser can set


class Step(object):
    """One admin call of a plan: endpoint and its parameters in order; or, with endpoint
    None, a comment that explains the calls after it."""

    def __init__(self, endpoint, params=(), comment=None):
        self.endpoint = endpoint
        self.params = list(params)
        self.comment = comment

    def line(self):
        if self.endpoint is None:
            return '# ' + self.comment
        shown = []
        for name, value in self.params:
            if name == 'password_hash':
                value = hash_shown(value)
            shown.append('%s=%s' % (name, quote_value(value)))
        return ' '.join([self.endpoint] + shown)


class Plan(object):
    """What turns one balancer's running config into the new file: the admin calls in a
    safe order (steps), and the differences no admin call can make (problems)."""

    def __init__(self):
        self.steps = []
        self.problems = []

    @property
    def calls(self):
        return [step for step in self.steps if step.endpoint is not None]

    def lines(self):
        if not self.problems and not self.calls:
            return ['# no changes']
        return [CANNOT % problem for problem in self.problems] + [step.line() for step in self.steps]


def quote_value(value):
    """A value as one word of a plan line: plain when it can be, else a JSON string."""
    if value and re.fullmatch(r'[^\s"\\]+', value) and value.isprintable():
        return value
    return json.dumps(value, ensure_ascii=False)


def hash_shown(stored):
    """Enough of a password hash to see its kind, not enough to attack it offline."""
    match = re.match(r'pbkdf2_sha256\$[0-9]+\$|\$[0-9]\$', stored)
    return (match.group(0) if match else '') + '...'


def add_host_step(service, group, host):
    params = [('service', service), ('group', group)]
    params.extend((key, host.get(key)) for key in HOST_ATTRS if host.get(key) is not None)
    return Step('addHost', params)


def plan_changes(running, new, user=None, drain=None, rollback=None):
    """The Plan from running to new (Configs, or config_tree()s), from their
    pydirector.ConfigDiff.  user is the admin user the calls are made as: its own
    change, if any, comes last, so the calls before it still pass.

    Order: new groups, their hosts, new hosts, scheduler changes and host changes (setHost,
    or delete and add) first;
    then enableGroup; then delHost and delGroup (the old group is no longer enabled by
    then); users last, new ones before deleted ones (the last full-access user cannot go).
    """
    diff = pydirector.ConfigDiff(running, new)
    plan = Plan()
    build, switch, after = [], [], []
    problem = plan.problems.append
    for key, text in diff.settings:
        if text.startswith('<pdconfig> '):
            problem(text)
    for name in diff.services_removed:
        problem('service %s is removed' % name)
    for name in diff.service_order:
        if name in diff.services:
            plan_service(name, diff.services[name], build, switch, after, problem, drain, rollback)
        else:
            problem('service %s is added' % name)
    for key, text in diff.settings:
        if not text.startswith('<pdconfig> '):
            problem(text)
    users = plan_users(diff, user, problem)
    plan.steps = build + switch + after + users
    return plan


def addable(where, name, host, old_host, problem):
    """A new or changed host is made by addHost: it must not need anything addHost cannot set."""
    extra = sorted(set(k for k in host.attrib if k not in HOST_ATTRS) |
                   set(k for k in (old_host.attrib if old_host is not None else ()) if k not in HOST_ATTRS))
    if extra:
        problem('%s: host %s has %s, which addHost cannot set' % (where, name, ', '.join(extra)))
    return not extra


def plan_service(name, diff, build, switch, after, problem, drain, rollback):
    for key, text in diff.settings:
        problem('service %s: %s' % (name, text))
    old_enabled, new_enabled = diff.enabled
    for group in diff.new_groups.values():
        group_name = group.get('name')
        where = '%s/%s' % (name, group_name)
        if group_name not in diff.groups:      # a new group, with its hosts
            hosts = [host for host in group.findall('host') if addable(where, host.get('name'), host, None, problem)]
            build.append(Step('newGroup', [('service', name), ('group', group_name),
                                           ('scheduler', group.get('scheduler'))]))
            build.extend(add_host_step(name, group_name, host) for host in hosts)
            for key, text in (attribute_changes(ElementTree.Element('group'), group, skip=('name', 'scheduler')) +
                              pydirector.element_changes(ElementTree.Element('group'), group, ('host',))):
                problem('%s: %s' % (where, text))
            continue
        gd = diff.groups[group_name]
        for key, text in gd.settings:
            problem('%s: %s' % (where, text))
        if gd.scheduler is not None:
            build.append(Step('changeScheduler', [('service', name), ('group', group_name),
                                                  ('scheduler', gd.scheduler[1])]))
        added = [host for host in gd.added if addable(where, host.get('name'), host, None, problem)]
        build.extend(add_host_step(name, group_name, host) for host in added)
        for host_name, old_host, host in gd.changed:
            if not addable(where, host_name, host, old_host, problem):
                continue
            changes = attribute_changes(old_host, host, defaults=HOST_DEFAULTS)
            if all(key in SET_HOST_ATTRS for key, _ in changes):
                # In place: its health, counters and connections stay.
                build.append(Step('setHost', [('service', name), ('group', group_name), ('name', host_name)] +
                                  [(key, host.get(key, HOST_DEFAULTS[key])) for key, _ in changes]))
                continue
            # What setHost cannot change (ip, send_proxy, backup): delete it and add it
            # again.  Its open connections finish; only its counters start again.
            readd = [Step(None, comment='%s host %s: %s; delete and add again' % (
                         where, host_name, ', '.join(text for _, text in changes))),
                     Step('delHost', [('service', name), ('group', group_name), ('name', host_name)]),
                     add_host_step(name, group_name, host)]
            if group_name != old_enabled:
                build.extend(readd)
            elif new_enabled != group_name:
                after.extend(readd)     # once the switch is made the group may lose a host for a moment
            elif len(gd.old_hosts) + len(gd.added) > 1:
                build.extend(readd)     # the enabled group keeps its other hosts meanwhile
            else:
                problem('%s: host %s changes but is the only host of the enabled group, which '
                        'delHost refuses to empty' % (where, host_name))
        if gd.removed and not gd.new_hosts and group_name == new_enabled:
            problem('%s: the enabled group would have no host, and delHost refuses to remove the last one'
                    % where)
            continue
        after.extend(Step('delHost', [('service', name), ('group', group_name), ('name', host_name)])
                     for host_name in gd.removed)
    if new_enabled != old_enabled:
        params = [('service', name), ('group', new_enabled)]
        params.extend((key, value) for key, value in (('drain', drain), ('rollback', rollback)) if value is not None)
        switch.append(Step('enableGroup', params))
    for group_name in diff.removed:
        after.append(Step('delGroup', [('service', name), ('group', group_name)]))


def plan_users(diff, acting_user, problem):
    old, new = diff.admin
    if old is None or new is None:
        if (old is None) != (new is None):
            problem('the <admin> block is %s' % ('added' if old is None else 'removed'))
        return []
    for key, text in diff.admin_settings:
        problem(text)
    adds, dels, own = [], [], []
    for user in diff.users_changed:
        name = user.get('name')
        old_user = diff.old_users.get(name)
        # addUser makes the user anew: it must not need anything addUser cannot set.
        extra = set(user.attrib) | set(old_user.attrib if old_user is not None else ())
        extra = sorted(k for k in extra if k not in USER_ATTRS)
        if extra:
            problem('user %s has %s, which addUser cannot set' % (name, ', '.join(extra)))
            continue
        step = Step('addUser', [('name', name), ('password_hash', user.get('password')),
                                ('access', user.get('access'))])
        (own if name == acting_user else adds).append(step)
    for name in diff.users_removed:
        (own if name == acting_user else dels).append(Step('delUser', [('name', name)]))
    if dels or own:
        if not any(user.get('access') == 'full' for user in diff.new_users.values()):
            problem('no user has full access, and delUser refuses to remove the last one')
            return []
    return adds + dels + own


# -- talking to the balancers ------------------------------------------------

class RemoteError(Exception):
    """A balancer that cannot be asked: bad URL, unreachable, refused credentials, bad answer."""


class Remote(object):
    """One balancer's admin server, reached with the credentials in its URL."""

    def __init__(self, url, insecure=False, timeout=30.0):
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise RemoteError('bad URL %r: %s' % (url, e))
        if parts.scheme not in ('http', 'https') or not parts.hostname:
            raise RemoteError('bad URL %r: want http://USER:PASSWORD@HOST:PORT (or https://...)' % url)
        if parts.query or parts.fragment:
            raise RemoteError('bad URL %r: no query or fragment, please' % url)
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = port or (443 if parts.scheme == 'https' else 80)
        self.prefix = parts.path.rstrip('/')
        self.user = urllib.parse.unquote(parts.username) if parts.username else None
        if parts.password is not None:
            password = urllib.parse.unquote(parts.password)
        else:
            # Not on the command line, where other local users can read it.
            password = os.environ.get('PYDIRECTOR_ADMIN_PASSWORD')
        host = '[%s]' % self.host if ':' in self.host else self.host
        # Shown in messages: never the password.
        self.shown = '%s://%s%s:%d%s' % (self.scheme, self.user + '@' if self.user else '', host,
                                         self.port, self.prefix)
        self.authorization = None
        if self.user is not None:
            token = ('%s:%s' % (self.user, password or '')).encode('utf-8')
            self.authorization = 'Basic ' + base64.b64encode(token).decode('ascii')
        self.timeout = timeout
        self.context = None
        if self.scheme == 'https':
            self.context = ssl.create_default_context()
            if insecure:
                self.context.check_hostname = False
                self.context.verify_mode = ssl.CERT_NONE

    def request(self, method, path, params=None):
        """(status, body text); RemoteError when there is no HTTP answer."""
        headers = {'Accept': 'text/plain', 'User-Agent': 'pydirector_admin/' + VERSION}
        if self.authorization:
            headers['Authorization'] = self.authorization
        body = None
        if params is not None:
            body = urllib.parse.urlencode(params).encode('ascii')
            headers['Content-Type'] = 'application/x-www-form-urlencoded'
        if self.context is not None:
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=self.context)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request(method, self.prefix + path, body, headers)
            resp = conn.getresponse()
            return resp.status, resp.read().decode('utf-8', 'replace')
        except ssl.SSLError as e:
            if 'CERTIFICATE_VERIFY_FAILED' in str(e):
                raise RemoteError('%s: the TLS certificate does not verify (%s); --insecure skips the check'
                                  % (self.shown, getattr(e, 'verify_message', None) or e))
            raise RemoteError('%s: TLS failed: %s' % (self.shown, e))
        except ssl.CertificateError as e:   # the name does not match (Python 3.6)
            raise RemoteError('%s: the TLS certificate does not verify (%s); --insecure skips the check'
                              % (self.shown, e))
        except OSError as e:
            raise RemoteError('cannot reach %s: %s' % (self.shown, e.strerror or e))
        except http.client.HTTPException as e:
            raise RemoteError('%s: not an HTTP answer (%s: %s); is it the admin port, and http or https?'
                              % (self.shown, type(e).__name__, e))
        finally:
            conn.close()

    def refusal(self, status, body):
        text = body.strip().splitlines()[0] if body.strip() else '(empty answer)'
        if status == 401:
            if self.user is None:
                return '%s: credentials needed; put them in the URL: %s://USER:PASSWORD@%s' % (
                    self.shown, self.scheme, self.shown.split('://', 1)[1])
            return '%s: user %s was refused (401 %s); check the user and password in the URL' % (
                self.shown, self.user, text)
        return '%s answered %d: %s' % (self.shown, status, escape_text(text))

    def running_config(self):
        status, body = self.request('GET', '/running.xml')
        if status != 200:
            raise RemoteError(self.refusal(status, body))
        try:
            return pydirector.parse_config(body, self.shown + '/running.xml')
        except pydirector.ConfigError as e:
            raise RemoteError('%s: its running.xml does not load: %s' % (self.shown, e))

    def call(self, step):
        """(ok, the balancer's answer line) for one plan step."""
        status, body = self.request('POST', '/' + step.endpoint, step.params)
        text = escape_text(body.strip()) or '(empty answer)'
        return status == 200 and text.startswith('OK'), text if status == 200 else '%d %s' % (status, text)


def make_plans(remotes, new_tree, drain, rollback):
    return [(remote, plan_changes(remote.running_config(), new_tree, remote.user, drain, rollback))
            for remote in remotes]


def print_plans(plans, out):
    for remote, plan in plans:
        if len(plans) > 1:
            print('# balancer %s' % remote.shown, file=out)
        for line in plan.lines():
            print(line, file=out)


def apply_plans(plans, out, err):
    """Make every plan's calls, one balancer after the other; stop at the first failure.
    Returns the exit status."""
    done = []   # (remote, calls made, calls planned)
    for remote, plan in plans:
        if len(plans) > 1:
            print('# balancer %s' % remote.shown, file=out)
        calls = plan.calls
        made = 0
        if not calls:
            print('# no changes', file=out)
        for step in plan.steps:
            print(step.line(), file=out)
            if step.endpoint is None:
                continue
            try:
                ok, answer = remote.call(step)
            except RemoteError as e:
                ok, answer = False, str(e)
            if not ok:
                print('  FAILED: %s' % answer, file=out)
                out.flush()
                print('apply: stopped at the first failure, on %s:\n  %s\n  answered: %s'
                      % (remote.shown, step.line(), answer), file=err)
                summary = ['%s: all %d call(s)' % (r.shown, n) if m == n else '%s: %d of %d call(s)' % (r.shown, m, n)
                           for r, m, n in done + [(remote, made, len(calls))]]
                untouched = [r.shown for r, _ in plans[len(done) + 1:]]
                print('apply: succeeded before it: %s' % '; '.join(summary), file=err)
                if untouched:
                    print('apply: not touched: %s' % ', '.join(untouched), file=err)
                print('apply: run diff again to see what is left', file=err)
                return 1
            made += 1
            print('  ' + answer, file=out)
        done.append((remote, made, len(calls)))
    return 0


def parse_cli(argv):
    parser = argparse.ArgumentParser(
        prog='pydirector_admin.py',
        description='Plan (diff) or make (apply) the admin calls that turn the running config of '
                    'one or more pydirector balancers into a new config file.',
        epilog='Exit status of diff: 0 no differences, 1 differences, 2 trouble (as diff(1)); of apply: '
               '0 done, 1 failed, 2 usage. '
               'See the module docstring for the order of the calls.')
    commands = parser.add_subparsers(dest='command', metavar='COMMAND')
    for name, text in (('diff', 'print the admin calls that would turn the running config into NEW.xml'),
                       ('apply', 'make those calls, balancer after balancer, stopping at the first failure')):
        sub = commands.add_parser(name, help=text, description=text + '.')
        sub.add_argument('--url', action='append', required=True, metavar='URL',
                         help="a balancer's admin server, http[s]://USER:PASSWORD@HOST:PORT (the user "
                              "needs full access); repeat for each balancer of a fleet")
        sub.add_argument('--insecure', action='store_true',
                         help='https: do not verify the certificate (a self-signed admin certificate)')
        sub.add_argument('--timeout', type=float, default=30.0, metavar='SECONDS',
                         help='for each request (default 30)')
        sub.add_argument('--drain', metavar='SECONDS',
                         help='with enableGroup: close connections left on the old group after SECONDS')
        sub.add_argument('--rollback', metavar='SECONDS',
                         help='with enableGroup: switch back unless a host of the new group is up within SECONDS')
        sub.add_argument('new_config', metavar='NEW.xml', help='the config file the balancers should run')
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error('say diff or apply')
    for name in ('drain', 'rollback'):
        try:
            pydirector.parse_seconds(getattr(args, name), '--' + name, zero_ok=True)
        except ValueError as e:
            parser.error(str(e))
    if args.timeout <= 0:
        parser.error('--timeout must be positive')
    return args


def main(argv=None, out=None, err=None):
    """`diff` and `apply`; returns the exit status (argparse exits 2 itself on usage errors)."""
    out = out or sys.stdout
    err = err or sys.stderr
    args = parse_cli(sys.argv[1:] if argv is None else argv)
    command = args.command
    try:
        new_tree = pydirector.load_config(args.new_config)
        remotes = [Remote(url, args.insecure, args.timeout) for url in args.url]
        plans = make_plans(remotes, new_tree, args.drain, args.rollback)
    except (RemoteError, pydirector.ConfigError) as e:
        print('%s: %s' % (command, e), file=err)
        return 2 if command == 'diff' else 1
    if command == 'diff':
        print_plans(plans, out)
        return 1 if any(plan.calls or plan.problems for _, plan in plans) else 0     # as diff(1)
    problems = sum(len(plan.problems) for _, plan in plans)
    if problems:
        print_plans(plans, out)
        out.flush()
        print('apply: nothing changed: %d difference(s) cannot be made through the admin API (the '
              '"# cannot apply" lines); copy %s to the balancer(s) and reload it there (/reload or SIGHUP)'
              % (problems, args.new_config), file=err)
        return 1
    status = apply_plans(plans, out, err)
    if status != 0:
        return status
    # Read each balancer back: what was made is what the file says, unless someone else
    # changed something meanwhile.
    try:
        left = [(remote, plan) for remote, plan in make_plans(remotes, new_tree, args.drain, args.rollback)
                if plan.calls or plan.problems]
    except RemoteError as e:
        print('apply: all calls made, but reading back failed: %s' % e, file=err)
        return 1
    if left:
        print('apply: all calls made, but the running config still differs from %s:' % args.new_config, file=err)
        for remote, plan in left:
            print('# balancer %s' % remote.shown, file=err)
            for line in plan.lines():
                print(line, file=err)
        return 1
    print('# applied: %s now run%s %s' % (', '.join(remote.shown for remote in remotes), '' if len(remotes) > 1
                                          else 's', args.new_config), file=out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
