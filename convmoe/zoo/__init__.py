"""The model zoo: publish engine runs as Hub folders with honest model cards, index them, check them, push them.

```
runs/<recipe>[_seedN]/      convmoe train output: config, metrics.csv, checkpoints/best.pt
 └─ publish (publish.py)    best epoch per run (runs.py), exact commands (recipe_commands.py), weights and the
                            round-trip check (weights.py), FLOPs and latency (cost.py), card (card.py)
zoo/<model-id>/             config.json, model.safetensors, README.md (front matter + convmoe: metadata)
 ├─ plan.yaml               the release plan: variants, recipes, seeds, size budget (read by plan.py)
 ├─ list (listing.py)       one summary per variant (convmoe zoo list, list_variants)
 ├─ table (table.py)        zoo/README.md from every card's metadata, and the plan
 ├─ check (check.py)        schema (schema.py), weights and their sha256, from_pretrained, the plan and its
 │                          budget, index and cards up to date
 └─ push (push.py)          huggingface_hub upload, then the Hub commit recorded in the card
```

A variant loads with ``convmoe.from_pretrained("convmoe/<model-id>")`` or from its folder;
float16 weights are cast to float32 on load (:mod:`convmoe.zoo.weights`).

Example:
    >>> from convmoe.zoo import check_zoo
    >>> import tempfile
    >>> check_zoo(tempfile.mkdtemp())  # doctest: +ELLIPSIS
    ['.../README.md is not up to date; run `convmoe zoo table`.']
"""

from convmoe.zoo.card import build_front_matter, render_card, split_front_matter
from convmoe.zoo.check import check_zoo
from convmoe.zoo.datasets import DATASETS, DatasetInfo, get_dataset_info
from convmoe.zoo.listing import VariantSummary, list_variants
from convmoe.zoo.plan import PlannedVariant, ZooPlan, load_plan
from convmoe.zoo.publish import PublishResult, publish
from convmoe.zoo.push import push_variant
from convmoe.zoo.runs import RunRecord, read_run, summarize_runs
from convmoe.zoo.schema import METADATA_SCHEMA, check_variant, validate_metadata
from convmoe.zoo.table import render_index, write_index

__all__ = [
    "DATASETS",
    "METADATA_SCHEMA",
    "DatasetInfo",
    "PlannedVariant",
    "PublishResult",
    "RunRecord",
    "VariantSummary",
    "ZooPlan",
    "build_front_matter",
    "check_variant",
    "check_zoo",
    "get_dataset_info",
    "list_variants",
    "load_plan",
    "publish",
    "push_variant",
    "read_run",
    "render_card",
    "render_index",
    "split_front_matter",
    "summarize_runs",
    "validate_metadata",
    "write_index",
]
