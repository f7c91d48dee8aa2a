"""Two balancers behind one address: keepalived (VRRP) and pydirector, real processes
in network namespaces.

    client 10.77.0.10 ─┐
    node a 10.77.0.2  ─┤  bridge (its own namespace)   VIP 10.77.0.100, on the master
    node b 10.77.0.3  ─┤
    backend 10.77.0.20 ┘  ports 8001-8003, each answers "via <the balancer's address>"

Each node runs pydirector (one config for both, listening on VIP:8080, admin on
*:7001) and keepalived with contrib/keepalived.conf, only its addresses
replaced.  A client keeps connecting to VIP:8080 and records every success
(and through which node) and every failure, with its time.  Scenarios:
  1. pydirector dies (SIGKILL) on the master: new connections succeed again,
     through the other node, within 3 s;
  3. then node a comes back: the address stays away, or returns, as the
     file's preemption setting says;
  2. the master loses its backends: /healthz says DOWN 1, the address moves;
  4. `pydirector_admin.py apply --url A --url B new.xml` changes both nodes,
     no client notices, and `diff` then shows no changes on either.

Everything lives in namespaces named pdfleet-<pid>-*: private addresses never
leave them, parallel suites never meet, and a crashed run's leftovers are
removed at the start of the next.  The fleet test runs one at a time across
processes (a lock file): failover times are what it checks.

By hand, the failover windows over N failovers of scenarios 1 and 2:
    python3 tests/test_fleet.py --measure 5
"""

import errno
import fcntl
import os
import re
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import unittest

import support
from support import wait_until

import pydirector

PREFIX = 'pdfleet'
NAMESPACES = ('sw', 'client', 'a', 'b', 'k')
SUBNET = 24
ADDRESSES = {'client': '10.77.0.10', 'a': '10.77.0.2', 'b': '10.77.0.3', 'k': '10.77.0.20'}
VIP = '10.77.0.100'
SERVICE_PORT = 8080
ADMIN_PORT = 7001         # contrib/keepalived.conf's check URL; every namespace has its own ports
BACKEND_PORTS = (8001, 8002, 8003)
PASSWORD = 'fleet secret'
CONTRIB = os.path.join(support.REPO, 'contrib', 'keepalived.conf')
ADMIN = os.path.join(support.REPO, 'pydirector_admin.py')
LOCK = os.path.join(support.SHARED_TMP, 'pydirector-test-fleet.lock')
CLIENT_PAUSE = 0.02       # between the client's connects: a 20 ms resolution on the windows
FAILOVER_LIMIT = 3.0      # scenario 1: new connections succeed again within this


def run(argv, check=True, timeout=30):
    """Run a command; its output as text.  check: fail on a non-zero exit."""
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    out = proc.stdout.decode('utf-8', 'replace')
    if check and proc.returncode != 0:
        raise AssertionError('%s exited %d: %s' % (' '.join(argv), proc.returncode, out))
    return out


def in_ns(ns, argv):
    return ['ip', 'netns', 'exec', ns] + list(argv)


def remove_namespace(ns):
    """Kill what still runs in a namespace of ours, then delete it (its links go with it)."""
    for _ in range(50):
        pids = [int(p) for p in run(['ip', 'netns', 'pids', ns], check=False).split() if p.isdigit()]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)    # reaping is the parent's business; just look again
    run(['ip', 'netns', 'delete', ns], check=False)


def remove_leftovers():
    """Namespaces of runs whose process is gone (a crash, a kill -9): they go now,
    with whatever still runs in them (support removes such a run's directory)."""
    def dead(match):
        return match and int(match.group(2)) != os.getpid() and not pydirector.process_running(int(match.group(2)))
    for line in run(['ip', 'netns', 'list'], check=False).splitlines():
        match = re.match(r'(%s-(\d+)-\S+)' % PREFIX, line)
        if dead(match):
            remove_namespace(match.group(1))


def keepalived_conf(node):
    """contrib/keepalived.conf for node 'a' or 'b', with the fleet's addresses.

    The file is written for node A with 192.0.2.10 (A), 192.0.2.11 (B) and
    192.0.2.100 (the address); node B swaps the two and takes priority 200, as
    its comments say.  Each must occur once outside comments: a changed file
    fails here, loudly, rather than running something else."""
    with open(CONTRIB) as f:
        text = f.read()
    me, peer = ('a', 'b') if node == 'a' else ('b', 'a')
    swaps = {'192.0.2.10': ADDRESSES[me], '192.0.2.11': ADDRESSES[peer], '192.0.2.100/24': '%s/%d' % (VIP, SUBNET)}
    if node == 'b':
        swaps['priority 250'] = 'priority 200'
    lines = text.splitlines()
    for old, new in swaps.items():
        token = re.compile(r'(?<![\w.])%s(?![\w.])' % re.escape(old))
        hits = [i for i, line in enumerate(lines) if token.search(line) and not line.lstrip().startswith('#')]
        if len(hits) != 1:
            raise AssertionError('contrib/keepalived.conf: expected %r once outside comments, found %d'
                                 % (old, len(hits)))
        lines[hits[0]] = token.sub(new, lines[hits[0]])
    return '\n'.join(lines) + '\n'


def preempts():
    """Whether contrib/keepalived.conf lets a returning higher-priority node take the address back."""
    with open(CONTRIB) as f:
        return not any(line.split()[:1] == ['nopreempt'] for line in f)


def node_xml(password_hash, hosts=(('k1', 8001), ('k2', 8002)), scheduler='roundrobin'):
    """The one config both nodes run."""
    return '''<pdconfig drain="1">
  <service name="web">
    <listen ip="%s:%d"/>
    <group name="main" scheduler="%s">
%s
    </group>
    <check interval="1" timeout="1" rise="2" fall="2"/>
    <timeouts connect="1"/>
  </service>
  <admin listen="*:%d">
    <user name="admin" password="%s" access="full"/>
  </admin>
  <logging access="off"/>
</pdconfig>
''' % (VIP, SERVICE_PORT, scheduler,
       '\n'.join('      <host name="%s" ip="%s:%d"/>' % (name, ADDRESSES['k'], port) for name, port in hosts),
       ADMIN_PORT, password_hash)


class Process(object):
    """A program in a namespace (ip netns exec execs it: our pid is its pid); its output
    in a file, or with pipe=True its stdout to read and only stderr in the file."""

    def __init__(self, ns, argv, directory, name, pipe=False):
        self.name = name
        self.log_path = os.path.join(directory, name + '.log')
        self.log_file = open(self.log_path, 'ab')
        self.proc = subprocess.Popen(in_ns(ns, argv), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE if pipe else self.log_file,
                                     stderr=self.log_file if pipe else subprocess.STDOUT, cwd=directory)

    def output(self, since=0):
        with open(self.log_path, 'rb') as f:
            f.seek(since)
            return f.read().decode('utf-8', 'replace')

    def size(self):
        return os.path.getsize(self.log_path)

    def kill(self, signum=signal.SIGKILL):
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log_file.close()


class Record(object):
    """One client connect: when it started and ended, and the node that served it (None: failed)."""
    __slots__ = ('start', 'end', 'node', 'detail')

    def __init__(self, line):
        start, end, outcome, detail = line.split(' ', 3)
        self.start, self.end = float(start), float(end)
        self.node = detail if outcome == 'ok' else None
        self.detail = detail


class Fleet(object):
    """The namespaces, the links, and every process of the fleet; close() undoes it all."""

    def __init__(self):
        self.tag = '%s-%d' % (PREFIX, os.getpid())
        self.dir = tempfile.mkdtemp(prefix='%s-' % self.tag)
        self.namespaces = []
        self.processes = {}
        self.records = []
        self.records_lock = threading.Lock()
        self.password_hash = pydirector.hash_password(PASSWORD)
        self.config_path = os.path.join(self.dir, 'node.xml')
        with open(self.config_path, 'w') as f:
            f.write(node_xml(self.password_hash))

    def ns(self, name):
        return '%s-%s' % (self.tag, name)

    # -- building -----------------------------------------------------------

    def build(self):
        for name in NAMESPACES:
            run(['ip', 'netns', 'add', self.ns(name)])
            self.namespaces.append(self.ns(name))
            run(['ip', '-n', self.ns(name), 'link', 'set', 'lo', 'up'])
        sw = self.ns('sw')
        run(['ip', '-n', sw, 'link', 'add', 'br0', 'type', 'bridge'])
        run(['ip', '-n', sw, 'link', 'set', 'br0', 'up'])
        for name, address in ADDRESSES.items():
            # Both ends made inside namespaces: nothing appears in the host's own.
            run(['ip', 'link', 'add', 'eth0', 'netns', self.ns(name), 'type', 'veth',
                 'peer', 'name', 'to-' + name, 'netns', sw])
            run(['ip', '-n', sw, 'link', 'set', 'to-' + name, 'master', 'br0', 'up'])
            run(['ip', '-n', self.ns(name), 'addr', 'add', '%s/%d' % (address, SUBNET), 'dev', 'eth0'])
            run(['ip', '-n', self.ns(name), 'link', 'set', 'eth0', 'up'])
        for node in ('a', 'b'):
            # The backup's pydirector listens on the address before it holds it.
            run(in_ns(self.ns(node), ['sysctl', '-q', '-w', 'net.ipv4.ip_nonlocal_bind=1']))
            with open(os.path.join(self.dir, 'keepalived-%s.conf' % node), 'w') as f:
                f.write(keepalived_conf(node))

    def start(self):
        self.build()
        self.processes['backend'] = Process(
            self.ns('k'), [sys.executable, os.path.abspath(__file__), '--backend', ADDRESSES['k']]
            + [str(p) for p in BACKEND_PORTS], self.dir, 'backend')
        for node in ('a', 'b'):
            self.start_pydirector(node)
        for node in ('a', 'b'):
            self.wait_healthz(node, 'OK')
        for node in ('a', 'b'):
            self.start_keepalived(node)
        self.processes['client'] = client = Process(
            self.ns('client'), [sys.executable, os.path.abspath(__file__), '--client', VIP, str(SERVICE_PORT)],
            self.dir, 'client', pipe=True)
        self.reader = threading.Thread(target=self._read_client, args=(client.proc.stdout,), daemon=True)
        self.reader.start()

    def start_pydirector(self, node):
        name = 'pydirector-' + node
        old = self.processes.get(name)
        if old is not None:
            old.kill()
        self.processes[name] = Process(self.ns(node), [sys.executable, support.PYDIRECTOR, '-c', self.config_path],
                                       self.dir, name)

    def start_keepalived(self, node):
        conf = os.path.join(self.dir, 'keepalived-%s.conf' % node)
        pids = [os.path.join(self.dir, 'keepalived-%s.%s.pid' % (node, kind)) for kind in ('main', 'vrrp', 'check')]
        # -n foreground, -l -D log details to the console (our file), -G not to syslog,
        # -P VRRP only; pid files of our own, so parallel keepalived daemons never meet.
        self.processes['keepalived-' + node] = Process(
            self.ns(node), [support.find_binary('keepalived'), '-n', '-l', '-D', '-G', '-P', '-f', conf,
                            '-p', pids[0], '-r', pids[1], '-c', pids[2]], self.dir, 'keepalived-' + node)

    def _read_client(self, stream):
        try:
            for line in stream:
                record = Record(line.decode('ascii').strip())
                with self.records_lock:
                    self.records.append(record)
        except (OSError, ValueError):
            pass    # close() closed the pipe under us

    def close(self):
        for name, process in sorted(self.processes.items()):
            try:
                process.kill(signal.SIGTERM if name.startswith('keepalived') else signal.SIGKILL)
            except Exception:
                pass
        for ns in reversed(self.namespaces):
            remove_namespace(ns)
        self.namespaces = []
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- looking ------------------------------------------------------------

    def holder(self):
        """The nodes that hold the address now (one, unless a failover is under way)."""
        return [node for node in ('a', 'b')
                if (' %s/' % VIP) in run(['ip', '-n', self.ns(node), '-4', '-o', 'addr', 'show', 'dev', 'eth0'])]

    def state(self, node, since=0):
        """keepalived's last state on this node ('MASTER', 'BACKUP', 'FAULT'), or None."""
        states = re.findall(r'\) Entering (\w+) STATE', self.processes['keepalived-' + node].output(since))
        return states[-1] if states else None

    def healthz(self, node):
        """(status, body) of /healthz, asked from inside the node as keepalived asks."""
        out = run(in_ns(self.ns(node), ['curl', '--silent', '--max-time', '3', '--write-out', '|%{http_code}',
                                        'http://127.0.0.1:%d/healthz' % ADMIN_PORT]), check=False)
        body, _, status = out.rpartition('|')
        return status, body

    def wait(self, predicate, timeout, what):
        """wait_until, failing with `what` and the tail of every log."""
        try:
            return wait_until(predicate, timeout, 0.02)
        except AssertionError:
            raise AssertionError('%s\n%s' % (what, self.describe()))

    def wait_healthz(self, node, body, timeout=15):
        self.wait(lambda: self.healthz(node)[1] == body + '\n', timeout,
                  'node %s: /healthz never said %s' % (node, body))

    def since(self, when):
        with self.records_lock:
            return [r for r in self.records if r.end >= when]

    def served_by(self, node, after):
        """The first connect through node that ended after `after`, or None."""
        for record in self.since(after):
            if record.node == ADDRESSES[node]:
                return record
        return None

    def wait_stable(self, timeout=30):
        """One master holding the address and serving, the other node a healthy backup; the master."""
        def stable():
            states = {node: self.state(node) for node in ('a', 'b')}
            if sorted(map(str, states.values())) != ['BACKUP', 'MASTER']:
                return None
            master = [n for n, s in states.items() if s == 'MASTER'][0]
            if self.holder() != [master] or self.healthz('a')[1] != 'OK\n' or self.healthz('b')[1] != 'OK\n':
                return None
            return master
        master = self.wait(stable, timeout, 'the fleet never settled')
        now = time.monotonic()
        self.wait(lambda: self.served_by(master, now), 10, 'no client got through node %s' % master)
        return master

    def describe(self):
        """The tail of every log, for a failure message."""
        parts = []
        for name, process in sorted(self.processes.items()):
            if name == 'client':
                continue
            text = process.output()
            parts.append('--- %s\n%s' % (name, '\n'.join(text.splitlines()[-15:])))
        with self.records_lock:
            last = self.records[-5:]
        parts.append('--- client: %s' % ['%.2f %s' % (r.end, r.node or r.detail) for r in last])
        return '\n'.join(parts)

    # -- scenarios (the test and --measure both use them) -----------------------

    def failover(self, master, event):
        """Cause `event` on the master, then wait for a client served by the other node.
        The failed-connect window: from the first failure to that first success."""
        other = 'b' if master == 'a' else 'a'
        begun = time.monotonic()
        event()
        first_ok = self.wait(lambda: self.served_by(other, begun), 20,
                             'no client got through node %s after the failover' % other)
        failures = [r for r in self.since(begun) if r.node is None and r.start <= first_ok.start]
        return begun, first_ok, failures

    def kill_pydirector(self, master):
        """Scenario 1: SIGKILL pydirector on the master.  (begun, first ok, failures)."""
        return self.failover(master, lambda: self.processes['pydirector-' + master].proc.kill())

    def restart_pydirector(self, node):
        """Start pydirector again; wait until keepalived counts the node in again (BACKUP or MASTER)."""
        mark = self.processes['keepalived-' + node].size()
        self.start_pydirector(node)
        self.wait_healthz(node, 'OK')
        self.wait(lambda: self.state(node, mark) in ('BACKUP', 'MASTER'), 15,
                  'node %s: keepalived never took it back' % node)
        return mark

    def cut_backends(self, node, cut=True):
        """Scenario 2: the node loses (or regains) every backend, and only this node:
        a route in its namespace refuses them, as a broken link or firewall would."""
        run(['ip', '-n', self.ns(node), 'route', 'add' if cut else 'del', 'prohibit',
             '%s/32' % ADDRESSES['k']])

    def heal_backends(self, node):
        mark = self.processes['keepalived-' + node].size()
        self.cut_backends(node, cut=False)
        self.wait_healthz(node, 'OK')
        self.wait(lambda: self.state(node, mark) in ('BACKUP', 'MASTER'), 15,
                  'node %s: keepalived never took it back' % node)

    def admin_cli(self, *args):
        """pydirector_admin.py in the client's namespace, at both nodes' admin servers."""
        env = dict(os.environ, PYDIRECTOR_ADMIN_PASSWORD=PASSWORD)
        argv = in_ns(self.ns('client'), [sys.executable, ADMIN] + list(args[:1]) +
                     ['--url', 'http://admin@%s:%d' % (ADDRESSES['a'], ADMIN_PORT),
                      '--url', 'http://admin@%s:%d' % (ADDRESSES['b'], ADMIN_PORT)] + list(args[1:]))
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, timeout=60)
        return proc.returncode, proc.stdout.decode('utf-8', 'replace')


def skip_reason():
    """Why the fleet cannot run here, or None."""
    if not sys.platform.startswith('linux'):
        return 'network namespaces are Linux only'
    for program, package in (('ip', 'iproute2'), ('keepalived', 'keepalived'), ('curl', 'curl'),
                             ('sysctl', 'procps')):
        if support.find_binary(program) is None:
            return '%s is not installed (.ci/run installs %s)' % (program, package)
    if os.geteuid() != 0:
        return 'network namespaces need root (CAP_NET_ADMIN)'
    # A namespace with a veth pair in it: what the fleet needs (CAP_SYS_ADMIN, CAP_NET_ADMIN).
    probe = '%s-%d-probe' % (PREFIX, os.getpid())
    out = run(['ip', 'netns', 'add', probe], check=False)
    if probe not in run(['ip', 'netns', 'list'], check=False):
        return 'cannot make a network namespace here: %s' % out.strip()
    try:
        out = run(['ip', '-n', probe, 'link', 'add', 'p0', 'type', 'veth', 'peer', 'name', 'p1'], check=False)
        if 'p1' not in run(['ip', '-n', probe, 'link', 'show'], check=False):
            return 'cannot make a veth pair in a network namespace here: %s' % out.strip()
    finally:
        run(['ip', 'netns', 'delete', probe], check=False)
    return None


def open_fleet():
    """Leftovers removed, the lock taken (waiting for another suite's fleet), the fleet
    up and settled: (fleet, lock file).  On any failure everything is undone first."""
    lock = open(LOCK, 'a')
    fcntl.flock(lock, fcntl.LOCK_EX)
    fleet = None
    try:
        remove_leftovers()
        fleet = Fleet()
        fleet.start()
        fleet.wait_stable()
    except BaseException:
        if fleet is not None:
            fleet.close()
        lock.close()
        raise
    return fleet, lock


class FleetTest(unittest.TestCase):
    """The scenarios of issue 14, one failover each, on one fleet."""

    @classmethod
    def setUpClass(cls):
        reason = skip_reason()
        if reason:
            raise unittest.SkipTest(reason)
        cls.fleet, cls.lock = open_fleet()

    @classmethod
    def tearDownClass(cls):
        cls.fleet.close()
        cls.lock.close()

    def assertServedOnlyBy(self, node, records):
        served = set(r.node for r in records if r.node is not None)
        self.assertEqual(served, {ADDRESSES[node]}, self.fleet.describe())

    def test_1_pydirector_dies_then_node_a_comes_back(self):
        fleet = self.fleet
        master = fleet.wait_stable()
        if master != 'a':
            # Node a, the higher priority, must start as master for scenario 3 to mean anything:
            # restart b's keepalived (its stop hands the address over at once).
            fleet.processes['keepalived-b'].kill(signal.SIGTERM)
            fleet.start_keepalived('b')
            master = fleet.wait_stable()
            self.assertEqual(master, 'a')
        # 1. pydirector dies on the master.
        begun, first_ok, failures = fleet.kill_pydirector('a')
        self.assertTrue(failures, 'no connect failed: the kill went unnoticed?')
        self.assertLess(first_ok.end - begun, FAILOVER_LIMIT, fleet.describe())
        self.assertEqual(fleet.holder(), ['b'])
        self.assertEqual(fleet.state('a'), 'FAULT')
        # 3. node a comes back: as a backup (nopreempt), or as the master again (preempt).
        mark = fleet.restart_pydirector('a')
        back = time.monotonic()
        if preempts():
            fleet.wait(lambda: fleet.holder() == ['a'], 10, 'node a did not take the address back')
            fleet.wait(lambda: fleet.served_by('a', back), 10, 'no client got through node a')
        else:
            self.assertEqual(fleet.state('a', mark), 'BACKUP')
            # A preempting node takes over on the first advert it hears (one a second):
            # the address staying put through two is the answer.
            def settled():
                self.assertEqual(fleet.holder(), ['b'], fleet.describe())
                return time.monotonic() > back + 2
            wait_until(settled, 10, 0.1)
            self.assertEqual(fleet.state('a', mark), 'BACKUP')
            self.assertServedOnlyBy('b', fleet.since(back))
        self.assertEqual(fleet.wait_stable(), 'a' if preempts() else 'b')

    def test_2_backends_go_down(self):
        fleet = self.fleet
        master = fleet.wait_stable()
        other = 'b' if master == 'a' else 'a'
        self.addCleanup(fleet.heal_backends, master)
        begun, first_ok, failures = fleet.failover(master, lambda: fleet.cut_backends(master))
        self.assertTrue(failures, 'no connect failed: were the backends cut?')
        self.assertEqual(fleet.healthz(master), ('503', 'DOWN 1\n'))
        self.assertEqual(fleet.healthz(other), ('200', 'OK\n'))
        self.assertEqual(fleet.holder(), [other])
        self.assertEqual(fleet.state(master), 'FAULT')
        self.assertIn('permission denied', fleet.processes['pydirector-' + master].output())

    def test_4_apply_to_both_nodes(self):
        fleet = self.fleet
        master = fleet.wait_stable()
        new = os.path.join(fleet.dir, 'new.xml')
        with open(new, 'w') as f:
            f.write(node_xml(fleet.password_hash, scheduler='leastconns',
                             hosts=(('k1', 8001), ('k2', 8002), ('k3', 8003))))
        status, out = fleet.admin_cli('diff', new)
        self.assertEqual(status, 1, out)    # differences, as diff(1) says
        self.assertEqual(out.count('addHost service=web group=main name=k3 ip=%s:8003' % ADDRESSES['k']), 2, out)
        begun = time.monotonic()
        status, out = fleet.admin_cli('apply', new)
        self.assertEqual(status, 0, out)
        self.assertEqual(out.count('OK added host k3'), 2, out)
        done = time.monotonic()
        status, out = fleet.admin_cli('diff', new)
        self.assertEqual((status, out.count('# no changes')), (0, 2), out)
        # No client noticed; the master serves on.
        fleet.wait(lambda: fleet.served_by(master, done), 10, 'no client got through after apply')
        during = [r for r in fleet.since(begun) if r.start <= done]
        self.assertTrue(during)
        self.assertEqual([r.detail for r in during if r.node is None], [])


# ---------------------------------------------------------------------------
# The helper programs the fleet runs in its namespaces, and --measure.

def backend_main(address, ports):
    """Answer every connection with 'via <peer address>\\n', then close: the client learns the node."""
    selector = selectors.DefaultSelector()
    for port in ports:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, int(port)))
        sock.listen(128)
        selector.register(sock, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            try:
                conn, peer = key.fileobj.accept()
            except OSError:
                continue
            try:
                conn.sendall(('via %s\n' % peer[0]).encode())
            except OSError:
                pass
            conn.close()


def client_main(address, port):
    """Connect, read the answer, print 'START END ok NODE' or 'START END fail WHY'; again."""
    port = int(port)
    while True:
        start = time.monotonic()
        try:
            # 0.1 s: on a LAN a connect takes well under a millisecond, and one sent to
            # the old master as it drops the address waits for nothing.
            sock = socket.create_connection((address, port), timeout=0.1)
            try:
                sock.settimeout(2)
                data = b''
                while True:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            finally:
                sock.close()
            words = data.split()
            if len(words) == 2 and words[0] == b'via':
                outcome = 'ok ' + words[1].decode('ascii', 'replace')
            else:
                outcome = 'fail answer=%r' % data[:40]
        except OSError as e:
            outcome = 'fail %s' % (errno.errorcode.get(e.errno, type(e).__name__) if e.errno else type(e).__name__)
        print('%.6f %.6f %s' % (start, time.monotonic(), outcome), flush=True)
        time.sleep(CLIENT_PAUSE)


def measure(count):
    """Scenarios 1 and 2, `count` failovers each; the failed-connect windows."""
    reason = skip_reason()
    if reason:
        print('cannot measure: %s' % reason)
        return 1
    fleet, lock = open_fleet()
    results = {}
    try:
        for scenario in ('pydirector killed', 'backends cut'):
            windows = []
            for i in range(count):
                master = fleet.wait_stable()
                if scenario == 'pydirector killed':
                    begun, first_ok, failures = fleet.kill_pydirector(master)
                    fleet.restart_pydirector(master)
                else:
                    begun, first_ok, failures = fleet.failover(master, lambda: fleet.cut_backends(master))
                    fleet.heal_backends(master)
                start = failures[0].start if failures else begun
                windows.append(first_ok.end - start)
                print('%s, failover %d (from node %s): failed connects for %.2f s (%d failed), '
                      'first success %.2f s after the event'
                      % (scenario, i + 1, master, windows[-1], len(failures), first_ok.end - begun), flush=True)
            results[scenario] = windows
    finally:
        fleet.close()
        lock.close()
    for scenario, windows in results.items():
        print('%s: failed-connect window over %d failovers: median %.2f s, max %.2f s'
              % (scenario, len(windows), statistics.median(windows), max(windows)))
    return 0


if __name__ == '__main__':
    if sys.argv[1:2] == ['--backend']:
        backend_main(sys.argv[2], sys.argv[3:])
    elif sys.argv[1:2] == ['--client']:
        client_main(sys.argv[2], sys.argv[3])
    elif sys.argv[1:2] == ['--measure']:
        sys.exit(measure(int(sys.argv[2]) if len(sys.argv) > 2 else 5))
    else:
        unittest.main()
