"""The archive on disk: the one module that knows its Parquet layout, for the writer (the archive consumer)
and for every reader (`vitrine data`, the training loader).

Layout (Hive-style partitions, the form Spark, Trino and DuckDB read from a folder or an object store):

    <root>/topic=<topic>/date=<YYYY-MM-DD>/hour=<HH>/part-p<partition>-<first offset>-<last offset>.parquet
    <root>/_state/topic=<topic>/partition=<partition>.json      next offset to read + the last committed flush

`date` and `hour` are the record's event time (`ts_ms`) in UTC. A data file holds the rows of one Kafka
partition whose offsets lie in [first, last] (both inclusive, 20 digits so that names sort) and whose event
time falls in that hour; one flush of a partition's buffer writes one such file per hour it touches, all
named with the same range. Names beginning with `.` (temporary files) or `_` (state) are hidden from
readers, as Hive, Spark and Trino hide them.

Commit protocol of one flush (records [a, b] of partition p; `flush`, in three steps):
1. `stage`: every hour's rows to `.part-p…-a-b.parquet.tmp` in its hour folder, fsync'd (file and folder);
2. `commit`: the partition's state file is replaced atomically (temp, fsync, rename, fsync folder) with
   next_offset = b + 1 and the list of the flush's files: **this rename is the commit point**;
3. `publish`: each temp file renamed to its final name, folders fsync'd.
On assignment (`recover`), a partition's last flush is rolled forward (temp files of a committed flush
are renamed), every other temp file of the partition is deleted (a flush that never reached its commit
point), leftovers of an interrupted compaction are removed, and the consumer seeks to next_offset. A
flush starts at or after the stored next_offset and every committed file ends before it, so a file whose
range overlaps a committed one is never produced; `commit` also refuses when the stored offset is not
the one this writer last stored (another writer, or state restored from elsewhere).

Compaction (`compact`): the files of one partition in a closed hour are merged into one file named with
the union's range [min first, max last], written as a temp file, fsync'd and renamed in; then the small
files are deleted. Between the rename and the deletes both exist, so readers apply the *shadow rule*: a
file whose range lies inside another file's range (same folder, same partition) is ignored. A crash in
between leaves only shadowed files behind, which `recover` deletes.
"""

from __future__ import annotations

import enum
import json
import os
import re
import time
import types
import typing
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from vitrine.contracts.events import Event
from vitrine.contracts.exposures import Exposure
from vitrine.services.dead_letters import fsync_dir

T = TypeVar("T")
HOUR_MS: Final = 3_600_000
OFFSET_DIGITS: Final = 20
"""Offsets are int64: 19 digits and a spare; zero-padded so that file names sort by offset."""
PARTITION_DIGITS: Final = 5
STATE_DIR: Final = "_state"
TEMP_SUFFIX: Final = ".tmp"
PART_RE: Final = re.compile(rf"^part-p(?P<partition>\d{{{PARTITION_DIGITS}}})-(?P<first>\d{{{OFFSET_DIGITS}}})-(?P<last>\d{{{OFFSET_DIGITS}}})\.parquet$")
HIVE_TYPES: Final = {"topic": "VARCHAR", "date": "DATE", "hour": "INTEGER"}
"""The partition columns as DuckDB should type them (not guessed from the folder names)."""

TABLES: Final[Mapping[str, type[BaseModel]]] = {"events": Event, "exposures": Exposure}
"""Table name → the contract its rows follow (a record that does not parse goes to the DLQ, not here)."""
KAFKA_FIELDS: Final = (
    pa.field("ts", pa.timestamp("ms", tz="UTC"), nullable=False),
    pa.field("kafka_partition", pa.int32(), nullable=False),
    pa.field("kafka_offset", pa.int64(), nullable=False),
    pa.field("kafka_timestamp_ms", pa.int64(), nullable=False),
)
"""Added to every row beside the contract's fields: `ts_ms` as a timestamp, and where the record was read
(partition and offset are the row's identity: the archive holds each record of the topic exactly once)."""


class ArchiveCorrupt(RuntimeError):
    """The files contradict the commit protocol (e.g. a committed flush's file is gone): a person must look."""


class OffsetsDisagree(RuntimeError):
    """The stored offset is not the one this writer last stored: another writer, or the state was replaced."""

    def __init__(self, topic: str, partition: int, stored: int, expected: int) -> None:
        super().__init__(f"{topic}:{partition} stores next offset {stored}, this writer expected {expected}")
        self.topic, self.partition, self.stored, self.expected = topic, partition, stored, expected


# --- schema: derived from the contracts, so a new contract field becomes a column without a second copy ----------

def _arrow_type(annotation: Any) -> tuple[pa.DataType, bool]:
    """(arrow type, nullable) of a pydantic field annotation."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _arrow_type(args[0])
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"no Parquet column type for the union {annotation}")
        return _arrow_type(inner[0])[0], True
    if origin is typing.Literal:
        if all(isinstance(a, str) for a in args):
            return pa.string(), False
        raise TypeError(f"no Parquet column type for {annotation}")
    if origin in (list, tuple, Sequence):
        return pa.list_(_arrow_type(args[0])[0]), False
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return pa.struct([pa.field(n, *_arrow_type(f.annotation)) for n, f in annotation.model_fields.items()]), False
        if issubclass(annotation, enum.Enum) or issubclass(annotation, str):
            return pa.string(), False
        if issubclass(annotation, bool):
            return pa.bool_(), False
        if issubclass(annotation, int):
            return pa.int64(), False
        if issubclass(annotation, float):
            return pa.float64(), False
    raise TypeError(f"no Parquet column type for {annotation}")


def arrow_schema(model: type[BaseModel]) -> pa.Schema:
    """The Parquet schema of a table: the contract's fields (typed; optional ones nullable), then KAFKA_FIELDS."""
    fields = [pa.field(name, *_arrow_type(info.annotation)) for name, info in model.model_fields.items()]
    clash = {f.name for f in fields} & {f.name for f in KAFKA_FIELDS}
    if clash:
        raise TypeError(f"{model.__name__} has fields named like the archive's own columns: {sorted(clash)}")
    return pa.schema([*fields, *KAFKA_FIELDS])


SCHEMAS: Final[Mapping[str, pa.Schema]] = {name: arrow_schema(model) for name, model in TABLES.items()}


# --- names ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True, order=True)
class Part:
    """One data file's place: its hour folder and the Kafka partition and offset range it covers."""

    topic: str
    date: str
    hour: int
    partition: int
    first: int
    last: int

    @property
    def name(self) -> str:
        return f"part-p{self.partition:0{PARTITION_DIGITS}d}-{self.first:0{OFFSET_DIGITS}d}-{self.last:0{OFFSET_DIGITS}d}.parquet"

    @property
    def folder(self) -> str:
        return hour_folder(self.topic, self.date, self.hour)

    @property
    def relpath(self) -> str:
        return f"{self.folder}/{self.name}"

    @property
    def temp_name(self) -> str:
        return f".{self.name}{TEMP_SUFFIX}"

    def covers(self, other: Part) -> bool:
        """Whether `other`'s rows are all in this file: same folder and partition, its range inside this one's."""
        return (self.folder, self.partition) == (other.folder, other.partition) and self.first <= other.first and other.last <= self.last

    @classmethod
    def parse(cls, path: Path) -> Part | None:
        """The part a committed file's path names, or None for anything else (temp files, foreign files)."""
        match = PART_RE.match(path.name)
        if match is None:
            return None
        hour_dir, date_dir, topic_dir = path.parent.name, path.parent.parent.name, path.parent.parent.parent.name
        if not (hour_dir.startswith("hour=") and date_dir.startswith("date=") and topic_dir.startswith("topic=")):
            return None
        return cls(topic_dir.removeprefix("topic="), date_dir.removeprefix("date="), int(hour_dir.removeprefix("hour=")),
                   int(match["partition"]), int(match["first"]), int(match["last"]))


def hour_folder(topic: str, day: str, hour: int) -> str:
    return f"topic={topic}/date={day}/hour={hour:02d}"


def bucket(ts_ms: int) -> tuple[str, int]:
    """(UTC date as YYYY-MM-DD, UTC hour) of an event time."""
    moment = datetime.fromtimestamp(ts_ms / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%d"), moment.hour


def hour_end_ms(day: str, hour: int) -> int:
    start = datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=UTC) + timedelta(hours=hour)
    return int(start.timestamp() * 1000) + HOUR_MS


def visible(parts: Iterable[Part]) -> list[Part]:
    """The shadow rule: drop every part whose range lies inside another part's (same folder, same partition).
    What remains holds each record at most once, also while a compaction is between its rename and its deletes."""
    groups: dict[tuple[str, int], list[Part]] = defaultdict(list)
    for part in parts:
        groups[(part.folder, part.partition)].append(part)
    kept = []
    for group in groups.values():
        # Ranges in one folder and partition are disjoint or nested (a compaction's union nests its parts).
        # Sorted by first offset, widest first, a part is covered exactly when an earlier one reaches as far.
        reach = -1
        for part in sorted(group, key=lambda p: (p.first, -p.last)):
            if part.last > reach:
                kept.append(part)
                reach = part.last
    return sorted(kept)


# --- rows ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    """One valid record, with where it was read."""

    value: BaseModel
    partition: int
    offset: int
    timestamp_ms: int

    @property
    def ts_ms(self) -> int:
        return self.value.ts_ms  # type: ignore[attr-defined] - both contracts carry ts_ms (checked in TABLES' schemas)


def to_arrow(table: str, rows: Sequence[Row]) -> pa.Table:
    """Rows of one table as an Arrow table in the archive's schema."""
    schema = SCHEMAS[table]
    records = []
    for row in rows:
        record = row.value.model_dump(mode="json")
        record.update(ts=row.ts_ms, kafka_partition=row.partition, kafka_offset=row.offset, kafka_timestamp_ms=row.timestamp_ms)
        records.append(record)
    return pa.Table.from_pylist(records, schema=schema)


# --- state ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PartitionState:
    """What the state file of one (topic, partition) says: the next offset to read and the last flush's files."""

    next_offset: int
    flush_files: tuple[str, ...] = ()
    """Relative paths of the last committed flush's data files (rolled forward by `recover`)."""

    def to_json(self) -> bytes:
        return json.dumps({"next_offset": self.next_offset, "flush_files": list(self.flush_files)}, indent=1).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> PartitionState:
        data = json.loads(raw)
        return cls(int(data["next_offset"]), tuple(data.get("flush_files", ())))


@dataclass(frozen=True)
class Staged:
    """A flush whose data files are written and fsync'd under temporary names, not yet committed."""

    topic: str
    partition: int
    first: int
    last: int
    parts: tuple[Part, ...]
    rows: int
    bytes: int


@dataclass(frozen=True)
class Compaction:
    topic: str
    partition: int
    folder: str
    merged: int
    """Files merged into one."""
    rows: int
    bytes: int


@dataclass
class Recovery:
    next_offset: int | None
    rolled_forward: int = 0
    temp_removed: int = 0
    shadowed_removed: int = 0


def _mkdirs(path: Path) -> None:
    """Create `path` and any missing parents, each new directory entry made durable (its parent fsync'd)."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)
        fsync_dir(folder.parent)


@dataclass
class ArchiveStore:
    """The archive under `root`; `topics` maps table names (`events`, `exposures`) to the Kafka topics archived as them.

    Synchronous file work: the consumer calls it through `asyncio.to_thread`."""

    root: Path
    topics: Mapping[str, str] = field(default_factory=dict)
    compression: str = "zstd"

    def __post_init__(self) -> None:
        unknown = set(self.topics) - set(TABLES)
        if unknown:
            raise ValueError(f"unknown archive tables {sorted(unknown)}; known: {sorted(TABLES)}")

    def table_of(self, topic: str) -> str:
        for table, name in self.topics.items():
            if name == topic:
                return table
        raise KeyError(f"topic {topic!r} is not archived here (tables: {dict(self.topics)})")

    # --- reading ---------------------------------------------------------------------------------------------
    def parts(self, topic: str, partition: int | None = None) -> list[Part]:
        """Every committed data file of `topic` (of one partition if given), shadowed ones included."""
        found = []
        for path in (self.root / f"topic={topic}").glob("date=*/hour=*/part-*.parquet"):
            part = Part.parse(path)
            if part is not None and part.topic == topic and (partition is None or part.partition == partition):
                found.append(part)
        return sorted(found)

    def files(self, topic: str) -> list[Path]:
        """What a reader reads: the committed files of `topic` after the shadow rule (each record once)."""
        return [self.root / p.relpath for p in visible(self.parts(topic))]

    def state_path(self, topic: str, partition: int) -> Path:
        return self.root / STATE_DIR / f"topic={topic}" / f"partition={partition}.json"

    def read_state(self, topic: str, partition: int) -> PartitionState | None:
        try:
            return PartitionState.from_json(self.state_path(topic, partition).read_bytes())
        except FileNotFoundError:
            return None

    def next_offset(self, topic: str, partition: int) -> int | None:
        """The next offset to read: the state file's; without one (lost), one past the last committed file, if any."""
        state = self.read_state(topic, partition)
        if state is not None:
            return state.next_offset
        parts = self.parts(topic, partition)
        return max(p.last for p in parts) + 1 if parts else None

    def next_offsets(self, partitions: Iterable[tuple[str, int]]) -> dict[tuple[str, int], int]:
        found = {}
        for topic, partition in partitions:
            offset = self.next_offset(topic, partition)
            if offset is not None:
                found[(topic, partition)] = offset
        return found

    # --- recovery --------------------------------------------------------------------------------------------
    def recover(self, topic: str, partition: int, retention_s: float = 0.0) -> Recovery:
        """Make one partition's files agree with its state (after a crash anywhere in a flush or a compaction);
        merged parts go once their `retention_s` has passed, as in a compaction pass."""
        state = self.read_state(topic, partition)
        result = Recovery(next_offset=None)
        flush_files = set(state.flush_files) if state else set()
        for rel in sorted(flush_files):
            final = self.root / rel
            temp = final.with_name(f".{final.name}{TEMP_SUFFIX}")
            if final.exists():
                continue
            if temp.exists():
                os.rename(temp, final)  # the flush reached its commit point: roll forward
                fsync_dir(final.parent)
                result.rolled_forward += 1
                continue
            part = Part.parse(final)
            if part is None or not any(p.covers(part) for p in self.parts(topic, partition)):
                raise ArchiveCorrupt(f"{final} belongs to the committed flush in {self.state_path(topic, partition)} "
                                     "but neither it, its temp file nor a compacted file covering it exists")
        # Temp files of this partition not rolled forward: flushes that never committed, unfinished compactions.
        for temp in (self.root / f"topic={topic}").glob(f"date=*/hour=*/.part-p{partition:0{PARTITION_DIGITS}d}-*{TEMP_SUFFIX}"):
            temp.unlink()
            result.temp_removed += 1
        state_temp = self._state_temp(topic, partition)
        if state_temp.exists():
            state_temp.unlink()
        result.shadowed_removed = self.remove_shadowed(topic, partition, retention_s)
        result.next_offset = self.next_offset(topic, partition)
        if state is not None:
            beyond = [p for p in self.parts(topic, partition) if p.last >= state.next_offset]
            if beyond:
                raise ArchiveCorrupt(f"{beyond[0].relpath} covers offsets at or after the stored next offset {state.next_offset}")
        return result

    def remove_shadowed(self, topic: str, partition: int, retention_s: float = 0.0, now_s: float | None = None) -> int:
        """Delete the files of `partition` that a compacted file covers, once that file has existed `retention_s`
        (its mtime is when the shadow began). Until then a reader that listed the old parts before the merge can
        still read them; Vitrine's readers never list them after it (the shadow rule)."""
        now_s = time.time() if now_s is None else now_s
        parts = self.parts(topic, partition)
        keep = visible(parts)
        removed = []
        for part in parts:
            if part in keep:
                continue
            cover = next(k for k in keep if k.covers(part))
            try:
                shadowed_since = (self.root / cover.relpath).stat().st_mtime
            except FileNotFoundError:  # merged again meanwhile; the next pass looks again
                continue
            if now_s - shadowed_since >= retention_s:
                (self.root / part.relpath).unlink(missing_ok=True)
                removed.append(part)
        for folder in {p.folder for p in removed}:
            fsync_dir(self.root / folder)
        return len(removed)

    # --- writing ---------------------------------------------------------------------------------------------
    def flush(self, topic: str, partition: int, first: int, last: int, rows: Sequence[Row], expected_next: int | None) -> Staged:
        """Commit the records [first, last] of one partition (their valid rows, possibly none): stage, commit, publish."""
        staged = self.stage(topic, partition, first, last, rows)
        try:
            self.commit(staged, expected_next)
        except (OffsetsDisagree, ValueError):
            self.unstage(staged)  # refused before the commit point: nothing of it may stay behind
            raise
        self.publish(staged)
        return staged

    def unstage(self, staged: Staged) -> None:
        for part in staged.parts:
            (self.root / part.folder / part.temp_name).unlink(missing_ok=True)

    def stage(self, topic: str, partition: int, first: int, last: int, rows: Sequence[Row]) -> Staged:
        """Step 1: one temp file per hour the rows touch, each fsync'd with its folder. Invisible to readers."""
        if not 0 <= first <= last:
            raise ValueError(f"bad offset range [{first}, {last}]")
        table = self.table_of(topic)
        by_hour: dict[tuple[str, int], list[Row]] = defaultdict(list)
        for row in rows:
            by_hour[bucket(row.ts_ms)].append(row)
        parts, written = [], 0
        for (day, hour), hour_rows in sorted(by_hour.items()):
            part = Part(topic, day, hour, partition, first, last)
            folder = self.root / part.folder
            _mkdirs(folder)
            temp = folder / part.temp_name
            with temp.open("wb") as out:
                pq.write_table(to_arrow(table, hour_rows), out, compression=self.compression)
                out.flush()
                os.fsync(out.fileno())
            written += temp.stat().st_size
            fsync_dir(folder)
            parts.append(part)
        return Staged(topic, partition, first, last, tuple(parts), len(rows), written)

    def commit(self, staged: Staged, expected_next: int | None) -> None:
        """Step 2, the commit point: the state file says next_offset = last + 1 and lists the flush's files.

        Refused (OffsetsDisagree) when the stored next offset is not `expected_next` (None: no state expected);
        a range starting before the stored next offset would overlap committed files and is refused too."""
        state = self.read_state(staged.topic, staged.partition)
        stored = state.next_offset if state else None
        if stored != expected_next:
            raise OffsetsDisagree(staged.topic, staged.partition, -1 if stored is None else stored, -1 if expected_next is None else expected_next)
        if stored is not None and staged.first < stored:
            raise ValueError(f"{staged.topic}:{staged.partition} [{staged.first}, {staged.last}] overlaps committed offsets (< {stored})")
        self._write_state(staged.topic, staged.partition, PartitionState(staged.last + 1, tuple(p.relpath for p in staged.parts)))

    def publish(self, staged: Staged) -> None:
        """Step 3: temp files renamed to their final names (recover does the same after a crash)."""
        for part in staged.parts:
            folder = self.root / part.folder
            os.rename(folder / part.temp_name, folder / part.name)
        for folder in {p.folder for p in staged.parts}:
            fsync_dir(self.root / folder)

    def _state_temp(self, topic: str, partition: int) -> Path:
        path = self.state_path(topic, partition)
        return path.with_name(f".{path.name}{TEMP_SUFFIX}")

    def _write_state(self, topic: str, partition: int, state: PartitionState) -> None:
        path, temp = self.state_path(topic, partition), self._state_temp(topic, partition)
        _mkdirs(path.parent)
        with temp.open("wb") as out:
            out.write(state.to_json())
            out.flush()
            os.fsync(out.fileno())
        os.rename(temp, path)
        fsync_dir(path.parent)

    # --- compaction ------------------------------------------------------------------------------------------
    def compaction_candidates(self, topic: str, partition: int, now_ms: int, grace_ms: int, min_files: int) -> list[list[Part]]:
        """Per closed hour folder: the visible files of `partition`, when there are at least `min_files`."""
        by_folder: dict[str, list[Part]] = defaultdict(list)
        for part in visible(self.parts(topic, partition)):
            by_folder[part.folder].append(part)
        return [group for group in by_folder.values()
                if len(group) >= min_files and hour_end_ms(group[0].date, group[0].hour) + grace_ms <= now_ms]

    def compact(self, group: Sequence[Part], retention_s: float = 0.0) -> Compaction:
        """Merge the files of one partition in one hour folder: write and rename in the union, then delete the
        parts: at once with no `retention_s`, else later by `remove_shadowed` (readers that listed them before the
        rename finish reading them meanwhile, as Delta Lake's VACUUM retention keeps old files for old snapshots).

        The group must be every visible file of that partition in that folder (`compaction_candidates`), so the
        union's range holds exactly the rows of the offsets it names in this hour."""
        merged = self.merge(group)
        if retention_s <= 0:
            self.drop(group, merged)
        return Compaction(merged.topic, merged.partition, merged.folder, len(group),
                          pq.ParquetFile(self.root / merged.relpath).metadata.num_rows, (self.root / merged.relpath).stat().st_size)

    def merge(self, group: Sequence[Part]) -> Part:
        """Compaction step 1: the union as one file under its final name (from then on it shadows the parts)."""
        if len(group) < 2 or len({(p.folder, p.partition) for p in group}) != 1:
            raise ValueError("compaction merges two or more files of one partition in one hour folder")
        first = group[0]
        merged = Part(first.topic, first.date, first.hour, first.partition, min(p.first for p in group), max(p.last for p in group))
        folder = self.root / merged.folder
        table = pa.concat_tables([pq.read_table(folder / p.name, schema=SCHEMAS[self.table_of(first.topic)]) for p in group])
        table = table.sort_by("kafka_offset")
        temp = folder / merged.temp_name
        with temp.open("wb") as out:
            pq.write_table(table, out, compression=self.compression)
            out.flush()
            os.fsync(out.fileno())
        os.rename(temp, folder / merged.name)
        fsync_dir(folder)
        return merged

    def drop(self, group: Sequence[Part], merged: Part) -> None:
        """Compaction step 2: the merged parts deleted (they were shadowed since step 1)."""
        for part in group:
            if not merged.covers(part) or part == merged:
                raise ValueError(f"{part.relpath} is not covered by {merged.relpath}")
            (self.root / part.relpath).unlink(missing_ok=True)
        fsync_dir(self.root / merged.folder)



# --- reading with DuckDB -------------------------------------------------------------------------------------

READ_ATTEMPTS: Final = 20
"""Tries of a read whose files a compaction deleted meanwhile, each after listing the files again (a compaction
merges one hour folder of one partition at a time, so a reader that loses this race many times over is rare)."""
RETRY_PAUSE_S: Final = 0.01
MAX_RETRY_PAUSE_S: Final = 1.0
"""Pauses between those tries, doubling: a consumer working off a backlog compacts folder after folder."""
VANISHED: Final = ("No files found", "No such file")
"""DuckDB's words for a listed file that is gone."""


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def raw_glob(root: Path, topic: str) -> str:
    """The glob an engine that knows nothing of the shadow rule reads (Spark's or Trino's view of the folder):
    every committed file. It equals `files` except while a compaction is between its rename and its deletes."""
    return str(root / f"topic={topic}" / "date=*" / "hour=*" / "part-*.parquet")


@dataclass(frozen=True)
class QueryResult:
    columns: list[str]
    rows: list[tuple]


class ArchiveReader:
    """An in-memory DuckDB whose views `events` and `exposures` read the archive's visible files in place
    (hive_partitioning: `topic`, `date` and `hour` are columns; union_by_name: files written before a contract
    gained a field read it as NULL). The file list is taken when the reader is made: make a new one to see
    files committed since."""

    def __init__(self, store: ArchiveStore, threads: int | None = None) -> None:
        import duckdb  # here, so that the consumer process never loads it

        self.store = store
        self.con = duckdb.connect(config={"threads": threads} if threads else {})
        self.file_counts: dict[str, int] = {}
        self._retrying(lambda: None)  # creates the views, re-listing if a file vanishes while they are bound

    def _views(self) -> None:
        hive_types = "{" + ", ".join(f"{_sql_string(k)}: {_sql_string(v)}" for k, v in HIVE_TYPES.items()) + "}"
        for table, topic in self.store.topics.items():
            files = self.store.files(topic)
            self.file_counts[table] = len(files)
            if files:
                listing = "[" + ", ".join(_sql_string(str(f)) for f in files) + "]"
                self.con.execute(f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM read_parquet({listing}, hive_partitioning = true, "
                                 f"union_by_name = true, hive_types = {hive_types})")
            else:  # an empty archive still has the tables, so that a query says 0 instead of failing
                empty = pa.schema([*SCHEMAS[table], pa.field("topic", pa.string()), pa.field("date", pa.date32()), pa.field("hour", pa.int32())])
                self.con.register(f"_empty_{table}", empty.empty_table())
                self.con.execute(f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM _empty_{table}")

    def _retrying(self, run: Callable[[], T]) -> T:
        """(Re)create the views if needed, then `run()`. When a listed file vanished meanwhile (a compaction deleted
        the parts it merged; binding a view reads the files too), list the files again and retry: the merged file
        holds the same rows."""
        import duckdb

        for attempt in range(READ_ATTEMPTS):
            try:
                if attempt or not self.file_counts:
                    self._views()
                return run()
            except duckdb.IOException as exc:
                if attempt + 1 == READ_ATTEMPTS or not any(m in str(exc) for m in VANISHED):
                    raise
                time.sleep(min(RETRY_PAUSE_S * 2**attempt, MAX_RETRY_PAUSE_S))  # let a sweep of compactions pass
        raise AssertionError("unreachable")

    def query(self, sql: str, parameters: Sequence[object] = ()) -> QueryResult:
        def run() -> QueryResult:
            cursor = self.con.execute(sql, list(parameters))
            columns = [d[0] for d in cursor.description] if cursor.description else []
            return QueryResult(columns, cursor.fetchall() if columns else [])

        return self._retrying(run)

    def stats(self) -> dict[str, Any]:
        """Per table: rows, files, time coverage, and rows per date (and per type for events)."""
        result: dict[str, Any] = {}
        for table in self.store.topics:
            total, low, high = self.query(f"SELECT count(*), min(ts_ms), max(ts_ms) FROM {table}").rows[0]
            by_type = "type" if table == "events" else "NULL"
            per_date = self.query(f"SELECT CAST(date AS VARCHAR) AS date, {by_type} AS type, count(*) AS rows, count(DISTINCT hour) AS hours "
                                  f"FROM {table} GROUP BY ALL ORDER BY ALL")
            result[table] = {
                "topic": self.store.topics[table], "rows": total, "files": self.file_counts[table],
                "first_ts_ms": low, "last_ts_ms": high,
                "first": None if low is None else datetime.fromtimestamp(low / 1000, tz=UTC).isoformat(),
                "last": None if high is None else datetime.fromtimestamp(high / 1000, tz=UTC).isoformat(),
                "per_date": [dict(zip(per_date.columns, row, strict=True)) for row in per_date.rows],
            }
        return result

    def sample(self, table: str, n: int, seed: int) -> QueryResult:
        if table not in self.store.topics:
            raise KeyError(f"unknown table {table!r}; choose {', '.join(self.store.topics)}")
        return self.query(f"SELECT * FROM {table} USING SAMPLE reservoir({int(n)} ROWS) REPEATABLE ({int(seed)}) ORDER BY ts_ms")

    def event_columns(self, since: str | None, until: str | None) -> pa.Table:
        """Training's columns of the events in [since, until] (UTC dates, inclusive; None: open), one row per
        event_id (the first read from Kafka: a producer's retry is the same event), in time order."""
        clauses, parameters = [], []
        if since is not None:
            clauses.append("date >= CAST(? AS DATE)")
            parameters.append(since)
        if until is not None:
            clauses.append("date <= CAST(? AS DATE)")
            parameters.append(until)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = (f"SELECT event_id, user_id, item_id, type, ts_ms FROM events {where} "
               "QUALIFY row_number() OVER (PARTITION BY event_id ORDER BY kafka_partition, kafka_offset) = 1 "
               "ORDER BY ts_ms, event_id")
        return self._retrying(lambda: self.con.sql(sql, params=parameters).to_arrow_table())
