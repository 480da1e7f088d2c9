"""Generation shared over processes (mdpo.eval.generate.sharded_generate): the same number of generate calls
on every process (FSDP2 / ZeRO-3 need it), and 2 real CPU processes (torchrun, gloo) writing the
answers files of 1 process for POPE and AMBER through `mdpo-eval suite`."""
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from benchmark_files import make_amber_dir, make_pope_questions
from mdpo.eval import generate as gen
from mdpo.eval.generate import GenerationOptions, Generated, Question, shard_rounds, sharded_generate

ROOT = Path(__file__).resolve().parent.parent


def _threads_as_processes(world, questions, batch_size, monkeypatch):
    """Run sharded_generate on `world` threads standing for processes, with an all_gather built on a
    barrier and a fake generate_batch that answers a question with its id. -> (results per rank, calls per rank)."""
    calls = {r: [] for r in range(world)}
    slots, barrier = [None] * world, threading.Barrier(world)
    local = threading.local()

    def fake_generate_batch(gm, chunk, options, images=None, synced_gpus=None):
        calls[local.rank].append(([q.sample_id for q in chunk], synced_gpus))
        return [Generated(ids=[1], text=f"answer to {q.sample_id}", finished=True) for q in chunk]

    def all_gather(obj):
        slots[local.rank] = obj
        barrier.wait()
        out = list(slots)
        barrier.wait()  # nobody overwrites a slot before every rank has read them all
        return out

    monkeypatch.setattr(gen, "generate_batch", fake_generate_batch)
    results, errors = {}, []

    def run(rank):
        local.rank = rank
        try:
            results[rank] = sharded_generate(None, questions, GenerationOptions(batch_size=batch_size), rank=rank,
                                             world=world, all_gather=all_gather, synced_gpus=True, image_of=lambda q: None)
        except Exception as exc:  # noqa: BLE001 — reported below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    [t.start() for t in threads]
    [t.join(timeout=30) for t in threads]
    assert not errors, errors
    return results, calls


@pytest.mark.parametrize("world, n, batch_size", [(2, 5, 2), (3, 2, 4), (2, 8, 2), (4, 1, 1)])
def test_every_process_makes_the_same_number_of_generate_calls(world, n, batch_size, monkeypatch):
    questions = [Question(i, f"q{i}", "x.png", "x.png", f"question {i}") for i in range(n)]
    results, calls = _threads_as_processes(world, questions, batch_size, monkeypatch)
    rounds = shard_rounds(n, world, batch_size)
    assert all(len(c) == rounds for c in calls.values()), calls  # padding batches included
    for rank in range(world):  # every process returns every answer, in question order
        assert [g.text for g, _ in results[rank]] == [f"answer to q{i}" for i in range(n)]
    asked = [i for c in calls.values() for ids, _ in c for i in ids]
    padding = sum(rounds - -(-len(range(r, n, world)) // batch_size) for r in range(world))  # one-row batches
    assert set(asked) == {f"q{i}" for i in range(n)} and len(asked) == n + padding
    assert all(flag is True for c in calls.values() for _, flag in c)  # synced_gpus reaches generate


SUITE_ARGS = ["--model", "tiny-llava", "--batch-size", "3", "--max-new-tokens", "8", "--yes-no-max-new-tokens", "4",
              "--no-progress"]


def _suite_here(out: Path, data: Path) -> None:
    """One process: this one (no second interpreter start), on one thread like the launched ones."""
    from mdpo.eval.cli import main as mdpo_eval

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert mdpo_eval(["suite", "--pope", str(data / "coco_pope_random.json"), "--amber", str(data / "amber"),
                          *SUITE_ARGS, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)


def _suite_on_two_processes(out: Path, data: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mdpo.eval",
           "suite", "--pope", str(data / "coco_pope_random.json"), "--amber", str(data / "amber"), *SUITE_ARGS, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_two_cpu_processes_write_the_answers_of_one(tmp_path):
    make_pope_questions(tmp_path)  # 12 yes/no questions on 2 images: 6 per process, 2 batches of 3 each
    make_amber_dir(tmp_path / "amber", images=True)  # 2 descriptions + 7 yes/no: 4 | 3 + a padding batch
    _suite_here(tmp_path / "one", tmp_path)
    _suite_on_two_processes(tmp_path / "two", tmp_path)
    for name in ("pope/base/answers-random.jsonl", "amber/base/responses.json", "pope/metrics.json", "amber/metrics.json",
                 "metrics.json", "table.md"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    for name in ("pope/base/generated/random.jsonl", "amber/base/generated/discriminative.jsonl",
                 "amber/base/generated/generative.jsonl"):
        rows = [[{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in (tmp_path / d / name).read_text().splitlines()]
                for d in ("one", "two")]
        assert rows[0] == rows[1] and len(rows[0]) in (12, 7, 2), name
    responses = json.loads((tmp_path / "two" / "amber" / "base" / "responses.json").read_text())
    assert [r["id"] for r in responses] == list(range(1, 10))  # question order
    assert all(r["response"] in ("Yes", "No") for r in responses[2:])  # yes/no normalised for AMBER's script
    assert (tmp_path / "two" / "pope" / "pope.png").is_file() and (tmp_path / "two" / "amber" / "amber.png").is_file()
