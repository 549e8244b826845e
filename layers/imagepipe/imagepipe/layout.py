"""Where a job's records live in the output bucket: one prefix per job, deterministic keys."""

from __future__ import annotations

from dataclasses import dataclass

STATUS_SUCCEEDED = "succeeded"
STATUS_REJECTED = "rejected"


@dataclass(frozen=True)
class JobLayout:
    job_id: str

    @property
    def prefix(self) -> str:
        return f"jobs/{self.job_id}/"

    @property
    def manifest_key(self) -> str:
        return f"{self.prefix}manifest.json"

    @property
    def rows_key(self) -> str:
        return f"{self.prefix}rows.jsonl"

    @property
    def results_key(self) -> str:
        return f"{self.prefix}results.jsonl"

    @property
    def results_csv_key(self) -> str:
        return f"{self.prefix}results.csv"

    @property
    def report_key(self) -> str:
        return f"{self.prefix}report.html"

    @property
    def images_prefix(self) -> str:
        return f"{self.prefix}images/"

    def image_key(self, name: str, index: int, extension: str) -> str:
        # The first image is {name}.png; more images per row are {name}.2.png, {name}.3.png ...
        # Names never contain '.', so a key always parses back to (name, index).
        suffix = "" if index == 0 else f".{index + 1}"
        return f"{self.images_prefix}{name}{suffix}.{extension}"
