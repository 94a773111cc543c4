"""Built-in plugin: the ``mlflow`` run logger (needs ``kdtoolkit[mlflow]``).

By default a local MLflow file store inside the run folder (``mlruns/``; no server, nothing
written elsewhere, MLflow's telemetry off); ``tracking_uri`` (or ``MLFLOW_TRACKING_URI``) names
another store or server. One parent run per run folder (its id kept in ``mlflow.json``, so a
resumed run, and each fold job, logs into the same one) with the recipe as parameters and the
results as metrics and artifacts; a nested run per fold and stage with a metric per epoch
(step = epoch). An epoch already logged is not logged again.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any

from kdtoolkit.fileio import atomic_write_text
from kdtoolkit.plugins.hookspec import hookimpl
from kdtoolkit.plugins.logger import RunInfo, RunLogger

STATE = "mlflow.json"
STATUS = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
BATCH = 100  # MLflow takes at most 100 params and 1000 metrics per call


def key_of(name: str) -> str:
    """An MLflow key: letters, digits, ``_ - . / space``; anything else becomes ``_``."""
    return re.sub(r"[^\w\-./ ]", "_", name)


class MlflowLogger(RunLogger):
    """MLflow tracking: ``tracking_uri`` (default ``MLFLOW_TRACKING_URI``, else a file store in
    ``mlruns/`` of the run folder) and ``experiment`` (default ``experiment.name``)."""

    requires = {"mlflow": "mlflow"}

    def __init__(self, tracking_uri: str = "", experiment: str = "") -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.client: Any = None
        self.parent = ""
        self.experiment_id = ""
        self.job: int | None = None
        self.children: dict[tuple[int, str], tuple[str, set[tuple[str, int]]]] = {}

    def start(self, run: RunInfo) -> None:
        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
        if not uri:
            uri = (run.run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # before mlflow is imported
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = client = MlflowClient(tracking_uri=uri)
        self.job = run.job
        name = self.experiment or run.name
        found = client.get_experiment_by_name(name)
        experiment = found.experiment_id if found else client.create_experiment(name)
        self.experiment_id = experiment
        state_path = run.run_dir / STATE
        state = json.loads(state_path.read_text()) if state_path.exists() else {}
        parent = None
        if state.get("tracking_uri") == uri and state.get("run_id"):
            try:
                parent = client.get_run(state["run_id"])
            except Exception:  # deleted, or another store: a new parent run
                parent = None
        if parent is None:
            parent = client.create_run(experiment, run_name=name, tags={"kd.digest": run.digest})
            state = {"tracking_uri": uri, "run_id": parent.info.run_id}
            atomic_write_text(state_path, json.dumps(state))
        elif run.job is None:
            client.update_run(parent.info.run_id, status="RUNNING")
        self.parent = parent.info.run_id
        have = parent.data.params
        params = [
            Param(key_of(k), str(v)[:6000])
            for k, v in run.params.items()
            if key_of(k) not in have  # a parameter once logged cannot change
        ]
        for i in range(0, len(params), BATCH):
            client.log_batch(self.parent, params=params[i : i + BATCH])

    def child(self, fold: int, stage: str) -> tuple[str, set[tuple[str, int]]]:
        """The nested run of ``fold``/``stage`` and the (metric, step) pairs it holds."""
        key = (fold, stage)
        if key in self.children:
            return self.children[key]
        client, tag = self.client, f"fold_{fold}/{stage}"
        query = f"tags.`kd.stage` = '{tag}' and tags.`mlflow.parentRunId` = '{self.parent}'"
        found = client.search_runs([self.experiment_id], filter_string=query, max_results=1)
        logged: set[tuple[str, int]] = set()
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            for metric in found[0].data.metrics:
                logged |= {(metric, m.step) for m in client.get_metric_history(run_id, metric)}
        else:
            tags = {"mlflow.parentRunId": self.parent, "kd.stage": tag, "kd.fold": str(fold)}
            run_id = client.create_run(
                self.experiment_id, run_name=f"fold {fold} {stage}", tags=tags
            ).info.run_id
        self.children[key] = (run_id, logged)
        return self.children[key]

    def log_epoch(self, fold: int, stage: str, epoch: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        run_id, logged = self.child(fold, stage)
        now = int(time.time() * 1000)
        keys = {key_of(k): v for k, v in scalars.items()}
        metrics = [Metric(k, v, now, epoch) for k, v in keys.items() if (k, epoch) not in logged]
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)
        logged |= {(m.key, epoch) for m in metrics}

    def log_results(self, metrics: dict[str, float], results: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(key_of(k), v, now, 0) for k, v in metrics.items()]
        for i in range(0, len(rows), BATCH * 10):
            self.client.log_batch(self.parent, metrics=rows[i : i + BATCH * 10])

    def log_artifacts(self, paths: list) -> None:
        for path in paths:
            folder = "figures" if path.suffix == ".png" else None
            self.client.log_artifact(self.parent, str(path), artifact_path=folder)

    def close(self, status: str) -> None:
        if self.client is None:
            return
        for run_id, _ in self.children.values():
            self.client.set_terminated(run_id, STATUS.get(status, "FAILED"))
        if self.job is None:
            self.client.set_terminated(self.parent, STATUS.get(status, "FAILED"))
        self.children = {}


@hookimpl
def kd_register_loggers(registry):
    registry.register("mlflow", MlflowLogger)
