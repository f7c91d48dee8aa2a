#!/usr/bin/env python3
"""Capture real TLS ClientHellos for tests/test_sni.py (issue 13).

Each client below connects to a tiny TCP server on 127.0.0.1 that records
every byte that arrives until the client falls silent (it waits for a
ServerHello that never comes), then closes.  The bytes go to
tests/data/hello-NAME.hex as hex text, under a few '#' lines saying which
client sent them and which server name it was asked to send.

    python3 tools/capture_hellos.py              # all clients found on this machine
    python3 tools/capture_hellos.py curl openssl # some of them
    python3 tools/capture_hellos.py --out DIR

Standard library only; openssl, curl and chromium are run when installed.
The server never parses what it gets, so the files do not depend on the
parser they test.
"""

import argparse
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(os.path.dirname(HERE), 'tests', 'data')
QUIET = 1.0        # seconds of silence that end a capture
DEADLINE = 20.0    # the most a client gets (chromium starts slowly)


class Recorder(object):
    """Listens on 127.0.0.1; records the first connection until it goes quiet."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(('127.0.0.1', 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.data = b''
        self.done = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        self.sock.settimeout(DEADLINE)
        try:
            conn, _ = self.sock.accept()
        except OSError:
            self.done.set()
            return
        chunks = []
        conn.settimeout(DEADLINE)
        try:
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                conn.settimeout(QUIET)
        except OSError:     # socket.timeout: the client waits for an answer
            pass
        self.data = b''.join(chunks)
        conn.close()
        self.sock.close()   # later connections (retries, preconnects) are refused
        self.done.set()


def run_program(argv, recorder, stdin=subprocess.DEVNULL, env=None):
    """Run a client until the recorder has its hello, then stop it (and its children)."""
    proc = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    recorder.done.wait(DEADLINE + QUIET)
    try:
        os.killpg(proc.pid, signal.SIGTERM)     # the session this script made for it
    except OSError:
        pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def python_ssl(server_hostname):
    def client(recorder):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        sock = socket.create_connection(('127.0.0.1', recorder.port), timeout=DEADLINE)
        try:
            context.wrap_socket(sock, server_hostname=server_hostname)
        except (OSError, ValueError):
            pass        # the recorder closes without answering
        finally:
            sock.close()
        recorder.done.wait(DEADLINE)
    return client


def openssl(name, *extra):
    def client(recorder):
        run_program(['openssl', 's_client', '-connect', '127.0.0.1:%d' % recorder.port,
                     '-servername', name] + list(extra), recorder)
    return client


def curl(name):
    # --connect-to takes any name (--resolve would want an international one's
    # A-label); libidn2 reads the name in the locale's charset, so UTF-8.
    def client(recorder):
        run_program(['curl', '-sk', '--max-time', str(DEADLINE), '--connect-to',
                     '::127.0.0.1:%d' % recorder.port, 'https://%s:%d/' % (name, recorder.port)],
                    recorder, env=dict(os.environ, LC_ALL='C.UTF-8'))
    return client


def chromium(name):
    def client(recorder):
        profile = tempfile.mkdtemp(prefix='capture-chromium-')
        try:
            run_program([CHROMIUM, '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic',
                         '--no-first-run', '--disable-background-networking',
                         '--disable-component-update', '--disable-sync',
                         '--user-data-dir=' + profile,
                         '--host-resolver-rules=MAP %s 127.0.0.1' % name,
                         '--dump-dom', 'https://%s:%d/' % (name, recorder.port)], recorder)
        finally:
            shutil.rmtree(profile, ignore_errors=True)
    return client


CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser') or '/usr/bin/chromium'

# name: (program it needs, server name asked for or None, description, client)
CLIENTS = [
    ('openssl', 'openssl', 'openssl.example.com', 'openssl s_client -servername',
     openssl('openssl.example.com')),
    ('openssl-tls12', 'openssl', 'tls12.example.com', 'openssl s_client -tls1_2 -servername',
     openssl('tls12.example.com', '-tls1_2')),
    ('python', None, 'python.example.com', 'Python ssl, server_hostname',
     python_ssl('python.example.com')),
    ('python-nosni', None, None, 'Python ssl, no server_hostname', python_ssl(None)),
    ('python-idna', None, 'xn--bcher-kva.example', "Python ssl, server_hostname='b\\u00fccher.example'",
     python_ssl('b\u00fccher.example')),
    ('curl', 'curl', 'curl.example.com', 'curl --connect-to -k https://NAME:PORT/', curl('curl.example.com')),
    ('curl-idna', 'curl', 'xn--fa-hia.de', "curl https://fa\\u00df.de (libidn2: UTS #46 non-transitional)",
     curl('fa\u00df.de')),
    ('chromium', CHROMIUM, 'chromium.example.com', 'headless Chromium (post-quantum key share)',
     chromium('chromium.example.com')),
]


def version_of(program):
    if program is None:
        return 'Python %s, %s' % (sys.version.split()[0], ssl.OPENSSL_VERSION)
    flag = 'version' if program == 'openssl' else '--version'
    try:
        out = subprocess.run([program, flag], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             timeout=30).stdout.decode('utf-8', 'replace')
    except (OSError, subprocess.SubprocessError):
        return program
    return out.strip().splitlines()[0] if out.strip() else program


def write_hex(path, description, version, server_name, data):
    text = data.hex()
    with open(path, 'w') as f:
        f.write('# client: %s (%s)\n' % (description, version))
        f.write('# server_name: %s\n' % (server_name or 'none'))
        f.write('# bytes: %d, made by tools/capture_hellos.py\n' % len(data))
        for i in range(0, len(text), 64):
            f.write(text[i:i + 64] + '\n')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('names', nargs='*', help='clients to capture (default: all): %s'
                        % ', '.join(c[0] for c in CLIENTS))
    parser.add_argument('--out', default=DEFAULT_OUT, help='directory for the .hex files')
    args = parser.parse_args(argv)
    unknown = set(args.names) - set(c[0] for c in CLIENTS)
    if unknown:
        parser.error('unknown client(s): %s' % ', '.join(sorted(unknown)))
    os.makedirs(args.out, exist_ok=True)
    failed = 0
    for name, program, server_name, description, client in CLIENTS:
        if args.names and name not in args.names:
            continue
        if program is not None and not shutil.which(program):
            print('%-14s skipped: %s is not installed' % (name, program))
            continue
        recorder = Recorder()
        started = time.monotonic()
        client(recorder)
        recorder.done.wait(DEADLINE + QUIET)
        if not recorder.data:
            print('%-14s FAILED: nothing arrived' % name)
            failed += 1
            continue
        path = os.path.join(args.out, 'hello-%s.hex' % name)
        write_hex(path, description, version_of(program), server_name, recorder.data)
        print('%-14s %5d bytes in %.1f s -> %s' % (name, len(recorder.data),
                                                    time.monotonic() - started, path))
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
