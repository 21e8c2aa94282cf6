"""The ledger: everything the output folder knows about a run, in one object.

`_raymerge/` holds the run record (digest, spec, the files the run owns), the plan, a lock
naming the live driver, one record per finished work unit (written after its bytes), the
shard tokens and the artifacts of prepare stages. Records are written atomically and read
tolerantly: a torn or foreign record means "redo that piece", never a crash. `--force`
removes only what the ledger owns and never follows a symlink; an output folder that is an
input, or lies inside one, is refused.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import uuid
from typing import Any

from raymerge.card import CARD_FILES
from raymerge.checkpoint import CONFIG_FILES, TOKENIZER_FILES
from raymerge.errors import ConfigError
from raymerge.index import COMPLETE, HF_INDEX, TENSOR_INDEX
from raymerge.plan import Plan, Unit
from raymerge.storage.base import Destination

STATE_DIR = "_raymerge"
RUN_RECORD = f"{STATE_DIR}/run.json"
PLAN_TABLE = f"{STATE_DIR}/plan.parquet"
UNIT_RECORDS = f"{STATE_DIR}/units"
SHARD_TOKENS = f"{STATE_DIR}/shards.json"
LOCK = f"{STATE_DIR}/lock.json"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 60.0  # a lock whose heartbeat is older belongs to a dead driver
_HELD: set[str] = set()  # lock tokens this process holds now
SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors(\.partial)?")


def _load(text: str | None) -> dict | None:
    """A JSON object, or None when absent, torn or not an object."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def check_not_an_input(out: str, inputs: list[str]) -> None:
    """Refuse an output folder that is an input's folder or lies inside one (for URIs: the
    same prefix, or one under it)."""
    from raymerge.storage.lora import is_lora, parse_uri

    real_out = out.rstrip("/") if "://" in out else os.path.realpath(out)
    roots = [part for root in inputs for part in (parse_uri(root) if is_lora(root) else (root,))]
    for root in roots:
        if ("://" in root) != ("://" in out):
            continue
        real_in = root.rstrip("/") if "://" in root else os.path.realpath(root)
        if real_out == real_in or real_out.startswith(real_in.rstrip("/") + "/"):
            raise ConfigError(
                f"output folder {out} is the input checkpoint {root} or lies inside it; "
                "raymerge never writes into its inputs: choose another output folder"
            )


def holds_complete(destination: Destination, digest: str) -> bool:
    """Whether the folder holds this merge (same digest), complete."""
    record = _load(destination.read_text(RUN_RECORD))
    return bool(record) and record.get("digest") == digest and (
        destination.read_text(COMPLETE) is not None
    )


class Ledger:
    def __init__(self, destination: Destination, plan: Plan, owns: list[str]) -> None:
        self.destination = destination
        self.plan = plan
        self.owns = sorted(owns)  # the files this run writes besides _raymerge/
        self.token = uuid.uuid4().hex
        self.done: dict[str, dict] = {}  # unit key -> record
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    # --- claiming the folder -------------------------------------------------------------

    def claim(self, force: bool, log) -> None:
        """Take the folder: lock it, then start fresh, resume, or (with force) clear what an
        earlier run owned. Fills `done` with the units an earlier run of this merge wrote."""
        entries = self.destination.list()
        ours = f"{STATE_DIR}/" in entries
        if entries and not ours:
            self._check_foreign(entries, force)
        self._lock()
        record = _load(self.destination.read_text(RUN_RECORD))
        previous = record.get("digest") if record else None
        if force:
            self._remove_owned(record)
        elif previous == self.plan.digest and COMPLETE in entries:
            self.release()
            raise ConfigError(
                f"{self.destination.root} already holds this merge, complete; use --force to "
                "redo it"
            )
        elif ours and record is not None and previous != self.plan.digest:
            self.release()
            raise ConfigError(
                f"output folder {self.destination.root} holds a different merge (another "
                "config, other input files or another raymerge version); choose an empty "
                "folder or pass --force to replace it"
            )
        elif ours:
            self.done = self._read_unit_records()
            log(
                f"resuming an unfinished run of this merge in {self.destination.root}: "
                f"{len(self.done)} of {len(self.plan.units)} work units already written"
            )

    def _check_foreign(self, entries: list[str], force: bool) -> None:
        """A folder raymerge did not write: with --force our files may go beside the ones
        there, as long as none has a name we would write."""
        where = self.destination.root
        if not force:
            raise ConfigError(
                f"output folder {where} is not empty ({len(entries)} entries, not written by "
                "raymerge); choose an empty folder or pass --force to write raymerge's files "
                "beside them"
            )
        clash = sorted(set(e.rstrip("/") for e in entries) & set(self.owns))
        if clash:
            raise ConfigError(
                f"output folder {where} holds {', '.join(clash[:5])}, which raymerge did not "
                "write and would overwrite; --force only replaces raymerge's own files: "
                "choose another folder or move them away"
            )

    def _lock(self) -> None:
        body = json.dumps(self._lock_body()).encode()
        if self.destination.create_exclusive(LOCK, body):
            self._start_heartbeat()
            return
        holder = _load(self.destination.read_text(LOCK))
        if holder is not None and _alive(holder):
            raise ConfigError(
                f"another raymerge run (pid {holder.get('pid')} on {holder.get('host')}) is "
                f"writing to {self.destination.root}; wait for it to finish or stop it first"
            )
        self.destination.write_file(LOCK, body)  # a dead driver's lock: take it over
        self._start_heartbeat()

    def _lock_body(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                "heartbeat": time.time()}  # fmt: skip

    def _start_heartbeat(self) -> None:
        _HELD.add(self.token)

        def beat() -> None:
            while not self._stop.wait(HEARTBEAT_S):
                holder = _load(self.destination.read_text(LOCK))
                if holder is None or holder.get("token") != self.token:
                    return  # taken over: leave it
                self.destination.write_file(LOCK, json.dumps(self._lock_body()).encode())

        self._heartbeat = threading.Thread(target=beat, name="raymerge-lock", daemon=True)
        self._heartbeat.start()

    def release(self) -> None:
        self._stop.set()
        _HELD.discard(self.token)
        holder = _load(self.destination.read_text(LOCK))
        if holder is not None and holder.get("token") == self.token:
            self.destination.remove(LOCK)

    def _remove_owned(self, record: dict | None) -> None:
        """Everything an earlier run owned, by the names its run record lists (or, when the
        record is torn, by raymerge's own file names); never the lock, never via links."""
        owned = set(record.get("owns", [])) if record else set()
        owned |= {HF_INDEX, TENSOR_INDEX, COMPLETE}
        if record is None:
            owned |= {*CONFIG_FILES, *TOKENIZER_FILES, *CARD_FILES}
            owned |= {e for e in self.destination.list() if _looks_like_shard(e)}
        owned |= {name + ".partial" for name in list(owned)}
        self._abort_recorded_shards()
        for entry in self.destination.list():
            if entry.rstrip("/") in owned:
                self.destination.remove(entry.rstrip("/"))
        for entry in self.destination.list_dir(STATE_DIR):
            if f"{STATE_DIR}/{entry}" != LOCK:
                self.destination.remove(f"{STATE_DIR}/{entry.rstrip('/')}")

    def _abort_recorded_shards(self) -> None:
        """Drop the unfinished shards (S3: abort the multipart uploads) an earlier run's
        ledger names, whatever merge it was."""
        body = _load(self.destination.read_text(SHARD_TOKENS))
        tokens = body.get("tokens") if body else None
        if not isinstance(tokens, dict):
            return
        for name, token in tokens.items():
            if isinstance(token, str) and token and _looks_like_shard(name):
                self.destination.abort_shard(name, token)

    def abort_unfinished(self) -> None:
        """After a failure a rerun cannot resume (the config or an input must change): drop
        every unfinished shard, so no upload is left open, and forget the shard tokens."""
        self._abort_recorded_shards()
        self.destination.remove(SHARD_TOKENS)

    # --- records -------------------------------------------------------------------------

    def write_run_record(self, spec_json: dict, plan_table: bytes) -> None:
        record = {"digest": self.plan.digest, "spec": spec_json, "owns": self.owns,
                  "created": time.time()}  # fmt: skip
        self.destination.write_file(RUN_RECORD, json.dumps(record, indent=2).encode())
        self.destination.write_file(PLAN_TABLE, plan_table)

    def record(self, units: list[Unit], results: list[Any]) -> None:
        """Record finished units, one file for all of them (named by the first unit's key):
        a batch of tiny units costs one write, not one per unit."""
        bodies = [
            {"digest": self.plan.digest, "key": unit.key, "shard": unit.shard,
             "start": unit.start, "end": unit.end, "checksums": result.checksums,
             "receipt": result.receipt}
            for unit, result in zip(units, results)
        ]  # fmt: skip
        body = bodies[0] if len(bodies) == 1 else {"digest": self.plan.digest, "records": bodies}
        self.destination.write_file(f"{UNIT_RECORDS}/{units[0].key}.json",
                                    json.dumps(body).encode())  # fmt: skip
        for unit, record in zip(units, bodies):
            self.done[unit.key] = record

    def _read_unit_records(self) -> dict[str, dict]:
        """Every well-formed record of this merge whose unit still has the same byte range
        (a file holds one record, or a batch's)."""
        units = {u.key: u for u in self.plan.units}
        done = {}
        for name in self.destination.list_dir(UNIT_RECORDS):
            if name.startswith(".") or not name.endswith(".json"):
                continue  # a temporary file a killed driver left
            body = _load(self.destination.read_text(f"{UNIT_RECORDS}/{name}"))
            if body is None or body.get("digest") != self.plan.digest:
                continue
            records = body.get("records", [body])
            for record in records if isinstance(records, list) else []:
                unit = units.get(record.get("key")) if isinstance(record, dict) else None
                if unit is None or record.get("digest") != self.plan.digest:
                    continue
                if (record.get("shard"), record.get("start"), record.get("end")) != (
                    unit.shard, unit.start, unit.end,
                ):  # fmt: skip
                    continue  # cut differently (another --worker-memory): redo
                if _well_formed(record.get("checksums"), unit):
                    done[unit.key] = record
        return done

    def forget(self, key: str) -> None:
        self.done.pop(key, None)

    def shard_tokens(self) -> dict[str, str]:
        body = _load(self.destination.read_text(SHARD_TOKENS))
        if body is None or body.get("digest") != self.plan.digest:
            return {}
        tokens = body.get("tokens")
        return tokens if isinstance(tokens, dict) else {}

    def write_shard_tokens(self, tokens: dict[str, str]) -> None:
        body = {"digest": self.plan.digest, "tokens": tokens}
        self.destination.write_file(SHARD_TOKENS, json.dumps(body).encode())

    def artifact(self, name: str) -> Any:
        """A prepare stage's stored result for this merge, or None."""
        body = _load(self.destination.read_text(f"{STATE_DIR}/{name}.json"))
        if body is None or body.get("digest") != self.plan.digest:
            return None
        return body.get("value")

    def store_artifact(self, name: str, value: Any) -> None:
        body = {"digest": self.plan.digest, "value": value}
        self.destination.write_file(f"{STATE_DIR}/{name}.json", json.dumps(body).encode())


def _looks_like_shard(entry: str) -> bool:
    return SHARD_PATTERN.fullmatch(entry) is not None


def _well_formed(checksums: Any, unit: Unit) -> bool:
    if not isinstance(checksums, list) or len(checksums) != len(unit.pieces):
        return False
    for entry, piece in zip(checksums, unit.pieces):
        if not (isinstance(entry, list) and len(entry) == 4 and isinstance(entry[3], str)):
            return False
        if tuple(entry[:3]) != (piece.tensor, piece.row_start, piece.row_end):
            return False
    return True


def _alive(holder: dict) -> bool:
    """Whether the driver named by a lock still runs."""
    if holder.get("host") == socket.gethostname():
        pid = holder.get("pid")
        if not isinstance(pid, int) or pid <= 0:
            return False
        if pid == os.getpid():
            return holder.get("token") in _HELD  # another run in this interpreter
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    beat = holder.get("heartbeat")
    return isinstance(beat, int | float) and time.time() - beat < STALE_AFTER_S
