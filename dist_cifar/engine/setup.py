"""(all ranks) Building a run: the data, the model, the optimizer and batches, and the checkpoint restored."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import set_seed

from dist_cifar.config import Config, dump_yaml
from dist_cifar.data.batches import DeviceBatches, EpochSampler, LoaderImages, normalize, steps_per_epoch
from dist_cifar.data.sources import Dataset, load_dataset
from dist_cifar.dist.failures import PHASE, collective_timeout
from dist_cifar.engine.run import Plan, Run, batch_sizes
from dist_cifar.errors import RunError
from dist_cifar.models import build_model
from dist_cifar.observe.flops import describe, flops_per_image, peak_flops
from dist_cifar.observe.log import MainLog
from dist_cifar.observe.tracking import Tracker
from dist_cifar.optim import build_average, build_optimizer, build_scheduler
from dist_cifar.state.resume import Checkpoint, Progress, TrainState, check_resumable, restore


def setup(cfg: Config, accelerator, info: dict, run_dir: Path, log: MainLog, resumed: Checkpoint | None) -> Run:
    """(all ranks) Data, model, optimizer and batches; the checkpoint `resumed` restored into them."""
    PHASE.set("loading data")
    # One process per machine decodes an image folder the first time while the others wait for it:
    # the next collective may wait that long, so this phase has its own limit.
    with collective_timeout(max(3600, cfg.dist.timeout_seconds), cfg.dist.timeout_seconds):
        data = load_dataset(cfg.data, seed=cfg.seed)
        accelerator.wait_for_everyone()
    PHASE.set("start-up")
    plan = make_plan(cfg, accelerator.num_processes, len(data.train))
    if resumed:
        check_resumable(resumed, cfg, data.classes, plan.global_batch)

    set_seed(cfg.seed)  # identical initial weights on every rank
    net = build_net(cfg, accelerator, data, log)
    flops = flops_per_image(net, cfg.data.image_size)  # one image forward on the CPU, before training (ms)
    info.update(flops_per_image=flops["total"], peak_flops=peak_flops(accelerator.device, info["mixed_precision"]))
    set_seed(cfg.seed + accelerator.process_index)  # anything random from here on differs per rank
    optimizer = build_optimizer(cfg, net, global_batch_size=plan.global_batch)
    scheduler = build_scheduler(cfg, optimizer, plan.total_steps, plan.steps_per_epoch)
    model, optimizer, scheduler = accelerator.prepare(torch.compile(net) if cfg.model.compile else net,
                                                      optimizer, scheduler)
    state = TrainState(net, optimizer, scheduler, accelerator.scaler, build_average(cfg, net), Progress(),
                       plan.accum, plan.global_batch)
    run = Run(cfg, accelerator, info, run_dir, log, data, plan, state, model, make_batches(cfg, accelerator, data, plan))
    if resumed:
        loss_sum, seen, line = restore(resumed, state, accelerator, cfg)
        run.partial = (loss_sum, seen)
        log.print(line)
        # Records written after this checkpoint belong to lost work and will be written again.
        log.write_text("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in state.progress.history))

    accelerator.wait_for_everyone()  # nobody writes before every rank has looked at the folder
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        log.write_text("config.yaml", dump_yaml(cfg))
    # does nothing off the main process or when disabled; start_step: where a resumed run's records start again
    run.tracker = Tracker(cfg, accelerator, run_dir, log, start_step=state.progress.step)
    world = plan.world
    log.print(f"dist_cifar: world size {world}, backend {info['backend']}, device {info['device']}, "
              f"precision {info['mixed_precision']}, {info['threads_per_process']} threads/process")
    log.print(f"data: {data.source}: {len(data.train)} train / {len(data.test)} test images, "
              f"{len(data.classes)} classes, pipeline {cfg.data.pipeline}")
    log.print(f"model: {cfg.model.name}, {sum(p.numel() for p in net.parameters()):,} parameters; "
              f"{plan.total_steps} optimizer steps of {plan.global_batch} images ({plan.batch} x {world} "
              f"process{'es' if world != 1 else ''} x {plan.accum}); run folder {run_dir}")
    log.print(f"model: {describe(flops)}" + (f"; peak {info['peak_flops'][1]}" if info["peak_flops"] else ""))
    return run


def make_plan(cfg: Config, world: int, train_images: int) -> Plan:
    """Images per process, micro-steps per epoch and the run's optimizer steps on `world` processes."""
    batch, global_batch = batch_sizes(cfg.train, world)
    k = cfg.train.grad_accum_steps
    micro = steps_per_epoch(train_images, batch, world) // k * k
    if micro == 0:
        raise RunError(f"{train_images} training images cannot fill one optimizer step of {global_batch} images")
    total = cfg.train.epochs * (micro // k)
    return Plan(world, batch, k, global_batch, micro, micro // k, min(total, cfg.train.max_steps or total))


def build_net(cfg: Config, accelerator, data: Dataset, log: MainLog) -> torch.nn.Module:
    """The network as configured, before Accelerate wraps it."""
    net = build_model(cfg.model, len(data.classes), cfg.data.image_size)
    if hasattr(net, "init_whitening"):  # fastnet: its first layer is fitted to the training images
        net.init_whitening(normalize(torch.from_numpy(np.array(data.train.images[:5000])), cfg.data.mean, cfg.data.std))
    if cfg.model.sync_batchnorm:
        if accelerator.device.type == "cuda" and accelerator.num_processes > 1:
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        else:
            log.warn("model.sync_batchnorm is a multi-GPU option: ignored here")
    if cfg.model.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


def make_batches(cfg: Config, accelerator, data: Dataset, plan: Plan):
    """batches(epoch, start) for the configured pipeline; both give rank r the same shard."""
    if cfg.data.pipeline == "device":
        return DeviceBatches(data.train, batch_size=plan.batch, rank=accelerator.process_index, world_size=plan.world,
                             seed=cfg.seed, augment_cfg=cfg.data.augment, mean=cfg.data.mean, std=cfg.data.std,
                             device=accelerator.device, channels_last=cfg.model.channels_last).epoch
    images = LoaderImages(data.train, seed=cfg.seed, augment_cfg=cfg.data.augment, mean=cfg.data.mean, std=cfg.data.std)
    sampler = EpochSampler(len(data.train), seed=cfg.seed, global_batch_size=plan.batch * plan.world,
                           augment_cfg=cfg.data.augment)
    loader = accelerator.prepare(torch.utils.data.DataLoader(
        images, batch_size=plan.batch, sampler=sampler, drop_last=True, num_workers=cfg.data.num_workers,
        pin_memory=accelerator.device.type == "cuda"))

    def batches(epoch, start):
        # Accelerate's loader counts its passes and tells the sampler that count as the epoch when a
        # pass starts: set it (on the skipping loader of a resumed epoch too), or an epoch cut short
        # (the last step of a run) or a resume would replay another epoch's order.
        images.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, start) if start else loader
        epoch_loader.set_epoch(epoch)
        return epoch_loader
    return batches
