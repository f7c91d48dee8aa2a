"""Balancing algorithms for pydirector.

A scheduler holds the hosts of one group and, for each new client connection,
picks the host it should go to.  Everything here is pure: no sockets, threads,
logging or wall clock.  Time comes from an injected ``clock`` and randomness
from an injected ``random.Random``, so every algorithm is reproducible in tests
and can be asked "where would this client go?" without side effects beyond the
algorithm's own rotation state.

The loop thread owns the schedulers and the Host objects in them; nothing here
is thread-safe, by design.
"""

import collections
import hashlib
import math
import random

UP, DOWN = 'up', 'down'                     # health: set by probes and failed connects
ENABLED, DRAINING = 'enabled', 'draining'   # admin state: set by the operator
ADMIN_STATES = (ENABLED, DRAINING)


class Host(object):
    """One backend host as the balancer tracks it at run time.

    Plain data read and written by the loop thread.  ``ip`` is the config
    text ('127.0.0.1:80', '[::1]:80', 'db.example:5432'); ``address`` is the
    resolved sockaddr, which schedulers never look at.
    """

    # __slots__ because a large farm keeps one of these per host per group,
    # and the attribute set is fixed: a typo should fail, not add a field.
    __slots__ = (
        'name', 'ip', 'weight', 'maxconns',
        'health', 'admin', 'reason', 'since',
        'open', 'total', 'bytes_in', 'bytes_out',
        'address', 'probe_ok', 'probe_fail',
        'send_proxy',   # None, 'v1' or 'v2': the balancer's PROXY protocol setting
        '_current',     # smooth weighted round robin's running weight
        '_last_pick',   # leastconnsrr's tie-break: the scheduler's pick number
    )

    def __init__(self, name, ip, weight=1, maxconns=0, send_proxy=None):
        if weight < 1:
            raise ValueError(f"host '{name}': weight must be at least 1")
        if maxconns < 0:
            raise ValueError(f"host '{name}': maxconns must not be negative")
        self.name = name
        self.ip = ip
        self.weight = weight
        self.maxconns = maxconns
        self.health = UP
        self.admin = ENABLED
        self.reason = ''
        self.since = None
        self.open = 0
        self.total = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.address = None
        self.probe_ok = 0
        self.probe_fail = 0
        self.send_proxy = send_proxy
        self._current = 0
        self._last_pick = 0

    def __repr__(self):
        return (f'<Host {self.name} {self.ip} weight={self.weight} '
                f'{self.health} {self.admin} open={self.open}>')


class Scheduler(object):
    """Base class: host bookkeeping, eligibility, failover and sticky clients.

    A subclass only supplies ``_choose(candidates, client_ip)``, which gets a
    non-empty list of eligible, non-excluded hosts in host order and returns
    one of them.

    ``sticky=True`` adds client affinity on top of any algorithm: a client IP
    goes back to the host it last used while that host stays eligible, and
    the memory of it expires after ``sticky_timeout`` idle seconds by
    ``clock`` (required when sticky).  At most ``sticky_max`` clients are
    remembered; the least recently seen are forgotten first.
    """

    name = None

    def __init__(self, hosts=(), sticky=False, sticky_timeout=3600.0,
                 clock=None, rng=None, sticky_max=100000):
        if sticky and clock is None:
            raise ValueError('a sticky scheduler needs a clock')
        if sticky_max < 1:
            raise ValueError('sticky_max must be at least 1')
        self.hosts = []
        self._by_name = {}
        self.sticky = sticky
        self.sticky_timeout = sticky_timeout
        self.sticky_max = sticky_max
        self.clock = clock
        self.rng = rng if rng is not None else random.Random()
        # client_ip -> (host, last_used), oldest use first, so expiry and the
        # size bound both evict from the front.
        self._sticky = collections.OrderedDict()
        for host in hosts:
            self.add_host(host)

    def __repr__(self):
        return f'<{type(self).__name__} {self.spec} hosts={len(self.hosts)}>'

    @property
    def spec(self):
        """The text make_scheduler() accepts to build this kind again."""
        return self.name + (',sticky' if self.sticky else '')

    # -- hosts -------------------------------------------------------------

    def get_host(self, name):
        return self._by_name.get(name)

    def add_host(self, host):
        if host.name in self._by_name:
            raise ValueError(f"host '{host.name}' already exists")
        self._reset(host)
        self.hosts.append(host)
        self._by_name[host.name] = host
        return host

    def remove_host(self, name):
        host = self._by_name.pop(name)      # KeyError(name) if missing
        self.hosts.remove(host)
        for client_ip in [ip for ip, (h, _) in self._sticky.items() if h is host]:
            del self._sticky[client_ip]
        return host

    def take_state_from(self, other):
        """Replace this scheduler's hosts with ``other``'s Host objects.

        Used when the operator changes a group's algorithm: the hosts keep
        their counters, health and admin state.  Sticky clients carry over
        too when both schedulers are sticky, so a change of algorithm does
        not break existing affinity.
        """
        self.hosts = []
        self._by_name = {}
        self._sticky.clear()
        for host in other.hosts:
            self.add_host(host)
        if self.sticky and other.sticky:
            self._sticky.update(other._sticky)
            self._trim_sticky()

    def _reset(self, host):
        # Rotation state from another scheduler means nothing here (its pick
        # counter is not ours), so a host starts fresh when it joins.
        host._current = 0
        host._last_pick = 0

    # -- state -------------------------------------------------------------

    def mark_down(self, host, reason, when):
        if host.health == DOWN:
            return False
        host.health = DOWN
        host.reason = reason
        host.since = when
        return True

    def mark_up(self, host, when):
        if host.health == UP:
            return False
        host.health = UP
        host.reason = ''
        host.since = when
        return True

    def set_admin(self, host, state, when):
        if state not in ADMIN_STATES:
            raise ValueError(f"unknown admin state '{state}' "
                             f"(known: {', '.join(ADMIN_STATES)})")
        if host.admin == state:
            return False
        host.admin = state
        host.since = when
        return True

    def eligible(self, host):
        return (host.health == UP and host.admin == ENABLED
                and (host.maxconns == 0 or host.open < host.maxconns))

    def connection_started(self, host):
        host.open += 1
        host.total += 1

    def connection_ended(self, host):
        if host.open > 0:
            host.open -= 1

    # -- picking -----------------------------------------------------------

    def pick(self, client_ip, exclude=()):
        """The host for a new connection from ``client_ip``, or None.

        ``exclude`` holds the hosts already tried for this client, so a
        failover retry never lands on them again.  Picking does not count
        the connection: call connection_started() once it is made.
        """
        if self.sticky:
            return self._pick_sticky(client_ip, exclude)
        return self._pick_fresh(client_ip, exclude)

    def _pick_fresh(self, client_ip, exclude):
        candidates = [host for host in self.hosts
                      if host not in exclude and self.eligible(host)]
        if not candidates:
            return None
        return self._choose(candidates, client_ip)

    def _choose(self, candidates, client_ip):
        raise NotImplementedError

    def _pick_sticky(self, client_ip, exclude):
        now = self.clock()
        table = self._sticky
        # Entries are kept in order of last use, so expiry stops at the
        # first fresh one: each entry is expired once, O(1) amortised.
        while table:
            oldest = next(iter(table))
            if now - table[oldest][1] <= self.sticky_timeout:
                break
            del table[oldest]
        entry = table.get(client_ip)
        if entry is not None:
            host = entry[0]
            if (self._by_name.get(host.name) is host and host not in exclude
                    and self.eligible(host)):
                self._remember(client_ip, host, now)
                return host
        host = self._pick_fresh(client_ip, exclude)
        if host is not None:
            self._remember(client_ip, host, now)
            self._trim_sticky()
        return host

    def _remember(self, client_ip, host, now):
        self._sticky[client_ip] = (host, now)
        self._sticky.move_to_end(client_ip)

    def _trim_sticky(self):
        while len(self._sticky) > self.sticky_max:
            self._sticky.popitem(last=False)

    def sticky_size(self):
        return len(self._sticky)

    def sticky_host(self, client_ip):
        """The host client_ip's sticky entry names (live or expired), or None."""
        entry = self._sticky.get(client_ip)
        return entry[0] if entry is not None else None

    def stick(self, client_ip, host, last_used):
        """Take an entry made elsewhere (another process of the same balancer):
        client_ip goes to host, as if picked at last_used (by ``clock``)."""
        if self._by_name.get(host.name) is not host:
            return
        self._remember(client_ip, host, last_used)
        self._trim_sticky()

    def sticky_entries(self):
        """[(client_ip, host, last_used)], the least recently used first."""
        return [(ip, host, used) for ip, (host, used) in self._sticky.items()]

    # -- explaining --------------------------------------------------------
    #
    # explain() answers "where would this client go now, and why?" for the
    # admin.  It must leave every piece of state as it found it (rotation
    # weights, pick counters, the sticky table and its order, the rng), so
    # asking never changes the answer to the next pick().  Each algorithm
    # supplies _predict(), the side-effect-free twin of its _choose().

    def skip_reason(self, host, exclude=()):
        """Why pick() would pass over ``host`` now, or None if it would not.

        One of 'down', the admin state ('draining', or any other that is not
        enabled), 'full' (at maxconns) or 'excluded' (already tried), in that
        order: what the operator can act on comes first.
        """
        if host.health != UP:
            return 'down'
        if host.admin != ENABLED:
            return host.admin
        if host.maxconns and host.open >= host.maxconns:
            return 'full'
        if host in exclude:
            return 'excluded'
        return None

    def full_only(self, exclude=()):
        """True when pick() finds no host only because every host that is
        up, enabled and not excluded is at its maxconns.

        The balancer queues the client then (a slot will free up) rather
        than turning it away.  False when some host could take it, and when
        no host is up at all.
        """
        full = False
        for host in self.hosts:
            if host.health != UP or host.admin != ENABLED or host in exclude:
                continue
            if host.maxconns and host.open >= host.maxconns:
                full = True
            else:
                return False
        return full

    def explain(self, client_ip, exclude=()):
        """What pick(client_ip, exclude) would return now, and why; changes nothing.

        A dict: 'host' (a Host or None), 'scheduler' (the spec), 'reason'
        (one sentence), 'sticky' ({'host': name, 'expires_in': seconds} for
        a live entry of this client, else None), 'ranking' (hash: every
        host as [name, score], best first; else None), 'candidates' (random:
        the eligible hosts as [name, weight]; else None) and 'skipped'
        ([name, why] for each host pick() would pass over; see skip_reason).
        """
        skipped = []
        for host in self.hosts:
            why = self.skip_reason(host, exclude)
            if why is not None:
                skipped.append([host.name, why])
        result = {'host': None, 'scheduler': self.spec, 'reason': '',
                  'sticky': None, 'ranking': None, 'candidates': None,
                  'skipped': skipped}
        prefix = ''
        if self.sticky:
            now = self.clock()
            entry = self._live_sticky_entry(client_ip, now)
            if entry is not None:
                host, last_used = entry
                age = now - last_used
                expires_in = self.sticky_timeout - age
                result['sticky'] = {'host': host.name, 'expires_in': expires_in}
                if self._by_name.get(host.name) is not host:
                    why = 'gone'
                else:
                    why = self.skip_reason(host, exclude)
                if why is None:
                    result['host'] = host
                    result['reason'] = (
                        f'sticky: client {client_ip} was on {host.name} '
                        f'{age:.0f} s ago (expires in {expires_in:.0f} s)')
                    self._explain_extra(result, client_ip)
                    return result
                prefix = f'sticky: client {client_ip} was on {host.name}, now {why}; '
        candidates = [host for host in self.hosts
                      if host not in exclude and self.eligible(host)]
        if candidates:
            result['host'], reason = self._predict(candidates, client_ip)
        else:
            reason = self._explain_none(exclude)
        result['reason'] = prefix + reason
        self._explain_extra(result, client_ip, candidates)
        return result

    def _explain_none(self, exclude):
        if not self.hosts:
            return 'no hosts'
        if self.full_only(exclude):
            return 'every eligible host is full (maxconns)'
        if not any(host.health == UP for host in self.hosts):
            return 'no host up'
        counts = collections.OrderedDict()     # first seen first, on any Python
        for host in self.hosts:
            why = self.skip_reason(host, exclude)
            counts[why] = counts.get(why, 0) + 1
        return 'no eligible host: ' + ', '.join(
            f'{count} {why}' for why, count in counts.items())

    def _live_sticky_entry(self, client_ip, now):
        # The entry pick() would find after its expiry sweep, found without
        # sweeping: the sweep deletes stale entries from the oldest end and
        # stops at the first fresh one, so this client's entry survives it
        # unless it is stale and everything older is stale too.
        entry = self._sticky.get(client_ip)
        if entry is None:
            return None
        for ip, (_, last_used) in self._sticky.items():
            if now - last_used <= self.sticky_timeout:
                return entry
            if ip == client_ip:
                return None
        return None     # not reached: client_ip is in the table

    def _predict(self, candidates, client_ip):
        """(host, reason): what _choose() would return, with no side effects."""
        raise NotImplementedError

    def _explain_extra(self, result, client_ip, candidates=None):
        """Fill in what only some algorithms have ('ranking', 'candidates')."""


class RandomScheduler(Scheduler):
    """Weighted random choice: a host with weight 3 gets three times the
    connections of a host with weight 1, on average."""

    name = 'random'

    def _choose(self, candidates, client_ip):
        # A plain cumulative walk rather than random.choices(), whose
        # internals have changed between Python versions: the same seed
        # gives the same sequence on every Python we support.
        point = self.rng.random() * sum(host.weight for host in candidates)
        for host in candidates:
            point -= host.weight
            if point < 0:
                return host
        return candidates[-1]   # only reachable through float rounding

    def _predict(self, candidates, client_ip):
        total = sum(host.weight for host in candidates)
        try:
            state = self.rng.getstate()
        except (AttributeError, NotImplementedError):
            # random.SystemRandom and friends have no state to rewind.
            return None, (f'weighted random among {len(candidates)} eligible '
                          f'hosts (total weight {total}); the draw cannot be '
                          f'foreseen')
        # Draw, then rewind: the loop thread owns the rng, so nobody sees
        # the moment between, and the next pick() makes this same draw.
        try:
            host = self._choose(candidates, client_ip)
        finally:
            self.rng.setstate(state)
        return host, (f'weighted random: the next draw gives {host.name} '
                      f'(weight {host.weight} of total {total}, '
                      f'{len(candidates)} eligible)')

    def _explain_extra(self, result, client_ip, candidates=None):
        if candidates is not None:
            result['candidates'] = [[host.name, host.weight] for host in candidates]


class RoundRobinScheduler(Scheduler):
    """Smooth weighted round robin, as nginx does it.

    Weights 3:1 give A A B A rather than A A A B: a heavy host's turns are
    spread out instead of bunched.  Equal weights give strict rotation.
    """

    name = 'roundrobin'

    def _choose(self, candidates, client_ip):
        total = 0
        best = None
        for host in candidates:
            host._current += host.weight
            total += host.weight
            if best is None or host._current > best._current:
                best = host
        best._current -= total
        return best

    def _predict(self, candidates, client_ip):
        # _choose() without the writes: the host whose running weight plus
        # its weight is highest (the first of equals) goes next.
        total = 0
        best = None
        best_current = 0
        for host in candidates:
            current = host._current + host.weight
            total += host.weight
            if best is None or current > best_current:
                best, best_current = host, current
        return best, (f'smooth weighted round robin: next in turn '
                      f'(current weight {best_current} of total {total})')


class LeastConnsScheduler(Scheduler):
    """Fewest open connections per unit of weight; ties go to the first host.

    The tie rule is the original Python Director's: with no load it sends
    every connection to the first host.  leastconnsrr spreads ties instead.
    """

    name = 'leastconns'

    def _choose(self, candidates, client_ip):
        # min() keeps the first of equal keys; open/weight compares exactly
        # for equal ratios because IEEE division is correctly rounded.
        return min(candidates, key=lambda host: host.open / host.weight)

    def _predict(self, candidates, client_ip):
        host = self._choose(candidates, client_ip)
        return host, least_reason('least connections', host, candidates, 'first')


class LeastConnsRRScheduler(Scheduler):
    """Fewest open connections per unit of weight; ties go to the host
    picked least recently, so an idle farm is used in rotation."""

    name = 'leastconnsrr'

    def __init__(self, *args, **kwargs):
        # A pick counter, not the clock: two picks in the same clock tick
        # must still be ordered.
        self._picks = 0
        super().__init__(*args, **kwargs)

    def _choose(self, candidates, client_ip):
        best = min(candidates,
                   key=lambda host: (host.open / host.weight, host._last_pick))
        self._picks += 1
        best._last_pick = self._picks
        return best

    def _predict(self, candidates, client_ip):
        host = min(candidates,
                   key=lambda host: (host.open / host.weight, host._last_pick))
        return host, least_reason('least connections, round robin on ties',
                                  host, candidates, 'least recently picked')


class HashScheduler(Scheduler):
    """Rendezvous (highest random weight) hashing of the client IP.

    Each host scores each client with a stable hash of client IP and host
    name; the client goes to the best-scoring eligible host.  So a client
    keeps its host across restarts and scheduler changes, adding a host
    moves only the clients it now wins (about 1/N of them), and removing or
    losing a host moves only that host's clients.  The score
    -weight / ln(u) makes a host's share proportional to its weight.
    """

    name = 'hash'

    # 52 bits, so (n + 0.5) / 2**52 is exact and strictly inside (0, 1):
    # with 53 or more bits the top value would round to 1.0 and ln(1) = 0.
    _BITS = 52

    def score(self, client_ip, host):
        key = f'{client_ip}\0{host.name}'.encode('utf-8')
        # hashlib, not hash(): str hashes are salted per process, and a
        # client must map to the same host after a restart.
        digest = hashlib.blake2b(key, digest_size=8).digest()
        n = int.from_bytes(digest, 'big') >> (64 - self._BITS)
        u = (n + 0.5) / (1 << self._BITS)
        return -host.weight / math.log(u)

    def rank(self, client_ip):
        """All hosts, eligible or not, best first for this client.

        pick() returns the first eligible, non-excluded host of this list.
        """
        # sorted() is stable, so the (astronomically unlikely) equal scores
        # fall back to host order, as in pick().
        return sorted(self.hosts, key=lambda host: -self.score(client_ip, host))

    def _choose(self, candidates, client_ip):
        best = None
        best_score = 0.0
        for host in candidates:
            score = self.score(client_ip, host)
            if best is None or score > best_score:
                best, best_score = host, score
        return best

    def _predict(self, candidates, client_ip):
        host = self._choose(candidates, client_ip)
        place = self.rank(client_ip).index(host) + 1
        if place == 1:
            return host, f'hash: highest rendezvous score for {client_ip}'
        return host, (f'hash: highest rendezvous score for {client_ip} among '
                      f'eligible hosts (number {place} of {len(self.hosts)} overall)')

    def _explain_extra(self, result, client_ip, candidates=None):
        result['ranking'] = sorted(
            ([host.name, self.score(client_ip, host)] for host in self.hosts),
            key=lambda pair: -pair[1])


def least_reason(what, host, candidates, tie_rule):
    """The explain() sentence of the least-connections schedulers."""
    load = host.open / host.weight
    weighted = any(other.weight != 1 for other in candidates)
    text = f'{what}: {host.open} open'
    if weighted:
        text += f' (weight {host.weight})'
    text += f', fewest{" per weight" if weighted else ""} of {len(candidates)} eligible'
    tied = sum(1 for other in candidates if other.open / other.weight == load)
    if tied > 1:
        text += f' ({tie_rule} of {tied} tied)'
    return text


SCHEDULERS = {cls.name: cls for cls in (
    RandomScheduler, RoundRobinScheduler, LeastConnsScheduler,
    LeastConnsRRScheduler, HashScheduler)}

MODIFIERS = ('sticky',)


def parse_spec(spec):
    """'roundrobin' -> ('roundrobin', False); 'hash, sticky' -> ('hash', True)."""
    parts = [part.strip() for part in spec.split(',')]
    name, modifiers = parts[0], parts[1:]
    if not name:
        raise ValueError('empty scheduler')
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler '{name}' "
                         f"(known: {', '.join(sorted(SCHEDULERS))})")
    for modifier in modifiers:
        if modifier not in MODIFIERS:
            raise ValueError(f"unknown scheduler modifier '{modifier}' "
                             f"(known: {', '.join(MODIFIERS)})")
    return name, 'sticky' in modifiers


def make_scheduler(spec, hosts=(), clock=None, rng=None, sticky_timeout=3600.0):
    """Build the scheduler ``spec`` names (see parse_spec) over ``hosts``."""
    name, sticky = parse_spec(spec)
    return SCHEDULERS[name](hosts, sticky=sticky, sticky_timeout=sticky_timeout,
                            clock=clock, rng=rng)
