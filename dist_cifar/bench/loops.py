"""The loops the benchmarks time, each run in a child process of its own: the PyTorch tutorial's loop
on CIFAR10-style arrays in memory (or on ImageFolder JPEGs), the tutorial's whole script (on the CPU or
moved to a GPU), the bare model step, and airbench94 from the `airbench` package (imported only by
that child). `python -m dist_cifar.bench.loops KIND --out FILE ...` runs one and writes its JSON;
dist_cifar.bench and dist_cifar.bench.gpu start them, watch them and compare them.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.metadata
import json
import os
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

from dist_cifar.models import TutorialNet

BATCH = 4  # the tutorial's batch size, used by all three rates
LR, MOMENTUM = 0.001, 0.9  # the tutorial's SGD
TUTORIAL_EPOCHS = 2


# ---- the tutorial's loop ----

def _tutorial_cifar10_class():
    """TutorialCIFAR10, built on first use so that the runs that don't need torchvision (the bare step)
    don't import it (importing torchvision adds about 170 MB to a process's peak RSS here)."""
    from PIL import Image
    from torchvision.datasets import VisionDataset

    class TutorialCIFAR10(VisionDataset):
        """torchvision.datasets.CIFAR10 holding given decoded arrays instead of reading its pickles.

        `.data` is N x H x W x 3 uint8 laid out as CIFAR10 lays it out (a channels-first array seen through
        a transpose), `.targets` a list of ints, and `__getitem__` is CIFAR10's line for line: the array
        to a PIL image, then the transforms.
        """

        def __init__(self, root, images: np.ndarray, labels, classes: list[str], transform=None,
                     target_transform=None):
            super().__init__(str(root), transform=transform, target_transform=target_transform)
            # CIFAR10: np.vstack(batches).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1)), in memory
            self.data = np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)
            self.targets = [int(t) for t in labels]
            self.classes = list(classes)
            self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

        def __getitem__(self, index: int):
            img, target = self.data[index], self.targets[index]
            img = Image.fromarray(img)
            if self.transform is not None:
                img = self.transform(img)
            if self.target_transform is not None:
                target = self.target_transform(target)
            return img, target

        def __len__(self) -> int:
            return len(self.data)

    TutorialCIFAR10.__module__, TutorialCIFAR10.__qualname__ = __name__, "TutorialCIFAR10"  # picklable by name
    return TutorialCIFAR10


def __getattr__(name: str):
    """`bench.TutorialCIFAR10`, made once on first use."""
    if name == "TutorialCIFAR10":
        if name not in globals():
            globals()[name] = _tutorial_cifar10_class()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def tutorial_transform():
    import torchvision.transforms as transforms

    return transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])


def tutorial_datasets(data: Path, source: str = "cifar10", splits=("train", "test")) -> list:
    """The tutorial's datasets for `splits`: "cifar10" (decoded arrays in memory, as torchvision's CIFAR10)
    or "imagefolder" (torchvision's ImageFolder over the JPEG files: a decode per image per epoch)."""
    import torchvision

    if source == "imagefolder":
        return [torchvision.datasets.ImageFolder(str(data / split), transform=tutorial_transform()) for split in splits]
    from dist_cifar.data.sources import load_dataset

    decoded = load_dataset(decoded_cache_config(data))
    dataset_class = __getattr__("TutorialCIFAR10")
    return [dataset_class(data, getattr(decoded, split).images, getattr(decoded, split).labels, decoded.classes,
                            transform=tutorial_transform()) for split in splits]


def decoded_cache_config(data: Path):
    """The data config whose cache the benchmark decodes once and every run then reads."""
    from dist_cifar.config import load_config

    return load_config(None, ["data.name=imagefolder", f"data.root={data}"]).data


def tutorial_parts(data: Path, source: str = "cifar10"):
    """The tutorial's training set, network, optimizer and loss; seconds taken to build the dataset."""
    started = time.perf_counter()
    (dataset,) = tutorial_datasets(data, source, ("train",))
    built = time.perf_counter() - started
    net = TutorialNet(len(dataset.classes))
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    return dataset, net, criterion, optimizer, built


def tutorial_loader(dataset, shuffle: bool):
    return torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=shuffle, num_workers=2)


def tutorial_step(net, criterion, optimizer, inputs, labels) -> float:
    optimizer.zero_grad()
    outputs = net(inputs)
    loss = criterion(outputs, labels)
    loss.backward()
    optimizer.step()
    return loss.item()


def child_tutorial_steps(data: Path, steps: int, warmup: int, source: str = "cifar10") -> dict:
    """images/s of the tutorial's loop over `steps` steps after `warmup` untimed ones."""
    dataset, net, criterion, optimizer, dataset_seconds = tutorial_parts(data, source)
    loader = tutorial_loader(dataset, shuffle=True)
    total = warmup + steps
    done, running_loss = 0, 0.0
    started = time.perf_counter()
    while done < total:  # a new epoch (and new workers) if the steps outrun one
        for inputs, labels in loader:
            running_loss += tutorial_step(net, criterion, optimizer, inputs, labels)
            done += 1
            if done == warmup:
                timed_from = time.perf_counter()
            if done == total:
                break
    ended = time.perf_counter()
    return {"images_per_second": BATCH * steps / (ended - timed_from),
            "images_per_second_with_startup": BATCH * total / (ended - started),
            "mean_loss": running_loss / total, "torch_threads": torch.get_num_threads(),
            "dataset": type(dataset).__name__, "dataset_size": len(dataset), "dataset_seconds": dataset_seconds}


def synchronize(device: str) -> None:
    """Wait for the GPU's queued work before reading a clock (nothing to wait for on the CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def evenly_spaced(size: int, n: int) -> np.ndarray:
    """n indices spread over range(size): a small test set with every class (the cache holds them class by class)."""
    return np.linspace(0, size - 1, n).astype(np.int64)


def limited(loader, epochs: int, max_steps: int = 0):
    """The loader's batches for `epochs` epochs, stopping after `max_steps` batches when that is > 0."""
    done = 0
    for _ in range(epochs):
        for batch in loader:
            yield batch
            done += 1
            if done == max_steps:
                return


def child_tutorial_epochs(data: Path, epochs: int, source: str = "cifar10", device: str = "cpu",
                          max_steps: int = 0, test_images: int = 0) -> dict:
    """The whole tutorial: `epochs` epochs (or `max_steps` steps), then accuracy on every test image (or
    `test_images` evenly spaced ones), on `device` as the tutorial moves it to a GPU: the net once, each
    batch with `.to(device)`. The process's wall time (measured by the parent from launch to exit) is
    what the time-to-accuracy comparison uses."""
    building = time.perf_counter()
    dataset, testset = tutorial_datasets(data, source)
    dataset_seconds = time.perf_counter() - building
    net = TutorialNet(len(dataset.classes)).to(device)
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    trainloader = tutorial_loader(dataset, shuffle=True)
    if test_images:
        testset = torch.utils.data.Subset(testset, evenly_spaced(len(testset), test_images).tolist())
    testloader = tutorial_loader(testset, shuffle=False)
    steps = images = 0
    synchronize(device)
    started = time.perf_counter()
    for inputs, labels in limited(trainloader, epochs, max_steps):
        inputs, labels = inputs.to(device), labels.to(device)
        tutorial_step(net, criterion, optimizer, inputs, labels)  # loss.item(): a sync every step, as the tutorial's
        steps, images = steps + 1, images + len(labels)
    synchronize(device)
    trained = time.perf_counter()
    correct = total = 0
    with torch.no_grad():
        for inputs, labels in testloader:
            inputs, labels = inputs.to(device), labels.to(device)
            _, predicted = torch.max(net(inputs), 1)
            total += labels.size(0)
            correct += (predicted == labels).sum().item()
    return {"train_seconds": trained - started, "eval_seconds": time.perf_counter() - trained,
            "images_per_second": images / (trained - started), "steps": steps, "train_images": images,
            "accuracy": correct / total, "num_eval_samples": total, "device": device,
            "torch_threads": torch.get_num_threads(), "dataset": type(dataset).__name__,
            "dataset_size": len(dataset), "dataset_seconds": dataset_seconds}


# ---- the bare step ----

def child_bare_step(steps: int, warmup: int) -> dict:
    """images/s of forward + backward + SGD on one ready batch: the ceiling for this model and batch."""
    from dist_cifar.dist.accelerator import default_threads

    torch.set_num_threads(default_threads(BATCH))  # the trainer's rule for CPU threads
    torch.manual_seed(0)
    net = TutorialNet(10)
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    x, y = torch.randn(BATCH, 3, 32, 32), torch.randint(0, 10, (BATCH,))

    def step():
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return {"images_per_second": BATCH * steps / (time.perf_counter() - started),
            "torch_threads": torch.get_num_threads()}


# ---- airbench94, from the `airbench` package (imported here only, in the airbench94 child) ----

class HostEvent:
    """Stands in for torch.cuda.Event where there is no GPU: the host clock at record()."""

    def __init__(self, enable_timing: bool = False):
        self.time = None

    def record(self, stream=None) -> None:
        self.time = time.perf_counter()

    def elapsed_time(self, end: "HostEvent") -> float:
        return 1e3 * (end.time - self.time)  # milliseconds, as CUDA events report


def airbench_make_net(widths: list[int] | None, cuda: bool):
    """airbench's make_net94 (its widths when given); without a GPU its `.cuda()` call leaves the net on the CPU."""
    from airbench import make_net94

    kwargs = {"widths": dict(zip(("block1", "block2", "block3"), widths))} if widths else {}
    if cuda:
        return functools.partial(make_net94, **kwargs)

    def make_net_on_cpu():
        with mock.patch.object(torch.nn.Module, "cuda", lambda self, device=None: self):
            return make_net94(**kwargs)

    return make_net_on_cpu


def airbench_on_cpu(stack: contextlib.ExitStack) -> None:
    """(no GPU only: a plumbing check) airbench's train() otherwise reaches for CUDA in three more places:
    its timing events, torch.cuda.synchronize, and the test loader it builds on GPU 0."""
    import airbench.utils

    stack.enter_context(mock.patch.object(torch.cuda, "Event", HostEvent))
    stack.enter_context(mock.patch.object(torch.cuda, "synchronize", lambda device=None: None))
    cpu_loader = functools.partial(airbench.utils.CifarLoader, gpu="cpu")
    stack.enter_context(mock.patch.object(airbench.utils, "CifarLoader", cpu_loader))


def airbench_loaders(gpu, batch_size: int, train_images: int, test_images: int):
    """The loaders train94 builds for itself when given none, and the test loader; optionally only N
    evenly spaced images of each (CPU plumbing checks; test.pt holds its images class by class)."""
    from airbench import CifarLoader
    from airbench.lib_airbench94 import hyp

    train = CifarLoader("cifar10", train=True, batch_size=batch_size or hyp["opt"]["batch_size"], aug=hyp["aug"],
                        altflip=True, gpu=gpu)
    test = CifarLoader("cifar10", train=False, batch_size=2000, gpu=gpu)
    for loader, n in ((train, train_images), (test, test_images)):
        if n:  # allowed before the first epoch (CifarLoader.__setattr__)
            pick = torch.from_numpy(evenly_spaced(len(loader.labels), n)).to(loader.labels.device)
            loader.images, loader.labels = loader.images[pick], loader.labels[pick]
    return train, test


def child_airbench94(root: Path, epochs: float | None, warmup_epochs: float, batch_size: int, train_images: int,
                     test_images: int, widths: list[int] | None, tta_level: int) -> dict:
    """airbench94 as its package runs it: an untimed warm-up run (training and evaluation), then
    `train94(train_loader, verbose=False)` timed whole (net build, whitening, training), then
    `evaluate(model, test_loader, tta_level)`."""
    os.chdir(root)  # CifarLoader("cifar10") reads cifar10/train.pt and cifar10/test.pt below the working directory
    from airbench import evaluate, train94

    cuda = torch.cuda.is_available()
    with contextlib.ExitStack() as stack:
        if not cuda:
            airbench_on_cpu(stack)
        train_loader, test_loader = airbench_loaders(0 if cuda else "cpu", batch_size, train_images, test_images)
        options = {"make_net": airbench_make_net(widths, cuda), "verbose": False}
        timed = {**options, **({"epochs": epochs} if epochs else {})}
        # train94(run="warmup") returns after one step only when verbose: warm up with a short whole run instead
        evaluate(train94(train_loader, epochs=warmup_epochs, **options), test_loader, tta_level=tta_level)
        synchronize("cuda" if cuda else "cpu")
        started = time.perf_counter()
        model = train94(train_loader, **timed)
        synchronize("cuda" if cuda else "cpu")
        trained = time.perf_counter()
        accuracy = evaluate(model, test_loader, tta_level=tta_level)  # .item(): waits for the GPU
        ended = time.perf_counter()
    return {"train_seconds": trained - started, "eval_seconds": ended - trained, "run_seconds": ended - started,
            "accuracy": accuracy, "num_eval_samples": len(test_loader.labels), "train_images": len(train_loader.images),
            "epochs": epochs, "tta_level": tta_level, "device": "cuda" if cuda else "cpu (airbench's CUDA calls redirected)",
            "airbench": airbench_version()}


def airbench_version() -> str | None:
    try:
        return importlib.metadata.version("airbench")
    except importlib.metadata.PackageNotFoundError:  # importable from a folder on PYTHONPATH, not installed
        return None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dist_cifar.bench.loops", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", type=Path, required=True)
    common.add_argument("--data", type=Path)
    kinds = parser.add_subparsers(dest="kind", required=True)
    for kind in ("tutorial", "tutorial-epochs", "bare"):
        sub = kinds.add_parser(kind, parents=[common])
        if kind != "bare":
            sub.add_argument("--source", choices=["cifar10", "imagefolder"], default="cifar10")
        if kind != "tutorial-epochs":
            sub.add_argument("--steps", type=int, default=300)
            sub.add_argument("--warmup", type=int, default=20)
    epochs = kinds.choices["tutorial-epochs"]
    epochs.add_argument("--epochs", type=int, default=TUTORIAL_EPOCHS)
    epochs.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    epochs.add_argument("--max-steps", type=int, default=0, help="stop after this many steps; 0 = all epochs")
    epochs.add_argument("--test-images", type=int, default=0, help="evaluate N evenly spaced test images only; 0 = all")
    airbench = kinds.add_parser("airbench94", parents=[common])
    airbench.add_argument("--root", type=Path, required=True, help="the folder holding cifar10/train.pt and test.pt")
    airbench.add_argument("--epochs", type=float, help="training epochs (default: the package's, 9.9)")
    airbench.add_argument("--warmup-epochs", type=float, default=1.0, help="epochs of the untimed warm-up run")
    airbench.add_argument("--batch-size", type=int, default=0, help="default: the package's, 1024")
    airbench.add_argument("--train-images", type=int, default=0, help="train on N evenly spaced images only; 0 = all")
    airbench.add_argument("--test-images", type=int, default=0, help="evaluate N evenly spaced test images only; 0 = all")
    airbench.add_argument("--widths", type=lambda text: [int(w) for w in text.split(",")],
                          help="conv group widths, e.g. 8,16,16 (default: the package's, 64,256,256)")
    airbench.add_argument("--tta-level", type=int, default=2)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Run one loop and write its result as JSON to --out."""
    args = parse_args(argv)
    args.out = args.out.resolve()  # the airbench94 child changes its working directory
    if args.kind == "tutorial":
        result = child_tutorial_steps(args.data, args.steps, args.warmup, args.source)
    elif args.kind == "tutorial-epochs":
        result = child_tutorial_epochs(args.data, args.epochs, args.source, args.device, args.max_steps,
                                       args.test_images)
    elif args.kind == "airbench94":
        result = child_airbench94(args.root, args.epochs, args.warmup_epochs, args.batch_size, args.train_images,
                                  args.test_images, args.widths, args.tta_level)
    else:
        result = child_bare_step(args.steps, args.warmup)
    args.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
