"""`mdpo-data`: check a preference dataset, preview its corrupted images, or make a sample one.

    mdpo-data check DATASET [--image-root DIR] [--processor DIR] [--max-length N] [--prompt-template model|verbatim]
                    [--system-prompt TEXT] [--max-pixels N] [--min-pixels N] [--truncate-response] [--cache-dir DIR] [--workers N]
    mdpo-data preview DATASET --out FILE.png [-n 8] [--strategy crop] [--area LOW HIGH] [--seed 0]
    mdpo-data make-sample OUT_DIR [--n 200] [--eval 40] [--seed 0] [--image-size 64] [--scenes]

Exit codes: 0 success; 1 `check` found bad records; 2 bad usage or a dataset that cannot be read.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from collections import Counter

import numpy as np

from ..errors import MdpoError
from .corruption import STRATEGIES, CorruptionConfig
from .loading import load_records
from .records import BadRecordError, identical_pairs


def _stats_line(name: str, values: list[int]) -> str:
    if not values:
        return f"  {name:<14} (none)"
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return (f"  {name:<14} min {ordered[0]:>5}  median {statistics.median(ordered):>7.1f}  mean {statistics.fmean(ordered):>7.1f}"
            f"  p95 {p95:>5}  max {ordered[-1]:>5}")


def _check(args) -> int:
    processor = None
    if args.processor is not None:
        from .collate import load_processor

        processor = load_processor(args.processor)
    options = dict(prompt_template=args.prompt_template, system_prompt=args.system_prompt, max_pixels=args.max_pixels,
                   min_pixels=args.min_pixels, truncate_response=args.truncate_response)
    # The same validation (and cache entry) as a training run with these settings: it is reused there.
    result = load_records(args.dataset, image_root=args.image_root, on_bad_record="skip", processor=processor,
                          max_length=args.max_length, family=args.family, collator_options=options,
                          cache_dir=args.cache_dir, log=print, workers=args.workers)
    bad = list(result.skipped)
    good = result.records
    lines = [f"dataset: {result.path}"]
    token_lines, prompt_lines = [], []
    if processor is not None:
        from .collate import PreferenceCollator

        max_length = args.max_length if args.max_length is not None else 10**9
        collator = PreferenceCollator(processor, objective="dpo", max_length=max_length, family=args.family, **options)
        if len(good):
            first = good[0]
            try:
                rendered = collator.prompt_text(first)
                prompt_lines.append(f"prompt of record {first.index} (id {first.sample_id!r}, {first.shape} shape) as the "
                                    f"model sees it ({collator.describe_prompts(good)}):")
            except BadRecordError as err:
                rendered = f"(cannot be rendered: {err.reason})"
                prompt_lines.append(f"prompt of record {first.index} (id {first.sample_id!r}):")
            prompt_lines += ["  | " + line for line in rendered.split("\n")]
        lengths = result.lengths
        rows = lengths["prompt"] + np.maximum(lengths["chosen"], lengths["rejected"])
        limit = f", max_length {args.max_length}" if args.max_length is not None else ""
        token_lines.append(f"tokens ({type(collator.processor).__name__}, family {collator.family}{limit}; responses include EOS; "
                           "valid records):")
        token_lines += [_stats_line(name, lengths[key].tolist()) for name, key in
                        (("prompt", "prompt"), ("image+special", "protected"), ("chosen", "chosen"), ("rejected", "rejected"))]
        token_lines.append(_stats_line("row", rows.tolist()))
    else:
        if len(good) and good[0].shape == "paper":
            prompt_lines.append(f"prompt of record {good[0].index} as written (give --processor DIR to see it rendered "
                                f"with the model's chat template, --prompt-template {args.prompt_template}):")
            prompt_lines += ["  | " + line for line in str(good[0].prompt).split("\n")]
        token_lines.append("words (give --processor DIR for token counts):")
        token_lines += [_stats_line(name, result.lengths[name].tolist()) for name in ("question", "chosen", "rejected")]
    shapes = good.shape_counts if hasattr(good, "shape_counts") else Counter(r.shape for r in good)
    lines.append(f"records: {result.num_read} read, {len(good)} valid, {len(bad)} bad")
    lines.append("shapes: " + (", ".join(f"{k} {v}" for k, v in sorted(shapes.items()) if v) or "none"))
    lines.append(f"images: {good.index.n_images if hasattr(good, 'index') else len({r.image_path for r in good})} distinct files")
    same = identical_pairs(good)  # not bad records: under mdpo the conditional and anchor terms still use them
    lines.append(f"chosen == rejected: {len(same)} pair(s)" + (
        " (their DPO term is constant), e.g. " + ", ".join(f"record {r.index} (id {r.sample_id!r})" for r in same[:5]) if same else ""))
    lines += token_lines
    lines += prompt_lines
    if bad:
        lines.append("bad records:")
        lines += [f"  record {index} (id {sample_id!r}): {reason}" for index, sample_id, reason in sorted(bad, key=lambda b: b[0])]
    print("\n".join(lines))
    return 1 if bad else 0


def _preview(args) -> int:
    from .preview import render_preview

    result = load_records(args.dataset, image_root=args.image_root, on_bad_record="skip", cache_dir=args.cache_dir)
    if result.skipped:
        print(f"skipped {len(result.skipped)} bad records (run `mdpo-data check` for the reasons)")
    if not result.records:
        print("error: no valid record to preview", file=sys.stderr)
        return 2
    config = CorruptionConfig(strategy=args.strategy, area=tuple(args.area), seed=args.seed)
    out = render_preview(result.records, args.out, n=args.n, config=config, epoch=args.epoch)
    print(f"wrote {out} ({min(args.n, len(result.records))} records, strategy {args.strategy})")
    return 0


def _make_sample(args) -> int:
    from .sample import make_sample

    path = make_sample(args.out_dir, n=args.n, seed=args.seed, image_size=args.image_size, n_eval=args.eval)
    held_out = f" and {path.parent / 'eval.json'} ({args.eval} held-out records)" if args.eval else ""
    print(f"wrote {path} ({args.n} records){held_out}, images in {path.parent / 'images'}")
    if args.scenes:
        from .sample import make_scene_sample

        folder = make_scene_sample(args.out_dir, seed=args.seed)
        print(f"wrote co-occurrence scenes in {folder}: sft.json, pairs.json, eval.json (balanced + trap scenes), "
              f"model/ (a random LLaVA-shaped model for configs/tiny-cpu-sft.yaml)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mdpo-data", description="Multimodal preference data tools.")
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check", help="validate every record; exit 1 if any is bad")
    check.add_argument("dataset")
    check.add_argument("--image-root", default=None, help="folder image paths are relative to (default: the dataset's)")
    check.add_argument("--processor", default=None, help="local processor folder, for token-length statistics")
    check.add_argument("--max-length", type=int, default=None, help="with --processor: flag records that cannot fit")
    check.add_argument("--family", default=None, help="model family (default: from the processor)")
    check.add_argument("--prompt-template", default="model", choices=("model", "verbatim"),
                       help="paper-shape prompts: re-rendered with the model's chat template (model, default) or as written")
    check.add_argument("--system-prompt", default=None, help="system message for records that have none")
    check.add_argument("--max-pixels", type=int, default=None, help="Qwen2-VL / 2.5-VL: most pixels per image")
    check.add_argument("--min-pixels", type=int, default=None, help="Qwen2-VL / 2.5-VL: fewest pixels per image")
    check.add_argument("--truncate-response", action="store_true",
                       help="cut responses that do not fit (as data.truncate_response: true) instead of flagging them")
    check.add_argument("--cache-dir", default=None, help="data cache folder (as data.cache_dir; default $MDPO_DATA_CACHE, "
                       "else ~/.cache/mdpo/data): the validation is kept there and a training run with the same settings "
                       "reuses it")
    check.add_argument("--workers", type=int, default=0, help="validate in N processes (as data.num_workers; 0: this one)")
    check.set_defaults(func=_check)

    preview = sub.add_parser("preview", help="PNG grid of original and corrupted images with the texts")
    preview.add_argument("dataset")
    preview.add_argument("--out", required=True, help="PNG file to write")
    preview.add_argument("-n", type=int, default=8, help="records to show (default 8)")
    preview.add_argument("--strategy", default="crop", choices=STRATEGIES)
    preview.add_argument("--area", type=float, nargs=2, default=(0.01, 0.2), metavar=("LOW", "HIGH"),
                         help="crop area range (default 0.01 0.2)")
    preview.add_argument("--seed", type=int, default=0)
    preview.add_argument("--epoch", type=int, default=0)
    preview.add_argument("--image-root", default=None)
    preview.add_argument("--cache-dir", default=None, help="data cache folder (as data.cache_dir)")
    preview.set_defaults(func=_preview)

    sample = sub.add_parser("make-sample", help="write a small synthetic dataset of rendered scenes")
    sample.add_argument("out_dir")
    sample.add_argument("--n", type=int, default=200)
    sample.add_argument("--eval", type=int, default=40, help="held-out records written to eval.json (0: none)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--image-size", type=int, default=64)
    sample.add_argument("--scenes", action="store_true",
                        help="also write OUT_DIR/scenes/: co-occurrence scenes and a small model for the main job (mdpo.data.scenes)")
    sample.set_defaults(func=_make_sample)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (MdpoError, FileNotFoundError, ValueError, ImportError) as err:
        print(f"mdpo-data {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
