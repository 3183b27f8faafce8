"""Tessera's compute pipelines: ingestion, preprocessing, inference, postprocessing, writers.

Nothing here imports a web framework; the CLI and the service both call :func:`pipelines.segment.segment_case`.
"""
