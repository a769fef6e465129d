"""Init images and masks as A1111 clients send them, made ready for the engine (PIL only).

- `decode`: base64 or a `data:` URI -> a PIL image; a non-image, a truncated or damaged image
  or one beyond the size limit is a BadRequest naming the field.
- `prepare`: what AUTOMATIC1111's img2img does to its inputs before sampling: transparency
  flattened onto white, the mask made binary (its alpha channel when it has one) and inverted if
  asked, `inpainting_fill` other than 1 (the masked area filled with a heavily blurred copy of
  the rest, its masking.fill, which A1111 does for 0, 2 and 3 alike), and `inpaint_full_res`
  ("only masked": the region around the mask, padded and widened to the output's aspect ratio,
  is what the engine draws; `Paste` puts the result back into the full image through the
  blurred mask). A mask of another size than its init image is
  stretched to it first (A1111 resizes the mask to the output size with its resize mode 0).
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass

from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from sdaccel.serve.checks import BadRequest
from sdaccel.start import ImageStart

BACKGROUND = "#ffffff"  # A1111's img2img_background_color, where an init image is transparent


def decode(value: object, field: str, max_pixels: int) -> Image.Image:
    """A base64 image (or a `data:image/...;base64,` URI) as a loaded PIL image."""
    if not isinstance(value, str) or not value:
        raise BadRequest(field, "expected a base64 image (or a data: URI)")
    if value.startswith(("http://", "https://")):
        raise BadRequest(field, "URLs are not fetched; send the image as base64")
    data = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)  # line breaks allowed
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(field, f"not base64 ({exc})") from None
    try:
        image = Image.open(io.BytesIO(raw))
        if image.width * image.height > max_pixels:
            raise BadRequest(field, f"{image.width}x{image.height} is beyond the server's limit "
                             f"of {max_pixels} pixels for an image sent")
        image.load()
    except BadRequest:
        raise
    except UnidentifiedImageError:
        raise BadRequest(field, "not an image (PNG, JPEG, WebP... as base64)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadRequest(field, f"truncated or damaged image ({exc})") from None
    return _upright(image)


def _upright(image: Image.Image) -> Image.Image:
    """EXIF rotation applied, a palette's transparency as alpha (A1111's fix_image)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGB", "P") and isinstance(image.info.get("transparency"), bytes):
        image = image.convert("RGBA")
    return image


def flatten(image: Image.Image) -> Image.Image:
    """RGB, transparency composited onto the background colour."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND)
        background.alpha_composite(rgba)
        return background.convert("RGB")
    return image.convert("RGB")


def binary_mask(mask: Image.Image, invert: bool = False) -> Image.Image:
    """A1111's create_binary_mask (mask_round on): the alpha channel where the mask has a
    transparent part, else its grey levels; white (> 128) draws again."""
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        grey = mask.split()[-1]
    else:
        grey = mask.convert("L")
    binary = grey.point(lambda v: 255 if v > 128 else 0)
    return ImageOps.invert(binary) if invert else binary


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """inpainting_fill 0: the masked area painted with ever less blurred copies of the rest of
    the image (A1111's masking.fill), so that the sampler starts from its colours."""
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    out = Image.new("RGBA", image.size)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(blurred)
    return out.convert("RGB")


def crop_region(mask: Image.Image, padding: int, width: int, height: int
                ) -> tuple[int, int, int, int] | None:
    """The box around the mask's white pixels, `padding` wider, then widened (or heightened)
    to width:height within the image (A1111's get_crop_region and expand_crop_region); None for
    an empty mask."""
    box = mask.getbbox()
    if box is None:
        return None
    w, h = mask.size
    x1, y1, x2, y2 = (max(box[0] - padding, 0), max(box[1] - padding, 0),
                      min(box[2] + padding, w), min(box[3] + padding, h))
    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = _widen(y1, y2, int((x2 - x1) * height / width - (y2 - y1)), h)
    else:
        x1, x2 = _widen(x1, x2, int((y2 - y1) * width / height - (x2 - x1)), w)
    return x1, y1, x2, y2


def _widen(a: int, b: int, grow: int, size: int) -> tuple[int, int]:
    """[a, b) grown by `grow` (half each side), shifted back inside [0, size)."""
    a, b = a - grow // 2, b + grow - grow // 2
    if b >= size:
        a, b = a - (b - size), size
    if a < 0:
        a, b = 0, b - a
    return a, min(b, size)


@dataclass(frozen=True)
class Paste:
    """inpaint_full_res: where the drawn region goes back into the full init image."""

    original: Image.Image  # the flattened init image, full size
    mask: Image.Image  # L: the mask at the original's size, blurred (the overlay's alpha)
    box: tuple[int, int, int, int]

    def apply(self, drawn: Image.Image) -> Image.Image:
        x1, y1, x2, y2 = self.box
        region = drawn.convert("RGB").resize((x2 - x1, y2 - y1), Image.Resampling.LANCZOS)
        out = self.original.copy()
        out.paste(region, (x1, y1), self.mask.crop(self.box))
        return out


@dataclass(frozen=True)
class Inpaint:
    """The inpaint fields of an img2img request."""

    mask: Image.Image | None = None
    blur: int = 4
    fill: int = 1  # 1 original; 0 fill (and 2, 3: filled too, as A1111 does first)
    full_res: bool = False
    padding: int = 0
    invert: bool = False


@dataclass(frozen=True)
class Prepared:
    start: ImageStart  # one image (and mask) per init image, as the engine takes them
    pastes: tuple[Paste | None, ...] | None  # inpaint_full_res: one per init image

    def finish(self, index: int, drawn: Image.Image) -> Image.Image:
        """Result `index` of a batch (init image index % count) as the client gets it."""
        if self.pastes is None:
            return drawn
        paste = self.pastes[index % len(self.pastes)]
        return drawn if paste is None else paste.apply(drawn)


def prepare(images: list[Image.Image], inpaint: Inpaint, width: int, height: int) -> Prepared:
    """The engine's start for these init images: see the module's docstring."""
    flat = [flatten(image) for image in images]
    if inpaint.mask is None:
        return Prepared(ImageStart(flat), None)
    mask = binary_mask(inpaint.mask, inpaint.invert)
    if mask.getbbox() is None:  # nothing to draw again: image to image, as A1111
        return Prepared(ImageStart(flat), None)
    masks = [_sized(mask, image.size) for image in flat]
    if not inpaint.full_res:
        starts = [fill(i, m) if inpaint.fill != 1 else i for i, m in zip(flat, masks, strict=True)]
        return Prepared(ImageStart(starts, masks, inpaint.blur), None)
    crops, crop_masks, pastes = [], [], []
    for image, image_mask in zip(flat, masks, strict=True):
        blurred = image_mask.filter(ImageFilter.GaussianBlur(inpaint.blur)) \
            if inpaint.blur else image_mask
        box = crop_region(blurred, inpaint.padding, width, height) or (0, 0, *image.size)
        crop, crop_mask = image.crop(box), image_mask.crop(box)
        crops.append(fill(crop, crop_mask) if inpaint.fill != 1 else crop)
        crop_masks.append(crop_mask)
        pastes.append(Paste(image, blurred, box))
    return Prepared(ImageStart(crops, crop_masks, inpaint.blur), tuple(pastes))


def _sized(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The mask stretched to an init image's size (Lanczos, as A1111's resize mode 0), binary
    again."""
    if mask.size == size:
        return mask
    return mask.resize(size, Image.Resampling.LANCZOS).point(lambda v: 255 if v > 128 else 0)
