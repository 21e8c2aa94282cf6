"""ZipIt on tiny Llamas: merge two byte-level models trained on different domains.

    .venv/bin/python benchmarks/zipit_tiny.py [--work DIR] [--steps N] [--methods ...]

A small version of the experiment of ZipIt! (Stoica et al., ICLR 2024): two models of the
same architecture but different random inits are trained on disjoint tasks, here byte-level
next-token prediction on two text domains found on this machine:

  code   Python's standard library source (sysconfig's stdlib, *.py, site-packages left out)
  prose  English documentation text (Node.js's API docs in /usr/share/doc/nodejs/api/*.md
         with their code blocks and HTML comments taken out; failing that, the license texts
         of /usr/share/common-licenses and /usr/share/doc/*/copyright, duplicates dropped)

Every 10th file (sorted order) of each corpus is held out. Model A learns code, model B
prose (the same LlamaConfig, different init seeds). Both are merged by `raymerge run` with
each method asked for (linear weight averaging, permute, zipit, zipit + regmean; a method
whose merge fails is reported as failed), with calibration tokens drawn from both domains'
training splits. Reports the held-out loss (nats per byte) of A, B, each merge and the
output-averaging ensemble on both domains, and the wall time of each merge, in
results-zipit-tiny.json and results-zipit-tiny.md beside this script.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_merge import RAYMERGE, ROOT  # noqa: E402

ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}
METHODS = ["linear", "permute", "zipit", "zipit_regmean"]
LABELS = {
    "linear": "weight average (linear)",
    "permute": "permute",
    "zipit": "zipit",
    "zipit_regmean": "zipit + regmean",
}
DOMAINS = ["code", "prose"]
HOLD_OUT_EVERY = 10  # file i is held out when i % 10 == 9
MODEL = {  # the LlamaConfig of both models
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
}
NODE_DOCS = "/usr/share/doc/nodejs/api"


# ---------------------------------------------------------------- corpora


def code_files() -> tuple[list[str], str]:
    stdlib = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "__pycache__"}
    paths = []
    for folder, dirs, files in os.walk(stdlib):
        dirs[:] = [d for d in dirs if d not in skip]
        paths += [os.path.join(folder, f) for f in files if f.endswith(".py")]
    return sorted(paths), f"{stdlib}/**/*.py (site-packages left out)"


def clean_markdown(text: bytes) -> bytes:
    """Prose of a Markdown file: no fenced code blocks, no HTML comments."""
    text = re.sub(rb"```.*?```", b"", text, flags=re.S)
    text = re.sub(rb"<!--.*?-->", b"", text, flags=re.S)
    return re.sub(rb"\n{3,}", b"\n\n", text)


def prose_texts() -> tuple[list[tuple[str, bytes]], str]:
    docs = sorted(glob.glob(os.path.join(NODE_DOCS, "*.md")))
    if sum(os.path.getsize(p) for p in docs) > 1_000_000:
        texts = [(p, clean_markdown(_read(p))) for p in docs]
        return texts, f"{NODE_DOCS}/*.md (Node.js API docs; fenced code and HTML comments cut)"
    paths = sorted(glob.glob("/usr/share/common-licenses/*"))
    paths += sorted(glob.glob("/usr/share/doc/*/copyright"))
    texts, seen = [], set()
    for path in paths:
        if os.path.isfile(path):
            body = _read(path)
            digest = hashlib.sha256(body).digest()
            if digest not in seen:
                seen.add(digest)
                texts.append((path, body))
    where = "/usr/share/common-licenses/* + /usr/share/doc/*/copyright (duplicates dropped)"
    return texts, where


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def split(texts: list[tuple[str, bytes]]) -> dict:
    """Train and held-out byte streams (files joined by a blank line)."""
    parts: dict[str, list[bytes]] = {"train": [], "held": []}
    for i, (_, body) in enumerate(texts):
        parts["held" if i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1 else "train"].append(body)
    out = {k: np.frombuffer(b"\n\n".join(v), dtype=np.uint8) for k, v in parts.items()}
    out["files"] = len(texts)
    out["held_files"] = len(parts["held"])
    return out


def corpora() -> dict:
    paths, code_where = code_files()
    prose, prose_where = prose_texts()
    found = {}
    for name, texts, where in (
        ("code", [(p, _read(p)) for p in paths], code_where),
        ("prose", prose, prose_where),
    ):
        data = split(texts)
        digest = hashlib.sha256(data["train"].tobytes()).hexdigest()[:16]
        found[name] = {**data, "where": where, "train_sha256": digest}
    return found


def windows(stream: np.ndarray, count: int, length: int, rng: np.random.Generator):
    starts = rng.integers(0, len(stream) - length, size=count)
    return np.stack([stream[s : s + length] for s in starts]).astype(np.int64)


# ---------------------------------------------------------------- training


def settings(args, name: str, seed: int, corpus: dict) -> dict:
    return {
        "model": MODEL,
        "domain": name,
        "init_seed": seed,
        "data_seed": args.data_seed,
        "steps": args.steps,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "lr": args.lr,
        "weight_decay": 0.1,
        "warmup": args.warmup,
        "train_bytes": int(len(corpus["train"])),
        "train_sha256": corpus["train_sha256"],
    }


def train(folder: str, name: str, seed: int, corpus: dict, args) -> dict:
    """Train (or reuse) one model; returns its settings with the training time."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    wanted = settings(args, name, seed, corpus)
    meta = os.path.join(folder, "train_settings.json")
    if not args.retrain and os.path.exists(os.path.join(folder, "config.json")):
        if os.path.exists(meta):
            with open(meta) as f:
                saved = json.load(f)
            if saved.get("settings") == wanted:
                print(f"{name}: reusing {folder} (trained in {saved['seconds']:.0f} s wall)")
                return saved
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**MODEL))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        done = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = np.random.default_rng(args.data_seed)
    started, cpu_started = time.perf_counter(), time.process_time()
    losses = []
    for step in range(args.steps):
        batch = torch.from_numpy(windows(corpus["train"], args.batch, args.seq_len + 1, rng))
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == args.steps - 1:
            print(
                f"{name}: step {step + 1}/{args.steps} loss {loss.item():.3f} "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder, safe_serialization=True)
    saved = {
        "settings": wanted,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "load_average_after": os.getloadavg()[0],  # the machine may be shared
        "final_train_loss": float(np.mean(losses[-20:])),
    }
    with open(meta, "w") as f:
        json.dump(saved, f, indent=2)
    return saved


# ---------------------------------------------------------------- merging


def merge_configs(a: str, b: str, calibration: str, args) -> dict[str, dict]:
    pair = [{"model": a}, {"model": b}]
    matched = {
        "calibration": calibration,
        "calibration_tokens": args.calibration_tokens,
        "residual": args.residual,
        "match": args.match.split(","),
    }
    zipit = {**matched, "alpha": args.alpha, "beta": args.beta}
    return {
        "linear": {
            "merge_method": "linear",
            "models": [{"model": m, "parameters": {"weight": 0.5}} for m in (a, b)],
            "dtype": "float32",
        },
        "permute": {
            "merge_method": "permute",
            "models": pair,
            "parameters": matched,
            "dtype": "float32",
        },
        "zipit": {"merge_method": "zipit", "models": pair, "parameters": zipit, "dtype": "float32"},
        "zipit_regmean": {
            "merge_method": "zipit",
            "models": pair,
            "parameters": {**zipit, "combine": "regmean"},
            "dtype": "float32",
        },
    }


def run_merge(method: str, body: dict, work: str) -> dict:
    import yaml

    config = os.path.join(work, "configs", f"{method}.yaml")
    out = os.path.join(work, "merged", method)
    os.makedirs(os.path.dirname(config), exist_ok=True)
    with open(config, "w") as f:
        yaml.safe_dump(body, f, sort_keys=False)
    command = RAYMERGE.split() + ["run", config, out, "--workers", "1", "--force", "--no-progress"]
    ray_tmp = tempfile.mkdtemp(prefix="rzt-", dir="/tmp")  # short: Ray's socket paths
    env = {**os.environ, **ENV, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    print(f"merge {method}: {shlex.join(command)}", flush=True)
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    finally:
        seconds = time.perf_counter() - started
        time.sleep(1.0)  # the run's Ray processes leave with their driver
        shutil.rmtree(ray_tmp, ignore_errors=True)
    row = {"config": config, "out": out, "seconds": seconds, "returncode": done.returncode}
    if done.returncode != 0 or not os.path.exists(os.path.join(out, "config.json")):
        tail = (done.stdout[-1500:] + "\n" + done.stderr[-3000:]).strip()
        print(f"merge {method} FAILED (exit {done.returncode}) after {seconds:.1f} s:\n{tail}")
        row.update(ok=False, error=tail[-2000:])
    else:
        print(f"merge {method}: {seconds:.1f} s", flush=True)
        row["ok"] = True
    return row


# ---------------------------------------------------------------- evaluation


def log_probs(model, batch) -> object:
    import torch

    with torch.no_grad():
        logits = model(input_ids=batch[:, :-1]).logits.float()
    return torch.log_softmax(logits, dim=-1)


def nll(logp, batch) -> float:
    return -logp.gather(-1, batch[:, 1:, None]).mean().item()


def load(folder: str):
    import torch
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def evaluate(folders: dict[str, str], held: dict) -> dict[str, dict[str, float]]:
    """Held-out loss per model and domain, plus the ensemble of the first two (A and B)."""
    import torch

    scores: dict[str, dict[str, float]] = {}
    ensemble_logp: dict[str, list] = {d: [] for d in DOMAINS}
    for i, (name, folder) in enumerate(folders.items()):
        model = load(folder)
        scores[name] = {}
        for domain in DOMAINS:
            batch = torch.from_numpy(held[domain])
            logp = torch.cat([log_probs(model, chunk) for chunk in batch.split(16)])
            scores[name][domain] = nll(logp, batch)
            if i < 2:
                ensemble_logp[domain].append(logp)
        del model
    scores["ensemble"] = {}
    for domain in DOMAINS:
        batch = torch.from_numpy(held[domain])
        mixed = torch.logsumexp(torch.stack(ensemble_logp[domain]), dim=0) - math.log(2)
        scores["ensemble"][domain] = nll(mixed, batch)
    for row in scores.values():
        row["mean"] = sum(row[d] for d in DOMAINS) / len(DOMAINS)
    return scores


# ---------------------------------------------------------------- report


def table(scores: dict, merges: dict, methods: list[str]) -> str:
    lines = [
        "| model | code loss | prose loss | mean | merge s |",
        "|---|---|---|---|---|",
    ]

    def row(label: str, key: str, seconds: str = "") -> None:
        s = scores[key]
        lines.append(
            f"| {label} | {s['code']:.3f} | {s['prose']:.3f} | {s['mean']:.3f} | {seconds} |"
        )

    row("model A (code)", "A")
    row("model B (prose)", "B")
    for method in methods:
        merge = merges[method]
        if merge["ok"]:
            row(LABELS[method], method, f"{merge['seconds']:.1f}")
        else:
            lines.append(
                f"| {LABELS[method]} | failed | failed | failed | "
                f"{merge['seconds']:.1f} (exit {merge['returncode']}) |"
            )
    row("ensemble (mean of A and B probabilities)", "ensemble")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "zipit-tiny"))
    parser.add_argument("--steps", type=int, default=650, help="training steps per model")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--beta", type=float, default=0.125)
    parser.add_argument("--calibration-tokens", type=int, default=32768)
    parser.add_argument("--residual", default="permute", choices=("permute", "average"))
    parser.add_argument("--match", default="mlp,attention", help="comma-separated: mlp, attention")
    parser.add_argument("--eval-seqs", type=int, default=64, help="held-out sequences a domain")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--json", default=os.path.join(HERE, "results-zipit-tiny.json"))
    parser.add_argument("--md", default=os.path.join(HERE, "results-zipit-tiny.md"))
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {METHODS}")
    os.environ.update(ENV)

    import torch

    torch.set_num_threads(args.threads)
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    data = corpora()
    for name in DOMAINS:
        c = data[name]
        print(
            f"{name}: {c['where']}: {c['files']} files, {len(c['train'])} train bytes, "
            f"{len(c['held'])} held-out bytes ({c['held_files']} files)",
            flush=True,
        )

    folders = {"A": os.path.join(work, "model_a"), "B": os.path.join(work, "model_b")}
    trained = {
        "A": train(folders["A"], "code", 1, data["code"], args),
        "B": train(folders["B"], "prose", 2, data["prose"], args),
    }

    # calibration: windows of seq_len tokens from both training splits, code and prose taking
    # turns, so that any prefix holds both domains in equal amounts
    rng = np.random.default_rng(12345)
    per_domain = max(1, args.calibration_tokens // (2 * args.seq_len))
    chunks = [windows(data[d]["train"], per_domain, args.seq_len, rng) for d in DOMAINS]
    calibration = np.stack(chunks, axis=1).reshape(-1)
    calibration_path = os.path.join(work, "calibration.npy")
    np.save(calibration_path, calibration)
    print(f"calibration: {len(calibration)} tokens in {calibration_path}")

    bodies = merge_configs(folders["A"], folders["B"], calibration_path, args)
    merges = {m: run_merge(m, bodies[m], work) for m in methods}

    rng = np.random.default_rng(777)
    held = {d: windows(data[d]["held"], args.eval_seqs, args.seq_len + 1, rng) for d in DOMAINS}
    to_score = dict(folders)
    to_score.update({m: merges[m]["out"] for m in methods if merges[m]["ok"]})
    scores = evaluate(to_score, held)

    text = table(scores, merges, methods)
    command = shlex.join([os.path.relpath(sys.executable, ROOT), *sys.argv])
    print()
    print(text)
    results = {
        "command": command,
        "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads",
        "work": work,
        "corpora": {
            d: {
                "where": data[d]["where"],
                "files": data[d]["files"],
                "held_out_files": data[d]["held_files"],
                "train_bytes": int(len(data[d]["train"])),
                "held_out_bytes": int(len(data[d]["held"])),
            }
            for d in DOMAINS
        },
        "training": trained,
        "calibration": {"path": calibration_path, "tokens": int(len(calibration))},
        "eval": {"sequences_per_domain": args.eval_seqs, "predicted_per_seq": args.seq_len},
        "merges": merges,
        "loss_nats_per_byte": scores,
    }
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    with open(args.md, "w") as f:
        f.write(report(results, text, args))
    print(f"\nwrote {args.json} and {args.md}")


def report(results: dict, text: str, args) -> str:
    lines = [
        "# ZipIt on tiny Llamas (byte-level, code vs prose)",
        "",
        f"`{results['command']}` ({results['machine']})",
        "",
        "Held-out next-byte loss, nats per byte (lower is better); "
        f"{args.eval_seqs} sequences of {args.seq_len} predicted bytes a domain.",
        "",
        text,
        "",
        "## Corpora (every 10th file, sorted order, held out)",
        "",
    ]
    for d, c in results["corpora"].items():
        lines.append(
            f"- {d}: {c['where']}: {c['files']} files, {c['train_bytes']:,} train bytes, "
            f"{c['held_out_bytes']:,} held-out bytes ({c['held_out_files']} files)"
        )
    s = next(iter(results["training"].values()))["settings"]
    lines += [
        "",
        "## Training",
        "",
        f"- LlamaForCausalLM {json.dumps(s['model'])}",
        f"- {s['steps']} steps of AdamW (lr {s['lr']}, {s['warmup']} warmup steps, cosine to "
        f"10%, weight decay {s['weight_decay']}, clip 1.0), batch {s['batch']} x "
        f"{s['seq_len']} bytes, data seed {s['data_seed']}",
    ]
    for key, t in results["training"].items():
        lines.append(
            f"- model {key} ({t['settings']['domain']}, init seed {t['settings']['init_seed']}):"
            f" {t['seconds']:.0f} s wall, {t['cpu_seconds']:.0f} s CPU (all threads), 1-min load"
            f" average at the end {t['load_average_after']:.1f}, final train loss"
            f" {t['final_train_loss']:.3f}"
        )
    lines += [
        "",
        f"Calibration: {results['calibration']['tokens']} tokens from both training splits "
        "(equal amounts, alternating windows).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
