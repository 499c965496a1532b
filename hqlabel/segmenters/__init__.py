"""HQ-SAM segmentation: load, embed once per image, decode many prompts."""

from hqlabel.segmenters.hq_sam import HQSamSegmenter, ImageEmbeddings, MaskLogits, tiny_random_sam_hq

__all__ = ["HQSamSegmenter", "ImageEmbeddings", "MaskLogits", "tiny_random_sam_hq"]
