"""Shared benchmark harness: timing, peak memory, stamps, and JSON / markdown / PNG reports.

Every `benchmarks/<name>.py` uses it the same way (Triton tutorial `05-layer-norm.py` / Liger style):

    from benchmarks import _harness as H

    def setup(provider: str, shape: dict, mode: str, options: dict) -> Callable[[], None]:
        # Build the inputs for one (provider, shape, mode) — not timed, not counted as extra memory —
        # and return `fn`, a zero-argument callable that runs ONE iteration of `mode`
        # ("forward", "backward", "full", ...). `fn` must not keep its results alive after it returns
        # (e.g. set `x.grad = None` at its end), so that every call starts from the same memory state.
        # `options` is a JSON-able dict (device, dtype, ...). Raise H.Skip("why") to skip a combination.
        ...

    spec = H.BenchSpec(
        name="logprobs", module="benchmarks.logprobs", factory="setup",
        providers=["ours", "eager"], shapes=[{"tokens": 4096, "V": 32000}], modes=["forward", "full"],
        options={"device": "cpu", "dtype": "float32"}, baseline="eager",
        bytes_moved=lambda shape, mode, options: ...,   # optional, -> int or None  (GB/s column)
        flops=None,                                     # optional, -> int or None  (TFLOP/s column)
        shape_label=lambda shape: "...",                # optional, short text for tables and plots
    )
    rows = H.run_benchmark(spec, setup, quick=args.quick, measure_memory=True)
    H.write_reports(rows, prefix="logprobs", device_tag="cpu")  # benchmarks/results/logprobs-cpu.{json,md,png}
    H.print_table(rows)

What is measured
- Time: warm-up calls (the first one also compiles), then repeated calls; median, the 20 % / 80 %
  quantiles and min / max in milliseconds. On CUDA each call is timed with CUDA events (synchronised at
  the end) after a 256 MB L2 flush outside the timed window; on CPU with `time.perf_counter`.
  `run_benchmark(..., interleave=True)` (what the kernel benchmarks use) builds every provider of a
  (shape, mode) first and then times them in rounds, each round calling every provider once in a
  rotated order (`time_interleaved`), so a shared machine's drifting load hits all providers alike;
  at least `min_rounds` rounds (15 by default). Every call must allocate its outputs afresh (as a
  user's call does: autograd's gradient, a new result tensor), never write into a buffer kept across
  calls: first-touch page faults of fresh memory are part of the cost on a CPU (on Linux, 4 KiB
  each unless the block got huge pages). On the CPU each row also reports `minflt_per_call`, the
  median minor page faults of one call (getrusage), which shows how much fresh memory a call touched.
- Peak extra memory: memory above what the inputs already hold, for one call after warm-up.
  CUDA: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus the allocated
  bytes before the call. CPU: every provider runs in its own child process
  (`python -m benchmarks._harness --child ...`): the child builds the inputs with `setup`, warms up,
  resets the kernel's peak-RSS counter (`echo 5 > /proc/self/clear_refs`, so VmHWM := VmRSS), runs one
  call and reports VmHWM − VmRSS-before-the-call from /proc/self/status. The child runs with
  `MALLOC_MMAP_THRESHOLD_=131072` so glibc returns freed blocks to the OS and RSS follows live memory
  (otherwise freed heap blocks kept by malloc hide later allocations). If clear_refs is not writable,
  the child skips the warm-up and reports VmHWM − VmRSS-after-setup (the warm-up's compile memory
  would otherwise count) and marks the row `mem_method="hwm-no-reset"`.
- Every row is stamped with device name, torch / triton versions, git revision (+dirty), date, host, and
  the machine's load average when the row finished (`load_avg`: a shared machine's figures need it).
- Derived columns: GB/s = bytes_moved / median time; TFLOP/s likewise; `speedup_vs_<baseline>` =
  baseline median / this median (> 1 is faster than the baseline); `mem_vs_<baseline>` = this peak /
  baseline peak. A provider that fails (OOM, missing package) gets a row with `error` and no numbers.

Other helpers: `time_fn`, `measure_peak_memory`, `copy_bandwidth_gbps` (measured device-to-device copy,
the practical peak bandwidth), `add_common_args` (--quick --device --dtype --providers --modes
--no-memory --results-dir), `stamp()`.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
_CLEAR_REFS = "/proc/self/clear_refs"


class Skip(Exception):
    """Raised by a `setup` factory when a (provider, shape, mode) combination does not apply."""


@dataclasses.dataclass
class BenchSpec:
    name: str
    module: str  # importable module holding the factory, e.g. "benchmarks.logprobs" (for CPU memory children)
    factory: str  # name of the setup(provider, shape, mode, options) function in `module`
    providers: list[str]
    shapes: list[dict]
    modes: list[str]
    options: dict
    baseline: str | None = None
    bytes_moved: Callable[[dict, str, dict], int | None] | None = None
    flops: Callable[[dict, str, dict], int | None] | None = None
    shape_label: Callable[[dict], str] | None = None

    def label(self, shape: dict) -> str:
        if self.shape_label is not None:
            return self.shape_label(shape)
        return ",".join(f"{k}={v}" for k, v in shape.items())


# ----------------------------------------------------------------------------------------------- stamps
def _git_revision() -> str:
    """Short HEAD, "+dirty" when tracked files changed; MDPO_GIT_REV names it for a copy without .git."""
    if os.environ.get("MDPO_GIT_REV"):
        return os.environ["MDPO_GIT_REV"]
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        if rev.returncode != 0:
            return "unknown (no git repository; set MDPO_GIT_REV)"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not runnable; set MDPO_GIT_REV)"


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{_cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def stamp(device: str) -> dict:
    """Provenance for every row: device, versions, git revision, date."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "git": _git_revision(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "load_avg": load_average(),
    }


def load_average() -> str | None:
    """The machine's 1 / 5 / 15-minute load averages, e.g. "2.31 2.05 1.80" (None where unknown)."""
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return None


# ----------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def time_fn(
    fn: Callable[[], Any],
    device: str | torch.device,
    *,
    warmup: int = 2,
    budget_s: float = 2.0,
    min_reps: int = 3,
    max_reps: int = 100,
) -> dict:
    """Median, 20/80 % quantiles, min and max (ms) of `fn`, after `warmup` calls (one provider alone).

    The number of timed calls is budget_s / (time of the last warm-up call), clamped to [min_reps, max_reps].
    """
    device = torch.device(device)
    last = 0.0
    for _ in range(max(1, warmup)):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        last = time.perf_counter() - t0
    reps = int(min(max_reps, max(min_reps, budget_s / max(last, 1e-6))))
    times_ms: list[float] = []
    if device.type == "cuda":
        flush = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device=device)  # larger than any L2
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            flush.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize(device)
        times_ms = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        del flush
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times_ms.append((time.perf_counter() - t0) * 1e3)
    return {**summarize_ms(times_ms), "timing": "sequential"}


def _minor_faults() -> int:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except (ImportError, OSError):
        return 0


def summarize_ms(times_ms: list[float]) -> dict:
    """Median, 20 / 80 % quantiles, min, max and every sample (ms) of a list of call times."""
    return {
        "ms_median": statistics.median(times_ms), "ms_p20": _quantile(times_ms, 0.2), "ms_p80": _quantile(times_ms, 0.8),
        "ms_min": min(times_ms), "ms_max": max(times_ms), "reps": len(times_ms), "ms_all": [round(t, 3) for t in times_ms],
    }


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    device: str | torch.device,
    *,
    warmup: int = 2,
    budget_s: float = 30.0,
    min_rounds: int = 15,
    max_rounds: int = 100,
    verbose: bool = False,
    pause_s: float = 0.0,
) -> dict[str, dict]:
    """Time several callables in rounds: `warmup` calls each, then R rounds of one call each, in an order
    rotated every round; R = budget_s / (one round, from the last warm-up calls), clamped to
    [min_rounds, max_rounds]. Returns {name: summarize_ms(...) + timing="interleaved"} (+ on the CPU
    `minflt_per_call`, the median minor page faults of one call).

    pause_s > 0 sleeps that long before every timed call (outside the timed window), as the rest of a
    training step separates two calls of a kernel: memory freed by the previous call then has time to
    go back to the system (in a VM with free page reporting, back to the host), so a fresh allocation
    costs what it costs a user, not what it costs in a tight loop that reuses just-freed pages.
    """
    device = torch.device(device)
    names = list(fns)
    last = dict.fromkeys(names, 0.0)
    for _ in range(max(1, warmup)):
        for name in names:
            _sync(device)
            t0 = time.perf_counter()
            fns[name]()
            _sync(device)
            last[name] = time.perf_counter() - t0
    rounds = int(min(max_rounds, max(min_rounds, budget_s / max(sum(last.values()), 1e-6))))
    times: dict[str, list[float]] = {name: [] for name in names}
    faults: dict[str, list[int]] = {name: [] for name in names}
    flush = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device=device) if device.type == "cuda" else None
    for i in range(rounds):
        for name in names[i % len(names):] + names[: i % len(names)]:
            if pause_s > 0:
                time.sleep(pause_s)
            if flush is not None:
                flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fns[name]()
                end.record()
                torch.cuda.synchronize(device)
                times[name].append(start.elapsed_time(end))
            else:
                f0 = _minor_faults()
                t0 = time.perf_counter()
                fns[name]()
                times[name].append((time.perf_counter() - t0) * 1e3)
                faults[name].append(_minor_faults() - f0)
        if verbose:
            print(f"  round {i + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1]:.1f}" for n in names) + " ms", flush=True)
    del flush
    out = {}
    for name in names:
        out[name] = {**summarize_ms(times[name]), "timing": "interleaved"}
        if device.type != "cuda":
            out[name]["minflt_per_call"] = int(statistics.median(faults[name]))
    return out


def copy_bandwidth_gbps(device: str | torch.device, nbytes: int = 2**30) -> float:
    """Measured device-to-device copy bandwidth in GB/s (read + write bytes counted): the practical peak."""
    device = torch.device(device)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    timing = time_fn(lambda: dst.copy_(src), device, warmup=3, budget_s=0.5, min_reps=5, max_reps=50)
    gbps = 2 * src.numel() * 4 / (timing["ms_median"] * 1e-3) / 1e9
    del src, dst
    return gbps


# ----------------------------------------------------------------------------------------------- memory
def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not found in /proc/self/status")


def _can_reset_peak_rss() -> bool:
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_peak_memory(fn: Callable[[], Any], device: str | torch.device, *, warmup: int = 1) -> tuple[int, str]:
    """Peak bytes above the current footprint during one call of `fn` (after `warmup` calls), in process.

    CUDA: allocator statistics. CPU: VmHWM after a clear_refs reset (valid only in a process where RSS
    follows live memory — use `memory_in_child` for honest CPU numbers). Returns (bytes, method).
    """
    device = torch.device(device)
    if device.type == "cuda":
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize(device)
        gc.collect()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - base), "cuda-allocator"
    if _can_reset_peak_rss():
        for _ in range(warmup):
            fn()
        gc.collect()
        base_kb = _proc_status_kb("VmRSS")
        _can_reset_peak_rss()  # VmHWM := VmRSS
        fn()
        return max(0, _proc_status_kb("VmHWM") - base_kb) * 1024, "rss-clear_refs"
    base_kb = _proc_status_kb("VmRSS")  # no reset possible: no warm-up, so compile memory is not counted twice
    fn()
    return max(0, _proc_status_kb("VmHWM") - base_kb) * 1024, "hwm-no-reset"


def memory_in_child(spec: BenchSpec, provider: str, shape: dict, mode: str, timeout_s: float = 1800) -> tuple[int, str]:
    """Run `measure_peak_memory` for one combination in a fresh Python process (CPU memory)."""
    payload = json.dumps(
        {"module": spec.module, "factory": spec.factory, "provider": provider, "shape": shape, "mode": mode, "options": spec.options}
    )
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks._harness", "--child", payload],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("MEMORY_RESULT "):
            result = json.loads(line[len("MEMORY_RESULT "):])
            if "skip" in result:
                raise Skip(result["skip"])
            return int(result["bytes"]), result["method"]
    tail = (proc.stderr or proc.stdout)[-2000:]
    raise RuntimeError(f"memory child for {provider} failed (rc={proc.returncode}): {tail}")


def _child_main(payload: str) -> None:
    args = json.loads(payload)
    module = importlib.import_module(args["module"])
    factory = getattr(module, args["factory"])
    try:
        fn = factory(args["provider"], args["shape"], args["mode"], args["options"])
    except Skip as why:
        print("MEMORY_RESULT " + json.dumps({"skip": str(why)}), flush=True)
        return
    nbytes, method = measure_peak_memory(fn, args["options"].get("device", "cpu"))
    print("MEMORY_RESULT " + json.dumps({"bytes": nbytes, "method": method}), flush=True)


# ----------------------------------------------------------------------------------------------- driver
def run_benchmark(
    spec: BenchSpec,
    setup: Callable[[str, dict, str, dict], Callable[[], Any]],
    *,
    quick: bool = False,
    measure_memory: bool = True,
    budget_s: float | None = None,
    verbose: bool = True,
    interleave: bool = False,
    min_rounds: int | None = None,
    pause_s: float = 0.0,
) -> list[dict]:
    """Time (and measure memory of) every provider × shape × mode; returns one dict per row.

    interleave=False: each provider timed alone (`time_fn`, budget_s per row, ≥ 3 calls).
    interleave=True: per (shape, mode), every provider is set up, called once (a failing one gets its
    error row), then all are timed together in rounds (`time_interleaved`, ≥ min_rounds rounds, 15 by
    default, 3 with quick; about budget_s per provider; pause_s before every timed call, see
    `time_interleaved`); memory afterwards, one provider at a time.
    """
    device = spec.options.get("device", "cpu")
    dev = torch.device(device)
    stamp_fields = stamp(device)
    budget = budget_s if budget_s is not None else (0.5 if quick else 3.0)
    rounds_floor = min_rounds if min_rounds is not None else (3 if quick else 15)
    rows: list[dict] = []

    def new_row(provider, shape, mode):
        return {
            "benchmark": spec.name, "provider": provider, "shape": spec.label(shape), "shape_params": shape,
            "mode": mode, **{k: v for k, v in spec.options.items() if isinstance(v, (str, int, float, bool))},
        }

    def error_text(err):
        return f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"

    def free():
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    def memory(row, provider, shape, mode, fn):
        if not measure_memory:
            return
        try:
            if dev.type == "cuda":
                row["peak_mem_bytes"], row["mem_method"] = measure_peak_memory(fn, dev)
            else:
                row["peak_mem_bytes"], row["mem_method"] = memory_in_child(spec, provider, shape, mode)
        except Skip as why:
            row["mem_skipped"] = str(why)
        except Exception as err:  # noqa: BLE001
            row["mem_error"] = error_text(err)

    def finish(row, shape, mode):
        if "ms_median" in row:
            seconds = row["ms_median"] * 1e-3
            nbytes = spec.bytes_moved(shape, mode, spec.options) if spec.bytes_moved else None
            if nbytes:
                row["bytes_moved"] = nbytes
                row["gbps"] = nbytes / seconds / 1e9
            nflops = spec.flops(shape, mode, spec.options) if spec.flops else None
            if nflops:
                row["tflops"] = nflops / seconds / 1e12
        row.update(stamp_fields)
        row["load_avg"] = load_average()  # when this row finished (the stamp's is from the start of the run)
        rows.append(row)
        if verbose:
            print(_one_line(row), flush=True)

    for shape in spec.shapes:
        for mode in spec.modes:
            if not interleave:
                for provider in spec.providers:
                    row = new_row(provider, shape, mode)
                    try:
                        fn = setup(provider, shape, mode, spec.options)
                        timing = time_fn(fn, dev, warmup=2, budget_s=budget, min_reps=3 if not quick else 2)
                        row.update(timing)
                        if measure_memory and dev.type == "cuda":
                            row["peak_mem_bytes"], row["mem_method"] = measure_peak_memory(fn, dev)
                        del fn
                        free()
                        if measure_memory and dev.type != "cuda":
                            row["peak_mem_bytes"], row["mem_method"] = memory_in_child(spec, provider, shape, mode)
                    except Skip as why:
                        row["skipped"] = str(why)
                    except Exception as err:  # noqa: BLE001 — a failing provider is a result, not a crash
                        row["error"] = error_text(err)
                        fn = None
                        free()
                    finish(row, shape, mode)
                continue

            group = {p: new_row(p, shape, mode) for p in spec.providers}
            fns: dict[str, Callable[[], Any]] = {}
            for provider, row in group.items():
                try:
                    fn = setup(provider, shape, mode, spec.options)
                    fn()  # first call (compiles); a provider that fails here drops out of the rounds
                    fns[provider] = fn
                except Skip as why:
                    row["skipped"] = str(why)
                except Exception as err:  # noqa: BLE001
                    row["error"] = error_text(err)
                fn = None
                free()
            if fns:
                if verbose:
                    print(f"# {spec.label(shape)} {mode}: {', '.join(fns)} interleaved", flush=True)
                try:
                    timings = time_interleaved(fns, dev, warmup=1, budget_s=budget * len(fns), min_rounds=rounds_floor,
                                               verbose=verbose, pause_s=pause_s)
                    for timing in timings.values():
                        timing["pause_s"] = pause_s
                    for provider, timing in timings.items():
                        group[provider].update(timing)
                except Exception as err:  # noqa: BLE001
                    for provider in fns:
                        group[provider]["error"] = "during the interleaved rounds: " + error_text(err)
                if dev.type == "cuda":
                    for provider, fn in fns.items():
                        if "ms_median" in group[provider]:
                            memory(group[provider], provider, shape, mode, fn)
                fns.clear()
                free()
                if dev.type != "cuda":
                    for provider, row in group.items():
                        if "ms_median" in row:
                            memory(row, provider, shape, mode, None)
            for row in group.values():
                finish(row, shape, mode)
    if spec.baseline:
        add_ratios(rows, spec.baseline)
    return rows


def add_ratios(rows: list[dict], baseline: str) -> None:
    """Add speedup_vs_<baseline> (baseline time / time) and mem_vs_<baseline> (peak / baseline peak)."""
    base = {(r["shape"], r["mode"]): r for r in rows if r["provider"] == baseline}
    for row in rows:
        ref = base.get((row["shape"], row["mode"]))
        if ref is None:
            continue
        if "ms_median" in row and "ms_median" in ref:
            row[f"speedup_vs_{baseline}"] = ref["ms_median"] / row["ms_median"]
        if row.get("peak_mem_bytes") is not None and ref.get("peak_mem_bytes"):
            row[f"mem_vs_{baseline}"] = row["peak_mem_bytes"] / ref["peak_mem_bytes"]


# ----------------------------------------------------------------------------------------------- reports
def _fmt(value, spec: str = ".2f") -> str:
    return "—" if value is None else format(value, spec)


def _one_line(row: dict) -> str:
    head = f"{row['shape']:>24} {row['mode']:>8} {row['provider']:>16}"
    if "skipped" in row:
        return f"{head}  skipped: {row['skipped']}"
    if "error" in row:
        return f"{head}  ERROR {row['error']}"
    mem = row.get("peak_mem_bytes")
    return (
        f"{head}  {row['ms_median']:10.2f} ms [{row['ms_p20']:.2f}, {row['ms_p80']:.2f}]"
        + (f" min–max {row['ms_min']:.2f}–{row['ms_max']:.2f}" if "ms_min" in row else "")
        + f"  {_fmt(row.get('gbps'), '7.1f')} GB/s  peak +{_fmt(mem / 2**20 if mem is not None else None, '8.1f')} MiB"
    )


def markdown_table(rows: list[dict]) -> str:
    """One markdown table: a row per (shape, mode, provider), ratio columns for every baseline found."""
    speed_cols = sorted({k for r in rows for k in r if k.startswith("speedup_vs_")})
    mem_cols = sorted({k for r in rows for k in r if k.startswith("mem_vs_")})
    spread = any("ms_min" in r for r in rows)
    faults = any("minflt_per_call" in r for r in rows)
    header = ["shape", "mode", "provider", "median ms", "p20–p80 ms", *(["min–max ms"] if spread else []),
              *(["faults/call"] if faults else []), "GB/s", "TFLOP/s", "peak extra MiB", *speed_cols, *mem_cols]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if "ms_median" not in r:
            note = r.get("error") or f"skipped: {r.get('skipped')}"
            lines.append("| " + " | ".join([r["shape"], r["mode"], r["provider"], note] + [""] * (len(header) - 4)) + " |")
            continue
        mem = r.get("peak_mem_bytes")
        cells = [
            r["shape"], r["mode"], r["provider"], f"{r['ms_median']:.2f}", f"{r['ms_p20']:.2f}–{r['ms_p80']:.2f}",
            *([f"{r['ms_min']:.2f}–{r['ms_max']:.2f}" if "ms_min" in r else "—"] if spread else []),
            *([_fmt(r.get("minflt_per_call"), "d")] if faults else []),
            _fmt(r.get("gbps"), ".1f"), _fmt(r.get("tflops"), ".2f"), _fmt(mem / 2**20 if mem is not None else None, ".1f"),
            *[_fmt(r.get(c), ".2f") + ("×" if c in r else "") for c in speed_cols],
            *[_fmt(r.get(c), ".2f") + ("×" if c in r else "") for c in mem_cols],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_table(rows: list[dict]) -> None:
    print(markdown_table(rows))


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Grouped bars of the median time (log scale) per shape, one panel per mode; whiskers = 20/80 %."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r["mode"] for r in rows))
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, axes = plt.subplots(1, len(modes), figsize=(max(6, 2.2 * len(shapes)) * len(modes), 4.5), squeeze=False)
    width = 0.8 / max(1, len(providers))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]  # one fixed colour per provider in every panel
    for ax, mode in zip(axes[0], modes):
        for i, provider in enumerate(providers):
            xs, ys, lo, hi = [], [], [], []
            for j, shape in enumerate(shapes):
                match = [r for r in rows if r["mode"] == mode and r["shape"] == shape and r["provider"] == provider and "ms_median" in r]
                if match:
                    r = match[0]
                    xs.append(j + (i - (len(providers) - 1) / 2) * width)
                    ys.append(r["ms_median"])
                    lo.append(r["ms_median"] - r["ms_p20"])
                    hi.append(r["ms_p80"] - r["ms_median"])
            if xs:
                ax.bar(xs, ys, width, yerr=[lo, hi], label=provider, capsize=2, color=colors[i % len(colors)])
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes, rotation=20, ha="right", fontsize=8)
        timed = [r["ms_median"] for r in rows if r["mode"] == mode and "ms_median" in r]
        if timed and max(timed) > 20 * min(timed):
            ax.set_yscale("log")
        ax.set_ylabel("median time (ms)")
        ax.set_title(mode)
        ax.grid(axis="y", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[i % len(colors)]) for i in range(len(providers))]
    axes[0][-1].legend(handles, providers, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(rows: list[dict], prefix: str, device_tag: str, *, notes: list[str] | None = None, results_dir: Path | str | None = None) -> dict:
    """Write <prefix>-<device_tag>.json / .md / .png under benchmarks/results/; returns the paths."""
    out_dir = Path(results_dir) if results_dir else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / f"{prefix}-{device_tag}"
    first = rows[0] if rows else {}
    provenance = {k: first.get(k) for k in ("device_name", "torch", "triton", "cuda", "git", "date")}
    if rows and rows[-1].get("load_avg"):
        provenance["load (1/5/15 min) at the end"] = rows[-1]["load_avg"]
    with open(base.with_suffix(".json"), "w") as f:
        json.dump({"provenance": provenance, "notes": notes or [], "rows": rows}, f, indent=1, default=str)
    md = [f"# {prefix} ({device_tag})", "", "  ".join(f"**{k}** {v}" for k, v in provenance.items()), ""]
    md += [f"- {n}" for n in (notes or [])]
    md += ["", markdown_table(rows), ""]
    base.with_suffix(".md").write_text("\n".join(md))
    paths = {"json": str(base.with_suffix(".json")), "md": str(base.with_suffix(".md"))}
    try:
        load = rows[-1].get("load_avg") if rows else None
        plot(rows, base.with_suffix(".png"), f"{prefix} — {provenance.get('device_name')} — torch {provenance.get('torch')} — "
                                             f"{provenance.get('git')}" + (f" — load {load}" if load else ""))
        paths["png"] = str(base.with_suffix(".png"))
    except Exception as err:  # noqa: BLE001 — a missing matplotlib must not lose the numbers
        print(f"WARNING: plot not written: {err}", file=sys.stderr)
    return paths


def add_common_args(parser: argparse.ArgumentParser, *, default_modes=("forward", "backward", "full")) -> argparse.ArgumentParser:
    """The options every benchmark script shares."""
    parser.add_argument("--quick", action="store_true", help="small shapes and short timing budget (a smoke run)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="storage dtype")
    parser.add_argument("--providers", default=None, help="comma-separated subset of the providers")
    parser.add_argument("--modes", default=",".join(default_modes), help="comma-separated modes")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--results-dir", default=None, help=f"where to write results (default {RESULTS_DIR})")
    return parser


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        _child_main(sys.argv[2])
    else:
        print(__doc__)


def report(rows: list[dict], prefix: str, device_tag: str, targets: list[str], *, notes: list[str] | None = None,
           results_dir: Path | str | None = None) -> dict:
    """Print the table and one `target:` line each, then write JSON / markdown / PNG (see write_reports)."""
    print()
    print_table(rows)
    print()
    for line in targets:
        print("target:", line)
    paths = write_reports(rows, prefix, device_tag, notes=(notes or []) + ["target: " + t for t in targets],
                          results_dir=results_dir)
    print("wrote", ", ".join(paths.values()))
    return paths
