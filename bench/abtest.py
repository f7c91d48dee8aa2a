#!/usr/bin/env python3
"""Old against new: CPU per connection of two pydirector trees and pyfloor, interleaved.

    python3 bench/abtest.py --old DIR [--pyfloor PATH] [--python PY] [--rounds 7]
                            [--n 20000] [--workload newconn|keepalive] [--tree NAME=DIR ...]
                            [--workers N] [--clients NAME=ATTRS ...]

Needs nginx, ab and wrk (bench/bench.py installs them).  Starts nginx on two
loopback ports, then each target (pyfloor, old, new, old and new with the access
log on) once, and runs ab -c 50 (or wrk -c 50 for 4 s) against each in turn,
round after round, so the machine's drift hits every target alike.  Prints the
median CPU per connection (or request), total and user space apart: the user
part is the interpreter's, and it moves much less than the kernel's from round
to round on a shared machine.  --tree NAME=DIR adds a tree (access log off),
such as one patched to leave one thing out, which prices that thing.  /proc
tick resolution: 1/CLK_TCK over n.  --workers N runs each pydirector as a
master and N workers, its CPU the sum over them all (each target is warmed
up first, so the workers' start is not counted).  --clients NAME=ATTRS gives
target NAME's service <clients ATTRS/> (ab connects from one address, so with
limits high enough to refuse nothing, every connection is admitted and
released through one entry): with --tree NAME=. it prices per-client limits.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(os.path.join(HERE, 'tools'))
from processes import child_pids, free_port, stat_fields, wait_listening  # noqa: E402

TICK = os.sysconf('SC_CLK_TCK')


def cpu(pid):
    """(user, system) ticks of a process and its children (a master's workers)."""
    user = system = 0
    for each in [pid] + child_pids(pid):
        try:
            fields = stat_fields('/proc/%d/stat' % each)
        except OSError:
            continue
        user += int(fields[11])
        system += int(fields[12])
    return user, system


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--old', required=True, help='a tree holding the old pydirector.py')
    parser.add_argument('--pyfloor', help='the featureless relay, run as the anchor')
    parser.add_argument('--python', default=sys.executable)
    parser.add_argument('--rounds', type=int, default=7)
    parser.add_argument('--n', type=int, default=20000)
    parser.add_argument('--workload', choices=('newconn', 'keepalive'), default='newconn')
    parser.add_argument('--tree', action='append', default=[], metavar='NAME=DIR',
                        help='another tree to run beside old and new, access log off (repeatable)')
    parser.add_argument('--workers', type=int, help='run each pydirector with this many worker processes')
    parser.add_argument('--clients', action='append', default=[], metavar='NAME=ATTRS',
                        help='<clients ATTRS/> in target NAME\'s service, e.g. limits=\'maxconns="1000" rate="1e6"\'')
    args = parser.parse_args()
    clients = dict(spec.partition('=')[::2] for spec in args.clients)
    trees = [spec.partition('=')[::2] for spec in args.tree]
    for spec, (name, tree) in zip(args.tree, trees):
        if name in ('', 'pyfloor', 'old', 'new', 'old-log', 'new-log') or not os.path.isfile(os.path.join(tree, 'pydirector.py')):
            sys.exit('abtest: --tree wants NAME=DIR, a new NAME and a DIR holding pydirector.py: %r' % spec)
    work = tempfile.mkdtemp(prefix='pydirector-abtest-')
    b1, b2 = free_port(), free_port()
    with open(os.path.join(work, 'nginx.conf'), 'w') as f:
        f.write('worker_processes 1; pid %s/nginx.pid; error_log %s/nginx.err; daemon off;\n'
                'events { worker_connections 4096; }\n'
                'http { access_log off; server { listen 127.0.0.1:%d; listen 127.0.0.1:%d;\n'
                '  location / { return 200 "%s"; } } }\n' % (work, work, b1, b2, '0123456789' * 10))
    procs = [subprocess.Popen(['nginx', '-c', os.path.join(work, 'nginx.conf')])]
    targets = []

    def pydirector(name, tree, log):
        port = free_port()
        path = os.path.join(work, '%s.xml' % name)
        with open(path, 'w') as f:
            f.write('<pdconfig drain="1"%s><service name="ab" maxconns="9500"><listen ip="127.0.0.1:%d"/>'
                    '<group name="g" scheduler="roundrobin"><host name="one" ip="127.0.0.1:%d"/>'
                    '<host name="two" ip="127.0.0.1:%d"/></group><timeouts connect="5" idle="3600"/>%s'
                    '</service><logging file="%s/%s.log"%s/></pdconfig>'
                    % (' workers="%d"' % args.workers if args.workers else '',
                       port, b1, b2, '<clients %s/>' % clients[name] if name in clients else '',
                       work, name, '' if log else ' access="off"'))
        targets.append((name, [args.python, os.path.join(tree, 'pydirector.py'), '-c', path], port))

    if args.pyfloor:
        port = free_port()
        targets.append(('pyfloor', [args.python, args.pyfloor, '127.0.0.1:%d' % port,
                                    '127.0.0.1:%d' % b1, '127.0.0.1:%d' % b2], port))
    pydirector('old', args.old, False)
    pydirector('new', HERE, False)
    pydirector('old-log', args.old, True)
    pydirector('new-log', HERE, True)
    for name, tree in trees:
        pydirector(name, tree, False)
    try:
        if not wait_listening(b1):
            sys.exit('abtest: nginx did not start')
        running = {}
        for name, cmd, port in targets:
            running[name] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(running[name])
        for name, cmd, port in targets:
            if not wait_listening(port):
                sys.exit('abtest: %s did not start' % name)
            if args.workers:
                subprocess.run(['ab', '-q', '-c', '10', '-n', '500', 'http://127.0.0.1:%d/' % port],
                               stdout=subprocess.DEVNULL)
        results = {name: [] for name, _, _ in targets}
        for _ in range(args.rounds):
            for name, cmd, port in targets:
                url = 'http://127.0.0.1:%d/' % port
                user0, sys0 = cpu(running[name].pid)
                if args.workload == 'newconn':
                    subprocess.run(['ab', '-q', '-c', '50', '-n', str(args.n), url], stdout=subprocess.DEVNULL)
                    count = args.n
                else:
                    out = subprocess.run(['wrk', '-t1', '-c50', '-d4s', url], stdout=subprocess.PIPE,
                                         universal_newlines=True).stdout
                    count = int([line for line in out.splitlines() if 'requests in' in line][0].split()[0])
                user1, sys1 = cpu(running[name].pid)
                scale = 1e6 / TICK / count
                results[name].append(((user1 - user0) * scale, (user1 - user0 + sys1 - sys0) * scale))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)
    anchor = 'pyfloor' if args.pyfloor else 'old'
    base_total = statistics.median(total for _, total in results[anchor])
    base_user = statistics.median(user for user, _ in results[anchor])
    print('%s, %s, %d rounds; CPU µs per %s, medians (ratio to %s)'
          % (args.python, args.workload, args.rounds,
             'connection' if args.workload == 'newconn' else 'request', anchor))
    for name, runs in results.items():
        total = statistics.median(t for _, t in runs)
        user = statistics.median(u for u, _ in runs)
        print('%-8s total %6.1f (%.2f×)  user %6.1f (%.2f×)  rounds: %s' % (
            name, total, total / base_total, user, user / base_user, ' '.join('%.0f' % t for _, t in runs)))


if __name__ == '__main__':
    main()
