"""How ComfyUI's answers read: /history entries and /prompt refusals, as a user sees them in the row's reason."""

from __future__ import annotations

from imagepipe_cli.agent.comfyui import rejection
from imagepipe_cli.agent.outcomes import read_history


def entry(messages: list, outputs: dict | None = None, status: str = "success") -> dict:
    return {
        "outputs": outputs or {},
        "status": {"status_str": status, "completed": status == "success", "messages": messages},
    }


def test_only_saved_output_images_are_collected_never_temp_previews_and_in_node_order() -> None:
    outputs = {
        "12": {"images": [{"filename": "b_00001_.png", "subfolder": "s", "type": "output"}]},
        "9": {"images": [{"filename": "a_00001_.png", "subfolder": "s", "type": "output"}]},
        "10": {"images": [{"filename": "ComfyUI_temp_xyz_00001_.png", "subfolder": "", "type": "temp"}]},
    }
    messages = [["execution_start", {"timestamp": 1000}], ["execution_success", {"timestamp": 3500}]]
    finished = read_history(entry(messages, outputs))
    assert finished.kind == "success"
    assert [i["filename"] for i in finished.images] == ["a_00001_.png", "b_00001_.png"]
    assert finished.gpu_seconds == 2.5


def test_an_execution_error_names_the_node_exception_and_first_line_and_spots_out_of_memory() -> None:
    error = {
        "node_id": "3",
        "node_type": "KSampler",
        "exception_type": "torch.OutOfMemoryError",
        "exception_message": "Allocation on device \nThis error means you ran out of memory on your GPU.",
        "timestamp": 2000,
    }
    finished = read_history(
        entry([["execution_start", {"timestamp": 1000}], ["execution_error", error]], status="error")
    )
    assert (finished.kind, finished.out_of_memory) == ("error", True)
    assert finished.reason == "node 3 (KSampler): torch.OutOfMemoryError: Allocation on device"
    plain = {
        **error,
        "exception_type": "RuntimeError",
        "exception_message": "mat1 and mat2 shapes cannot be multiplied",
    }
    finished = read_history(entry([["execution_error", plain]], status="error"))
    assert (finished.kind, finished.out_of_memory) == ("error", False)


def test_an_interrupted_prompt_reads_as_interrupted() -> None:
    data = {"node_id": "3", "node_type": "KSampler", "executed": ["4"], "timestamp": 5}
    finished = read_history(entry([["execution_interrupted", data]], status="error"))
    assert finished.kind == "interrupted" and "node 3 (KSampler)" in finished.reason


def test_prompt_refusals_read_as_the_node_and_what_is_wrong() -> None:
    missing = rejection(
        {
            "error": {
                "type": "missing_node_type",
                "message": "Node 'Face Detailer' not found. The custom node may not be installed.",
                "details": "Node ID '#7'",
                "extra_info": {"node_id": "7", "class_type": "FaceDetailer", "node_title": "Face Detailer"},
            },
            "node_errors": {},
        }
    )
    assert missing.error_type == "missing_node"
    assert missing.reason.startswith("ComfyUI has no node FaceDetailer (node 7)")
    listed = rejection(
        {
            "error": {
                "type": "prompt_outputs_failed_validation",
                "message": "Prompt outputs failed validation",
            },
            "node_errors": {
                "4": {
                    "errors": [
                        {"message": "Value not in list", "details": "ckpt_name: 'x.safetensors' not in []"}
                    ],
                    "class_type": "CheckpointLoaderSimple",
                    "dependent_outputs": ["9"],
                }
            },
        }
    )
    assert listed.error_type == "node_errors"
    assert listed.reason == (
        "Prompt outputs failed validation: node 4 (CheckpointLoaderSimple): Value not in list: "
        "ckpt_name: 'x.safetensors' not in []"
    )
    bare = rejection({"error": {"type": "invalid_prompt", "message": "Invalid prompt", "details": "bad"}})
    assert (bare.error_type, bare.reason) == ("invalid_prompt", "Invalid prompt: bad")


def test_an_older_comfyuis_missing_node_reads_as_a_missing_node() -> None:
    # What a real ComfyUI 0.3.64 answers (newer ones say missing_node_type)
    old = rejection(
        {
            "error": {
                "type": "invalid_prompt",
                "message": "Cannot execute because node IPAdapterAdvanced does not exist.",
                "details": "Node ID '#12'",
                "extra_info": {},
            },
            "node_errors": {},
        }
    )
    assert old.error_type == "missing_node"
    assert old.reason.startswith("ComfyUI has no node IPAdapterAdvanced (node 12)")
