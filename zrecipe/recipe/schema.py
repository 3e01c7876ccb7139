"""Recipe objects: frozen dataclasses, the known names, and the ONE place where defaults live.

Every default a recipe can omit is a dataclass field default or a `DEFAULT_*` constant below; the loader
never spells a default itself. A few defaults are derived from other values, and are documented here:

- `Dataset.name`: the dataset folder's name.
- `LoraTarget.alpha`: the target's rank (scale 1.0).
- `LoraTarget.end = None`: through the last block of that type (the model's config decides how many).
- `Save.output_path`: `<recipe folder>/DEFAULT_OUTPUT_DIR/<recipe file stem>`.
- `Export.output_path`: `<save.output_path>/DEFAULT_EXPORT_SUBDIR`.
- `Sample.seeds`: `(recipe seed,)`; `Sample.steps/guidance/width/height`: the seed format's top-level
  `steps`, `guidance`, `width`, `height` when given, else the field defaults.
- a dataset made from the seed's `examples:` gets `resolution = max(width, height)` when those are given.
- mode `lora` with neither `lora_layers` nor `lora`: `DEFAULT_LORA_LAYER_TYPES` on every block of
  `layers` at rank `DEFAULT_LORA_RANK`.
- `Optimizer`: the field defaults are AdamW's; `OPTIMIZER_DEFAULTS[name]` lists where another optimiser's
  default differs (Prodigy's learning_rate 1.0, Lion's betas, ...).
- `Sample.steps/guidance` of a recipe whose model is Z-Image-Turbo (`TURBO_MODELS`): `TURBO_SAMPLE`
  (few steps, no CFG: the distilled model's own settings) unless the recipe gives them.
- `Validation.every = None`: with every scheduled checkpoint (`save.checkpoint_frequency`) and the last step.

No MLX / numpy here: `zrecipe plan` and `--help` import this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

# The model family's names (block and layer types, size step) live with the model, re-exported here.
from zrecipe.models.z_image.vocabulary import (  # noqa: F401
    BLOCK_LAYER_TYPES,
    BLOCK_TYPES,
    BUCKET_STEP,
    LAYER_TYPE_GROUPS,
    LAYER_TYPES,
)

# Names the recipe language knows (not defaults: the closed sets values are checked against).
MODEL_PRESETS = ("z-image", "z-image-turbo", "tiny")
MODES = ("lora", "full")
# Adapter kinds a LoRA target can train (zrecipe.lora: LoRA, DoRA, LyCORIS LoKr and LoHa), and the target
# fields only LoKr reads.
LORA_KINDS = ("lora", "dora", "lokr", "loha")
LOKR_OPTIONS = ("factor", "decompose_both", "full_matrix")
CAPTION_KINDS = ("sidecar", "manifest", "filename", "inline", "template")
# `captions: {generate: ...}`: a vision-language model captions the images; human captions of these kinds
# mix in (`prefer`).
GENERATE_HUMAN_KINDS = ("sidecar", "manifest", "inline")
CAPTION_PREFER = ("sidecar", "generated")
CAPTION_MODEL_PRESETS = ("tiny-vlm",)
MAX_CAPTION_TOKENS = 1024
TEMPLATE_FIELDS = ("trigger", "caption", "filename")
MANIFEST_SUFFIXES = (".jsonl", ".csv")
SIGMA_SAMPLINGS = ("shifted", "uniform", "logit_normal")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
QUANTIZE_BITS = (4, 8)
OPTIMIZERS = ("AdamW", "AdamW8bit", "Lion", "SGD", "Adafactor", "Prodigy")
# constant / cosine: zrecipe's warm-up lr·(s+1)/(W+1); the other three: transformers' get_scheduler.
SCHEDULES = ("constant", "cosine", "constant_with_warmup", "linear", "cosine_with_restarts")
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap", "logit_normal")
ON_ERROR = ("fail", "skip")
EXPORT_FORMATS = ("mflux", "comfyui", "diffusers", "kohya", "musubi")
EXPORT_DTYPES = ("bfloat16", "float32")

# Limits of sensible values (beyond them a value is a typo, not a choice).
MIN_RESOLUTION = 64
MAX_SIDE = 8192
MAX_SEED = 2**64 - 1  # MLX seeds are uint64
MAX_LOSS_WEIGHT = 1000.0

# Derived-default constants (see the module docstring).
DEFAULT_LORA_RANK = 16
DEFAULT_LORA_LAYER_TYPES = LAYER_TYPES[:4]
DEFAULT_LORA_BLOCK_TYPE = "layers"
DEFAULT_OUTPUT_DIR = "output"
DEFAULT_EXPORT_SUBDIR = "exports"
DEFAULT_MODE = "lora"
DEFAULT_SEED = 0
MASK_SOURCES = ("alpha", "folder")
# Z-Image-Turbo (the preset and its repo id): sampled in few steps without CFG, as its model card and
# mflux do; its scheduler_config.json gives the shift (3.0), read from the model like every model's.
TURBO_MODELS = ("z-image-turbo", "Tongyi-MAI/Z-Image-Turbo")
TURBO_SAMPLE = {"steps": 9, "guidance": 0.0}


@dataclass(frozen=True)
class GeneratedCaptions:
    """`captions: {generate: {...}}`: a vision-language model captions each image, with greedy decoding.

    model: `tiny-vlm`, a Hugging Face repo id or an absolute model folder. The caption of an image is a
    function of (image content, the model files' content, prompt, max_tokens, repetition_penalty)."""

    model: str
    prompt: str = "Describe this image in one sentence: the subject, the setting and the style."
    max_tokens: int = 96
    repetition_penalty: float | None = None


@dataclass(frozen=True)
class CaptionSource:
    """Where a dataset's captions come from.

    kind: `sidecar` (`<image stem><extension>` next to each image), `manifest` (`file`: a .jsonl or .csv
    with `file`/`image` and `caption`/`prompt` columns), `filename` (the image's stem), `inline` (`items`:
    (image path relative to the dataset folder, caption) pairs), or `template` (`template` formatted with
    `{trigger}`, `{caption}` = the sidecar caption read with `extension`, and `{filename}` = image stem;
    a template without `{caption}` needs no caption files).

    kind `generate`: `generate` captions the images; human captions come from `human` (`sidecar` with
    `extension`, `manifest` with `file`, `inline` with `items`) and win when present under `prefer:
    sidecar`, lose under `prefer: generated` — except an edited sidecar that `zrecipe caption
    --write-sidecars` wrote, which always wins. `template` (optional) formats every caption.
    """

    kind: Literal["sidecar", "manifest", "filename", "inline", "template", "generate"] = "sidecar"
    file: Path | None = None
    items: tuple[tuple[str, str], ...] = ()
    template: str | None = None
    extension: str = ".txt"
    generate: GeneratedCaptions | None = None
    prefer: Literal["sidecar", "generated"] = "sidecar"
    human: Literal["sidecar", "manifest", "inline"] = "sidecar"


@dataclass(frozen=True)
class Bucketing:
    """Aspect-ratio bucketing: buckets derived from `resolution` up to `max_aspect`, sides multiples of
    `step`. Disabled: every image is centre-cropped to a `resolution` square."""

    enabled: bool = True
    max_aspect: float = 2.0
    step: int = BUCKET_STEP


@dataclass(frozen=True)
class Masks:
    """Where a dataset's loss masks come from: `alpha` (each image's alpha channel) or `folder` (a
    greyscale image per training image, same relative path and stem, any image extension). White = learn,
    black = ignore; `unmasked_weight` is the floor every mask value is raised to (0: masked-out regions
    are not learned at all)."""

    source: Literal["alpha", "folder"]
    folder: Path | None = None
    unmasked_weight: float = 0.0


@dataclass(frozen=True)
class Dataset:
    """One folder of images. `trigger` is added by the caption step (`"<trigger>, <caption>"` unless the
    caption already contains it; templates can place `{trigger}`). `repeats` = times each image is seen
    per epoch. `loss_weight` multiplies its items' losses; `masks` restricts them to masked regions."""

    name: str
    path: Path
    captions: CaptionSource = field(default_factory=CaptionSource)
    repeats: int = 1
    resolution: int = 1024
    bucketing: Bucketing = field(default_factory=Bucketing)
    upscale: bool = False
    recursive: bool = False
    trigger: str | None = None
    caption_dropout: float = 0.0
    on_error: Literal["fail", "skip"] = "fail"
    loss_weight: float = 1.0
    masks: Masks | None = None


@dataclass(frozen=True)
class Ema:
    """An exponential moving average of the trained weights: until `start_step` it is a copy of them, then
    every `every` steps shadow ← decay·shadow + (1 − decay)·weights."""

    decay: float = 0.999
    start_step: int = 0
    every: int = 1


@dataclass(frozen=True)
class TrainingLoop:
    """How long and how to train. At least one of `num_epochs` / `max_steps`; with both, training stops at
    whichever comes first. `shift=None`: the model's scheduler shift. `max_grad_norm=None`: no clipping.
    `loss_weighting`: a per-item weight of the loss by σ (SD3's schemes); `noise_offset`: diffusers'
    offset noise; `ema=None`: no moving average; `tensorboard`: event files beside loss.json;
    `assistant_lora`: a LoRA fused into the base while training (Z-Image-Turbo's de-distillation adapter)
    and left out of samples and exports; `start_from`: the trained LoRA starts from this file's weights
    (a LoRA of any common convention) or continues another tool's run (an mflux training checkpoint zip:
    its adapter, AdamW state and step) instead of B = 0."""

    num_epochs: int | None = None
    max_steps: int | None = None
    batch_size: int | Literal["auto"] = 1
    gradient_accumulation_steps: int = 1
    sigma_sampling: Literal["shifted", "uniform", "logit_normal"] = "shifted"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float | None = None
    gradient_checkpointing: bool = False
    compute_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    max_grad_norm: float | None = 1.0
    low_ram: bool = False
    quantize: int | None = None
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap", "logit_normal"] = "none"
    noise_offset: float = 0.0
    ema: Ema | None = None
    tensorboard: bool = False
    assistant_lora: str | None = None  # an absolute .safetensors path or `org/repo[:file]`
    start_from: str | None = None  # an absolute path: a LoRA file or another tool's checkpoint zip (mflux)


@dataclass(frozen=True)
class Optimizer:
    """The optimiser, its hyper-parameters and the learning-rate schedule (optional linear warm-up).

    Which fields an optimiser reads: `OPTIMIZER_KEYS` (the others keep their defaults and are not part of
    the resolved recipe). `num_cycles` is read by the `cosine_with_restarts` schedule only."""

    name: Literal["AdamW", "AdamW8bit", "Lion", "SGD", "Adafactor", "Prodigy"] = "AdamW"
    learning_rate: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine", "constant_with_warmup", "linear", "cosine_with_restarts"] = (
        "constant"
    )
    min_learning_rate: float = 0.0
    num_cycles: int = 1  # cosine_with_restarts
    momentum: float = 0.9  # SGD
    nesterov: bool = False  # SGD
    min_8bit_size: int = 4096  # AdamW8bit: smaller tensors keep fp32 moments (bitsandbytes' default)
    beta1: float | None = None  # Adafactor's first moment (None: none kept)
    eps_scale: float = 1e-3  # Adafactor's ε2 (parameter scale floor); `eps` is its ε1
    clip_threshold: float = 1.0  # Adafactor
    decay_rate: float = -0.8  # Adafactor
    relative_step: bool = False  # Adafactor: its own step size min(1e-2, 1/√t) instead of learning_rate
    scale_parameter: bool = False  # Adafactor
    warmup_init: bool = False  # Adafactor (needs relative_step)
    beta3: float | None = None  # Prodigy (None: √β2)
    d0: float = 1e-6  # Prodigy's initial step-size estimate
    d_coef: float = 1.0  # Prodigy
    growth_rate: float | None = None  # Prodigy (None: unbounded)
    use_bias_correction: bool = False  # Prodigy
    safeguard_warmup: bool = False  # Prodigy


# Where an optimiser's default differs from the field default (AdamW's).
OPTIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {
    "AdamW": {},
    "AdamW8bit": {},
    "Lion": {"betas": (0.9, 0.99), "weight_decay": 0.0},
    "SGD": {"weight_decay": 0.0},
    "Adafactor": {"weight_decay": 0.0, "eps": 1e-30},
    "Prodigy": {"learning_rate": 1.0, "weight_decay": 0.0},
}
# The learning-rate keys every optimiser reads, then each optimiser's hyper-parameters.
SCHEDULE_KEYS = ("learning_rate", "warmup_steps", "schedule", "min_learning_rate")
OPTIMIZER_KEYS: dict[str, tuple[str, ...]] = {
    "AdamW": ("betas", "weight_decay", "eps"),
    "AdamW8bit": ("betas", "weight_decay", "eps", "min_8bit_size"),
    "Lion": ("betas", "weight_decay"),
    "SGD": ("momentum", "nesterov", "weight_decay"),
    "Adafactor": (
        "eps",
        "eps_scale",
        "clip_threshold",
        "decay_rate",
        "beta1",
        "weight_decay",
        "relative_step",
        "scale_parameter",
        "warmup_init",
    ),  # fmt: skip
    "Prodigy": (
        "betas",
        "beta3",
        "eps",
        "weight_decay",
        "d0",
        "d_coef",
        "growth_rate",
        "use_bias_correction",
        "safeguard_warmup",
    ),  # fmt: skip
}


def optimizer_fields(name: str, schedule: str, relative_step: bool = False) -> tuple[str, ...]:
    """The `optimizer:` keys that apply to optimiser `name` with `schedule`, in field order (what the
    resolved recipe lists). Adafactor's `relative_step` replaces the learning rate and its schedule."""
    relative = name == "Adafactor" and relative_step
    wanted = {"name", *(() if relative else SCHEDULE_KEYS), *OPTIMIZER_KEYS[name]}
    if schedule == "cosine_with_restarts" and not relative:
        wanted.add("num_cycles")
    return tuple(f.name for f in fields(Optimizer) if f.name in wanted)


@dataclass(frozen=True)
class LoraTarget:
    """An adapter of `kind` on `layer_types` of blocks `start <= i < end` of `block_type` (`end=None`: to
    the last). `dropout`: LoRA dropout on the adapter path's input (training only). LoKr only, defaults
    as LyCORIS': `factor` (-1: the factors nearest the square root), `decompose_both` (W1 low-rank too),
    `full_matrix` (W2 a full matrix whatever the rank)."""

    block_type: Literal["layers", "noise_refiner", "context_refiner"]
    start: int = 0
    end: int | None = None
    layer_types: tuple[str, ...] = DEFAULT_LORA_LAYER_TYPES
    rank: int = DEFAULT_LORA_RANK
    alpha: float = float(DEFAULT_LORA_RANK)
    kind: Literal["lora", "dora", "lokr", "loha"] = "lora"
    dropout: float = 0.0
    factor: int = -1
    decompose_both: bool = False
    full_matrix: bool = False


@dataclass(frozen=True)
class LoraSpec:
    """Every LoRA target of a run (targets never overlap)."""

    targets: tuple[LoraTarget, ...]


@dataclass(frozen=True)
class FullFinetune:
    """Full fine-tuning trains the transformer; the VAE and text encoder stay frozen."""

    train_transformer: bool = True
    train_vae: bool = False
    train_text_encoder: bool = False


@dataclass(frozen=True)
class Save:
    """Checkpoint every `checkpoint_frequency` steps (and at the end) into `output_path/checkpoints/`;
    `keep_last=None` keeps all of them."""

    output_path: Path
    checkpoint_frequency: int = 500
    keep_last: int | None = None


@dataclass(frozen=True)
class Sample:
    """Sample images rendered for checkpoints. `every=None`: for every saved checkpoint and the final
    adapter; `every=N`: for checkpoints whose step is a multiple of N, and the final adapter."""

    prompts: tuple[str, ...] = ()
    negative_prompt: str = ""
    guidance: float = 3.5
    steps: int = 50
    width: int = 1024
    height: int = 1024
    seeds: tuple[int, ...] = (DEFAULT_SEED,)
    every: int | None = None
    cfg_normalization: bool = False
    cfg_truncation: float = 1.0
    use_ema: bool = False  # sample the EMA weights (training_loop.ema) instead of the trained ones


@dataclass(frozen=True)
class Validation:
    """Held-out items and the validation loss measured on them. Exactly one of `fraction` (each image is
    held out when a hash of its content falls below it, so adding images never moves another image) and
    `dataset` (a dataset used for validation only). The loss is the training objective at each of
    `sigmas` with noise fixed by (`seed`, item, σ), every `every` steps (None: with every checkpoint)."""

    fraction: float | None = None
    dataset: str | None = None
    sigmas: tuple[float, ...] = (0.25, 0.5, 0.75)
    seed: int = DEFAULT_SEED
    every: int | None = None


@dataclass(frozen=True)
class Export:
    """Export formats written to `output_path` after training (none by default)."""

    output_path: Path
    formats: tuple[Literal["mflux", "comfyui", "diffusers", "kohya", "musubi"], ...] = ()
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    use_ema: bool = False  # export the EMA weights (training_loop.ema) instead of the trained ones


@dataclass(frozen=True)
class Recipe:
    """A validated recipe. `source` is the recipe file, `root` the folder its relative paths resolve
    against. `lora` is None in full mode; `sample` is None when the recipe asks for no sampling settings."""

    source: Path
    root: Path
    model: str
    mode: Literal["lora", "full"]
    seed: int
    datasets: tuple[Dataset, ...]
    training_loop: TrainingLoop
    optimizer: Optimizer
    lora: LoraSpec | None
    full_finetune: FullFinetune
    save: Save
    sample: Sample | None
    export: Export
    cache: Path | None = None
    validation: Validation | None = None

    @classmethod
    def from_dict(cls, data: Any, source: str | Path | None = None) -> Recipe:
        """Validate an already-parsed recipe (a dict from YAML/JSON). Relative paths resolve against
        `source`'s folder (the current folder when None). Raises `RecipeError` listing every problem."""
        from zrecipe.recipe.loader import build_recipe

        return build_recipe(data, source=source)

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as JSON-able data (defaults filled, paths absolute); `from_dict` of it with
        the same `source` gives an equal Recipe."""
        from zrecipe.recipe.serialize import recipe_to_dict

        return recipe_to_dict(self)
