"""The trainer: one training loop on accelerate for every recipe.

The trainer owns devices and mixed precision, the output folder (locked for the run) and the merged config, the
seeded data loader, AdamW with the recipe's parameter groups, the warmup + cosine schedule (sized in epochs or
steps), gradient accumulation and clipping, the non-finite-loss stop, the stop on a signal (SIGTERM, SIGINT,
SIGUSR1: a checkpoint at the step reached, ``RunInterrupted``), resume, checkpoint cadence, metrics (JSONL and the
trackers of ``run.log_with``: ``fcmae.train.tracking``), the progress bar and the final ``summary.json``. A
:class:`Recipe` says only what differs: the model, the data, the parameter groups, the loss of one batch, and what
happens after a step, at an epoch end and at the end.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fcmae.data.decode import collate_samples
from fcmae.data.policy import add_skipped, check_epoch_complete, skip_counts, skipped_summary
from fcmae.data.sampling import EpochSampler, Sample, closing_batches, ignore_stop_signals, shield_workers
from fcmae.train.faults import Faults, peer_failure, process_group_kwargs
from fcmae.train.gpu import apply_gpu_settings
from fcmae.train.recipe import Recipe, RecipeParts, StepHook, TrainContext
from fcmae.train.rundir import RunDirError, RunLock, RunStart, open_run, record_segment
from fcmae.train.stopping import EXIT_NONFINITE, FatalRunError, RunInterrupted, StopRequest, signal_name
from fcmae.train.tracking import TRACKERS_DIR, Tracking
from fcmae.weights.checkpoints import find_latest_checkpoint, save_checkpoint
from fcmae.weights.files import strict_json_value, write_json_atomic


class NonFiniteLossError(FatalRunError):
    """The loss became NaN/inf; the run stops without writing a checkpoint."""

    exit_status = EXIT_NONFINITE


# ------------------------------------------------------------------------------------------- schedule
def scaled_lr(blr: float, effective_batch: int) -> float:
    """The linear scaling rule used by the paper: ``lr = blr * effective_batch / 256``."""
    return blr * effective_batch / 256.0


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float = 0.0) -> float:
    """Per-step schedule: linear warmup from 0 over ``warmup_steps``, then half-cosine to ``min_lr``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class Schedule:
    """Run length and learning rate, resolved from the ``optim`` section and the loader's length."""

    steps_per_epoch: int
    total_steps: int  # optimizer steps of the whole cosine
    warmup_steps: int
    last_step: int  # where this invocation stops (run.max_steps may cut it short)
    base_lr: float
    blr: float  # the configured blr, or the one an absolute optim.lr amounts to
    effective_batch: int

    @property
    def epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)


def make_schedule(optim: Any, run: Any, batches_per_epoch: int, global_batch: int) -> Schedule:
    steps_per_epoch = batches_per_epoch // run.accum_iter
    if steps_per_epoch == 0:
        raise ValueError(f"one epoch has {batches_per_epoch} batches, fewer than run.accum_iter={run.accum_iter}")
    total = optim.steps if optim.steps is not None else optim.epochs * steps_per_epoch
    warmup = optim.warmup_steps if optim.warmup_steps is not None else int(round(optim.warmup_epochs
                                                                                  * steps_per_epoch))
    eff = global_batch * run.accum_iter
    base_lr = optim.lr if optim.lr is not None else scaled_lr(optim.blr, eff)
    last = min(total, run.max_steps) if run.max_steps > 0 else total
    return Schedule(steps_per_epoch, total, min(warmup, total), last, base_lr, base_lr * 256.0 / eff, eff)


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict[str, Any]]:
    """AdamW parameter groups from the model's own knowledge, built by timm.

    No weight decay on 1-D parameters and biases (timm's rule) nor on ``model.no_weight_decay()``. With
    ``layer_decay < 1`` the groups also carry ``lr_scale = layer_decay ** (last - layer)`` with layers from the
    model's ``group_matcher`` (timm's ``param_groups_layer_decay``, which takes the model as it is: the rule is the
    model's ``layer_decay_type``). Frozen parameters are left out.
    """
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    skip = tuple(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else ()
    if layer_decay >= 1.0:
        return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)
    return param_groups_layer_decay(model, weight_decay, no_weight_decay_list=skip, layer_decay=layer_decay)


def resolve_mixed_precision(choice: str) -> str:
    """``auto`` -> bf16 on a CUDA device that supports it, else fp32 (CPU bf16 is slow without AMX/AVX512-BF16)."""
    if choice != "auto":
        return choice
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


# ------------------------------------------------------------------------------------------- state, metrics
@dataclass
class TrainState:
    """Progress counters saved with every checkpoint (accelerate ``register_for_checkpointing``)."""

    epoch: int = 0
    step: int = 0  # optimizer steps taken
    batch_in_epoch: int = 0  # micro-batches (per process) consumed in the current epoch
    images_seen: int = 0
    skipped_files: int = 0  # unreadable files replaced by another one, summed over every batch trained on
    skipped: list[int] = field(default_factory=skip_counts)  # the same per reason (fcmae.data.policy.REASONS)
    elapsed_s: float = 0.0  # training time of the run so far, over every invocation (``time_s`` of metrics.jsonl)

    @property
    def epoch_number(self) -> int:
        """The epoch the last step belongs to, counted from 1 as every line and record counts epochs (``epoch 1/3
        done``, ``eval after epoch 1``, ``epoch`` in metrics.jsonl); 0 before the first step."""
        return self.epoch + (1 if self.batch_in_epoch else 0)

    def state_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, list) else v for k, v in self.__dict__.items()}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        for k, v in d.items():
            setattr(self, k, float(v) if k == "elapsed_s" else [int(x) for x in v] if isinstance(v, list) else int(v))


def build_optimizer(groups: list[dict[str, Any]], optim: Any, device: torch.device,
                    fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over ``groups`` with the ``optim`` section's betas and eps.

    ``fused`` (default: on CUDA) is torch's fused AdamW, and then every group's lr is a 0-dim float32 tensor on
    ``device``, set in place each step (``set_lr``): no host value changes between steps, which CUDA-graph capture
    (``run.compile=reduce-overhead``) needs. Elsewhere plain AdamW with float lrs, exactly as before.
    """
    fused = device.type == "cuda" if fused is None else fused
    kwargs: dict[str, Any] = {"betas": tuple(optim.betas), "eps": optim.eps}
    if not fused:
        return torch.optim.AdamW(groups, lr=0.0, **kwargs)
    groups = [{**g, "lr": torch.zeros((), device=device)} for g in groups]  # one tensor per group
    return torch.optim.AdamW(groups, lr=torch.zeros((), device=device), fused=True, **kwargs)


def set_lr(group: dict[str, Any], value: float) -> None:
    """A group's lr: filled in place when it is a tensor (``build_optimizer(fused=True)``), else replaced."""
    if isinstance(group["lr"], Tensor):
        group["lr"].fill_(value)
    else:
        group["lr"] = value


def rehome_lr(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Tensor lrs back on ``device`` after a checkpoint load (which may have mapped them to the CPU)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], Tensor) and group["lr"].device != device:
            group["lr"] = group["lr"].detach().to(device, torch.float32)


def compile_model(model: nn.Module, mode: str, backend: str) -> nn.Module:
    """``run.compile``: ``torch.compile`` in place (``nn.Module.compile``), before accelerate wraps the model.

    In place, the parameter names stay those of the plain model, so checkpoints and exports of compiled and eager
    runs are interchangeable (a resume may switch ``run.compile``) and ``unwrap_model`` needs nothing special.
    """
    if mode != "no":
        model.compile(backend=backend, mode=None if mode == "default" else mode)
    return model


def backward_and_step(loss: Tensor, optimizer: torch.optim.Optimizer, accelerator, lr: float,
                      clip_grad: float | None = None) -> dict[str, Any]:
    """Inside ``accelerator.accumulate``: backward, and at accumulation boundaries set ``lr * lr_scale`` per group,
    clip the optimised parameters, step.

    Nothing here reads a value back to the host (that would stall an accelerator every step): returns
    ``{"loss": detached 0-dim tensor, "stepped": bool, "grad_norm": 0-dim tensor | None}``. The caller checks
    losses for non-finite values in batches (``Trainer._flush``), before anything is saved.
    """
    accelerator.backward(loss)
    grad_norm = None
    if accelerator.sync_gradients:
        for group in optimizer.param_groups:
            set_lr(group, lr * group.get("lr_scale", 1.0))
        if clip_grad:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            grad_norm = accelerator.clip_grad_norm_(params, clip_grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss.detach().float(), "stepped": accelerator.sync_gradients, "grad_norm": grad_norm}


class _Pending:
    """Per-step values kept on the device between host reads: loss sum, first non-finite step, skipped files."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.skipped = torch.zeros(len(skip_counts()), dtype=torch.long, device=device)  # per reason
        self.count = 0
        self.last_loss = torch.full((), math.nan, device=device)
        self.grad_norm: Tensor | None = None

    def add(self, out: dict[str, Any], step: int, skipped: Tensor) -> None:
        loss = out["loss"]
        bad = ~torch.isfinite(loss) & (self.bad_step < 0)
        self.bad_step = torch.where(bad, step, self.bad_step)
        self.loss_sum += loss
        self.last_loss = loss
        self.skipped += skipped.sum(0)
        self.count += 1
        if out["grad_norm"] is not None:
            self.grad_norm = out["grad_norm"]


def _hms(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    m, sec = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{sec:02d}" if m >= 60 else f"{m}:{sec:02d}"


class Progress:
    """The whole run's progress on stderr (main process): on a terminal one tqdm bar over the optimizer steps
    (global step / last step, loss, lr, images/s, the run's ETA); otherwise no bar (no carriage returns) but one
    plain line per log window: ``step N/TOTAL epoch E loss L lr LR I img/s elapsed T eta T``."""

    RECENT = 50  # steps the ETA is measured over: the pace now, not the start-up's (workers, first batches)

    def __init__(self, enabled: bool, start_step: int, last_step: int) -> None:
        from collections import deque

        self.enabled, self.start, self.last = enabled, start_step, last_step
        self.marks: deque[tuple[float, int]] = deque(maxlen=self.RECENT + 1)  # (time, step) of recent steps
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=last_step, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr)

    def eta(self, step: int) -> float | None:
        """Seconds to the last step at the pace of the last ``RECENT`` steps (None before two steps)."""
        if len(self.marks) < 2:
            return None
        (t0, s0), (t1, s1) = self.marks[0], self.marks[-1]
        return (t1 - t0) / max(s1 - s0, 1) * (self.last - step)

    def step(self, step: int | None = None) -> None:
        """One optimizer step done (``step``: the global step it reached)."""
        if step is not None:
            self.marks.append((time.perf_counter(), step))
        if self.bar is not None:
            self.bar.update(1)

    def window(self, step: int, epoch: int, loss: float, lr: float, img_per_s: float, elapsed: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{img_per_s:.1f}")
        elif self.enabled:
            print(f"step {step}/{self.last} epoch {epoch} loss {loss:.4f} lr {lr:.3e} {img_per_s:.1f} img/s "
                  f"elapsed {_hms(elapsed)} eta {_hms(self.eta(step))}", file=sys.stderr, flush=True)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ------------------------------------------------------------------------------------------- the trainer
class Trainer:
    """Runs a recipe (``fcmae.train.recipe.Recipe``) with a config that has ``optim`` and ``run`` sections.

    ``hooks`` (``StepHook``: a callable taking the ``TrainContext``, the same signature as the recipe's
    ``after_step``) run after every optimizer step. The recipe's own runs first, before the step is logged and
    saved (its work, e.g. the EMA update, belongs to the step); the others run after, so they see the saved state
    (e.g. a test's fault injection).
    """

    def __init__(self, cfg: Any, recipe: Recipe, hooks: Sequence[StepHook] = ()) -> None:
        self.cfg = cfg
        self.recipe = recipe
        self.hooks: list[StepHook] = list(hooks)
        self.out_dir = Path(cfg.run.output_dir).absolute()  # every path the run reports is absolute
        self.ckpt_root = self.out_dir / "checkpoints"
        self.state = TrainState()
        self.summary: dict[str, Any] = {"output_dir": str(self.out_dir)}
        self.progress: Progress | None = None
        self.stop = StopRequest()
        self.faults: Faults | None = None  # the stop agreement, the hang watchdog, lost peers (after _accelerator)
        self.lock: RunLock | None = None

    # -- set-up --------------------------------------------------------------------------------------------
    def say(self, *args: Any) -> None:
        if self.accelerator.is_main_process:
            if self.progress is not None:  # above the bar, when there is one
                self.progress.write(" ".join(map(str, args)))
            else:
                print(*args, file=sys.stderr, flush=True)

    def _accelerator(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, set_seed

        run = self.cfg.run
        if run.threads > 0:
            torch.set_num_threads(run.threads)
        self.mixed_precision = resolve_mixed_precision(run.mixed_precision)
        # several processes on a machine without CUDA: accelerate only picks gloo/MULTI_CPU when told cpu=True
        cpu_ddp = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
        # non_blocking: batches come from pinned memory (pin_memory on CUDA) and are copied without draining the
        # device queue; accelerate's default copies block three times per micro-step
        trackers = {"log_with": run.log_with, "project_dir": str(self.out_dir / TRACKERS_DIR)} if run.log_with else {}
        self.accelerator = Accelerator(mixed_precision=self.mixed_precision, gradient_accumulation_steps=run.accum_iter,
                                       step_scheduler_with_optimizer=False, cpu=cpu_ddp,
                                       dataloader_config=DataLoaderConfiguration(non_blocking=True),
                                       kwargs_handlers=[process_group_kwargs(run.dist_timeout_s)], **trackers)
        self.faults = Faults(self.stop, self.out_dir, run, f"fcmae {self.recipe.name}")
        set_seed(run.seed)

    def _loader(self) -> torch.utils.data.DataLoader:
        run, ds, acc = self.cfg.run, self.parts.train_set, self.accelerator
        pin = torch.cuda.is_available()
        if isinstance(ds, torch.utils.data.IterableDataset):
            # shards: the stream deals them to processes and workers itself and gives every rank the same number of
            # batches; the loader is not prepared by accelerate (whose iterable splitting would read everything)
            if note := ds.configure(acc.process_index, acc.num_processes, run.batch_size, self.cfg.data.num_workers):
                self.say(note)
            self.sampler = None
            workers = min(self.cfg.data.num_workers, ds.num_workers)  # fewer shards than workers: capped
            return torch.utils.data.DataLoader(ds, batch_size=run.batch_size, num_workers=workers,
                                               pin_memory=pin, persistent_workers=False,
                                               worker_init_fn=ignore_stop_signals)
        n = len(ds)
        global_batch = run.batch_size * self.accelerator.num_processes
        if n < global_batch:
            raise ValueError(f"the training set has {n} images, fewer than one global batch ({run.batch_size} x "
                             f"{self.accelerator.num_processes} processes); lower run.batch_size")
        self.sampler = EpochSampler(n, run.seed)
        return torch.utils.data.DataLoader(
            ds, batch_size=run.batch_size, sampler=self.sampler,
            num_workers=self.cfg.data.num_workers, drop_last=True, pin_memory=pin, collate_fn=collate_samples,
            persistent_workers=False, generator=torch.Generator().manual_seed(0), worker_init_fn=ignore_stop_signals)

    def _open_run(self) -> RunStart:
        """The main process locks the folder and decides what this start does (``rundir.open_run``); the others
        receive the decision (or the error) from it, so every process resumes the same checkpoint or stops."""
        acc, start, error = self.accelerator, RunStart(), None
        if acc.is_main_process:
            try:
                self.lock = RunLock(self.out_dir)
                if warning := self.lock.acquire():
                    self.say(warning)
                start = open_run(self.out_dir, self.ckpt_root, self.cfg, self.schedule.last_step)
                for line in start.notes:
                    self.say(line)
            except (ValueError, OSError) as exc:  # ConfigError, RunDirError: user errors, reported by every rank
                error = exc
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            start, error = broadcast_object_list([start, error], from_process=0)
        if error is not None:
            raise error
        return start

    def _load_state(self, path: Path) -> None:
        try:
            self.accelerator.load_state(str(path))
        except (RuntimeError, ValueError, KeyError, OSError) as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise RunDirError(f"run.resume: cannot load checkpoint {path} into this run ({msg})") from None
        self.say(f"resumed from {path} (step {self.state.step}, epoch {self.state.epoch_number})")

    def _setup(self) -> None:
        run = self.cfg.run
        self._accelerator()
        if self.accelerator.is_main_process and self.out_dir.exists() and not self.out_dir.is_dir():
            raise RunDirError(f"run.output_dir {self.out_dir} is a file, not a folder")
        # data and model: every user error in them comes before anything is written
        with self.accelerator.main_process_first():  # e.g. one process scans a folder, the others read its list
            self.parts: RecipeParts = self.recipe.setup()
        o = self.cfg.optim
        apply_gpu_settings(self.parts.model, run, self.accelerator.device)  # run.tf32/cudnn_benchmark/channels_last
        compile_model(self.parts.model, run.compile, run.compile_backend)
        optimizer = build_optimizer(self.parts.param_groups, o, self.accelerator.device)
        loader = self._loader()
        if self.sampler is None:  # a stream: see _loader
            self.model, self.optimizer = self.accelerator.prepare(self.parts.model, optimizer)
            self.loader = loader
        else:
            self.model, self.optimizer, self.loader = self.accelerator.prepare(self.parts.model, optimizer, loader)
        # sized after prepare: with several processes the prepared loader holds this process's share
        self.schedule = make_schedule(o, run, len(self.loader), run.batch_size * self.accelerator.num_processes)
        self.unwrapped = self.accelerator.unwrap_model(self.model)
        self.ctx = self._context()
        self.recipe.after_prepare(self.ctx)
        for obj in [self.state, *self.recipe.stateful()]:
            self.accelerator.register_for_checkpointing(obj)
        self.start = self._open_run()
        if self.start.finished is not None:
            return
        self.resumed_from = self.start.resume_from
        if self.resumed_from is not None:
            self._load_state(self.resumed_from)
            rehome_lr(self.optimizer, self.accelerator.device)
        if self.accelerator.is_main_process:
            s = self.schedule
            record_segment(self.out_dir, self.cfg, self.resumed_from, self.state.step, self.start.changes,
                           f"used: effective batch {s.effective_batch}, lr {s.base_lr:.6g} (= blr {s.blr:.6g} x "
                           f"{s.effective_batch} / 256), {s.total_steps} steps")
        self.logger = Tracking(self.accelerator, self.out_dir, self.cfg, self.state.step)  # JSONL, trackers
        self.ctx.resumed_from = self.resumed_from
        self.ctx.log, self.ctx.image = self.record, self.logger.image

    def elapsed(self) -> float:
        """Training seconds of the whole run: the earlier invocations' (from the checkpoint) + this one's."""
        return self.state.elapsed_s + time.perf_counter() - self.t_start

    def record(self, rec: dict[str, Any], kind: str | None = None) -> None:
        """One metrics.jsonl record: ``type`` (train | eval | monitor | summary; the recipe's records say theirs,
        default train), the fields, ``time_s`` (training seconds of the whole run, continued across resumes) and
        ``timestamp`` (wall clock, unix seconds)."""
        rec = dict(rec)
        kind = kind or rec.pop("type", "train")
        self.logger.log({"type": kind, **rec, "time_s": self.elapsed(), "timestamp": time.time()})

    def _context(self) -> TrainContext:
        """The recipe's view of this trainer (logging is wired in once the metrics file is open)."""
        return TrainContext(accelerator=self.accelerator, model=self.model, unwrapped=self.unwrapped,
                            optimizer=self.optimizer, state=self.state, schedule=self.schedule, out_dir=self.out_dir,
                            mixed_precision=self.mixed_precision, resumed_from=None, log=lambda rec: None,
                            image=lambda tag, path, step: None, say=self.say)

    def _describe(self) -> None:
        s, run, acc = self.schedule, self.cfg.run, self.accelerator
        for line in self.recipe.describe(self.ctx):
            self.say(line)
        given = " (optim.lr given)" if self.cfg.optim.lr is not None else ""
        self.say(f"effective batch {s.effective_batch} = {run.batch_size} x {acc.num_processes} x {run.accum_iter}; "
                 f"blr {s.blr:g} -> lr {s.base_lr:.3e}{given}; {s.steps_per_epoch} steps/epoch, {s.total_steps} "
                 f"steps total ({s.epochs} epochs), warmup {s.warmup_steps}")
        if run.max_steps and s.last_step < s.total_steps:
            self.say(f"run.max_steps={run.max_steps}: this invocation stops at step {s.last_step} of {s.total_steps}")
        self.summary.update(lr=s.base_lr, blr=s.blr, effective_batch=s.effective_batch, total_steps=s.total_steps)

    # -- the loop ------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train as configured; returns the summary (also written to ``<output_dir>/summary.json``).

        SIGTERM, SIGINT and SIGUSR1 stop the run at the end of the current optimizer step with a checkpoint and
        raise ``RunInterrupted`` (``fcmae.train.stopping``); the handlers are in place only while ``fit`` runs. A
        run that already reached its last step (``run.resume=auto``) returns its summary untouched, with
        ``already_finished`` set.
        """
        self.stop.install()
        shield_workers(True)
        clean = False
        try:
            self._setup()
            summary = self._already_finished() if self.start.finished is not None else self._train()
            clean = True
            return summary
        except RunInterrupted as exc:
            clean = not exc.aborted
            if exc.aborted:  # a user's second Ctrl-C: name the checkpoint the next start will resume from
                exc.checkpoint, exc.step = find_latest_checkpoint(self.ckpt_root), self.state.step
            raise
        except RuntimeError as exc:  # a collective failing: a lost peer, a timeout (one line), or a hang
            newest = find_latest_checkpoint(self.ckpt_root)
            lost = (self.faults.translate(exc, self.state.step, newest) if self.faults is not None
                    else peer_failure(exc, self.state.step, self.cfg.run.dist_timeout_s, newest))
            if lost is None:
                raise
            raise lost from None
        finally:
            if self.faults is not None:
                self.faults.close(clean)
            shield_workers(False)
            self.stop.restore()
            if getattr(self, "logger", None) is not None:  # trackers end however the run ends
                self.logger.close()
            if self.lock is not None:
                self.lock.release()

    def _train(self) -> dict[str, Any]:
        self._describe()
        s = self.schedule
        self.recipe.train_mode(self.model)
        self.t_start = self.t_invocation = time.perf_counter()
        self.images_run, self.last_loss, self.window_loss = 0, math.nan, None
        self.pending = _Pending(self.accelerator.device)
        self.last_saved = self.state.step if self.resumed_from is not None else -1
        self.progress = Progress(self.cfg.run.progress and self.accelerator.is_main_process, self.state.step,
                                 s.last_step)
        self.save_due = False  # a step checkpoint deferred to the end of its epoch (see _micro_step)
        try:
            while self.state.step < s.last_step and not self._stop_now():
                self._epoch()
            if self.state.step < s.last_step:
                self._stop_here()
            if self.last_saved != self.state.step:
                self.save()
            self._flush()
        except NonFiniteLossError as exc:
            self._finish_failed(exc)
            raise
        finally:
            self.progress.close()
        return self._finish()

    def _stop_now(self) -> bool:
        """Whether a stop signal ends the run at this step boundary: one process, as soon as its handler saw one;
        several, at the step they agreed on (``fcmae.train.faults.StopAgreement``: one step later, every process
        at the same step, whichever got the signal)."""
        return self.faults.agreement.poll(self.state.step) > 0

    def _stop_here(self) -> None:
        """Save the step reached (the normal checkpoint path), log it and raise ``RunInterrupted``."""
        st = self.state
        signum = self.faults.agreement.agreed
        if st.step > 0 and self.last_saved != st.step:
            self.save()
        self._flush()
        ckpt = find_latest_checkpoint(self.ckpt_root) if st.step > 0 else None
        stop_s = time.monotonic() - self.stop.time if self.stop.time else None
        self.record({"step": st.step, "signal": signal_name(signum), "checkpoint": str(ckpt), "stop_s": stop_s},
                    "interrupted")
        self._write_summary("interrupted", signal=signal_name(signum))
        raise RunInterrupted(signum, ckpt, st.step)

    def _already_finished(self) -> dict[str, Any]:
        summary = {**self.start.finished, "already_finished": True}
        self.say(f"run.output_dir {self.out_dir} holds a finished run ({summary.get('steps')} steps, "
                 f"{self.out_dir / 'summary.json'}): nothing to do")
        return summary

    def _epoch(self) -> None:
        from accelerate.utils import send_to_device

        st, s, acc, run = self.state, self.schedule, self.accelerator, self.cfg.run
        epoch = st.epoch
        self.parts.train_set.use_epoch(epoch)
        if self.sampler is not None:
            self.sampler.use_epoch(epoch)
            loader = acc.skip_first_batches(self.loader, st.batch_in_epoch) if st.batch_in_epoch else self.loader
        else:  # a stream skips the batches already trained on before decoding them
            self.parts.train_set.skip_batches(st.batch_in_epoch)
            loader = (send_to_device(b, acc.device, non_blocking=True) for b in self.loader)
        batches_per_epoch = s.steps_per_epoch * run.accum_iter
        loader = closing_batches(loader)  # workers end with the loop, also when a worker raised
        self._window_t, self._window_images = time.perf_counter(), 0  # since the last log line
        for batch in loader:
            if st.batch_in_epoch >= batches_per_epoch:
                break  # leftover micro-batches that cannot fill an optimizer step
            if self._micro_step(batch) and (st.step >= s.last_step or self._stop_now()):
                break
        else:  # the loader ran dry: re-entering the epoch would start workers that find it dry again, in a loop
            check_epoch_complete(st.batch_in_epoch, batches_per_epoch, epoch)
        if st.batch_in_epoch >= batches_per_epoch:
            st.epoch += 1
            st.batch_in_epoch = 0
            self._flush()
            self.say(f"epoch {epoch + 1}/{s.epochs} done: step {st.step}/{s.last_step}, loss {self.last_loss:.4f}, "
                     f"elapsed {_hms(self.elapsed())}, eta {_hms(self.progress.eta(st.step))}")
            with self.faults.watchdog.paused():  # evaluation, exports: not steps (their waits: run.dist_timeout_s)
                self.recipe.on_epoch_end(self.ctx, epoch)
            self.recipe.train_mode(self.model)
            due, self.save_due = st.epoch % run.save_every_epochs == 0 or self.save_due, False
            if due and self.last_saved != st.step:
                self.save()

    def _micro_step(self, batch: Sample) -> bool:
        """One micro-batch; True when it completed an optimizer step. No host read unless it logs or saves."""
        st, acc = self.state, self.accelerator
        lr = lr_at(st.step, self.schedule.total_steps, self.schedule.warmup_steps, self.schedule.base_lr,
                   self.cfg.optim.min_lr)
        with acc.accumulate(self.model):
            out = backward_and_step(self.recipe.loss(self.model, batch), self.optimizer, acc, lr,
                                    self.cfg.optim.clip_grad)
        n_imgs = len(batch.skipped) * acc.num_processes
        self.pending.add(out, st.step, batch.skipped)
        st.batch_in_epoch += 1
        st.images_seen += n_imgs
        self.images_run += n_imgs
        self._window_images += n_imgs
        if not out["stepped"]:
            return False
        st.step += 1
        self.faults.watchdog.beat(st.step)
        self.progress.step(st.step)
        self.recipe.after_step(self.ctx)
        if st.step % self.cfg.run.log_every == 0 or st.step == self.schedule.last_step:
            self._log_step(lr)
        if self.cfg.run.save_every_steps and st.step % self.cfg.run.save_every_steps == 0:
            # a step that ends its epoch is saved after the epoch-end work (evaluation, the epoch counter): a
            # checkpoint from before it would make a resumed run evaluate and log that epoch a second time
            if st.batch_in_epoch >= self.schedule.steps_per_epoch * self.cfg.run.accum_iter:
                self.save_due = True
            else:
                self.save()
        for hook in self.hooks:
            hook(self.ctx)
        return True

    def _flush(self) -> dict[str, Any]:
        """Read the values kept on the device since the last read (one host read, all processes).

        Raises ``NonFiniteLossError`` if any loss was non-finite: called before every log line, save, end of epoch
        and the end of the run, so nothing trained on a non-finite loss is ever saved.
        """
        p, acc = self.pending, self.accelerator
        if p.count == 0:
            return {"loss": self.last_loss, "grad_norm": None}
        packed = torch.cat([torch.stack([p.loss_sum, p.last_loss, p.bad_step.float(), p.skipped.sum().float()]),
                            p.skipped.float()]).reshape(1, -1)  # the total, then per reason
        rows = acc.gather(packed).tolist()
        grad_norm = float(p.grad_norm) if p.grad_norm is not None else None
        self.pending = _Pending(acc.device)
        bad = [int(r[2]) for r in rows if r[2] >= 0]
        if bad:
            s = self.schedule
            lr = lr_at(min(bad), s.total_steps, s.warmup_steps, s.base_lr, self.cfg.optim.min_lr)
            raise NonFiniteLossError(
                f"non-finite loss at step {min(bad)} (lr {lr:.3e}); stopping without saving. Last good "
                f"checkpoint: {find_latest_checkpoint(self.ckpt_root) or 'none'}. Try a lower optim.blr, "
                "optim.clip_grad, or fp32.")
        self.state.skipped_files += int(sum(r[3] for r in rows))
        run, per_epoch = self.cfg.run, self.schedule.steps_per_epoch * self.accelerator.num_processes
        add_skipped(self.state.skipped, [r[4:] for r in rows], self.state.images_seen,
                    per_epoch * run.accum_iter * run.batch_size, self.cfg.data.max_skipped_fraction)
        self.last_loss = sum(r[1] for r in rows) / len(rows)
        return {"loss": sum(r[0] for r in rows) / (p.count * len(rows)), "grad_norm": grad_norm}

    def _log_step(self, lr: float) -> None:
        st, now = self.state, time.perf_counter()
        flushed = self._flush()
        ips = self._window_images / max(now - self._window_t, 1e-9)
        self.window_loss = flushed["loss"]
        self.progress.window(st.step, st.epoch_number, flushed["loss"], lr, ips, self.elapsed())
        rec = {"step": st.step, "epoch": st.epoch_number, "loss": flushed["loss"], "lr": lr, "blr": self.schedule.blr,
               "img_per_s": ips, "images_seen": st.images_seen, "skipped_files": st.skipped_files,
               "skipped": skipped_summary(st.skipped)}
        if flushed["grad_norm"] is not None:
            rec["grad_norm"] = flushed["grad_norm"]
        self.record(rec, "train")
        self._window_t, self._window_images = now, 0

    def save(self) -> Path:
        self._flush()
        self.state.elapsed_s, self.t_start = self.elapsed(), time.perf_counter()  # saved with the state
        path = save_checkpoint(self.accelerator, self.ckpt_root, self.state.step, self.cfg.run.keep_last)
        self.last_saved = self.state.step
        return path

    def _write_summary(self, status: str, **extra: Any) -> None:
        """``summary.json`` (strict JSON) and the last metrics.jsonl record (``type`` summary); see README Outputs.

        ``status``: finished (the whole schedule), stopped (``run.max_steps`` ended it early; resume to go on) or
        failed (``error`` says why); ``final_loss``: the mean loss of the last log window (the ``loss`` of the last
        ``train`` record); ``time_s``: training seconds of the whole run, across resumes; ``wall_s``: this
        invocation's. Paths are absolute.
        """
        from fcmae.config import to_dict

        version = sys.modules["fcmae"].__version__  # the package (loaded before any of its modules); no upward import

        st, wall = self.state, time.perf_counter() - self.t_invocation
        ckpt = find_latest_checkpoint(self.ckpt_root)
        self.summary.update(extra)
        self.summary.update({
            "status": status, "fcmae_version": version, "final_loss": self.window_loss, "steps": st.step,
            "epochs": st.epoch, "time_s": self.elapsed(), "wall_s": wall,
            "img_per_s": self.images_run / max(wall, 1e-9), "skipped_files": st.skipped_files,
            "skipped": skipped_summary(st.skipped),
            "checkpoint": str(ckpt) if ckpt is not None else None, "metrics": str(self.logger.path),
            "resumed_from": str(self.resumed_from) if self.resumed_from is not None else None,
            "summary": str(self.out_dir / "summary.json"), "config": to_dict(self.cfg),
        })
        self.summary = strict_json_value(self.summary)
        self.record({"summary": self.summary}, "summary")
        self.logger.close()
        if self.accelerator.is_main_process:
            write_json_atomic(self.out_dir / "summary.json", self.summary)

    def _finish_failed(self, exc: BaseException) -> None:
        if self.accelerator.is_main_process:
            self._write_summary("failed", error=str(exc).splitlines()[0])

    def _finish(self) -> dict[str, Any]:
        with self.faults.watchdog.paused():
            self.summary.update(self.recipe.finish(self.ctx))
        self._write_summary("finished" if self.state.step >= self.schedule.total_steps else "stopped")
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        return self.summary
