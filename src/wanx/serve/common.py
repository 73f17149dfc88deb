"""What the server's parts share (the app, the API and the UI), so that imports run one way:
app -> api, ui -> common, jobs."""

from __future__ import annotations

from ..request import KEY_TYPES

# request keys that only come as uploaded files (extend: a video to continue, kept as uploaded;
# VACE: control_video, mask (a video or an image) and reference_images; Animate: the files of
# the preprocessed folder, one by one, its reference image as `image`)
ANIMATE_UPLOADS = ("pose_video", "face_video", "background_video", "mask_video")
UPLOADS = ("image", "last_image", "video", "extend", "control_video", "mask", "reference_images", *ANIMATE_UPLOADS)
VIDEO_UPLOADS = ("video", "extend", "control_video", *ANIMATE_UPLOADS)
# videos read as uploaded, never scaled: their size is the output's (extend, Animate's pose and
# background) or the model's (Animate's 512x512 face crops)
AS_UPLOADED = ("extend", *ANIMATE_UPLOADS)
# Wan2.2 S2V: the audio, kept as uploaded (its reader names what is wrong with it); its pose
# video is `pose_video` (read as uploaded: from its start, at its own frame rate, as the official)
UPLOADS = UPLOADS + ("audio",)
# uploads that come as several parts of one name (a list in the request), and how many at most
MANY = {"reference_images": 4}


def listed(value) -> list:
    """An upload field's value as a list of paths (none, one, or MANY's several)."""
    return [] if not value else list(value) if isinstance(value, (list, tuple)) else [value]
# A POST body: a --prompts JSON line less `output` (the server names every file) and less the
# input paths (uploaded instead), plus what the server chooses per job.
API_TYPES = {**{k: v for k, v in KEY_TYPES.items() if k not in ("output", "animate_inputs", *UPLOADS)},
             "loras": (list,), "teacache": (int, float)}


class UploadError(ValueError):
    """An upload refused for its size (413) or kind (415)."""

    def __init__(self, field: str, message: str, status: int):
        super().__init__(message)
        self.field, self.status = field, status


def preview_strip(frames, height: int = 96):
    """Latent preview frames `[F, h, w, 3]` side by side, scaled up (nearest) to about `height`."""
    import numpy as np

    scale = max(1, round(height / frames.shape[1]))
    frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    gap = np.full((frames.shape[1], 2, 3), 255, np.uint8)
    return np.concatenate([part for frame in frames for part in (frame, gap)][:-1], axis=1)
