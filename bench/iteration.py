#!/usr/bin/env python3
"""What one loop iteration that handles one event costs, per loop.

    python3 bench/iteration.py [--pydirector PATH/pydirector.py] [--n 200000]

A socketpair ping: the handler of one end reads its byte and writes one to the
other end, so every iteration of the loop handles exactly one event with the
same two syscalls.  CPU seconds (this process, user+system) per iteration, for
pydirector's Loop (epoll and, with PYDIRECTOR_SELECTOR=selectors, the portable
one) and for a bare select.epoll loop that does nothing else, in the same run.
"""

import argparse
import importlib.util
import os
import resource
import select
import socket
import sys


def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def bare(n):
    """The least an epoll loop can do per event."""
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    ep = select.epoll()
    ep.register(a.fileno(), select.EPOLLIN)
    left = [n]
    recv, send = a.recv, b.send

    def on_event(mask):
        recv(1)
        left[0] -= 1
        send(b'x')
    handlers = {a.fileno(): on_event}
    send(b'x')
    start = cpu()
    poll = ep.poll
    while left[0] > 0:
        for fd, mask in poll(-1):
            handlers[fd](mask)
    used = cpu() - start
    ep.close()
    a.close()
    b.close()
    return used / n


def with_loop(module, loop_class, n):
    loop = loop_class()
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    left = [n]
    recv, send = a.recv, b.send

    def on_event(mask):
        recv(1)
        left[0] -= 1
        if left[0] <= 0:
            loop.stop()
        else:
            send(b'x')
    if hasattr(loop, 'add'):
        loop.add(a.fileno(), module.EVENT_READ, on_event)
    else:   # the selectors-era Loop (before the epoll one): its selector, the handler as data
        loop.selector.register(a, module.EVENT_READ, on_event)
    send(b'x')
    start = cpu()
    loop.run()
    used = cpu() - start
    loop.close()
    a.close()
    b.close()
    return used / n


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    spec.loader.exec_module(module)
    sys.path.pop(0)
    return module


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--pydirector', action='append', default=[],
                   help='a pydirector.py to measure (default: the one beside bench/); repeat to compare')
    p.add_argument('--n', type=int, default=200000, help='iterations per measurement')
    p.add_argument('--rounds', type=int, default=5)
    args = p.parse_args()
    paths = args.pydirector or [os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                             'pydirector.py')]
    rows = {}
    for index, path in enumerate(paths):
        module = load(path, 'pydirector_%d' % index)
        classes = [(getattr(module, name), name) for name in ('EpollLoop', 'SelectorLoop') if hasattr(module, name)]
        if not classes:
            classes = [(module.Loop, 'Loop (selectors)')]
        for cls, name in classes:
            rows['%s %s' % (path, name)] = (module, cls)
    results = {'bare select.epoll': []}
    results.update((key, []) for key in rows)
    for _ in range(args.rounds):
        results['bare select.epoll'].append(bare(args.n))
        for key, (module, cls) in rows.items():
            results[key].append(with_loop(module, cls, args.n))
    base = sorted(results['bare select.epoll'])[args.rounds // 2]
    print('Python %s, %d iterations x %d rounds, median CPU per iteration (one event, two syscalls):'
          % (sys.version.split()[0], args.n, args.rounds))
    for key, values in results.items():
        median = sorted(values)[args.rounds // 2]
        print('  %-70s %6.2f us  %.2fx bare' % (key, median * 1e6, median / base))


if __name__ == '__main__':
    main()
