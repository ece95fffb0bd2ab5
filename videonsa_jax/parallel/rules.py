"""Logical axis names -> mesh axes.

Model code names array axes logically (`embed`, `heads`, `mlp`, `vocab`, `layers`, ...; parameters
carry them as `out_sharding` metadata). A config holds the rules, e.g.

    rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ("layers", None))

and `logical_to_spec` turns a tuple of logical names into a `PartitionSpec`: each name takes the
mesh axes of its rule that are larger than 1, not yet used by an earlier dimension, and that divide
the dimension (axes are dropped from the end until they do; the dimension is replicated if none
do). Every logical name must have a rule (`None` = replicated), so a typo fails loudly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, str | Sequence[str] | None]]


def _rule_table(rules: Rules) -> dict[str, tuple[str, ...]]:
    table = {}
    for name, axes in rules:
        if name in table:
            raise ValueError(f"logical axis {name!r} has two sharding rules")
        table[name] = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    return table


def logical_to_spec(
    logical_axes: Sequence[str | None],
    rules: Rules,
    mesh: jax.sharding.Mesh,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """The `PartitionSpec` of an array with these logical axis names (None = replicated)."""
    table = _rule_table(rules)
    if shape is not None and len(shape) != len(logical_axes):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(
                f"logical axis {name!r} has no rule in config.sharding.rules "
                f"(add ({name!r}, None) to replicate it); rules: {sorted(table)}"
            )
        axes = [a for a in table[name] if a not in used and mesh.shape[a] > 1]
        while shape is not None and axes and shape[dim] % math.prod(mesh.shape[a] for a in axes):
            axes.pop()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*spec)


def state_shardings(tree: Any, mesh: jax.sharding.Mesh, rules: Rules) -> Any:
    """`NamedSharding`s for a tree of NNX Variables (params, optimizer moments) and plain arrays.

    A Variable is sharded by its `out_sharding` metadata; a plain array (e.g. the optimizer's step
    count) and a Variable without metadata are replicated. Works on concrete and abstract trees.
    """

    def leaf_sharding(x):
        if isinstance(x, nnx.Variable):
            axes = x.get_metadata().get("out_sharding")
            spec = logical_to_spec(axes, rules, mesh, x.shape) if axes else PartitionSpec()
            return x.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(leaf_sharding, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(
    mesh: jax.sharding.Mesh, rules: Rules, logical_axes: Sequence[str | None], shape: Sequence[int]
) -> NamedSharding:
    """The sharding of one input array whose axes have the given logical names."""
    return NamedSharding(mesh, logical_to_spec(logical_axes, rules, mesh, shape))
