"""The outcome store in Redis: the one module that knows its layout, for the writer (the outcome
consumer) and the readers (`vitrine ab report`). See docs/redis-layout.md, "Outcomes".

`ns` = settings.outcomes.namespace; every key starts with `ns:o:`. `{u:<user>}` is a hash tag: one
user's join state shares one Redis Cluster slot. ␟ is the unit separator (\\x1f).

    ns:o:{u:<user>}:x          HASH  request_id → JSON exposure kept for crediting (ts, experiment, revision,
                                     variant, items, slot teams, clicks per team); longest window + lateness
    ns:o:{u:<user>}:p          HASH  event_id → JSON creditable event (item, type, ts, credited request_id or "");
                                     kept `max_lateness` behind the user's newest record
    ns:o:{u:<user>}:m          HASH  "wm" → the user's newest event time; "r␟<exp>␟<rev>" → "<variant>␟<first ts>"
    ns:o:{u:<user>}:ev         ZSET  event_id → ts: events seen (dedupe, and the pre_events count); dedupe window
    ns:o:{u:<user>}:xs         ZSET  request_id → ts: exposures seen (dedupe); dedupe window
    ns:o:rows:<exp>:<rev>      HASH  "<user>␟variant" → variant; "<user>␟<field>" → count for exposures,
                                     impressions, clicks, add_to_carts, purchases, pre_events (one UserOutcome per user)
    ns:o:il:<exp>:<rev>        HASH  "<user>␟exposures", "<user>␟clicks:<team>", "<user>␟wins:<team>", "<user>␟ties"
    ns:o:teams:<exp>:<rev>     SET   the interleaving teams seen in the revision
    ns:o:revisions:<exp>       SET   revisions with rows
    ns:o:offsets:<group>       HASH  "<topic>:<partition>" → next offset to read, both topics

The join itself is `attribution.attribute` (pure Python) on state read here; its changes and the batch's
next offsets are written by one Lua script. Reading outside the script is safe because one consumer owns
a user's state at a time: both topics are keyed by user and co-partitioned, the group assigns partition
p of both topics to the same member, and the script first checks that the stored offset of *every*
partition the writer owns equals what it last stored or sought to. Anything else (Redis rolled back, or
another member wrote those partitions since) refuses the whole batch; the consumer seeks to the stored
offsets and reads again. On Redis Cluster the per-revision keys live in other slots than the user's:
the plan there is the features store's (per-user script, then per-revision sums, offsets last).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Final, TypeVar

import redis.asyncio as aioredis

from vitrine.contracts.outcomes import METRICS, InterleavedOutcome, UserOutcome
from vitrine.services.outcomes.attribution import PendingEvent, Row, RowKey, StoredExposure, UserChanges, UserState
from vitrine.settings import OutcomesSettings

log = logging.getLogger(__name__)
T = TypeVar("T")
SEP: Final = "\x1f"
ROW_FIELDS: Final = ("exposures", *METRICS, "pre_events")

# ARGV[1]: JSON {offsets_key, check: [[field, expected]], zadd: [[key, score, member]], hset: [[key, field, value]],
#   hdel: [[key, field]], hincr: [[key, field, n]], sadd: [[key, member]], count: [[zset, before_ts, hash, field]],
#   ztrim: [[key, below_ts]], expire: [[key, ms]], offsets: [[field, next]]}; every scalar a string.
# Returns {} when written, or {field, stored offset (-1 = none), ...} for every checked partition whose
# stored offset differs from the expected one: then nothing is written.
_APPLY: Final = r"""
local ops = cjson.decode(ARGV[1])
local offsets_key = ops.offsets_key
local differ = {}
for _, c in ipairs(ops.check) do
  local current = tonumber(redis.call('HGET', offsets_key, c[1]) or '-1')
  if current ~= tonumber(c[2]) then
    differ[#differ + 1] = c[1]
    differ[#differ + 1] = current
  end
end
if #differ > 0 then return differ end
for _, z in ipairs(ops.zadd) do redis.call('ZADD', z[1], z[2], z[3]) end
for _, h in ipairs(ops.hset) do redis.call('HSET', h[1], h[2], h[3]) end
for _, h in ipairs(ops.hdel) do redis.call('HDEL', h[1], h[2]) end
for _, h in ipairs(ops.hincr) do redis.call('HINCRBY', h[1], h[2], h[3]) end
for _, s in ipairs(ops.sadd) do redis.call('SADD', s[1], s[2]) end
for _, c in ipairs(ops.count) do
  redis.call('HSET', c[3], c[4], redis.call('ZCOUNT', c[1], '-inf', '(' .. c[2]))
end
for _, z in ipairs(ops.ztrim) do redis.call('ZREMRANGEBYSCORE', z[1], '-inf', '(' .. z[2]) end
for _, e in ipairs(ops.expire) do redis.call('PEXPIRE', e[1], e[2]) end
for _, o in ipairs(ops.offsets) do redis.call('HSET', offsets_key, o[1], o[2]) end
return {}
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def row_field(experiment: str, revision: int) -> str:
    """The user's meta-hash field of a row membership: "r␟<experiment>␟<revision>"."""
    return SEP.join(("r", experiment, str(revision)))


def decode_row(name: str, value: str) -> tuple[RowKey, Row]:
    """A row membership from its meta-hash field and value ("<variant>␟<first ts>"). The numeric parts are split
    off from the right, so a name that contains ␟ (stored before names were validated) still decodes."""
    experiment, revision = name.removeprefix("r" + SEP).rsplit(SEP, 1)
    variant, first_ts = value.rsplit(SEP, 1)
    return (experiment, int(revision)), Row(variant, int(first_ts))


class OutcomeStore:
    """Writer and reader of the layout above, over one `redis.asyncio` client."""

    def __init__(self, client: aioredis.Redis, settings: OutcomesSettings, on_corrupt: Callable[[str], None] = lambda part: None) -> None:
        self.client = client
        self.on_corrupt = on_corrupt
        """Called with "exposure", "pending" or "meta" for each stored field `load` skips because it does not decode."""
        self.settings = settings
        self.ns = f"{settings.namespace}:o"
        self._apply = client.register_script(_APPLY)

    # --- keys -------------------------------------------------------------------------------
    def user_key(self, user_id: str, part: str) -> str:
        return f"{self.ns}:{{u:{user_id}}}:{part}"

    def rows_key(self, experiment: str, revision: int) -> str:
        return f"{self.ns}:rows:{experiment}:{revision}"

    def interleaved_key(self, experiment: str, revision: int) -> str:
        return f"{self.ns}:il:{experiment}:{revision}"

    def teams_key(self, experiment: str, revision: int) -> str:
        return f"{self.ns}:teams:{experiment}:{revision}"

    def revisions_key(self, experiment: str) -> str:
        return f"{self.ns}:revisions:{experiment}"

    def offsets_key(self, group: str) -> str:
        return f"{self.ns}:offsets:{group}"

    def history_key(self, experiment: str, revision: int) -> str:
        return f"{self.ns}:history:{experiment}:{revision}"

    def evidence_key(self, experiment: str, phase_start: int) -> str:
        return f"{self.ns}:evidence:{experiment}:{phase_start}"

    @staticmethod
    def offset_field(topic: str, partition: int) -> str:
        return f"{topic}:{partition}"

    # --- the writer -------------------------------------------------------------------------
    async def load(self, wanted: Mapping[str, tuple[Sequence[str], Sequence[str]]]) -> dict[str, UserState]:
        """Each user's join state, and which of the given (event ids, request ids) were seen before: one round trip."""
        users = list(wanted)
        async with self.client.pipeline(transaction=False) as pipe:
            for user in users:
                event_ids, request_ids = wanted[user]
                pipe.hgetall(self.user_key(user, "x"))
                pipe.hgetall(self.user_key(user, "p"))
                pipe.hgetall(self.user_key(user, "m"))
                pipe.zmscore(self.user_key(user, "ev"), list(event_ids) or ["\x00"])
                pipe.zmscore(self.user_key(user, "xs"), list(request_ids) or ["\x00"])
            replies = await pipe.execute()
        states = {}
        for i, user in enumerate(users):
            exposures, pending, meta, event_scores, request_scores = replies[5 * i: 5 * i + 5]
            event_ids, request_ids = wanted[user]
            state = UserState(user)
            for raw_field, raw_value in exposures.items():
                if (x := self._decoded(user, "exposure", raw_field, raw_value, StoredExposure.from_json)) is not None:
                    state.exposures[x.request_id] = x
            for raw_field, raw_value in pending.items():
                if (p := self._decoded(user, "pending", raw_field, raw_value, PendingEvent.from_json)) is not None:
                    state.pending[p.event_id] = p
            for raw_field, raw_value in meta.items():
                name = _text(raw_field)
                if name == "wm":
                    state.watermark_ms = self._decoded(user, "meta", raw_field, raw_value, lambda _, v: int(v)) or 0
                elif name.startswith("r" + SEP):
                    if (decoded := self._decoded(user, "meta", raw_field, raw_value, decode_row)) is not None:
                        state.rows[decoded[0]] = decoded[1]
            state.seen_events = {e for e, score in zip(event_ids, event_scores, strict=False) if score is not None}
            state.seen_requests = {r for r, score in zip(request_ids, request_scores, strict=False) if score is not None}
            states[user] = state
        return states

    def _decoded(self, user: str, part: str, raw_field: bytes | str, raw_value: bytes | str, decode: Callable[[str, str], T]) -> T | None:
        """One stored field decoded, or None (skipped, counted by `on_corrupt`, logged) when it does not decode:
        one user's damaged field must not stop the join for everyone (the service would exit and be restarted forever)."""
        try:
            return decode(_text(raw_field), _text(raw_value))
        except (ValueError, TypeError, KeyError, IndexError, UnicodeDecodeError) as exc:
            self.on_corrupt(part)
            log.error("skipping an undecodable %s field of user %r in %s: %r → %r (%s)", part, user, self.ns,
                      raw_field[:200], raw_value[:200], exc)
            return None

    def _ops(self, changes: Iterable[UserChanges]) -> dict[str, list[list[str]]]:
        cfg = self.settings
        ops: dict[str, list[list[str]]] = defaultdict(list)
        revision_keys: set[str] = set()
        for c in changes:
            x, p, m, ev, xs = (self.user_key(c.user_id, part) for part in ("x", "p", "m", "ev", "xs"))
            ops["zadd"] += [[ev, str(ts), event_id] for event_id, ts in c.new_events.items()]
            ops["zadd"] += [[xs, str(ts), request_id] for request_id, ts in c.new_requests.items()]
            ops["hset"] += [[x, request_id, exposure.to_json()] for request_id, exposure in c.put_exposures.items()]
            ops["hset"] += [[p, event_id, pending.to_json()] for event_id, pending in c.put_pending.items()]
            ops["hdel"] += [[x, request_id] for request_id in c.del_exposures]
            ops["hdel"] += [[p, event_id] for event_id in c.del_pending]
            ops["hset"].append([m, "wm", str(c.watermark_ms)])
            for (experiment, revision), row in c.put_rows.items():
                rows = self.rows_key(experiment, revision)
                ops["hset"].append([m, row_field(experiment, revision), f"{row.variant}{SEP}{row.first_ts_ms}"])
                ops["hset"].append([rows, f"{c.user_id}{SEP}variant", row.variant])
                ops["sadd"].append([self.revisions_key(experiment), str(revision)])
                revision_keys.add(rows)
            for (experiment, revision), deltas in c.row_deltas.items():
                rows = self.rows_key(experiment, revision)
                ops["hincr"] += [[rows, f"{c.user_id}{SEP}{name}", str(n)] for name, n in deltas.items() if n]
                revision_keys.add(rows)
            for (experiment, revision), deltas in c.interleaved_deltas.items():
                il = self.interleaved_key(experiment, revision)
                ops["hincr"] += [[il, f"{c.user_id}{SEP}{name}", str(n)] for name, n in deltas.items() if n]
                revision_keys.add(il)
            for (experiment, revision), teams in c.teams.items():
                key = self.teams_key(experiment, revision)
                ops["sadd"] += [[key, team] for team in sorted(teams)]
                revision_keys.add(key)
            for (experiment, revision), before_ts in c.recount_pre_events.items():
                ops["count"].append([ev, str(before_ts), self.rows_key(experiment, revision), f"{c.user_id}{SEP}pre_events"])
            forget_before = c.watermark_ms - cfg.dedupe_window_s * 1000
            ops["ztrim"] += [[ev, str(forget_before)], [xs, str(forget_before)]]
            ops["expire"] += [[key, str(cfg.user_ttl_s * 1000)] for key in (x, p, m, ev, xs)]
        ops["expire"] += [[key, str(cfg.revision_ttl_s * 1000)] for key in sorted(revision_keys)]
        return ops

    async def write(
        self, changes: Sequence[UserChanges], group: str, next_offsets: Mapping[tuple[str, int], int],
        expected_offsets: Mapping[tuple[str, int], int],
    ) -> dict[tuple[str, int], int]:
        """Store the batch's changes and next offsets atomically, if every partition in `expected_offsets`
        (all the writer owns; -1 = none stored) still holds the expected offset. Returns {} when written,
        else (topic, partition) → the stored offset (-1 = none) of each partition that differs: nothing written."""
        ops = self._ops(changes)
        ops["check"] = [[self.offset_field(t, p), str(o)] for (t, p), o in expected_offsets.items()]
        ops["offsets"] = [[self.offset_field(t, p), str(o)] for (t, p), o in next_offsets.items()]
        payload = {"offsets_key": self.offsets_key(group), **{name: ops.get(name, []) for name in (
            "check", "zadd", "hset", "hdel", "hincr", "sadd", "count", "ztrim", "expire", "offsets")}}
        # cjson decodes [] and {} alike; an empty list must stay a list for ipairs, which both are.
        differ = await self._apply(keys=[], args=[json.dumps(payload, separators=(",", ":"))])
        result = {}
        for raw_field, stored in zip(differ[::2], differ[1::2], strict=True):
            topic, partition = _text(raw_field).rsplit(":", 1)
            result[(topic, int(partition))] = int(stored)
        return result

    async def stored_offsets(self, group: str) -> dict[tuple[str, int], int]:
        raw = await self.client.hgetall(self.offsets_key(group))
        stored = {}
        for key, value in raw.items():
            topic, partition = _text(key).rsplit(":", 1)
            stored[(topic, int(partition))] = int(value)
        return stored

    # --- the readers ------------------------------------------------------------------------
    async def _fields_by_user(self, key: str) -> dict[str, dict[str, str]]:
        by_user: dict[str, dict[str, str]] = defaultdict(dict)
        async for raw_field, raw_value in self.client.hscan_iter(key, count=1000):
            user, name = _text(raw_field).rsplit(SEP, 1)
            by_user[user][name] = _text(raw_value)
        return by_user

    async def user_outcomes(self, experiment: str, revision: int) -> list[UserOutcome]:
        """One row per user exposed in (experiment, revision), sorted by user id."""
        rows = await self._fields_by_user(self.rows_key(experiment, revision))
        return [
            UserOutcome(user_id=user, variant=fields.get("variant", ""), **{name: int(fields.get(name, 0)) for name in ROW_FIELDS})
            for user, fields in sorted(rows.items()) if "variant" in fields
        ]

    async def teams(self, experiment: str, revision: int) -> list[str]:
        return sorted(_text(t) for t in await self.client.smembers(self.teams_key(experiment, revision)))

    async def interleaved_outcomes(self, experiment: str, revision: int) -> list[InterleavedOutcome]:
        """One row per user shown interleaved lists in (experiment, revision), sorted by user id. Team A and B are
        the revision's two teams in name order (a revision with more than two teams reports the first two)."""
        teams = await self.teams(experiment, revision)
        if not teams:
            return []
        team_a, team_b = (teams + teams)[:2] if len(teams) == 1 else teams[:2]
        rows = await self._fields_by_user(self.interleaved_key(experiment, revision))

        def n(fields: dict[str, str], name: str) -> int:
            return int(fields.get(name, 0))

        return [
            InterleavedOutcome(user_id=user, team_a=team_a, team_b=team_b,
                               clicks_a=n(f, f"clicks:{team_a}"), clicks_b=n(f, f"clicks:{team_b}"),
                               wins_a=n(f, f"wins:{team_a}"), wins_b=n(f, f"wins:{team_b}"), ties=n(f, "ties"))
            for user, f in sorted(rows.items())
        ]

    async def append_snapshot(self, experiment: str, revision: int, snapshot: dict, keep: int) -> None:
        """The monitor's look at a revision (time, users, lifts, p-values), newest last, at most `keep` kept."""
        key = self.history_key(experiment, revision)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.rpush(key, json.dumps(snapshot))
            pipe.ltrim(key, -keep, -1)
            pipe.expire(key, self.settings.revision_ttl_s)
            await pipe.execute()

    async def snapshots(self, experiment: str, revision: int) -> list[dict]:
        """Every look the monitor took at the revision, oldest first (the report's intervals over time)."""
        return [json.loads(raw) for raw in await self.client.lrange(self.history_key(experiment, revision), 0, -1)]

    async def last_snapshot(self, experiment: str, revision: int) -> dict | None:
        """The monitor's newest look at the revision (it carries the running minima of the p-values)."""
        raw = await self.client.lindex(self.history_key(experiment, revision), -1)
        return json.loads(raw) if raw else None

    async def revisions(self, experiment: str) -> list[int]:
        """The revisions of `experiment` that have outcome rows, ascending."""
        return sorted(int(_text(r)) for r in await self.client.smembers(self.revisions_key(experiment)))

    async def load_evidence(self, experiment: str, phase_start: int) -> dict | None:
        """The decision's evidence over the looks of the phase that began at `phase_start` (`experiments.decision`)."""
        raw = await self.client.get(self.evidence_key(experiment, phase_start))
        return json.loads(raw) if raw else None

    async def save_evidence(self, experiment: str, phase_start: int, evidence: dict) -> None:
        """Kept as long as the rows it was computed from (`revision_ttl_s`)."""
        await self.client.set(self.evidence_key(experiment, phase_start), json.dumps(evidence), ex=self.settings.revision_ttl_s)
