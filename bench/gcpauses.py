#!/usr/bin/env python3
"""pydirector with its garbage collector watched: every collection's CPU time.

    python3 bench/gcpauses.py [--freeze] [--report PATH] -c CONFIG.xml
    pypy3 bench/gcpauses.py -c CONFIG.xml

Runs pydirector.py's main() from this checkout (the rest of the command line is
its own), with a gc callback (CPython) or gc.hooks (PyPy) that times each
collection in thread CPU time, so the figure holds on a busy machine too.
--freeze calls gc.collect() and gc.freeze() (CPython 3.7+) as the loop starts,
so that full collections no longer walk what startup made.  At exit (SIGTERM)
it writes, to --report or stderr, one line per kind of collection: count,
total, p99 and max in milliseconds, and the loop iterations that took more than
1 ms of CPU (one process only: no workers).
"""

import gc
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import pydirector  # noqa: E402

cpu = getattr(time, 'thread_time', time.perf_counter)
pauses = {}         # kind -> [milliseconds]


def watch():
    if hasattr(gc, 'callbacks'):
        started = [0.0]

        def callback(phase, info):
            if phase == 'start':
                started[0] = cpu()
            else:
                pauses.setdefault('gen%d' % info['generation'], []).append((cpu() - started[0]) * 1000)
        gc.callbacks.append(callback)
        return

    class Hooks(object):        # PyPy: durations in seconds, summed since the last call
        def on_gc_minor(self, stats):
            pauses.setdefault('minor', []).extend([stats.duration_max * 1000] + [0.0] * (stats.count - 1))

        def on_gc_collect_step(self, stats):
            pauses.setdefault('major step', []).extend([stats.duration_max * 1000] + [0.0] * (stats.count - 1))

        def on_gc_collect(self, stats):
            pauses.setdefault('major', []).extend([0.0] * stats.count)
    gc.hooks.set(Hooks())


def report(path):
    lines = []
    for kind in sorted(pauses):
        values = sorted(pauses[kind])
        if kind.startswith('major') and not kind.endswith('step'):
            lines.append('%-10s %6d' % (kind, len(values)))
            continue
        lines.append('%-10s %6d  total %8.2f ms  p99 %6.3f ms  max %6.3f ms' % (
            kind, len(values), sum(values), values[min(len(values) - 1, int(len(values) * 0.99))], values[-1]))
    if not lines:
        lines.append('no collection')
    text = '\n'.join(lines) + '\n'
    if path:
        with open(path, 'w') as f:
            f.write(text)
        with open(path + '.json', 'w') as f:
            json.dump(pauses, f)
    else:
        sys.stderr.write(text)


def main():
    argv = sys.argv[1:]
    freeze = '--freeze' in argv
    if freeze:
        argv.remove('--freeze')
    path = None
    if '--report' in argv:
        at = argv.index('--report')
        path = argv[at + 1]
        del argv[at:at + 2]
    if freeze:
        if not hasattr(gc, 'freeze'):
            sys.exit('gcpauses: this Python has no gc.freeze()')
        for loop_class in (pydirector.EpollLoop, pydirector.SelectorLoop):
            def run(self, _run=loop_class.run):
                gc.collect()
                gc.freeze()
                return _run(self)
            loop_class.run = run
    watch()
    try:
        return pydirector.main(argv)
    finally:
        report(path)


if __name__ == '__main__':
    sys.exit(main())
