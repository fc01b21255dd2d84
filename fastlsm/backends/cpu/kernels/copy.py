"""A cache-blocked parallel copy between any two layouts (transposes included)."""

from numba import prange

from fastlsm.backends.cpu.runtime import rowwise

# Square tiles of a 2-D copy: both the source's rows and the destination's stay in cache while a
# tile is transposed, whatever the two layouts.
COPY_TILE = 64


@rowwise
def copy_tiles(src, dst):
    """``dst[...] = src`` for ``(batch, rows, columns)`` arrays of any layouts."""
    batches, rows, columns = src.shape
    row_tiles = (rows + COPY_TILE - 1) // COPY_TILE
    for task in prange(batches * row_tiles):
        b = task // row_tiles
        first = (task % row_tiles) * COPY_TILE
        last = min(rows, first + COPY_TILE)
        for column in range(0, columns, COPY_TILE):
            for i in range(first, last):
                for j in range(column, min(columns, column + COPY_TILE)):
                    dst[b, i, j] = src[b, i, j]

