"""The scalar math of fastlsm's kernels, written once for every target.

Each function is ``@njit(inline="always")``: the CPU kernels inline it, and numba-cuda compiles
the same source into the CUDA kernels that call it (and the CUDA simulator runs it as Python).
The Dask backend's merges run the CPU kernels that use these, so every backend computes a row's
loss, its gradient's coefficients and the (max, sum) merge with the same formulas and in the same
order.  Elementwise loops stay in the kernels: each target has its own ``exp`` (the CPU's
vectorised polynomial, CUDA's ``math.exp``).

Notation, as ``shared/reference/semantics.md`` has it: a row's max ``m``, its ``shift =
finite_or_zero(m)``, ``s = sum(exp(x - shift))``, ``log_s = log(s)`` and ``lse = shift + log_s``;
the kernels carry ``s`` as its *excess* ``e = s - 1``: for a finite row, the sum of every term but
one of those equal to the max (each exactly 1), so ``log_s = log1p(e)`` keeps its relative
precision where one entry dominates (``logsumexp([0, -40]) = 4.2e-18``, not 0);
``C`` classes, weights ``w`` summing to ``W``, label smoothing ``eps``, z-loss coefficient ``z``,
and the gradient's ``scale`` (1, or the inverse of the ``mean`` denominator).
"""

import math

from numba import njit


@njit(inline="always")
def finite_or_zero(m):
    """The shift of a row whose max is ``m``: ``m`` where finite, else 0.

    SciPy shifts by the max only where it is finite, so a row holding ``+inf`` or nothing but
    ``-inf`` is shifted by 0, which gives its documented nan / -inf answers instead of
    ``inf - inf`` everywhere.
    """
    return m if math.isfinite(m) else 0.0


@njit(inline="always")
def log_sum(excess):
    """``log(s)`` from ``s``'s excess ``e = s - 1``: ``log1p(e)``, -inf for the ``e = -1`` of an
    empty or all ``-inf`` row (spelt out, since Python's log1p raises there and the CUDA
    simulator runs kernels as Python)."""
    if excess > -1.0:
        return math.log1p(excess)
    return -math.inf if excess == -1.0 else math.nan


@njit(inline="always")
def rescaled(s, shift, new_shift):
    """A sum of exps shifted by ``shift``, brought to ``new_shift``: the (max, sum) merge's term.

    A sum of 0 (a part that is all ``-inf``) stays 0: its ``exp(shift - new_shift)`` may
    overflow, and ``0 * inf`` is nan.
    """
    return s * math.exp(shift - new_shift) if s != 0.0 else 0.0


@njit(inline="always")
def merged_excess(m, excess, part_m, part_excess):
    """``(m, e)`` of two parts of a row from their maxima and excesses (the (max, sum) merge).

    The part with the lower max joins as a whole sum, rescaled; where the maxima are equal the
    other max's 1 joins the excess.  The dominant part's excess is never added to a 1, so a
    dominant entry's precision survives any number of merges.  A nan max (a part that is all
    nan) keeps ``m`` and makes ``e`` nan.
    """
    if part_m > m:
        earlier = rescaled(1.0 + excess, finite_or_zero(m), finite_or_zero(part_m))
        return part_m, earlier + part_excess
    if part_m < m:
        return m, excess + rescaled(1.0 + part_excess, finite_or_zero(part_m), finite_or_zero(m))
    return m, (excess + 1.0) + part_excess


@njit(inline="always")
def excess_of(rest, ties):
    """``e`` of a part summed as ``ties`` terms equal to 1 (its max's) and the ``rest``: the
    ``-1`` joins the exact count, never the rest's small terms."""
    return (ties - 1.0) + rest


@njit(inline="always")
def reshifted(total, weights, shift, new_shift):
    """``sum_c w_c (x_c - shift)``, given as ``total`` with ``weights = sum_c w_c``, taken
    relative to ``new_shift`` instead: how a split row's per-part sums are brought to the row's
    shift."""
    return total + (shift - new_shift) * weights


@njit(inline="always")
def row_scale(scale, row_scales, i):
    """Row ``i``'s gradient scale: ``scale`` (1, or the inverse of the ``mean`` denominator),
    times the caller's gradient of the row's loss where ``row_scales`` holds one a row
    (``grad_loss`` with ``reduction='none'``); an empty ``row_scales`` means 1 for every row."""
    return scale * row_scales[i] if row_scales.shape[0] > 0 else scale


@njit(inline="always")
def class_index_loss(x_t, shift, log_s, w_t, smoothing, n_classes, total_weight, weighted,
                     z_loss, lse):
    """A kept row's class-index loss (PyTorch's):
    ``(1 - eps) * -w_t * logp_t + eps / C * -sum_c w_c * logp_c + z * lse**2``.

    ``logp_c = (x_c - shift) - log_s``; ``x_t`` and ``shift`` in the row's dtype (their
    difference is exact where it matters for float32), ``weighted = sum_c w_c * (x_c - m)``,
    used with label smoothing only.
    """
    loss = (1.0 - smoothing) * (-w_t * ((x_t - shift) - log_s))
    if smoothing > 0.0:
        loss += smoothing / n_classes * (total_weight * log_s - weighted)
    if z_loss > 0.0:
        loss += z_loss * lse * lse
    return loss


@njit(inline="always")
def class_index_gradient(w_t, smoothing, n_classes, total_weight, z_loss, lse, scale):
    """``(a, b, c)`` of a kept row's class-index gradient, ``grad_j = a * p_j - b * w_j
    - c * [j == t]`` with ``p = softmax(x)``: ``a = scale * ((1 - eps) * w_t + eps / C * W
    + 2 z lse)``, ``b = scale * eps / C``, ``c = scale * (1 - eps) * w_t``.  Where ``b`` is 0
    (no smoothing) the kernels leave the ``w_j`` term out: ``0 * w_j`` is nan for a nan weight."""
    # Without smoothing the weights of other classes play no part: W and b are left out, so that
    # a nan or inf weight of a class no row targets, or an infinite scale (weights summing to 0
    # for ``mean``), does not make every gradient nan (0 * nan, 0 * inf).
    if smoothing > 0.0:
        spread, b = smoothing / n_classes * total_weight, scale * smoothing / n_classes
    else:
        spread, b = 0.0, 0.0
    a = scale * ((1.0 - smoothing) * w_t + spread + 2.0 * z_loss * lse)
    return a, b, scale * (1.0 - smoothing) * w_t


@njit(inline="always")
def gradient_at_max(a, c, e):
    """``a * p - c`` at an entry equal to its row's max, where ``p = 1 / (1 + e)``, as
    ``((a - c) - c * e) / (1 + e)``: the term of a target there, ``a`` and ``c`` the gradient's
    coefficients of ``p`` and of the target (:func:`class_index_gradient`'s ``a`` and ``c``, or
    :func:`probability_gradient` and ``scale * w y'``).

    A confident right answer has ``p`` within ``e`` of 1 and a gradient of about ``-c * e``:
    ``p * a - c`` in the row's dtype cancels to a few ulp of ``a`` (float32: 0 for
    ``e < 3e-8``, ~1% off at ``e = 6e-6``, as PyTorch gives), where ``a - c`` is exact in float64
    (0 for a lone target without smoothing or z-loss) and this keeps ``e``'s relative precision,
    as the loss does.
    """
    return ((a - c) - c * e) / (1.0 + e)


@njit(inline="always")
def smoothed_weight(w, y, keep, spread):
    """``w * y'``: a class's weight times its probability target smoothed,
    ``y' = y * (1 - eps) + eps / C`` (``keep = 1 - eps``, ``spread = eps / C``)."""
    return w * (y * keep + spread)


@njit(inline="always")
def undefined_probability_row(m, n_classes):
    """Whether a row's probability-target loss and gradient are nan: where its max ``m`` is not
    finite (a ``+inf``, a nan or nothing but ``-inf``), PyTorch's log-probabilities are nan.
    A row of no classes has max ``-inf`` too, but its loss is an empty sum."""
    return n_classes > 0 and not math.isfinite(m)


@njit(inline="always")
def probability_loss(wy_sum, wyx_sum, log_s, z_loss, lse):
    """A row's probability-target loss, ``-sum_c w_c y'_c logp_c + z lse**2``, from
    ``wy_sum = sum_c w_c y'_c`` and ``wyx_sum = sum_c w_c y'_c (x_c - m)``.

    A row without target mass takes no ``log_s`` term, nor one without z-loss an ``lse`` term:
    the empty row of ``C = 0`` has ``log_s = lse = -inf``, and its loss is PyTorch's ``-sum``
    of nothing, -0.0, not ``0 * -inf``."""
    loss = -(wyx_sum - (wy_sum * log_s if wy_sum != 0.0 else 0.0))
    if z_loss > 0.0:
        loss += z_loss * lse * lse
    return loss


@njit(inline="always")
def probability_gradient(wy_sum, z_loss, lse, scale):
    """``a`` of a row's probability-target gradient, ``grad_j = a * p_j - scale * w_j y'_j``."""
    return scale * (wy_sum + 2.0 * z_loss * lse)


@njit(inline="always")
def soft_capped(v, a, t, cap, kind):
    """``cap * tanh(v / cap)`` (Gemma 2's logit soft-capping) from ``a = |v| / cap`` and
    ``t = exp(-2 a)``, in the scalar type ``kind`` (the row's: a float32 loop stays float32).

    ``tanh(a) = (1 - t) / (1 + t)`` cannot overflow (``t <= 1``; ``+-inf`` give ``+-cap``), but
    ``1 - t`` cancels for small ``a``: below 1/8 the Taylor series (its next term is below
    float64's rounding there) keeps the relative precision, where ``1 - t`` would leave only
    an absolute error of a few ulp of ``cap``.  Above, ``1 - t >= 0.22``: a few ulp.
    """
    a2 = a * a
    series = kind(-929569.0 / 638512875.0) * a2 + kind(21844.0 / 6081075.0)
    series = series * a2 + kind(-1382.0 / 155925.0)
    series = series * a2 + kind(62.0 / 2835.0)
    series = series * a2 + kind(-17.0 / 315.0)
    series = series * a2 + kind(2.0 / 15.0)
    series = series * a2 + kind(-1.0 / 3.0)
    small = a + a * a2 * series
    large = (kind(1.0) - t) / (kind(1.0) + t)
    # Both forms, then a select: a loop over the row stays branch-free, hence vectorised.
    z = kind(cap) * (small if a < kind(0.125) else large)
    return z if v >= kind(0.0) else -z


@njit(inline="always")
def soft_cap_slope(z, inverse_cap, kind):
    """``d z / d v = 1 - tanh(v / cap)**2`` of a capped value ``z = cap * tanh(v / cap)``,
    as ``(1 - z / cap) * (1 + z / cap)``: the chain rule's factor from the gradient with respect
    to the capped logits to that with respect to the raw ones."""
    u = z * kind(inverse_cap)
    return (kind(1.0) - u) * (kind(1.0) + u)


# --- bfloat16's 16-bit words ---------------------------------------------------------------------
# Numba has no bfloat16, so the CUDA kernels read and write bfloat16 arrays as their 16-bit words
# (the CPU converts through ml_dtypes, the caller's own library).  The conversions are plain
# arithmetic, not bit casts: the CUDA simulator runs kernels as Python, which has no bit cast, and
# plain njit functions let the tests check them against ml_dtypes on every word.

@njit(inline="always")
def bfloat16_value(word):
    """The float32 value of the bfloat16 whose 16-bit word is ``word`` (exact: a bfloat16 is
    float32's upper half); every nan word gives a nan."""
    magnitude = word & 0x7FFF
    biased, mantissa = magnitude >> 7, magnitude & 0x7F
    if biased == 0xFF:
        value = math.inf if mantissa == 0 else math.nan
    elif biased == 0:  # subnormal: steps of 2**-133
        value = math.ldexp(float(mantissa), -133)
    else:
        value = math.ldexp(float(mantissa + 128), biased - 134)
    return -value if word & 0x8000 else value


@njit(inline="always")
def bfloat16_word(value):
    """The 16-bit word of the bfloat16 nearest to ``value`` (a float32 or float64), ties to
    even, as ml_dtypes rounds: past the largest bfloat16 to inf, a nan to the quiet nan of its
    sign (0x7FC0, 0xFFC0).  Rounded once from ``value``'s own precision."""
    sign = 0x8000 if math.copysign(1.0, value) < 0.0 else 0
    magnitude = abs(float(value))
    if magnitude != magnitude:
        return sign | 0x7FC0
    if magnitude == 0.0 or magnitude == math.inf:
        return sign | (0x7F80 if magnitude == math.inf else 0)
    exponent = math.frexp(magnitude)[1]  # 2**(exponent - 1) <= magnitude < 2**exponent
    # bfloat16 holds 8 significant bits down to 2**-126, below that steps of 2**-133: so the
    # magnitude rounds to a whole number of steps of 2**step, which scaling makes exact.
    step = max(exponent, -125) - 8
    steps = math.ldexp(magnitude, -step)
    whole = math.floor(steps)
    fraction = steps - whole
    if fraction > 0.5 or (fraction == 0.5 and whole % 2.0 == 1.0):
        whole += 1.0
    # 128 steps and up are the normal numbers, whose biased exponent is step + 134; 256 steps
    # (a carry) is the next exponent's 1.0, and a word from 0x7F80 up is inf.
    word = ((step + 134) << 7) + int(whole) - 128
    return sign | min(word, 0x7F80)
