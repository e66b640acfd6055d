"""``make bench``: extraction speed and fidelity side by side, on this machine, same weights and images.

For each default backbone at 224 px: (a) torchvision eager on the CPU, (b) our onnxruntime fp32 and (c) int8 on
pre-decoded batches, (d) end-to-end extract from a folder of JPEG photos into HDF5 at each precision, and
(e) torchvision's documented recipe (ImageFolder, Resize, CenterCrop, ToTensor, Normalize, a DataLoader
with worker processes, the model in eager mode) on the same photos, whole processes against whole
processes; the effective GFLOP/s against this machine's measured float32 matrix-multiply peak; the thread
budget (decode threads against onnxruntime's threads); the host side alone: decoding step by step and the
whole extract path with a zero-cost backbone (bench_host.py); fidelity of int8 to fp32 (embedding cosine
on the photos, and logistic-regression test accuracy on scikit-learn's digit scans); peak memory of
extract on 1,000 and 10,000 photos. For each curated model of another family (``transfer models``), at its
own size and recipe: (a)-(d), the library's own eager forward (timm's or torchvision's module) being the
reference, and int8 only where its fidelity to fp32 passes. Writes benchmarks/bench.json and prints a table.

The photos are random crops, flips and colour shifts of the two photographs scikit-learn ships
(``load_sample_images``), 640x480 JPEG: real camera images, no download. Weights: ImageNet when they are in
torch's cache, otherwise seeded random weights (flagged in the output: speed is the same, fidelity differs).

    python benchmarks/bench_extract.py [--models vgg16 resnet50] [--photos 400] [--memory-images 1000 10000]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# Only what extract itself loads is imported here, so that the extract children measure extract's own memory;
# torch and scikit-learn are imported where they are used.
from bench_host import PHOTO_SIZE, decode_costs, make_photos, pin_to_cores, zero_cost_backbone

from pipeline.errors import UserError
from pipeline.extract.decode import calibration_crops, decode_file
from pipeline.extract.discover import discover
from pipeline.extract.run import run_extract
from pipeline.files import available_cores
from pipeline.models import CURATED, DEFAULT_BACKBONES, ModelRepository, feature_set_name, parse_model_name
from pipeline.models.registry import parse_feature_set
from pipeline.models.session import CUDA
from pipeline.store import EmbeddingStore

BATCH = 16
MIN_SECONDS = 8.0  # each pure-inference rate is timed over at least this long (after one warm-up batch)


def machine() -> dict:
    """What the numbers were measured on."""
    import onnxruntime
    import torch

    flags, name = set(), platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    simd = [flag for flag in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if flag in flags]
    return {
        "cpu": name, "cores": available_cores(), "simd": simd, "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "numpy": np.__version__,
    }


def matmul_peak(sizes: tuple[int, ...] = (2048, 4096), repeats: int = 5) -> float:
    """Best float32 matrix-multiply GFLOP/s of numpy and torch on this machine's cores."""
    import torch

    torch.set_num_threads(available_cores())
    best = 0.0
    for size in sizes:
        a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
        for x, multiply in ((a, np.matmul), (torch.from_numpy(a), torch.mm)):
            multiply(x, x)
            for _ in range(repeats):
                started = time.perf_counter()
                multiply(x, x)
                best = max(best, 2 * size**3 / (time.perf_counter() - started) / 1e9)
    return best


def crops_of(folder: Path, model_manifest, count: int) -> np.ndarray:
    paths = sorted(folder.rglob("*.jpg"))[:count]
    return np.stack([decode_file(path, [model_manifest.preprocessing]).crops[0] for path in paths])


def timed_rate(run, batch: int, min_seconds: float = MIN_SECONDS) -> float:
    """Images per second of ``run()`` (one batch each), over at least ``min_seconds`` after a warm-up."""
    run()
    done, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < min_seconds or done < 3 * batch:
        run()
        done += batch
    return done / (time.perf_counter() - started) if elapsed else 0.0


def library_network(model: str, weights: str, image_size: int):
    """The model as its library builds it (timm's or torchvision's module, headless), with the exported weights,
    behind the same normalisation: what a user would run in eager PyTorch instead."""
    from pipeline.models.export import EmbeddingNet
    from pipeline.models.networks import build_network
    from pipeline.models.weights import parse_weights

    name = parse_model_name(model)
    network = build_network(name, parse_weights(name, weights), image_size)
    return EmbeddingNet(network.module, network.preprocessing.mean, network.preprocessing.std).eval()


def torch_eager_rate(model: str, weights: str, crops: np.ndarray, min_seconds: float) -> float:
    """(a) the library's module in eager mode, normalisation included, on the CPU's cores."""
    import torch

    torch.set_num_threads(available_cores())
    net = library_network(model, weights, crops.shape[1])
    batch = torch.from_numpy(crops)
    with torch.inference_mode():
        return timed_rate(lambda: net(batch), len(crops), min_seconds)


def flops_per_image(model: str, image_size: int) -> float:
    """Floating-point operations of one forward pass (2 per multiply-add), counted by torch (NaN when its counter
    cannot follow the model). Gradients are off on the parameters rather than by ``inference_mode``, inside which
    the counter fails on some modules (timm's attention pool)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    net = library_network(model, "random", image_size)
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            net(torch.zeros(1, image_size, image_size, 3, dtype=torch.uint8))
    except Exception:  # the counter's own failures; the rows then have no GFLOP/s
        return float("nan")
    return float(counter.get_total_flops())


def in_child(task: str, *arguments: object) -> dict:
    """Run ``task`` in a fresh process: its threads compete with nothing and its peak memory is its own.
    ``process_seconds`` is the whole process's time, from its start (interpreter, imports) to its exit."""
    command = [sys.executable, __file__, "--child", task, *map(str, arguments)]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode:
        raise RuntimeError(f"{task} failed: {result.stderr[-2000:]}")
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "process_seconds": seconds}


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss it is not inherited through fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(task: str, *arguments: str) -> None:
    """The tasks ``in_child`` runs; prints one JSON line."""
    if task == "cuda":
        models_dir, model = arguments
        out = {"usable": ModelRepository(models_dir).load(model).open("auto").provider == CUDA}
    elif task == "extract":  # workers, threads, cores: 0 for extract's defaults
        data, model, precision, cache, models_dir, weights, device, workers, threads, cores = arguments
        if int(cores):
            pin_to_cores(int(cores))
        if int(threads):  # onnxruntime's intra-op threads, which extract leaves at every available core
            from pipeline.models import ExportedModel

            ExportedModel.open = functools.partialmethod(ExportedModel.open, threads=int(threads))
        remove_store(Path(cache))
        started = time.perf_counter()
        specs = run_extract(data, models=[model], cache=cache, models_dir=models_dir, weights=weights,
                            precision=precision,
                            device=device, progress=False, workers=int(workers) or None)
        seconds = time.perf_counter() - started
        out = {"images": specs[0].embedded, "seconds": seconds, "rate": specs[0].embedded / seconds,
               "inference_seconds": specs[0].seconds}
    elif task == "torchvision_recipe":
        photos, model, weights = arguments
        out = {"images": torchvision_recipe(Path(photos), model, weights)}
    else:
        photos, model, models_dir, weights, min_seconds, device = arguments
        session = ModelRepository(models_dir).load(model).open(device)
        batch = session.default_batch_size
        crops = crops_of(Path(photos), session.manifest, batch)
        if task == "torch":
            out = {"rate": torch_eager_rate(session.manifest.model, weights, crops, float(min_seconds))}
        else:
            out = {"rate": timed_rate(lambda: session.embed(crops), batch, float(min_seconds)), "batch": batch}
    print(json.dumps({**out, "peak_rss_mb": peak_rss_mb()}))


def torchvision_recipe(photos: Path, model: str, weights: str) -> int:
    """torchvision's documented way to embed a folder: an ImageFolder with the weights' preprocessing
    (Resize, CenterCrop, ToTensor, Normalize), a DataLoader with one worker process per core, the headless
    model in eager mode under ``inference_mode``; the embeddings are kept, as extract keeps its own.
    Returns the number of images embedded."""
    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    torch.set_num_threads(available_cores())
    net = library_network(model, weights, 224)
    trunk, preprocessing = net.trunk, DEFAULT_BACKBONES[model].preprocessing(crop_size=224)
    transform = transforms.Compose([
        transforms.Resize(preprocessing.resize_size), transforms.CenterCrop(preprocessing.crop_size),
        transforms.ToTensor(), transforms.Normalize(preprocessing.mean, preprocessing.std),
    ])
    loader = DataLoader(datasets.ImageFolder(str(photos), transform), batch_size=BATCH, num_workers=available_cores())
    embeddings = []
    with torch.inference_mode():
        for images, _ in loader:
            embeddings.append(trunk(images).numpy())
    return sum(len(batch) for batch in embeddings)


def remove_store(cache: Path) -> None:
    """A store and its shards folder, so that a run starts from nothing."""
    import shutil

    for path in cache.parent.glob(cache.name + "*"):
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def thread_budget(data: Path, name: str, models_dir: Path, weights: str, work: Path) -> list[dict]:
    """End-to-end extract of ``name`` with 1 and every core's worth of decode threads, against 1 and every
    core's worth of onnxruntime threads; extract's default is the last."""
    model_name, precision = parse_feature_set(name)
    model, cores = model_name.name, available_cores()
    rows = []
    for workers in sorted({1, cores}):
        for threads in sorted({1, cores}):
            run = in_child("extract", data, model, precision, work / "threads.h5", models_dir, weights, "cpu",
                           workers, threads, 0)
            rows.append({"decode_threads": workers, "onnxruntime_threads": threads, "images_per_s": run["rate"],
                         "default": workers == threads == cores})
    remove_store(work / "threads.h5")
    return rows


def host_ceiling(photos: Path, model: str, models_dir: Path, weights: str, work: Path) -> dict:
    """The whole extract path with a zero-cost backbone of ``model``'s contract, on one core and on every core
    (with as many decode threads)."""
    zero_cost_backbone(models_dir, model, work / "zero-cost-models")
    images = len(list(photos.rglob("*.jpg")))
    runs = {}
    for cores in sorted({1, available_cores()}):
        run = in_child("extract", photos, model, "fp32", work / "host.h5", work / "zero-cost-models", weights,
                       "cpu", cores, 0, cores)
        runs[cores] = {"images_per_s": run["rate"], "images_per_s_per_core": run["rate"] / cores,
                       "seconds": run["seconds"], "peak_rss_mb": run["peak_rss_mb"]}
    remove_store(work / "host.h5")
    widest = runs[max(runs)]
    return {"images": images, "photo_size": list(PHOTO_SIZE), "cores": runs,
            "core_seconds_per_image": max(runs) / widest["images_per_s"]}


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, 1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def stored(cache: Path, name: str) -> np.ndarray:
    features = EmbeddingStore(cache).load(name)
    return features.embeddings[np.argsort(features.paths)]


def digits_accuracy(work: Path, models: list[str], models_dir: Path, weights: str, per_class: int) -> dict:
    """Test accuracy of logistic regression on fp32 and int8 embeddings of the same digit scans and split."""
    from pipeline.demo import write_digits
    from pipeline.fit.run import run_fit

    data = work / "digits"
    write_digits(data, per_class)
    cache = work / "digits.h5"
    for precision in ("fp32", "int8"):
        run_extract(data, models=models, cache=cache, models_dir=models_dir, weights=weights, precision=precision,
                    device="cpu",
                    progress=False)
    names = [feature_set_name(f"{m}-{p}") if p != "fp32" else m for m in models for p in ("fp32", "int8")]
    report = run_fit(cache, models=names, classifiers=["logreg"], out=work / "classifiers", curve=False, reuse=True)
    return {r["features"]: {"accuracy": r["test"]["accuracy"], "n_test": r["n_test"]} for r in report["results"]}


def pure_inference(rates: dict[str, float], flops: float, peak: float) -> dict:
    """Each rate beside eager PyTorch's, and as GFLOP/s against the float32 matmul peak."""
    return {
        name: {"images_per_s": rate, "vs_torch_eager": rate / rates["torch_eager"], "gflops": rate * flops / 1e9,
               "of_matmul_peak": rate * flops / 1e9 / peak}
        for name, rate in rates.items()
    }


def prepare(repository: ModelRepository, model: str, weights: str, photos: Path, calibration: int) -> dict:
    """Export ``model`` (its own size) and make its int8 variant, calibrated on ``calibration`` of the photos; the
    variant is left out when its fidelity to fp32 is refused. Returns what was made."""
    source = repository.export(model, weights).model
    made = {"source": source, "int8": repository.current_variant(source, "int8")}
    if made["int8"] is None:
        crops = calibration_crops(discover(photos), source.preprocessing)
        try:
            made["int8"] = repository.variant(source, "int8", crops, calibration)
        except UserError as error:
            made["refused"] = str(error)
    return made


def end_to_end(photos: Path, name: str, precision: str, device: str, args: argparse.Namespace, weights: str,
               reference: float, pure: float) -> dict:
    """Extract from the JPEG photos into a store, in a fresh process, beside eager PyTorch and pure inference."""
    cache = args.work / f"photos-{parse_model_name(name).stem}-{precision}.h5"
    run = in_child("extract", photos, name, precision, cache, args.models_dir, weights, device, 0, 0, 0)
    return {**run, "vs_torch_eager": run["rate"] / reference, "of_pure_inference": run["rate"] / pure,
            "whole_process_images_per_s": run["images"] / run["process_seconds"]}


def int8_fidelity(args: argparse.Namespace, model: str) -> dict:
    """Cosine of every photo's int8 embedding to its fp32 one (the end-to-end stores)."""
    stem = parse_model_name(model).stem
    similarity = cosine(stored(args.work / f"photos-{stem}-int8.h5", f"{stem}-int8"),
                        stored(args.work / f"photos-{stem}-fp32.h5", stem))
    return {"images": len(similarity), "min": float(similarity.min()), "mean": float(similarity.mean())}


def default_backbone_entry(model: str, args: argparse.Namespace, weights: str, photos: Path, peak: float) -> dict:
    """Every row of a default backbone: pure inference on CPU (and CUDA when usable), end to end, torchvision's
    documented recipe, the thread budget and int8 fidelity."""
    repository = ModelRepository(args.models_dir)
    prepare(repository, model, weights, photos, 100)
    flops = flops_per_image(model, 224)

    def rate_of(task: str, name: str, device: str = "cpu") -> float:
        return in_child(task, photos, name, args.models_dir, weights, args.min_seconds, device)["rate"]

    rates = {"torch_eager": rate_of("torch", model), "ort_fp32": rate_of("ort", model),
             "ort_int8": rate_of("ort", f"{model}-int8")}
    cuda = in_child("cuda", args.models_dir, model)["usable"]
    if cuda:  # fp16 needs no calibration; TensorRT is not measured
        repository.variant(repository.load(model), "fp16",
                           calibration_crops(discover(photos), repository.load(model).preprocessing))
        rates["cuda_fp32"] = rate_of("ort", model, "cuda")
        rates["cuda_fp16"] = rate_of("ort", f"{model}-fp16", "cuda")
    entry = {"gflop_per_image": flops / 1e9, "pure_inference": pure_inference(rates, flops, peak), "end_to_end": {}}
    recipe = in_child("torchvision_recipe", photos, model, weights)
    entry["torchvision_recipe"] = {**recipe, "images_per_s": recipe["images"] / recipe["process_seconds"]}
    runs = [("fp32", "cpu", "ort_fp32"), ("int8", "cpu", "ort_int8")] + (
        [("fp16", "cuda", "cuda_fp16")] if cuda else [])
    for precision, device, pure in runs:
        run = end_to_end(photos, model, precision, device, args, weights, rates["torch_eager"], rates[pure])
        run["vs_torchvision_recipe"] = run["whole_process_images_per_s"] / entry["torchvision_recipe"]["images_per_s"]
        entry["end_to_end"][precision if device == "cpu" else f"cuda_{precision}"] = run
    entry["thread_budget_int8"] = thread_budget(photos, f"{model}-int8", args.models_dir, weights, args.work)
    entry["int8_cosine_to_fp32"] = int8_fidelity(args, model)
    return entry


def curated_entry(model: str, args: argparse.Namespace, weights: str, photos: Path, peak: float) -> dict:
    """A curated model at its own size and recipe: eager PyTorch (its library's module) against onnxruntime fp32
    and int8 (where kept) on pre-decoded crops and end to end from the JPEG photos, with int8's fidelity."""
    repository = ModelRepository(args.models_dir)
    made = prepare(repository, model, weights, photos, 100)
    size = made["source"].preprocessing.crop_size
    flops = flops_per_image(model, size)

    def rate_of(task: str, name: str) -> float:
        return in_child(task, photos, name, args.models_dir, weights, args.min_seconds, "cpu")["rate"]

    rates = {"torch_eager": rate_of("torch", model), "ort_fp32": rate_of("ort", model)}
    if made["int8"] is not None:
        rates["ort_int8"] = rate_of("ort", made["int8"].name)
    entry = {"image_size": size, "gflop_per_image": flops / 1e9, "pure_inference": pure_inference(rates, flops, peak),
             "end_to_end": {}}
    for precision, pure in (("fp32", "ort_fp32"), ("int8", "ort_int8")):
        if pure in rates:
            entry["end_to_end"][precision] = end_to_end(photos, model, precision, "cpu", args, weights,
                                                        rates["torch_eager"], rates[pure])
    if made["int8"] is not None:
        verification = made["int8"].manifest.verification
        entry["int8_fidelity_at_creation"] = {key: verification[key] for key in ("images", "min_cosine", "mean_cosine")}
        entry["int8_operators"] = made["int8"].manifest.calibration.get("operators")
        entry["int8_cosine_to_fp32"] = int8_fidelity(args, model)
    else:
        entry["int8_refused"] = made["refused"]
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=list(DEFAULT_BACKBONES), choices=list(DEFAULT_BACKBONES))
    parser.add_argument("--curated", nargs="*", default=[m.name for m in CURATED if m.name not in DEFAULT_BACKBONES],
                        help="curated models of other families to measure (default: all; none to skip)")
    parser.add_argument("--photos", type=int, default=400, help="JPEG photos for end-to-end extract (default: 400)")
    parser.add_argument("--curated-photos", type=int, default=100,
                        help="JPEG photos for the curated models' end-to-end rows (default: 100)")
    parser.add_argument("--digits-per-class", type=int, default=60,
                        help="digit scans per class for accuracy (default: 60)")
    parser.add_argument("--memory-images", type=int, nargs="*", default=[1000, 10000],
                        help="photo counts for the memory check, resnet50 int8 (default: 1000 10000; none to skip)")
    parser.add_argument("--work", type=Path, default=Path("build/bench"),
                        help="its own exported models, photos and stores (default: build/bench)")
    parser.add_argument("--min-seconds", type=float, default=MIN_SECONDS,
                        help="time each pure-inference rate this long")
    parser.add_argument("--host-photos", type=int, default=2000,
                        help="JPEG photos for the zero-cost-backbone rows (default: 2000)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/bench.json"))
    args = parser.parse_args(argv)
    args.models_dir = args.work / "models"  # its own exports and int8 variants, calibrated on its photos
    from pipeline.demo import demo_weights

    started = time.perf_counter()
    weights = "imagenet" if args.models and all(demo_weights(m) == "imagenet" for m in args.models) else "random"
    result = {"machine": machine(), "weights": weights, "int8_calibration": "100 of the bench photos",
              "image_size": 224, "batch_size": BATCH, "models": {}}
    result["matmul_peak_gflops"] = peak = matmul_peak()
    print(f"machine: {result['machine']}\nfloat32 matmul peak: {peak:.0f} GFLOP/s; weights: {weights}"
          + (" (UNTRAINED: speed is representative, fidelity is of random weights)" if weights == "random" else ""))
    photos = make_photos(args.work / "photos", args.photos)
    result["decode"] = decode_costs(photos, make_photos(args.work / "large-photos", 8, size=(2560, 1920)))
    print(f"decode: {result['decode']}", flush=True)
    for model in args.models:
        result["models"][model] = default_backbone_entry(model, args, weights, photos, peak)
        print(f"{model}: {json.dumps(result['models'][model], indent=1)}", flush=True)
    curated_photos = make_photos(args.work / "curated-photos", args.curated_photos, seed=3)
    for model in args.curated:  # the libraries' pretrained weights cannot be had offline: random (seeded) ones
        result["models"][model] = curated_entry(model, args, "random", curated_photos, peak)
        print(f"{model}: {json.dumps(result['models'][model], indent=1)}", flush=True)
    if args.models:
        host_photos = make_photos(args.work / "host-photos", args.host_photos, seed=7)
        result["host"] = host_ceiling(host_photos, args.models[0], args.models_dir, weights, args.work)
        print(f"host: {json.dumps(result['host'])}", flush=True)
        result["digits_logreg_accuracy"] = digits_accuracy(args.work, args.models, args.models_dir, weights,
                                                           args.digits_per_class)
    if args.memory_images and "resnet50" in args.models:
        memory = {}
        for count in args.memory_images:
            folder = make_photos(args.work / f"memory-{count}", count, seed=count)
            memory[count] = in_child("extract", folder, "resnet50", "int8", args.work / f"memory-{count}.h5",
                                     args.models_dir, weights, "cpu", 0, 0, 0)
            print(f"memory, {count} photos: {memory[count]}", flush=True)
        result["memory_resnet50_int8"] = memory
    result["seconds"] = time.perf_counter() - started
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"wrote {args.out} in {result['seconds']:.0f} s")
    return 0


def print_table(result: dict) -> None:
    """The README's tables: inference and extract against eager PyTorch and torchvision's recipe, the thread budget,
    the host side."""
    print("\n| model | path | images/s | vs torch eager | "
          f"G(FL)OP/s (share of {result['matmul_peak_gflops']:.0f} GFLOP/s "
          "fp32 matmul) | peak memory | int8 fidelity |")
    print("|---|---|---|---|---|---|---|")
    accuracy = result.get("digits_logreg_accuracy", {})
    for model, entry in result["models"].items():
        for name, row in entry["pure_inference"].items():
            fidelity = ""
            if name == "ort_int8":
                fidelity = f"cosine to fp32 min {entry['int8_cosine_to_fp32']['min']:.4f}"
                if model in accuracy:
                    fidelity += ("; digits accuracy "
                                 f"{accuracy.get(f'{model}-int8', {}).get('accuracy', float('nan')):.3f}"
                                 f" vs {accuracy[model]['accuracy']:.3f} fp32")
            print(f"| {model} | {name} (pre-decoded) | {row['images_per_s']:.1f} | {row['vs_torch_eager']:.2f}x | "
                  f"{row['gflops']:.0f} ({row['of_matmul_peak']:.0%}) | | {fidelity} |")
        if entry.get("int8_refused"):
            print(f"| {model} | int8 | refused | | | | {entry['int8_refused']} |")
        for name, run in entry["end_to_end"].items():
            print(f"| {model} | extract {name}, JPEG to HDF5 | {run['rate']:.1f} | {run['vs_torch_eager']:.2f}x | "
                  f"{run['of_pure_inference']:.0%} of pure inference | {run['peak_rss_mb']:.0f} MB | |")
    for count, run in result.get("memory_resnet50_int8", {}).items():
        print(f"| resnet50 | extract int8, {count} photos | {run['rate']:.1f} | | | {run['peak_rss_mb']:.0f} MB | |")

    recipes = {model: entry for model, entry in result["models"].items() if "torchvision_recipe" in entry}
    print("\n| model | whole process, the same photos | images/s | vs torchvision's recipe |")
    print("|---|---|---|---|")
    for model, entry in recipes.items():
        print(f"| {model} | torchvision recipe (ImageFolder, DataLoader, eager) | "
              f"{entry['torchvision_recipe']['images_per_s']:.1f} | 1.00x |")
        for name, run in entry["end_to_end"].items():
            print(f"| {model} | extract {name} | {run['whole_process_images_per_s']:.1f} | "
                  f"{run['vs_torchvision_recipe']:.2f}x |")

    print("\n| model | decode threads | onnxruntime threads | images/s, int8 end to end |")
    print("|---|---|---|---|")
    for model, entry in recipes.items():
        for row in entry["thread_budget_int8"]:
            default = " (default)" if row["default"] else ""
            print(f"| {model} | {row['decode_threads']} | {row['onnxruntime_threads']} | "
                  f"{row['images_per_s']:.1f}{default} |")

    if "host" in result:
        host = result["host"]
        print(f"\n| zero-cost backbone, {host['images']} photos of {host['photo_size'][0]}x{host['photo_size'][1]} | "
              "images/s | per core |")
        print("|---|---|---|")
        for cores, run in host["cores"].items():
            print(f"| {cores} core{'s' if int(cores) > 1 else ''}, as many decode threads | "
                  f"{run['images_per_s']:.0f} | {run['images_per_s_per_core']:.0f} |")
    steps = result["decode"]["photos_640x480"]["ms"]
    print("\ndecode_file, 640x480 JPEG, one core: " + ", ".join(f"{name} {ms:.2f} ms" for name, ms in steps.items()))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
    else:
        sys.exit(main())
