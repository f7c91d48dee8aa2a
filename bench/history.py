"""What the history of /running costs: memory per host and time per sample.

    python3 bench/history.py [--hosts 10000] [--samples 50] [--workers 2]

Times are CPU time (time.process_time).  Builds a Director (its loop never runs) with one service of N hosts, then:
- memory: what History.layout allocates (tracemalloc), per host, and the process's
  RSS before and after;
- a sample (History.sample, every 5 s on the loop): the median and the worst of
  --samples, with every host's counts changing between them;
- a layout again after one host is added (the next sample after addHost, a reload,
  a discovery answer);
- a snapshot (on the loop) with and without the series, and expand_history,
  which makes their lists in the admin's thread;
- with workers (--workers N): a master's sample, which first reads the sums of
  the shared counters (Master.read_counts), with no worker process started.
"""

import argparse
import os
import random
import statistics
import sys
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pydirector  # noqa: E402


def rss_kib():
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1])
    return 0


def config(hosts):
    lines = ['<pdconfig>', '  <service name="web">', '    <listen ip="127.0.0.1:1"/>',
             '    <group name="main" scheduler="leastconns">']
    for n in range(hosts):
        lines.append('      <host name="h%d" ip="10.%d.%d.%d:80"/>' % (n, n >> 16 & 255, n >> 8 & 255, n & 255))
    lines += ['    </group>', '  </service>', '</pdconfig>']
    return pydirector.parse_config('\n'.join(lines), 'bench.xml')


def timed(fn, times):
    """The CPU seconds of each of `times` calls: on a busy machine, the wall clock
    would count the others' time too."""
    took = []
    for _ in range(times):
        began = time.process_time()
        fn()
        took.append(time.process_time() - began)
    return took


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--hosts', type=int, default=10000)
    parser.add_argument('--samples', type=int, default=50)
    parser.add_argument('--workers', type=int, default=2)
    args = parser.parse_args()
    director = pydirector.Director(config(args.hosts), resolve_names=False)
    hosts = director.services['web'].groups['main'].scheduler.hosts
    history = director.history
    before = rss_kib()
    tracemalloc.start()
    history.start()
    allocated = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    after = rss_kib()
    history.stop()
    things = len(history.things)
    print('python %s, %d hosts (%d services and hosts in the history, %d samples of %d series each)' % (
        sys.version.split()[0], args.hosts, things, pydirector.HISTORY_SAMPLES, len(pydirector.HISTORY_SERIES)))
    print('memory: %d bytes per host (tracemalloc: %.1f MiB in all); RSS %+.1f MiB' % (
        allocated / things, allocated / 2 ** 20, (after - before) / 1024.0))
    rng = random.Random(1)

    def traffic():
        for host in hosts:
            host.total += rng.randrange(10)
            host.open = rng.randrange(100)
    samples = []
    for _ in range(args.samples):
        traffic()
        samples += timed(history.sample, 1)
    print('sample: median %.2f ms, max %.2f ms (every %g s on the loop: %.3f%% of it)' % (
        statistics.median(samples) * 1e3, max(samples) * 1e3, pydirector.HISTORY_STEP,
        100 * statistics.median(samples) / pydirector.HISTORY_STEP))
    service, group = director.services['web'], director.services['web'].groups['main']
    director.add_running_host(service, group, pydirector.host_config(name='new', ip='10.255.255.255:80'), False)
    print('sample after a host was added (a new layout): %.2f ms' % (timed(history.sample, 1)[0] * 1e3))
    for series in (False, True):
        took = timed(lambda: director.snapshot(series=series), 3)
        print('snapshot on the loop%s: median %.1f ms' % (
            ' with the series (/running, running.json)' if series else ' (/metrics, running.txt, running.csv)',
            statistics.median(took) * 1e3))
    snapshot = director.snapshot()
    took = timed(lambda: pydirector.expand_history(snapshot), 1)
    print('expand_history, in the admin thread: %.1f ms' % (took[0] * 1e3))
    if args.workers:
        master = pydirector.Master(director, args.workers)
        took = timed(history.sample, args.samples)
        print('master with %d workers, reading the shared counters first: median %.2f ms, max %.2f ms' % (
            args.workers, statistics.median(took) * 1e3, max(took) * 1e3))
        master.close()
    director.loop.close()


if __name__ == '__main__':
    main()
