"""Where metrics go: a CSV file (one row per epoch) and TensorBoard when it is installed."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any


class CSVLogger:
    """Rows of metrics in ``path``; the file is rewritten on each row, so columns may appear later.

    Args:
        path: The CSV file.
        keep_until_epoch: On resume, keep the rows already in the file with ``epoch`` below this.

    Example:
        >>> import tempfile, os
        >>> logger = CSVLogger(os.path.join(tempfile.mkdtemp(), "metrics.csv"))
        >>> logger.log({"epoch": 0, "train/loss": 1.5}); logger.log({"epoch": 1, "val/miou": 0.5})
        >>> open(logger.path).read().splitlines()
        ['epoch,train/loss,val/miou', '0,1.5,', '1,,0.5']
    """

    def __init__(self, path: str | Path, keep_until_epoch: int | None = None) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        if keep_until_epoch is not None and self.path.is_file():
            with open(self.path, newline="") as f:
                self.rows = [row for row in csv.DictReader(f) if int(row["epoch"]) < keep_until_epoch]

    def log(self, row: dict[str, Any]) -> None:
        """Append a row and rewrite the file."""
        self.rows.append(dict(row))
        columns = list(dict.fromkeys(key for r in self.rows for key in r))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)


class TensorBoardLogger:
    """Scalars to TensorBoard event files in ``log_dir``, or nothing (with a one-line notice) when
    the ``tensorboard`` package is not installed.

    Example:
        >>> import tempfile
        >>> logger = TensorBoardLogger(tempfile.mkdtemp(), notice=False)
        >>> logger.log({"train/loss": 0.5}, step=1); logger.close()
    """

    def __init__(self, log_dir: str | Path, notice: bool = True) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.writer = None
            if notice:
                print("TensorBoard logging skipped: the tensorboard package is not installed (pip install tensorboard).")
            return
        self.writer = SummaryWriter(log_dir=str(log_dir))

    @property
    def enabled(self) -> bool:
        """Whether events are written."""
        return self.writer is not None

    def log(self, scalars: dict[str, Any], step: int) -> None:
        """Write every finite number in ``scalars`` at ``step``."""
        if self.writer is None:
            return
        for name, value in scalars.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if self.writer is not None:
            self.writer.close()
