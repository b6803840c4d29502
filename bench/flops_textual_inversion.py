"""FLOPs of one textual-inversion image-step at SD1.5 size: the paper's way against this pack.

    python bench/flops_textual_inversion.py [--resolution 256 512]

Counted with ``torch.utils.flop_counter`` on the meta device (no weights, no memory, seconds
on a CPU), on diffusers' SD1.5-shaped UNet and VAE with frozen weights:

- the stock diffusers ``textual_inversion.py`` step: VAE encode of the image, UNet forward,
  backward to the context (no weight gradients);
- this pack's step: the latent is encoded once before training, so UNet forward and backward
  only, plus one recomputed forward where it checkpoints blocks (large passes, see
  ``nodes/inversion_model.py``).

The CLIP text encoder's forward and backward (under 0.03 TFLOP) are left out of both. The
ratio is the most the pack can gain per image-step at equal arithmetic speed: more needs
better FLOP throughput (batching, lower precision), which a measurement shows, not a count.
"""

from __future__ import annotations

import argparse


def count(resolution: int) -> dict[str, float]:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(
            block_out_channels=[128, 256, 512, 512],
            layers_per_block=2,
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            latent_channels=4,
        )
        side = resolution // 8
        latents = torch.randn(1, 4, side, side)
        context = torch.randn(1, 77, 768, requires_grad=True)
        image = torch.randn(1, 3, resolution, resolution)
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    flops = {}
    with FlopCounterMode(display=False) as counter:
        unet(latents, 500, encoder_hidden_states=context)
    flops["unet forward"] = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        unet(latents, 500, encoder_hidden_states=context).sample.sum().backward()
    flops["unet forward+backward"] = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        vae.encode(image).latent_dist.sample()
    flops["vae encode"] = counter.get_total_flops()
    return {name: value / 1e12 for name, value in flops.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--resolution", type=int, nargs="+", default=[256, 512])
    args = parser.parse_args()
    print(f"{'px':>5} {'script TF':>10} {'pack TF':>8} {'+ckpt TF':>9} {'bound':>6} {'+ckpt':>6}")
    for resolution in args.resolution:
        f = count(resolution)
        script = f["vae encode"] + f["unet forward+backward"]
        pack = f["unet forward+backward"]
        checkpointed = pack + f["unet forward"]
        print(
            f"{resolution:>5} {script:>10.3f} {pack:>8.3f} {checkpointed:>9.3f} "
            f"{script / pack:>5.2f}x {script / checkpointed:>5.2f}x"
        )
    print("bound = script FLOPs / pack FLOPs per image-step (+ckpt: with block checkpointing)")


if __name__ == "__main__":
    main()
