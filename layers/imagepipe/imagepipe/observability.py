"""Powertools Logger, Metrics and Tracer shared by every function (configured by POWERTOOLS_* env vars)."""

from aws_lambda_powertools import Logger, Metrics, Tracer

logger = Logger()
metrics = Metrics()
# Only the clients the functions call: AWS (botocore) and the image APIs (httpx). Patching all 14 modules
# the X-Ray SDK knows also looks for and wraps ones never used here, at every cold start (`make bench`).
tracer = Tracer(patch_modules=("botocore", "httpx"))
