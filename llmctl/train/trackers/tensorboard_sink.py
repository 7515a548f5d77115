"""TensorBoard: runs/<run>/tensorboard/, written with TensorBoard's own event-file writer (no torch,
no TensorFlow), so `tensorboard --logdir runs/<run>/tensorboard` (or `--logdir runs`) shows it.

Figures go out as they are heard, each flushed at once, so a SIGKILL loses nothing written before
it. Each session's event file starts with a SessionLog START; a resumed run's is at the step after
its checkpoint, and TensorBoard's readers drop what earlier files hold from that step on (the steps
the resumed run redoes; the data server also drops a tag's points as the same steps come again), so
each step is shown once, with the values that count.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from llmctl.events import EndReason
from llmctl.storage import atomic_dir
from llmctl.train.trackers.base import Sink, Target
from llmctl.train.trackers.history import flatten, read_config, start_fields

DIRNAME = "tensorboard"
HPARAM_METRICS = ("eval/val_loss", "train/loss")  # what the HParams dashboard sets beside the config


def _event_files(logdir: Path) -> list[Path]:
    return sorted(logdir.glob("events.out.tfevents.*")) if logdir.is_dir() else []


class TensorBoardSink(Sink):
    name = "tensorboard"
    title = "TensorBoard"

    def __init__(self, target: Target):
        super().__init__(target)
        self.logdir = target.run_dir / DIRNAME
        self.writer: Any = None
        self.fresh = True

    def load(self) -> None:
        import tensorboard.summary.writer.event_file_writer  # noqa: F401

    # ------------------------------------------------------------ the run

    def open(self, start: dict[str, Any]) -> None:
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.fresh = not _event_files(self.logdir)
        self.writer = EventFileWriter(str(self.logdir), flush_secs=10)
        step = int(start.get("step", 0))
        # A session's START: readers take the first in a directory as its beginning, and each later
        # one as a restart that drops what earlier files hold from its step on: the resumed run
        # redoes the steps after its checkpoint.
        session = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
        restart = not self.fresh and start.get("resumed")
        self._write(
            event_pb2.Event(wall_time=_ts(start), step=step + 1 if restart else step, session_log=session)
        )
        if self.fresh:
            self._write_hparams(start)
        fields = start_fields(start)
        rows = "\n".join(f"| {key} | {value} |" for key, value in fields.items() if value is not None)
        title = "resumed" if start.get("resumed") else "started"
        self._text("run", step, _ts(start), f"{title} at step {step}\n\n| | |\n|---|---|\n{rows}")

    def wants_history(self) -> bool:
        return self.fresh  # a directory that already holds the earlier sessions keeps them

    def scalars(self, step: int, ts: float, values: dict[str, float]) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        summary = summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=tag, simple_value=value) for tag, value in values.items()]
        )
        self._write(event_pb2.Event(wall_time=ts, step=step, summary=summary))

    def checkpoint(self, record: dict[str, Any]) -> None:
        best = " · best" if record.get("best") else ""
        val = f" · val_loss {record['val_loss']}" if record.get("val_loss") is not None else ""
        self._text("checkpoints", int(record["step"]), _ts(record), f"`{record.get('path')}`{best}{val}")

    def text(self, record: dict[str, Any]) -> None:
        step, ts = int(record["step"]), _ts(record)
        if record["event"] == "sample":
            self._text("samples", step, ts, f"```\n{record.get('prompt', '')}{record.get('text', '')}\n```")
        else:
            level, kind = record.get("level", "warning"), record.get("kind", "")
            self._text("alerts", step, ts, f"**{level}** `{kind}`: {record.get('message', '')}")

    def ended(self, record: dict[str, Any]) -> None:
        extra = f" · {record['message']}" if record.get("message") else ""
        self._text("end", int(record["step"]), _ts(record), f"{record.get('reason')}{extra}")

    def finish(self, end: dict[str, Any] | None) -> None:
        if end is not None:
            self._write_session_end(end)
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def abandon(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.close()

    def where(self) -> str:
        return str(self.target.run_dir / DIRNAME)

    def rebuild(self, history: list[dict[str, Any]]) -> str:
        """A fresh directory from the history, renamed over the old one only once it is whole."""
        with atomic_dir(self.target.run_dir / DIRNAME, overwrite=True) as staging:
            self.logdir = staging
            super().rebuild(history)
        self.logdir = self.target.run_dir / DIRNAME
        return self.where()

    # ------------------------------------------------------------ writing

    def _write(self, event: Any) -> None:
        self.writer.add_event(event)
        self.writer.flush()  # written through at once: a SIGKILL must not take back what was heard

    def _text(self, tag: str, step: int, ts: float, markdown: str) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
        from tensorboard.plugins.text import metadata

        tensor = tensor_pb2.TensorProto(
            dtype=types_pb2.DT_STRING,
            string_val=[markdown.encode("utf-8")],
            tensor_shape=tensor_shape_pb2.TensorShapeProto(),
        )
        value = summary_pb2.Summary.Value(
            tag=tag,
            metadata=metadata.create_summary_metadata(display_name=tag, description=""),
            tensor=tensor,
        )
        self._write(event_pb2.Event(wall_time=ts, step=step, summary=summary_pb2.Summary(value=[value])))

    def _write_hparams(self, start: dict[str, Any]) -> None:
        """The resolved config as the HParams dashboard's hyperparameters, beside the val and train loss."""
        from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

        hparams = {
            key: value
            for key, value in flatten(read_config(self.target.run_dir)).items()
            if value is not None and value != [] and value != {}
        }
        session = plugin_data_pb2.SessionStartInfo(
            start_time_secs=_ts(start), group_name=self.target.group or ""
        )
        for key, value in hparams.items():
            if isinstance(value, bool):
                session.hparams[key].bool_value = value
            elif isinstance(value, (int, float)):
                session.hparams[key].number_value = value
            else:
                session.hparams[key].string_value = str(value)
        experiment = api_pb2.Experiment(
            hparam_infos=[api_pb2.HParamInfo(name=key) for key in hparams],
            metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag)) for tag in HPARAM_METRICS],
        )
        from tensorboard.plugins.hparams import metadata

        self._write_plugin(metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=experiment))
        self._write_plugin(
            metadata.SESSION_START_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_start_info=session)
        )

    def _write_session_end(self, end: dict[str, Any]) -> None:
        from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

        reason = str(end.get("reason"))
        completed = reason in {r.value for r in EndReason if r.completed or r is EndReason.PRUNED}
        status = api_pb2.STATUS_SUCCESS if completed else api_pb2.STATUS_FAILURE
        info = plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=_ts(end))
        self._write_plugin(
            metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=info)
        )

    def _write_plugin(self, tag: str, data: Any) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.plugins.hparams import metadata

        value = summary_pb2.Summary.Value(
            tag=tag, metadata=metadata.create_summary_metadata(data), tensor=metadata.NULL_TENSOR
        )
        self._write(
            event_pb2.Event(wall_time=time.time(), step=0, summary=summary_pb2.Summary(value=[value]))
        )


def _ts(record: dict[str, Any]) -> float:
    return float(record.get("ts") or time.time())


SINK = TensorBoardSink
