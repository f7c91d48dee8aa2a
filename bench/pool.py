#!/usr/bin/env python3
"""Pool-size sweep (issue 16): balancer CPU per new connection against the
number of hosts in the group, per scheduler, beside HAProxy with the same servers.

    python3 bench/pool.py                                  2, 100, 1000, 5000 hosts, 3 rounds
    python3 bench/pool.py --quick                          2 and 100 hosts, 1 round, small counts
    python3 bench/pool.py --pydirector new=pydirector.py --pydirector old=/tmp/old/pydirector.py
    python3 bench/pool.py --python /root/.pyenv/versions/3.6.15/bin/python3.6 --no-haproxy

One nginx (1 worker, access log off) listens on 0.0.0.0:PORT, so each 127.x.y.z
address is a distinct backend host.  For each pool size, each pydirector
scheduler and each HAProxy balance algorithm (nbthread 1; roundrobin,
leastconn, and source with hash-type consistent for hash) gets a fresh
balancer over the same hosts, a warm-up, then `ab -c 50` with new
connections (-n, stopped after -t seconds if slower).  Balancer CPU is
utime+stime from /proc/PID/stat before and after ab, divided by the
connections ab completed.  Rounds are interleaved (round 1: every config,
round 2: ...; within a round a row's sizes run back to back), and each cell
is the median of the rounds (min..max).  A ratio column is the median over
rounds of that size's figure divided by the 2-host figure of the same row
and round (run seconds apart): compare ratios within one run, as the
machine is shared.

The director's health bookkeeping also grows with the pool, with or
without traffic; the `idle` rows show it: pydirector's CPU while idle, in
µs per second, without and with <check interval="5">, and what that comes
to per connection at the run's connection rate (`roundrobin+check` is the
same sweep with <check> on).

Needs nginx, haproxy and ab (apache2-utils) on PATH; installs nothing.
Everything runs in a temporary directory and every process started here is
stopped at the end, on errors and Ctrl-C too.  Stdlib only; not run by tests.
"""

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.append(os.path.join(REPO, 'tools'))
from processes import cpu_seconds, free_port, stop_process, wait_listening  # noqa: E402

SIZES = (2, 100, 1000, 5000)
SCHEDULERS = ('roundrobin', 'leastconns', 'leastconnsrr', 'random', 'hash')
# pydirector scheduler -> HAProxy's nearest balance algorithm
HAPROXY_BALANCE = {'roundrobin': 'balance roundrobin',
                   'leastconns': 'balance leastconn',
                   'hash': 'balance source\n    hash-type consistent'}
CHECK = '<check interval="5" timeout="2"/>'


def log(text):
    print(text, flush=True)


def host_ip(i):
    # 127.1.0.0 and up: each a distinct backend to the kernel, all the one nginx.
    return '127.%d.%d.%d' % (1 + (i >> 16), (i >> 8) & 255, i & 255)


def run_seconds(pid):
    """CPU time of the process's live threads from schedstat (nanoseconds, so
    finer than /proc/PID/stat's clock ticks for the small idle figures)."""
    total = 0
    for task in os.listdir('/proc/%d/task' % pid):
        try:
            with open('/proc/%d/task/%s/schedstat' % (pid, task)) as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total / 1e9


class Stop(Exception):
    """SIGTERM: unwind like Ctrl-C so the finally blocks stop what we started."""


def on_sigterm(signum, frame):
    raise Stop('SIGTERM')


class Processes(object):
    """What we start, each in its own session, stopped by its own id."""

    def __init__(self, work):
        self.work = work
        self.running = {}

    def start(self, name, argv, cwd=None):
        out = open(os.path.join(self.work, name + '.out'), 'ab')
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                cwd=cwd or self.work, start_new_session=True)
        out.close()
        self.running[name] = proc
        return proc

    def stop(self, name):
        proc = self.running.pop(name, None)
        if proc is None:
            return
        stop_process(proc, 10, group=True)      # its session: nginx's worker too
        if proc.poll() is None:
            log('warning: %s (pid %d) did not exit' % (name, proc.pid))

    def stop_all(self):
        for name in list(self.running):
            self.stop(name)

    def tail(self, name, lines=10):
        try:
            with open(os.path.join(self.work, name + '.out'), errors='replace') as f:
                return ''.join(f.readlines()[-lines:])
        except OSError:
            return ''


NGINX_CONF = """\
daemon off;
worker_processes 1;
worker_rlimit_nofile 20000;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 10000; }}
http {{
    access_log off;
    keepalive_timeout 0;
    default_type application/octet-stream;
    server {{
        listen 0.0.0.0:{port} backlog=4096;
        root {work}/www;
    }}
}}
"""


def haproxy_cfg(port, nginx_port, size, balance):
    servers = '\n'.join('    server h%d %s:%d' % (i, host_ip(i), nginx_port) for i in range(size))
    return """\
global
    nbthread 1
    maxconn 4000

defaults
    mode tcp
    maxconn 4000
    timeout connect 5s
    timeout client 1m
    timeout server 1m

frontend bench
    bind 127.0.0.1:{port}
    default_backend pool

backend pool
    {balance}
{servers}
""".format(port=port, balance=balance, servers=servers)


def pydirector_xml(work, name, port, nginx_port, size, scheduler, check):
    hosts = '\n'.join('      <host name="h%d" ip="%s:%d"/>' % (i, host_ip(i), nginx_port)
                      for i in range(size))
    return """\
<pdconfig drain="1">
  <service name="bench">
    <listen ip="127.0.0.1:{port}"/>
    <group name="main" scheduler="{scheduler}">
{hosts}
    </group>
    {check}
    <timeouts connect="5" idle="60"/>
  </service>
  <logging file="{work}/{name}.log" access="off"/>
</pdconfig>
""".format(port=port, scheduler=scheduler, hosts=hosts, check=CHECK if check else '',
           work=work, name=name)


class Sweep(object):

    def __init__(self, args):
        self.args = args
        self.work = tempfile.mkdtemp(prefix='pydirector-pool-')
        os.chmod(self.work, 0o755)      # nginx's worker runs as another user
        self.procs = Processes(self.work)
        self.results = []               # dicts: round, target, row, size, cpu_us, conns, ...
        self.idle = []                  # dicts: round, target, size, check, us_per_s
        self.nginx_port = None

    def close(self):
        self.procs.stop_all()
        shutil.rmtree(self.work, ignore_errors=True)

    def setup(self):
        for tool in ('nginx', 'ab') + (() if self.args.no_haproxy else ('haproxy',)):
            if shutil.which(tool) is None:
                sys.exit('pool.py: %s is not installed (apt-get install nginx haproxy apache2-utils)' % tool)
        www = os.path.join(self.work, 'www')
        os.mkdir(www)
        os.chmod(www, 0o755)
        with open(os.path.join(www, 'small'), 'wb') as f:
            f.write(b'x' * 99 + b'\n')
        os.chmod(os.path.join(www, 'small'), 0o644)
        self.nginx_port = free_port()
        conf = os.path.join(self.work, 'nginx.conf')
        with open(conf, 'w') as f:
            f.write(NGINX_CONF.format(work=self.work, port=self.nginx_port))
        proc = self.procs.start('nginx', ['nginx', '-p', self.work + '/', '-e', self.work + '/nginx-error.log',
                                          '-c', conf])
        if not wait_listening(self.nginx_port, 15, proc):
            raise RuntimeError('nginx did not listen: %s' % self.procs.tail('nginx'))

    # -- one balancer

    def start_pydirector(self, label, path, size, scheduler, check):
        name = 'pd-%s-%d-%s%s' % (label, size, scheduler, '-check' if check else '')
        port = free_port()
        xml = os.path.join(self.work, name + '.xml')
        with open(xml, 'w') as f:
            f.write(pydirector_xml(self.work, name, port, self.nginx_port, size, scheduler, check))
        proc = self.procs.start(name, [self.args.python, os.path.abspath(path), '-c', xml],
                                cwd=os.path.dirname(os.path.abspath(path)))
        return name, port, proc

    def start_haproxy(self, size, scheduler):
        name = 'haproxy-%d-%s' % (size, scheduler)
        port = free_port()
        cfg = os.path.join(self.work, name + '.cfg')
        with open(cfg, 'w') as f:
            f.write(haproxy_cfg(port, self.nginx_port, size, HAPROXY_BALANCE[scheduler]))
        proc = self.procs.start(name, ['haproxy', '-db', '-f', cfg])
        return name, port, proc

    def ab(self, port, count, seconds):
        """(completed, failed, wall seconds, output) of one ab run."""
        # -t before -n: stop after `seconds` if `count` takes longer.
        argv = ['ab', '-q', '-r', '-s', '20', '-c', '50', '-t', str(seconds), '-n', str(count),
                'http://127.0.0.1:%d/small' % port]
        start = time.monotonic()
        try:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, timeout=seconds + 60, universal_newlines=True)
            out = done.stdout
        except subprocess.TimeoutExpired:
            return 0, 0, time.monotonic() - start, 'ab timed out'
        wall = time.monotonic() - start
        complete = re.search(r'Complete requests:\s+(\d+)', out)
        failed = re.search(r'Failed requests:\s+(\d+)', out)
        if not complete:
            return 0, 0, wall, out[-500:]
        return int(complete.group(1)), int(failed.group(1)) if failed else 0, wall, out

    def measure(self, name, port, proc, record):
        if not wait_listening(port, 120, proc):
            record['error'] = 'did not listen: ' + self.procs.tail(name)
            return record
        self.ab(port, self.args.warmup, 30)       # lazy setup (the hash ring) and caches
        pid = proc.pid
        before = cpu_seconds(pid)
        complete, failed, wall, out = self.ab(port, self.args.n, self.args.t)
        try:
            record['cpu_s'] = cpu_seconds(pid) - before
        except OSError:
            record['error'] = 'died during the run: ' + self.procs.tail(name)
            return record
        record.update(conns=complete, failed=failed, wall_s=round(wall, 2))
        if complete:
            record['cpu_us'] = record['cpu_s'] * 1e6 / complete
        else:
            record['error'] = 'ab: ' + out.strip()[-300:]
        if failed:
            record['error'] = '%d of %d failed' % (failed, complete)
        return record

    def idle_cpu(self, name, port, proc, seconds):
        """The balancer's CPU while nothing connects, in µs per second (schedstat)."""
        if not wait_listening(port, 120, proc):
            return None
        time.sleep(1.0)     # let startup's work finish (not synchronisation: settling)
        before, start = run_seconds(proc.pid), time.monotonic()
        time.sleep(seconds)
        return (run_seconds(proc.pid) - before) * 1e6 / (time.monotonic() - start)

    # -- the sweep

    def configs(self, round_no):
        """(target label, row, size, starter) for one round, in run order.

        A row's sizes run back to back (their ratio is what counts, and the
        machine's load drifts over minutes), in an order that turns each
        round so no size always goes first."""
        sizes = list(self.args.sizes)
        turn = (round_no - 1) % len(sizes)
        sizes = sizes[turn:] + sizes[:turn]
        rows = []
        for label, path in self.args.pydirector:
            for scheduler in self.args.schedulers:
                rows.append((label, scheduler,
                             lambda s, l=label, p=path, c=scheduler: self.start_pydirector(l, p, s, c, False)))
            if self.args.with_check:
                rows.append((label, 'roundrobin+check',
                             lambda s, l=label, p=path: self.start_pydirector(l, p, s, 'roundrobin', True)))
        if not self.args.no_haproxy:
            for scheduler in self.args.schedulers:
                if scheduler in HAPROXY_BALANCE:
                    rows.append(('haproxy', scheduler, lambda s, c=scheduler: self.start_haproxy(s, c)))
        return [(target, row, size, lambda start=start, size=size: start(size))
                for target, row, start in rows for size in sizes]

    def run(self):
        self.setup()
        log('pool sweep in %s: %d configs x %d rounds, ab -c 50 -n %d -t %d, nginx on 0.0.0.0:%d'
            % (self.work, len(self.configs(1)), self.args.rounds, self.args.n, self.args.t, self.nginx_port))
        for round_no in range(1, self.args.rounds + 1):
            for target, row, size, starter in self.configs(round_no):
                name, port, proc = starter()
                try:
                    record = self.measure(name, port, proc, {'round': round_no, 'target': target,
                                                              'row': row, 'size': size})
                finally:
                    self.procs.stop(name)
                self.results.append(record)
                log('round %d %-8s %-17s %5d hosts: %s' % (round_no, target, row, size, brief(record)))
            if self.args.idle_seconds:
                for size in self.args.sizes:
                    for label, path in self.args.pydirector:
                        for check in (False, True):
                            name, port, proc = self.start_pydirector(label, path, size, 'roundrobin', check)
                            try:
                                rate = self.idle_cpu(name, port, proc, self.args.idle_seconds)
                            finally:
                                self.procs.stop(name)
                            self.idle.append({'round': round_no, 'target': label, 'size': size,
                                              'check': check, 'us_per_s': rate})
                            log('round %d %-8s idle%-13s %5d hosts: %s µs/s' % (
                                round_no, label, '+check' if check else '', size,
                                '-' if rate is None else '%.0f' % rate))

    # -- the report

    def report(self):
        lines = []
        sizes = self.args.sizes
        base = sizes[0]
        targets = [label for label, _ in self.args.pydirector] + ([] if self.args.no_haproxy else ['haproxy'])
        for target in targets:
            rows = [r for r in ([s for s in self.args.schedulers] + ['roundrobin+check'])
                    if any(x['target'] == target and x['row'] == r for x in self.results)]
            if not rows:
                continue
            lines.append('')
            lines.append('%s: balancer CPU µs per new connection, median of %d (min..max)'
                         % (target, self.args.rounds))
            head = ['scheduler'] + ['%d hosts' % s for s in sizes] + ['%d/%d' % (s, base) for s in sizes[1:]]
            lines.append('| ' + ' | '.join(head) + ' |')
            lines.append('|' + '---|' * len(head))
            for row in rows:
                cells, medians = [row], {}
                for size in sizes:
                    values = [x['cpu_us'] for x in self.results if x['target'] == target and x['row'] == row
                              and x['size'] == size and 'cpu_us' in x]
                    errors = [x for x in self.results if x['target'] == target and x['row'] == row
                              and x['size'] == size and 'error' in x]
                    if values:
                        medians[size] = statistics.median(values)
                        cell = '%.1f' % medians[size]
                        if len(values) > 1:
                            cell += ' (%.0f..%.0f)' % (min(values), max(values))
                        if errors:
                            cell += ' !'
                    else:
                        cell = 'error' if errors else '-'
                    cells.append(cell)
                for size in sizes[1:]:
                    # Paired: this size against 2 hosts in the same round (seconds
                    # apart), then the median over rounds; steadier than a ratio
                    # of medians when the machine's load drifts.
                    ratios = []
                    for round_no in range(1, self.args.rounds + 1):
                        pair = [x['cpu_us'] for s in (size, base) for x in self.results
                                if x['target'] == target and x['row'] == row and x['size'] == s
                                and x['round'] == round_no and 'cpu_us' in x]
                        if len(pair) == 2:
                            ratios.append(pair[0] / pair[1])
                    cells.append('%.2f×' % statistics.median(ratios) if ratios else '-')
                lines.append('| ' + ' | '.join(cells) + ' |')
        if self.idle:
            lines.append('')
            lines.append('pydirector idle (roundrobin, no traffic): CPU µs per second, median of %d; '
                         'per connection at the run\'s rate in brackets' % self.args.rounds)
            head = ['target', 'config'] + ['%d hosts' % s for s in sizes]
            lines.append('| ' + ' | '.join(head) + ' |')
            lines.append('|' + '---|' * len(head))
            for label, _ in self.args.pydirector:
                for check in (False, True):
                    cells = [label, '<check>' if check else 'no <check>']
                    for size in sizes:
                        rates = [x['us_per_s'] for x in self.idle if x['target'] == label
                                 and x['size'] == size and x['check'] == check and x['us_per_s'] is not None]
                        row = 'roundrobin+check' if check else 'roundrobin'
                        runs = [x for x in self.results if x['target'] == label and x['row'] == row
                                and x['size'] == size and x.get('conns')]
                        if not rates:
                            cells.append('-')
                            continue
                        rate = statistics.median(rates)
                        cell = '%.0f' % rate
                        if runs:
                            per_conn = statistics.median(rate * x['wall_s'] / x['conns'] for x in runs)
                            cell += ' (%.1f µs/conn)' % per_conn
                        cells.append(cell)
                    lines.append('| ' + ' | '.join(cells) + ' |')
        errors = [x for x in self.results if 'error' in x]
        if errors:
            lines.append('')
            lines.append('! errors:')
            for x in errors:
                lines.append('  round %d %s %s %d hosts: %s' % (x['round'], x['target'], x['row'], x['size'],
                                                               x['error']))
        text = '\n'.join(lines)
        log(text)
        if self.args.json:
            with open(self.args.json, 'w') as f:
                json.dump({'args': {k: v for k, v in vars(self.args).items()},
                           'results': self.results, 'idle': self.idle}, f, indent=1)
        return 1 if errors else 0


def brief(record):
    if 'cpu_us' in record:
        text = '%.1f µs/conn (%d conns in %.1f s)' % (record['cpu_us'], record['conns'], record['wall_s'])
    else:
        text = ''
    if 'error' in record:
        text += '  ERROR: ' + record['error']
    return text


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--pydirector', action='append', metavar='LABEL=PATH',
                        help='a pydirector.py to measure, under a label (repeatable; default: '
                             'this checkout as "pydirector")')
    parser.add_argument('--python', default=sys.executable, help='the Python that runs pydirector')
    parser.add_argument('--sizes', default=','.join(map(str, SIZES)), help='pool sizes, comma-separated')
    parser.add_argument('--schedulers', default=','.join(SCHEDULERS), help='comma-separated')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('-n', type=int, default=20000, help='new connections per run (ab -n)')
    parser.add_argument('-t', type=int, default=12, help='seconds at most per run (ab -t)')
    parser.add_argument('--warmup', type=int, default=500, help='connections before each measured run')
    parser.add_argument('--idle-seconds', type=float, default=5.0,
                        help='seconds of idle CPU per pool size, without and with <check> (0: skip)')
    parser.add_argument('--no-check-row', dest='with_check', action='store_false',
                        help='leave out the roundrobin+check row')
    parser.add_argument('--no-haproxy', action='store_true')
    parser.add_argument('--quick', action='store_true', help='2 and 100 hosts, 1 round, 3,000 connections')
    parser.add_argument('--json', metavar='PATH', help='also write every run as JSON here')
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.rounds, args.n, args.t, args.warmup, args.idle_seconds = '2,100', 1, 3000, 5, 200, 2.0
    args.sizes = [int(s) for s in str(args.sizes).split(',')]
    args.schedulers = [s.strip() for s in args.schedulers.split(',')]
    pydirectors = []
    for item in args.pydirector or ['pydirector=' + os.path.join(REPO, 'pydirector.py')]:
        label, sep, path = item.partition('=')
        if not sep:
            label, path = 'pydirector', item
        if not os.path.exists(path):
            parser.error('no such file: %s' % path)
        pydirectors.append((label, path))
    args.pydirector = pydirectors
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, on_sigterm)
    sweep = Sweep(args)
    try:
        sweep.run()
        return sweep.report()
    except (KeyboardInterrupt, Stop):
        log('interrupted; partial results:')
        sweep.report()
        return 130
    except RuntimeError as e:
        log('pool.py: %s' % e)
        return 2
    finally:
        sweep.close()


if __name__ == '__main__':
    sys.exit(main())
