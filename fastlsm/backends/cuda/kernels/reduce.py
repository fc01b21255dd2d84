"""One-block reductions (deterministic: a fixed order, no float atomics) and layout kernels."""

from numba import cuda, float64, int64

from fastlsm.backends.cuda.kernels.primitives import UNROLL, WARP, group_max, group_sum, load_chunk
from fastlsm.backends.formulas import bfloat16_value, bfloat16_word


@cuda.jit(cache=True)
def check_targets(target, weight, ignore_index, out):
    """``out[0]``: the first position of a target outside ``[0, C)`` that is not
    ``ignore_index`` (the target count where there is none); ``out[1]``: the sum of
    ``weight[t]`` over the kept targets.  One block, in a fixed order (as :func:`sum_rows`), so
    the caller learns both with one copy to the host.  Targets are read ``UNROLL`` at a time, and
    their weights after them: a block has few loads in flight otherwise."""
    scratch = cuda.shared.array(WARP, float64)
    n = target.shape[0]
    size = cuda.blockDim.x
    first = float64(n)
    denominator = float64(0.0)
    n_classes = weight.shape[0]
    chunk = cuda.local.array(UNROLL, int64)
    weights = cuda.local.array(UNROLL, weight.dtype)
    for i in range(cuda.threadIdx.x, n, UNROLL * size):
        load_chunk(target, i, n, size, chunk, ignore_index)
        for u in range(UNROLL):  # clamped, so that the loads need no test and go together
            weights[u] = weight[min(max(chunk[u], 0), n_classes - 1)] if n_classes > 0 else 0
        for u in range(UNROLL):
            t = chunk[u]
            if t == ignore_index:
                continue
            if 0 <= t < n_classes:
                denominator += weights[u]
            else:  # this thread walks up: its first bad target is its smallest
                first = min(first, float64(i + u * size))
    first = -group_max(-first, False, scratch)
    denominator = group_sum(denominator, False, scratch)
    if cuda.threadIdx.x == 0:
        out[0] = first
        out[1] = denominator


@cuda.jit(cache=True)
def sum_rows(values, divisor, out):
    """``out[0] = sum(values) / divisor``: one block, each thread a fixed stride, then a fixed
    tree, so the same input always gives the same bits (no float atomics)."""
    scratch = cuda.shared.array(WARP, float64)
    n = values.shape[0]
    partial = float64(0.0)
    chunk = cuda.local.array(UNROLL, float64)
    for i in range(cuda.threadIdx.x, n, UNROLL * cuda.blockDim.x):
        load_chunk(values, i, n, cuda.blockDim.x, chunk, 0)
        for u in range(UNROLL):
            partial += chunk[u]
    total = group_sum(partial, False, scratch)
    if cuda.threadIdx.x == 0:
        out[0] = total / divisor


# --- layout ------------------------------------------------------------------------------------

TILE = 32
TILE_PAD = TILE + 1  # a padded tile row: no shared-memory bank conflicts


@cuda.jit(cache=True)
def swap_last_axes(src, dst):
    """``dst[b, j, i] = src[b, i, j]`` through a shared-memory tile, so both sides are coalesced."""
    tile = cuda.shared.array((TILE, TILE_PAD), float64)
    i0 = cuda.blockIdx.y * TILE
    j0 = cuda.blockIdx.x * TILE
    tx = cuda.threadIdx.x
    for b in range(cuda.blockIdx.z, src.shape[0], cuda.gridDim.z):
        for ty in range(cuda.threadIdx.y, TILE, cuda.blockDim.y):
            i, j = i0 + ty, j0 + tx
            if i < src.shape[1] and j < src.shape[2]:
                tile[ty, tx] = src[b, i, j]
        cuda.syncthreads()
        for ty in range(cuda.threadIdx.y, TILE, cuda.blockDim.y):
            j, i = j0 + ty, i0 + tx
            if j < src.shape[2] and i < src.shape[1]:
                dst[b, j, i] = tile[tx, ty]
        cuda.syncthreads()  # the tile is read out before the next batch overwrites it


@cuda.jit(cache=True)
def cast(src, dst):
    """``dst[i] = src[i]`` in ``dst``'s dtype (float16 in and out of float32 computation)."""
    for i in range(cuda.grid(1), src.shape[0], cuda.gridsize(1)):
        dst[i] = src[i]


@cuda.jit(cache=True)
def widen_bfloat16(words, dst):
    """``dst[i]``: the float32 value of bfloat16 word ``words[i]``."""
    for i in range(cuda.grid(1), words.shape[0], cuda.gridsize(1)):
        dst[i] = bfloat16_value(words[i])


@cuda.jit(cache=True)
def round_to_bfloat16(src, words):
    """``words[i]``: the word of the bfloat16 nearest to ``src[i]`` (ties to even)."""
    for i in range(cuda.grid(1), src.shape[0], cuda.gridsize(1)):
        words[i] = bfloat16_word(src[i])
