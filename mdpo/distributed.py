"""Everything engine-specific about training on several processes, behind one switch:
`distributed.engine: ddp | fsdp2 | zero2 | zero3`.

    engine = make_engine(cfg)                                 # process group, device, rank, world
    module, optimizer = engine.prepare(scorer, trainable, cfg, accum)
    with engine.accumulate(module, last=...):
        loss, metrics = criterion(policy_logps=module(batch), ref_logps=ref)
        engine.backward(loss)
    grad_norm = engine.step(trainable)                        # once per optimizer step
    engine.save(folder, module, optimizer) / engine.load(...) # the engine's own checkpoint format
    weights = engine.gather_weights(model, names)             # whole tensors on the main process, for final/

The engines are used as they are, never re-implemented:
- ddp: torch `DistributedDataParallel`; every process holds the whole model, gradients and optimizer
  state (bf16 weights train through `mdpo.optim.MasterWeightAdamW`); checkpoints are mdpo's own
  `trainable.pt` + `state.pt`.
- fsdp2: torch `fully_shard` (per-parameter sharding, DTensor): every decoder / vision layer (the
  model's `_no_split_modules`), the LM head and the scorer (root) are units. bf16 weights that train are
  kept as fp32 shards and computed in bf16 (`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`:
  FSDP2's own master weights, the numerics of MasterWeightAdamW with fp32 gradient reduction).
  Checkpoints: torch distributed checkpoint (DCP), which reshards on load, so a run resumes with
  another number of processes.
- zero2 / zero3: DeepSpeed ZeRO (`deepspeed.initialize` with mdpo's AdamW as the client optimizer);
  bf16 weights train through DeepSpeed's own bf16 optimizer (fp32 master partitions). Checkpoints:
  DeepSpeed's `save_checkpoint`; they resume with the same number of processes only.

What every engine guarantees the training loop (the recipe reads the same for all of them):
- Under fsdp2 and zero3 every forward is a collective (the layers' weights are gathered), so every
  process must run the same number of forwards, each calling the language model once
  (`SequenceScorer(single_forward=True)`); the reference pass, held-out evaluation and generation pad
  the short processes with forwards whose results are dropped (`engine.shards_weights`).
- The fused LM head reads its weight only inside the head's own forward (`mdpo.scoring.FusedLMHead`),
  so FSDP2 and ZeRO-3 gather it there and reduce its gradient into the shard with their own hooks.

Launchers: `torchrun --nproc_per_node N -m mdpo.train CONFIG distributed.engine=E` for every engine,
on CPU (gloo) and GPU (nccl); `mdpo-train` alone is one process (a one-process group is made for the
sharding engines). `accelerate launch --config_file configs/accelerate/X.yaml` works too: its
environment says which engine the accelerate config asks for, and a disagreement with
`distributed.engine` is refused. So is `deepspeed --num_gpus N`.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path
import torch

from .config import ConfigError, TrainConfig

ENGINES = ("ddp", "fsdp2", "zero2", "zero3")
SHARDING_ENGINES = ("fsdp2", "zero3")  # the weights are sharded: every forward is a collective
_LOW_PRECISION = (torch.bfloat16, torch.float16)


class DistributedError(ConfigError):
    """A distributed setting, launcher or package that does not fit the run; the message names the key."""


# -------------------------------------------------------------------------------------- launchers
def launcher_engine(env=os.environ) -> tuple[str | None, str]:
    """(engine the launcher asks for, how it says so): `accelerate launch` with a DeepSpeed or FSDP
    config sets ACCELERATE_USE_DEEPSPEED / ACCELERATE_USE_FSDP in the processes' environment; None
    for torchrun, `deepspeed`, plain or DDP accelerate configs (any engine may run under them)."""
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
        return (f"zero{stage}" if stage in ("2", "3") else f"DeepSpeed ZeRO stage {stage}"), \
            f"the accelerate config (distributed_type: DEEPSPEED, zero_stage: {stage})"
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        version = env.get("FSDP_VERSION", "1")
        return ("fsdp2" if version == "2" else "FSDP version 1"), f"the accelerate config (distributed_type: FSDP, fsdp_version: {version})"
    return None, ""


def check_launcher(cfg: TrainConfig, env=os.environ) -> None:
    """Refuse a launcher whose engine disagrees with `distributed.engine` (one line naming both)."""
    wanted, source = launcher_engine(env)
    engine = cfg.distributed.engine
    if wanted is None:
        return
    if wanted not in ENGINES:
        raise DistributedError(f"{source} asks for {wanted}, which mdpo does not run; use distributed.engine: "
                               f"{' | '.join(ENGINES)} with a matching accelerate config (configs/accelerate/)")
    if wanted != engine:
        raise DistributedError(f"{source} asks for {wanted}, but distributed.engine={engine}: set distributed.engine={wanted}, "
                               f"or launch with the accelerate config of {engine} (configs/accelerate/)")
    reshard = env.get("FSDP_RESHARD_AFTER_FORWARD", "").lower()
    if wanted == "fsdp2" and reshard in ("true", "false") and (reshard == "true") != cfg.distributed.reshard_after_forward:
        raise DistributedError(f"{source} sets fsdp_reshard_after_forward: {reshard}, but distributed.reshard_after_forward="
                               f"{str(cfg.distributed.reshard_after_forward).lower()}: set them alike")
    if wanted.startswith("zero"):  # what accelerate's DeepSpeed fields say must be what this run does
        offload = {k: env.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{k.upper()}_DEVICE", "none").lower() for k in ("optimizer", "param")}
        mine = {"optimizer": "cpu" if cfg.distributed.offload in ("optimizer", "all") else "none",
                "param": "cpu" if cfg.distributed.offload == "all" else "none"}
        for key in ("optimizer", "param"):
            if offload[key] not in ("", "none", mine[key]):
                raise DistributedError(f"{source} sets offload_{key}_device: {offload[key]}, but distributed.offload="
                                       f"{cfg.distributed.offload}: set distributed.offload to match")
        clipping = env.get("ACCELERATE_GRADIENT_CLIPPING", "").lower()
        if clipping not in ("", "auto", "none") and float(clipping) != cfg.max_grad_norm:
            raise DistributedError(f"{source} sets gradient_clipping: {clipping}, but max_grad_norm={cfg.max_grad_norm}: "
                                   "remove it from the accelerate config (mdpo clips with max_grad_norm)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------- engines
class Engine:
    """The processes of a run and how its model trains on them. Subclasses: one per engine."""

    name = "ddp"
    shards_weights = False  # fsdp2 / zero3: every forward is a collective; same count on every process
    needs_group = False  # make a process group even for one process (the engine works on one)

    def __init__(self, cfg: TrainConfig):
        import torch.distributed as dist

        self.cfg = cfg
        self.settings = cfg.distributed
        self.accum = 1
        self._owns_group = False
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if not dist.is_initialized() and (world > 1 or self.needs_group):
            if world == 1 and "MASTER_ADDR" not in os.environ:  # one process started without a launcher
                os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                                  LOCAL_RANK="0")
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, device_id=self.device if self.device.type == "cuda" else None)
            self._owns_group = True
        self.distributed = dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1

    # ---- processes ------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def print(self, *args, **kwargs) -> None:
        if self.is_main:
            print(*args, **kwargs, flush=True)

    def barrier(self) -> None:
        if self.distributed and self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def reduce(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        """Sum or mean of a tensor over the processes (a copy; the input is left alone)."""
        if not self.distributed or self.world == 1:
            return tensor.clone()
        import torch.distributed as dist

        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out / self.world if op == "mean" else out

    def close(self) -> None:
        """Wait for every process, then end the process group this engine made (the processes abort at
        exit otherwise)."""
        if self._owns_group:
            import torch.distributed as dist

            self.barrier()
            dist.destroy_process_group()
            self._owns_group = False

    # ---- model ----------------------------------------------------------------------------------
    def prepare(self, scorer, trainable: list[torch.nn.Parameter], accum: int):
        """(the module the loop calls, the torch optimizer the scheduler drives)."""
        from .optim import make_optimizer

        self.accum = accum
        scorer.to(self.device)
        self.optimizer = make_optimizer(trainable, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        if self.world == 1:
            return scorer, self.optimizer
        from torch.nn.parallel import DistributedDataParallel

        module = DistributedDataParallel(scorer, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return module, self.optimizer

    def prepare_reference(self, reference_scorer):
        """The frozen reference scorer of a live-reference full fine-tuning, placed like the policy."""
        return reference_scorer.to(self.device)

    def unwrap(self, module):
        """The `SequenceScorer` inside what `prepare` returned (call it for forwards without gradients)."""
        return getattr(module, "module", module)

    def accumulate(self, module, last: bool):
        """Context of one micro-batch's forward and backward: gradients are synchronised on the last
        micro-batch of an optimizer step only (DDP's no_sync on the others)."""
        if self.world > 1 and not last:
            return module.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def step(self, trainable: list[torch.nn.Parameter]) -> torch.Tensor:
        """Clip to max_grad_norm, one optimizer step, gradients cleared; -> the norm before clipping."""
        norm = torch.nn.utils.clip_grad_norm_(trainable, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def generation_context(self, module):
        """Context around `generate` on the policy (FSDP2 gathers the root's weights for it)."""
        return contextlib.nullcontext()

    @property
    def synced_gpus(self) -> bool:
        """transformers' generate(synced_gpus=...): processes keep stepping until all are done."""
        return self.shards_weights and self.world > 1

    # ---- checkpoints ----------------------------------------------------------------------------
    def save(self, folder: Path, module, optimizer) -> dict:
        """Write the trained weights and the optimizer state into a checkpoint folder (every process
        calls it; a collective for the sharding engines). -> entries for the main process's state.pt."""
        from . import checkpoints

        if self.is_main:
            model = self.unwrap(module).model
            checkpoints._save_file({n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}, folder / "trainable.pt")
        return {"optimizer": optimizer.state_dict()}

    def load(self, folder: Path, module, optimizer, state: dict) -> None:
        """Restore what `save` wrote (after the checkpoint's files were checked)."""
        from .checkpoints import CheckpointError, load_trainable

        load_trainable(self.unwrap(module).model, folder, "resume_from")
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, RuntimeError, TypeError, IndexError) as exc:  # torch's own checks of the groups and sizes
            raise CheckpointError(f"resume_from={folder}: state.pt's optimizer state does not fit this run "
                                  f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None

    def gather_weights(self, model: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor] | None:
        """{name: whole tensor on the CPU} on the main process (None elsewhere): the trained parameters,
        or the whole state dict; for writing final/."""
        if not self.is_main:
            return None
        if trainable_only:
            return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
        return {n: t.detach().cpu() for n, t in model.state_dict().items()}


class FSDP2Engine(Engine):
    name = "fsdp2"
    shards_weights = True
    needs_group = True

    def _shard_units(self, scorer, train: bool) -> None:
        """fully_shard every layer (the model's _no_split_modules), the LM head (unless tied to the input
        embeddings, which the root holds) and the scorer itself (the root)."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        mesh = init_device_mesh(self.device.type, (self.world,))
        model = scorer.model
        base = scorer.adapter.unwrap(model)
        low = [p.dtype for p in model.parameters() if p.dtype in _LOW_PRECISION]
        if train:
            for p in model.parameters():  # trained weights are kept (sharded) in fp32: FSDP2's master weights
                if p.requires_grad and p.dtype in _LOW_PRECISION:
                    p.data = p.data.float()
        mp = MixedPrecisionPolicy(param_dtype=low[0], reduce_dtype=torch.float32) if low else MixedPrecisionPolicy()
        offload = CPUOffloadPolicy(pin_memory=self.device.type == "cuda") if self.settings.offload == "all" else OffloadPolicy()
        kwargs = dict(mesh=mesh, mp_policy=mp, offload_policy=offload)
        layer_classes = set(getattr(base, "_no_split_modules", None) or ())
        for module in list(model.modules()):
            if type(module).__name__ in layer_classes:
                fully_shard(module, reshard_after_forward=self.settings.reshard_after_forward, **kwargs)
        head = scorer.adapter.lm_head_module(model)
        embeddings = base.get_input_embeddings()
        if embeddings is None or head.weight is not embeddings.weight:
            fully_shard(head, reshard_after_forward=True, **kwargs)
        fully_shard(scorer, reshard_after_forward=False, **kwargs)  # the root: gathered for the whole step

    def prepare(self, scorer, trainable, accum):
        self.accum = accum
        self.dtypes = {n: p.dtype for n, p in scorer.model.named_parameters()}
        scorer.to(self.device)
        self._shard_units(scorer, train=True)
        trainable = [p for p in scorer.parameters() if p.requires_grad]  # the sharded (DTensor) parameters
        self.optimizer = torch.optim.AdamW(trainable, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        return scorer, self.optimizer

    def prepare_reference(self, reference_scorer):
        reference_scorer.to(self.device)
        self._shard_units(reference_scorer, train=False)
        return reference_scorer

    def accumulate(self, module, last):
        # Gradients are reduce-scattered after every micro-batch and summed in the shards: holding
        # whole unsharded gradients across micro-batches would cost what sharding saves.
        return contextlib.nullcontext()

    def step(self, trainable):
        trainable = [p for group in self.optimizer.param_groups for p in group["params"]]  # the sharded parameters
        norm = torch.nn.utils.clip_grad_norm_(trainable, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    @contextlib.contextmanager
    def generation_context(self, module):
        """The root unit's weights (embeddings, norms, projector) stay gathered while generate runs the
        model without the root's forward; the layers gather themselves in their own forwards."""
        module.unshard()
        try:
            yield
        finally:
            module.reshard()

    # DCP: model and optimizer state of the trained parameters, sharded; reshards on load.
    def _state_dicts(self, module, optimizer):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(self.unwrap(module).model, optimizer, options=StateDictOptions(ignore_frozen_params=True))

    def save(self, folder, module, optimizer):
        import torch.distributed.checkpoint as dcp

        model_sd, optim_sd = self._state_dicts(module, optimizer)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(folder / "dcp"))
        return {}

    def load(self, folder, module, optimizer, state):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        model_sd, optim_sd = self._state_dicts(module, optimizer)
        load_dcp({"model": model_sd, "optimizer": optim_sd}, folder / "dcp", distributed=True)
        # strict=False: the frozen weights are not in the checkpoint (DCP already refused a missing trained one)
        set_state_dict(self.unwrap(module).model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))

    def gather_weights(self, model, trainable_only):
        """Each sharded tensor gathered whole (a collective, one tensor at a time), back in the dtype the
        model was loaded in (trained bf16 weights are fp32 shards here)."""
        names = {n for n, p in model.named_parameters() if p.requires_grad} if trainable_only else None
        out = {}
        for name, tensor in model.state_dict().items():
            if names is not None and name not in names:
                continue
            full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
            if self.is_main:
                out[name] = full.detach().to("cpu", self.dtypes.get(name, full.dtype))
        return out if self.is_main else None


class DeepSpeedEngine(Engine):
    shards_weights = False
    needs_group = True

    def __init__(self, cfg):
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise DistributedError(f"distributed.engine={cfg.distributed.engine} needs DeepSpeed: pip install deepspeed "
                                   "(on a CPU-only machine: pip install --no-build-isolation \"torch==<your torch>\" deepspeed)") from None
        import warnings

        # DeepSpeed calls torch.distributed functions torch has renamed: one FutureWarning per call otherwise
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
                                category=FutureWarning)
        self.name = cfg.distributed.engine
        self.stage = int(self.name[-1])
        self.shards_weights = self.stage == 3
        self.settings, self.cfg = cfg.distributed, cfg
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.world, self.device = world, torch.device("cpu")
        if cfg.effective_batch_size % (cfg.micro_batch_size * world) == 0:  # else setup names the key
            self.ds_config(None, cfg.effective_batch_size // (cfg.micro_batch_size * world))  # a user config that disagrees: refused now
        super().__init__(cfg)

    def ds_config(self, model: torch.nn.Module | None, accum: int, train: bool = True) -> dict:
        """The DeepSpeed config of this run: mdpo's settings over the user's distributed.deepspeed_config
        (whose keys mdpo sets must agree: one line naming the key otherwise). model None: check the
        user's file before any weight loads (the precision keys, which need the model, are left out)."""
        cfg, settings = self.cfg, self.settings
        dtypes = {p.dtype for p in model.parameters()} if model is not None else set()
        zero = {"stage": self.stage}
        if settings.offload in ("optimizer", "all"):
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": self.device.type == "cuda"}
        if settings.offload == "all":
            zero["offload_param"] = {"device": "cpu", "pin_memory": self.device.type == "cuda"}
        ours = {
            "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
            "gradient_accumulation_steps": accum,
            "train_batch_size": cfg.micro_batch_size * accum * self.world,
            "gradient_clipping": cfg.max_grad_norm,
            "bf16": {"enabled": torch.bfloat16 in dtypes},
            "fp16": {"enabled": torch.float16 in dtypes and torch.bfloat16 not in dtypes},
            "zero_optimization": zero,
            "zero_allow_untested_optimizer": True,  # mdpo's torch AdamW is the client optimizer
            "zero_force_ds_cpu_optimizer": False,  # ... on offloaded (CPU) state too: the same numerics
            "steps_per_print": 1 << 62, "wall_clock_breakdown": False,
        }
        if model is None:
            del ours["bf16"], ours["fp16"]
        if not train:
            ours = {"train_micro_batch_size_per_gpu": cfg.micro_batch_size, "zero_optimization": {"stage": self.stage},
                    "bf16": ours["bf16"], "fp16": ours["fp16"], "steps_per_print": 1 << 62}
        if settings.deepspeed_config is None:
            return ours
        path = Path(settings.deepspeed_config)
        try:
            user = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise DistributedError(f"distributed.deepspeed_config={path}: cannot be read as JSON ({exc})") from None
        if not isinstance(user, dict):
            raise DistributedError(f"distributed.deepspeed_config={path}: must hold a JSON object")
        for key in ("optimizer", "scheduler"):
            if key in user:
                raise DistributedError(f"distributed.deepspeed_config={path} has an '{key}' section; mdpo brings its own "
                                       f"(AdamW with lr / weight_decay, cosine schedule with warmup_ratio): remove it")
        return _merge_ds_config(user, ours, str(path))

    def prepare(self, scorer, trainable, accum):
        import deepspeed

        self.accum = accum
        scorer.to(self.device)
        self.optimizer = torch.optim.AdamW(trainable, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        config = self.ds_config(scorer.model, accum)
        self.module, _, _, _ = deepspeed.initialize(model=scorer, optimizer=self.optimizer, config=config)
        return self.module, self.optimizer

    def prepare_reference(self, reference_scorer):
        if self.stage < 3:  # ZeRO-2 shards no weights: the frozen copy is whole on every process
            return reference_scorer.to(self.device)
        import deepspeed

        reference_scorer.to(self.device)
        engine, *_ = deepspeed.initialize(model=reference_scorer, config=self.ds_config(reference_scorer.model, 1, train=False))
        engine.eval()
        return engine

    def accumulate(self, module, last):
        return contextlib.nullcontext()  # DeepSpeed counts micro-batches itself (gradient_accumulation_steps)

    def backward(self, loss):
        self.module.backward(loss)  # scaled by 1 / gradient_accumulation_steps inside
        self.module.step()  # the optimizer steps at the accumulation boundary only

    def step(self, trainable):
        norm = self.module.get_global_grad_norm()
        return torch.as_tensor(0.0 if norm is None else float(norm))

    def save(self, folder, module, optimizer):
        module.save_checkpoint(str(folder / "deepspeed"), tag="state", save_latest=False, exclude_frozen_parameters=True)
        return {}

    def load(self, folder, module, optimizer, state):
        saved = int(state.get("processes", 1))
        if saved != self.world:
            raise DistributedError(f"resume_from={folder}: a DeepSpeed ZeRO checkpoint of {saved} process(es) cannot be "
                                   f"resumed by {self.world}: DeepSpeed reshards only through its universal-checkpoint "
                                   "conversion; resume with the same number of processes (fsdp2 checkpoints reshard)")
        check_deepspeed_files(folder / "deepspeed")
        path, _ = module.load_checkpoint(str(folder / "deepspeed"), tag="state", load_module_strict=False,
                                         load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise DistributedError(f"resume_from={folder}: DeepSpeed found no checkpoint in {folder / 'deepspeed'}")

    def gather_weights(self, model, trainable_only):
        if self.stage < 3:
            return super().gather_weights(model, trainable_only)
        import deepspeed

        out = {}
        for name, param in model.named_parameters():
            if trainable_only and not param.requires_grad:
                continue
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):  # every process takes part
                if self.is_main:
                    out[name] = param.detach().cpu().clone()
        if not trainable_only and self.is_main:
            out.update({n: b.detach().cpu() for n, b in model.named_buffers()})
        return out if self.is_main else None


def _merge_ds_config(user: dict, ours: dict, source: str, prefix: str = "") -> dict:
    """`user` with `ours` laid over it; a key both set to different values (other than "auto") is refused."""
    merged = dict(user)
    for key, value in ours.items():
        if isinstance(value, dict) and isinstance(user.get(key), dict):
            merged[key] = _merge_ds_config(user[key], value, source, f"{prefix}{key}.")
        elif key in user and user[key] != "auto" and user[key] != value and not isinstance(value, dict):
            raise DistributedError(f"distributed.deepspeed_config={source} sets {prefix}{key}={user[key]!r}, but this run needs "
                                   f"{value!r} (from micro_batch_size, effective_batch_size, max_grad_norm, the model's dtype "
                                   f"and distributed.*): set it to \"auto\" or remove it")
        else:
            merged[key] = value
    return merged


def make_engine(cfg: TrainConfig) -> Engine:
    """The engine of `distributed.engine`, its process group made (checked against the launcher first)."""
    check_launcher(cfg)
    name = cfg.distributed.engine
    if name == "ddp":
        return Engine(cfg)
    if name == "fsdp2":
        return FSDP2Engine(cfg)
    return DeepSpeedEngine(cfg)


# ------------------------------------------------------------------------------- safe checkpoint reads
# DCP writes its metadata with pickle and reads non-tensor entries with torch.load(weights_only=False);
# DeepSpeed reads its files with weights_only=False. A shared checkpoint must not be able to run code,
# so both are read through restricted loaders here.
_DCP_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch.distributed.checkpoint.planner", "LoadItemType"),
     ("torch.distributed.checkpoint.planner", "WriteItemType"), ("torch", "Size"), ("collections", "OrderedDict"),
     ("torch", "device"), ("builtins", "slice"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
     ("pathlib", "WindowsPath")}


def _restricted_unpickler():
    import pickle

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) in _DCP_METADATA_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))):
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a DCP metadata file")

    return Unpickler


def load_dcp(state_dict: dict, path: Path, distributed: bool) -> None:
    """`torch.distributed.checkpoint.load` into `state_dict` (in place) from `path`, without unpickling
    anything but DCP's own metadata classes, tensors and plain containers; a missing entry, another
    shape or a foreign object is a CheckpointError naming the file. distributed=False: one process reads
    a checkpoint any number of processes wrote (whole tensors)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

    from .checkpoints import CheckpointError

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with open(Path(self.path) / ".metadata", "rb") as handle:
                metadata = _restricted_unpickler()(handle).load()
            from torch.distributed.checkpoint.metadata import StorageMeta

            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._nested_dict import set_element  # noqa: PLC0415

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    if not (path / ".metadata").is_file():
        raise CheckpointError(f"{path}: no .metadata (not a complete torch distributed checkpoint)")
    import warnings

    try:
        with warnings.catch_warnings():  # one process on purpose: DCP's "assuming a single process" note is noise
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state_dict, storage_reader=SafeReader(str(path)), planner=SafePlanner(), no_dist=not distributed)
    except Exception as exc:  # noqa: BLE001 — missing keys, other shapes, refused pickles, damaged files
        text = " ".join(str(exc).split())
        raise CheckpointError(f"{path}: cannot be loaded into this run ({type(exc).__name__}: {text[:400]})") from exc


def deepspeed_safe_globals() -> list:
    """The DeepSpeed classes its own checkpoint files hold (besides tensors and plain containers)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def check_deepspeed_files(folder: Path) -> None:
    """Read every file of a DeepSpeed checkpoint with weights_only=True (DeepSpeed's own classes
    allowed) before DeepSpeed loads it with weights_only=False; a file holding anything else is refused."""
    from .checkpoints import CheckpointError

    files = sorted(p for p in folder.rglob("*.pt"))
    if not files:
        raise CheckpointError(f"{folder}: no DeepSpeed checkpoint files")
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        for file in files:
            try:
                torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # noqa: BLE001
                text = " ".join(str(exc).split())
                raise CheckpointError(f"{file}: cannot be loaded safely (weights_only=True): only tensors, plain containers "
                                      f"and DeepSpeed's own checkpoint classes are accepted ({type(exc).__name__}: {text[:300]}).") from exc


def load_trained_weights(model: torch.nn.Module, ckpt: Path, key: str, cast: bool = False) -> None:
    """Copy the trained parameters of a checkpoint any engine wrote into `model` (one process, whole
    tensors): `mdpo-eval`, generation from a checkpoint. ddp: trainable.pt; fsdp2 / zero: put together
    from the shards. Every trained parameter must be there with its shape (`checkpoints.apply_trainable`)."""
    from .checkpoints import apply_trainable, checkpoint_engine, load_trainable

    engine = checkpoint_engine(ckpt)
    if engine == "ddp":
        return load_trainable(model, ckpt, key, cast=cast)
    expected = {name: p for name, p in model.named_parameters() if p.requires_grad}
    apply_trainable(model, read_trained_weights(ckpt, engine, expected), key, ckpt, f"its {engine} shards", cast=cast)


def read_trained_weights(folder: Path, engine: str, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's trained weights as whole tensors in one process, for `mdpo-eval` and the like:
    `expected` {name: tensor of the right shape and dtype} names what to read. fsdp2: DCP, resharded to
    whole tensors; zero2 / zero3: DeepSpeed's fp32 partitions put together (needs deepspeed)."""
    from .checkpoints import CheckpointError

    if engine == "fsdp2":
        target = {"model": {name: torch.empty_like(t, device="cpu") for name, t in expected.items()}}
        load_dcp(target, folder / "dcp", distributed=False)
        return target["model"]
    if engine in ("zero2", "zero3"):
        try:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        except ImportError:
            raise CheckpointError(f"{folder}: written by DeepSpeed ({engine}); reading it needs deepspeed (pip install deepspeed); "
                                  "the run's final/ folder is readable without it") from None
        check_deepspeed_files(folder / "deepspeed")
        state = get_fp32_state_dict_from_zero_checkpoint(str(folder / "deepspeed"), tag="state", exclude_frozen_parameters=True)
        return {name.removeprefix("model."): tensor for name, tensor in state.items()}  # the scorer's `model.` prefix
    raise CheckpointError(f"{folder}: written by an unknown engine {engine!r}")


def describe(engine: Engine) -> str:
    """One start-up line: engine, processes, device."""
    what = {"ddp": "DDP (whole model on every process)", "fsdp2": "FSDP2 (weights, gradients and optimizer state sharded)",
            "zero2": "DeepSpeed ZeRO-2 (gradients and optimizer state sharded)",
            "zero3": "DeepSpeed ZeRO-3 (weights, gradients and optimizer state sharded)"}[engine.name]
    return f"engine: {what}, {engine.world} process(es) on {engine.device.type}"


def padded_count(n_items: int, world: int, per_forward: int) -> int:
    """Forwards every process runs over `n_items` shared [rank::world] in chunks of `per_forward`: the
    most any process needs (the others pad up to it when the engine shards weights)."""
    per_rank = -(-n_items // world)
    return -(-per_rank // per_forward)

