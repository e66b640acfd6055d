#!/usr/bin/env bash
# The prepared check for the first GPU machine (issue 17), in one go from the repository root:
#   1. the doctor (must end with "CUDA works");
#   2. parity of CUDA fp32 and fp16 embeddings with the CPU's (ResNet50 and VGG16 at 224 px, seeded weights);
#   3. make bench's rows for one model on CUDA (fp32, fp16) beside the CPU's;
#   4. an extract of a few thousand JPEGs with --device cuda (strict: no node on the CPU), the provider recorded.
# Everything it writes goes under $OUT (default build/gpu-check); its summary is $OUT/summary.txt.
#   bash benchmarks/gpu_check.sh                 # about 10 minutes on one GPU, after the install
#   PHOTOS=500 MODELS=resnet50 bash benchmarks/gpu_check.sh   # a quicker look
#   DEVICE=cpu PHOTOS=50 MODELS=resnet50 bash benchmarks/gpu_check.sh   # a dry run of the script itself, no GPU
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-build/gpu-check}
PHOTOS=${PHOTOS:-3000}
MODELS=${MODELS:-"resnet50 vgg16"}
DEVICE=${DEVICE:-cuda}
PY=.venv/bin/python
mkdir -p "$OUT"
make install >"$OUT/install.log" 2>&1
exec > >(tee "$OUT/summary.txt") 2>&1

echo "== 1. doctor"
if ! $PY -m pipeline.doctor && [ "$DEVICE" = cuda ]; then
    echo "CUDA does not work here: the doctor's last line says why; stopping."
    exit 1
fi

echo "== 2. parity of CUDA fp32 and fp16 embeddings with the CPU's"
$PY - "$OUT" "$DEVICE" $MODELS <<'PY'
import json, sys
from pathlib import Path
import numpy as np
from pipeline.decode import calibration_crops
from pipeline.discover import discover
from pipeline.models import ModelRepository
sys.path.insert(0, "benchmarks")
from bench_extract import make_photos

out, device, models = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
photos = discover(make_photos(out / "calibration", 32))
repository = ModelRepository(out / "models")
rng = np.random.default_rng(0)
crops = rng.integers(0, 256, (64, 224, 224, 3), dtype=np.uint8)
result = {}
for model in models:
    source = repository.export(model, "random", 224).model
    repository.variant(source, "fp16", calibration_crops(photos, source.preprocessing))
    cpu = source.open("cpu").embed(crops)
    for variant in (model, f"{model}-fp16"):
        session = repository.load(variant).open(device)  # cuda is strict: fails rather than use the CPU
        assert device == "cpu" or session.provider == "CUDAExecutionProvider", session.provider
        gpu = np.concatenate([session.embed(crops[i:i + 16]) for i in range(0, len(crops), 16)])
        cosine = np.sum(cpu * gpu, 1) / (np.linalg.norm(cpu, axis=1) * np.linalg.norm(gpu, axis=1))
        error = float(np.abs(cpu - gpu).max() / np.abs(cpu).max())
        result[variant] = {"cosine_min": float(cosine.min()), "max_abs_error_relative": error}
        print(f"{variant} on {session.provider}: cosine to the CPU's fp32 min {cosine.min():.6f}, "
              f"max abs error {error:.2e} of the largest")
(out / "parity.json").write_text(json.dumps(result, indent=2) + "\n")
PY

echo "== 3. make bench rows on CUDA"
for model in $MODELS; do
    $PY benchmarks/bench_extract.py --models "$model" --photos 400 --memory-images --work "$OUT/bench" \
        --out "$OUT/bench-$model.json"
done

echo "== 4. extract of $PHOTOS JPEGs with --device $DEVICE"
$PY - "$OUT" "$PHOTOS" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from bench_extract import make_photos
make_photos(Path(sys.argv[1]) / "photos", int(sys.argv[2]))
PY
$PY -m pipeline.extract "$OUT/photos" --models $MODELS --models-dir "$OUT/models" --weights random \
    --device "$DEVICE" --precision fp16 --cache "$OUT/store.h5"
$PY -m pipeline.store info --cache "$OUT/store.h5"
$PY - "$OUT/store.h5" <<'PY'
import sys
from pipeline import EmbeddingStore
store = EmbeddingStore(sys.argv[1])
for name in store.feature_sets():
    print(f"{name}: provider recorded {store.load_attrs(name).get('provider', '-')}")
PY
echo "done: $OUT/summary.txt"
