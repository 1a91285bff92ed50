"""How the int8 and export settings were chosen: quantisation variants and ONNX session start-up.

    python benchmarks/probe_onnx.py

1. all-MiniLM-L6-v2, 200 SciFact abstracts, steady state (model loaded, one warm-up batch): passages/s and
   mean cosine to the fp32 export for ONNX Runtime dynamic int8 with (a) per-tensor weights on every operator
   (quantize_dynamic's defaults), (b) per-tensor weights on MatMul only, (c) per-channel weights on MatMul only
   (what dsearch ships).
2. The seed architecture (random weights): seconds to create an ONNX Runtime session for its int8 export with
   the weights inside the protobuf against weights in an external file (what dsearch ships).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
SCIFACT = HERE.parent.parent / "shared" / "eval" / "scifact" / "corpus.jsonl"


def main() -> None:
    import os

    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        os.environ["DSEARCH_CACHE_DIR"] = str(tmp / "cache")
        from dsearch import lean
        from dsearch.encoder import SentenceTransformerEncoder

        rows = [json.loads(line) for line, _ in zip(open(SCIFACT), range(200), strict=False)]
        texts = [f"{r['title']} {r['text']}" for r in rows]
        fp32_dir = lean.export(SentenceTransformerEncoder(None), "fp32")
        reference = lean.LeanEncoder(fp32_dir).encode_documents(texts)
        graph = onnx.load(str(fp32_dir / "model.onnx"))  # weights come back in from model.data
        onnx.save_model(graph, str(tmp / "embedded.onnx"))
        variants = {
            "per-tensor, all operators": {},
            "per-tensor, MatMul only": {"op_types_to_quantize": ["MatMul"]},
            "per-channel, MatMul only (shipped)": {"per_channel": True, "op_types_to_quantize": ["MatMul"]},
        }
        for label, options in variants.items():
            out = tmp / label.split(" (")[0].replace(" ", "_").replace(",", "")
            shutil.copytree(fp32_dir, out)
            (out / "model.data").unlink()
            quantize_dynamic(tmp / "embedded.onnx", out / "model.onnx", weight_type=QuantType.QInt8, **options)
            encoder = lean.LeanEncoder(out)
            encoder.encode_documents(texts[:8])
            started = time.perf_counter()
            vectors = encoder.encode_documents(texts)
            rate = len(texts) / (time.perf_counter() - started)
            cosine = float(
                np.mean(
                    (vectors * reference).sum(1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(reference, axis=1)
                )
            )
            print(
                json.dumps(
                    {
                        "all-MiniLM-L6-v2 int8": label,
                        "passages_per_s": round(rate, 1),
                        "mean_cosine_to_fp32": round(cosine, 5),
                    }
                ),
                flush=True,
            )

        from seed_model import build_seed_like_model

        seed = SentenceTransformerEncoder(str(build_seed_like_model(tmp / "seed")))
        int8_dir = lean.export(seed, "int8")
        embedded = tmp / "seed-embedded.onnx"
        onnx.save_model(onnx.load(str(int8_dir / "model.onnx")), str(embedded))
        for label, path in (
            ("weights inside the protobuf", embedded),
            ("weights in model.data (shipped)", int8_dir / "model.onnx"),
        ):
            times = []
            for _ in range(3):
                started = time.perf_counter()
                ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                times.append(time.perf_counter() - started)
            print(json.dumps({"seed int8 session start": label, "seconds": [round(t, 3) for t in times]}), flush=True)


if __name__ == "__main__":
    main()
