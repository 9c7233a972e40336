"""Client-level differential privacy: clipping, Gaussian noise, an accountant."""

from fedtune.privacy.accountant import epsilon
from fedtune.privacy.client_dp import CLIP_NORM, ClientLevelDP, clip, next_clip_norm

__all__ = ["CLIP_NORM", "ClientLevelDP", "clip", "epsilon", "next_clip_norm"]
