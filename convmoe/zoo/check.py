"""``convmoe zoo check``: every variant against the schema, the plan and its size budget, and an index
(``zoo/README.md``) that ``convmoe zoo table`` would write unchanged.

It sits above :mod:`convmoe.zoo.schema` (one variant) and :mod:`convmoe.zoo.table` (the index),
which know nothing of each other's callers.
"""

from __future__ import annotations

from pathlib import Path

from convmoe.zoo.plan import ZooPlan, check_plan, load_plan
from convmoe.zoo.schema import CARD_NAME, check_variant, folder_bytes, require_zoo_dir, variant_folders
from convmoe.zoo.table import render_index


def check_zoo(zoo_dir: str | Path, load: bool = True, budget_bytes: int | None = None,
              plan: ZooPlan | None = None) -> list[str]:
    """Every problem of a zoo folder: each variant (:func:`~convmoe.zoo.schema.check_variant`), the
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
    budget = budget_bytes if budget_bytes is not None else (plan.budget_bytes if plan is not None else None)
    size = folder_bytes(zoo_dir)
    if budget is not None and size > budget:
        problems.append(f"{zoo_dir} holds {size / 1e6:.1f} MB, over the budget of {budget / 1e6:.0f} MB; publish "
                        "with --float16, or drop a variant.")
    index = zoo_dir / CARD_NAME
    if not plan_problems and (not index.is_file() or index.read_text(encoding="utf-8") != render_index(zoo_dir, plan)):
        problems.append(f"{index} is not up to date; run `convmoe zoo table`.")
    return problems
