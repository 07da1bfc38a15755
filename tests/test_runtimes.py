import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pipeline.runtimes.ort import OnnxRuntime

META = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def quantized_conv_onnx(path):
    """input (N, 3, 8, 8) -> int8 QDQ -> 3x3 conv -> Gelu -> average pool: logits (N, 4),
    any batch size."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.float32(0.03), "s"), numpy_helper.from_array(np.uint8(128), "z"),
             numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float32), "b")]
    nodes = [helper.make_node("QuantizeLinear", ["input", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"]),
             helper.make_node("Conv", ["dq", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Gelu", ["c"], ["g"]),
             helper.make_node("GlobalAveragePool", ["g"], ["p"]),
             helper.make_node("Flatten", ["p"], ["logits"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), path)
    return path


def test_onnx_lanes_score_each_image_as_one_session_does(tmp_path):
    path = quantized_conv_onnx(tmp_path / "m.onnx")
    pixels = np.random.default_rng(1).integers(0, 256, (5, 8, 8, 3), np.uint8)
    one = OnnxRuntime(path, META, threads=1)
    lanes = OnnxRuntime(path, META, threads=1, lanes=2)
    alone = np.concatenate([one.predict(pixels[i:i + 1]) for i in range(len(pixels))])
    assert alone.shape == (5, 4) and np.abs(alone).max() > 1e-3
    # Rows in order (an odd batch splits 3 + 2), bit-identical, and a single image still runs.
    assert np.array_equal(lanes.predict(pixels), alone) and np.array_equal(one.predict(pixels), alone)
    assert np.array_equal(lanes.predict(pixels[2:3]), alone[2:3])
    assert "2 one-thread sessions" in lanes.name and "sessions" not in one.name
