"""TorchServe handler: a thin BaseHandler subclass. Everything it knows about the model comes from meta.json
(ReleaseMeta); everything it does is in skinmodel/, which the .mar carries as a folder beside this file.

Each request in a batch is validated on its own: a bad one gets its own 4xx and JSON reason, the others in
the same batch are answered normally. Every answer, good or bad, is appended to the audit spool
(SKIN_SPOOL_DIR) for the logger sidecar; the handler never talks to a database.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time

import torch
from ts.torch_handler.base_handler import BaseHandler

from skinmodel.answers import format_error, format_prediction
from skinmodel.audit import EventSpool, make_event
from skinmodel.gradcam import MAX_SIDE, grad_cam, overlay_png
from skinmodel.inputs import DECODE_CPU_BUDGET_S, cpu_budget
from skinmodel.networks import (build_model, check_inputs, dermoscopy_check_score, features_and_logits,
                               load_check_statistics, load_state_dict_file, validate_check_statistics)
from skinmodel.payload import extract_image_bytes
from skinmodel.preprocessing import InputError, decode_image, preprocess_bytes_and_colour
from skinmodel.release import ReleaseMeta
from skinmodel.review_store import CLIENT_HEADER, REVIEWED_VERDICTS, ReviewStore

logger = logging.getLogger(__name__)


class SkinLesionHandler(BaseHandler):
    instances = False  # rows are KServe v1 instances (set in initialize from TS_SERVICE_ENVELOPE)
    decode_budget_s = DECODE_CPU_BUDGET_S  # CPU seconds per image, bytes to tensor: over it, 422 decode_budget

    def initialize(self, context):
        model_dir = context.system_properties.get("model_dir")
        self.manifest = context.manifest
        self.meta = ReleaseMeta.load(model_dir)
        self.cfg = self.meta.preprocessing
        self.temperature = self.meta.temperature
        self.device = torch.device("cpu")
        weights = os.path.join(model_dir, self.meta.weights_file)
        with open(weights, "rb") as f:
            self.weights_sha256 = hashlib.sha256(f.read()).hexdigest()
        self.model = build_model(self.meta.arch, self.meta.num_classes)
        self.model.load_state_dict(load_state_dict_file(weights))
        self.model.eval()
        self.check_stats = None  # the dermoscopy check's statistics (in older folders formerly ood_stats.pt)
        stats_path = self.meta.check_stats_path(model_dir)
        if stats_path is not None:
            self.check_stats = load_check_statistics(stats_path)
            validate_check_statistics(self.check_stats, self.model.fc.in_features)  # at load, not per batch
        self.spool = EventSpool.from_env()
        self.review = ReviewStore.from_env()  # off unless SKIN_REVIEW_KEEP_DAYS > 0
        # Under KServe's TorchServe runtime the rows are v1 instances ({"data": "<base64>"}): the runtime sets
        # the envelope through this variable (config.properties: enable_envvars_config=true).
        self.instances = os.environ.get("TS_SERVICE_ENVELOPE") in ("kserve", "kservev2")
        self.initialized = True
        logger.info("loaded %s %s (%s, %d px, T=%.3f, spool %s)", self.meta.name, self.meta.version,
                    self.meta.arch, self.cfg.crop_size, self.temperature, self.spool.directory or "off")

    def handle(self, data, context):
        self._started, self._rows = time.perf_counter(), data
        return super().handle(data, context)

    def preprocess(self, data):
        """-> ((stacked tensor of the valid images, their colour statistics) or None, per request: (row in the
        tensor or InputError, image facts))."""
        tensors, colours, slots = [], [], []
        for row in data:
            image = {}
            try:
                payload = extract_image_bytes(row, self.instances)
                image.update(sha256=hashlib.sha256(payload).hexdigest(), bytes=len(payload))
                with cpu_budget(self.decode_budget_s):
                    tensor, colour = preprocess_bytes_and_colour(payload, self.cfg, image)
                tensors.append(tensor)
                colours.append(colour)
                slots.append((len(tensors) - 1, image))
            except InputError as err:
                slots.append((err, image))
            except Exception:  # noqa: BLE001 - an unforeseen decoder failure must not fail the whole batch
                logger.exception("unexpected error while preprocessing one request")
                slots.append((InputError(422, "unprocessable_image", "the image could not be processed"), image))
        return ((torch.stack(tensors), torch.stack(colours)) if tensors else None), slots

    def inference(self, batch, *args, **kwargs):
        """The one decision, for predictions and explanations alike: calibrated probabilities and the dermoscopy
        check's score the verdict is made of."""
        inputs, slots = batch
        tensor, colour = inputs if inputs is not None else (None, None)
        self._tensor = tensor  # Grad-CAM reruns an explained image with gradients
        if tensor is None:
            return None, slots
        with torch.inference_mode():
            feats, logits = features_and_logits(self.model, tensor)
            probabilities = torch.softmax(logits / self.temperature, dim=1)
            scores = (dermoscopy_check_score(check_inputs(feats, colour), self.check_stats).tolist()
                      if self.check_stats is not None and feats is not None else [None] * len(tensor))
        return (probabilities, scores), slots

    def postprocess(self, output):
        """Answers and audit events for a batch. TorchServe batches /predictions and /explanations requests
        together and BaseHandler picks one path by the first request's "explain" header, so the kind is read
        per request here: an explanation gets the same answer plus its heat map, whichever request led."""
        (probabilities, scores), slots = output if output[0] is not None else ((None, None), output[1])
        answers, events = [], []
        for idx, (slot, image) in enumerate(slots):
            request_id = self.context.get_request_id(idx) if self.context else None
            kind = "explanation" if self._explanation_requested(idx) else "prediction"
            if self.context:
                self.context.set_response_content_type(idx, "application/json")
            if not isinstance(slot, InputError):
                probs = probabilities[slot].tolist()
                answer = format_prediction(probs, self.meta, request_id, scores[slot])
                try:
                    if kind == "explanation":
                        self._add_heat_map(idx, slot, answer)
                except InputError as err:
                    slot = err
                except Exception:  # noqa: BLE001 - one failed heat map must not fail the predictions batched with it
                    logger.exception("unexpected error while explaining one request")
                    slot = InputError(500, "server_error", "the heat map could not be computed")
                else:
                    rows = getattr(self, "_rows", None)  # set by handle(): absent when called in-process
                    if answer["verdict"] in REVIEWED_VERDICTS and self.review.enabled and rows is not None:
                        self.review.keep(image["sha256"], extract_image_bytes(rows[idx], self.instances),
                                         image.get("format"), self._request_header(idx, CLIENT_HEADER))
                    answers.append(answer)
                    events.append(make_event(request_id, self.meta, self.weights_sha256, image, self._latency_ms(),
                                             probs, answer=answer, kind=kind))
                    continue
            if self.context and not self.instances:  # KServe's wrapper makes any non-200 its own 500: the
                self.context.set_response_status(slot.status, slot.reason, idx)  # answer carries the status
            answers.append(format_error(slot, request_id))
            events.append(make_event(request_id, self.meta, self.weights_sha256, image, self._latency_ms(),
                                     error=slot, kind=kind))
        self.spool.append(events)
        return answers

    @classmethod
    def in_process(cls, release) -> "SkinLesionHandler":
        """The handler outside TorchServe (./skin predict --local, training evaluate --release): the same model,
        preprocessing, temperature and verdicts; nothing goes to the audit trail or the review folder."""
        import types

        handler = cls()
        handler.initialize(types.SimpleNamespace(system_properties={"model_dir": str(release)}, manifest={"model": {}}))
        handler.spool, handler.review = EventSpool(None), ReviewStore(None)
        return handler

    def answer(self, blobs: list[bytes]) -> list[dict]:
        """Answers to image files, as /predictions gives them, in one batch (in-process use)."""
        return self.postprocess(self.inference(self.preprocess([{"body": b} for b in blobs])))

    def explain_handle(self, data_preprocess, raw_data):
        """POST /explanations/<model> leading a batch: the one path above decides per request."""
        return self.postprocess(self.inference(data_preprocess))

    def _explanation_requested(self, idx: int) -> bool:
        return self._request_header(idx, "explain") == "True"

    def _request_header(self, idx: int, name: str) -> str | None:
        """A header of request idx, whatever case the frontend kept its name in."""
        headers = (self.context.get_all_request_header(idx) if self.context else None) or {}
        return next((v for k, v in headers.items() if k.lower() == name.lower()), None)

    def _latency_ms(self) -> float:  # up to this answer, its heat map included
        return (time.perf_counter() - getattr(self, "_started", time.perf_counter())) * 1000

    def _add_heat_map(self, idx: int, slot: int, answer: dict) -> None:
        """A Grad-CAM overlay (PNG, base64) of the upload, unless the image was refused. A JSON body may name
        the class to explain: {"data": "<base64>", "target": "mel"}."""
        import base64

        if answer["verdict"] == "not_dermoscopy":
            return  # nothing to explain: the same refusal /predictions gives
        if self.meta.arch.endswith("_int8"):  # no gradients through int8 kernels
            raise InputError(501, "not_supported", "explanations need the fp32 model; this one is int8")
        row = self._rows[idx]
        body = row if self.instances else (row.get("body") if isinstance(row, dict) else None)  # v1: the instance
        wanted = body.get("target") if isinstance(body, dict) else None
        if wanted is not None and wanted not in self.meta.class_names:
            raise InputError(400, "unknown_target", "target must be one of the model's class codes")
        target = None if wanted is None else self.meta.class_names.index(wanted)
        cam, explained, _ = grad_cam(self.model, self._tensor[slot:slot + 1], target)
        with cpu_budget(self.decode_budget_s):
            upload = decode_image(extract_image_bytes(row, self.instances), self.cfg.max_pixels, min_side=MAX_SIDE)
        png, box = overlay_png(upload, cam, self.cfg.resize_size, self.cfg.crop_size)
        answer["explanation"] = {"method": "Grad-CAM on the last convolutional block",
                                 "class": self.meta.class_names[explained], "image_png_base64":
                                 base64.b64encode(png).decode(), "model_input_box": list(box)}
