"""Balancing algorithms for pydirector.

A scheduler holds the hosts of one group and, for each new client connection,
picks the host it should go to.  Everything here is pure: no sockets, threads,
logging or wall clock.  Time comes from an injected ``clock`` and randomness
from an injected ``random.Random``, so every algorithm is reproducible in tests
and can be asked "where would this client go?" without side effects beyond the
algorithm's own rotation state.

A pick costs O(1) or O(log n) in the number of hosts, whatever the pool size:
each scheduler keeps the eligible hosts (up, enabled, below maxconns) in its
own structure (a rotation list, a heap, a Fenwick tree, a hash ring) and
updates it when a host changes, not on every pick.  So every change to a host
that can move connections goes through the scheduler's methods, never through
the Host's fields (see Scheduler).

Two things shape the eligible set beyond each host's own state: backup hosts
(``Host.backup``) take clients only while no other host of the scheduler is
up and enabled, and slow start lets a host that comes back take a growing
part of its weight (``mark_up(..., slowstart=S)``; step_ramps() moves the
ramps on, in steps, so a pick never computes a weight).

The loop thread owns the schedulers and the Host objects in them; nothing here
is thread-safe, by design.
"""

import bisect
import collections
import hashlib
import heapq
import itertools
import random
import struct
from array import array

UP, DOWN = 'up', 'down'                     # health: set by probes and failed connects
# Admin state, set by the operator (HAProxy's ready, drain, maint): enabled takes
# clients; draining takes only its sticky clients; maint takes none at all.
ENABLED, DRAINING, MAINT = 'enabled', 'draining', 'maint'
ADMIN_STATES = (ENABLED, DRAINING, MAINT)

# Slow start: a ramp is RAMP_STEPS steps (fewer when that would make them shorter
# than RAMP_MIN_STEP seconds); the host's share of its weight grows by one step's
# part at each.  While a host of a scheduler ramps, the structures that need whole
# weights work on weights times RAMP_SCALE (so a 5% step of weight 1 is whole).
RAMP_STEPS = 20
RAMP_MIN_STEP = 0.1
RAMP_SCALE = 20


class Host(object):
    """One backend host as the balancer tracks it at run time.

    Plain data read by anyone on the loop thread.  ``ip`` is the config
    text ('127.0.0.1:80', '[::1]:80', 'db.example:5432'); ``address`` is the
    resolved sockaddr, which schedulers never look at.  Once the host is in
    a scheduler, ``weight``, ``maxconns``, ``health``, ``admin`` and ``open``
    change only through that scheduler (update_host, mark_up, ...), which
    keeps its structures in step; a host belongs to one scheduler at a time.
    ``backup``: the host takes clients only while no normal host of its
    scheduler is up and enabled.  ``eweight`` is the weight the scheduler's
    structure works with: ``weight``, but for slow start (see Scheduler).
    """

    # __slots__ because a large farm keeps one of these per host per group,
    # and the attribute set is fixed: a typo should fail, not add a field.
    __slots__ = (
        'name', 'ip', 'weight', 'maxconns',
        'health', 'admin', 'reason', 'since',
        'open', 'total', 'bytes_in', 'bytes_out',
        'address', 'probe_ok', 'probe_fail',
        'send_proxy',   # None, 'v1' or 'v2': the balancer's PROXY protocol setting
        'config',       # the balancer's: the config it was made from (its other settings)
        'backup', 'eweight',
        # The owning scheduler's bookkeeping:
        '_owner',       # the Scheduler it is in; None when in none
        '_order',       # its place in host (config) order: increasing, not contiguous
        '_ok',          # eligible, as the scheduler's structure has it
        '_entry',       # its live entry in the scheduler's heap (older ones are stale)
        '_slot',        # random: its position in the weight tree; hash: its ring slot
        '_last_pick',   # leastconnsrr's tie-break: the scheduler's pick number
        '_share',       # slow start: the part of its weight it takes now (1.0: all)
        '_ramp',        # slow start: (start, seconds) by the scheduler's clock, or None
        '_fell',        # it went down from up once: slow start applies when it returns
    )

    def __init__(self, name, ip, weight=1, maxconns=0, send_proxy=None, backup=False):
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
        self.config = None
        self.backup = backup
        self.eweight = weight
        self._owner = None
        self._order = 0
        self._ok = False
        self._entry = None
        self._slot = -1
        self._last_pick = 0
        self._share = 1.0
        self._ramp = None
        self._fell = False

    @property
    def effective_weight(self):
        """The part of its weight the host takes now: all of it, but during slow start."""
        return self.weight * self._share

    def __repr__(self):
        return (f'<Host {self.name} {self.ip} weight={self.weight} '
                f'{self.health} {self.admin}{" backup" if self.backup else ""} open={self.open}>')


def _heap_in_order(heap):
    """The entries of a heapq list, smallest first, without changing it.

    A best-first walk of the heap's tree: the k smallest cost O(k log k),
    which is what explain() needs to foresee a pick that skips a few.
    """
    if not heap:
        return
    size = len(heap)
    frontier = [(heap[0], 0)]
    while frontier:
        entry, i = heapq.heappop(frontier)
        yield entry
        for child in (2 * i + 1, 2 * i + 2):
            if child < size:
                heapq.heappush(frontier, (heap[child], child))


class Scheduler(object):
    """Base class: host bookkeeping, the eligible set, failover and sticky clients.

    The eligible hosts (health up, admin enabled, below maxconns) are kept
    incrementally: mark_up, mark_down, set_admin, update_host and the
    connection_started/connection_ended that fill or free a host's maxconns
    tell the algorithm's structure that a host came in or went out, so
    pick() never scans the pool.  That is why a host's ``weight``,
    ``maxconns``, ``health``, ``admin`` and ``open`` must change through
    these methods once it is added (before add_host() they may be set
    freely).  Host order (config order) is the order hosts were added in,
    until reorder() sets it.

    A subclass supplies:

    - ``name``, its spelling in the config (and its row in SCHEDULERS), and
      ``reads_load``, True when its picks read the hosts' open counts.
    - ``_rebuild()``: build its structure from ``self.hosts`` and each
      host's ``_ok``.  Called lazily, at the next pick or explain, after
      anything marked the scheduler ``_dirty``: adding, removing and
      reweighing hosts and reorder() do by default, so a reload that
      changes a thousand hosts costs one rebuild.
    - ``_enter(host)`` / ``_leave(host)``: the host became eligible /
      stopped being (only called while the structure is built).
    - ``_choose(client_ip, exclude)``: the pick, when at least one eligible
      host is not in ``exclude`` (a set).
    - ``_predict(client_ip, exclude, candidates)``: (host, reason), what
      _choose() would return, with no side effects.

    ``sticky=True`` adds client affinity on top of any algorithm: a client IP
    goes back to the host it last used while that host stays eligible (or
    draining: a draining host takes only these), and the memory of it
    expires after ``sticky_timeout`` idle seconds by ``clock`` (required
    when sticky).  At most ``sticky_max`` clients are remembered; the least
    recently seen are forgotten first.

    Backup hosts (``host.backup``) are eligible only while no normal host is
    up and enabled (HAProxy's ``backup``): when the last one goes, every
    backup host is brought in, and out again when one returns; full normal
    hosts keep the backups out (the client waits for a place instead).

    Slow start: mark_up() with ``slowstart`` seconds (and set_admin() out
    of maint) starts a ramp for a host that has been down before (never at
    its first coming up): its ``eweight`` grows in RAMP_STEPS steps from a
    small part of its weight to all of it, each step made by step_ramps(),
    which the owner calls at the time it returns (by ``clock``, required).
    Structures work on ``eweight``, so no pick computes a weight; while a
    host ramps they work on weights times RAMP_SCALE (unless ``_scaled`` is
    False: the hash ring gives a ramping host part of its points instead).
    """

    name = None
    # Whether picks read the hosts' open counts (leastconns): with worker processes,
    # each worker then keeps the others' counts of every host up to date (pydirector's
    # WorkerCounts), which costs a read of each host every tick.
    reads_load = False
    _scaled = True      # see slow start

    def __init__(self, hosts=(), sticky=False, sticky_timeout=3600.0,
                 clock=None, rng=None, sticky_max=100000):
        if sticky and clock is None:
            raise ValueError('a sticky scheduler needs a clock')
        if sticky_max < 1:
            raise ValueError('sticky_max must be at least 1')
        self.sticky = sticky
        self.sticky_timeout = sticky_timeout
        self.sticky_max = sticky_max
        self.clock = clock
        self.rng = rng if rng is not None else random.Random()
        # client_ip -> (host, last_used), oldest use first, so expiry and the
        # size bound both evict from the front.  _clients is its index by
        # host, so removing a host forgets its clients without a scan.
        self._sticky = collections.OrderedDict()
        self._clients = {}
        self._clear()
        for host in hosts:
            self.add_host(host)

    def _clear(self):
        self._hosts = []
        self._gone = 0          # removed hosts still in _hosts (dropped lazily)
        self._by_name = {}
        self._next_order = 0
        self._eligible = 0      # hosts with _ok
        self._ready = 0         # hosts up and enabled, full or not
        self._normal_ready = 0  # of those, the ones that are not backups
        self._backups = 0       # backup hosts
        self._backups_on = True  # no normal host up and enabled: the backups are eligible
        self._ramping = set()   # hosts on a slow start ramp
        self._dirty = True
        self._sticky.clear()
        self._clients = {}
        self._clear_structure()

    def _clear_structure(self):
        """Forget the algorithm's structure (the host list is emptied)."""

    def __repr__(self):
        return f'<{type(self).__name__} {self.spec} hosts={len(self.hosts)}>'

    @property
    def spec(self):
        """The text make_scheduler() accepts to build this kind again."""
        return self.name + (',sticky' if self.sticky else '')

    # -- hosts -------------------------------------------------------------

    @property
    def hosts(self):
        """The hosts in host order (a list; read it, do not change it)."""
        if self._gone:
            # Removal only unlinks a host; the list forgets it here, once
            # for a whole batch, so removing many hosts is linear.
            self._hosts = [host for host in self._hosts if host._owner is self]
            self._gone = 0
        return self._hosts

    def get_host(self, name):
        return self._by_name.get(name)

    def add_host(self, host):
        if host.name in self._by_name:
            raise ValueError(f"host '{host.name}' already exists")
        if host._owner is not None and host._owner is not self:
            host._owner._release(host)
        hosts = self.hosts      # drops removed hosts first, so none is listed twice
        # Rotation state from another scheduler means nothing here (its pick
        # counter is not ours), so a host starts fresh when it joins.
        host._owner = self
        host._order = self._next_order
        self._next_order += 1
        host._ok = False
        host._entry = None
        host._slot = -1
        host._last_pick = 0
        hosts.append(host)
        self._by_name[host.name] = host
        if host.backup:
            self._backups += 1
        if host._ramp is not None:
            self._ramp_joined(host)
        host.eweight = self._eweight(host)
        self._count_ready(host, 1)
        self._joined(host)
        self._refresh(host)
        self._check_backups()
        return host

    def remove_host(self, name):
        host = self._by_name[name]      # KeyError(name) if missing
        self._release(host)
        return host

    def _release(self, host):
        # Unlink a host: counts, the structure, the name, its sticky
        # clients; the host list drops it lazily (see hosts).
        del self._by_name[host.name]
        for client_ip in self._clients.pop(host, ()):
            del self._sticky[client_ip]
        self._count_ready(host, -1)
        if host.backup:
            self._backups -= 1
        if host._ok:
            self._eligible -= 1
        self._left(host)
        host._owner = None
        host._ok = False
        host._entry = None
        self._gone += 1
        if host in self._ramping:
            # Its ramp goes with it (take_state_from, a reload); only the scale is ours.
            self._ramping.discard(host)
            if not self._ramping:
                self._rescale()
        self._check_backups()

    def update_host(self, host, weight=None, maxconns=None, backup=None):
        """Change a host's weight, maxconns and/or backup (None: keep); True if any changed."""
        changed = False
        if backup is not None and backup != host.backup:
            if host._owner is self:
                self._count_ready(host, -1)
                self._backups += 1 if backup else -1
                host.backup = backup
                self._count_ready(host, 1)
                self._refresh(host)
                self._check_backups()
            else:
                host.backup = backup
            changed = True
        if weight is not None and weight != host.weight:
            if weight < 1:
                raise ValueError(f"host '{host.name}': weight must be at least 1")
            old = host.weight
            host.weight = weight
            if host._owner is self:
                host.eweight = self._eweight(host)
                self._reweighed(host, old)
            else:
                host.eweight = weight
            changed = True
        if maxconns is not None and maxconns != host.maxconns:
            if maxconns < 0:
                raise ValueError(f"host '{host.name}': maxconns must not be negative")
            host.maxconns = maxconns
            if host._owner is self:
                self._refresh(host)
            changed = True
        return changed

    def reorder(self, names):
        """Put the hosts in the order of ``names``, which lists each host once.

        Host order decides ties (roundrobin's rotation, leastconns' first
        host); the director keeps it the file's order.  True if it changed.
        """
        hosts = self.hosts
        by_name = self._by_name
        if len(names) != len(hosts) or set(names) != set(by_name):
            raise ValueError('reorder needs each host of the group exactly once')
        wanted = [by_name[name] for name in names]
        if all(a is b for a, b in zip(wanted, hosts)):
            return False
        for order, host in enumerate(wanted):
            host._order = order
        self._hosts = wanted
        self._next_order = len(wanted)
        self._reordered()
        return True

    def take_state_from(self, other):
        """Replace this scheduler's hosts with ``other``'s Host objects.

        Used when the operator changes a group's algorithm: the hosts keep
        their counters, health and admin state.  Sticky clients carry over
        too when both schedulers are sticky, so a change of algorithm does
        not break existing affinity.  ``other`` is left empty.
        """
        hosts = list(other.hosts)
        sticky = list(other._sticky.items()) if self.sticky and other.sticky else []
        other._clear()
        for host in hosts:
            host._owner = None
        self._clear()
        for host in hosts:
            self.add_host(host)
        for client_ip, entry in sticky:
            self._sticky[client_ip] = entry
            self._clients.setdefault(entry[0], set()).add(client_ip)
        self._trim_sticky()

    # What a subclass's structure hears about; by default it is rebuilt at
    # the next pick (see _rebuild).
    def _joined(self, host):
        self._dirty = True

    def _left(self, host):
        self._dirty = True

    def _reweighed(self, host, old_weight):
        """The host's weight changed (and its eweight with it)."""
        self._dirty = True

    def _reshared(self, host, old_eweight):
        """Slow start moved the host's eweight."""
        self._dirty = True

    def _reordered(self):
        self._dirty = True

    # -- state -------------------------------------------------------------

    def _refresh(self, host):
        """Bring the eligible set in line with ``host``'s fields."""
        ok = self.eligible(host)
        if ok is not host._ok:
            host._ok = ok
            if ok:
                self._eligible += 1
                if not self._dirty:
                    self._enter(host)
                else:
                    self._enter_pending(host)
            else:
                self._eligible -= 1
                host._entry = None      # an ineligible host has no live heap entry
                if not self._dirty:
                    self._leave(host)

    def _count_ready(self, host, delta):
        if host.health == UP and host.admin == ENABLED:
            self._ready_by(host, delta)

    def _ready_by(self, host, delta):
        self._ready += delta
        if not host.backup:
            self._normal_ready += delta

    def _check_backups(self):
        """Bring the backup hosts in when the last normal host stops being up and
        enabled, and out when one is again (O(hosts), at those moments only)."""
        on = not self._normal_ready
        if on is not self._backups_on:
            self._backups_on = on
            if self._backups:
                for host in self.hosts:
                    if host.backup:
                        self._refresh(host)

    def _set_ready(self, host, was_ready):
        if host._owner is not self:
            return
        ready = host.health == UP and host.admin == ENABLED
        if ready is not was_ready:
            self._ready_by(host, 1 if ready else -1)
        self._refresh(host)
        self._check_backups()

    def mark_down(self, host, reason, when):
        if host.health == DOWN:
            return False
        was_ready = host.health == UP and host.admin == ENABLED
        host.health = DOWN
        host.reason = reason
        host.since = when
        host._fell = True
        self._end_ramp(host)
        self._set_ready(host, was_ready)
        return True

    def mark_up(self, host, when, slowstart=0):
        """slowstart: seconds of slow start, for a host that has been down before."""
        if host.health == UP:
            return False
        was_ready = host.health == UP and host.admin == ENABLED
        host.health = UP
        host.reason = ''
        host.since = when
        if slowstart and host._fell and host.admin != MAINT and host._owner is self:
            self._start_ramp(host, slowstart)
        self._set_ready(host, was_ready)
        return True

    def set_admin(self, host, state, when, slowstart=0):
        """slowstart: seconds of slow start, for an up host that leaves maint."""
        if state not in ADMIN_STATES:
            raise ValueError(f"unknown admin state '{state}' "
                             f"(known: {', '.join(ADMIN_STATES)})")
        if host.admin == state:
            return False
        was_ready = host.health == UP and host.admin == ENABLED
        old = host.admin
        host.admin = state
        host.since = when
        if state == MAINT:
            self._end_ramp(host)
        elif old == MAINT and slowstart and host.health == UP and host._owner is self:
            self._start_ramp(host, slowstart)
        self._set_ready(host, was_ready)
        return True

    def eligible(self, host):
        return (host.health == UP and host.admin == ENABLED
                and (host.maxconns == 0 or host.open < host.maxconns)
                and (self._backups_on or not host.backup))

    def _takes_sticky(self, host):
        """A client's sticky host takes it: eligible, or draining and otherwise
        able (HAProxy's drain: only the clients that persist on it)."""
        return host._ok or (host.admin == DRAINING and host.health == UP
                            and (host.maxconns == 0 or host.open < host.maxconns)
                            and (self._backups_on or not host.backup))

    # -- slow start ----------------------------------------------------------

    @property
    def ramping(self):
        """The hosts on a slow start ramp now (a set: read it, do not change it)."""
        return self._ramping

    def _eweight(self, host):
        if not self._ramping or not self._scaled:
            return host.weight
        return max(1, round(host.weight * RAMP_SCALE * host._share))

    def _start_ramp(self, host, seconds):
        if self.clock is None:
            raise ValueError('slow start needs a clock')
        now = self.clock()
        host._ramp = (now, float(seconds))
        self._ramp_joined(host)
        self._ramp_to(host, now)

    def _ramp_joined(self, host):
        first = not self._ramping
        self._ramping.add(host)
        if first:
            self._rescale()

    def _end_ramp(self, host):
        if host._ramp is not None or host._share != 1.0:
            self._set_share(host, 1.0)

    def _ramp_to(self, host, now):
        """Set the host's share for its ramp at now; when its next step is due (None: done)."""
        start, seconds = host._ramp
        step = max(seconds / RAMP_STEPS, RAMP_MIN_STEP)
        done = max(0, int((now - start) / step)) + 1     # steps taken: the first at once
        share = done * step / seconds
        if share > 0.999999:
            share = 1.0
        self._set_share(host, share)
        return start + done * step if share < 1.0 else None

    def _set_share(self, host, share):
        if share >= 1.0:
            share = 1.0
            host._ramp = None
        changed = share != host._share
        host._share = share
        if host._ramp is None and host in self._ramping:
            self._ramping.discard(host)
            if not self._ramping:
                self._rescale()         # the last ramp ended: every host back to its weight
        if changed:
            self._share_changed(host)

    def _rescale(self):
        """A first ramp began or the last ended: the scale of every eweight changed."""
        if self._scaled:
            for host in self.hosts:
                self._share_changed(host)

    def _share_changed(self, host):
        old = host.eweight
        host.eweight = self._eweight(host)
        if host.eweight != old and host._owner is self:
            self._reshared(host, old)

    def step_ramps(self):
        """Move every slow start ramp on to now (by clock); returns when the next
        step is due (by clock), or None when no host ramps any more."""
        if not self._ramping:
            return None
        now = self.clock()
        due = None
        for host in sorted(self._ramping, key=lambda h: h._order):
            at = self._ramp_to(host, now)
            if at is not None and (due is None or at < due):
                due = at
        return due

    def ramps(self):
        """[(host, effective weight, seconds left)] of the hosts on a ramp, in host
        order: effective weight is the part of its weight a host takes now."""
        if not self._ramping:
            return []
        now = self.clock()
        return [(host, host.effective_weight, max(0.0, host._ramp[0] + host._ramp[1] - now))
                for host in sorted(self._ramping, key=lambda h: h._order)]

    def connection_started(self, host):
        host.open += 1
        host.total += 1
        if host.maxconns and host._ok and host.open >= host.maxconns and host._owner is self:
            self._refresh(host)

    def connection_ended(self, host):
        if host.open > 0:
            host.open -= 1
            if host.maxconns and not host._ok and host._owner is self:
                self._refresh(host)

    def set_open(self, host, count):
        """A host's open connections are now ``count``: some are counted
        elsewhere (the other worker processes of one balancer), so the load
        moves by more than one connection_started or ended says."""
        if count == host.open:
            return
        host.open = count
        if host._owner is not self:
            return
        was_ok = host._ok
        self._refresh(host)     # maxconns: filled or freed
        if was_ok and host._ok and not self._dirty:
            self._loaded(host)

    def _loaded(self, host):
        """An eligible host's load changed through set_open (leastconns re-keys it)."""

    # -- picking -----------------------------------------------------------

    def pick(self, client_ip, exclude=()):
        """The host for a new connection from ``client_ip``, or None.

        ``exclude`` holds the hosts already tried for this client, so a
        failover retry never lands on them again.  Picking does not count
        the connection: call connection_started() once it is made.
        """
        if self._dirty:
            self._sync()
        if exclude:
            exclude = self._as_set(exclude)
        if self.sticky:
            return self._pick_sticky(client_ip, exclude)
        return self._pick_fresh(client_ip, exclude)

    @staticmethod
    def _as_set(exclude):
        return exclude if isinstance(exclude, (set, frozenset)) else set(exclude)

    def _sync(self):
        self._dirty = False
        self._rebuild()

    def _usable(self, exclude):
        """How many eligible hosts are not in ``exclude`` (a set)."""
        count = self._eligible
        for host in exclude:
            if host._ok and host._owner is self:
                count -= 1
        return count

    def _pick_fresh(self, client_ip, exclude):
        if not self._eligible or (exclude and self._usable(exclude) <= 0):
            return None
        return self._choose(client_ip, exclude)

    def _rebuild(self):
        raise NotImplementedError

    def _enter(self, host):
        raise NotImplementedError

    def _enter_pending(self, host):
        """A host became eligible while the structure waits for a rebuild:
        note now what joining now would decide, if anything (a rebuild must
        give the picks that updating in place would)."""

    def _leave(self, host):
        raise NotImplementedError

    def _choose(self, client_ip, exclude):
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
            self._forget(oldest)
        entry = table.get(client_ip)
        if entry is not None:
            host = entry[0]
            if host._owner is self and self._takes_sticky(host) and host not in exclude:
                self._remember(client_ip, host, now)
                return host
        host = self._pick_fresh(client_ip, exclude)
        if host is not None:
            self._remember(client_ip, host, now)
            self._trim_sticky()
        return host

    def _remember(self, client_ip, host, now):
        table = self._sticky
        old = table.get(client_ip)
        if old is None or old[0] is not host:
            if old is not None:
                self._clients[old[0]].discard(client_ip)
            self._clients.setdefault(host, set()).add(client_ip)
        table[client_ip] = (host, now)
        table.move_to_end(client_ip)

    def _forget(self, client_ip):
        host = self._sticky.pop(client_ip)[0]
        clients = self._clients.get(host)
        if clients is not None:
            clients.discard(client_ip)
            if not clients:
                del self._clients[host]

    def _trim_sticky(self):
        while len(self._sticky) > self.sticky_max:
            self._forget(next(iter(self._sticky)))

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
    # position, pick counters, the sticky table and its order, the rng), so
    # asking never changes the answer to the next pick().  Each algorithm
    # supplies _predict(), the side-effect-free twin of its _choose().  It
    # may look at every host: it is for people, not for each connection.

    def skip_reason(self, host, exclude=()):
        """Why pick() would pass over ``host`` now, or None if it would not.

        One of 'down', the admin state ('draining', 'maint', or any other that
        is not enabled), 'backup' (a backup host while a normal one is up),
        'full' (at maxconns) or 'excluded' (already tried), in that order:
        what the operator can act on comes first.
        """
        if host.health != UP:
            return 'down'
        if host.admin != ENABLED:
            return host.admin
        if host.backup and not self._backups_on:
            return 'backup'
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
        no host is up at all.  O(len(exclude)): it is called whenever a
        pick finds nothing.
        """
        eligible, ready = self._eligible, self._ready
        for host in self._as_set(exclude) if exclude else ():
            if host._owner is self:
                if host._ok:
                    eligible -= 1
                if host.health == UP and host.admin == ENABLED:
                    ready -= 1
        return eligible <= 0 and ready > 0

    def explain(self, client_ip, exclude=()):
        """What pick(client_ip, exclude) would return now, and why; changes nothing.

        A dict: 'host' (a Host or None), 'scheduler' (the spec), 'reason'
        (one sentence), 'sticky' ({'host': name, 'expires_in': seconds} for
        a live entry of this client, else None), 'ranking' (hash: the first
        hosts of this client's order on the ring, eligible or not, as
        [name, distance], nearest first; else None), 'candidates' (random:
        the eligible hosts as [name, weight]; else None) and 'skipped'
        ([name, why] for each host pick() would pass over; see skip_reason).
        """
        if self._dirty:
            self._sync()        # the structure is derived state: building it changes no answer
        exclude = self._as_set(exclude) if exclude else set()
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
                if host._owner is not self:
                    why = 'gone'
                elif host not in exclude and self._takes_sticky(host):
                    why = None
                else:
                    why = self.skip_reason(host, exclude)
                if why is None:
                    result['host'] = host
                    result['reason'] = (
                        f'sticky: client {client_ip} was on {host.name} '
                        f'{age:.0f} s ago (expires in {expires_in:.0f} s)')
                    if host.admin == DRAINING:
                        result['reason'] += '; draining, it takes only its sticky clients'
                    self._explain_backup(result)
                    self._explain_extra(result, client_ip)
                    return result
                prefix = f'sticky: client {client_ip} was on {host.name}, now {why}; '
        candidates = [host for host in self.hosts
                      if host not in exclude and self.eligible(host)]
        if candidates:
            result['host'], reason = self._predict(client_ip, exclude, candidates)
        else:
            reason = self._explain_none(exclude)
        result['reason'] = prefix + reason
        self._explain_backup(result)
        self._explain_extra(result, client_ip, candidates)
        return result

    def _explain_backup(self, result):
        host = result['host']
        if host is not None and host.backup:
            result['reason'] += '; a backup host: no normal host is up'

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

    def _predict(self, client_ip, exclude, candidates):
        """(host, reason): what _choose() would return, with no side effects.

        ``candidates`` is the eligible, non-excluded hosts in host order
        (never empty)."""
        raise NotImplementedError

    def _explain_extra(self, result, client_ip, candidates=None):
        """Fill in what only some algorithms have ('ranking', 'candidates')."""

    def _state(self):
        """What decides the coming picks, as plain data (for tests: explain()
        must leave it as it was)."""
        if self._dirty:
            self._sync()
        return self._structure_state()

    def _structure_state(self):
        return None


class RandomScheduler(Scheduler):
    """Weighted random choice: a host with weight 3 gets three times the
    connections of a host with weight 1, on average.

    The eligible hosts' weights sit in a Fenwick tree in host order, so a
    draw and a host coming or going cost O(log n).  One ``rng.random()``
    per pick, mapped onto the hosts' cumulative weights in host order: the
    same seed gives the same sequence on every Python we support (unlike
    random.choices(), whose internals have changed between versions).
    """

    name = 'random'

    def _clear_structure(self):
        self._slots = []        # position -> host (None once removed)
        self._tree = [0]        # 1-based Fenwick tree of eligible weights
        self._top = 0           # highest power of two <= len(self._slots)
        self._total = 0         # eligible weight in the tree

    def _rebuild(self):
        hosts = self.hosts
        size = len(hosts)
        tree = [0] * (size + 1)
        total = 0
        for i, host in enumerate(hosts):
            host._slot = i
            if host._ok:
                tree[i + 1] = host.eweight
                total += host.eweight
        for i in range(1, size + 1):        # O(n) build: push each sum to its parent
            parent = i + (i & -i)
            if parent <= size:
                tree[parent] += tree[i]
        self._slots = list(hosts)
        self._tree = tree
        self._top = 1 << (size.bit_length() - 1) if size else 0
        self._total = total

    def _add(self, slot, delta):
        tree = self._tree
        size = len(tree) - 1
        i = slot + 1
        while i <= size:
            tree[i] += delta
            i += i & -i

    def _enter(self, host):
        self._add(host._slot, host.eweight)
        self._total += host.eweight

    def _leave(self, host):
        self._add(host._slot, -host.eweight)
        self._total -= host.eweight

    def _reshared(self, host, old_eweight):
        if host._ok and not self._dirty:     # a slow start step: one path of the tree
            self._add(host._slot, host.eweight - old_eweight)
            self._total += host.eweight - old_eweight

    def _choose(self, client_ip, exclude):
        total = self._total
        held = [host for host in exclude if host._ok and host._owner is self] if exclude else ()
        for host in held:           # out of the tree for this one draw
            self._add(host._slot, -host.eweight)
            total -= host.eweight
        try:
            if total <= 0:
                return None
            point = self.rng.random() * total
            if point >= total:      # float rounding: stay inside the last host
                point = total - 0.5
            # The largest position whose cumulative weight is <= point; the
            # host just after it is the one whose span holds the point.
            tree = self._tree
            size = len(tree) - 1
            pos = 0
            step = self._top
            while step:
                nxt = pos + step
                if nxt <= size and tree[nxt] <= point:
                    pos = nxt
                    point -= tree[nxt]
                step >>= 1
            return self._slots[pos]
        finally:
            for host in held:
                self._add(host._slot, host.eweight)

    def _predict(self, client_ip, exclude, candidates):
        total = sum(host.eweight for host in candidates)
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
            host = self._choose(client_ip, exclude)
        finally:
            self.rng.setstate(state)
        if host is None:
            return None, 'weighted random: no eligible weight in the tree'
        return host, (f'weighted random: the next draw gives {host.name} '
                      f'(weight {host.eweight} of total {total}, '
                      f'{len(candidates)} eligible)')

    def _explain_extra(self, result, client_ip, candidates=None):
        if candidates is not None:
            result['candidates'] = [[host.name, host.weight] for host in candidates]


class RoundRobinScheduler(Scheduler):
    """Weighted round robin, O(1) or O(log n) a pick.

    Equal weights (the common case): strict rotation in host order over the
    eligible hosts, an index into a list of them.

    Unequal weights: earliest deadline first.  A round has sum(weights)
    turns; a host of weight w has its turns at the midpoints (k - 1/2) / w
    of the round, k = 1..w, and each pick takes the next turn of an
    eligible host (turns at the same moment go in host order), from a heap.
    So 3:1 gives A A B A, as nginx's smooth weighted round robin does, and
    5:1:1 gives A A A B C A A (nginx: A A B A C A A).  Each host's turns are
    evenly spaced, and any sum(weights) consecutive picks give every host
    exactly its weight while the hosts stay put.  A host that comes back
    takes its next turn in the running round: no burst to catch up.
    """

    name = 'roundrobin'

    def _clear_structure(self):
        self._weighted = False
        # equal weights: the eligible hosts in host order, their _order keys
        # (for bisect), the position of the next pick, the last pick's key
        self._ring = []
        self._keys = []
        self._next = 0
        self._last = -1
        self._last_host = None  # the last pick: its order is _last once reordered
        # unequal weights: a heap of (round, point, order, seq, host, turn),
        # and the (round, point, order) of the last turn taken
        self._heap = []
        self._time = (0, 0.0, -1)
        self._seq = itertools.count()

    def pick(self, client_ip, exclude=()):
        # The common case written out (one call a connection, not four): nothing
        # excluded, no sticky clients, nothing waiting to rebuild.  A ring is kept
        # only for equal weights, so a ring with hosts says the weights are equal.
        ring = self._ring
        if ring and not exclude and not self._dirty and not self.sticky:
            i = self._next if self._next < len(ring) else 0
            host = ring[i]
            self._next = i + 1
            self._last = host._order
            self._last_host = host
            return host
        return Scheduler.pick(self, client_ip, exclude)

    def _rebuild(self):
        hosts = self.hosts
        weighted = len({host.eweight for host in hosts}) > 1
        self._ring = []
        self._keys = []
        self._heap = []
        last = self._last_host
        if last is not None and last._owner is self:
            # Orders change on reorder: the last pick and every kept turn
            # are placed by the hosts' orders now.
            self._last = last._order
            self._time = self._time[:2] + (last._order,)
        if weighted:
            # A host keeps the turn it is waiting for (one skipped while
            # excluded may lie before the last turn taken): a rebuild must
            # not change what comes next.  The rest join as they would now.
            keep = self._weighted
            heap = []
            for host in hosts:
                if host._ok:
                    entry = host._entry if keep else None
                    if entry is None:
                        entry = self._first_turn(host)
                    elif entry[2] != host._order:
                        entry = entry[:2] + (host._order,) + entry[3:]
                        host._entry = entry
                    heap.append(entry)
            heapq.heapify(heap)
            self._heap = heap
        else:
            for host in hosts:
                host._entry = None
            self._ring = [host for host in hosts if host._ok]
            self._keys = [host._order for host in self._ring]
            self._next = bisect.bisect_right(self._keys, self._last)
        self._weighted = weighted

    def _first_turn(self, host):
        """The host's first turn after the last one taken: its entry."""
        period, point, order = self._time
        weight = host.eweight
        # About how many of its turns this round are at or before point;
        # the loop settles float rounding and ties (host order).
        turn = max(int(point * weight + 0.5) - 2, 0)
        while True:
            turn += 1
            if turn > weight:
                period, turn = period + 1, 1
                break
            if ((turn - 0.5) / weight, host._order) > (point, order):
                break
        entry = (period, (turn - 0.5) / weight, host._order, next(self._seq), host, turn)
        host._entry = entry
        return entry

    def _enter(self, host):
        if self._weighted:
            heapq.heappush(self._heap, self._first_turn(host))
        else:
            # _next counts the eligible hosts at or before the last pick in
            # host order; the rotation carries on after the last pick.
            pos = bisect.bisect_left(self._keys, host._order)
            self._ring.insert(pos, host)
            self._keys.insert(pos, host._order)
            if host._order <= self._last:
                self._next += 1

    def _enter_pending(self, host):
        if self._weighted:
            self._first_turn(host)  # its turn as of now; the rebuild keeps it

    def _leave(self, host):
        if self._weighted:
            host._entry = None      # its heap entry is stale now
            if len(self._heap) > 2 * self._eligible + 64:
                self._heap = [entry for entry in self._heap if entry[4]._entry is entry]
                heapq.heapify(self._heap)
        else:
            pos = bisect.bisect_left(self._keys, host._order)
            if pos < len(self._ring) and self._ring[pos] is host:
                del self._ring[pos]
                del self._keys[pos]
                if host._order <= self._last:
                    self._next -= 1

    def _choose(self, client_ip, exclude):
        if not self._weighted:
            i = self._rotation_next(exclude)
            if i is None:
                return None
            host = self._ring[i]
            self._next = i + 1
            self._last = host._order
            self._last_host = host
            return host
        heap = self._heap
        held = None
        while heap:
            entry = heap[0]
            host = entry[4]
            if host._entry is not entry:
                heapq.heappop(heap)             # stale: the host left or moved on
            elif exclude and host in exclude:
                if held is None:
                    held = []
                held.append(heapq.heappop(heap))  # keeps its turn for later
            else:
                break
        else:
            for entry in held or ():
                heapq.heappush(heap, entry)
            return None
        period, point, order, _, _, turn = entry
        self._time = (period, point, order)
        self._last = order
        self._last_host = host
        weight = host.eweight
        if turn < weight:
            turn += 1
        else:
            period, turn = period + 1, 1
        new = (period, (turn - 0.5) / weight, order, next(self._seq), host, turn)
        host._entry = new
        heapq.heapreplace(heap, new)
        if held:
            for entry in held:
                heapq.heappush(heap, entry)
        return host

    def _rotation_next(self, exclude):
        """The ring position of the next pick, or None."""
        ring = self._ring
        size = len(ring)
        if not size:
            return None
        i = self._next if self._next < size else 0
        if exclude:
            # len(exclude) steps at most, as some eligible host is not
            # excluded; the bound is for safety only.
            for _ in range(size):
                if ring[i] not in exclude:
                    break
                i = i + 1 if i + 1 < size else 0
            else:
                return None
        return i

    def _reweighed(self, host, old_weight):
        host._entry = None      # its turns are spaced for the old weight
        self._dirty = True

    def _reshared(self, host, old_eweight):
        self._reweighed(host, old_eweight)

    def _predict(self, client_ip, exclude, candidates):
        if not self._weighted:
            i = self._rotation_next(exclude)
            if i is None:
                return None, 'round robin: no eligible host in the rotation'
            return self._ring[i], (f'round robin: next in turn '
                                   f'(number {i + 1} of {len(self._ring)} eligible)')
        for entry in _heap_in_order(self._heap):
            host = entry[4]
            if host._entry is entry and host not in exclude:
                break
        else:
            return None, 'weighted round robin: no eligible host in the heap'
        total = sum(other.eweight for other in candidates)
        return host, (f'weighted round robin: next in turn (turn {entry[5]} '
                      f'of {host.eweight} this round, total weight {total})')

    def _structure_state(self):
        if not self._weighted:
            return ('rotation', self._next, [host.name for host in self._ring])
        live = sorted(entry[:3] + (entry[5],) for entry in self._heap if entry[4]._entry is entry)
        return ('turns', self._time, live)


class LeastConnsScheduler(Scheduler):
    """Fewest open connections per unit of weight; ties go to the first host.

    The tie rule is the original Python Director's: with no load it sends
    every connection to the first host.  leastconnsrr spreads ties instead.
    The eligible hosts sit in a heap keyed by (open / weight, tie-break),
    re-keyed as their connections start and end: O(log n).
    """

    name = 'leastconns'
    reads_load = True
    _tie_rule = 'first'
    _what = 'least connections'
    _lazy = False       # see LeastConnsRRScheduler

    def _clear_structure(self):
        self._heap = []
        self._seq = itertools.count()

    # open/weight compares exactly for equal ratios because IEEE division
    # is correctly rounded; seq keeps entries unique, so Hosts never compare.
    def _key(self, host):
        entry = (host.open / host.eweight, host._order, next(self._seq), host)
        host._entry = entry
        return entry

    def _rank_key(self, host):
        return (host.open / host.eweight, host._order)

    def _rebuild(self):
        for host in self.hosts:
            host._entry = None
        self._heap = [self._key(host) for host in self.hosts if host._ok]
        heapq.heapify(self._heap)

    def _enter(self, host):
        heap = self._heap
        entry = self._key(host)
        if heap and heap[0][-1] is host:
            # The host just picked is usually on top: replace its old entry
            # rather than leave it to be popped as stale (one sift, not two).
            heapq.heapreplace(heap, entry)
            return
        heapq.heappush(heap, entry)
        if len(heap) > 2 * self._eligible + 64:
            # Every re-key leaves a stale entry behind; sweep them out.
            self._heap = [entry for entry in heap if entry[-1]._entry is entry]
            heapq.heapify(self._heap)

    def _leave(self, host):
        host._entry = None

    def connection_started(self, host):
        host.open += 1
        host.total += 1
        if host._ok and host._owner is self:
            if host.maxconns and host.open >= host.maxconns:
                self._refresh(host)
            elif not self._dirty:
                self._enter(host)       # re-keyed: the old entry goes stale

    def connection_ended(self, host):
        if host.open > 0:
            host.open -= 1
            if host._owner is self:
                if host._ok:
                    if not self._dirty:
                        self._enter(host)
                elif host.maxconns:
                    self._refresh(host)

    def _reweighed(self, host, old_weight):
        if host._ok and not self._dirty:
            self._enter(host)

    def _reshared(self, host, old_eweight):
        self._reweighed(host, old_eweight)

    def _loaded(self, host):
        self._enter(host)

    def _top(self, exclude):
        """The least loaded eligible host not in exclude, or None."""
        heap = self._heap
        lazy = self._lazy
        held = None
        found = None
        while heap:
            entry = heap[0]
            host = entry[-1]
            if host._entry is not entry:
                heapq.heappop(heap)                         # stale
            elif lazy and entry[1] != host._last_pick:
                heapq.heapreplace(heap, self._key(host))    # picked since: key went up
            elif exclude and host in exclude:
                if held is None:
                    held = []
                held.append(heapq.heappop(heap))
            else:
                found = host
                break
        if held:
            for entry in held:
                heapq.heappush(heap, entry)
        return found

    def _choose(self, client_ip, exclude):
        return self._top(exclude)

    def _predict(self, client_ip, exclude, candidates):
        # What _top() settles on: the least true key (leastconnsrr's heap
        # keys may be low, see there).
        host = min(candidates, key=self._rank_key)
        return host, least_reason(self._what, host, candidates, self._tie_rule)

    def _structure_state(self):
        return sorted((self._rank_key(entry[-1]), entry[-1].name)
                      for entry in self._heap if entry[-1]._entry is entry)


class LeastConnsRRScheduler(LeastConnsScheduler):
    """Fewest open connections per unit of weight; ties go to the host
    picked least recently, so an idle farm is used in rotation.

    A pick raises the host's key (its last pick) but leaves its heap entry
    as it was: the connection_started that follows re-keys it anyway, while
    it is still on top (one sift for both).  A low key is no harm: the top
    is checked against the host before it is taken, and no other host's
    true key is below its heap key.
    """

    name = 'leastconnsrr'
    _tie_rule = 'least recently picked'
    _what = 'least connections, round robin on ties'
    _lazy = True

    def __init__(self, *args, **kwargs):
        # A pick counter, not the clock: two picks in the same clock tick
        # must still be ordered.
        self._picks = 0
        super().__init__(*args, **kwargs)

    def _key(self, host):
        # Never-picked hosts (0) tie among themselves: host order decides.
        entry = (host.open / host.eweight, host._last_pick, host._order, next(self._seq), host)
        host._entry = entry
        return entry

    def _rank_key(self, host):
        return (host.open / host.eweight, host._last_pick, host._order)

    def _choose(self, client_ip, exclude):
        host = self._top(exclude)
        if host is not None:
            self._picks += 1
            host._last_pick = self._picks
        return host


class HashScheduler(Scheduler):
    """Consistent hashing of the client IP on a ring (ketama, as nginx's
    ``hash ... consistent``).

    Each host has POINTS points on a ring of 2**44 per unit of weight, at
    stable hashes of its name; a client hashes to a place on the ring and
    goes to the host of the first point after it whose host is eligible.
    So a client keeps its host across restarts and scheduler changes,
    adding a host of N moves only the clients it now wins (about 1/N of
    them), removing or losing a host moves only that host's clients, and
    each client has a stable failover order (the hosts in ring order from
    its place), along which its connections go while hosts are down or
    full.  A pick is a hash, a bisect and a short walk: O(log n).

    Shares follow the weights to within a few percent (the points are
    random: about 1/sqrt(points) apart).  A group with more than
    MAX_POINTS / POINTS units of weight gets half as many points per unit
    (again, as needed), which moves about half its clients once.

    Slow start gives a returning host the first part of its points (its
    share of its weight), then more at each step: a host's points are a
    fixed sequence, so each step adds points and takes none away, and its
    clients come back to it a few at a time, each once, while the others
    stay where they are.
    """

    name = 'hash'
    _scaled = False

    POINTS = 160                # ring points per unit of weight (nginx: 160)
    # Ring size bound: 4 MB, and about 0.3 s to build (the first pick after
    # a start or a scheduler change; adding a host merges, in about 1/10).
    MAX_POINTS = 1 << 19
    RANKING = 10                # hosts explain() ranks

    # A ring entry is one int: the point's top 44 bits, then the host's
    # slot in the low 20, so the ring sorts and bisects as plain ints.
    _SLOT_BITS = 20
    _SLOT_MASK = (1 << _SLOT_BITS) - 1
    _POINT_MASK = ((1 << 64) - 1) ^ _SLOT_MASK
    _RING = 1 << 44
    _unpack = struct.Struct('>8Q').unpack

    def _clear_structure(self):
        self._ring = array('Q')     # sorted entries
        self._ring_hosts = []       # slot -> host; None for a removed host
        self._free = []             # slots with no points on the ring
        self._dead = 0              # slots whose points are still on the ring
        self._pending = []          # hosts added since the ring was made
        self._units = 0             # sum of the hosts' weights
        self._per_unit = self.POINTS

    def add_host(self, host):
        if len(self._by_name) > self._SLOT_MASK:
            raise ValueError(f'a hash group holds at most {self._SLOT_MASK + 1} hosts')
        return super().add_host(host)

    def _joined(self, host):
        self._units += host.weight
        self._pending.append(host)
        self._dirty = True

    def _left(self, host):
        self._units -= host.weight
        self._bury(host)

    def _bury(self, host):
        # Its points stay on the ring until a sweep, skipped like a down host's.
        if host._slot >= 0:
            self._ring_hosts[host._slot] = None
            host._slot = -1
            self._dead += 1
            self._dirty = True

    def _reweighed(self, host, old_weight):
        self._units += host.weight - old_weight
        self._bury(host)
        self._pending.append(host)
        self._dirty = True

    def _reordered(self):
        pass        # the ring does not depend on host order

    def _share_changed(self, host):
        if host._owner is self:       # its points are redrawn at the next pick
            self._bury(host)
            self._pending.append(host)
            self._dirty = True

    def _enter(self, host):
        pass        # eligibility is read while walking the ring

    def _leave(self, host):
        pass

    def _points(self, host, slot):
        count = self._per_unit * host.weight
        if host._share < 1.0:
            count = max(1, int(count * host._share + 0.999999))    # the first of them
        name = host.name
        values = []
        # 8 points per 64-byte blake2b digest; hashlib, not hash(): str
        # hashes are salted per process, and the ring must not move on restart.
        for block in range((count + 7) // 8):
            key = f'{name}\0{block}'.encode('utf-8')
            values.extend(self._unpack(hashlib.blake2b(key, digest_size=64).digest()))
        del values[count:]
        mask = self._POINT_MASK
        return [(value & mask) | slot for value in values]

    def _rebuild(self):
        per_unit = self.POINTS
        while per_unit > 1 and self._units * per_unit > self.MAX_POINTS:
            per_unit //= 2
        if (per_unit != self._per_unit or not self._ring
                or len(self._ring_hosts) + len(self._pending) > self._SLOT_MASK):
            # From scratch: the first time, a new number of points per
            # unit, or slot numbers running out (a full rebuild renumbers).
            self._per_unit = per_unit
            hosts = self.hosts
            entries = []
            for slot, host in enumerate(hosts):
                host._slot = slot
                entries.extend(self._points(host, slot))
            entries.sort()
            self._ring = array('Q', entries)
            self._ring_hosts = list(hosts)
            self._free = []
            self._dead = 0
            self._pending = []
            return
        if self._dead * 4 > len(self._ring_hosts):
            # Sweep the removed hosts' points; their slots can be reused.
            live = self._ring_hosts
            mask = self._SLOT_MASK
            self._ring = array('Q', [entry for entry in self._ring if live[entry & mask] is not None])
            self._free = [slot for slot, host in enumerate(live) if host is None]
            self._dead = 0
        new = []
        for host in self._pending:
            if host._owner is not self or host._slot >= 0:
                continue        # removed again, or listed twice
            if self._free:
                slot = self._free.pop()
                self._ring_hosts[slot] = host
            else:
                slot = len(self._ring_hosts)
                self._ring_hosts.append(host)
            host._slot = slot
            new.extend(self._points(host, slot))
        self._pending = []
        if new:
            # Timsort finds the ring as one sorted run: merging is linear.
            entries = self._ring.tolist()
            entries.extend(new)
            entries.sort()
            self._ring = array('Q', entries)

    def _place(self, client_ip):
        """Where the client's walk starts: the index of the first entry after its point."""
        digest = hashlib.blake2b(client_ip.encode('utf-8'), digest_size=8).digest()
        key = int.from_bytes(digest, 'big') | self._SLOT_MASK
        return key, bisect.bisect_right(self._ring, key)

    def _choose(self, client_ip, exclude):
        _, i = self._place(client_ip)
        ring = self._ring
        hosts = self._ring_hosts
        mask = self._SLOT_MASK
        size = len(ring)
        # Some eligible host is not excluded and every host has points, so
        # this ends at one; the bound is for safety only.
        for _ in range(size):
            if i >= size:
                i = 0
            host = hosts[ring[i] & mask]
            if host is not None and host._ok and not (exclude and host in exclude):
                return host
            i += 1
        return None

    def walk(self, client_ip, count=None):
        """This client's hosts in ring order, eligible or not, with the
        distance to each (a fraction of the ring), nearest first.

        The client's failover order: pick() returns the first eligible,
        non-excluded host of it.  ``count`` stops after that many hosts.
        """
        if self._dirty:
            self._sync()
        key, i = self._place(client_ip)
        ring = self._ring
        hosts = self._ring_hosts
        mask = self._SLOT_MASK
        size = len(ring)
        wanted = len(self._by_name) if count is None else min(count, len(self._by_name))
        start = key >> self._SLOT_BITS
        seen = set()
        order = []
        for _ in range(size):
            if len(order) >= wanted:
                break
            if i >= size:
                i = 0
            entry = ring[i]
            host = hosts[entry & mask]
            if host is not None and host not in seen:
                seen.add(host)
                distance = ((entry >> self._SLOT_BITS) - start) % self._RING
                order.append((host, distance / self._RING))
            i += 1
        return order

    def rank(self, client_ip):
        """All hosts, eligible or not, in this client's failover order."""
        return [host for host, _ in self.walk(client_ip)]

    def _predict(self, client_ip, exclude, candidates):
        host = self._choose(client_ip, exclude)
        if host is None:
            return None, 'hash: no eligible host on the ring'
        place = 1
        for other, _ in self.walk(client_ip):
            if other is host:
                break
            place += 1
        if place == 1:
            return host, f'hash: first host on the ring for {client_ip}'
        return host, (f'hash: first eligible host on the ring for {client_ip} '
                      f'(number {place} of {len(self._by_name)} in its order)')

    def _explain_extra(self, result, client_ip, candidates=None):
        result['ranking'] = [[host.name, distance]
                             for host, distance in self.walk(client_ip, self.RANKING)]


def least_reason(what, host, candidates, tie_rule):
    """The explain() sentence of the least-connections schedulers."""
    load = host.open / host.eweight
    weighted = any(other.eweight != 1 for other in candidates)
    text = f'{what}: {host.open} open'
    if weighted:
        text += f' (weight {host.eweight})'
    text += f', fewest{" per weight" if weighted else ""} of {len(candidates)} eligible'
    tied = sum(1 for other in candidates if other.open / other.eweight == load)
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
