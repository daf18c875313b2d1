"""The FCMAE pretraining recipe: sparse-encoder FCMAE on unlabelled images, exporting the encoder as it goes.

What differs from any other run (the loop itself is :class:`fcmae.trainer.Trainer`'s): the model is
:func:`fcmae.models.fcmae.create_fcmae`; the data is the pretraining set with a random mask per sample (seeded like
the augmentation); every parameter is optimised with weight decay on conv/linear weights only; the loss is the
model's masked-patch MSE; every ``run.export_every_epochs`` epochs and at the end the encoder weights
(``encoder.safetensors``) and a reconstruction figure (``reconstruction.png``, also a TensorBoard image) are written.
With a ``monitor`` section the k-NN top-1 of the encoder's features is logged as ``knn_top1`` (:mod:`fcmae.monitor`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fcmae.config import PretrainConfig, to_dict
from fcmae.masking import num_kept
from fcmae.trainer import Callback, Recipe, Trainer, param_groups


def build_model(cfg: PretrainConfig) -> nn.Module:
    """The FCMAE model a pretraining config describes."""
    from fcmae.models.fcmae import create_fcmae

    m = cfg.model
    return create_fcmae(m.name, in_chans=m.in_chans, mask_ratio=m.mask_ratio, decoder_depth=m.decoder_depth,
                        decoder_embed_dim=m.decoder_embed_dim, norm_pix_loss=m.norm_pix_loss,
                        drop_path_rate=m.drop_path_rate, use_grn=m.use_grn, backend=m.backend)


def export_encoder(model: nn.Module, cfg: PretrainConfig, path: Path, epoch: int, step: int) -> Path:
    """Encoder weights in our dense layout (no final norm/head) + metadata, safetensors, written atomically."""
    from fcmae.io import save_state_dict

    sd = {k: v.detach().cpu() for k, v in model.encoder.state_dict().items()}
    meta = {"format": "fcmae-encoder", "layout": "dense", "variant": cfg.model.name,
            "in_chans": str(cfg.model.in_chans), "image_size": str(cfg.data.input_size), "epoch": str(epoch),
            "step": str(step), "config": json.dumps(to_dict(cfg))}
    return save_state_dict(path, sd, meta)


class PretrainRecipe(Recipe):
    name = "pretrain"

    def __init__(self, cfg: PretrainConfig) -> None:
        self.cfg = cfg
        self.monitor: Any = None
        self.knn: dict[str, Any] = {}  # the last k-NN measurement

    def setup(self, trainer: Trainer) -> None:
        from fcmae.data import SeededSamples, build_pretrain_dataset

        cfg = self.cfg
        grid = (cfg.data.input_size // 32, cfg.data.input_size // 32)
        base = build_pretrain_dataset(cfg.data, cfg.model.in_chans)
        self.train_set = SeededSamples(base, seed=cfg.run.seed, labelled=False, mask_grid=grid,
                                       mask_ratio=cfg.model.mask_ratio)
        self.model = build_model(cfg)
        self.param_groups = param_groups(self.model, cfg.optim.weight_decay)

    def after_prepare(self, trainer: Trainer) -> None:
        if trainer.accelerator.is_main_process:  # fixed images and masks for every figure of the run
            items = [self.train_set[i] for i in range(min(self.cfg.run.num_vis_images, len(self.train_set)))]
            self.vis = (torch.stack([it[0] for it in items]), torch.stack([it[1] for it in items]))
            if self.cfg.monitor.train:
                from fcmae.monitor import KnnMonitor

                m, d = self.cfg.model, self.cfg.data
                self.monitor = KnnMonitor(self.cfg.monitor, m.name, m.in_chans, d.input_size, m.use_grn,
                                          d.path if d.source == "fashion_mnist" else None)

    def measure_knn(self, trainer: Trainer) -> None:
        """k-NN top-1 of the current encoder: logged (metrics.jsonl, TensorBoard) and printed; main process."""
        if self.monitor is None or self.knn.get("step") == trainer.state.step:
            return
        st = trainer.state
        self.knn = {"step": st.step, "epoch": st.epoch, **self.monitor.measure(trainer.unwrapped.encoder)}
        trainer.logger.log(self.knn)
        trainer.say(f"k-NN monitor at step {st.step}: top-1 {self.knn['knn_top1']:.2f} "
                    f"({self.knn['knn_seconds']:.1f} s)")

    def after_step(self, trainer: Trainer) -> None:
        every = self.cfg.monitor.every_steps
        if every and trainer.state.step % every == 0:
            self.measure_knn(trainer)

    def describe(self, trainer: Trainer) -> list[str]:
        acc, d = trainer.accelerator, self.cfg.data
        return [f"fcmae pretrain: {self.cfg.model.name}, {len(self.train_set)} images, input {d.input_size}x"
                f"{d.input_size}, {acc.num_processes} process(es) on {acc.device}, mixed precision "
                f"{trainer.mixed_precision}"]

    def loss(self, model: nn.Module, batch: Sequence[Tensor]) -> Tensor:
        """batch: ``(imgs (B, C, H, W), mask (B, L) bool, n_skipped (B,))``; the masks keep ``num_kept(L,
        mask_ratio)`` cells (``SeededSamples``), which the model then need not read back from the device."""
        mask = batch[1]
        return model(batch[0], mask, num_keep=num_kept(mask.shape[1], self.cfg.model.mask_ratio))["loss"]

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        knn_every = self.cfg.monitor.every_epochs
        if knn_every and trainer.state.epoch % knn_every == 0:
            self.measure_knn(trainer)
        every, st = self.cfg.run.export_every_epochs, trainer.state
        if every and st.epoch % every == 0 and st.step < trainer.schedule.last_step:
            self.export(trainer)

    def export(self, trainer: Trainer) -> dict[str, Any]:
        """Encoder weights and the reconstruction figure (main process)."""
        if not trainer.accelerator.is_main_process:
            return {}
        from fcmae.data import mean_std
        from fcmae.visualize import save_reconstruction_figure

        model, out = trainer.unwrapped, trainer.out_dir
        export_encoder(model, self.cfg, out / "encoder.safetensors", trainer.state.epoch, trainer.state.step)
        dev = next(model.parameters()).device
        mean, std = mean_std(self.cfg.model.in_chans)
        fig = save_reconstruction_figure(model, self.vis[0].to(dev), self.vis[1].to(dev), mean, std,
                                         out / "reconstruction.png")
        trainer.logger.image("reconstruction", fig, trainer.state.step)
        return {"figure": str(fig), "encoder": str(out / "encoder.safetensors")}

    def finish(self, trainer: Trainer) -> dict[str, Any]:
        out = self.export(trainer)
        if self.monitor is not None:
            self.measure_knn(trainer)
            out.update(knn_top1=self.knn["knn_top1"], knn_step=self.knn["step"])
        return out


def run_pretraining(cfg: PretrainConfig, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train FCMAE as configured; returns the summary (output paths, final loss, throughput)."""
    return Trainer(cfg, PretrainRecipe(cfg), callbacks).fit()
