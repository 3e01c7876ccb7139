"""Z-Image's vocabulary: the names of its block groups and adaptable layers, and its size step.

Pure constants (no MLX): the recipe language validates against them and the training code walks the
model with them, so `zrecipe plan` can import this module without loading any model code.
"""

from __future__ import annotations

# The transformer's block groups, in the recipe's canonical order (LoRA targets sort by it, so it is part
# of the recipe hash and the train key: do not reorder).
BLOCK_TYPES = ("layers", "noise_refiner", "context_refiner")
# The same groups in the order the forward pass runs them (image tokens through noise_refiner, caption
# tokens through context_refiner, then the joint sequence through layers).
BLOCK_GROUPS = ("noise_refiner", "context_refiner", "layers")
# The Linear layers a LoRA can adapt, named as in the checkpoint (canonical order).
LAYER_TYPES = (
    "attention.to_q",
    "attention.to_k",
    "attention.to_v",
    "attention.to_out.0",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
    "adaLN_modulation.0",
)
# context_refiner blocks have no timestep modulation, hence no adaLN_modulation Linear to adapt.
BLOCK_LAYER_TYPES = {
    "layers": LAYER_TYPES,
    "noise_refiner": LAYER_TYPES,
    "context_refiner": tuple(t for t in LAYER_TYPES if t != "adaLN_modulation.0"),
}
# Shorthands accepted in `layer_types` lists; the resolved recipe always lists the full names.
LAYER_TYPE_GROUPS = {
    "attention": LAYER_TYPES[:4],
    "feed_forward": LAYER_TYPES[4:7],
}
# The VAE's downsampling: latents (and loss masks) are (height/8, width/8).
VAE_DOWNSAMPLE = 8
# VAE downsample 8 x patch 2: every image side must be a multiple of 16.
BUCKET_STEP = VAE_DOWNSAMPLE * 2
