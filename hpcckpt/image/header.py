"""The image header record: its fixed part, its JSON, and the metadata decoded from it, checked."""

from __future__ import annotations

import json
from typing import Any

from hpcckpt.image import format as F
from hpcckpt.image.model import FieldError, ImageMeta, meta_from_json
from hpcckpt.image.records import Record, RecordReader


def json_payload(r: RecordReader, rec: Record, data: memoryview) -> Any:
    if data.nbytes > F.MAX_JSON:
        raise r.corrupt(f"JSON of {data.nbytes} bytes exceeds {F.MAX_JSON}", rec=rec)
    try:
        return json.loads(bytes(data).decode("utf-8", "surrogateescape"))
    except (ValueError, RecursionError) as exc:
        raise r.corrupt(f"malformed JSON: {exc}", rec=rec) from exc


def parse_header(r: RecordReader, rec: Record) -> tuple[ImageMeta, dict[str, Any]]:
    if rec.rtype != F.T_HEADER or rec.index != 0:
        raise r.corrupt("the first record must be the image header", rec=rec)
    p = rec.payload
    if p.nbytes < F.HEADER_FIXED.size:
        raise r.corrupt(f"header payload of {p.nbytes} bytes is too short", rec=rec)
    flags, json_len, created = F.HEADER_FIXED.unpack(p[: F.HEADER_FIXED.size])
    if json_len != p.nbytes - F.HEADER_FIXED.size:
        raise r.corrupt(f"header JSON length {json_len} disagrees with the record length", rec=rec)
    doc = json_payload(r, rec, p[F.HEADER_FIXED.size :])
    if not isinstance(doc, dict) or not isinstance(doc.get("system"), dict):
        raise r.corrupt("header JSON lacks its 'system' object", rec=rec)
    try:
        meta = meta_from_json(doc.get("meta"))
    except FieldError as exc:
        raise r.corrupt(f"header metadata: {exc}", rec=rec) from exc
    system = {k: v for k, v in doc["system"].items() if isinstance(v, (str, int, float))}
    header = {
        "format_version": f"{r.version[0]}.{r.version[1]}",
        "flags": flags,
        "created": created,
        **{k: system.get(k, "") for k in ("arch", "kernel_release", "kernel_version", "machine", "hostname")},
    }
    return meta, header
