"""What the tiny end-to-end training tests share: a small sample data set and the override list of a
short tiny-llava run (each test file adds the keys it is about)."""
from mdpo.data import make_sample


def sample_records(tmp_path_factory, n: int, seed: int):
    """`mdpo-data make-sample` data of n training records (no held-out file); returns data.json's path."""
    out = tmp_path_factory.mktemp("sample")
    make_sample(out, n=n, seed=seed, n_eval=0)
    return out / "data.json"


def tiny_run_overrides(data, out, *extra: str) -> list[str]:
    """key=value overrides of a quiet tiny-llava run on `data` into `out`; later keys (`extra`) win."""
    return [f"data.path={data}", f"output_dir={out}", "model.preset=tiny-llava", "micro_batch_size=2",
            "progress_bar=false", "report_to=none", "plots=false", "data.max_length=256", *extra]
