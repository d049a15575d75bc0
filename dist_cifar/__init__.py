"""dist_cifar: CIFAR-10 (and any image folder) training on Accelerate, from one CPU to many GPUs and nodes."""

__version__ = "0.1.0"
