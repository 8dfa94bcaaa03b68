"""Deterministic random weights that any slice of a tensor can produce on its own.

A tensor is cut into TILE x TILE tiles; each tile is drawn from its own generator seeded by
(seed, tensor name, tile row, tile column). A rank holding rows 1024:2048 of a weight draws only the
tiles those rows cross, yet gets exactly the numbers the whole tensor has there. So a sharded model
equals the unsharded one, and no rank ever holds more than its slice plus one tile.
"""

import hashlib

import torch

TILE = 1024


def _tile_seed(seed: int, name: str, i: int, j: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}/{i}/{j}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _bounds(s: slice, n: int) -> tuple[int, int]:
    start, stop, step = s.indices(n)
    if step != 1:
        raise ValueError("only contiguous slices are supported")
    return start, stop


def tiled_normal(name: str, shape: tuple[int, ...], *, seed: int, std: float, rows: slice = slice(None),
                 cols: slice = slice(None), device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """N(0, std²) values of ``tensor[rows, cols]`` for a tensor of ``shape`` (1-D: ``rows`` only)."""
    if len(shape) == 1:
        return tiled_normal(name, (shape[0], 1), seed=seed, std=std, rows=rows, device=device, dtype=dtype)[:, 0]
    n_rows, n_cols = shape
    r0, r1 = _bounds(rows, n_rows)
    c0, c1 = _bounds(cols, n_cols)
    out = torch.empty((r1 - r0, c1 - c0), device=device, dtype=dtype)
    gen = torch.Generator(device=device)
    for i in range(r0 // TILE, (r1 - 1) // TILE + 1 if r1 > r0 else 0):
        for j in range(c0 // TILE, (c1 - 1) // TILE + 1 if c1 > c0 else 0):
            tr0, tc0 = i * TILE, j * TILE
            tile_shape = (min(TILE, n_rows - tr0), min(TILE, n_cols - tc0))
            gen.manual_seed(_tile_seed(seed, name, i, j))
            tile = torch.randn(tile_shape, generator=gen, device=device, dtype=torch.float32)  # [T, T]
            ar0, ar1 = max(r0, tr0), min(r1, tr0 + tile_shape[0])
            ac0, ac1 = max(c0, tc0), min(c1, tc0 + tile_shape[1])
            out[ar0 - r0:ar1 - r0, ac0 - c0:ac1 - c0] = tile[ar0 - tr0:ar1 - tr0, ac0 - tc0:ac1 - tc0].mul_(std)
    return out
