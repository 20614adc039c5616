"""Image preprocessing shared by training, evaluation and the TorchServe handler.

This is the one definition: training caches `to_uint8_tensor(decode_image(...))` and
the handler runs the same two calls, then both call `normalize`. Nothing here imports
from training/ or ingest/, because only handler files travel inside the model archive.
"""
from __future__ import annotations

import io
import warnings

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Far above any product photo, far below what exhausts a worker's memory (~50 MP ~ 150 MB RGB).
DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_MAX_BYTES = 20 * 1024 * 1024


class ImageError(ValueError):
    """An input that cannot become a model input. `code` is machine-readable."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Image.Image:
    """Bytes of any common image format -> an upright RGB PIL image, or ImageError.

    JPEG, PNG, WebP, BMP, TIFF, GIF (first frame); modes 1, L, P, RGB(A), LA, CMYK, I;16, I, F.
    The pixel limit is checked from the header, before anything is decompressed. PIL's own
    bomb guard (Image.MAX_IMAGE_PIXELS, left at its default) still caps it at ~179 MP.
    """
    if not data:
        raise ImageError("empty", "the image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise ImageError("too_large", f"the payload is {len(data)} bytes; the limit is {max_bytes}")
    try:
        with warnings.catch_warnings():
            # PIL warns between MAX_IMAGE_PIXELS and twice that; our own limit below decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageError("too_many_pixels", f"the image is a decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageError("not_an_image", "the bytes are not an image in a supported format "
                                         "(JPEG, PNG, WebP, BMP, TIFF, GIF)") from exc
    except Exception as exc:  # PIL raises a zoo of types for garbage headers
        raise ImageError("not_an_image", f"cannot read the image header: {exc}") from exc
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError(
            "too_many_pixels",
            f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
        )
    try:
        img.seek(0)  # GIF/TIFF/WebP: the first frame
        img.load()
    except Exception as exc:
        # One code for truncated and damaged pixel data (ingestion records "corrupt: <message>").
        what = "truncated" if "truncated" in str(exc) else "corrupt"
        raise ImageError("corrupt", f"the image data is {what}: {exc}") from exc
    try:
        # In place: a photo without an orientation (nearly all) is not copied. Pillow turns the pixels
        # before it rewrites the EXIF block, so a photo whose orientation is readable is upright even
        # where the rest of its EXIF cannot be written back (a zero denominator, say) and this raises.
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:  # a broken EXIF block is no reason to refuse a readable photo
        pass
    try:
        return _to_rgb(img)
    except Exception as exc:
        raise ImageError("unsupported_mode", f"cannot convert an image of mode {img.mode!r} to RGB: {exc}") from exc


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    elif img.mode in ("L", "RGB") and "transparency" in img.info:  # a colour key: one value means "transparent"
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Product shots sit on white: composite transparency on white, not black.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit grayscale: scale to 8 bits instead of clipping at 255.
        img = img.point(lambda v: v / 256).convert("L")
    if img.mode == "F":
        img = img.convert("L")
    return img if img.mode == "RGB" else img.convert("RGB")  # convert() would copy an RGB image


def to_uint8_tensor(img: Image.Image, image_size: tuple[int, int]) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor (3, H, W) resized to image_size = (H, W).

    The tensor keeps the image's own pixel order (H, W, 3) in memory, which is the channels_last
    layout the model runs in: a batch stacked from such tensors is channels_last with no further
    copy, and copying one into a (3, H, W) slot of a contiguous batch works as for any tensor."""
    height, width = image_size
    if img.size != (width, height):
        img = img.resize((width, height), Image.BILINEAR, reducing_gap=None)
    buf = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return buf.view(height, width, 3).permute(2, 0, 1)  # (3, H, W), strides of (H, W, 3)


def normalize(
    batch: torch.Tensor,
    *,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> torch.Tensor:
    """uint8 (B, 3, H, W) or (3, H, W) -> float32 normalized, same shape and memory layout; 3 channels,
    one mean and std each.

    One new tensor, worked on in place: the same arithmetic, bit for bit, as (x / 255 - mean) / std."""
    x = batch.to(torch.float32, copy=True)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device)
    s = torch.tensor(std, dtype=torch.float32, device=x.device)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        # Channels innermost: seen as rows of W pixels x 3 channels, so that the per-channel
        # constants, tiled along a row, broadcast over long runs instead of runs of 3.
        n, c, h, w = x.shape
        view, m, s = x.permute(0, 2, 3, 1).view(n * h, w * c), m.repeat(w), s.repeat(w)
    else:
        view, m, s = x, m.view(-1, 1, 1), s.view(-1, 1, 1)
    view.div_(255.0).sub_(m).div_(s)
    return x


def load_for_model(data: bytes, image_size: tuple[int, int], **limits) -> torch.Tensor:
    """Bytes -> uint8 (3, H, W): what both the handler and training's cache hold."""
    return to_uint8_tensor(decode_image(data, **limits), image_size)
