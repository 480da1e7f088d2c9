"""Several mdpo trainings in the same processes, for tests/test_engines.py (one launch costs seconds of
imports; the jobs then reuse them):

    torchrun --nproc_per_node 2 tests/engine_runs.py JOBS.json

JOBS.json: a list of {"overrides": [key=value, ...], "kill": "save:N" | "publish:N" | null}. Each job is
`mdpo.train.train(load_config(None, overrides))`, as `torchrun -m mdpo.train` would run it, in one
process group made here and shared by the jobs (an engine leaves a group it did not make alone).
"kill": process 0 SIGKILLs itself just before its N-th checkpoint file write (state.pt and rng-0.pt,
after the engine has written its own files) or its N-th rename of a finished checkpoint folder, as the
OOM killer or a pre-emption would; torchrun then ends the other process.
"""
import json
import os
import signal
import sys


def install_kill(spec: str) -> None:
    import mdpo.checkpoints as checkpoints

    kind, at = spec.split(":")
    calls = {"save": 0, "publish": 0}

    def hooked(name, original):
        def run(*args, **kwargs):
            calls[name] += 1
            if name == kind and calls[name] == int(at):
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)
        return run

    checkpoints._save_file = hooked("save", checkpoints._save_file)
    checkpoints._publish = hooked("publish", checkpoints._publish)


def main(path: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    from mdpo.config import load_config
    from mdpo.train import train

    for job in json.loads(open(path).read()):
        if job.get("kill") and dist.get_rank() == 0:
            install_kill(job["kill"])
        train(load_config(None, job["overrides"]))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
