"""FSDP that shards, on the CPU: run with ``torchrun --nproc_per_node 2 tests/fsdp_run.py OUT`` (gloo).

accelerate 1.15 turns FSDP on only for accelerator devices (``AcceleratorState`` sets ``DistributedType.FSDP`` for
MULTI_GPU/NPU/XPU/..., never MULTI_CPU; ``accelerate launch --use_fsdp`` on a CPU-only machine falls back), so this
script shards with torch's public ``torch.distributed.fsdp.fully_shard`` (FSDP 2: one unit per ConvNeXt V2 Block,
then the root) and uses accelerate only for what it does on CPUs (the process group, ``is_main_process``,
``get_state_dict``). It checks, and rank 0 writes ``OUT/result.json``:

- the sharded model really is sharded (every rank holds half of each Block's parameters);
- the loss of the global batch (each rank half of it) equals one unsharded process's loss on the whole batch, and so
  do the weights after two AdamW steps;
- the pretraining recipe's export (``PretrainRecipe.export``: gather on every rank, plain copy on rank 0) writes an
  ``encoder.safetensors`` equal to the unsharded model's encoder, and a reconstruction figure;
- sharded save/resume (torch.distributed.checkpoint of model + optimizer, each rank its shards): a resumed model's
  next step equals the uninterrupted one's;
- activation checkpointing (``set_grad_checkpointing``) inside the sharded blocks, drop path on: the losses and the
  gathered weights after two steps equal the sharded model's without it.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from fcmae.config import PretrainConfig, load_config
from fcmae.models.convnextv2 import Block
from fcmae.models.masking import random_masking
from fcmae.train.pretraining import PretrainRecipe, build_model
from fcmae.train.recipe import TrainContext
from fcmae.train.sharding import full_state_dict
from fcmae.train.trainer import TrainState

N, SIZE, KEEP = 4, 64, 2  # global batch 4 (2 per rank), 2x2 cells per image, 2 visible


def shard(model: torch.nn.Module) -> torch.nn.Module:
    for m in model.modules():
        if isinstance(m, Block):
            fully_shard(m)
    fully_shard(model)
    return model


def step(model, opt, imgs, mask) -> torch.Tensor:
    loss = model(imgs, mask, num_keep=KEEP)["loss"]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def make_opt(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.05)


def worst_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))[:5]
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def checkpointing_diff(cfg: PretrainConfig, rank: int, imgs, masks) -> float:
    """Two sharded copies of a drop-path model, one with activation checkpointing, the same seeded steps (the ranks'
    drop path differs, each rank's replays): the worst difference of their losses and gathered weights."""
    cfg = copy.deepcopy(cfg)
    cfg.model.drop_path_rate = 0.3
    torch.manual_seed(0)
    base = build_model(cfg)
    ckpt = copy.deepcopy(base)
    ckpt.set_grad_checkpointing()
    models = [shard(base), shard(ckpt)]
    opts = [make_opt(m) for m in models]
    worst = 0.0
    for i, mask in enumerate(masks[:2]):
        losses = []
        for m, o in zip(models, opts, strict=True):
            torch.manual_seed(100 * rank + i)
            losses.append(step(m, o, imgs, mask))
        worst = max(worst, abs(float(losses[1] - losses[0])))
    return max(worst, worst_diff(full_state_dict(models[1]), full_state_dict(models[0])))


def main(out: Path) -> None:
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)  # gloo process group, rank bookkeeping; the sharding is fully_shard's
    rank, world = acc.process_index, acc.num_processes
    assert world == 2 and dist.is_initialized()
    cfg = load_config(PretrainConfig, None, [
        "model.name=convnextv2_test", "model.decoder_embed_dim=32", "data.source=demo", f"data.input_size={SIZE}",
        f"run.output_dir={out}"])
    torch.manual_seed(0)
    ref = build_model(cfg)
    sharded = shard(copy.deepcopy(ref))
    blk = next(m for m in sharded.modules() if isinstance(m, Block))
    local = {k: v.to_local().shape[0] for k, v in blk.state_dict().items() if isinstance(v, DTensor)}
    full = {k: v.shape[0] for k, v in next(m for m in ref.modules() if isinstance(m, Block)).state_dict().items()}
    halves = all(local[k] == -(-full[k] // world) for k in local) and len(local) == len(full)
    g = torch.Generator().manual_seed(1)
    imgs = torch.randn(N, 3, SIZE, SIZE, generator=g)
    masks = [random_masking(N, SIZE // 32, 0.5, generator=g) for _ in range(3)]
    part = slice(rank * N // world, (rank + 1) * N // world)
    opt_r, opt_s = make_opt(ref), make_opt(sharded)
    loss_diffs = []
    for mask in masks[:2]:
        lr_ = step(ref, opt_r, imgs, mask)
        ls = step(sharded, opt_s, imgs[part], mask[part])
        dist.all_reduce(ls)  # equal removed cells per image: the mean of the ranks' means is the global mean
        loss_diffs.append(abs(float(ls) / world - float(lr_)))
    gathered = full_state_dict(sharded, acc)  # collective: DTensors -> full tensors on every rank
    weights_diff = worst_diff(gathered, {k: v.detach() for k, v in ref.state_dict().items()})

    # the recipe's export: every rank gathers, rank 0 writes from a plain copy
    recipe = PretrainRecipe(cfg)
    recipe.vis = (imgs[:2], masks[0][:2])
    state = TrainState(epoch=1, step=2)
    ctx = TrainContext(accelerator=acc, model=sharded, unwrapped=sharded, optimizer=opt_s, state=state,
                       schedule=None, out_dir=out, mixed_precision="no", resumed_from=None, log=lambda rec: None,
                       image=lambda tag, path, step: None, say=lambda *a: None)
    written = recipe.export(ctx)

    # sharded save and resume: each rank writes and reads its own shards
    model_sd, optim_sd = get_state_dict(sharded, opt_s)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(out / "dcp"))
    torch.manual_seed(123)
    resumed = shard(build_model(cfg))
    opt_2 = make_opt(resumed)
    step(resumed, opt_2, imgs[part], masks[0][part])  # optimizer state exists, then is overwritten
    m2, o2 = get_state_dict(resumed, opt_2)
    loaded = {"model": m2, "optim": o2}
    dcp.load(loaded, checkpoint_id=str(out / "dcp"))
    set_state_dict(resumed, opt_2, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    step(sharded, opt_s, imgs[part], masks[2][part])
    step(resumed, opt_2, imgs[part], masks[2][part])
    resume_diff = worst_diff(full_state_dict(resumed), full_state_dict(sharded))
    ckpt_diff = checkpointing_diff(cfg, rank, imgs[part], [m[part] for m in masks])
    if acc.is_main_process:
        from safetensors.torch import load_file

        enc = load_file(out / "encoder.safetensors")
        ref_enc = {k: v.detach() for k, v in ref.encoder.state_dict().items()}
        json.dump({"world": world, "sharded_halves": halves, "loss_diffs": loss_diffs, "weights_diff": weights_diff,
                   "export_diff": worst_diff(enc, ref_enc), "exported": sorted(written),
                   "resume_diff": resume_diff, "checkpointing_diff": ckpt_diff}, open(out / "result.json", "w"))
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
