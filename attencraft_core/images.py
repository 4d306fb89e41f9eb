"""Reading the user's image and masks, and turning them into tensors."""

from __future__ import annotations

import functools
import hashlib
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageChops, ImageDraw, ImageOps, UnidentifiedImageError

from .errors import AttenCraftError
from .reading import require_regular_file

MIN_IMAGE_SIDE = 64
EXIF_ORIENTATION = 0x0112
MAX_IMAGE_SIDE = 8192  # larger images are refused before they are decoded (a decompression bomb is never expanded)


def load_image(path: str | Path, min_side: int = MIN_IMAGE_SIDE) -> tuple[Image.Image, list[str]]:
    """Open an image as RGB, turned upright by its EXIF orientation (as ComfyUI's Load Image does). Returns the
    image and notes (e.g. that an RGBA image was converted). Sizes are checked from the header before decoding."""
    image, notes = open_image(path)
    image, more = ensure_rgb(image, name=Path(path).name, min_side=min_side)
    return image, notes + more


def load_mask(path: str | Path) -> Image.Image:
    """A mask image as greyscale (white = the concept). A mask with transparency counts where it is opaque: its
    grey level times its alpha, so white painted on a transparent layer is the painted shape."""
    image, _ = open_image(path)
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return ImageChops.multiply(rgba.convert("L"), rgba.getchannel("A"))
    return image.convert("L")


def open_image(path: str | Path) -> tuple[Image.Image, list[str]]:
    """An image file decoded in its own mode and turned upright by its EXIF orientation, with a note if it was
    turned; sizes are checked from the header before decoding, and any failure is one error naming the file."""
    path = require_regular_file(path, "Image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                check_image_size(img.size, path.name)
                img.load()
                orientation = img.getexif().get(EXIF_ORIENTATION, 1)
                image = ImageOps.exif_transpose(img)
    except AttenCraftError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise AttenCraftError(f"{path.name} declares more pixels than AttenCraft reads ({exc}); use an image "
                              f"of at most {MAX_IMAGE_SIDE} px on each side.") from exc
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise AttenCraftError(
            f"Cannot read {str(path)!r} as an image ({exc}). Use a PNG, JPEG or WebP file.") from exc
    except Exception as exc:  # a malformed file can make a Pillow decoder fail in other ways
        raise AttenCraftError(f"{str(path)!r} is a damaged or malformed image ({type(exc).__name__}: {exc}). "
                              "Re-save it as PNG or JPEG.") from exc
    return image, [f"{path.name} was turned upright by its EXIF orientation ({orientation})."] if orientation != 1 else []


def check_image_size(size: tuple[int, int], name: str) -> None:
    """Refuse an image larger than MAX_IMAGE_SIDE on a side, before it is decoded."""
    if max(size) > MAX_IMAGE_SIDE:
        raise AttenCraftError(f"{name} is {size[0]}x{size[1]} px; AttenCraft reads images of at most "
                              f"{MAX_IMAGE_SIDE} px on each side. Scale it down first.")


def ensure_rgb(image: Image.Image, name: str = "the image",
               min_side: int = MIN_IMAGE_SIDE) -> tuple[Image.Image, list[str]]:
    """Convert any mode to RGB (alpha flattened onto white) and check the size."""
    notes = []
    if image.mode != "RGB":
        original = image.mode
        if "A" in image.getbands() or "transparency" in image.info:
            rgba = image.convert("RGBA")
            flat = Image.new("RGB", rgba.size, (255, 255, 255))
            flat.paste(rgba, mask=rgba.getchannel("A"))
            image = flat
            notes.append(f"{name} was {original} with transparency; converted to RGB on a white background.")
        else:
            image = image.convert("RGB")
            notes.append(f"{name} was {original}; converted to RGB.")
    if min(image.size) < min_side:
        raise AttenCraftError(
            f"{name} is {image.size[0]}x{image.size[1]} px; AttenCraft needs at least {min_side} px on "
            "each side (the model's own resolution, e.g. 512 px for SD, is best).")
    return image, notes


def image_fingerprint(image: Image.Image) -> str:
    """Short hash of an image's size, mode and pixels: tells two inputs apart."""
    h = hashlib.sha256(f"{image.size}|{image.mode}|".encode())
    h.update(image.tobytes())
    return h.hexdigest()[:16]


@functools.cache
def image_processor():
    """diffusers' VaeImageProcessor with bicubic resizing (the reference code's) and [-1, 1] values."""
    from diffusers.image_processor import VaeImageProcessor  # on use: the API loads without diffusers

    return VaeImageProcessor(vae_scale_factor=8, resample="bicubic", do_normalize=True)


def image_to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """[1, 3, size, size] in [-1, 1], resized with bicubic filtering (size a multiple of 8)."""
    return image_processor().preprocess(image, height=size, width=size)


def tensor_to_image(tensor: torch.Tensor) -> Image.Image:
    """Inverse of image_to_tensor for one [3, H, W] or [1, 3, H, W] tensor in [-1, 1]."""
    tensor = tensor.detach().float().cpu().reshape(-1, *tensor.shape[-3:])[:1]
    return image_processor().postprocess(tensor, output_type="pil")[0]


def mask_to_image(mask: torch.Tensor) -> Image.Image:
    """A boolean or [0, 1] mask as a greyscale PNG-ready image (white = concept)."""
    return Image.fromarray((mask.detach().float().cpu().numpy() * 255).round().astype(np.uint8), mode="L")


PALETTE = ((230, 57, 70), (29, 120, 230), (42, 170, 90), (244, 162, 37), (150, 80, 200), (30, 200, 200),
           (220, 90, 170), (120, 120, 40))


def overlay(image: Image.Image, masks: torch.Tensor, alpha: float = 0.5) -> Image.Image:
    """The image with each mask [N, H, W] (image size) tinted in its own colour."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    out = base.copy()
    for i, mask in enumerate(masks.bool().cpu().numpy()):
        colour = np.array(PALETTE[i % len(PALETTE)], dtype=np.float32)
        out[mask] = (1 - alpha) * base[mask] + alpha * colour
    return Image.fromarray(out.round().astype(np.uint8))


def contact_sheet(rows: list[tuple[str, list[Image.Image]]], tile: int = 128) -> Image.Image:
    """Labelled rows of images, each image scaled to `tile` px."""
    columns = max(len(images) for _, images in rows)
    label = 16
    sheet = Image.new("RGB", (columns * tile, len(rows) * (tile + label)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (title, images) in enumerate(rows):
        y = r * (tile + label)
        draw.text((4, y + 2), title, fill="black")
        for c, image in enumerate(images):
            sheet.paste(image.convert("RGB").resize((tile, tile), Image.Resampling.NEAREST), (c * tile, y + label))
    return sheet
