"""Pure LoRA math on tensors: no modules, no state.

Shapes follow PEFT: A [r, in] (or [r, in/groups, *kernel] for convolutions), B [out, r]
(or [out, r, 1, ...]), scaling s a float. The weight update is ``ΔW = s · B A`` (Hu et al. 2021, §4.1).
"""

from __future__ import annotations

import platform
from typing import Callable, Optional, Union

import torch
from torch import Tensor

# A frozen weight handed to lorafit's kernels: the tensor, or a function that makes it in fp32
# (a quantised base dequantises in the forward and again in the backward, so no full-precision
# copy stays alive in between).
WeightSource = Union[Tensor, Callable[[], Tensor]]


def _onednn_linear():
    """oneDNN's linear kernel (``x Wᵀ + b``, the one Inductor calls on CPU) on x86-64, or None."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return None
    return getattr(torch.ops.mkldnn, "_linear_pointwise", None)


ONEDNN_LINEAR = _onednn_linear()
# Below about this many multiply-adds, oneDNN's call overhead (~12 µs against MKL's ~4 µs) costs
# more than its faster kernel saves.
ONEDNN_MIN_MACS = 1 << 21


def mm_t(x: Tensor, w: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``x wᵀ + bias`` for x [N, k] and w [m, k] (w may be a transposed view): a plain kernel
    call, not differentiable, for the products inside lorafit's autograd nodes.

    Contiguous fp32 CPU inputs go through oneDNN's linear kernel: PyTorch's fp32 ``mm`` calls MKL,
    which runs its AVX2 code on non-Intel CPUs, where oneDNN uses AVX-512 (2.2x faster for the
    shapes of a LoRA layer on AMD Zen 5). Both accumulate in fp32; only the summation order
    differs. Tiny products (`ONEDNN_MIN_MACS`) and everything else go to ``addmm`` / ``mm``.
    """
    if (onednn_applies(x, w, x.shape[0] * x.shape[1] * w.shape[0]) and x.dim() == 2 and x.is_contiguous()
            and (w.is_contiguous() or w.T.is_contiguous()) and (bias is None or bias.dtype == x.dtype)):
        return ONEDNN_LINEAR(x, w, bias, "none", [], "")
    return x @ w.T if bias is None else torch.addmm(bias, x, w.T)


def mm_tn(a: Tensor, b: Tensor) -> Tensor:
    """``aᵀ b`` for a [N, p] and b [N, q] (a weight gradient). Through oneDNN (see `mm_t`) the
    narrower operand is copied transposed and the wider one read in place; otherwise ``a.T @ b``."""
    if not onednn_applies(a, b, a.shape[0] * a.shape[1] * b.shape[1]):
        return a.T @ b
    if a.shape[1] <= b.shape[1]:
        return mm_t(a.T.contiguous(), b.T)
    return mm_t(b.T.contiguous(), a.T).T


def onednn_applies(x: Tensor, w: Tensor, macs: Optional[int] = None) -> bool:
    """Whether a product of x [N, k] with w [m, k] goes through oneDNN (see `mm_t`)."""
    macs = x.shape[0] * x.shape[1] * w.shape[0] if macs is None else macs
    # Under torch.compile the plain ops are traced instead: Inductor picks its own GEMM, and its
    # lowering of this oneDNN op only accepts constant (frozen) weights. Under CPU autocast the
    # plain ops keep following autocast.
    return (macs >= ONEDNN_MIN_MACS and ONEDNN_LINEAR is not None and x.dtype == w.dtype == torch.float32
            and x.device.type == "cpu" and not torch.compiler.is_compiling()
            and not torch.is_autocast_enabled("cpu"))


def delta_weight(A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """``ΔW = s · B A`` in fp32, shaped like the base weight ([out, in] or [out, in, *kernel]).

    For a convolution B is a 1×1 kernel, so ``ΔW[o, i, k…] = s Σ_r B[o, r] A[r, i, k…]``.
    The product is formed in fp32 so a merge into a bf16/fp16 weight rounds only once.
    """
    r = A.shape[0]
    b2 = B.reshape(B.shape[0], r).float()
    a2 = A.reshape(r, -1).float()
    return (scaling * (b2 @ a2)).reshape(B.shape[0], *A.shape[1:])


def merge_into(weight: Tensor, delta: Tensor, sign: float = 1.0, safe: bool = False) -> bool:
    """``W ← W + sign · ΔW`` in place, computed in fp32 and rounded once to W's dtype.

    With `safe`, a ΔW holding NaN/Inf leaves W untouched and the call returns False.
    """
    if safe and not bool(torch.isfinite(delta).all()):
        return False
    with torch.no_grad():
        weight.copy_((weight.float() + sign * delta.to(weight.device)).to(weight.dtype))
    return True


def dropout_keep(x: Tensor, p: float) -> Tensor:
    """The keep mask of dropout with probability `p` for x, as a bool tensor shaped like x.

    Drawn as ``bernoulli(1 − p)`` in fp32 whatever x's dtype (a draw in bf16 has 8 random bits
    and biases E[mask] by ~0.2% at p = 0.1), the draw `torch.nn.Dropout` makes for an fp32 input:
    every path of lorafit, and PEFT on fp32 inputs, drop the same entries for the same seed."""
    return torch.empty(x.shape, dtype=torch.float32, device=x.device).bernoulli_(1.0 - p).bool()


def dropped(x: Tensor, keep: Tensor, p: float) -> Tensor:
    """Inverted dropout: ``x ⊙ keep / (1 − p)``, so E[dropped(x)] = x."""
    return x * keep * (1.0 / (1.0 - p))


def dropout(x: Tensor, p: float) -> Tensor:
    """``dropped(x, dropout_keep(x, p), p)``, or x itself when p is 0."""
    return x if p <= 0 else dropped(x, dropout_keep(x, p), p)


def lora_linear_delta(x: Tensor, A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """``s · (x Aᵀ) Bᵀ`` for x [..., in] -> [..., out]; the scale multiplies the rank-r middle."""
    return torch.nn.functional.linear(torch.nn.functional.linear(x, A) * scaling, B)


class _FusedLoraLinear(torch.autograd.Function):
    """``y = x Wᵀ + b + s · (m ⊙ x / (1 − p)) Aᵀ Bᵀ`` with a frozen W, as one autograd node.

    Compared with composing the ops, it saves for backward only x (usually shared with other
    consumers), the rank-r activation h and, with dropout, a 1-byte mask instead of a copy of
    the dropped-out input; the adapter's output is accumulated into the base output in place
    (``addmm_``), and in backward the two input-gradient paths share one buffer.
    Shapes: x [N, in], W [out, in] (or [in, out] when `w_in_out`, HF Conv1D), A [r, in], B [out, r];
    `weight` is a `WeightSource`. With a `dtype` (autocast's, see `fused_dtype`) every operand is
    cast to it, as autocast casts a linear layer's, the products run in it and y comes out in it;
    the gradients come back in each input's own dtype. The backward casts W again rather than
    keeping its cast copy alive from forward to backward (autocast keeps one per layer: half an
    fp32 model's weights in bf16).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scaling, p, w_in_out, dtype):
        ctx.dtypes = x.dtype, A.dtype, B.dtype, None if bias is None else bias.dtype
        source = _remember(ctx, weight)
        y, saved = _fused_forward(x, source, bias, A, B, scaling, p, w_in_out, dtype)
        ctx.save_for_backward(*saved, None if ctx.remake else source)
        ctx.scaling, ctx.p, ctx.w_in_out, ctx.dtype = scaling, p, w_in_out, dtype
        return y

    @staticmethod
    def backward(ctx, g):
        x, keep, h, A, B, W = ctx.saved_tensors
        s, p = ctx.scaling, ctx.p
        x_dtype, a_dtype, b_dtype, bias_dtype = ctx.dtypes
        g = _cast(g, h.dtype)
        need_x, _, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        g_h = mm_t(g, B.T).mul_(s)  # (N, r): dL/d(x_d Aᵀ)
        grad_x = grad_bias = grad_a = grad_bb = None
        if need_x:
            W = _cast(W if W is not None else ctx.remake(), ctx.dtype)
            grad_x = mm_t(g, W if ctx.w_in_out else W.T)
            if keep is None:
                grad_x.addmm_(g_h, A)
            else:
                grad_x.add_(dropped(mm_t(g_h, A.T), keep, p))
            grad_x = _cast(grad_x, x_dtype)
        if need_a:
            xd = x if keep is None else dropped(x, keep, p)
            grad_a = _cast(mm_tn(g_h, xd), a_dtype)  # g_hᵀ x_d   (r, in)
        if need_bb:
            grad_bb = _cast(mm_tn(g, h), b_dtype)  # gᵀ h   (out, r)
        if need_b and bias_dtype is not None:
            grad_bias = _cast(g.sum(0), bias_dtype)
        return grad_x, None, grad_bias, grad_a, grad_bb, None, None, None, None


def _fused_forward(x: Tensor, W: Tensor, bias, A: Tensor, B: Tensor, scaling: float, p: float, w_in_out: bool,
                   dtype: Optional[torch.dtype]) -> tuple[Tensor, tuple]:
    """`_FusedLoraLinear`'s output y [N, out], and what its backward needs: x, the dropout mask
    (or None), the scaled rank-r activation ``h = s · x_d Aᵀ`` [N, r], A and B, each in the
    compute dtype `dtype`."""
    x, W, bias, A, B = (_cast(t, dtype) for t in (x, W, bias, A, B))
    keep = dropout_keep(x, p) if p > 0 else None
    xd = x if keep is None else dropped(x, keep, p)
    h = mm_t(xd, A).mul_(scaling)
    y = mm_t(x, W.T if w_in_out else W, bias)
    y.addmm_(h, B.T)
    return y, (x, keep, h, A, B)


def _fused_without_graph(x, weight, bias, A, B, scaling, p, w_in_out, dtype):
    """`_FusedLoraLinear` where no gradient is wanted (inference): the same products, without
    an autograd node or anything kept for a backward."""
    return _fused_forward(x, _made(weight), bias, A, B, scaling, p, w_in_out, dtype)[0]


def _needs_graph(*tensors: Optional[Tensor]) -> bool:
    """Whether an op on these inputs must record autograd history."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _made(weight: WeightSource) -> Tensor:
    """The weight tensor of a `WeightSource`."""
    return weight() if callable(weight) else weight


def _cast(t: Optional[Tensor], dtype: Optional[torch.dtype]) -> Optional[Tensor]:
    """t in `dtype`, or t itself when either is None or it already is in it."""
    return t if t is None or dtype is None or t.dtype == dtype else t.to(dtype)


def fused_dtype(x: Tensor, A: Tensor) -> Optional[torch.dtype]:
    """The dtype the fused kernel computes in for input x and adapter factor A, or None where
    it does not apply. Under autocast on x's device: autocast's dtype (for the floating types
    autocast casts, not fp64); otherwise x's dtype when A shares it. A bf16 input into fp32
    factors outside autocast takes the composed path, whose adapter products run in fp32."""
    if torch.is_autocast_enabled(x.device.type):
        casts = x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        return torch.get_autocast_dtype(x.device.type) if casts else None
    return x.dtype if x.dtype == A.dtype else None


def fused_lora_linear(x: Tensor, weight: WeightSource, bias, A: Tensor, B: Tensor, scaling: float,
                      p: float = 0.0, w_in_out: bool = False, dtype: Optional[torch.dtype] = None) -> Tensor:
    """A frozen linear layer plus one LoRA adapter, for x [..., in] -> [..., out] (see
    `_FusedLoraLinear`). `p` is the adapter's dropout probability (0 outside training); `dtype`
    the compute dtype (`fused_dtype`; None: x's own)."""
    fn = _FusedLoraLinear.apply if _needs_graph(x, bias, A, B) else _fused_without_graph
    return _on_rows(fn, x, weight, bias, A, B, scaling, p, w_in_out, dtype)


class _FrozenLinear(torch.autograd.Function):
    """``y = x Wᵀ + b`` with a frozen W through `mm_t` (the bias may train): the base layer alone.
    Shapes as in `_FusedLoraLinear`."""

    @staticmethod
    def forward(ctx, x, weight, bias, w_in_out):
        W = _remember(ctx, weight)
        ctx.save_for_backward(None if ctx.remake else W)
        ctx.w_in_out = w_in_out
        return _frozen_forward(x, W, bias, w_in_out)

    @staticmethod
    def backward(ctx, g):
        need_x, _, need_b = ctx.needs_input_grad[:3]
        grad_x = None
        if need_x:
            (W,) = ctx.saved_tensors
            W = W if W is not None else ctx.remake()
            grad_x = mm_t(g, W if ctx.w_in_out else W.T)
        return grad_x, None, g.sum(0) if need_b else None, None


def _remember(ctx, weight: WeightSource) -> Tensor:
    """The weight tensor now; a function that made it is kept as ``ctx.remake`` for the backward."""
    ctx.remake = weight if callable(weight) else None
    return _made(weight)


def frozen_linear(x: Tensor, weight: WeightSource, bias=None, w_in_out: bool = False) -> Tensor:
    """``x Wᵀ + b`` for x [..., in] -> [..., out] with a frozen W (see `_FrozenLinear`)."""
    if _needs_graph(x, bias):
        return _on_rows(_FrozenLinear.apply, x, weight, bias, w_in_out)
    return _on_rows(_frozen_forward, x, _made(weight), bias, w_in_out)


def _frozen_forward(x: Tensor, W: Tensor, bias, w_in_out: bool) -> Tensor:
    """`_FrozenLinear`'s output, x [N, in] -> [N, out], W laid out as stored."""
    return mm_t(x, W.T if w_in_out else W, bias)


def _on_rows(fn, x: Tensor, *args) -> Tensor:
    """``fn(x as rows [N, in], *args)`` -> [N, out], viewed back as [..., out]."""
    y = fn(x.reshape(-1, x.shape[-1]), *args)
    return y.view(*x.shape[:-1], y.shape[-1])


def _chunk_cross_entropy(h: Tensor, weight: Tensor, bias, t: Tensor, want_grad: bool):
    """Summed CE of one chunk of rows, and (if `want_grad`) dL/dh for it: ``(softmax − onehot) W``.
    The logits' gradient takes their place in their own memory (`_logits_nll`), so a chunk
    allocates only its logits."""
    logits = mm_t(h, weight, bias)  # (c, V)
    loss = _logits_nll(logits, t, None, None, logits if want_grad else None)
    if not want_grad:
        return loss, None
    return loss, mm_t(logits, weight.T).to(h.dtype)


def _nll_in_place(logits: Tensor, out: Tensor, t: Tensor, valid: Optional[Tensor], want_grad: bool,
                  denom=None) -> Tensor:
    """``Σ_i −log softmax(logits_i)[t_i]`` over rows i of logits [c, V] (any float dtype), from
    fp32 log-probabilities written to `out` [c, V] (fp32; may be `logits` itself). With
    `want_grad`, `out` then holds the gradient of that sum divided by `denom` (None: 1):
    ``(softmax − onehot(t)) / denom``. Rows where `valid` [c] (bool, or None: all) is False add
    nothing and get a zero gradient (also when `denom` is 0); their t must still index the
    vocabulary."""
    torch.log_softmax(logits if logits.dtype == out.dtype else out.copy_(logits), dim=-1, out=out)
    rows = torch.arange(out.shape[0], device=out.device)
    picked = out[rows, t]
    loss = -(picked if valid is None else picked.where(valid, 0.0)).sum()
    if want_grad:
        out.exp_()  # softmax, in place
        out[rows, t] -= 1.0
        if denom is not None:
            out.div_(denom)
        if valid is not None:
            out.masked_fill_(~valid[:, None], 0.0)
    return loss


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``logits = h Wᵀ + b`` against targets, never holding more than one
    chunk of logits. W (the frozen output head) gets no gradient, so dL/dh is computed during
    the forward pass, chunk by chunk, and kept instead of the logits:

        p = softmax(h_c Wᵀ + b);  loss_c = Σ (logsumexp − logit[target]);  dL/dh_c = (p − onehot) W

    Memory: O(N·H + chunk·V) instead of O(N·V) for logits, their softmax and its gradient.
    Shapes: h [N, H], W [V, H], b [V] or None, targets [N] (all valid; filter ignored ones first).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        grad_hidden = torch.empty_like(hidden)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            loss, grad = _chunk_cross_entropy(hidden[start:start + chunk], weight, bias,
                                              targets[start:start + chunk], True)
            total += loss
            grad_hidden[start:start + chunk] = grad
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None, None


# Logits held at once by `linear_cross_entropy`: 2²⁴ fp32 values (64 MiB), 2048 rows of a
# vocabulary of 8192, 128 rows of Llama 3's 128k.
CROSS_ENTROPY_CHUNK = 1 << 24


def linear_cross_entropy(hidden: Tensor, weight: Tensor, bias, targets: Tensor,
                         chunk: Optional[int] = None) -> Tensor:
    """``Σ_i CE(h_i Wᵀ + b, targets_i)`` for rows whose target is not -100, in fp32, computed in
    chunks of `chunk` rows (default: `CROSS_ENTROPY_CHUNK` logits) (see `_LinearCrossEntropy`).
    hidden [..., H], targets [...]."""
    chunk = chunk or max(1, CROSS_ENTROPY_CHUNK // weight.shape[0])
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    keep = targets != -100
    if not bool(keep.all()):
        hidden, targets = hidden[keep], targets[keep]
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        logits = hidden @ weight.T if bias is None else torch.addmm(bias, hidden, weight.T)
        return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
    if not (torch.is_grad_enabled() and hidden.requires_grad):
        return sum((_chunk_cross_entropy(hidden[i:i + chunk], weight, bias, targets[i:i + chunk], False)[0]
                    for i in range(0, hidden.shape[0], chunk)), hidden.new_zeros((), dtype=torch.float32))
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk)


# Logits whose fp32 log-probabilities `_logits_nll` forms at once on CPU: 2²⁰ values (4 MiB,
# within a core's share of the last-level cache), 128 rows of a vocabulary of 8192. On a GPU the
# cost is per kernel launch instead, so it takes `CROSS_ENTROPY_CHUNK` values at once there.
LOGITS_CHUNK = 1 << 20


def _logits_nll(logits: Tensor, targets: Tensor, valid: Optional[Tensor], denom, grad: Optional[Tensor]) -> Tensor:
    """``Σ −log softmax(logits_i)[t_i] / denom`` over the rows i of logits [N, V] that are `valid`
    (None: all; `denom` None: 1), in fp32, `LOGITS_CHUNK` values at a time on CPU so that the
    fp32 log-probabilities stay in cache. With `grad` ([N, V] in the logits' dtype, or the logits
    themselves) it is filled with the gradient, ``(softmax − onehot) / denom`` on valid rows and 0
    elsewhere, formed in fp32 and rounded once."""
    chunk = max(1, (LOGITS_CHUNK if logits.device.type == "cpu" else CROSS_ENTROPY_CHUNK) // logits.shape[1])
    direct = grad is not None and grad.dtype == torch.float32
    work = None if direct else torch.empty((min(chunk, logits.shape[0]), logits.shape[1]), dtype=torch.float32,
                                           device=logits.device)
    total = logits.new_zeros((), dtype=torch.float32)
    for start in range(0, logits.shape[0], chunk):
        part = slice(start, start + chunk)
        out = grad[part] if direct else work[:logits[part].shape[0]]
        total += _nll_in_place(logits[part], out, targets[part], None if valid is None else valid[part],
                               grad is not None, denom)
        if grad is not None and not direct:
            grad[part].copy_(out)
    return total if denom is None else total / denom


class _LogitsCrossEntropy(torch.autograd.Function):
    """`_logits_nll` as an autograd node: the forward pass keeps the gradient w.r.t. the logits,
    in their dtype, instead of the fp32 copy of the logits and their log-softmax that a
    cross-entropy on upcast logits keeps (and its backward's fp32 buffers of the same size). The
    backward scales it by the incoming gradient: exact for 1 (``loss.backward()``), else rounded a
    second time in bf16/fp16."""

    @staticmethod
    def forward(ctx, logits, targets, valid, denom):
        grad = torch.empty_like(logits)
        loss = _logits_nll(logits, targets, valid, denom, grad)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss, None, None, None


def causal_lm_loss(logits: Tensor, labels: Tensor, vocab_size: Optional[int] = None, num_items_in_batch=None,
                   ignore_index: int = -100, shift_labels: Optional[Tensor] = None, **kwargs) -> Tensor:
    """The next-token cross-entropy of a causal LM, in fp32: position t of logits [..., T, V] is
    scored against ``labels[..., t+1]`` (or ``shift_labels[..., t]`` when given), targets equal to
    `ignore_index` are skipped, and the sum is divided by the number of scored targets, or by
    `num_items_in_batch` when given (gradient accumulation over several batches).

    transformers' ``ForCausalLMLoss`` with the same arguments (and the same ``loss_function``
    signature; other keyword arguments are ignored, as there), without materialising fp32 logits
    (`_LogitsCrossEntropy`): lorafit installs it on the Hugging Face causal LMs it wraps."""
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    logits = logits.reshape(-1, vocab_size or logits.shape[-1])
    targets = shift_labels.reshape(-1).to(logits.device)
    valid = targets != ignore_index
    targets = targets.masked_fill(~valid, 0)
    denom = valid.sum() if num_items_in_batch is None else num_items_in_batch
    if torch.is_tensor(denom):
        denom = denom.to(logits.device)
    if torch.is_grad_enabled() and logits.requires_grad:
        return _LogitsCrossEntropy.apply(logits, targets, valid, denom)
    return _logits_nll(logits, targets, valid, denom, None)
