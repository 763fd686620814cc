"""Train the mini world's base models from scratch, on one CPU thread, within a wall-time budget.

    python -m miniworld.train_base pool     # render the image pools once (cached under runs/miniworld/)
    python -m miniworld.train_base vae      # KL VAE, 128 px <-> 16x16x4 latents       (~12 min)
    python -m miniworld.train_base unet     # v-prediction SDXL UNet on the VAE's latents (~37 min)
    python -m miniworld.train_base vision   # seeded random ViT + one trained on identity attributes
    python -m miniworld.train_base eval     # sample held-out prompts with the host's sampler, score them

Each part writes into miniworld/weights/ and keeps the parts it did not train. The UNet reads
the VAE's latents, so retrain `unet` after `vae`. Checkpoints go to runs/miniworld/.
"""
from __future__ import annotations

import argparse
import json
import math
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from training.host import pack_module, setup_comfyui

setup_comfyui(cpu=True)  # before any comfy import (models imports the host)

from training.models import prediction_target, sample_sigmas
from training.tiny import fill_deterministic

from . import models as M
from . import world as W
from .identity_codes import CodedRow, IdentityCodes, PartCodeInjection

RUNS = Path(__file__).resolve().parents[1] / "runs" / "miniworld"
CLIP_SEED, UNET_SEED, VAE_SEED, VISION_SEED = 1, 2, 3, 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=("pool", "vae", "unet", "vision", "eval"))
    p.add_argument("--weights-dir", type=Path, default=M.WEIGHTS_DIR)
    p.add_argument("--minutes", type=float, default=None, help="wall-time budget of the training loop (default per part)")
    p.add_argument("--pool-size", type=int, default=4800, help="training renders (both domains)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20, help="eval: sampler steps (euler, normal)")
    p.add_argument("--cfg", type=float, nargs="+", default=[4.0], help="eval: guidance scales to compare")
    p.add_argument("--eval-prompts", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared: keep 1)")
    p.add_argument("--identity-rows", type=float, default=0.9,
                   help="unet: fraction of captioned steps whose subject word carries the identity (miniworld.identity_codes)")
    p.add_argument("--from-shipped", action="store_true",
                   help="unet: continue from the UNet (and identity codes) in --weights-dir instead of a fresh init")
    p.add_argument("--parts", action="store_true",
                   help="unet: each query's subject-word value carries the code of the part it shows (the harder world of "
                        "baselines.study --world parts; give it its own --weights-dir)")
    p.add_argument("--pairs", type=float, default=0.0,
                   help="unet: fraction of rows showing a person and a dog in one image (world.render_pair), both subject "
                        "words carrying their identity (the two-subject world of baselines.study --world pairs; give it "
                        "its own --weights-dir)")
    args = p.parse_args(argv)
    if not 0 <= args.pairs < 1:
        p.error(f"--pairs is a fraction of the rows in [0, 1), got {args.pairs}")
    if args.pairs and args.parts:
        p.error("--pairs and --parts are two different worlds: give one of them")
    defaults = {"pool": (0, 1, 0), "eval": (0, 1, 0), "vae": (12, 16, 2e-3), "unet": (34, 32, 1e-3), "vision": (6, 64, 1e-3)}[args.part]
    args.minutes = defaults[0] if args.minutes is None else args.minutes
    args.batch_size = args.batch_size or defaults[1]
    args.lr = args.lr or defaults[2]
    return args


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cosine(progress: float, warmup: float = 0.03) -> float:
    """LR factor from the fraction of the time budget used: linear warmup, cosine down to 10%."""
    if progress < warmup:
        return progress / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))


# --- data: renders of the world, cached once ------------------------------------------------------
ID_SLOTS = 8  # attribute indices per identity in the pools, zero-padded: both domains' rows stack


def padded_attrs(identity: W.Identity) -> tuple[int, ...]:
    return identity.attrs + (0,) * (ID_SLOTS - len(identity.attrs))


def world_pool(n: int, *, split: str, seed: int) -> dict:
    """n renders at 128 px of random `split` identities (both domains alternating) in random scenes.
    Returns images uint8 [n, 128, 128, 3], domain [n], scenes (list), references uint8 [n, 64, 64, 3], ids."""
    path = RUNS / f"pool_{split}_{n}_{seed}.npz"
    if path.is_file():
        data = np.load(path, allow_pickle=False)
        out = {k: data[k] for k in data.files}
        out["scenes"] = [W.Scene(*row) for row in out.pop("scene_fields").tolist()]
        return out
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    pick = W.train_identities if split == "train" else W.heldout_identities
    identities = {d: pick(d) for d in W.DOMAINS}
    images, refs, domains, scenes, ids = [], [], [], [], []
    t0 = time.time()
    for i in range(n):
        d = i % len(W.DOMAINS)
        identity = identities[W.DOMAINS[d]][int(rng.integers(len(identities[W.DOMAINS[d]])))]
        scene = W.sample_scene(rng)
        images.append(W.render(identity, scene, size=M.IMAGE_SIZE, seed=i))
        refs.append(W.render_reference(identity, size=64, seed=i))
        domains.append(d), scenes.append(scene), ids.append(padded_attrs(identity))
        if (i + 1) % 500 == 0:
            log(f"rendered {i + 1}/{n} ({time.time() - t0:.0f} s)")
    fields = np.array([[s.background, s.position, s.size, s.style] for s in scenes])
    RUNS.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=np.stack(images), references=np.stack(refs), domain=np.array(domains), scene_fields=fields, ids=np.array(ids))
    return world_pool(n, split=split, seed=seed)


def pair_pool(n: int, *, seed: int) -> dict:
    """n two-subject renders at 128 px (world.render_pair): a random training person and dog on a random background.
    Returns images uint8 [n, 128, 128, 3], ids [n, 2, ID_SLOTS] (per domain), backgrounds (list)."""
    path = RUNS / f"pairs_train_{n}_{seed}.npz"
    if not path.is_file():
        rng = np.random.default_rng([seed, 2])
        identities = {d: W.train_identities(d) for d in W.DOMAINS}
        backgrounds = W.SCENE_FIELDS["background"]
        images, ids, names, t0 = [], [], [], time.time()
        for i in range(n):
            pair = {d: identities[d][int(rng.integers(len(identities[d])))] for d in W.DOMAINS}
            names.append(backgrounds[int(rng.integers(len(backgrounds)))])
            images.append(W.render_pair(pair, names[-1], size=M.IMAGE_SIZE, seed=i))
            ids.append([padded_attrs(pair[d]) for d in W.DOMAINS])
        RUNS.mkdir(parents=True, exist_ok=True)
        np.savez(path, images=np.stack(images), ids=np.array(ids), backgrounds=np.array(names))
        log(f"rendered {n} two-subject images ({time.time() - t0:.0f} s)")
    data = np.load(path, allow_pickle=False)
    return {"images": data["images"], "ids": data["ids"], "backgrounds": data["backgrounds"].tolist()}


PART_GRIDS = (16, 8, 4)  # the UNet's attention grids at 128 px (latent 16x16 and its two downsamplings)


def pool_parts(pool: dict, *, n: int, seed: int) -> list[dict[int, torch.Tensor]]:
    """Per pool image, {grid side: [n_parts, side·side]} part shares (world.render_parts of the very render)."""
    path = RUNS / f"parts_train_{n}_{seed}.npz"
    if not path.is_file():
        t0, out = time.time(), {side: [] for side in PART_GRIDS}
        for i, (d, scene, ids) in enumerate(zip(pool["domain"], pool["scenes"], pool["ids"])):
            domain = W.DOMAINS[int(d)]
            identity = W.Identity(domain, tuple(int(v) for v in ids[: len(W.ATTRIBUTES[domain])]))
            labels = W.render_parts(identity, scene, size=M.IMAGE_SIZE, seed=i)
            for side in PART_GRIDS:  # padded to the most parts of a domain so both domains stack
                f = W.part_fractions(labels, domain, side).reshape(len(W.PARTS[domain]), -1)
                out[side].append(np.pad(f, ((0, W.MAX_PARTS - len(f)), (0, 0))))
        np.savez(path, **{f"side{side}": np.stack(v) for side, v in out.items()})
        log(f"part labels of {n} renders ({time.time() - t0:.0f} s)")
    data = np.load(path, allow_pickle=False)
    stacked = {side: torch.from_numpy(data[f"side{side}"]) for side in PART_GRIDS}
    return [{side: stacked[side][i, : len(W.PARTS[W.DOMAINS[int(d)]])] for side in PART_GRIDS} for i, d in enumerate(pool["domain"])]


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in -1..1 (the VAE's input range)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean PSNR (dB) of images in 0..1."""
    mse = ((a.float() - b.float()) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1 / mse)).mean())


# --- base file: keep the parts not being trained --------------------------------------------------
def current_base(weights_dir: Path) -> dict:
    """{"unet": diffusion_model, "clip": cond_stage_model, "vae": AutoencoderKL, "info": {...}} from the
    shipped file, or freshly seeded parts where there is none yet."""
    path = weights_dir / M.BASE_FILE
    if path.is_file():
        patcher, clip, vae, meta = M.load_base(path)
        return {"unet": patcher.model.diffusion_model, "clip": clip.cond_stage_model, "vae": vae.first_stage_model,
                "identity_codes": M.load_identity_codes(path), "info": meta["info"]}
    log(f"no {path}: starting from seeded random parts")
    return {
        "unet": fill_deterministic(M.build_unet().diffusion_model, UNET_SEED),
        # frozen random text encoders: they carry token identity, the UNet learns to read them
        "clip": fill_deterministic(M.build_clip().cond_stage_model, CLIP_SEED),
        "vae": fill_deterministic(M.build_autoencoder(), VAE_SEED),
        "info": {},
    }


def write_base(weights_dir: Path, parts: dict) -> None:
    M.save_base(weights_dir / M.BASE_FILE, unet=parts["unet"], clip=parts["clip"], vae=parts["vae"],
                identity_codes=parts.get("identity_codes"), info=parts["info"])
    log(f"wrote {weights_dir / M.BASE_FILE} ({(weights_dir / M.BASE_FILE).stat().st_size / 2**20:.2f} MiB)")


# --- VAE ----------------------------------------------------------------------------------------
@torch.no_grad()
def normalise_latents(ae, pixels: torch.Tensor) -> dict:
    """Fold a per-channel affine map into quant_conv / post_quant_conv so that encoded latents have
    mean 0 and std 1/0.13025: after SDXL's process_latent_in the UNet then sees unit-variance latents.
    The decoder's output is unchanged (exact: post_quant_conv is linear)."""
    mean = torch.cat([ae.encode(pixels[i:i + 32]) for i in range(0, len(pixels), 32)]).transpose(0, 1).flatten(1)  # [4, N*h*w]
    mu, sd = mean.mean(1), mean.std(1)
    k = (1 / M.LATENT_SCALE) / sd  # [4]
    c = len(k)
    q, pq = ae.quant_conv, ae.post_quant_conv
    q.weight[:c] *= k.view(-1, 1, 1, 1)
    q.bias[:c] = (q.bias[:c] - mu) * k
    q.bias[c:] += 2 * torch.log(k)  # log-variance rows: the posterior's std scales with its mean
    pq.bias += (pq.weight[:, :, 0, 0] @ mu)
    pq.weight /= k.view(1, -1, 1, 1)
    return {"latent_mean_before": mu.tolist(), "latent_std_before": sd.tolist()}


def train_vae(args) -> None:
    parts = current_base(args.weights_dir)
    ae = fill_deterministic(M.build_autoencoder(), VAE_SEED + args.seed).train()  # from scratch
    train = to_pixels(world_pool(args.pool_size, split="train", seed=args.seed)["images"])
    held = to_pixels(world_pool(64, split="heldout", seed=args.seed)["images"])
    opt = torch.optim.AdamW(ae.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    budget, t0, step = args.minutes * 60, time.time(), 0
    while (elapsed := time.time() - t0) < budget:
        progress = elapsed / budget
        for g in opt.param_groups:
            g["lr"] = args.lr * cosine(progress)
        # random 64 px crops for most of the budget (4x cheaper; the model is convolutional), full frames at the end
        idx = torch.randint(len(train), (args.batch_size,), generator=gen)
        if progress < 0.7:
            y0, x0 = torch.randint(0, 65, (2,), generator=gen).tolist()
            x = train[idx, :, y0:y0 + 64, x0:x0 + 64]
        else:
            x = train[idx[: args.batch_size // 2]]
        h = ae.quant_conv(ae.encoder(x))
        mean, logvar = h.chunk(2, dim=1)
        logvar = logvar.clamp(-30, 20)
        z = mean + torch.randn(mean.shape, generator=gen) * (0.5 * logvar).exp()
        recon = ae.decoder(ae.post_quant_conv(z))
        kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).mean()
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0:
            log(f"vae step {step} loss {loss.item():.4f} kl {kl.item():.1f} lr {opt.param_groups[0]['lr']:.2e} ({elapsed:.0f} s)")
    ae.eval()
    stats = normalise_latents(ae, train[:512])
    parts["vae"] = ae
    with torch.no_grad():
        recon = ae.decode(ae.encode(held))
    score = psnr((recon.clamp(-1, 1) + 1) / 2, (held + 1) / 2)
    wall = time.time() - t0
    parts["info"]["vae"] = {"steps": step, "batch_size": args.batch_size, "lr": args.lr, "wall_s": round(wall),
                            "pool": args.pool_size, "heldout_psnr_db": round(score, 2), **stats}
    write_base(args.weights_dir, parts)
    log(f"vae: {step} steps, held-out PSNR {score:.2f} dB, wall {wall:.0f} s (retrain the unet on these latents)")


# --- UNet ---------------------------------------------------------------------------------------
class Captions:
    """Text conditioning per caption, computed once: context [77, 64], pooled [32] and the subject word's index."""

    def __init__(self, clip):
        self.clip, self.cache = clip, {}
        self.prompt_tokens = pack_module("nodes.prompt").PromptTokens  # the pack's one token finder, as training uses

    def __call__(self, text: str, word: str | None = None) -> tuple[torch.Tensor, torch.Tensor, int | None]:
        if (text, word) not in self.cache:
            tokens = self.clip.tokenize(text)
            with torch.no_grad():
                cond, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True)
            position = self.prompt_tokens.from_tokens(tokens, self.clip.tokenizer).positions(word)[0] if word else None
            self.cache[text, word] = (cond[0].float(), pooled[0].float(), position)
        return self.cache[text, word]


class EMA:
    """fp32 shadow of the weights; what gets shipped."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay, self.shadow = decay, {k: v.detach().clone().float() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))  # warm start: early weights fade fast
        for k, v in module.state_dict().items():
            self.shadow[k].lerp_(v.float(), 1 - d)


def code_subject_words(context: torch.Tensor, words: list[tuple], codes: IdentityCodes) -> torch.Tensor:
    """The value context of a batch [B, 77, width]: each listed subject word (batch row, domain, position, attribute
    indices) carrying its identity's code (IdentityCodes.apply); every other token as in `context`, which the keys read."""
    values = context
    for domain in W.DOMAINS:
        mine = [w for w in words if w[1] == domain]
        if mine:
            rows, at = torch.tensor([w[0] for w in mine]), torch.tensor([w[2] for w in mine])
            values = values.index_put((rows, at), codes.apply(context[rows, at], domain, torch.stack([w[3] for w in mine])))
    return values


def size_adm(model) -> torch.Tensor:
    """The 1536 SDXL size/crop embedding for a 128 px image, uncropped (what sampling uses at 16x16 latents)."""
    pooled = torch.zeros(1, M.TEXT_WIDTH)
    return model.encode_adm(pooled_output=pooled, height=M.IMAGE_SIZE, width=M.IMAGE_SIZE, crop_h=0, crop_w=0,
                            target_height=M.IMAGE_SIZE, target_width=M.IMAGE_SIZE)[:, M.TEXT_WIDTH:]


@torch.no_grad()
def encode_pool(vae, images: np.ndarray, model, key: str) -> torch.Tensor:
    """Scaled latents [N, 4, 16, 16] (after process_latent_in) of a uint8 image pool, cached per VAE."""
    from safetensors.torch import load_file, save_file

    ae = vae.first_stage_model
    fingerprint = sum(float(p.double().abs().sum()) for p in ae.parameters())
    path = RUNS / f"latents_{key}_{fingerprint:.6e}.safetensors"
    if path.is_file():
        return load_file(str(path))["latents"]
    out = [vae.encode(torch.from_numpy(images[i:i + 64]).float() / 255) for i in range(0, len(images), 64)]
    latents = model.process_latent_in(torch.cat(out)).float()
    save_file({"latents": latents.contiguous()}, str(path))
    return latents


def train_unet(args) -> None:
    import comfy.patcher_extension

    # one load only: a dropped copy leaves a dead entry in the host's loaded-model list, and then
    # every later load_models_gpu (each text encode, each VAE encode) runs a full gc.collect()
    patcher, clip, vae, meta = M.load_base(args.weights_dir / M.BASE_FILE)
    model = patcher.model
    parts = {"unet": model.diffusion_model, "clip": clip.cond_stage_model, "vae": vae.first_stage_model, "info": meta["info"]}
    codes = M.load_identity_codes(args.weights_dir / M.BASE_FILE) if args.from_shipped else None
    if not args.from_shipped:
        fill_deterministic(model.diffusion_model, UNET_SEED + args.seed)
        for name, module in model.diffusion_model.named_modules():
            # residual branches start as the identity (the original LDM init the host's classes skip)
            if name.endswith(("out_layers.3", "proj_out")) or name == "out.2":
                torch.nn.init.zeros_(module.weight), torch.nn.init.zeros_(module.bias)
    if codes is None:
        torch.manual_seed(UNET_SEED + args.seed)
        codes = IdentityCodes(M.TEXT_WIDTH * 2)
    model.diffusion_model.train()
    pool = world_pool(args.pool_size, split="train", seed=args.seed)
    t0 = time.time()
    x0_all = encode_pool(vae, pool["images"], model, f"train_{args.pool_size}_{args.seed}")
    log(f"latents {tuple(x0_all.shape)} std {x0_all.std():.3f} mean {x0_all.mean():.3f} ({time.time() - t0:.0f} s)")
    captions, adm_size = Captions(clip), size_adm(model)
    empty = captions("")
    ms = model.model_sampling
    params = [p for p in model.diffusion_model.parameters()]
    opt = torch.optim.AdamW([{"params": params, "scale": 1.0}, {"params": list(codes.parameters()), "scale": 10.0, "weight_decay": 0.0}],
                            lr=args.lr, weight_decay=0.01)
    ema, ema_codes = EMA(model.diffusion_model, 0.999), EMA(codes, 0.999)
    identities = torch.from_numpy(pool["ids"]).long()
    pairs = pair_pool(args.pool_size // 2, seed=args.seed) if args.pairs else None
    if pairs is not None:
        pair_x0 = encode_pool(vae, pairs["images"], model, f"pairs_{args.pool_size // 2}_{args.seed}")
        pair_ids = torch.from_numpy(pairs["ids"]).long()
    part_shares = pool_parts(pool, n=args.pool_size, seed=args.seed) if args.parts else None
    layer_keys = list(pack_module("nested_core").attn2_layers(model.diffusion_model))
    gen = torch.Generator().manual_seed(args.seed)
    captured = []

    def capture(executor, *a, **kw):  # the raw model output (v), before the host turns it into x0
        captured.append(executor(*a, **kw))
        return captured[-1]

    options = {"wrappers": {comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL: {"miniworld": [capture]}}}
    budget, t0, step, last_ckpt, running = args.minutes * 60, time.time(), 0, time.time(), None
    while (elapsed := time.time() - t0) < budget:
        for g in opt.param_groups:
            g["lr"] = args.lr * g["scale"] * cosine(elapsed / budget)
        idx = torch.randint(len(x0_all), (args.batch_size,), generator=gen).tolist()
        variants = torch.randint(len(W.CAPTION_TEMPLATES), (args.batch_size,), generator=gen).tolist()
        drop = (torch.rand(args.batch_size, generator=gen) < 0.1).tolist()  # so classifier-free guidance works
        coded = (torch.rand(args.batch_size, generator=gen) < args.identity_rows).tolist()
        domains = [W.DOMAINS[pool["domain"][i]] for i in idx]
        conds = [empty if dr else captions(W.caption(d, pool["scenes"][i], variant=v), W.SUBJECT_WORD[d])
                 for i, d, v, dr in zip(idx, domains, variants, drop)]
        subjects = [[(d, conds[b][2], identities[i])] for b, (i, d) in enumerate(zip(idx, domains))]  # (domain, position, attrs)
        if pairs is not None:  # these rows show a person and a dog instead; both words carry their identity
            paired = (torch.rand(args.batch_size, generator=gen) < args.pairs).tolist()
            pick = torch.randint(len(pair_x0), (args.batch_size,), generator=gen).tolist()
            for b in (b for b in range(args.batch_size) if paired[b]):
                text = W.pair_caption(pairs["backgrounds"][pick[b]])
                conds[b] = empty if drop[b] else captions(text, W.SUBJECT_WORD["person"])
                subjects[b] = [(d, captions(text, W.SUBJECT_WORD[d])[2], pair_ids[pick[b], k]) for k, d in enumerate(W.DOMAINS)]
        context = torch.stack([c for c, _, _ in conds])
        y = torch.cat([torch.stack([p for _, p, _ in conds]), adm_size.expand(len(idx), -1)], dim=1)
        part_rows = {}  # the subject word's value (not its key) carries the depicted identity in coded rows
        if part_shares is not None:  # per query: the code of the part it shows
            for domain in W.DOMAINS:
                rows = [b for b in range(len(idx)) if coded[b] and not drop[b] and domains[b] == domain]
                if rows:
                    part_codes = codes.part_codes(domain, identities[[idx[b] for b in rows]])
                    for j, b in enumerate(rows):
                        part_rows[b] = CodedRow(conds[b][2], context[b, conds[b][2]], part_codes[j], part_shares[idx[b]])
            options = PartCodeInjection(part_rows, W.MAX_PARTS).install(options, layer_keys)
        else:
            values = code_subject_words(context, [(b, *word) for b in range(len(idx)) if coded[b] and not drop[b] for word in subjects[b]], codes)
            options["patches"] = {"attn2_patch": [lambda n, context_attn2, value_attn2, extra, values=values: (n, context_attn2, values)]}
        x0 = x0_all[idx] if pairs is None else torch.stack([pair_x0[pick[b]] if paired[b] else x0_all[i] for b, i in enumerate(idx)])
        noise = torch.randn(x0.shape, generator=gen)
        sigma = sample_sigmas(ms, len(idx), gen)
        x_noisy = ms.noise_scaling(sigma.view(-1, 1, 1, 1), noise, x0)
        captured.clear()
        model.apply_model(x_noisy, sigma, c_crossattn=context, y=y, transformer_options=options)
        loss = F.mse_loss(captured[-1].float(), prediction_target(ms, x0, noise, sigma, x_noisy))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(model.diffusion_model, step)
        ema_codes.update(codes, step)
        step += 1
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0:
            log(f"unet step {step} loss {running:.4f} lr {opt.param_groups[0]['lr']:.2e} ({elapsed:.0f} s, {elapsed / step:.2f} s/step)")
        if time.time() - last_ckpt > 300:  # a crash loses at most 5 minutes
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in ema.shadow.items()}, str(RUNS / "unet_ema.safetensors"))
            save_file({k: v.contiguous() for k, v in ema_codes.shadow.items()}, str(RUNS / "codes_ema.safetensors"))
            last_ckpt = time.time()
    wall = time.time() - t0
    model.diffusion_model.load_state_dict(ema.shadow)
    codes.load_state_dict(ema_codes.shadow)
    parts["unet"], parts["identity_codes"] = model.diffusion_model.eval(), codes
    run_info = {"steps": step, "batch_size": args.batch_size, "lr": args.lr, "ema": 0.999, "caption_dropout": 0.1,
                "identity_rows": args.identity_rows, "identity_codes": "parts" if args.parts else "whole", "pairs": args.pairs, "pool": args.pool_size, "wall_s": round(wall), "final_loss": round(running, 4)}
    previous = parts["info"].get("unet") if args.from_shipped else None
    parts["info"]["unet"] = {**run_info, "continued_from": previous} if previous else run_info
    write_base(args.weights_dir, parts)
    log(f"unet: {step} steps, loss {running:.4f}, wall {wall:.0f} s")


# --- CLIP vision --------------------------------------------------------------------------------
def _residual_forward(self, x, mask=None, optimized_attention=None):
    """comfy.clip_model.CLIPLayer.forward, out of place (same math)."""
    x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
    return x + self.mlp(self.layer_norm2(x))


def train_vision(args) -> None:
    """The seeded random ViT (vision.safetensors) and one trained to tell identities apart
    (vision_trained.safetensors): per-attribute classifiers on its pooled output, from reference photos."""
    t0 = time.time()
    clip_vision = M.build_clip_vision()
    fill_deterministic(clip_vision.model, VISION_SEED)
    M.save_vision(args.weights_dir / M.VISION_FILES["random"], clip_vision.model, name=M.VISION_NAMES["random"],
                  info={"seed": VISION_SEED, "trained": False})
    if args.minutes <= 0:
        return
    pool = world_pool(args.pool_size, split="train", seed=args.seed)
    refs = torch.from_numpy(pool["references"]).float() / 255  # [N, 64, 64, 3]
    ids = torch.from_numpy(pool["ids"]).long()
    domain = torch.from_numpy(pool["domain"]).long()
    heads = torch.nn.ModuleList()
    for d in W.DOMAINS:  # one linear head per (domain, attribute)
        heads.append(torch.nn.ModuleList(torch.nn.Linear(M.VISION["hidden_size"], len(values)) for _, values in W.ATTRIBUTES[d]))
    model = clip_vision.model.train()
    for layer in model.vision_model.encoder.layers:  # the host's residual adds are in place: autograd refuses them
        layer.forward = types.MethodType(_residual_forward, layer)
    opt = torch.optim.AdamW([*model.parameters(), *heads.parameters()], lr=args.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed)
    budget, t0_loop, step = args.minutes * 60, time.time(), 0
    import comfy.clip_vision

    while (elapsed := time.time() - t0_loop) < budget:
        for g in opt.param_groups:
            g["lr"] = args.lr * g["scale"] * cosine(elapsed / budget)
        idx = torch.randint(len(refs), (args.batch_size,), generator=gen)
        pixels = comfy.clip_vision.clip_preprocess(refs[idx], size=M.VISION["image_size"])
        tokens = model(pixel_values=pixels, intermediate_output=-2)[0]  # last_hidden_state [B, T, D]
        feats = tokens.mean(1)
        loss = 0.0
        for d in range(len(W.DOMAINS)):
            rows = (domain[idx] == d).nonzero().flatten()
            for a, head in enumerate(heads[d]):
                loss = loss + F.cross_entropy(head(feats[rows]), ids[idx][rows, a], reduction="sum") / len(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0:
            log(f"vision step {step} loss {loss.item():.3f} ({elapsed:.0f} s)")
    model.eval()
    held = world_pool(64, split="heldout", seed=args.seed)
    with torch.no_grad():
        pixels = comfy.clip_vision.clip_preprocess(torch.from_numpy(held["references"]).float() / 255, size=M.VISION["image_size"])
        feats = model(pixel_values=pixels, intermediate_output=-2)[0].mean(1)
        hits = [float(heads[d][a](feats[i]).argmax() == held["ids"][i, a])
                for i, d in enumerate(held["domain"].tolist()) for a in range(len(W.ATTRIBUTES[W.DOMAINS[d]]))]
    accuracy = float(np.mean(hits))
    log(f"vision: held-out identity-attribute accuracy {accuracy:.3f} (linear heads on mean-pooled last_hidden_state)")
    wall = time.time() - t0
    M.save_vision(args.weights_dir / M.VISION_FILES["trained"], model, name=M.VISION_NAMES["trained"],
                  info={"steps": step, "batch_size": args.batch_size, "lr": args.lr, "wall_s": round(wall), "final_loss": round(float(loss.detach()), 3),
                        "heldout_attribute_accuracy": round(accuracy, 3)})
    log(f"vision: {step} steps, loss {float(loss.detach()):.3f}, wall {wall:.0f} s")


# --- evaluation through the host's sampler -------------------------------------------------------
def sample(world_models, prompts: list[str], *, steps: int, cfg: float, seed: int = 0, negative: str = "") -> torch.Tensor:
    """One 128 px image per prompt, [N, 128, 128, 3] in 0..1, via comfy.sample (euler / normal), as a graph would."""
    import comfy.sample

    clip = world_models.clip
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(negative))
    images = []
    for i, prompt in enumerate(prompts):
        pos = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
        latent = torch.zeros(1, 4, M.IMAGE_SIZE // 8, M.IMAGE_SIZE // 8)
        noise = comfy.sample.prepare_noise(latent, seed + i)
        out = comfy.sample.sample(world_models.patcher, noise, steps, cfg, "euler", "normal", pos, neg, latent,
                                  seed=seed + i, disable_pbar=True)
        images.append(world_models.vae.decode(out)[0].float().clamp(0, 1))
    return torch.stack(images)


def save_grid(images: torch.Tensor, path: Path, cols: int = 8, scale: int = 2) -> None:
    from PIL import Image

    n, h, w, _ = images.shape
    rows = -(-n // cols)
    grid = torch.zeros(rows * h, cols * w, 3)
    for i, im in enumerate(images):
        grid[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = im
    Image.fromarray((grid * 255).round().byte().numpy()).resize((cols * w * scale, rows * h * scale), Image.NEAREST).save(path)


def evaluate(args) -> None:
    """Prompt accuracy (miniworld.metrics) of the base model on held-out prompts: random scenes of both
    domains, no identity asked for. Also scores real renders of those prompts (the metric's ceiling)."""
    from .metrics import WorldMetrics

    world_models = M.load_world(args.weights_dir)
    metrics = WorldMetrics.load()
    rng = np.random.default_rng([args.seed, 7])
    scenes = [W.sample_scene(rng) for _ in range(args.eval_prompts)]
    domains = [W.DOMAINS[i % 2] for i in range(args.eval_prompts)]
    prompts = [W.caption(d, s, variant=i) for i, (d, s) in enumerate(zip(domains, scenes))]
    held = {d: W.heldout_identities(d) for d in W.DOMAINS}
    real = np.stack([W.render(held[d][i], s, size=M.IMAGE_SIZE, seed=i) for i, (d, s) in enumerate(zip(domains, scenes))])
    log(f"real renders: prompt accuracy {metrics.prompt_accuracy(real, scenes).mean():.3f}")
    RUNS.mkdir(parents=True, exist_ok=True)
    for cfg in args.cfg:
        t0 = time.time()
        images = sample(world_models, prompts, steps=args.steps, cfg=cfg, seed=args.seed)
        fields = {k: float(v.mean()) for k, v in metrics.prompt_field_accuracy(images, scenes).items()}
        domain_acc = float(np.mean([metrics.predict_domain(im[None]) == d for im, d in zip(images, domains)]))
        acc = metrics.prompt_accuracy(images, scenes).mean()
        save_grid(images[:32], RUNS / f"samples_steps{args.steps}_cfg{cfg:g}.png")
        log(f"steps {args.steps} cfg {cfg:g}: prompt accuracy {acc:.3f} {json.dumps({k: round(v, 3) for k, v in fields.items()})} "
            f"domain {domain_acc:.3f} ({time.time() - t0:.0f} s)")
    print("\n".join(f"{i:2d} {p}" for i, p in enumerate(prompts[:32])))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    if args.part == "pool":
        world_pool(args.pool_size, split="train", seed=args.seed)
        world_pool(64, split="heldout", seed=args.seed)
    else:
        {"vae": train_vae, "unet": train_unet, "vision": train_vision, "eval": evaluate}[args.part](args)
    log(f"{args.part}: total wall time {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
