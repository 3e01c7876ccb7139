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
- `Sample.steps/guidance` of a recipe whose model is Z-Image-Turbo (`TURBO_MODELS`): `TURBO_SAMPLE`
  (few steps, no CFG: the distilled model's own settings) unless the recipe gives them.
- `Validation.every = None`: with every scheduled checkpoint (`save.checkpoint_frequency`) and the last step.

No MLX / numpy here: `zrecipe plan` and `--help` import this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
CAPTION_KINDS = ("sidecar", "manifest", "filename", "inline", "template")
TEMPLATE_FIELDS = ("trigger", "caption", "filename")
MANIFEST_SUFFIXES = (".jsonl", ".csv")
SIGMA_SAMPLINGS = ("shifted", "uniform", "logit_normal")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
QUANTIZE_BITS = (4, 8)
OPTIMIZERS = ("AdamW",)
SCHEDULES = ("constant", "cosine")
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
class CaptionSource:
    """Where a dataset's captions come from.

    kind: `sidecar` (`<image stem><extension>` next to each image), `manifest` (`file`: a .jsonl or .csv
    with `file`/`image` and `caption`/`prompt` columns), `filename` (the image's stem), `inline` (`items`:
    (image path relative to the dataset folder, caption) pairs), or `template` (`template` formatted with
    `{trigger}`, `{caption}` = the sidecar caption read with `extension`, and `{filename}` = image stem;
    a template without `{caption}` needs no caption files).
    """

    kind: Literal["sidecar", "manifest", "filename", "inline", "template"] = "sidecar"
    file: Path | None = None
    items: tuple[tuple[str, str], ...] = ()
    template: str | None = None
    extension: str = ".txt"


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
class TrainingLoop:
    """How long and how to train. At least one of `num_epochs` / `max_steps`; with both, training stops at
    whichever comes first. `shift=None`: the model's scheduler shift. `max_grad_norm=None`: no clipping.
    `assistant_lora`: a LoRA fused into the base while training (Z-Image-Turbo's de-distillation adapter)
    and left out of samples and exports."""

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
    assistant_lora: str | None = None  # an absolute .safetensors path or `org/repo[:file]`


@dataclass(frozen=True)
class Optimizer:
    """AdamW with an optional linear warm-up then a constant or cosine (down to `min_learning_rate`)
    schedule."""

    name: Literal["AdamW"] = "AdamW"
    learning_rate: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    min_learning_rate: float = 0.0


@dataclass(frozen=True)
class LoraTarget:
    """LoRA on `layer_types` of blocks `start <= i < end` of `block_type` (`end=None`: to the last)."""

    block_type: Literal["layers", "noise_refiner", "context_refiner"]
    start: int = 0
    end: int | None = None
    layer_types: tuple[str, ...] = DEFAULT_LORA_LAYER_TYPES
    rank: int = DEFAULT_LORA_RANK
    alpha: float = float(DEFAULT_LORA_RANK)


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
