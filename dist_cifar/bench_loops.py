"""The loops the benchmark times, each run in a child process of its own: the PyTorch tutorial's loop
on CIFAR10-style arrays in memory (or on ImageFolder JPEGs), the tutorial's whole 2-epoch script, and
the bare model step. `python -m dist_cifar.bench_loops KIND --out FILE ...` runs one and writes its JSON;
dist_cifar.bench starts them, watches their memory and compares them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

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
    from dist_cifar.data import load_dataset

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


def child_tutorial_epochs(data: Path, epochs: int, source: str = "cifar10") -> dict:
    """The whole tutorial: `epochs` epochs, then accuracy on every test image. The process's wall time
    (measured by the parent from launch to exit) is what the time-to-accuracy comparison uses."""
    building = time.perf_counter()
    dataset, testset = tutorial_datasets(data, source)
    dataset_seconds = time.perf_counter() - building
    net = TutorialNet(len(dataset.classes))
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    trainloader = tutorial_loader(dataset, shuffle=True)
    testloader = tutorial_loader(testset, shuffle=False)
    started = time.perf_counter()
    for _ in range(epochs):
        for inputs, labels in trainloader:
            tutorial_step(net, criterion, optimizer, inputs, labels)
    trained = time.perf_counter()
    correct = total = 0
    with torch.no_grad():
        for images, labels in testloader:
            _, predicted = torch.max(net(images), 1)
            total += labels.size(0)
            correct += (predicted == labels).sum().item()
    return {"train_seconds": trained - started, "eval_seconds": time.perf_counter() - trained,
            "images_per_second": epochs * len(dataset) / (trained - started), "accuracy": correct / total,
            "num_eval_samples": total, "torch_threads": torch.get_num_threads(),
            "dataset": type(dataset).__name__, "dataset_size": len(dataset), "dataset_seconds": dataset_seconds}


# ---- the bare step ----

def child_bare_step(steps: int, warmup: int) -> dict:
    """images/s of forward + backward + SGD on one ready batch: the ceiling for this model and batch."""
    from dist_cifar.runtime import default_threads

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


def main(argv=None) -> int:
    """Run one loop and write its result as JSON to --out."""
    parser = argparse.ArgumentParser(prog="python -m dist_cifar.bench_loops", description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["tutorial", "tutorial-epochs", "bare"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--source", choices=["cifar10", "imagefolder"], default="cifar10")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=TUTORIAL_EPOCHS)
    args = parser.parse_args(argv)
    if args.kind == "tutorial":
        result = child_tutorial_steps(args.data, args.steps, args.warmup, args.source)
    elif args.kind == "tutorial-epochs":
        result = child_tutorial_epochs(args.data, args.epochs, args.source)
    else:
        result = child_bare_step(args.steps, args.warmup)
    args.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
