"""Byte-exact wire format for sparse payloads.

A sparse payload is one flat uint8 tensor, so its length *is* the number of bytes sent and one
all_gather moves it whatever dtypes it holds. Layout:

    int32 header: [n_meta, n_fields, *meta, *field_nbytes]  then the fields' bytes, back to back

Index sets (sorted positions in a bucket of `numel` elements) are coded three ways and the
smallest wins: int32 positions (4 B each); uint16 gaps (2 B each; a gap >= 65535 is written as
65535-codes that only skip ahead, then the remainder); or a bitmap over the bucket (numel/8 B).
All boards we target are little-endian.
"""

from __future__ import annotations

import torch
from torch import Tensor

IDX_INT32, IDX_GAP16, IDX_BITMAP = 0, 1, 2
_BIT_WEIGHTS = [1, 2, 4, 8, 16, 32, 64, 128]


def as_bytes(t: Tensor) -> Tensor:
    """Reinterpret a tensor's memory as uint8 (no copy when contiguous)."""
    t = t.contiguous().reshape(-1)
    return t if t.dtype == torch.uint8 else t.view(torch.uint8)


def from_bytes(b: Tensor, dtype: torch.dtype) -> Tensor:
    """Inverse of `as_bytes`; copies first so the storage offset is aligned for `dtype`."""
    return b if dtype == torch.uint8 else b.clone().view(dtype)


def pack(meta: list[int], fields: list[Tensor], device: torch.device) -> Tensor:
    sizes = [f.numel() * f.element_size() for f in fields]
    header = torch.tensor([len(meta), len(fields), *meta, *sizes], dtype=torch.int32)
    parts = [as_bytes(header).to(device)] + [as_bytes(f) for f in fields if f.numel()]
    return torch.cat(parts)


def unpack(buf: Tensor) -> tuple[list[int], list[Tensor]]:
    """-> (meta, fields as uint8 tensors)."""
    n_meta, n_fields = from_bytes(buf[:8], torch.int32).tolist()
    head_len = 4 * (2 + n_meta + n_fields)
    head = from_bytes(buf[:head_len], torch.int32).tolist()
    meta, sizes = head[2:2 + n_meta], head[2 + n_meta:]
    fields, off = [], head_len
    for n in sizes:
        fields.append(buf[off:off + n])
        off += n
    if off != buf.numel():
        raise ValueError(f"corrupt payload: {buf.numel()} bytes, header describes {off}")
    return meta, fields


def pack_bits(mask: Tensor) -> Tensor:
    """bool[n] -> uint8[ceil(n/8)], bit i of byte j is mask[8j+i]."""
    n = mask.numel()
    pad = (-n) % 8
    m = torch.nn.functional.pad(mask.to(torch.uint8), (0, pad)).view(-1, 8)
    w = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=mask.device)
    return (m * w).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(b: Tensor, n: int) -> Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device)
    bits = (b.unsqueeze(1) >> shifts) & 1
    return bits.reshape(-1)[:n].bool()


SKIP = 65535  # a uint16 gap code that advances the position without emitting one


def _gap16(gaps: Tensor) -> Tensor:
    """Gaps -> uint16 codes (as bytes): gap g becomes g // SKIP skip codes, then g % SKIP."""
    skips = gaps // SKIP
    codes = torch.full((gaps.numel() + int(skips.sum()),), SKIP, dtype=torch.int32,
                       device=gaps.device)
    codes[torch.cumsum(skips + 1, dim=0) - 1] = (gaps - skips * SKIP).to(torch.int32)
    return torch.stack([codes & 0xFF, codes >> 8], dim=1).to(torch.uint8).reshape(-1)


def encode_indices(idx: Tensor, numel: int) -> tuple[int, Tensor]:
    """Sorted int64 positions -> (code, bytes), the smallest of the three encodings."""
    gaps = torch.diff(idx, prepend=idx.new_zeros(1))
    sizes = {IDX_INT32: 4 * idx.numel(), IDX_GAP16: 2 * (gaps.numel() + int((gaps // SKIP).sum())),
             IDX_BITMAP: (numel + 7) // 8}
    code = min(sizes, key=lambda c: (sizes[c], c))
    if code == IDX_GAP16:
        return code, _gap16(gaps)
    if code == IDX_BITMAP:
        mask = torch.zeros(numel, dtype=torch.bool, device=idx.device)
        mask[idx] = True
        return code, pack_bits(mask)
    return code, as_bytes(idx.to(torch.int32))


def decode_indices(code: int, b: Tensor, numel: int) -> Tensor:
    """-> sorted int64 positions."""
    if code == IDX_INT32:
        return from_bytes(b, torch.int32).long()
    if code == IDX_GAP16:
        pairs = b.view(-1, 2).long()
        codes = pairs[:, 0] + pairs[:, 1] * 256
        return torch.cumsum(codes, dim=0)[codes != SKIP]
    if code == IDX_BITMAP:
        return unpack_bits(b, numel).nonzero().reshape(-1)
    raise ValueError(f"corrupt payload: unknown index code {code}")
