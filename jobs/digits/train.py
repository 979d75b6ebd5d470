"""An MLP on scikit-learn's handwritten digits, written as a shipyard user would write it."""

import torch
import torch.distributed as dist
from torch import nn


def make_model(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


def evaluate(ctx, model) -> float:
    model.eval()
    counts = torch.zeros(2)
    with torch.no_grad():
        for batch in ctx.eval_batches():
            pred = model(batch["x"]).argmax(dim=1)
            counts += torch.tensor([(pred == batch["y"]).sum().item(), len(pred)])
    dist.all_reduce(counts)  # every rank scored its share of the held-out rows
    return (counts[0] / counts[1]).item()


def train(ctx):
    torch.manual_seed(0)
    lr = ctx.config["lr"]
    model, optimizer = ctx.prepare(make_model(ctx.config["hidden"]),
                                   lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=1e-4))
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for batch in ctx.batches():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(batch["x"]), batch["y"])
        loss.backward()
        optimizer.step()
        ctx.report(loss=loss, epoch=ctx.epoch)
    ctx.report(accuracy=evaluate(ctx, model))
