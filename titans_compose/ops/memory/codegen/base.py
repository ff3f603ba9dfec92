"""What both Triton emitters share: the state layout, the source builder, the generated module's frame and helpers,
and the pieces of the forward and backward that do not depend on holding whole matrices or hidden tiles.

:class:`Generator` writes the module (constants, the rules' inlined expressions, the helpers, then the two kernels
its subclass renders): :class:`~titans_compose.ops.memory.codegen.emit.WholeGenerator` (whole state matrices per
program) and :class:`~titans_compose.ops.memory.codegen.emit_tiled.TiledGenerator` (the hidden width in tiles). Both
render the backward described by :mod:`~titans_compose.ops.memory.codegen.backward`. This module imports neither
emitter, so the two build on it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

from titans_compose.ops.memory.codegen.key import KernelKey
from titans_compose.ops.memory.codegen.tiling import block


@dataclass(frozen=True)
class Layout:
    """Where each layer's weights (and momentum) live in a state slot, in float32 elements."""

    shapes: tuple[tuple[int, int], ...]
    momentum: bool

    @property
    def weight_offsets(self) -> tuple[int, ...]:
        offsets, at = [], 0
        for out, inp in self.shapes:
            offsets.append(at)
            at += out * inp
        return tuple(offsets)

    @property
    def weight_size(self) -> int:
        return sum(o * i for o, i in self.shapes)

    @property
    def momentum_offsets(self) -> tuple[int, ...]:
        return tuple(self.weight_size + off for off in self.weight_offsets) if self.momentum else ()

    @property
    def size(self) -> int:
        return self.weight_size * (2 if self.momentum else 1)


def layout(key: KernelKey) -> Layout:
    return Layout(key.layer_shapes, key.momentum)


def rule_expressions(key: KernelKey) -> dict[str, str]:
    """The activation's and loss's Triton expressions carried by ``key`` (loss parameters substituted as
    constants)."""
    params = {name: repr(float(value)) for name, value in key.loss_params}
    out = dict(key.expressions)
    missing = [name for name in ("act", "act_grad", "act_grad2", "loss_grad", "loss_grad2") if out.get(name) is None]
    if missing:
        raise ValueError(f"no Triton expression for {', '.join(missing)} of {key.activation} / {key.loss}")
    for name in ("loss_grad", "loss_grad2"):
        out[name] = out[name].format(**params)
    return out


class Code:
    """Lines of generated source with indentation, and accumulators that are assigned on first use."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.indent = 0
        self.defined: set[str] = set()

    def __call__(self, *lines: str) -> None:
        for line in lines:
            self.lines.append("    " * self.indent + line if line else "")

    def acc(self, name: str, expr: str, sign: str = "+") -> None:
        """``name = (-)expr`` the first time, ``name = name +/- expr`` after."""
        if name in self.defined:
            self(f"{name} = {name} {sign} {expr}")
        else:
            self.defined.add(name)
            self(f"{name} = {expr}" if sign == "+" else f"{name} = -({expr})")


HELPERS = '''
@triton.jit
def _exact_dot(a, b):
    """A product in full float32 (the gate tables: tf32 would put ~1e-3 errors into every coefficient)."""
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _sum(x, axis: tl.constexpr):
    """tl.sum: its own reduction (so the interpreter takes its numpy fast path), not the standard-library call."""
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def _load_tile(ptr, rows, cols, STRIDE: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """A [BR, BC] float32 tile of a row-major matrix with row stride STRIDE, zeros outside rows x cols."""
    r = tl.arange(0, BR)[:, None]
    c = tl.arange(0, BC)[None, :]
    return tl.load(ptr + r * STRIDE + c, mask=(r < rows) & (c < cols), other=0.0).to(tl.float32)


@triton.jit
def _store_tile(ptr, x, rows, cols, STRIDE: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """Stores the rows x cols corner of the [BR, BC] tile x (the inverse of _load_tile)."""
    r = tl.arange(0, BR)[:, None]
    c = tl.arange(0, BC)[None, :]
    tl.store(ptr + r * STRIDE + c, x.to(ptr.dtype.element_ty), mask=(r < rows) & (c < cols))


@triton.jit
def _load_rows(ptr, rows, COLS: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """The first ``rows`` rows of a row-major [*, COLS] matrix as a [BR, BC] float32 tile (zeros outside)."""
    return _load_tile(ptr, rows, COLS, COLS, BR, BC)


@triton.jit
def _store_rows(ptr, x, rows, COLS: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    _store_tile(ptr, x, rows, COLS, COLS, BR, BC)


@triton.jit
def _load_vec(ptr, n, BN: tl.constexpr):
    r = tl.arange(0, BN)
    return tl.load(ptr + r, mask=r < n, other=0.0).to(tl.float32)


@triton.jit
def _store_vec(ptr, x, n, BN: tl.constexpr):
    r = tl.arange(0, BN)
    tl.store(ptr + r, x.to(ptr.dtype.element_ty), mask=r < n)


@triton.jit
def _masked_exp(x, mask):
    """exp(x) where mask, else 0 (no overflow from the masked-out entries)."""
    return tl.where(mask, tl.exp(tl.where(mask, x, 0.0)), 0.0)


@triton.jit
def _sum2(x):
    return _sum(_sum(x, axis=1), axis=0)


@triton.jit
def _layer_norm(z, cols, N: tl.constexpr, EPS: tl.constexpr):
    """Gain-free LayerNorm of each row over its first N columns (padded columns of z are 0): (xhat, 1/std)."""
    mean = _sum(z, axis=1) / N
    centred = tl.where(cols, z - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(_sum(centred * centred, axis=1) / N + EPS)
    return centred * rstd[:, None], rstd


@triton.jit
def _layer_norm_backward(g, xhat, rstd, cols, N: tl.constexpr):
    """J g for the (symmetric) Jacobian J of the LayerNorm at the rows of xhat."""
    mean_g = _sum(g, axis=1) / N
    mean_gx = _sum(g * xhat, axis=1) / N
    return tl.where(cols, rstd[:, None] * (g - mean_g[:, None] - xhat * mean_gx[:, None]), 0.0)
'''


class Generator:
    """The shared frame of both emitters; a subclass renders ``key_path``, ``clip_norms``, ``forward_kernel`` and
    ``backward_kernel``."""

    def __init__(self, key: KernelKey) -> None:
        self.key = key
        self.depth = key.depth
        # dims[i] is the input width of layer i; dims[depth] == dims[0] (the head dim)
        self.dims = [inp for _, inp in key.layer_shapes] + [key.head_dim]
        self.layout = layout(key)
        self.mom = key.momentum
        self.fgt = key.forget
        self.read = key.retrieval
        self.per_chunk = key.retrieval == "per_chunk"
        self.gates = ["theta"] + ["log_eta"] * self.mom + ["log_keep"] * self.fgt  # per-token gate series

    def dim(self, i: int) -> str:
        return f"D{i % self.depth}"

    def blk(self, i: int) -> str:
        return f"B{i % self.depth}"

    def cols(self, i: int) -> str:
        return f"cols{i % self.depth}"

    def tile(self, layer: int, rows: str | None = None) -> str:
        """The (rows, cols, block rows, block cols) arguments of layer ``layer``'s [out, in] state matrix."""
        rows = rows or self.dim(layer + 1)
        return f"{rows}, {self.dim(layer)}, {self.blk(layer + 1)}, {self.blk(layer)}"

    def module(self) -> str:
        key = self.key
        code = Code()
        code(
            "# Generated by titans_compose.ops.memory.codegen.emit: do not edit (the cache regenerates it).",
            f"# key: {key.canonical()}",
            "#",
            f"# Chunked dual-form memory scan: depth {key.depth}, layers (out, in) {list(key.layer_shapes)},",
            f"# activation {key.activation}, loss {key.loss} {dict(key.loss_params)}, residual {key.residual},"
            f" output LayerNorm {key.output_norm},",
            f"# momentum {key.momentum}, forget {key.forget}, retrieval {key.retrieval}, chunk {key.chunk_size},",
            f"# inputs {key.dtype} (state and math in float32), gates (lr, momentum, forget) {key.gates}",
            "# (per-token tensors either way: a per-chunk gate is constant within its chunk).",
            "",
            "import triton",
            "import triton.language as tl",
            "",
            f"CHUNK = tl.constexpr({key.chunk_size})",
            f"BT = tl.constexpr({block(key.chunk_size)})",
        )
        for i in range(self.depth):
            code(f"D{i} = tl.constexpr({self.dims[i]})", f"B{i} = tl.constexpr({block(self.dims[i])})")
        lay = self.layout
        for i in range(self.depth):
            code(f"W{i}_OFF = tl.constexpr({lay.weight_offsets[i]})")
            if self.mom:
                code(f"S{i}_OFF = tl.constexpr({lay.momentum_offsets[i]})")
        code(f"STATE_SIZE = tl.constexpr({lay.size})", f"EPS = tl.constexpr({key.ln_eps!r})")
        if key.grad_clip is not None:
            code(
                f"MAX_NORM = tl.constexpr({key.grad_clip!r})  # the per-token inner gradient clip",
                "TINY = tl.constexpr(1.1754943508222875e-38)  # the smallest normal float32: keeps ||g_t||^2 > 0",
            )
        self.extra_constants(code)
        code("")
        exprs = rule_expressions(key)
        for name, arg, what in (
            ("act", "x", f"{key.activation}"),
            ("act_grad", "x", f"{key.activation}'"),
            ("act_grad2", "x", f"{key.activation}''"),
            ("loss_grad", "e", f"d {key.loss} / d output"),
            ("loss_grad2", "e", f"d^2 {key.loss} / d output^2"),
        ):
            code("", "@triton.jit", f"def _{name}({arg}):", f'    """{what} (registry expression)."""')
            code(f"    return {exprs[name]}", "")
        if key.dtype == "float32":
            code("", "@triton.jit", "def _dot(a, b):", '    """Float32 inputs: products in full float32."""')
            code('    return tl.dot(a, b, input_precision="ieee")', "")
        else:
            code(
                "",
                "@triton.jit",
                "def _dot(a, b):",
                f'    """{key.dtype} inputs, float32 operands: three tf32 products (near float32 precision at'
                ' tensor-core speed on a GPU)."""',
            )
            code('    return tl.dot(a, b, input_precision="tf32x3")', "")
        code.lines.extend(HELPERS.splitlines())
        code("", "")
        self.forward_kernel(code)
        code("", "")
        self.backward_kernel(code)
        return "\n".join(code.lines).rstrip() + "\n"

    def extra_constants(self, code: Code) -> None:
        """Constants only some generators use."""

    def gate_args(self, prefix: str = "") -> str:
        return ", ".join(f"{prefix}{name}_ptr" for name in self.gates)

    def prologue(self, code: Code) -> None:
        code(
            "row = tl.cast(tl.program_id(0), tl.int64)",
            "seq = row * T * D0  # this row's [T, D0] block of q, k, v, y",
            "gates = row * T",
            "rt = tl.arange(0, BT)",
            "ti = rt[:, None]",
            "tj = rt[None, :]",
            "incl = tj <= ti  # j <= t",
            "inchunk = rt < CHUNK",
        )
        for i in range(self.depth):
            code(f"cols{i} = (tl.arange(0, B{i}) < D{i})[None, :]")

    def load_inputs(self, code: Code) -> None:
        """The chunk's bounds, its q, k, v and gates, and ``state``, the pointer to its start state."""
        code(
            "t0 = chunk * CHUNK",
            "n_tok = tl.minimum(T - t0, CHUNK)",
            "valid = rt < n_tok",
            "commit = t0 + CHUNK <= T  # a complete chunk: folded into the next boundary",
            "cmt = tl.where(commit, 1.0, 0.0)",
            "state = states_ptr + (row * NB + chunk) * STATE_SIZE",
        )
        for name in ("q", "k", "v"):
            code(f"{name} = _load_rows({name}_ptr + seq + t0 * D0, n_tok, D0, BT, B0)")
        for name in self.gates:
            code(f"{name} = _load_vec({name}_ptr + gates + t0, n_tok, BT)")

    def finish(self, code: Code, z: str, x: str) -> str:
        """Emits the output transform's LayerNorm of the last layer's ``z`` (normalised rows ``{x}x`` and
        ``{x}rstd``) and returns the expression of the memory output ([LN](z) [+ x])."""
        out = z
        if self.key.output_norm:
            code(f"{x}x, {x}rstd = _layer_norm({z}, cols0, D0, EPS)")
            out = f"{x}x"
        return f"{out} + {x}" if self.key.residual else out

    def output_error(self, code: Code) -> None:
        """The loss gradient at the key path's output z_L (``lg``, through the optional residual) and the last
        layer's error d_L (through the optional LayerNorm)."""
        last = self.depth - 1
        code(
            f"err = {self.finish(code, f'z{last}', 'k')} - v",
            "lg = tl.where(valid[:, None] & cols0, _loss_grad(err), 0.0)",
        )
        if self.key.output_norm:
            code(f"d{last} = _layer_norm_backward(lg, kx, krstd, cols0, D0)")
        else:
            code(f"d{last} = lg")

    def clip(self, code: Code) -> None:
        """With ``grad_clip``: theta scaled per token by s = min(1, MAX_NORM / ||g_t||), ||g_t||^2 = sum_l
        ||d_l||^2 ||a_l||^2 (the token's gradient over every layer); ``theta_raw`` keeps the gate."""
        if self.key.grad_clip is None:
            return
        code("# the per-token inner gradient clip (the tables below take the clipped theta)")
        code(
            f"sq = {self.clip_norms(code)} + TINY",
            "ratio = tl.rsqrt(sq) * MAX_NORM  # max_norm / ||g_t||",
            "clip = tl.minimum(ratio, 1.0)",
            "theta_raw = theta",
            "theta = theta * clip",
        )

    def gate_tables(self, code: Code) -> None:
        code("# gate tables from log-space prefix sums (never a ratio of cumulative products)")
        if self.fgt:
            code("rho = _sum(tl.where(incl, log_keep[None, :], 0.0), axis=1)  # sum_{j<=t} log(1 - alpha_j)")
        if self.mom:
            code(
                "pi = _sum(tl.where(incl, log_eta[None, :], 0.0), axis=1)  # sum_{j<=t} log eta_j",
                "P = _masked_exp(pi[:, None] - pi[None, :], incl)  # P[j, i] = exp(pi_j - pi_i), i <= j",
                "u = tl.exp(pi)",
            )
        if not self.per_chunk:
            if self.read == "after":
                mask, shift = "incl", "rho"
            else:
                code("# 'before': query t reads row t - 1 (row -1 = the chunk-start state)")
                mask, shift = "tj < ti", "rho - log_keep"
            if self.fgt:
                code(f"R = {shift}", f"F = _masked_exp(R[:, None] - rho[None, :], {mask})", "A = tl.exp(R)")
            else:
                code(f"F = tl.where({mask}, 1.0, 0.0)")
            if self.mom:
                code(
                    "FP = _exact_dot(F, P)",
                    "B = _sum(F * u[None, :], axis=1)",
                )
            else:
                code("FP = F")
            code("C = FP * theta[None, :]")
        code("# the chunk-end row of the tables (the fold); c = e = 0 for a partial chunk")
        if self.fgt:
            code(
                "rho_end = _sum(log_keep, axis=0)",
                "keep = tl.exp(rho_end)",
                "f = _masked_exp(rho_end - rho, inchunk)",
            )
        else:
            code("f = tl.where(inchunk, 1.0, 0.0)")
        if self.mom:
            code(
                "cbar = _sum(f[:, None] * P, axis=0)",
                "carry = _sum(f * u, axis=0)",
                "pi_end = _sum(log_eta, axis=0)",
                "decay = tl.exp(pi_end)",
                "ebar = _masked_exp(pi_end - pi, inchunk)",
                "e = ebar * theta * cmt",
            )
        else:
            code("cbar = f")
        code("c = cbar * theta * cmt")

    def forward_header(self, code: Code) -> None:
        """The forward kernel's signature, prologue and chunk loop (its body follows, indented)."""
        code(
            "@triton.jit",
            f"def forward_kernel(q_ptr, k_ptr, v_ptr, {self.gate_args()}, y_ptr, states_ptr, T, NB):",
        )
        code.indent += 1
        code(
            '"""One program per (batch x head) row: y [N, T, D0] and the boundary states [N, NB, STATE_SIZE]',
            '(slot 0 holds the initial state; slot c + 1 is written when chunk c is complete)."""',
        )
        self.prologue(code)
        code("for chunk in range(0, (T + CHUNK - 1) // CHUNK):")
        code.indent += 1

    def backward_header(self, code: Code, scratch: str = "") -> None:
        """The backward kernel's signature, prologue and reversed chunk loop (its body follows, indented);
        ``scratch``, when given, documents a scratch_ptr argument."""
        extra = "scratch_ptr, " if scratch else ""
        code(
            "@triton.jit",
            f"def backward_kernel(q_ptr, k_ptr, v_ptr, {self.gate_args()}, states_ptr, gy_ptr, gstates_ptr,",
            f"                    gq_ptr, gk_ptr, gv_ptr, {self.gate_args('g')}, {extra}T, NB):",
        )
        code.indent += 1
        code(
            '"""The chunks in reverse, each recomputed from its boundary state. gstates [N, 2, STATE_SIZE]:',
            "chunk c reads the gradient of its end state from slot (c + 1) % 2 and writes that of its start state",
            "to slot c % 2 (the caller puts the final state's gradient in slot cdiv(T, CHUNK) % 2; slot 0 ends",
            "with the initial state's)." + (f" {scratch}" if scratch else "") + '"""',
        )
        self.prologue(code)
        if scratch:
            code("scratch = scratch_ptr + row * BT * D1")
        code("n_chunks = (T + CHUNK - 1) // CHUNK", "for i in range(0, n_chunks):")
        code.indent += 1
        code("chunk = n_chunks - 1 - i")

    def store_input_gradients(self, code: Code) -> None:
        code("# stores")
        for name, src in (("gq", "gq"), ("gk", "ga0"), ("gv", "gv")):
            code(f"_store_rows({name}_ptr + seq + t0 * D0, {src}, n_tok, D0, BT, B0)")
        for name in self.gates:
            code(f"_store_vec(g{name}_ptr + gates + t0, g{name}, n_tok, BT)")

    def output_error_backward(self, code: Code) -> None:
        """The reverse of :meth:`output_error`, from the complete ``gd{L}``: ``gz{L}``, ``gv`` and the residual's
        share of ``ga0``."""
        last = self.depth - 1
        code("# reverse of the output error (loss gradient through the optional LayerNorm and residual)")
        code(f"gdl = tl.where(valid[:, None] & cols0, gd{last}, 0.0)")
        if self.key.output_norm:
            code(
                "jg = _layer_norm_backward(gdl, kx, krstd, cols0, D0)",
                "# second-order term: the LayerNorm Jacobian depends on z",
                "alpha = _sum(gdl * (lg - (_sum(lg, axis=1) / D0)[:, None]), axis=1)",
                "beta = _sum(gdl * kx, axis=1)",
                "s_lg = _sum(lg * kx, axis=1) / D0",
            )
            code.acc(
                f"gz{last}",
                f"tl.where(cols0, -(krstd * krstd / D0 * (alpha - s_lg * beta))[:, None] * kx"
                f" - (krstd * beta / D0)[:, None] * d{last} - (krstd * s_lg)[:, None] * jg, 0.0)",
            )
            code("gerr = tl.where(valid[:, None] & cols0, jg * _loss_grad2(err), 0.0)")
            code.acc(f"gz{last}", "_layer_norm_backward(gerr, kx, krstd, cols0, D0)")
        else:
            code("gerr = tl.where(valid[:, None] & cols0, gdl * _loss_grad2(err), 0.0)")
            code.acc(f"gz{last}", "gerr")
        if self.key.residual:
            code.acc("ga0", "gerr")
        code("gv = -gerr")

    def theta_backward(self, code: Code) -> None:
        """d loss / d theta as the gate tables take it (the clipped theta when ``grad_clip``), from the complete
        gC, gc and ge."""
        code("# reverse of theta's share of the tables")
        if not self.per_chunk:
            code.acc("gtheta", "_sum(gC * FP, axis=0)")
        code.acc("gtheta", "gc * cbar * cmt")
        if self.mom:
            code.acc("gtheta", "ge * ebar * cmt")

    def clip_factor_backward(self, code: Code) -> None:
        """d loss / d theta_raw from d loss / d (clipped theta), and ``ccoef``: d loss / d ||g_t||^2."""
        code(
            "# reverse of the clip",
            "gclip = gtheta * theta_raw",
            "gtheta = gtheta * clip",
            "ccoef = tl.where(ratio <= 1.0, -gclip * clip / sq, 0.0)",
        )

    def gates_backward(self, code: Code) -> None:
        code("# reverse of the gate tables")
        if not self.per_chunk:
            code("gFP = gC * theta[None, :]")
            if self.mom:
                code("gF = _exact_dot(gFP, tl.trans(P)) + gB[:, None] * u[None, :]")
                code.acc("gP", "_exact_dot(tl.trans(F), gFP)")
                code.acc("gu", "_sum(gB[:, None] * F, axis=0)")
            else:
                code("gF = gFP")
            if self.fgt:
                code("X = gF * F", "gR = _sum(X, axis=1) + gA * A")
                code.acc("grho", "_sum(X, axis=0)", "-")
        code("gcbar = gc * theta * cmt")
        if self.mom:
            code("gf = _sum(P * gcbar[None, :], axis=1) + gcarry * cmt * u")
            code.acc("gP", "f[:, None] * gcbar[None, :]")
            code.acc("gu", "gcarry * cmt * f")
        else:
            code("gf = gcbar")
        if self.fgt:
            code("xf = gf * f")
            code.acc("grho", "xf", "-")
            code("grho_end = _sum(xf, axis=0) + gkeep * cmt * keep")
            total = "grho" if self.per_chunk else "grho + gR"
            code(f"glog_keep = _sum(tl.where(incl, ({total})[:, None], 0.0), axis=0) + grho_end")
            if self.read == "before":
                code("glog_keep = glog_keep - gR")
        if self.mom:
            code(
                "Y = gP * P",
                "ye = ge * theta * cmt * ebar",
                "gpi = _sum(Y, axis=1) - _sum(Y, axis=0) + gu * u - ye",
                "gpi_end = _sum(ye, axis=0) + gdecay * cmt * decay",
                "glog_eta = _sum(tl.where(incl, gpi[:, None], 0.0), axis=0) + gpi_end",
            )
