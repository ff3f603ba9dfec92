"""The code generator: Triton source for one :class:`~titans_compose.ops.memory.codegen.key.KernelKey`.

The generated module computes the chunked dual form of memory-math.md section 3 for one memory configuration.
One program handles one (batch x head) row and loops over its chunks; the state is carried in global memory as
float32, one slot per chunk boundary (``states[N, chunks + 1, STATE_SIZE]``: every layer's W_l, then every S_l,
row-major), which is also what the backward restarts from. Per chunk, the forward kernel

1. runs the memory on the keys at the chunk-start weights W^0 and back-propagates the loss by hand (layer inputs
   a_l, pre-activations z_l, errors delta_l, m_l = delta_{l+1} W_{l+1});
2. builds the gate tables from log-space prefix sums: F[t, j] = exp(R_t - rho_j), P[j, i] = exp(pi_j - pi_i),
   C = (F @ P) diag(theta), A_t = exp(R_t), B = F exp(pi) (R = rho for "after", rho shifted by one for "before");
3. reads every query through the masked b x b products Z_l = diag(A) H W^0T + diag(B) H S^0T - (C o H A_l^T)
   Delta_l (or at W^0 alone for per-chunk retrieval) and stores y = [x +] [LN](Z_L);
4. folds the chunk into the next boundary, W^b = A_b W^0 + B_b S^0 - sum_i C_{b,i} delta_i a_i^T (S^b likewise),
   only when the chunk is complete: a trailing partial chunk is read but never committed.

The backward kernel walks the chunks in reverse, recomputes each from its saved boundary state and applies the
hand-derived reverse of steps 1-4 (the port of :mod:`titans_compose.ops.memory.chunk_write`, plus the retrieval and
gate-table reverses), second-order terms through the activation, the loss and the LayerNorm included. The gradient
of the state is carried in two ping-pong slots per row. A partial chunk's fold is the identity (keep 1, carry 0,
decay 1, c = e = 0), so the same code passes the final state's gradient through it.

The MLP depth is unrolled; the activation, its derivatives and the loss gradient come inline from the registry's
Triton expressions (the ``triton_*`` fields of :mod:`titans_compose.registry.rules`). Blocks are padded to powers
of two >= 16 (tl.dot's minimum) and masked. Products (``_dot``) run in full float32 for float32 inputs (the
interpreter's and the chunked path's numerics) and as three tf32 products for 16-bit inputs (one tf32 product put
3% errors into the outputs on an H200; docs/kernels.md), except the b x b gate-table products, always in full
float32 (tf32 would put ~1e-3 errors into every coefficient). This generator
loads whole state matrices per chunk, within the sizes of :mod:`~titans_compose.ops.memory.codegen.tiling`;
a depth-2 memory beyond them streams its hidden width in tiles
(:mod:`~titans_compose.ops.memory.codegen.emit_tiled`); both build on
:mod:`~titans_compose.ops.memory.codegen.base` and render the backward of
:mod:`~titans_compose.ops.memory.codegen.backward`. With ``grad_clip``, theta is
scaled per token by min(1, max_norm / ||g_t||) after the key path, and the backward adds the factor's derivative to
every d_l and a_l gradient. The output is a deterministic function of the key.

The generated code calls only Triton's core builtins, never ``triton.language.standard``'s own ``@triton.jit``
functions (tl.sum, tl.cdiv, tl.sigmoid, ...): those are decorated when triton is imported, so in a process that
imported triton before setting TRITON_INTERPRET=1 they cannot run under the interpreter, while the generated
module's functions (decorated when it is imported) can. Sums are ``tl.reduce`` with tl.sum's combine function
(``tl.standard._sum_combine``: compiled exactly like tl.sum, and recognised by the interpreter's numpy fast path).
"""

from __future__ import annotations

from titans_compose.ops.memory.codegen.backward import Phase, fold_terms, render_backward
from titans_compose.ops.memory.codegen.base import HELPERS, Code, Generator, Layout, layout, rule_expressions
from titans_compose.ops.memory.codegen.emit_tiled import TiledGenerator
from titans_compose.ops.memory.codegen.key import KernelKey

__all__ = ["HELPERS", "Code", "Layout", "TiledGenerator", "WholeGenerator", "generate", "layout", "rule_expressions"]


class WholeGenerator(Generator):
    """Triton source for a key whose state matrices fit one program whole (see the module docstring)."""

    def load_chunk(self, code: Code) -> None:
        self.load_inputs(code)
        for i in range(self.depth):
            code(f"w{i} = _load_rows(state + W{i}_OFF, {self.tile(i)})")
            if self.mom:
                code(f"s{i} = _load_rows(state + S{i}_OFF, {self.tile(i)})")

    def key_path(self, code: Code) -> None:
        last = self.depth - 1
        code("# key path at the chunk-start weights: inputs a, pre-activations z, errors d (delta), m = d W")
        code("a0 = k")
        for i in range(self.depth):
            code(f"z{i} = _dot(a{i}, tl.trans(w{i}))")
            if i < last:
                code(f"a{i + 1} = tl.where({self.cols(i + 1)}, _act(z{i}), 0.0)")
        self.output_error(code)
        for i in range(last - 1, -1, -1):
            code(f"m{i} = _dot(d{i + 1}, w{i + 1})", f"d{i} = m{i} * _act_grad(z{i})")

    def clip_norms(self, code: Code) -> str:
        """Emits every layer's per-token ||a_l||^2 (``an{l}``) and ||d_l||^2 (``dn{l}``); returns sum_l an_l dn_l."""
        for i in range(self.depth):
            code(f"an{i} = _sum(a{i} * a{i}, axis=1)", f"dn{i} = _sum(d{i} * d{i}, axis=1)")
        return " + ".join(f"an{i} * dn{i}" for i in range(self.depth))

    def retrieve(self, code: Code) -> str:
        """Emits the retrieval up to the output transform; returns the expression of y."""
        last = self.depth - 1
        if self.per_chunk:
            code("# per-chunk retrieval: every query reads the chunk-start weights")
        else:
            code(f"# per-token retrieval ('{self.read}'): Z = diag(A) H W^T + diag(B) H S^T - (C o H a^T) d")
        code("h0 = q")
        for i in range(self.depth):
            if self.per_chunk:
                code(f"zq{i} = _dot(h{i}, tl.trans(w{i}))")
            else:
                code(f"hq{i} = _dot(h{i}, tl.trans(w{i}))")
                code(f"zq{i} = hq{i} * A[:, None]" if self.fgt else f"zq{i} = hq{i}")
                if self.mom:
                    code(f"hs{i} = _dot(h{i}, tl.trans(s{i}))", f"zq{i} = zq{i} + hs{i} * B[:, None]")
                code(
                    f"kk{i} = _dot(h{i}, tl.trans(a{i}))",
                    f"ck{i} = C * kk{i}",
                    f"zq{i} = zq{i} - _dot(ck{i}, d{i})",
                )
            if i < last:
                code(f"h{i + 1} = tl.where({self.cols(i + 1)}, _act(zq{i}), 0.0)")
        return self.finish(code, f"zq{last}", "q")

    def forward_kernel(self, code: Code) -> None:
        self.forward_header(code)
        self.load_chunk(code)
        self.key_path(code)
        self.clip(code)
        self.gate_tables(code)
        code(f"y = {self.retrieve(code)}", "_store_rows(y_ptr + seq + t0 * D0, y, n_tok, D0, BT, B0)")
        code("# fold the chunk into the next boundary (masked off for a partial chunk)")
        code("nxt = state + STATE_SIZE")
        for i in range(self.depth):
            base = f"keep * w{i}" if self.fgt else f"w{i}"
            if self.mom:
                base += f" + carry * s{i}"
            code(f"nw{i} = {base} - _dot(tl.trans(d{i} * c[:, None]), a{i})")
            code(f"_store_rows(nxt + W{i}_OFF, nw{i}, {self.tile(i, f'tl.where(commit, {self.dim(i + 1)}, 0)')})")
            if self.mom:
                code(f"ns{i} = decay * s{i} - _dot(tl.trans(d{i} * e[:, None]), a{i})")
                code(f"_store_rows(nxt + S{i}_OFF, ns{i}, {self.tile(i, f'tl.where(commit, {self.dim(i + 1)}, 0)')})")
        code("tl.debug_barrier()")
        code.indent -= 2

    def backward_kernel(self, code: Code) -> None:
        self.backward_header(code)
        self.load_chunk(code)
        self.key_path(code)
        self.clip(code)
        self.gate_tables(code)
        self.retrieve(code)
        code("gy = _load_rows(gy_ptr + seq + t0 * D0, n_tok, D0, BT, B0)")
        code.defined = set()
        render_backward(self, code, (Phase(),))
        code("tl.debug_barrier()")
        code.indent -= 2

    def stores_backward(self, code: Code) -> None:
        self.store_input_gradients(code)
        code("gout = gstates_ptr + (row * 2 + chunk % 2) * STATE_SIZE")
        for i in range(self.depth):
            code(f"_store_rows(gout + W{i}_OFF, gw{i}, {self.tile(i)})")
            if self.mom:
                code(f"_store_rows(gout + S{i}_OFF, gs{i}, {self.tile(i)})")

    def retrieval_backward(self, code: Code) -> None:
        last = self.depth - 1
        code("# reverse of the retrieval")
        if self.key.output_norm:
            code(f"gzq{last} = _layer_norm_backward(gy, qx, qrstd, cols0, D0)")
        else:
            code(f"gzq{last} = gy")
        if self.key.residual:
            code.acc("gq", "gy")
        for i in range(last, -1, -1):
            g = f"gzq{i}"
            if self.per_chunk:
                code.acc(f"gw{i}", f"_dot(tl.trans({g}), h{i})")
                code(f"gh = _dot({g}, w{i})")
            else:
                if self.fgt:
                    code.acc("gA", f"_sum({g} * hq{i}, axis=1)")
                    code(f"ghq = {g} * A[:, None]")
                else:
                    code(f"ghq = {g}")
                code.acc(f"gw{i}", f"_dot(tl.trans(ghq), h{i})")
                code(f"gh = _dot(ghq, w{i})")
                if self.mom:
                    code.acc("gB", f"_sum({g} * hs{i}, axis=1)")
                    code(f"ghs = {g} * B[:, None]")
                    code.acc(f"gs{i}", f"_dot(tl.trans(ghs), h{i})")
                    code(f"gh = gh + _dot(ghs, s{i})")
                code(f"gck = -_dot({g}, tl.trans(d{i}))  # d loss / d (C o K)")
                code.acc(f"gd{i}", f"_dot(tl.trans(ck{i}), {g})", "-")
                code.acc("gC", f"gck * kk{i}")
                code("gkk = gck * C", f"gh = gh + _dot(gkk, a{i})")
                code.acc(f"ga{i}", f"_dot(tl.trans(gkk), h{i})")
            if i > 0:
                code(f"gzq{i - 1} = tl.where({self.cols(i)}, gh * _act_grad(zq{i - 1}), 0.0)")
            else:
                code.acc("gq", "gh")

    def fold_backward(self, code: Code) -> None:
        code(
            "# reverse of the fold; a partial chunk's fold is the identity",
            "gin = gstates_ptr + (row * 2 + (chunk + 1) % 2) * STATE_SIZE",
        )
        if self.fgt:
            code("keep_eff = tl.where(commit, keep, 1.0)")
        if self.mom:
            code("carry_eff = carry * cmt", "decay_eff = tl.where(commit, decay, 1.0)")
        for i in range(self.depth):
            code(f"gnw = _load_rows(gin + W{i}_OFF, {self.tile(i)})")
            if self.fgt:
                code.acc(f"gw{i}", "keep_eff * gnw")
                code.acc("gkeep", f"_sum2(w{i} * gnw)")
            else:
                code.acc(f"gw{i}", "gnw")
            if self.mom:
                code(f"gns = _load_rows(gin + S{i}_OFF, {self.tile(i)})")
                code.acc(f"gs{i}", "carry_eff * gnw + decay_eff * gns")
                code.acc("gcarry", f"_sum2(s{i} * gnw)")
                code.acc("gdecay", f"_sum2(s{i} * gns)")
            for term in fold_terms(self.mom):
                g, coef, p = term.incoming, term.coef, term.product
                code(f"{p} = _dot(a{i}, tl.trans({g}))")
                code.acc(f"gd{i}", f"{coef}[:, None] * {p}", "-")
                code.acc(term.grad_coef, f"_sum(d{i} * {p}, axis=1)", "-")
                code.acc(f"ga{i}", f"_dot(d{i} * {coef}[:, None], {g})", "-")

    def clip_backward(self, code: Code) -> None:
        """With ``grad_clip``: d loss / d theta_raw, and the clip factor's share of every gd_l and ga_l (where it
        acts, ds/d||g||^2 = -s / (2 ||g||^2), and d||g||^2 / d d_l = 2 ||a_l||^2 d_l, likewise for a_l)."""
        if self.key.grad_clip is None:
            return
        self.clip_factor_backward(code)
        for i in range(self.depth):
            code.acc(f"gd{i}", f"(ccoef * an{i})[:, None] * d{i}")
            code.acc(f"ga{i}", f"(ccoef * dn{i})[:, None] * a{i}")

    def key_path_backward(self, code: Code) -> None:
        last = self.depth - 1
        code("# reverse of the error recursion d_l = (d_{l+1} W_{l+1}) * act'(z_l), first layer up")
        for i in range(last):
            code(f"gm = gd{i} * _act_grad(z{i})")
            code.acc(f"gz{i}", f"gd{i} * m{i} * _act_grad2(z{i})")
            code.acc(f"gd{i + 1}", f"_dot(gm, tl.trans(w{i + 1}))")
            code.acc(f"gw{i + 1}", f"_dot(tl.trans(d{i + 1}), gm)")
        self.output_error_backward(code)
        code("# reverse of the key-path forward, last layer down")
        for i in range(last, -1, -1):
            code.acc(f"gw{i}", f"_dot(tl.trans(gz{i}), a{i})")
            code.acc(f"ga{i}", f"_dot(gz{i}, w{i})")
            if i > 0:
                code.acc(f"gz{i - 1}", f"tl.where({self.cols(i)}, ga{i} * _act_grad(z{i - 1}), 0.0)")


def generate(key: KernelKey) -> str:
    """The Triton module source for ``key`` (deterministic; the canonical key is in its header): whole state
    matrices per program, or the hidden width in tiles when ``key.hidden_tile`` is set."""
    return (TiledGenerator if key.hidden_tile else WholeGenerator)(key).module()
