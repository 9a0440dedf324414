"""Batches of the loader: the records collected for one flush, per partition, and how a batch is split.

A batch is the unit the loader stores exactly once (one manifest, one insert token, one offset commit). Its
records are kept per partition in offset order, so its rows are always in (topic, partition, offset) order
whatever order the fetches arrived in, and a batch rebuilt from its offset ranges (a replay) is the same.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import ConsumerRecord


def _partition_of(record: ConsumerRecord) -> tuple[str, int]:
    return record.topic, record.partition


@dataclass
class RawBatch:
    """The records collected for one flush, per partition (each partition's in offset order)."""

    parts: dict[tuple[str, int], list[ConsumerRecord]] = field(default_factory=dict)
    count: int = 0
    started: float = 0.0

    def add(self, records: Sequence[ConsumerRecord]) -> None:
        """Append fetched records (of any partitions; those of one partition in offset order)."""
        if not records:
            return
        if not self.count:
            self.started = time.monotonic()
        parts = self.parts
        for key, recs in itertools.groupby(records, key=_partition_of):
            part = parts.get(key)
            if part is None:
                parts[key] = list(recs)
            else:
                part.extend(recs)
        self.count += len(records)

    def records(self) -> list[ConsumerRecord]:
        """Every record in (topic, partition, offset) order: the batch's rows, whatever the arrival order."""
        return [r for key in sorted(self.parts) for r in self.parts[key]]

    def ranges(self) -> list[list[Any]]:
        """[[topic, partition, first_offset, last_offset], ...] sorted."""
        return [[t, p, recs[0].offset, recs[-1].offset] for (t, p), recs in sorted(self.parts.items())]

    def split(self) -> tuple[RawBatch, RawBatch]:
        """Two batches of half the records each, in row order: stored one after the other, they commit the
        same offsets as this batch, and each partition's records stay contiguous in each half (so each half
        is a batch of its own: its ranges rebuild it). A batch of one record cannot be split."""
        if self.count < 2:
            raise ValueError("a batch of fewer than two records cannot be split")
        records = self.records()
        half = len(records) // 2
        first, second = RawBatch(), RawBatch()
        first.add(records[:half])
        second.add(records[half:])
        first.started = second.started = self.started
        return first, second


def new_token() -> str:
    """The insert deduplication token of a new batch (kept in its manifest, reused by its replays)."""
    return f"access-{uuid.uuid4().hex}"
