"""The output vocabulary when embedding rows are matched by token string (`tokenizer_source:
union`, or a `tokenizer:` block with `tokens` / `pad_to_multiple_of`), built on the driver.

It follows mergekit's `tokenizer/build.py`: each input's `tokenizer.json` (read through the
checkpoint's Source, so S3 and Hub inputs work; untrusted: size cap, JSON checked) gives its
token -> id map, limited to the ids below its config.json `vocab_size` (mergekit's
`get_vocab_size`; the tokenizer's size when absent). The union is the base tokenizer (the
base model, else the first input; its added tokens at or above its vocab_size dropped), then
every other input's ordinary tokens the output lacks, then every input's added tokens the
output lacks (with the settings of the first input that has them), then the `tokens:` keys.
Unlike mergekit, whose order among the appended tokens follows Python set and Rust hash
iteration (so it can change from run to run), the order here is fixed: inputs in config order
(the base first), each input's tokens by id. The output tokenizer itself is made by the
`tokenizers` library from the base's tokenizer.json with `add_tokens`, as transformers'
`add_tokens` does in mergekit, and its vocabulary is checked against the order computed here.

Nothing here imports torch; `tokenizers` is imported when a vocabulary is built.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from raymerge.checkpoint import Checkpoint
from raymerge.errors import CheckpointError, ConfigError, shown
from raymerge.spec import MergeSpec

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
COPIED_WITH_IT = ("special_tokens_map.json", "chat_template.jinja")  # from the starting input
MAX_TOKENIZER_BYTES = 128 << 20  # Gemma 3's tokenizer.json is 33 MB
MAX_CHAT_TEMPLATE_BYTES = 16 << 20
ADDED_KEYS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")


@dataclass(frozen=True)
class InputTokenizer:
    """What the vocabulary needs of one input's tokenizer.json."""

    data: dict  # the parsed file (only where the output starts from it; else empty)
    ids: dict[str, int]  # every token -> id, added tokens included
    added: tuple[dict, ...]  # the file's added_tokens entries, by id
    limit: int  # ids at or above this have no embedding row (config.json vocab_size)
    sha256: str

    def below_limit(self) -> dict[str, int]:
        return {t: i for t, i in self.ids.items() if i < self.limit}


@dataclass(frozen=True)
class Vocabulary:
    """The output vocabulary: row r of every embedding / lm_head tensor is `tokens[r]`'s;
    rows [len(tokens), rows) are padding (pad_to_multiple_of)."""

    tokens: tuple[str, ...]
    rows: int
    ids: tuple[dict[str, int], ...]  # per input: token -> its row (ids below its limit)
    all_ids: tuple[dict[str, int], ...]  # per input: every token's id (model_token lookups)
    files: tuple[tuple[str, bytes], ...]  # the output's tokenizer files
    digest: str  # the input tokenizer files, the order and the output files


def union_order(
    tokenizers: list[tuple[dict[str, int], list[tuple[int, str]]]],
    extra: list[str] = (),  # type: ignore[assignment]
    union: bool = True,
) -> list[str]:
    """The output tokens in id order. `tokenizers[0]` is the one the output starts from, each
    given as (token -> id below its limit, its added tokens as (id, content)); with `union`
    the others' tokens follow (ordinary tokens first, then added tokens), then `extra`."""
    base_ids = tokenizers[0][0]
    order = sorted(base_ids, key=base_ids.__getitem__)
    seen = set(order)
    if union:
        added = {content for _, listed in tokenizers for _, content in listed}
        for ids, _ in tokenizers[1:]:
            for token in sorted(ids, key=ids.__getitem__):
                if token not in seen and token not in added:
                    order.append(token)
                    seen.add(token)
        for _, listed in tokenizers:
            for _, content in sorted(listed):
                if content not in seen:
                    order.append(content)
                    seen.add(content)
    for token in extra:
        if token not in seen:
            order.append(token)
            seen.add(token)
    return order


def read_tokenizer(checkpoint: Checkpoint, given: str, keep: bool = True) -> InputTokenizer:
    """An input's tokenizer.json, checked (its parsed text kept with `keep`); ConfigError
    when there is none."""
    source = checkpoint.source
    if not source.exists(TOKENIZER_JSON):
        raise ConfigError(
            f"{shown(given)} has no {TOKENIZER_JSON}: `tokenizer_source: union` and the "
            "`tokenizer:` block's tokens / pad_to_multiple_of match embedding rows by token "
            f"string, so every model needs its tokenizer; put the model's {TOKENIZER_JSON} "
            "beside its weights (a slow-only tokenizer can be converted with transformers: "
            "AutoTokenizer.from_pretrained(...).save_pretrained(...)), or use "
            "`tokenizer_source: base` (rows matched by position)"
        )
    where = source.describe(TOKENIZER_JSON)
    raw = _tokenizer_bytes(checkpoint)
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        problem = str(exc).split(";")[0][:200] or type(exc).__name__
        raise CheckpointError(
            f"{where}: not valid JSON ({problem}); restore the model's original {TOKENIZER_JSON}"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise CheckpointError(
            f"{where}: not a tokenizers tokenizer.json (a JSON object with a `model`); restore "
            f"the model's original {TOKENIZER_JSON}"
        )
    added = data.get("added_tokens") or []
    if not isinstance(added, list) or not all(
        isinstance(e, dict) and isinstance(e.get("id"), int) and isinstance(e.get("content"), str)
        for e in added
    ):
        raise CheckpointError(f"{where}: `added_tokens` must be a list of {{id, content, ...}}")
    tokenizer = _load(raw.decode("utf-8"), where)
    ids = tokenizer.get_vocab(with_added_tokens=True)
    limit = _vocab_size(checkpoint) or len(ids)
    digest = hashlib.sha256(raw).hexdigest()
    added = tuple(sorted(added, key=lambda e: e["id"]))
    return InputTokenizer(data if keep else {}, ids, added, limit, digest)


def _tokenizer_bytes(checkpoint: Checkpoint) -> bytes:
    """The checkpoint's tokenizer.json, refused above MAX_TOKENIZER_BYTES (untrusted)."""
    source = checkpoint.source
    size = source.size(TOKENIZER_JSON)
    if size > MAX_TOKENIZER_BYTES:
        raise CheckpointError(
            f"{source.describe(TOKENIZER_JSON)}: {size} bytes is too large for a tokenizer "
            f"(limit {MAX_TOKENIZER_BYTES}); restore the model's original {TOKENIZER_JSON}"
        )
    return source.read_range(TOKENIZER_JSON, 0, size)


def text_tokenizer(checkpoint: Checkpoint):
    """The checkpoint's tokenizer.json as a `tokenizers.Tokenizer` (to tokenize calibration
    text), or None when it has none."""
    if not checkpoint.source.exists(TOKENIZER_JSON):
        return None
    raw = _tokenizer_bytes(checkpoint)
    return _load(raw.decode("utf-8", errors="replace"), checkpoint.source.describe(TOKENIZER_JSON))


def _load(text: str, where: str):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(text)
    except Exception as exc:  # the library raises plain Exceptions
        problem = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"{where}: the tokenizers library cannot load it ({problem}); restore the model's "
            f"original {TOKENIZER_JSON}"
        ) from None


def _vocab_size(checkpoint: Checkpoint) -> int | None:
    """config.json's vocab_size (or text_config.vocab_size), as mergekit reads it."""
    config = checkpoint.read_json("config.json") or {}
    for holder in (config, config.get("text_config")):
        if isinstance(holder, dict):
            value = holder.get("vocab_size")
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def build_vocabulary(spec: MergeSpec, checkpoints: list[Checkpoint]) -> Vocabulary:
    """The output vocabulary and tokenizer files for `spec.vocab` (see the module's doc)."""
    vocab = spec.vocab
    assert vocab is not None
    start = vocab.input
    inputs = [read_tokenizer(c, m.given, i == start)
              for i, (c, m) in enumerate(zip(checkpoints, spec.inputs))]  # fmt: skip
    first = inputs[start]
    first_given = shown(spec.inputs[start].given)
    data = json.loads(json.dumps(first.data))  # a copy
    strip = vocab.source != "model"  # mergekit strips the base (get_stripped_tokenizer)
    if strip:
        data["added_tokens"] = [e for e in first.added if e["id"] < first.limit]
    output = _load(json.dumps(data), f"{first_given}'s {TOKENIZER_JSON}")
    start_ids = output.get_vocab(with_added_tokens=True)
    too_high = sorted(i for i in start_ids.values() if i >= first.limit)
    if strip and too_high:
        raise ConfigError(
            f"{first_given}: its {TOKENIZER_JSON} has {len(too_high)} token(s) with ids at or "
            f"above its vocab_size {first.limit} (config.json), such as id {too_high[0]}; "
            "raymerge does not strip them from the tokenizer model: fix vocab_size or the "
            "tokenizer, or start from another model"
        )
    if sorted(start_ids.values()) != list(range(len(start_ids))):
        raise ConfigError(
            f"{first_given}: the ids of its {TOKENIZER_JSON} are not 0..{len(start_ids) - 1} "
            "without gaps; raymerge places token id i at embedding row i, so it cannot start "
            "the output vocabulary from it"
        )
    order_of = [start] + [i for i in range(len(inputs)) if i != start]
    listed = [(start_ids, [(e["id"], e["content"]) for e in data.get("added_tokens") or []])]
    listed += [
        (inputs[i].below_limit(),
         [(e["id"], e["content"]) for e in inputs[i].added if e["id"] < inputs[i].limit])
        for i in order_of[1:]
    ]  # fmt: skip
    extra = [t.token for t in vocab.tokens]
    union = vocab.source == "union"
    order = union_order(listed, extra, union)
    _add_tokens(output, listed, [data.get("added_tokens") or []] + [
        [e for e in inputs[i].added if e["id"] < inputs[i].limit] for i in order_of[1:]
    ], extra, union)  # fmt: skip
    got = output.get_vocab(with_added_tokens=True)
    expected = {token: i for i, token in enumerate(order)}
    if got != expected:
        wrong = next((t for t in order if got.get(t) != expected[t]), None)
        which = "" if wrong is None else f"; token {shown(wrong)} got id {got.get(wrong)}"
        raise ConfigError(
            f"the output tokenizer built from {first_given} has {len(got)} tokens where "
            f"raymerge placed {len(expected)}{which}; two tokens may stand for the same string "
            "there: use `tokenizer_source: base`"
        )
    rows = len(order)
    if vocab.pad_to_multiple_of and rows % vocab.pad_to_multiple_of:
        rows += vocab.pad_to_multiple_of - rows % vocab.pad_to_multiple_of
    files = _output_files(output, checkpoints[start], first_given)
    record = {
        "inputs": [(t.sha256, t.limit) for t in inputs],
        "order": hashlib.sha256("\0".join(order).encode()).hexdigest(),
        "rows": rows,
        "files": [(name, hashlib.sha256(body).hexdigest()) for name, body in files],
    }
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
    ids = tuple(t.below_limit() for t in inputs)
    return Vocabulary(tuple(order), rows, ids, tuple(t.ids for t in inputs), files, digest)


def _add_tokens(output, listed, added, extra, union) -> None:
    """What mergekit's build_union_tokenizer and build_tokenizer add, in the same calls:
    the others' ordinary tokens the output lacks as plain added tokens, every input's added
    tokens with the first settings seen, then the `tokens:` keys. `listed` is as for
    union_order, `added` each one's added_tokens entries (below its limit)."""
    from tokenizers import AddedToken

    if union:
        present = set(listed[0][0])
        added_contents = {content for _, entries in listed for _, content in entries}
        plain = []
        for ids, _ in listed[1:]:
            for token in sorted(ids, key=ids.__getitem__):
                if token not in present and token not in added_contents:
                    plain.append(token)
                    present.add(token)
        output.add_tokens([AddedToken(t, special=False) for t in plain])
        first_seen: dict[str, dict] = {}
        for entries in added:
            for entry in sorted(entries, key=lambda e: e["id"]):
                first_seen.setdefault(entry["content"], entry)
        output.add_tokens([_added_token(e) for e in first_seen.values()])
    if extra:
        output.add_tokens([AddedToken(t, special=False) for t in extra])


def _added_token(entry: dict):
    from tokenizers import AddedToken

    special = bool(entry.get("special", False))
    return AddedToken(
        entry["content"], single_word=bool(entry.get("single_word", False)),
        lstrip=bool(entry.get("lstrip", False)), rstrip=bool(entry.get("rstrip", False)),
        normalized=bool(entry.get("normalized", not special)), special=special,
    )  # fmt: skip


def _output_files(output, checkpoint: Checkpoint, given: str) -> tuple[tuple[str, bytes], ...]:
    """tokenizer.json; the starting input's tokenizer_config.json with `added_tokens_decoder`
    rewritten (as transformers' save_pretrained writes it); its special_tokens_map.json and
    chat_template.jinja as they are. Slow-tokenizer files (tokenizer.model, vocab.json,
    merges.txt, added_tokens.json) are not written: they would lack the added tokens."""
    text = output.to_str(pretty=True)
    files = [(TOKENIZER_JSON, text.encode())]
    config = checkpoint.read_json(TOKENIZER_CONFIG)
    if config is not None:
        added = json.loads(text).get("added_tokens") or []
        config["added_tokens_decoder"] = {
            str(e["id"]): {key: e.get(key, False) for key in ADDED_KEYS}
            for e in sorted(added, key=lambda e: e["id"])
        }
        body = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        files.append((TOKENIZER_CONFIG, body.encode()))
    source = checkpoint.source
    for name in COPIED_WITH_IT:
        if source.exists(name):
            size = source.size(name)
            if size > MAX_CHAT_TEMPLATE_BYTES:
                raise CheckpointError(
                    f"{source.describe(name)}: {size} bytes is too large for a tokenizer side "
                    f"file (limit {MAX_CHAT_TEMPLATE_BYTES}); restore {given}'s original {name}"
                )
            files.append((name, source.read_range(name, 0, size)))
    return tuple(files)
