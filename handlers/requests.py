"""Turning TorchServe request rows into model inputs and options, and relevance into response fields.

Pure functions, no TorchServe: everything a client can get wrong is decided here and raised as
:class:`RequestError`, which the handler turns into that request's own 4xx answer while the rest of the batch is
served normally.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

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

    def __reduce__(self):  # raised in a parsing process, re-raised in the server's
        return RequestError, (self.field, self.problem, self.status, self.reason)


@dataclass
class Request:
    """One HTTP request: its instances (N, C, H, W) and options; ``many`` when the client sent a list of instances.

    ``protocol`` is how it is answered: ``"unhans"`` (a prediction object, or ``{"predictions": [...]}`` for a list, as
    KServe v1 answers too) or ``"v2"`` (KServe's open inference protocol: output tensors, with the request's ``id``)."""

    inputs: np.ndarray
    many: bool
    explain: bool = False
    targets: list[int | None] = field(default_factory=list)
    format: str = "float16-base64"
    downsample: int = 1
    topk: int | None = None  # None: the archive's default
    protocol: str = "unhans"
    id: str | None = None  # v2: echoed in the answer
    outputs: list[str] | None = None  # v2: the output tensors asked for (None: all)
    binary_outputs: tuple[str, ...] = ()  # v2: those asked for as raw bytes (the binary extension; REST only)


# what a client may send, checked before the work it would cause (the contract's byte, pixel and instance limits too)
MAX_JSON_DEPTH = 64  # a request is at most {"instances": [C [H [W]]]}: deeper JSON is an attack, not an image
V2_OUTPUTS = ("probabilities", "label", "artifact_score", "relevance")
V2_DATATYPES = {"FP32": "<f4", "FP64": "<f8", "FP16": "<f2", "UINT8": "u1", "INT8": "i1", "INT16": "<i2", "INT32": "<i4",
                "INT64": "<i8", "UINT16": "<u2", "BYTES": None}
V2_BINARY_HEADER = "Inference-Header-Content-Length"  # KServe v2's binary tensor extension: JSON, then raw tensor bytes
V2_MAX_DIMS = 4  # (N, C, H, W) is the most a v2 tensor of images has; numpy refuses more than 64


def _image(data: bytes, pre: InputContract, where: str = "body") -> np.ndarray:
    """An encoded image as (C, H, W) pixels; its size is read from the header and refused before anything is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as picture:
                width, height = picture.size
                if width * height > pre.max_image_pixels:
                    raise RequestError(where, f"is a {width}x{height} image, more than the limit of {pre.max_image_pixels:,} "
                                       "pixels; scale it down before sending", 413, reason="image_too_large")
                return pre.pixels(picture)
    except RequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # PIL's own bound, far above ours
        raise RequestError(where, f"is an image of more than PIL's limit of {Image.MAX_IMAGE_PIXELS:,} pixels (unhans takes "
                           f"{pre.max_image_pixels:,}); scale it down before sending", 413, reason="image_too_large") from None
    except Exception as error:  # a decoder may fail in any way on hostile bytes: all of them are this client's mistake
        raise RequestError(where, f"is not a decodable PNG/JPEG image or .npy array ({type(error).__name__}: {error})") from None


def _npy(data: bytes, pre: InputContract) -> np.ndarray:
    """A ``.npy`` body, its header checked (numeric dtype, a size the bytes really hold, within the instance limit)
    before any array is allocated."""
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f"format version {version} is not 1.0 or 2.0")
        shape, _, dtype = read_header(stream)
    except Exception as error:
        raise RequestError("body", f"is not a readable .npy array ({error})") from None
    if dtype.kind not in "biuf":
        raise RequestError("body", f"is a .npy array of dtype {dtype}; send float32 (or integer) pixels", 422)
    count = int(np.prod(shape, dtype=object))
    limit = pre.max_instances * int(np.prod(pre.shape))
    if count > limit:
        raise RequestError("body", f"is a .npy array of shape {list(shape)}, more than {pre.max_instances} instances of "
                           f"{list(pre.shape)}", 413, reason="too_many_instances")
    if count * dtype.itemsize > len(data) - stream.tell():
        raise RequestError("body", f"is a .npy array of shape {list(shape)} whose data is cut short")
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as error:
        raise RequestError("body", f"is not a readable .npy array ({error})") from None


def _array(value, pre: InputContract, where: str) -> np.ndarray:
    """A nested list, an array or ``{"b64": image}`` as one (C, H, W) instance in [0, 1]: shape, channels and
    finiteness checked."""
    if isinstance(value, dict) and set(value) == {"b64"} and isinstance(value["b64"], str):  # KServe v1's binary form
        return _image(_base64(value["b64"], where), pre, where)
    try:
        x = np.asarray(value)  # its own dtype first: float32 would turn the string "0" into a number
        if x.dtype.kind not in "iuf":
            raise TypeError(x.dtype)
        with np.errstate(over="ignore", invalid="ignore"):  # too large for float32 becomes Inf, refused below
            x = x.astype(np.float32)
    except (TypeError, ValueError, OverflowError, RecursionError):
        raise RequestError(where, "is not a numeric array (nested lists of one shape, numbers in [0, 1])") from None
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


def _base64(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raise RequestError(where, "is not valid base64") from None


def _integer(name: str, value, low: int, high: int | None = None) -> int:
    """An integer option: 400 when it is not one (or below ``low``), 422 when it passes ``high``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise RequestError(name, f"is {_shown(value)}; use an integer >= {low}")
    if high is not None and value > high:
        raise RequestError(name, f"is {_shown(value)}, larger than {high} (the relevance map's side); use at most {high}", 422)
    return value


def _shown(value) -> str:
    """A client's value for an error message, cut short (a 400-digit number or a long string stays readable)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _options(source: dict, request: Request, n: int, pre: InputContract, classes: int | None, allowed=()) -> None:
    unknown = sorted(set(source) - set(OPTIONS) - {"instances", "data", "body", "inputs", *allowed}, key=str)
    if unknown:
        raise RequestError(_shown(unknown[0]).strip("'"), f"is not an option; use {list(OPTIONS)}", reason="unknown_option")
    explain = source.get("explain", request.explain)
    if isinstance(explain, str):
        explain = explain.strip().lower() in ("1", "true", "yes")
    elif not isinstance(explain, (bool, int, type(None))):
        raise RequestError("explain", f"is {_shown(explain)}; use true or false")
    request.explain = bool(explain)
    fmt = source.get("format", request.format)
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise RequestError("format", f"{_shown(fmt)} is unknown; use one of {list(FORMATS)}")
    request.format = fmt
    side = max(pre.height, pre.width)
    request.downsample = _integer("downsample", source.get("downsample", request.downsample), 1, side)
    if source.get("topk") is not None:
        value = _integer("topk", source["topk"], 1)
        request.topk = min(value, classes) if classes else value
    target = source.get("target", "predicted")
    targets = target if isinstance(target, list) else [target] * n
    if len(targets) != n:
        raise RequestError("target", f"has {len(targets)} entries for {n} instances; give one, or one per instance")
    request.targets = []
    for t in targets:
        if t in ("predicted", None):
            request.targets.append(None)
        elif isinstance(t, int) and not isinstance(t, bool):
            if classes is not None and not 0 <= t < classes:
                raise RequestError("target", f"{_shown(t)} is not a class index; use 0..{classes - 1}", 422)
            request.targets.append(t)
        else:
            raise RequestError("target", f"{_shown(t)} is not 'predicted' or a class index")


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


def parse(row: dict, pre: InputContract, explain_header: bool = False, classes: int | None = None,
          binary_header_length: str | None = None, topk: int = 3) -> Request:
    """One TorchServe row (``data``/``body``: JSON, image bytes or ``.npy`` bytes, or a KServe v2 request, with the
    binary extension's ``Inference-Header-Content-Length`` header when given) as a :class:`Request`.

    Every limit is checked before the work it guards: bytes, image pixels (from the header), JSON depth, instances, the
    options (``downsample`` at most the map side, targets among ``classes``) and the answer's size, refused with 413
    when it would pass the contract's ``max_response_bytes``. ``topk`` is the archive's default for requests that do
    not ask."""
    request = _parse(row, pre, explain_header, classes, binary_header_length)
    if request.topk is None:
        request.topk = min(topk, classes) if classes else topk
    size = answer_bytes(request, pre)
    if size > pre.max_response_bytes:
        raise RequestError("instances", f"ask for an answer of about {size / 2**20:.1f} MiB, more than the limit of "
                           f"{pre.max_response_bytes / 2**20:.1f} MiB; send fewer instances, a larger 'downsample', or "
                           "format 'float16-base64' or 'none'", 413, reason="answer_too_large")
    return request


def _many(count: int, pre: InputContract, where: str) -> None:
    if count > pre.max_instances:
        raise RequestError(where, f"has {count} instances, more than the limit of {pre.max_instances} a request", 413,
                           reason="too_many_instances")


def _json(data: bytes):
    try:
        return json.loads(data)
    except RecursionError:
        raise RequestError("body", f"is JSON nested too deeply (more than {MAX_JSON_DEPTH} levels)") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise RequestError("body", f"is not valid JSON ({error})") from None


def _depth(value, limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse JSON deeper than ``limit`` without recursing (TorchServe may hand over JSON it already parsed)."""
    level = [value]
    for _ in range(limit + 1):
        level = [child for item in level if isinstance(item, (list, dict)) for child in (item.values() if isinstance(item, dict) else item)
                 if isinstance(child, (list, dict))]
        if not level:
            return
    raise RequestError("body", f"is JSON nested too deeply (more than {limit} levels)")


def _parse(row: dict, pre: InputContract, explain_header: bool, classes: int | None, binary_header_length: str | None) -> Request:
    body = row.get("data") if row.get("data") is not None else row.get("body")
    if body is None or (isinstance(body, (bytes, bytearray, str)) and not body):
        raise RequestError("body", "is empty; send an image, a .npy array or JSON with 'instances'")
    if isinstance(body, str):  # TorchServe decodes text/* bodies
        body = body.encode("utf-8", "surrogatepass")
    if isinstance(body, (bytes, bytearray)):
        body = bytes(body)
        if len(body) > pre.max_payload_bytes:
            raise RequestError("body", f"has {len(body)} bytes, more than the limit of {pre.max_payload_bytes}", 413,
                               reason="body_too_large")
        if binary_header_length is not None:
            return _v2_binary(body, binary_header_length, pre, explain_header, classes)
        if body.startswith(b"\x93NUMPY"):
            return _single(_npy(body, pre), pre, explain_header, classes)
        if body.lstrip()[:1] in (b"{", b"["):
            body = _json(body)
        else:
            request = Request(_image(body, pre)[None], many=False, explain=explain_header)
            _options({}, request, 1, pre, classes)
            return request
    _depth(body)
    if isinstance(body, dict) and _is_v2(body):
        return _v2(body, pre, explain_header, classes)
    if isinstance(body, dict):
        instances = body.get("instances", body.get("inputs"))
        if instances is None:
            raise RequestError("instances", "is missing; send {\"instances\": [...]} or one array")
        if not isinstance(instances, list) or not instances:
            raise RequestError("instances", "must be a non-empty list of arrays")
        _many(len(instances), pre, "instances")
        request = Request(np.stack([_array(x, pre, f"instances[{i}]") for i, x in enumerate(instances)]), many=True, explain=explain_header)
        _options(body, request, len(instances), pre, classes)
        return request
    return _single(body, pre, explain_header, classes)


def _single(value, pre: InputContract, explain_header: bool, classes: int | None) -> Request:
    """A bare array: one instance (C, H, W), or a stack of them (N, C, H, W)."""
    try:
        stack = np.ndim(value) == 4
    except (ValueError, TypeError, OverflowError):
        stack = False  # ragged: _array names the problem
    if stack:
        _many(len(value), pre, "body")
        request = Request(np.stack([_array(x, pre, f"body[{i}]") for i, x in enumerate(value)]), many=True, explain=explain_header)
    else:
        request = Request(_array(value, pre, "body")[None], many=False, explain=explain_header)
    _options({}, request, len(request.inputs), pre, classes)
    return request


def _is_v2(body: dict) -> bool:
    inputs = body.get("inputs")
    return isinstance(inputs, list) and bool(inputs) and all(isinstance(t, dict) for t in inputs)


def _v2(body: dict, pre: InputContract, explain_header: bool, classes: int | None, binary: bytes | None = None) -> Request:
    """A KServe v2 inference request: one input tensor of pixels (N, C, H, W), (C, H, W) or (N, H, W, C) in [0, 1]
    (UINT8 in 0..255), or BYTES of encoded images; options in ``parameters``. ``data`` may be a (nested) list, or an
    array a server has already decoded; ``binary`` the tensor's bytes from the binary extension."""
    unknown = sorted(set(body) - {"id", "inputs", "outputs", "parameters"}, key=str)
    if unknown:
        raise RequestError(_shown(unknown[0]).strip("'"), "is not a field of a KServe v2 request; use id, inputs, outputs, parameters",
                           reason="unknown_option")
    if len(body["inputs"]) != 1:
        raise RequestError("inputs", f"has {len(body['inputs'])} tensors; the model takes one input")
    tensor = body["inputs"][0]
    where = "inputs[0]"
    datatype, shape = tensor.get("datatype"), tensor.get("shape")
    if datatype not in V2_DATATYPES:
        raise RequestError(where, f"has datatype {_shown(datatype)}; use one of {sorted(V2_DATATYPES)}")
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise RequestError(where, f"has shape {_shown(shape)}; give a list of non-negative integers")
    if len(shape) > V2_MAX_DIMS:
        raise RequestError(where, f"has {len(shape)} dimensions; send (N, C, H, W), (N, H, W, C), one (C, H, W) instance, "
                           "or [N] encoded images", 422)
    count = int(np.prod(shape, dtype=object))
    if count == 0:
        raise RequestError(where, f"has shape {shape}, no instances; send at least one")
    if count > pre.max_instances * max(int(np.prod(pre.shape)), 1) and datatype != "BYTES":
        raise RequestError(where, f"has shape {shape}, more than {pre.max_instances} instances", 413, reason="too_many_instances")
    values = _v2_binary_values(binary, datatype, count, where) if binary is not None else tensor.get("data")
    if isinstance(values, np.ndarray) and datatype == "BYTES":  # a server decoded it (KServe): bytes, or text as sent
        values = list(values.ravel())
    elif not isinstance(values, (list, np.ndarray)):
        raise RequestError(where, "has no 'data' list (or binary data)")
    if datatype == "BYTES" and binary is None:
        values = [v if isinstance(v, bytes) else _base64(v, where) if isinstance(v, str) else None for v in _flat(values, where)]
    elif datatype == "BYTES":  # raw bytes, or base64 text of them
        values = [_unbase64(v) for v in values]
    if datatype == "BYTES":
        if len(values) != count or any(v is None for v in values):
            raise RequestError(where, f"has {len(values)} elements for shape {shape}; each one encoded image (base64 in JSON)")
        _many(count, pre, where)
        images = [_image(v, pre, f"{where}[{k}]") for k, v in enumerate(values)]
        request = Request(np.stack(images), many=True, explain=explain_header)
    else:
        array = _v2_array(values, datatype, shape, count, where)
        if datatype == "UINT8":
            array = array / 255.0
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4:
            raise RequestError(where, f"has shape {shape}; send (N, C, H, W), (N, H, W, C) or one (C, H, W) instance", 422)
        _many(len(array), pre, where)
        request = Request(np.stack([_array(x, pre, f"{where}[{k}]") for k, x in enumerate(array)]), many=True, explain=explain_header)
    request.protocol, request.id = "v2", body.get("id")
    if request.id is not None and not isinstance(request.id, str):
        raise RequestError("id", f"is {_shown(request.id)}; use a string")
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise RequestError("parameters", "must be an object of options")
    request.format = "list"  # v2 answers tensors: relevance as numbers
    _options(parameters, request, len(request.inputs), pre, classes, allowed=("binary_data_output",))
    if request.format not in ("list", "none"):
        raise RequestError("format", "a KServe v2 answer carries relevance as a tensor; use 'list' or 'none'")
    request.outputs, binary_outputs = _v2_outputs(body.get("outputs"))
    if binary_outputs is None:  # no output named: all of them, binary where the request says so
        binary_outputs = V2_OUTPUTS if _flag(parameters, "binary_data_output", "parameters") else ()
    request.binary_outputs = tuple(binary_outputs)
    return request


def _flat(values: list, where: str) -> list:
    """A v2 ``data`` list, flat or nested as its shape (both are allowed by the protocol)."""
    flat, stack = [], [iter(values)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _v2_array(values, datatype: str, shape: list[int], count: int, where: str) -> np.ndarray:
    if isinstance(values, np.ndarray):
        if values.size != count or values.dtype.kind not in "biuf":
            raise RequestError(where, f"has {values.size} {values.dtype} values for shape {shape} ({count} numbers)")
        array = values
    else:
        flat = _flat(values, where)
        if len(flat) != count:
            raise RequestError(where, f"has {len(flat)} values for shape {shape} ({count})")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat):
            raise RequestError(where, "has values that are not numbers")
        try:
            array = np.asarray(flat, np.float64)
        except OverflowError:
            raise RequestError(where, "has numbers too large for floats", 422) from None
    with np.errstate(over="ignore", invalid="ignore"):
        return array.astype(np.float32).reshape(shape)


def _v2_outputs(outputs) -> tuple[list[str] | None, list[str] | None]:
    """The output tensors asked for (None: all) and those of them asked for as raw bytes (None: none named)."""
    if outputs is None:
        return None, None
    names = [o.get("name") if isinstance(o, dict) else None for o in outputs] if isinstance(outputs, list) else [None]
    bad = [n for n in names if n not in V2_OUTPUTS]
    if bad:
        raise RequestError("outputs", f"asks for {_shown(bad[0])}; this model answers {list(V2_OUTPUTS)}")
    binary = []
    for k, output in enumerate(outputs):
        parameters = output.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise RequestError(f"outputs[{k}].parameters", "must be an object")
        if _flag(parameters, "binary_data", f"outputs[{k}].parameters"):
            binary.append(names[k])
    return names, binary


def _flag(parameters: dict, name: str, where: str) -> bool:
    value = parameters.get(name, False)
    if not isinstance(value, bool):
        raise RequestError(f"{where}.{name}", f"is {_shown(value)}; use true or false")
    return value


def _unbase64(value: bytes | None) -> bytes | None:
    """A BYTES element as sent: raw bytes (an encoded image never is pure base64 text), or base64 text of them."""
    if value is None:
        return None
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        return value


def _v2_binary(body: bytes, header_length: str, pre: InputContract, explain_header: bool, classes: int | None) -> Request:
    """KServe v2's binary extension: ``Inference-Header-Content-Length`` bytes of JSON, then the tensor's raw bytes."""
    try:
        length = int(header_length)
    except ValueError:
        length = -1
    if not 0 < length <= len(body):
        raise RequestError(V2_BINARY_HEADER, f"is {_shown(header_length)} for a body of {len(body)} bytes; give the length of its JSON part")
    header = _json(body[:length])
    _depth(header)
    if not isinstance(header, dict) or not _is_v2(header):
        raise RequestError("body", "is not a KServe v2 request: its JSON part needs 'inputs' (a list of tensors)")
    tensors = header["inputs"]
    size = (tensors[0].get("parameters") or {}).get("binary_data_size") if len(tensors) == 1 and isinstance(tensors[0].get("parameters"), dict) else None
    if not isinstance(size, int) or isinstance(size, bool) or size != len(body) - length:
        raise RequestError("inputs[0]", f"declares binary_data_size {_shown(size)}, the body holds {len(body) - length} bytes after its JSON")
    return _v2(header, pre, explain_header, classes, binary=body[length:])


def _v2_binary_values(data: bytes, datatype: str, count: int, where: str):
    if datatype != "BYTES":
        dtype = np.dtype(V2_DATATYPES[datatype])
        if len(data) != count * dtype.itemsize:
            raise RequestError(where, f"has {len(data)} bytes of binary data for {count} {datatype} values")
        return np.frombuffer(data, dtype)
    values, offset = [], 0
    while offset + 4 <= len(data) and len(values) <= count:  # each element: u32 length, then its bytes
        (size,) = struct.unpack_from("<I", data, offset)
        values.append(data[offset + 4:offset + 4 + size] if offset + 4 + size <= len(data) else None)
        offset += 4 + size
    if offset != len(data):
        values.append(None)
    return values


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
