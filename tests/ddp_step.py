"""One DDP training step with `JaccardSupConLoss(gather_distributed=True)`, and the same step in
one process on the concatenated batch (`one_process_step`), for tests/test_distributed.py.

Run under torchrun (gloo, CPU), it saves every rank's parameters after one SGD step and the mean
of the ranks' losses to --out:

    python -m torch.distributed.run --nproc_per_node=2 --master_addr 127.0.0.1 \\
        tests/ddp_step.py --out /tmp/ddp.pt

Uneven per-rank batches on purpose (images are split SIZES[world]); float64 throughout so that the
comparison can be made to ~1e-10.
"""
from __future__ import annotations

import argparse
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from loss_cases import Spec, build, encoder  # tests/ is this script's folder: on sys.path
from modan_ext import JaccardSupConLoss
from modan_ext.training.launch import shutdown_distributed

BACKENDS = ("kernel", "reference")
IMAGES, VIEWS, IN_DIM, OUT_DIM, NUM_LABELS = 9, 2, 10, 8, 6
SIZES = {1: (9,), 2: (6, 3), 3: (4, 2, 3)}
LR = 0.5


def make_model() -> nn.Module:
    return encoder(IN_DIM, OUT_DIM, dtype=torch.float64)


def make_batch():
    batch = build(Spec(images=IMAGES, views=VIEWS, dim=IN_DIM, pattern="random",
                       num_labels=NUM_LABELS, density=0.35, seed=1))
    return batch.features, batch.labels


def sgd_step(model: nn.Module, x, labels, backend: str, gather: bool) -> torch.Tensor:
    loss_fn = JaccardSupConLoss(temperature=0.2, backend=backend, gather_distributed=gather)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    opt.zero_grad()
    loss = loss_fn(F.normalize(model(x), dim=-1), labels)
    loss.backward()
    opt.step()
    return loss.detach()


def one_process_step(backend: str):
    """(loss, parameters after one step) of one process on the whole batch."""
    model = make_model()
    x, labels = make_batch()
    loss = sgd_step(model, x, labels, backend, gather=False)
    return loss, {k: v.detach().clone() for k, v in model.state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = SIZES[world]
    own = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    x, labels = make_batch()
    results = {}
    for backend in BACKENDS:
        model = DistributedDataParallel(make_model())
        loss = sgd_step(model, x[own], labels[own], backend, gather=True)
        losses = [torch.zeros_like(loss) for _ in range(world)]
        dist.all_gather(losses, loss)
        params = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
        everyone = [None] * world
        dist.all_gather_object(everyone, params)
        results[backend] = dict(loss_mean=torch.stack(losses).mean(), params=everyone)
        del model
    if rank == 0:
        torch.save(results, args.out)
    shutdown_distributed()  # frees the DDP models' reference cycles before the group


if __name__ == "__main__":
    main()
