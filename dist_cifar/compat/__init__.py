"""Every workaround of torch or Accelerate behaviour, in one place, applied on purpose and version-gated.

  accelerate.py    Accelerate's per-step `lomo_optim` look-up and prepare()'s DTensor import
                   (accelerate <= accelerate.NEWEST_CHECKED; applied by dist.accelerator.build_accelerator)
  torch_optim.py   optimizers that skip torch.compile's wrappers while torch._dynamo is not loaded
                   (torch <= torch_optim.NEWEST_CHECKED; used by optim.SGD and optim.AdamW)
Each has a test in tests/unit/ that fails when upstream no longer needs it: then delete the workaround.
The entry points set one environment default before torch loads (train.set_process_defaults).
"""
