"""Registries that check themselves (issue 26): a table, and every place it names.

- pydirector_admin's PAGES and ACTIONS: each page's handler exists; each change's
  Director method exists and takes the change's parameters; each public Actions
  method is a change, or read by the admin, or named in OTHER_USES with its use;
  the admin's docstring lists every page and change with each of its parameters.
- pydirector's END_REASONS (the access log's end=): each END_ constant is a row, the
  code closes connections with the constants, never with text of its own, and
  README's table says every row in the same words, in the same order.
- pydirector.py's banner sections: its docstring and docs/ARCHITECTURE.md name each,
  in order; schedulers.SCHEDULERS: README's table has a row for each.

The other tables check themselves elsewhere: the config attributes in
test_schema.py, the worker messages and counters in test_workers.py
(MessageTableTest, CounterTableTest), a scheduler's reads_load in
test_schedulers.py's contract, the admin fuzz lists come from PAGES and ACTIONS.
"""

import ast
import inspect
import os
import re
import unittest

import support

import pydirector
import pydirector_admin
import schedulers

# Public Actions methods that are neither a change nor read by the admin's pages: who calls them.
OTHER_USES = {
    'set_discovered': "Discovery's: the hosts a <discover> found (replayed in the workers)",
    'serving': "services_down's and the systemd watchdog's (Notifier)",
    'sni_snapshot': "snapshot's",
    'running_config': "running_xml's, Reload's and the workers' config",
    'client_state': "explain's (whether <clients> would refuse the client now)",
    'clients_snapshot': "snapshot's (the <clients> table's size and top clients)",
}


class AdminTablesTest(unittest.TestCase):

    def test_every_page_has_its_handler(self):
        for path, (handler, full_access) in pydirector_admin.PAGES.items():
            self.assertTrue(callable(getattr(pydirector_admin.AdminHandler, handler, None)),
                            '%s: AdminHandler has no %s' % (path, handler))
            self.assertIn(full_access, (True, False), path)

    def test_every_change_has_its_method_taking_its_parameters(self):
        for path, action in pydirector_admin.ACTIONS.items():
            method = getattr(pydirector.Director, action.method, None)
            self.assertTrue(callable(method), '%s: Director has no method %s' % (path, action.method))
            parameters = dict(inspect.signature(method).parameters)
            del parameters['self']
            given = set(action.required + action.optional)
            needed = set(name for name, p in parameters.items() if p.default is p.empty)
            self.assertEqual(needed - given, set(), '%s: %s needs parameters the call does not take'
                             % (path, action.method))
            if action.prepare is None:      # else prepare() turns the call's parameters into the method's
                self.assertEqual(given - set(parameters), set(), '%s: parameters %s does not take'
                                 % (path, action.method))
            self.assertEqual(set(action.required) & set(action.optional), set(), path)

    def test_every_public_actions_method_is_a_change_or_a_read(self):
        changes = set(action.method for action in pydirector_admin.ACTIONS.values())
        with open(pydirector_admin.__file__) as f:
            admin_source = f.read()
        for name, member in sorted(vars(pydirector.Actions).items()):
            if name.startswith('_') or not callable(member) or name in changes:
                continue
            read = re.search(r'director\.%s\b' % name, admin_source)
            self.assertTrue(read or name in OTHER_USES,
                            'Actions.%s is no admin change (no ACTIONS row names it), the admin '
                            'reads it nowhere, and OTHER_USES does not say who calls it' % name)
        for name in OTHER_USES:
            self.assertTrue(callable(getattr(pydirector.Actions, name, None)), 'OTHER_USES: no Actions.%s' % name)

    def docstring_entries(self):
        """{first word: its entry's text} of the indented lists in the admin's docstring."""
        entries, name = {}, None
        for line in pydirector_admin.__doc__.splitlines():
            match = re.match(r'    (/[\w.]*|\w+)(?=[\s?\[]|$)', line)
            if match:
                name = match.group(1)
                entries[name] = line
            elif name is not None and line.startswith('     '):
                entries[name] += '\n' + line
            else:
                name = None
        return entries

    def test_the_admin_docstring_lists_every_page(self):
        entries = self.docstring_entries()
        missing = sorted(set(pydirector_admin.PAGES) - set(entries))
        self.assertEqual(missing, [], "pydirector_admin's docstring lists no such page")

    def test_the_admin_docstring_lists_every_change_and_its_parameters(self):
        entries = self.docstring_entries()
        for path, action in sorted(pydirector_admin.ACTIONS.items()):
            entry = entries.get(path.lstrip('/'))
            self.assertIsNotNone(entry, "pydirector_admin's docstring does not list %s" % path)
            unsaid = [name for name in action.required + action.optional
                      if not re.search(r'\b%s=' % name, entry)]
            self.assertEqual(unsaid, [], "%s: pydirector_admin's docstring does not say these parameters"
                             % path)


class EndReasonsTest(unittest.TestCase):

    def test_every_constant_is_a_row(self):
        constants = dict((name, value) for name, value in vars(pydirector).items()
                         if name.startswith('END_') and isinstance(value, str))
        self.assertEqual(sorted(constants.values()), sorted(pydirector.END_REASONS))
        self.assertEqual(len(set(constants.values())), len(constants), 'two constants, one text')
        for text, meaning in pydirector.END_REASONS.items():
            self.assertRegex(text, r'\A[a-z]+(-[a-z]+)*\Z')     # one word in a log line
            self.assertTrue(meaning and '|' not in meaning and '\n' not in meaning, text)

    def test_the_code_ends_connections_by_the_constants(self):
        """No close(), abort() or refuse() with an end of its own text: a new end is a row."""
        with open(pydirector.__file__) as f:
            tree = ast.parse(f.read())
        found = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                at = {'close': 0, 'abort': 0, 'close_all': 0, 'refuse': 2}.get(node.func.attr)
                values = [k.value for k in node.keywords if k.arg == 'how']
                if at is not None and len(node.args) > at:
                    values.append(node.args[at])
                found += [(node.lineno, ast.literal_eval(v)) for v in values if is_text(v)]
            elif isinstance(node, ast.FunctionDef):
                args = node.args
                for arg, default in zip(args.args[len(args.args) - len(args.defaults):], args.defaults):
                    if arg.arg == 'how' and is_text(default):
                        found.append((node.lineno, ast.literal_eval(default)))
        self.assertEqual(found, [], 'pydirector.py: ends given as text (line, text); use END_ constants')

    def test_readme_says_every_reason(self):
        with open(os.path.join(support.REPO, 'README.md')) as f:
            readme = f.read()
        section = readme.split('**How a connection ended.**')[1].split('\n#')[0]
        rows = re.findall(r'^\| `([a-z-]+)` \| (.*) \|$', section, re.M)
        expected = list(pydirector.END_REASONS.items())
        self.assertEqual(rows, expected, "README's end= table; it should read:\n%s" % ''.join(
            '| `%s` | %s |\n' % row for row in expected))


class DocsTest(unittest.TestCase):

    def read(self, *path):
        with open(os.path.join(support.REPO, *path)) as f:
            return f.read()

    def banner_titles(self):
        """pydirector.py's sections: the line after each opening '# ----' banner, up to
        its ':', without a '(...)' at its end."""
        lines = self.read('pydirector.py').splitlines()
        titles = [re.sub(r' \(.*\)$', '', after[2:].split(':')[0])
                  for line, after in zip(lines, lines[1:])
                  if re.match(r'# -{20,}$', line) and re.match(r'# [^-]', after)]
        self.assertIn('Config', titles)
        return titles

    def assert_in_order(self, titles, text, where):
        text = ' '.join(text.replace('**', '').split())
        at = 0
        for title in titles:
            found = text.find(title, at)
            self.assertNotEqual(found, -1, '%s does not name the section %r after %r (sections: %s)'
                                % (where, title, text[max(0, at - 40):at], ', '.join(titles)))
            at = found + len(title)

    def test_the_docstring_names_every_section(self):
        self.assert_in_order(self.banner_titles(), pydirector.__doc__.split('Sections,')[1],
                             "pydirector.py's docstring")

    def test_the_architecture_note_names_every_section(self):
        note = self.read('docs', 'ARCHITECTURE.md')
        self.assert_in_order(self.banner_titles(), note.split('reads top to bottom in sections')[1].split('\n\n')[0],
                             'docs/ARCHITECTURE.md')

    def test_readme_has_a_row_for_every_scheduler(self):
        section = self.read('README.md').split('\n## Schedulers\n')[1].split('\n## ')[0]
        rows = re.findall(r'^\| `([a-z]+)` \|', section, re.M)
        self.assertEqual(sorted(rows), sorted(schedulers.SCHEDULERS), "README's table of schedulers")


def is_text(node):
    try:
        return isinstance(ast.literal_eval(node), str)
    except ValueError:      # not a literal: a name, a call
        return False


if __name__ == '__main__':
    unittest.main()
