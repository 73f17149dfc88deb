"""Wan2.2-Animate (official `WanAnimate.generate`, wan/animate.py): a reference character driven
by a pose video and a face video (animation), or put in place of the person of a background
video under a mask (replacement), clip after clip.

The inputs are what the official preprocessing writes (wan/modules/animate/preprocess):
src_pose.mp4, src_face.mp4 (face crops, 512x512), src_ref.png, and for replacement src_bg.mp4
and src_mask.mp4, read as they are. The output takes the pose video's size and length: the
frames are padded back and forth (`ping_pong`) to a whole number of clips of `num_frames` (77)
that overlap by `refert_num` (1 or 5) frames, and the video is cut back to the input's length.

Each clip's DiT inputs (official plumbing): the latents are the reference image's latent frame
then the clip's; y = [ones (4) | reference latents] for that frame, then [mask (4) | latents of
the frames the clip is given]: none in animation (zeros), the background in replacement (its
mask 1 - the character's, nearest-downsampled), and in both the last `refert_num` decoded
frames of the previous clip in front, marked known. pose_latents are the clip's pose frames'
latents, face_pixel_values its face frames, clip_features the CLIP tokens of the reference.
Each clip is decoded whole (less the reference frame); later clips drop the frames they carry.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ...video import Video, read_image, read_video, to_pixels
from .base import Conditioning, Held, Run, read_input
from .i2v import fold_mask

# The official preprocessing's file names (preprocess_data.py), by request key.
FOLDER_FILES = {"pose_video": "src_pose.mp4", "face_video": "src_face.mp4", "image": "src_ref.png",
                "background_video": "src_bg.mp4", "mask_video": "src_mask.mp4"}
ANIMATION_FILES = ("pose_video", "face_video", "image")
REPLACEMENT_FILES = ("background_video", "mask_video")
REFERT_NUMS = (1, 5)  # the official assertion: frames carried from clip to clip


class Frames:
    """A video's frames as given, uint8 `[F, H, W, 3]` (or a float `[3, F, H, W]` in [-1, 1]):
    clips are converted one at a time, so a long video is never held in float."""

    def __init__(self, frames):
        self.frames = frames

    def __len__(self) -> int:
        return self.frames.shape[1] if isinstance(self.frames, Tensor) else len(self.frames)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        shape = self.frames.shape
        return tuple(shape[2:4]) if isinstance(self.frames, Tensor) else tuple(shape[1:3])

    def clip(self, indices: list[int]) -> Tensor:
        """Frames `indices` as `[3, n, H, W]` in [-1, 1] (the official `x / 127.5 - 1`)."""
        if isinstance(self.frames, Tensor):
            return self.frames[:, indices].float()
        array = torch.from_numpy(np.ascontiguousarray(self.frames[indices])).double()
        return (array / 127.5 - 1).permute(3, 0, 1, 2).float()

    def mask(self, indices: list[int]) -> Tensor:
        """A mask video's frames `indices` as `[n, H, W]` in [0, 1]: the first channel / 255, as
        the official `prepare_source_for_replace` (not thresholded)."""
        if isinstance(self.frames, Tensor):
            return ((self.frames[0, indices].float() + 1) / 2)
        return torch.from_numpy(np.ascontiguousarray(self.frames[indices][..., 0])).double().div(255).float()


@dataclass
class AnimateInputs:
    """What `Animate.read` checked: the frames, the reference image sized to the output, and
    the clips they make."""

    pose: Frames
    face: Frames
    reference: np.ndarray  # uint8 [H, W, 3], padded to the pose video's size
    background: Frames | None  # replacement only
    mask: Frames | None
    refert_num: int
    length: int  # the input's frames: the output's
    clip_len: int
    clips: int
    indices: list[int]  # the padded frame order (ping-pong over the input)

    @property
    def replace(self) -> bool:
        return self.background is not None

    def clip_indices(self, index: int) -> list[int]:
        start = index * (self.clip_len - self.refert_num)
        return self.indices[start: start + self.clip_len]


def valid_length(length: int, clip_len: int, overlap: int) -> int:
    """The official `get_valid_len`: frames padded up to whole clips of `clip_len` overlapping by
    `overlap` (overlap + k (clip_len - overlap))."""
    step = clip_len - overlap
    rest = (length - overlap) % step
    return length + (step - rest if rest else 0)


def ping_pong(length: int, target: int) -> list[int]:
    """The official `inputs_padding` as frame indices: 0, 1, ..., n-1, n-2, ..., 0, 1, ... up to
    `target` (a video of at least 2 frames)."""
    indices, index, back = [], 0, False
    while len(indices) < target:
        indices.append(index)
        index += -1 if back else 1
        if index in (0, length - 1):
            back = not back
    return indices


def padding_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """The official `padding_resize`: uint8 `[h, w, 3]` scaled (bilinear) to fit `height x width`
    with its aspect ratio kept and centered on black. Restated with torch (the official code
    uses cv2.INTER_LINEAR, whose fixed-point weights can differ by one level)."""
    h, w = image.shape[:2]
    if h / w > height / width:
        new_h, new_w = height, int(height / h * w)
    else:
        new_h, new_w = int(width / w * h), width
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float()
    scaled = F.interpolate(pixels, size=(new_h, new_w), mode="bilinear", align_corners=False)
    scaled = scaled.round().clamp(0, 255).byte()[0].permute(1, 2, 0).numpy()
    out = np.zeros((height, width, 3), dtype=np.uint8)
    top, left = int((height - new_h) / 2), int((width - new_w) / 2)
    out[top: top + new_h, left: left + new_w] = scaled
    return out


def _video(value, what: str) -> Frames:
    """A path, `Video`, uint8 `[F, H, W, 3]` array or `[3, F, H, W]` tensor in [-1, 1]; every
    frame as stored (no frame-rate resampling: the preprocessing fixed the rate)."""
    if isinstance(value, (str, Path)):
        value = read_video(value)
    if isinstance(value, Video):
        value = value.frames
    if isinstance(value, Tensor):
        if value.ndim != 4 or value.shape[0] != 3:
            raise ValueError(f"{what} tensor must be [3, F, H, W] in [-1, 1], got {tuple(value.shape)}")
        return Frames(value.float().cpu())
    array = np.asarray(value)
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ValueError(f"{what} frames must be uint8 [F, H, W, 3], got {array.dtype} {array.shape}")
    return Frames(array)


def _image(value) -> np.ndarray:
    """A path, PIL image, uint8 `[H, W, 3]` array or `[3, H, W]` tensor in [-1, 1] -> uint8
    `[H, W, 3]` (the official code reads the reference as 8-bit pixels)."""
    if isinstance(value, (str, Path)):
        return read_image(value)
    if isinstance(value, Tensor):
        if value.ndim != 3 or value.shape[0] != 3:
            raise ValueError(f"the reference image tensor must be [3, H, W] in [-1, 1], got {tuple(value.shape)}")
        return to_pixels(value[:, None])[0]
    array = np.asarray(value.convert("RGB") if hasattr(value, "convert") else value)
    if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ValueError(f"the reference image must be RGB uint8 [H, W, 3], got {array.dtype} {array.shape}")
    return array


def check_face_size(plan, dit_config) -> None:
    """The face frames must be the motion encoder's size (512x512 for Animate-14B)."""
    from ..plan import RequestError

    inputs = plan.animate
    size = getattr(dit_config, "motion_encoder_size", None)
    if inputs is None or size is None or inputs.face.size == (size, size):
        return
    h, w = inputs.face.size
    raise RequestError("face_video", f"the face video is {w}x{h}; this model reads {size}x{size} face crops (the "
                                     f"official preprocessing's src_face.mp4): preprocess again")


class Animate(Conditioning):
    task = "animate"
    clip_after_clip = True  # one clip too: its frames past the input's length are cut

    def __init__(self, plan):
        super().__init__(plan)
        self.clips = plan.animate.clips
        self.next = 0  # the clip `inputs` prepares
        self.carried: Tensor | None = None  # the last refert_num decoded frames [3, r, H, W]
        self.made = 0
        self.reference: dict[str, Tensor] | None = None  # its latent frame's y and CLIP tokens, made once

    @classmethod
    def read(cls, plan, given, *, area, frames_given, shift_given, name) -> None:
        from ..plan import RequestError

        for key, flag, what in (("extend", "extend", "continues a video"),
                                ("context_windows", "context_frames", "splits the video into windows")):
            if given[key] is not None:
                raise RequestError(key, f"{name(flag)} {what}; Animate makes its video clip after clip, each "
                                        f"carrying the last frames of the one before: leave {name(flag)} unset")
        if given["output_type"] == "latents":
            raise RequestError("output_type", "output_type='latents' is not available for Animate: each clip is "
                                              "decoded for the next")
        refert = given["refert_num"] if given["refert_num"] is not None else 1
        if isinstance(refert, bool) or refert not in REFERT_NUMS:
            raise RequestError("refert_num", f"{name('refert_num')} must be 1 or 5 (the frames each clip carries "
                                             f"from the last, as the official code allows), got {refert!r}")
        sources = cls._sources(given, name)
        if given["animate_inputs"] is None and sources["pose_video"] is None and sources["face_video"] is None:
            raise RequestError("animate_inputs", f"Animate needs the preprocessed inputs: give "
                                                 f"{name('animate_inputs')} (the official preprocessing's folder), "
                                                 f"or {name('pose_video')}, {name('face_video')} and {name('image')}")
        replace = given["replace"]
        files = [key for key in REPLACEMENT_FILES if sources.get(key) is not None]
        if replace is None:
            replace = bool(files) and given["animate_inputs"] is None
        if not replace and files and given["animate_inputs"] is None:
            raise RequestError(files[0], f"{name(files[0])} is for replacement: drop it, or ask for "
                                         f"{name('replace')}")
        needed = ANIMATION_FILES + (REPLACEMENT_FILES if replace else ())
        for key in needed:
            if sources.get(key) is None:
                mode = "replacement" if replace else "animation"
                if given["animate_inputs"] is not None:
                    folder = Path(given["animate_inputs"])
                    raise RequestError("animate_inputs",
                                       f"{name('animate_inputs')} {folder}: {FOLDER_FILES[key]} is missing ({mode} "
                                       f"needs {', '.join(FOLDER_FILES[k] for k in needed)}, as the official "
                                       "preprocessing writes them)")
                raise RequestError(key, f"{mode} needs {name(key)} (the preprocessed "
                                        f"{FOLDER_FILES[key]}); give it")

        def field(key: str) -> str:  # errors point at the folder when the file came from it
            return "animate_inputs" if given["animate_inputs"] is not None else key

        pose = read_input(field("pose_video"), lambda v: _video(v, "pose video"), sources["pose_video"])
        height, width = pose.size
        multiple = plan.spec.multiple
        if height % multiple or width % multiple:
            raise RequestError(field("pose_video"), f"the pose video is {width}x{height}; the output takes its size, "
                                                    f"which must be a multiple of {multiple}: preprocess again with "
                                                    "another resolution_area")
        face = read_input(field("face_video"), lambda v: _video(v, "face video"), sources["face_video"])
        if face.size[0] != face.size[1]:
            raise RequestError(field("face_video"), f"the face video is {face.size[1]}x{face.size[0]}; it must "
                                                    "hold square face crops (512x512 from the official "
                                                    "preprocessing)")
        image = read_input(field("image"), _image, sources["image"])
        videos = {"pose video": pose, "face video": face}
        background = mask = None
        if replace:
            background = read_input(field("background_video"), lambda v: _video(v, "background video"),
                                    sources["background_video"])
            mask = read_input(field("mask_video"), lambda v: _video(v, "mask video"), sources["mask_video"])
            for key, what, video in (("background_video", "background video", background),
                                     ("mask_video", "mask video", mask)):
                if video.size != (height, width):
                    raise RequestError(field(key), f"the {what} is {video.size[1]}x{video.size[0]}; it needs the pose "
                                                   f"video's size, {width}x{height}")
            videos.update({"background video": background, "mask video": mask})
        lengths = {what: len(video) for what, video in videos.items()}
        if len(set(lengths.values())) > 1:
            listed = ", ".join(f"the {what} {count}" for what, count in lengths.items())
            raise RequestError(field("face_video"), f"the preprocessed videos differ in length ({listed} frames); "
                                                    "they must have one frame each per frame of the video")
        length = len(pose)
        clip_len = plan.num_frames
        if clip_len <= refert:
            raise RequestError("num_frames", f"{name('num_frames')} {clip_len} is a clip's length; it must be above "
                                             f"{name('refert_num')} {refert} (official 77)")
        if length <= refert:
            raise RequestError(field("pose_video"), f"the pose video has {length} frame(s); Animate needs more than "
                                                    f"{name('refert_num')} {refert}")
        target = valid_length(length, clip_len, refert)
        plan.height, plan.width = height, width
        plan.lead_frames = 1  # the reference image's latent frame, before the clip's
        plan.animate = AnimateInputs(pose, face, padding_resize(image, height, width), background, mask, refert,
                                     length, clip_len, (target - refert) // (clip_len - refert),
                                     ping_pong(length, target))

    @staticmethod
    def _sources(given: dict, name) -> dict:
        """The inputs by key: from the folder, or given one by one (not both)."""
        from ..plan import RequestError

        folder = given["animate_inputs"]
        keys = [key for key in FOLDER_FILES if given[key] is not None]
        if folder is None:
            return {key: given[key] for key in FOLDER_FILES}
        if keys:
            raise RequestError(keys[0], f"give {name('animate_inputs')} (the preprocessed folder) or "
                                        f"{name(keys[0])}, not both")
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise RequestError("animate_inputs", f"{name('animate_inputs')} {folder}: no such folder (the official "
                                                 "preprocessing's save_path)")
        return {key: folder / file if (folder / file).is_file() else None for key, file in FOLDER_FILES.items()}

    @classmethod
    def held(cls, plan) -> Held:
        """The reference latent frame beside each clip's; a clip decoded whole; the video as long
        as the input."""
        return Held(extra_frames=plan.lead_frames, decoded_frames=plan.num_frames,
                    output_frames=plan.animate.length)

    def inputs(self, run: Run) -> dict[str, Tensor]:
        inputs, index = self.plan.animate, self.next
        pipe = run.pipe
        if index == 0:
            check_face_size(self.plan, pipe.dit.config)
        frames = inputs.clip_indices(index)
        carried = 0 if index == 0 else inputs.refert_num
        h, w = self.plan.height, self.plan.width
        s = pipe.vae.config.spatial_stride
        with run.stage(f"animate conditioning (clip {index + 1})", "clip", "vae"):
            if self.reference is None:
                reference = Frames(inputs.reference[None]).clip([0])  # [3, 1, H, W]
                latents = run.encode(reference[None])  # [1, 16, 1, h, w]
                ones = torch.ones(1, pipe.vae.config.temporal_stride, *latents.shape[2:], device=latents.device)
                self.reference = {"y": torch.cat([ones, latents], dim=1),
                                  "clip": pipe.image_encoder(reference[:, 0][None].to(run.device))}
            if inputs.replace:  # the background, the carried frames in front; known: outside the character
                pixels = inputs.background.clip(frames)
                if carried:
                    pixels[:, :carried] = self.carried[:, :carried].to(pixels)
                known = 1 - inputs.mask.mask(frames)[:, None]  # [T, 1, H, W]
                known = F.interpolate(known, size=(h // s, w // s), mode="nearest")[:, 0][None]
            else:  # nothing known but the carried frames
                pixels = torch.zeros(3, len(frames), h, w)
                if carried:
                    pixels[:, :carried] = F.interpolate(self.carried[:, :carried].float().cpu(), size=(h, w),
                                                        mode="bicubic")
                known = torch.zeros(1, len(frames), h // s, w // s)
            known[:, :carried] = 1
            y = torch.cat([fold_mask(known.to(run.device), pipe.vae.config.temporal_stride),
                           run.encode(pixels[None])], dim=1)
            pose = run.encode(inputs.pose.clip(frames)[None])
        return {"clip_features": self.reference["clip"], "y": torch.cat([self.reference["y"], y], dim=2),
                "pose_latents": pose, "face_pixel_values": inputs.face.clip(frames)[None].to(run.device)}

    def batch(self, inputs: dict[str, Tensor], names: tuple[str, ...]) -> dict[str, Tensor]:
        """The unconditional branch sees a blank face (all -1), as the official loop's `arg_null`."""
        out = super().batch(inputs, names)
        blank = [i for i, branch in enumerate(names) if branch.startswith("uncond")]
        if blank:
            face = out["face_pixel_values"].clone()
            face[blank] = -1
            out["face_pixel_values"] = face
        return out

    def finish_clip(self, run: Run, index: int, latents: Tensor) -> Tensor:
        """Decode the clip less the reference frame; keep its last refert_num frames for the next;
        a later clip drops the frames it carried; the last stops at the input's length."""
        inputs = self.plan.animate
        with run.stage(f"decoding (clip {index + 1})", "vae"):
            pixels = run.decode(latents[:, :, 1:].float())[0]  # [3, T, H, W]
        self.carried = pixels[:, -inputs.refert_num:]
        new = pixels if index == 0 else pixels[:, inputs.refert_num:]
        new = new[:, : inputs.length - self.made]
        self.made += new.shape[1]
        self.next = index + 1
        return new

    def metadata(self) -> dict:
        inputs = self.plan.animate
        return {"animate": {"mode": "replace" if inputs.replace else "animate", "refert_num": inputs.refert_num,
                            "clips": inputs.clips, "clip_frames": inputs.clip_len, "video_frames": inputs.length}}
