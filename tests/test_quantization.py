"""QLoRA (model.quantization): which layers are quantised, correct LoRA gradients through bitsandbytes'
CPU kernels, tiny quantised LLaVA / Qwen2-VL runs, the reference cache's fingerprint, final/ on an
unquantised base, mdpo-eval on either base, and the one-line errors."""
import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")

from mdpo import train as train_module  # noqa: E402
from mdpo.components import build_model, seed_everything  # noqa: E402
from mdpo.config import load_config  # noqa: E402
from mdpo.data import make_sample  # noqa: E402
from mdpo.errors import UnsupportedModelError  # noqa: E402
from mdpo.models import apply_lora, build_preset, language_model_linear_names, load_model  # noqa: E402
from mdpo.models.quantization import (QuantizationSettings, check_quantized_placement, quantization_of,  # noqa: E402
                                      quantized_layer_names)
from mdpo.reference_cache import StaleCacheError  # noqa: E402
from mdpo_kernels import linear_sequence_logprobs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NF4 = QuantizationSettings("nf4", double_quant=True, compute_dtype=torch.float32)
INT8 = QuantizationSettings("int8")


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    make_sample(out, n=8, seed=3, n_eval=3)
    return out / "data.json"


def _overrides(sample, out, *extra):
    return [f"data.path={sample}", f"output_dir={out}", "model.preset=tiny-llava", "micro_batch_size=1",
            "effective_batch_size=2", "max_steps=4", "epochs=1", "lr=1e-2", "model.lora_r=8", "model.lora_alpha=16",
            "model.lora_dropout=0", "progress_bar=false", "report_to=none", "plots=false", "data.max_length=256",
            "model.dtype=float32", *extra]


def _batch(loaded, rows=3, length=40, supervised=20):
    vocab = loaded.model.config.get_text_config().vocab_size
    ids = torch.randint(5, vocab - 1, (rows, length), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :-supervised] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels


def _lora_logps_and_grads(loaded, model, batch, labels):
    """(policy, Σ log-probs through LoRA, LoRA gradients); B drawn non-zero, so every layer's gradient flows."""
    torch.manual_seed(0)
    policy = apply_lora(model, loaded.family, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    policy.train()
    weight, bias = loaded.adapter.lm_head(policy)
    logps = linear_sequence_logprobs(loaded.adapter.hidden_states(policy, batch), weight, labels, bias)
    logps.sum().backward()
    return policy, logps.detach(), {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------------------- pieces
@pytest.mark.parametrize("preset", ["tiny-llava", "tiny-qwen2-vl"])
def test_only_the_language_models_linear_layers_are_quantised(preset):
    plain = build_preset(preset)
    loaded = load_model(preset, quantization=NF4)
    names = quantized_layer_names(loaded.model)
    assert names == language_model_linear_names(plain.model, plain.family) and names
    quantised = loaded.model.state_dict()
    for name, value in plain.model.state_dict().items():  # vision tower, projector, embeddings, norms, LM head
        if name.rsplit(".", 1)[0] not in names:
            assert torch.equal(quantised[name], value), name
    assert type(loaded.model.lm_head) is torch.nn.Linear and loaded.model.lm_head.weight.dtype == torch.float32
    assert quantization_of(loaded.model) == {"method": "nf4", "double_quant": True, "compute_dtype": "float32"}
    # nf4 of an N(0, 0.02) weight: ~10 % relative error, so the layers really are 4-bit
    layer = names[0]
    original = dict(plain.model.named_modules())[layer].weight.detach()
    import bitsandbytes.functional as F

    module = dict(loaded.model.named_modules())[layer]
    restored = F.dequantize_4bit(module.weight.data, module.weight.quant_state)
    assert 0.02 < float((restored - original).norm() / original.norm()) < 0.3


def test_nf4_lora_gradients_after_a_reference_pass_equal_those_of_the_dequantised_model():
    """bitsandbytes' Linear4bit repacks its weight for a backward-less CPU kernel on its first eval-mode
    no-grad call (what the cached reference pass makes); unpinned, the LoRA gradients of every later
    step are wrong (~100 % relative error). Compared with the same model after `dequantize()`."""
    loaded = load_model("tiny-llava", quantization=NF4)
    dequantised = copy.deepcopy(loaded.model).dequantize()
    batch, labels = _batch(loaded)
    loaded.model.eval()
    with torch.no_grad():  # the reference pass
        reference = loaded.adapter.hidden_states(loaded.model, batch)
    policy, logps, grads = _lora_logps_and_grads(loaded, loaded.model, batch, labels)
    _, want_logps, want = _lora_logps_and_grads(loaded, dequantised, batch, labels)
    torch.testing.assert_close(logps, want_logps, rtol=1e-5, atol=1e-4)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want[name], rtol=1e-4, atol=1e-6, msg=name)
    with policy.disable_adapter(), torch.no_grad():  # the reference is the base, adapters off
        torch.testing.assert_close(loaded.adapter.hidden_states(policy, batch), reference, rtol=0, atol=0)


def test_int8_reference_pass_and_policy_at_step_0_agree():
    """On the CPU bitsandbytes' Linear8bitLt takes an int8 kernel in eval mode and the dequantised weight
    in train mode (0.75 % apart on this model); both modes are kept on the second path."""
    loaded = load_model("tiny-llava", quantization=INT8)
    batch, labels = _batch(loaded)
    loaded.model.eval()
    with torch.no_grad():
        reference = loaded.adapter.hidden_states(loaded.model, batch)
    policy = apply_lora(loaded.model, loaded.family, r=4, alpha=8, dropout=0.0).train()  # B = 0: policy = base
    torch.testing.assert_close(loaded.adapter.hidden_states(policy, batch).detach(), reference, rtol=1e-6, atol=1e-6)


def test_a_model_without_quantised_layers_is_refused_naming_the_key():
    loaded = build_preset("tiny-llava")
    with pytest.raises(UnsupportedModelError, match=r"model.quantization=nf4: no linear layer of the llava language model"):
        check_quantized_placement(loaded.model, loaded.adapter, "nf4")


# ------------------------------------------------------------------------------------- training
def _train_capturing_model(cfg, monkeypatch):
    """train(cfg) -> (summary, the trained LoadedModel): build_model as train.py calls it, recorded."""
    built = {}

    def recording_build_model(*args, **kwargs):
        built["loaded"], reference = build_model(*args, **kwargs)
        return built["loaded"], reference

    monkeypatch.setattr(train_module, "build_model", recording_build_model)
    return train_module.train(cfg), built["loaded"]


@pytest.fixture(scope="module")
def nf4_runs(sample, tmp_path_factory):
    """4 nf4 steps of tiny-llava and tiny-qwen2-vl: {preset: (config, summary, trained model)}."""
    runs = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        for preset in ("tiny-llava", "tiny-qwen2-vl"):
            cfg = load_config(None, _overrides(sample, tmp_path_factory.mktemp(preset), f"model.preset={preset}",
                                               "model.quantization=nf4"))
            runs[preset] = (cfg, *_train_capturing_model(cfg, monkeypatch))
    return runs


@pytest.mark.parametrize("preset", ["tiny-llava", "tiny-qwen2-vl"])
def test_a_quantised_model_trains_lora_only_from_3ln2(preset, nf4_runs):
    cfg, summary, trained = nf4_runs[preset]
    assert summary["steps"] == 4 and summary["first"]["loss/total"] == pytest.approx(3 * math.log(2), abs=1e-5)
    seed_everything(cfg.seed)
    fresh, _ = build_model(cfg, torch.device("cpu"))  # the run's starting point: the same quantised base
    before, after = fresh.model.state_dict(), trained.model.state_dict()
    assert before.keys() == after.keys() and any(k.endswith(".absmax") for k in after)
    lora_b = [k for k in after if "lora_B" in k]
    assert lora_b and all(after[k].abs().max() > 0 for k in lora_b)  # LoRA B starts at zero: every one moved
    for key in after:
        if "lora_" not in key:
            assert torch.equal(before[key], after[key]), key  # packed 4-bit weights, their scales, the rest


def _losses(out):
    return [json.loads(line)["loss/total"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_two_cpu_processes_train_a_quantised_model_as_one_does(sample, nf4_runs, tmp_path):
    """DDP (accelerate launch, gloo) over the nf4 base: each process quantises the same weights; the
    losses are the one-process run's (the same micro-batches of 1 pair, gradients averaged by DDP)."""
    cfg, _, _ = nf4_runs["tiny-llava"]
    out = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mdpo.train"]
    proc = subprocess.run([*launch, *_overrides(sample, out, "model.quantization=nf4")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 4
    assert _losses(out)[0] == pytest.approx(3 * math.log(2), abs=1e-5)
    assert _losses(out) == pytest.approx(_losses(cfg.output_dir), rel=1e-5) and _losses(out)[-1] < _losses(out)[0] - 1e-3


def test_caches_of_the_quantised_and_the_unquantised_base_are_not_mixed(sample, nf4_runs, tmp_path, capsys):
    cfg, _, _ = nf4_runs["tiny-llava"]
    nf4_cache = Path(cfg.output_dir) / "reference_logps.pt"
    plain = _overrides(sample, tmp_path / "plain", "max_steps=1")
    with pytest.raises(StaleCacheError, match=r"model.quantization: cache has \{.*'method': 'nf4'.*\}, this run has None"):
        train_module.train(load_config(None, [*plain, f"reference.cache_path={nf4_cache}"]))
    train_module.train(load_config(None, plain))  # an unquantised cache ...
    quantised = _overrides(sample, tmp_path / "nf4", "max_steps=1", "model.quantization=nf4",
                           f"reference.cache_path={tmp_path / 'plain' / 'reference_logps.pt'}")
    assert train_module.main(quantised) == 2  # ... is refused by a quantised run
    err = capsys.readouterr().err
    assert "computed for a different setting" in err and "model.quantization: cache has None" in err


def test_final_adapter_loads_on_the_unquantised_base(nf4_runs):
    from peft import PeftModel

    cfg, _, trained = nf4_runs["tiny-llava"]
    base = build_preset("tiny-llava", seed=cfg.seed)
    adapted = PeftModel.from_pretrained(base.model, str(Path(cfg.output_dir) / "final"))
    assert not quantized_layer_names(adapted)
    loaded_lora = {k: v for k, v in adapted.state_dict().items() if "lora_" in k}
    trained_lora = {k: v for k, v in trained.model.state_dict().items() if "lora_" in k}
    assert loaded_lora.keys() == trained_lora.keys() and loaded_lora
    for key, value in trained_lora.items():
        assert torch.equal(loaded_lora[key], value), key


def test_mdpo_eval_scores_a_quantised_run_on_either_base(sample, nf4_runs, tmp_path, capsys):
    from mdpo.eval.hallucination import main as hallucination_main
    from mdpo.eval.cli import main as preference_main

    cfg, _, _ = nf4_runs["tiny-llava"]
    run = Path(cfg.output_dir)
    ckpt = run / "checkpoints" / "step-000004"
    eval_data = sample.parent / "eval.json"
    results = {}
    for quantization in ("nf4", "none"):  # default: the run's own base (nf4); model.quantization=none: full precision
        out = tmp_path / f"pref-{quantization}.json"
        extra = [] if quantization == "nf4" else ["model.quantization=none"]
        assert preference_main([str(ckpt), "--data", str(eval_data), "--out", str(out), *extra]) == 0
        results[quantization] = json.loads(out.read_text())
    assert results["nf4"]["pairs"] == results["none"]["pairs"] == 3
    assert results["nf4"]["logps/chosen"] != results["none"]["logps/chosen"]  # two different bases
    for quantization in ("none", "nf4"):  # final/ (a peft adapter) on either base
        out = tmp_path / f"hallucination-{quantization}"
        assert hallucination_main(["--model", "tiny-llava", "--preset-seed", str(cfg.seed), "--adapter", str(run / "final"),
                                   "--data", str(eval_data), "--out", str(out), "--max-new-tokens", "4", "--no-reliance",
                                   "--no-preference", "--no-progress", "--quantization", quantization]) == 0
        identities = [json.loads(p.read_text())["model"] for p in out.glob("*/generated/answers-image.settings.json")]
        assert sorted(i["kind"] for i in identities) == ["adapter", "base"]
        assert all(i.get("quantization", {}).get("method", "none") == quantization for i in identities)
    capsys.readouterr()


# ---------------------------------------------------------------------------------------- errors
def test_quantisation_errors_are_one_line_naming_the_key(sample, tmp_path, capsys, monkeypatch):
    import importlib.util

    base = _overrides(sample, tmp_path / "bad", "model.quantization=nf4")
    assert train_module.main([*base, "model.finetune=full"]) == 2
    assert "model.quantization=nf4 needs model.finetune: lora" in capsys.readouterr().err
    assert train_module.main([*base, "save_merged=true"]) == 2
    assert "save_merged=true with model.quantization=nf4" in capsys.readouterr().err
    assert train_module.main([*base, "model.quantization=int4"]) == 2
    assert "model.quantization='int4' is not one of" in capsys.readouterr().err
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    assert train_module.main(base) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "model.quantization=nf4 needs the bitsandbytes package" in err and "model.quantization: none" in err


def test_float_storage_for_sharding_engines_holds_the_same_nf4_weights():
    """model.quantization_storage: bfloat16 (what FSDP / ZeRO-3 need to shard the packed weights) changes
    only the container: the same bytes, the same hidden states."""
    uint8 = load_model("tiny-llava", quantization=NF4)
    bf16 = load_model("tiny-llava", quantization=QuantizationSettings("nf4", compute_dtype=torch.float32, storage=torch.bfloat16))
    name = quantized_layer_names(bf16.model)[0]
    packed = dict(bf16.model.named_modules())[name].weight
    assert packed.dtype == torch.bfloat16
    assert torch.equal(packed.data.view(torch.uint8).flatten(), dict(uint8.model.named_modules())[name].weight.data.flatten())
    batch, _ = _batch(uint8)
    with torch.no_grad():
        torch.testing.assert_close(bf16.adapter.hidden_states(bf16.model, batch), uint8.adapter.hidden_states(uint8.model, batch),
                                   rtol=0, atol=0)


def test_a_model_folder_loads_quantised_as_the_preset_does(tmp_path):
    """model.path: from_pretrained(folder, quantization_config=…) quantises while loading; the same weights
    as the in-memory preset path, so the same numbers."""
    from mdpo.models import save_preset

    folder = save_preset("tiny-qwen2-vl", tmp_path / "qwen")
    from_folder = load_model(folder, quantization=NF4)
    from_preset = load_model("tiny-qwen2-vl", quantization=NF4)
    assert quantized_layer_names(from_folder.model) == quantized_layer_names(from_preset.model)
    batch, _ = _batch(from_preset)
    with torch.no_grad():
        torch.testing.assert_close(from_folder.adapter.hidden_states(from_folder.model, batch),
                                   from_preset.adapter.hidden_states(from_preset.model, batch), rtol=0, atol=0)
