"""TorchServe handler for unhans archives: a thin adapter over the serving core (:mod:`unhans.handlers.service`).

Each HTTP request is one row of TorchServe's batch (``service_envelope`` must stay unset: the handler speaks KServe
v1 and v2 itself). The adapter hands the rows to the core with their headers, request ids and whether the endpoint
asked for relevance (TorchServe's ``explain`` header: ``/explanations``, ``:explain``, ``/v2/.../explain``), sets each
answer's status, and reports the core's metrics through TorchServe's (declared in the archive's metrics.yaml).
"""

from __future__ import annotations

from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from unhans.core.serving import METRICS
from unhans.handlers.service import Row, Service

METRIC_TYPES = {"counter": MetricTypes.COUNTER, "histogram": MetricTypes.HISTOGRAM}


class UnhansHandler(BaseHandler):
    def initialize(self, context):
        self.context = context
        self.service = Service(context.system_properties["model_dir"], metric=self._metric)
        self.initialized = True

    def handle(self, data, context):
        self.context = context
        rows = []
        for i, row in enumerate(data):
            headers = {str(k).lower(): str(v) for k, v in (context.get_all_request_header(i) or {}).items()}
            rows.append(Row(row.get("data") if row.get("data") is not None else row.get("body"), str(context.get_request_id(i) or ""),
                            explain=headers.get("explain", "").lower() == "true", headers=headers))
        answers = self.service.answer(rows)
        for i, answer in enumerate(answers):
            if answer.status != 200:
                context.set_response_status(answer.status, answer.problem, idx=i)
        return [answer.body for answer in answers]

    def _metric(self, name: str, value: float, **labels) -> None:
        metric = METRICS[name]
        self.context.metrics.add_metric(name, value, metric.unit, dimensions=[Dimension(k, v) for k, v in labels.items()],
                                        metric_type=METRIC_TYPES[metric.kind])
