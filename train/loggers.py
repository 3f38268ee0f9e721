"""Loggers whose files a resumed run continues (conf/logger/csv.yaml, tensorboard.yaml).

A run resumes in its own directory (``resume=auto``), often from a checkpoint older than the last step it
logged: a crash, an OOM or a SIGKILL lands between checkpoints. Lightning's CSVLogger started a new
``version_<n>/metrics.csv`` at every launch (one run's curve in several files), and TensorBoard showed the
steps between the checkpoint and the crash twice. Here one file holds the run, and the first step a launch
logs first drops what the file holds at or after it (CSV: the rows are rewritten; TensorBoard: a
``SessionLog.START`` event at that step, the marker TensorBoard purges later steps of earlier files by, as
``SummaryWriter(purge_step=...)`` writes it).
"""

from __future__ import annotations

import csv
import os
from typing import Any

from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment


class _ContinuedWriter(ExperimentWriter):
    """Lightning's CSV writer, appending to an existing metrics.csv (Lightning deletes it) under its header."""

    def __init__(self, log_dir: str) -> None:
        self._continued = False
        super().__init__(log_dir)
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])

    def _check_log_dir_exists(self) -> None:  # (Lightning's removes metrics.csv)
        pass

    def log_metrics(self, metrics_dict: dict[str, float], step: int | None = None) -> None:
        if not self._continued and step is not None and self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                rows = list(csv.DictReader(f))
            kept = [r for r in rows if r.get("step") in (None, "") or float(r["step"]) < step]
            if len(kept) < len(rows):  # steps this launch logs again: dropped, as a resume replays them
                with self._fs.open(self.metrics_file_path, "w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
                    writer.writeheader()
                    writer.writerows(kept)
        self._continued = True
        super().log_metrics(metrics_dict, step)


class ContinuedCSVLogger(CSVLogger):
    """``<save_dir>/<name>/<version>/metrics.csv`` (default ``csv/run``), one file for every launch of a run."""

    def __init__(self, save_dir: str, name: str = "csv", version: str = "run", **kwargs: Any) -> None:
        super().__init__(save_dir, name=name, version=version, **kwargs)

    @property
    @rank_zero_experiment  # (as Lightning's: the other ranks get a stand-in that writes nothing)
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedWriter(log_dir=self.log_dir)
        return self._experiment


class ContinuedTensorBoardLogger(TensorBoardLogger):
    """TensorBoardLogger whose first logged step, in a launch that continues a run's event files, marks the
    steps at or after it in the earlier files as replaced."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # (before this launch writes any: its own writer is created at the first use)
        self._purge = os.path.isdir(self.log_dir) and any(
            n.startswith("events.out.tfevents") for n in os.listdir(self.log_dir)
        )

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self._purge and step is not None:
            self._purge = False
            writer = self.experiment
            if type(writer).__module__.startswith("tensorboardX"):
                from tensorboardX.proto.event_pb2 import Event, SessionLog
            else:
                from tensorboard.compat.proto.event_pb2 import Event, SessionLog
            events = writer._get_file_writer()
            events.add_event(Event(step=int(step), file_version="brain.Event:2"))
            events.add_event(Event(step=int(step), session_log=SessionLog(status=SessionLog.START)))
        super().log_metrics(metrics, step)
