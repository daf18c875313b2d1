"""The FCMAE pretraining run: build everything from a ``PretrainConfig`` and train on accelerate."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from fcmae.config import PretrainConfig, to_dict
from fcmae.engine import (
    EpochSampler,
    MaskedSamples,
    MetricsLogger,
    NonFiniteLossError,
    TrainState,
    find_latest_checkpoint,
    lr_at,
    param_groups,
    print_main,
    save_checkpoint,
    scaled_lr,
    setup_run,
    train_step,
)
from fcmae.models.fcmae import FCMAE, create_fcmae

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GRAY_MEAN, GRAY_STD = (0.449,), (0.226,)


def normalization(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std the pretraining transforms normalise with (ImageNet's; their average for 1 channel)."""
    if in_chans == 1:
        return GRAY_MEAN, GRAY_STD
    if in_chans == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (0.449,) * in_chans, (0.226,) * in_chans


def build_model(cfg: PretrainConfig) -> FCMAE:
    m = cfg.model
    return create_fcmae(m.name, in_chans=m.in_chans, mask_ratio=m.mask_ratio, decoder_depth=m.decoder_depth,
                        decoder_embed_dim=m.decoder_embed_dim, norm_pix_loss=m.norm_pix_loss,
                        drop_path_rate=m.drop_path_rate)


def export_encoder(model: FCMAE, cfg: PretrainConfig, path: Path, epoch: int, step: int) -> Path:
    """Encoder weights in our dense layout (no final norm/head) + metadata, safetensors, written atomically."""
    from fcmae.io import save_state_dict

    sd = {k: v.detach().cpu() for k, v in model.encoder.state_dict().items()}
    meta = {
        "format": "fcmae-encoder",
        "layout": "dense",
        "variant": cfg.model.name,
        "in_chans": str(cfg.model.in_chans),
        "image_size": str(cfg.data.input_size),
        "epoch": str(epoch),
        "step": str(step),
        "config": json.dumps(to_dict(cfg)),
    }
    save_state_dict(path, sd, meta)
    return path


def run_pretraining(cfg: PretrainConfig) -> dict[str, Any]:
    """Train FCMAE as configured; returns a summary (output paths, final loss, throughput)."""
    from tqdm import tqdm

    from fcmae.data import build_pretrain_dataset

    accelerator, mp, out_dir = setup_run(cfg.run, cfg)
    ckpt_root = out_dir / "checkpoints"

    # data
    size = cfg.data.input_size
    grid = (size // 32, size // 32)
    base = build_pretrain_dataset(cfg.data, cfg.model.in_chans)
    dataset = MaskedSamples(base, grid, cfg.model.mask_ratio, cfg.run.seed)
    sampler = EpochSampler(len(dataset), cfg.run.seed)
    global_batch = cfg.run.batch_size * accelerator.num_processes
    if len(dataset) < global_batch:
        raise ValueError(f"dataset has {len(dataset)} images, fewer than one global batch "
                         f"({cfg.run.batch_size} x {accelerator.num_processes} processes); lower run.batch_size")
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.run.batch_size, sampler=sampler, num_workers=cfg.data.num_workers, drop_last=True,
        pin_memory=torch.cuda.is_available(), persistent_workers=False, generator=torch.Generator().manual_seed(0),
    )

    # model and optimiser
    model = build_model(cfg)
    eff_batch = global_batch * cfg.run.accum_iter
    base_lr = cfg.optim.lr if cfg.optim.lr is not None else scaled_lr(cfg.optim.blr, eff_batch)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=base_lr, betas=cfg.optim.betas)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    state = TrainState()
    accelerator.register_for_checkpointing(state)

    steps_per_epoch = len(loader) // cfg.run.accum_iter
    if steps_per_epoch == 0:
        raise ValueError(f"one epoch has {len(loader)} batches, fewer than run.accum_iter={cfg.run.accum_iter}")
    total_steps = cfg.optim.epochs * steps_per_epoch
    warmup_steps = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
    last_step = min(total_steps, cfg.run.max_steps) if cfg.run.max_steps > 0 else total_steps

    # resume
    resume_from = None
    if cfg.run.resume == "auto":
        resume_from = find_latest_checkpoint(ckpt_root)
    elif cfg.run.resume:
        resume_from = Path(cfg.run.resume)
        if not resume_from.is_dir():
            raise FileNotFoundError(f"run.resume: checkpoint directory not found: {resume_from}")
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        print_main(accelerator, f"resumed from {resume_from} (epoch {state.epoch}, step {state.step})")

    print_main(accelerator, f"fcmae pretrain: {cfg.model.name}, {len(dataset)} images, input {size}x{size}, "
               f"{accelerator.num_processes} process(es) on {accelerator.device}, mixed precision {mp}")
    print_main(accelerator, f"effective batch {eff_batch} = {cfg.run.batch_size} x {accelerator.num_processes} x "
               f"{cfg.run.accum_iter}; blr {cfg.optim.blr:g} -> lr {base_lr:.3e}; {steps_per_epoch} steps/epoch, "
               f"{total_steps} steps total, warmup {warmup_steps}")

    unwrapped: FCMAE = accelerator.unwrap_model(model)
    logger = MetricsLogger(out_dir, accelerator.is_main_process)
    vis_imgs = vis_mask = None
    if accelerator.is_main_process:
        n_vis = min(cfg.run.num_vis_images, len(dataset))
        items = [dataset[i] for i in range(n_vis)]
        vis_imgs = torch.stack([it[0] for it in items])
        vis_mask = torch.stack([it[1] for it in items])
    mean, std = normalization(cfg.model.in_chans)

    def export(epoch: int) -> None:
        if not accelerator.is_main_process:
            return
        export_encoder(unwrapped, cfg, out_dir / "encoder.safetensors", epoch, state.step)
        from fcmae.visualize import save_reconstruction_figure

        dev = next(unwrapped.parameters()).device
        fig = save_reconstruction_figure(unwrapped, vis_imgs.to(dev), vis_mask.to(dev), mean, std,
                                         out_dir / "reconstruction.png")
        summary["figure"] = str(fig)
        summary["encoder"] = str(out_dir / "encoder.safetensors")

    summary: dict[str, Any] = {"output_dir": str(out_dir), "lr": base_lr, "blr": cfg.optim.blr,
                               "effective_batch": eff_batch}
    kill_after = int(os.environ.get("FCMAE_TEST_SIGKILL_AFTER_STEP", "0"))  # test hook: simulate a crash
    model.train()
    t_start = time.perf_counter()
    imgs_run = 0
    last_loss = math.nan
    done = state.step >= last_step
    last_saved = state.step if resume_from is not None else -1
    while not done and state.epoch < cfg.optim.epochs:
        epoch = state.epoch
        sampler.use_epoch(epoch)
        dataset.epoch = epoch
        epoch_loader = accelerator.skip_first_batches(loader, state.batch_in_epoch) if state.batch_in_epoch else loader
        n_left = len(loader) - state.batch_in_epoch
        bar = tqdm(total=n_left, desc=f"epoch {epoch}", disable=not (cfg.run.progress and accelerator.is_main_process),
                   leave=False, dynamic_ncols=True)
        loss_sum, loss_n, t_log, imgs_log = 0.0, 0, time.perf_counter(), 0
        for batch in epoch_loader:
            if state.batch_in_epoch >= steps_per_epoch * cfg.run.accum_iter:
                break  # leftover micro-batches that cannot fill an optimizer step
            lr = lr_at(state.step, total_steps, warmup_steps, base_lr, cfg.optim.min_lr)
            try:
                out = train_step(model, batch, optimizer, accelerator, lr, cfg.optim.clip_grad)
            except NonFiniteLossError as exc:
                last = find_latest_checkpoint(ckpt_root)
                raise NonFiniteLossError(
                    f"{exc} at epoch {epoch}, step {state.step} (lr {lr:.3e}); stopping without saving. "
                    f"Last good checkpoint: {last or 'none'}. Try a lower optim.blr, optim.clip_grad, or fp32."
                ) from None
            n_imgs = batch[0].shape[0] * accelerator.num_processes
            skipped = int(accelerator.gather(batch[2].sum().reshape(1)).sum())
            state.batch_in_epoch += 1
            state.images_seen += n_imgs
            state.skipped_files += skipped
            imgs_run += n_imgs
            imgs_log += n_imgs
            loss_sum += out["loss"]
            loss_n += 1
            last_loss = out["loss"]
            bar.update(1)
            if not out["stepped"]:
                continue
            state.step += 1
            now = time.perf_counter()
            ips = imgs_log / max(now - t_log, 1e-9)
            bar.set_postfix(loss=f"{out['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.1f}")
            if state.step % cfg.run.log_every == 0 or state.step == last_step:
                logger.log({"step": state.step, "epoch": epoch, "loss": loss_sum / loss_n, "lr": lr,
                            "blr": cfg.optim.blr, "img_per_s": ips, "images_seen": state.images_seen,
                            "skipped_files": state.skipped_files, "time_s": now - t_start})
                loss_sum, loss_n, t_log, imgs_log = 0.0, 0, now, 0
            if cfg.run.save_every_steps and state.step % cfg.run.save_every_steps == 0:
                save_checkpoint(accelerator, ckpt_root, state.step, cfg.run.keep_last)
                last_saved = state.step
            if kill_after and state.step == kill_after + 1:
                os.kill(os.getpid(), 9)
            if state.step >= last_step:
                done = True
                break
        bar.close()
        if state.batch_in_epoch >= steps_per_epoch * cfg.run.accum_iter:
            state.epoch += 1
            state.batch_in_epoch = 0
            print_main(accelerator, f"epoch {epoch} done: step {state.step}, loss {last_loss:.4f}, "
                       f"skipped files so far {state.skipped_files}")
            if cfg.run.export_every_epochs and state.epoch % cfg.run.export_every_epochs == 0 and not done:
                export(state.epoch)
        if last_saved != state.step or state.batch_in_epoch == 0:
            save_checkpoint(accelerator, ckpt_root, state.step, cfg.run.keep_last)
            last_saved = state.step
    export(state.epoch)
    wall = time.perf_counter() - t_start
    summary.update({"final_loss": last_loss, "steps": state.step, "epochs": state.epoch, "wall_s": wall,
                    "img_per_s": imgs_run / max(wall, 1e-9), "skipped_files": state.skipped_files,
                    "checkpoint": str(find_latest_checkpoint(ckpt_root))})
    logger.log({"summary": summary})
    logger.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary
