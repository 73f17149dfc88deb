"""Fine-tuning Wan on a folder of videos and images: the dataset (`data`); preparing latents
(`prepare`) and the training recipe (`recipe`, its stages in `batches`, `trainable`, `loss`,
`checkpoint`, `output`) build on it; `run` is a whole training run as one call."""

from .data import (Bucket, Clip, DatasetReport, Item, SkippedItem, assign_buckets, bucket_size, find_items,
                   load_item, probe, resample_index, resize_crop, sample_frames)
from .run import ValidationRequest, run

__all__ = ["Bucket", "Clip", "DatasetReport", "Item", "SkippedItem", "assign_buckets", "bucket_size", "find_items",
           "load_item", "probe", "resample_index", "resize_crop", "run", "sample_frames", "ValidationRequest"]
