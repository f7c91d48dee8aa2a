"""The event loop on its own, both pollers: epoll (Linux) and selectors (portable).

One contract mixin, a three-line subclass per loop, as CPython's test_selectors
does.  Real socketpairs; no balancer except where a handler's bug is injected
into a live one (the bug must close its own connection, log once, and leave
the loop and every other connection alone).
"""

import os
import socket
import threading
import time
import unittest

import support
from support import BalancerCase, Background, cpu_seconds_of, echo, exchange, service_xml, wait_until

import pydirector


class RunningLoop(object):
    """A loop running in a thread of its own; stop() ends it."""

    def __init__(self, loop):
        self.loop = loop
        self.thread = threading.Thread(target=loop.run, daemon=True)
        self.thread.start()
        wait_until(lambda: loop.thread_ident is not None)

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class LoopContract(object):
    """What every loop must do; loop_class is set by the subclasses below."""

    loop_class = None

    def make_loop(self):
        running = RunningLoop(self.loop_class())
        self.addCleanup(running.stop)
        return running.loop

    def socketpair(self):
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        return a, b

    def test_readable_and_writable(self):
        loop = self.make_loop()
        a, b = self.socketpair()
        seen = []
        readable = threading.Event()

        def on_event(mask):
            seen.append(mask)
            if mask & pydirector.EVENT_READ:
                a.recv(100)
                readable.set()
        loop.call(loop.add, a.fileno(), pydirector.EVENT_READ, on_event)
        b.send(b'x')
        self.assertTrue(readable.wait(5))
        self.assertTrue(seen[-1] & pydirector.EVENT_READ)
        writable = threading.Event()
        loop.call(loop.modify, a.fileno(), pydirector.EVENT_WRITE, lambda mask: writable.set())
        self.assertTrue(writable.wait(5))
        loop.call(loop.remove, a.fileno())

    def test_call_returns_and_raises(self):
        loop = self.make_loop()
        self.assertEqual(loop.call(lambda x, y=0: x + y, 2, y=3), 5)
        with self.assertRaises(ZeroDivisionError):
            loop.call(lambda: 1 / 0)

    def test_call_that_never_started_never_runs(self):
        # Bug 3 of the structure issue: a stuck loop gives LoopTimeout, and the
        # call given up on must not run later behind the caller's back.
        loop = self.make_loop()
        release = threading.Event()
        ran = []
        loop.call_soon_threadsafe(release.wait, 10)
        with self.assertRaises(pydirector.LoopTimeout):
            loop.call(ran.append, 'late', timeout=0.2)
        release.set()
        loop.call(lambda: None)     # the loop is past where the abandoned call was queued
        self.assertEqual(ran, [])

    def test_call_that_started_is_answered_however_long_it_takes(self):
        # Bug 3: once fn has started, its answer is returned, not a 503 for a change made.
        loop = self.make_loop()
        started = threading.Event()
        release = threading.Event()

        def change():
            started.set()
            release.wait(10)
            return 'made'
        threading.Timer(0.5, release.set).start()   # lets it finish well after the timeout
        self.assertEqual(loop.call(change, timeout=0.1), 'made')
        self.assertTrue(started.is_set())

    def test_a_handler_that_raises_is_dropped_and_its_owner_closed(self):
        # Bug 2: level-triggered polling would run a raising handler on every
        # iteration; it must run once, be logged once, and its owner closed.
        loop = self.make_loop()
        a, b = self.socketpair()
        class Owner(object):
            calls = 0
            closed = threading.Event()

            def on_event(self, mask):
                Owner.calls += 1
                raise RuntimeError('injected bug')

            def close_on_error(self):
                Owner.closed.set()

            def __repr__(self):
                return '<the owner>'
        owner = Owner()
        loop.call(loop.add, a.fileno(), pydirector.EVENT_READ, owner.on_event)
        b.send(b'never read')
        self.assertTrue(Owner.closed.wait(5))
        loop.call(lambda: None)
        loop.call(lambda: None)
        self.assertEqual(Owner.calls, 1)
        tracebacks = self.take_tracebacks()
        self.assertEqual(len(tracebacks), 1, tracebacks)
        self.assertIn('unexpected error in <the owner>; closing it', tracebacks[0])
        self.assertIn('RuntimeError: injected bug', tracebacks[0])
        self.assertEqual(loop.call(lambda: 7), 7)   # the loop goes on

    def test_an_fd_closed_earlier_in_a_batch_gets_no_stale_event(self):
        # Two sockets ready in one batch: whichever handler runs first closes the
        # other and makes a new socket, which the kernel may give the same number;
        # the closed one's event from that batch must reach nobody.
        loop = self.make_loop()
        pairs = [self.socketpair(), self.socketpair()]
        stale = []
        closed = []
        done = threading.Event()
        keep = []

        def handler(index):
            def on_event(mask):
                if closed:
                    stale.append((index, mask))     # ran after its socket was closed
                    return
                mine, other = pairs[index][0], pairs[1 - index][0]
                mine.recv(10)
                loop.remove(mine.fileno())
                number = other.fileno()
                loop.forget(number)
                other.close()
                closed.append(number)
                e, f = socket.socketpair()
                keep.extend([e, f])
                if e.fileno() == number:     # the number reused: give it a handler too
                    loop.add(e.fileno(), pydirector.EVENT_READ, lambda mask: stale.append(('reused', mask)))
                done.set()
            return on_event

        def setup():
            for index in (0, 1):
                loop.add(pairs[index][0].fileno(), pydirector.EVENT_READ, handler(index))
        for _, writer in pairs:
            writer.send(b'x')
        loop.call(setup)
        self.assertTrue(done.wait(5))
        loop.call(lambda: None)
        self.assertEqual(stale, [])
        for sock in keep:
            if sock.fileno() in closed:
                loop.call(loop.remove, sock.fileno())
            sock.close()

    def test_timers_run_in_order_and_cancel(self):
        loop = self.make_loop()
        order = []
        done = threading.Event()

        def setup():
            loop.call_later(0.05, order.append, 2)
            loop.call_later(0.01, order.append, 1)
            loop.call_later(0.03, order.append, 'cancelled').cancel()
            loop.call_later(0.08, done.set)
        loop.call(setup)
        self.assertTrue(done.wait(5))
        self.assertEqual(order, [1, 2])

    def test_timer_counts_from_the_loop_clock_running_and_from_now_before(self):
        # Running, call_later reads the iteration's clock (loop.now), not a fresh
        # one; before run() that clock may be stale, and must not be used.
        idle = self.loop_class()
        self.addCleanup(idle.close)
        idle.now -= 100.0                   # as if built long before it runs
        before = time.monotonic()
        timer = idle.call_later(5.0, lambda: None)
        self.assertGreaterEqual(timer.when, before + 5.0)

        loop = self.make_loop()
        seen = {}
        fired = threading.Event()

        def fire():
            seen['fired'] = loop.now
            fired.set()

        def setup():
            seen['set'] = loop.now
            seen['timer'] = loop.call_later(0.05, fire)
        loop.call(setup)
        self.assertTrue(fired.wait(5))
        self.assertEqual(seen['timer'].when, seen['set'] + 0.05)
        self.assertGreaterEqual(seen['fired'], seen['set'] + 0.05)


@unittest.skipUnless(hasattr(pydirector, 'EpollLoop') and hasattr(__import__('select'), 'epoll'), 'needs epoll')
class EpollLoopTest(LoopContract, BalancerCase):
    loop_class = pydirector.EpollLoop


class SelectorLoopTest(LoopContract, BalancerCase):
    loop_class = pydirector.SelectorLoop


class HandlerBugInTheBalancerTest(BalancerCase):
    """A bug in one connection's handler, in a live balancer under background load."""

    def test_one_log_line_bounded_cpu_others_untouched(self):
        backend = self.backend(echo, 'one')
        bg = support.EchoServer(name='bg')
        self.addCleanup(bg.close)
        balancer = self.start(service_xml([('one', backend.address)]),
                              service_xml([('bg', bg.address)], name='bg'))
        background = Background(balancer.port('bg'), 20, seed=5)
        self.addCleanup(background.stop)
        background.start()
        victim = socket.create_connection(('127.0.0.1', balancer.port()), timeout=10)
        self.addCleanup(victim.close)
        victim.sendall(b'first')
        self.assertEqual(victim.recv(100), b'first')
        port = victim.getsockname()[1]
        real = pydirector.Pair._relay

        # Linux reuses a local port for connections to different destinations, so a
        # background client to 'bg' may share the victim's port: match the service too.
        def buggy(pair, source, dest, upstream):
            if pair.client_port == port and pair.service.name == 'web':
                raise RuntimeError('injected bug for one client')
            return real(pair, source, dest, upstream)
        pydirector.Pair._relay = buggy
        self.addCleanup(setattr, pydirector.Pair, '_relay', real)
        loop_stat = '/proc/%s/stat' % balancer.call(lambda: os.readlink('/proc/thread-self'))
        victim.sendall(b'boom')   # never read by the buggy handler: level-triggered, it would fire forever
        try:
            self.assertEqual(support.recv_all(victim), b'')     # its pair was closed...
        except ConnectionResetError:
            pass                                                # ...or reset
        before = cpu_seconds_of(loop_stat)
        started = time.monotonic()
        time.sleep(0.5)           # the measurement window itself
        cpu = (cpu_seconds_of(loop_stat) - before) / (time.monotonic() - started)
        tracebacks = self.take_tracebacks()
        self.assertEqual(len(tracebacks), 1, tracebacks)
        self.assertIn('injected bug for one client', tracebacks[0])
        self.assertLess(cpu, 0.5, 'the loop spins after a handler bug')
        self.assertEqual(exchange(balancer.port(), b'still fine'), b'still fine')
        self.assertEqual(background.finish(), [])


if __name__ == '__main__':
    unittest.main()
