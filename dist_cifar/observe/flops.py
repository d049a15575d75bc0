"""FLOPs per training image of a model, counted once at start, and the peak FLOP/s of known GPUs (for MFU).

The count follows torch.utils.flop_counter's rules: the FLOPs of convolutions and matrix products (2 per
multiply-add), nothing for element-wise ops, pooling or normalisation; backward is the input gradient
where the layer's input needs one and the weight gradient where the weight trains. It is taken from
the shapes of one forward pass of one image through the Conv2d and Linear layers (module hooks), not by
running FlopCounterMode in the trainer: that is a TorchDispatchMode, and entering one imports
torch._dynamo (about 3 CPU-s at start on our 2-core machine, and it switches torch's optimizers onto
their compile wrappers; tests/test_startup.py keeps it out), while torch.utils.flop_counter itself
imports triton (0.4 s). tests/unit/test_flops_units.py checks this count against FlopCounterMode for
every shipped model, so a model with a matrix product outside those layers fails there.
"""

from __future__ import annotations

import torch
from torch import nn

# Dense (no sparsity) peak FLOP/s from NVIDIA's datasheets, which state the Tensor Core figures "with
# sparsity": those are halved here. Matched in order against torch.cuda.get_device_name().
# Columns: bf16/fp16 Tensor Core, TF32 Tensor Core, FP32 (no Tensor Core).
PEAK_SOURCE = "NVIDIA datasheets (H200, H100, A100), dense Tensor Core figures (the datasheets' sparsity figures halved)"
PEAK_FLOPS = (
    ("H200 NVL", 835.5e12, 417.5e12, 60e12),   # H200 NVL datasheet: BF16 1,671 / TF32 835 TFLOPS (sparse), FP32 60
    ("H200", 989.5e12, 494.5e12, 67e12),       # H200 SXM datasheet: BF16 1,979 / TF32 989 TFLOPS (sparse), FP32 67
    ("H100 NVL", 835.5e12, 417.5e12, 60e12),   # H100 NVL: BF16 1,671 / TF32 835 (sparse), FP32 60
    ("H100 PCIe", 756.5e12, 378e12, 51e12),    # H100 PCIe: BF16 1,513 / TF32 756 (sparse), FP32 51
    ("H100", 989.5e12, 494.5e12, 67e12),       # H100 SXM: BF16 1,979 / TF32 989 (sparse), FP32 67
    ("A100", 312e12, 156e12, 19.5e12),         # A100 (SXM and PCIe): BF16 624 / TF32 312 (sparse), FP32 19.5
)


def flops_per_image(net: nn.Module, image_size: int, channels: int = 3) -> dict[str, int]:
    """{"forward", "backward", "total"}: FLOPs of one training image through `net` (on its device, in
    eval mode so BatchNorm statistics stay as they are; the weights are not changed)."""
    forward = backward = 0

    def count(module, inputs, output):
        nonlocal forward, backward
        x = inputs[0]
        if isinstance(module, nn.Conv2d):  # 2 x output elements x (input channels per group x kernel area)
            kh, kw = module.kernel_size
            flops = 2 * output.numel() * (module.in_channels // module.groups) * kh * kw
        else:  # nn.Linear: 2 x rows x in x out
            flops = 2 * (x.numel() // module.in_features) * module.in_features * module.out_features
        forward += flops
        backward += flops * (int(x.requires_grad) + int(module.weight.requires_grad))

    hooks = [m.register_forward_hook(count) for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = net.training
    try:
        net.eval()
        weight = next(net.parameters())
        with torch.enable_grad():
            net(torch.zeros(1, channels, image_size, image_size, dtype=weight.dtype, device=weight.device))
    finally:
        net.train(was_training)
        for h in hooks:
            h.remove()
    return {"forward": forward, "backward": backward, "total": forward + backward}


def peak_flops(device: torch.device, mixed_precision: str) -> tuple[float, str] | None:
    """(peak FLOP/s, where the figure comes from) of this GPU at this precision, or None (a CPU, an unknown GPU).
    Full precision counts at the TF32 peak while cuDNN may use TF32 for convolutions (torch's default)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, half, tf32, fp32 in PEAK_FLOPS:
        if key in name:
            if mixed_precision in ("bf16", "fp16"):
                return half, f"{name}: {half / 1e12:.0f} TFLOP/s {mixed_precision} dense, {PEAK_SOURCE}"
            if torch.backends.cudnn.allow_tf32:
                return tf32, f"{name}: {tf32 / 1e12:.0f} TFLOP/s TF32 dense (cuDNN may use TF32), {PEAK_SOURCE}"
            return fp32, f"{name}: {fp32 / 1e12:.1f} TFLOP/s FP32, {PEAK_SOURCE}"
    return None


def throughput(flops_image: int | None, images_per_second: float | None, world: int,
               peak: tuple[float, str] | None) -> dict:
    """results.json's throughput fields: achieved FLOP/s overall and per process, and MFU where the peak is known."""
    if not flops_image or not images_per_second:
        return {}
    achieved = flops_image * images_per_second
    out = {"flops_per_image": flops_image, "achieved_flops_per_second": round(achieved),
           "achieved_flops_per_second_per_process": round(achieved / world),
           "train_images_per_second_per_process": round(images_per_second / world, 1)}
    if peak:
        out.update(mfu=round(achieved / world / peak[0], 5), peak_flops_per_second=peak[0], peak_source=peak[1])
    return out


def describe(flops_image: dict[str, int]) -> str:
    """'1.30 + 1.90 MFLOP per image (forward + backward)' for the start-up log."""
    scale, unit = (1e9, "GFLOP") if flops_image["total"] >= 1e9 else (1e6, "MFLOP")
    return (f"{flops_image['forward'] / scale:.2f} + {flops_image['backward'] / scale:.2f} {unit} per training image "
            f"(forward + backward)")
