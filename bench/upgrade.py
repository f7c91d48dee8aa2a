#!/usr/bin/env python3
"""New code under load: what a restart loses, what an upgrade does not (issue 27).

    python3 bench/upgrade.py                 restart vs upgrade (one process, 2 workers) vs HAProxy -W USR2
    python3 bench/upgrade.py --storm         60 s storms: an upgrade every 2 s, SIGHUP every 300 ms
    python3 bench/upgrade.py --python /root/.pyenv/versions/3.6.15/bin/python3.6 --only upgrade,haproxy

Needs nginx, ab and haproxy (bench/bench.py installs them).  Starts nginx (one
worker) on two loopback ports answering 100 bytes, then for each scenario a
balancer over them (roundrobin) and `ab -r -c 20 -s 10` against it for the
whole run, during which the scenario's event comes `--events` times (5),
`--interval` seconds apart (2):

- restart: SIGTERM to pydirector, then start it again once it has exited
  (one process; restart-w: with --workers 2);
- upgrade: SIGUSR2 to pydirector, a new VERSION written into its
  pydirector.py first (one process; upgrade-w: with --workers 2);
- haproxy: HAProxy in master-worker mode (-W), kill -USR2 to its master.

Prints, per scenario, ab's complete and failed requests in one run (and
whether ab gave up), and for the upgrades whether the PID stayed the same,
the version that runs at the end, processes left beyond the master and its
workers, and the master's fds before and after.  --storm runs instead, for
--seconds (60) each: an upgrade every 2 s and SIGHUP every 300 ms, under the
same load, one process and 2 workers.  pydirector runs from a copy of this
tree in a temp dir (its log is there; --keep keeps it).  Stdlib only.
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.append(os.path.join(REPO, 'tools'))
from processes import free_port, wait_listening  # noqa: E402

sys.path.append(os.path.join(REPO, 'bench'))
from bench import HAPROXY_CONF  # noqa: E402  (bench.py's HAProxy, one thread)

SCENARIOS = ('restart', 'restart-w', 'upgrade', 'upgrade-w', 'haproxy')
STORMS = ('upgrade', 'upgrade-w', 'reload', 'reload-w')
FILES = ('pydirector.py', 'schedulers.py', 'pydirector_admin.py')
PASSWORD = 'bench'


def log(text):
    print(text, file=sys.stderr, flush=True)


def group_processes(pgid):
    """{pid: state} of a process group (a session started here), from /proc."""
    found = {}
    for name in os.listdir('/proc'):
        if name.isdigit():
            try:
                with open('/proc/%s/stat' % name) as f:
                    fields = f.read().rsplit(')', 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:
                found[int(name)] = fields[0]
    return found


def settled_fds(pid):
    """fd_count once the admin's last answer has closed (it lingers a second after)."""
    time.sleep(1.5)
    return fd_count(pid)


def settle(target, pid, fds, wait=60):
    """Once the last upgrade is over and no process is left (within `wait` s): the
    master's fds, counted with no admin answer of ours open (each lingers a second)."""
    deadline = time.monotonic() + wait
    while not target.ready() or target.left_over():
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    count = settled_fds(pid)
    while count > fds and time.monotonic() < deadline:
        count = settled_fds(pid)
    return count


def fd_count(pid):
    try:
        return len(os.listdir('/proc/%d/fd' % pid))
    except OSError:
        return None


class Pydirector(object):
    """pydirector from a copy of the tree, in a session of its own, with an admin."""

    def __init__(self, work, python, port, port1, port2, workers=None):
        self.work = work
        self.python = python
        self.port = port
        self.admin_port = free_port()
        self.workers = workers
        self.tree = os.path.join(work, 'tree')
        if not os.path.isdir(self.tree):
            os.mkdir(self.tree)
            for name in FILES:
                shutil.copy(os.path.join(REPO, name), self.tree)
        code = 'import sys; sys.path.insert(0, %r); import pydirector; print(pydirector.hash_password(%r, 1000))'
        hashed = subprocess.check_output([python, '-c', code % (self.tree, PASSWORD)], universal_newlines=True).strip()
        self.config = os.path.join(work, 'bench.xml')
        with open(self.config, 'w') as f:
            f.write('<pdconfig drain="10"%s>\n  <service name="web">\n    <listen ip="127.0.0.1:%d"/>\n'
                    '    <group name="main" scheduler="roundrobin">\n      <host name="one" ip="127.0.0.1:%d"/>\n'
                    '      <host name="two" ip="127.0.0.1:%d"/>\n    </group>\n  </service>\n'
                    '  <admin listen="127.0.0.1:%d">\n    <user name="admin" password="%s" access="full"/>\n'
                    '  </admin>\n  <logging file="%s" access="off"/>\n</pdconfig>\n' % (
                        ' workers="%d"' % workers if workers else '', port, port1, port2, self.admin_port, hashed,
                        os.path.join(work, 'pydirector.log')))
        self.version = 0
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([self.python, os.path.join(self.tree, 'pydirector.py'), '-c', self.config],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + 60
        while not self.ready():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError('pydirector did not start: see %s' % self.work)
            time.sleep(0.05)
        return self

    def running(self):
        request = urllib.request.Request('http://127.0.0.1:%d/running.json' % self.admin_port)
        request.add_header('Authorization', 'Basic YWRtaW46YmVuY2g=')     # admin:bench
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.loads(answer.read().decode('utf-8'))

    def ready(self):
        try:
            running = self.running()
        except (OSError, ValueError):
            return False
        return running['generation']['upgrading'] is None and all(w['up'] for w in running['workers'] or ())

    def restart(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        self.start()

    def upgrade(self):
        """A new VERSION on disk (written beside, renamed over), then SIGUSR2."""
        self.version += 1
        path = os.path.join(self.tree, 'pydirector.py')
        with open(os.path.join(REPO, 'pydirector.py')) as f:
            text = re.sub(r"^VERSION = '([^']*)'$", r"VERSION = '\1+%d'" % self.version, f.read(), flags=re.M)
        with open(path + '.new', 'w') as f:
            f.write(text)
        os.replace(path + '.new', path)
        self.proc.send_signal(signal.SIGUSR2)

    def reload(self):
        self.proc.send_signal(signal.SIGHUP)

    def outcomes(self):
        """What its log says of the upgrades and reloads asked for."""
        with open(os.path.join(self.work, 'pydirector.log')) as f:
            text = f.read()
        return {'refused': text.count('upgrade refused'), 'upgrade_failed': text.count('upgrade failed'),
                'reloads': text.count(' reloaded '), 'tracebacks': text.count('Traceback')}

    def left_over(self):
        """Processes of its session beyond the master and its live workers."""
        running = self.running()
        expected = {self.proc.pid} | set(w['pid'] for w in running['workers'] or ())
        return sorted(set(group_processes(self.proc.pid)) - expected)

    def stop(self):
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            self.proc.wait(10)


class Haproxy(object):
    def __init__(self, work, port, port1, port2):
        self.config = os.path.join(work, 'haproxy.cfg')
        with open(self.config, 'w') as f:
            f.write(HAPROXY_CONF.format(port=port, port1=port1, port2=port2, nbthread=1, maxconn=9500))
        self.port = port
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(['haproxy', '-W', '-db', '-f', self.config], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        if not wait_listening(self.port, 15):
            raise RuntimeError('haproxy did not listen')
        return self

    def upgrade(self):
        self.proc.send_signal(signal.SIGUSR2)

    def stop(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        self.proc.wait(10)


def ab(port, seconds, concurrency):
    """Start ab for `seconds` against the port; returns the Popen (see ab_result)."""
    return subprocess.Popen(['ab', '-r', '-c', str(concurrency), '-s', '10', '-t', str(seconds), '-n', '100000000',
                             'http://127.0.0.1:%d/' % port], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True)


def ab_result(proc, seconds):
    """(complete, failed, gave up): ab's figures; a run it gave up counts what it did."""
    try:
        out = proc.communicate(timeout=seconds + 60)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        out = proc.communicate()[0]
    complete = re.search(r'^Complete requests:\s+([0-9]+)', out, re.M)
    failed = re.search(r'^Failed requests:\s+([0-9]+)', out, re.M)
    non2xx = re.search(r'^Non-2xx responses:\s+([0-9]+)', out, re.M)
    if complete is None:
        done = re.search(r'Total of ([0-9]+) requests completed', out)
        return (int(done.group(1)) if done else 0), None, out.strip().splitlines()[-1:] or ['?']
    return (int(complete.group(1)), int(failed.group(1)) + (int(non2xx.group(1)) if non2xx else 0),
            None if proc.returncode == 0 else out.strip().splitlines()[-1:])


def events(action, count, interval, first=1.0):
    """Run action() `count` times, `interval` apart, starting `first` seconds from now, in a thread."""
    problems = []

    def run():
        time.sleep(first)
        for _ in range(count):
            started = time.monotonic()
            try:
                action()
            except Exception as e:     # reported, not fatal: the run's figures still count
                problems.append(repr(e))
            time.sleep(max(0.0, interval - (time.monotonic() - started)))
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, problems


def scenario(name, args, work, ports):
    seconds = 1 + args.events * args.interval + 1
    port = free_port()
    workers = 2 if name.endswith('-w') else None
    if name == 'haproxy':
        target = Haproxy(work, port, *ports).start()
        action = target.upgrade
    else:
        target = Pydirector(work, args.python, port, ports[0], ports[1], workers).start()
        action = target.restart if name.startswith('restart') else target.upgrade
    try:
        pid = target.proc.pid
        fds = settled_fds(pid)
        load = ab(port, seconds, args.concurrency)
        thread, problems = events(action, args.events, args.interval)
        complete, failed, gave_up = ab_result(load, seconds)
        thread.join(60)
        row = {'scenario': name, 'complete': complete, 'failed': failed, 'gave_up': gave_up, 'problems': problems}
        if name.startswith('upgrade'):
            after = settle(target, pid, fds)
            running = target.running()
            row.update(same_pid=running['pid'] == pid, version=running['version'],
                       generation=running['generation']['number'], left_over=target.left_over(),
                       fds=[fds, after], events=args.events, **target.outcomes())
        return row
    finally:
        target.stop()


def storm(name, args, work, ports):
    """An upgrade every 2 s (or SIGHUP every 300 ms) for args.seconds under ab load."""
    port = free_port()
    workers = 2 if name.endswith('-w') else None
    target = Pydirector(work, args.python, port, ports[0], ports[1], workers).start()
    try:
        pid = target.proc.pid
        fds = settled_fds(pid)
        upgrades = name.startswith('upgrade')
        interval = 2.0 if upgrades else 0.3
        count = int(args.seconds / interval)
        load = ab(port, args.seconds + 2, args.concurrency)
        thread, problems = events(target.upgrade if upgrades else target.reload, count, interval)
        complete, failed, gave_up = ab_result(load, args.seconds + 2)
        thread.join(60)
        after = settle(target, pid, fds)
        running = target.running()
        row = {'scenario': name + (' storm (every 2 s)' if upgrades else ' storm (SIGHUP every 0.3 s)'),
               'events': count, 'complete': complete, 'failed': failed, 'gave_up': gave_up, 'problems': problems,
               'same_pid': running['pid'] == pid, 'generation': running['generation']['number'],
               'left_over': target.left_over(), 'fds': [fds, after]}
        row.update(target.outcomes())
        return row
    finally:
        target.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--python', default=sys.executable, help='the Python that runs pydirector')
    parser.add_argument('--events', type=int, default=5)
    parser.add_argument('--interval', type=float, default=2.0)
    parser.add_argument('--concurrency', type=int, default=20)
    parser.add_argument('--only', help='scenarios, comma-separated (%s; with --storm: %s)' % (
        ', '.join(SCENARIOS), ', '.join(STORMS)))
    parser.add_argument('--storm', action='store_true', help='the 60 s storms instead')
    parser.add_argument('--seconds', type=float, default=60.0, help='of each storm')
    parser.add_argument('--keep', action='store_true', help='keep the temp dir (logs, configs)')
    args = parser.parse_args()
    for tool in ('nginx', 'ab') + (() if args.storm else ('haproxy',)):
        if shutil.which(tool, path=os.environ.get('PATH', '') + ':/usr/sbin:/sbin') is None:
            sys.exit('upgrade.py: %s is needed (bench/bench.py installs it)' % tool)
    names = list(STORMS if args.storm else SCENARIOS)
    if args.only:
        names = [n for n in args.only.split(',') if n in names]
    work = tempfile.mkdtemp(prefix='pydirector-upgrade-bench-')
    ports = (free_port(), free_port())
    with open(os.path.join(work, 'nginx.conf'), 'w') as f:
        f.write('worker_processes 1; pid %s/nginx.pid; error_log %s/nginx.err; daemon off;\n'
                'events { worker_connections 4096; }\n'
                'http { access_log off; server { listen 127.0.0.1:%d; listen 127.0.0.1:%d;\n'
                '  location / { return 200 "%s"; } } }\n' % (work, work, ports[0], ports[1], '0123456789' * 10))
    nginx = subprocess.Popen(['nginx', '-c', os.path.join(work, 'nginx.conf')], start_new_session=True)
    rows = []
    try:
        for port in ports:
            if not wait_listening(port):
                sys.exit('upgrade.py: nginx did not listen')
        for name in names:
            log('%s ...' % name)
            directory = os.path.join(work, name)
            os.mkdir(directory)
            row = (storm if args.storm else scenario)(name, args, directory, ports)
            log('  %s' % json.dumps(row))
            rows.append(row)
    finally:
        os.killpg(nginx.pid, signal.SIGKILL)
        nginx.wait(10)
        if args.keep:
            log('kept %s' % work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print('| scenario | failed | complete | notes |')
    print('|---|---|---|---|')
    for row in rows:
        notes = []
        if row['gave_up']:
            notes.append('ab gave up: %s' % ' '.join(row['gave_up']))
        if 'same_pid' in row:
            notes.append('same PID' if row['same_pid'] else 'PID CHANGED')
            notes.append('generation %d' % row['generation'])
            notes.append('processes left: %s' % (row['left_over'] or 'none'))
            notes.append('fds %s -> %s' % tuple(row['fds']))
        if row['scenario'].startswith('upgrade'):
            notes.append('%d upgrade(s) asked, %d refused (one running), %d failed' % (
                row['events'], row['refused'], row['upgrade_failed']))
        if row['scenario'].startswith('reload'):
            notes.append('%d SIGHUP(s), %d reload(s) logged' % (row['events'], row['reloads']))
        if row.get('tracebacks'):
            notes.append('%d traceback(s) in its log' % row['tracebacks'])
        if row['problems']:
            notes.append('event errors: %s' % '; '.join(row['problems'][:3]))
        print('| %s | %s | %s | %s |' % (row['scenario'], 'n/a' if row['failed'] is None else '{:,}'.format(
            row['failed']), '{:,}'.format(row['complete']), '; '.join(notes)))
    sys.exit(0 if all(r['failed'] == 0 and not r['gave_up'] for r in rows if not r['scenario'].startswith('restart'))
             else 1)


if __name__ == '__main__':
    main()
