"""The shipped .tflite in MediaPipe Tasks' ImageClassifier (what Android apps and Android
Studio's model binding run), unchanged: its metadata read back with MediaPipe's schema, its
categories the model's labels, its scores the probabilities LiteRT gives."""
import numpy as np
import pytest

from pipeline.formats.tflite import LABELS_FILE
from pipeline.formats.tflite_metadata import METADATA_NAME, read_labels
from pipeline.runtimes.litert import interpreter, run_tflite

from .test_exporters import export, reference_logits

mp = pytest.importorskip("mediapipe", reason="MediaPipe is in the test extras (pip install -e '.[test]')")


def metadata_of(path):
    """TFLITE_METADATA of a model, parsed with MediaPipe's copy of the published schema."""
    from ai_edge_litert import schema_py_generated as schema
    from mediapipe.tasks.metadata import metadata_schema_py_generated as ms

    raw = path.read_bytes()
    model = schema.Model.GetRootAs(raw, 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name().decode() == METADATA_NAME:
            data = model.Buffers(entry.Buffer()).DataAsNumpy().tobytes()
            assert ms.ModelMetadata.ModelMetadataBufferHasIdentifier(data, 0)
            return ms.ModelMetadataT.InitFromObj(ms.ModelMetadata.GetRootAs(data, 0))
    raise AssertionError("no TFLITE_METADATA")


def classify(path, pixels):
    from mediapipe.tasks import python as tasks
    from mediapipe.tasks.python import vision

    options = vision.ImageClassifierOptions(base_options=tasks.BaseOptions(model_asset_path=str(path)))
    out = []
    with vision.ImageClassifier.create_from_options(options) as classifier:
        for p in pixels:
            result = classifier.classify(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(p)))
            out.append({c.category_name: c.score for c in result.classifications[0].categories})
    return out


@pytest.mark.parametrize("scheme", ["fp32", pytest.param("fp16", marks=pytest.mark.slow), "int8"])
def test_mediapipe_image_classifier_runs_the_tflite_unchanged(scheme, trained, tmp_path):
    r = export("tflite", scheme, trained, tmp_path)
    classes = trained.meta["classes"]

    meta = metadata_of(r.path)
    assert meta.name.decode().startswith("RepViT-M0.6") and meta.author and meta.license and meta.version
    (sub,) = meta.subgraphMetadata
    (inp,), (out,) = sub.inputTensorMetadata, sub.outputTensorMetadata
    assert inp.content.contentProperties.colorSpace == 1            # RGB
    assert inp.content.contentProperties.defaultSize.width == 32
    if scheme == "int8":   # raw uint8 pixels: no normalization to declare
        assert interpreter(r.path).get_input_details()[0]["dtype"] == np.uint8 and not inp.processUnits
    else:                  # float pixel values: identity normalization (the model normalizes)
        norm = inp.processUnits[0].options
        assert list(norm.mean) == [0.0] and list(norm.std) == [1.0]
    assert out.associatedFiles[0].name.decode() == LABELS_FILE and out.associatedFiles[0].type == 2
    assert read_labels(r.path, LABELS_FILE) == classes

    pixels = trained.check[:24]          # already model-sized crops: MediaPipe resizes nothing
    ours = run_tflite(r.path, pixels)
    theirs = classify(r.path, pixels)
    for scores, probs in zip(theirs, ours):
        assert set(scores) == set(classes)                         # names from the model's labels
        got = np.array([scores[c] for c in classes])
        assert np.abs(got - probs).max() < 1e-5                      # the same probabilities
        assert abs(got.sum() - 1.0) < 1e-3
    agree = np.mean([max(s, key=s.get) == classes[p.argmax()] for s, p in zip(theirs, ours)])
    assert agree == 1.0
    if scheme != "int8":
        assert (ours.argmax(1) == reference_logits(trained, pixels).argmax(1)).all()
