"""(main process writes, all ranks agree) What a finished run leaves: the model file, results.json, the
per-class table, the pictures and the tracker's summary."""

from __future__ import annotations

import time

from accelerate.utils import broadcast_object_list

from dist_cifar.config import to_dict
from dist_cifar.dist.failures import PHASE
from dist_cifar.engine.epoch import check_weights
from dist_cifar.engine.evaluation import per_class_table, predictions_csv
from dist_cifar.engine.run import Run
from dist_cifar.errors import CheckpointError, RunError
from dist_cifar.state import checkpoint as ckpt
from dist_cifar.versions import versions


def finish(run: Run, summary: dict) -> None:
    """(all ranks) The main process writes the results; every rank learns how that went.

    No rank leaves before the main process's files are on disk: a rank that exits first would end the
    job (torchrun, srun --kill-on-bad-exit) and kill the main process mid-write."""
    PHASE.set("final writes by the main process")
    check_weights(run)
    error = write_or_explain(run, summary) if run.accelerator.is_main_process else ""
    error = broadcast_object_list([error])[0]
    if error:
        raise RunError(error)


def write_or_explain(run: Run, summary: dict) -> str:
    """(only on the main process) "" when all is written, else one line saying what could not be."""
    try:
        write_results(run, summary)
    except (OSError, CheckpointError) as err:
        what = f"{err.strerror} ({err.filename})" if isinstance(err, OSError) and err.strerror else str(err)
        return f"the run finished but its results could not be written to {run.run_dir}: {what}"
    return ""


def results_record(run: Run, summary: dict) -> dict:
    """results.json: the evaluation, how the run was launched and split, its clock, target and versions."""
    from dist_cifar.observe.flops import throughput  # FLOP/s and MFU from the start-up count (no import cost)

    cfg, info, progress = run.cfg, run.info, run.progress
    reached = progress.history[-1] if progress.finished == "target" and progress.history else None
    results = {k: v for k, v in summary.items() if k != "predictions"}  # those go to predictions.csv
    results.update(
        world_size=info["world_size"], backend=info["backend"], device=info["device"],
        mixed_precision=info["mixed_precision"], mixed_precision_requested=info["mixed_precision_requested"],
        global_batch_size=run.plan.global_batch, per_device_batch_size=run.plan.batch,
        epochs=progress.epoch, steps=progress.step, seed=cfg.seed, model=cfg.model.name, classes=run.data.classes,
        finished=progress.finished,
        train_seconds=round(progress.train_seconds, 3), train_images=progress.train_images,
        train_images_per_second=round(progress.train_images / progress.train_seconds, 1) if progress.train_seconds else None,
        wall_seconds=round(time.time() - run.started, 3),
        target_accuracy=cfg.train.target_accuracy or None,
        target_reached_at_epoch=reached["epoch"] if reached else None,
        target_reached_elapsed_seconds=reached["elapsed_seconds"] if reached else None,
        target_reached_train_seconds=reached["train_seconds"] if reached else None,
        **throughput(info.get("flops_per_image"), progress.train_images / progress.train_seconds
                     if progress.train_seconds else None, info["world_size"], info.get("peak_flops")),
        step_times=info.get("step_times"),  # per-rank busy seconds per step (observe/stragglers.py); null on 1 process
        versions=versions())
    return results


def write_results(run: Run, summary: dict) -> None:
    cfg = run.cfg
    results = results_record(run, summary)
    pictures = []
    with run.state.average.evaluation_weights():  # the model file and the sample pictures use the averaged weights
        ckpt.save_weights(run.run_dir / "model.safetensors", run.state.net.state_dict(), to_dict(cfg), run.data.classes)
        if summary.get("predictions") is not None:  # train.write_predictions: the same evaluation, per image
            run.log.write_text("predictions.csv", predictions_csv(summary["predictions"], run.data.classes,
                                                                  run.data.test.paths))
        run.log.write_json("results.json", results)  # last: a resume takes results.json for a finished run's
        if cfg.tracking.plots:
            from dist_cifar.observe.plots import sample_predictions, write_run_pictures  # matplotlib: only when drawing
            predictions = summary.get("predictions")  # with them, the grid agrees with predictions.csv
            sample = sample_predictions(run.state.net, run.data.test, run.data.classes, mean=cfg.data.mean,
                                        std=cfg.data.std, predictions=predictions)
            pictures = write_run_pictures(run.run_dir, results, run.progress.history, sample, curve=run.progress.curve,
                                          predictions=predictions, test_images=run.data.test.images)
    run.log.print(per_class_table(summary))
    run.tracker.finish(results, pictures)
    run.log.print(f"results in {run.run_dir}")
