"""Powertools Logger, Metrics and Tracer shared by both functions (configured by POWERTOOLS_* env vars)."""

from aws_lambda_powertools import Logger, Metrics, Tracer

logger = Logger()
metrics = Metrics()
tracer = Tracer()
