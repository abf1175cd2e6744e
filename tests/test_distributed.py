import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mpsclip.distributed import gather_features
from mpsclip.losses import contrastive_loss


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    full = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    local = full[rank * 2 : rank * 2 + 2].clone().requires_grad_(True)
    gathered = gather_features(local)
    loss = contrastive_loss(gathered, text, 0.07)
    loss.backward()
    out[rank] = (gathered.detach(), local.grad.clone(), loss.item())
    dist.destroy_process_group()


@pytest.mark.slow
def test_gather_sees_global_batch_and_keeps_local_gradient():
    port = _free_port()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, port, out), nprocs=2, join=True)
        results = dict(out)
    torch.manual_seed(0)
    full = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1).requires_grad_(True)
    text = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    loss = contrastive_loss(full, text, 0.07)
    loss.backward()
    for rank in (0, 1):
        gathered, grad, value = results[rank]
        assert torch.allclose(gathered, full.detach())
        assert abs(value - loss.item()) < 1e-6
        # each rank's gradient is its slice of the single-process gradient of the global loss
        assert torch.allclose(grad, full.grad[rank * 2 : rank * 2 + 2], atol=1e-6)


def test_gather_is_identity_without_process_group():
    x = torch.randn(3, 4)
    assert gather_features(x) is x
