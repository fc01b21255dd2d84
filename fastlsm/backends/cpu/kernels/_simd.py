"""``exp``, ``log1p`` and ``max`` written so that LLVM vectorises the loops that call them.

Numba on PyPI has no SVML: ``math.exp`` in a loop becomes one ``expf`` call per element.  The
``exp`` here is emitted as LLVM IR: a Cody-Waite range reduction, a minimax polynomial (Cephes'
degree 7 for float32, SLEEF's degree 11 for float64) and ``2**n`` built by integer-to-float
bitcasts, all branch-free, so a loop of it runs 8 float32 / 4 float64 lanes wide.  Measured error:
<= 1.01 ulp (every float32 in [-110, 95]), <= 0.98 ulp (5M float64 points; ``tests/test_simd.py``
checks samples of both); ``exp(-inf) = 0``, ``exp(inf) = inf``, ``exp(nan) = nan``, overflow gives ``inf``,
underflow gradual subnormals then 0.  ``log1p`` (float64) is musl's, its branches turned into
selects: one a row in the short-row kernels, where libm's scalar call cost as much as the row.

Every instruction carries the ``contract`` flag (FMA allowed): Numba's fast-math pass only flags
instructions that have none, so a caller compiled with ``fastmath`` cannot reassociate the
rounding trick away.
"""

import math

from llvmlite import ir
from numba import types
from numba.core import cgutils, ir_utils
from numba.extending import intrinsic

_FLAGS = ("contract",)

_FLOAT32 = dict(
    hi=89.0, lo=-104.0,                       # ln(FLT_MAX) = 88.72, ln(2**-150) = -103.97
    # The summand's clamp: round(-88 / ln 2) = -127, whose biased exponent is 0, so 2**n is +0.0.
    lo_zero=-88.0,
    log2e=1.44269504088896341, magic=12582912.0,   # 1.5 * 2**23: adding it rounds to an integer
    ln2_hi=0.693359375, ln2_lo=-2.12194440e-4,     # Cephes split: n * ln2_hi exact for |n| <= 2**15
    poly=(1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3,
          4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1),
    int_type=ir.IntType(32), mantissa_bits=23, bias=127, magic_bits=0x4B400000)
_FLOAT64 = dict(
    hi=710.0, lo=-746.0,                      # ln(DBL_MAX) = 709.78, ln(2**-1075) = -745.13
    lo_zero=-709.0,                           # round(-709 / ln 2) = -1023: 2**n is +0.0
    log2e=1.4426950408889634, magic=6755399441055744.0,  # 1.5 * 2**52
    ln2_hi=6.93147180369123816490e-01, ln2_lo=1.90821492927058770002e-10,  # fdlibm split
    # SLEEF's xexp coefficients: 2 multiply-adds fewer than a degree-13 Taylor series, ~5%
    # faster on float64 rows, 0.97 ulp where the Taylor series gave 0.98.
    poly=(2.08860621107283687536341e-09, 2.51112930892876518610661e-08,
          2.75573911234900471893338e-07, 2.75572362911928827629423e-06,
          2.4801587159235472998791e-05, 0.000198412698960509205564975,
          0.00138888888889774492207962, 0.00833333333331652721664984,
          0.0416666666666665047591422, 0.166666666666666851703837, 0.5),
    int_type=ir.IntType(64), mantissa_bits=52, bias=1023, magic_bits=0x4338000000000000)


class _FloatOps:
    """Float arithmetic of one type on an ``ir.IRBuilder``, every instruction ``contract``."""

    def __init__(self, builder, fty):
        self.builder, self.fty = builder, fty

    def const(self, v):
        return ir.Constant(self.fty, v)

    def add(self, a, b):
        return self.builder.fadd(a, b, flags=_FLAGS)

    def sub(self, a, b):
        return self.builder.fsub(a, b, flags=_FLAGS)

    def mul(self, a, b):
        return self.builder.fmul(a, b, flags=_FLAGS)

    def div(self, a, b):
        return self.builder.fdiv(a, b, flags=_FLAGS)

    def horner(self, z, coefficients):
        """``coefficients[0] * z**(n-1) + ... + coefficients[-1]``."""
        result = self.const(coefficients[0])
        for coefficient in coefficients[1:]:
            result = self.add(self.mul(result, z), self.const(coefficient))
        return result


# exp_nonpositive's 2**n is 2**(n + _OFFSET) * 2**-_OFFSET: n >= -150 (-1076) keeps the first
# factor normal, and bias + _OFFSET even (127 + 65, 1023 + 65) keeps the magic number even, so
# round-half-even breaks a tie in x / ln2 as exp does.
_OFFSET = 65


def _emit_exp(builder, x, p, summand=False, nonpositive=False):
    fty = x.type
    ops = _FloatOps(builder, fty)
    const, add, sub, mul = ops.const, ops.add, ops.sub, ops.mul

    # Clamp with ordered compares, which are false for nan: nan passes through.
    lo = p["lo_zero"] if summand else p["lo"]
    if not (summand or nonpositive):
        x = builder.select(builder.fcmp_ordered(">", x, const(p["hi"]), flags=_FLAGS), const(p["hi"]), x)
    x = builder.select(builder.fcmp_ordered("<", x, const(lo), flags=_FLAGS), const(lo), x)
    # n = round(x / ln2) sits in t's low bits (for exp_nonpositive, n + bias + _OFFSET).
    magic = p["magic"] + (p["bias"] + _OFFSET if nonpositive else 0)
    t = add(mul(x, const(p["log2e"])), const(magic))
    n_float = sub(t, const(magic))
    r = sub(x, mul(n_float, const(p["ln2_hi"])))
    r = sub(r, mul(n_float, const(p["ln2_lo"])))
    poly = ops.horner(r, p["poly"])
    y = add(add(mul(poly, mul(r, r)), r), const(1.0))
    ity = p["int_type"]
    if nonpositive:
        # t's bits are the magic number's plus n + bias + _OFFSET, in (0, 2 * bias), and the
        # magic number's bits that a shift by mantissa_bits keeps are 0: the shift leaves the
        # biased exponent of 2**(n + _OFFSET), a normal number, and y * 2**(n + _OFFSET) is exact.
        # The product by 2**-_OFFSET then rounds once, as exp's two factors do: the same bits.
        scaled = builder.bitcast(builder.shl(builder.bitcast(t, ity),
                                             ir.Constant(ity, p["mantissa_bits"])), fty)
        return mul(mul(y, scaled), const(2.0 ** -_OFFSET))
    n = builder.sub(builder.bitcast(t, ity), ir.Constant(ity, p["magic_bits"]))

    def pow2(k):
        biased = builder.add(k, ir.Constant(ity, p["bias"]))
        return builder.bitcast(builder.shl(biased, ir.Constant(ity, p["mantissa_bits"])), fty)

    if summand:
        # n >= -127 (-1023): 2**n is a normal number, or at n = -127 the +0.0 of a zero exponent
        # field, so that an entry far under the max (-inf above all) adds exactly nothing to a
        # row's excess, at no instruction more than a clamp.
        return mul(y, pow2(n))
    # 2**n as two factors 2**n1 * 2**n2, so results near overflow and underflow (subnormals)
    # stay exact in the exponent bits.
    n1 = builder.ashr(n, ir.Constant(ity, 1))
    return mul(mul(y, pow2(n1)), pow2(builder.sub(n, n1)))


def _exp_intrinsic(name, doc, **variant):
    """An intrinsic ``name(x)`` computing ``_emit_exp``'s ``variant`` in ``x``'s dtype, float32
    or float64."""
    def typer(typingctx, x):
        params = {types.float32: _FLOAT32, types.float64: _FLOAT64}.get(x)
        if params is None:
            return None

        def codegen(context, builder, signature, args):
            return _emit_exp(builder, args[0], params, **variant)
        return x(x), codegen
    typer.__name__ = typer.__qualname__ = name
    typer.__doc__ = doc
    return intrinsic(typer)


exp = _exp_intrinsic("exp", """``exp(x)`` for a float32 or float64 ``x``, in ``x``'s dtype.""")

exp_nonpositive = _exp_intrinsic("exp_nonpositive", """:func:`exp` of an ``x <= 0`` (or nan),
    bit for bit, subnormal results included: a row's values less its finite max, stored as
    softmax's exps.  Without the overflow clamp and with ``2**n`` as one shifted power of two
    times a constant, ~6 instructions fewer.  A positive ``x`` gives garbage.""",
    nonpositive=True)

exp_summand = _exp_intrinsic("exp_summand", """``exp(x)`` for ``x <= 0`` (or nan) as a term of
    a sum that is at least 1: as :func:`exp`, but ``x`` below about ``log`` of the smallest
    normal number (~1e-38 in float32) gives at most that number and below -88 (-709) exactly 0,
    never a subnormal computed in steps: an error far below the sum's rounding, and a row's
    excess over its max stays exactly 0 where every other entry is that far below it
    (``logsumexp([0, -inf])`` is 0, not 1e-308).  Without the overflow clamp and the two-factor
    ``2**n``, ~25% fewer instructions.""", summand=True)


# musl's log1p: u = 1 + x = 2**k * (1 + f) with 1 + f in [sqrt(2)/2, sqrt(2)), log(1 + f) from
# s = f / (2 + f) and a polynomial in s**2, and c / u for the rounding error of 1 + x.
_LOG1P = dict(
    ln2_hi=6.93147180369123816490e-01, ln2_lo=1.90821492927058770002e-10,
    # musl's Lg1 ... Lg7, highest power first as _FloatOps.horner takes them.
    even=(1.531383769920937332e-01, 2.222219843214978396e-01, 3.999999999940941908e-01),
    odd=(1.479819860511658591e-01, 1.818357216161805012e-01, 2.857142874366239149e-01,
         6.666666666666735130e-01),
    to_sqrt_half=(0x3FF00000 - 0x3FE6A09E) << 32, sqrt_half=0x3FE6A09E << 32,
    mantissa=(1 << 52) - 1, bias=0x3FF)


def _emit_log1p(builder, x):
    fty, ity, p = x.type, ir.IntType(64), _LOG1P
    ops = _FloatOps(builder, fty)
    const, add, sub, mul = ops.const, ops.add, ops.sub, ops.mul

    one = const(1.0)
    u = add(one, x)
    bits = builder.add(builder.bitcast(u, ity), ir.Constant(ity, p["to_sqrt_half"]))
    k = builder.sub(builder.lshr(bits, ir.Constant(ity, 52)), ir.Constant(ity, p["bias"]))
    # The rounding error of u = 1 + x, relative to u: 1 - (u - x) is exact once u >= 2.
    large = builder.icmp_signed(">=", k, ir.Constant(ity, 2))
    c = ops.div(builder.select(large, sub(one, sub(u, x)), sub(x, sub(u, one))), u)
    reduced = builder.add(builder.and_(bits, ir.Constant(ity, p["mantissa"])),
                          ir.Constant(ity, p["sqrt_half"]))
    f = sub(builder.bitcast(reduced, fty), one)
    half_f2 = mul(mul(const(0.5), f), f)
    s = ops.div(f, add(const(2.0), f))
    z = mul(s, s)
    w = mul(z, z)
    r = add(mul(z, ops.horner(w, p["odd"])), mul(w, ops.horner(w, p["even"])))
    dk = builder.sitofp(k, fty)
    y = add(mul(s, add(half_f2, r)), add(mul(dk, const(p["ln2_lo"])), c))
    y = add(add(sub(y, half_f2), f), mul(dk, const(p["ln2_hi"])))

    def where(y, compare, op, a, b):
        """``b`` where ``x op a`` holds, else ``y``."""
        return builder.select(compare(op, x, const(a), flags=_FLAGS), b, y)

    # log1p(-1) = -inf; +-0 and inf are their own log1p; below -1 and nan: nan.
    y = where(y, builder.fcmp_ordered, "==", -1.0, const(-float("inf")))
    y = where(y, builder.fcmp_ordered, "==", 0.0, x)
    y = where(y, builder.fcmp_ordered, "==", float("inf"), x)
    return where(y, builder.fcmp_unordered, "<", -1.0, const(float("nan")))


@intrinsic
def log1p(typingctx, x):
    """``log1p(x)`` for a float64 ``x``, within 1 ulp, branch-free."""
    if x != types.float64:
        return None

    def codegen(context, builder, signature, args):
        return _emit_log1p(builder, args[0])
    return x(x), codegen


@intrinsic
def max_ignoring_nan(typingctx, m, v):
    """``llvm.maxnum(m, v)`` in ``v``'s type: a nan operand yields the other one.

    Unlike ``max(m, v)`` or ``v if v > m else m``, a reduction loop over it vectorises
    (``llvm.vector.reduce.fmax``) without fast-math flags.
    """
    if not (isinstance(m, types.Float) and isinstance(v, types.Float)):
        return None

    def codegen(context, builder, signature, args):
        fty = context.get_value_type(v)
        m_value = context.cast(builder, args[0], m, v)
        fn = builder.module.declare_intrinsic("llvm.maxnum", [fty], fnty=ir.FunctionType(fty, [fty, fty]))
        return builder.call(fn, [m_value, args[1]])
    return v(m, v), codegen


# block_max: each accumulator a 256-bit vector; four of them, so four maxima are in flight at
# once (their latency chains side by side).  Not 512-bit: on this project's Intel AVX-512 VMs a
# zmm instruction lowers the core's clock for the exps that follow (row_max_and_excess on
# 1000000x100 float32, one thread: 70 ns a row; 92 with the tail mask's compare in a zmm
# register, 112 with 512-bit maxima), and a max read from memory gains nothing from them.
_MAX_VECTOR_BYTES = 32
_MAX_ACCUMULATORS = 4


@intrinsic
def block_max(typingctx, row, start, stop):
    """The max of ``row[start:stop]`` ignoring nan (``-inf`` if empty or all nan), for a C-ordered
    1-D float32/float64 ``row``: 256-bit vectors in four accumulators, then one
    accumulator a vector at a time, a last vector loaded under a mask (``-inf`` past ``stop``)
    and a horizontal reduction.

    Each step is ``v > acc ? v : acc``, which ignores a nan ``v`` and keeps the accumulators free
    of nan: one ``vmaxps`` on x86, where ``llvm.maxnum`` takes a ``vcmpunordps`` and a blend
    too, in the chain of each accumulator.  A loop over :func:`max_ignoring_nan` vectorises
    with one accumulator, that three-instruction chain and a scalar tail of up to 31 float32
    (LLVM does not interleave that reduction): the max alone of a 100-class float32 row took
    50-70 ns on one thread, now 22 ns, as long as reading the row.
    """
    if not (isinstance(row, types.Array) and row.ndim == 1 and row.layout == "C"
            and row.dtype in (types.float32, types.float64)
            and isinstance(start, types.Integer) and isinstance(stop, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        fty = context.get_value_type(row.dtype)
        itemsize = row.dtype.bitwidth // 8
        lanes = _MAX_VECTOR_BYTES // itemsize
        vty = ir.VectorType(fty, lanes)
        vector_name = f"v{lanes}{'f32' if row.dtype == types.float32 else 'f64'}"
        i32, i64 = ir.IntType(32), ir.IntType(64)
        mask_type = ir.VectorType(ir.IntType(1), lanes)
        masked_load = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vty, [vty.as_pointer(), i32, mask_type, vty]),
            f"llvm.masked.load.{vector_name}.p0")
        reduce_max = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(fty, [vty]), f"llvm.vector.reduce.fmax.{vector_name}")
        no_max = ir.Constant(vty, [-math.inf] * lanes)

        def vector_at(j):
            return builder.bitcast(builder.gep(data, [j]), vty.as_pointer())

        def greater(acc, v):
            return builder.select(builder.fcmp_ordered(">", v, acc), v, acc)

        def accumulate(accumulator, v):
            builder.store(greater(builder.load(accumulator), v), accumulator)

        lo = context.cast(builder, args[1], signature.args[1], types.int64)
        hi = context.cast(builder, args[2], signature.args[2], types.int64)
        step = lanes * _MAX_ACCUMULATORS
        groups = builder.sdiv(builder.sub(hi, lo), ir.Constant(i64, step))
        accumulators = [cgutils.alloca_once_value(builder, no_max)
                        for _ in range(_MAX_ACCUMULATORS)]
        with cgutils.for_range(builder, groups) as loop:
            first = builder.add(lo, builder.mul(loop.index, ir.Constant(i64, step)))
            for k, accumulator in enumerate(accumulators):
                at = vector_at(builder.add(first, ir.Constant(i64, k * lanes)))
                accumulate(accumulator, builder.load(at, align=itemsize))
        rest = builder.add(lo, builder.mul(groups, ir.Constant(i64, step)))
        vectors = builder.sdiv(builder.sub(hi, rest), ir.Constant(i64, lanes))
        with cgutils.for_range(builder, vectors) as loop:
            at = vector_at(builder.add(rest, builder.mul(loop.index, ir.Constant(i64, lanes))))
            accumulate(accumulators[0], builder.load(at, align=itemsize))
        last = builder.add(rest, builder.mul(vectors, ir.Constant(i64, lanes)))
        # Lane indices as wide as the floats: the mask's compare stays in the data's vector width
        # (i64 lanes for float32 made it a zmm instruction, which costs this CPU its clock).
        ity = ir.IntType(row.dtype.bitwidth)
        left = builder.trunc(builder.sub(hi, last), ity) if ity != i64 else builder.sub(hi, last)
        left = builder.insert_element(ir.Constant(ir.VectorType(ity, lanes), None), left,
                                      ir.Constant(i32, 0))
        left = builder.shuffle_vector(left, left, ir.Constant(ir.VectorType(i32, lanes), None))
        in_row = builder.icmp_signed("<", ir.Constant(ir.VectorType(ity, lanes),
                                                      list(range(lanes))), left)
        accumulate(accumulators[0], builder.call(
            masked_load, [vector_at(last), ir.Constant(i32, itemsize), in_row, no_max]))
        m = builder.load(accumulators[0])
        for accumulator in accumulators[1:]:
            m = greater(m, builder.load(accumulator))
        # No accumulator holds a nan: the reduction may take plain maxima.
        return builder.call(reduce_max, [m], fastmath=("nnan",))
    return row.dtype(row, start, stop), codegen


@intrinsic
def contiguous_row(typingctx, matrix, i):
    """Row ``i`` of a 2-D array whose rows are contiguous, typed as a C-ordered 1-D array.

    Numba types a 2-D array with a row stride other than its row length (a column slice, a
    padded or reversed-rows view) as layout 'A', and loops over 'A' arrays do not vectorise.
    The dispatcher only hands kernels matrices with unit column stride, so every row can be
    seen as C-ordered.  The view borrows the matrix's memory (no reference count), which is safe
    for the kernel's lifetime.
    """
    if not (isinstance(matrix, types.Array) and matrix.ndim == 2 and isinstance(i, types.Integer)):
        return None
    row_type = types.Array(matrix.dtype, 1, "C")

    def codegen(context, builder, signature, args):
        matrix_type = signature.args[0]
        parent = context.make_array(matrix_type)(context, builder, args[0])
        shape = cgutils.unpack_tuple(builder, parent.shape)
        strides = cgutils.unpack_tuple(builder, parent.strides)
        index = context.cast(builder, args[1], signature.args[1], types.intp)
        start = cgutils.get_item_pointer2(context, builder, parent.data, shape, strides,
                                          matrix_type.layout, [index, context.get_constant(types.intp, 0)])
        row = context.make_array(row_type)(context, builder)
        itemsize = context.get_constant(types.intp, context.get_abi_sizeof(context.get_data_type(matrix_type.dtype)))
        context.populate_array(row, data=start, shape=cgutils.pack_array(builder, [shape[1]]),
                               strides=cgutils.pack_array(builder, [itemsize]), itemsize=itemsize,
                               meminfo=None)
        return row._getvalue()
    return row_type(matrix, i), codegen


def _row_aliases_matrix(lhs, args, alias_map, arg_aliases):
    ir_utils._add_alias(lhs, args[0].name, alias_map, arg_aliases)


# Tell Numba's alias analysis that a row view shares the matrix's memory.  Without it the
# parfor pass takes the view for a fresh array and drops writes to it that are not inside a
# loop (``dst[t] -= v``, ``dst[:] = v``) as dead code.
ir_utils.alias_func_extensions[("contiguous_row", __name__)] = _row_aliases_matrix
