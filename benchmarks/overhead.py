"""What nested attention costs per sampling step: a real-size SDXL UNet, unpatched vs patched.

    python -m benchmarks.overhead                      # 512² on CPU (fp32), 1024² on CUDA (fp16)
    python -m benchmarks.overhead --tiny --steps 3     # quick smoke run on a tiny SDXL-layout UNet

One CFG sampling step is timed the way ComfyUI runs it: `comfy.samplers.sampling_function`
(-> calc_cond_batch with its wrappers -> one batch-2 UNet call, negative + positive rows,
cond_or_uncond [1, 0]) on a model patched by the pack's own Apply code
(nodes.apply.apply_nested_attention: ModelPatcher.clone(), the NestedAttentionPatch on all
attn2 keys, OUTER_SAMPLE + CALC_COND_BATCH wrappers). The positive conditioning carries one
Binding (one subject bound to one token position); the negative carries none, so its rows
take the host's plain path. The UNet is real SDXL size (2.57 B parameters, context 2048,
adm 2816) built from the host's SDXL config with random weights and no checkpoint file.

Variants, measured side by side in one process, interleaved round by round (rotating order)
after a warm-up round, median reported:
  unpatched        the clone without the patch
  nested M=…       the pack's patch, M subject tokens (random [M, 2048]); projections cached
                   (computed once per run, timed separately, as in sampling)
  naive M=…        the same patch with nested_attention_naive (the per-query value tensor
                   definition) swapped in for the cheap exact form, for contrast

Memory: CUDA: torch.cuda.max_memory_allocated over one step (everything allocated: weights,
projection cache, activations). CPU: torch's own allocations during one step from the
profiler's memory events (peak of the running sum above the step-start level, i.e. the
step's extra working memory, exact at allocator level), plus what is resident for the step
(UNet weights + the projection cache), reported as totals like max_memory_allocated.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time

import torch

from training.host import pack_module, setup_comfyui

# the SDXL base UNet as the host detects it from a checkpoint (comfy.model_detection, "SDXL")
SDXL_UNET = dict(
    use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
    num_classes="sequential", adm_in_channels=2816, in_channels=4, model_channels=320,
    num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4],
    transformer_depth_middle=10, use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
    transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], use_temporal_attention=False, use_temporal_resblock=False,
)
TARGET_STEP = {"cpu": (1.05, 512), "cuda": (1.10, 1024)}
TARGET_MEMORY = 1.10
BOUND_POSITION = 5  # the bound token's index in the 77-token positive context
CFG = 5.0


# --- machine ---------------------------------------------------------------------------------------
def machine(device: torch.device, dtype: torch.dtype) -> dict:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
    }
    try:
        import psutil

        info["ram_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_mem_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return info


# --- models ----------------------------------------------------------------------------------------
@torch.no_grad()
def build_unet(tiny: bool, device: torch.device, dtype: torch.dtype):
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    if tiny:
        from training.tiny import build_tiny_sdxl

        patcher = build_tiny_sdxl(0, dtype=dtype)
        patcher.model.to(device)
        return patcher, "training.tiny.build_tiny_sdxl"
    config, source = comfy.supported_models.SDXL(dict(SDXL_UNET)), "comfy.supported_models.SDXL, real SDXL unet config"
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, device=device)
    from training.tiny import fill_deterministic  # the same seeded O(1)-activation init as the test models

    fill_deterministic(model.diffusion_model, seed=0)
    patcher = comfy.model_patcher.ModelPatcher(model, mm.get_torch_device(), mm.unet_offload_device())
    return patcher, source


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# --- patching (the Apply node's own code) ----------------------------------------------------------
def apply_patch(model):
    """(patched clone, its NestedAttentionPatch), installed exactly as the Apply node does."""
    m = pack_module("nodes.apply").apply_nested_attention(model, 0.0, 1.0)
    patches = {id(p): p for p in m.model_options["transformer_options"]["patches_replace"]["attn2"].values()}
    assert len(patches) == 1, "expected one NestedAttentionPatch object on every attn2 key"
    return m, next(iter(patches.values()))


@contextlib.contextmanager
def naive_form(counter: list):
    """Swap nested_attention_naive in for the cheap form inside the pack's patch (same caller, same cache)."""
    patch_mod = pack_module("nodes.patch")
    naive = pack_module("nested_core").nested_attention_naive
    cheap = patch_mod.nested_attention

    def adapter(q, k, v, subjects, *, heads, base=None, query_chunk=None):
        counter[0] += 1
        return naive(q, k, v, subjects, heads=heads)

    patch_mod.nested_attention = adapter
    try:
        yield
    finally:
        patch_mod.nested_attention = cheap


def naive_estimate(diffusion_model, latent: int, context_len: int, m_tokens: int, dtype: torch.dtype) -> int:
    """Bytes of the naive form's biggest layer: value tensor [1,h,N,T,d] (×3: clone, expand, einsum) + [1,h,N,M] logits."""
    layers = pack_module("nested_core").attn2_layers(diffusion_model)
    widths = sorted({a.to_v.weight.shape[0] for a in layers.values()})
    worst = 0
    for a in layers.values():
        inner = a.to_v.weight.shape[0]
        level = 1 + widths.index(inner)  # SDXL: attention at 1/2 (640 ch) and 1/4 (1280 ch) of the latent
        n = (latent // 2**level) ** 2
        heads = getattr(a, "heads", inner // 64)
        b = torch.finfo(dtype).bits // 8
        worst = max(worst, 3 * n * context_len * inner * b + 2 * heads * n * m_tokens * b)
    return worst


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


# --- one CFG step ----------------------------------------------------------------------------------
def make_conds(model, binding, ctx_pos, ctx_neg, pooled_pos, pooled_neg, noise, device, seed):
    import comfy.sampler_helpers
    import comfy.samplers

    patch_mod = pack_module("nodes.patch")
    extra = {"pooled_output": pooled_pos}
    if binding is not None:
        extra[patch_mod.BINDINGS] = (binding,)
    conds = {
        "positive": comfy.sampler_helpers.convert_cond([[ctx_pos, extra]]),
        "negative": comfy.sampler_helpers.convert_cond([[ctx_neg, {"pooled_output": pooled_neg}]]),
    }
    return comfy.samplers.process_conds(model.model, noise, conds, device, torch.zeros_like(noise), None, seed)


def make_step(patcher, conds, x, sigma, sample_sigmas, seed, extra_model_function=None):
    """A closure running one CFG step the way the sampler does (model options prepared as CFGGuider.sample does)."""
    import comfy.model_patcher
    import comfy.sampler_helpers
    import comfy.samplers

    model_options = comfy.model_patcher.create_model_options_clone(patcher.model_options)
    model_options.setdefault("transformer_options", {})["sample_sigmas"] = sample_sigmas
    comfy.sampler_helpers.prepare_model_patcher(patcher, conds, model_options)
    if extra_model_function is not None:
        model_options["model_function_wrapper"] = extra_model_function

    def step():
        patcher.pre_run()  # what CFGGuider.outer_sample does before sampling (sets model.current_patcher); trivial cost
        return comfy.samplers.sampling_function(
            patcher.model, x, sigma, conds["negative"], conds["positive"], CFG, model_options=model_options, seed=seed
        )

    step.model_options = model_options
    return step


class Clock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def time(self, fn) -> tuple[float, object]:
        """Seconds one call takes (CUDA: events around it, after a sync)."""
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000.0, out
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out


def measure_memory(fn, device: torch.device, op_table: bool):
    """(working peak bytes above the step-start level, total peak bytes or None, profiler key averages or None, output)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device)
        return peak - before, peak, None, out
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and "CPU" in str(e.device_type()).upper()),
        key=lambda e: e.start_ns(),
    )
    running = peak = 0
    for e in events:
        running += e.nbytes()
        peak = max(peak, running)
    table = prof.key_averages() if op_table else None
    return peak, None, table, out


class TimedPatch:
    """Mixin for a diagnostic copy of the pack's patch: time spent in the host kernel vs the nested part, per layer."""

    def _sync(self):
        if self._cuda:
            torch.cuda.synchronize()

    def base_attention(self, key, q, k, v, extra_options):
        self._sync()
        t0 = time.perf_counter()
        out = super().base_attention(key, q, k, v, extra_options)
        self._sync()
        self.stats.setdefault(key, [0.0, 0.0, None])[0] += time.perf_counter() - t0
        return out

    def __call__(self, q, k, v, extra_options):
        key = (*extra_options["block"], extra_options.get("block_index", 0))
        self._sync()
        t0 = time.perf_counter()
        out = super().__call__(q, k, v, extra_options)
        self._sync()
        entry = self.stats.setdefault(key, [0.0, 0.0, None])
        entry[1] += time.perf_counter() - t0
        entry[2] = (q.shape[0], q.shape[1], q.shape[2], k.shape[1])
        return out


def timed_copy(patch, device):
    cls = type(patch)
    timed = copy.copy(patch)  # shallow: shares the projection cache
    timed.__class__ = type("Timed" + cls.__name__, (TimedPatch, cls), {})
    timed.stats, timed._cuda = {}, device.type == "cuda"
    return timed


# --- main --------------------------------------------------------------------------------------------
def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.0f} MiB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--resolution", type=int, default=None, help="image side in pixels (default 512 on CPU, 1024 on CUDA)")
    ap.add_argument("--steps", type=int, default=3, help="timed repetitions per variant (interleaved)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed warm-up rounds")
    ap.add_argument("--queries", type=int, nargs="+", default=[256, 1024], help="nested tokens M per subject")
    ap.add_argument("--skip-naive", action="store_true", help="do not run the naive per-query-value form")
    ap.add_argument("--skip-memory", action="store_true", help="do not run the memory-measuring step per variant")
    ap.add_argument("--breakdown", action="store_true", help="also time the patch per layer (host kernel vs nested part) and list top ops")
    ap.add_argument("--tiny", action="store_true", help="tiny SDXL-layout UNet (smoke run)")
    ap.add_argument("--cpu", action="store_true", help="stay on CPU even when CUDA is available")
    ap.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="default fp32 on CPU, fp16 on CUDA")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)

    use_cuda = torch.cuda.is_available() and not args.cpu
    setup_comfyui(cpu=not use_cuda)
    import comfy.model_management as mm

    device = mm.get_torch_device()
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype or ("fp16" if use_cuda else "fp32")]
    resolution = args.resolution or (1024 if device.type == "cuda" else 512)
    latent = resolution // 8
    info = machine(device, dtype)
    print("== nested attention overhead benchmark ==")
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print("note: timings are wall-clock on a possibly shared machine; variants are interleaved round by round and medians reported")
    sys.stdout.flush()

    core = pack_module("nested_core")
    patch_mod = pack_module("nodes.patch")

    t0 = time.perf_counter()
    base, source = build_unet(args.tiny, device, dtype)
    dm = base.model.diffusion_model
    n_params = sum(p.numel() for p in dm.parameters())
    unet_bytes = tensor_bytes(dm.parameters()) + tensor_bytes(dm.buffers())
    keys = list(core.attn2_layers(dm))
    ctx_dim = next(iter(core.attn2_layers(dm).values())).to_k.weight.shape[1]
    pooled_dim = base.model.model_config.unet_config["adm_in_channels"] - 1536
    print(f"UNet: {source}; {n_params / 1e9:.3f} B params ({fmt_bytes(unet_bytes)}), {len(keys)} attn2 layers, "
          f"context {ctx_dim}, adm {pooled_dim + 1536}; built and filled in {time.perf_counter() - t0:.0f} s")
    print(f"step: one CFG step (comfy.samplers.sampling_function, cfg {CFG}), batch 2 = [negative unbound, positive bound at "
          f"token {BOUND_POSITION}], latent {latent}x{latent} ({resolution}² px), {info['dtype']} on {device}")
    sys.stdout.flush()

    # inputs shared by every variant
    gen = torch.Generator().manual_seed(0)
    ctx_pos, ctx_neg = torch.randn(1, 77, ctx_dim, generator=gen), torch.randn(1, 77, ctx_dim, generator=gen)
    pooled_pos, pooled_neg = torch.randn(1, pooled_dim, generator=gen), torch.randn(1, pooled_dim, generator=gen)
    noise = torch.randn(1, 4, latent, latent, generator=gen).to(device)
    ms = base.get_model_object("model_sampling")
    sigma = torch.tensor([float(ms.percent_to_sigma(0.5))], device=device)  # a mid-sampling step
    sample_sigmas = torch.tensor([float(ms.sigma_max), float(sigma), 0.0], device=device)
    x = noise * sigma
    seed = 0

    mm.load_models_gpu([base])  # the sampler's load; every clone shares this model (no weight patches)

    # nested-attention weights: one NestedAttentionModel per M (default_config(num_queries=M)); only the
    # per-layer projections matter here (the Q-Former is not run), so the projection modules are shared
    import comfy.ops

    weights, shared = {}, None
    for m_tokens in args.queries:
        w = core.NestedAttentionModel(core.default_config(dm, num_queries=m_tokens), operations=comfy.ops.disable_weight_init)
        if shared is None:
            w.init_projections_from(dm)  # the paper's start: W_K̆, W_V̆ = the layer's to_k, to_v
            shared = w
        else:
            w.to_k, w.to_v = shared.to_k, shared.to_v
        weights[m_tokens] = w.eval().requires_grad_(False)
    proj_params = sum(p.numel() for p in shared.to_k.parameters()) + sum(p.numel() for p in shared.to_v.parameters())

    results = {"machine": info, "resolution": resolution, "latent": latent, "unet_params": n_params, "unet_bytes": unet_bytes,
               "source": source, "steps": args.steps, "warmup": args.warmup, "variants": {}}
    variants = {}  # name -> dict(step, cm, patch, m)
    layout = {}

    def probe(apply_model, kw):
        layout["cond_or_uncond"] = list(kw["cond_or_uncond"])
        layout["batch"] = kw["input"].shape[0]
        return apply_model(kw["input"], kw["timestep"], **kw["c"])

    conds0 = make_conds(base, None, ctx_pos, ctx_neg, pooled_pos, pooled_neg, noise, device, seed)
    variants["unpatched"] = dict(step=make_step(base, conds0, x, sigma, sample_sigmas, seed), cm=contextlib.nullcontext,
                                 probe=make_step(base, conds0, x, sigma, sample_sigmas, seed, probe), m=0)

    stack = contextlib.ExitStack()
    naive_calls = [0]
    with torch.inference_mode(), stack:
        for m_tokens in args.queries:
            patched, patch = apply_patch(base)
            stack.enter_context(patch.run())  # one sampling run: projections computed once, kept warm across steps
            tokens = torch.randn(m_tokens, ctx_dim, generator=gen)  # subject tokens (what the Q-Former would give)
            subject = patch_mod.Subject(weights=weights[m_tokens], tokens=tokens)
            binding = patch_mod.Binding(subject, (BOUND_POSITION,), 77)
            conds = make_conds(patched, binding, ctx_pos, ctx_neg, pooled_pos, pooled_neg, noise, device, seed)
            like = torch.empty(0, device=device, dtype=dtype)
            clock = Clock(device)
            t_proj, _ = clock.time(lambda: [patch.projections(subject, key, like) for key in keys])
            cache_bytes = patch.cache_nbytes
            results.setdefault("projections", {})[m_tokens] = {"seconds": t_proj, "cache_bytes": cache_bytes}
            print(f"M={m_tokens}: projections for {len(keys)} layers ({proj_params / 1e6:.0f} M params, {m_tokens} tokens) "
                  f"computed once per run in {t_proj * 1000:.0f} ms; cache {fmt_bytes(cache_bytes)}")
            step = make_step(patched, conds, x, sigma, sample_sigmas, seed)
            variants[f"nested M={m_tokens}"] = dict(step=step, cm=contextlib.nullcontext, patch=patch, m=m_tokens,
                                                   resident=cache_bytes, patched=patched, conds=conds)
            if not args.skip_naive:
                need, have = naive_estimate(dm, latent, 77, m_tokens, dtype), available_bytes(device)
                if need > 0.5 * have:
                    print(f"naive M={m_tokens}: skipped, its largest layer needs ~{fmt_bytes(need)} of working memory, "
                          f"{fmt_bytes(have)} available")
                    results["variants"][f"naive M={m_tokens}"] = {"skipped": f"needs ~{need} bytes, {have} available"}
                else:
                    variants[f"naive M={m_tokens}"] = dict(step=step, cm=lambda: naive_form(naive_calls), patch=patch,
                                                           m=m_tokens, resident=cache_bytes)
        sys.stdout.flush()
        clock = Clock(device)

        # memory (one step each), also the outputs' sanity: patched ≠ unpatched on the bound rows, naive ≈ cheap
        outputs = {}
        if not args.skip_memory:
            for name, v in variants.items():
                fn = v.get("probe", v["step"])
                with v["cm"]():
                    work, total, table, out = measure_memory(fn, device, op_table=args.breakdown)
                if total is None:
                    total = unet_bytes + v.get("resident", 0) + work
                outputs[name] = out.float().cpu()
                results["variants"].setdefault(name, {}).update(peak_working_bytes=work, peak_total_bytes=total)
                v["table"] = table
                print(f"memory {name}: working peak {fmt_bytes(work)}, total {fmt_bytes(total)}")
                sys.stdout.flush()
        else:
            with variants["unpatched"]["cm"]():
                outputs["unpatched"] = variants["unpatched"]["probe"]().float().cpu()
        if layout:
            print(f"batch layout seen by the UNet: batch {layout['batch']}, cond_or_uncond {layout['cond_or_uncond']}")
            results["layout"] = layout
        if any(n.startswith("naive") for n in variants) and not args.skip_memory and naive_calls[0] == 0:
            raise RuntimeError("the naive form was never called: the patch no longer calls nodes.patch.nested_attention")
        base_out = outputs.get("unpatched")
        for name, out in outputs.items():
            if name == "unpatched":
                if not torch.isfinite(out).all():
                    print("WARNING: the random UNet's output is not finite")
                continue
            diff = (out - base_out).abs().max().item()
            line = f"check {name}: max|out - unpatched| = {diff:.3g}"
            cheap = outputs.get(name.replace("naive", "nested"))
            if name.startswith("naive") and cheap is not None:
                line += f", max|naive - nested| = {(out - cheap).abs().max().item():.3g}"
            print(line)

        # timing: warm-up round(s), then interleaved rounds with a rotating order
        # (the memory steps above already ran every variant once untimed, so they warm up too)
        names = list(variants)
        times = {n: [] for n in names}
        for r in range(args.warmup + args.steps):
            order = names[r % len(names):] + names[: r % len(names)]
            for n in order:
                with variants[n]["cm"]():
                    t, _ = clock.time(variants[n]["step"])
                if r >= args.warmup:
                    times[n].append(t)
            if r < args.warmup:
                print(f"warm-up round {r + 1} done")
            else:
                print(f"round {r - args.warmup + 1}/{args.steps}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names))
            sys.stdout.flush()

        # per-layer breakdown of the patched step (diagnostic, not part of the timed figures)
        breakdown = {}
        if args.breakdown:
            for name, v in variants.items():
                if not name.startswith("nested"):
                    continue
                timed = timed_copy(v["patch"], device)
                patched = v["patched"].clone()
                for key in keys:
                    patched.set_model_attn2_replace(timed, *key)
                step = make_step(patched, v["conds"], x, sigma, sample_sigmas, seed)
                t_step, _ = clock.time(step)
                groups = {}
                for key, (t_base, t_call, shape) in timed.stats.items():
                    g = groups.setdefault(shape, [0, 0.0, 0.0])
                    g[0] += 1
                    g[1] += t_base
                    g[2] += t_call - t_base
                tb = sum(g[1] for g in groups.values())
                tn = sum(g[2] for g in groups.values())
                breakdown[name] = {"step_s": t_step, "host_attn2_s": tb, "nested_extra_s": tn,
                                   "by_shape": {str(s): g for s, g in groups.items()}}
                print(f"breakdown {name}: step {t_step:.2f}s, attn2 host kernel {tb:.2f}s, nested extra {tn:.2f}s "
                      f"({100 * tn / t_step:.1f}% of the step)")
                for s, (count, b, nx) in sorted(groups.items(), key=lambda kv: -kv[1][2]):
                    print(f"   q rows {s[0]} x {s[1]} queries x {s[2]} ch, {s[3]} ctx tokens: {count} layers, "
                          f"host {b * 1000:.0f} ms, nested extra {nx * 1000:.0f} ms ({nx / count * 1000:.1f} ms/layer)")
            # op-level difference (from the memory-profiled steps; profiler overhead included)
            ref = variants["unpatched"].get("table")
            if ref is not None:
                base_ops = {e.key: e.self_cpu_time_total for e in ref}
                for name, v in variants.items():
                    if v.get("table") is None or name == "unpatched":
                        continue
                    ops = {e.key: e.self_cpu_time_total for e in v["table"]}
                    diff = sorted(((ops.get(k, 0) - base_ops.get(k, 0), k) for k in set(ops) | set(base_ops)), reverse=True)
                    print(f"top extra ops (self CPU, profiled) {name} vs unpatched: "
                          + ", ".join(f"{k} +{d / 1e3:.0f} ms" for d, k in diff[:8] if d > 0))
            results["breakdown"] = breakdown

    # --- report ---------------------------------------------------------------------------------------
    ref = statistics.median(times["unpatched"])
    step_target, target_res = TARGET_STEP[device.type if device.type in TARGET_STEP else "cpu"]
    print()
    print(f"== results: {'tiny SDXL-layout' if args.tiny else 'real-size SDXL'} UNet, {resolution}² (latent {latent}²), "
          f"{info['dtype']} on {info.get('gpu', info['cpu'])}, median of {args.steps} interleaved steps ==")
    header = f"{'variant':<16} {'step (median)':>14} {'ratio':>7} {'paired':>7} {'all steps':<28} {'peak total':>11} {'mem ratio':>9} {'working':>10}"
    print(header)
    print("-" * len(header))
    unp = results["variants"].setdefault("unpatched", {})
    verdicts = []
    for n in names:
        med = statistics.median(times[n])
        ratio = med / ref
        paired = statistics.median(a / b for a, b in zip(times[n], times["unpatched"]))
        r = results["variants"].setdefault(n, {})
        r.update(step_times_s=times[n], step_median_s=med, step_ratio=ratio, step_ratio_paired=paired)
        mem = ""
        if "peak_total_bytes" in r and "peak_total_bytes" in unp:
            r["mem_ratio"] = r["peak_total_bytes"] / unp["peak_total_bytes"]
            mem = f"{fmt_bytes(r['peak_total_bytes']):>11} {r['mem_ratio']:>8.3f}x {fmt_bytes(r['peak_working_bytes']):>10}"
        print(f"{n:<16} {med:>13.3f}s {ratio:>6.3f}x {paired:>6.3f}x {' '.join(f'{t:.2f}' for t in times[n]):<28} {mem}")
        if n.startswith("nested"):
            verdicts.append((f"step ratio {n} ≤ {step_target:.2f}x (target at {target_res}² on {device.type})", ratio <= step_target, ratio))
            if "mem_ratio" in r:
                verdicts.append((f"memory ratio {n} ≤ {TARGET_MEMORY:.2f}x", r["mem_ratio"] <= TARGET_MEMORY, r["mem_ratio"]))
    for n, r in results["variants"].items():
        if "skipped" in r:
            print(f"{n:<16} skipped: {r['skipped']}")
    for m_tokens, p in results.get("projections", {}).items():
        print(f"projections M={m_tokens}: {p['seconds'] * 1000:.0f} ms once per sampling run "
              f"(= {100 * p['seconds'] / ref:.1f}% of one unpatched step; cache {fmt_bytes(p['cache_bytes'])})")
    if device.type == "cuda":
        print("memory: torch.cuda.max_memory_allocated during one step (weights + projection cache + activations)")
    else:
        print("memory: 'working' = peak of torch's CPU allocations during one step above the step-start level (profiler "
              "memory events); 'peak total' = UNet weights + projection cache (resident for the step) + working. "
              f"The pack's weights ({fmt_bytes(proj_params * 4)} fp32 of projections, plus the Q-Former) are not counted: "
              "they are only read to build the cache once per run.")
    print("ratio = median(variant) / median(unpatched); paired = median over rounds of variant/unpatched in the same round")
    if resolution != target_res:
        print(f"note: the step target is defined at {target_res}², this run is at {resolution}²")
    if args.tiny:
        print("note: --tiny is a smoke run; its ratios say nothing about real SDXL")
    print()
    for text, ok, value in verdicts:
        print(f"{'PASS' if ok else 'MISS'}  {text}: {value:.3f}x")
    results["verdicts"] = [{"target": t, "pass": ok, "value": v} for t, ok, v in verdicts]
    try:
        import resource

        print(f"(process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB)")
    except ImportError:
        pass
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
