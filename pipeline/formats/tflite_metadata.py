"""TFLite Model Metadata for an image classifier, written with the flatbuffers library from
the published metadata schema (TFLite Support's ``metadata_schema.fbs``, version 1.5.0;
file identifier ``M001``), and the model edits it needs: an image input, labels packed as
an associated file (a zip appended to the model, as the TFLite Support populator does).

MediaPipe Tasks (``ImageClassifier``) and Android Studio's model binding read this
metadata: the input's colour space and normalization, and the labels of the output. The
writers shipped with MediaPipe's Python wheel (1.2.3) import a compiled module the wheel
lacks, so the tables are built here field by field; a test reads them back with
MediaPipe itself.
"""
from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

METADATA_NAME = "TFLITE_METADATA"
FILE_IDENTIFIER = b"M001"
MIN_PARSER_VERSION = "1.0.0"   # nothing newer than the 1.0.0 schema is used

# Enum and union values from the schema.
COLOR_SPACE_RGB = 1
CONTENT_FEATURE, CONTENT_IMAGE = 1, 2                 # ContentProperties union
PROCESS_NORMALIZATION = 1                             # ProcessUnitOptions union
FILE_TENSOR_AXIS_LABELS = 2                           # AssociatedFileType


@dataclass
class ClassifierMetadata:
    name: str
    description: str
    version: str
    author: str
    license: str
    labels_file: str                  # name of the associated labels file
    input_size: int
    input_mean: Optional[list[float]]  # NormalizationOptions for a float input; None for uint8
    input_std: Optional[list[float]]
    input_range: tuple[float, float]  # Stats of the input
    input_description: str
    output_description: str


def _string(b, s: str) -> int:
    return b.CreateString(s)


def _table(b, fields: list[tuple[int, str, object]]) -> int:
    """A table from (slot, kind, value) triples; kind: 'offset', 'uint8', 'uint32'."""
    b.StartObject(max(slot for slot, _, _ in fields) + 1)
    for slot, kind, value in fields:
        if kind == "offset":
            b.PrependUOffsetTRelativeSlot(slot, value, 0)
        elif kind == "uint8":
            b.PrependUint8Slot(slot, value, 0)
        elif kind == "uint32":
            b.PrependUint32Slot(slot, value, 0)
    return b.EndObject()


def _offsets(b, items: list[int]) -> int:
    b.StartVector(4, len(items), 4)
    for item in reversed(items):
        b.PrependUOffsetTRelative(item)
    return b.EndVector()


def _floats(b, values: list[float]) -> int:
    return b.CreateNumpyVector(np.asarray(values, np.float32))


def build(meta: ClassifierMetadata) -> bytes:
    """The ModelMetadata flatbuffer (root table, identifier M001)."""
    import flatbuffers

    b = flatbuffers.Builder(1024)
    # Input: an RGB image, its normalization (float input) and value range.
    size = _table(b, [(0, "uint32", meta.input_size), (1, "uint32", meta.input_size)])     # ImageSize
    image = _table(b, [(0, "uint8", COLOR_SPACE_RGB), (1, "offset", size)])                 # ImageProperties
    content_in = _table(b, [(0, "uint8", CONTENT_IMAGE), (1, "offset", image)])             # Content
    units = []
    if meta.input_mean is not None:
        mean, std = _floats(b, meta.input_mean), _floats(b, meta.input_std)
        norm = _table(b, [(0, "offset", mean), (1, "offset", std)])                         # NormalizationOptions
        units.append(_table(b, [(0, "uint8", PROCESS_NORMALIZATION), (1, "offset", norm)]))  # ProcessUnit
    stats_in = _table(b, [(0, "offset", _floats(b, [meta.input_range[1]])),
                          (1, "offset", _floats(b, [meta.input_range[0]]))])                  # Stats max, min
    fields = [(0, "offset", _string(b, "image")), (1, "offset", _string(b, meta.input_description)),
              (3, "offset", content_in), (5, "offset", stats_in)]
    if units:
        fields.append((4, "offset", _offsets(b, units)))
    tensor_in = _table(b, fields)                                                            # TensorMetadata
    # Output: class probabilities, labelled by the associated file.
    labels = _table(b, [(0, "offset", _string(b, meta.labels_file)),
                        (1, "offset", _string(b, "Class names, one per line, in output order")),
                        (2, "uint8", FILE_TENSOR_AXIS_LABELS)])                              # AssociatedFile
    b.StartObject(0)
    feature = b.EndObject()                                                                  # FeatureProperties
    content_out = _table(b, [(0, "uint8", CONTENT_FEATURE), (1, "offset", feature)])
    stats_out = _table(b, [(0, "offset", _floats(b, [1.0])), (1, "offset", _floats(b, [0.0]))])
    tensor_out = _table(b, [(0, "offset", _string(b, "probability")),
                            (1, "offset", _string(b, meta.output_description)),
                            (3, "offset", content_out), (5, "offset", stats_out),
                            (6, "offset", _offsets(b, [labels]))])
    subgraph = _table(b, [(2, "offset", _offsets(b, [tensor_in])), (3, "offset", _offsets(b, [tensor_out]))])
    root = _table(b, [(0, "offset", _string(b, meta.name)), (1, "offset", _string(b, meta.description)),
                      (2, "offset", _string(b, meta.version)), (3, "offset", _offsets(b, [subgraph])),
                      (4, "offset", _string(b, meta.author)), (5, "offset", _string(b, meta.license)),
                      (7, "offset", _string(b, MIN_PARSER_VERSION))])
    b.Finish(root, file_identifier=FILE_IDENTIFIER)
    return bytes(b.Output())


# ---------------------------------------------------------------- editing the model

def _inline_buffers(model, raw: bytes) -> None:
    """Buffers stored after the flatbuffer (offset/size, as ai-edge-quantizer writes them)
    moved inline, so that the model can be packed again."""
    for buf in model.buffers:
        if getattr(buf, "offset", 0) and buf.offset > 1:
            buf.data = np.frombuffer(raw[buf.offset:buf.offset + buf.size], np.uint8)
            buf.offset, buf.size = 0, 0


def _aligned_vector(b, x: np.ndarray, alignment: int = 16) -> int:
    """flatbuffers' CreateNumpyVector with its data aligned to ``alignment`` bytes."""
    data = np.ascontiguousarray(x)
    raw = data.astype(data.dtype.newbyteorder("<"), copy=False).tobytes()
    b.assertNotNested()
    b.nested = True
    b.Prep(4, len(raw))
    b.Prep(alignment, len(raw))
    b.head = b.head - len(raw)
    b.Bytes[b.head:b.head + len(raw)] = raw
    b.vectorNumElems = data.size
    return b.EndVector()


def _builtin(model, op) -> int:
    code = model.operatorCodes[op.opcodeIndex]
    return max(code.builtinCode, code.deprecatedBuiltinCode)


def _opcode(model, schema, builtin: int) -> int:
    for i, code in enumerate(model.operatorCodes):
        if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin:
            return i
    code = schema.OperatorCodeT()
    code.builtinCode, code.deprecatedBuiltinCode, code.version = builtin, min(builtin, 127), 2
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def uint8_input(model, schema) -> None:
    """Give a quantized model a uint8 input holding raw pixel bytes (scale 1/255, zero
    point 0: the model was converted for pixel / 255): an app feeds bitmap bytes. A DEQUANTIZE (uint8 -> float32) feeds the model's first
    float op; where the model's first ops are int8, a QUANTIZE follows (a direct uint8 ->
    int8 QUANTIZE is one XNNPACK leaves to TFLite; these two it runs inside the model's
    partition)."""
    sg = model.subgraphs[0]
    old = sg.inputs[0]
    t = sg.tensors[old]

    def tensor(kind: int, name: bytes, quantized: bool) -> int:
        new = schema.TensorT()
        new.shape = list(t.shape)
        new.shapeSignature = list(t.shapeSignature) if t.shapeSignature is not None else None
        new.type, new.name, new.buffer = kind, name, 0
        if quantized:
            q = schema.QuantizationParametersT()
            q.scale, q.zeroPoint = [1.0 / 255.0], [0]   # real value pixel / 255: the model's input
            new.quantization = q
        sg.tensors.append(new)
        return len(sg.tensors) - 1

    pixels = tensor(schema.TensorType.UINT8, b"image", True)
    consumers = [op for op in sg.operators if old in list(op.inputs)]
    dequantize = schema.BuiltinOperator.DEQUANTIZE
    if len(consumers) == 1 and _builtin(model, consumers[0]) == dequantize:
        # The model dequantizes its input at once (its first ops are float): dequantize the
        # pixels there instead, with no int8 round trip.
        consumers[0].inputs = [pixels if i == old else i for i in consumers[0].inputs]
        steps = []
    elif t.type == schema.TensorType.FLOAT32:
        steps = [(schema.BuiltinOperator.DEQUANTIZE, [pixels], [old])]
    else:
        values = tensor(schema.TensorType.FLOAT32, b"image_values", False)
        steps = [(schema.BuiltinOperator.DEQUANTIZE, [pixels], [values]),
                 (schema.BuiltinOperator.QUANTIZE, [values], [old])]
    ops = []
    for builtin, inputs, outputs in steps:
        op = schema.OperatorT()
        op.opcodeIndex = _opcode(model, schema, builtin)
        op.inputs, op.outputs = inputs, outputs
        ops.append(op)
    sg.operators[0:0] = ops
    sg.inputs = [pixels]
    for sig in model.signatureDefs or []:
        for tm in sig.inputs:
            if tm.tensorIndex == old:
                tm.tensorIndex = pixels


def float_output(model, schema) -> None:
    """Drop the QUANTIZE that ai-edge-quantizer's full-integer recipe puts after the model's
    (float) softmax: the output stays float32 probabilities, which MediaPipe reads (it
    refuses int8 outputs)."""
    sg = model.subgraphs[0]
    out = sg.outputs[0]
    for i, op in enumerate(sg.operators):
        if (op.outputs[0] == out and _builtin(model, op) == schema.BuiltinOperator.QUANTIZE
                and sg.tensors[op.inputs[0]].type == schema.TensorType.FLOAT32):
            source = op.inputs[0]
            del sg.operators[i]
            sg.outputs = [source]
            for sig in model.signatureDefs or []:
                for tm in sig.outputs:
                    if tm.tensorIndex == out:
                        tm.tensorIndex = source
            return


def embed(path: Path, meta: ClassifierMetadata, labels: list[str], uint8: bool = False) -> None:
    """Rewrite the .tflite at ``path`` with ``meta`` as its TFLITE_METADATA, the labels as
    an associated file, and (``uint8``: full-integer models) a raw-pixel uint8 input and a
    float32 probability output."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    raw = Path(path).read_bytes()
    model = schema.ModelT.InitFromPackedBuf(raw, 0)
    _inline_buffers(model, raw)
    if uint8:
        uint8_input(model, schema)
        float_output(model, schema)
    buf = schema.BufferT()
    buf.data = np.frombuffer(build(meta), np.uint8)
    model.buffers.append(buf)
    entry = schema.MetadataT()
    entry.name, entry.buffer = METADATA_NAME.encode(), len(model.buffers) - 1
    model.metadata = [m for m in (model.metadata or []) if m.name != METADATA_NAME.encode()] + [entry]
    class AlignedBuilder(flatbuffers.Builder):
        def CreateNumpyVector(self, x):   # weights 16-byte aligned, as the converter writes them
            return _aligned_vector(self, x)

    b = AlignedBuilder(len(raw) + (1 << 20))
    b.Finish(model.Pack(b), file_identifier=b"TFL3")
    out = io.BytesIO()
    out.write(bytes(b.Output()))
    with zipfile.ZipFile(out, "a") as z:       # associated files: a zip after the flatbuffer
        z.writestr(meta.labels_file, "\n".join(labels) + "\n")
    Path(path).write_bytes(out.getvalue())


def read_labels(path: Path, name: str) -> list[str]:
    """The associated labels file of a model written by ``embed``."""
    with zipfile.ZipFile(io.BytesIO(Path(path).read_bytes())) as z:
        return z.read(name).decode().splitlines()
