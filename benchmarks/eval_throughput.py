"""Benchmark of answer generation for the hallucination benchmarks: questions per second.

    python -m benchmarks.eval_throughput                     # tiny-llava on the CPU, batch 1 / 8 / 32
    python -m benchmarks.eval_throughput --device cuda --model /path/to/llava-1.5-7b-hf   # a real model on a GPU
    python -m benchmarks.eval_throughput --quick              # smoke run (batch 1 / 8, short budget)

Providers:
  yes-no        POPE-style "Is there a <object> in the image?" answered in at most 10 new tokens
                (`mdpo-eval pope` / AMBER's discriminative questions: `--yes-no-max-new-tokens` 10)
  description   "Describe the image." in at most 64 new tokens (CHAIR / AMBER generative)
Shapes: the batch (questions per `generate` call): 1, 8, 32. One timed call is
`mdpo.eval.generate.generate_batch` on that many questions of the synthetic scenes (`mdpo-data
make-sample`), greedy: prompt rendering, image preprocessing, prefill and decoding, as `mdpo-eval` runs
it (the files are not written). questions/s = batch / median call time; the new tokens per answer
(greedy, so the same in every call) are counted once, end tokens included. A batch runs until its
longest answer ends. Sharding over processes divides the questions, not the per-call
time: it is not measured here.
"""
from __future__ import annotations

import argparse
import functools
import tempfile

import torch

from benchmarks import _harness as H

MAX_NEW_TOKENS = {"yes-no": 10, "description": 64}
GENERATED: dict[tuple[str, int], int] = {}  # (provider, batch) -> new tokens of one call (end tokens included)


@functools.lru_cache(maxsize=None)
def _model_and_questions(model: str, device: str, dtype: str | None, n: int):
    from mdpo.data import make_sample
    from mdpo.eval.generate import load_generation_model, load_questions

    folder = tempfile.mkdtemp(prefix="eval-throughput-")
    make_sample(folder, n=n, seed=0)
    questions = load_questions(f"{folder}/data.json")
    gm = load_generation_model(model, device=device, dtype=dtype)
    return gm, questions


def setup(provider: str, shape: dict, mode: str, options: dict):
    import dataclasses

    from mdpo.eval.generate import GenerationOptions, generate_batch

    if provider not in MAX_NEW_TOKENS:
        raise H.Skip(f"unknown provider {provider}")
    batch = shape["batch"]
    gm, questions = _model_and_questions(options["model"], options["device"], options.get("dtype"), max(32, batch))
    asked = questions[:batch]
    if provider == "yes-no":
        asked = [dataclasses.replace(q, question=f"Is there a {q.meta['objects'][0]['colour']} {q.meta['objects'][0]['shape']} "
                                                  "in the image?") for q in asked]
    else:
        asked = [dataclasses.replace(q, question="Describe the image.") for q in asked]
    opts = GenerationOptions(max_new_tokens=MAX_NEW_TOKENS[provider], batch_size=batch)
    GENERATED[(provider, batch)] = sum(len(a.ids) + a.finished for a in generate_batch(gm, asked, opts))  # greedy: every call alike

    def fn():
        generate_batch(gm, asked, opts)
    return fn


def main(argv=None) -> None:
    parser = H.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]), default_modes=("generate",))
    parser.add_argument("--model", default="tiny-llava", help="a preset or a model folder")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8,32; quick 1,8)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on the CPU (default: torch's)")
    parser.add_argument("--tag", default=None, help="results file suffix (default: the device)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per batch size (each calls every provider once)")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in (args.batches or ("1,8" if args.quick else "1,8,32")).split(",")]
    providers = args.providers.split(",") if args.providers else list(MAX_NEW_TOKENS)
    spec = H.BenchSpec(name="eval_throughput", module="benchmarks.eval_throughput", factory="setup", providers=providers,
                       shapes=[{"batch": b} for b in batches], modes=["generate"],
                       options={"device": device, "dtype": args.dtype, "model": args.model},
                       shape_label=lambda s: f"batch={s['batch']}")
    # providers interleaved per batch size (a shared machine's drifting load hits both alike); a batch-32
    # description call takes seconds on the CPU, so a few rounds
    rows = H.run_benchmark(spec, setup, quick=args.quick, measure_memory=False, interleave=True,
                           min_rounds=args.rounds, budget_s=0.5)
    lines = ["| provider | batch | max new tokens | new tokens / answer | median s / call | questions/s | new tokens/s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if "ms_median" not in row:
            continue
        batch, seconds = int(row["shape"].split("=")[1]), row["ms_median"] / 1e3
        row["questions_per_s"] = batch / seconds
        tokens = GENERATED[(row["provider"], batch)]
        row["new_tokens_per_answer"] = tokens / batch
        row["new_tokens_per_s"] = tokens / seconds
        lines.append(f"| {row['provider']} | {batch} | {MAX_NEW_TOKENS[row['provider']]} | {tokens / batch:.1f} | "
                     f"{seconds:.3f} | {row['questions_per_s']:.1f} | {row['new_tokens_per_s']:.0f} |")
    print("\n".join(lines))
    notes = [f"model {args.model}, {device}, torch threads {torch.get_num_threads()}; greedy", *lines]
    H.report(rows, "eval_throughput", args.tag or device, [
        "questions/s for POPE-style yes/no answers and 64-token descriptions at batch 1 / 8 / 32 (issue 19; "
        "a measurement, no target figure)"], notes=notes, results_dir=args.results_dir)


if __name__ == "__main__":
    main()
