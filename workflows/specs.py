"""What each shipped workflow is: one graph per job, written once and built twice, on the demo world
(`miniworld_*.json`: the pack's own small models, runs anywhere in seconds) and on SDXL
(`nested_attention_*.json`: public files the frontend offers to download, plus your trained weights).

The template browser shows a custom pack's templates by file name (frontend 1.32: title = the name,
description = the name with `_` as spaces), so the names say what each graph does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .build import ModelFile, Node

SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"
VIT_H = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
SDXL_LORA = "sd_xl_offset_example-lora_1.0.safetensors"
HF = "https://huggingface.co"
SDXL_MODELS = {
    SDXL_CHECKPOINT: ModelFile(f"{HF}/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/{SDXL_CHECKPOINT}", "checkpoints"),
    # the ViT-H/14 image encoder of h94/IP-Adapter, the file ComfyUI users know by this name
    VIT_H: ModelFile(f"{HF}/h94/IP-Adapter/resolve/main/models/image_encoder/model.safetensors", "clip_vision"),
    SDXL_LORA: ModelFile(f"{HF}/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/{SDXL_LORA}", "loras"),
}
SDXL_SOURCES = {  # where each file comes from, for the Note (the Missing Models dialog offers the downloads)
    SDXL_CHECKPOINT: f"models/checkpoints/{SDXL_CHECKPOINT}: huggingface.co/stabilityai/stable-diffusion-xl-base-1.0",
    VIT_H: f"models/clip_vision/{VIT_H}: huggingface.co/h94/IP-Adapter, models/image_encoder/model.safetensors saved under this name",
    SDXL_LORA: f"models/loras/{SDXL_LORA}: the SDXL base repository (or any SDXL LoRA)",
}


@dataclass(frozen=True)
class Base:
    """The models a variant runs on: the demo world or SDXL."""

    prefix: str  # file names start with it
    world: bool
    side: int  # image side in px
    sampler: tuple  # KSampler's seed, steps, cfg, sampler, scheduler, denoise
    weights: dict  # domain -> nested-attention weights file
    photos: dict  # role -> the file Load Image reads from input/
    negative: str
    lam: float  # Attention Scale λ of the one-setting graphs (the λ sweep shows 1, 2, 3)

    def loaders(self) -> list[Node]:
        if self.world:
            return [Node("world", "NestedAttentionMiniWorldLoader", 0, ["trained"])]
        return [Node("checkpoint", "CheckpointLoaderSimple", 0, [SDXL_CHECKPOINT]), Node("vision", "CLIPVisionLoader", 0, [VIT_H])]

    @property
    def model(self):
        return ("world", 0) if self.world else ("checkpoint", 0)

    @property
    def clip(self):
        return ("world", 1) if self.world else ("checkpoint", 1)

    @property
    def vae(self):
        return ("world", 2) if self.world else ("checkpoint", 2)

    @property
    def vision(self):
        return ("world", 3) if self.world else ("vision", 0)


WORLD = Base(
    "miniworld", True, 128, (7, 20, 3.0, "euler", "normal", 1.0),
    {"person": "nested_person.safetensors", "pet": "nested_pet.safetensors"},
    {"person": "miniworld_person.png", "photo_2": "miniworld_person_photo_2.png", "photo_3": "miniworld_person_photo_3.png",
     "person_b": "miniworld_person_b.png", "pet": "miniworld_pet.png"},
    "",
    1.0,  # measured in the world: λ 1 gives the most identity and keeps the prompt (docs/miniworld.md)
)
SDXL = Base(
    "nested_attention", False, 1024, (42, 30, 5.0, "dpmpp_2m", "karras", 1.0),
    {"person": "nested_attention_faces.safetensors", "pet": "nested_attention_pets.safetensors"},
    {"person": "person.png", "photo_2": "person_photo_2.png", "photo_3": "person_photo_3.png", "person_b": "person_b.png", "pet": "dog.png"},
    "blurry, lowres, deformed, bad anatomy, watermark, text",
    2.0,
)


# --- graph pieces ------------------------------------------------------------------------------------------
def head(b: Base, domains=("person",)) -> list[Node]:
    """Column 0: the models and the nested-attention weights."""
    return b.loaders() + [Node(f"{d}_weights" if len(domains) > 1 else "weights", "NestedAttentionLoader", 0, [b.weights[d]]) for d in domains]


def photo(b: Base, name: str, role: str, column: int = 1) -> Node:
    return Node(name, "LoadImage", column, [b.photos[role]])


def encode(b: Base, name: str, image: str, column: int, weights: str = "weights") -> Node:
    return Node(name, "NestedAttentionEncodeSubject", column, [], {"nested_attention": (weights, 0), "clip_vision": b.vision, "image": (image, 0)})


def prompts(b: Base, text: str, column: int, clip=None) -> list[Node]:
    clip = clip or b.clip
    return [Node("prompt", "NestedAttentionEncodePrompt", column, [text], {"clip": clip}, height=120),
            Node("negative", "CLIPTextEncode", column, [b.negative], {"clip": clip}, title="Negative prompt", height=100)]


def bind(name: str, word: str, conditioning: str, subject: str, column: int, occurrence: int = 0, mask: str | None = None, title=None) -> Node:
    inputs = {"conditioning": (conditioning, 0), "subject": (subject, 0)}
    if mask:
        inputs["mask"] = (mask, 0)
    return Node(name, "NestedAttentionBindToken", column, [word, occurrence], inputs, title=title)


def apply_and_latent(b: Base, column: int, model=None) -> list[Node]:
    return [Node("apply", "NestedAttentionApply", column, [0.0, 1.0], {"model": model or b.model}),
            Node("latent", "EmptyLatentImage", column, [b.side, b.side, 1])]


def sample(b: Base, positive: str, column: int, prefix: str, name: str = "sampler", save: bool = True) -> list[Node]:
    """KSampler, VAE Decode and Save Image under each other."""
    nodes = [Node(name, "KSampler", column, list(b.sampler),
                  {"model": ("apply", 0), "positive": (positive, 0), "negative": ("negative", 0), "latent_image": ("latent", 0)})]
    if save:
        nodes += [Node("decode", "VAEDecode", column, [], {"samples": (name, 0), "vae": b.vae}),
                  Node("save", "SaveImage", column, [prefix], {"images": ("decode", 0)})]
    return nodes


# --- the jobs ---------------------------------------------------------------------------------------------------
def single_subject(b: Base, text: str, word: str = "person", lam: float | None = None) -> list[Node]:
    return head(b) + [
        photo(b, "photo", "person"),
        encode(b, "subject", "photo", 2),
        Node("lam", "NestedAttentionScale", 2, [b.lam if lam is None else lam], {"subject": ("subject", 0)}),
        *prompts(b, text, 2),
        bind("bind", word, "prompt", "lam", 3),
        *apply_and_latent(b, 3),
        *sample(b, "bind", 4, b.prefix),
    ]


def lambda_sweep(b: Base, text: str, lambdas=(1.0, 2.0, 3.0)) -> list[Node]:
    nodes = head(b) + [photo(b, "photo", "person"), encode(b, "subject", "photo", 1), *prompts(b, text, 1), *apply_and_latent(b, 2)]
    for i, lam in enumerate(lambdas):
        nodes += [Node(f"lam{i}", "NestedAttentionScale", 2, [lam], {"subject": ("subject", 0)}, title=f"Attention Scale λ = {lam:g}"),
                  bind(f"bind{i}", "person", "prompt", f"lam{i}", 3, title=f"Bind Token (λ = {lam:g})"),
                  *sample(b, f"bind{i}", 4, b.prefix, name=f"sampler{i}", save=False)]
    nodes += [Node("batch01", "LatentBatch", 5, [], {"samples1": ("sampler0", 0), "samples2": ("sampler1", 0)}),
              Node("batch", "LatentBatch", 5, [], {"samples1": ("batch01", 0), "samples2": ("sampler2", 0)}),
              Node("decode", "VAEDecode", 5, [], {"samples": ("batch", 0), "vae": b.vae}),
              Node("save", "SaveImage", 5, [f"{b.prefix}_lambda"], {"images": ("decode", 0)})]
    return nodes


def reference_photos(b: Base, text: str) -> list[Node]:
    return head(b) + [
        photo(b, "photo1", "person"), photo(b, "photo2", "photo_2"), photo(b, "photo3", "photo_3", column=2),
        Node("batch12", "ImageBatch", 2, [], {"image1": ("photo1", 0), "image2": ("photo2", 0)}),
        Node("photos", "ImageBatch", 2, [], {"image1": ("batch12", 0), "image2": ("photo3", 0)}),
        encode(b, "subject", "photos", 2),
        Node("lam", "NestedAttentionScale", 3, [b.lam], {"subject": ("subject", 0)}),
        *prompts(b, text, 3),
        bind("bind", "person", "prompt", "lam", 4),
        *apply_and_latent(b, 4),
        *sample(b, "bind", 5, f"{b.prefix}_photos"),
    ]


def identity_mixing(b: Base, text: str) -> list[Node]:
    return head(b) + [
        photo(b, "photo_a", "person"), photo(b, "photo_b", "person_b"),
        encode(b, "subject_a", "photo_a", 2), encode(b, "subject_b", "photo_b", 2),
        Node("mix", "NestedAttentionCombineSubjects", 2, [], {"subject_a": ("subject_a", 0), "subject_b": ("subject_b", 0)}),
        Node("lam", "NestedAttentionScale", 2, [b.lam], {"subject": ("mix", 0)}),
        *prompts(b, text, 3),
        bind("bind", "person", "prompt", "lam", 3),
        *apply_and_latent(b, 4),
        *sample(b, "bind", 5, f"{b.prefix}_mix"),
    ]


def two_domains(b: Base, text: str) -> list[Node]:
    return head(b, ("person", "pet")) + [
        photo(b, "person_photo", "person"), photo(b, "pet_photo", "pet"),
        encode(b, "person", "person_photo", 2, "person_weights"), encode(b, "pet", "pet_photo", 2, "pet_weights"),
        *prompts(b, text, 2),
        bind("bind_person", "person", "prompt", "person", 3, title="Bind Token (person)"),
        bind("bind_pet", "dog", "bind_person", "pet", 3, title="Bind Token (dog)"),
        *apply_and_latent(b, 3),
        *sample(b, "bind_pet", 4, f"{b.prefix}_person_and_pet" if b.world else b.prefix),
    ]


def with_model_patch(b: Base, text: str) -> list[Node]:
    """A LoRA (SDXL) or FreeU (the world has no LoRA file) before Apply Nested Attention: the nested patch chains onto it."""
    if b.world:
        patch = [Node("patch", "FreeU_V2", 1, [1.3, 1.4, 0.9, 0.2], {"model": b.model})]
        model, clip = ("patch", 0), b.clip
    else:
        patch = [Node("patch", "LoraLoader", 1, [SDXL_LORA, 1.0, 1.0], {"model": b.model, "clip": b.clip})]
        model, clip = ("patch", 0), ("patch", 1)
    return head(b) + [
        photo(b, "photo", "person"), *patch,
        encode(b, "subject", "photo", 2),
        Node("lam", "NestedAttentionScale", 2, [b.lam], {"subject": ("subject", 0)}),
        *prompts(b, text, 2, clip=clip),
        bind("bind", "person", "prompt", "lam", 3),
        *apply_and_latent(b, 3, model=model),
        *sample(b, "bind", 4, f"{b.prefix}_patched"),
    ]


def regional_masks(b: Base, text: str) -> list[Node]:
    """Two people on one prompt, each bound to its own occurrence of 'person' and kept to its half of the image."""
    half = b.side // 2
    return head(b) + [
        photo(b, "photo_a", "person"), photo(b, "photo_b", "person_b"),
        encode(b, "subject_a", "photo_a", 2), encode(b, "subject_b", "photo_b", 2),
        *prompts(b, text, 2),
        Node("blank", "SolidMask", 3, [0.0, b.side, b.side], title="Mask: empty"),
        Node("half", "SolidMask", 3, [1.0, half, b.side], title="Mask: half width"),
        Node("left", "MaskComposite", 3, [0, 0, "add"], {"destination": ("blank", 0), "source": ("half", 0)}, title="Mask: left half"),
        Node("right", "MaskComposite", 3, [half, 0, "add"], {"destination": ("blank", 0), "source": ("half", 0)}, title="Mask: right half"),
        bind("bind_a", "person", "prompt", "subject_a", 4, occurrence=1, mask="left", title="Bind Token (1st person, left)"),
        bind("bind_b", "person", "bind_a", "subject_b", 4, occurrence=2, mask="right", title="Bind Token (2nd person, right)"),
        *apply_and_latent(b, 4),
        *sample(b, "bind_b", 5, f"{b.prefix}_regions"),
    ]


# --- notes ------------------------------------------------------------------------------------------------------------
def note(b: Base, what: str, nodes: list[Node], how: str, thumbnail: str) -> str:
    """The Note: what the graph does, every file it reads and where that file comes from, how to use it."""
    def values(kind):
        return list(dict.fromkeys(v for n in nodes if n.type == kind for v in n.widgets[:1]))

    weights, photos = ", ".join(values("NestedAttentionLoader")), ", ".join(values("LoadImage"))
    if b.world:
        files = ["Load Mini World: miniworld/weights/base.safetensors + vision_trained.safetensors (shipped in this pack)",
                 f"nested_attention: {weights} (shipped: miniworld/weights/nested/; remade by `python -m miniworld.retrain nested`)",
                 f"input/: {photos}: held-out subjects of the world; `python -m workflows.world_inputs --out <ComfyUI>/input` "
                 "in the pack's folder writes them"]
        where = "Demo world: the pack's own small models (128 px, seconds on a CPU); how well it personalises: README, 'Measured: it personalises'."
    else:
        loaders = [v for n in nodes for v in n.widgets[:1] if isinstance(v, str) and v in SDXL_SOURCES]
        files = [SDXL_SOURCES[v] for v in dict.fromkeys(loaders)]
        files += [f"models/nested_attention/: {weights}: your weights, from `python -m training.train` (training/README.md); "
                  "none published yet",
                  f"input/: {photos}: your photos (Load Image: upload)"]
        where = "SDXL, 1024 px."
    listed = "\n".join(f"- {f}" for f in files)
    return f"{what}\n{where}\n\nFiles:\n{listed}\n\n{how}\nThumbnail: {thumbnail}"


@dataclass(frozen=True)
class Spec:
    base: Base
    graph: Callable[..., list[Node]]
    args: tuple
    what: str
    how: str
    labels: tuple = ()  # a caption per saved image, for the thumbnail
    twin: str | None = None  # an SDXL workflow's world variant: its output is the SDXL thumbnail
    models: dict = field(default_factory=dict)

    def nodes(self) -> list[Node]:
        return self.graph(self.base, *self.args)

    @property
    def note(self) -> str:
        thumbnail = (f"{self.twin.removesuffix('.json')} run on the demo world, not an SDXL result."
                     if self.twin else "this graph's output (`python -m workflows.build --thumbnails`).")
        return note(self.base, self.what, self.nodes(), self.how, thumbnail)


KEEP_WORD = "Keep the bound word in the prompt; raise λ for identity, lower it for prompt freedom."
JOBS = {  # job -> (graph, world args, SDXL args, what, how, thumbnail labels); names: <prefix>_<job>.json
    "single_subject": (single_subject,
                       ("a photo of a large person wearing a hat on a blue background, on the left",),
                       ("a photo of a person hiking in the mountains at sunset, detailed, 35mm", "person", 1.5),
                       "Nested Attention, one subject: the person of the photo, bound to the word 'person' of the prompt.",
                       KEEP_WORD, ()),
    "lambda_sweep": (lambda_sweep,
                     ("an outline drawing of a large person on a striped background, in the center",),
                     ("a watercolor painting of a person reading in a cozy cafe",),
                     "λ sweep (identity ↔ prompt): one subject, one prompt, one seed, at λ 1, 2 and 3.",
                     "Higher λ gives the subject's word more attention: more identity, less of the prompt. The paper sweeps 1–4.",
                     ("lambda 1", "lambda 2", "lambda 3")),  # the thumbnail's font has no Greek
    "reference_photos": (reference_photos,
                         ("a grayscale photo of a large person on a yellow background, on the right",),
                         ("a photo of a person wearing a space suit on the moon, detailed, 35mm",),
                         "Several reference photos of one subject: Image Batch → Encode Subject concatenates their tokens.",
                         "More photos of the same subject give a more robust identity; add photos with more Image Batch nodes.", ()),
    "identity_mixing": (identity_mixing,
                        ("a photo of a large person on a purple background, in the center",),
                        ("a portrait photo of a person in a studio, soft light, 85mm",),
                        "Identity mixing: two people's tokens concatenated (Combine Subjects) into one subject.",
                        "Both subjects must come from the same Load Nested Attention; set λ after combining.", ()),
    "semantic_variation": (single_subject,
                           ("a photo of a large dog on a yellow background, in the center", "dog"),
                           ("a photo of a child playing in a park, detailed, 35mm", "child", 1.5),
                           "Semantic variation: the person's subject bound to another word of the prompt "
                           "(SDXL: 'child'; the demo world knows only 'person' and 'dog', so there: 'dog').",
                           "Bind Token takes any single-token word of the prompt; the subject's features follow that word.", ()),
    "with_model_patch": (with_model_patch,
                         ("a photo of a large person upside down on a red background, in the center",),
                         ("a photo of a person walking in a dark alley at night, neon lights, detailed",),
                         "Nested Attention on a patched model: a LoRA (SDXL; FreeU in the demo world, which has no LoRA) "
                         "before Apply Nested Attention.",
                         "Patch first, Apply Nested Attention last: the nested term chains onto other attention patches.", ()),
    "regional_masks": (regional_masks,
                       ("a photo of a small person on the left and a small person on the right, on a green background",),
                       ("a photo of a person on the left and a person on the right shaking hands in an office, detailed, 35mm",),
                       "Regional masks: two people on one prompt, each bound to its own 'person' (occurrence 1 and 2) "
                       "and kept to its half of the image by Bind Token's mask.",
                       "Masks: white = the subject may appear there; give them the image's aspect ratio.", ()),
}
TWO_DOMAINS = ("a photo of a small person and a small dog on a green background, in the center",
               "a photo of a person and a dog sitting together on a sofa in a sunlit living room, detailed, 35mm",
               "Two subjects of two domains, from two weights files: a person bound to 'person' and a dog bound to "
               "'dog', chained Bind Tokens on one prompt.",
               "The prompt must contain both bound words.")
NAMES = {  # the two files that shipped first keep their names (the demo, the README and tests use them)
    ("miniworld", "two_domains"): "miniworld_person_and_pet.json",
    ("nested_attention", "two_domains"): "nested_attention_two_subjects.json",
    ("miniworld", "with_model_patch"): "miniworld_with_freeu.json",
    ("nested_attention", "with_model_patch"): "nested_attention_with_lora.json",
}


def _specs() -> dict[str, Spec]:
    jobs = dict(JOBS)
    jobs["two_domains"] = (two_domains, (TWO_DOMAINS[0],), (TWO_DOMAINS[1],), TWO_DOMAINS[2], TWO_DOMAINS[3], ())
    specs = {}
    for job, (graph, world_args, sdxl_args, what, how, labels) in jobs.items():
        world_name = NAMES.get(("miniworld", job), f"miniworld_{job}.json")
        sdxl_name = NAMES.get(("nested_attention", job), f"nested_attention_{job}.json")
        specs[world_name] = Spec(WORLD, graph, world_args, what, how, labels)
        specs[sdxl_name] = Spec(SDXL, graph, sdxl_args, what, how, labels, twin=world_name, models=SDXL_MODELS)
    return specs


WORKFLOWS: dict[str, Spec] = _specs()
