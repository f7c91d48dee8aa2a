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
