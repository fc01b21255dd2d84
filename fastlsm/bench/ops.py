"""The benchmark op table: what ``fastlsm bench`` (CPU and CUDA), the asv suite and the tests time.

One :class:`Op` per public operation: fastlsm's call, a plain NumPy reference, the memory it must
move, the floor it is measured against and the peers that compute the same thing.  Every call
takes an :class:`Inputs`: NumPy arrays on the CPU, PyTorch tensors with ``--device cuda``.
fastlsm is reached through its public API only; the peers are imported when first called.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

import fastlsm
from fastlsm.bench import floors
from fastlsm.bench.timing import measure

SCALE = 3.0   # logits are standard normal * SCALE


@dataclass
class Inputs:
    """The arrays of one benchmark case.

    ``x`` is the logits (the incoming gradient, for the backward ops), ``target`` one class index
    a row, ``out`` a preallocated result of ``x``'s shape (``None``: the call allocates) and
    ``forward`` the forward op's output that a backward op takes (see :func:`for_op`).
    """

    x: Any
    target: Any
    out: Any = None
    forward: Any = None
    _jax: tuple[Any, Any] | None = field(default=None, repr=False)

    @property
    def jax(self) -> tuple[Any, Any]:
        """``(x, target)`` as JAX arrays on the CPU, copied once."""
        if self._jax is None:
            import jax.numpy as jnp
            _jax_functions()     # float64 enabled before the arrays are made
            self._jax = (jnp.asarray(self.x), jnp.asarray(self.target))
        return self._jax

    @property
    def torch(self) -> tuple[Any, Any]:
        """``(x, target)`` as PyTorch tensors: NumPy arrays wrapped (no copy) at each call, as a
        NumPy pipeline's call to PyTorch wraps them (a microsecond of a small call)."""
        import torch
        return tuple(v if isinstance(v, torch.Tensor) else torch.from_numpy(v)
                     for v in (self.x, self.target))


Call = Callable[[Inputs], Any]


def make_inputs(shape: tuple[int, int], dtype: Any) -> Inputs:
    """Scaled standard-normal logits from ``default_rng(0)``, random class targets, and ``out``."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=dtype)
    x *= SCALE
    target = rng.integers(0, shape[1], size=shape[0], dtype=np.int64)
    return Inputs(x, target, np.empty_like(x))


# -------------------------------------------------------------------------------------------------
# Plain NumPy, row-wise over the last axis: the NumPy peer, and in float64 the reference.


def np_logsumexp(x: np.ndarray, keepdims: bool = False) -> np.ndarray:
    """``max + log(sum(exp(x - max)))``."""
    m = x.max(axis=-1, keepdims=True)
    s = np.log(np.exp(x - m).sum(axis=-1, keepdims=True))
    s += m
    return s if keepdims else s[..., 0]


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    return x - np_logsumexp(x, keepdims=True)


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    e /= e.sum(axis=-1, keepdims=True)
    return e


def np_log_softmax_backward(grad: np.ndarray, output: np.ndarray) -> np.ndarray:
    return grad - np.exp(output) * grad.sum(axis=-1, keepdims=True)


def np_softmax_backward(grad: np.ndarray, output: np.ndarray) -> np.ndarray:
    return output * (grad - (grad * output).sum(axis=-1, keepdims=True))


def np_cross_entropy(x: np.ndarray, target: np.ndarray) -> np.floating:
    rows = np.arange(x.shape[0])
    return (np_logsumexp(x) - x[rows, target]).mean()


def np_cross_entropy_grad(x: np.ndarray, target: np.ndarray) -> tuple[np.floating, np.ndarray]:
    rows = np.arange(x.shape[0])
    lse = np_logsumexp(x, keepdims=True)
    loss = (lse[:, 0] - x[rows, target]).mean()
    grad = np.exp(x - lse)
    grad[rows, target] -= 1
    grad /= x.shape[0]
    return loss, grad


def np_nll_loss(x: np.ndarray, target: np.ndarray) -> np.floating:
    return -x[np.arange(x.shape[0]), target].mean()


# -------------------------------------------------------------------------------------------------
# Peers


def _like_input(inp: Inputs, tensor: Any) -> Any:
    """A PyTorch result as the caller's kind of array: NumPy (no copy) for NumPy input."""
    return tensor.numpy() if isinstance(inp.x, np.ndarray) else tensor


def _torch(name: str) -> Call:
    """A PyTorch function of the logits, on the last axis."""
    def call(inp: Inputs) -> Any:
        import torch
        return _like_input(inp, getattr(torch, name)(inp.torch[0], -1))
    return call


def _torch_loss(name: str) -> Call:
    def call(inp: Inputs) -> Any:
        import torch.nn.functional as F
        return _like_input(inp, getattr(F, name)(*inp.torch))
    return call


def _torch_cross_entropy_grad(inp: Inputs) -> tuple[Any, Any]:
    import torch.nn.functional as F
    xt, tt = inp.torch
    leaf = xt.detach().requires_grad_(True)
    loss = F.cross_entropy(leaf, tt)
    loss.backward()
    return _like_input(inp, loss.detach()), _like_input(inp, leaf.grad)


def _scipy(name: str) -> Call:
    def call(inp: Inputs) -> Any:
        from scipy import special
        return getattr(special, name)(inp.x, axis=-1)
    return call


def _scipy_cross_entropy(inp: Inputs) -> Any:
    from scipy import special
    rows = np.arange(inp.x.shape[0])
    return (special.logsumexp(inp.x, axis=-1) - inp.x[rows, inp.target]).mean()


@functools.cache
def _jax_functions() -> dict[str, Callable[..., Any]]:
    """The JAX peers, jitted once: XLA compiles each for the first shape and dtype it sees."""
    import jax
    import jax.numpy as jnp
    # float64 inputs stay float64 (JAX would compute them in float32 otherwise)
    jax.config.update("jax_enable_x64", True)

    def cross_entropy(x, target):
        lse = jax.nn.logsumexp(x, axis=-1)
        return jnp.mean(lse - jnp.take_along_axis(x, target[:, None], axis=-1)[:, 0])

    return {"log_softmax": jax.jit(lambda x: jax.nn.log_softmax(x, axis=-1)),
            "softmax": jax.jit(lambda x: jax.nn.softmax(x, axis=-1)),
            "logsumexp": jax.jit(lambda x: jax.nn.logsumexp(x, axis=-1)),
            "cross_entropy": jax.jit(cross_entropy),
            "cross_entropy_grad": jax.jit(jax.value_and_grad(cross_entropy))}


def _jax(name: str) -> Call:
    """A jitted JAX function of the logits (and targets), on the JAX arrays of the input."""
    takes_target = name.startswith("cross_entropy")

    def call(inp: Inputs) -> Any:
        x, target = inp.jax
        result = _jax_functions()[name](*((x, target) if takes_target else (x,)))
        return jax_ready(result)
    return call


def jax_ready(result: Any) -> Any:
    """``result`` once computed: JAX dispatches asynchronously, a timed call must wait."""
    for item in result if isinstance(result, tuple) else (result,):
        item.block_until_ready()
    return result


PEER_MODULES = {"numpy": "numpy", "scipy": "scipy.special", "torch": "torch", "jax": "jax"}


def available_peers() -> dict[str, str | None]:
    """Peer name -> version, or ``None`` where it does not import."""
    found: dict[str, str | None] = {}
    for peer, module in PEER_MODULES.items():
        try:
            importlib.import_module(module)
            top = sys.modules[module.split(".")[0]]
            found[peer] = getattr(top, "__version__", "?")
        except Exception:  # a peer that fails to import for any reason is left out
            found[peer] = None
    return found


# -------------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class Floor:
    """The least memory traffic any implementation of an op needs, at the machine's
    multi-threaded bandwidth.

    ``ways`` times the same traffic several ways (NumPy, Numba ``prange`` loops of
    :mod:`fastlsm.bench.floors`, PyTorch where it is installed); the floor is the fastest of them
    on the machine at hand (:func:`fastest_way`).  ``elements(n, c)`` counts the elements it reads
    and writes.
    """

    name: str
    ways: dict[str, Call]
    elements: Callable[[int, int], int]
    reads_target: bool = False


def _torch_copy(i: Inputs) -> Any:
    import torch
    return torch.from_numpy(i.out).copy_(i.torch[0])


def _torch_sum(i: Inputs) -> Any:
    import torch
    return torch.sum(i.torch[0])


FLOORS: dict[str, Floor] = {
    "copy": Floor("copy floor", {"numba prange": lambda i: floors.parallel_copy(i.x, i.out),
                                 "np.copyto": lambda i: np.copyto(i.out, i.x),
                                 "torch": _torch_copy},
                  lambda n, c: 2 * n * c),
    # NumPy's x.sum() is one thread, and compute-bound: no read floor (see fastlsm.bench.floors)
    "read": Floor("read floor", {"numba prange": lambda i: floors.parallel_sum(i.x),
                                 "torch": _torch_sum},
                  lambda n, c: n * c),
    # the backward ops read two arrays and write a third, which they allocate (``out`` holds
    # the forward's output)
    "add": Floor("add floor", {"numba prange": lambda i: floors.parallel_add(i.x, i.forward),
                               "np.add": lambda i: np.add(i.x, i.forward)},
                 lambda n, c: 3 * n * c),
    # nll_loss reads one element a row
    "gather": Floor("gather floor",
                    {"np.take_along_axis":
                     lambda i: np.take_along_axis(i.x, i.target[:, None], axis=1).sum()},
                    lambda n, c: n, reads_target=True),
}


def floor_ways(floor: Floor) -> dict[str, Call]:
    """The ways of ``floor`` this machine can run (PyTorch's only where it imports)."""
    torch_found = importlib.util.find_spec("torch") is not None
    return {name: call for name, call in floor.ways.items() if torch_found or name != "torch"}


def fastest_way(floor: Floor, inputs: Inputs, budget_s: float = 0.05) -> tuple[str, Call]:
    """The name and call of the fastest of ``floor``'s ways on ``inputs`` (each run once to warm
    up, then timed for ``budget_s``)."""
    ways = floor_ways(floor)
    times = {}
    for name, call in ways.items():
        call(inputs)
        times[name] = measure(lambda: call(inputs), budget_s, min_samples=3).median_s
    best = min(times, key=times.__getitem__)
    return best, ways[best]


@dataclass(frozen=True)
class Op:
    """One benchmarked op.

    ``call`` is fastlsm's, writing into ``inputs.out`` where the API allows (allocating where
    ``out`` is None); ``reference`` is plain NumPy (:func:`reference_inputs` gives it exact
    inputs); ``peers`` maps a :data:`PEER_MODULES` name to the same computation there.
    ``elements(n, c)`` counts the elements the op must read and write, ``reads_target`` adds the
    int64 targets; ``floor`` names its :data:`FLOORS` entry.  ``forward`` is, for a backward op,
    the fastlsm forward whose output it takes.  ``log_values``: the array results are logs (their
    error is judged on ``max(1, |value|)``, see :mod:`fastlsm.bench.cuda`).  ``in_place``: the
    result may be written over the input (``grad_out=input``).
    """

    name: str
    call: Call
    reference: Call
    floor: str
    elements: Callable[[int, int], int]
    peers: dict[str, Call]
    reads_target: bool = False
    forward: Callable[..., Any] | None = None
    log_values: bool = False
    in_place: bool = False


def _elementwise(n: int, c: int) -> int:
    return 2 * n * c


OPS: dict[str, Op] = {op.name: op for op in (
    Op("log_softmax", lambda i: fastlsm.log_softmax(i.x, out=i.out),
       lambda i: np_log_softmax(i.x), "copy", _elementwise,
       {"scipy": _scipy("log_softmax"), "torch": _torch("log_softmax"),
        "jax": _jax("log_softmax")}, log_values=True),
    Op("softmax", lambda i: fastlsm.softmax(i.x, out=i.out),
       lambda i: np_softmax(i.x), "copy", _elementwise,
       {"scipy": _scipy("softmax"), "torch": _torch("softmax"), "jax": _jax("softmax")}),
    Op("logsumexp", lambda i: fastlsm.logsumexp(i.x),
       lambda i: np_logsumexp(i.x), "read", lambda n, c: n * c + n,
       {"scipy": _scipy("logsumexp"), "torch": _torch("logsumexp"), "jax": _jax("logsumexp")},
       log_values=True),
    Op("log_softmax_backward", lambda i: fastlsm.log_softmax_backward(i.x, i.forward),
       lambda i: np_log_softmax_backward(i.x, i.forward), "add", lambda n, c: 3 * n * c, {},
       forward=fastlsm.log_softmax),
    Op("softmax_backward", lambda i: fastlsm.softmax_backward(i.x, i.forward),
       lambda i: np_softmax_backward(i.x, i.forward), "add", lambda n, c: 3 * n * c, {},
       forward=fastlsm.softmax),
    Op("cross_entropy", lambda i: fastlsm.cross_entropy(i.x, i.target),
       lambda i: np_cross_entropy(i.x, i.target), "read", lambda n, c: n * c + 1,
       {"scipy": _scipy_cross_entropy, "torch": _torch_loss("cross_entropy"),
        "jax": _jax("cross_entropy")},
       reads_target=True),
    Op("cross_entropy_grad",
       lambda i: fastlsm.cross_entropy(i.x, i.target, return_grad=True, grad_out=i.out),
       lambda i: np_cross_entropy_grad(i.x, i.target), "copy", lambda n, c: 2 * n * c + 1,
       {"torch": _torch_cross_entropy_grad, "jax": _jax("cross_entropy_grad")},
       reads_target=True, in_place=True),
    Op("nll_loss", lambda i: fastlsm.nll_loss(i.x, i.target),
       lambda i: np_nll_loss(i.x, i.target), "gather", lambda n, c: n + 1,
       {"torch": _torch_loss("nll_loss")}, reads_target=True),
)}

# What ``fastlsm bench`` runs unless ``--ops`` says otherwise.
DEFAULT_OPS = ("log_softmax", "softmax", "logsumexp", "cross_entropy", "cross_entropy_grad")


def peers_of(op: Op) -> dict[str, Call]:
    """The op's peers, plain NumPy (its reference, in the input's precision) first."""
    return {"numpy": op.reference, **op.peers}


def for_op(op: Op, inputs: Inputs) -> Inputs:
    """``inputs`` ready for ``op``: a backward op's ``forward`` computed into ``out``."""
    if op.forward is None:
        return inputs
    return Inputs(inputs.x, inputs.target, inputs.out, op.forward(inputs.x, out=inputs.out))


def reference_inputs(inputs: Inputs) -> Inputs:
    """NumPy ``inputs`` in a higher precision: float64 for float32, ``longdouble`` for float64
    where it is wider."""
    dtype = np.dtype(np.float64)
    if inputs.x.dtype == np.float64 and np.finfo(np.longdouble).eps < np.finfo(np.float64).eps:
        dtype = np.dtype(np.longdouble)
    forward = None if inputs.forward is None else inputs.forward.astype(dtype)
    return Inputs(inputs.x.astype(dtype), inputs.target, None, forward)


def bytes_moved(op: Op | Floor, shape: tuple[int, int], dtype: Any) -> int:
    """Bytes ``op`` must read and write on an ``(N, C)`` input of ``dtype``."""
    n, c = shape
    return op.elements(n, c) * np.dtype(dtype).itemsize + (8 * n if op.reads_target else 0)
