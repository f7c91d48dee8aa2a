"""tools/bundle.py and the one-file pydirector.pyz it builds.

The archive is built once into a temporary directory with the Python running
the tests, then run as a subprocess on that same Python from a directory
outside the repository with PYTHONPATH unset, so only the archive's own
copies of the modules can be imported.
"""

import base64
import glob
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import unittest
import urllib.request
import zipfile

# Runs as tests.test_bundle too, not only under `discover -s tests`.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import support  # noqa: E402
from support import (BalancerCase,   # noqa: E402
    Backend, accepts, config_xml, echo, exchange, free_port, service_xml, wait_until)

import pydirector  # noqa: E402

BUNDLE = os.path.join(support.REPO, 'tools', 'bundle.py')
SAMPLE = os.path.join(support.REPO, 'sample.xml')
SOURCES = ['pydirector.py', 'schedulers.py', 'pydirector_admin.py']


def clean_env(**extra):
    env = dict(os.environ)
    env.pop('PYTHONPATH', None)
    env.update(extra)
    return env


def build(output, *args):
    result = subprocess.run([sys.executable, BUNDLE, '--output', output] + list(args), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, universal_newlines=True, timeout=60)
    if result.returncode != 0:
        raise AssertionError('tools/bundle.py failed:\n' + result.stdout)
    return result.stdout


class BundleTest(BalancerCase):

    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix='pydirector-bundle-')
        cls.pyz = os.path.join(cls.dir, 'out', 'pydirector.pyz')     # 'out' does not exist yet
        cls.build_output = build(cls.pyz)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir, ignore_errors=True)

    def run_pyz(self, *args, **kwargs):
        return subprocess.run([sys.executable, self.pyz] + list(args), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, timeout=30,
                              cwd=self.dir, env=kwargs.pop('env', clean_env()), **kwargs)

    def run_script(self, *args):
        return subprocess.run([sys.executable, support.PYDIRECTOR] + list(args), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, timeout=30, cwd=self.dir)

    # -- the file ------------------------------------------------------------

    def test_archive_holds_the_sources_in_a_fixed_order(self):
        self.assertIn('pydirector %s' % pydirector.VERSION, self.build_output)
        with open(self.pyz, 'rb') as f:
            self.assertEqual(f.readline(), b'#!/usr/bin/env python3\n')
        self.assertTrue(os.stat(self.pyz).st_mode & stat.S_IXUSR, 'not executable')
        with zipfile.ZipFile(self.pyz) as archive:
            self.assertIsNone(archive.testzip())
            self.assertEqual(archive.namelist(), ['__main__.py'] + SOURCES)
            for name in SOURCES:
                with open(os.path.join(support.REPO, name), 'rb') as f:
                    self.assertEqual(archive.read(name), f.read(), name)
            self.assertEqual({info.date_time for info in archive.infolist()}, {(1980, 1, 1, 0, 0, 0)})

    def test_build_is_reproducible(self):
        again = os.path.join(self.dir, 'again.pyz')
        build(again)
        with open(self.pyz, 'rb') as first, open(again, 'rb') as second:
            self.assertEqual(first.read(), second.read())

    def test_runs_as_an_executable(self):
        # The #! line: the way systemd or a shell runs it without naming python.
        if not shutil.which('python3', path=os.environ.get('PATH')):
            self.skipTest('no python3 on PATH for /usr/bin/env')
        result = subprocess.run([self.pyz, '--version'], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                universal_newlines=True, timeout=30, cwd=self.dir, env=clean_env())
        self.assertEqual((result.returncode, result.stdout.strip()), (0, 'pydirector ' + pydirector.VERSION),
                         result.stderr)

    def test_an_old_python_is_told_plainly(self):
        # Python 2.7 (or a 3.5) parsing the modules would die on an f-string's SyntaxError.
        found = sorted(glob.glob(os.path.join(os.environ.get('PYENV_ROOT', os.path.expanduser('~/.pyenv')),
                                              'versions', '2.*', 'bin', 'python2.*')))
        found += [path for path in (shutil.which('python2'),) if path]
        if not found:
            self.skipTest('no Python 2 here')
        result = subprocess.run([found[0], self.pyz, '--version'], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                universal_newlines=True, timeout=30, cwd=self.dir, env=clean_env())
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertEqual(result.stdout, '')
        self.assertRegex(result.stderr, r'^pydirector needs Python 3.6 or newer; this is Python 2\.\d+ \(.*\)\n$')

    # -- the command line, as pydirector.py ---------------------------------------

    def test_version(self):
        result = self.run_pyz('--version')
        self.assertEqual((result.returncode, result.stdout.strip()), (0, 'pydirector ' + pydirector.VERSION),
                         result.stderr)

    def test_check_prints_what_the_script_prints(self):
        result = self.run_pyz('--check', SAMPLE)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn('%s: OK' % SAMPLE, result.stdout)
        script = self.run_script('--check', SAMPLE)
        self.assertEqual((result.returncode, result.stdout, result.stderr),
                         (script.returncode, script.stdout, script.stderr))

    def test_bad_config_fails_as_the_script_does(self):
        path = os.path.join(self.dir, 'bad.xml')
        with open(path, 'w') as f:
            f.write(config_xml(service_xml([('one', '127.0.0.1:9')], scheduler='leastconn')))
        result = self.run_pyz('-c', path)
        self.assertEqual((result.returncode, result.stdout, result.stderr.strip()), (
            1, '', "pydirector: %s:4: group 'main': unknown scheduler 'leastconn' "
                   "(known: hash, leastconns, leastconnsrr, random, roundrobin)" % path))

    def test_modules_come_from_the_archive(self):
        # The documented PYTHONPATH=pydirector.pyz python3 -m pydirector_admin form, too.
        code = 'import pydirector, pydirector_admin, schedulers; print(pydirector.__file__); ' \
               'print(schedulers.__file__); print(pydirector_admin.__file__)'
        result = subprocess.run([sys.executable, '-c', code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                universal_newlines=True, timeout=30, cwd=self.dir,
                                env=clean_env(PYTHONPATH=self.pyz))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.split(), [os.path.join(self.pyz, name) for name in SOURCES])

    def test_admin_word_runs_the_admin_command_line(self):
        # `pyz admin ARGS` and `PYTHONPATH=pyz python -m pydirector_admin ARGS`
        # both reach pydirector_admin's own command line (diff/apply).
        for command, env in ((['admin'], None), (['-m', 'pydirector_admin'], None)):
            if command[0] == 'admin':
                result = self.run_pyz('admin', '--help')
            else:
                result = subprocess.run([sys.executable, '-m', 'pydirector_admin', '--help'],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        universal_newlines=True, timeout=30, cwd=self.dir,
                                        env=clean_env(PYTHONPATH=self.pyz))
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertIn('usage', result.stdout.lower())
            self.assertIn('diff', result.stdout)
            self.assertNotIn('--hash-password', result.stdout)

    # -- a real run ------------------------------------------------------------------

    def test_serves_clients_and_admin_then_stops_on_sigterm(self):
        backend = Backend(echo, name='one')
        self.addCleanup(backend.close)
        port, admin_port = free_port(), free_port()
        password = pydirector.hash_password('secret', iterations=1000)
        admin = ('  <admin listen="127.0.0.1:%d">\n'
                 '    <user name="admin" password="%s" access="full"/>\n'
                 '  </admin>\n' % (admin_port, password))
        xml = config_xml(service_xml([('one', backend.address)], listen_port=port) + admin)
        path = os.path.join(self.dir, 'run.xml')
        with open(path, 'w') as f:
            f.write(xml)
        log_path = os.path.join(self.dir, 'run.log')
        log = open(log_path, 'wb')
        self.addCleanup(log.close)
        proc = subprocess.Popen([sys.executable, self.pyz, '-c', path], stdout=log, stderr=subprocess.STDOUT,
                                cwd=self.dir, env=clean_env())

        def output():
            with open(log_path, 'rb') as f:
                return f.read().decode('utf-8', 'replace')

        def kill():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        self.addCleanup(kill)
        wait_until(lambda: proc.poll() is not None or (accepts(port) and accepts(admin_port)), 15,
                   message='the bundle did not start listening')
        self.assertIsNone(proc.poll(), output())

        self.assertEqual(exchange(port, b'through the bundle\n'), b'through the bundle\n')

        request = urllib.request.Request('http://127.0.0.1:%d/running.txt' % admin_port)
        request.add_header('Authorization', 'Basic ' + base64.b64encode(b'admin:secret').decode())
        with urllib.request.urlopen(request, timeout=10) as reply:
            self.assertEqual(reply.status, 200)
            text = reply.read().decode()
        self.assertIn('service web 127.0.0.1:%d main' % port, text)
        self.assertIn('host one %s' % backend.address, text)

        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(15), 0, output())
        self.assertIn('stopped', output())
        self.assertNotIn('Traceback', output())


if __name__ == '__main__':
    unittest.main()
