"""Where a job's records live in the output bucket: one prefix per job, deterministic keys."""

from __future__ import annotations

from dataclasses import dataclass

STATUS_SUCCEEDED = "succeeded"
STATUS_FAILED = "failed"
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

    @property
    def outcomes_prefix(self) -> str:
        return f"{self.prefix}outcomes/"

    def image_key(self, name: str, index: int, extension: str) -> str:
        # The first image is {name}.png; more images per row are {name}.2.png, {name}.3.png ...
        # Names never contain '.', so a key always parses back to (name, index).
        suffix = "" if index == 0 else f".{index + 1}"
        return f"{self.images_prefix}{name}{suffix}.{extension}"

    def outcome_key(self, name: str, status: str) -> str:
        return f"{self.outcomes_prefix}{name}.{status}.json"


def parse_image_key(layout: JobLayout, key: str) -> tuple[str, int] | None:
    """(name, index) for an image key of this job, or None for anything else."""
    if not key.startswith(layout.images_prefix):
        return None
    parts = key[len(layout.images_prefix) :].split(".")
    if len(parts) == 2:
        return parts[0], 0
    if len(parts) == 3 and parts[1].isdigit():
        return parts[0], int(parts[1]) - 1
    return None


def parse_outcome_key(layout: JobLayout, key: str) -> tuple[str, str] | None:
    """(name, status) for an outcome key of this job, or None."""
    if not key.startswith(layout.outcomes_prefix):
        return None
    parts = key[len(layout.outcomes_prefix) :].split(".")
    if len(parts) == 3 and parts[2] == "json" and parts[1] in (STATUS_SUCCEEDED, STATUS_FAILED):
        return parts[0], parts[1]
    return None
