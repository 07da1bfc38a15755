"""compare's rows and tables from deploy reports (the end-to-end run is in test_deploy)."""
from pipeline.app.compare import HEADER, markdown, rows_of, table_rows


def report(top1):
    return {"artifacts": [{"format": "onnx", "path": "m.onnx", "bytes": 5_000_000, "method": "measured",
                           "accuracy": {"top1": top1, "n": 2000,
                                        "drop_vs_float": {"points": 0.75, "standard_error": 0.41}},
                           "fidelity": {"top1_agreement": 0.9575, "sqnr_db": 20.0, "n": 2000},
                           "latency": [{"target": "host (1 thread)", "median_ms": 9.5, "runtime": "onnxruntime",
                                        "method": "measured"}]}],
            "skipped": [{"format": "coreml", "reason": "no such scheme"}],
            "failed": [{"format": "tflite", "stage": "export.tflite", "error": "RuntimeError: boom",
                        "what_to_do": "retry"}]}


def test_rows_carry_the_drop_with_its_standard_error():
    rows = rows_of("int8", report(0.664))
    assert rows[0]["drop"] == {"points": 0.75, "standard_error": 0.41}
    result = {"variant": "m0.9", "rows": rows, "notes": [], "data": {"eval": "2000 images"}}
    table = table_rows(result)
    assert all(len(r) == len(HEADER) for r in table), "every row fills every column"
    assert table[0][3:6] == ["66.40", "0.75 ± 0.41", "95.75"]
    # a format skipped by the scheme, and one whose converter failed in this scheme
    assert table[1][:2] == ["int8", "coreml"] and table[1][-1] == "not produced: no such scheme"
    assert table[2][:2] == ["int8", "tflite"] and table[2][-1] == "FAILED in export.tflite: RuntimeError: boom"
    assert "drop, points (± 1 s.e.)" in markdown(result)
