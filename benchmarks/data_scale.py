"""Data at scale (issue 18): what a preference set of 1k – 100k pairs costs a training process before its
first optimizer step, as a `datasets` save_to_disk folder with embedded JPEGs and as JSONL + an image folder.

    python -m benchmarks.data_scale                          # 500, 1k, 10k, 100k pairs, both formats
    python -m benchmarks.data_scale --sizes 500,10000        # the issue's target pair only
    python -m benchmarks.data_scale --quick                  # 200 and 1000 pairs (a smoke run)
    python -m benchmarks.data_scale --code /path/to/checkout # train with another checkout's mdpo (before / after)
    python -m benchmarks.data_scale --index 1000000          # load_records of a 1M-record JSONL: the index's memory
    python -m benchmarks.data_scale --index 1000000 --index-files 1000,0   # ... and with one image file per record

Data (written under --work, deleted at the end unless --keep): N TRL-shape pairs, each with its own JPEG
(640×480, 60–150 KB: a pool of 48 synthetic photographs — gradients, shapes and sensor noise — each row's
copy made distinct by a JPEG comment holding its index, so ids and digests are all different), a
question of about 12 words and answers of about 40. The table is written with `Dataset.from_generator`
+ `save_to_disk` (500 MB shards); the JSONL names one image file per record (plain shape).

Per (format, N), runs of `python -m mdpo.train` (tiny LLaVA, LoRA, one process, max_steps=1, 4 pairs
per step, reference cached, data.max_length 512), each a fresh process and output_dir:
- cold (once): an empty data cache folder (every record validated, every image digested);
- cached (--repeats times, the sizes interleaved): the same data cache folder again (the validation and
  the digests reused). The tables give medians (time to step 1 with its min–max).
Measured on the training process: seconds from its start to the end of optimizer step 1 (the first row
of metrics.jsonl appearing, polled every 20 ms), peak private memory (`Anonymous:` of
/proc/PID/smaps_rollup, polled every 20 ms: a shorter spike can be missed), peak RSS (the kernel's
high-water mark; includes the memory-mapped table pages it touched, which are shared and
reclaimable, so it is not what the process costs the machine; VmHWM of /proc/PID/status, polled).

Collator throughput: pairs per second one process (one torch thread, as a DataLoader worker runs) collates
into [chosen | rejected | corrupted] rows (crop corruption), records read from the table lazily, with the
tiny processor of the runs (56 px) and with LLaVA-1.5's image processing (CLIP 336 px: resize, crop,
normalise; 576 image tokens; the tiny tokenizer), next to what one GPU step of LLaVA-1.5-7B consumes
(32 pairs per step; its step time is computed, not measured: see `gpu_pairs_per_second`).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks import _harness as H

WORDS = ("the a red blue small large bright dark wooden metal person dog cat car street table window tree sky "
         "left right behind front holding sitting standing near two three several image shows appears there is are "
         "with on in of and beside under above colour shape").split()


# --------------------------------------------------------------------------------------------- data
def jpeg_pool(n: int, seed: int = 0, size=(640, 480)) -> list[bytes]:
    """n synthetic photographs as JPEG bytes of 60–150 KB: smooth gradients, a few shapes, sensor noise."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    pool = []
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    while len(pool) < n:
        base = rng.uniform(30, 220, 3)
        slope = rng.uniform(-0.25, 0.25, (2, 3))
        pixels = base + x[..., None] * slope[0] + y[..., None] * slope[1]
        pixels += rng.normal(0, rng.uniform(6, 14), (height, width, 3))  # sensor noise sets the JPEG's size
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(3, 9))):
            x0, y0 = int(rng.integers(0, width - 60)), int(rng.integers(0, height - 60))
            box = (x0, y0, x0 + int(rng.integers(30, 200)), y0 + int(rng.integers(30, 160)))
            fill = tuple(int(v) for v in rng.integers(0, 255, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        for quality in (85, 75, 65, 55):
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=quality)
            if 60_000 <= buffer.tell() <= 150_000:
                pool.append(buffer.getvalue())
                break
    return pool


def distinct_jpeg(data: bytes, index: int) -> bytes:
    """The same picture with a JPEG comment (COM segment) holding `index`: other bytes, same pixels."""
    comment = f"mdpo benchmark row {index}".encode()
    return data[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + data[2:]


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def pair_text(i: int) -> tuple[str, str, str]:
    rng = random.Random(i)
    return sentence(rng, 12)[:-1] + "?", sentence(rng, 40), sentence(rng, 40)


def write_table(folder: Path, n: int, pool: list[bytes], scratch: Path) -> None:
    """A TRL-shape `datasets` table of n pairs with embedded JPEGs, saved with save_to_disk."""
    import datasets

    messages = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})
    features = datasets.Features({"images": datasets.List(datasets.Image()), "prompt": messages, "chosen": messages,
                                  "rejected": messages})

    def rows(n):
        for i in range(n):
            question, chosen, rejected = pair_text(i)
            yield {"images": [{"bytes": distinct_jpeg(pool[i % len(pool)], i), "path": None}],
                   "prompt": [{"role": "user", "content": question}], "chosen": [{"role": "assistant", "content": chosen}],
                   "rejected": [{"role": "assistant", "content": rejected}]}

    table = datasets.Dataset.from_generator(rows, gen_kwargs={"n": n}, features=features, cache_dir=str(scratch),
                                            writer_batch_size=200)
    table.save_to_disk(str(folder), max_shard_size="500MB")
    del table
    shutil.rmtree(scratch, ignore_errors=True)


def write_jsonl(folder: Path, n: int, pool: list[bytes]) -> Path:
    """n plain-shape records in data.jsonl, each naming its own JPEG under images/."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    path = folder / "data.jsonl"
    with open(path, "w") as handle:
        for i in range(n):
            name = f"images/{i // 1000:04d}/{i:07d}.jpg"
            if i % 1000 == 0:
                (folder / name).parent.mkdir(exist_ok=True)
            (folder / name).write_bytes(distinct_jpeg(pool[i % len(pool)], i))
            question, chosen, rejected = pair_text(i)
            handle.write(json.dumps({"image": name, "question": question, "chosen": chosen, "rejected": rejected}) + "\n")
    return path


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


# ------------------------------------------------------------------------------------- measuring a process
def _proc_kb(path: str, key: str) -> int | None:
    """A "Key:   N kB" line of a /proc file (None once the process is gone)."""
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def measure_process(cmd: list[str], env: dict, marker: Path | None = None, timeout: float = 3600) -> dict:
    """Run `cmd`; -> seconds until `marker` exists and has a line (None: never), total seconds, peak
    anonymous memory and peak RSS (VmHWM: the kernel's high-water mark of this program, read every 20 ms;
    ru_maxrss is not used: on Linux a child's starts at its parent's RSS when forked), return code."""
    start = time.perf_counter()
    log = open(marker.parent.parent / f"{marker.parent.name}.log", "w") if marker is not None else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    peak_anon, peak_rss, first_step = 0, 0, None
    while True:
        anon = _proc_kb(f"/proc/{proc.pid}/smaps_rollup", "Anonymous:")
        hwm = _proc_kb(f"/proc/{proc.pid}/status", "VmHWM:")
        if anon is not None:
            peak_anon = max(peak_anon, anon)
        if hwm is not None:
            peak_rss = max(peak_rss, hwm)
        if first_step is None and marker is not None and marker.is_file() and marker.read_text().strip():
            first_step = time.perf_counter() - start
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() - start > timeout:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.02)
    if log is not subprocess.DEVNULL:
        log.close()
    return {"to_step1_s": first_step, "total_s": time.perf_counter() - start, "peak_private_mib": peak_anon / 1024,
            "peak_rss_mib": peak_rss / 1024, "rc": os.waitstatus_to_exitcode(status)}


def train_run(data: Path, out: Path, cache: Path, code: Path, extra: list[str]) -> dict:
    overrides = [f"data.path={data}", f"output_dir={out}", "model.preset=tiny-llava", "max_steps=1", "epochs=1",
                 "micro_batch_size=2", "effective_batch_size=4", "data.max_length=512", "plots=false", "report_to=none",
                 "progress_bar=false", *extra]
    # The data cache folder through the environment: a checkout from before data.cache_dir (--code) ignores it.
    env = dict(os.environ, PYTHONPATH=str(code), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MDPO_DATA_CACHE=str(cache))
    row = measure_process([sys.executable, "-m", "mdpo.train", *overrides], env, marker=out / "metrics.jsonl")
    text = (out.parent / f"{out.name}.log").read_text() if (out.parent / f"{out.name}.log").exists() else ""
    row["validation"] = next((line.split(": ", 2)[-1] for line in text.splitlines() if line.startswith("data: ")), None)
    if row["rc"] != 0:
        row["error"] = text[-600:]
    return row


# ------------------------------------------------------------------------------------------- collator rate
def llava15_processor():
    """The tiny LLaVA processor with LLaVA-1.5's image processing: CLIP at 336 px (576 image tokens)."""
    from mdpo.tiny_processors import build_tiny_processor

    processor = build_tiny_processor("llava")
    image_processor = type(processor.image_processor)(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    processor.image_processor = image_processor
    return processor


def collator_rate(records, processor, pairs: int = 64, batch: int = 8) -> float:
    """Pairs per second one thread collates (mdpo rows, crop corruption), reading records lazily."""
    import torch

    from mdpo.data import CorruptionConfig, PreferenceCollator

    torch.set_num_threads(1)
    collator = PreferenceCollator(processor, objective="mdpo", max_length=2048, corruption=CorruptionConfig())
    collator([records[0]])  # warm-up
    order = random.Random(0).sample(range(len(records)), min(pairs, len(records)))
    rates = []
    for _ in range(3):
        start = time.perf_counter()
        for k in range(0, len(order), batch):
            collator([records[i] for i in order[k : k + batch]])
        rates.append(len(order) / (time.perf_counter() - start))
    return statistics.median(rates)


def gpu_pairs_per_second(pairs: int = 32, rows_per_pair: int = 3, tokens: int = 680, params: float = 7.06e9,
                         peak_flops: float = 989e12, mfu: float = 0.4) -> tuple[float, float]:
    """(seconds per step, pairs per second) one H100 consumes training LLaVA-1.5-7B with LoRA: a computed
    estimate, not a run. FLOPs ≈ 4 · params · tokens (forward 2, backward to the activations 2; LoRA's
    weight gradients are negligible), tokens = pairs · 3 rows · 680 (576 image + ~104 text), at `mfu` of
    the bf16 dense peak; the reference log-probs are cached (no reference forward)."""
    seconds = 4 * params * pairs * rows_per_pair * tokens / (peak_flops * mfu)
    return seconds, pairs / seconds


# ------------------------------------------------------------------------------------------- index memory
INDEX_CHILD = """
import json, os, sys, time
from mdpo.data import load_records
start = time.perf_counter()
result = load_records(sys.argv[1], on_bad_record="skip", check_images=False, cache_dir=sys.argv[2])
ids = result.records.sample_ids
n = sum(1 for _ in range(0, len(result.records), 1000) if result.records[_].sample_id == ids[_])  # read some records
print(json.dumps({"records": len(result.records), "seconds": time.perf_counter() - start}))
"""


def index_memory(work: Path, n: int, code: Path, files: int = 1000) -> list[dict]:
    """Peak private memory of `load_records` (no processor, images not opened; their files digested) on a
    JSONL of n plain records and on one of 1000 records, cold (validated) and cached. files: distinct
    image files the records name, in turn (0: one per record; each a copy of one small PNG)."""
    from PIL import Image

    images = work / "index-images"
    images.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 80)).save(buffer, "PNG")
    distinct = files or n
    for i in range(distinct):
        if i % 1000 == 0:
            (images / f"{i // 1000:04d}").mkdir(exist_ok=True)
        (images / f"{i // 1000:04d}/{i}.png").write_bytes(buffer.getvalue())
    rows = []
    for size in (1000, n):
        path = work / f"index-{size}.jsonl"
        with open(path, "w") as handle:
            for i in range(size):
                question, chosen, rejected = pair_text(i)
                k = i % distinct
                handle.write(json.dumps({"image": f"index-images/{k // 1000:04d}/{k}.png", "question": question,
                                         "chosen": chosen, "rejected": rejected}) + "\n")
        cache = work / f"index-cache-{size}"
        env = dict(os.environ, PYTHONPATH=str(code), MDPO_DATA_CACHE=str(cache))
        for start in ("cold", "cached"):
            row = measure_process([sys.executable, "-c", INDEX_CHILD, str(path), str(cache)], env)
            rows.append({"records": size, "image_files": min(size, distinct), "start": start,
                         "file_mib": path.stat().st_size / 2**20, **row})
            print(json.dumps(rows[-1]), flush=True)
        path.unlink()
        shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(images, ignore_errors=True)
    return rows


# ----------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="500,1000,10000,100000", help="pairs per dataset, comma-separated")
    parser.add_argument("--formats", default="table,jsonl", help="table (save_to_disk folder) and/or jsonl (+ image folder)")
    parser.add_argument("--quick", action="store_true", help="sizes 200,1000")
    parser.add_argument("--work", default=None, help="where the synthetic data is written (default: a folder under /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic data (default: deleted at the end)")
    parser.add_argument("--code", default=str(H.REPO_ROOT), help="the checkout whose mdpo trains (PYTHONPATH)")
    parser.add_argument("--repeats", type=int, default=3, help="cached starts per size, the sizes interleaved")
    parser.add_argument("--index", type=int, default=0, help="also: load_records of a JSONL of this many records")
    parser.add_argument("--index-files", default="1000", help="distinct image files that JSONL names (0: one per record); "
                        "comma-separated: one measurement each")
    parser.add_argument("--tag", default="cpu", help="results file tag: benchmarks/results/data_scale-TAG.{json,md}")
    parser.add_argument("--no-rate", action="store_true", help="skip the collator throughput")
    parser.add_argument("--workers", type=int, default=0, help="data.num_workers of the runs (validation and collation)")
    args = parser.parse_args(argv)
    sizes = [200, 1000] if args.quick else [int(s) for s in args.sizes.split(",") if s]
    formats = args.formats.split(",")
    work = Path(args.work or f"/tmp/mdpo-data-scale-{os.getpid()}")
    work.mkdir(parents=True, exist_ok=True)
    code = Path(args.code).resolve()
    free = shutil.disk_usage(work).free
    print(f"data under {work}: {free / 1e9:.0f} GB free; code {code}", flush=True)
    rows, rates, index_rows = [], [], []
    pool = jpeg_pool(48)
    print(f"JPEG pool: {len(pool)} images, {min(map(len, pool)) / 1e3:.0f}–{max(map(len, pool)) / 1e3:.0f} KB "
          f"(mean {statistics.fmean(map(len, pool)) / 1e3:.0f} KB)", flush=True)
    extra = [f"data.num_workers={args.workers}"]

    def run(fmt: str, n: int, data: Path, on_disk: int, start: str, repeat: int) -> None:
        out = work / f"run-{fmt}-{n}-{start}-{repeat}"
        row = {"format": fmt, "pairs": n, "start": start, "repeat": repeat, "on_disk_mib": on_disk / 2**20,
               **train_run(data, out, work / f"cache-{fmt}-{n}", code, extra), "load_avg": H.load_average()}
        rows.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(out, ignore_errors=True)

    try:
        for fmt in formats:
            made = {}  # n -> (data path, bytes on disk): kept until the cached starts of every size are done
            for n in sizes:  # each size written and validated (cold: an empty data cache folder)
                folder = work / f"{fmt}-{n}"
                started = time.perf_counter()
                if fmt == "table":
                    write_table(folder, n, pool, work / "scratch")
                    data = folder
                else:
                    data = write_jsonl(folder, n, pool)
                made[n] = (data, disk_bytes(folder))
                print(f"{fmt} {n}: {made[n][1] / 2**20:.0f} MiB written in {time.perf_counter() - started:.0f} s", flush=True)
                run(fmt, n, *made[n], "cold", 0)
            for repeat in range(args.repeats):  # cached starts, the sizes interleaved (load drifts)
                for n in sizes:
                    run(fmt, n, *made[n], "cached", repeat)
            if fmt == "table" and not args.no_rate:
                n = max(s for s in sizes if s <= 10000) if any(s <= 10000 for s in sizes) else min(sizes)
                rates = rate_rows(made[n][0], work / f"cache-{fmt}-{n}")
            for n in sizes:
                if not args.keep:
                    shutil.rmtree(work / f"{fmt}-{n}", ignore_errors=True)
                shutil.rmtree(work / f"cache-{fmt}-{n}", ignore_errors=True)
        index_rows = [row for files in args.index_files.split(",") if args.index for row in index_memory(work, args.index, code, int(files))]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return write(rows, rates, index_rows, args.tag, code)


def rate_rows(folder: Path, cache: Path) -> list[dict]:
    from mdpo.data import load_records
    from mdpo.tiny_processors import build_tiny_processor

    records = load_records(folder, cache_dir=cache).records
    seconds, needed = gpu_pairs_per_second()
    out = []
    for name, processor in (("tiny LLaVA (56 px, 16 image tokens)", build_tiny_processor("llava")),
                            ("LLaVA-1.5 image processing (CLIP 336 px, 576 image tokens)", llava15_processor())):
        rate = collator_rate(records, processor)
        out.append({"processor": name, "pairs_per_s_per_worker": rate, "gpu_step_s": seconds, "gpu_pairs_per_s": needed,
                    "workers_to_feed_one_gpu": needed / rate})
        print(json.dumps(out[-1]), flush=True)
    return out


def summarize(rows: list[dict]) -> list[dict]:
    """One row per (format, pairs, start): medians over the repeats, with min–max of the time to step 1."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["format"], r["pairs"], r["start"]), []).append(r)
    out = []
    for (fmt, n, start), runs in groups.items():
        ok = [r for r in runs if r["rc"] == 0 and r.get("to_step1_s") is not None]
        steps = [r["to_step1_s"] for r in ok]
        out.append({"format": fmt, "pairs": n, "start": start, "runs": len(runs), "failed": len(runs) - len(ok),
                    "on_disk_mib": runs[0]["on_disk_mib"],
                    "to_step1_s": statistics.median(steps) if steps else None,
                    "to_step1_range": (min(steps), max(steps)) if steps else None,
                    "peak_private_mib": statistics.median(r["peak_private_mib"] for r in ok) if ok else None,
                    "peak_rss_mib": max(r["peak_rss_mib"] for r in ok) if ok else None,
                    "validation": next((r["validation"].split("; kept in")[0].split("; /")[0] for r in runs if r.get("validation")), None) or
                                  next((r.get("error", "")[-120:] for r in runs if r.get("error")), "")})
    return out


def write(rows: list[dict], rates: list[dict], index_rows: list[dict], tag: str, code: Path) -> dict:
    stamp = H.stamp("cpu")
    stamp["code"] = str(code)
    summary = summarize(rows)
    smallest = min((s["pairs"] for s in summary), default=None)
    base = {(s["format"], s["start"]): s for s in summary if s["pairs"] == smallest}
    lines = [f"# data_scale ({tag})", "", "  ".join(f"**{k}** {v}" for k, v in stamp.items() if k != "host"), "",
             "Medians over the runs (cold: one run, an empty data cache; cached: repeats, sizes interleaved); "
             "extra private = peak private memory minus the smallest size's, same format and start.", "",
             "| format | pairs | on disk MiB | start | runs | to end of step 1 s (min–max) | target ≤ 1.5× smallest + 5 s | "
             "peak private MiB | extra private MiB | extra / on-disk size | peak RSS MiB | validation |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        small = base.get((s["format"], s["start"]))
        has = small is not None and small is not s and s["peak_private_mib"] is not None and small["peak_private_mib"] is not None
        extra = s["peak_private_mib"] - small["peak_private_mib"] if has else None
        ratio = extra / s["on_disk_mib"] if has else None
        step = "—" if s["to_step1_s"] is None else f"{s['to_step1_s']:.1f} ({s['to_step1_range'][0]:.1f}–{s['to_step1_range'][1]:.1f})"
        bound = (1.5 * small["to_step1_s"] + 5) if has and small["to_step1_s"] is not None else None
        target = "—" if bound is None or s["to_step1_s"] is None else f"{bound:.1f}: {'met' if s['to_step1_s'] <= bound else 'missed'}"
        def number(value, spec=".0f"):
            return "—" if value is None else format(value, spec)

        runs = f"{s['runs']}" + (f" ({s['failed']} failed)" if s["failed"] else "")
        lines.append(f"| {s['format']} | {s['pairs']} | {s['on_disk_mib']:.0f} | {s['start']} | {runs} | {step} | {target} | "
                     f"{number(s['peak_private_mib'])} | {number(extra)} | {number(ratio, '.3f')} | "
                     f"{number(s['peak_rss_mib'])} | {s['validation']} |")
    if rates:
        lines += ["", "| collator (one thread, mdpo rows, crop) | pairs/s per worker | LLaVA-1.5-7B step on one H100 "
                  "(computed) | pairs/s it consumes | workers to keep it fed |", "|---|---|---|---|---|"]
        lines += [f"| {r['processor']} | {r['pairs_per_s_per_worker']:.1f} | {r['gpu_step_s']:.1f} s / 32 pairs | "
                  f"{r['gpu_pairs_per_s']:.1f} | {r['workers_to_feed_one_gpu']:.2f} |" for r in rates]
    if index_rows:
        lines += ["", "| JSONL records (load_records, no processor) | image files | file MiB | start | seconds | peak private MiB | "
                  "peak RSS MiB |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['records']} | {r.get('image_files', '')} | {r['file_mib']:.0f} | {r['start']} | {r['total_s']:.1f} | "
                  f"{r['peak_private_mib']:.0f} | {r['peak_rss_mib']:.0f} |" for r in index_rows]
    H.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = H.RESULTS_DIR / f"data_scale-{tag}"
    path.with_suffix(".json").write_text(json.dumps({"provenance": stamp, "summary": summary, "runs": rows, "collator": rates,
                                                     "index": index_rows}, indent=1, default=str))
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {path}.json, {path}.md")
    return {"runs": rows, "collator": rates, "index": index_rows}


if __name__ == "__main__":
    main()
