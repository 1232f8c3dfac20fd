"""What the diffusers video adapters share: frame counts, the latent video grid, the first frame."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from analysis import store_format as fmt
from tracer.adapters.base import image_to_uint8
from tracer.adapters.diffusers_common import DiffusersAdapter


class DiffusersVideo(DiffusersAdapter):
    """A diffusers video pipeline: maps on a (frame, y, x) grid, the first frame as the image."""

    def video_attrs(self, arguments: Mapping[str, Any], num_frames: int) -> dict[str, Any]:
        """Run attributes of the video: frames generated and the autoencoder's temporal factor."""
        return {
            fmt.NUM_FRAMES: int(arguments.get("num_frames") or num_frames),
            fmt.TEMPORAL_COMPRESSION: int(self.pipe.vae_scale_factor_temporal),
        }

    @property
    @abstractmethod
    def patch(self) -> tuple[int, int, int]:
        """The transformer's patch: latent (frames, rows, columns) per token."""

    def video_grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """The token grid of `frames` latent frames of `height` × `width` latent cells."""
        patch = self.patch
        return int(frames) // patch[0], int(height) // patch[1], int(width) // patch[2]

    def latent_grid(self, attrs: Mapping[str, Any]) -> tuple[int, ...]:
        pipe = self.pipe
        latent_frames = (int(attrs[fmt.NUM_FRAMES]) - 1) // int(pipe.vae_scale_factor_temporal) + 1
        spatial = int(pipe.vae_scale_factor_spatial)
        return self.video_grid(
            latent_frames, int(attrs["height"]) // spatial, int(attrs["width"]) // spatial
        )

    def image(self, output: Any) -> np.ndarray | None:
        """The first frame of the first video (None when the pipeline returned latents)."""
        frames = getattr(output, "frames", None)
        if frames is None and isinstance(output, tuple) and output:
            frames = output[0]
        if frames is None or isinstance(frames, str) or len(frames) == 0:
            return None
        video = frames[0]  # [F, H, W, 3] ("np"), [F, 3, H, W] ("pt"), or a list of PIL images
        if isinstance(video, torch.Tensor):
            channels = int(self.transformer.config.out_channels)
            if video.ndim != 4 or video.shape[1] != 3 or channels in video.shape[:2]:
                return None
        return image_to_uint8(video[0])
