from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_configure(config):
    """Under pytest-xdist (``make test``) the workers share the cores: each one's torch gets
    its share of threads instead of every worker starting one thread per core."""
    import os

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(autouse=True)
def pipeline_messages_enabled():
    """Every log call of the pipeline is made in full (debug included), as under ``-v``: a
    call whose arguments are wrong fails the test that reaches it, not a user's run. The
    records go nowhere unless a test captures them (caplog)."""
    import logging

    logger = logging.getLogger("pipeline")
    logger.setLevel(logging.DEBUG)   # again for each test: a CLI test's -q sets it,
    logger.propagate = True          # and its handler stops propagation (caplog listens at the root)
    if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
        logger.addHandler(logging.NullHandler())
    yield


@pytest.fixture(scope="session")
def inductor_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("inductor")


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch, inductor_cache):
    """onnxruntime, nncf and our weight cache write under HOME / XDG_CACHE_HOME, inductor
    (compiled scoring) under /tmp: keep every test's writes in temporary folders (inductor's
    one per session: compiled kernels are shared between tests, never taken from outside)."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(inductor_cache))
    return home


@pytest.fixture
def loopback():
    """An HTTP server on 127.0.0.1 serving ``state["files"]`` (path -> bytes), counting
    requests: downloads are tested without the network."""
    import http.server
    import threading

    state = {"requests": 0, "files": {}}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            state["requests"] += 1
            body = state["files"].get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    state["base"] = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield state
    httpd.shutdown()


@pytest.fixture
def shared_data():
    if not SHARED.is_dir():
        pytest.skip("../shared/data is not present on this machine")
    return SHARED


# A small RepViT trained in seconds on a learnable task (which photo a crop comes from),
# so that quantization is judged on a network with real decision margins.

from pipeline.io.data import normalized
from pipeline.models import create_model, reparameterize

SIZE = 32
CLASSES = ["astronaut", "chelsea", "coffee", "rocket"]


@dataclass
class Trained:
    fused: torch.nn.Module
    meta: dict
    calibration: np.ndarray   # uint8 NHWC, training crops
    check: np.ndarray         # uint8 NHWC, held-out crops
    labels: np.ndarray
    train_labels: np.ndarray  # of ``calibration``


def crops(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    import skimage.data

    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(getattr(skimage.data, c)()).convert("RGB") for c in CLASSES]
    pixels, labels = [], []
    for i in range(n):
        k = int(rng.integers(len(photos)))
        img = photos[k]
        w, h = img.size
        s = int(rng.integers(min(w, h) // 4, min(w, h) // 2))
        x0, y0 = int(rng.integers(0, w - s)), int(rng.integers(0, h - s))
        pixels.append(np.asarray(img.crop((x0, y0, x0 + s, y0 + s)).resize((SIZE, SIZE), Image.BILINEAR)))
        labels.append(k)
    return np.stack(pixels), np.asarray(labels)


@pytest.fixture(scope="session")
def trained() -> Trained:
    meta = {"input_size": SIZE, "crop_pct": 1.0, "interpolation": "bilinear",
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "classes": CLASSES,
            "weights": {"source": "test", "sha256": None, "trained": True}}
    train_x, train_y = crops(1024, seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = create_model("m0.6", num_classes=len(CLASSES), seed=0)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
        x = torch.from_numpy(normalized(train_x, meta))
        y = torch.from_numpy(train_y)
        model.train()
        for step in range(120):
            idx = torch.randint(0, len(x), (64,))
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    fused = reparameterize(model.eval())
    check, labels = crops(128, seed=1)
    with torch.no_grad():
        acc = (fused(torch.from_numpy(normalized(check, meta))).argmax(1).numpy() == labels).mean()
    assert acc > 0.6, f"the test model did not learn its task (held-out accuracy {acc:.2f})"
    return Trained(fused, meta, train_x[:128], check, labels, train_y[:128])


@pytest.fixture(scope="session")
def coreml_int8(trained, tmp_path_factory):
    """The test model's Core ML W8A8 export with the default options, made once (about 15 s):
    several modules read it, none changes it."""
    from .formats.test_exporters import export

    return export("coreml", "int8", trained, tmp_path_factory.mktemp("coreml-int8"))
