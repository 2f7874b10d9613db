"""A Triton Inference Server model repository for the image engine (`cgil export --format triton`).

    triton/cgil_image/config.pbtxt
    triton/cgil_image/1/model.onnx      (or model.plan for a TensorRT engine)

Triton serves the embedding; the head (a C x D matrix) stays with the client, so swapping heads
never touches the server. Dynamic batching is on: single-image requests are merged up to max_batch.
"""
from __future__ import annotations

from pathlib import Path

MODEL_NAME = "cgil_image"


def config_pbtxt(image_hw: tuple[int, int], embed_dim: int, max_batch: int, platform: str = "onnxruntime_onnx",
                 input_name: str = "pixels", output_name: str = "image_embedding") -> str:
    h, w = image_hw
    # No 1 among the preferred sizes: Triton sends a batch as soon as it reaches a preferred size,
    # so a preferred 1 dispatches every single-image request alone and the queue delay never batches.
    preferred = sorted({b for b in (2, 4, 8, 16, 32, max_batch) if 1 < b <= max_batch})
    batching = (f"preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n  " if preferred else "")
    return f"""name: "{MODEL_NAME}"
platform: "{platform}"
max_batch_size: {max_batch}
input [
  {{
    name: "{input_name}"
    data_type: TYPE_UINT8
    dims: [ {h}, {w}, 3 ]
  }}
]
output [
  {{
    name: "{output_name}"
    data_type: TYPE_FP32
    dims: [ {embed_dim} ]
  }}
]
dynamic_batching {{
  {batching}max_queue_delay_microseconds: 500
}}
instance_group [
  {{
    count: 1
    kind: KIND_AUTO
  }}
]
"""


def write_repository(root: Path, model_bytes: bytes, image_hw: tuple[int, int], embed_dim: int, max_batch: int,
                     tensorrt: bool = False) -> Path:
    """Write root/cgil_image/{config.pbtxt, 1/model.*}; returns the model file's path."""
    model_dir = Path(root) / MODEL_NAME
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    model_file = model_dir / "1" / ("model.plan" if tensorrt else "model.onnx")
    model_file.write_bytes(model_bytes)
    platform = "tensorrt_plan" if tensorrt else "onnxruntime_onnx"
    (model_dir / "config.pbtxt").write_text(config_pbtxt(image_hw, embed_dim, max_batch, platform))
    return model_file


def parse_config(path: Path):
    """Parse config.pbtxt with Triton's own protobuf schema (shipped by the tritonclient package)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(Path(path).read_text(), model_config_pb2.ModelConfig())
