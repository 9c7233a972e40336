"""A client's training on one GPU: throughput and MFU against a hand-written PEFT loop, and a round's overhead.

Two model shapes with random weights (Llama-3-8B and Llama-3.2-1B), bf16 base, LoRA r = 16 on q, k, v
and o, batch 2 × 2048 tokens, sdpa attention; each shape is trained twice in the same process on the
same batches:

- plain: `get_peft_model` on a model built with transformers, AdamW over the adapter, bf16 autocast,
  gradient clipping at 1.0 (the ceiling: the same arithmetic with nothing of fedtune around it);
- fedtune: the client's own path, `build_model(spec, tokenizer)` then `train(model, batches, ...)`, run
  inside one client round on a local store: read and check the global, load it into the model, train,
  take the delta, encode it, upload it and commit the signed update marker (the held-out evaluation a
  client runs before training is left out: its cost is set by `training.evalBatches`).

Throughput is tokens per second over the timed steps, after untimed warm-up steps (for fedtune, a whole
warm-up round). MFU is that throughput times the FLOPs of a token over the GPU's peak dense bf16 FLOPs,
with FLOPs per token = 4·N_base + 6·N_adapter: a frozen base costs 2·N_base forward and 2·N_base
backward (gradients of its activations, none of its weights), the adapter 6·N_adapter. N_base counts
the matmul weights (attention, MLP, LM head; not the embedding lookup); the attention scores (QKᵀ and
AV) are not counted, so the MFU is a lower bound. Peak memory is torch.cuda.max_memory_allocated from
just before the first step. A round's overhead is (round − training) / round.

Without a GPU it writes bench/results/gpu.md saying so and exits 0; `--cpu-smoke` runs the whole code
path on a tiny config for a few steps (on the CPU, or the GPU where there is one) so it is exercised
everywhere.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.__main__ import machine

RESULTS = Path(__file__).parent / "results" / "gpu.md"
PEAK_ENV = "FEDTUNE_GPU_PEAK_TFLOPS"
# Peak dense bf16 tensor-core TFLOPs by device name (first match wins: "H100 PCIe" before "H100").
PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0))
TARGET_MFU, TARGET_RATIO, TARGET_OVERHEAD = 0.45, 0.97, 0.02

_LLAMA3 = {"num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256}
SHAPES: dict[str, dict[str, Any]] = {
    "Llama-3-8B": {
        **_LLAMA3,
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "intermediate_size": 14336,
        "tie_word_embeddings": False,
    },
    "Llama-3.2-1B": {
        **_LLAMA3,
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "intermediate_size": 8192,
        "tie_word_embeddings": True,
    },
}
SMOKE_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 256,
        "tie_word_embeddings": False,
    },
}


@dataclass(frozen=True)
class Setup:
    """What both sides train with."""

    batch: int
    seq: int
    warmup: int
    steps: int
    rank: int = 16
    alpha: int = 32
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    learning_rate: float = 2e-4
    max_grad_norm: float = 1.0

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq


GPU_SETUP = Setup(batch=2, seq=2048, warmup=3, steps=50)
SMOKE_SETUP = Setup(batch=2, seq=32, warmup=1, steps=2)

Batch = dict[str, torch.Tensor]


# --- arithmetic ------------------------------------------------------------------------------------


def base_matmul_params(cfg: dict[str, Any]) -> int:
    """Weights a token is multiplied by: q, k, v, o and the MLP of every layer, and the LM head."""
    h, i = int(cfg["hidden_size"]), int(cfg["intermediate_size"])
    kv = int(cfg["num_key_value_heads"]) * (h // int(cfg["num_attention_heads"]))
    return int(cfg["num_hidden_layers"]) * (2 * h * h + 2 * h * kv + 3 * h * i) + int(cfg["vocab_size"]) * h


def count(n: float) -> str:
    """n in G, M or k, for the notes."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:g}"


def flops_per_token(n_base: int, n_adapter: int) -> int:
    """The 4N rule for a frozen base, plus 6N for the trained adapter."""
    return 4 * n_base + 6 * n_adapter


def peak_flops(device_name: str) -> float | None:
    """The device's peak dense bf16 FLOP/s: FEDTUNE_GPU_PEAK_TFLOPS if set, else by name; None if unknown."""
    override = os.environ.get(PEAK_ENV)
    if override:
        return float(override) * 1e12
    for key, tflops in PEAK_TFLOPS:
        if key in device_name:
            return tflops * 1e12
    return None


# --- measuring -------------------------------------------------------------------------------------


def run_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(dev: torch.device) -> float:
    """perf_counter once the device has finished what was queued."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter()


def reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def peak_bytes(dev: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None


def release(dev: torch.device) -> None:
    """Free the model a side left (once its function returned), so the next side's peak memory is its own."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def random_batches(cfg: dict[str, Any], setup: Setup, seed: int = 0) -> list[Batch]:
    """warmup + steps batches of random tokens, full length (no padding); both sides get these."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(setup.warmup + setup.steps):
        ids = torch.randint(0, cfg["vocab_size"], (setup.batch, setup.seq), generator=gen)
        out.append({"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)})
    return out


@dataclass
class Side:
    """One side's training of one shape."""

    tokens_per_s: float
    peak_bytes: int | None
    adapter_params: int
    attention: str
    round_seconds: float | None = None  # fedtune only: the timed round, training included
    train_seconds: float | None = None

    @property
    def overhead(self) -> float | None:
        """Share of the round spent outside training."""
        if self.round_seconds is None or self.train_seconds is None:
            return None
        return (self.round_seconds - self.train_seconds) / self.round_seconds


def adapter_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def plain(cfg: dict[str, Any], setup: Setup, batches: list[Batch], dev: torch.device) -> Side:
    """The baseline: a minimal PEFT loop, no fedtune code."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    config = AutoConfig.for_model("llama", **cfg)
    with dev:
        base = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
            config, dtype=dtype, attn_implementation="sdpa"
        )
    lora = LoraConfig(r=setup.rank, lora_alpha=setup.alpha, target_modules=list(setup.targets), task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=setup.learning_rate)
    model.train()

    def step(batch: Batch) -> torch.Tensor:
        batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss: torch.Tensor = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, setup.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    reset_peak(dev)
    for batch in batches[: setup.warmup]:
        step(batch)
    t0 = sync(dev)
    losses = [step(batch) for batch in batches[setup.warmup :]]
    seconds = sync(dev) - t0
    assert all(math.isfinite(float(x)) for x in losses)
    return Side(
        tokens_per_s=setup.tokens_per_step * setup.steps / seconds,
        peak_bytes=peak_bytes(dev),
        adapter_params=adapter_params(model),
        attention=str(model.config._attn_implementation),
    )


CLIENT, RUN = "bench", "bench-gpu"


class ClientRound:
    """One client's rounds on a local store, as the client runs them (without the held-out evaluation)."""

    def __init__(self, model: Any, dtype: str, folder: Path) -> None:
        from fedtune.federation.records import Ledger
        from fedtune.federation.signing import AGGREGATOR, Signer, Trust, client_party, encode_public, generate
        from fedtune.storage import open_store
        from fedtune.training.model import trainable_keys

        store = open_store(str(folder))
        coordinator, own = generate(), generate()
        trust = Trust(RUN, encode_public(coordinator.public_key()), {CLIENT: encode_public(own.public_key())})
        self.coordinator = Ledger(store, trust, Signer(RUN, AGGREGATOR, coordinator))
        self.ledger = Ledger(store, trust, Signer(RUN, client_party(CLIENT), own))
        self.model, self.dtype, self.trainable = model, dtype, trainable_keys(model)

    def run(self, r: int, batches: Iterable[Batch], setup: Setup, dev: torch.device) -> tuple[float, float]:
        """Publish the model's adapter as round r's global, then run the client's round on it: (round, training)
        seconds."""
        from fedtune.aggregation.encoding import encode, load_state, save_state
        from fedtune.federation import protocol as p
        from fedtune.training.model import adapter_state, base_dtype, load_adapter
        from fedtune.training.trainer import Options, autocast_dtype, train

        published = save_state(adapter_state(self.model))
        global_sha = p.sha256(published)
        self.coordinator.put_data(p.global_data(r, global_sha), published)

        t0 = sync(dev)
        state = load_state(self.ledger.data(p.global_data(r, global_sha), global_sha))
        load_adapter(self.model, state)
        t1 = sync(dev)
        options = Options(
            rate=lambda _: setup.learning_rate,
            max_grad_norm=setup.max_grad_norm,
            autocast=autocast_dtype(base_dtype(self.dtype)),
        )
        trained = train(self.model, ([batch] for batch in batches), options)
        t2 = sync(dev)
        local = adapter_state(self.model)
        delta = {k: local[k].float() - state[k].float() for k in self.trainable}
        payload = encode(delta, "fp32")
        digest = p.sha256(payload)
        self.ledger.put_data(p.update_data(r, CLIENT, digest), payload)
        marker = p.UpdateMarker(
            client=CLIENT,
            round=r,
            sha256=digest,
            global_sha256=global_sha,
            examples=setup.batch * trained.steps,
            steps=trained.steps,
            encoding="fp32",
            bytes=len(payload),
            metrics=p.ClientMetrics(train_loss=trained.loss, seconds=time.perf_counter() - t0),
        )
        self.ledger.commit_own(p.update_marker(r, CLIENT), marker, p.UpdateMarker)
        t3 = sync(dev)
        return t3 - t0, t2 - t1


def fedtune_side(cfg: dict[str, Any], setup: Setup, batches: list[Batch], dev: torch.device, folder: Path) -> Side:
    """fedtune's client path: its model builder and trainer inside a client round."""
    from fedtune.api.spec import FederatedFineTuneSpec
    from fedtune.training.model import build_model
    from fedtune.training.tokenizer import byte_tokenizer

    spec = FederatedFineTuneSpec.model_validate(
        {
            "model": {"config": {"modelType": "llama", **cfg}, "dtype": "auto", "attention": "sdpa"},
            "peft": {"method": "lora", "r": setup.rank, "alpha": setup.alpha, "targetModules": list(setup.targets)},
            "training": {
                "batchSize": setup.batch,
                "maxLength": setup.seq,
                "localSteps": setup.steps,
                "learningRate": setup.learning_rate,
                "maxGradNorm": setup.max_grad_norm,
            },
            "clients": [{"name": CLIENT, "data": {"uri": "unused.jsonl"}}],
        }
    )
    model = build_model(spec, byte_tokenizer())
    client = ClientRound(model, spec.model.dtype, folder)
    reset_peak(dev)
    client.run(0, batches[: setup.warmup], setup, dev)
    round_s, train_s = client.run(1, batches[setup.warmup :], setup, dev)
    return Side(
        tokens_per_s=setup.tokens_per_step * setup.steps / train_s,
        peak_bytes=peak_bytes(dev),
        adapter_params=adapter_params(model),
        attention=str(model.config._attn_implementation),
        round_seconds=round_s,
        train_seconds=train_s,
    )


@dataclass
class Result:
    shape: str
    cfg: dict[str, Any]
    plain: Side
    fedtune: Side

    def flops_per_token(self, side: Side) -> int:
        return flops_per_token(base_matmul_params(self.cfg), side.adapter_params)

    def mfu(self, side: Side, peak: float | None) -> float | None:
        return side.tokens_per_s * self.flops_per_token(side) / peak if peak else None


def measure(shapes: dict[str, dict[str, Any]], setup: Setup, dev: torch.device) -> list[Result]:
    out = []
    for name, cfg in shapes.items():
        batches = random_batches(cfg, setup)
        print(f"bench.gpu: {name}: plain PEFT loop ...", flush=True)
        base = plain(cfg, setup, batches, dev)
        release(dev)
        print(f"  {base.tokens_per_s:.0f} tokens/s", flush=True)
        print(f"bench.gpu: {name}: fedtune ...", flush=True)
        with tempfile.TemporaryDirectory(prefix="fedtune-bench-gpu-") as tmp:
            ours = fedtune_side(cfg, setup, batches, dev, Path(tmp))
        release(dev)
        print(f"  {ours.tokens_per_s:.0f} tokens/s, round overhead {ours.overhead:.2%}", flush=True)
        out.append(Result(name, cfg, base, ours))
    return out


# --- the report ------------------------------------------------------------------------------------

MFU_ROW = "MFU (4·N_base + 6·N_adapter per token)"
OVERHEAD_ROW = "round overhead (load global, encode, upload)"
RULE = (
    "FLOPs per token = 4·N_base + 6·N_adapter: a frozen base costs 2·N_base forward and 2·N_base backward "
    "(gradients of its activations, none of its weights), the adapter 6·N_adapter. N_base counts the matmul "
    "weights (attention, MLP, LM head; not the embedding lookup); attention scores (QKᵀ, AV) are not counted, "
    "so MFU is a lower bound"
)


def versions() -> str:
    import peft
    import transformers

    cuda = f", CUDA {torch.version.cuda}" if torch.version.cuda else ""
    return f"torch {torch.__version__}{cuda}, transformers {transformers.__version__}, peft {peft.__version__}"


def describe(setup: Setup, shapes: dict[str, dict[str, Any]]) -> list[str]:
    """What is measured, the same whether or not it could be."""
    names = "; ".join(
        f"{n} (hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, {c['num_attention_heads']} heads, "
        f"{c['num_key_value_heads']} kv heads, intermediate {c['intermediate_size']}, vocab {c['vocab_size']}, "
        f"N_base {count(base_matmul_params(c))})"
        for n, c in shapes.items()
    )
    return [
        f"- Models, random weights: {names}.",
        f"- Both sides: bf16 base on a GPU (float32 on a CPU), LoRA r = {setup.rank}, alpha = {setup.alpha} on "
        f"{', '.join(setup.targets)} (float32 adapter), AdamW at {setup.learning_rate:g}, gradient clipping at "
        f"{setup.max_grad_norm:g}, batch {setup.batch} × {setup.seq} tokens of random ids (the same batches for "
        f"both), sdpa attention; untimed warm-up steps: {setup.warmup}, then timed steps: {setup.steps}.",
        "- plain PEFT loop (the baseline, same process): `get_peft_model` on a transformers model, AdamW, bf16 "
        "autocast, no fedtune code. fedtune: `build_model(spec, tokenizer)` and `train(model, batches, ...)` inside "
        "a client round on a local store (read and check the global, load it, train, take the delta, encode, "
        "upload, commit the signed marker; a warm-up round first). See the docstring of bench/gpu.py.",
        f"- MFU = tokens/s × FLOPs per token ÷ the GPU's peak dense bf16 FLOP/s, with {RULE}. Peak by device name "
        f"({', '.join(f'{k} {v:g}' for k, v in PEAK_TFLOPS)} TFLOP/s) or {PEAK_ENV}.",
        "- Peak memory: torch.cuda.max_memory_allocated from just before the first step. Round overhead: (one "
        "client round − its training) ÷ the round, the round being the timed steps.",
        f"- Targets: fedtune at least {TARGET_MFU:.0%} MFU, at least {TARGET_RATIO:.0%} of the plain loop's tokens/s, "
        f"round overhead at most {TARGET_OVERHEAD:.0%}.",
    ]


def header(note: str) -> list[str]:
    return [
        "# Training on a GPU",
        "",
        f"Written by `make bench-gpu` (`python -m bench.gpu{note}`) on {datetime.date.today()}.",
        "",
    ]


def cells(r: Result, peak: float | None) -> list[tuple[str, str, str, str, str]]:
    """(measure, plain, fedtune, fedtune ÷ plain, target and whether met) for one shape."""

    def met(ok: bool) -> str:
        return "met" if ok else "**not met**"

    def gib(side: Side) -> str:
        return f"{side.peak_bytes / 2**30:.1f} GiB" if side.peak_bytes is not None else "-"

    a, b = r.plain, r.fedtune
    ratio = b.tokens_per_s / a.tokens_per_s
    mfu_a, mfu_b = r.mfu(a, peak), r.mfu(b, peak)
    mem = f"{b.peak_bytes / a.peak_bytes:.2f}×" if a.peak_bytes and b.peak_bytes is not None else "-"
    overhead = b.overhead
    assert overhead is not None
    return [
        (
            "tokens/s",
            f"{a.tokens_per_s:.0f}",
            f"{b.tokens_per_s:.0f}",
            f"{ratio:.2f}×",
            f"≥ {TARGET_RATIO:.2f}×: {met(ratio >= TARGET_RATIO)}",
        ),
        (
            MFU_ROW,
            f"{mfu_a:.1%}" if mfu_a is not None else "-",
            f"{mfu_b:.1%}" if mfu_b is not None else "-",
            f"{mfu_b / mfu_a:.2f}×" if mfu_a and mfu_b is not None else "-",
            f"≥ {TARGET_MFU:.0%}: {met(mfu_b >= TARGET_MFU)}" if mfu_b is not None else f"≥ {TARGET_MFU:.0%}: -",
        ),
        ("peak memory", gib(a), gib(b), mem, ""),
        (
            OVERHEAD_ROW,
            "-",
            f"{overhead:.2%} of {b.round_seconds:.2f} s",
            "",
            f"≤ {TARGET_OVERHEAD:.0%}: {met(overhead <= TARGET_OVERHEAD)}",
        ),
    ]


def report(
    results: list[Result], setup: Setup, shapes: dict[str, dict[str, Any]], dev: torch.device, secs: float, note: str
) -> str:
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    peak = peak_flops(name) if dev.type == "cuda" or os.environ.get(PEAK_ENV) else None
    peak_text = f"{peak / 1e12:g} TFLOP/s peak dense bf16" if peak else "peak FLOP/s unknown (no MFU)"
    lines = header(note)
    lines += [
        f"- Device: {name}, {peak_text}; host {machine()}; {versions()}. Took {secs:.0f} s.",
        *describe(setup, shapes),
        "",
        "| model | measure | plain PEFT loop | fedtune | fedtune ÷ plain | target |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        for row in cells(r, peak):
            lines.append(f"| {r.shape} | " + " | ".join(row) + " |")
    lines += [
        "",
        "| model | N_base | N_adapter | FLOPs per token | attention (plain, fedtune) |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r.shape} | {base_matmul_params(r.cfg):,} | {r.fedtune.adapter_params:,} | "
            f"{count(r.flops_per_token(r.fedtune))} | {r.plain.attention}, {r.fedtune.attention} |"
        )
    return "\n".join(lines) + "\n"


def no_gpu_report() -> str:
    lines = header("")
    lines += [
        f"No CUDA device was available on this machine ({machine()}; {versions()}), so nothing was measured. "
        "On a GPU, `make bench-gpu` measures:",
        "",
        *describe(GPU_SETUP, SHAPES),
        "",
        "| model | measure | plain PEFT loop | fedtune | fedtune ÷ plain | target |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for shape in SHAPES:
        for row, plain_cell, target in (
            ("tokens/s", "not measured", f"≥ {TARGET_RATIO:.2f}×"),
            (MFU_ROW, "not measured", f"≥ {TARGET_MFU:.0%}"),
            ("peak memory", "not measured", ""),
            (OVERHEAD_ROW, "-", f"≤ {TARGET_OVERHEAD:.0%}"),
        ):
            lines.append(f"| {shape} | {row} | {plain_cell} | not measured | | {target} |")
    lines += ["", "`python -m bench.gpu --cpu-smoke` runs the same code on a tiny config for a few steps."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="a tiny config for a few steps, without needing a GPU")
    ap.add_argument("--steps", type=int, help="timed steps per side (and the timed round's local steps)")
    ap.add_argument("--warmup", type=int, help="untimed steps per side before them")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where the table is written")
    args = ap.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    dev = run_device()
    if dev.type != "cuda" and not args.cpu_smoke:
        args.out.write_text(no_gpu_report())
        print(f"bench.gpu: no CUDA device; wrote {args.out} (nothing measured)")
        return
    base, shapes = (SMOKE_SETUP, SMOKE_SHAPES) if args.cpu_smoke else (GPU_SETUP, SHAPES)
    setup = Setup(
        batch=base.batch,
        seq=base.seq,
        warmup=base.warmup if args.warmup is None else args.warmup,
        steps=base.steps if args.steps is None else args.steps,
    )
    t0 = time.monotonic()
    results = measure(shapes, setup, dev)
    note = " --cpu-smoke" if args.cpu_smoke else ""
    args.out.write_text(report(results, setup, shapes, dev, time.monotonic() - t0, note))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
