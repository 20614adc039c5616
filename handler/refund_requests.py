"""The shape of a request: one photo, or several photos answered with a list in the same order.

TorchServe batches *requests* and wants exactly one response per request, so a request that
carries N photos is expanded into N rows of the model's batch (`prepare_requests`) and its N
answers are folded back into one list (`fold_answers`). A single-photo request (every form
`extract_payload` reads) is untouched: one row in, one object out, with its own HTTP status.

Several photos in one request:
  multipart/form-data  one part per photo, named photos[0], photos[1], ... (the index is the
                       photo's place in the answer; other fields are ignored)
  JSON                 {"instances": [photo, ...]} or a bare list [photo, ...], each photo a
                       base64 string, a data URL or {"b64": "..."}
The answer is 200 with a list, one item per photo: its prediction, or its own error
{"error", "code", "status"} (`status`: what it would have got alone, 400 or 413). Only a request
that is malformed as a whole (no photos, a gap in the indices, more than max_photos) gets a 4xx
of its own, 400 with code `bad_request` or `too_many_photos`: a verdict on no photo.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

try:  # inside a model archive every file sits flat in the model dir
    from refund_inference import DEFAULT_DECODE_TIMEOUT_S, Prepared, error_response, error_status, prepare_batch
    from refund_preprocess import ImageError
except ImportError:  # in the repository, as the `handler` package
    from handler.refund_inference import DEFAULT_DECODE_TIMEOUT_S, Prepared, error_response, error_status, prepare_batch
    from handler.refund_preprocess import ImageError

# Photos one request may carry: each becomes a row of the worker's batch, so this times the
# model-config's batchSize bounds one forward pass.
DEFAULT_MAX_PHOTOS = 64
MULTI_KEY = "instances"  # JSON {"instances": [...]}, as KServe's v1 protocol names it
_PART = re.compile(r"photos\[(\d+)\]")


def split_request(request: dict, *, max_photos: int = DEFAULT_MAX_PHOTOS) -> list[dict] | None:
    """One TorchServe request row -> None for a single-photo request (read as it always was), or
    the photos of a multi-photo request, each as a row `extract_payload` reads. A malformed
    multi-photo request raises ImageError (bad_request, too_many_photos)."""
    parts = {int(m.group(1)): value for key, value in request.items()
             if isinstance(key, str) and (m := _PART.fullmatch(key))}
    if parts:
        if sorted(parts) != list(range(len(parts))):
            raise ImageError("bad_request", f"the parts photos[i] must be numbered 0..{len(parts) - 1} without gaps; "
                                            f"got indices {sorted(parts)[:20]}")
        photos = [parts[i] for i in range(len(parts))]
    else:
        body = request.get("body")
        if isinstance(body, dict) and MULTI_KEY in body:
            photos = body[MULTI_KEY]
            if not isinstance(photos, list):
                raise ImageError("bad_request", f'"{MULTI_KEY}" must be a list of photos, not {type(photos).__name__}')
        elif isinstance(body, list):
            photos = body
        else:
            return None
        if not photos:
            raise ImageError("bad_request", "the request carries an empty list of photos")
    if len(photos) > max_photos:
        raise ImageError("too_many_photos", f"the request carries {len(photos)} photos; the limit is {max_photos}")
    return [{"body": photo} for photo in photos]


@dataclass
class Expanded:
    """A batch of requests laid out as photos: `images` holds every photo of the batch in order;
    `shape[r]` says what request r is: the index of its one photo (int), the indices of its photos
    (list), or why it is malformed (ImageError)."""

    images: Prepared
    shape: list[int | list[int] | ImageError]


def prepare_requests(requests: list[dict], image_size: tuple[int, int], *, max_pixels: int, max_bytes: int,
                     max_photos: int = DEFAULT_MAX_PHOTOS, decode_timeout_s: float | None = DEFAULT_DECODE_TIMEOUT_S) -> Expanded:
    rows: list[dict] = []
    shape: list[int | list[int] | ImageError] = []
    for request in requests:
        try:
            photos = split_request(request, max_photos=max_photos)
        except ImageError as exc:
            shape.append(exc)
            continue
        if photos is None:
            shape.append(len(rows))
            rows.append(request)
        else:
            shape.append(list(range(len(rows), len(rows) + len(photos))))
            rows.extend(photos)
    return Expanded(prepare_batch(rows, image_size, max_pixels=max_pixels, max_bytes=max_bytes,
                                  decode_timeout_s=decode_timeout_s), shape)


def fold_answers(expanded: Expanded, answers: list[dict], *, model: str, version: str) -> list[tuple[dict | list, int]]:
    """One (response, HTTP status) per request from the answers of every photo (`answers[i]` for
    photo i: a prediction or the handler's error object). A multi-photo request is 200 with its
    list; each error item carries the `status` it would have got alone."""
    errors = expanded.images.errors
    out: list[tuple[dict | list, int]] = []
    for part in expanded.shape:
        if isinstance(part, ImageError):
            out.append((error_response(part, model=model, version=version), error_status(part)))
        elif isinstance(part, int):
            out.append((answers[part], error_status(errors[part]) if part in errors else 200))
        else:
            out.append(([{**answers[i], "status": error_status(errors[i])} if i in errors else answers[i] for i in part], 200))
    return out


def request_errors(expanded: Expanded) -> list[ImageError]:
    """Why each malformed request of the batch was refused (for the rejects metric)."""
    return [part for part in expanded.shape if isinstance(part, ImageError)]
