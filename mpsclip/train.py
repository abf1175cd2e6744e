"""Training loop: single process or ``torchrun`` DDP, bf16 autocast on GPU, exact resume.

Resume is exact at epoch boundaries: the state saved after each epoch holds the model, optimizer,
scheduler, epoch and every RNG, and each epoch's shuffling is seeded from ``seed + epoch``. A killed run
restarted with ``--resume`` therefore loses at most the epoch in progress and ends with the same weights.
``state.pt`` holds tensors and plain values only, and is read with ``torch.load(weights_only=True)``: a crafted
file cannot run code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from mpsclip.adapters import AdapterConfig
from mpsclip.checkpoints import load_plain, save_checkpoint
from mpsclip.data.annotations import TrainRecord, load_eval, load_train
from mpsclip.data.collate import Batch, collate
from mpsclip.data.datasets import TrainDataset
from mpsclip.devices import resolve_device
from mpsclip.errors import MPSCLIPError
from mpsclip.evaluate import embed_eval_set, score_all_modes
from mpsclip.factory import load_model
from mpsclip.io import atomic_write
from mpsclip.losses import LossConfig
from mpsclip.model import MPSCLIP, ModelConfig
from mpsclip.priorclip import PriorCLIP, class_labels_from_filenames

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class TrainConfig:
    """Defaults are the authors' (RSITMD/RSICD); paths usually come from the command line."""

    model_family: str = "mpsclip"  # or "priorclip" (PriorCLIP's own objective, all weights trainable)
    belief_weighting: str = "rank"  # PriorCLIP only
    priorclip: dict[str, Any] = field(default_factory=dict)  # PriorCLIP prior-branch sizes (res_layers, res_width)
    arch: str = "ViT-B-32-quickgelu"
    pretrained: str | None = "openai"
    init_checkpoint: str | None = None  # start from any checkpoint mpsclip loads (overrides pretrained)
    train_file: str | None = None
    eval_file: str | None = None
    image_root: str | None = None
    sub_root: str | None = None
    epochs: int = 35
    batch_size: int = 64
    lr: float = 4e-5
    weight_decay: float = 0.04
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    warmup: float = 0.1
    unfreeze_backbone: bool = False
    max_sub_images: int | None = None
    num_workers: int = 4
    eval_batch_size: int = 128
    seed: int = 42
    skip_bad_images: bool = False
    adapter: dict[str, Any] = field(default_factory=dict)
    loss: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        path = _resolve_config(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise MPSCLIPError(f"{path}: not valid YAML ({err})") from err
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MPSCLIPError(f"{path}: unknown keys {unknown}; valid keys are {sorted(known)}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        if "betas" in data:
            data["betas"] = tuple(data["betas"])
        return cls(**data)

    def model_config(self) -> ModelConfig:
        return ModelConfig(arch=self.arch, adapter=AdapterConfig(**self.adapter), loss=LossConfig(**self.loss))


def _resolve_config(path: str | Path) -> Path:
    """A path, or the name of a shipped config (``rsitmd``, ``rsicd``, ``tiny``)."""
    path = Path(path)
    if path.exists():
        return path
    shipped = CONFIG_DIR / f"{path.name}.yaml"
    if shipped.exists():
        return shipped
    names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise MPSCLIPError(f"{path}: no such config file (shipped configs: {names})")


# --------------------------------------------------------------------------- pieces
def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norm weights and other 0/1-d parameters (the gate)."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def linear_warmup_decay(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup: float
) -> torch.optim.lr_scheduler.LambdaLR:
    warm = max(1, int(total_steps * warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain values (Python's is ints already; NumPy's key becomes a tensor)."""
    name, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    numpy = {
        "name": str(name),
        "key": torch.from_numpy(key.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "gauss": float(gauss),
    }
    state = {"python": random.getstate(), "numpy": numpy, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy = state["numpy"]
    key = numpy["key"].numpy().astype(np.uint32)
    np.random.set_state((numpy["name"], key, numpy["pos"], numpy["has_gauss"], numpy["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Runtime:
    """Where this process trains; ``progress``: whether it may draw progress bars (only the main process does)."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    progress: bool = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def bars(self) -> bool:
        return self.progress and self.main


def init_runtime(device: str | torch.device = "auto", progress: bool = True) -> Runtime:
    """Join the ``torchrun`` process group when launched by it (each process on ``cuda:LOCAL_RANK`` when ``device``
    resolves to CUDA, else the CPU); otherwise a single process on ``device`` (``auto``: a GPU when present)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    resolved = resolve_device(device)
    if world > 1:
        if resolved.index is not None:
            raise MPSCLIPError(
                f"--device {device}: under torchrun each process takes cuda:LOCAL_RANK; use --device auto, cuda or cpu"
            )
        cuda = resolved.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if cuda:
            torch.cuda.set_device(local)
        return Runtime(torch.device(f"cuda:{local}" if cuda else "cpu"), dist.get_rank(), world, progress)
    return Runtime(resolved, progress=progress)


# --------------------------------------------------------------------------- loop
def train(
    cfg: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    device: str | torch.device = "auto",
    progress: bool = True,
) -> dict:
    """Train on ``device`` (``--device``; ``auto``: a GPU when present), evaluating each epoch; writes
    ``last``/``best`` checkpoints, ``state.pt`` and ``log.jsonl``. ``progress`` False (``--quiet``): no bars."""
    out = Path(out_dir)
    rt = init_runtime(device, progress)
    if cfg.train_file is None or cfg.image_root is None:
        raise MPSCLIPError("training needs train_file and image_root (config keys or --train-file/--image-root)")
    seed_everything(cfg.seed)
    records = load_train(cfg.train_file)
    dataset = TrainDataset(
        records, cfg.image_root, cfg.sub_root, max_sub_images=cfg.max_sub_images, skip_bad_images=cfg.skip_bad_images
    )
    if rt.main and dataset.num_skipped:
        print(f"skipped {dataset.num_skipped} training records whose image could not be read")
    _require_a_batch(cfg, len(dataset), dataset.num_skipped, rt.world_size)
    model = _build_model(cfg).to(rt.device)
    if isinstance(model, MPSCLIP):
        model.freeze_backbone(not cfg.unfreeze_backbone)
    steps_per_epoch = max(1, len(dataset) // (cfg.batch_size * rt.world_size))
    optimizer = build_optimizer(model, cfg)
    scheduler = linear_warmup_decay(optimizer, steps_per_epoch * cfg.epochs, cfg.warmup)
    start_epoch, best = 0, float("-inf")  # the first epoch is the best so far, even by -loss without eval
    if resume and (out / "state.pt").exists():
        start_epoch, best = _load_state(out / "state.pt", model, optimizer, scheduler)
        if rt.main:
            print(f"resuming after epoch {start_epoch} (best r_mean so far {best:.2f})")
    net = DistributedDataParallel(model, find_unused_parameters=True) if rt.world_size > 1 else model
    eval_images = load_eval(cfg.eval_file) if cfg.eval_file else None
    if eval_images is not None and not eval_images:
        raise MPSCLIPError(f"{cfg.eval_file}: holds no evaluation images; give a non-empty --eval-file or none")
    inputs = _loss_inputs(model, dataset.records)
    summary: dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.epochs):
        loader = _epoch_loader(dataset, cfg, rt, epoch)
        stats = _train_epoch(net, model, inputs, loader, optimizer, scheduler, rt, epoch, cfg)
        if eval_images is not None:
            emb = embed_eval_set(
                model, eval_images, cfg.image_root, cfg.sub_root, cfg.eval_batch_size, cfg.num_workers,
                cfg.max_sub_images, rt.device, progress=rt.bars,
            )
            stats["eval"] = score_all_modes(emb)
            stats["r_mean"] = stats["eval"]["fused"]["r_mean"]
        if rt.main:
            summary = _end_epoch(out, model, optimizer, scheduler, cfg, epoch, stats, best)
            best = summary["best_r_mean"]
    if rt.world_size > 1:
        dist.destroy_process_group()
    return summary


def _require_a_batch(cfg: TrainConfig, n_records: int, n_skipped: int, world_size: int) -> None:
    """An epoch drops its last incomplete batch, so fewer captions than one batch per process would train nothing."""
    needed = cfg.batch_size * world_size
    if n_records >= needed:
        return
    skipped = f" ({n_skipped} skipped: unreadable images)" if n_skipped else ""
    per = f" on each of {world_size} processes" if world_size > 1 else ""
    raise MPSCLIPError(
        f"{cfg.train_file}: {n_records} training captions{skipped}, fewer than one batch of {cfg.batch_size}{per}, "
        "so an epoch would train nothing; add data or lower --batch-size"
    )


def _build_model(cfg: TrainConfig) -> MPSCLIP | PriorCLIP:
    if cfg.model_family not in ("mpsclip", "priorclip"):
        raise MPSCLIPError(f"model_family must be 'mpsclip' or 'priorclip', not {cfg.model_family!r}")
    if cfg.init_checkpoint:
        model = load_model(cfg.init_checkpoint, arch=cfg.arch)
    elif cfg.model_family == "priorclip":
        model = PriorCLIP(cfg.arch, cfg.belief_weighting, pretrained=cfg.pretrained, **cfg.priorclip)
    else:
        model = MPSCLIP(pretrained=cfg.pretrained, config=cfg.model_config())
    if (cfg.model_family == "priorclip") != isinstance(model, PriorCLIP):
        family = type(model).__name__
        raise MPSCLIPError(f"{cfg.init_checkpoint}: holds a {family}, but model_family is {cfg.model_family}")
    return model


LossInputs = Callable[[Batch, torch.Tensor], tuple]


def _loss_inputs(model: MPSCLIP | PriorCLIP, records: list[TrainRecord]) -> LossInputs:
    """What each family's ``forward`` takes: MPS-CLIP its sub-images and image ids, PriorCLIP class labels
    taken from the image file names."""
    if isinstance(model, PriorCLIP):
        labels = class_labels_from_filenames([r.image for r in records])
        by_id = {r.image_id: int(label) for r, label in zip(records, labels, strict=True)}
        return lambda batch, tokens: (
            batch.images,
            tokens,
            torch.tensor([by_id[int(i)] for i in batch.image_ids], device=batch.images.device),
        )
    return lambda batch, tokens: (batch.images, batch.regions, batch.mask, tokens, batch.image_ids)


def _epoch_loader(dataset: TrainDataset, cfg: TrainConfig, rt: Runtime, epoch: int) -> DataLoader:
    generator = torch.Generator().manual_seed(cfg.seed + epoch)
    sampler = None
    if rt.world_size > 1:
        sampler = DistributedSampler(dataset, rt.world_size, rt.rank, shuffle=True, seed=cfg.seed, drop_last=True)
        sampler.set_epoch(epoch)
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=generator,
        num_workers=cfg.num_workers,
        collate_fn=partial(collate, max_regions=cfg.max_sub_images),
        drop_last=True,
        pin_memory=rt.device.type == "cuda",
        persistent_workers=False,
    )


def _train_epoch(
    net: torch.nn.Module,
    model: MPSCLIP | PriorCLIP,
    inputs: LossInputs,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rt: Runtime,
    epoch: int,
    cfg: TrainConfig,
) -> dict[str, Any]:
    net.train()
    totals: dict[str, float] = {}
    seen, batches, start = 0, 0, time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not rt.bars, leave=False)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=rt.device.type == "cuda")
    for batch in bar:
        batch = batch.to(rt.device, non_blocking=True)
        tokens = model.tokenize(batch.captions).to(rt.device)
        with autocast:
            losses = net(*inputs(batch, tokens))
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimizer.step()
        scheduler.step()
        for key, value in losses.items():
            totals[key] = totals.get(key, 0.0) + float(value.detach())
        batches += 1
        seen += batch.images.shape[0] * rt.world_size
        rate = seen / max(1e-9, time.perf_counter() - start)
        bar.set_postfix(loss=f"{totals['total'] / batches:.4f}", img_s=f"{rate:.1f}")
    stats: dict[str, Any] = {k: v / max(1, batches) for k, v in totals.items()}
    stats.update(epoch=epoch + 1, images=seen, seconds=time.perf_counter() - start)
    stats["lr"] = scheduler.get_last_lr()[0]
    return stats


def _end_epoch(
    out: Path, model: MPSCLIP | PriorCLIP, optimizer, scheduler, cfg: TrainConfig, epoch: int, stats: dict, best: float
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    evaluation = {"max_sub_images": cfg.max_sub_images}  # what `mpsclip evaluate` needs to report the same figures
    save_checkpoint(model, model.config_dict(), model.family, out / "last", evaluation)
    score = stats.get("r_mean", -stats["total"])  # without an eval set, lower training loss is better
    if score > best:
        best = score
        save_checkpoint(model, model.config_dict(), model.family, out / "best", evaluation)
    stats["best_r_mean"] = best
    state = {
        "epoch": epoch + 1,
        "trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
        "best": best,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "config": dataclasses.asdict(cfg),
    }
    atomic_write(out / "state.pt", lambda tmp: torch.save(state, tmp))
    log = out / "log.jsonl"
    previous = log.read_text() if log.exists() else ""
    atomic_write(log, previous + json.dumps(stats) + "\n")
    line = f"epoch {epoch + 1}: loss {stats['total']:.4f}"
    if "r_mean" in stats:
        line += f", r_mean {stats['r_mean']:.2f} (best {best:.2f})"
    print(line)
    return stats


def _load_state(path: Path, model: MPSCLIP | PriorCLIP, optimizer, scheduler) -> tuple[int, float]:
    """Restore from ``state.pt`` alone (it holds the trainable weights), so a crash between writing the
    checkpoints and the state can never pair weights and optimizer state of different epochs."""
    state = load_plain(path, "a training state", "delete it to start afresh")
    if not isinstance(state, dict) or not {"trainable", "optimizer", "scheduler", "rng", "epoch", "best"} <= set(state):
        raise MPSCLIPError(f"{path}: not a training state written by mpsclip train; delete it to start afresh")
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in state["trainable"]]
    if missing:
        raise MPSCLIPError(f"{path}: saved by a run with other trainable parameters (e.g. {missing[0]})")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in state["trainable"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return int(state["epoch"]), float(state["best"])
