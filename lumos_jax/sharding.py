"""Device mesh and logical-axis sharding.

Parameters and key activations carry *logical* axis names ("embed", "q_heads", ...).
A list of rules, held in gin, maps each logical name to mesh axes ("data", "fsdp",
"tensor"). Code never names mesh axes directly: change the rules, not the model.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterable, Sequence

import gin
import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Default rules: FSDP shards the embedding dimension of weights, tensor parallelism
# shards heads / mlp / vocab, the batch is split over data x fsdp.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("act_embed", None),
    ("vocab", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),  # stacked decoder layers: scanned over, never split across devices
    ("cache_batch", ("data", "fsdp")),
    ("cache_length", None),
    ("cache_kv_heads", "tensor"),
)

_active_rules: list[tuple[tuple[str, Any], ...]] = []


@gin.configurable
def logical_axis_rules(rules: Sequence[Sequence[Any]] = DEFAULT_RULES) -> tuple:
    """The logical → mesh axis rules (bind `logical_axis_rules.rules` in gin)."""
    out = []
    for rule in rules:
        if len(rule) != 2:
            raise ValueError(f"logical axis rule must be (logical_name, mesh_axes), got {rule!r}")
        name, target = rule
        if isinstance(target, list):
            target = tuple(target)
        for axis in (target if isinstance(target, tuple) else (target,)):
            if axis is not None and axis not in MESH_AXES:
                raise ValueError(f"logical axis rule {name!r} names unknown mesh axis {axis!r}; "
                                 f"mesh axes are {MESH_AXES}")
        out.append((name, target))
    return tuple(out)


@gin.configurable
def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh; one size may be -1 meaning "the rest"."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    n = len(devices)
    if sizes.count(-1) > 1:
        raise ValueError(f"make_mesh: at most one axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes) or n % known:
        raise ValueError(f"make_mesh: data={data} fsdp={fsdp} tensor={tensor} does not divide "
                         f"the {n} available devices")
    sizes = [n // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != n:
        raise ValueError(f"make_mesh: data*fsdp*tensor = {math.prod(sizes)} but there are {n} devices")
    auto = (jax.sharding.AxisType.Auto,) * 3
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=auto, devices=devices)


@contextlib.contextmanager
def axis_rules(rules: Iterable | None = None):
    """Activate logical rules (for activation constraints inside jitted code)."""
    _active_rules.append(logical_axis_rules(rules) if rules is not None else logical_axis_rules())
    try:
        yield
    finally:
        _active_rules.pop()


def current_rules() -> tuple:
    return _active_rules[-1] if _active_rules else logical_axis_rules()


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None, rules=None) -> PartitionSpec:
    """Map logical names to a PartitionSpec. A dimension not divisible by its mesh
    axes is replicated (e.g. a 32,001-row vocabulary over tensor=2); a mesh axis is
    used at most once per array."""
    rules = dict(rules if rules is not None else current_rules())
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        target = rules.get(name) if name is not None else None
        axes = target if isinstance(target, tuple) else ((target,) if target else ())
        axes = tuple(a for a in axes if a not in used)
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
            if shape is not None and axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
                axes = ()
        used.update(axes)
        spec.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
    return PartitionSpec(*spec)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical names; a no-op outside a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh))


def param_logical_axes(state) -> Any:
    """Pytree (like an nnx.State of Params) → pytree of logical-name tuples."""
    def names(v):
        if isinstance(v, nnx.Variable):
            return v.get_metadata().get("logical_axes") or (None,) * np.ndim(v.get_value())
        return (None,) * np.ndim(v)

    return jax.tree.map(names, state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def state_shardings(state, mesh: Mesh, rules=None):
    """NamedShardings for every Variable in an nnx.State, from its logical axes."""
    def one(v):
        value = v.get_value() if isinstance(v, nnx.Variable) else v
        names = (v.get_metadata().get("logical_axes") if isinstance(v, nnx.Variable) else None)
        names = names or (None,) * np.ndim(value)
        return NamedSharding(mesh, logical_to_spec(names, np.shape(value), mesh, rules))

    return jax.tree.map(one, state, is_leaf=lambda v: isinstance(v, nnx.Variable))
