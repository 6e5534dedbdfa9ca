"""The feature store in Redis: the one module that knows the key layout, for writing and for reading.

Layout (`ns` = settings.features.namespace; `{u:<user>}` is a hash tag, so one user's keys share one
Redis Cluster slot; see docs/redis-layout.md):

    ns:{u:<user>}:recent             ZSET  member "item␟type␟event_id", score event ts_ms; newest `recent_events`
    ns:{u:<user>}:windows            HASH  "<window_s>:<bucket>:<type>" → count; tumbling event-time windows
                                           (bucket = ts_ms // (window_s·1000)); buckets before the previous one pruned
    ns:{u:<user>}:purchased          ZSET  item → ts_ms of the last purchase; newest `purchased_max`
    ns:{u:<user>}:seen               ZSET  event_id → ts_ms; the dedupe window (event time)
    ns:trending:<day>                ZSET  item → Σ weight·2^((ts − day start)/half-life)  (forward decay)
    ns:trending:merged:<uuid>        ZSET  scratch: the two days merged for a top-n read, deleted in the same MULTI
    ns:popular                       ZSET  item → Σ weight; the top `popular_max_items`
    ns:next:<item>                   ZSET  successor item → how often a shopper's next step went from <item> to it;
                                           the top `successors_max`, expires `successors_ttl_s` after its last write
    ns:offsets:<group>               HASH  "<topic>:<partition>" → next offset to read

Writes happen in one Lua script per batch: every event is checked against its user's dedupe set,
applied, and the batch's next offsets are stored, all atomically. On partition assignment the
consumer seeks to the offsets stored here, so features and offsets never disagree. When Redis itself
rolls back its last second (AOF everysec), both roll back together, but a running consumer's fetch
position is still ahead: so the script first compares each stored offset with the one the consumer
last stored (or sought to) and, if Redis is behind, writes nothing and returns the stored offsets;
the consumer seeks back and the lost events are replayed. Check and write are one script, so no
write can slip in between. This is the single-Redis path; on Redis Cluster one script cannot span slots, and the plan
is a per-user script (dedupe mark in the user's slot) plus per-partition offset keys.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

import redis.asyncio as aioredis

from vitrine.contracts.events import Event, EventType
from vitrine.settings import FeaturesSettings

SEP: Final = "\x1f"
DAY_MS: Final = 86_400_000
POPULARITY_WEIGHT: Final = {EventType.VIEW: 1, EventType.CLICK: 2, EventType.ADD_TO_CART: 3, EventType.PURCHASE: 5}
"""How much one event of each type adds to an item's popularity and trending scores."""
_TYPES: Final = tuple(EventType)
_TYPE_BY_NAME: Final = {t.value: t for t in EventType}

# KEYS: none (the single-Redis path builds keys from the namespace; see the module docstring).
# ARGV: ns, group, n_events, n_offsets, recent_max, purchased_max, dedupe_ms, user_ttl_ms,
#       half_life_ms, popular_max, windows (comma-separated seconds), weights (comma-separated, by type),
#       successors_max, successors_ttl_ms,
#       then n_events × (event_id, user_id, item_id, type_index, ts_ms),
#       then n_offsets × (field, expected stored offset or -1 when unknown, next offset).
# Returns {flags, behind}: flags = one 0/1 per event (1 = applied, 0 = duplicate) and behind = {};
# or, when any stored offset is below what the consumer expects (Redis rolled back), nothing is
# written and the reply is {{}, behind} with behind = field, stored offset (-1 = none), ... for
# every such partition.
_APPLY_BATCH: Final = r"""
local ns, group = ARGV[1], ARGV[2]
local n_events, n_offsets = tonumber(ARGV[3]), tonumber(ARGV[4])
local recent_max, purchased_max = tonumber(ARGV[5]), tonumber(ARGV[6])
local dedupe_ms, user_ttl_ms = tonumber(ARGV[7]), tonumber(ARGV[8])
local half_life_ms, popular_max = tonumber(ARGV[9]), tonumber(ARGV[10])
local successors_max, successors_ttl_ms = tonumber(ARGV[13]), tonumber(ARGV[14])
local windows, weights = {}, {}
for w in string.gmatch(ARGV[11], '[^,]+') do windows[#windows + 1] = tonumber(w) end
for w in string.gmatch(ARGV[12], '[^,]+') do weights[#weights + 1] = tonumber(w) end
local types = {'view', 'click', 'add_to_cart', 'purchase'}
local housekeeping_every = 4
-- A stored offset behind the consumer's own last write means Redis lost writes: refuse the batch
-- before touching anything, so that the consumer re-reads from the stored offset.
local offsets_key = ns .. ':offsets:' .. group
local offsets_base = 14 + 5 * n_events
local behind = {}
for i = 0, n_offsets - 1 do
  local field, expected = ARGV[offsets_base + 3 * i + 1], tonumber(ARGV[offsets_base + 3 * i + 2])
  local current = tonumber(redis.call('HGET', offsets_key, field) or '-1')
  if current < expected then
    behind[#behind + 1] = field
    behind[#behind + 1] = current
  end
end
if #behind > 0 then return {{}, behind} end
local applied, touched, newest, bought, popular, trending, follows = {}, {}, {}, {}, {}, {}, {}
local base = 14
for i = 0, n_events - 1 do
  local event_id, user, item = ARGV[base + 1], ARGV[base + 2], ARGV[base + 3]
  local kind, ts = tonumber(ARGV[base + 4]), tonumber(ARGV[base + 5])
  base = base + 5
  local u = ns .. ':{u:' .. user .. '}'
  if redis.call('ZADD', u .. ':seen', 'NX', ts, event_id) == 0 then
    applied[#applied + 1] = 0
  else
    applied[#applied + 1] = 1
    local member = item .. '\31' .. types[kind + 1] .. '\31' .. event_id
    redis.call('ZADD', u .. ':recent', ts, member)
    -- A new step: this event is now the user's newest (in the order readers see) and the event before
    -- it was on another item (runs on one item are one step, as in collapse_runs). A late event that
    -- lands in the middle of the history adds no transition: it would split one already counted.
    if redis.call('ZREVRANK', u .. ':recent', member) == 0 then
      local before = redis.call('ZRANGE', u .. ':recent', -2, -2)[1]
      if before then
        local previous = string.match(before, '^([^\31]*)')
        if previous ~= item then
          follows[previous] = follows[previous] or {}
          follows[previous][item] = (follows[previous][item] or 0) + 1
        end
      end
    end
    for _, w in ipairs(windows) do
      redis.call('HINCRBY', u .. ':windows', w .. ':' .. math.floor(ts / (w * 1000)) .. ':' .. types[kind + 1], 1)
    end
    if kind == 3 then
      redis.call('ZADD', u .. ':purchased', 'GT', ts, item)
      bought[u] = true
    end
    -- Item scores are summed per batch first: popular items recur within a batch (power law).
    local day = math.floor(ts / 86400000)
    local tkey = ns .. ':trending:' .. day
    trending[tkey] = trending[tkey] or {}
    trending[tkey][item] = (trending[tkey][item] or 0) + weights[kind + 1] * math.pow(2, (ts - day * 86400000) / half_life_ms)
    touched[tkey] = (day + 3) * 86400000
    popular[item] = (popular[item] or 0) + weights[kind + 1]
    if (newest[u] or 0) < ts then newest[u] = ts end
  end
end
for tkey, items in pairs(trending) do
  for item, boost in pairs(items) do redis.call('ZINCRBY', tkey, boost, item) end
end
for item, weight in pairs(popular) do redis.call('ZINCRBY', ns .. ':popular', weight, item) end
-- Successor counts, summed per batch like popularity; each table keeps its top `successors_max` and
-- expires when nobody has stepped away from its item for `successors_ttl_ms` (refreshed, like user
-- TTLs, only when a tenth has run out: every PEXPIRE is an AOF write).
for previous, nexts in pairs(follows) do
  local key = ns .. ':next:' .. previous
  for item, count in pairs(nexts) do redis.call('ZINCRBY', key, count, item) end
  redis.call('ZREMRANGEBYRANK', key, 0, -successors_max - 1)
  if redis.call('PTTL', key) < successors_ttl_ms * 0.9 then redis.call('PEXPIRE', key, successors_ttl_ms) end
end
for u, ts in pairs(newest) do
  -- House-keeping is amortised: each runs on about one batch in `housekeeping_every` per user.
  -- Readers take the newest `recent_max` events, so a list trimmed later reads the same; the
  -- dedupe set forgetting later only remembers longer.
  if math.random(housekeeping_every) == 1 then
    redis.call('ZREMRANGEBYRANK', u .. ':recent', 0, -recent_max - 1)
    redis.call('ZREMRANGEBYSCORE', u .. ':seen', '-inf', '(' .. (ts - dedupe_ms))
    -- Window counts live in one hash per user; buckets before the previous one are pruned.
    for _, field in ipairs(redis.call('HKEYS', u .. ':windows')) do
      local w, bucket = string.match(field, '^(%d+):(%d+):')
      if tonumber(bucket) < math.floor(ts / (tonumber(w) * 1000)) - 1 then redis.call('HDEL', u .. ':windows', field) end
    end
  end
  -- Every write is appended to the AOF: TTLs are refreshed only when a tenth has run out (a read).
  if redis.call('PTTL', u .. ':recent') < user_ttl_ms * 0.9 then
    for _, suffix in ipairs({':recent', ':seen', ':windows'}) do redis.call('PEXPIRE', u .. suffix, user_ttl_ms) end
  end
end
for u, _ in pairs(bought) do
  redis.call('ZREMRANGEBYRANK', u .. ':purchased', 0, -purchased_max - 1)
  redis.call('PEXPIRE', u .. ':purchased', user_ttl_ms)
end
-- Trending keys expire by event time (three days after their day starts), but never sooner than a
-- minute from now, so that a replay of old events is still readable. The deadline of a key never
-- changes, so it is set once, when the key is new.
local now_ms = tonumber(redis.call('TIME')[1]) * 1000
for key, expire_at in pairs(touched) do
  if redis.call('PTTL', key) == -1 then
    redis.call('PEXPIREAT', key, math.max(expire_at, now_ms + 60000))
  end
end
if n_events > 0 then redis.call('ZREMRANGEBYRANK', ns .. ':popular', 0, -popular_max - 1) end
for i = 0, n_offsets - 1 do
  local field, offset = ARGV[offsets_base + 3 * i + 1], tonumber(ARGV[offsets_base + 3 * i + 3])
  local current = tonumber(redis.call('HGET', offsets_key, field) or '-1')
  if offset > current then redis.call('HSET', offsets_key, field, offset) end
end
return {applied, {}}
"""


# One user's features in one command (all three keys share the user's hash slot).
# KEYS: recent, windows, purchased. ARGV: recent_events, then the window fields to read.
_READ_USER: Final = r"""
local recent = redis.call('ZRANGE', KEYS[1], -tonumber(ARGV[1]), -1, 'WITHSCORES')
local counts = redis.call('HMGET', KEYS[2], unpack(ARGV, 2))
local purchased = redis.call('ZRANGE', KEYS[3], 0, -1)
return {recent, counts, purchased}
"""


@dataclass(frozen=True)
class RecentEvent:
    item_id: str
    type: EventType
    ts_ms: int
    event_id: str


@dataclass(frozen=True)
class UserFeatures:
    """What the gateway knows about one user, read in one round trip."""

    user_id: str
    recent: tuple[RecentEvent, ...]
    """Oldest first, at most `recent_events`."""
    window_counts: dict[int, dict[EventType, int]]
    """Window length in seconds → counts by type in the window that contains `now`."""
    purchased: frozenset[str]

    @property
    def has_history(self) -> bool:
        return bool(self.recent)


@dataclass(frozen=True)
class WriteResult:
    applied: list[bool]
    """One flag per event: False = a duplicate. Empty when the batch was refused."""
    duplicates: int = field(default=0)
    behind: dict[tuple[str, int], int] = field(default_factory=dict)
    """(topic, partition) → stored offset (-1 = none) where Redis is behind the consumer: nothing was written."""

    @property
    def refused(self) -> bool:
        return bool(self.behind)


def user_prefix(namespace: str, user_id: str) -> str:
    return f"{namespace}:{{u:{user_id}}}"


class FeatureStore:
    """Writer and reader of the layout above, over one `redis.asyncio` client."""

    def __init__(self, client: aioredis.Redis, settings: FeaturesSettings) -> None:
        self.client = client
        self.settings = settings
        self.ns = settings.namespace
        self._apply = client.register_script(_APPLY_BATCH)
        self._read_user = client.register_script(_READ_USER)
        self._static_args = [
            settings.recent_events, settings.purchased_max, settings.dedupe_window_s * 1000, settings.user_ttl_s * 1000,
            settings.trending_half_life_s * 1000, settings.popular_max_items,
            ",".join(str(w) for w in settings.windows_s), ",".join(str(POPULARITY_WEIGHT[t]) for t in _TYPES),
            settings.successors_max, settings.successors_ttl_s * 1000,
        ]

    # --- keys -------------------------------------------------------------------------------
    def offsets_key(self, group: str) -> str:
        return f"{self.ns}:offsets:{group}"

    def popular_key(self) -> str:
        return f"{self.ns}:popular"

    def trending_key(self, day: int) -> str:
        return f"{self.ns}:trending:{day}"

    def successors_key(self, item_id: str) -> str:
        """Item keys carry no hash tag, like `popular` and `trending`: they are shared by every user."""
        return f"{self.ns}:next:{item_id}"

    @staticmethod
    def offset_field(topic: str, partition: int) -> str:
        return f"{topic}:{partition}"

    # --- writing ------------------------------------------------------------------------------
    async def apply(
        self, events: Sequence[Event], group: str, next_offsets: dict[tuple[str, int], int],
        expected_offsets: dict[tuple[str, int], int] | None = None,
    ) -> WriteResult:
        """Apply a batch and store the partitions' next offsets, atomically. Duplicates change nothing.

        `expected_offsets` are the offsets the caller believes are stored (what it last wrote or sought
        to; missing or -1 = unknown). If Redis holds less for any partition, it lost writes (a rollback):
        nothing is written and `WriteResult.behind` says where Redis stands, so the caller can re-read.
        """
        expected = expected_offsets or {}
        args: list[object] = [self.ns, group, len(events), len(next_offsets), *self._static_args]
        for event in events:
            args += [event.event_id, event.user_id, event.item_id, event.type.strength, event.ts_ms]
        for (topic, partition), offset in next_offsets.items():
            args += [self.offset_field(topic, partition), expected.get((topic, partition), -1), offset]
        flags, behind = await self._apply(keys=[], args=args)
        if behind:
            return WriteResult(applied=[], behind=self._parse_behind(behind))
        applied = [bool(f) for f in flags]
        return WriteResult(applied=applied, duplicates=applied.count(False))

    @staticmethod
    def _parse_behind(flat: list) -> dict[tuple[str, int], int]:  # noqa: ANN001 - the script's reply
        behind = {}
        for raw_field, stored in zip(flat[::2], flat[1::2], strict=True):
            topic, partition = _text(raw_field).rsplit(":", 1)
            behind[(topic, int(partition))] = int(stored)
        return behind

    async def stored_offsets(self, group: str, topic: str) -> dict[int, int]:
        raw = await self.client.hgetall(self.offsets_key(group))
        prefix = f"{topic}:"
        return {int(k.removeprefix(prefix)): int(v) for k, v in _decoded(raw).items() if k.startswith(prefix)}

    # --- reading ------------------------------------------------------------------------------
    def _window_fields(self, now_ms: int) -> list[str]:
        return [f"{w}:{now_ms // (w * 1000)}:{t.value}" for w in self.settings.windows_s for t in _TYPES]

    def _user_call(self, user_id: str, now_ms: int) -> tuple[list[str], list[object]]:
        u = user_prefix(self.ns, user_id)
        return [f"{u}:recent", f"{u}:windows", f"{u}:purchased"], [self.settings.recent_events, *self._window_fields(now_ms)]

    def _parse_user(self, user_id: str, reply: list) -> UserFeatures:  # noqa: ANN001
        flat = reply[0]
        recent = []
        for member, score in zip(flat[::2], flat[1::2], strict=True):
            item, kind, event_id = _text(member).split(SEP, 2)
            recent.append(RecentEvent(item, _TYPE_BY_NAME[kind], int(float(score)), event_id))
        values = iter(reply[1])
        counts = {window: {t: int(v) for t in _TYPES if (v := next(values)) is not None} for window in self.settings.windows_s}
        return UserFeatures(user_id, tuple(recent), counts, frozenset(_text(i) for i in reply[2]))

    async def user_features(self, user_id: str, now_ms: int) -> UserFeatures:
        """One user's features: one script call, one round trip (the gateway's hot path)."""
        keys, args = self._user_call(user_id, now_ms)
        return self._parse_user(user_id, await self._read_user(keys=keys, args=args))

    async def many_user_features(self, user_ids: Iterable[str], now_ms: int) -> list[UserFeatures]:
        """Features of several users in one pipelined round trip."""
        users = list(user_ids)
        async with self.client.pipeline(transaction=False) as pipe:
            for user in users:
                keys, args = self._user_call(user, now_ms)
                await self._read_user(keys=keys, args=args, client=pipe)
            replies = await pipe.execute()
        return [self._parse_user(user, reply) for user, reply in zip(users, replies, strict=True)]

    async def popular(self, n: int) -> list[tuple[str, float]]:
        """The global top-n by popularity weight: the cold-start and fallback answer."""
        return [(_text(item), float(score)) for item, score in await self.client.zrevrange(self.popular_key(), 0, n - 1, withscores=True)]

    async def successors(self, item_id: str, n: int) -> list[tuple[str, float]]:
        """The n items that most often came next after `item_id` (count as score), most frequent first."""
        raw = await self.client.zrevrange(self.successors_key(item_id), 0, n - 1, withscores=True)
        return [(_text(item), float(score)) for item, score in raw]

    async def successors_and_popular(self, item_id: str, n: int, n_popular: int) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
        """`successors(item_id, n)` and `popular(n_popular)` in one pipelined round trip (the degraded answer's read)."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.zrevrange(self.successors_key(item_id), 0, n - 1, withscores=True)
            pipe.zrevrange(self.popular_key(), 0, n_popular - 1, withscores=True)
            nexts, popular = await pipe.execute()
        return ([(_text(i), float(s)) for i, s in nexts], [(_text(i), float(s)) for i, s in popular])

    async def trending(self, n: int, now_ms: int) -> list[tuple[str, float]]:
        """Top-n items by decayed score at `now_ms` (today's and yesterday's forward-decay keys)."""
        today = now_ms // DAY_MS
        half_life_ms = self.settings.trending_half_life_s * 1000
        weights = {self.trending_key(day): math.pow(2, -(now_ms - day * DAY_MS) / half_life_ms) for day in (today, today - 1)}
        # Merged and cut inside Redis: only n items cross the wire, not the whole catalogue every refresh.
        scratch = f"{self.ns}:trending:merged:{uuid.uuid4().hex}"
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.zunionstore(scratch, weights)
            pipe.zrevrange(scratch, 0, n - 1, withscores=True)
            pipe.delete(scratch)
            _, top, _ = await pipe.execute()
        return sorted(((_text(item), float(score)) for item, score in top), key=lambda pair: (-pair[1], pair[0]))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _decoded(raw: dict) -> dict[str, str]:  # noqa: ANN001
    return {_text(k): _text(v) for k, v in raw.items()}
