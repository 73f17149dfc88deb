"""Text-to-video: the text is all the conditioning (cross-attention to umT5), which every
task shares; nothing is added to the loop."""

from .base import Conditioning


class TextToVideo(Conditioning):
    task = "t2v"
