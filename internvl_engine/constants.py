"""InternVL3 facts that several modules fall back on, each stated once (spec sections 1, 6, 7).

A checkpoint states its own values in config.json and the processor files; these are only what is assumed where
no file says, and what the InternVL3 releases use."""

TILE_SIZE = 448  # side of one image tile in pixels; equals the vision tower's image_size
PATCH_SIZE = 14
DOWNSAMPLE_RATIO = 0.5  # pixel shuffle: each 2x2 block of patch features becomes one token
# language-model tokens per tile: (448 / 14 * 0.5) ** 2
IMAGE_SEQ_LENGTH = int(TILE_SIZE // PATCH_SIZE * DOWNSAMPLE_RATIO) ** 2
IMAGE_TOKEN_ID = 151667  # <IMG_CONTEXT>
MIN_TILES = 1
MAX_TILES = 12  # transformers' GotOcr2 default and InternVL3's max_dynamic_patch
