#!/usr/bin/env python3
"""pydirector benchmark harness: direct nginx vs HAProxy vs pydirector, on loopback.

    python3 bench/bench.py                 full run (3 rounds, ~6 minutes on 2 cores)
    python3 bench/bench.py --quick         smoke run (small counts, about a minute)
    python3 bench/bench.py --python /root/.pyenv/versions/3.6.15/bin/python3.6
    python3 bench/bench.py --write-results --note "noisy: other jobs running"
    python3 bench/bench.py --workers 4     pydirector with 4 worker processes, HAProxy nbthread 4 (default 2)

Installs what is missing (apt: nginx, haproxy, apache2-utils, wrk, curl), starts nginx with
two ports, HAProxy (mode tcp, roundrobin, nbthread 1) and pydirector (roundrobin over the
same two ports), and beside them pydirector as a master and N worker processes (--workers, default 2,
0 leaves it out) with HAProxy nbthread N as its reference, then runs every workload on every target interleaved (round 1: direct,
HAProxy, pydirector; round 2: ...).  Writes bench/out/results.json, bench/out/results.md
and (with matplotlib from a venv of its own) bench/out/ratios.png.  Every subprocess has a
timeout and everything started here is stopped at the end, on errors and on Ctrl-C too.

Stdlib only, Python 3.6+.  Only the plot step (bench/plot.py) runs in the venv.
"""

import argparse
import datetime
import json
import os
import platform
import re
import resource
import selectors
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.append(os.path.join(REPO, 'tools'))
from processes import (child_pids, cpu_seconds, fd_count, free_port, rss_bytes, stop_process, wait_listening,  # noqa: E402
                       system_seconds, wakeups)
OUT = os.path.join(HERE, 'out')
RESULTS_MD = os.path.join(HERE, 'RESULTS.md')

TARGETS = ('direct', 'haproxy', 'haproxy-nt', 'pyfloor', 'pydirector', 'pydirector-log', 'pydirector-pypy',
           'pydirector-w')
LABELS = {'direct': 'direct', 'haproxy': 'HAProxy', 'pyfloor': 'pyfloor', 'pydirector': 'pydirector',
          'pydirector-log': 'pydirector, access log on', 'pydirector-pypy': 'pydirector on PyPy',
          'haproxy-nt': 'HAProxy nbthread N', 'pydirector-w': 'pydirector, N workers'}   # N: set_workers()
BALANCERS = ('haproxy', 'haproxy-nt', 'pyfloor', 'pydirector', 'pydirector-log', 'pydirector-pypy', 'pydirector-w')
WORKERS = 2             # --workers: pydirector-w's worker processes and haproxy-nt's threads
ADMIN_PASSWORD = 'bench'


def set_workers(count):
    global WORKERS
    WORKERS = count
    LABELS['haproxy-nt'] = 'HAProxy nbthread %d' % count
    LABELS['pydirector-w'] = 'pydirector, %d workers' % count
WORKLOADS = ('newconn', 'keepalive', 'bulk', 'idle', 'open25', 'open50', 'open90')
# The open-loop workloads: new connections at a fixed rate (bench/openloop.py), this
# fraction of HAProxy's new-connection rate (ab -c 50) measured in the same run.
OPEN_RATES = {'open25': 0.25, 'open50': 0.5, 'open90': 0.9}
OPEN_TARGETS = ('direct', 'haproxy', 'pyfloor', 'pydirector', 'pydirector-log', 'pydirector-pypy')
# The idle workload holds its connections through the warm balancer too (before a fresh
# one) for these: PyPy's memory grows as its JIT warms up, CPython's is its reference.
WARM_IDLE_TARGETS = ('pydirector', 'pydirector-pypy')


def open_target(target):
    return target in OPEN_TARGETS or target.startswith('tree-')
APT_PACKAGES = {'nginx': 'nginx', 'haproxy': 'haproxy', 'ab': 'apache2-utils', 'wrk': 'wrk', 'curl': 'curl'}
SMALL_SIZE = 100
BIG_SIZE = 64 << 20
MAXCONN = 9500           # both balancers; 2 fds per connection must fit the fd limit
BALANCER_NOFILE = 20000  # or the hard limit, whichever is lower

# (workload, metric, label, unit, higher_is_better)
METRICS = [
    ('newconn', 'req_s', 'new-connection rate (ab -c 50)', 'req/s', True),
    ('newconn', 'cpu_us_per_conn', 'balancer CPU per new connection', 'µs', False),
    ('newconn', 'p50_ms', 'new-connection p50 latency (ab)', 'ms', False),
    ('newconn', 'p99_ms', 'new-connection p99 latency (ab)', 'ms', False),
    ('keepalive', 'req_s', 'keep-alive request rate (wrk -c 50)', 'req/s', True),
    ('keepalive', 'cpu_us_per_req', 'balancer CPU per keep-alive request', 'µs', False),
    ('keepalive', 'p50_ms', 'keep-alive p50 latency (wrk)', 'ms', False),
    ('keepalive', 'p99_ms', 'keep-alive p99 latency (wrk)', 'ms', False),
    ('bulk', 'mb_s', 'bulk throughput (64 MiB downloads)', 'MB/s', True),
    ('bulk', 'cpu_s_per_gb', 'balancer CPU per GB (bulk)', 's/GB', False),
    ('idle', 'rss_before_kib', 'RSS at start', 'KiB', False),
    ('idle', 'kib_per_conn', 'RSS per idle connection', 'KiB', False),
    ('idle', 'rss_warm_kib', 'RSS warm (after the workloads before)', 'KiB', False),
    ('idle', 'rss_warm_idle_kib', 'RSS warm, holding the idle connections', 'KiB', False),
    ('idle', 'held', 'idle connections held', 'conns', True),
    # With worker processes (pydirector-w; for the one process, the process itself):
    ('newconn', 'worker_cpu_us_per_conn', 'CPU per new connection in the busiest worker', 'µs', False),
    ('newconn', 'spread_pct', 'new connections per worker: largest gap from the mean', '%', False),
    ('idle', 'rss_after_kib', 'RSS of the largest process holding the idle connections', 'KiB', False),
]
for _workload, _fraction in sorted(OPEN_RATES.items()):
    _at = '%d%% of HAProxy\'s rate' % (_fraction * 100)
    METRICS += [
        (_workload, 'rate_answered', 'open loop at %s: answered' % _at, 'conn/s', True),
        (_workload, 'p50_ms', 'open loop at %s: p50' % _at, 'ms', False),
        (_workload, 'p99_ms', 'open loop at %s: p99' % _at, 'ms', False),
        (_workload, 'p999_ms', 'open loop at %s: p99.9' % _at, 'ms', False),
        (_workload, 'max_ms', 'open loop at %s: max' % _at, 'ms', False),
        (_workload, 'late_p99_ms', 'open loop at %s: generator start lateness p99' % _at, 'ms', False),
    ]

# The HAProxy targets of issue 5: (workload, metric, kind, op, value); kind 'haproxy' compares the
# pydirector/HAProxy ratio, 'absolute' the pydirector figure itself.
GOALS = [
    # Issue 11: CPU against the featureless relay, in the same run.
    ('newconn', 'cpu_us_per_conn', 'pyfloor', '<=', 1.10),
    ('newconn', 'cpu_us_per_conn', 'pyfloor-log', '<=', 1.20),
    ('keepalive', 'cpu_us_per_req', 'pyfloor', '<=', 1.05),
    ('newconn', 'req_s', 'haproxy', '>=', 1.0),
    ('newconn', 'cpu_us_per_conn', 'haproxy', '<=', 1.2),
    ('keepalive', 'req_s', 'haproxy', '>=', 1.0),
    ('bulk', 'mb_s', 'haproxy', '>=', 1.5),
    ('newconn', 'p99_ms', 'haproxy', '<=', 1.5),
    ('keepalive', 'p99_ms', 'haproxy', '<=', 1.5),
    ('idle', 'kib_per_conn', 'absolute', '<=', 2.0),
    ('idle', 'held', 'absolute', '>=', 9000),
    # Issue 12: N workers against HAProxy nbthread 1 and against the one process, in the same run.
    ('newconn', 'req_s', 'workers:haproxy', '>=', 0.9),
    ('keepalive', 'req_s', 'workers:haproxy', '>=', 1.0),
    ('newconn', 'worker_cpu_us_per_conn', 'workers:pydirector', '<=', 1.05),
    ('newconn', 'spread_pct', 'workers:absolute', '<=', 20),
    ('idle', 'rss_after_kib', 'workers:pydirector', '<=', 1.0),
    ('idle', 'held', 'workers:absolute', '>=', 9000),
    # Issue 33: the tail at a fixed rate of new connections, against HAProxy in the same run;
    # PyPy's memory against CPython's (pydirector) in the same run.
    ('open25', 'p99_ms', 'haproxy', '<=', 1.2),
    ('open25', 'max_ms', 'haproxy', '<=', 1.5),
    ('open50', 'p99_ms', 'haproxy', '<=', 1.2),
    ('open50', 'max_ms', 'haproxy', '<=', 1.5),
    ('idle', 'rss_after_kib', 'pypy:pydirector', '<=', 2.0),
    ('idle', 'rss_warm_idle_kib', 'pypy:pydirector', '<=', 2.0),
]


def log(text):
    print(text, flush=True)


# --------------------------------------------------------------------------------------------
# Processes: everything started here is remembered and stopped in stop_all().

class Stop(Exception):
    """SIGTERM: unwind like Ctrl-C so the finally blocks stop what we started."""


def on_sigterm(signum, frame):
    raise Stop('SIGTERM')


def nofile_limit(wanted):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return wanted
    return min(wanted, hard)


class Processes(object):
    """The long-running servers: each in its own session, so a stop reaches its children."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.running = {}

    def start(self, name, argv, nofile=None, cwd=None):
        log_file = open(os.path.join(self.workdir, name + '.out'), 'ab')

        def limits():
            if nofile:
                soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))

        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                cwd=cwd, start_new_session=True, preexec_fn=limits)
        log_file.close()
        self.running[name] = proc
        return proc

    def stop(self, name, timeout=10):
        proc = self.running.pop(name, None)
        if proc is None:
            return
        # The whole session (nginx workers too), by its id: only what we started.
        stop_process(proc, timeout, group=True)
        if proc.poll() is None:
            log('warning: %s (pid %d) did not exit' % (name, proc.pid))

    def stop_all(self):
        for name in list(self.running):
            self.stop(name)


def run(argv, timeout, **kwargs):
    """A client command with a deadline: (returncode, stdout+stderr text); 'timeout' on expiry."""
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=timeout, universal_newlines=True, **kwargs)
    except subprocess.TimeoutExpired as e:
        out = e.output or ''
        if isinstance(out, bytes):
            out = out.decode('utf-8', 'replace')
        return 'timeout', out
    return done.returncode, done.stdout


# --------------------------------------------------------------------------------------------
# /proc readings (the rest come from tools/processes.py)

def rss_kib(pid):
    return rss_bytes(pid) // 1024


# --------------------------------------------------------------------------------------------
# Setup

def ensure_tools():
    missing = [tool for tool in APT_PACKAGES if shutil.which(tool) is None]
    if not missing:
        return
    packages = sorted(set(APT_PACKAGES[t] for t in missing))
    log('installing %s (missing: %s)' % (' '.join(packages), ' '.join(missing)))
    env = dict(os.environ, DEBIAN_FRONTEND='noninteractive')
    for argv in (['apt-get', 'update', '-qq'], ['apt-get', 'install', '-y', '-qq'] + packages):
        code, out = run(argv, 600, env=env)
        if code != 0:
            sys.exit('bench: %s failed (%s):\n%s' % (' '.join(argv), code, out[-2000:]))
    still = [tool for tool in APT_PACKAGES if shutil.which(tool) is None]
    if still:
        sys.exit('bench: still missing after apt-get: %s' % ' '.join(still))


def http_get(port, path, timeout=10.0):
    """(status line, body length) of one HTTP/1.0 GET."""
    with socket.create_connection(('127.0.0.1', port), timeout=timeout) as s:
        s.sendall(('GET %s HTTP/1.0\r\nHost: bench\r\n\r\n' % path).encode())
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    reply = b''.join(chunks)
    head, _, body = reply.partition(b'\r\n\r\n')
    return head.split(b'\r\n', 1)[0].decode('latin-1'), len(body)


def check_target(port):
    status, size = http_get(port, '/small')
    if ' 200 ' not in status + ' ' or size != SMALL_SIZE:
        raise RuntimeError('GET /small on port %d: %r, %d bytes' % (port, status, size))


NGINX_CONF = """\
daemon off;
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections {nofile}; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    keepalive_timeout 600s;
    client_header_timeout 600s;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port1} backlog=4096;
        listen 127.0.0.1:{port2} backlog=4096;
        root {work}/www;
    }}
}}
"""

HAPROXY_CONF = """\
global
    nbthread {nbthread}
    maxconn {maxconn}

defaults
    mode tcp
    balance roundrobin
    maxconn {maxconn}
    timeout connect 5s
    timeout client 1h
    timeout server 1h

frontend bench
    bind 127.0.0.1:{port}
    default_backend nginx

backend nginx
    server one 127.0.0.1:{port1}
    server two 127.0.0.1:{port2}
"""


def pydirector_xml(work, port, port1, port2, maxconns, access_off, log_name='pydirector.log', workers=None,
                   admin_port=None):
    admin = ''
    if admin_port:
        admin = ('  <admin listen="127.0.0.1:%d">\n    <user name="bench" password="%s" access="readonly"/>\n'
                 '  </admin>\n' % (admin_port, admin_hash()))
    return """\
<pdconfig drain="1"{workers}>
  <service name="bench"{maxconns}>
    <listen ip="127.0.0.1:{port}"/>
    <group name="main" scheduler="roundrobin">
      <host name="one" ip="127.0.0.1:{port1}"/>
      <host name="two" ip="127.0.0.1:{port2}"/>
    </group>
    <timeouts connect="5" idle="3600"/>
  </service>
  <logging file="{work}/{log_name}"{access}/>
{admin}</pdconfig>
""".format(work=work, port=port, port1=port1, port2=port2, log_name=log_name, admin=admin,
           workers=' workers="%d"' % workers if workers else '',
           maxconns=' maxconns="%d"' % MAXCONN if maxconns else '',
           access=' access="off"' if access_off else '')


_ADMIN_HASH = []


def admin_hash():
    """The bench user's password hash, as pydirector --hash-password makes it (once)."""
    if not _ADMIN_HASH:
        done = subprocess.run([sys.executable, os.path.join(REPO, 'pydirector.py'), '--hash-password'],
                              input=ADMIN_PASSWORD + '\n', stdout=subprocess.PIPE, universal_newlines=True,
                              timeout=60, check=True)
        _ADMIN_HASH.append(done.stdout.strip())
    return _ADMIN_HASH[0]


class Bench(object):
    """One run: the servers, the workloads, the raw results."""

    def __init__(self, args):
        self.args = args
        self.work = tempfile.mkdtemp(prefix='pydirector-bench-')
        os.chmod(self.work, 0o755)  # nginx workers run as an unprivileged user
        self.procs = Processes(self.work)
        self.ports = {}
        self.nofile = nofile_limit(BALANCER_NOFILE)
        self.runs = []
        self.last_workers = None
        self.notes = []
        self.targets = ['pydirector', 'pydirector-log', 'pydirector-pypy', 'pydirector-w'] if args.pydirector_only \
            else list(TARGETS)
        self.targets = [t for t in self.targets if (t != 'pyfloor' or args.pyfloor) and (t != 'pydirector-pypy' or args.pypy)]
        self.haproxy_rates = []     # new connections/s of HAProxy's newconn runs: the open-loop rates' base
        if not WORKERS:
            self.targets = [t for t in self.targets if t not in ('haproxy-nt', 'pydirector-w')]
        # --tree NAME=DIR: another pydirector (access log off) beside this one, e.g. patched to
        # change one thing, so the run prices that thing in place.
        self.trees = {}
        for name, tree in args.trees:
            target = 'tree-' + name
            self.trees[target] = os.path.abspath(tree)
            LABELS[target] = 'pydirector ' + name
            self.targets.insert(self.targets.index('pydirector-log') + 1 if 'pydirector-log' in self.targets
                                else len(self.targets), target)

    # ---- servers

    def setup(self):
        www = os.path.join(self.work, 'www')
        os.mkdir(www)
        os.chmod(www, 0o755)
        with open(os.path.join(www, 'small'), 'wb') as f:
            f.write(b'x' * (SMALL_SIZE - 1) + b'\n')
        with open(os.path.join(www, 'big'), 'wb') as f:
            block = os.urandom(1 << 20)
            for _ in range(BIG_SIZE >> 20):
                f.write(block)
        for name in ('small', 'big'):
            os.chmod(os.path.join(www, name), 0o644)
        port1, port2 = free_port(), free_port()
        while port2 == port1:
            port2 = free_port()
        self.ports = {'direct': port1, 'backend2': port2}
        conf = os.path.join(self.work, 'nginx.conf')
        with open(conf, 'w') as f:
            f.write(NGINX_CONF.format(work=self.work, port1=port1, port2=port2, nofile=self.nofile))
        self.procs.start('nginx', ['nginx', '-p', self.work + '/', '-e', self.work + '/nginx-error.log',
                                   '-c', conf], nofile=self.nofile)
        for port in (port1, port2):
            if not wait_listening(port):
                raise RuntimeError('nginx did not listen on %d: %s' % (port, self.tail('nginx.out')))
            check_target(port)
        for name, threads in (('haproxy', 1), ('haproxy-nt', WORKERS)):
            if name not in self.targets:
                continue
            self.ports[name] = free_port()
            with open(os.path.join(self.work, name + '.cfg'), 'w') as f:
                f.write(HAPROXY_CONF.format(port=self.ports[name], port1=port1, port2=port2, maxconn=MAXCONN,
                                            nbthread=threads))
            code, out = run(['haproxy', '-c', '-f', os.path.join(self.work, name + '.cfg')], 30)
            if code != 0:
                raise RuntimeError('haproxy -c: %s' % out)
        self.ports['pydirector'] = free_port()
        self.ports['pydirector-log'] = free_port()
        self.ports['pyfloor'] = free_port()
        self.ports['pydirector-w'] = free_port()
        self.ports['pydirector-w-admin'] = free_port()
        self.ports['pydirector-pypy'] = free_port()
        self.write_pydirector_config()
        for target in self.trees:
            self.ports[target] = free_port()
            with open(os.path.join(self.work, 'generated-%s.xml' % target), 'w') as f:
                f.write(pydirector_xml(self.work, self.ports[target], port1, port2,
                                       self.pydirector_features['maxconns'], self.pydirector_features['access_off'],
                                       '%s.log' % target))
        if 'pydirector-pypy' in self.targets:
            # As 'pydirector' (access log off), on the other interpreter.
            with open(os.path.join(self.work, 'generated-pypy.xml'), 'w') as f:
                f.write(pydirector_xml(self.work, self.ports['pydirector-pypy'], port1, port2,
                                       self.pydirector_features['maxconns'], self.pydirector_features['access_off'],
                                       'pydirector-pypy.log'))
        with open(os.path.join(self.work, 'generated-log.xml'), 'w') as f:
            f.write(pydirector_xml(self.work, self.ports['pydirector-log'], port1, port2, True, False,
                                   'pydirector-log.log'))
        if 'pydirector-w' in self.targets:
            # Access log off as for 'pydirector'; an admin (read-only) for each worker's counts.
            with open(os.path.join(self.work, 'generated-w.xml'), 'w') as f:
                f.write(pydirector_xml(self.work, self.ports['pydirector-w'], port1, port2, True, True,
                                       'pydirector-w.log', WORKERS, self.ports['pydirector-w-admin']))
        for target in self.targets:
            if target != 'direct':
                self.start_balancer(target)

    def write_pydirector_config(self):
        """Ask for maxconns and no access log when this pydirector knows them (issue 4 adds both)."""
        path = os.path.join(self.work, 'generated.xml')
        for maxconns, access_off in ((True, True), (False, True), (True, False), (False, False)):
            with open(path, 'w') as f:
                f.write(pydirector_xml(self.work, self.ports['pydirector'], self.ports['direct'],
                                       self.ports['backend2'], maxconns, access_off))
            code, out = run([self.args.python, 'pydirector.py', '--check', path], 30, cwd=REPO)
            if code == 0:
                self.pydirector_features = {'maxconns': maxconns, 'access_off': access_off}
                missing = [text for flag, text in ((maxconns, 'service maxconns'), (access_off, 'access="off"'))
                           if not flag]
                if missing:
                    self.notes.append('this pydirector does not know %s: left out of its config'
                                      % ' or '.join(missing))
                return
        raise RuntimeError('pydirector --check rejects the generated config:\n%s' % out)

    def start_balancer(self, target):
        self.procs.stop(target)
        if target in ('haproxy', 'haproxy-nt'):
            argv = ['haproxy', '-db', '-f', os.path.join(self.work, target + '.cfg')]
            cwd = self.work
        elif target == 'pyfloor':
            argv = [self.args.python, os.path.abspath(self.args.pyfloor), '127.0.0.1:%d' % self.ports['pyfloor'],
                    '127.0.0.1:%d' % self.ports['direct'], '127.0.0.1:%d' % self.ports['backend2']]
            cwd = self.work
        else:
            config = {'pydirector-log': 'generated-log.xml', 'pydirector-w': 'generated-w.xml',
                      'pydirector-pypy': 'generated-pypy.xml'}.get(target, 'generated.xml')
            python = self.args.pypy if target == 'pydirector-pypy' else self.args.python
            if target in self.trees:
                config = 'generated-%s.xml' % target
            argv = [python, 'pydirector.py', '-c', os.path.join(self.work, config)]
            cwd = self.trees.get(target, REPO)
        self.procs.start(target, argv, nofile=self.nofile, cwd=cwd)
        if not wait_listening(self.ports[target]):
            raise RuntimeError('%s did not listen: %s' % (target, self.tail(target + '.out')))
        if target == 'pydirector-w':
            deadline = time.monotonic() + 60
            while len(self.worker_counts(target)) < WORKERS and time.monotonic() < deadline:
                time.sleep(0.1)
        # Both backends once, so lazy setup is done before any measurement (each worker's too).
        for _ in range(2 * (WORKERS if target == 'pydirector-w' else 1)):
            check_target(self.ports[target])

    def balancer_pid(self, target):
        proc = self.procs.running.get(target)
        if proc is None:
            return None
        if proc.poll() is not None:
            log('  %s exited with status %s; restarting it: %s' % (target, proc.returncode, self.tail(target + '.out')))
            self.notes.append('%s exited (status %s) during the run and was restarted' % (target, proc.returncode))
            self.start_balancer(target)
            proc = self.procs.running[target]
        return proc.pid

    def data_pids(self, target):
        """The processes that carry the connections: the workers of pydirector-w, else the one."""
        pid = self.balancer_pid(target)
        if target == 'pydirector-w':
            return child_pids(pid)
        return [pid]

    def worker_counts(self, target):
        """pid -> connections accepted, per worker, from the admin's /running.json ({} if not yet)."""
        import base64
        import urllib.request
        request = urllib.request.Request('http://127.0.0.1:%d/running.json' % self.ports[target + '-admin'])
        request.add_header('Authorization', 'Basic ' + base64.b64encode(
            ('bench:' + ADMIN_PASSWORD).encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                workers = json.loads(answer.read().decode())['workers'] or []
        except (OSError, ValueError, KeyError):
            return {}
        return dict((w['pid'], w['accepted']) for w in workers if w['up'])

    def tail(self, name, lines=15):
        try:
            with open(os.path.join(self.work, name), errors='replace') as f:
                return ''.join(f.readlines()[-lines:])
        except OSError:
            return ''

    def url(self, target, path):
        return 'http://127.0.0.1:%d/%s' % (self.ports[target], path)

    # ---- workloads; each returns a dict of metrics (or {'error': ...})

    def measure(self, target, fn):
        """Run fn() with the balancer's CPU seconds around it (all its processes); for
        pydirector-w also each worker's CPU seconds and connections accepted."""
        pid = self.balancer_pid(target) if target != 'direct' else None
        pids = [pid] + (child_pids(pid) if target == 'pydirector-w' else []) if pid else []
        before = dict((p, cpu_seconds(p)) for p in pids)
        woken = sum(wakeups(p) for p in pids)
        kernel = sum(system_seconds(p) for p in pids)
        accepted = self.worker_counts(target) if target == 'pydirector-w' else None
        result = fn()
        if pid:
            try:
                spent = dict((p, cpu_seconds(p) - before[p]) for p in pids)
                result['wakeups'] = sum(wakeups(p) for p in pids) - woken
                result['system_s'] = sum(system_seconds(p) for p in pids) - kernel
            except OSError:
                result.setdefault('error', '%s died during the run' % target)
                return result
            result['cpu_s'] = sum(spent.values())
            if accepted is not None:
                now = self.worker_counts(target)
                result['workers'] = [{'pid': p, 'cpu_s': spent[p], 'accepted': now.get(p, 0) - accepted.get(p, 0)}
                                     for p in pids[1:]]
                result['master_cpu_s'] = spent[pid]
        return result

    def newconn(self, target):
        s = self.settings
        csv = os.path.join(self.work, 'ab.csv')
        argv = ['ab', '-q', '-r', '-s', '20', '-c', '50', '-n', str(s['ab_n']), '-e', csv, self.url(target, 'small')]
        code, out, cpu = self.measure_run(target, argv, s['ab_timeout'])
        result = {'code': code, 'cpu_s': cpu}
        m = re.search(r'Requests per second:\s+([\d.]+)', out)
        if code != 0 or not m:
            result['error'] = 'ab %s: %s' % (code, out.strip()[-500:])
            return result
        result['req_s'] = float(m.group(1))
        result['complete'] = int(re.search(r'Complete requests:\s+(\d+)', out).group(1))
        result['failed'] = int(re.search(r'Failed requests:\s+(\d+)', out).group(1))
        m = re.search(r'Non-2xx responses:\s+(\d+)', out)
        result['non_2xx'] = int(m.group(1)) if m else 0
        with open(csv) as f:
            rows = dict(line.strip().split(',', 1) for line in f if line[:1].isdigit())
        result['p50_ms'] = float(rows['50'])
        result['p99_ms'] = float(rows['99'])
        if cpu is not None and result['complete']:
            result['cpu_us_per_conn'] = result['cpu_s'] * 1e6 / result['complete']
            result['wakeups_per_conn'] = self.last_wakeups / float(result['complete'])
            result['system_us_per_conn'] = self.last_system * 1e6 / result['complete']
            if target == 'pydirector':
                result['worker_cpu_us_per_conn'] = result['cpu_us_per_conn']
        workers = self.last_workers
        if workers and all(w['accepted'] for w in workers):
            result['workers'] = workers
            result['worker_cpu_us_per_conn'] = max(w['cpu_s'] * 1e6 / w['accepted'] for w in workers)
            mean = sum(w['accepted'] for w in workers) / float(len(workers))
            result['spread_pct'] = max(abs(w['accepted'] - mean) for w in workers) * 100 / mean
        if result['failed'] or result['non_2xx']:
            result['error'] = '%d failed, %d non-2xx of %d' % (result['failed'], result['non_2xx'], result['complete'])
        elif target == 'haproxy':
            self.haproxy_rates.append(result['req_s'])
        return result

    def open_base(self):
        """The rate the open-loop fractions are of: --open-base, else HAProxy's new-connection
        rate in this run (the median of its newconn runs so far, or one measured now)."""
        if self.args.open_base:
            return self.args.open_base
        if not self.haproxy_rates:
            if 'haproxy' not in self.targets:
                raise RuntimeError('the open-loop workloads need HAProxy in the run, or --open-base RATE')
            result = self.newconn('haproxy')
            log('  HAProxy new-connection rate for the open-loop workloads: %s' % brief(result))
            if 'req_s' not in result:
                raise RuntimeError('cannot measure HAProxy\'s rate: %s' % result.get('error'))
        return statistics.median(self.haproxy_rates)

    def openloop(self, target, workload):
        """New connections at a fixed rate (bench/openloop.py): latency from each one's due time."""
        s = self.settings
        rate = int(round(self.open_base() * OPEN_RATES[workload]))
        argv = [self.args.gen_python, os.path.join(HERE, 'openloop.py'), '--port', str(self.ports[target]),
                '--rate', str(rate), '--seconds', str(s['open_seconds']), '--warmup', str(s['open_warmup']),
                '--procs', str(self.args.gen_procs), '--json']
        timeout = s['open_seconds'] + s['open_warmup'] + 60
        code, out, cpu = self.measure_run(target, argv, timeout)
        result = {'code': code, 'rate_asked': rate}
        try:
            got = json.loads(out.strip().split('\n')[-1])
        except (ValueError, IndexError):
            result['error'] = 'openloop.py %s: %s' % (code, out.strip()[-500:])
            return result
        spread = got['latency_ms']
        result.update(rate_started=got['rate_started'], rate_answered=got['rate_answered'], due=got['due'],
                      answered=got['ok'], p50_ms=spread['p50'], p99_ms=spread['p99'], p999_ms=spread['p99.9'],
                      max_ms=spread['max'], late_p99_ms=got['late_ms']['p99'], late_max_ms=got['late_ms']['max'],
                      late_over_1ms=got['late_over_1ms'], service_p99_ms=got['service_ms']['p99'],
                      service_max_ms=got['service_ms']['max'])
        if cpu is not None:
            # The warm-up's too: per connection, of all those due in the warm-up and the run.
            result['cpu_s'] = cpu
            due = rate * (s['open_seconds'] + s['open_warmup'])
            result['cpu_us_per_conn'] = cpu * 1e6 / due
            result['wakeups_per_conn'] = self.last_wakeups / float(due)
            result['system_us_per_conn'] = self.last_system * 1e6 / due
        if got['failed']:
            result['error'] = '%d of %d failed: %s' % (sum(got['failed'].values()), got['due'], ', '.join(
                '%s x%d' % kv for kv in sorted(got['failed'].items())[:5]))
        return result

    def open25(self, target):
        return self.openloop(target, 'open25')

    def open50(self, target):
        return self.openloop(target, 'open50')

    def open90(self, target):
        return self.openloop(target, 'open90')

    def keepalive(self, target):
        s = self.settings
        argv = ['wrk', '-t1', '-c50', '-d%ds' % s['wrk_seconds'], '--timeout', '10s', '--latency',
                self.url(target, 'small')]
        code, out, cpu = self.measure_run(target, argv, s['wrk_seconds'] + 30)
        result = {'code': code, 'cpu_s': cpu}
        m = re.search(r'Requests/sec:\s+([\d.]+)', out)
        if code != 0 or not m:
            result['error'] = 'wrk %s: %s' % (code, out.strip()[-500:])
            return result
        result['req_s'] = float(m.group(1))
        result['requests'] = int(re.search(r'(\d+) requests in', out).group(1))
        for pct in ('50', '99'):
            m = re.search(r'^\s+%s%%\s+([\d.]+)(us|ms|s)\s*$' % pct, out, re.M)
            if m:
                result['p%s_ms' % pct] = float(m.group(1)) * {'us': 0.001, 'ms': 1.0, 's': 1000.0}[m.group(2)]
        m = re.search(r'Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)', out)
        result['socket_errors'] = sum(int(x) for x in m.groups()) if m else 0
        m = re.search(r'Non-2xx or 3xx responses: (\d+)', out)
        result['non_2xx'] = int(m.group(1)) if m else 0
        if cpu is not None and result['requests']:
            result['cpu_us_per_req'] = result['cpu_s'] * 1e6 / result['requests']
        if result['socket_errors'] or result['non_2xx']:
            result['error'] = '%d socket errors, %d non-2xx' % (result['socket_errors'], result['non_2xx'])
        return result

    def measure_run(self, target, argv, timeout):
        """(exit code, output, balancer CPU seconds or None) of one client command; each
        worker's figures (pydirector-w) in self.last_workers."""
        box = {}

        def go():
            box['code'], box['out'] = run(argv, timeout)
            return {}
        cpu = self.measure(target, go)
        self.last_workers = cpu.get('workers')
        self.last_wakeups = cpu.get('wakeups')
        self.last_system = cpu.get('system_s')
        return box['code'], box['out'], cpu.get('cpu_s')

    def bulk(self, target):
        s = self.settings
        url = self.url(target, 'big')
        argv = ['curl', '-sS', '--max-time', str(s['bulk_timeout']), '-w', '%{http_code} %{size_download}\\n']
        for _ in range(s['bulk_repeat']):
            argv += ['-o', '/dev/null', url]
        box = {}

        def go():
            start = time.monotonic()
            clients = [subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, universal_newlines=True)
                       for _ in range(s['bulk_parallel'])]
            outs = []
            try:
                for proc in clients:
                    left = max(1.0, start + s['bulk_timeout'] + 10 - time.monotonic())
                    outs.append((proc.communicate(timeout=left)[0], proc.returncode))
            finally:
                for proc in clients:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
            box['wall'] = time.monotonic() - start
            box['outs'] = outs
            return {}
        try:
            result = self.measure(target, go)
        except subprocess.TimeoutExpired:
            return {'error': 'curl did not finish within %d s' % s['bulk_timeout']}
        total, bad = 0, []
        for out, code in box['outs']:
            for line in out.split('\n'):
                parts = line.split()
                if len(parts) == 2 and parts[1].isdigit():
                    total += int(parts[1])
                    if parts[0] != '200' or int(parts[1]) != BIG_SIZE:
                        bad.append(line)
                elif line.strip():
                    bad.append(line)
            if code != 0:
                bad.append('curl exit %s' % code)
        result['bytes'] = total
        result['wall_s'] = box['wall']
        result['mb_s'] = total / 1e6 / box['wall']
        if 'cpu_s' in result and total:
            result['cpu_s_per_gb'] = result['cpu_s'] / (total / 1e9)
        expected = BIG_SIZE * s['bulk_parallel'] * s['bulk_repeat']
        if bad or total != expected:
            result['error'] = 'downloaded %d of %d bytes; %s' % (total, expected, '; '.join(bad[:5]))
        return result

    def idle(self, target):
        """N idle connections, first (WARM_IDLE_TARGETS) through the balancer the workloads
        before ran on, then through a fresh one: RSS per connection, then check each still works.  With
        workers, the processes that hold them are the workers: their fds and RSS are summed,
        and rss_after_kib is the largest one's."""
        n = self.settings['idle']
        warm = None
        if target in WARM_IDLE_TARGETS:
            warm = self.hold_idle(self.data_pids(target), self.ports[target], n)
        self.start_balancer(target)
        time.sleep(0.5)  # let a fresh process settle (not synchronisation: RSS drift)
        result = self.hold_idle(self.data_pids(target), self.ports[target], n)
        if warm is not None:
            result['rss_warm_kib'] = warm['rss_before_kib']
            result['rss_warm_idle_kib'] = warm.get('rss_after_kib')
            result['warm_held'] = warm.get('held', 0)
            if 'error' not in result and 'error' in warm:
                result['error'] = 'warm: ' + warm['error']
        return result

    def hold_idle(self, pids, port, n):
        """Open n idle connections through the balancer (pids: the processes that carry
        them), read their RSS, then check each still works."""
        def fds():
            return sum(fd_count(p) for p in pids)
        base_fds, rss_before = fds(), sum(rss_kib(p) for p in pids)
        cpu_before = sum(cpu_seconds(p) for p in pids)
        socks = []
        result = {'rss_before_kib': rss_before}
        deadline = time.monotonic() + self.settings['idle_timeout']
        try:
            while len(socks) < n and time.monotonic() < deadline:
                # Batches under the listen backlog: a full accept queue drops SYNs (1 s retries).
                for _ in range(min(500, n - len(socks))):
                    try:
                        socks.append(socket.create_connection(('127.0.0.1', port), timeout=10))
                    except OSError as e:
                        result['connect_error'] = str(e)
                        break
                if 'connect_error' in result:
                    break
                while fds() < base_fds + 2 * len(socks) and time.monotonic() < deadline:
                    time.sleep(0.02)
            # Every client accepted and its backend connected (2 fds each), or the deadline passed.
            while fds() < base_fds + 2 * len(socks) and time.monotonic() < deadline:
                time.sleep(0.05)
            result['opened'] = len(socks)
            result['balancer_pairs'] = (fds() - base_fds) // 2
            time.sleep(0.5)
            each = [rss_kib(p) for p in pids]
            result['rss_after_kib'] = max(each)
            if len(pids) > 1:
                result['worker_rss_kib'] = each
                result['worker_pairs'] = [(fd_count(p) - 8) // 2 for p in pids]   # roughly: its idle fds aside
            result['kib_per_conn'] = (sum(each) - rss_before) / max(1, len(socks))
            result['held'] = self.answer_all(socks, deadline)
            result['cpu_s'] = sum(cpu_seconds(p) for p in pids) - cpu_before
        finally:
            for s in socks:
                s.close()
        wait_end = time.monotonic() + 20
        while fds() > base_fds + 4 * len(pids) and time.monotonic() < wait_end:
            time.sleep(0.05)
        if result.get('held', 0) < n:
            result['error'] = 'held %d of %d (opened %d, balancer saw %d)%s' % (
                result.get('held', 0), n, result.get('opened', 0), result.get('balancer_pairs', 0),
                '; connect: ' + result['connect_error'] if 'connect_error' in result else '')
        return result

    def answer_all(self, socks, deadline):
        """Send a GET on every idle connection; count the complete 200 answers."""
        request = b'GET /small HTTP/1.0\r\nHost: bench\r\n\r\n'
        sel = selectors.DefaultSelector()
        replies = {}
        for s in socks:
            try:
                s.sendall(request)
            except OSError:
                continue
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
            replies[s] = []
        good = 0
        deadline = max(deadline, time.monotonic() + 30)
        while replies and time.monotonic() < deadline:
            for key, _ in sel.select(1.0):
                s = key.fileobj
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b''
                    replies[s] = [b'reset']
                if data:
                    replies[s].append(data)
                    continue
                reply = b''.join(replies.pop(s))
                sel.unregister(s)
                if reply.startswith(b'HTTP/1.1 200') and reply.endswith(b'x' * 20 + b'\n'):
                    good += 1
        sel.close()
        return good

    # ---- the run

    def main_loop(self):
        workloads = self.workloads
        targets = self.targets
        self.warm_up()
        for round_no in range(1, self.args.rounds + 1):
            for workload in workloads:
                for target in targets:
                    if workload == 'idle' and target == 'direct':
                        continue
                    if workload in OPEN_RATES and not open_target(target):
                        continue
                    started = time.monotonic()
                    try:
                        result = getattr(self, workload)(target)
                    except (OSError, RuntimeError, ValueError, AttributeError, KeyError) as e:
                        result = {'error': '%s: %s' % (type(e).__name__, e)}
                    result.update(round=round_no, target=target, workload=workload,
                                  seconds=round(time.monotonic() - started, 2))
                    self.runs.append(result)
                    log('round %d %-9s %-10s %s' % (round_no, workload, target, brief(result)))

    def warm_up(self):
        for target in self.targets:
            # PyPy's JIT compiles the hot paths over its first thousands of connections.
            pypy = target == 'pydirector-pypy'
            run(['ab', '-q', '-c', '10', '-n', '5000' if pypy else '500', self.url(target, 'small')], 60)
            run(['wrk', '-t1', '-c10', '-d3s' if pypy else '-d1s', self.url(target, 'small')], 30)

    def collect_versions(self, info):
        for name, argv in (('nginx', ['nginx', '-v']), ('haproxy', ['haproxy', '-v']), ('ab', ['ab', '-V']),
                           ('wrk', ['wrk', '-v']), ('curl', ['curl', '--version'])):
            code, out = run(argv, 20)
            info[name] = out.strip().split('\n')[0] if out else '?'


def kernel_and_wakeups(result):
    """' (kernel N), N wakeups/conn' after a CPU per connection, when the run measured them."""
    if 'wakeups_per_conn' not in result:
        return ''
    return ' (kernel %s), %s wakeups/conn' % (num(result['system_us_per_conn']), num(result['wakeups_per_conn']))


def brief(result):
    if 'rate_asked' in result and 'p99_ms' in result:
        text = '%s/s asked, %s answered/s; p50 %s, p99 %s, p99.9 %s, max %s ms; generator late p99 %s ms' % (
            num(result['rate_asked']), num(result['rate_answered']), num(result['p50_ms']), num(result['p99_ms']),
            num(result['p999_ms']), num(result['max_ms']), num(result['late_p99_ms']))
        if 'cpu_us_per_conn' in result:
            text += '; CPU %s µs/conn%s' % (num(result['cpu_us_per_conn']), kernel_and_wakeups(result))
    elif 'req_s' in result:
        text = '%s req/s, p50 %s ms, p99 %s ms' % (num(result['req_s']), num(result.get('p50_ms')),
                                                     num(result.get('p99_ms')))
        cpu = result.get('cpu_us_per_conn', result.get('cpu_us_per_req'))
        if cpu is not None:
            text += ', CPU %s µs/%s' % (num(cpu), 'conn' if 'cpu_us_per_conn' in result else 'req')
        text += kernel_and_wakeups(result)
    elif 'mb_s' in result:
        text = '%s MB/s' % num(result['mb_s'])
        if 'cpu_s_per_gb' in result:
            text += ', CPU %s s/GB' % num(result['cpu_s_per_gb'])
    elif 'kib_per_conn' in result:
        text = '%s KiB/conn (RSS %d -> %d KiB), held %d' % (
            num(result['kib_per_conn']), result['rss_before_kib'], result['rss_after_kib'], result['held'])
    else:
        text = ''
    if 'error' in result:
        text += '  ERROR: ' + result['error']
    return text


def num(x):
    """Three significant figures, thousands separated."""
    if x is None:
        return '-'
    if abs(x) >= 100:
        return '{:,.0f}'.format(x)
    if abs(x) >= 10:
        return '{:.1f}'.format(x)
    if abs(x) >= 1:
        return '{:.2f}'.format(x)
    return '{:.3f}'.format(x)


# --------------------------------------------------------------------------------------------
# Summary: medians, spreads, ratios, goals

def summarise(runs, targets):
    """{workload: {metric: {target: {'median', 'min', 'max', 'n'}}}} over the rounds."""
    table = {}
    for workload, metric, _, _, _ in METRICS:
        for target in targets:
            values = [r[metric] for r in runs if r['workload'] == workload and r['target'] == target
                      and r.get(metric) is not None]
            if values:
                table.setdefault(workload, {}).setdefault(metric, {})[target] = {
                    'median': statistics.median(values), 'min': min(values), 'max': max(values), 'n': len(values)}
    return table


def ratio(table, workload, metric, a, b):
    cells = table.get(workload, {}).get(metric, {})
    if a in cells and b in cells and cells[b]['median']:
        return cells[a]['median'] / cells[b]['median']
    return None


# A goal's kind 'PREFIX:KIND' is KIND for another target than 'pydirector'.
GOAL_TARGETS = {'workers': 'pydirector-w', 'pypy': 'pydirector-pypy'}


def goal_status(table, goal, idle_n, target='pydirector'):
    workload, metric, kind, op, value = goal
    if ':' in kind:
        prefix, kind = kind.split(':', 1)
        target = GOAL_TARGETS[prefix]
        if kind == 'pydirector':
            got = ratio(table, workload, metric, target, 'pydirector')
            kind = None
    if kind is None:
        pass
    elif kind == 'pyfloor-log':
        got = ratio(table, workload, metric, 'pydirector-log', 'pyfloor')
    elif kind in ('haproxy', 'pyfloor'):
        got = ratio(table, workload, metric, target, kind)
    else:
        cell = table.get(workload, {}).get(metric, {}).get(target)
        # Connections held: the worst round counts.
        got = None if cell is None else (cell['min'] if metric == 'held' else cell['median'])
        if metric == 'held' and idle_n < value:
            return got, 'n/a (ran %d)' % idle_n
    if got is None:
        return None, 'n/a'
    met = got >= value if op == '>=' else got <= value
    return got, 'met' if met else 'missed'


def goal_text(goal):
    workload, metric, kind, op, value = goal
    sign = '≥' if op == '>=' else '≤'
    if kind.startswith('pypy:'):
        return 'PyPy %s %g× CPython' % (sign, value)
    if kind.startswith('workers:'):
        other = kind.split(':', 1)[1]
        if other == 'haproxy':
            return '%d workers %s %g× HAProxy (nbthread 1)' % (WORKERS, sign, value)
        if other == 'pydirector':
            return '%d workers %s %g× one process' % (WORKERS, sign, value)
        unit = [m[3] for m in METRICS if m[0] == workload and m[1] == metric][0]
        return '%d workers %s %s %s' % (WORKERS, sign, num(value) if value >= 100 else '%g' % value, unit)
    if kind == 'pyfloor-log':
        return '%s %g× pyfloor (access log on)' % (sign, value)
    if kind in ('haproxy', 'pyfloor'):
        return '%s %g× %s' % (sign, value, LABELS[kind])
    unit = [m[3] for m in METRICS if m[0] == workload and m[1] == metric][0]
    return '%s %s %s' % (sign, num(value) if value >= 100 else '%g' % value, unit)


def markdown(data):
    table = data['summary']
    targets = data['meta']['targets']
    idle_n = data['settings']['idle']
    goals = {}
    for g in GOALS:
        goals.setdefault((g[0], g[1]), []).append(g)
    head = ['metric'] + [LABELS[t] for t in targets]
    if 'pydirector' in targets and 'direct' in targets:
        head.append('pyd / direct')
    if 'pydirector' in targets and 'haproxy' in targets:
        head += ['HAProxy / direct', 'pyd / HAProxy']
    if 'pyfloor' in targets:
        head += ['pyd / pyfloor', 'pyd log / pyfloor']
    if 'pydirector-w' in targets:
        head += ['workers / HAProxy', 'workers / pyd']
    if 'pydirector-pypy' in targets:
        head += ['PyPy / HAProxy', 'PyPy / pyd']
    head += ['target', 'met?']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for workload, metric, label, unit, _ in METRICS:
        if workload not in table or workload in OPEN_RATES:     # those: openloop_markdown()
            continue
        cells = table[workload].get(metric, {})
        row = ['%s (%s)' % (label, unit)]
        for target in targets:
            c = cells.get(target)
            if c is None:
                row.append('-')
            elif num(c['min']) == num(c['max']):
                row.append(num(c['median']))
            else:
                row.append('%s (%s..%s)' % (num(c['median']), num(c['min']), num(c['max'])))
        if 'pydirector' in targets and 'direct' in targets:
            row.append(ratio_text(ratio(table, workload, metric, 'pydirector', 'direct')))
        if 'pydirector' in targets and 'haproxy' in targets:
            row.append(ratio_text(ratio(table, workload, metric, 'haproxy', 'direct')))
            row.append(ratio_text(ratio(table, workload, metric, 'pydirector', 'haproxy')))
        if 'pyfloor' in targets:
            row.append(ratio_text(ratio(table, workload, metric, 'pydirector', 'pyfloor')))
            row.append(ratio_text(ratio(table, workload, metric, 'pydirector-log', 'pyfloor')))
        if 'pydirector-w' in targets:
            row.append(ratio_text(ratio(table, workload, metric, 'pydirector-w', 'haproxy')))
            row.append(ratio_text(ratio(table, workload, metric, 'pydirector-w', 'pydirector')))
        if 'pydirector-pypy' in targets:
            row.append(ratio_text(ratio(table, workload, metric, 'pydirector-pypy', 'haproxy')))
            row.append(ratio_text(ratio(table, workload, metric, 'pydirector-pypy', 'pydirector')))
        found = goals.get((workload, metric), [])
        row += ['; '.join(goal_text(g) for g in found), '; '.join(goal_status(table, g, idle_n)[1] for g in found)]
        lines.append('| ' + ' | '.join(row) + ' |')
    return '\n'.join(lines)


def openloop_markdown(data):
    """The open-loop workloads, one row per rate and target: medians over the rounds (of
    each round's percentile), the ratios to HAProxy, and the issue 33 targets."""
    table = data['summary']
    targets = [t for t in data['meta']['targets'] if open_target(t)]
    head = ['rate', 'target', 'asked /s', 'answered /s', 'p50 ms', 'p99 ms', 'p99.9 ms', 'max ms',
            'p99 / HAProxy', 'max / HAProxy', 'generator late p99 ms', 'met?']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    runs = data['runs']
    for workload in sorted(OPEN_RATES):
        if workload not in table:
            continue
        cells = table[workload]
        for target in targets:
            if target not in cells.get('p99_ms', {}):
                continue
            asked = [r['rate_asked'] for r in runs if r['workload'] == workload and r['target'] == target
                     and 'rate_asked' in r]
            row = ['%d%%' % (OPEN_RATES[workload] * 100), LABELS[target],
                   num(statistics.median(asked)) if asked else '-']
            for metric in ('rate_answered', 'p50_ms', 'p99_ms', 'p999_ms', 'max_ms'):
                c = cells.get(metric, {}).get(target)
                row.append('-' if c is None else num(c['median']) if num(c['min']) == num(c['max']) else
                           '%s (%s..%s)' % (num(c['median']), num(c['min']), num(c['max'])))
            for metric in ('p99_ms', 'max_ms'):
                row.append(ratio_text(ratio(table, workload, metric, target, 'haproxy')) if target != 'haproxy'
                           else '')
            c = cells.get('late_p99_ms', {}).get(target)
            row.append('-' if c is None else num(c['median']))
            goals = [g for g in GOALS if g[0] == workload and g[2] == 'haproxy']
            row.append('; '.join(goal_status(table, g, 0, target)[1] for g in goals)
                       if target.startswith('pydirector') else '')
            lines.append('| ' + ' | '.join(row) + ' |')
    return '\n'.join(lines)


def ratio_text(r):
    return '-' if r is None else '%.2f×' % r


def report_text(data):
    meta = data['meta']
    settings = data['settings']
    parts = [markdown(data), '',
             'Medians of %d round(s), (min..max) across rounds; ratios are of medians.  '
             'Balancer CPU from /proc/PID/stat (utime+stime), RSS from VmRSS of a freshly started balancer '
             'before/after %d idle connections (warm: of the balancer the workloads before ran on, before it '
             'is restarted).' % (settings['rounds'], settings['idle'])]
    if any(w in data['summary'] for w in OPEN_RATES):
        parts += ['', openloop_markdown(data), '',
                  'Open loop (bench/openloop.py, %d process(es) on %s): new connections at a fixed rate, a '
                  'fraction of HAProxy\'s ab -c 50 rate in this run, %g s counted after %g s of warm-up; '
                  'latency from each connection\'s due time to the end of its answer (met?: p99 ≤ 1.2× and max '
                  '≤ 1.5× HAProxy\'s at 25%% and 50%%).' % (
                      meta.get('gen_procs', 0), meta.get('gen_python', '?'), settings.get('open_seconds', 0),
                      settings.get('open_warmup', 0))]
    errors = [r for r in data['runs'] if 'error' in r]
    if errors:
        parts.append('')
        parts.append('Errors (%d run(s)):' % len(errors))
        for r in errors[:20]:
            parts.append('- round %d %s %s: %s' % (r['round'], r['workload'], r['target'], r['error']))
    for note in meta.get('notes', []):
        parts.append('')
        parts.append('Note: ' + note)
    return '\n'.join(parts)


# --------------------------------------------------------------------------------------------
# Outputs

def machine_text(meta):
    return '%d cores (%s), %s' % (meta['cores'], meta['cpu'], meta['kernel'])


def write_results_md(data, note):
    """Rewrite bench/RESULTS.md: this run on top, everything that was there under 'Earlier figures'."""
    meta = data['meta']
    old = ''
    if os.path.exists(RESULTS_MD):
        with open(RESULTS_MD) as f:
            old = f.read()
    body = []
    for line in old.split('\n'):
        if line.startswith('# ') or line.strip() == '## Earlier figures':
            continue
        body.append('#' + line if line.startswith('## ') else line)
    old_body = '\n'.join(body).strip()
    settings = data['settings']
    new = ['# Benchmark results', '',
           '## %s: pydirector vs HAProxy vs direct, Python %s, %d cores%s' % (
               meta['date'][:10], meta['pydirector_python'], meta['cores'], ' (noisy)' if 'noisy' in note.lower() else ''),
           '',
           '`%s`' % meta['command'],
           '',
           '- machine: %s' % machine_text(meta),
           '- pydirector %s under Python %s (%s); %s; %s' % (
               meta.get('pydirector_commit', '?'), meta['pydirector_python'], meta['python_path'],
               meta['haproxy'], meta['nginx']),
           '- %d rounds interleaved; ab -c 50 -n %d; wrk -t1 -c50 -d%ds; bulk %d parallel curl × %d × 64 MiB; '
           '%d idle connections' % (settings['rounds'], settings['ab_n'], settings['wrk_seconds'],
                                    settings['bulk_parallel'], settings['bulk_repeat'], settings['idle'])]
    if meta.get('pypy'):
        new.append('- pydirector on PyPy: %s (%s)' % (meta['pypy'], meta.get('pypy_version', '?')))
    if note:
        new.append('- note: %s' % note)
    new += ['', report_text(data), '']
    if old_body:
        new += ['## Earlier figures', '', old_body, '']
    with open(RESULTS_MD, 'w') as f:
        f.write('\n'.join(new))
    log('wrote %s' % RESULTS_MD)


def plot(json_path, png_path):
    """matplotlib in a venv of our own; skip with a message when it cannot be had."""
    venv = os.path.join(HERE, '.venv')
    python = os.path.join(venv, 'bin', 'python')
    if not os.path.exists(python):
        log('creating %s for matplotlib (plot only)' % venv)
        code, out = run([sys.executable, '-m', 'venv', venv], 120)
        if code != 0:
            log('no plot: cannot create a venv (%s): %s' % (code, out.strip()[-300:]))
            return
    code, _ = run([python, '-c', 'import matplotlib'], 60)
    if code != 0:
        code, out = run([python, '-m', 'pip', 'install', '-q', 'matplotlib'], 600)
        if code != 0:
            log('no plot: pip install matplotlib failed (%s): %s' % (code, out.strip()[-300:]))
            return
    code, out = run([python, os.path.join(HERE, 'plot.py'), json_path, png_path], 120)
    if code != 0:
        log('no plot: plot.py failed (%s): %s' % (code, out.strip()[-500:]))
    else:
        log('wrote %s' % png_path)


def finish(data, args):
    for target in data['meta']['targets']:
        if target.startswith('tree-'):      # --tree's, from a results.json too
            LABELS.setdefault(target, 'pydirector ' + target[len('tree-'):])
    os.makedirs(OUT, exist_ok=True)
    json_path = os.path.join(OUT, 'results.json')
    if not args.from_json:
        with open(json_path, 'w') as f:
            json.dump(data, f, indent=1, sort_keys=True)
    text = report_text(data)
    with open(os.path.join(OUT, 'results.md'), 'w') as f:
        f.write(text + '\n')
    log('')
    log(text)
    log('')
    if 'haproxy' in data['meta']['targets'] and 'pydirector' in data['meta']['targets']:
        for goal in [g for g in GOALS if g[0] in data['summary']]:
            got, status = goal_status(data['summary'], goal, data['settings']['idle'])
            label = [m[2] for m in METRICS if m[0] == goal[0] and m[1] == goal[1]][0]
            relative = goal[2].split(':')[-1] in ('haproxy', 'pyfloor', 'pyfloor-log', 'pydirector')
            log('%-7s %s: %s (target %s)' % (status.split()[0], label,
                                            '-' if got is None else (ratio_text(got) if relative else num(got)),
                                            goal_text(goal)))
    log('wrote %s and %s' % (json_path, os.path.join(OUT, 'results.md')))
    if args.write_results:
        write_results_md(data, args.note)
    if not args.no_plot:
        plot(json_path if not args.from_json else args.from_json, os.path.join(OUT, 'ratios.png'))


# --------------------------------------------------------------------------------------------
# Command line

def parse_args(argv):
    p = argparse.ArgumentParser(description='Benchmark pydirector against HAProxy and direct nginx on loopback.')
    p.add_argument('--python', default='python3', help='the Python that runs pydirector (default python3)')
    p.add_argument('--rounds', type=int, default=3, help='interleaved rounds (default 3)')
    p.add_argument('--quick', action='store_true', help='small counts: a smoke run in about a minute')
    p.add_argument('--only', help='comma-separated workloads: ' + ','.join(WORKLOADS))
    p.add_argument('--pydirector-only', action='store_true', help='no direct or HAProxy runs (no ratios)')
    p.add_argument('--pyfloor', metavar='PATH',
                   help='a featureless relay (pyfloor.py LISTEN BACKEND...) run beside the balancers as the '
                        'CPU floor of this Python; its row is left out without it')
    p.add_argument('--idle', type=int, help='idle connections to open (default 9000; --quick 1000)')
    p.add_argument('--pypy', metavar='PATH',
                   help='a second interpreter (e.g. pypy3) for one more target, pydirector on it (access log off)')
    # On CPython the generator takes about a third of a 2-core machine at 50% of HAProxy's
    # rate, and the balancer it measures saturates for want of CPU (RESULTS.md, 12-07).
    p.add_argument('--gen-python', metavar='PATH', default=shutil.which('pypy3') or sys.executable,
                   help='the Python that runs bench/openloop.py, the open-loop generator (default: pypy3 '
                        'if there is one, else this one)')
    p.add_argument('--gen-procs', type=int, default=2, help='open-loop generator processes (default 2)')
    p.add_argument('--open-base', type=float, metavar='RATE',
                   help='new connections/s the open-loop fractions are of (default: HAProxy\'s ab -c 50 rate '
                        'in this run)')
    p.add_argument('--workers', type=int, default=2,
                   help='worker processes of the pydirector-w target and threads of haproxy-nt (default 2; '
                        '0 leaves both out)')
    p.add_argument('--tree', action='append', default=[], metavar='NAME=DIR',
                   help='another pydirector tree (a DIR holding pydirector.py) run beside this one, access log '
                        'off, as target "pydirector NAME" (repeatable)')
    p.add_argument('--write-results', action='store_true', help='rewrite bench/RESULTS.md with this run on top')
    p.add_argument('--note', default='', help='a note for RESULTS.md, e.g. "noisy: tests running"')
    p.add_argument('--from-json', metavar='PATH', help='run nothing: report (and --write-results) from a results.json')
    p.add_argument('--no-plot', action='store_true', help='skip the PNG')
    args = p.parse_args(argv)
    if args.only:
        bad = [w for w in args.only.split(',') if w not in WORKLOADS]
        if bad:
            p.error('unknown workload(s) %s; choose from %s' % (','.join(bad), ','.join(WORKLOADS)))
    if args.rounds < 1:
        p.error('--rounds must be at least 1')
    args.trees = [spec.partition('=')[::2] for spec in args.tree]
    for spec, (name, tree) in zip(args.tree, args.trees):
        if not name or not re.match(r'^[\w.-]+$', name) or not os.path.isfile(os.path.join(tree, 'pydirector.py')):
            p.error('--tree wants NAME=DIR, NAME letters, digits . - _ and DIR holding pydirector.py: %r' % spec)
    if len(set(name for name, _ in args.trees)) < len(args.trees):
        p.error('--tree: each NAME once')
    return args


def settings_for(args):
    if args.quick:
        s = dict(ab_n=3000, ab_timeout=60, wrk_seconds=1, bulk_parallel=4, bulk_repeat=1, bulk_timeout=60,
                 idle=1000, idle_timeout=60, open_seconds=2, open_warmup=1)
    else:
        s = dict(ab_n=30000, ab_timeout=180, wrk_seconds=5, bulk_parallel=4, bulk_repeat=4, bulk_timeout=180,
                 idle=9000, idle_timeout=120, open_seconds=5, open_warmup=1)
    if args.idle is not None:
        s['idle'] = args.idle
    s['rounds'] = args.rounds
    return s


def python_version(python):
    code, out = run([python, '-c', 'import sys; print(sys.version.split()[0]); print(sys.executable)'], 30)
    if code != 0:
        sys.exit('bench: cannot run %s: %s' % (python, out))
    version, path = out.split()[:2]
    return version, path


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    set_workers(args.workers)
    if args.from_json:
        with open(args.from_json) as f:
            data = json.load(f)
        finish(data, args)
        return 0
    signal.signal(signal.SIGTERM, on_sigterm)
    # A shell starts background jobs with SIGINT ignored; Ctrl-C must still stop us cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))
    ensure_tools()
    version, path = python_version(args.python)
    bench = Bench(args)
    bench.settings = settings_for(args)
    bench.workloads = [w for w in WORKLOADS if not args.only or w in args.only.split(',')]
    cpu_model = '?'
    with open('/proc/cpuinfo') as f:
        for line in f:
            if line.startswith('model name'):
                cpu_model = line.split(':', 1)[1].strip()
                break
    # The last commit that changed the balancer itself, not the bench.
    code, commit = run(['git', '-C', REPO, 'log', '-1', '--format=%h', '--', 'pydirector.py', 'schedulers.py'], 10)
    if code == 0:
        dirty = run(['git', '-C', REPO, 'status', '--porcelain', '--', 'pydirector.py', 'schedulers.py'], 10)[1]
        commit = commit.strip() + ('+dirty' if dirty.strip() else '')
    meta = {
        'date': datetime.datetime.now().isoformat(timespec='seconds'),
        'command': 'python3 bench/bench.py' + ''.join(' ' + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        'cores': os.cpu_count(), 'cpu': cpu_model, 'kernel': platform.platform(),
        'pydirector_python': version, 'python_path': path, 'harness_python': platform.python_version(),
        'pydirector_commit': commit.strip() if code == 0 else '?',
        'targets': bench.targets, 'workloads': bench.workloads,
        'balancer_nofile': bench.nofile, 'maxconn': MAXCONN,
        'gen_python': args.gen_python, 'gen_procs': args.gen_procs, 'pypy': args.pypy,
    }
    bench.collect_versions(meta)
    if args.pypy:
        code, out = run([args.pypy, '-c', 'import sys; print(sys.version.replace(chr(10), " "))'], 30)
        if code != 0:
            sys.exit('bench: cannot run %s: %s' % (args.pypy, out))
        meta['pypy_version'] = out.strip()
    log('pydirector on Python %s (%s); %s; %s; %s' % (version, path, meta['haproxy'], meta['nginx'], machine_text(meta)))
    log('work dir %s (removed at the end)' % bench.work)
    try:
        bench.setup()
        meta['pydirector_features'] = bench.pydirector_features
        bench.main_loop()
    except (KeyboardInterrupt, Stop):
        log('interrupted: stopping everything')
        return 130
    except RuntimeError as e:
        log('bench: %s' % e)
        return 2
    finally:
        bench.procs.stop_all()
        text = bench.tail('pydirector.log', 1000000)
        shutil.rmtree(bench.work, ignore_errors=True)
    meta['pydirector_log_errors'] = [l for l in text.split('\n') if ' ERROR ' in l or 'Traceback' in l][:20]
    meta['pydirector_log_warnings'] = len([l for l in text.split('\n') if ' WARNING ' in l])
    if meta['pydirector_log_errors']:
        bench.notes.append('pydirector logged errors: ' + ' | '.join(meta['pydirector_log_errors'][:3]))
    meta['notes'] = bench.notes
    data = {'meta': meta, 'settings': bench.settings, 'runs': bench.runs,
            'summary': summarise(bench.runs, bench.targets)}
    finish(data, args)
    return 1 if any('error' in r for r in bench.runs) else 0


if __name__ == '__main__':
    sys.exit(main())
