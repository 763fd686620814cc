"""Training throughput: a nested-attention training step vs a plain frozen-SDXL forward + backward.

    python -m benchmarks.train_throughput --model tiny --sizes 512 1024      # CPU: tiny random SDXL
    python -m benchmarks.train_throughput --model real --sizes 512 1024 --gradient-checkpointing   # GPU: real-size random SDXL

Both sides run the same batch through the host's apply_model (random latents, contexts and
ADM; the frozen encoders are left out: they cost the same with or without nested attention):
- plain:  the frozen UNet, backward to the text context (so backward crosses every attn2 layer)
- nested: NestedTrainer from training/models.py — Q-Former, the pack's patch on all 70 layers,
          backward to the trained weights — exactly what a training step runs.
Reported: samples/s, peak memory (CUDA: max allocated; CPU: peak RSS growth of a fresh
process per case) and the nested/plain time ratio (target ≤ 1.3×).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from training.host import pack_module, setup_comfyui


def build(model_kind: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """(ModelPatcher, context_dim, pooled_dim, nested weights) for a tiny or a real-size random SDXL."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    from training import tiny

    core = pack_module("nested_core")
    if model_kind == "tiny":
        patcher = tiny.build_tiny_sdxl(seed, dtype=dtype)
        weights = tiny.make_tiny_weights(patcher)
        return patcher, tiny.CONTEXT_L + tiny.CONTEXT_G, tiny.POOLED_DIM, weights
    config = comfy.supported_models.SDXL(dict(
        use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False, num_classes="sequential",
        adm_in_channels=2816, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
        channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10,
        transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], use_linear_in_transformer=True, context_dim=2048,
        use_temporal_attention=False, use_temporal_resblock=False))
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.diffusion_model.parameters():  # the host builds uninitialised weights
            p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32).to(p.dtype) * 0.02)
    patcher = comfy.model_patcher.ModelPatcher(model, device, mm.unet_offload_device())
    cfg = core.default_config(model.diffusion_model)  # paper sizes: 1024 queries, ViT-H tokens
    weights = core.NestedAttentionModel(cfg)
    weights.init_projections_from(model.diffusion_model)
    return patcher, 2048, 1280, weights


def measure(args, case: str, size: int) -> dict:
    from training import models as train  # the training run's own model code

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    patcher, context_dim, pooled_dim, weights = build(args.model, device, dtype)
    model = patcher.model.to(device).requires_grad_(False).eval()
    train.set_gradient_checkpointing(model.diffusion_model, args.gradient_checkpointing)
    prompt_mod, patch_mod = pack_module("nodes.prompt"), pack_module("nodes.patch")
    b = args.batch_size
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(b, 4, size // 8, size // 8, generator=gen).to(device)
    noise = torch.randn(x0.shape, generator=gen).to(device)
    sigma = train.sample_sigmas(model.model_sampling, b, gen).to(device)
    context = torch.randn(b, 77, context_dim, generator=gen).to(device)
    pooled = torch.randn(b, pooled_dim, generator=gen).to(device)
    y = model.encode_adm(pooled_output=pooled, width=size, height=size).to(device)
    c = weights.config
    vision = torch.randn(b, c.vision_tokens, c.vision_dim, generator=gen).to(device)
    import comfy.sdxl_clip

    tokenizer = comfy.sdxl_clip.SDXLTokenizer()  # the real SDXL tokenizer (local files)
    tokens = prompt_mod.PromptTokens.from_tokens(tokenizer.tokenize_with_weights("a photo of a person"), tokenizer)
    frozen = train.Frozen(patcher, None, None, None, "random")
    trainer = train.NestedTrainer(weights.to(device).float().train().requires_grad_(True), frozen)
    prompts = train.RowPrompts([(context[i : i + 1], tokens, "person") for i in range(b)])
    autocast = torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda")

    def plain_step():
        ctx = context.clone().requires_grad_(True)
        x_noisy = model.model_sampling.noise_scaling(sigma.reshape(-1, 1, 1, 1), noise, x0)
        with autocast:
            out = model.apply_model(x_noisy, sigma, c_crossattn=ctx, y=y)
        ((out.float() - x0) ** 2).mean().backward()

    def nested_step():
        with trainer.patch.run(), autocast:
            loss = trainer(x0=x0, noise=noise, sigma=sigma, context=context, y=y, vision=vision, prompts=prompts).mean()
        loss.backward()
        trainer.zero_grad(set_to_none=True)

    step = plain_step if case == "plain" else nested_step
    import psutil

    rss0 = psutil.Process().memory_info().rss
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    return {"case": case, "size": size, "batch": b, "s_per_step": seconds, "samples_per_s": b / seconds, "peak_mib": peak / 2**20,
            "device": str(device)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["tiny", "real"], default="tiny")
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--one", nargs=2, metavar=("CASE", "SIZE"), help=argparse.SUPPRESS)  # child process: one case
    args = p.parse_args(argv)
    setup_comfyui()
    if args.model == "real" and not torch.cuda.is_available():
        p.error("--model real needs a GPU (a 2.6 B-parameter UNet)")
    if args.one:
        print(json.dumps(measure(args, args.one[0], int(args.one[1]))))
        return 0
    rows = []
    for size in args.sizes:
        result = {}
        for case in ("plain", "nested"):
            child = [sys.executable, "-m", "benchmarks.train_throughput", *(argv if argv is not None else sys.argv[1:]), "--one", case, str(size)]
            out = subprocess.run(child, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            result[case] = json.loads(out)
        ratio = result["nested"]["s_per_step"] / result["plain"]["s_per_step"]
        mem = result["nested"]["peak_mib"] / max(result["plain"]["peak_mib"], 1e-9)
        rows.append((size, result, ratio, mem))
        print(f"{args.model} {size}² batch {args.batch_size} on {result['plain']['device']}"
              f"{' (gradient checkpointing)' if args.gradient_checkpointing else ''}:\n"
              f"  plain frozen fwd+bwd : {result['plain']['samples_per_s']:.3f} samples/s, peak {result['plain']['peak_mib']:.0f} MiB\n"
              f"  nested training step : {result['nested']['samples_per_s']:.3f} samples/s, peak {result['nested']['peak_mib']:.0f} MiB\n"
              f"  ratio (time)         : {ratio:.2f}×  (target ≤ 1.3×){'' if ratio <= 1.3 else '  ABOVE TARGET'};  memory {mem:.2f}×",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
