"""Where the images come from (sources.py: CIFAR-10 or an image folder, decoded once into a cache) and how
they become batches (batches.py: seeded order, shards over ranks, augmentation on the device)."""
