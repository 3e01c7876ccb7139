"""The run-level sections: training_loop, optimizer, full_finetune, save, sample, validation, export.

Each reader takes the top-level Reader and returns the section's object (built from the present, valid
keys; the dataclass supplies every default) after recording any problem in the Context.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from zrecipe.recipe.fields import (
    MISSING,
    Bad,
    Reader,
    Spec,
    boolean,
    describe,
    integer,
    list_of,
    number,
    resolve_path,
    suggest,
    text,
)
from zrecipe.recipe.schema import (
    BUCKET_STEP,
    COMPUTE_DTYPES,
    DEFAULT_EXPORT_SUBDIR,
    DEFAULT_OUTPUT_DIR,
    EXPORT_DTYPES,
    EXPORT_FORMATS,
    LOSS_WEIGHTINGS,
    MAX_SEED,
    MAX_SIDE,
    OPTIMIZER_DEFAULTS,
    OPTIMIZER_KEYS,
    OPTIMIZERS,
    QUANTIZE_BITS,
    SCHEDULE_KEYS,
    SCHEDULES,
    SIGMA_SAMPLINGS,
    TURBO_MODELS,
    TURBO_SAMPLE,
    Ema,
    Export,
    FullFinetune,
    Optimizer,
    Sample,
    Save,
    TrainingLoop,
    Validation,
    optimizer_fields,
)


def _one_of_ints(choices: tuple[int, ...]) -> Spec:
    base = integer(nullable=True)

    def check(value: Any) -> Any:
        value = base(value)
        if value is not None and value not in choices:
            raise Bad(f"must be one of {', '.join(map(str, choices))} or null, got {value}")
        return value

    return check


EMA = {"decay": number(gt=0.0, lt=1.0), "start_step": integer(min=0), "every": integer(min=1)}


def _ema(value: Any) -> Ema | None:
    """`ema: {decay, start_step, every}` (any of them; `{}` takes every default) or null (no EMA)."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise Bad(f"expected a mapping of {', '.join(EMA)} (or null for no EMA), got {describe(value)}")
    kwargs, problems = {}, []
    for key, item in value.items():
        if key not in EMA:
            problems.append(((key,), f"unknown key{suggest(key, EMA)}"))
            continue
        try:
            kwargs[key] = EMA[key](item)
        except Bad as exc:
            problems += [((key,) + at, message) for at, message in exc.items]
    if problems:
        raise Bad(items=problems)
    return Ema(**kwargs)


TRAINING_LOOP = {
    "num_epochs": integer(min=1, nullable=True),
    "max_steps": integer(min=1, nullable=True),
    "batch_size": integer(min=1, words=("auto",)),
    "gradient_accumulation_steps": integer(min=1),
    "sigma_sampling": text(choices=SIGMA_SAMPLINGS),
    "logit_mean": number(),
    "logit_std": number(gt=0.0),
    "shift": number(gt=0.0, nullable=True),
    "gradient_checkpointing": boolean(),
    "compute_dtype": text(choices=COMPUTE_DTYPES),
    "max_grad_norm": number(gt=0.0, nullable=True),
    "low_ram": boolean(),
    "quantize": _one_of_ints(QUANTIZE_BITS),
    "loss_weighting": text(choices=LOSS_WEIGHTINGS),
    "noise_offset": number(ge=0.0),
    "ema": _ema,
    "tensorboard": boolean(),
}

# Every optimizer key; which of them an optimiser reads is schema.optimizer_fields.
OPTIMIZER = {
    "learning_rate": number(gt=0.0),
    "betas": list_of(number(ge=0.0, lt=1.0), length=2),
    "weight_decay": number(ge=0.0),
    "eps": number(gt=0.0),
    "warmup_steps": integer(min=0),
    "schedule": text(choices=SCHEDULES),
    "min_learning_rate": number(ge=0.0),
    "num_cycles": integer(min=1),
    "momentum": number(ge=0.0, lt=1.0),
    "nesterov": boolean(),
    "min_8bit_size": integer(min=1),
    "beta1": number(ge=0.0, lt=1.0, nullable=True),
    "eps_scale": number(gt=0.0),
    "clip_threshold": number(gt=0.0),
    "decay_rate": number(lt=0.0),
    "relative_step": boolean(),
    "scale_parameter": boolean(),
    "warmup_init": boolean(),
    "beta3": number(ge=0.0, lt=1.0, nullable=True),
    "d0": number(gt=0.0),
    "d_coef": number(gt=0.0),
    "growth_rate": number(ge=1.0, nullable=True),
    "use_bias_correction": boolean(),
    "safeguard_warmup": boolean(),
}
# The schedules that decay to 0 as transformers' do (min_learning_rate is the cosine schedule's).
_TO_ZERO = ("constant_with_warmup", "linear", "cosine_with_restarts")

# The seed format's top-level steps / guidance / width / height are sample settings.
SIDE = integer(min=BUCKET_STEP, max=MAX_SIDE, multiple_of=BUCKET_STEP)
SAMPLE_SETTINGS = {
    "guidance": number(ge=0.0, le=100.0),
    "steps": integer(min=1, max=1000),
    "width": SIDE,
    "height": SIDE,
}
SAMPLE = {
    "prompts": list_of(text(), unique=True),
    "negative_prompt": text(allow_empty=True),
    **SAMPLE_SETTINGS,
    "seeds": list_of(integer(min=0, max=MAX_SEED), nonempty=True, unique=True),
    "every": integer(min=1, nullable=True),
    "cfg_normalization": boolean(),
    "cfg_truncation": number(ge=0.0, le=1.0),
    "use_ema": boolean(),
}


def read_training_loop(top: Reader, root: Path) -> TrainingLoop:
    """`training_loop:` — required, with at least one of num_epochs / max_steps."""
    r = top.sub("training_loop")
    if r is None:
        if top.data.get("training_loop", MISSING) in (MISSING, None):
            top.ctx.add(("training_loop",), "missing; set `training_loop: {num_epochs: N}` or `max_steps: N`")
        return TrainingLoop()
    r.check_keys((*TRAINING_LOOP, "assistant_lora", "start_from"))
    kwargs = r.fill(TRAINING_LOOP)
    stops = [k for k in ("num_epochs", "max_steps") if r.data.get(k) is not None]
    if not stops:
        top.ctx.add(r.path, "set `num_epochs` or `max_steps` (or both: training stops at the first reached)")
    if kwargs.get("loss_weighting") == "logit_normal" and kwargs.get("sigma_sampling") == "logit_normal":
        top.ctx.add(
            r.path + ("loss_weighting",),
            "`logit_normal` weighting on logit-normal σ samples applies the density twice; use one of them "
            "(sigma_sampling: logit_normal samples by it, loss_weighting: logit_normal weights by it)",
        )
    if r.data.get("assistant_lora") is not None:
        assistant = _assistant_lora(r, root)
        if assistant is not None:
            kwargs["assistant_lora"] = assistant
    if r.data.get("start_from") is not None:
        start = _start_from(r, root)
        if start is not None:
            kwargs["start_from"] = start
    return TrainingLoop(**kwargs)


def _start_from(r: Reader, root: Path) -> str | None:
    """`start_from`: an existing LoRA .safetensors file or training checkpoint .zip (made absolute)."""
    path = r.path + ("start_from",)
    file = resolve_path(r.ctx, path, r.data["start_from"], root)
    if file is None:
        return None
    if file.suffix not in (".safetensors", ".zip"):
        r.ctx.add(path, f"{file}: expected a LoRA .safetensors file or a training checkpoint .zip")
    elif not file.is_file():
        what = "is not a file" if file.exists() else "no such file"
        r.ctx.add(path, f"{what}: {file} (relative paths resolve against {root})")
    else:
        return str(file)
    return None


# `org/repo` or `org/repo:file.safetensors` (a file inside the repo, sub-folders allowed).
_HUB_LORA = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}(?::[\w./-]+\.safetensors)?")
_PATH_PREFIXES = ("/", "./", "../", "~", "$", ".\\", "..\\")


def _assistant_lora(r: Reader, root: Path) -> str | None:
    """`assistant_lora`: an existing .safetensors file (made absolute) or a Hugging Face `org/repo[:file]`."""
    path, raw = r.path + ("assistant_lora",), r.data["assistant_lora"]
    if not isinstance(raw, str):
        r.ctx.add(path, f"expected a LoRA file or a Hugging Face `org/repo[:file]`, got {describe(raw)}")
        return None
    # `dir/file.safetensors` is a path; `org/repo` and `org/repo:file.safetensors` name a Hub file.
    looks_like_path = raw.startswith(_PATH_PREFIXES) or os.path.isabs(raw)
    hub = _HUB_LORA.fullmatch(raw) and (":" in raw or not raw.endswith(".safetensors"))
    if not looks_like_path and hub and not os.path.exists(os.path.join(root, raw)):
        return raw
    file = resolve_path(r.ctx, path, raw, root)
    if file is None:
        return None
    if file.suffix != ".safetensors":
        r.ctx.add(path, f"{file} is not a .safetensors LoRA file")
    elif not file.is_file():
        what = "is not a file" if file.exists() else "no such file"
        r.ctx.add(
            path, f"{what}: {file} (relative paths resolve against {root}; a Hub file is org/repo:FILE)"
        )
    else:
        return str(file)
    return None


def read_optimizer(top: Reader) -> Optimizer:
    """`optimizer:` — optional; `name` picks the optimiser, which decides the keys that apply (each
    optimiser's own defaults from schema.OPTIMIZER_DEFAULTS)."""
    r = top.sub("optimizer")
    if r is None:
        return Optimizer()
    name = r.get("name", text(), Optimizer.name)
    if name is not MISSING and name not in OPTIMIZERS:
        choices = ", ".join(OPTIMIZERS)
        r.ctx.add(r.path + ("name",), f"must be one of {choices}; got {name!r}{suggest(name, OPTIMIZERS)}")
    name = name if name in OPTIMIZERS else Optimizer.name
    schedule = r.data.get("schedule")  # checked with the other keys below
    relative = r.data.get("relative_step") is True
    allowed = optimizer_fields(name, schedule if schedule in SCHEDULES else Optimizer.schedule, relative)
    for key in r.data:
        users = [n for n, keys in OPTIMIZER_KEYS.items() if key in keys]
        if key in SCHEDULE_KEYS and key not in allowed:
            r.ctx.add(
                r.path + (key,),
                "Adafactor with `relative_step: true` computes its own step size, min(1e-2, 1/sqrt(t)); "
                "remove it or set relative_step: false",
            )
        elif users and key not in allowed:
            r.ctx.add(r.path + (key,), f"not used by {name} ({', '.join(users)} only); remove it")
        elif key == "num_cycles" and key not in allowed:
            r.ctx.add(r.path + (key,), "only used by `schedule: cosine_with_restarts`; remove it")
    r.check_keys(tuple(OPTIMIZER) + ("name",))
    kwargs = r.fill({k: spec for k, spec in OPTIMIZER.items() if k in allowed})
    _check_optimizer(r, name, kwargs)
    return Optimizer(**{"name": name, **OPTIMIZER_DEFAULTS[name], **kwargs})


def _check_optimizer(r: Reader, name: str, kwargs: dict[str, Any]) -> None:
    """Combinations of optimizer keys that cannot mean what they say."""
    lr = kwargs.get("learning_rate", OPTIMIZER_DEFAULTS[name].get("learning_rate", Optimizer.learning_rate))
    low, schedule = kwargs.get("min_learning_rate"), kwargs.get("schedule", Optimizer.schedule)
    if low is not None and low > lr:
        r.ctx.add(r.path + ("min_learning_rate",), f"must not exceed learning_rate ({lr:g}), got {low:g}")
    if low and schedule in _TO_ZERO:
        r.ctx.add(
            r.path + ("min_learning_rate",),
            f"`{schedule}` decays to 0 as transformers' schedule does; min_learning_rate is the `cosine` "
            "schedule's floor. Remove it or use `schedule: cosine`",
        )
    if name == "Adafactor" and kwargs.get("warmup_init") and not kwargs.get("relative_step"):
        r.ctx.add(r.path + ("warmup_init",), "needs `relative_step: true` (it warms up the relative step)")
    if name == "SGD" and kwargs.get("nesterov") and kwargs.get("momentum", Optimizer.momentum) == 0:
        r.ctx.add(r.path + ("nesterov",), "Nesterov momentum needs momentum > 0")


def read_full_finetune(top: Reader, mode: Any) -> FullFinetune:
    """`full_finetune:` — only with `mode: full`; the VAE and text encoder stay frozen."""
    r = top.sub("full_finetune")
    if r is None:
        return FullFinetune()
    if mode == "lora":
        r.ctx.add(r.path, "only used with `mode: full`; remove it or set `mode: full`")
    specs = {"train_transformer": boolean(), "train_vae": boolean(), "train_text_encoder": boolean()}
    r.check_keys(specs)
    kwargs = r.fill(specs)
    for key in ("train_vae", "train_text_encoder"):
        if kwargs.get(key):
            r.ctx.add(r.path + (key,), "not supported: the VAE and text encoder stay frozen; set it to false")
    if kwargs.get("train_transformer") is False:
        r.ctx.add(
            r.path + ("train_transformer",),
            "nothing left to train: full fine-tuning trains the "
            "transformer; set it to true or use `mode: lora`",
        )
    return FullFinetune(**kwargs)


def read_save(top: Reader, root: Path, stem: str) -> Save:
    """`save:` — optional; output_path defaults to `<recipe folder>/output/<recipe stem>`."""
    r = top.sub("save")
    default = Path(root, DEFAULT_OUTPUT_DIR, stem)
    if r is None:
        return Save(output_path=default)
    r.check_keys(("checkpoint_frequency", "output_path", "keep_last"))
    kwargs = r.fill({"checkpoint_frequency": integer(min=1), "keep_last": integer(min=1, nullable=True)})
    output = (
        resolve_path(r.ctx, r.path + ("output_path",), r.data["output_path"], root)
        if r.has("output_path")
        else default
    )
    return Save(output_path=output or default, **kwargs)


def read_sample(top: Reader, seed: Any, top_level: dict[str, Any], model: Any = None) -> Sample | None:
    """`sample:` plus the seed format's top-level steps/guidance/width/height (`top_level`, already read
    with SAMPLE_SETTINGS), which fill its defaults; keys inside `sample:` win. A Z-Image-Turbo `model`
    (the validated spec string) samples with `TURBO_SAMPLE` unless told otherwise. None when neither is
    present."""
    r = top.sub("sample")
    if r is None and not any(top.has(k) for k in SAMPLE_SETTINGS):
        return None
    defaults = {"seeds": (seed,)} if isinstance(seed, int) else {}
    if is_turbo(model):
        defaults.update(TURBO_SAMPLE)
    if r is None:
        return Sample(**{**defaults, **top_level})
    r.check_keys(SAMPLE)
    return Sample(**{**defaults, **top_level, **r.fill(SAMPLE)})


def is_turbo(model: Any) -> bool:
    """Whether a validated model spec string names Z-Image-Turbo (its preset or repo id) as its base."""
    if not isinstance(model, str):
        return False
    from zrecipe.models.z_image.resolve import ModelSpec

    return ModelSpec.parse(model).base in TURBO_MODELS


VALIDATION = {
    "fraction": number(gt=0.0, lt=1.0),
    "dataset": text(),
    "sigmas": list_of(number(gt=0.0, lt=1.0), nonempty=True, unique=True),
    "seed": integer(min=0, max=MAX_SEED),
    "every": integer(min=1, nullable=True),
}


def read_validation(top: Reader, dataset_names: tuple[str, ...]) -> Validation | None:
    """`validation:` — a held-out `fraction` of the images or a named `dataset` (exactly one), the σ
    values, the noise seed and how often; None when absent."""
    r = top.sub("validation")
    if r is None:
        return None
    r.check_keys(VALIDATION)
    kwargs = r.fill(VALIDATION)
    given = [k for k in ("fraction", "dataset") if r.has(k)]
    if len(given) != 1:
        what = "both" if given else "neither"
        r.ctx.add(r.path, f"give exactly one of `fraction: F` (held out by content hash) or `dataset: NAME`, "
                          f"got {what}")  # fmt: skip
    name = kwargs.get("dataset")
    if name is not None and dataset_names and name not in dataset_names:
        r.ctx.add(r.path + ("dataset",), f"no dataset is named {name!r} (datasets: {', '.join(dataset_names)})"
                                         f"{suggest(name, dataset_names)}")  # fmt: skip
    if name is not None and len(dataset_names) == 1 and name in dataset_names:
        r.ctx.add(r.path + ("dataset",), f"{name!r} is the only dataset: nothing would be left to train on")
    return Validation(**kwargs)


def read_export(top: Reader, root: Path, save: Save) -> Export:
    """`export:` — formats (none by default), dtype, output_path (default `<save.output_path>/exports`)."""
    default = Path(save.output_path, DEFAULT_EXPORT_SUBDIR)
    r = top.sub("export")
    if r is None:
        return Export(output_path=default)
    r.check_keys(("formats", "dtype", "output_path", "use_ema"))
    fmt = text(choices=EXPORT_FORMATS)
    # A single format may be written without brackets.
    formats = r.get("formats", lambda v: (fmt(v),) if isinstance(v, str) else list_of(fmt, unique=True)(v))
    kwargs = r.fill({"dtype": text(choices=EXPORT_DTYPES), "use_ema": boolean()})
    if formats is not MISSING:
        kwargs["formats"] = formats
    output = (
        resolve_path(r.ctx, r.path + ("output_path",), r.data["output_path"], root)
        if r.has("output_path")
        else default
    )
    return Export(output_path=output or default, **kwargs)
