"""Turning TorchServe request rows into model inputs and options, and relevance into response fields.

Pure functions, no TorchServe: everything a client can get wrong is decided here and raised as
:class:`RequestError`, which the handler turns into that request's own 4xx answer while the rest of the batch is
served normally.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

from unhans.core.contract import InputContract

OPTIONS = ("explain", "target", "format", "downsample", "topk")
FORMATS = ("none", "float16-base64", "png", "list")


class RequestError(Exception):
    """A client mistake in one request: answered with ``status`` and a JSON body naming the field and the problem."""

    def __init__(self, field: str, problem: str, status: int = 400, reason: str | None = None):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem, self.status = field, problem, status
        # a bounded label for metrics: the field without its index, or a fixed word where the client picks the name
        self.reason = reason or field.split("[")[0]

    def body(self) -> dict:
        return {"error": {"field": self.field, "problem": self.problem, "status": self.status}}


@dataclass
class Request:
    """One HTTP request: its instances (N, C, H, W) and options; ``many`` when the client sent ``instances``."""

    inputs: np.ndarray
    many: bool
    explain: bool = False
    targets: list[int | None] = field(default_factory=list)
    format: str = "float16-base64"
    downsample: int = 1
    topk: int = 3


def _image(data: bytes, pre: InputContract) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as picture:
            return pre.pixels(picture)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise RequestError("body", f"is not a decodable PNG/JPEG image or .npy array ({error})") from None


def _array(value, pre: InputContract, where: str) -> np.ndarray:
    """A nested list or array as one (C, H, W) instance in [0, 1]: shape, channels and finiteness checked."""
    try:
        x = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise RequestError(where, "is not a numeric array") from None
    if x.ndim == 2 and pre.channels == 1:
        x = x[None]
    if x.ndim == 3 and x.shape[-1] == pre.channels and x.shape[0] != pre.channels:
        x = x.transpose(2, 0, 1)
    if x.shape != pre.shape:
        channel_hint = f" (got {x.shape[0]} channels, the model takes {pre.channels})" if x.ndim == 3 and x.shape[1:] == pre.shape[1:] else ""
        raise RequestError(where, f"has shape {list(x.shape)}, the model takes {list(pre.shape)} (C, H, W){channel_hint}", 422)
    if not np.isfinite(x).all():
        raise RequestError(where, "contains NaN or Inf", 422)
    if x.min() < 0 or x.max() > 1:
        raise RequestError(where, f"has values in [{x.min():.3g}, {x.max():.3g}]; send pixels scaled to [0, 1]", 422)
    return x


def _options(source: dict, request: Request, n: int) -> None:
    unknown = sorted(set(source) - set(OPTIONS) - {"instances", "data", "body", "inputs"})
    if unknown:
        raise RequestError(unknown[0], f"is not an option; use {list(OPTIONS)}", reason="unknown_option")
    explain = source.get("explain", request.explain)
    if isinstance(explain, str):
        explain = explain.strip().lower() in ("1", "true", "yes")
    request.explain = bool(explain)
    fmt = source.get("format", request.format)
    if fmt not in FORMATS:
        raise RequestError("format", f"{fmt!r} is unknown; use one of {list(FORMATS)}")
    request.format = fmt
    for name in ("downsample", "topk"):
        value = source.get(name, getattr(request, name))
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RequestError(name, f"is {value!r}; use an integer >= 1")
        setattr(request, name, value)
    target = source.get("target", "predicted")
    targets = target if isinstance(target, list) else [target] * n
    if len(targets) != n:
        raise RequestError("target", f"has {len(targets)} entries for {n} instances; give one, or one per instance")
    request.targets = []
    for t in targets:
        if t in ("predicted", None):
            request.targets.append(None)
        elif isinstance(t, int) and not isinstance(t, bool):
            request.targets.append(t)
        else:
            raise RequestError("target", f"{t!r} is not 'predicted' or a class index")


# bytes of one instance's answer without relevance (label, class, probabilities' names and values), and per relevance
# cell in each format (float16-base64: 2 bytes as base64; list: a JSON float; png: RGB as base64, uncompressed at worst)
ANSWER_BYTES = 300
TOPK_BYTES = 80
RELEVANCE_CELL_BYTES = {"none": 0, "float16-base64": 3, "list": 26, "png": 4}


def answer_bytes(request: Request, pre: InputContract) -> int:
    """An upper estimate of the answer's size, known before any work: instances x (fields + relevance in its format)."""
    cells = 0
    if request.explain:
        cells = -(-pre.height // request.downsample) * -(-pre.width // request.downsample)
    return len(request.inputs) * (ANSWER_BYTES + TOPK_BYTES * request.topk + cells * RELEVANCE_CELL_BYTES[request.format])


def parse(row: dict, pre: InputContract, explain_header: bool = False) -> Request:
    """One TorchServe row (``data``/``body``: JSON, image bytes or ``.npy`` bytes) as a :class:`Request`, refused with
    413 when the answer it asks for would pass the contract's ``max_response_bytes``."""
    request = _parse(row, pre, explain_header)
    if request.downsample > max(pre.height, pre.width):
        raise RequestError("downsample", f"is {request.downsample}, larger than the {pre.height}x{pre.width} map; use at most "
                           f"{max(pre.height, pre.width)}", 422)
    size = answer_bytes(request, pre)
    if size > pre.max_response_bytes:
        raise RequestError("instances", f"ask for an answer of about {size / 2**20:.1f} MiB, more than the limit of "
                           f"{pre.max_response_bytes / 2**20:.1f} MiB; send fewer instances, a larger 'downsample', or "
                           "format 'float16-base64' or 'none'", 413, reason="answer_too_large")
    return request


def _many(count: int, pre: InputContract, where: str) -> None:
    if count > pre.max_instances:
        raise RequestError(where, f"has {count} instances, more than the limit of {pre.max_instances} a request", 413)


def _parse(row: dict, pre: InputContract, explain_header: bool) -> Request:
    body = row.get("data") if row.get("data") is not None else row.get("body")
    if body is None:
        raise RequestError("body", "is empty; send an image, a .npy array or JSON with 'instances'")
    if isinstance(body, (bytes, bytearray)) and len(body) > pre.max_payload_bytes:
        raise RequestError("body", f"has {len(body)} bytes, more than the limit of {pre.max_payload_bytes}", 413)
    if isinstance(body, (bytes, bytearray)):
        body = bytes(body)
        if body.startswith(b"\x93NUMPY"):
            try:
                array = np.load(io.BytesIO(body), allow_pickle=False)
            except ValueError as error:
                raise RequestError("body", f"is not a readable .npy array ({error})") from None
            return _single(array, pre, explain_header)
        if body[:1] in (b"{", b"["):
            try:
                body = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise RequestError("body", f"is not valid JSON ({error})") from None
        else:
            request = Request(_image(body, pre)[None], many=False, explain=explain_header)
            _options({}, request, 1)
            return request
    if isinstance(body, dict):
        instances = body.get("instances", body.get("inputs"))
        if instances is None:
            raise RequestError("instances", "is missing; send {\"instances\": [...]} or one array")
        if not isinstance(instances, list) or not instances:
            raise RequestError("instances", "must be a non-empty list of arrays")
        _many(len(instances), pre, "instances")
        request = Request(np.stack([_array(x, pre, f"instances[{i}]") for i, x in enumerate(instances)]), many=True, explain=explain_header)
        _options(body, request, len(instances))
        return request
    return _single(body, pre, explain_header)


def _single(value, pre: InputContract, explain_header: bool) -> Request:
    """A bare array: one instance (C, H, W), or a stack of them (N, C, H, W) as KServe v2 inputs carry."""
    if np.ndim(value) == 4:
        _many(len(value), pre, "body")
        request = Request(np.stack([_array(x, pre, f"body[{i}]") for i, x in enumerate(value)]), many=True, explain=explain_header)
    else:
        request = Request(_array(value, pre, "body")[None], many=False, explain=explain_header)
    _options({}, request, len(request.inputs))
    return request


def decode_relevance(packed: dict | list) -> np.ndarray:
    """A relevance field of an answer (``float16-base64`` or ``list``) as a float32 map: what a Python client calls."""
    if isinstance(packed, list):
        return np.asarray(packed, np.float32)
    if "png" in packed:
        raise ValueError("a 'png' relevance is a picture; ask for format 'float16-base64' or 'list' for the values")
    values = np.frombuffer(base64.b64decode(packed["data"]), np.float16).reshape(packed["shape"]).astype(np.float32)
    return values * np.float32(packed.get("scale", 1.0))


def encode_relevance(relevance: np.ndarray, fmt: str, downsample: int) -> dict | list | None:
    """One instance's relevance (C, H, W), channels summed and sum-pooled by ``downsample``, in the asked format."""
    if fmt == "none":
        return None
    heat = relevance.sum(axis=0)
    if downsample > 1:
        h, w = heat.shape
        heat = np.pad(heat, ((0, -h % downsample), (0, -w % downsample)))
        heat = heat.reshape(heat.shape[0] // downsample, downsample, heat.shape[1] // downsample, downsample).sum(axis=(1, 3))
    if fmt == "list":
        return heat.astype(float).tolist()
    if fmt == "float16-base64":  # scaled to max |value| 1 first: real models' maps (1e-8 a pixel) underflow float16
        scale = float(np.abs(heat).max()) or 1.0
        data = base64.b64encode((heat / scale).astype(np.float16).tobytes()).decode()
        return {"dtype": "float16", "shape": list(heat.shape), "scale": scale, "data": data}
    from zennit.image import imgify

    buffer = io.BytesIO()
    imgify(heat, symmetric=True, cmap="coldnhot").save(buffer, format="PNG")
    return {"png": base64.b64encode(buffer.getvalue()).decode(), "shape": list(heat.shape)}
