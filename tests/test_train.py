import json

import pytest
import torch
from kills import killed_after_steps

from mpsclip.cli import main
from mpsclip.data.synth import generate
from mpsclip.errors import MPSCLIPError
from mpsclip.factory import load_model
from mpsclip.train import Runtime, TrainConfig, init_runtime, linear_warmup_decay, train


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    generate(out, n_train=6, n_test=4, seed=3, workers=1)
    return out


def _config(data, **extra) -> TrainConfig:
    base = dict(
        arch="MPS-Tiny",
        pretrained=None,
        train_file=str(data / "train.json"),
        image_root=str(data),
        sub_root=str(data / "subimages"),
        epochs=2,
        batch_size=8,
        lr=1e-3,
        num_workers=0,
        unfreeze_backbone=False,
        max_sub_images=1,
        seed=5,
        adapter={"bottleneck": 32, "heads": 4},
    )
    base.update(extra)
    return TrainConfig(**base)


def _trainable(path):
    model = load_model(path)
    return {n: p for n, p in model.named_parameters() if ".g2adapter." in n or n.startswith("mpr_head.")}


@pytest.mark.slow
def test_killed_run_resumes_to_identical_weights(synth, tmp_path):
    cfg = _config(synth)
    train(cfg, tmp_path / "full")
    with killed_after_steps(4):  # 3 steps per epoch: dies in epoch 2
        train(cfg, tmp_path / "crashed")
    assert json.loads((tmp_path / "crashed" / "log.jsonl").read_text().splitlines()[-1])["epoch"] == 1
    train(cfg, tmp_path / "crashed", resume=True)
    full = _trainable(tmp_path / "full" / "last.safetensors")
    resumed = _trainable(tmp_path / "crashed" / "last.safetensors")
    assert full.keys() == resumed.keys()
    changed = 0
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
        changed += int(full[name].abs().sum() > 0)
    assert changed > 0
    log = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [1, 2]


@pytest.mark.slow
def test_evaluates_each_epoch_and_keeps_the_best_not_the_last(synth, tmp_path, monkeypatch):
    """The real evaluation runs each epoch; its fused r_mean is steered to 30 then 10, so epoch 1 is the best:
    best.* must hold epoch 1's weights (last.* as it was after epoch 1) and last.* epoch 2's."""
    import mpsclip.train as train_module

    real_scores, steered, after_epoch_1 = train_module.score_all_modes, iter([30.0, 10.0]), {}

    def scores(emb):
        if (tmp_path / "last.safetensors").exists() and not after_epoch_1:  # epoch 2's eval: last.* is epoch 1's
            after_epoch_1.update(_trainable(tmp_path / "last.safetensors"))
        result = real_scores(emb)
        result["fused"]["r_mean"] = next(steered)
        return result

    monkeypatch.setattr(train_module, "score_all_modes", scores)
    summary = train(_config(synth, epochs=2, eval_file=str(synth / "test.json")), tmp_path)
    assert set(summary["eval"]) == {"fused", "global", "max-response"}
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(e["r_mean"], e["best_r_mean"]) for e in log] == [(30.0, 30.0), (10.0, 30.0)]
    best, last = _trainable(tmp_path / "best.safetensors"), _trainable(tmp_path / "last.safetensors")
    assert after_epoch_1.keys() == best.keys() == last.keys()
    assert all(torch.equal(best[name], after_epoch_1[name]) for name in best)
    assert any(not torch.equal(best[name], last[name]) for name in best)  # epoch 2 trained on


def test_schedule_warms_up_then_decays():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = linear_warmup_decay(opt, total_steps=10, warmup=0.2)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert lrs[2] > lrs[5] > lrs[9] > 0


def test_config_errors_name_the_file(tmp_path):
    bad = tmp_path / "cfg.yaml"
    bad.write_text("epochs: 3\nlearning_rate: 1\n")
    with pytest.raises(MPSCLIPError, match=r"cfg.yaml: unknown keys \['learning_rate'\]"):
        TrainConfig.from_yaml(bad)
    with pytest.raises(MPSCLIPError, match="shipped configs: rsicd, rsitmd, tiny"):
        TrainConfig.from_yaml(tmp_path / "nope.yaml")
    assert TrainConfig.from_yaml("tiny", epochs=1).epochs == 1


@pytest.mark.slow
def test_priorclip_trains_through_the_same_trainer(synth, tmp_path):
    cfg = _config(
        synth,
        model_family="priorclip",
        arch="PriorCLIP-Tiny",
        epochs=1,
        adapter={},
        priorclip={"res_layers": (1, 1, 1, 1), "res_width": 8},
        eval_file=str(synth / "test.json"),
    )
    summary = train(cfg, tmp_path)
    assert {"contrastive", "affiliation", "total"} <= set(summary)
    assert type(load_model(tmp_path / "last.safetensors")).__name__ == "PriorCLIP"


@pytest.mark.slow
def test_cli_device_and_quiet(synth, tmp_path, capsys):
    args = ["train", "--config", "tiny", "--train-file", str(synth / "train.json"), "--image-root", str(synth),
            "--sub-root", str(synth / "subimages"), "--epochs", "1", "--batch-size", "6", "--num-workers", "0",
            "--device", "cpu"]  # no --eval-file: one optimizer step per run
    assert main([*args, "--out", str(tmp_path / "loud")]) == 0
    assert "epoch 1/1" in capsys.readouterr().err  # the batch bar
    assert main([*args, "--out", str(tmp_path / "quiet"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "lowest training loss" in captured.out and "epoch 1/1" not in captured.err and "it/s" not in captured.err
    assert (tmp_path / "quiet" / "best.safetensors").exists()  # without an eval set: by training loss
    if not torch.cuda.is_available():
        assert main([*args, "--out", str(tmp_path / "gpu"), "--device", "cuda"]) == 2
        assert "--device cuda: no CUDA GPU is visible" in capsys.readouterr().err


def test_runtime_device(monkeypatch):
    assert init_runtime("cpu", progress=False) == Runtime(torch.device("cpu"), progress=False)
    assert not Runtime(torch.device("cpu"), rank=1).bars
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(MPSCLIPError, match="under torchrun each process takes cuda:LOCAL_RANK"):
        init_runtime("cuda:1" if torch.cuda.is_available() else "cpu:0")
