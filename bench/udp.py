#!/usr/bin/env python3
"""UDP benchmark (issue 31): DNS through pydirector beside nginx stream, with dnsperf.

    python3 bench/udp.py                       3 rounds, 3,000 queries/s for 10 s, 10,000 idle sessions
    python3 bench/udp.py --quick               1 round, 3 s, 2,000 idle sessions
    python3 bench/udp.py --python /root/.pyenv/versions/3.6.15/bin/python3.6 --rounds 5

Two dnsmasq (--no-resolv, each answering svc.test with its own address) are
the backends.  Three targets answer the same queries, interleaved round by
round:

- direct: one dnsmasq itself, no balancer;
- nginx: `stream { listen ... udp; proxy_pass; proxy_responses 1; }` over both,
  1 worker (libnginx-mod-stream);
- pydirector: <service protocol="udp"> over both, roundrobin, <udp responses="1">,
  access log off;
- pyfloor: the least a Python relay can do (FLOOR, 25 lines: epoll, a socket
  connected per client datagram, the reply sent back, the socket closed): what
  pydirector costs beyond it is its own; what the floor costs beyond nginx is
  Python's.

Each run is `dnsperf -c 4 -q 50 -l SECONDS -Q RATE` (4 client sockets, at most
50 queries out), at a fixed rate both balancers sustain, so that CPU per query
compares like with like; then one unthrottled run each (`max` rows: the rate
each reaches on this machine, dnsperf sharing its 2 cores).  CPU is utime+stime
of the answering process from /proc/PID/stat around the run (the balancer's,
or dnsmasq's for direct), divided by the queries dnsperf completed.

Idle sessions: a fresh balancer without a response count (<udp sessions="20000">,
<timeouts idle="600">; nginx: no proxy_responses, proxy_timeout 600s) gets one
query from each of N client sockets, each answered; its VmRSS growth over N is
the memory per idle session, and a second query from each socket must come back
through the session it holds (one fd each: the fd count says the sessions are held).

Needs dnsmasq, dnsperf, nginx with its stream module (apt: dnsmasq-base dnsperf
nginx-light libnginx-mod-stream); installs nothing.  Everything runs in a
temporary directory, and every process started here is stopped at the end, by
its own id.  Stdlib only; not run by the tests.
"""

import argparse
import os
import re
import resource
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
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

import pydirector  # noqa: E402  (its dns_query, for the idle clients)
from bench import fd_count, rss_kib  # noqa: E402

NGINX_MODULES = ('/usr/lib/nginx/modules/ngx_stream_module.so', '/usr/share/nginx/modules/ngx_stream_module.so')
TARGETS = ('direct', 'nginx', 'pydirector', 'pyfloor')

FLOOR = """
import itertools, select, socket, sys
port, backends = int(sys.argv[1]), itertools.cycle(int(p) for p in sys.argv[2:])
listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
listener.bind(('127.0.0.1', port))
listener.setblocking(False)
poller = select.epoll()
poller.register(listener.fileno(), select.EPOLLIN)
buffer = bytearray(65535)
view = memoryview(buffer)
upstream = {}
while True:
    for fd, events in poller.poll():
        if fd == listener.fileno():
            size, client = listener.recvfrom_into(buffer)
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
            sock.connect(('127.0.0.1', next(backends)))
            sock.send(view[:size])
            upstream[sock.fileno()] = (sock, client)
            poller.register(sock.fileno(), select.EPOLLIN)
        else:
            sock, client = upstream.pop(fd)
            size = sock.recv_into(buffer)
            listener.sendto(view[:size], client)
            sock.close()
"""


def log(text):
    print(text, flush=True)


def free_port():
    """A port free for both TCP and UDP on 127.0.0.1 (dnsmasq takes both)."""
    while True:
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            port = s.getsockname()[1]
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.bind(('127.0.0.1', port))
            return port
        except OSError:
            continue


def cpu_seconds(pid):
    """(user, system) CPU seconds of the process."""
    with open('/proc/%d/stat' % pid) as f:
        fields = f.read().rsplit(')', 1)[1].split()
    tick = float(os.sysconf('SC_CLK_TCK'))
    return int(fields[11]) / tick, int(fields[12]) / tick


class Stop(Exception):
    """SIGTERM: unwind like Ctrl-C so the finally blocks stop what we started."""


def on_sigterm(signum, frame):
    raise Stop('SIGTERM')


def more_fds():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Processes(object):
    """What we start, each in its own session, stopped by its own id."""

    def __init__(self, work):
        self.work = work
        self.running = {}

    def start(self, name, argv):
        out = open(os.path.join(self.work, name + '.out'), 'ab')
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                cwd=self.work, start_new_session=True, preexec_fn=more_fds)
        out.close()
        self.running[name] = proc
        return proc

    def stop(self, name):
        proc = self.running.pop(name, None)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def stop_all(self):
        for name in list(self.running):
            self.stop(name)

    def output(self, name):
        try:
            with open(os.path.join(self.work, name + '.out'), 'rb') as f:
                return f.read().decode('utf-8', 'replace')[-2000:]
        except OSError:
            return ''


def answers(port, timeout=10.0):
    """Wait until a DNS query to 127.0.0.1:port is answered; the answer's address."""
    query = pydirector.dns_query(7, pydirector.dns_name('svc.test'), pydirector.DNS_A, edns=False)
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        while time.monotonic() < deadline:
            sock.sendto(query, ('127.0.0.1', port))
            try:
                data = sock.recv(512)
                return '.'.join(str(b) for b in data[-4:])
            except socket.timeout:
                continue
    raise RuntimeError('nothing answers DNS on port %d' % port)


class UdpBench(object):

    def __init__(self, args, work):
        self.args = args
        self.work = work
        self.procs = Processes(work)
        self.queries = os.path.join(work, 'queries.txt')
        with open(self.queries, 'w') as f:
            f.write('svc.test A\n')
        self.dns_ports = [free_port(), free_port()]
        self.module = next((path for path in NGINX_MODULES if os.path.exists(path)), None)

    # -- the servers ---------------------------------------------------------

    def start_dnsmasq(self):
        for index, port in enumerate(self.dns_ports):
            self.procs.start('dnsmasq%d' % index, [
                shutil.which('dnsmasq', path=os.environ.get('PATH', '') + ':/usr/sbin:/sbin'),
                '--keep-in-foreground', '--conf-file=/dev/null', '--no-resolv', '--no-hosts', '--port', str(port),
                '--listen-address', '127.0.0.1', '--bind-interfaces', '--pid-file=',
                '--address=/svc.test/127.0.0.%d' % (index + 1)])
        for index, port in enumerate(self.dns_ports):
            answers(port)

    def start_nginx(self, idle=False):
        port = free_port()
        upstream = ''.join('server 127.0.0.1:%d; ' % p for p in self.dns_ports)
        session = 'proxy_timeout 600s;' if idle else 'proxy_responses 1; proxy_timeout 10s;'
        conf = os.path.join(self.work, 'nginx.conf')
        with open(conf, 'w') as f:
            f.write('load_module %s;\nworker_processes 1;\ndaemon off;\nmaster_process off;\n'
                    'error_log %s/nginx.err;\npid %s/nginx.pid;\nworker_rlimit_nofile 40000;\n'
                    'events { worker_connections 30000; }\n'
                    'stream { upstream dns { %s} server { listen 127.0.0.1:%d udp; proxy_pass dns; %s } }\n'
                    % (self.module, self.work, self.work, upstream, port, session))
        proc = self.procs.start('nginx', ['nginx', '-c', conf, '-p', self.work])
        answers(port)
        return proc, port

    def start_pydirector(self, idle=False):
        port = free_port()
        hosts = ''.join('      <host name="d%d" ip="127.0.0.1:%d"/>\n' % (i, p) for i, p in enumerate(self.dns_ports))
        session = ('    <udp sessions="20000"/>\n    <timeouts idle="600"/>\n' if idle else
                   '    <udp responses="1"/>\n')
        conf = os.path.join(self.work, 'pydirector.xml')
        with open(conf, 'w') as f:
            f.write('<pdconfig>\n  <service name="dns" protocol="udp">\n    <listen ip="127.0.0.1:%d"/>\n'
                    '    <group name="main" scheduler="roundrobin">\n%s    </group>\n%s  </service>\n'
                    '  <logging access="off"/>\n</pdconfig>\n' % (port, hosts, session))
        proc = self.procs.start('pydirector', [self.args.python, os.path.join(REPO, 'pydirector.py'), '-c', conf])
        answers(port)
        return proc, port

    def start_floor(self):
        port = free_port()
        path = os.path.join(self.work, 'pyfloor.py')
        with open(path, 'w') as f:
            f.write(FLOOR)
        proc = self.procs.start('pyfloor', [self.args.python, path, str(port)] + [str(p) for p in self.dns_ports])
        answers(port)
        return proc, port

    def start_target(self, target, idle=False):
        if target == 'direct':
            return self.procs.running['dnsmasq0'], self.dns_ports[0]
        if target == 'nginx':
            return self.start_nginx(idle)
        if target == 'pyfloor':
            return self.start_floor()
        return self.start_pydirector(idle)

    def stop_target(self, target):
        if target != 'direct':
            self.procs.stop(target)

    # -- runs ----------------------------------------------------------------

    def dnsperf(self, port, seconds, rate):
        argv = ['dnsperf', '-s', '127.0.0.1', '-p', str(port), '-d', self.queries, '-l', str(seconds),
                '-c', '4', '-q', '50']
        if rate:
            argv += ['-Q', str(rate)]
        out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=seconds + 60)
        text = out.stdout.decode('utf-8', 'replace')

        def field(name):
            match = re.search(r'%s:\s+([0-9.]+)' % name, text)
            if match is None:
                raise RuntimeError('dnsperf said no %s:\n%s' % (name, text[-1500:]))
            return float(match.group(1))
        return {'completed': int(field('Queries completed')), 'lost': int(field('Queries lost')),
                'qps': field('Queries per second'), 'latency_ms': field('Average Latency \\(s\\)') * 1000}

    def load_run(self, target, rate):
        proc, port = self.start_target(target)
        try:
            user, system = cpu_seconds(proc.pid)
            result = self.dnsperf(port, self.args.seconds, rate)
            user_after, system_after = cpu_seconds(proc.pid)
            count = max(1, result['completed'])
            result['cpu_us'] = (user_after - user + system_after - system) * 1e6 / count
            result['user_us'] = (user_after - user) * 1e6 / count
            return result
        finally:
            self.stop_target(target)

    def idle_run(self, target, count):
        proc, port = self.start_target(target, idle=True)
        query = pydirector.dns_query(9, pydirector.dns_name('svc.test'), pydirector.DNS_A, edns=False)
        socks = []
        try:
            self.exchange_all(self.open_clients(socks, 100), port, query)     # warm: buffers, first allocations
            time.sleep(0.5)
            rss0, fds0 = rss_kib(proc.pid), fd_count(proc.pid)
            clients = self.open_clients(socks, count)
            answered = self.exchange_all(clients, port, query)
            time.sleep(1.0)
            rss1, fds1 = rss_kib(proc.pid), fd_count(proc.pid)
            again = self.exchange_all(clients, port, query)
            return {'sessions': count, 'answered': answered, 'again': again, 'fds': fds1 - fds0,
                    'rss_kib': rss1 - rss0, 'kib_per_session': (rss1 - rss0) / float(count),
                    'rss_base_kib': rss0}
        finally:
            for sock in socks:
                sock.close()
            self.stop_target(target)

    @staticmethod
    def open_clients(socks, count):
        new = []
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(('127.0.0.1', 0))
            sock.settimeout(5)
            new.append(sock)
        socks.extend(new)
        return new

    @staticmethod
    def exchange_all(clients, port, query, batch=200):
        answered = 0
        for start in range(0, len(clients), batch):
            group = clients[start:start + batch]
            for sock in group:
                sock.sendto(query, ('127.0.0.1', port))
            for sock in group:
                try:
                    sock.recv(512)
                    answered += 1
                except socket.timeout:
                    pass
        return answered

    def run(self):
        args = self.args
        self.start_dnsmasq()
        runs = {}
        for round_ in range(args.rounds):
            for target in TARGETS:
                for rate in (args.rate, None):
                    key = (target, 'max' if rate is None else 'rate')
                    result = self.load_run(target, rate)
                    runs.setdefault(key, []).append(result)
                    log('round %d %-10s %-4s %8.0f q/s  %6.3f ms  lost %d  %5.1f us CPU/query (user %.1f)' % (
                        round_ + 1, target, key[1], result['qps'], result['latency_ms'], result['lost'],
                        result['cpu_us'], result['user_us']))
        idle = {}
        for target in ('nginx', 'pydirector'):
            idle[target] = result = self.idle_run(target, args.idle)
            log('idle %-10s %d sessions: answered %d, again %d, fds +%d, RSS +%d KiB (%.2f KiB a session, '
                'base %d KiB)' % (target, result['sessions'], result['answered'], result['again'], result['fds'],
                                  result['rss_kib'], result['kib_per_session'], result['rss_base_kib']))
        return runs, idle


def median(values):
    return statistics.median(values) if values else float('nan')


def spread(values, fmt):
    if len(values) == 1:
        return fmt % values[0]
    return (fmt + ' (' + fmt + '..' + fmt + ')') % (median(values), min(values), max(values))


def report(args, runs, idle):
    lines = ['UDP (DNS) through a balancer: dnsperf -c 4 -q 50, %d round(s) of %d s, Python %s, %s' % (
             args.rounds, args.seconds, subprocess.run([args.python, '-c', 'import sys; print(sys.version.split()[0])'],
                                                       stdout=subprocess.PIPE).stdout.decode().strip(),
             time.strftime('%Y-%m-%d')), '',
             '| target | load | queries/s | latency ms | lost | CPU µs per query | user CPU µs |',
             '|---|---|---|---|---|---|---|']
    for target in TARGETS:
        for load in ('rate', 'max'):
            rows = runs.get((target, load), [])
            lines.append('| %s | %s | %s | %s | %d | %s | %s |' % (
                target, '%d/s' % args.rate if load == 'rate' else 'max', spread([r['qps'] for r in rows], '%.0f'),
                spread([r['latency_ms'] for r in rows], '%.2f'), sum(r['lost'] for r in rows),
                spread([r['cpu_us'] for r in rows], '%.1f'), spread([r['user_us'] for r in rows], '%.1f')))
    lines.append('')
    for load in ('rate', 'max'):
        nginx, pyd, floor = (median([r['cpu_us'] for r in runs.get((target, load), [])])
                             for target in ('nginx', 'pydirector', 'pyfloor'))
        lines.append('- CPU per query at %s: pydirector / nginx %.2f (target <= 1.5: %s); pydirector / pyfloor %.2f; '
                     'pyfloor / nginx %.2f' % ('%d/s' % args.rate if load == 'rate' else 'max rate', pyd / nginx,
                                               'met' if pyd <= 1.5 * nginx else 'MISSED', pyd / floor, floor / nginx))
    for target, result in idle.items():
        lines.append('- idle sessions, %s: %d held (%d answered, %d again through them, +%d fds), '
                     '%.2f KiB each (VmRSS +%d KiB over %d KiB)%s' % (
                         target, result['sessions'], result['answered'], result['again'], result['fds'],
                         result['kib_per_session'], result['rss_kib'], result['rss_base_kib'],
                         ' (targets: <= 2 KiB, 10,000 held: %s)' % (
                             'met' if result['kib_per_session'] <= 2 and result['again'] == result['sessions']
                             >= 10000 else 'MISSED') if target == 'pydirector' else ''))
    return '\n'.join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--seconds', type=int, default=10, help='each dnsperf run (-l)')
    parser.add_argument('--rate', type=int, default=3000, help='queries/s of the fixed-rate runs (-Q)')
    parser.add_argument('--idle', type=int, default=10000, help='idle sessions to hold')
    parser.add_argument('--python', default=sys.executable, help='the Python that runs pydirector')
    parser.add_argument('--quick', action='store_true', help='1 round of 3 s, 2,000 idle sessions')
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds, args.idle = 1, 3, 2000
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    missing = [name for name in ('dnsmasq', 'dnsperf', 'nginx')
               if shutil.which(name, path=os.environ.get('PATH', '') + ':/usr/sbin:/sbin') is None]
    if missing or not any(os.path.exists(path) for path in NGINX_MODULES):
        log('missing: %s (apt-get install dnsmasq-base dnsperf nginx-light libnginx-mod-stream)'
            % ', '.join(missing or ['the nginx stream module']))
        return 2
    more_fds()      # the idle clients: a socket each
    signal.signal(signal.SIGTERM, on_sigterm)
    work = tempfile.mkdtemp(prefix='pydirector-udp-bench-')
    bench = UdpBench(args, work)
    try:
        runs, idle = bench.run()
    except (KeyboardInterrupt, Stop):
        return 130
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        log('failed: %s' % e)
        for name in ('pydirector', 'nginx', 'pyfloor', 'dnsmasq0', 'dnsmasq1'):
            output = bench.procs.output(name)
            if output:
                log('--- %s:\n%s' % (name, output))
        return 2
    finally:
        bench.procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    log('')
    log(report(args, runs, idle))
    return 0


if __name__ == '__main__':
    sys.exit(main())
