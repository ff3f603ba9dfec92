"""The generator for depth-2 memories too wide for whole state matrices: the hidden width streamed in tiles.

A depth-2 memory M(x) = W_1 act(W_0 x) has W_0 [H, D] and W_1 [D, H]; hidden tile h is W_0's rows and W_1's columns
h*HT .. (h+1)*HT (and the same of S_0, S_1 and of every gradient). Everything of width H (pre-activations z_0,
activations a_1, errors d_0, the query's hidden rows) is computed one tile at a time; everything of width D or b
(z_1, the loss gradient, d_1, the retrieval's layer-1 sums, the b x b key products) is summed over the tiles. The
math is that of :mod:`titans_compose.ops.memory.codegen.emit` (memory-math.md section 3), term for term; only
the order of the sums over the hidden width differs. Per chunk, the forward kernel makes two passes over the tiles:

1. z_1 = sum_h a_1[h] W_1[:, h]^T, from which the output error and d_1 (which needs all of z_1);
2. per tile, d_0[h] = (d_1 W_1[:, h]) * act'(z_0[h]), the query's layer-0 read and hidden rows, their layer-1 sums
   (and H a_1^T, summed), and both layers' folded tiles, stored as they are made.

With ``grad_clip``, a pass 1b sums ||d_0||^2 over the tiles before the clip factor is known.

The backward recomputes passes 1 (1b) and 2, then makes two more: pass 3 the reverse of every per-tile term (the
retrieval's, the fold's and the error recursion's), storing the tiles' state gradients and the hidden part of
d loss / d z_0 (a [b, H] scratch row per program) while summing the D- and b-wide gradients, d_1's among them; and,
once d_1's gradient is complete, pass 4 adds what flows back through the output error (d loss / d z_1) to the stored
tiles. Stores and later loads of the same tiles by the same program are separated by a barrier.

The backward's steps are those of :mod:`~titans_compose.ops.memory.codegen.backward`, rendered in the phases of
:data:`PHASES`: a step's ``<step>_backward_head`` part before pass 3, its ``_tile`` part in pass 3, its
undecorated part after pass 3 (the D- and b-wide terms, the gate tables' reverse among them), its ``_output`` part
in pass 4, and the ``_end`` part last.
"""

from __future__ import annotations

from titans_compose.ops.memory.codegen.backward import Phase, fold_terms, render_backward
from titans_compose.ops.memory.codegen.base import Code, Generator
from titans_compose.ops.memory.codegen.key import KernelKey

#: the tiled backward's phases, in order (see the module docstring).
PHASES = (
    Phase("_head", "before the tiles: the layer-1 read's reverse and pass 3's accumulators"),
    Phase("_tile", "pass 3: the reverse of every per-tile term"),
    Phase("", "after pass 3: the D- and b-wide terms"),
    Phase("_output", "pass 4: what flows back through the output error (and the clip)"),
    Phase("_end", "the input gradients' stores"),
)


class TiledGenerator(Generator):
    """Triton source for a depth-2 key with ``hidden_tile`` set (see the module docstring)."""

    def __init__(self, key: KernelKey) -> None:
        if key.depth != 2 or not key.hidden_tile:
            raise ValueError("the tiled generator takes depth-2 keys with a hidden tile")
        super().__init__(key)

    def extra_constants(self, code: Code) -> None:
        code(f"HT = tl.constexpr({self.key.hidden_tile})  # hidden columns per tile")

    # ------------------------------------------------------------------ tiles
    def tile_ptr(self, layer: int, which: str, base: str) -> str:
        """Where hidden tile ``hb`` of layer ``layer``'s ``which`` (W or S) matrix starts in the slot ``base``."""
        return f"{base} + {which}{layer}_OFF + " + ("hb * D0" if layer == 0 else "hb")

    def tile_args(self, layer: int, rows: str | None = None) -> str:
        """(rows, cols, stride, block rows, block cols) of the tile: W_0's rows hb.. [HT, D0], W_1's columns
        hb.. [D0, HT]."""
        if layer == 0:
            return f"{rows or 'nh'}, D0, D0, HT, B0"
        return f"{rows or 'D0'}, nh, D1, B0, HT"

    def load_tile(self, code: Code, name: str, layer: int, which: str = "W", base: str = "state") -> None:
        code(f"{name} = _load_tile({self.tile_ptr(layer, which, base)}, {self.tile_args(layer)})")

    def store_tile(self, code: Code, value: str, layer: int, which: str, base: str, rows: str | None = None) -> None:
        code(f"_store_tile({self.tile_ptr(layer, which, base)}, {value}, {self.tile_args(layer, rows)})")

    def tile_loop(self, code: Code, what: str) -> None:
        code(
            f"for hb in range(0, D1, HT):  # {what}",
            "    nh = D1 - hb  # columns of this tile within the hidden width (masks the last, partial tile)",
            "    hcols = (tl.arange(0, HT) < nh)[None, :]",
        )
        code.indent += 1

    def zeros(self, code: Code, name: str, shape: str) -> None:
        code(f"{name} = tl.full({shape}, 0.0, tl.float32)")
        code.defined.add(name)

    def tile_key_path(self, code: Code, momentum: bool, errors: bool = True) -> None:
        """This tile's weights, z_0 and a_1 (and m_0, d_0 once d_1 is known)."""
        for layer in (0, 1):
            self.load_tile(code, f"w{layer}", layer)
            if momentum:
                self.load_tile(code, f"s{layer}", layer, "S")
        code("z0 = _dot(k, tl.trans(w0))", "a1 = tl.where(hcols, _act(z0), 0.0)")
        if errors:
            code("m0 = _dot(d1, w1)", "d0 = m0 * _act_grad(z0)")

    def key_path(self, code: Code) -> None:
        code("# key path: z1 summed over the hidden tiles, then the output error and d1")
        clip = self.key.grad_clip is not None
        self.zeros(code, "z1", "[BT, B0]")
        if clip:
            self.zeros(code, "an1", "[BT]")
        self.tile_loop(code, "pass 1")
        self.tile_key_path(code, momentum=False, errors=False)
        code("z1 = z1 + _dot(a1, tl.trans(w1))")
        if clip:
            code("an1 = an1 + _sum(a1 * a1, axis=1)  # ||a1||^2, for the clip")
        code.indent -= 1
        self.output_error(code)
        if clip:
            self.zeros(code, "dn0", "[BT]")
            self.tile_loop(code, "pass 1b: ||d0||^2, for the clip")
            self.tile_key_path(code, momentum=False)
            code("dn0 = dn0 + _sum(d0 * d0, axis=1)")
            code.indent -= 1
            code("an0 = _sum(k * k, axis=1)", "dn1 = _sum(d1 * d1, axis=1)")

    def clip_norms(self, code: Code) -> str:
        """The norms :meth:`key_path` summed over the tiles."""
        return "an0 * dn0 + an1 * dn1"

    def read_tiles(self, code: Code, sums: bool = True) -> None:
        """Pass 2's per-tile work: the tile's key path and errors, the query's layer-0 read and hidden rows, and
        (``sums``) their sums into the layer-1 read."""
        self.tile_key_path(code, momentum=self.mom)
        if self.per_chunk:
            code("zq0 = _dot(q, tl.trans(w0))")
        else:
            code("hq0 = _dot(q, tl.trans(w0))", "zq0 = hq0 * A[:, None]" if self.fgt else "zq0 = hq0")
            if self.mom:
                code("hs0 = _dot(q, tl.trans(s0))", "zq0 = zq0 + hs0 * B[:, None]")
            code("zq0 = zq0 - _dot(ck0, d0)")
        code("h1 = tl.where(hcols, _act(zq0), 0.0)")
        if not sums:
            return
        if self.per_chunk:
            code("zq1 = zq1 + _dot(h1, tl.trans(w1))")
        else:
            code("hq1 = hq1 + _dot(h1, tl.trans(w1))", "kk1 = kk1 + _dot(h1, tl.trans(a1))")
            if self.mom:
                code("hs1 = hs1 + _dot(h1, tl.trans(s1))")

    def read_prologue(self, code: Code) -> None:
        """Before pass 2: the layer-0 key products and the layer-1 sums' accumulators."""
        if self.per_chunk:
            code("# per-chunk retrieval: every query reads the chunk-start weights")
            self.zeros(code, "zq1", "[BT, B0]")
            return
        code(f"# per-token retrieval ('{self.read}'): Z = diag(A) H W^T + diag(B) H S^T - (C o H a^T) d")
        code("kk0 = _dot(q, tl.trans(k))", "ck0 = C * kk0")
        self.zeros(code, "hq1", "[BT, B0]")
        self.zeros(code, "kk1", "[BT, BT]")
        if self.mom:
            self.zeros(code, "hs1", "[BT, B0]")

    def read_epilogue(self, code: Code) -> str:
        """After pass 2: the layer-1 read; returns the expression of y."""
        if not self.per_chunk:
            code("zq1 = hq1 * A[:, None]" if self.fgt else "zq1 = hq1")
            if self.mom:
                code("zq1 = zq1 + hs1 * B[:, None]")
            code("ck1 = C * kk1", "zq1 = zq1 - _dot(ck1, d1)")
        return self.finish(code, "zq1", "q")

    # ------------------------------------------------------------------ forward
    def forward_kernel(self, code: Code) -> None:
        self.forward_header(code)
        self.load_inputs(code)
        self.key_path(code)
        self.clip(code)
        self.gate_tables(code)
        self.read_prologue(code)
        code("nxt = state + STATE_SIZE")
        self.tile_loop(code, "pass 2: errors, reads, and the fold (masked off for a partial chunk)")
        self.read_tiles(code)
        for layer, a, d in ((0, "k", "d0"), (1, "a1", "d1")):
            rows = "tl.where(commit, nh, 0)" if layer == 0 else "tl.where(commit, D0, 0)"
            base = f"keep * w{layer}" if self.fgt else f"w{layer}"
            if self.mom:
                base += f" + carry * s{layer}"
            code(f"nw{layer} = {base} - _dot(tl.trans({d} * c[:, None]), {a})")
            self.store_tile(code, f"nw{layer}", layer, "W", "nxt", rows)
            if self.mom:
                code(f"ns{layer} = decay * s{layer} - _dot(tl.trans({d} * e[:, None]), {a})")
                self.store_tile(code, f"ns{layer}", layer, "S", "nxt", rows)
        code.indent -= 1
        code(f"y = {self.read_epilogue(code)}", "_store_rows(y_ptr + seq + t0 * D0, y, n_tok, D0, BT, B0)")
        code("tl.debug_barrier()")
        code.indent -= 2

    # ------------------------------------------------------------------ backward
    def backward_kernel(self, code: Code) -> None:
        self.backward_header(code, "scratch [N, BT, D1] holds a row's d loss / d z0 between passes 3 and 4.")
        self.load_inputs(code)
        code.defined = set()
        self.key_path(code)
        self.clip(code)
        self.gate_tables(code)
        self.read_prologue(code)
        self.tile_loop(code, "pass 2 again: the layer-1 read's sums")
        self.read_tiles(code)
        code.indent -= 1
        self.read_epilogue(code)
        code("gy = _load_rows(gy_ptr + seq + t0 * D0, n_tok, D0, BT, B0)")
        render_backward(self, code, PHASES)
        code("tl.debug_barrier()")
        code.indent -= 2

    def begin_phase(self, code: Code, phase: Phase) -> None:
        """Opens the tile loop of pass 3 and 4, recomputing what the tile's reverse needs."""
        if phase.suffix == "_tile":
            self.tile_loop(code, phase.what)
            self.read_tiles(code, sums=False)
        elif phase.suffix == "_output":
            code("tl.debug_barrier()  # pass 4 reads what pass 3 stored")
            self.tile_loop(code, phase.what)
            self.tile_key_path(code, momentum=False, errors=self.key.grad_clip is not None)

    def end_phase(self, code: Code, phase: Phase) -> None:
        if phase.suffix in ("_tile", "_output"):
            code.indent -= 1

    def key_path_backward_output(self, code: Code) -> None:
        """Pass 4: the key path's reverse on this tile, from the complete d loss / d z1 (with the clip's share of
        gd0 and ga1), added to the tile's stored state gradient."""
        clip = self.key.grad_clip is not None
        code("ga1 = _dot(gz1, w1)")
        gw1 = "_dot(tl.trans(gz1), a1)"
        if clip:
            code(
                "gd0c = (ccoef * an0)[:, None] * d0  # the clip's share of gd0 and ga1",
                "ga1 = ga1 + (ccoef * dn1)[:, None] * a1",
                "gz0 = tl.where(hcols, gd0c * m0 * _act_grad2(z0) + ga1 * _act_grad(z0), 0.0)",
            )
            gw1 += " + _dot(tl.trans(d1), gd0c * _act_grad(z0))"
        else:
            code("gz0 = tl.where(hcols, ga1 * _act_grad(z0), 0.0)")
        code("gz0 = gz0 + _load_tile(scratch + hb, BT, nh, D1, BT, HT)")
        for layer, term in ((1, gw1), (0, "_dot(tl.trans(gz0), k)")):
            code(f"gw{layer} = _load_tile({self.tile_ptr(layer, 'W', 'gout')}, {self.tile_args(layer)}) + {term}")
            self.store_tile(code, f"gw{layer}", layer, "W", "gout")
        code("ga0 = ga0 + _dot(gz0, w0)")

    def stores_backward_end(self, code: Code) -> None:
        self.store_input_gradients(code)

    def retrieval_backward_head(self, code: Code) -> None:
        """The reverse of the layer-1 read as far as it needs no tile: d loss / d zq1 and the b x b terms."""
        code("# reverse of the layer-1 read")
        code("gzq1 = _layer_norm_backward(gy, qx, qrstd, cols0, D0)" if self.key.output_norm else "gzq1 = gy")
        if self.key.residual:
            code("gq = gy")
            code.defined.add("gq")
        else:
            self.zeros(code, "gq", "[BT, B0]")
        if self.per_chunk:
            self.zeros(code, "gd1", "[BT, B0]")
            return
        if self.fgt:
            code("gA = _sum(gzq1 * hq1, axis=1)", "ghq = gzq1 * A[:, None]")
        else:
            code("ghq = gzq1")
        if self.mom:
            code("gB = _sum(gzq1 * hs1, axis=1)", "ghs = gzq1 * B[:, None]")
        code(
            "gck1 = -_dot(gzq1, tl.trans(d1))  # d loss / d (C o K1)",
            "gd1 = -_dot(tl.trans(ck1), gzq1)",
            "gC = gck1 * kk1",
            "gkk1 = gck1 * C",
        )
        code.defined.update({"gd1", "gC"})
        self.zeros(code, "gck0", "[BT, BT]")

    def fold_backward_head(self, code: Code) -> None:
        """The sums pass 3 adds to (the D- and b-wide gradients and the fold's scalars), and where the state
        gradients are read and written."""
        self.zeros(code, "ga0", "[BT, B0]")
        self.zeros(code, "gc", "[BT]")
        self.zeros(code, "pw1", "[BT, B0]")
        if self.fgt:
            code("keep_eff = tl.where(commit, keep, 1.0)")
            self.zeros(code, "gkeep", "[]")
        if self.mom:
            code("carry_eff = carry * cmt", "decay_eff = tl.where(commit, decay, 1.0)")
            for name in ("gcarry", "gdecay"):
                self.zeros(code, name, "[]")
            self.zeros(code, "ge", "[BT]")
            self.zeros(code, "ps1", "[BT, B0]")
        if self.key.grad_clip is not None:
            self.zeros(code, "uc", "[BT, B0]")
        code(
            "gin = gstates_ptr + (row * 2 + (chunk + 1) % 2) * STATE_SIZE",
            "gout = gstates_ptr + (row * 2 + chunk % 2) * STATE_SIZE",
        )

    def retrieval_backward_tile(self, code: Code) -> None:
        """Pass 3: the reverse of both layers' reads on this tile."""
        code("# reverse of the layer-1 read on this tile")
        for name in ("gw0", "gw1", "gs0", "gs1", "gd0", "ga1"):  # this tile's gradients start afresh
            code.defined.discard(name)
        if self.per_chunk:
            code.acc("gw1", "_dot(tl.trans(gzq1), h1)")
            code("gh = _dot(gzq1, w1)")
        else:
            code.acc("gw1", "_dot(tl.trans(ghq), h1)")
            code("gh = _dot(ghq, w1)")
            if self.mom:
                code.acc("gs1", "_dot(tl.trans(ghs), h1)")
                code("gh = gh + _dot(ghs, s1)")
            code("gh = gh + _dot(gkk1, a1)")
            code.acc("ga1", "_dot(tl.trans(gkk1), h1)")
        code("gzq0 = tl.where(hcols, gh * _act_grad(zq0), 0.0)")
        code("# reverse of the layer-0 read")
        if self.per_chunk:
            code.acc("gw0", "_dot(tl.trans(gzq0), q)")
            code("gq = gq + _dot(gzq0, w0)")
        else:
            if self.fgt:
                code("gA = gA + _sum(gzq0 * hq0, axis=1)", "ghq0 = gzq0 * A[:, None]")
            else:
                code("ghq0 = gzq0")
            code.acc("gw0", "_dot(tl.trans(ghq0), q)")
            code("gq = gq + _dot(ghq0, w0)")
            if self.mom:
                code("gB = gB + _sum(gzq0 * hs0, axis=1)", "ghs0 = gzq0 * B[:, None]")
                code.acc("gs0", "_dot(tl.trans(ghs0), q)")
                code("gq = gq + _dot(ghs0, s0)")
            code("gck0 = gck0 - _dot(gzq0, tl.trans(d0))")
            code.acc("gd0", "_dot(tl.trans(ck0), gzq0)", "-")

    def fold_backward_tile(self, code: Code) -> None:
        """Pass 3: the reverse of the fold on this tile; layer 1's b x D products are summed for after the tiles."""
        code("# reverse of the fold (the identity for a partial chunk)")
        for layer in (0, 1):
            self.load_tile(code, "gnw", layer, "W", "gin")
            code.acc(f"gw{layer}", "keep_eff * gnw" if self.fgt else "gnw")
            if self.fgt:
                code(f"gkeep = gkeep + _sum2(w{layer} * gnw)")
            if self.mom:
                self.load_tile(code, "gns", layer, "S", "gin")
                code.acc(f"gs{layer}", "carry_eff * gnw + decay_eff * gns")
                code(f"gcarry = gcarry + _sum2(s{layer} * gnw)", f"gdecay = gdecay + _sum2(s{layer} * gns)")
            for term in fold_terms(self.mom):
                g, coef = term.incoming, term.coef
                if layer == 0:
                    code(f"p = _dot(k, tl.trans({g}))")
                    code.acc("gd0", f"{coef}[:, None] * p", "-")
                    code.acc(term.grad_coef, "_sum(d0 * p, axis=1)", "-")
                    code.acc("ga0", f"_dot(d0 * {coef}[:, None], {g})", "-")
                else:
                    code.acc(f"{term.product}1", f"_dot(a1, tl.trans({g}))")
                    code.acc("ga1", f"_dot(d1 * {coef}[:, None], {g})", "-")

    def key_path_backward_tile(self, code: Code) -> None:
        """Pass 3: the reverse of the error recursion on this tile; the hidden part of d loss / d z0 goes to the
        scratch row for pass 4."""
        code("# reverse of the error recursion d0 = (d1 W1) * act'(z0)")
        code(
            "gm = gd0 * _act_grad(z0)",
            "gd1 = gd1 + _dot(gm, tl.trans(w1))",
            "gw1 = gw1 + _dot(tl.trans(d1), gm)",
            "gz0 = tl.where(hcols, gd0 * m0 * _act_grad2(z0) + ga1 * _act_grad(z0), 0.0)",
            "_store_tile(scratch + hb, gz0, BT, nh, D1, BT, HT)",
        )
        if self.key.grad_clip is not None:
            code("uc = uc + _dot(d0 * _act_grad(z0), tl.trans(w1))  # what a clip term ~ d0 gives gd1, per unit")

    def stores_backward_tile(self, code: Code) -> None:
        """Pass 3: this tile's state gradients (pass 4 adds the key path's share)."""
        for layer in (0, 1):
            self.store_tile(code, f"gw{layer}", layer, "W", "gout")
            if self.mom:
                self.store_tile(code, f"gs{layer}", layer, "S", "gout")

    def retrieval_backward(self, code: Code) -> None:
        """After pass 3: the b x b layer-0 terms of the read's reverse."""
        if not self.per_chunk:
            code(
                "gC = gC + gck0 * kk0",
                "gkk0 = gck0 * C",
                "gq = gq + _dot(gkk0, k)",
                "ga0 = ga0 + _dot(tl.trans(gkk0), q)",
            )

    def fold_backward(self, code: Code) -> None:
        """After pass 3: the fold's d1 terms from layer 1's products summed over the tiles."""
        for term in fold_terms(self.mom):
            code(
                f"gd1 = gd1 - {term.coef}[:, None] * {term.product}1",
                f"{term.grad_coef} = {term.grad_coef} - _sum(d1 * {term.product}1, axis=1)",
            )

    def clip_backward(self, code: Code) -> None:
        """After pass 3: d loss / d theta_raw and the clip's shares of gd1 and ga0 (those of gd0 and ga1 are added
        per tile in pass 4)."""
        if self.key.grad_clip is None:
            return
        self.clip_factor_backward(code)
        code(
            "# the clip's shares of gd1 and ga0 (those of gd0 and ga1 are added per tile in pass 4)",
            "gd1 = gd1 + (ccoef * an1)[:, None] * d1 + (ccoef * an0)[:, None] * uc",
            "ga0 = ga0 + (ccoef * dn0)[:, None] * k",
        )

    def key_path_backward(self, code: Code) -> None:
        """After pass 3, d1's gradient complete: its reverse through the output error, d loss / d z1."""
        self.output_error_backward(code)
