"""How much of a memory one generated program holds at once: padded block sizes, the footprint limits of one
program per (batch x head) row, and the hidden tile of a depth-2 memory too wide to hold whole.

The limits were fitted on sm_90 compiles of the generated kernels (:func:`compile_for_sm90`, no GPU needed; H100: 227 KB
of shared memory per block); ``benchmarks/kernel_footprint.py`` measures them again.

- Whole matrices (every memory depth): one program holds every state matrix and the chunk's b x width
  intermediates, so its footprint grows with the padded chunk times the padded layer widths and times the layers'
  total area. Within both limits: depth 1, head dim 64, chunk 64: 160 KB; depth 1, head dim 128, chunk 16: 171 KB.
  Beyond them (depth 1, head dim 128, chunk 32 or 64; depth 2, 64 / 64, chunk 64; depth 3, 32 / 32, chunk 64) the
  backward did not compile in 300 s, and an earlier version of the generator measured 241-934 KB for such sizes.
  Depth 3, 32 / 64, chunk 32 is within them: 128 KB, after a compile of several minutes (between 5 and 8).
- Hidden tiles (depth 2 only): the hidden width is streamed in tiles of ``tile`` columns (the two layers' matching
  rows and columns, their momentum and their gradients), so the footprint grows with the padded chunk times (head
  dim + tile) and with tile x head dim, not with the hidden width (:data:`TILED_LIMITS`). At head dim 64, hidden
  256, the backward needed 101 KB at chunk 16 / tile 16, 170 KB at 16 / 32, 144 KB at 32 / 16 and 220 KB at 32 / 32,
  and more than 227 KB at 16 / 64 (308 KB), 64 / 16 (256 KB) and 64 / 32 (336 KB): the b x b gate tables and the
  chunk's b-row intermediates outgrow a block at chunk 64 whatever the tile. At head dim 128, hidden 512: 196 KB at
  16 / 16, 326 KB at 16 / 32 and 266 KB at 32 / 16. The clip leaves these unchanged; bfloat16 inputs need less
  (140 KB at 64 / 256, chunk 16 / tile 32).
"""

from __future__ import annotations

from typing import Any

#: Shared memory one H100 (sm_90) block can have.
H100_SHARED_PER_BLOCK = 227 * 1024
#: Whole matrices: padded chunk x sum of padded layer input widths, and padded chunk x sum of padded layer areas, at
#: most.
MAX_CHUNK_BY_WIDTHS = 5120
MAX_CHUNK_BY_AREAS = 262144
#: A depth-2 memory beyond this padded chunk x layer areas runs on hidden tiles where one fits: its whole-matrix
#: kernels compile for minutes (depth 2, 64 / 128, chunk 16: over 300 s for sm_90 on a 2-core machine), tiles in
#: under one.
TILE_FROM_CHUNK_BY_AREAS = 131072
#: Hidden tiles tried, widest first.
TILES = (64, 32, 16)
#: (padded chunk x (padded head dim + tile), tile x padded head dim) at most, for a tiled depth-2 memory.
TILED_LIMITS = (3072, 2048)


def block(n: int) -> int:
    """The padded block size of a dimension: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, 1 << (n - 1).bit_length())


def footprint(layer_shapes: tuple[tuple[int, int], ...], chunk_size: int) -> tuple[int, int]:
    """(padded chunk x sum of padded layer input widths, padded chunk x sum of padded layer areas) of whole-matrix
    kernels: the measures bounded by :data:`MAX_CHUNK_BY_WIDTHS` and :data:`MAX_CHUNK_BY_AREAS`."""
    widths = sum(block(inp) for _, inp in layer_shapes)
    areas = sum(block(out) * block(inp) for out, inp in layer_shapes)
    return block(chunk_size) * widths, block(chunk_size) * areas


def fits_whole(layer_shapes: tuple[tuple[int, int], ...], chunk_size: int) -> bool:
    by_widths, by_areas = footprint(layer_shapes, chunk_size)
    return by_widths <= MAX_CHUNK_BY_WIDTHS and by_areas <= MAX_CHUNK_BY_AREAS


def tiled_footprint(head_dim: int, chunk_size: int, tile: int) -> tuple[int, int]:
    """The measures of a tiled depth-2 kernel bounded by :data:`TILED_LIMITS`."""
    return block(chunk_size) * (block(head_dim) + tile), tile * block(head_dim)


def hidden_tile(layer_shapes: tuple[tuple[int, int], ...], chunk_size: int) -> int | None:
    """The hidden tile of a memory's generated kernels: 0 for whole matrices, else the widest tile of :data:`TILES`
    within :data:`TILED_LIMITS` (depth 2 only), None when neither fits. A depth-2 memory takes tiles as soon as its
    padded chunk x layer areas pass :data:`TILE_FROM_CHUNK_BY_AREAS`, even where whole matrices would fit."""
    whole = fits_whole(layer_shapes, chunk_size)
    if len(layer_shapes) != 2 or (whole and footprint(layer_shapes, chunk_size)[1] <= TILE_FROM_CHUNK_BY_AREAS):
        return 0 if whole else None
    head_dim, hidden = layer_shapes[0][1], layer_shapes[0][0]
    for tile in TILES:
        by_widths, area = tiled_footprint(head_dim, chunk_size, tile)
        if tile < block(hidden) and by_widths <= TILED_LIMITS[0] and area <= TILED_LIMITS[1]:
            return tile
    return 0 if whole else None


def compile_for_sm90(fn: Any, dtype: str) -> Any:
    """A generated kernel compiled for an H100 with Triton's bundled ptxas (no GPU needed); its
    ``.metadata.shared`` is the static shared memory in bytes. Pointers to the state, its gradient and the scratch
    are float32, the others take the inputs' ``dtype``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[dtype]
    state_like = ("states_ptr", "gstates_ptr", "scratch_ptr")
    signature = {
        name: ("*fp32" if name in state_like else f"*{short}") if name.endswith("_ptr") else "i32"
        for name in fn.arg_names
    }
    return triton.compile(ASTSource(fn, signature), target=GPUTarget("cuda", 90, 32))
