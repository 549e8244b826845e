"""Small helpers for writing and reading JSON records in S3."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def put_json(s3: Any, bucket: str, key: str, value: Any) -> None:
    s3.put_object(
        Bucket=bucket,
        Key=key,
        Body=json.dumps(value, ensure_ascii=False).encode("utf-8", "backslashreplace"),
        ContentType="application/json",
    )


def get_json(s3: Any, bucket: str, key: str) -> Any | None:
    """The decoded object, or None when it does not exist."""
    try:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except s3.exceptions.NoSuchKey:
        return None
    return json.loads(body)
