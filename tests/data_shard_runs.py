"""One mdpo training on a `datasets` folder under torchrun, recording which rows each process touches
(for tests/test_data_shards.py):

    torchrun --nproc_per_node 2 tests/data_shard_runs.py OUT_DIR key=value ...

Writes OUT_DIR/rows-RANK.json: {"validated": rows this process validated, "read": rows it read from the
table afterwards (reference pass and training batches)}.
"""
import json
import sys
from pathlib import Path


def main(out: str, overrides: list[str]) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    import mdpo.data.validation as validation
    from mdpo.config import load_config
    from mdpo.data.table import TableRecordReader
    from mdpo.train import train

    validated, read = [], []
    validate_one, raw = validation._validate_one, TableRecordReader.raw
    validation._validate_one = lambda part, index, *args: validated.append(index) or validate_one(part, index, *args)
    TableRecordReader.raw = lambda self, row, span=None: read.append(int(row)) or raw(self, row, span)
    train(load_config(None, overrides))
    Path(out, f"rows-{dist.get_rank()}.json").write_text(json.dumps({"validated": validated, "read": read}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
