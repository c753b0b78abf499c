"""Hostile requests an unhans endpoint must survive before go-live: the corpus that the HTTP fuzz test
(tests/test_handler.py) and ``bench/reliability.py`` send.

Each kind is a class of input that breaks naive serving code: a decompression bomb, a 400-digit number, ``"[" * 5000``,
a ``.npy`` header claiming 10**12 values or a pickle, ragged lists, an absurd ``downsample``, KServe v2 tensors whose
shape, datatype or binary-extension header lies, a body just over the byte limit, the heaviest answer a request may
ask for ... :func:`hostile_requests` takes the kinds in turn, each randomised by the seed (numbers, lengths, where a
body is cut, which endpoint it goes to), so any count of at least ``len(KINDS)`` holds every kind. Each must get its own
JSON answer, a 4xx except for the kinds in :data:`MAY_SUCCEED` (valid requests at a limit), and never a 5xx, a dead
worker or a failed neighbour in the same batch. :func:`as_v2_binary_image` and :func:`as_grpc` send a request the other
ways a KServe client would (:data:`TRANSPORTS`).
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

import numpy as np
from PIL import Image

from unhans.core.contract import InputContract

ENDPOINTS = ("predictions", "explanations", "v1_predict", "v1_explain", "v2_infer")
BINARY_HEADER = "Inference-Header-Content-Length"  # KServe v2's binary tensor extension


def path(endpoint: str, model: str) -> str:
    """The URL path of one of :data:`ENDPOINTS` for a model."""
    return {"predictions": f"/predictions/{model}", "explanations": f"/explanations/{model}",
            "v1_predict": f"/v1/models/{model}:predict", "v1_explain": f"/v1/models/{model}:explain",
            "v2_infer": f"/v2/models/{model}/infer"}[endpoint]


@dataclass
class HostileRequest:
    """One request to send: ``path(request.endpoint, model)``, the body, its content type and extra headers."""

    kind: str
    endpoint: str  # one of ENDPOINTS; path() makes it a URL
    body: bytes
    content_type: str = "application/json"
    headers: dict = field(default_factory=dict)


# a kind's maker: (contract, rng) -> (body, content type, headers); v2_* kinds go to /infer, the others anywhere
Maker = Callable[[InputContract, np.random.Generator], tuple[bytes, str, dict]]
_MAKERS: dict[str, Maker] = {}
HEAVY = ("oversized_answer", "body_too_large")  # megabytes each, or the most work a request may ask for
HEAVY_EVERY = 10  # ... so they come in one round of the kinds out of this many
MAY_SUCCEED = ("huge_topk", "oversized_answer")  # valid requests at a limit: a 200 is right when the contract allows it
# kinds TorchServe's Java frontend answers itself before the handler runs (a malformed form body: its 500; README, "On
# TorchServe"): no setting of TorchServe's changes it, so its fuzz counts them, and the KServe predictor answers them 4xx
TORCHSERVE_FRONTEND = ("form_encoded",)


def _kind(maker: Maker) -> Maker:
    """Register a maker under its kind: its name without the leading underscore."""
    _MAKERS[maker.__name__[1:]] = maker
    return maker


def _json(value) -> tuple[bytes, str, dict]:
    return json.dumps(value).encode(), "application/json", {}


def _zeros(contract: InputContract) -> list:
    return np.zeros(contract.shape).tolist()


def _pick(rng: np.random.Generator, options: list):
    return options[int(rng.integers(len(options)))]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_file(width: int, height: int, idat: bytes) -> bytes:
    """A greyscale 8-bit PNG with this IHDR size and IDAT stream (not checked against each other)."""
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))


@lru_cache(maxsize=2)
def _one_colour_png(side: int) -> bytes:
    """A valid, fully decodable grey PNG of ``side`` x ``side``: a few hundred KB to send, side² bytes to decode.

    Deflating side² bytes takes seconds; after a full flush a compressor's output for a block depends on that block
    alone, so one block of rows is deflated once and repeated (0.2 s for 20000²), the checksum taken over the whole."""
    row = b"\0" + b"\x80" * side  # filter byte "none", then the pixels
    rows_per_block = min(side, 1000)
    blocks, rest = divmod(side, rows_per_block)
    block = row * rows_per_block
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate: the zlib header and checksum are ours
    deflated = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    tail = compressor.compress(row * rest) + compressor.flush(zlib.Z_FINISH)
    checksum = 1
    for _ in range(blocks):
        checksum = zlib.adler32(block, checksum)
    checksum = zlib.adler32(row * rest, checksum)
    return _png_file(side, side, b"\x78\xda" + deflated * blocks + tail + struct.pack(">I", checksum))


@lru_cache(maxsize=8)
def _encoded(shape: tuple[int, int, int], format: str) -> bytes:
    """A valid image of the contract's size (mid-grey) as PNG or JPEG."""
    channels, height, width = shape
    picture = Image.new("L" if channels == 1 else "RGB", (width, height), 128)
    buffer = io.BytesIO()
    picture.save(buffer, format=format)
    return buffer.getvalue()


def _npy(shape: tuple, descr: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue() + data


def _v2(contract: InputContract, drop: str = "", **tensor) -> tuple[bytes, str, dict]:
    fields = {"name": "input", "shape": [1, *contract.shape], "datatype": "FP32", "data": [0.0] * int(np.prod(contract.shape)), **tensor}
    return _json({"inputs": [{k: v for k, v in fields.items() if k != drop}]})


# --- images ------------------------------------------------------------------------------------------------------------

@_kind
def _decompression_bomb(contract, rng):
    return _one_colour_png(20000), "image/png", {}  # 400 M pixels, past PIL's own bomb limit


@_kind
def _huge_image(contract, rng):
    return _one_colour_png(12000), "image/png", {}  # 144 M pixels: under PIL's limit, over the contract's


@_kind
def _png_claiming_size(contract, rng):
    width, height = (int(v) for v in rng.integers(7000, 60000, 2))
    return _png_file(width, height, zlib.compress(b"\0" * 64)), "image/png", {}


@_kind
def _truncated_png(contract, rng):
    png = _encoded(contract.shape, "PNG")
    data_start, data_end = png.index(b"IDAT") + 4, png.index(b"IEND") - 8  # PIL decodes PNGs cut in their last bytes
    return png[: int(rng.integers(8, (data_start + data_end) // 2))], "image/png", {}


@_kind
def _garbage_png(contract, rng):
    return b"\x89PNG\r\n\x1a\n" + rng.bytes(int(rng.integers(1, 2048))), "image/png", {}


@_kind
def _truncated_jpeg(contract, rng):
    jpeg = _encoded(contract.shape, "JPEG")
    return jpeg[: int(rng.integers(4, len(jpeg) - 2))], "image/jpeg", {}


@_kind
def _garbage_jpeg(contract, rng):
    return b"\xff\xd8\xff\xe0" + rng.bytes(int(rng.integers(1, 2048))), "image/jpeg", {}


@_kind
def _random_bytes(contract, rng):
    return rng.bytes(int(rng.integers(1, 4096))), "application/octet-stream", {}


@_kind
def _empty_body(contract, rng):
    return b"", _pick(rng, ["application/octet-stream", "application/json", "image/png"]), {}


# --- JSON --------------------------------------------------------------------------------------------------------------

@_kind
def _huge_integer(contract, rng):
    instance = _zeros(contract)
    instance[0][0][0] = int("9" * 400)
    return _json({"instances": [instance]})


@_kind
def _open_brackets(contract, rng):
    return b"[" * 5000, "application/json", {}


@_kind
def _deep_nesting(contract, rng):
    depth = int(rng.integers(100, 5000))
    return b'{"instances":' * depth + b"0" + b"}" * depth, "application/json", {}


@_kind
def _invalid_utf8(contract, rng):
    return b'{"instances": [[[0.0]]], "format": "' + rng.bytes(8) + b'\xff\xfe"}', "application/json", {}


@_kind
def _truncated_json(contract, rng):
    body = json.dumps({"instances": [_zeros(contract)], "explain": True}).encode()
    return body[: int(rng.integers(1, len(body) - 1))], "application/json", {}


@_kind
def _ragged_list(contract, rng):
    _, height, width = contract.shape
    rows = [[0.0] * (width if k else int(rng.integers(1, width))) for k in range(height)]
    return _json([rows] * contract.channels)


@_kind
def _ragged_instances(contract, rng):
    return _json({"instances": [_zeros(contract), [[0.0] * int(rng.integers(1, 5))]]})


@_kind
def _strings_for_numbers(contract, rng):
    return _json({"instances": [np.full(contract.shape, _pick(rng, ["0", "x", ""]), dtype=object).tolist()]})


@_kind
def _non_finite(contract, rng):
    array = np.zeros(contract.shape)
    array.flat[int(rng.integers(array.size))] = _pick(rng, [float("nan"), float("inf"), float("-inf")])
    value = array.tolist()  # json writes NaN, Infinity, -Infinity literals
    return _json({"instances": [value]} if rng.integers(2) else value)


@_kind
def _out_of_range(contract, rng):
    return _json({"instances": [np.full(contract.shape, _pick(rng, [-0.5, 1.5, 255.0, 1e30])).tolist()]})


@_kind
def _wrong_shape(contract, rng):
    channels, height, width = contract.shape
    shape = _pick(rng, [(channels, height // 2, width), (channels, height, width + 1), (1, 1, 1), (2, channels, height, width, 1)])
    return _json({"instances": [np.zeros(shape).tolist()]})


@_kind
def _wrong_channels(contract, rng):
    _, height, width = contract.shape
    return _json({"instances": [np.zeros((contract.channels + int(rng.integers(1, 4)), height, width)).tolist()]})


@_kind
def _instances_not_list(contract, rng):
    return _json({"instances": _pick(rng, [{"a": 1}, "x", 7, None, True])})


@_kind
def _instances_empty(contract, rng):
    return _json({"instances": []})


@_kind
def _too_many_instances(contract, rng):
    return _json({"instances": [0] * (10 * contract.max_instances)})  # refused on the count, before the values


@_kind
def _unknown_option(contract, rng):
    return _json({"instances": [_zeros(contract)], _pick(rng, ["colour", "__proto__", "", "explain "]): 1})


@_kind
def _bad_downsample(contract, rng):
    return _json({"instances": [_zeros(contract)], "explain": True, "downsample": _pick(rng, [0, -1, 10**6, 10**30, 1.5, "2", True])})


@_kind
def _huge_topk(contract, rng):
    return _json({"instances": [_zeros(contract)], "topk": _pick(rng, [10**6, 10**30])})


@_kind
def _bad_target(contract, rng):
    return _json({"instances": [_zeros(contract)], "explain": True, "target": _pick(rng, [10**9, -5, "x", 2.5, [1, 2], [[1]]])})


@_kind
def _bad_format(contract, rng):
    return _json({"instances": [_zeros(contract)], "explain": True, "format": _pick(rng, ["jpeg", "", 3, None, ["list"]])})


@_kind
def _weird_explain(contract, rng):
    return _json({"instances": [_zeros(contract)], "explain": _pick(rng, [{"yes": 1}, [True], 1.5])})


# --- .npy --------------------------------------------------------------------------------------------------------------

@_kind
def _npy_claiming_huge(contract, rng):
    return _npy((10**12,), "<f4", b"\0" * 64), "application/octet-stream", {}


@_kind
def _npy_pickle(contract, rng):
    return _npy((3,), "|O", b"\x80\x04N." * 3), "application/octet-stream", {}


@_kind
def _npy_truncated(contract, rng):
    size = 4 * int(np.prod(contract.shape))
    return _npy(contract.shape, "<f4", b"\0" * int(rng.integers(0, size))), "application/octet-stream", {}


@_kind
def _npy_wrong_dtype(contract, rng):
    descr = _pick(rng, ["<c8", "<U4"])
    return _npy(contract.shape, descr, b"\0" * (8 * int(np.prod(contract.shape)))), "application/octet-stream", {}


@_kind
def _npy_wrong_shape(contract, rng):
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(_pick(rng, [(3, 5), (contract.channels + 1, *contract.shape[1:]), (1, 1, 1, 1, 1)]), np.float32))
    return buffer.getvalue(), "application/octet-stream", {}


# --- KServe v2 ---------------------------------------------------------------------------------------------------------

@_kind
def _v2_length_mismatch(contract, rng):
    return _v2(contract, data=[0.0] * int(rng.integers(1, np.prod(contract.shape))))


@_kind
def _v2_unknown_datatype(contract, rng):
    return _v2(contract, datatype=_pick(rng, ["COMPLEX64", "fp32", "", 7]))


@_kind
def _v2_bad_shape(contract, rng):
    return _v2(contract, shape=_pick(rng, [[-1, *contract.shape], [10**12, *contract.shape], [10**30], ["1", 28], [], 5]))


@_kind
def _v2_missing_field(contract, rng):
    return _v2(contract, drop=_pick(rng, ["data", "datatype", "shape"]))


@_kind
def _v2_data_not_list(contract, rng):
    return _v2(contract, data=_pick(rng, ["zeros", 0.0, {"a": 1}, None]))


def _v2_binary_header(contract: InputContract) -> bytes:
    size = 4 * int(np.prod(contract.shape))
    return json.dumps({"inputs": [{"name": "input", "shape": [1, *contract.shape], "datatype": "FP32",
                                   "parameters": {"binary_data_size": size}}]}).encode()


@_kind
def _v2_binary_header_lies(contract, rng):
    header = _v2_binary_header(contract)
    body = header + b"\0" * (4 * int(np.prod(contract.shape)))
    length = _pick(rng, [str(len(body) + int(rng.integers(1, 10**6))), str(10**30), "-3", "x", "", str(len(header) // 2)])
    return body, "application/octet-stream", {BINARY_HEADER: length}


@_kind
def _v2_binary_short(contract, rng):
    header = _v2_binary_header(contract)
    return header + b"\0" * int(rng.integers(0, 64)), "application/octet-stream", {BINARY_HEADER: str(len(header))}


@_kind
def _v2_too_many_dims(contract, rng):
    return _v2(contract, shape=[1] * int(rng.integers(5, 70)), data=[0.0])  # numpy takes at most 64 dimensions


@_kind
def _v2_empty_batch(contract, rng):
    return _v2(contract, shape=[0, *contract.shape], data=[])


@_kind
def _v2_binary_size_lies(contract, rng):
    size = 4 * int(np.prod(contract.shape))
    declared = _pick(rng, [str(size), -1, 1.5, None, size + 4, [size]])
    header = json.dumps({"inputs": [{"name": "input", "shape": [1, *contract.shape], "datatype": "FP32",
                                     "parameters": {"binary_data_size": declared}}]}).encode()
    return header + b"\0" * size, "application/octet-stream", {BINARY_HEADER: str(len(header))}


@_kind
def _v2_binary_ragged(contract, rng):
    size = 4 * int(np.prod(contract.shape)) + int(rng.integers(1, 4))  # not a whole number of FP32 values
    header = json.dumps({"inputs": [{"name": "input", "shape": [1, *contract.shape], "datatype": "FP32",
                                     "parameters": {"binary_data_size": size}}]}).encode()
    return header + b"\0" * size, "application/octet-stream", {BINARY_HEADER: str(len(header))}


@_kind
def _v2_binary_no_inputs(contract, rng):
    header = json.dumps(_pick(rng, [{}, {"inputs": []}, {"inputs": {}}, {"outputs": [{"name": "label"}]}, []])).encode()
    return header + b"\0" * 16, "application/octet-stream", {BINARY_HEADER: str(len(header))}


# --- HTTP itself -------------------------------------------------------------------------------------------------------

@_kind
def _form_encoded(contract, rng):
    return _pick(rng, [b"a=b&c=%zz", b"instances=%5B0%5D", b"=&=&%"]), "application/x-www-form-urlencoded", {}


@_kind
def _compressed_body(contract, rng):
    body = zlib.compress(json.dumps({"instances": [_zeros(contract)]}).encode())  # a deflate stream; we inflate nothing
    return body, "application/json", {"Content-Encoding": _pick(rng, ["deflate", "gzip", "br"])}


# --- the heavy ones ----------------------------------------------------------------------------------------------------

@_kind
def _oversized_answer(contract, rng):
    """The most a request may ask for: max_instances instances (each a small PNG, so the body stays small for any image
    size), explained, relevance as JSON lists. Refused with 413 before any work where that answer would pass the
    contract's max_response_bytes; answered (a few MB for 28 x 28) where it fits. Either way the worker survives."""
    instance = {"b64": base64.b64encode(_encoded(contract.shape, "PNG")).decode()}
    return _json({"instances": [instance] * contract.max_instances, "explain": True, "format": "list"})


@_kind
def _body_too_large(contract, rng):
    return _oversized_body(contract.max_payload_bytes), "application/octet-stream", {}


@lru_cache(maxsize=2)
def _oversized_body(limit: int) -> bytes:
    return b"\0" * (limit + 1024)  # just over the handler's limit, under TorchServe's (it has headroom above)


KINDS = list(_MAKERS)
# how a KServe client sends each request: as it is over HTTP, its body as one encoded image of a v2 BYTES tensor in the
# binary extension (tritonclient's way to send an image), or over gRPC (typed contents where the body is a v2 JSON
# tensor protobuf can hold, else raw contents: the binary extension's tensor bytes, or the body as one BYTES image)
TRANSPORTS = ("http", "v2_binary", "grpc")
CONTENTS = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT64": "int64_contents", "UINT8": "uint_contents", "BYTES": "bytes_contents"}


def hostile_requests(contract: InputContract, count: int, seed: int = 0) -> list[HostileRequest]:
    """``count`` hostile requests for a model taking ``contract``'s inputs: the kinds in turn (the :data:`HEAVY` ones in
    every :data:`HEAVY_EVERY`-th round, the first included), each randomised by ``seed``. Large bodies are built once
    and shared between requests."""
    rng, requests, rounds = np.random.default_rng(seed), [], 0
    while len(requests) < count:
        for kind in KINDS:
            if len(requests) == count:
                break
            if kind in HEAVY and rounds % HEAVY_EVERY:
                continue
            body, content_type, headers = _MAKERS[kind](contract, rng)
            endpoint = "v2_infer" if kind.startswith("v2_") else _pick(rng, ENDPOINTS)
            requests.append(HostileRequest(kind, endpoint, body, content_type, headers))
        rounds += 1
    return requests


def _bytes_element(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


def as_v2_binary_image(request: HostileRequest) -> HostileRequest:
    """The request's body sent as the one encoded image of a v2 BYTES tensor, through the binary extension."""
    element = _bytes_element(request.body)
    header = json.dumps({"inputs": [{"name": "input", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(element)}}]}).encode()
    return HostileRequest(request.kind, "v2_infer", header + element, "application/octet-stream",
                          {**request.headers, BINARY_HEADER: str(len(header))})


def as_grpc(request: HostileRequest, model: str, pb):
    """The request as a gRPC v2 ``ModelInferRequest`` (see :data:`TRANSPORTS`) of the generated module ``pb``:
    KServe's ``grpc_predict_v2_pb2`` or tritonclient's ``service_pb2``, the same protocol (one process can load only one
    of the two: their descriptors clash)."""
    message = pb.ModelInferRequest(model_name=model, id=request.kind)
    length = request.headers.get(BINARY_HEADER, "")
    try:
        if length.isdigit() and int(length) <= len(request.body):  # the binary extension: its header, then raw contents
            head, raw = json.loads(request.body[:int(length)]), request.body[int(length):]
            tensor = head["inputs"][0]
            typed = message.inputs.add(name=str(tensor.get("name", "")), datatype=tensor["datatype"], shape=tensor["shape"])
            declared = tensor["parameters"]["binary_data_size"]  # a lie stays one: sent as the tensor's parameter
            kind = {int: "int64_param", str: "string_param", float: "double_param"}[type(declared)]
            setattr(typed.parameters["binary_data_size"], kind, declared)
            message.raw_input_contents.append(raw)
            return message
        if request.kind.startswith("v2_"):
            tensor = json.loads(request.body)["inputs"][0]
            datatype = tensor.get("datatype", "")
            typed = message.inputs.add(name=str(tensor.get("name", "")), datatype=datatype, shape=tensor.get("shape", []))
            values = np.asarray(tensor.get("data", []), dtype=object).ravel().tolist()
            getattr(typed.contents, CONTENTS.get(datatype, "fp32_contents")).extend(values)
            return message
    except Exception:  # what protobuf cannot hold (a string shape, 10**30, ...) goes as an image below
        message = pb.ModelInferRequest(model_name=model, id=request.kind)
    message.inputs.add(name="input", datatype="BYTES", shape=[1])
    message.raw_input_contents.append(_bytes_element(request.body))
    return message
