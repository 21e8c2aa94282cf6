"""What makes an output ready to publish: a model card (README.md) and the normalized config
(raymerge_config.yml), as mergekit writes its card and mergekit_config.yml.

The card's front matter is what the Hugging Face Hub reads: `base_model` (the inputs' Hub
repository ids, where an input is known to come from the Hub), `tags: [merge, raymerge]`,
`library_name: transformers`. The Hub refuses a push whose `base_model` is not a repository
id, so a local path or an S3 URI is never put there (mergekit leaves local paths out too);
the card's list of models names every input as the config gave it, with its revision where
the files say which (a Hugging Face cache snapshot, or the metadata `huggingface-cli download
--local-dir` leaves), else where its files were read from.

raymerge_config.yml is rebuilt from the checked MergeSpec, not copied from the user's text:
it is what raymerge ran (command-line overrides such as --seed or --shard-size included,
defaults filled in, model paths resolved), and `raymerge.config.load_spec` reads it back to
the same spec, so `raymerge run raymerge_config.yml OUT` repeats the merge. What the spec
does not keep (comments, `name:`, `chat_template:`, which raymerge does not apply) is not
in it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import yaml

from raymerge.dtypes import CONFIG_DTYPE_ALIASES
from raymerge.spec import MergeSpec, OutputSlice, SliceSource
from raymerge.storage import uri_scheme
from raymerge.storage.lora import config_ref, is_lora, parse_uri

if TYPE_CHECKING:
    from raymerge.checkpoint import Checkpoint
    from raymerge.plan import Plan

CARD_FILE = "README.md"
CONFIG_FILE = "raymerge_config.yml"
CARD_FILES = (CARD_FILE, CONFIG_FILE)

# mergekit 0.1.5's names and reference links of the methods (merge_methods/*.py)
METHOD_NAMES = {
    "linear": ("Linear", "https://arxiv.org/abs/2203.05482"),
    "task_arithmetic": ("Task Arithmetic", "https://arxiv.org/abs/2212.04089"),
    "ties": ("TIES", "https://arxiv.org/abs/2306.01708"),
    "dare_ties": ("DARE TIES", "https://arxiv.org/abs/2311.03099"),
    "dare_linear": ("Linear DARE", "https://arxiv.org/abs/2311.03099"),
    "breadcrumbs": ("Model Breadcrumbs", "https://arxiv.org/abs/2312.06795"),
    "breadcrumbs_ties": ("Model Breadcrumbs with TIES", "https://arxiv.org/abs/2312.06795"),
    "della": ("DELLA", "https://arxiv.org/abs/2406.11617"),
    "della_linear": ("Linear DELLA", "https://arxiv.org/abs/2406.11617"),
    "model_stock": ("Model Stock", "https://arxiv.org/abs/2403.19522"),
    "sce": ("SCE", "https://arxiv.org/abs/2408.07990"),
    "slerp": ("SLERP", "https://en.wikipedia.org/wiki/Slerp"),
    "nuslerp": ("NuSLERP", None),
    "multislerp": ("Multi-SLERP", None),
    "karcher": ("Karcher Mean", None),
    "nearswap": ("NearSwap", None),
    "passthrough": ("Passthrough", None),
    "arcee_fusion": ("Arcee Fusion", None),
    "ram": ("Reinforced Agent Merging", None),
    "ramplus_tl": ("Reinforced Agent Merging Plus (Tensor-Local)", None),
    # raymerge's own (not in mergekit 0.1.5)
    "zipit": ("ZipIt!", "https://arxiv.org/abs/2305.03053"),
    "permute": ("Permute (activation matching)", "https://arxiv.org/abs/2305.03053"),
    "regmean": ("RegMean", "https://arxiv.org/abs/2212.09849"),
}
DTYPE_NAMES = {CONFIG_DTYPE_ALIASES[n]: n for n in ("bfloat16", "float16", "float32", "float64")}

# huggingface_hub's cache: <cache>/models--OWNER--NAME/snapshots/<commit>/
_CACHE_SNAPSHOT = re.compile(r"(?:^|/)models--([^/]+)/snapshots/([0-9a-f]{40})(?:/|$)")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_COMMIT = re.compile(r"[0-9a-f]{40}")
# `huggingface-cli download --local-dir DIR` leaves DIR/.cache/huggingface/download/
# <file>.metadata: the commit on its first line
_DOWNLOAD_METADATA = ".cache/huggingface/download"
MAX_METADATA_BYTES = 4096


@dataclass(frozen=True)
class Origin:
    """Where an input's files came from, as far as the files themselves say."""

    hub_id: str | None  # a Hugging Face repository id, when known
    revision: str | None  # the commit the files are from, when known
    location: str  # the folder, file or URI the files were read from


def input_origin(path: str, given: str) -> Origin:
    """An input's Hub id and revision, from its path (a Hugging Face cache snapshot) or the
    metadata a `--local-dir` download leaves; neither guessed from a name alone."""
    if uri_scheme(path) == "hf":  # read in place from the Hub at a pinned commit
        from raymerge.storage import hub

        ref = hub.parse_uri(path)
        return Origin(ref.repo, ref.revision if hub.is_commit(ref.revision) else None, path)
    if uri_scheme(path) is not None:
        return Origin(None, None, path)
    real = os.path.realpath(path)
    for candidate in (path, real):
        match = _CACHE_SNAPSHOT.search(candidate)
        if match:
            return Origin(match.group(1).replace("--", "/"), match.group(2), path)
    folder = real if os.path.isdir(real) else os.path.dirname(real)
    revision = _download_revision(folder)
    hub_id = given if revision and _HUB_ID.fullmatch(given) else None
    return Origin(hub_id, revision, path)


def _download_revision(folder: str) -> str | None:
    metadata = os.path.join(folder, _DOWNLOAD_METADATA)
    try:
        names = sorted(n for n in os.listdir(metadata) if n.endswith(".metadata"))
    except OSError:
        return None
    preferred = [n for n in names if n == "config.json.metadata"] + names
    for name in preferred[:8]:
        try:
            with open(os.path.join(metadata, name), "rb") as f:
                first = f.read(MAX_METADATA_BYTES).split(b"\n", 1)[0].strip()
        except OSError:
            continue
        text = first.decode("ascii", "replace")
        if _COMMIT.fullmatch(text):
            return text
    return None


# --- the normalized config ---------------------------------------------------------------


def config_data(spec: MergeSpec) -> dict:
    """The spec as a mergekit-style config that `parse_spec` reads back to the same spec:
    resolved model paths, every default and override written out."""

    def path(index: int) -> str:
        return config_ref(spec.inputs[index].path)  # a LoRA input as MODEL+ADAPTER

    def source(s: SliceSource, layers: bool) -> dict:
        entry: dict = {"model": path(s.input)}
        if layers and s.layer_range is not None:
            entry["layer_range"] = list(s.layer_range)
        if s.parameters:
            entry["parameters"] = s.parameters
        return entry

    def slice_base(sl: OutputSlice) -> int | None:
        return None if sl.base is None else sl.sources[sl.base].input

    data: dict = {"merge_method": spec.method.name}
    if spec.base_input is not None:
        data["base_model"] = path(spec.base_input)
    if spec.uses_slices:
        slices = []
        for sl in spec.slices:
            entry: dict = {"sources": [source(s, True) for s in sl.sources]}
            if slice_base(sl) is not None and slice_base(sl) != spec.base_input:
                entry["base_model"] = path(slice_base(sl))
            if sl.parameters:
                entry["parameters"] = sl.parameters
            slices.append(entry)
        data["slices"] = slices
    else:
        (only,) = spec.slices
        # the base, when the config did not list it, is added again by the parser
        data["models"] = [source(s, False) for s in only.sources if s.yaml_path != "base_model"]
    if spec.parameters:
        data["parameters"] = spec.parameters
    if spec.out_dtype is not None:
        data["out_dtype"] = DTYPE_NAMES.get(spec.out_dtype, spec.out_dtype)
    default_tokenizer = spec.base_input if spec.base_input is not None else 0
    if spec.vocab is not None:
        data.update(_tokenizer_data(spec, path))
    elif spec.resize_vocab:
        data["tokenizer_source"] = "base"
    elif spec.tokenizer_source is not None and spec.tokenizer_source != default_tokenizer:
        data["tokenizer_source"] = path(spec.tokenizer_source)
    data["raymerge"] = {
        "seed": spec.seed, "shard_size": spec.shard_size, "part_size": spec.part_size,
    }  # fmt: skip
    return data


def _tokenizer_data(spec: MergeSpec, path) -> dict:
    """`tokenizer_source: union`, or mergekit's `tokenizer:` block, for a vocabulary
    matched by token string."""
    vocab = spec.vocab
    assert vocab is not None
    source = path(vocab.input) if vocab.source == "model" else vocab.source
    if source == "union" and not vocab.tokens and vocab.pad_to_multiple_of is None:
        return {"tokenizer_source": "union"}
    block: dict = {"source": source}
    if vocab.tokens:
        tokens = {}
        for t in vocab.tokens:
            if t.kind == "zero":
                entry: dict = {"source": {"kind": "zero"}}
            elif t.kind == "model":
                entry = {"source": path(t.input)}
            else:
                which = {"token": t.source_token} if t.source_id is None else {
                    "token_id": t.source_id}  # fmt: skip
                entry = {"source": {"kind": "model_token", "model": path(t.input), **which}}
            if t.force:
                entry["force"] = True
            tokens[t.token] = entry
        block["tokens"] = tokens
    if vocab.pad_to_multiple_of is not None:
        block["pad_to_multiple_of"] = vocab.pad_to_multiple_of
    return {"tokenizer": block}


class _Dumper(yaml.SafeDumper):
    """Block style, as mergekit configs are written; a list of plain values on one line
    (`layer_range: [0, 16]`, a gradient)."""


def _represent_list(dumper: yaml.SafeDumper, value: list) -> yaml.Node:
    flat = all(not isinstance(v, list | dict) for v in value)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=flat)


_Dumper.add_representer(list, _represent_list)


def config_yaml(spec: MergeSpec) -> str:
    """raymerge_config.yml: the normalized config, with a comment saying what it is."""
    body = yaml.dump(
        config_data(spec), Dumper=_Dumper, sort_keys=False, default_flow_style=False,
        allow_unicode=True, width=100,
    )  # fmt: skip
    return (
        "# The merge as raymerge ran it: model paths resolved, defaults and command-line\n"
        "# overrides written out. `raymerge run raymerge_config.yml OUT` repeats it.\n" + body
    )


# --- the model card ------------------------------------------------------------------------


def method_md(name: str) -> str:
    pretty, url = METHOD_NAMES.get(name, (name, None))
    return f"[{pretty}]({url})" if url else pretty


def _code(text: str) -> str:
    return "`" + text.replace("`", "'").replace("\n", " ") + "`"


def _name_md(given: str, origin: Origin) -> str:
    if origin.hub_id:
        return f"[{origin.hub_id}](https://huggingface.co/{origin.hub_id})"
    return _code(given)


def _parts(given: str, path: str) -> list[tuple[str, str]]:
    """(as given, path) of an input, or of its model and its LoRA adapter."""
    if not is_lora(path):
        return [(given, path)]
    paths = parse_uri(path)
    if is_lora(given):
        named = list(parse_uri(given))
    else:
        named = given.split("+") if given.count("+") == 1 else list(paths)
    return list(zip(named, paths))


def _names_md(parts: list[tuple[str, str]], origins: list[Origin]) -> str:
    """An input's name; `model + adapter` for a LoRA input."""
    return " + ".join(_name_md(given, origin) for (given, _), origin in zip(parts, origins))


def _source_md(given: str, origin: Origin, nbytes: int | None) -> str:
    """Where an input's files came from: its revision where known, else its location."""
    facts = []
    if origin.hub_id and given != origin.hub_id:
        facts.append(f"given as {_code(given)}")
    if origin.revision:
        facts.append(f"revision {_code(origin.revision)}")
    else:
        where = "read from" if uri_scheme(origin.location) else "local files"
        at = "" if origin.location == given else f" at {_code(origin.location)}"
        facts.append(f"{where}{at}, no revision recorded")
    if nbytes is not None:
        facts.append(_gb(nbytes))
    return "; ".join(facts)


def model_card(
    spec: MergeSpec, plan: Plan, checkpoints: list[Checkpoint] | None = None,
    name: str | None = None,
) -> str:  # fmt: skip
    """README.md for the output: Hub front matter, the method, the inputs (with revisions
    where known) and the normalized config. `checkpoints` (the opened inputs) add each
    input's size."""
    parts = [_parts(m.given, m.path) for m in spec.inputs]
    origins = [[input_origin(path, given) for given, path in p] for p in parts]
    hub_ids = list(dict.fromkeys(o.hub_id for each in origins for o in each if o.hub_id))
    front = yaml.safe_dump(
        {"base_model": hub_ids, "tags": ["merge", "raymerge"], "library_name": "transformers"},
        sort_keys=False,
    )  # fmt: skip
    base = spec.base_input if spec.method.base != "ignored" else None
    base_text = ""
    if base is not None:
        base_text = f" using {_names_md(parts[base], origins[base])} as a base"
    models = []
    for index in range(len(spec.inputs)):
        nbytes = checkpoints[index].total_bytes if checkpoints is not None else None
        role = " (base)" if index == base else ""
        facts = [
            _source_md(given, origin, nbytes if i == 0 else None)  # the adapter's size: none
            for i, ((given, _), origin) in enumerate(zip(parts[index], origins[index]))
        ]
        models.append(
            f"* {_names_md(parts[index], origins[index])}{role}: {'; adapter: '.join(facts)}"
        )
    dtypes = sorted({DTYPE_NAMES.get(t.dtype, t.dtype) for t in plan.tensors})
    return f"""---
{front.rstrip()}
---
# {name or "Untitled Model (1)"}

This is a merge of pre-trained language models created with raymerge from a
[mergekit](https://github.com/arcee-ai/mergekit) config.

## Merge Details
### Merge Method

This model was merged using the {method_md(spec.method.name)} merge method{base_text}.

### Models Merged

The following models were included in the merge:
{chr(10).join(models)}

### Output

{len(plan.tensors)} tensors ({", ".join(dtypes)}) in {len(plan.shards)} safetensors shard(s).
`tensors.parquet` holds every tensor's CRC-32; `raymerge verify` rechecks them. Merge
digest: `{plan.digest}`.

### Configuration

The following YAML configuration was used to produce this model (also in `{CONFIG_FILE}`):

```yaml
{config_yaml(spec).rstrip()}
```
"""


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 10**8 else f"{nbytes / 1e6:.2f} MB"
