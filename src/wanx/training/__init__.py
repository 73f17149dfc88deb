"""Fine-tuning Wan on a folder of videos and images: the dataset (`data`); preparing latents
and the training recipe build on it."""

from .data import (Bucket, Clip, DatasetReport, Item, SkippedItem, assign_buckets, bucket_size, find_items,
                   load_item, probe, resample_index, resize_crop, sample_frames)

__all__ = ["Bucket", "Clip", "DatasetReport", "Item", "SkippedItem", "assign_buckets", "bucket_size", "find_items",
           "load_item", "probe", "resample_index", "resize_crop", "sample_frames"]
