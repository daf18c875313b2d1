"""The FCMAE pretraining recipe: sparse-encoder FCMAE on unlabelled images, exporting the encoder as it goes.

What differs from any other run (the loop itself is :class:`fcmae.train.trainer.Trainer`'s): the model is
:func:`fcmae.models.fcmae.create_fcmae`; the data is the pretraining set with a random mask per sample (seeded like
the augmentation); every parameter is optimised with weight decay on conv/linear weights only; the loss is the
model's masked-patch MSE; every ``run.export_every_epochs`` epochs and at the end the encoder weights
(``encoder.safetensors``) and a reconstruction figure (``reconstruction.png``, also a TensorBoard image) are written.
With a ``monitor`` section the k-NN top-1 of the encoder's features is logged as ``knn_top1``
(:mod:`fcmae.train.monitor`).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torch.utils.data import IterableDataset

from fcmae.config import PretrainConfig, to_dict
from fcmae.data.decode import collate_samples
from fcmae.data.sampling import Sample
from fcmae.data.transforms import DeviceDecoder, DeviceNormalize
from fcmae.models.masking import num_kept
from fcmae.models.registry import mean_std
from fcmae.train.recipe import RecipeBase, RecipeParts, StepHook, TrainContext
from fcmae.train.rundir import HISTORY, saved_config
from fcmae.train.trainer import Trainer, param_groups


def build_model(cfg: PretrainConfig) -> nn.Module:
    """The FCMAE model a pretraining config describes."""
    from fcmae.models.fcmae import create_fcmae

    m = cfg.model
    return create_fcmae(m.name, in_chans=m.in_chans, decoder_depth=m.decoder_depth,
                        decoder_embed_dim=m.decoder_embed_dim, norm_pix_loss=m.norm_pix_loss,
                        drop_path_rate=m.drop_path_rate, use_grn=m.use_grn, backend=m.backend)


def export_encoder(model: nn.Module, cfg: PretrainConfig, path: Path, epoch: int, step: int) -> Path:
    """Encoder weights in our dense layout (no final norm/head) + metadata, safetensors, written atomically."""
    from fcmae.weights.files import save_state_dict

    sd = {k: v.detach().cpu() for k, v in model.encoder.state_dict().items()}
    meta = {"format": "fcmae-encoder", "layout": "dense", "variant": cfg.model.name,
            "in_chans": str(cfg.model.in_chans), "image_size": str(cfg.data.input_size), "epoch": str(epoch),
            "step": str(step), "config": json.dumps(to_dict(cfg))}
    return save_state_dict(path, sd, meta)


def load_pretraining_model(path: str | Path) -> tuple[nn.Module, PretrainConfig, Path]:
    """An FCMAE model (encoder + decoder) from a pretraining run directory, one of its checkpoints, or a
    ``model.safetensors`` written by one. The architecture comes from the run's ``config.yaml`` (searched upwards
    from the weights; the last segment's from ``config_history.jsonl`` when the run was resumed) or the ``config``
    metadata of the file. Returns ``(model in eval mode, PretrainConfig, file)``.
    """
    from fcmae.config import config_from_dict, load_config
    from fcmae.weights.files import load_state_dict_file
    from fcmae.weights.loader import WeightsError, resolve_weights_path

    p = resolve_weights_path(path, run_files=())  # the encoder alone cannot rebuild the decoder
    weights = p / "model.safetensors" if p.is_dir() else p
    sd, meta = load_state_dict_file(weights)
    if "mask_token" not in sd or not any(k.startswith("decoder.") for k in sd):
        what = ("the exported encoder alone" if meta.get("format") == "fcmae-encoder" else
                "a classifier (fine-tuning weights)" if "head.weight" in sd or "head.1.weight" in sd else
                "not an FCMAE model with its decoder")
        raise WeightsError(f"{path}: {what}; the reconstruction needs the decoder: give the pretraining run folder "
                           "(e.g. output/demo) or one of its checkpoints/step_N")
    cfg_path = next((d / "config.yaml" for d in weights.parents if (d / "config.yaml").is_file()), None)
    if cfg_path is not None and (cfg_path.parent / HISTORY).is_file():  # resumed with a changed config
        cfg = config_from_dict(PretrainConfig, saved_config(cfg_path.parent)[0])
    elif cfg_path is not None:
        cfg = load_config(PretrainConfig, cfg_path)
    elif "config" in meta:
        cfg = config_from_dict(PretrainConfig, json.loads(meta["config"]))
    else:
        raise WeightsError(f"{weights}: cannot find the run's config.yaml to rebuild the model")
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise WeightsError(f"{weights}: not an FCMAE pretraining checkpoint of {cfg.model.name} "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval(), cfg, weights


def _keep_file_list(data: Any, train_set: Any) -> None:
    """Write the scanned file list to ``data.file_list`` when it names a file that does not exist yet."""
    dst = Path(data.file_list).expanduser() if data.file_list else None
    paths = getattr(getattr(train_set, "base", None), "paths", None)
    if dst is None or dst.exists() or paths is None or data.limit:
        return
    from fcmae.data.folders import pretrain_image_root
    from fcmae.weights.files import write_text_atomic

    root = pretrain_image_root(data)
    write_text_atomic(dst, "".join(f"{p.relative_to(root)}\n" for p in paths))


class PretrainRecipe(RecipeBase):
    name = "pretrain"

    def __init__(self, cfg: PretrainConfig) -> None:
        self.cfg = cfg
        self.monitor: Any = None
        self.knn: dict[str, Any] = {}  # the last k-NN measurement
        self._knn_step = -1  # the step it was taken at (known on every process)
        self._plain: nn.Module | None = None  # main process: the gathered weights in a plain model
        self._plain_step = -1
        self.normalize = DeviceNormalize(*mean_std(cfg.model.in_chans))
        self.decoder = DeviceDecoder(cfg.data.input_size, cfg.model.in_chans)

    def setup(self) -> RecipeParts:
        from fcmae.data import build_pretrain_train_set

        cfg = self.cfg
        grid = (cfg.data.input_size // 32, cfg.data.input_size // 32)
        self.train_set = build_pretrain_train_set(cfg.data, cfg.model.in_chans, cfg.run.seed, grid,
                                                  cfg.model.mask_ratio)
        _keep_file_list(cfg.data, self.train_set)
        model = build_model(cfg)
        model.set_grad_checkpointing(cfg.run.grad_checkpointing)
        return RecipeParts(model, self.train_set, param_groups(model, cfg.optim.weight_decay))

    def after_prepare(self, ctx: TrainContext) -> None:
        if ctx.is_main_process:  # fixed images and masks for every figure of the run
            n = min(self.cfg.run.num_vis_images, len(self.train_set))
            # a shard stream is not indexable: its first items (this process's first reader stream) instead
            items = (list(itertools.islice(iter(self.train_set), n)) if isinstance(self.train_set, IterableDataset)
                     else [self.train_set[i] for i in range(n)])
            batch = collate_samples(items)
            self.vis = (self.normalize(self.decoder(batch.image, "cpu")), batch.target)
            if self.cfg.monitor.train:
                from fcmae.train.monitor import KnnMonitor

                m, d = self.cfg.model, self.cfg.data
                self.monitor = KnnMonitor(self.cfg.monitor, m.name, m.in_chans, d.input_size, m.use_grn,
                                          d.path if d.source == "fashion_mnist" else None)

    def plain_model(self, ctx: TrainContext) -> nn.Module | None:
        """The current weights in a plain, unsharded FCMAE built from the config, on the training device, on the
        main process (None elsewhere). A collective: every process calls it (see ``fcmae.train.sharding``). Also
        keeps figure and monitor forwards away from a compiled model (no recompilation for eval shapes)."""
        from fcmae.train.sharding import full_state_dict, load_plain

        step = ctx.state.step
        if self._plain_step != step:
            state = full_state_dict(ctx.model, ctx.accelerator)  # every process takes part
            self._plain_step = step
            if ctx.is_main_process:
                self._plain = load_plain(self._plain or build_model(self.cfg), state).to(ctx.accelerator.device)
        return self._plain if ctx.is_main_process else None

    def measure_knn(self, ctx: TrainContext) -> None:
        """k-NN top-1 of the current encoder: logged (metrics.jsonl, TensorBoard) and printed. Every process calls
        it (the weights are gathered); the main process measures on its plain copy."""
        if not self.cfg.monitor.train or self._knn_step == ctx.state.step:
            return
        st = ctx.state
        self._knn_step = st.step
        plain = self.plain_model(ctx)
        if plain is None or self.monitor is None:
            return
        self.knn = {"step": st.step, "epoch": st.epoch_number, **self.monitor.measure(plain.encoder)}
        ctx.log({"type": "monitor", **self.knn})
        ctx.say(f"k-NN monitor at step {st.step}: top-1 {self.knn['knn_top1']:.2f} "
                    f"({self.knn['knn_seconds']:.1f} s)")

    def after_step(self, ctx: TrainContext) -> None:
        every = self.cfg.monitor.every_steps
        if every and ctx.state.step % every == 0:
            self.measure_knn(ctx)

    def describe(self, ctx: TrainContext) -> list[str]:
        acc, d = ctx.accelerator, self.cfg.data
        return [f"fcmae pretrain: {self.cfg.model.name}, {len(self.train_set)} images, input {d.input_size}x"
                f"{d.input_size}, {acc.num_processes} process(es) on {acc.device}, mixed precision "
                f"{ctx.mixed_precision}"]

    def loss(self, model: nn.Module, batch: Sample) -> Tensor:
        """batch: images ``(B, C, H, W)`` uint8, target = masks ``(B, L)`` bool drawn by ``SeededSamples`` with
        ``model.mask_ratio``, keeping ``num_kept(L, mask_ratio)`` cells each (so the model need not read the count
        back from the device)."""
        mask = batch.target
        # uint8 from the workers (or JPEG bytes with data.decode=gpu, decoded here), normalised on the device
        images = self.normalize(self.decoder(batch.image, mask.device))
        return model(images, mask, num_keep=num_kept(mask.shape[1], self.cfg.model.mask_ratio))["loss"]

    def on_epoch_end(self, ctx: TrainContext, epoch: int) -> None:
        knn_every = self.cfg.monitor.every_epochs
        if knn_every and ctx.state.epoch % knn_every == 0:
            self.measure_knn(ctx)
        every, st = self.cfg.run.export_every_epochs, ctx.state
        if every and st.epoch % every == 0 and st.step < ctx.schedule.last_step:
            self.export(ctx)

    def export(self, ctx: TrainContext) -> dict[str, Any]:
        """Encoder weights and the reconstruction figure, from the gathered weights (every process calls it; the
        main process writes)."""
        model = self.plain_model(ctx)
        if model is None:
            return {}
        from fcmae.evaluation.figures import save_reconstruction_figure

        out = ctx.out_dir
        export_encoder(model, self.cfg, out / "encoder.safetensors", ctx.state.epoch_number, ctx.state.step)
        dev = next(model.parameters()).device
        mean, std = mean_std(self.cfg.model.in_chans)
        fig = save_reconstruction_figure(model, self.vis[0].to(dev), self.vis[1].to(dev), mean, std,
                                         out / "reconstruction.png")
        ctx.image("reconstruction", fig, ctx.state.step)
        return {"figure": str(fig), "encoder": str(out / "encoder.safetensors")}

    def finish(self, ctx: TrainContext) -> dict[str, Any]:
        out = self.export(ctx)
        self.measure_knn(ctx)
        if self.monitor is not None:
            out.update(knn_top1=self.knn["knn_top1"], knn_step=self.knn["step"])
        return out


def run_pretraining(cfg: PretrainConfig, hooks: Sequence[StepHook] = ()) -> dict[str, Any]:
    """Train FCMAE as configured; returns the summary (output paths, final loss, throughput)."""
    return Trainer(cfg, PretrainRecipe(cfg), hooks).fit()
