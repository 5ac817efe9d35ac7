"""Evaluation: checkpoints on the lesion-grouped test split (`evaluate`), and a release as served on any labelled
set (`evaluate_release`, with `labelled` reading the sets and `subgroups` the tables).
"""
