"""Tokens and sentinel values shared by the data contract and the model.

Placeholders are real vocabulary entries (not negative sentinel ids as upstream uses): the tokeniser expands
`<image>` into `num_image_tokens` copies of IMAGE_TOKEN and puts REGION_FEATURE_TOKEN between `<region>` and
`</region>`, so sequence lengths are final before the model runs and `<SEG>` positions need no offset arithmetic.
"""

IGNORE_INDEX = -100

IMAGE_TOKEN = "<image>"
IMAGE_START_TOKEN = "<im_start>"
IMAGE_END_TOKEN = "<im_end>"
REGION_START_TOKEN = "<region>"
REGION_END_TOKEN = "</region>"
REGION_FEATURE_TOKEN = "<region_feat>"
SEG_TOKEN = "<SEG>"
MASK_START_TAG = "<mask>"
MASK_END_TAG = "</mask>"

# Tokens added to any base tokenizer, in this order.
SPECIAL_TOKENS = [
    IMAGE_TOKEN,
    IMAGE_START_TOKEN,
    IMAGE_END_TOKEN,
    REGION_START_TOKEN,
    REGION_END_TOKEN,
    REGION_FEATURE_TOKEN,
    SEG_TOKEN,
]

MODALITIES = (
    "ct",
    "mri",
    "xray",
    "ultrasound",
    "pet",
    "fundus",
    "dermoscopy",
    "endoscopy",
    "microscopy",
    "other",
)
TASKS = ("vqa", "region_vqa", "grounding")
