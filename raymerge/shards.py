"""Output shards through a run: opened (or picked up), filled unit by unit, committed whole.

Each shard counts the units it still waits for, so recording a result is O(1); a shard is
committed (renamed, or its upload completed) the moment its last unit is in. On resume,
every unit an earlier run recorded is read back and its CRCs compared, committed shards
included: a unit whose bytes are gone or differ, or cannot be read, is redone. Where parts
cannot be read back (an S3 upload), the store's own list of parts is asked instead: a unit
counts as written when its part is there with the ETag its record names, and a part is kept
only whole.
"""

from __future__ import annotations

from raymerge.checksum import checksum, join
from raymerge.ledger import Ledger
from raymerge.plan import Plan, Unit
from raymerge.storage.base import Destination


class ShardBook:
    def __init__(self, destination: Destination, plan: Plan, ledger: Ledger) -> None:
        self.destination = destination
        self.plan = plan
        self.ledger = ledger
        self.units_of: dict[int, list[Unit]] = {}
        for unit in plan.units:
            self.units_of.setdefault(unit.shard, []).append(unit)
        self.tokens, self.committed = self._open()
        self.waiting = {
            shard: sum(u.key not in ledger.done for u in units)
            for shard, units in self.units_of.items()
        }
        for shard, count in self.waiting.items():
            if count == 0 and shard not in self.committed:
                self._commit(shard)

    def _open(self) -> tuple[tuple[str, ...], set[int]]:
        """Pick up committed and partial shards of an earlier run (keeping only recorded
        units whose bytes check out), start the others."""
        entries = set(self.destination.list())
        previous = self.ledger.shard_tokens()
        tokens, committed = [], set()
        for index, shard in enumerate(self.plan.shards):
            units = self.units_of.get(index, [])
            if shard.name in entries:  # committed earlier: keep it if every unit checks out
                final = self.destination.describe(shard.name)
                if all(self._intact(final, u) for u in units):
                    committed.add(index)
                    tokens.append("")
                    continue
                self.destination.remove(shard.name)
            token, resumed = self.destination.begin_shard(
                shard.name, shard.size, previous.get(shard.name)
            )
            listed = self.destination.uploaded_parts(shard.name, token) if resumed else None
            for unit in units:
                if unit.key in self.ledger.done and not (
                    resumed and self._intact(token, unit, listed)
                ):
                    self.ledger.forget(unit.key)
            if self.destination.whole_parts:
                self._forget_broken_parts(units)
            tokens.append(token)
        names = [s.name for s in self.plan.shards]
        self.ledger.write_shard_tokens(dict(zip(names, tokens)))
        return tuple(tokens), committed

    def _forget_broken_parts(self, units: list[Unit]) -> None:
        """A part is sent whole: when any of its units must be redone, all of them are."""
        missing = {u.part for u in units if u.key not in self.ledger.done}
        for unit in units:
            if unit.part in missing:
                self.ledger.forget(unit.key)

    def _intact(self, token: str, unit: Unit, listed: dict[int, str] | None = None) -> bool:
        """Whether a recorded unit's bytes are still what its record says (a read error or a
        short read is never intact); `listed`: the store's parts, where bytes cannot be read
        back."""
        record = self.ledger.done.get(unit.key)
        if record is None:
            return False
        if listed is not None:
            return listed.get(unit.part) == record.get("receipt")
        data = self.destination.read_part(token, unit.start, unit.nbytes)
        if data is None:
            return True  # a completed object: the store checked its parts when it took them
        if len(data) != unit.nbytes:
            return False
        for tensor, row_start, row_end, crc in record["checksums"]:
            t = self.plan.tensors[tensor]
            lo, hi = t.row_offset(row_start) - unit.start, t.row_offset(row_end) - unit.start
            if checksum(memoryview(data)[lo:hi]) != crc:
                return False
        return True

    def units_done(self, units: list[Unit], results: list) -> None:
        """Record finished units (one ledger write for all), then commit every shard whose
        last unit they were."""
        self.ledger.record(units, results)
        for unit in units:
            self.waiting[unit.shard] -= 1
            if self.waiting[unit.shard] == 0:
                self._commit(unit.shard)

    def _commit(self, shard: int) -> None:
        receipts = list(dict.fromkeys(  # one per part where units share their part's receipt
            self.ledger.done[u.key].get("receipt", "") for u in self.units_of[shard]
        ))  # fmt: skip
        self.destination.commit_shard(self.plan.shards[shard].name, self.tokens[shard], receipts)
        self.committed.add(shard)

    def tensor_checksums(self) -> dict[str, str]:
        """Each tensor's CRC-32, joined from its pieces' CRCs in row order."""
        pieces: dict[int, list[tuple[int, int, str]]] = {}
        for record in self.ledger.done.values():
            for tensor, row_start, row_end, crc in record["checksums"]:
                pieces.setdefault(tensor, []).append((row_start, row_end, crc))
        sums = {}
        for index, parts in pieces.items():
            t = self.plan.tensors[index]
            parts.sort()
            sums[t.name] = join([(crc, (hi - lo) * t.row_bytes) for lo, hi, crc in parts])
        return sums
