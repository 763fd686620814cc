"""Personalisation in the demo world, measured: images made with the nodes' own code (Encode Subject, Attention
Scale λ, Bind Token, Apply Nested Attention, the host's sampler), scored with the world's own metrics.

    python -m miniworld.evaluate --domain person --identities 16 --lambdas 1 2 3 4 --out docs/results/person.json

Conditions per held-out case (identity, scene): the base model with the subject word and no subject; nested
attention with the identity's own reference photo at each λ; nested attention with ANOTHER held-out
identity's reference (λ = 1), so "identity" means the reference's, not just the domain's; and, where the base
file has them, the oracle: the base model told the identity through the subject word's identity code
(miniworld.identity_codes), the most a subject-word value can do in this world.

For the paper's comparison (baselines/, `python -m baselines.study`) the same conditions run with a baseline
mechanism (`--mechanism`, default: the one the weights file records) and its knob (λ, or decoupled CA's
`--scales`); `--photos 3` adds the subject from three reference photos, `--mixing` two identities' tokens
concatenated; `evaluate_two_domains` puts a person and a dog in one image, each bound or alone.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from training.host import pack_module, setup_comfyui

setup_comfyui()  # before the world's models import the host

from . import world  # noqa: E402
from .models import BASE_FILE, IMAGE_SIZE, VISION_FILES, VISION_NAMES, WEIGHTS_DIR, load_identity_codes, load_world  # noqa: E402

NESTED_DIR = WEIGHTS_DIR / "nested"  # the world's nested-attention weights; Load Nested Attention lists this folder too
WEIGHTS = {domain: NESTED_DIR / f"nested_{domain}.safetensors" for domain in world.DOMAINS}
NEGATIVE = ""  # the world's text encoder never saw a negative vocabulary: the empty prompt is its unconditional
STEPS, CFG, SAMPLER, SCHEDULER = 20, 3.0, "euler", "normal"  # docs/miniworld.md "Base models": the recommended settings


def vision_of(*weights) -> str:
    """The world ViT ('random' / 'trained') the weights were trained with (their config names it)."""
    names = {w.config.vision_encoder for w in weights}
    keys = [k for k, name in VISION_NAMES.items() if {name} == names]
    if not keys:
        raise ValueError(f"weights trained on {sorted(names)}, not on one of the world's ViTs {list(VISION_FILES)}")
    return keys[0]


@dataclass(frozen=True)
class Case:
    identity: world.Identity
    scene: world.Scene
    caption: str
    seed: int  # sampling noise
    reference_seed: int  # pose/lighting of the reference photo


CASE_SETS = ("scenes", "hard")
STYLED = tuple(s for s in world.SCENE_FIELDS["style"] if s != "none")


def cases(domain: str, n_identities: int, per_identity: int = 1, seed: int = 0, case_set: str = "scenes") -> list[Case]:
    """Fixed held-out cases: each evaluation identity in `per_identity` random scenes (styles included).

    case_set "hard": the same identities, backgrounds, positions and seeds, but every subject small and drawn in
    one of the six styles in turn (outline, grayscale, inverted, pixelated, hat, upside down): fewer pixels carry
    the identity and every prompt asks to change how the subject looks, so neither metric saturates."""
    if case_set not in CASE_SETS:
        raise ValueError(f"unknown case set {case_set!r}; choose one of {CASE_SETS}")
    rng = np.random.default_rng([seed, world.DOMAINS.index(domain)])
    out = []
    for identity in world.eval_identities(domain, n_identities):
        for _ in range(per_identity):
            scene = world.sample_scene(rng)
            if case_set == "hard":
                scene = replace(scene, size="small", style=STYLED[len(out) % len(STYLED)])
            variant, noise, ref = (int(x) for x in rng.integers(2**31, size=3))
            out.append(Case(identity, scene, world.caption(domain, scene, variant=variant), noise, ref))
    return out


def reference_photo(identity: world.Identity, seed: int) -> torch.Tensor:
    """[H, W, 3] float 0..1: the photo a user would give, at the world's image size."""
    return torch.from_numpy(world.render_reference(identity, size=IMAGE_SIZE, seed=seed).astype(np.float32) / 255.0)


class Generator:
    """The world's models behind the nodes' own functions; one instance per process."""

    def __init__(self, vision: str = "trained", steps: int = STEPS, cfg: float = CFG, base_dir: str | Path | None = None):
        self.models = load_world(base_dir, vision=VISION_FILES[vision])
        self.codes = load_identity_codes(Path(base_dir or WEIGHTS_DIR) / BASE_FILE)
        # the harder world (miniworld.identity_codes, part codes): its UNet reads a code per part, per query
        self.part_codes = (self.models.info.get("unet") or {}).get("identity_codes") == "parts"
        self.size, self.steps, self.cfg = IMAGE_SIZE, steps, cfg
        self.apply, self.subject, self.prompt = (pack_module(f"nodes.{m}") for m in ("apply", "subject", "prompt"))
        self.patched = self.apply.apply_nested_attention(self.models.patcher)
        self.negative = self.models.clip.encode_from_tokens_scheduled(self.models.clip.tokenize(NEGATIVE))

    def encode_subject(self, weights, references: torch.Tensor):
        """SUBJECT from [B, H, W, 3] reference photos (B > 1: tokens concatenated, as Encode Subject does)."""
        return self.subject.encode_subject(weights, self.models.clip_vision, references)

    def use_mechanism(self, mechanism: str = "nested", **options) -> None:
        """Bound subjects are sampled with `mechanism` from now on: Apply Nested Attention's own patch, or a baseline
        of the paper's comparison (baselines.patch.apply_mechanism; options: decoupled's scale). The nodes never
        import baselines; only this evaluation does."""
        if mechanism == "nested" and not options:
            self.patched = self.apply.apply_nested_attention(self.models.patcher)
        else:
            self.patched = pack_module("baselines.patch").apply_mechanism(self.models.patcher, mechanism, **options)

    def told_identity(self, caption: str, identity: world.Identity | tuple[world.Identity, ...], scene: world.Scene | None = None,
                      seed: int = 0, whole: bool = False):
        """The oracle: the base model whose subject-word value carries the identity's code (keys untouched),
        as in the UNet's pretraining; only the conditional half of the batch. A tuple of identities of different
        domains: each on its own subject word (two subjects in one image). In the harder world each query gets
        its part's code, placed by the parts of `render(identity, scene, seed=seed)`: the oracle is also told
        where the parts are; whole: the whole identity's code at every query even there (one vector, as global V)."""
        told = identity if isinstance(identity, tuple) else (identity,)
        clip = self.models.clip
        tokens = self.prompt.PromptTokens.from_tokens(clip.tokenize(caption), clip.tokenizer)
        words = [(p, one) for one in told for p in tokens.positions(world.SUBJECT_WORD[one.domain])]  # (position, identity)
        if self.part_codes and not whole:
            if len(told) != 1:
                raise ValueError(f"the parts oracle places one subject's parts; got {len(told)} identities (use whole=True)")
            return self._told_parts([p for p, _ in words], told[0], scene or world.Scene(), seed)
        coded: dict[int, torch.Tensor] = {}  # position -> its row with the code: the context is the same at every call

        def patch(n, context, value, extra_options):
            halves = extra_options.get("cond_or_uncond", [0])
            size = value.shape[0] // len(halves)
            value = value.clone()
            for i, half in enumerate(halves):
                if half == 0:  # the positive prompt (1 is the negative)
                    for p, one in words:
                        if p not in coded:
                            coded[p] = self.codes.identity_row(context[i * size, p], one)
                        value[i * size:(i + 1) * size, p] = coded[p].to(value)
            return n, context, value

        model = self.models.patcher.clone()
        model.set_model_attn2_patch(patch)
        return model

    def _told_parts(self, positions: list[int], identity: world.Identity, scene: world.Scene, seed: int):
        from .identity_codes import CodedRow, PartCodeInjection

        labels = world.render_parts(identity, scene, size=self.size, seed=seed)
        n_parts = len(world.PARTS[identity.domain])
        shares = {side: torch.from_numpy(world.part_fractions(labels, identity.domain, side).reshape(n_parts, -1))
                  for side in (self.size // 8, self.size // 16, self.size // 32)}
        codes = self.codes.part_codes(identity.domain, torch.tensor([identity.attrs]))[0].detach()
        # one injection per batch layout for the whole run (the caption's context is the same at every call); the
        # attn2 patch, which sees the unprojected rows, picks it, and the layer's replace that follows uses it
        injections: dict[tuple, PartCodeInjection] = {}
        current = {}

        def patch(n, context, value, extra_options):
            halves = tuple(extra_options.get("cond_or_uncond", [0]))
            size = context.shape[0] // len(halves)
            if (halves, size) not in injections:
                rows = {i * size + j: CodedRow(p, context[i * size + j, p], codes, shares)
                        for i, half in enumerate(halves) if half == 0 for j in range(size) for p in positions}
                injections[halves, size] = PartCodeInjection(rows, n_parts)
            current["injection"] = injections[halves, size]
            return current["injection"].attn2_patch(n, context, value, extra_options)

        model = self.models.patcher.clone()
        model.set_model_attn2_patch(patch)
        for block, number, index in pack_module("nested_core").attn2_layers(model.model.diffusion_model):
            model.set_model_attn2_replace(lambda q, k, v, extra: current["injection"].attn2_replace(q, k, v, extra), block, number, index)
        return model

    @torch.no_grad()
    def image(self, caption: str, seed: int, subjects: list[tuple] = (), told: world.Identity | tuple | None = None,
              scene: world.Scene | None = None, whole: bool = False) -> torch.Tensor:
        """[H, W, 3] in 0..1. subjects: (SUBJECT, word, λ) bound to the caption; none: the base model;
        told: an identity given to the base model through its identity code (the oracle; in the harder world
        placed as in the render of `scene`)."""
        import comfy.sample

        positive = self.prompt.encode_prompt(self.models.clip, caption)
        for subject, word, lam in subjects:
            positive = self.prompt.bind_subject(positive, subject.with_lambda(lam), word, 0)
        model = (self.patched if subjects else self.told_identity(caption, told, scene, seed, whole) if told is not None
                 else self.models.patcher)
        latent = torch.zeros(1, 4, self.size // 8, self.size // 8)
        noise = comfy.sample.prepare_noise(latent, seed)
        samples = comfy.sample.sample(model, noise, self.steps, self.cfg, SAMPLER, SCHEDULER, positive, self.negative, latent,
                                      seed=seed, disable_pbar=True)
        return self.models.vae.decode(samples)[0].float().clamp(0, 1).cpu()


def evaluate(domain: str, weights_path: str | Path | None = None, *, n_identities: int = 16, per_identity: int = 1,
             lambdas=(1.0, 2.0, 3.0), other_lambdas=(1.0,), steps: int = STEPS, vision: str | None = None,
             base_dir: str | Path | None = None, keep_images: bool = False, mechanism: str | None = None,
             scales=(1.0,), photos: int = 1, mixing: bool = False, case_set: str = "scenes") -> dict:
    """Per-case scores of every condition: identity similarity (cosine to the reference's embedding; `_other`: to
    the other identity's), identity attributes read back, prompt accuracy; plus the images when keep_images.
    `mechanism` (default: the file's) sweeps its knob: `lambdas` (λ), or `scales` for decoupled CA; `other_lambdas`
    are that knob's values for the other reference. photos > 1: also the own subject from that many reference
    photos (scored against the first); mixing: also the own and the other identity's tokens concatenated.
    case_set: `cases`' "scenes" (random scenes) or "hard" (small, styled subjects)."""
    from .metrics import WorldMetrics

    core = pack_module("nested_core")
    path = weights_path or WEIGHTS[domain]
    weights = core.load_weights(path)
    mechanism = mechanism or mechanism_of(path)
    gen = Generator(vision=vision or vision_of(weights), steps=steps, base_dir=base_dir)
    metrics = WorldMetrics.load()
    word = world.SUBJECT_WORD[domain]
    todo = cases(domain, n_identities, per_identity, case_set=case_set)
    references = torch.stack([reference_photo(c.identity, c.reference_seed) for c in todo])
    others = references.roll(per_identity, dims=0)  # the next identity's photo: a different held-out person/dog
    sweep = knob_settings(mechanism, scales if mechanism == "decoupled" else lambdas)

    def sample(case: Case, subject, setting: tuple) -> torch.Tensor:
        _, lam, options = setting
        gen.use_mechanism(mechanism, **options)
        return gen.image(case.caption, case.seed, [(subject, word, lam)])

    t0 = time.time()
    images: dict[str, list[torch.Tensor]] = {"base": []}
    for i, case in enumerate(todo):
        images["base"].append(gen.image(case.caption, case.seed))
        if gen.codes is not None:
            images.setdefault("oracle", []).append(gen.image(case.caption, case.seed, told=case.identity, scene=case.scene))
            if gen.part_codes:  # what one vector for every query can tell this UNet (global V's form)
                images.setdefault("oracle, one vector", []).append(gen.image(case.caption, case.seed, told=case.identity, whole=True))
        own = gen.encode_subject(weights, references[i : i + 1])
        for setting in sweep:
            images.setdefault(f"{mechanism} {setting[0]}", []).append(sample(case, own, setting))
        other = gen.encode_subject(weights, others[i : i + 1])
        for setting in knob_settings(mechanism, other_lambdas):  # "other reference" alone is the knob at 1
            name = "other reference" if setting[0].endswith("=1") else f"other reference {setting[0]}"
            images.setdefault(name, []).append(sample(case, other, setting))
        extra = {}
        if photos > 1:  # Encode Subject with a batch: the tokens of every photo concatenated
            more = [reference_photo(case.identity, case.reference_seed + k) for k in range(1, photos)]
            extra[f"{photos} photos"] = gen.encode_subject(weights, torch.stack([references[i], *more]))
        if mixing:  # two identities' tokens concatenated (Combine Subjects)
            extra["mix"] = gen.encode_subject(weights, torch.stack([references[i], others[i]]))
        for prefix, subject in extra.items():
            for setting in sweep:
                images.setdefault(f"{prefix} {setting[0]}", []).append(sample(case, subject, setting))
    seconds = time.time() - t0
    scenes = [c.scene for c in todo]
    identities = [c.identity for c in todo]
    scores = {}
    for condition, tiles in images.items():
        batch = torch.stack(tiles)
        scores[condition] = {
            "identity_similarity": metrics.identity_similarity(batch, references, domain=domain).tolist(),
            "identity_similarity_other": metrics.identity_similarity(batch, others, domain=domain).tolist(),
            "identity_attributes": metrics.identity_attribute_accuracy(batch, identities).tolist(),
            "prompt_accuracy": metrics.prompt_accuracy(batch, scenes).tolist(),
            "prompt_fields": {k: v.tolist() for k, v in metrics.prompt_field_accuracy(batch, scenes).items()},
        }
    result = {"domain": domain, "weights": str(path), "mechanism": mechanism, "case_set": case_set, "cases": len(todo), "steps": steps,
              "cfg": gen.cfg, "seconds": seconds, "scores": scores,
              "captions": [c.caption for c in todo]}
    if keep_images:
        result["images"] = {k: torch.stack(v) for k, v in images.items()}
        result["references"] = references
    return result


def mechanism_of(path: str | Path) -> str:
    """The injection mechanism a weights file was trained for (its metadata; files without it are nested)."""
    return pack_module("nested_core").read_config(path)[1].get("mechanism", "nested")


def knob_settings(mechanism: str, values) -> list[tuple[str, float, dict]]:
    """(condition suffix, λ, patch options) per value of the mechanism's inference knob: λ for nested, global V and
    multiple tokens; for decoupled CA, which ignores λ, its output scale (paper Fig. 10)."""
    if mechanism == "decoupled":
        return [(f"scale={v:g}", 1.0, {"scale": float(v)}) for v in values]
    return [(f"λ={v:g}", float(v), {}) for v in values]


# Two subjects: world.pair_caption's scene. Only the pairs world's UNet (baselines.study --world pairs) saw such
# captions; the shipped one learned scenes of one subject.
@dataclass(frozen=True)
class PairCase:
    identities: dict  # domain -> world.Identity
    background: str  # a plain colour, so each half can be scored alone
    seed: int
    reference_seeds: dict  # domain -> seed of its reference photo

    @property
    def caption(self) -> str:
        return world.pair_caption(self.background)


def pair_cases(n_identities: int, seed: int = 0) -> list[PairCase]:
    """The i-th held-out person with the i-th held-out dog, plain backgrounds in turn, fixed seeds."""
    rng = np.random.default_rng([seed, len(world.DOMAINS)])
    colours = list(world.BACKGROUND_COLOURS)
    pairs = zip(*(world.eval_identities(d, n_identities) for d in world.DOMAINS))
    return [PairCase(dict(zip(world.DOMAINS, pair)), colours[i % len(colours)], int(rng.integers(2**31)),
                     {d: int(rng.integers(2**31)) for d in world.DOMAINS}) for i, pair in enumerate(pairs)]


def one_side(images: torch.Tensor, side: str, backgrounds: list[str]) -> torch.Tensor:
    """[N,H,W,3] with the other half painted its background colour: a one-subject image the metrics can read."""
    out, half = images.clone(), images.shape[2] // 2
    other = slice(half, None) if side == "left" else slice(0, half)
    for i, name in enumerate(backgrounds):
        out[i, :, other] = torch.tensor(world.BACKGROUND_COLOURS[name], dtype=out.dtype) / 255
    return out


def evaluate_two_domains(weights_paths: dict, *, n_identities: int = 16, lambdas=(1.0, 2.0, 3.0), scales=(1.0,),
                         steps: int = STEPS, vision: str | None = None, base_dir: str | Path | None = None,
                         mechanism: str | None = None, keep_images: bool = False) -> dict:
    """A person (left) and a dog (right) in one image, each from its own weights file and word, bound together or
    each alone on the same caption and seed. Per domain, on its half (the other painted over): identity similarity
    to its reference, whether the half is read as that domain, prompt accuracy of the half's scene; `_change`: the
    half's mean absolute pixel change from the no-subject image (binding only the other subject should leave it as
    it was: what changes is that subject leaking into this one)."""
    from .metrics import WorldMetrics

    core = pack_module("nested_core")
    weights = {d: core.load_weights(p) for d, p in weights_paths.items()}
    recorded = {mechanism_of(p) for p in weights_paths.values()}
    if mechanism is None and len(recorded) != 1:
        raise ValueError(f"the files were trained for different mechanisms ({sorted(recorded)}): {weights_paths}")
    mechanism = mechanism or recorded.pop()
    gen = Generator(vision=vision or vision_of(*weights.values()), steps=steps, base_dir=base_dir)
    metrics = WorldMetrics.load()
    todo = pair_cases(n_identities)
    references = {d: torch.stack([reference_photo(c.identities[d], c.reference_seeds[d]) for c in todo]) for d in world.DOMAINS}
    t0 = time.time()
    images: dict[str, list[torch.Tensor]] = {"no subject": [], **({"oracle, both": []} if gen.codes is not None else {})}
    for i, case in enumerate(todo):
        images["no subject"].append(gen.image(case.caption, case.seed))
        if gen.codes is not None:  # the base model told both identities, each on its word (whole codes)
            images["oracle, both"].append(gen.image(case.caption, case.seed, told=tuple(case.identities.values()), whole=True))
        subjects = {d: gen.encode_subject(weights[d], references[d][i : i + 1]) for d in world.DOMAINS}
        for suffix, lam, options in knob_settings(mechanism, scales if mechanism == "decoupled" else lambdas):
            gen.use_mechanism(mechanism, **options)
            for name, bound in (("both", world.DOMAINS), *((f"{world.SUBJECT_WORD[d]} alone", (d,)) for d in world.DOMAINS)):
                bindings = [(subjects[d], world.SUBJECT_WORD[d], lam) for d in bound]
                images.setdefault(f"{name} {suffix}", []).append(gen.image(case.caption, case.seed, bindings))
    seconds = time.time() - t0
    backgrounds = [c.background for c in todo]
    scores, unbound = {}, torch.stack(images["no subject"])
    columns = {"left": slice(0, unbound.shape[2] // 2), "right": slice(unbound.shape[2] // 2, None)}
    for condition, tiles in images.items():
        batch, scores[condition] = torch.stack(tiles), {}
        for d, side in world.PAIR_SIDES.items():
            crops = one_side(batch, side, backgrounds)
            scenes = [world.Scene(background=b, position=side, size="small") for b in backgrounds]
            read = metrics.logits(crops)["domain"].argmax(-1) == world.DOMAINS.index(d)
            change = (batch[:, :, columns[side]] - unbound[:, :, columns[side]]).abs().mean(dim=(1, 2, 3))
            scores[condition].update({f"{d}_similarity": metrics.identity_similarity(crops, references[d], domain=d).tolist(),
                                      f"{d}_domain": read.float().tolist(),
                                      f"{d}_prompt": metrics.prompt_accuracy(crops, scenes).tolist(),
                                      f"{d}_change": change.tolist()})
    result = {"weights": {d: str(p) for d, p in weights_paths.items()}, "mechanism": mechanism, "cases": len(todo),
              "steps": steps, "cfg": gen.cfg, "seconds": seconds, "scores": scores, "captions": [c.caption for c in todo]}
    if keep_images:
        result["images"] = {k: torch.stack(v) for k, v in images.items()}
        result["references"] = references
    return result


def bootstrap_ci(values, n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, 2.5 %, 97.5 %) of the mean over cases, resampled."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n, len(values)))].mean(1)
    return float(values.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def summary(result: dict) -> str:
    lines = [f"{result['domain']}: {result['cases']} held-out cases ({result.get('case_set', 'scenes')}), {result['steps']} steps, {result['seconds']:.0f} s of sampling",
             f"{'condition':<18} {'identity sim.':>22} {'id. attributes':>22} {'prompt acc.':>22}"]
    for condition, s in result["scores"].items():
        cells = [bootstrap_ci(s[k]) for k in ("identity_similarity", "identity_attributes", "prompt_accuracy")]
        lines.append(f"{condition:<18} " + " ".join(f"{m:>8.3f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi in cells))
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m miniworld.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--domain", choices=world.DOMAINS, required=True)
    p.add_argument("--weights", help="nested-attention weights (default: the shipped ones for the domain)")
    p.add_argument("--identities", type=int, default=16)
    p.add_argument("--per-identity", type=int, default=1)
    p.add_argument("--cases", choices=CASE_SETS, default="scenes", help="random scenes, or hard ones: small subjects, every one styled")
    p.add_argument("--lambdas", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    p.add_argument("--other-lambdas", type=float, nargs="+", default=[1.0], help="λ (decoupled: scale) of the other-identity condition")
    p.add_argument("--mechanism", choices=("nested", "decoupled", "global_v", "multiple_tokens"),
                   help="how subjects enter cross-attention (default: the one the weights file records; baselines/)")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0], help="decoupled CA's output scale (its knob instead of λ)")
    p.add_argument("--photos", type=int, default=1, help="> 1: also the subject from that many reference photos")
    p.add_argument("--mixing", action="store_true", help="also the own and another identity's tokens concatenated")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--vision", choices=tuple(VISION_FILES), help="the world's ViT (default: the one the weights were trained with)")
    p.add_argument("--base-dir", type=Path, help="folder of the world's base and vision files (default: the shipped ones)")
    p.add_argument("--out", type=Path, help="write the per-case scores as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    result = evaluate(args.domain, args.weights, n_identities=args.identities, per_identity=args.per_identity,
                      lambdas=args.lambdas, other_lambdas=args.other_lambdas, steps=args.steps, vision=args.vision,
                      base_dir=args.base_dir, mechanism=args.mechanism, scales=args.scales, photos=args.photos, mixing=args.mixing, case_set=args.cases)
    print(summary(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
