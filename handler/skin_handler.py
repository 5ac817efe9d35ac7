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
from skinmodel.networks import build_model, features_and_logits, load_state_dict_file, mahalanobis_distance
from skinmodel.payload import extract_image_bytes
from skinmodel.preprocessing import InputError, decode_image, preprocess_bytes
from skinmodel.release import ReleaseMeta

logger = logging.getLogger(__name__)


class SkinLesionHandler(BaseHandler):
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
        self.ood_stats = None
        abstention = self.meta.abstention
        if abstention and abstention.get("ood_stats_file"):
            stats = torch.load(os.path.join(model_dir, abstention["ood_stats_file"]), weights_only=True)
            self.ood_stats = {k: v.float() for k, v in stats.items()}
        self.spool = EventSpool.from_env()
        self.initialized = True
        logger.info("loaded %s %s (%s, %d px, T=%.3f, spool %s)", self.meta.name, self.meta.version,
                    self.meta.arch, self.cfg.crop_size, self.temperature, self.spool.directory or "off")

    def handle(self, data, context):
        self._started = time.perf_counter()
        return super().handle(data, context)

    def preprocess(self, data):
        """-> (stacked tensor of the valid images, per request: (row in the tensor or InputError, image facts))."""
        tensors, slots = [], []
        for row in data:
            image = {}
            try:
                payload = extract_image_bytes(row)
                image.update(sha256=hashlib.sha256(payload).hexdigest(), bytes=len(payload))
                tensors.append(preprocess_bytes(payload, self.cfg, image))
                slots.append((len(tensors) - 1, image))
            except InputError as err:
                slots.append((err, image))
            except Exception:  # noqa: BLE001 - an unforeseen decoder failure must not fail the whole batch
                logger.exception("unexpected error while preprocessing one request")
                slots.append((InputError(422, "unprocessable_image", "the image could not be processed"), image))
        return (torch.stack(tensors) if tensors else None), slots

    def inference(self, batch, *args, **kwargs):
        tensor, slots = batch
        if tensor is None:
            return None, slots
        with torch.inference_mode():
            feats, logits = features_and_logits(self.model, tensor)
            probabilities = torch.softmax(logits / self.temperature, dim=1)
            distances = (mahalanobis_distance(feats, self.ood_stats["means"], self.ood_stats["precision"]).tolist()
                         if self.ood_stats is not None and feats is not None else [None] * len(tensor))
        return (probabilities, distances), slots

    def postprocess(self, output):
        (probabilities, distances), slots = output if output[0] is not None else ((None, None), output[1])
        latency_ms = (time.perf_counter() - getattr(self, "_started", time.perf_counter())) * 1000
        answers, events = [], []
        for idx, (slot, image) in enumerate(slots):
            request_id = self.context.get_request_id(idx) if self.context else None
            if self.context:
                self.context.set_response_content_type(idx, "application/json")
            if isinstance(slot, InputError):
                if self.context:
                    self.context.set_response_status(slot.status, slot.reason, idx)
                answers.append(format_error(slot, request_id))
                events.append(make_event(request_id, self.meta, self.weights_sha256, image, latency_ms, error=slot))
            else:
                probs = probabilities[slot].tolist()
                answer = format_prediction(probs, self.meta, request_id, distances[slot])
                answers.append(answer)
                events.append(make_event(request_id, self.meta, self.weights_sha256, image, latency_ms, probs,
                                         answer=answer))
        self.spool.append(events)
        return answers

    def explain_handle(self, data_preprocess, raw_data):
        """POST /explanations/<model>: the prediction plus a Grad-CAM overlay (PNG, base64) per valid image.
        A JSON body may name the class to explain: {"data": "<base64>", "target": "mel"}."""
        import base64

        tensor, slots = data_preprocess
        answers = []
        for idx, (slot, image) in enumerate(slots):
            request_id = self.context.get_request_id(idx)
            self.context.set_response_content_type(idx, "application/json")
            if isinstance(slot, InputError):
                self.context.set_response_status(slot.status, slot.reason, idx)
                answers.append(format_error(slot, request_id))
                continue
            if self.meta.arch.endswith("_int8"):  # no gradients through int8 kernels
                err = InputError(501, "not_supported", "explanations need the fp32 model; this one is int8")
                self.context.set_response_status(err.status, err.reason, idx)
                answers.append(format_error(err, request_id))
                continue
            row = raw_data[idx]
            body = row.get("body") if isinstance(row, dict) else None
            wanted = body.get("target") if isinstance(body, dict) else None
            target = self.meta.class_names.index(wanted) if wanted in self.meta.class_names else None
            cam, explained, logits = grad_cam(self.model, tensor[slot:slot + 1], target)
            upload = decode_image(extract_image_bytes(row), self.cfg.max_pixels, min_side=MAX_SIDE)
            png, box = overlay_png(upload, cam, self.cfg.resize_size, self.cfg.crop_size)
            answer = format_prediction(torch.softmax(logits[0] / self.temperature, 0).tolist(), self.meta, request_id)
            answer["explanation"] = {"method": "Grad-CAM on the last convolutional block",
                                     "class": self.meta.class_names[explained], "image_png_base64":
                                     base64.b64encode(png).decode(), "model_input_box": list(box)}
            answers.append(answer)
        return answers
