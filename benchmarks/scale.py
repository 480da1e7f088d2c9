"""Per-process memory and step time of the distributed engines: ddp, fsdp2, zero2, zero3.

    python -m benchmarks.scale                      # 2 CPU processes, LoRA and full fine-tuning
    python -m benchmarks.scale --quick              # a smoke run (small widths)
    python -m benchmarks.scale --engines ddp,fsdp2 --finetune full --text-layers 2

For each (fine-tuning, engine) the script starts `torchrun --nproc_per_node P -m benchmarks.scale
--worker ...` on a LLaVA-1.5-7B-shaped model (layer widths of Vicuna-7B + CLIP-L/14, fewer layers,
random weights) and runs mdpo's own engine (`mdpo.distributed`) on the trainer's SequenceScorer and
MDPOLoss: one warm-up step, then --steps timed optimizer steps of one micro-batch each. Every process
reports:
- parameter bytes: the parameters' storage in this process (the local shard under fsdp2 / zero3);
- gradient bytes: gradients held in this process between the backward and the optimizer step (for
  DeepSpeed, its gradient partitions and reduce buffers: every tensor of its optimizer whose name
  holds "grad");
- optimizer bytes: the optimizer's state (AdamW moments, step counters) and master weights (fp32
  copies: mdpo's MasterWeightAdamW for bf16 under ddp, DeepSpeed's fp32 partitions);
- training state = the three summed (tensors counted once, by storage);
- peak RSS of the process over the run, and RSS after the last step beyond the RSS before the model
  was built (what the process holds, measured rather than counted);
- step time: median (min–max) over the timed steps, the processes' slowest each step.
The parent writes benchmarks/results/scale-<device>.{json,md,png} and prints each engine's ratio to
ddp, and the bytes per parameter that README's fit table is computed from.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import _harness as H

DEFAULT = dict(text_layers=1, vision_layers=1, pairs=1, prompt_tokens=32, response_tokens=64, image_size=112,
               lora_r=64, lora_alpha=128, grad_ckpt=False)
# Engine variants measured beside the four engines: name -> (engine, extra config overrides).
VARIANTS = {"fsdp2-keep": ("fsdp2", ["distributed.reshard_after_forward=false"])}
QUICK = dict(DEFAULT, hidden=512, intermediate=1376, heads=8, kv_heads=8, vocab=8000, vision_hidden=256,
             vision_intermediate=1024, vision_heads=4, patch=14, image_size=56)


# ---------------------------------------------------------------------------------------- counting
def _storages(tensors) -> int:
    """Bytes of distinct storages among `tensors` (a view or a second reference counts once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or not torch.is_tensor(t):
            continue
        if hasattr(t, "to_local"):
            t = t.to_local()
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.device.type)
        if key not in seen and storage.nbytes():
            seen.add(key)
            total += storage.nbytes()
    return total


def _tensors_in(obj, depth: int = 0):
    """Tensors in an object's attributes, lists, tuples and dicts (a few levels deep)."""
    if torch.is_tensor(obj):
        yield obj
    elif depth < 4 and isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors_in(item, depth + 1)
    elif depth < 4 and isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors_in(item, depth + 1)


def param_tensors(model):
    for p in model.parameters():
        yield p.ds_tensor if getattr(p, "ds_tensor", None) is not None else p


def grad_tensors(engine, module, model):
    if engine.name.startswith("zero"):
        zero = module.optimizer
        for name, value in vars(zero).items():
            if "grad" in name.lower():
                yield from _tensors_in(value)
    for p in model.parameters():
        yield p.grad


def optimizer_tensors(engine, module, optimizer):
    yield from _tensors_in([optimizer.state])
    yield from _tensors_in(getattr(optimizer, "master_params", None))  # MasterWeightAdamW's fp32 copies
    if engine.name.startswith("zero"):
        zero = module.optimizer
        for name, value in vars(zero).items():
            if "fp32" in name.lower():
                yield from _tensors_in(value)
        yield from _tensors_in([zero.optimizer.state])


def _rss_kb(key: str = "VmRSS") -> int:
    return H._proc_status_kb(key)


# ------------------------------------------------------------------------------------------ worker
def worker(opts: dict) -> None:
    """One process of a measured run (under torchrun); writes its figures to opts["out"]/rank-K.json."""
    from mdpo.config import load_config
    from mdpo.distributed import make_engine
    from mdpo.loss import MDPOLoss
    from mdpo.models import apply_lora, freeze_for_full_finetune, get_adapter
    from mdpo.scoring import SequenceScorer

    from .train_step import llava_config, make_batch

    torch.set_num_threads(1)
    shape, finetune = opts["shape"], opts["finetune"]
    engine_name, extra = VARIANTS.get(opts["engine"], (opts["engine"], []))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = load_config(None, ["model.preset=tiny-llava", f"distributed.engine={engine_name}", f"model.finetune={finetune}",
                             "micro_batch_size=1", f"effective_batch_size={world}", "lr=1e-5", *extra])
    engine = make_engine(cfg)
    rss_before = _rss_kb()
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    model = LlavaForConditionalGeneration._from_config(llava_config(shape), attn_implementation="sdpa",
                                                       dtype=getattr(torch, opts["dtype"]))
    adapter = get_adapter("llava")
    if finetune == "lora":
        model = apply_lora(model, adapter, r=shape["lora_r"], alpha=shape["lora_alpha"], dropout=0.0)
    else:
        freeze_for_full_finetune(model, adapter)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    scorer = SequenceScorer(model, adapter, shared_prefix="off", single_forward=engine.shards_weights)
    trainable = [p for p in scorer.parameters() if p.requires_grad]
    module, optimizer = engine.prepare(scorer, trainable, accum=1)
    criterion = MDPOLoss()
    batch = make_batch(shape, engine.device, getattr(torch, opts["dtype"]))
    ref = torch.full((3 * shape["pairs"],), -50.0)
    times, counted = [], None
    for step in range(1 + opts["steps"]):
        engine.barrier()
        start = time.perf_counter()
        loss, _ = criterion(policy_logps=module(batch), ref_logps=ref)
        if engine.name.startswith("zero"):
            module.backward(loss)
        else:
            engine.backward(loss)
        if step == opts["steps"]:  # the last step: count what is held between backward and step
            counted = {"grad_bytes": _storages(grad_tensors(engine, module, scorer.model))}
        if engine.name.startswith("zero"):
            module.step()
        else:
            engine.step(trainable)
        engine.barrier()
        if step > 0:
            times.append(time.perf_counter() - start)
    counted["param_bytes"] = _storages(param_tensors(scorer.model))
    counted["optimizer_bytes"] = _storages(optimizer_tensors(engine, module, optimizer))
    counted["state_bytes"] = counted["param_bytes"] + counted["grad_bytes"] + counted["optimizer_bytes"]
    result = {"rank": engine.rank, "world": engine.world, "params": n_params, "trained_params": n_trained,
              "step_s": times, "peak_rss_bytes": _rss_kb("VmHWM") * 1024,
              "held_rss_bytes": (_rss_kb() - rss_before) * 1024, **counted}
    Path(opts["out"], f"rank-{engine.rank}.json").write_text(json.dumps(result))
    engine.close()


# ------------------------------------------------------------------------------------------ parent
def run_one(engine: str, finetune: str, shape: dict, args) -> dict:
    """Launch one measured run on args.processes CPU processes; -> its row (per-process figures: the max)."""
    with tempfile.TemporaryDirectory() as out:
        opts = {"engine": engine, "finetune": finetune, "shape": shape, "steps": args.steps, "dtype": args.dtype, "out": out}
        env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.processes), "--standalone",
               "-m", "benchmarks.scale", "--worker", json.dumps(opts)]
        started = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            errors = [line for line in lines if "Error" in line and ":" in line and not line.startswith(" ")]
            tail = (errors[0] if errors else " ".join(lines[-3:]))[-400:]
            return {"engine": engine, "finetune": finetune, "error": f"exit {proc.returncode}: {tail}"}
        ranks = [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank-*.json"))]
    slowest = [max(r["step_s"][i] for r in ranks) for i in range(len(ranks[0]["step_s"]))]
    row = {"engine": engine, "finetune": finetune, "processes": len(ranks), "params": ranks[0]["params"],
           "trained_params": ranks[0]["trained_params"], "wall_s": round(time.perf_counter() - started, 1),
           "step_s_median": statistics.median(slowest), "step_s_min": min(slowest), "step_s_max": max(slowest)}
    for key in ("param_bytes", "grad_bytes", "optimizer_bytes", "state_bytes", "peak_rss_bytes", "held_rss_bytes"):
        row[key] = max(r[key] for r in ranks)
    return row


def merge_rounds(found: list[dict]) -> dict:
    """One row of a configuration measured in several rounds: the median of the rounds' step-time medians,
    the min–max over all, the largest memory figures, every round's median and load listed."""
    good = [r for r in found if "error" not in r]
    if not good:
        return found[0]
    row = dict(good[0])
    row["step_s_median"] = statistics.median(r["step_s_median"] for r in good)
    row["step_s_min"], row["step_s_max"] = min(r["step_s_min"] for r in good), max(r["step_s_max"] for r in good)
    for key in ("param_bytes", "grad_bytes", "optimizer_bytes", "state_bytes", "peak_rss_bytes", "held_rss_bytes"):
        row[key] = max(r[key] for r in good)
    row["rounds"] = [{"step_s_median": r["step_s_median"], "load_avg": r.get("load_avg")} for r in good]
    return row


def add_ratios(rows: list[dict]) -> None:
    base = {r["finetune"]: r for r in rows if r["engine"] == "ddp" and "error" not in r}
    for row in rows:
        ref = base.get(row["finetune"])
        if ref is None or "error" in row:
            continue
        row["state_vs_ddp"] = row["state_bytes"] / ref["state_bytes"]
        row["peak_rss_vs_ddp"] = row["peak_rss_bytes"] / ref["peak_rss_bytes"]
        row["step_time_vs_ddp"] = row["step_s_median"] / ref["step_s_median"]
        row["bytes_per_param"] = row["state_bytes"] / row["params"]


def table(rows: list[dict]) -> str:
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    header = ["fine-tuning", "engine", "params / trained", "param GiB", "grad GiB", "optimizer GiB", "state GiB",
              "state vs ddp", "bytes/param", "peak RSS GiB", "held RSS GiB", "step s median (min–max)", "step vs ddp"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['finetune']} | {r['engine']} | {r['error']} |" + " |" * (len(header) - 3))
            continue
        lines.append("| " + " | ".join([
            r["finetune"], r["engine"], f"{r['params'] / 1e6:.0f}M / {r['trained_params'] / 1e6:.1f}M",
            gib(r["param_bytes"]), gib(r["grad_bytes"]), gib(r["optimizer_bytes"]), gib(r["state_bytes"]),
            f"{r.get('state_vs_ddp', 0):.2f}×", f"{r.get('bytes_per_param', 0):.2f}", gib(r["peak_rss_bytes"]),
            gib(r["held_rss_bytes"]), f"{r['step_s_median']:.2f} ({r['step_s_min']:.2f}–{r['step_s_max']:.2f})",
            f"{r.get('step_time_vs_ddp', 0):.2f}×"]) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = [r for r in rows if "error" not in r]
    finetunes = list(dict.fromkeys(r["finetune"] for r in good))
    if not finetunes:
        return
    fig, axes = plt.subplots(1, len(finetunes), figsize=(5.5 * len(finetunes), 4), squeeze=False)
    for ax, finetune in zip(axes[0], finetunes):
        sel = [r for r in good if r["finetune"] == finetune]
        names = [r["engine"] for r in sel]
        bottom = [0.0] * len(sel)
        for key, label in (("param_bytes", "parameters"), ("grad_bytes", "gradients"), ("optimizer_bytes", "optimizer")):
            values = [r[key] / 2**30 for r in sel]
            ax.bar(names, values, bottom=bottom, label=label)
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.plot(names, [r["peak_rss_bytes"] / 2**30 for r in sel], "k_", markersize=30, label="peak RSS")
        ax.set_title(f"{finetune}: per-process GiB")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------ what fits where
# Parameters of the language model (the vision tower, < 1 B, is left out) and its LoRA r = 64 adapters on
# every linear layer, from the public configs: (hidden, intermediate, layers, kv heads' width).
MODELS = {
    "7B (LLaVA-1.5-7B)": (6.74e9, 4096, 11008, 32, 4096),
    "13B (LLaVA-1.5-13B)": (13.0e9, 5120, 13824, 40, 5120),
    "34B (LLaVA-NeXT-34B)": (34.4e9, 7168, 20480, 60, 1024),
    "72B (Qwen2.5-VL-72B)": (72.7e9, 8192, 29568, 80, 1024),
}
GPU_GB, HEADROOM_GB = 80, 16  # an 80 GB GPU; 16 GB kept for activations, buffers and the CUDA context


def lora_params(hidden: int, inter: int, layers: int, kv: int, r: int = 64) -> float:
    """LoRA A and B of q, k, v, o, gate, up, down in every layer: r·(in + out) each."""
    per_layer = r * (2 * (hidden + hidden) + 2 * (hidden + kv) + 2 * (hidden + inter) + (inter + hidden))
    return per_layer * layers


def state_gb(engine: str, finetune: str, params: float, lora: float, gpus: int) -> float:
    """Weights + gradients + optimizer state per GPU (GB) in bf16 training with fp32 master weights:
    full fine-tuning 16 bytes per parameter (bf16 weight 2, bf16 gradient 2, fp32 master 4, Adam 8)
    under ddp; fsdp2 keeps fp32 shards (4 + 4 gradient + 8) / N; zero3 bf16 + fp32 partitions
    (2 + 4 + 4 + 8) / N; zero2 whole bf16 weights (2) + (4 + 4 + 8) / N. LoRA: the frozen bf16 base
    (2 bytes, / N where the engine shards weights) + 16 bytes per adapter parameter (/ N where sharded)."""
    n = gpus
    if finetune == "full":
        per = {"ddp": 16 * params, "fsdp2": 16 * params / n, "zero2": 2 * params + 16 * params / n, "zero3": 18 * params / n}
    else:
        per = {"ddp": 2 * params + 16 * lora, "fsdp2": (2 * params + 16 * lora) / n,
               "zero2": 2 * params + 2 * lora + 16 * lora / n, "zero3": (2 * params + 18 * lora) / n}
    return per[engine] / 1e9


def fit_table() -> str:
    """README's table: GB per GPU of weights, gradients and optimizer state, and whether it fits in 80 GB
    with 16 GB to spare (computed from the byte counts in `state_gb`, not run)."""
    engines = ("ddp", "fsdp2", "zero2", "zero3")
    header = ["model", "fine-tuning", *(f"{e} ×{g}" for g in (1, 8) for e in engines)]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    for name, (params, hidden, inter, layers, kv) in MODELS.items():
        lora = lora_params(hidden, inter, layers, kv)
        for finetune in ("lora", "full"):
            cells = []
            for gpus in (1, 8):
                for engine in engines:
                    gb = state_gb(engine, finetune, params, lora, gpus)
                    cells.append(f"{gb:.0f} {'✓' if gb <= GPU_GB - HEADROOM_GB else '✗'}")
            lines.append("| " + " | ".join([name, finetune if finetune == "full" else f"LoRA r=64 ({lora / 1e6:.0f}M)", *cells]) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--engines", default="ddp,fsdp2,zero2,zero3")
    parser.add_argument("--finetune", default="lora,full")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps after one warm-up step")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds: every engine once per round; the "
                        "row keeps the median step time over rounds and the spread of all their steps")
    parser.add_argument("--text-layers", type=int, default=None)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--quick", action="store_true", help="small widths: a smoke run, not the table's numbers")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--results-dir", default=None)
    parser.add_argument("--fit-table", action="store_true", help="print README's computed table of what fits where and exit")
    args = parser.parse_args(argv)
    if args.fit_table:
        print(fit_table())
        return []
    if args.worker:
        worker(json.loads(args.worker))
        return []
    from .train_step import LLAVA_15_7B

    shape = dict(QUICK) if args.quick else {**LLAVA_15_7B, **DEFAULT}
    if args.text_layers:
        shape["text_layers"] = args.text_layers
    runs: dict[tuple[str, str], list[dict]] = {}
    for round_ in range(args.rounds):
        for finetune in args.finetune.split(","):
            for engine in args.engines.split(","):
                row = run_one(engine, finetune, shape, args)
                row["load_avg"] = H.load_average()
                runs.setdefault((finetune, engine), []).append(row)
                print(json.dumps({"round": round_, **row}), flush=True)
    rows = [merge_rounds(found) for found in runs.values()]
    add_ratios(rows)
    stamp = H.stamp("cpu")
    notes = [f"{args.processes} CPU processes (gloo), 1 thread each; {args.dtype}; {args.rounds} interleaved round(s); model: "
             f"{'small widths (--quick)' if args.quick else 'LLaVA-1.5-7B widths'} with "
             f"{shape['text_layers']} text and {shape['vision_layers']} vision layer(s), vocab {shape['vocab']}, "
             f"{shape['image_size']} px; 1 pair (3 rows) per step; {args.steps} timed steps after a warm-up",
             "state = parameter + gradient + optimizer bytes held by one process (the largest over processes)",
             f"load average at the end: {H.load_average()}"]
    for r in rows:  # the targets are for full fine-tuning; LoRA rows are reported, not judged
        if r["finetune"] == "full" and r["engine"] in ("fsdp2", "zero3", *VARIANTS) and "state_vs_ddp" in r:
            notes.append(f"target (full): {r['engine']} state {r['state_vs_ddp']:.2f}× ddp's (≤ 0.55× wanted"
                         + (", met" if r["state_vs_ddp"] <= 0.55 else ", MISSED") + f"), step time {r['step_time_vs_ddp']:.2f}× "
                         f"(≤ 1.3× wanted" + (", met)" if r["step_time_vs_ddp"] <= 1.3 else ", MISSED)"))
    text = table(rows)
    print("\n" + text + "\n")
    for note in notes:
        print(note)
    out_dir = Path(args.results_dir) if args.results_dir else H.RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = "cpu-quick" if args.quick else "cpu"
    base = out_dir / f"scale-{tag}"
    base.with_suffix(".json").write_text(json.dumps({"provenance": stamp, "shape": shape, "notes": notes, "rows": rows}, indent=1))
    base.with_suffix(".md").write_text(f"# scale ({tag})\n\n" + "  ".join(f"**{k}** {v}" for k, v in stamp.items()) + "\n\n"
                                       + "\n".join(f"- {n}" for n in notes) + "\n\n" + text + "\n")
    plot(rows, base.with_suffix(".png"), f"scale — {stamp.get('device_name')} — {args.processes} processes — {stamp.get('git')}")
    print("wrote", base.with_suffix(".md"))
    return rows


if __name__ == "__main__":
    main()
