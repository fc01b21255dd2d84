"""PyTorch autograd functions over fastlsm's kernels: ``log_softmax``, ``softmax``,
``cross_entropy`` and ``linear_cross_entropy`` for CPU and CUDA tensors.

Importing this module imports PyTorch (``import fastlsm`` does not).  Tensors cross without
copies: a CPU tensor goes in as its NumPy view ``t.detach().numpy()`` and a result comes back
through ``torch.from_numpy``; a CUDA tensor goes in as it is (fastlsm reads it through
``__cuda_array_interface__`` and hands back CUDA tensors; ``linear_cross_entropy``'s matmuls
run in PyTorch there).  Arguments are checked by fastlsm itself, with its errors.

The losses compute their gradient in the forward, fused with the loss, and the backward scales
it by the upstream gradient.  Safety rules:

- Nothing autograd may still read is written: results and gradients are new tensors, and a
  backward never writes into the upstream gradient it is handed (autograd may hand the same
  tensor to other nodes too).
- The one exception is asked for: ``cross_entropy(..., inplace=True)`` writes the gradient over
  the logits.  The call declares it with ``ctx.mark_dirty``, PyTorch's mechanism for in-place
  operations, so the backward of any node that saved the logits raises instead of reading the
  gradient; a leaf or a view, which autograd would refuse after the write, is refused before.
- Backwards are once differentiable: ``create_graph=True`` through them raises.  Gradients with
  respect to class weights and probability targets are not computed: one that requires grad is
  a ``NotImplementedError``.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

import fastlsm

__all__ = ["CrossEntropy", "LinearCrossEntropy", "LogSoftmax", "Softmax", "cross_entropy",
           "linear_cross_entropy", "log_softmax", "softmax"]


def _array(t: torch.Tensor | None) -> Any:
    """``t``'s data as fastlsm reads it, without a copy: a NumPy view of a CPU tensor (bfloat16
    as ml_dtypes'), a CUDA tensor as it is."""
    if t is None:
        return None
    t = t.detach()
    if t.is_cuda:
        return t
    if t.dtype == torch.bfloat16:
        import ml_dtypes
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _tensor(a: Any) -> torch.Tensor:
    """A fastlsm result as a tensor, without a copy: a CUDA result already is one; a NumPy array
    (or a reduced loss's NumPy scalar, as a 0-d tensor) is wrapped."""
    if isinstance(a, torch.Tensor):
        return a
    a = np.asarray(a)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _recorded(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records a call on ``tensors``.  ``ctx.needs_input_grad`` says which
    inputs require grad even under ``torch.no_grad()``, so the loss wrappers ask this first and
    skip the gradient (and its cost) where nothing is recorded."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _once_differentiable(backward):
    """A backward that builds no graph: ``create_graph=True`` would leave the second derivatives
    out without a word (``torch.autograd.function.once_differentiable`` does when the upstream
    gradient does not require grad), so it raises."""
    @functools.wraps(backward)
    def first_order(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(f"{type(ctx).__name__} is differentiable once: fastlsm.torch has "
                               "no second derivatives (create_graph=True)")
        return backward(ctx, *grads)
    return first_order


def _refuse_grad(ctx, **positions: int) -> None:
    """fastlsm has no gradient for these inputs: refuse rather than let autograd take it as 0."""
    for name, position in positions.items():
        if ctx.needs_input_grad[position]:
            raise NotImplementedError(f"fastlsm.torch computes no gradient with respect to "
                                      f"{name}; pass {name}.detach()")


def _refuse_overwrite(logits: torch.Tensor) -> None:
    """Refuse, before anything is written, the logits that autograd refuses only once the write
    is done: a leaf (the caller's data, or a parameter) and a view (which a function that writes
    in place may not take when it returns more than one tensor, as cross_entropy does)."""
    if logits.is_leaf:
        raise ValueError("inplace=True writes the gradient over the logits, but they are a leaf "
                         "tensor (the caller's data); pass inplace=False")
    if logits._is_view():
        raise ValueError("inplace=True cannot write the gradient over a view of another tensor "
                         "(autograd allows no view there): compute logits that own their memory, "
                         "e.g. hidden.view(-1, H) @ W.T rather than (hidden @ W.T).view(-1, C), "
                         "or pass inplace=False")


def _per_row(upstream: torch.Tensor, ignored: torch.Tensor | None) -> torch.Tensor:
    """The upstream gradient of a loss, broadcastable against the logits: a scalar as it is, a
    ``none`` loss's ``(N, d1, ...)`` with the class axis (1) put back and 0 at ``ignored`` rows,
    whose gradient is 0 whatever their upstream gradient (inf and nan too, as in PyTorch)."""
    if ignored is not None:
        upstream = upstream.masked_fill(ignored, 0)
    return upstream.unsqueeze(1) if upstream.ndim else upstream


def _rowwise_forward(ctx, op, input: torch.Tensor, dim: int) -> torch.Tensor:
    output = _tensor(op(_array(input), dim))
    ctx.dim = dim
    ctx.save_for_backward(output)
    return output


def _rowwise_backward(ctx, op, grad_output: torch.Tensor):
    """The gradient from the saved output alone (``op``: fastlsm's ``*_backward``)."""
    (output,) = ctx.saved_tensors
    return _tensor(op(_array(grad_output), _array(output), ctx.dim)), None


class LogSoftmax(torch.autograd.Function):
    """``log_softmax`` along ``dim``; the backward reads the saved output only."""

    @staticmethod
    def forward(ctx, input: torch.Tensor, dim: int) -> torch.Tensor:
        return _rowwise_forward(ctx, fastlsm.log_softmax, input, dim)

    @staticmethod
    @_once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        return _rowwise_backward(ctx, fastlsm.log_softmax_backward, grad_output)


class Softmax(torch.autograd.Function):
    """``softmax`` along ``dim``; the backward reads the saved output only."""

    @staticmethod
    def forward(ctx, input: torch.Tensor, dim: int) -> torch.Tensor:
        return _rowwise_forward(ctx, fastlsm.softmax, input, dim)

    @staticmethod
    @_once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        return _rowwise_backward(ctx, fastlsm.softmax_backward, grad_output)


class CrossEntropy(torch.autograd.Function):
    """Cross-entropy of logits with classes on dim 1; ``options`` are the keyword arguments of
    :func:`fastlsm.cross_entropy`.  The forward computes the gradient: :func:`cross_entropy`
    applies it only where autograd records the call.  With ``inplace`` it returns
    ``(loss, input)``, ``input`` now holding the gradient."""

    @staticmethod
    def forward(ctx, input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                inplace: bool, options: dict[str, Any]):
        _refuse_grad(ctx, target=1, weight=2)
        if inplace:
            _refuse_overwrite(input)
        logits = _array(input)
        loss, grad = fastlsm.cross_entropy(logits, _array(target), _array(weight), axis=1,
                                           return_grad=True, grad_out=logits if inplace else None,
                                           **options)
        ctx.inplace = inplace
        ctx.ignore_index = options["ignore_index"]
        ctx.rows_ignored = options["reduction"] == "none" and not target.is_floating_point()
        if not inplace:
            ctx.save_for_backward(_tensor(grad), target)
            return _tensor(loss)
        ctx.mark_dirty(input)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(input, target)
        return _tensor(loss), input

    @staticmethod
    @_once_differentiable
    def backward(ctx, upstream: torch.Tensor, grad_of_overwritten: torch.Tensor | None = None):
        if grad_of_overwritten is not None:
            raise RuntimeError("the logits of cross_entropy(..., inplace=True) hold its gradient "
                               "now, and nothing can be differentiated through them")
        # Each row's loss depends on its own logits only, so the gradient of sum(upstream * loss)
        # is the stashed gradient of sum(loss) scaled row by row: exact for every reduction
        # (mean and sum by one scalar), and the forward's one fused pass serves 'none' too.
        grad, target = ctx.saved_tensors
        scale = _per_row(upstream, target == ctx.ignore_index if ctx.rows_ignored else None)
        if ctx.inplace:
            # The logits' memory becomes the gradient handed on.  Scaling it changes the saved
            # tensor's version, so a second backward through this graph raises (retain_graph).
            grad = grad.detach().mul_(scale)
        else:
            grad = grad * scale
        return grad, None, None, None, None


class LinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of the logits ``input @ linear_weight.T + linear_bias``, the logits never
    materialised; ``options`` are keyword arguments of
    :func:`fastlsm.linear_cross_entropy`.  The forward computes the gradients (but for
    ``none``): :func:`linear_cross_entropy` applies it only where autograd records the call."""

    @staticmethod
    def forward(ctx, input: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor,
                linear_bias: torch.Tensor | None, weight: torch.Tensor | None,
                options: dict[str, Any]) -> torch.Tensor:
        _refuse_grad(ctx, target=2, weight=4)
        arguments = (_array(input), _array(linear_weight), _array(target))
        keywords = dict(linear_bias=_array(linear_bias), weight=_array(weight), **options)
        # 'none': the weight's gradient sums every row's share weighted by its upstream gradient,
        # unknown here, so the forward takes the loss alone and the backward runs the whole call
        # again with grad_loss=upstream (twice the matmuls and softmax passes of mean and sum).
        ctx.recompute = options["reduction"] == "none"
        if ctx.recompute:
            ctx.save_for_backward(input, linear_weight, target, linear_bias, weight)
            ctx.options = options
            return _tensor(fastlsm.linear_cross_entropy(*arguments, **keywords))
        loss, *grads = fastlsm.linear_cross_entropy(*arguments, return_grad=True, **keywords)
        ctx.save_for_backward(*map(_tensor, grads))
        return _tensor(loss)

    @staticmethod
    @_once_differentiable
    def backward(ctx, upstream: torch.Tensor):
        if ctx.recompute:
            input, linear_weight, target, linear_bias, weight = map(_array, ctx.saved_tensors)
            _, *grads = fastlsm.linear_cross_entropy(
                input, linear_weight, target, linear_bias=linear_bias, weight=weight,
                return_grad=True, grad_loss=_array(upstream), **ctx.options)
            grads = [_tensor(g) for g in grads]
        else:
            # The gradients are linear in the scalar upstream gradient.
            grads = [g * upstream for g in ctx.saved_tensors]
        if len(grads) == 2:  # no linear_bias
            grads.append(None)
        grad_input, grad_linear_weight, grad_linear_bias = grads
        return grad_input, grad_linear_weight, None, grad_linear_bias, None, None


def log_softmax(input: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``torch.nn.functional.log_softmax`` computed by :func:`fastlsm.log_softmax`.

    Non-finite rows get :func:`fastlsm.log_softmax`'s answers, SciPy's: a row holding ``+inf``
    is nan there and ``-inf`` elsewhere, where PyTorch gives nan throughout.

    Parameters
    ----------
    input : Tensor
        CPU or CUDA tensor; float16 and bfloat16 are computed in float32.
    dim : int, optional
        The dimension of the softmax (default: the last).

    Returns
    -------
    Tensor
        Of ``input``'s shape, dtype and device.

    Examples
    --------
    >>> import torch, fastlsm.torch as ft
    >>> ft.log_softmax(torch.tensor([[2.0, 1.0, 0.1]]), dim=1)
    tensor([[-0.4170, -1.4170, -2.3170]])
    """
    return LogSoftmax.apply(input, dim)


def softmax(input: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``torch.nn.functional.softmax`` computed by :func:`fastlsm.softmax`.

    Parameters and result as in :func:`log_softmax`.

    Examples
    --------
    >>> import torch, fastlsm.torch as ft
    >>> ft.softmax(torch.tensor([0.0, 0.0]))
    tensor([0.5000, 0.5000])
    """
    return Softmax.apply(input, dim)


def cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                  *, ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0, z_loss: float = 0.0,
                  softcap: float | None = None, inplace: bool = False) -> torch.Tensor:
    """``torch.nn.functional.cross_entropy`` computed by :func:`fastlsm.cross_entropy`, its
    gradient fused into the forward.

    Parameters
    ----------
    input : Tensor
        Logits ``(C,)``, ``(N, C)`` or ``(N, C, d1, ...)``, on the CPU or a GPU.
    target : Tensor
        Class indices, or class probabilities of ``input``'s shape (which get no gradient).
    weight : Tensor, optional
        Per-class weights (which get no gradient).
    ignore_index, reduction, label_smoothing
        As in PyTorch; keyword-only here, where PyTorch has its deprecated ``size_average`` and
        ``reduce`` between them.
    z_loss, softcap
        As in :func:`fastlsm.cross_entropy`.
    inplace : bool, optional
        Write the gradient over ``input`` instead of a new tensor, saving its memory.  Only for
        logits that nothing else needs: afterwards they hold the gradient.  A node that saved
        them for its backward makes the backward raise, a leaf or a view is refused, and a
        second backward through the graph (``retain_graph``) raises.  Without a gradient to compute
        (``torch.no_grad()``, logits that do not require grad) nothing is written.

    Returns
    -------
    Tensor
        The loss, of ``input``'s dtype and device: 0-d for ``mean``/``sum``.

    Notes
    -----
    The backward scales the gradient the forward computed, in ``input``'s dtype, by the
    upstream gradient.  For float16 and bfloat16 that rounds it a second time unless the
    upstream gradient is 1 (for bfloat16, or a power of two, as a loss scaler's; float16's
    small gradients are subnormal, so there not even then): up to one more ulp of the half
    dtype.  :func:`fastlsm.cross_entropy` with ``grad_loss=`` rounds once.

    Examples
    --------
    >>> import torch, fastlsm.torch as ft
    >>> logits = torch.tensor([[2.0, 1.0, 0.1], [0.5, 2.0, 1.5]], requires_grad=True)
    >>> loss = ft.cross_entropy(logits, torch.tensor([0, 1]))
    >>> loss.backward()
    >>> round(loss.item(), 4), logits.grad[0]
    (0.5106, tensor([-0.1705,  0.1212,  0.0493]))
    """
    options = dict(ignore_index=ignore_index, reduction=reduction,
                   label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    if not _recorded(input, target, weight):
        loss = fastlsm.cross_entropy(_array(input), _array(target), _array(weight), axis=1,
                                     **options)
        return _tensor(loss)
    loss = CrossEntropy.apply(input, target, weight, inplace, options)
    return loss[0] if isinstance(loss, tuple) else loss


def linear_cross_entropy(input: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor,
                         *, linear_bias: torch.Tensor | None = None,
                         weight: torch.Tensor | None = None, reduction: str = "mean",
                         ignore_index: int = -100, label_smoothing: float = 0.0,
                         softcap: float | None = None, z_loss: float = 0.0,
                         chunk_bytes: int | None = None) -> torch.Tensor:
    """``torch.nn.functional.linear_cross_entropy`` computed by
    :func:`fastlsm.linear_cross_entropy`: the logits are never materialised.

    Parameters
    ----------
    input : Tensor
        Features ``(..., H)``, on the CPU or a CUDA device.
    linear_weight : Tensor
        ``(C, H)``, as ``torch.nn.Linear`` stores it.
    target : Tensor
        Class indices ``(...)``, or class probabilities ``(..., C)`` (which get no gradient).
    linear_bias : Tensor, optional
        ``(C,)``.
    weight, reduction, ignore_index, label_smoothing
        As in PyTorch (class weights get no gradient).
    softcap, z_loss, chunk_bytes
        As in :func:`fastlsm.linear_cross_entropy`.

    Returns
    -------
    Tensor
        The loss, of the inputs' dtype: 0-d for ``mean``/``sum``.

    Notes
    -----
    ``mean`` and ``sum`` compute the gradients in the forward, and the backward scales them by
    the upstream gradient in their dtype: for float16 and bfloat16 a second rounding unless it
    is 1 (see :func:`cross_entropy`).  ``none`` computes the loss in the
    forward and everything again, gradients included (rounded once), in the backward.

    Examples
    --------
    >>> import torch, fastlsm.torch as ft
    >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    >>> w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], requires_grad=True)
    >>> loss = ft.linear_cross_entropy(x, w, torch.tensor([0, 2]))
    >>> loss.backward()
    >>> round(loss.item(), 4), w.grad.shape
    (0.8103, torch.Size([3, 2]))
    """
    options = dict(reduction=reduction, ignore_index=ignore_index,
                   label_smoothing=label_smoothing, softcap=softcap, z_loss=z_loss,
                   chunk_bytes=chunk_bytes)
    if not _recorded(input, linear_weight, target, linear_bias, weight):
        loss = fastlsm.linear_cross_entropy(_array(input), _array(linear_weight), _array(target),
                                            linear_bias=_array(linear_bias),
                                            weight=_array(weight), **options)
        return _tensor(loss)
    return LinearCrossEntropy.apply(input, linear_weight, target, linear_bias, weight, options)
