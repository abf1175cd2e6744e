"""Image transforms with CLIP normalisation (all inputs are converted to RGB first)."""

from __future__ import annotations

from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, RGBA, P, I;16 ...) to RGB; a module-level function so it pickles."""
    return image if image.mode == "RGB" else image.convert("RGB")


def eval_transform(size: int = 224) -> T.Compose:
    """RGB → bicubic resize to ``size × size`` → tensor → CLIP normalisation."""
    return T.Compose(
        [
            T.Lambda(to_rgb),
            T.Resize((size, size), interpolation=InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )


def train_transform(size: int = 224) -> T.Compose:
    """RGB → random resized crop (scale 0.5–1) → horizontal flip → RandAugment(2, 7) → tensor → normalise."""
    return T.Compose(
        [
            T.Lambda(to_rgb),
            T.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.RandAugment(num_ops=2, magnitude=7),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )
