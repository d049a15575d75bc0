"""Benchmarks of dist_cifar against the peers a user would compare it with; never imported by the trainer.

  cpu.py     `python -m dist_cifar.bench`: the tutorial's loop, dist_cifar and the bare step on a CPU
  gpu.py     `python -m dist_cifar.bench --gpu`: airbench94 and the tutorial beside dist_cifar on one GPU
  loops.py   the measured loops, each run in a child process of its own
  common.py  running and watching those children, medians, the machine's description, table rows
"""
