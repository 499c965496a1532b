"""HQLabel: text-prompted dataset labeling, Grounding DINO boxes -> HQ-SAM masks, distributed with Ray."""

__version__ = "0.1.0"
