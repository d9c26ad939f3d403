"""Transcendental functions as branch-free LLVM IR that the loop vectorizer can vectorize.

`emit_unary(b, name, x)` computes `name(x)` for `name` in `UNARY` and `x` a `float`, `double`,
`<N x float>` or `<N x double>` value. Calls to libm (`expf`, or the `llvm.exp.*` intrinsics that
become libm calls) keep a loop scalar; these versions use only fadd/fmul/fdiv, `llvm.fma`,
fcmp + select, bitcasts and integer ops on the bit pattern, `llvm.fabs`, `llvm.rint` and
`llvm.sqrt`, all of which LLVM vectorizes natively.

Each function is emitted once per module as an `internal`, `alwaysinline` function named after
the function and the type (`tracejit.exp.f32`, `tracejit.tanh.v16f32`), so the LLVM dump stays
readable; the always-inliner runs before the loop vectorizer, so a loop calling it vectorizes.
`sqrt` is `llvm.sqrt` itself. Each function is also the fused-loop lowering of the primitive of
its name (registered with `_function_of(prim)` beside its code).

Accuracy, measured by tests/test_mathfns.py over millions of random inputs spanning each range,
against numpy evaluated in higher precision (max error in units in the last place; the tests
assert 4):

    exp       f32 1, f64 1. Overflows to +inf, underflows to 0; subnormal results are produced
              (not flushed: the last scaling rounds once into the subnormal range).
              exp(-inf) = 0, exp(inf) = inf, exp(nan) = nan.
    log       f32 1, f64 1, for every positive input, subnormals included.
              log(+-0) = -inf, log(x < 0) = nan, log(inf) = inf, log(nan) = nan.
    tanh      f32 2, f64 3. Odd (tanh(-0) = -0), exactly +-1 for large |x|, full relative
              accuracy near 0 (expm1 form, no cancellation), tanh(nan) = nan.
    logistic  f32 2, f64 2 against 1 / (1 + exp(-x)), computed from exp(-|x|) so both tails are
              stable: never nan for finite x, logistic(-inf) = 0, logistic(inf) = 1. For large
              negative x it returns the tiny true value (subnormal in f32 below about -87, e.g.
              3.7e-44 at -100) where the naive f32 formula gives 0 once exp(-x) overflows.
    sin, cos  f32 2 for |x| < 1e4 (the tested domain; still 2 up to about 1e6), f64 1-2 for
              |x| < 1e6 (tested; still 1 up to about 1e12). Near a zero of the function (x close
              to a multiple of pi/2) the error is absolute, below 1e-7 (f32) / 1e-16 (f64).
              Reduction is Cody-Waite by pi/2 with a three-part constant, no Payne-Hanek: the
              error grows beyond those magnitudes (tens of ulp at 4e6 in f32), and past about
              1e7 (f32) / 1e16 (f64) the results are meaningless (f32 ones need not even lie in
              [-1, 1]). sin/cos of +-inf or nan is nan; sin(-0) = -0.
    sqrt      llvm.sqrt: correctly rounded.
    atan      f32 2, f64 1 (every binade, subnormals to the largest). Cephes' reduction (pi/2 -
              atan(1/x) above tan(3pi/8), pi/4 + atan((x-1)/(x+1)) above tan(pi/8) resp. 0.66),
              odd (atan(-0) = -0), atan(+-inf) = +-pi/2. atan2 (numpy's arctan2, registered
              here too: atan(|y|/|x|) reflected by the signs) f32 2, f64 1, numpy's signed zeros
              and infinities exactly (tests/test_elementwise_more.py).

No fast-math flags are set (no nnan/ninf, no reassoc: the Cody-Waite splits and the compensated
sums depend on evaluation order). Contractions are explicit `llvm.fma` calls; on a host without
hardware FMA they still give correct results, but as libm calls (slow, scalarized).
"""
from __future__ import annotations

import math
from decimal import Decimal

import llvmlite.ir as ir
import numpy as np

from ..ir.prims.elementwise import (atan2_p, atan_p, cos_p, exp_p, log_p, logistic_p, sin_p,
                                  sqrt_p, tanh_p)

from .fused import register_elementwise
from .loops import F32, F64, I32, I64, intrinsic, type_suffix

# The fused-loop cost of each function here (fused.Elementwise.cost), in scalar arithmetic ops: a
# range reduction and a polynomial, ~9 ns per element scalar (a [64, 10] exp loop: 5.7 us). A loop
# of up to ~110 of them stays scalar (fused.TINY_WORK).
POLYNOMIAL_COST = 8

# name -> (impl(e: _Emitter, x) -> value, inline: emitted in place rather than as a function)
_IMPLS: dict = {}


def _function_of(prim, inline: bool = False):
    """Register the decorated `impl(e, x)` as the function named after `prim` and as `prim`'s
    fused-loop lowering (codegen/fused.py)."""
    def deco(impl):
        _IMPLS[prim.name] = (impl, inline)
        register_elementwise(prim, cost=POLYNOMIAL_COST)(
            lambda b, ins, args: emit_unary(b, prim.name, args[0]))
        return impl
    return deco


_PI_2 = Decimal("1.570796326794896619231321691639751442098584699687552910487472296153908")
_LN2 = Decimal("0.6931471805599453094172321214581765680755001343602552541206800094933936")


def _split(value: Decimal, np_float, parts: int) -> list[float]:
    """`value` as a sum of `parts` numbers of type `np_float`, each the rounded remainder of the
    previous ones (for Cody-Waite range reduction: x - n*c0 is exact with an FMA)."""
    out = []
    rest = value
    for _ in range(parts):
        p = float(np_float(float(rest)))
        out.append(p)
        rest -= Decimal(p)
    return out


def _constants(np_float) -> dict:
    is64 = np_float is np.float64
    c = {}
    c["ln2_hi"], c["ln2_lo"] = _split(_LN2, np_float, 2)
    c["pio2"] = _split(_PI_2, np_float, 3)
    if is64:
        c["exp_range"] = (-760.0, 720.0)  # beyond: exact 0 / inf after scaling by 2**n
        c["exp_zero"] = -746.0  # e**x < 2**-1075 below: rounds to 0
        c["expm1_lo"] = -45.0  # expm1(x) rounds to -1 below this
        # e**r - 1 = r + r*r * Q(r) on |r| <= ln2/2: the Taylor series to degree 13 (truncation
        # error below 4e-18 relative, far under the rounding of the result).
        c["expm1_q"] = [1.0 / math.factorial(k) for k in range(13, 1, -1)]
        # musl log(): log(1+f) = f - hfsq + s*(hfsq+R), s = f/(2+f), z = s*s, w = z*z,
        # R = z*(Lg1+w*(Lg3+w*(Lg5+w*Lg7))) + w*(Lg2+w*(Lg4+w*Lg6))
        c["log_odd"] = [1.479819860511658591e-01, 1.818357216161805012e-01,
                        2.857142874366239149e-01, 6.666666666666735130e-01]
        c["log_even"] = [1.531383769920937332e-01, 2.222219843214978396e-01,
                         3.999999999940941908e-01]
        # Cephes sin()/cos() on |r| <= pi/4: sin r = r + r^3 S(r^2), cos r = 1 - r^2/2 + r^4 C(r^2)
        c["sin"] = [1.58962301576546568060E-10, -2.50507477628578072866E-8,
                    2.75573136213857245213E-6, -1.98412698295895385996E-4,
                    8.33333333332211858878E-3, -1.66666666666666307295E-1]
        c["cos"] = [-1.13585365213876817300E-11, 2.08757008419747316778E-9,
                    -2.75573141792967388112E-7, 2.48015872888517045348E-5,
                    -1.38888888888730564116E-3, 4.16666666666665929218E-2]
        c["min_normal"], c["denorm_scale"], c["denorm_k"] = 2.0 ** -1022, 2.0 ** 54, 54
        # Cephes atan(): atan t = t + t z P(z) / Q(z), z = t*t, on |t| <= 0.66 after reduction
        c["atan_p"] = [-8.750608600031904122785E-1, -1.615753718733365076637E1,
                       -7.500855792314704667340E1, -1.228866684490136173410E2,
                       -6.485021904942025371773E1]
        c["atan_q"] = [1.0, 2.485846490142306297962E1, 1.650270098316988542046E2,
                       4.328810604912902668951E2, 4.853903996359136964868E2,
                       1.945506571482613964425E2]
        c["atan_mid"] = 0.66
    else:
        c["exp_range"] = (-110.0, 90.0)
        c["exp_zero"] = -104.0  # e**x < 2**-150 below: rounds to 0
        c["expm1_lo"] = -30.0
        # Cephes expf(): e**r = 1 + r + r*r * P(r), minimax on |r| <= ln2/2
        c["expm1_q"] = [1.9875691500E-4, 1.3981999507E-3, 8.3334519073E-3,
                        4.1665795894E-2, 1.6666665459E-1, 5.0000001201E-1]
        # musl logf(): R = z*(Lg1+w*Lg3) + w*(Lg2+w*Lg4)
        c["log_odd"] = [float.fromhex("0x91e9ee.0p-25"), float.fromhex("0xaaaaaa.0p-24")]
        c["log_even"] = [float.fromhex("0xf89e26.0p-26"), float.fromhex("0xccce13.0p-25")]
        # Cephes sinf()/cosf()
        c["sin"] = [-1.9515295891E-4, 8.3321608736E-3, -1.6666654611E-1]
        c["cos"] = [2.443315711809948E-005, -1.388731625493765E-003, 4.166664568298827E-002]
        c["min_normal"], c["denorm_scale"], c["denorm_k"] = 2.0 ** -126, 2.0 ** 25, 25
        # Cephes atanf(): atan t = t + t z P(z) on |t| <= tan(pi/8) after reduction
        c["atan_p"] = [8.05374449538e-2, -1.38776856032E-1, 1.99777106478E-1, -3.33329491539E-1]
        c["atan_q"] = None
        c["atan_mid"] = 0.4142135623730950
    # pi/2 and pi/4 as a rounded part plus the rest (added to the small term first)
    c["pio2_hl"] = _split(_PI_2, np_float, 2)
    c["pio4_hl"] = _split(_PI_2 / 2, np_float, 2)
    c["pi_hl"] = _split(_PI_2 * 2, np_float, 2)
    return c


_CONSTANTS = {32: _constants(np.float32), 64: _constants(np.float64)}


class _SplatConstant(ir.Constant):
    """A vector of equal constants in LLVM's short form `splat (float 0.5)`, so that the vector
    versions print one readable line per instruction instead of N copies of each constant."""

    def __init__(self, vty: ir.VectorType, scalar: ir.Constant):
        ir.Constant.__init__(self, scalar.type, scalar.constant)
        self.type = vty
        self.scalar = scalar

    def _to_string(self):
        return f"{self.type} {self.get_reference()}"

    def _get_reference(self):
        return f"splat ({self.scalar})"


class _Emitter:
    """Arithmetic on one float type (scalar or vector) and the integer type of the same shape and
    width, with constants splatted to that shape. No fast-math flags anywhere."""

    def __init__(self, b: ir.IRBuilder, ty: ir.Type):
        self.b = b
        self.ty = ty
        elem = ty.element if isinstance(ty, ir.VectorType) else ty
        self.bits = 64 if elem == F64 else 32
        self.mant = 52 if self.bits == 64 else 23
        self.bias = 1023 if self.bits == 64 else 127
        ielem = I64 if self.bits == 64 else I32
        self.ity = ir.VectorType(ielem, ty.count) if isinstance(ty, ir.VectorType) else ielem
        self.c = _CONSTANTS[self.bits]

    # constants
    def f(self, v: float) -> ir.Constant:
        return self._splat(self.ty, float(v))

    def i(self, v: int) -> ir.Constant:
        v = int(v) & ((1 << self.bits) - 1)  # as the signed number of the same bits
        return self._splat(self.ity, v - (1 << self.bits) if v >> (self.bits - 1) else v)

    @staticmethod
    def _splat(ty, v):
        if isinstance(ty, ir.VectorType):
            return _SplatConstant(ty, ir.Constant(ty.element, v))
        return ir.Constant(ty, v)

    # float arithmetic
    def add(self, a, c, name=""):
        return self.b.fadd(a, c, name=name)

    def sub(self, a, c, name=""):
        return self.b.fsub(a, c, name=name)

    def mul(self, a, c, name=""):
        return self.b.fmul(a, c, name=name)

    def div(self, a, c, name=""):
        return self.b.fdiv(a, c, name=name)

    def fma(self, a, x, c, name=""):
        """a * x + c, rounded once."""
        return self.call("fma", a, x, c, name=name)

    def call(self, intr: str, *args, name=""):
        ty = args[0].type
        fn = intrinsic(self.b.module, f"llvm.{intr}.{type_suffix(ty)}", ty, [a.type for a in args])
        return self.b.call(fn, list(args), name=name)

    def poly(self, x, coeffs, name=""):
        """Horner evaluation of the polynomial in x with `coeffs`, highest degree first."""
        acc = self.f(coeffs[0])
        for c in coeffs[1:]:
            acc = self.fma(acc, x, self.f(c))
        if name:
            acc.name = name
        return acc

    # comparisons and selects (ordered: false when either side is nan)
    def cmp(self, op, a, c):
        return self.b.fcmp_ordered(op, a, c)

    def isnan(self, x):
        return self.b.fcmp_unordered("uno", x, x)

    def select(self, cond, a, c, name=""):
        return self.b.select(cond, a, c, name=name)

    def clamp(self, x, lo: float, hi: float, name=""):
        """min(max(x, lo), hi), with nan mapped to `hi`: a finite value, so that integer
        conversions of it are defined (callers restore nan at the end)."""
        x = self.select(self.cmp("<", x, self.f(hi)), x, self.f(hi))
        return self.select(self.cmp(">", x, self.f(lo)), x, self.f(lo), name=name)

    # the bit pattern
    def as_int(self, x, name=""):
        return self.b.bitcast(x, self.ity, name=name)

    def as_float(self, n, name=""):
        return self.b.bitcast(n, self.ty, name=name)

    def to_int(self, x, name=""):
        """Float holding an integer (finite, in range) to the integer type."""
        return self.b.fptosi(x, self.ity, name=name)

    def pow2(self, k, name=""):
        """2.0**k for an integer vector k within the normal exponent range."""
        biased = self.b.add(k, self.i(self.bias))
        return self.as_float(self.b.shl(biased, self.i(self.mant)), name=name)

    def sign_bit(self, x):
        return self.b.and_(self.as_int(x), self.i(1 << (self.bits - 1)))

    # shared pieces
    def reduce_ln2(self, x):
        """n = rint(x / ln2) and r = x - n*ln2 (|r| <= ln2/2), with ln2 split in two parts so
        that n*ln2_hi is cancelled exactly."""
        c = self.c
        n = self.call("rint", self.mul(x, self.f(1.4426950408889634)), name="n")
        r = self.fma(n, self.f(-c["ln2_hi"]), x)
        r = self.fma(n, self.f(-c["ln2_lo"]), r, name="r")
        return n, r

    def expm1_poly(self, r):
        """e**r - 1 for |r| <= ln2/2 (about), with full relative accuracy near r = 0."""
        q = self.poly(r, self.c["expm1_q"])
        return self.fma(self.mul(r, r), q, r, name="em1")


# ------------------------------------------------------------------------------------------------
# the functions, each `impl(e: _Emitter, x) -> value of x.type`
# ------------------------------------------------------------------------------------------------
@_function_of(exp_p)
def _exp(e: _Emitter, x):
    lo, hi = e.c["exp_range"]
    # Below exp_zero the result is 0, selected at the end; the lanes compute exp(0) meanwhile,
    # since the scaling of the clamped input would underflow, which costs a microcode assist
    # per instruction on x86 (a softmax over a causal mask of -1e9 has half its lanes there:
    # the exp loop ran 2.3x slower than on unmasked scores)
    zero = e.cmp("<", x, e.f(e.c["exp_zero"]))
    n, r = e.reduce_ln2(e.clamp(e.select(zero, e.f(0.0), x), lo, hi, name="xc"))
    p = e.expm1_poly(r)
    # 2**n in two factors, each a normal number over the whole clamped range: the product
    # overflows to inf or rounds to subnormal/0 correctly in the last multiplication.
    ni = e.to_int(n)
    n1 = e.b.ashr(ni, e.i(1))
    s1 = e.pow2(n1)
    s2 = e.pow2(e.b.sub(ni, n1))
    y = e.select(zero, e.f(0.0), e.mul(e.fma(p, s1, s1), s2))
    return e.select(e.isnan(x), x, y, name="exp")


def _expm1_nonpositive(e: _Emitter, x):
    """e**x - 1 for x <= 0 (nan maps to -1: callers handle nan)."""
    xc = e.select(e.cmp(">", x, e.f(e.c["expm1_lo"])), x, e.f(e.c["expm1_lo"]))
    n, r = e.reduce_ln2(xc)
    p = e.expm1_poly(r)
    s = e.pow2(e.to_int(n))
    # s * (1 + p) - 1 = s*p + (s - 1); s - 1 is exact while it matters, the fma rounds once
    return e.fma(s, p, e.sub(s, e.f(1.0)), name="expm1")


@_function_of(tanh_p)
def _tanh(e: _Emitter, x):
    # tanh|x| = (1 - e**-2|x|) / (1 + e**-2|x|) = -u / (2 + u) with u = expm1(-2|x|) in [-1, 0]:
    # no cancellation near 0 (u ~ -2|x| to full relative accuracy), exactly 1 once u rounds to -1.
    a = e.call("fabs", x)
    u = _expm1_nonpositive(e, e.mul(a, e.f(-2.0)))
    t = e.div(e.b.fneg(u), e.add(u, e.f(2.0)))
    t = e.call("copysign", t, x)
    return e.select(e.isnan(x), x, t, name="tanh")


@_function_of(logistic_p)
def _logistic(e: _Emitter, x):
    # with t = e**-|x| in (0, 1]: 1/(1+t) for x >= 0 and t/(1+t) for x < 0. Neither overflows;
    # nan propagates through t (x >= 0 is false for nan, so t/(1+t) is taken).
    t = emit_unary(e.b, "exp", e.b.fneg(e.call("fabs", x)))
    num = e.select(e.cmp(">=", x, e.f(0.0)), e.f(1.0), t)
    return e.div(num, e.add(t, e.f(1.0)), name="logistic")


@_function_of(log_p)
def _log(e: _Emitter, x):
    c, b = e.c, e.b
    # subnormals: scale into the normal range first
    tiny = e.cmp("<", x, e.f(c["min_normal"]))
    xs = e.select(tiny, e.mul(x, e.f(c["denorm_scale"])), x)
    kadj = e.select(tiny, e.i(-c["denorm_k"]), e.i(0))
    # x = 2**k * m with m in [sqrt(2)/2, sqrt(2)) (musl's bit trick)
    one_bits = e.bias << e.mant
    sqrt_half_bits = int(np.array(0.5 ** 0.5, dtype=f"f{e.bits // 8}").view(f"i{e.bits // 8}"))
    bits = b.add(e.as_int(xs), e.i(one_bits - sqrt_half_bits))
    k = b.add(b.sub(b.lshr(bits, e.i(e.mant)), e.i(e.bias)), kadj, name="k")
    mbits = b.add(b.and_(bits, e.i((1 << e.mant) - 1)), e.i(sqrt_half_bits))
    f = e.sub(e.as_float(mbits), e.f(1.0), name="f")
    # log(1+f) = f - hfsq + s*(hfsq + R), s = f/(2+f), R ~ polynomial in s*s
    hfsq = e.mul(e.mul(f, f), e.f(0.5), name="hfsq")
    s = e.div(f, e.add(f, e.f(2.0)), name="s")
    z = e.mul(s, s)
    w = e.mul(z, z)
    r = e.add(e.mul(z, e.poly(w, c["log_odd"])), e.mul(w, e.poly(w, c["log_even"])), name="R")
    dk = b.sitofp(k, e.ty)
    # the order of these additions matters (compensated: small terms first)
    y = e.add(e.mul(s, e.add(hfsq, r)), e.mul(dk, e.f(c["ln2_lo"])))
    y = e.add(e.sub(y, hfsq), f)
    y = e.add(y, e.mul(dk, e.f(c["ln2_hi"])))
    # special values: log(inf) = inf, log(+-0) = -inf, log(x < 0) = log(nan) = nan
    y = e.select(e.cmp("==", x, e.f(np.inf)), x, y)
    y = e.select(e.cmp("==", x, e.f(0.0)), e.f(-np.inf), y)
    y = e.select(b.fcmp_unordered("<", x, e.f(0.0)), e.f(np.nan), y, name="log")
    return y


def _sincos(e: _Emitter, x, cos: bool):
    c, b = e.c, e.b
    # reduce |x| (sin is odd, cos even: the sign of x is put back at the end, which also keeps
    # sin(-0) = -0) by pi/2: a = n*pi/2 + r, |r| <= pi/4, pi/2 in three parts (Cody-Waite).
    a = e.call("fabs", x)
    n = e.call("rint", e.mul(a, e.f(0.6366197723675814)), name="n")
    p1, p2, p3 = c["pio2"]
    r = e.fma(n, e.f(-p1), a)
    r = e.fma(n, e.f(-p2), r)
    r = e.fma(n, e.f(-p3), r, name="r")
    # quadrant n mod 4 from the low bits of n + 1.5*2**mant (exact below 2**(mant-1)); defined
    # for inf/nan too, unlike fptosi
    q = b.and_(e.as_int(e.add(n, e.f(1.5 * 2.0 ** e.mant))), e.i(3))
    if cos:
        q = b.add(q, e.i(1))  # cos(x) = sin(x + pi/2)
    z = e.mul(r, r)
    sin_r = e.fma(e.mul(r, z), e.poly(z, c["sin"]), r, name="sin_r")
    # cos r = 1 - z/2 + z*z*C(z), with the rounding error of 1 - z/2 added back (fdlibm's trick)
    hz = e.mul(z, e.f(0.5))
    w = e.sub(e.f(1.0), hz)
    corr = e.sub(e.sub(e.f(1.0), w), hz)
    cos_r = e.add(w, e.fma(e.mul(z, z), e.poly(z, c["cos"]), corr), name="cos_r")
    odd = b.icmp_unsigned("!=", b.and_(q, e.i(1)), e.i(0))
    v = e.select(odd, cos_r, sin_r)
    # quadrants 2 and 3 negate: move bit 1 of q to the sign bit
    flip = b.shl(b.and_(q, e.i(2)), e.i(e.bits - 2))
    if not cos:
        flip = b.xor(flip, e.sign_bit(x))
    return e.as_float(b.xor(e.as_int(v), flip), name="cos" if cos else "sin")


@_function_of(sin_p)
def _sin(e, x):
    return _sincos(e, x, cos=False)


@_function_of(cos_p)
def _cos(e, x):
    return _sincos(e, x, cos=True)


@_function_of(sqrt_p, inline=True)
def _sqrt(e, x):
    return e.call("sqrt", x, name="sqrt")   # correctly rounded, and vectorizes natively


def _atan_nonneg(e: _Emitter, a):
    """atan(a) for a >= 0 (inf included; nan propagates), Cephes' reduction: a > tan(3pi/8) uses
    pi/2 - atan(1/a), a > atan_mid pi/4 + atan((a - 1)/(a + 1)), the rest the polynomial."""
    c = e.c
    big = e.cmp(">", a, e.f(2.414213562373095))
    mid = e.cmp(">", a, e.f(c["atan_mid"]))
    t = e.select(big, e.div(e.f(-1.0), a),
                 e.select(mid, e.div(e.sub(a, e.f(1.0)), e.add(a, e.f(1.0))), a), name="t")
    z = e.mul(t, t)
    if c["atan_q"] is None:
        zp = e.mul(z, e.poly(z, c["atan_p"]))
    else:
        zp = e.div(e.mul(z, e.poly(z, c["atan_p"])), e.poly(z, c["atan_q"]))
    p = e.fma(t, zp, t, name="atan_t")
    hi = e.select(big, e.f(c["pio2_hl"][0]), e.select(mid, e.f(c["pio4_hl"][0]), e.f(0.0)))
    lo = e.select(big, e.f(c["pio2_hl"][1]), e.select(mid, e.f(c["pio4_hl"][1]), e.f(0.0)))
    return e.add(hi, e.add(p, lo))


@_function_of(atan_p)
def _atan(e: _Emitter, x):
    # odd: the sign of x put back on atan|x| (keeps atan(-0) = -0)
    return e.call("copysign", _atan_nonneg(e, e.call("fabs", x)), x, name="atan")


@register_elementwise(atan2_p, cost=POLYNOMIAL_COST)
def _atan2(b: ir.IRBuilder, ins, args):
    """numpy's arctan2(y, x): atan(|y| / |x|) in [0, pi/2], reflected to pi - it where x < 0 or
    x = -0, with y's sign. Equal magnitudes (0/0, inf/inf) give 0 resp. pi/4 instead of nan."""
    y, x = args
    e = _Emitter(b, y.type)
    ay, ax = e.call("fabs", y), e.call("fabs", x)
    r = emit_unary(b, "atan", e.div(ay, ax))
    r = e.select(e.cmp("==", ay, e.f(0.0)), e.f(0.0), r)
    both_inf = b.and_(e.cmp("==", ay, e.f(np.inf)), e.cmp("==", ax, e.f(np.inf)))
    r = e.select(both_inf, e.f(e.c["pio4_hl"][0]), r)
    pi_hi, pi_lo = e.c["pi_hl"]
    negative_x = b.icmp_unsigned("!=", e.sign_bit(x), e.i(0))
    r = e.select(negative_x, e.add(e.sub(e.f(pi_lo), r), e.f(pi_hi)), r)
    # on the y axis exactly pi/2 (reflecting the rounded atan(inf) would be an ulp off)
    on_axis = b.and_(e.cmp("==", ax, e.f(0.0)), e.cmp("!=", ay, e.f(0.0)))
    r = e.select(on_axis, e.f(e.c["pio2_hl"][0]), r)
    r = e.call("copysign", r, y)
    nan = b.or_(e.isnan(x), e.isnan(y))
    return e.select(nan, e.add(x, y), r, name="atan2")


UNARY = tuple(_IMPLS)


def _float_element(ty: ir.Type):
    elem = ty.element if isinstance(ty, ir.VectorType) else ty
    return elem if elem in (F32, F64) else None


def emit_unary(b: ir.IRBuilder, name: str, x: ir.Value) -> ir.Value:
    """`name(x)` for `name` in UNARY and `x` of a float, double or float/double vector type;
    returns a value of `x.type`. Emits (once per module) and calls `tracejit.{name}.{type}`."""
    if name not in _IMPLS:
        raise NotImplementedError(f"no mathfns lowering for {name!r} (known: {', '.join(UNARY)})")
    if _float_element(x.type) is None:
        raise TypeError(f"mathfns.{name}: expected a float/double (vector) value, got {x.type}")
    impl, inline = _IMPLS[name]
    if inline:
        return impl(_Emitter(b, x.type), x)
    fn = _function(b.module, name, x.type)
    return b.call(fn, [x], name=name)


def _function(module: ir.Module, name: str, ty: ir.Type) -> ir.Function:
    fname = f"tracejit.{name}.{type_suffix(ty)}"
    fn = module.globals.get(fname)
    if fn is not None:
        return fn
    fn = ir.Function(module, ir.FunctionType(ty, [ty]), fname)
    fn.linkage = "internal"
    fn.attributes.add("alwaysinline")
    fn.attributes.add("nounwind")
    fn.args[0].name = "x"
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    builder.ret(_IMPLS[name][0](_Emitter(builder, ty), fn.args[0]))
    return fn
