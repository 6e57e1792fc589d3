"""Layer-wise Relevance Propagation (LRP) for any Flax model: rules, composites and the
canonization of BatchNorm, residual sums and pooling, on the model's traced program.

LRP (Bach et al. 2015; Montavon et al. 2019, "Layer-wise relevance propagation: an
overview") explains the logit y_c by passing it backwards, each layer redistributing the
relevance R of its outputs to its inputs by a rule. Here the relevance is the cotangent
of one backward pass over the model's own program (its jaxpr), in which

- each **linear layer** (a convolution, or a Dense `dot_general`, whose weights do not
  depend on the image) passes R by the rule its composite names for it. The
  elementwise affine operations right after it are merged into it first (its bias,
  and a BatchNorm in inference mode: the canonization Zennit does on the modules), so
  the rule sees one layer z = x * W~ + b~;
- **activations** (ReLU, GELU, tanh, ...) and operations with a constant (the model's
  input standardisation, a scaling) pass R unchanged;
- **sums of activations** (a residual addition, average pooling and global average
  pooling, which are `reduce_window_sum` and `reduce_sum`) split R in proportion to
  each input's share (Zennit's `Norm` rule);
- **data movement** (reshape, transpose, slicing, padding, concatenation) and **max
  pooling** use the plain gradient, which routes R unchanged, to the winner for max
  pooling;
- anything else that touches the image (attention's product of two activations, a
  normalisation by the activations' own statistics) is refused by name: there is no
  rule for it here (AttnLRP is not implemented).

No model needs an LRP-specific method, and nothing is hooked.

Conventions follow Zennit's (Anders et al. 2021), so that the same weights give the same
maps: its rules with their bias terms and their stabiliser z + ε·sign(z) (sign(0) = +1;
ε = 1e-6 unless a rule says otherwise), its `epsilon_gamma_box` and `epsilon_plus_flat`
composites, `Pass` for activations and `Norm` for sums. Two differences, both choices of
the caller in Zennit: the relevance starts as the explained logit (Zennit's output
relevance is what the caller passes, often a one-hot), and the z^B bounds come from the
model's own standardisation of [0, 1] images (Zennit takes them from the caller).

Shapes: images (N, H, W, C); relevance at the image (N, H, W, C).
"""

import functools
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex

from xai_layers import DEPTHWISE
from xai_models import CALLS, bind, closed, environment, inner_programs

# ----------------------------------------------------------------------------------------
# Rules. Each maps a linear layer's output relevance R to its input relevance, given
#   op(x, w): the layer's linear map (a convolution or a dot_general) without its bias,
#     and op.uniform(x): the same map with every weight 1 (a `LinearOp`),
#   x: the layer's input, w and b: its weights and bias (BatchNorm merged in),
#   low and high: the bounds of x (z^B only).
# T(w, s) below is the transpose of x -> op(x, w) applied to s, i.e. its vjp.


def stabilize(z, epsilon=1e-6):
    """z + ε·sign(z), with sign(0) = +1 (Zennit's stabiliser)."""
    return z + epsilon * jnp.where(z >= 0, 1.0, -1.0).astype(z.dtype)


def _divide(r, z, epsilon):
    """r / stabilize(z, ε), and 0 where that denominator is exactly 0 (only with ε = 0)."""
    d = stabilize(z, epsilon)
    return jnp.where(d == 0, 0.0, r / jnp.where(d == 0, 1.0, d)).astype(r.dtype)


def _transpose(op, x, w, s):
    return jax.vjp(lambda v: op(v, w), x)[1](s)[0]


def _pos(a):
    return jnp.maximum(a, 0)


def _neg(a):
    return jnp.minimum(a, 0)


class Epsilon(NamedTuple):
    """LRP-ε (Bach et al. 2015): R_in = x ⊙ Wᵀ(R / (z + ε·sign z)), z = Wx + b.
    ε = 0 is LRP-0."""

    epsilon: float = 1e-6

    def __call__(self, op, x, w, b, r, low=None, high=None):
        z = op(x, w) + b
        return x * _transpose(op, x, w, _divide(r, z, self.epsilon))


class Gamma(NamedTuple):
    """LRP-γ (Montavon et al. 2019), generalised to inputs of both signs as in Zennit:
    outputs with z > 0 pass R through the weights W + γW⁺ for positive inputs and
    W + γW⁻ for negative ones, with the bias b + γb⁺ in the denominator; outputs with
    z < 0 the other way round, with b + γb⁻. For inputs ≥ 0 (after a ReLU) this is the
    paper's rule, R_in = x ⊙ (W + γW⁺)ᵀ(R / (x(W + γW⁺) + b + γb⁺))."""

    gamma: float = 0.25

    def __call__(self, op, x, w, b, r, low=None, high=None):
        g = self.gamma
        wp, wn = w + g * _pos(w), w + g * _neg(w)
        xp, xn = _pos(x), _neg(x)
        z = op(x, w) + b
        up = op(xp, wp) + op(xn, wn) + b + g * _pos(b)
        down = op(xp, wn) + op(xn, wp) + b + g * _neg(b)
        sp = _divide(jnp.where(z > 0, r, 0.0), up, 1e-6)
        sn = _divide(jnp.where(z < 0, r, 0.0), down, 1e-6)
        return (xp * (_transpose(op, x, wp, sp) + _transpose(op, x, wn, sn))
                + xn * (_transpose(op, x, wn, sp) + _transpose(op, x, wp, sn)))


class AlphaBeta(NamedTuple):
    """LRP-αβ (Bach et al. 2015), α − β = 1: positive contributions (x⁺W⁺, x⁻W⁻, with
    b⁺) take α times their share of R and negative ones (x⁺W⁻, x⁻W⁺, with b⁻) β times
    theirs, subtracted. α = 1, β = 0 is z⁺ (`ZPlus`)."""

    alpha: float = 2.0
    beta: float = 1.0

    def __call__(self, op, x, w, b, r, low=None, high=None):
        xp, xn, wp, wn = _pos(x), _neg(x), _pos(w), _neg(w)
        sp = _divide(r, op(xp, wp) + op(xn, wn) + _pos(b), 1e-6)
        out = self.alpha * (xp * _transpose(op, x, wp, sp) + xn * _transpose(op, x, wn, sp))
        if self.beta:
            sn = _divide(r, op(xp, wn) + op(xn, wp) + _neg(b), 1e-6)
            out = out - self.beta * (xp * _transpose(op, x, wn, sn)
                                     + xn * _transpose(op, x, wp, sn))
        return out


def ZPlus():  # noqa: N802 - a rule's name, like the classes
    """LRP-z⁺ (Montavon et al. 2017): αβ with α = 1, β = 0 (bias b⁺ in the denominator)."""
    return AlphaBeta(1.0, 0.0)


class ZBox(NamedTuple):
    """LRP-z^B (Montavon et al. 2017) for inputs bounded by low ≤ x ≤ high:
    R_in = x ⊙ Wᵀs − low ⊙ W⁺ᵀs − high ⊙ W⁻ᵀs, s = R / (Wx − W⁺low − W⁻high) (no bias).
    low = high = None: the bounds of [0, 1] images after the model's own
    standardisation, (0 − mean)/std and (1 − mean)/std per channel; only for the first
    layer."""

    low: Optional[float] = None
    high: Optional[float] = None

    def __call__(self, op, x, w, b, r, low=None, high=None):
        low = jnp.broadcast_to(jnp.asarray(low if self.low is None else self.low, x.dtype),
                               x.shape)
        high = jnp.broadcast_to(jnp.asarray(high if self.high is None else self.high,
                                            x.dtype), x.shape)
        wp, wn = _pos(w), _neg(w)
        s = _divide(r, op(x, w) - op(low, wp) - op(high, wn), 1e-6)
        return (x * _transpose(op, x, w, s) - low * _transpose(op, x, wp, s)
                - high * _transpose(op, x, wn, s))


class Flat(NamedTuple):
    """LRP-flat (Lapuschkin et al. 2019): each output's R spread evenly over its
    receptive field (weights and inputs all 1, no bias)."""

    def __call__(self, op, x, w, b, r, low=None, high=None):
        ones_x = jnp.ones_like(x)
        return jax.vjp(op.uniform, ones_x)[1](_divide(r, op.uniform(ones_x), 1e-6))[0]


class WSquare(NamedTuple):
    """LRP-w² (Montavon et al. 2017): R spread in proportion to the squared weights,
    whatever the input (the bias squared too, as in Zennit)."""

    def __call__(self, op, x, w, b, r, low=None, high=None):
        ones_x = jnp.ones_like(x)
        return _transpose(op, ones_x, w * w, _divide(r, op(ones_x, w * w) + b * b, 1e-6))


Rule = Union[Epsilon, Gamma, AlphaBeta, ZBox, Flat, WSquare]


class LinearOp:
    """A linear layer's map without its bias, op(x, w), from its equation in the program.

    `uniform(x)` is the same map with every weight 1, written as sums (a windowed sum
    for a convolution) rather than as the map of a constant all-ones kernel: XLA:CPU's
    YNNPACK fusion (jaxlib 0.10) computes a convolution whose kernel is a constant splat
    wrongly when a reduction follows it in the same program, as the channel sum of a
    map or the user's own `jnp.sum` does (seen as LRP-flat maps of 1e9 to 1e28 under
    `jax.jit` with traced variables).
    """

    def __init__(self, eqn, w_shape):
        self.eqn, self.w_shape = eqn, tuple(w_shape)

    def __call__(self, x, w):
        return bind(self.eqn, [x, w])[0]

    def uniform(self, x):
        if self.eqn.primitive.name in CALLS:  # xai_layers.depthwise_conv: no conv kernel
            return bind(self.eqn, [x, jnp.ones(self.w_shape, x.dtype)])[0]
        if self.eqn.primitive.name == "dot_general":  # x @ W, W (in, out)
            total = jnp.sum(x, axis=-1, keepdims=True)
            return jnp.broadcast_to(total, x.shape[:-1] + self.w_shape[1:])
        p = self.eqn.params
        lhs, rhs, out = p["dimension_numbers"]
        groups = p["feature_group_count"]
        # x as (N, G, spatial...): summed over each group's input channels
        moved = jnp.transpose(x, lhs)
        moved = moved.reshape((moved.shape[0], groups, -1) + moved.shape[2:]).sum(axis=2)
        summed = jax.lax.reduce_window(
            moved, np.zeros((), x.dtype), jax.lax.add,
            (1, 1) + tuple(self.w_shape[k] for k in rhs[2:]),
            (1, 1) + tuple(p["window_strides"]),
            ((0, 0), (0, 0)) + tuple(map(tuple, p["padding"])),
            base_dilation=(1, 1) + tuple(p["lhs_dilation"]),
            window_dilation=(1, 1) + tuple(p["rhs_dilation"]))
        channels = self.w_shape[rhs[0]]
        shape = summed.shape
        y = jnp.broadcast_to(summed[:, :, None], (shape[0], groups, channels // groups)
                             + shape[2:]).reshape((shape[0], channels) + shape[2:])
        return jnp.transpose(y, np.argsort(out))


RULES = (Epsilon, Gamma, AlphaBeta, ZBox, Flat, WSquare)

# ----------------------------------------------------------------------------------------
# Composites: which rule each linear layer takes.


class Composite(NamedTuple):
    """A rule per linear layer, by module path or by kind.

    layers: ((key, rule), ...): the first entry whose key is the layer's module path
        (e.g. 'block1/Conv_0'), else the first whose key is its kind ('conv' or
        'dense'), gives the rule.
    first: the same for the first linear layer the image reaches; it goes before
        `layers` there.
    A layer no entry matches is refused by name.
    """

    layers: Tuple[Tuple[str, Rule], ...]
    first: Tuple[Tuple[str, Rule], ...] = ()

    def rule(self, path: str, kind: str, is_first: bool) -> Rule:
        for entries in ((self.first,) if is_first else ()) + (self.layers,):
            for key in (path, kind):
                for name, rule in entries:
                    if name == key:
                        return rule
        raise ValueError(f"composite has no rule for the {kind} layer {path or '(unnamed)'}: "
                         f"give one for its path or for {kind!r}")


def composite(layers: Dict[str, Rule], first: Optional[Dict[str, Rule]] = None) -> Composite:
    """A `Composite` from dicts, e.g.
    `composite({"conv": Gamma(0.5), "dense": Epsilon()}, first={"conv": Flat()})`."""
    for name, entries in (("layers", layers), ("first", first or {})):
        if not isinstance(entries, dict):
            raise TypeError(f"{name} must be a dict from module path or kind to rule, got "
                            f"{type(entries).__name__}")
        for key, rule in entries.items():
            if not isinstance(key, str) or not isinstance(rule, RULES):
                raise TypeError(f"{name} must map a module path or kind (str) to a rule "
                                f"({', '.join(r.__name__ for r in RULES)}), got "
                                f"{key!r}: {rule!r}")
    return Composite(tuple(layers.items()), tuple((first or {}).items()))


def named_composite(name: str, epsilon: float = 1e-6, gamma: float = 0.25) -> Composite:
    """Zennit's composites of the same names, and two plain ones:
    - epsilon_gamma_box: z^B on the first conv, γ on the other convs, ε on Dense layers;
    - epsilon_plus_flat: flat on the first linear layer, z⁺ on convs, ε on Dense layers;
    - epsilon_plus: z⁺ on convs, ε on Dense layers;
    - epsilon_alpha2_beta1: α2β1 on convs, ε on Dense layers;
    - epsilon_alpha2_beta1_flat: the same with flat on the first linear layer;
    - epsilon: ε everywhere (epsilon = 0: LRP-0, which is Gradient × Input on a ReLU
      network without biases)."""
    eps = Epsilon(epsilon)
    flat = {"conv": Flat(), "dense": Flat()}
    table = {
        "epsilon_gamma_box": ({"conv": Gamma(gamma), "dense": eps}, {"conv": ZBox()}),
        "epsilon_plus_flat": ({"conv": ZPlus(), "dense": eps}, flat),
        "epsilon_plus": ({"conv": ZPlus(), "dense": eps}, None),
        "epsilon_alpha2_beta1": ({"conv": AlphaBeta(2.0, 1.0), "dense": eps}, None),
        "epsilon_alpha2_beta1_flat": ({"conv": AlphaBeta(2.0, 1.0), "dense": eps}, flat),
        "epsilon": ({"conv": eps, "dense": eps}, None),
    }
    if name not in table:
        raise ValueError(f"composite must be one of {tuple(table)} or a Composite, got "
                         f"{name!r}")
    return composite(*table[name])


COMPOSITES = ("epsilon_gamma_box", "epsilon_plus_flat", "epsilon_plus",
              "epsilon_alpha2_beta1", "epsilon_alpha2_beta1_flat", "epsilon")


class UnsupportedError(TypeError):
    """A program LRP has no rule for (e.g. attention)."""


# ----------------------------------------------------------------------------------------
# Relevance gates: the forward value unchanged, the backward pass a relevance rule.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gate(backward, inputs, output):
    return output


def _gate_fwd(backward, inputs, output):
    return output, (inputs, output)


def _gate_bwd(backward, residuals, r):
    inputs, output = residuals
    return backward(inputs, output, r), jnp.zeros_like(output)


_gate.defvjp(_gate_fwd, _gate_bwd)


def _passing(inputs, output, r):
    """Relevance passed unchanged (activations, operations with a constant)."""
    (x,) = inputs
    return (r.astype(x.dtype),)


def _proportional(eqns, sources):
    """Zennit's Norm rule for a sum of activations, y = op(x_1, ..., x_k) (an addition,
    a sum or a sum pooling, then maybe a scaling by constants, as a mean or an average
    pooling is): R_i = x_i ⊙ vjp_i(R / y), y stabilised as Zennit stabilises the mean.

    `eqns` are the equations of op; `sources[e][j]` says where the j-th operand of
    equation e comes from: ("x", i) the i-th activation, ("c", i) the i-th constant of
    the gate's inputs, ("y",) the previous equation's output, or ("v", value) a literal.
    The gate's inputs are (activations, constants)."""
    def backward(inputs, output, r):
        xs, consts = inputs

        def op(*xs_):
            y = None
            for eqn, operands in zip(eqns, sources):
                values = [xs_[src[1]] if src[0] == "x" else consts[src[1]] if src[0] == "c"
                          else y if src[0] == "y" else src[1] for src in operands]
                y = bind(eqn, values)[0]
            return y

        cts = jax.vjp(op, *xs)[1](_divide(r, output, 1e-6))
        return (tuple(x * ct for x, ct in zip(xs, cts)),
                tuple(jnp.zeros_like(c) for c in consts))
    return backward


def _winner_takes_all(axes):
    """Max pooling written as a `reduce_max` over `axes`: R goes to the first maximum of
    each window in row-major order (as PyTorch's max pooling routes its gradient), not
    shared among ties as JAX's gradient of a max is."""
    def backward(inputs, output, r):
        (x,) = inputs
        kept = [k for k in range(x.ndim) if k not in axes]
        moved = jnp.transpose(x, kept + list(axes))
        flat = moved.reshape(moved.shape[:len(kept)] + (-1,))
        winner = jax.nn.one_hot(jnp.argmax(flat, axis=-1), flat.shape[-1], dtype=r.dtype)
        routed = (winner * r[..., None]).reshape(moved.shape)
        return (jnp.transpose(routed, np.argsort(kept + list(axes))).astype(x.dtype),)
    return backward


def _linear(rule, op):
    def backward(inputs, output, r):
        x, w, b, low, high = inputs
        zeros = jax.tree.map(jnp.zeros_like, (w, b, low, high))
        return (rule(op, x, w, b, r, low, high), *zeros)
    return backward


# ----------------------------------------------------------------------------------------
# The program interpreter.

_ACTIVATIONS = {"relu", "relu6", "leaky_relu", "elu", "celu", "selu", "gelu", "silu",
                "swish", "sigmoid", "softplus", "tanh", "hard_tanh", "hard_sigmoid",
                "hard_silu", "hard_swish", "log_sigmoid", "soft_sign", "mish"}
_ELEMENTWISE_ACTIVATIONS = {"tanh", "logistic"}
_WITH_CONSTANT = {"add", "sub", "mul", "div"}  # with one constant operand: R passes
_SUMS = {"add", "sub", "reduce_sum", "reduce_window_sum", "cumsum"}
_ROUTING = {"reshape", "transpose", "broadcast_in_dim", "squeeze", "expand_dims", "slice",
            "dynamic_slice", "gather", "pad", "concatenate", "rev", "copy", "copy_p",
            "select_n", "reduce_max", "reduce_min", "reduce_window_max", "reduce_window_min",
            "max", "min", "stop_gradient", "reduce_precision", "dynamic_update_slice",
            "sort", "argmax", "argmin", "clamp"}
_AFFINE = {"add", "sub", "mul", "div", "neg", "convert_element_type"}


# Why a product of two activations is refused.
PRODUCT = ("multiplies two activations (attention, or a gate such as squeeze-and-excitation's: "
           "AttnLRP's product rules are not implemented)")


def _inner(eqn):
    found = inner_programs(eqn)
    return found[0] if len(found) == 1 else None


def _is_var(v):
    return not isinstance(v, jex.Literal)


def _dependence(jaxpr, flags):
    """The variables of `jaxpr` that depend on the inputs flagged True."""
    dep = {v for v, f in zip(jaxpr.invars, flags) if f}
    for eqn in jaxpr.eqns:
        if any(_is_var(v) and v in dep for v in eqn.invars):
            dep.update(v for v in eqn.outvars if not isinstance(v, jex.DropVar))
    return dep


def _activation_name(eqn) -> Optional[str]:
    name = eqn.params.get("name")
    if eqn.primitive.name in CALLS and name in _ACTIVATIONS:
        return name
    if eqn.primitive.name in _ELEMENTWISE_ACTIVATIONS:
        return eqn.primitive.name
    if (eqn.primitive.name == "max" and len(eqn.invars) == 2
            and isinstance(eqn.invars[1], jex.Literal) and np.ndim(eqn.invars[1].val) == 0
            and float(eqn.invars[1].val) == 0.0):
        return "relu"
    return None


def _float(v) -> bool:
    return jnp.issubdtype(v.aval.dtype, jnp.floating)


class _FirstInput(Exception):
    """Raised by a probe run with the first linear layer's input."""

    def __init__(self, value):
        super().__init__("first linear layer reached")
        self.value = value


class _Layer(NamedTuple):
    path: str
    kind: str
    rule: Rule
    input_shape: Tuple[int, ...]
    output_shape: Tuple[int, ...]


class _Run:
    """One interpretation of a program: the state shared by its nested programs."""

    def __init__(self, composite, *, strip_root, bounds=None, probe=False, taps=None,
                 merged=False):
        self.composite = composite
        self.strip_root = strip_root
        self.bounds = bounds           # (low, high) at the first linear layer's input
        self.probe = probe             # stop at the first linear layer with its input
        self.taps = taps               # per layer (input, output) zeros to read R at
        self.merged = merged           # compute each linear layer from its merged weights
        self.layers = []               # _Layer of every linear layer met, in order

    def path(self, eqn, prefix):
        parts = [p for p in (prefix + "/" + str(eqn.source_info.name_stack)).split("/") if p]
        return "/".join(parts[1:] if self.strip_root else parts)

    def run(self, jaxpr, consts, args, flags, prefix=""):
        dep = _dependence(jaxpr, flags)
        consumers = {}
        for i, eqn in enumerate(jaxpr.eqns):
            for v in eqn.invars:
                if _is_var(v):
                    consumers.setdefault(v, []).append(i)
        outputs = {v for v in jaxpr.outvars if _is_var(v)}
        env, read = environment(jaxpr, consts, args)
        groups = {}  # the last variable of a linear layer's affine tail -> the layer
        tails = set()  # the equations merged into a linear layer: run as they are
        for i, eqn in enumerate(jaxpr.eqns):
            deps = [_is_var(v) and v in dep for v in eqn.invars]
            values = [read(v) for v in eqn.invars]
            if i in tails or not any(deps) or not any(_float(v) for v in eqn.outvars):
                outs = bind(eqn, values)  # constant, or inside a merged linear layer
            else:
                rule = _RULES.get(eqn.primitive.name, _Run.unknown)
                outs = rule(self, _Step(jaxpr, i, eqn, deps, values, dep, consumers, outputs,
                                        prefix, read, groups, tails))
            for v, value in zip(eqn.outvars, outs):
                if isinstance(v, jex.DropVar):
                    continue
                if v in groups:
                    value = self.gate(groups.pop(v), value, read)
                env[v] = value
        return [read(v) for v in jaxpr.outvars]

    def refuse(self, eqn, prefix, why):
        where = self.path(eqn, prefix) or "the model's top level"
        operation = eqn.primitive.name
        if operation == "dot_general":
            why = PRODUCT
        return UnsupportedError(f"LRP cannot propagate relevance through `{operation}` at "
                                f"{where}: it {why}. LRP here explains networks of "
                                "convolutions, Dense layers, BatchNorm, activations, "
                                "pooling and residual sums")

    # The rules, one per primitive (`_RULES`): each takes a `_Step` and returns the
    # equation's outputs, gated with their relevance rule for the backward pass.

    def unknown(self, step):
        raise self.refuse(step.eqn, step.prefix, "has no LRP rule")

    def linear_rule(self, step):
        """A convolution or x @ W, with the affine tail merged into it (BatchNorm)."""
        group = self.linear(step.jaxpr, step.i, step.eqn, step.deps, step.values, step.dep,
                            step.consumers, step.outputs, step.prefix)
        step.groups[group["end"]] = group
        step.tails.update(group["tail_index"])
        return bind(step.eqn, step.values)

    def activation_rule(self, step):
        """An elementwise activation passes relevance unchanged (the identity rule)."""
        eqn, deps = step.eqn, step.deps
        outs = bind(eqn, step.values)
        x = step.values[deps.index(True)]
        if sum(deps) != 1 or len(outs) != 1 or jnp.shape(x) != jnp.shape(outs[0]):
            raise self.refuse(eqn, step.prefix, "is an activation of several inputs")
        return [_gate(_passing, (x,), outs[0])]

    def call_rule(self, step):
        """A named activation (jax.nn.relu), a depthwise convolution
        (`xai_layers.depthwise_conv`, a linear layer), else the called program,
        interpreted."""
        if _activation_name(step.eqn) is not None:
            return self.activation_rule(step)
        if step.eqn.params.get("name") == DEPTHWISE:
            return self.linear_rule(step)
        if _inner(step.eqn) is None:
            return self.unknown(step)
        inner, inner_consts = closed(_inner(step.eqn))
        return self.run(inner, inner_consts, step.values, step.deps,
                        step.prefix + "/" + str(step.eqn.source_info.name_stack))

    def max_rule(self, step):
        """max(x, 0) is a ReLU; any other max routes relevance to where it came from."""
        if _activation_name(step.eqn) is not None:
            return self.activation_rule(step)
        return bind(step.eqn, step.values)

    def sum_rule(self, step):
        """A sum of activations, with the constant scalings after it merged."""
        outs = bind(step.eqn, step.values)
        group = self.sum(step.jaxpr, step.eqn, step.deps, step.values, step.dep,
                         step.consumers, step.outputs, step.read)
        if group["tail_index"]:  # gated at the end of its scaling
            step.tails.update(group["tail_index"])
            step.groups[group["end"]] = group
            return outs
        return [self.gate(group, outs[0], step.read)]

    def add_rule(self, step):
        """Two activations added are a sum; an activation plus a constant, a shift."""
        return (self.sum_rule if all(step.deps) else self.constant_rule)(step)

    def reduce_max_rule(self, step):
        """Max pooling: the winner takes all."""
        if len(step.eqn.invars) != 1:
            return bind(step.eqn, step.values)
        outs = bind(step.eqn, step.values)
        return [_gate(_winner_takes_all(tuple(step.eqn.params["axes"])), (step.values[0],),
                      outs[0])]

    def constant_rule(self, step):
        """An activation with a constant (added, multiplied, divided by, a cast): R passes."""
        eqn, deps, name = step.eqn, step.deps, step.eqn.primitive.name
        if sum(deps) != 1:
            raise self.refuse(eqn, step.prefix, PRODUCT if name == "mul"
                              else "divides two activations")
        if name == "div" and not deps[0]:
            raise self.refuse(eqn, step.prefix, "divides by an activation")
        outs = bind(eqn, step.values)
        x = step.values[deps.index(True)]
        if jnp.shape(x) != jnp.shape(outs[0]):
            raise self.refuse(eqn, step.prefix, "broadcasts an activation")
        return [_gate(_passing, (x,), outs[0])]

    def routing_rule(self, step):
        """Reshapes, slices, gathers and selections move relevance with the values."""
        return bind(step.eqn, step.values)

    def linear(self, jaxpr, i, eqn, deps, values, dep, consumers, outputs, prefix):
        """A linear layer: its weights, its merged affine tail and its rule."""
        name = eqn.primitive.name
        if deps != [True, False]:
            raise self.refuse(eqn, prefix, "multiplies two activations" if all(deps)
                              else "has weights that depend on the image")
        x, w = values
        if name == "dot_general":
            (lhs_contract, rhs_contract), (lhs_batch, _) = eqn.params["dimension_numbers"]
            if (lhs_batch or w.ndim != 2 or tuple(lhs_contract) != (x.ndim - 1,)
                    or tuple(rhs_contract) != (0,)):
                raise self.refuse(eqn, prefix, "is a dot_general other than x @ W")
            out_axis, w_axis = x.ndim - 1, 1
        elif name in CALLS:  # xai_layers.depthwise_conv: x NHWC, kernel (kh, kw, C)
            out_axis, w_axis = x.ndim - 1, w.ndim - 1
        else:
            if eqn.params["batch_group_count"] != 1:
                raise self.refuse(eqn, prefix, "is a convolution with batch groups")
            numbers = eqn.params["dimension_numbers"]
            out_axis, w_axis = numbers.out_spec[1], numbers.rhs_spec[0]
        # Follow the affine tail: elementwise ops with constants that only vary along the
        # output channels, each the only consumer of the one before.
        tail, tail_index, var = [], [], eqn.outvars[0]
        channels = eqn.outvars[0].aval.shape[out_axis]
        while var not in outputs and len(consumers.get(var, ())) == 1:
            nxt = jaxpr.eqns[consumers[var][0]]
            if nxt.primitive.name not in _AFFINE or len(nxt.outvars) != 1:
                break
            others = [v for v in nxt.invars if v is not var]
            if (nxt.primitive.name == "div" and nxt.invars[0] is not var) or any(
                    _is_var(v) and v in dep for v in others) or any(
                    not _per_channel(v.aval.shape, nxt.outvars[0].aval.shape, out_axis)
                    for v in others) or nxt.outvars[0].aval.shape != eqn.outvars[0].aval.shape:
                break
            tail.append(nxt)
            tail_index.append(consumers[var][0])
            var = nxt.outvars[0]
        kind = "dense" if name == "dot_general" else "conv"
        path = self.path(eqn, prefix)
        first = not self.layers
        if self.probe:
            raise _FirstInput(x)
        rule = self.composite.rule(path, kind, first)
        if isinstance(rule, ZBox) and rule.low is None and not first:
            raise ValueError(f"ZBox() takes its bounds from the model's standardisation, "
                             f"so only the first layer can have it, not {path}: give "
                             f"ZBox(low, high)")
        self.layers.append(_Layer(path, kind, rule, tuple(x.shape),
                                  tuple(eqn.outvars[0].aval.shape)))

        return {"end": var, "x": x, "w": w, "op": LinearOp(eqn, w.shape), "tail": tail,
                "rule": rule, "out_axis": out_axis, "w_axis": w_axis, "channels": channels,
                "first": first, "index": len(self.layers) - 1, "linear_out": eqn.outvars[0],
                "tail_index": tail_index}

    def sum(self, jaxpr, eqn, deps, values, dep, consumers, outputs, read):
        """A sum of activations and the scalings by constants right after it (a mean,
        an average pooling): one proportional (Norm) gate at the end."""
        eqns, sources, consts, tail_index = [eqn], [], [], []
        counter = iter(range(len(deps)))
        sources.append([("x", next(counter)) if d else ("c", self._const(consts, v))
                        for v, d in zip(values, deps)])
        var = eqn.outvars[0]
        while var not in outputs and len(consumers.get(var, ())) == 1:
            nxt = jaxpr.eqns[consumers[var][0]]
            others = [v for v in nxt.invars if v is not var]
            if (nxt.primitive.name not in ("mul", "div") or len(others) != 1
                    or (nxt.primitive.name == "div" and nxt.invars[0] is not var)
                    or _is_var(others[0]) and others[0] in dep
                    or np.size(np.zeros(others[0].aval.shape)) != 1):
                break
            src = []
            for v in nxt.invars:
                if v is var:
                    src.append(("y",))
                elif isinstance(v, jex.Literal):
                    src.append(("v", v.val))
                else:
                    src.append(("c", self._const(consts, read(v))))
            eqns.append(nxt)
            sources.append(src)
            tail_index.append(consumers[var][0])
            var = nxt.outvars[0]
        return {"end": var, "sum": True, "tail_index": tail_index,
                "backward": _proportional(tuple(eqns), tuple(map(tuple, sources))),
                "inputs": (tuple(v for v, d in zip(values, deps) if d), tuple(consts))}

    @staticmethod
    def _const(consts, value):
        consts.append(value)
        return len(consts) - 1

    def gate(self, group, value, read):
        """The layer's output with its relevance rule for the backward pass."""
        if group.get("sum"):
            return _gate(group["backward"], group["inputs"], value)
        x, w, op = group["x"], group["w"], group["op"]
        shape = value.shape
        # z = s ⊙ op(x, w) + t per output channel: t from a zero input, s from ones.
        def tail(y):
            local = {group["linear_out"]: y}
            for eqn in group["tail"]:
                vals = [local[v] if v in local else read(v) for v in eqn.invars]
                local[eqn.outvars[0]] = bind(eqn, vals)[0]
            return local[group["end"]]

        axis, c = group["out_axis"], group["channels"]
        t_full = tail(jnp.zeros(shape, value.dtype))
        s_full = tail(jnp.ones(shape, value.dtype)) - t_full
        t = jnp.moveaxis(t_full, axis, -1).reshape(-1, c)[0]
        s = jnp.moveaxis(s_full, axis, -1).reshape(-1, c)[0]
        w_shape = [1] * w.ndim
        w_shape[group["w_axis"]] = c
        merged_w = w * s.reshape(w_shape).astype(w.dtype)
        b_shape = [1] * len(shape)
        b_shape[axis] = c
        bias = jnp.broadcast_to(t.reshape(b_shape), shape).astype(value.dtype)
        if self.merged:
            value = op(x, merged_w) + bias
        low = high = jnp.zeros((), x.dtype)
        if group["first"] and self.bounds is not None:
            low, high = self.bounds
        if self.taps is not None:
            tap_in, tap_out = self.taps[group["index"]]
            x = x + tap_in
        out = _gate(_linear(group["rule"], op), (x, merged_w, bias, low, high), value)
        if self.taps is not None:
            out = out + tap_out
        return out


class _Step(NamedTuple):
    """One equation under interpretation, and the state of its program's run."""

    jaxpr: Any
    i: int                           # the equation's index
    eqn: Any
    deps: list                       # which inputs depend on the image
    values: list
    dep: set                         # every variable that depends on the image
    consumers: dict                  # variable -> indices of the equations that read it
    outputs: set                     # the program's outputs
    prefix: str                      # the module path of the enclosing call
    read: Callable
    groups: dict                     # last variable of a layer's tail -> the layer
    tails: set                       # equations merged into a layer: run as they are


# The rule for each primitive. A primitive not here is refused by name.
_RULES = {
    "conv_general_dilated": _Run.linear_rule, "dot_general": _Run.linear_rule,
    **dict.fromkeys(_ELEMENTWISE_ACTIVATIONS, _Run.activation_rule),
    **dict.fromkeys(CALLS, _Run.call_rule),
    **dict.fromkeys(_ROUTING, _Run.routing_rule),
    "max": _Run.max_rule, "reduce_max": _Run.reduce_max_rule,
    "add": _Run.add_rule, "sub": _Run.add_rule,
    **dict.fromkeys(_SUMS - {"add", "sub"}, _Run.sum_rule),
    **dict.fromkeys(("mul", "div", "neg", "convert_element_type"), _Run.constant_rule),
}


def _per_channel(shape, out_shape, axis):
    """Whether a constant of `shape` broadcast against `out_shape` varies only along
    `axis`."""
    if len(shape) == 0:
        return True
    if len(shape) != len(out_shape):
        return False
    return all(n == 1 or k == axis for k, n in enumerate(shape))


# ----------------------------------------------------------------------------------------
# Entry points.


def _program(fn, images):
    closed = jax.make_jaxpr(fn)(images)
    return closed.jaxpr, closed.consts


def _needs_bounds(composite) -> bool:
    return any(isinstance(rule, ZBox) and rule.low is None
               for _, rule in composite.first + composite.layers)


def first_layer_input(fn, images, *, strip_root=True):
    """The first linear layer's input when `fn` runs on `images`: with images of 0 and of
    1, the bounds that `ZBox()` uses."""
    jaxpr, consts = _program(fn, images)
    run = _Run(Composite(()), strip_root=strip_root, probe=True)
    try:
        run.run(jaxpr, consts, [images], [True])
    except _FirstInput as found:
        return found.value
    raise UnsupportedError("LRP needs a linear layer (a convolution or a Dense layer), and "
                           "the model's program has none")


def _run(fn, images, composite, strip_root, taps=None, merged=False):
    bounds = None
    if _needs_bounds(composite):
        bounds = (first_layer_input(fn, jnp.zeros_like(images), strip_root=strip_root),
                  first_layer_input(fn, jnp.ones_like(images), strip_root=strip_root))
    jaxpr, consts = _program(fn, images)
    run = _Run(composite, strip_root=strip_root, bounds=bounds, taps=taps, merged=merged)

    def interpreted(x):
        (out,) = run.run(jaxpr, consts, [x], [True])
        return out

    return run, interpreted


def relevance(fn, images, start, composite, *, strip_root=True):
    """LRP relevance at the image of `fn(images) -> logits`.

    start(logits) -> the output relevance (N, K), e.g. the target's logit one-hot.
    strip_root: drop the first name of each module path (a linen model's class name).
    Returns (relevance (N, H, W, C), logits (N, K)).
    """
    _, interpreted = _run(fn, images, composite, strip_root)
    logits, vjp = jax.vjp(interpreted, images)
    (r,) = vjp(start(logits).astype(logits.dtype))
    return r, logits


def layer_relevances(fn, images, start, composite, *, strip_root=True):
    """The relevance at every linear layer's input and output, in forward order:
    [(path, kind, rule, R_in, R_out)]; with `relevance`'s arguments. On a network
    without biases and with LRP-0, Σ R_in = Σ R_out at every layer."""
    run, interpreted = _run(fn, images, composite, strip_root)
    jax.eval_shape(interpreted, images)  # finds the layers and their shapes
    layers = run.layers
    taps = [(jnp.zeros(layer.input_shape, images.dtype),
             jnp.zeros(layer.output_shape, images.dtype)) for layer in layers]
    tapped, interpreted = _run(fn, images, composite, strip_root, taps=taps)

    def with_taps(x, taps_):
        tapped.taps = taps_
        return interpreted(x)

    logits, vjp = jax.vjp(with_taps, images, taps)
    _, cts = vjp(start(logits).astype(logits.dtype))
    return [(layer.path, layer.kind, layer.rule, r_in, r_out)
            for layer, (r_in, r_out) in zip(layers, cts)]


def canonical(fn, images, *, strip_root=True):
    """fn(images) computed from every linear layer's merged weights and bias (BatchNorm
    and the bias folded in), the network LRP's rules see."""
    _, interpreted = _run(fn, images, named_composite("epsilon"), strip_root, merged=True)
    return interpreted(images)


def propagate(fn, images, *, strip_root=True):
    """fn(images) through LRP's interpreter, forward only (any composite): raises
    `UnsupportedError` where LRP has no rule. Cheap under `jax.eval_shape`."""
    composite = Composite((("conv", Epsilon()), ("dense", Epsilon())))
    return _run(fn, images, composite, strip_root)[1](images)
