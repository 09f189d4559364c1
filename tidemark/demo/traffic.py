"""A seeded simulation of the community-funding platform's traffic, as a stream of ``AnalyticsEvent``.

What happens on the simulated platform
--------------------------------------
Sessions arrive as a non-homogeneous Poisson process whose intensity follows
:class:`~tidemark.demo.seasonality.Seasonality` (hour of day and day of week in a local
timezone); arrivals are drawn by thinning, so there is no time grid. Each session is one
of three kinds:

- a **new visitor** (a fresh device with its own ``anonymous_id``) arriving through an
  acquisition channel (UTM campaign and/or referrer, or a member's referral link);
- a **returning visitor** who has not signed up yet;
- a **member** (signed up) coming back, sometimes on a new device (logs in, which links
  that device too).

Anonymous sessions browse pages and sometimes end in ``signup`` (carrying both the
``anonymous_id`` and the new ``user_id``: this is what identity stitching links), followed
by ``identify`` with traits, ``referral_accepted`` when referred, and ``join_community``.
Members browse, open projects (exposure to the ``checkout_button`` experiment, which has
a real lift in ``fund_project``), contribute, watch ads that pay into projects, create
projects, take micro-loans (disbursed and repaid later by the platform), refer friends,
and hit errors. Projects are funded (``project_funded``) when contributions reach their
goal, or expire (``project_expired``) at their deadline. Members churn after a random
lifetime, so retention decays like a real product's.

Sessions of one device are separated by more than ``SESSION_GAP`` (30 minutes) and
events inside a session by less, so a session window of 30 minutes recovers them.

Determinism
-----------
One ``random.Random`` seeded with (seed, start) drives everything, including event ids
(``uuid.UUID(int=rng.getrandbits(128), version=4)``), and no iteration order depends on
hashing: the same config yields the same events, byte for byte. A different start gives
different ids, so repeated live runs never collide.

>>> from datetime import datetime, timedelta, UTC
>>> start = datetime(2026, 3, 2, tzinfo=UTC)
>>> config = TrafficConfig(start=start, end=start + timedelta(days=1), sessions_per_day=400, seed=1)
>>> first = [e.id for e in generate_events(config)]
>>> first == [e.id for e in generate_events(config)] and len(first) > 1000
True
"""

from __future__ import annotations

import heapq
import json
import math
import random
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from schemas.models import AnalyticsEvent
from schemas.taxonomy import event_type_for
from tidemark.demo import catalogue as cat
from tidemark.demo.anomalies import InjectedAnomaly, magnitude_at
from tidemark.demo.experiments import AA_TEST, CHECKOUT_BUTTON, TREATMENT, assign_variant
from tidemark.demo.seasonality import Seasonality

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
SECOND_MS = 1000
MINUTE_MS = 60 * SECOND_MS
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS
SESSION_GAP = timedelta(minutes=30)
PROJECT_LIFETIME_DAYS = 30
LIBRARY = {"name": "tidemark-demo", "version": "1"}
SERVER_CONTEXT: dict[str, Any] = {"library": {"name": "tidemark-platform", "version": "1"}}

# Measured mean number of events per session with the default behaviour (see the unit test
# that checks it); turns an events-per-second rate into a session arrival rate.
EVENTS_PER_SESSION = 4.8

# Share of sessions by kind; the member share stays fixed so traffic is stationary
# (signups and churn balance each other), which keeps the clean stream free of trends.
MEMBER_SESSION_SHARE = 0.45
RETURNING_VISITOR_SHARE = 0.15
REFERRED_SHARE_OF_NEW = 0.10
MEMBER_MEAN_LIFETIME_DAYS = 60.0
LOAN_REPAY_SHARE = 0.9
LOAN_REPAY_MIN_DAYS = 7
LOAN_REPAY_MAX_DAYS = 45
# Measured loans disbursed per session with the default behaviour; sizes the loans
# already outstanding at the start.
LOANS_DISBURSED_PER_SESSION = 0.019


@dataclass(frozen=True)
class TrafficConfig:
    """What to simulate: time range, volume, shape, experiments and injected incidents.

    ``end=None`` simulates forever (live mode). ``sessions_per_day`` is the weekly average;
    seasonality redistributes it over hours and days. ``initial_members`` and
    ``initial_projects`` default to the steady state of this volume, so the first day
    already looks like any other. Before ``history_until`` the volume is multiplied by
    ``history_scale`` (a live demo's backfill can be lighter than its live traffic): the
    mix of session kinds and what people do in a session stay the same, but the member
    population is sized for the live volume, so members visit less often in the history.
    """

    start: datetime
    end: datetime | None = None
    seed: int = 7
    sessions_per_day: float = 2000.0
    timezone: str = "UTC"
    seasonality: float = 1.0
    initial_members: int | None = None
    initial_projects: int | None = None
    signup_probability: float = 0.07
    fund_probability: float = 0.15
    checkout_lift: float = 0.20
    error_rate: float = 0.005
    anomalies: tuple[InjectedAnomaly, ...] = ()
    history_until: datetime | None = None
    history_scale: float = 1.0
    session_ids: bool = False
    source: str = "demo"

    def __post_init__(self) -> None:
        if self.start.tzinfo is None or (self.end is not None and self.end.tzinfo is None):
            raise ValueError("start and end must be timezone-aware")
        if self.end is not None and self.end <= self.start:
            raise ValueError("end must be after start")
        if self.sessions_per_day <= 0:
            raise ValueError("sessions_per_day must be positive")
        if self.history_scale <= 0:
            raise ValueError("history_scale must be positive")

    @classmethod
    def for_rate(cls, events_per_second: float, **kwargs: Any) -> TrafficConfig:
        """A config whose average event rate (over a week) is about ``events_per_second``."""
        return cls(sessions_per_day=events_per_second * 86400 / EVENTS_PER_SESSION, **kwargs)

    @property
    def member_count(self) -> int:
        """Members existing at ``start``: the steady state of signups x mean lifetime."""
        if self.initial_members is not None:
            return self.initial_members
        anonymous_per_day = self.sessions_per_day * (1 - MEMBER_SESSION_SHARE)
        return max(20, round(anonymous_per_day * self.signup_probability * 1.4 * MEMBER_MEAN_LIFETIME_DAYS))

    @property
    def project_count(self) -> int:
        """Open projects at ``start``."""
        if self.initial_projects is not None:
            return self.initial_projects
        return max(20, round(self.sessions_per_day * 0.1))


@dataclass
class _Device:
    anonymous_id: str
    profile: cat.DeviceProfile
    country: str
    locale: str


@dataclass
class _Member:
    user_id: str
    devices: list[_Device]
    country: str
    communities: list[str]
    referral_code: str
    signup_method: str
    churn_at: int
    activity: float
    available_at: int = 0
    loan_busy_until: int = 0


@dataclass
class _Visitor:
    device: _Device
    channel: cat.AcquisitionChannel
    referral_code: str | None
    available_at: int = 0
    member: _Member | None = None


@dataclass(eq=False)  # removed from long lists by identity: a field-by-field __eq__ made closing quadratic
class _Project:
    project_id: str
    creator: str
    community: str
    category: str
    goal: float
    created_at: int
    deadline: int
    raised: float = 0.0
    closed: bool = False


@dataclass
class _Pending:
    """An event waiting in the time-ordered queue (or a platform job when ``job`` is set)."""

    ts: int
    seq: int
    name: str = field(compare=False, default="")
    user_id: str | None = field(compare=False, default=None)
    anonymous_id: str | None = field(compare=False, default=None)
    session_id: str | None = field(compare=False, default=None)
    properties: dict[str, Any] = field(compare=False, default_factory=dict)
    context: dict[str, Any] = field(compare=False, default_factory=dict)
    event_id: int = field(compare=False, default=0)  # the UUID's 128-bit integer
    job: Callable[[int], None] | None = field(compare=False, default=None)


def uuid_text(value: int) -> str:
    """The canonical text of the UUID whose integer is ``value`` (what ``str(UUID(int=value))`` gives)."""
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _timestamp(ms: int) -> datetime:
    return EPOCH + timedelta(milliseconds=ms)


def _ms(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(milliseconds=1)


class _Session:
    """One visit: a clock, the device's context, and the events it has produced so far."""

    def __init__(
        self,
        sim: TrafficSimulator,
        start: int,
        device: _Device,
        user_id: str | None,
        channel: cat.AcquisitionChannel | None,
    ) -> None:
        self.sim = sim
        self.t = start
        self.device = device
        self.user_id = user_id
        self.session_id = uuid_text(sim.new_uuid_int())
        profile = device.profile
        base: dict[str, Any] = {
            "device": {"type": profile.device_type},
            "browser": {"name": profile.browser},
            "os": {"name": profile.os},
            "locale": device.locale,
            "location": {"country": device.country},
            "userAgent": profile.user_agent,
            "library": LIBRARY,
        }
        if channel is not None and channel.utm_source:
            base["campaign"] = {
                "source": channel.utm_source,
                "medium": channel.utm_medium,
                "name": channel.utm_campaign,
            }
        if channel is not None and channel.referrer:
            base["referrer"] = {"url": channel.referrer}
        self.base_context = base
        self.page = {"path": "/", "title": cat.BROWSE_PAGES[0][1]}

    def advance(self, low_ms: int = 2 * SECOND_MS, high_ms: int = 10 * MINUTE_MS) -> None:
        """Let some think time pass (log-normal, median ~30 s, always far below the session gap)."""
        gap = int(self.sim.rng.lognormvariate(10.3, 1.0))
        self.t += min(high_ms, max(low_ms, gap))

    def track(self, name: str, properties: dict[str, Any] | None = None) -> None:
        """Record an event at the session's clock, in the current page's context."""
        self.sim.push_event(
            self.t,
            name,
            self.user_id,
            self.device.anonymous_id,
            properties or {},
            {**self.base_context, "page": dict(self.page)},
            self.session_id,
        )

    def page_view(self, path: str, title: str) -> None:
        """Open a page; maybe hit an error on it (baseline rate, or a burst when injected)."""
        self.page = {"path": path, "title": title}
        self.track("page_view", {"path": path, "title": title})
        sim = self.sim
        rate = magnitude_at(sim.config.anomalies, "error_burst", self.t)
        if sim.rng.random() < (sim.config.error_rate if rate is None else rate):
            self.t += sim.rng.randint(200, 3 * SECOND_MS)
            message, code = sim.pick(sim.error_table)
            self.track("error", {"message": message, "code": code, "path": path})

    @property
    def next_available(self) -> int:
        """The earliest start of this device's next session: strictly more than the gap later."""
        return self.t + int(SESSION_GAP.total_seconds() * 1000) + SECOND_MS


class TrafficSimulator:
    """Runs the simulation described in the module docstring; iterate it for pending events.

    Prefer :func:`generate_events` (validated models) or :func:`generate_records`
    (Avro-shaped dicts, for bulk loading).
    """

    def __init__(self, config: TrafficConfig) -> None:
        self.config = config
        self.start_ms = _ms(config.start)
        # The start is part of the seed: the same seed started at another time (e.g. each run of
        # the live demo) must not reproduce the same event ids at different timestamps.
        self.rng = random.Random(f"tidemark-demo:{config.seed}:{self.start_ms}")
        self.seasonality = Seasonality(config.timezone, config.seasonality)
        self.end_ms = _ms(config.end) if config.end is not None else None
        self._queue: list[tuple[int, int, _Pending]] = []  # (ts, seq, item): tuples compare fast
        self._seq = 0
        self.members: list[_Member] = []  # active (not churned) members; churned ones are swapped out
        self.prospects: list[_Visitor] = []
        self.open_projects: list[_Project] = []
        self.projects_by_community: dict[str, list[_Project]] = {c: [] for c, _ in cat.COMMUNITIES}
        self.pending_referrals: list[str] = []
        # Weighted tables as (values, cumulative weights) for rng.choices.
        self.device_table = _table([(d, d.weight) for d in cat.DEVICES])
        self.country_table = _table([((c, loc), w) for c, loc, w in cat.COUNTRIES])
        self.channel_table = _table([(c, c.weight) for c in cat.CHANNELS])
        self.category_table = _table(list(cat.CATEGORIES))
        self.page_table = _table([((p, t), w) for p, t, w in cat.BROWSE_PAGES])
        self.method_table = _table(list(cat.SIGNUP_METHODS))
        self.age_table = _table(list(cat.AGE_BANDS))
        self.error_table = _table([((m, c), w) for m, c, w in cat.ERRORS])
        self.contribution_table = _table(list(cat.CONTRIBUTIONS))
        self.goal_table = _table(list(cat.GOAL_AMOUNTS))
        self.loan_table = _table(list(cat.LOAN_AMOUNTS))
        self.communities_by_country: dict[str, list[str]] = {}
        for slug, country in cat.COMMUNITIES:
            self.communities_by_country.setdefault(country, []).append(slug)
        self._seed_world()

    # ----------------------------------------------------------------- primitives
    def pick(self, table: tuple[list[Any], list[float]]) -> Any:
        """One weighted draw from a ``(values, cumulative weights)`` table."""
        values, cumulative = table
        return self.rng.choices(values, cum_weights=cumulative, k=1)[0]

    def new_uuid(self) -> uuid.UUID:
        """A version-4 UUID drawn from the seeded RNG (so ids are reproducible)."""
        return uuid.UUID(int=self.new_uuid_int())

    def new_uuid_int(self) -> int:
        """The integer of a version-4 UUID drawn from the seeded RNG.

        Same bits as ``uuid.UUID(int=rng.getrandbits(128), version=4)``, without building
        the object (the hot path creates one per event).
        """
        value = self.rng.getrandbits(128)
        value = (value & ~(0xC000 << 48)) | (0x8000 << 48)  # RFC 4122 variant
        return (value & ~(0xF000 << 64)) | (4 << 76)  # version 4

    def short_id(self, prefix: str) -> str:
        """A readable random id such as ``prj_3f9a0c1d2e``."""
        return f"{prefix}_{self.rng.getrandbits(48):012x}"

    def push_event(
        self,
        ts: int,
        name: str,
        user_id: str | None,
        anonymous_id: str | None,
        properties: dict[str, Any],
        context: dict[str, Any],
        session_id: str | None = None,
    ) -> None:
        """Queue an event for emission in timestamp order."""
        self._seq += 1
        item = _Pending(
            ts,
            self._seq,
            name,
            user_id,
            anonymous_id,
            session_id if self.config.session_ids else None,
            properties,
            context,
            self.new_uuid_int(),
        )
        heapq.heappush(self._queue, (ts, self._seq, item))

    def schedule(self, ts: int, job: Callable[[int], None]) -> None:
        """Run ``job(ts)`` when the simulation reaches ``ts`` (e.g. a project's deadline)."""
        self._seq += 1
        heapq.heappush(self._queue, (ts, self._seq, _Pending(ts, self._seq, job=job)))

    # ----------------------------------------------------------------- the world at start
    def _seed_world(self) -> None:
        # Members who signed up before the range are materialised lazily, the first time one of
        # them is drawn: a uniform draw over all N members lands on a not-yet-seen one with
        # probability unseen / N, which is what drawing an index past the seen ones does. Big
        # populations (a fast live demo) then cost nothing up front.
        self.unseen_members = self.config.member_count
        for _ in range(self.config.project_count):
            creator = self._existing_member()
            created = self.start_ms - self.rng.randint(0, (PROJECT_LIFETIME_DAYS - 2) * DAY_MS)
            project = self._new_project(creator, self.rng.choice(creator.communities), created)
            # Older projects have raised more, as they would have in the steady state.
            progress = (self.start_ms - created) / (PROJECT_LIFETIME_DAYS * DAY_MS) * self.rng.uniform(0.2, 1.6)
            project.raised = round(project.goal * min(0.95, progress), 2)
        # Loans disbursed before the range are still being repaid in it, so repayments do not
        # ramp up from zero during the first weeks.
        outstanding = self.config.sessions_per_day * LOANS_DISBURSED_PER_SESSION * LOAN_REPAY_MAX_DAYS
        for _ in range(round(outstanding)):
            disbursed = self.start_ms - self.rng.randint(0, LOAN_REPAY_MAX_DAYS * DAY_MS)
            repaid = disbursed + self.rng.randint(LOAN_REPAY_MIN_DAYS * DAY_MS, LOAN_REPAY_MAX_DAYS * DAY_MS)
            if repaid < self.start_ms or self.rng.random() >= LOAN_REPAY_SHARE:
                continue
            member = self._existing_member()
            loan = {
                "loan_id": self.short_id("loan"),
                "community": member.communities[0],
                "amount": self.pick(self.loan_table),
            }
            self.push_event(repaid, "loan_repaid", member.user_id, None, loan, dict(SERVER_CONTEXT))
            member.loan_busy_until = repaid

    def _existing_member(self) -> _Member:
        """A member who signed up before the simulated range (no signup event of theirs is in it)."""
        self.unseen_members = max(0, self.unseen_members - 1)
        country, locale = self.pick(self.country_table)
        member = self._new_member(self._new_device(country, locale), self.pick(self.method_table), self.start_ms)
        member.communities.append(self._home_community(country))
        self.members.append(member)
        return member

    def _new_device(self, country: str, locale: str) -> _Device:
        return _Device(str(self.new_uuid()), self.pick(self.device_table), country, locale)

    def _new_member(self, device: _Device, method: str, since: int) -> _Member:
        lifetime = self.rng.expovariate(1 / MEMBER_MEAN_LIFETIME_DAYS) * DAY_MS
        code = "".join(self.rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(8))
        return _Member(
            user_id=self.short_id("usr"),
            devices=[device],
            country=device.country,
            communities=[],
            referral_code=code,
            signup_method=method,
            churn_at=since + int(lifetime),
            activity=self.rng.uniform(0.25, 1.0),
        )

    def _home_community(self, country: str) -> str:
        local = self.communities_by_country.get(country)
        if local and self.rng.random() < 0.8:
            return self.rng.choice(local)
        return self.rng.choice(cat.COMMUNITIES)[0]

    def _new_project(self, creator: _Member, community: str, created: int) -> _Project:
        project = _Project(
            project_id=self.short_id("prj"),
            creator=creator.user_id,
            community=community,
            category=self.pick(self.category_table),
            goal=self.pick(self.goal_table),
            created_at=created,
            deadline=created + PROJECT_LIFETIME_DAYS * DAY_MS,
        )
        self.open_projects.append(project)
        self.projects_by_community[community].append(project)
        self.schedule(project.deadline, partial(self._expire, project))
        return project

    # ----------------------------------------------------------------- the main loop
    def __iter__(self) -> Iterator[_Pending]:
        """Pending events in timestamp order (ties in creation order), within [start, end)."""
        rng = self.rng
        config = self.config
        history_until = _ms(config.history_until) if config.history_until is not None else self.start_ms
        ceiling = self.seasonality.max_factor * max(1.0, config.history_scale)
        per_ms_max = config.sessions_per_day * ceiling / DAY_MS
        t = float(self.start_ms)
        while True:
            t += rng.expovariate(per_ms_max)
            now = int(t)
            if self.end_ms is not None and now >= self.end_ms:
                break
            yield from self._release(now)
            intensity = self.seasonality.factor(now)
            if now < history_until:
                intensity *= config.history_scale
            if rng.random() * ceiling < intensity:
                self._start_session(now)
        yield from self._release(self.end_ms if self.end_ms is not None else 0)

    def _release(self, before: int) -> Iterator[_Pending]:
        # Every session that starts later has all its events at or after its start, so
        # everything queued before ``before`` is final and can be emitted in order.
        queue = self._queue
        while queue and queue[0][0] < before:
            item = heapq.heappop(queue)[2]
            if item.job is not None:
                item.job(item.ts)
            elif item.ts >= self.start_ms:
                yield item

    def _start_session(self, t: int) -> None:
        rng = self.rng
        draw = rng.random()
        if draw < MEMBER_SESSION_SHARE:
            member = self._pick_member(t)
            if member is not None:
                self._member_session(t, member)
                return
        elif draw < MEMBER_SESSION_SHARE + RETURNING_VISITOR_SHARE:
            visitor = self._pick_prospect(t)
            if visitor is not None:
                self._anonymous_session(t, visitor, first_visit=False)
                return
        self._anonymous_session(t, self._new_visitor(), first_visit=True)

    def _pick_member(self, t: int) -> _Member | None:
        members = self.members
        for _ in range(8):
            population = len(members) + self.unseen_members
            if not population:
                return None
            index = self.rng.randrange(population)
            if index >= len(members):
                self._existing_member()
                index = len(members) - 1
            member = members[index]
            if member.churn_at <= t:  # churned: never comes back; swap-remove in O(1)
                members[index] = members[-1]
                members.pop()
                continue
            if member.available_at <= t and self.rng.random() < member.activity:
                return member
        return None

    def _pick_prospect(self, t: int) -> _Visitor | None:
        # Returning visitors are mostly recent ones: draw from the latest few thousand.
        prospects = self.prospects
        for _ in range(4):
            if not prospects:
                return None
            visitor = prospects[-self.rng.randint(1, min(len(prospects), 5000))]
            if visitor.member is None and visitor.available_at <= t:
                return visitor
        return None

    def _new_visitor(self) -> _Visitor:
        country, locale = self.pick(self.country_table)
        device = self._new_device(country, locale)
        referral: str | None = None
        channel: cat.AcquisitionChannel = self.pick(self.channel_table)
        if self.pending_referrals and self.rng.random() < REFERRED_SHARE_OF_NEW:
            index = self.rng.randrange(len(self.pending_referrals))
            referral = self.pending_referrals[index]
            self.pending_referrals[index] = self.pending_referrals[-1]
            self.pending_referrals.pop()
            channel = cat.REFERRAL_CHANNEL
        visitor = _Visitor(device, channel, referral)
        if len(self.prospects) > 200_000:  # bound memory in very long runs; old prospects rarely return
            del self.prospects[:100_000]
        self.prospects.append(visitor)
        return visitor

    # ----------------------------------------------------------------- sessions
    def _anonymous_session(self, t: int, visitor: _Visitor, first_visit: bool) -> None:
        rng = self.rng
        channel: cat.AcquisitionChannel | None = visitor.channel if first_visit else None
        if not first_visit and rng.random() < 0.2:
            channel = cat.CHANNELS[1]  # came back through a search
        session = _Session(self, t, visitor.device, None, channel)
        if channel is not None and channel.utm_source and self.open_projects and rng.random() < 0.4:
            project = rng.choice(self.open_projects)
            session.page_view(f"/projects/{project.project_id}", f"Project {project.project_id}")
        else:
            session.page_view(*self.pick(self.page_table))
        for _ in range(min(12, int(rng.expovariate(1 / 1.8)))):
            session.advance()
            self._browse(session)
        propensity = (channel or visitor.channel).signup_propensity * (1.0 if first_visit else 1.6)
        probability = self.config.signup_probability * propensity
        spike = magnitude_at(self.config.anomalies, "signup_spike", session.t)
        if spike is not None:
            probability *= spike
        if rng.random() < min(0.95, probability):
            member = self._signup(session, visitor)
            for _ in range(rng.randint(0, 2)):
                session.advance()
                self._member_action(session, member)
            member.available_at = session.next_available
        visitor.available_at = session.next_available

    def _signup(self, session: _Session, visitor: _Visitor) -> _Member:
        rng = self.rng
        session.advance(low_ms=5 * SECOND_MS, high_ms=3 * MINUTE_MS)
        session.page_view("/signup", "Create your account")
        session.advance(low_ms=10 * SECOND_MS, high_ms=4 * MINUTE_MS)
        method: str = self.pick(self.method_table)
        member = self._new_member(visitor.device, method, session.t)
        visitor.member = member
        self.members.append(member)
        session.user_id = member.user_id
        signup: dict[str, Any] = {"method": method}
        if visitor.referral_code:
            signup["referral_code"] = visitor.referral_code
        session.track("signup", signup)
        session.t += rng.randint(50, 900)
        session.track(
            "identify",
            {
                "signup_method": method,
                "country": member.country,
                "locale": visitor.device.locale,
                "age_band": self.pick(self.age_table),
                "created_at": _timestamp(session.t).isoformat().replace("+00:00", "Z"),
            },
        )
        if visitor.referral_code:
            session.t += rng.randint(50, 900)
            session.track("referral_accepted", {"referral_code": visitor.referral_code})
        session.advance(low_ms=5 * SECOND_MS, high_ms=2 * MINUTE_MS)
        community = self._home_community(member.country)
        member.communities.append(community)
        session.page_view(f"/communities/{community}", f"Community {community}")
        session.track("join_community", {"community": community})
        return member

    def _member_session(self, t: int, member: _Member) -> None:
        rng = self.rng
        device = member.devices[0]
        new_device = False
        if rng.random() < 0.12:
            if len(member.devices) < 3 and rng.random() < 0.5:
                device = self._new_device(member.country, member.devices[0].locale)
                member.devices.append(device)
                new_device = True
            else:
                device = rng.choice(member.devices)
        channel = cat.CHANNELS[5] if rng.random() < 0.15 else None  # the newsletter brings members back
        session = _Session(self, t, device, member.user_id, channel)
        if rng.random() < 0.5:
            session.page_view("/dashboard", "Your dashboard")
        else:
            session.page_view(*self.pick(self.page_table))
        if new_device or rng.random() < 0.35:
            session.advance(low_ms=3 * SECOND_MS, high_ms=MINUTE_MS)
            session.track("login", {"method": member.signup_method})
        session.t += rng.randint(20, 400)
        session.track(
            "experiment_exposure",
            {"experiment": AA_TEST.key, "variant": assign_variant(AA_TEST.key, member.user_id, AA_TEST.variants)},
        )
        for _ in range(1 + min(15, int(rng.expovariate(1 / 2.2)))):
            session.advance()
            self._member_action(session, member)
        member.available_at = session.next_available

    def _member_action(self, session: _Session, member: _Member) -> None:
        rng = self.rng
        draw = rng.random()
        low_supply = len(self.open_projects) < 10
        if draw < 0.30:
            self._browse(session)
        elif draw < 0.68:
            self._visit_project(session, member)
        elif draw < 0.80:
            self._watch_ads(session)
        elif draw < 0.85:
            self._join_community(session, member)
        elif draw < 0.855 or (low_supply and draw < 0.87):
            self._create_project(session, member)
        elif draw < 0.875:
            self._take_loan(session, member)
        elif draw < 0.905:
            self._refer(session, member)
        else:
            self._browse(session)

    def _browse(self, session: _Session) -> None:
        if self.open_projects and self.rng.random() < 0.3:
            project = self.rng.choice(self.open_projects)
            session.page_view(f"/projects/{project.project_id}", f"Project {project.project_id}")
        else:
            session.page_view(*self.pick(self.page_table))

    def _pick_project(self, member: _Member) -> _Project | None:
        rng = self.rng
        if member.communities and rng.random() < 0.6:
            local = self.projects_by_community[rng.choice(member.communities)]
            if local:
                return rng.choice(local)
        return rng.choice(self.open_projects) if self.open_projects else None

    def _visit_project(self, session: _Session, member: _Member) -> None:
        rng = self.rng
        project = self._pick_project(member)
        if project is None:
            self._browse(session)
            return
        session.page_view(f"/projects/{project.project_id}", f"Project {project.project_id}")
        variant = assign_variant(CHECKOUT_BUTTON.key, member.user_id, CHECKOUT_BUTTON.variants)
        session.t += rng.randint(20, 400)
        session.track("experiment_exposure", {"experiment": CHECKOUT_BUTTON.key, "variant": variant})
        probability = self.config.fund_probability
        if variant == TREATMENT:
            probability *= 1 + self.config.checkout_lift
        drop = magnitude_at(self.config.anomalies, "revenue_drop", session.t)
        if drop is not None:
            probability *= drop
        if rng.random() >= probability:
            return
        session.advance(low_ms=5 * SECOND_MS, high_ms=4 * MINUTE_MS)
        amount = self.pick(self.contribution_table)
        if rng.random() < 0.15:  # some people type their own amount
            amount = float(rng.randint(3, 300))
        drop = magnitude_at(self.config.anomalies, "revenue_drop", session.t)
        if drop is not None:
            amount = max(1.0, round(amount * drop, 2))
        session.track(
            "fund_project",
            {
                "project_id": project.project_id,
                "community": project.community,
                "category": project.category,
                "amount": amount,
                "currency": cat.CURRENCY,
                "fee": cat.processing_fee(amount),
            },
        )
        project.raised = round(project.raised + amount, 2)
        if not project.closed and project.raised >= project.goal:
            self._close(project)
            funded_at = session.t + rng.randint(500, 5 * SECOND_MS)
            self.push_event(
                funded_at,
                "project_funded",
                project.creator,
                None,
                {
                    "project_id": project.project_id,
                    "community": project.community,
                    "category": project.category,
                    "goal_amount": project.goal,
                    "raised_amount": project.raised,
                    "days_to_fund": round((funded_at - project.created_at) / DAY_MS, 2),
                },
                dict(SERVER_CONTEXT),
            )

    def _watch_ads(self, session: _Session) -> None:
        rng = self.rng
        for n in range(rng.randint(1, 3)):
            if n:
                session.advance(low_ms=15 * SECOND_MS, high_ms=90 * SECOND_MS)
            project = rng.choice(self.open_projects) if self.open_projects else None
            session.track(
                "watch_ad",
                {
                    "ad_id": rng.choice(cat.ADS),
                    "project_id": project.project_id if project else None,
                    "revenue": round(rng.uniform(0.01, 0.08), 4),
                },
            )

    def _join_community(self, session: _Session, member: _Member) -> None:
        community = self.rng.choice(cat.COMMUNITIES)[0]
        if community in member.communities:
            self._browse(session)
            return
        member.communities.append(community)
        session.page_view(f"/communities/{community}", f"Community {community}")
        session.track("join_community", {"community": community})

    def _create_project(self, session: _Session, member: _Member) -> None:
        session.page_view("/projects/new", "Start a project")
        session.advance(low_ms=MINUTE_MS, high_ms=9 * MINUTE_MS)
        community = self.rng.choice(member.communities) if member.communities else cat.COMMUNITIES[0][0]
        project = self._new_project(member, community, session.t)
        session.track(
            "project_created",
            {
                "project_id": project.project_id,
                "community": project.community,
                "category": project.category,
                "goal_amount": project.goal,
            },
        )

    def _take_loan(self, session: _Session, member: _Member) -> None:
        rng = self.rng
        session.page_view("/loans", "Community micro-loans")
        if member.loan_busy_until > session.t or not member.communities:
            return
        session.advance(low_ms=30 * SECOND_MS, high_ms=5 * MINUTE_MS)
        loan_id = self.short_id("loan")
        community = rng.choice(member.communities)
        amount = self.pick(self.loan_table)
        loan = {"loan_id": loan_id, "community": community, "amount": amount}
        session.track("create_loan", dict(loan))
        member.loan_busy_until = session.t + 60 * DAY_MS
        if rng.random() >= 0.85:  # declined after review: nothing more happens
            member.loan_busy_until = session.t + DAY_MS
            return
        disbursed = session.t + rng.randint(2 * HOUR_MS, 48 * HOUR_MS)
        self.push_event(disbursed, "loan_disbursed", member.user_id, None, dict(loan), dict(SERVER_CONTEXT))
        if rng.random() < LOAN_REPAY_SHARE:
            repaid = disbursed + rng.randint(LOAN_REPAY_MIN_DAYS * DAY_MS, LOAN_REPAY_MAX_DAYS * DAY_MS)
            self.push_event(repaid, "loan_repaid", member.user_id, None, dict(loan), dict(SERVER_CONTEXT))
            member.loan_busy_until = repaid

    def _refer(self, session: _Session, member: _Member) -> None:
        channel = self.rng.choice(("whatsapp", "email", "copy_link", "sms"))
        session.track("referral_sent", {"referral_code": member.referral_code, "channel": channel})
        if len(self.pending_referrals) < 50_000:
            self.pending_referrals.append(member.referral_code)

    # ----------------------------------------------------------------- platform jobs
    def _close(self, project: _Project) -> None:
        project.closed = True
        self.open_projects.remove(project)
        self.projects_by_community[project.community].remove(project)

    def _expire(self, project: _Project, ts: int) -> None:
        if project.closed:
            return
        self._close(project)
        self.push_event(
            ts,
            "project_expired",
            project.creator,
            None,
            {
                "project_id": project.project_id,
                "community": project.community,
                "category": project.category,
                "goal_amount": project.goal,
                "raised_amount": project.raised,
            },
            dict(SERVER_CONTEXT),
        )


def _table(pairs: list[tuple[Any, float]]) -> tuple[list[Any], list[float]]:
    values = [value for value, _ in pairs]
    cumulative: list[float] = []
    total = 0.0
    for _, weight in pairs:
        total += weight
        cumulative.append(total)
    return values, cumulative


def to_event(item: _Pending, source: str = "demo") -> AnalyticsEvent:
    """The validated ``AnalyticsEvent`` of a pending event."""
    return AnalyticsEvent(
        id=uuid.UUID(int=item.event_id),
        eventType=event_type_for(item.name),
        eventName=item.name,
        userId=item.user_id,
        anonymousId=item.anonymous_id,
        sessionId=item.session_id,
        properties=item.properties,
        context=item.context,
        timestamp=_timestamp(item.ts),
        receivedAt=None,
        source=source,
    )


def to_record(item: _Pending, source: str = "demo") -> dict[str, Any]:
    """The Avro record (``analytics_event.avsc`` shape) of a pending event, without pydantic.

    Equal to ``to_event(item).to_avro()``; several times faster, for bulk loads and benchmarks.
    """
    return {
        "id": uuid_text(item.event_id),
        "eventType": event_type_for(item.name).value,
        "eventName": item.name,
        "userId": item.user_id,
        "anonymousId": item.anonymous_id,
        "sessionId": item.session_id,
        "properties": json.dumps(item.properties, separators=(",", ":"), ensure_ascii=False),
        "context": json.dumps(item.context, separators=(",", ":"), ensure_ascii=False),
        "timestamp": item.ts,
        "receivedAt": None,
        "source": source,
    }


def generate_events(config: TrafficConfig) -> Iterator[AnalyticsEvent]:
    """Every event of the simulated range, validated, in timestamp order.

    A pure function of ``config``: no clock, no I/O. With ``config.end=None`` it never ends.
    """
    for item in TrafficSimulator(config):
        yield to_event(item, config.source)


def generate_records(config: TrafficConfig) -> Iterator[dict[str, Any]]:
    """Like :func:`generate_events` but yields Avro-shaped dicts (for fast bulk loading)."""
    for item in TrafficSimulator(config):
        yield to_record(item, config.source)


def days_of_traffic(days: float, end: datetime | None = None, **kwargs: Any) -> TrafficConfig:
    """A config for the ``days`` before ``end`` (default: the start of the current UTC hour)."""
    stop = end or datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    return TrafficConfig(start=stop - timedelta(days=days), end=stop, **kwargs)


def with_anomalies(config: TrafficConfig, *anomalies: InjectedAnomaly) -> TrafficConfig:
    """The same traffic with extra injected incidents."""
    return replace(config, anomalies=config.anomalies + anomalies)


def expected_events(config: TrafficConfig, days: float) -> int:
    """A rough count of the events ``days`` of this traffic produce (for sizing runs)."""
    return math.ceil(config.sessions_per_day * days * EVENTS_PER_SESSION)
