"""``convmoe zoo check``: every variant against the schema, the plan and its size budget, and an index
(``zoo/README.md``) that ``convmoe zoo table`` would write unchanged.

It sits above :mod:`convmoe.zoo.schema` (one variant) and :mod:`convmoe.zoo.table` (the index),
which know nothing of each other's callers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from convmoe.zoo.listing import read_metadata
from convmoe.zoo.plan import ZooPlan, check_plan, load_plan
from convmoe.zoo.schema import (
    CARD_NAME,
    check_variant,
    folder_bytes,
    is_dense_variant,
    require_zoo_dir,
    variant_folders,
)
from convmoe.zoo.table import render_index


def _same_numbers(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return a.keys() == b.keys() and all(math.isclose(a[k], b[k], rel_tol=1e-9, abs_tol=1e-12) for k in a)


def link_problems(metas: Sequence[Mapping[str, Any]], planned: set[str] = frozenset()) -> list[str]:
    """Problems of the links between MoE variants and their dense twins published as variants.

    An MoE card's ``dense_model_id`` and a dense card's ``moe_model_ids`` must point at each other,
    and the dense card's seeds and metrics must be the ``dense_twin`` numbers of each MoE card. A
    link to a variant not in the zoo is a problem unless the plan has it (``planned``).

    Example:
        >>> from convmoe.zoo.card import EXAMPLE_META
        >>> link_problems([{**EXAMPLE_META, "dense_model_id": "tiny-dense"}])
        ['tiny-moe names its dense twin tiny-dense, which is neither in the zoo nor planned.']
    """
    by_id = {meta["model_id"]: meta for meta in metas}
    problems = []
    for meta in metas:
        model_id, dense = meta["model_id"], is_dense_variant(meta)
        if dense:
            links = meta.get("moe_model_ids", [])
        else:
            links = [meta["dense_model_id"]] if "dense_model_id" in meta else []
        what = "an MoE variant" if dense else "its dense twin"
        for other_id in links:
            other = by_id.get(other_id)
            if other is None:
                if other_id not in planned:
                    problems.append(f"{model_id} names {what} {other_id}, which is neither in the zoo nor planned.")
                continue
            points_back = (other.get("dense_model_id") == model_id if dense
                           else model_id in other.get("moe_model_ids", []))
            if not points_back or is_dense_variant(other) == dense:
                flag = "--dense-model-id" if dense else "--twin-of"
                problems.append(f"{model_id} names {what} {other_id}, which does not name {model_id} back; publish "
                                f"{other_id} with {flag} {model_id}.")
            elif dense:
                twin = other.get("dense_twin") or {}
                if twin.get("seeds") != meta["seeds"] or not _same_numbers(twin.get("metrics") or {}, meta["metrics"]):
                    problems.append(f"{model_id} holds seeds {meta['seeds']} and metrics {meta['metrics']}, but the "
                                    f"dense twin in {other_id}'s card holds {twin.get('seeds')} and "
                                    f"{twin.get('metrics')}; publish both from the same dense runs.")
    return problems


def check_zoo(zoo_dir: str | Path, load: bool = True, budget_bytes: int | None = None,
              plan: ZooPlan | None = None) -> list[str]:
    """Every problem of a zoo folder: each variant (:func:`~convmoe.zoo.schema.check_variant`), the
    links between MoE variants and their published dense twins (:func:`link_problems`), the
    plan (``plan.yaml``: recipes exist, datasets known), the size budget, and an index
    (``zoo/README.md``) that ``convmoe zoo table`` would write unchanged.

    Args:
        zoo_dir: The zoo folder.
        load: Also load each variant with ``convmoe.from_pretrained``.
        budget_bytes: Bytes the folder may hold; default the plan's ``budget_bytes`` (no budget
            without a plan).
        plan: The release plan; default ``zoo_dir/plan.yaml`` if there is one.

    Raises:
        FileNotFoundError: ``zoo_dir`` does not exist (:func:`~convmoe.zoo.schema.require_zoo_dir`).

    Example:
        >>> import tempfile
        >>> check_zoo(tempfile.mkdtemp())  # doctest: +ELLIPSIS
        ['.../README.md is not up to date; run `convmoe zoo table`.']
    """
    zoo_dir = require_zoo_dir(zoo_dir)
    problems = [problem for folder in variant_folders(zoo_dir) for problem in check_variant(folder, load=load)]
    try:
        plan = load_plan(zoo_dir) if plan is None else plan
    except ValueError as error:
        return [*problems, str(error)]
    plan_problems = check_plan(plan) if plan is not None else []
    problems += plan_problems
    planned = {v.model_id for v in (*plan.variants, *plan.dense_variants())} if plan is not None else set()
    problems += link_problems([front["convmoe"] for front in read_metadata(zoo_dir)], planned)
    budget = budget_bytes if budget_bytes is not None else (plan.budget_bytes if plan is not None else None)
    size = folder_bytes(zoo_dir)
    if budget is not None and size > budget:
        problems.append(f"{zoo_dir} holds {size / 1e6:.1f} MB, over the budget of {budget / 1e6:.0f} MB; publish "
                        "with --float16, or drop a variant.")
    index = zoo_dir / CARD_NAME
    if not plan_problems and (not index.is_file() or index.read_text(encoding="utf-8") != render_index(zoo_dir, plan)):
        problems.append(f"{index} is not up to date; run `convmoe zoo table`.")
    return problems
