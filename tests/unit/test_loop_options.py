"""Loop options on the real TrainContext loop (2 gloo ranks in torch.multiprocessing, a real
shard stream, local checkpoints; no Ray): gradient_accumulation with ctx.no_sync, max_steps,
parameter groups built as docs/sdk.md shows, and kind: custom's ctx.mesh."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shipyard.checkpoint import CheckpointStore
from test_train_parts import WIDTH, context, dataset, free_port, make_spec  # noqa: F401 (dataset: fixture)


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(WIDTH, 4), torch.nn.Linear(4, 1))


def _groups_fn(net):
    """Parameter groups by name, as docs/sdk.md's example builds them."""
    def optimizer_fn(params):
        mine = {id(p) for p in params}
        named = [(n, p) for n, p in net.named_parameters() if id(p) in mine]
        return torch.optim.SGD([{"params": [p for n, p in named if p.ndim >= 2], "lr": 0.1},
                                {"params": [p for n, p in named if p.ndim < 2], "lr": 0.0}])
    return optimizer_fn


def _train(ctx) -> dict:
    net = _net()
    model, opt = ctx.prepare(net, _groups_fn(net))
    n = ctx.spec.gradient_accumulation
    seen, local_grads = [], []
    for batch in ctx.batches():
        with ctx.no_sync():
            loss = ctx.train_step(batch["x"], batch["x"].sum(1, keepdim=True),
                                  lambda out, y: torch.nn.functional.mse_loss(out, y) / n)
        seen.append((ctx.step, ctx.sync_gradients))
        if not ctx.sync_gradients:
            local_grads.append(net[0].weight.grad.clone())
        else:
            opt.step()
            opt.zero_grad(set_to_none=True)
        del loss
    ctx.close()
    return {"seen": seen, "weights": {k: v.clone() for k, v in net.state_dict().items()},
            "local_grads": local_grads, "total": ctx.total_steps}


def _phases(rank, world, port, data, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        runs = (("whole", "ck-whole", {"epochs": 1}, {}),                                   # 4 steps of 8 rows
                ("accumulated", "ck-acc", {"epochs": 1, "batch": 4}, {"gradient_accumulation": 2}),
                ("to_3", "ck-max", {"epochs": 1, "batch": 4}, {"gradient_accumulation": 2, "max_steps": 3}),
                ("again_3", "ck-max", {"epochs": 1, "batch": 4}, {"gradient_accumulation": 2, "max_steps": 3}),
                ("on_to_4", "ck-max", {"epochs": 1, "batch": 4}, {"gradient_accumulation": 2}))
        for name, ck, data_opts, extra in runs:
            spec = make_spec(data, os.path.join(out, ck), world, epochs=data_opts["epochs"], **extra)
            spec = spec.model_copy(update={"dataset": spec.dataset.model_copy(
                update={"batch_size": data_opts.get("batch", 8)})})
            results[name] = _train(context(spec, rank, world))
        torch.save(results, os.path.join(out, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(dataset, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("loop")
    mp.spawn(_phases, args=(2, free_port(), dataset, str(out)), nprocs=2, join=True)
    return out, [torch.load(out / f"{r}.pt", weights_only=False) for r in range(2)]


def test_two_accumulated_half_batches_are_one_whole_batch(runs):
    _, ranks = runs
    whole, acc = ranks[0]["whole"], ranks[0]["accumulated"]
    assert [s for s, _ in whole["seen"]] == [1, 2, 3, 4] and whole["total"] == 4
    # Each step's two batches carry the same ctx.step; the optimizer steps after the second.
    assert acc["seen"] == [(1, False), (1, True), (2, False), (2, True), (3, False), (3, True), (4, False), (4, True)]
    assert acc["total"] == 4
    for k in whole["weights"]:
        torch.testing.assert_close(acc["weights"][k], whole["weights"][k], rtol=1e-5, atol=1e-6)
    # The frozen group (lr 0 for the biases) stayed where it began: the groups took effect.
    torch.testing.assert_close(acc["weights"]["0.bias"], _net()[0].bias.detach())
    assert not torch.equal(acc["weights"]["0.weight"], _net()[0].weight.detach())


def test_no_sync_keeps_the_first_batch_gradients_local_to_each_rank(runs):
    _, ranks = runs
    mine, theirs = ranks[0]["accumulated"]["local_grads"], ranks[1]["accumulated"]["local_grads"]
    assert len(mine) == 4
    # Different rows on the two ranks and no all-reduce: the accumulated gradients differ (DDP
    # would have made them equal), while the weights after each optimizer step are the same.
    assert all(not torch.allclose(a, b) for a, b in zip(mine, theirs))
    for k, v in ranks[0]["accumulated"]["weights"].items():
        assert torch.equal(v, ranks[1]["accumulated"]["weights"][k])


def test_max_steps_ends_the_run_and_a_run_without_it_goes_on_exactly(runs):
    out, ranks = runs
    to_3, again, on = ranks[0]["to_3"], ranks[0]["again_3"], ranks[0]["on_to_4"]
    assert to_3["seen"][-1] == (3, True) and to_3["total"] == 3
    assert again["seen"] == []  # max_steps reached: nothing more to train
    assert on["seen"] == [(4, False), (4, True)]  # resumed at 3, between two accumulated steps
    for k, v in on["weights"].items():  # and ends where the uninterrupted accumulated run did
        assert torch.equal(v, ranks[0]["accumulated"]["weights"][k])
    assert CheckpointStore(str(out / "ck-max")).latest().step == 4


class FusedQKV(torch.nn.Module):
    """Holds one fused projection but saves (and loads) it as separate q, k, v weights, through
    state_dict hooks that rename and split keys, as torchtitan's and many HF attention modules do."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(WIDTH, 3 * WIDTH, bias=False)
        self.head = torch.nn.Linear(3 * WIDTH, 1)
        self._register_state_dict_hook(FusedQKV._split)
        self.register_load_state_dict_pre_hook(FusedQKV._fuse)

    def forward(self, x):
        return self.head(self.qkv(x))

    @staticmethod
    def _split(module, state, prefix, local_metadata):
        fused = state.pop(prefix + "qkv.weight")
        for name, part in zip("qkv", fused.chunk(3)):
            state[prefix + f"{name}.weight"] = part
        return state

    @staticmethod
    def _fuse(module, state, prefix, *args):
        state[prefix + "qkv.weight"] = torch.cat([state.pop(prefix + f"{n}.weight") for n in "qkv"])


def test_a_model_whose_state_dict_hooks_rename_keys_checkpoints_and_resumes(dataset, tmp_path):  # noqa: F811
    """DCP's get_state_dict/set_state_dict go through the model's own hooks: the checkpoint holds
    the renamed keys, and a fresh model restored from it has the trained weights."""

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ck = str(tmp_path / "ck")
        ctx = context(make_spec(dataset, ck, epochs=1))
        torch.manual_seed(0)
        model, opt = ctx.prepare(FusedQKV(), lambda p: torch.optim.Adam(p, lr=0.01))
        for batch in ctx.batches():
            opt.zero_grad()
            model(batch["x"]).pow(2).mean().backward()
            opt.step()
        ctx.close()
        trained = {k: v.clone() for k, v in model.module.qkv.state_dict().items()} if hasattr(model, "module") \
            else {k: v.clone() for k, v in model.qkv.state_dict().items()}
        from shipyard.checkpoint import dcp as ckpt

        saved = ckpt.consolidate(CheckpointStore(ck).latest())
        assert {"q.weight", "k.weight", "v.weight"} <= {k.rsplit("model.", 1)[-1] for k in _flat(saved["model"])}
        again = context(make_spec(dataset, ck, epochs=1))
        torch.manual_seed(1)  # other initial weights: only the restore can make them equal
        restored, _ = again.prepare(FusedQKV(), lambda p: torch.optim.Adam(p, lr=0.01))
        inner = restored.module if hasattr(restored, "module") else restored
        assert torch.equal(inner.qkv.weight, trained["weight"])
        again.close()
    finally:
        dist.destroy_process_group()


def _flat(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield prefix + k
