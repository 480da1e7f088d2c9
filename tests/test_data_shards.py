"""Data over several processes (issue 18): on 2 CPU processes (gloo), each validates its share of a
`datasets` table's rows and afterwards reads only the rows it scores or trains on; no process reads the
whole table."""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mdpo.train import epoch_order, micro_batches, reached_entries

datasets = pytest.importorskip("datasets")
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from PIL import Image

    messages = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})
    rows = [{"images": [Image.new("RGB", (48, 40), (9 * i, 255 - 9 * i, 60))],
             "prompt": [{"role": "user", "content": f"What colour is picture {i}?"}],
             "chosen": [{"role": "assistant", "content": "A colour."}],
             "rejected": [{"role": "assistant", "content": f"Colour {i}."}]} for i in range(20)]
    table = datasets.Dataset.from_list(rows, features=datasets.Features(
        {"images": datasets.List(datasets.Image()), "prompt": messages, "chosen": messages, "rejected": messages}))
    out = tmp_path_factory.mktemp("shards") / "prefs"
    table.save_to_disk(str(out))
    return out


def test_each_process_validates_and_reads_only_its_rows(folder, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    overrides = [f"data.path={folder}", f"output_dir={out}", "model.preset=tiny-llava", "micro_batch_size=2",
                 "effective_batch_size=4", "max_steps=2", "epochs=1", "progress_bar=false", "report_to=none", "plots=false",
                 "data.max_length=256", "seed=5"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(ROOT / "tests" / "data_shard_runs.py"), str(out), *overrides]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stdout[-2000:] + stderr[-3000:]
    assert "20 records validated in" in stdout and "over 2 process(es)" in stdout
    rows = [json.loads((out / f"rows-{rank}.json").read_text()) for rank in range(2)]
    assert [r["validated"] for r in rows] == [list(range(0, 10)), list(range(10, 20))]  # contiguous halves
    # what each process scores (its [rank::2] share of the reference entries) and trains on (its micro-batches)
    reached = reached_entries(20, 5, steps_per_epoch=5, total_steps=2, per_step=4, n_corruption_epochs=1)
    pairs = sorted({i for idx in reached.values() for i in idx})
    for rank in range(2):
        scored = set(pairs[rank::2]) | {i for idx in reached.values() for i in idx[rank::2]}
        trained = {i for batch in micro_batches(epoch_order(20, 5, 0), 2, rank, 2, steps=2, accum=1) for i in batch}
        assert set(rows[rank]["read"]) == scored | trained, rank
        assert len(set(rows[rank]["read"])) < 20  # never the whole table
