"""Processes and ports as Linux's /proc shows them: the helpers the tests, bench/ and
tools/ share.

Standard library only, Python 3.6+, and no import of pydirector, so that every script
stays runnable on its own.  It lives in tools/ because the layout has no package and
tools/ is already where the tests import from (tests/test_soak.py runs tools/soak.py):
tests/support.py puts this folder on sys.path and passes these names on, and a script
in bench/ or tools/ does the same:

    sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tools'))
    from processes import cpu_seconds, free_port
"""

import os
import signal
import socket
import subprocess
import time


# -- ports -------------------------------------------------------------------

def free_port(host='127.0.0.1'):
    """A port free on host now, as the kernel picks one (tests/support.py's free_port
    hands out ports of a block of its own instead, so test processes never share one)."""
    sock = socket.socket()
    try:
        sock.bind((host, 0))
        return sock.getsockname()[1]
    finally:
        sock.close()


def accepts(port, host='127.0.0.1'):
    """Whether something listens on host:port."""
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def wait_listening(port, timeout=15.0, proc=None, host='127.0.0.1'):
    """Wait until something listens on host:port: True, or False after timeout or as soon
    as proc (the Popen expected to listen there) has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        if accepts(port, host):
            return True
        time.sleep(0.02)
    return False


# -- /proc readings ----------------------------------------------------------

def stat_fields(stat_path):
    """The fields of a /proc/.../stat file after the command name, which may hold spaces
    and parentheses: [0] the state, [1] the parent's pid, [11] utime, [12] stime."""
    with open(stat_path) as f:
        return f.read().rsplit(')', 1)[1].split()


def process_state(pid):
    """'R', 'S', 'T' (stopped), 'Z' (a zombie), ... of a process."""
    return stat_fields('/proc/%s/stat' % pid)[0]


def cpu_seconds_of(stat_path):
    """utime + stime from a /proc/.../stat file (a process or one thread), in seconds."""
    fields = stat_fields(stat_path)
    return (int(fields[11]) + int(fields[12])) / float(os.sysconf('SC_CLK_TCK'))


def cpu_seconds(pid='self'):
    """utime + stime of a whole process (all its threads), in seconds."""
    return cpu_seconds_of('/proc/%s/stat' % pid)


def system_seconds(pid='self'):
    """stime alone: the kernel's part of cpu_seconds."""
    return int(stat_fields('/proc/%s/stat' % pid)[12]) / float(os.sysconf('SC_CLK_TCK'))


def wakeups(pid='self'):
    """Voluntary context switches of a process's threads: each is a sleep (in epoll_wait,
    mostly) that something ended."""
    total = 0
    for tid in os.listdir('/proc/%s/task' % pid):
        try:
            with open('/proc/%s/task/%s/status' % (pid, tid)) as f:
                for line in f:
                    if line.startswith('voluntary_ctxt_switches:'):
                        total += int(line.split()[1])
        except OSError:
            pass    # (a thread gone meanwhile)
    return total


def rss_bytes(pid='self'):
    """Resident set size (VmRSS) in bytes; 0 for a process that has none (a zombie)."""
    with open('/proc/%s/status' % pid) as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) * 1024
    return 0


def fd_count(pid='self'):
    """Open file descriptors of a process."""
    return len(os.listdir('/proc/%s/fd' % pid))


def thread_count(pid='self'):
    return len(os.listdir('/proc/%s/task' % pid))


def child_pids(pid):
    """The processes whose parent is pid (a master's workers), in pid order."""
    found = []
    for name in os.listdir('/proc'):
        if name.isdigit():
            try:
                if int(stat_fields('/proc/%s/stat' % name)[1]) == pid:
                    found.append(int(name))
            except (OSError, IndexError, ValueError):
                pass
    return sorted(found)


# -- stopping ----------------------------------------------------------------

def stop_process(proc, timeout=10.0, group=False):
    """Stop a Popen: SIGTERM, up to timeout seconds to exit, then SIGKILL.  group: it
    was started in a session of its own (start_new_session), whose every process gets
    the SIGKILL, exited leader or not (nginx's workers, say), by the group's own id.
    The exit status if it exited on SIGTERM (or had already), else None."""
    status = proc.poll()
    if status is None:
        try:
            proc.send_signal(signal.SIGTERM)
            status = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        except OSError:     # gone meanwhile
            status = proc.poll()
    try:
        if group:
            os.killpg(proc.pid, signal.SIGKILL)
        elif proc.poll() is None:
            proc.kill()
    except OSError:
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass
    return status
