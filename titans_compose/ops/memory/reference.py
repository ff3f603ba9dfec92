"""The sequential reference: token by token, exactly the recurrence of memory-math.md section 1, with every
gradient taken by autograd at the chunk-start weights (chunk size b; b = 1 is the per-token recurrence).

    g_t = d loss(M_{W^0}(k_t), v_t) / dW      (W^0: the weights at the start of t's chunk)
    S_t = optimizer.step(S_{t-1}, g_t, eta_t, theta_t)          = eta_t S_{t-1} - theta_t g_t
    W_t = retention.keep(W_{t-1}, alpha_t) + S_t                = (1 - alpha_t) W_{t-1} + S_t
    y_t = M_{W_t}(q_t) (after) | M_{W_{t-1}}(q_t) (before) | M_{W^0}(q_t) (per_chunk)

Slow and simple on purpose: it is the oracle for the chunked form and the kernels, and it runs in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from titans_compose.ops.memory import mlp
from titans_compose.ops.memory.chunk_write import clip_factor
from titans_compose.ops.memory.config import MemoryConfig
from titans_compose.ops.memory.state import MemoryState, Pending, resume


def token_gradient(weights: tuple[Tensor, ...], k: Tensor, v: Tensor, cfg: MemoryConfig) -> tuple[Tensor, ...]:
    """The gradient of one token's loss (``k, v``: [N, d]) with respect to every weight, by autograd.

    Keeps the graph (create_graph) whenever the weights or inputs need gradients, so that outer training
    differentiates through the inner update, second-order terms included.
    """
    outer = any(t.requires_grad for t in (*weights, k, v))
    with torch.enable_grad():
        leaves = tuple(w if w.requires_grad else w.detach().requires_grad_() for w in weights)
        out = mlp.forward(leaves, k.unsqueeze(1), cfg).squeeze(1)
        loss = cfg.loss.value(out - v, cfg.loss_params).sum()
        return torch.autograd.grad(loss, leaves, create_graph=outer)


def reference_memory(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    log_eta: Tensor | None,
    log_keep: Tensor | None,
    state: MemoryState,
    cfg: MemoryConfig,
) -> tuple[Tensor, MemoryState]:
    """The memory op (contract: :mod:`titans_compose.ops.memory`) computed one token at a time."""
    p = state.pending_len
    k, v, theta, log_eta, log_keep = resume(state, k, v, theta, log_eta, log_keep)
    total, b = k.shape[1], cfg.chunk_size
    w_start, s_start = state.weights, state.momentum  # the chunk-start state
    w, s = w_start, s_start
    outputs = []
    for t in range(total):
        if t % b == 0:
            w_start, s_start = w, s
        g = token_gradient(w_start, k[:, t], v[:, t], cfg)
        th = theta[:, t, None, None]
        if cfg.grad_clip is not None:
            th = th * clip_factor(sum(gi.square().sum((-1, -2)) for gi in g), cfg.grad_clip)[:, None, None]
        if s is not None:
            eta = log_eta[:, t, None, None].exp()
            s = tuple(cfg.optimizer.step(si, gi, eta, th, None) for si, gi in zip(s, g, strict=True))
            step = s
        else:
            step = tuple(-th * gi for gi in g)
        w_prev = w
        if log_keep is not None:
            alpha = -torch.expm1(log_keep[:, t, None, None])
            w = tuple(cfg.retention.keep(wi, alpha, None) + si for wi, si in zip(w, step, strict=True))
        else:
            w = tuple(wi + si for wi, si in zip(w, step, strict=True))
        if t < p:
            continue
        read = {"after": w, "before": w_prev, "per_chunk": w_start}[cfg.retrieval]
        outputs.append(mlp.forward(read, q[:, t - p].unsqueeze(1), cfg))
    y = torch.cat(outputs, 1) if outputs else q[:, :0]
    done = total - total % b
    pending = None
    if total % b:

        def tail(x: Tensor | None) -> Tensor | None:
            return None if x is None else x[:, done:]

        pending = Pending(k[:, done:], v[:, done:], theta[:, done:], tail(log_eta), tail(log_keep))
    else:
        w_start, s_start = w, s
    return y, MemoryState(w_start, s_start, pending)
