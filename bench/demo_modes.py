"""Why the demo's fused mR is below its global mR: train the tiny config (as ``make demo`` does) with one
change at a time and score every mode, plus diagnostics that the three modes do not show.

Per variant: ``mpsclip train``'s loop on the demo's synthetic set, then the held-out images scored in the three
modes (``global``, ``fused``, ``max-response``) and in three diagnostic ways: the sub-image ("regions") embedding
alone, the four MPR perspectives alone (max over them, without the global embedding), and ``fused`` with the
MPR head re-initialised (it must not change: the fused embedding never goes through the head). Writes OUT.json
and OUT.md; every figure is measured, with the seed, the seconds and the load average of each run.

example:
  python -m mpsclip.bench.demo_modes --out bench/results/demo-modes --variants baseline epochs15
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from mpsclip.bench.report import cpu_model, load_average

from mpsclip.data.annotations import load_eval
from mpsclip.data.synth import dataset_paths, generate
from mpsclip.evaluate import EvalEmbeddings, embed_eval_set, score_all_modes
from mpsclip.factory import load_model
from mpsclip.heads import MPRHead
from mpsclip.io import atomic_write
from mpsclip.losses import max_view_scores
from mpsclip.metrics import chance_r_mean, retrieval_metrics
from mpsclip.model import MPSCLIP
from mpsclip.train import TrainConfig, train

VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {},  # the demo as shipped: tiny.yaml, 5 epochs, seed 0
    "seed1": {"seed": 1},
    "epochs15": {"epochs": 15},  # 3x the optimizer steps
    "lr3e-3": {"lr": 3e-3},
    "mpr-weight-1": {"loss": {"lambda_contrastive": 1.0, "lambda_triplet": 1.0}},  # MPR terms 5x heavier
    "all-sub-images": {"max_sub_images": None},  # every noun's sub-image, not the first one only
}


def regions_embeddings(
    model: MPSCLIP, images: list, paths: dict[str, Path], max_sub_images: int | None
) -> torch.Tensor:
    """The sub-image ("regions") embedding of every evaluation image, as the fused embedding uses it."""
    from torch.utils.data import DataLoader

    from mpsclip.data.collate import collate
    from mpsclip.data.datasets import EvalImageDataset

    dataset = EvalImageDataset(images, paths["image_root"], paths["sub_root"], max_sub_images=max_sub_images)
    out = []
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_size=64, collate_fn=partial(collate)):
            out.append(model.encode_regions(batch.regions, batch.mask))
    return torch.cat(out)


def diagnostics(model: MPSCLIP, emb: EvalEmbeddings, regions: torch.Tensor) -> dict[str, float]:
    def r_mean(sim: torch.Tensor) -> float:
        return retrieval_metrics(sim, emb.txt2img, emb.img2txt)["r_mean"]

    has_regions = regions.norm(dim=-1) > 0
    fused_again = torch.nn.functional.normalize(0.5 * (emb.glob + regions), dim=-1)
    with torch.no_grad():
        torch.manual_seed(123)
        fresh = MPRHead(model.embed_dim, model.config.mpr_k)
        perspectives_fresh = fresh(torch.where(has_regions.unsqueeze(1), regions, emb.glob))
    max_response_fresh = max_view_scores(torch.cat([emb.glob.unsqueeze(1), perspectives_fresh], 1), emb.text)
    alphas = {f"fused_global_weight_{a}": r_mean(torch.nn.functional.normalize(a * emb.glob + (1 - a) * regions, dim=-1)
                                                 @ emb.text.t()) for a in (0.25, 0.75)}
    return {
        "regions_only": r_mean(regions @ emb.text.t()),
        **alphas,
        "perspectives_only": r_mean(max_view_scores(emb.perspectives, emb.text)),
        "fused_recomputed_max_abs_diff": float((fused_again - emb.retrieval).abs().max()),
        "max_response_fresh_head": r_mean(max_response_fresh),
        "cos_global_regions": float((emb.glob * regions).sum(-1)[has_regions].mean()),
        "images_with_sub_images": int(has_regions.sum()),
    }


def score_checkpoint(checkpoint: Path, paths: dict[str, Path], max_sub_images: int | None) -> dict[str, Any]:
    """The three modes' mR and the :func:`diagnostics` of ``checkpoint`` on the held-out images."""
    model = load_model(checkpoint).eval()
    images = load_eval(paths["eval_file"])
    emb = embed_eval_set(model, images, paths["image_root"], paths["sub_root"], 64, 0, max_sub_images,
                         progress=False)
    regions = regions_embeddings(model, images, paths, max_sub_images)
    return {
        "modes": {mode: round(m["r_mean"], 2) for mode, m in score_all_modes(emb).items()},
        "diagnostics": {k: round(v, 4) if isinstance(v, float) else v
                        for k, v in diagnostics(model, emb, regions).items()},
        "chance_r_mean": round(chance_r_mean(len(images), 5), 2),
    }


def score_snapshot(label: str, checkpoint: Path, data: Path) -> dict[str, Any]:
    """A row for a checkpoint copied during a run (e.g. ``last.safetensors`` after epoch 2 of ``baseline``)."""
    load_start = load_average()
    row = score_checkpoint(checkpoint, dataset_paths(data), 1)
    return {"variant": label, "changes": {"snapshot": str(checkpoint)}, "seed": 0, **row,
            "train_seconds": None, "load_average": {"start": load_start, "end": load_average()}}


def run_variant(name: str, data: Path, work: Path, epochs: int, resume: bool) -> dict[str, Any]:
    paths = dataset_paths(data)
    overrides = {"epochs": epochs, **VARIANTS[name]}
    cfg = TrainConfig.from_yaml("tiny", **{k: str(v) for k, v in paths.items() if k != "eval_file"})
    for key, value in overrides.items():
        setattr(cfg, key, value)
    run_dir = work / name
    if not resume:
        shutil.rmtree(run_dir, ignore_errors=True)
    load_start, start = load_average(), time.perf_counter()
    train(cfg, run_dir, resume=resume, device="cpu", progress=False)
    wall_s = time.perf_counter() - start
    epochs_log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    row = {"variant": name, "changes": overrides, "seed": cfg.seed,
           **score_checkpoint(run_dir / "last.safetensors", paths, cfg.max_sub_images)}
    return row | {
        "train_seconds": round(sum(e["seconds"] for e in epochs_log), 1),  # all epochs, resumed ones too
        "wall_seconds_this_call": round(wall_s, 1),
        "load_average": {"start": load_start, "end": load_average()},
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| variant | change to tiny.yaml / demo | seed | global | fused | max-response | regions only | "
            "perspectives only | train s | load (1 min) start/end |\n|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        m, d = r["modes"], r["diagnostics"]
        change = ", ".join(f"{k}={v}" for k, v in r["changes"].items())
        lines.append(
            f"| {r['variant']} | {change} | {r['seed']} | {m['global']:.2f} | {m['fused']:.2f} | "
            f"{m['max-response']:.2f} | {d['regions_only']:.2f} | {d['perspectives_only']:.2f} | "
            f"{'-' if r['train_seconds'] is None else round(r['train_seconds'])} | "
            f"{r['load_average']['start'][0]:.2f}/{r['load_average']['end'][0]:.2f} |"
        )
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="OUT.json and OUT.md are written")
    parser.add_argument("--work", type=Path, default=Path("demo_out/modes"), help="data and runs")
    parser.add_argument("--variants", nargs="+", default=["baseline"], choices=sorted(VARIANTS))
    parser.add_argument("--epochs", type=int, default=5, help="the demo's default")
    parser.add_argument("--resume", action="store_true", help="continue each variant's run after its last epoch")
    parser.add_argument("--snapshot", nargs=2, action="append", default=[], metavar=("LABEL", "CHECKPOINT"),
                        help="score a checkpoint copied during a run (tiny.yaml's max_sub_images) instead of training")
    parser.add_argument("--train-images", type=int, default=400)
    parser.add_argument("--test-images", type=int, default=500)
    args = parser.parse_args(argv)
    data = args.work / "data"
    if not (data / "test.json").exists():
        generate(data, n_train=args.train_images, n_test=args.test_images, seed=0)
    out_json = args.out.with_suffix(".json")
    rows = json.loads(out_json.read_text())["rows"] if out_json.exists() else []
    jobs = [(label, partial(score_snapshot, label, Path(path), data)) for label, path in args.snapshot] or [
        (name, partial(run_variant, name, data, args.work, args.epochs, args.resume)) for name in args.variants
    ]
    for name, job in jobs:
        row = job()
        print(json.dumps(row), flush=True)
        rows = [r for r in rows if r["variant"] != name] + [row]
        payload = {"cpu": cpu_model(), "cores": torch.get_num_threads(), "synth_seed": 0,
                   "train_images": args.train_images, "test_images": args.test_images, "rows": rows}
        atomic_write(out_json, json.dumps(payload, indent=2) + "\n")
        atomic_write(args.out.with_suffix(".md"), markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
