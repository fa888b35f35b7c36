"""Datasets: read the formats users have, and prepare them as Parquet shards of raw pixels for training.

One module a source, each finding its own layout (the table is `sources.SOURCES`):
- `cifar`: CIFAR-10's "python version", folder or archive; `download=True` fetches it into a folder.
- `hf_parquet`: Parquet in the Hugging Face image layout, one file or a folder of shards.

Beside them, `prepared` writes a source as a prepared dataset and reads it back, and `images` turns
encoded pictures into pixels and pixels into the model's tensors. Pictures of any size are not prepared:
`folders` lists a folder of picture files (or Parquet of any sizes) and reads it with Ray Data, encoded,
and `crops` cuts the training and validation crops in the workers' batch path.
"""

from inpaint.data.images import ImageTooLarge, decode_image, read_image, to_float_images, to_uint8_images
from inpaint.data.prepared import (
    batch_to_tensor,
    is_prepared,
    prepare,
    read_manifest,
    read_split,
    split_files,
)
from inpaint.data.sources import Progress, load_source

__all__ = [
    "ImageTooLarge",
    "Progress",
    "batch_to_tensor",
    "decode_image",
    "is_prepared",
    "load_source",
    "prepare",
    "read_image",
    "read_manifest",
    "read_split",
    "split_files",
    "to_float_images",
    "to_uint8_images",
]
