"""`python -m dist_cifar.bench ...`: the CPU benchmark, or with --gpu the GPU peer benchmark."""

from dist_cifar.bench.cpu import cli

cli()
