"""`imagepipe run` and `submit` upload the images an input file's local rows name, beside the file and before it."""

from __future__ import annotations

from pathlib import Path

from imagepipe_cli.uploads import input_images, upload_input


class RecordingS3:
    def __init__(self) -> None:
        self.uploads: list[tuple[str, str, str, dict | None]] = []

    def upload_file(self, filename: str, bucket: str, key: str, ExtraArgs: dict | None = None) -> None:  # noqa: N803
        self.uploads.append((filename, bucket, key, ExtraArgs))


def write_input(folder: Path) -> Path:
    (folder / "pics").mkdir()
    (folder / "pics" / "house.png").write_bytes(b"png")
    (folder / "pics" / "mask.png").write_bytes(b"png")
    (folder.parent / "outside.png").write_bytes(b"png")
    path = folder / "rows.csv"
    path.write_text(
        "id,prompt,init_image,mask_image,reference_image,workflow,backend\n"
        "plain,a cat,,,,,\n"
        "inpaint,a door,pics/house.png,pics/mask.png,,,\n"
        "twice,a door again,./pics/house.png,pics/no-such.png,,,\n"
        "outside,a style,,,../outside.png,,\n"
        "uri,a style,,,s3://bucket/pics/style.png,,\n"
        "custom,a vase,,,,facedetailer,\n"
        "forced,a vase,,,,,local\n"
        "cloud,a vase,,,,,cloud\n",
        encoding="utf-8",
    )
    return path


def test_the_local_rows_images_are_found_beside_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "campaign"
    folder.mkdir()
    found = input_images(write_input(folder))
    # Every row with an image column, a workflow or backend=local is a local row
    assert found.local_rows == 6
    # Only files that exist in the file's folder or below are uploaded (a missing one fails its row later)
    assert found.files == {
        "pics/house.png": folder / "pics/house.png",
        "pics/mask.png": folder / "pics/mask.png",
    }


def test_the_images_go_up_first_at_the_same_relative_keys_then_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "campaign"
    folder.mkdir()
    path = write_input(folder)
    s3 = RecordingS3()
    upload_input(s3, "in", path, "inbox/rows.csv", {"Metadata": {"job-id": "j"}})
    assert [(key, extra) for _, _, key, extra in s3.uploads] == [
        ("inbox/pics/house.png", None),
        ("inbox/pics/mask.png", None),
        ("inbox/rows.csv", {"Metadata": {"job-id": "j"}}),
    ]


def test_a_file_without_local_rows_uploads_only_itself(tmp_path: Path) -> None:
    path = tmp_path / "plain.csv"
    path.write_text("id,prompt\n1,a cat\n", encoding="utf-8")
    s3 = RecordingS3()
    assert upload_input(s3, "in", path, "inbox/plain.csv", {}).local_rows == 0
    assert [key for _, _, key, _ in s3.uploads] == ["inbox/plain.csv"]
