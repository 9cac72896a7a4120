"""Reading ``.safetensors`` files that may come from a stranger: one module, one header check.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON (each
tensor's dtype, shape and byte range; an optional ``__metadata__`` table of strings), then the
raw bytes. Nothing is unpickled and no code runs, but a header can still lie about sizes. So
:func:`read_header` checks the header against the file before any tensor is read:

* ``N`` fits the file and at most :data:`MAX_HEADER` bytes; the JSON is an object;
* every tensor has a known dtype, a shape of non-negative integers, and a byte range whose
  length is ``numel * itemsize``, inside the data section, not overlapping another;
* metadata values are strings.

:func:`read_safetensors` then lets the caller check the declared names, dtypes and shapes
(``check``) before it reads a single tensor, so memory stays bounded by what the caller
expects, not by what the file claims. Every failure is an
:class:`~metascale.errors.ExportFormatError` (or the ``error`` class given) with one line.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from .errors import ExportFormatError

MAX_HEADER = 16 * 2 ** 20
"""Largest header (JSON) accepted, in bytes."""

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


def clip_text(text: str, limit: int = 160) -> str:
    """``text`` cut to ``limit`` characters (with an ellipsis), for one-line error messages."""
    text = str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_header(path: str | Path, error: type[Exception] = ExportFormatError,
                ) -> tuple[dict[str, str], dict[str, tuple[torch.dtype, tuple[int, ...]]]]:
    """``(metadata, {name: (dtype, shape)})`` of a safetensors file, checked against the file
    (see the module doc); nothing but the header is read."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise error(f"{path}: not a readable safetensors file (truncated or corrupted?): shorter than its 8-byte "
                        "header length")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, MAX_HEADER):
            raise error(f"{path}: not a readable safetensors file (truncated or corrupted?): declares a {n}-byte "
                        f"header in a {size}-byte file")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError, UnicodeDecodeError):
        raise error(f"{path}: not a readable safetensors file (truncated or corrupted?): its header is not valid "
                    "JSON") from None
    if not isinstance(header, dict):
        raise error(f"{path}: not a readable safetensors file (truncated or corrupted?): its header is not a JSON "
                    "object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise error(f"{path}: metadata must map strings to strings")
    data_size, ranges, out = size - 8 - n, [], {}
    for name, entry in header.items():
        ok = isinstance(entry, dict) and entry.get("dtype") in DTYPES and isinstance(entry.get("shape"), list) \
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry["shape"]) \
            and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2 \
            and all(isinstance(o, int) and not isinstance(o, bool) for o in entry["data_offsets"])
        if not ok:
            raise error(f"{path}: tensor {clip_text(repr(name), 60)} has a malformed header entry")
        dtype, shape = DTYPES[entry["dtype"]], tuple(entry["shape"])
        lo, hi = entry["data_offsets"]
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if not (0 <= lo <= hi <= data_size) or hi - lo != nbytes:
            raise error(f"{path}: not a readable safetensors file (truncated or corrupted?): tensor "
                        f"{clip_text(repr(name), 60)} declares shape {clip_text(shape, 60)} ({nbytes} bytes) at bytes "
                        f"[{lo}, {hi}) of a {data_size}-byte data section")
        ranges.append((lo, hi))
        out[name] = (dtype, shape)
    ranges.sort()
    if any(a[1] > b[0] for a, b in zip(ranges, ranges[1:])):
        raise error(f"{path}: tensors overlap in the data section")
    return meta, out


def read_safetensors(path: str | Path, fmt: str | None = None, version: str | None = None, *,
                     check: Callable[[dict[str, str], dict[str, tuple[torch.dtype, tuple[int, ...]]]], None] | None
                     = None, error: type[Exception] = ExportFormatError) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """``(metadata, tensors)`` of a safetensors file.

    ``fmt``/``version``: refuse a file whose metadata ``format``/``format_version`` differ.
    ``check(metadata, declared)``: called with the header before any tensor is read; it raises
    to refuse the file (e.g. a declared shape the stored config does not imply)."""
    path = Path(path)
    meta, declared = read_header(path, error)
    if fmt is not None and meta.get("format") != fmt:
        what = fmt.split(".")[-1]
        raise error(f"{path}: not a metascale {what} file (format = {clip_text(repr(meta.get('format')), 60)})")
    if version is not None and meta.get("format_version") != version:
        raise error(f"{path}: file format version {clip_text(repr(meta.get('format_version')), 40)}; this "
                    f"metascale reads version {version!r}")
    if check is not None:
        check(meta, declared)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for corrupt input
        raise error(f"{path}: not a readable safetensors file (truncated or corrupted?): "
                    f"{type(e).__name__}: {clip_text(str(e).splitlines()[0] if str(e) else '')}") from None
    return meta, tensors
