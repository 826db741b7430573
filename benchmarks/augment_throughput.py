"""Augmentation throughput on real photographs: ours against what a user would pick instead.

    .venv-bench/bin/python benchmarks/augment_throughput.py [--suites views ops device]
        [--images 64] [--repeats 3] [--batch 32] [--write-doc] [--json out.json]

Suites (each contender sees the same JPEG bytes: ``benchmarks/photos.py`` cuts ~450 x 380 px
windows from real photographs and encodes them at quality 90):

* ``views`` (issue benchmark (a)): images per second per core, decode included, for SimCLR's two
  224 px views and SwAV's multi-crop (2 x 224 + 6 x 96): ``scale_ssl``'s ``SimCLRViews`` /
  ``MultiCropViews`` (CPU path; and the loader half of the device path), lightly 1.6's
  ``SimCLRTransform`` / ``SwaVTransform``, torchvision's classic PIL pipeline (the MoCo v2 /
  SwAV repositories' ``torchvision.transforms`` on PIL images with PIL's GaussianBlur), and
  decoding alone (PIL, OpenCV, ``torchvision.io.decode_jpeg``).
* ``ops``: each op of one view on a 224 px crop, by library (PIL, OpenCV, torchvision's tensor
  ops): the measurements behind the per-op choices of ``scale_ssl/data/cpu_augment.py``.
* ``device`` (issue benchmark (b)): the device half (``data.augment_on: device``) on this CPU,
  batched: ``DeviceViewAugment`` against kornia 0.9 (``kornia.augmentation``, its own parameter
  draws) and an NVIDIA DALI 2.4 CPU pipeline (``device_id=None``), and a cost model of one GPU
  from the bytes and FLOPs ``DeviceViewAugment`` moves per image.

Everything runs in this one process on one thread (torch, OpenCV and DALI each set to one), so
"per core" is literal. Contenders are interleaved in small chunks of images (ABC ABC ...), each
chunk timed with the process's CPU clock (``time.process_time``: it excludes time the process
waits descheduled on a shared machine), and a rotation is one pass of every contender over all
images; the tables give medians over rotations and, for ratios, the median of per-rotation
ratios with its min-max. It rewrites the ``## Augmentation`` section's tables of
docs/BENCHMARKS.md with ``--write-doc``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import statistics
import sys
import time

import numpy as np
import PIL.Image
import PIL.ImageFilter

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import cv2  # noqa: E402
import torch  # noqa: E402

import doc_region  # noqa: E402
from photos import benchmark_jpegs  # noqa: E402
from scale_ssl.data import MultiCropViews, SimCLRViews  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CHUNK = 4
DOC = os.path.join(ROOT, "docs", "BENCHMARKS.md")
SECTION = "## Augmentation"


# -- contenders -------------------------------------------------------------------------------------
class PILGaussianBlur:
    """The MoCo v2 / SwAV repositories' blur: PIL's GaussianBlur with sigma ~ U(0.1, 2.0)."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, image):
        return image.filter(PIL.ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


def classic_view(size: int, scale) -> object:
    import torchvision.transforms as T

    return T.Compose([
        T.RandomResizedCrop(size, scale=scale), T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8), T.RandomGrayscale(p=0.2),
        T.RandomApply([PILGaussianBlur()], p=0.5), T.ToTensor(), T.Normalize(MEAN, STD),
    ])


def pil_decode(data: bytes) -> PIL.Image.Image:
    return PIL.Image.open(io.BytesIO(data)).convert("RGB")


def view_contenders(kind: str) -> dict:
    """name -> callable(jpeg bytes); the first is the reference of the ratios."""
    from lightly.transforms import SimCLRTransform, SwaVTransform

    if kind == "two views":
        lightly_tf = SimCLRTransform(input_size=224)
        ours, ours_device = SimCLRViews(224, 3, MEAN, STD), SimCLRViews(224, 3, MEAN, STD, augment_on="device")
        view = classic_view(224, (0.08, 1.0))
        classic = [view, view]
    else:
        lightly_tf = SwaVTransform(crop_sizes=(224, 96), crop_counts=(2, 6), crop_min_scales=(0.14, 0.05),
                                   crop_max_scales=(1.0, 0.14))
        ours, ours_device = MultiCropViews(3, MEAN, STD), MultiCropViews(3, MEAN, STD, augment_on="device")
        classic = [classic_view(224, (0.14, 1.0))] * 2 + [classic_view(96, (0.05, 0.14))] * 6
    return {
        "lightly": lambda data: lightly_tf(pil_decode(data)),
        "torchvision classic (PIL)": lambda data: [t(image) for image in [pil_decode(data)] for t in classic],
        "ours, augment_on=cpu": lambda data: ours(ours.decode(data)),
        "ours, augment_on=device (loader half)": lambda data: ours_device(ours_device.decode(data)),
    }


def decode_contenders() -> dict:
    import torchvision

    from scale_ssl.data.decode import decode_image

    return {
        "decode only: PIL": lambda data: np.asarray(pil_decode(data)),
        "decode only: OpenCV (ours)": lambda data: decode_image(data, 3),
        "decode only: torchvision.io.decode_jpeg": lambda data: torchvision.io.decode_jpeg(
            torch.frombuffer(bytearray(data), dtype=torch.uint8)),
    }


def interleaved_rates(contenders: dict, items: list, repeats: int) -> dict[str, list[float]]:
    """Items per CPU-second of each contender, one value per rotation."""
    names = list(contenders)
    for name in names:  # warm-up: imports, caches, lazy initialisation
        for item in items[:2]:
            contenders[name](item)
    rates = {name: [] for name in names}
    for rotation in range(repeats):
        spent = dict.fromkeys(names, 0.0)
        for start in range(0, len(items), CHUNK):
            chunk = items[start:start + CHUNK]
            order = names[rotation % len(names):] + names[:rotation % len(names)]
            for name in order:
                begin = time.process_time()
                for item in chunk:
                    contenders[name](item)
                spent[name] += time.process_time() - begin
        for name in names:
            rates[name].append(len(items) / spent[name])
    return rates


def spread(values) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def run_views(args, jpegs) -> dict:
    result = {}
    for kind in ("two views", "multi-crop"):
        contenders = view_contenders(kind)
        if kind == "two views":
            contenders.update(decode_contenders())
        rates = interleaved_rates(contenders, jpegs, args.repeats)
        result[kind] = {"rates": rates}
        for name, values in rates.items():
            print(f"[views] {kind:10s} {name:42s} {statistics.median(values):8.1f} images/s per core", flush=True)
    return result


# -- per op -------------------------------------------------------------------------------------------
def op_contenders(crop: np.ndarray, source: np.ndarray) -> dict[str, dict]:
    """op -> {library: callable()} on one 224 px crop (``source`` is the decoded photo for the crop op)."""
    import PIL.ImageEnhance
    import PIL.ImageOps
    import torchvision.transforms.v2.functional as F

    from scale_ssl.data import cpu_augment as ours

    pil, tensor = PIL.Image.fromarray(crop), torch.from_numpy(crop).permute(2, 0, 1).contiguous()
    pil_source = PIL.Image.fromarray(source)
    box_params = [10.0, 20.0, 300.0, 330.0] + [0.0] * 14
    normalize = ours.Normalizer(MEAN, STD)
    return {
        "crop 300x330 + resize to 224": {
            "PIL": lambda: pil_source.resize((224, 224), PIL.Image.BILINEAR, box=(20, 10, 350, 310)),
            "OpenCV (ours)": lambda: ours.crop_resize(source, box_params, 224),
            "torchvision tensor": lambda: F.resized_crop(torch.from_numpy(source).permute(2, 0, 1), 10, 20, 300, 330,
                                                         [224, 224], antialias=True)},
        "brightness": {"PIL": lambda: PIL.ImageEnhance.Brightness(pil).enhance(1.3),
                       "OpenCV (ours)": lambda: ours.adjust_brightness(crop, 1.3),
                       "torchvision tensor": lambda: F.adjust_brightness(tensor, 1.3)},
        "contrast": {"PIL": lambda: PIL.ImageEnhance.Contrast(pil).enhance(1.3),
                     "OpenCV (ours)": lambda: ours.adjust_contrast(crop, 1.3),
                     "torchvision tensor": lambda: F.adjust_contrast(tensor, 1.3)},
        "saturation": {"PIL": lambda: PIL.ImageEnhance.Color(pil).enhance(1.3),
                       "OpenCV (ours)": lambda: ours.adjust_saturation(crop, 1.3),
                       "torchvision tensor": lambda: F.adjust_saturation(tensor, 1.3)},
        "hue": {"PIL (torchvision's PIL path)": lambda: F.adjust_hue(pil, 0.1),
                "OpenCV (ours)": lambda: ours.adjust_hue(crop, 0.1),
                "torchvision tensor": lambda: F.adjust_hue(tensor, 0.1)},
        "grayscale": {"PIL": lambda: pil.convert("L").convert("RGB"),
                      "OpenCV (ours)": lambda: cv2.cvtColor(cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB),
                      "torchvision tensor": lambda: F.rgb_to_grayscale(tensor, num_output_channels=3)},
        "gaussian blur sigma 1.0": {"PIL": lambda: pil.filter(PIL.ImageFilter.GaussianBlur(1.0)),
                                    "OpenCV (ours)": lambda: ours.gaussian_blur(crop, 1.0, 23),
                                    "torchvision tensor": lambda: F.gaussian_blur(tensor, [23, 23], [1.0, 1.0])},
        "solarize": {"PIL": lambda: PIL.ImageOps.solarize(pil, 128),
                     "OpenCV (ours)": lambda: cv2.LUT(crop, ours._SOLARIZE_LUT),
                     "torchvision tensor": lambda: F.solarize(tensor, 128)},
        "to normalised float": {"PIL -> torchvision to_tensor + normalize": lambda: F.normalize(
                                    F.to_dtype(F.pil_to_tensor(pil), torch.float32, scale=True), MEAN, STD),
                                "numpy (ours)": lambda: normalize(crop)},
    }


def run_ops(args, jpegs) -> dict:
    from scale_ssl.data.decode import decode_image

    source = decode_image(jpegs[0], 3)
    crop = cv2.resize(source[:300, :330], (224, 224))
    result = {}
    for op, libraries in op_contenders(crop, source).items():
        calls = list(range(40))
        rates = interleaved_rates({name: (lambda _, fn=fn: fn()) for name, fn in libraries.items()}, calls,
                                  args.repeats)
        result[op] = {name: 1000.0 / statistics.median(values) for name, values in rates.items()}  # ms per call
        print(f"[ops] {op:32s} " + ", ".join(f"{n}: {ms:.3f} ms" for n, ms in result[op].items()), flush=True)
    return result


# -- device half ----------------------------------------------------------------------------------------
def device_batch(jpegs, batch: int):
    """One batch of real loader output for the device half: (uint8 crops, params) for two views."""
    views = SimCLRViews(224, 3, MEAN, STD, augment_on="device")
    samples = [views(views.decode(jpegs[i % len(jpegs)])) for i in range(batch)]
    return tuple((torch.stack([s[v][0] for s in samples]), torch.stack([s[v][1] for s in samples])) for v in range(2))


def kornia_pipeline():
    import kornia.augmentation as K

    # The published parameters in kornia's own modules; kornia draws its own factors (per sample)
    # and one jitter order for the whole batch.
    return torch.nn.Sequential(
        K.RandomHorizontalFlip(),
        K.ColorJitter(0.8, 0.8, 0.8, 0.2, p=0.8),
        K.RandomGrayscale(p=0.2),
        K.RandomGaussianBlur((23, 23), (0.1, 2.0), p=0.5),
        K.Normalize(mean=torch.tensor(MEAN), std=torch.tensor(STD)),
    )


def dali_pipeline(batch: int):
    """The same ops as an NVIDIA DALI pipeline on the CPU, per-sample arguments from our parameter
    rows. DALI has no per-sample random order: brightness/contrast then saturation/hue (YIQ-space
    ``hsv``), contrast about mid-grey rather than the image mean."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def pipe():
        x = fn.external_source(name="crops", layout="HWC", dtype=types.UINT8)
        flip = fn.external_source(name="flip", dtype=types.INT32)
        brightness = fn.external_source(name="brightness", dtype=types.FLOAT)
        contrast = fn.external_source(name="contrast", dtype=types.FLOAT)
        saturation = fn.external_source(name="saturation", dtype=types.FLOAT)
        hue = fn.external_source(name="hue", dtype=types.FLOAT)
        sigma = fn.external_source(name="sigma", dtype=types.FLOAT)
        blur = fn.external_source(name="blur", dtype=types.UINT8)
        x = fn.flip(x, horizontal=flip)
        x = fn.brightness_contrast(x, brightness=brightness, contrast=contrast)
        x = fn.hsv(x, hue=hue, saturation=saturation)
        x = blur * fn.gaussian_blur(x, sigma=sigma, window_size=23) + (1 - blur) * x
        return fn.crop_mirror_normalize(x, mean=[255 * m for m in MEAN], std=[255 * s for s in STD],
                                        output_layout="CHW", dtype=types.FLOAT)

    pipeline = pipe()
    pipeline.build()
    return pipeline


def dali_feed(crops: torch.Tensor, params: torch.Tensor) -> dict:
    from scale_ssl.data import view_recipe as P

    p = params.numpy()
    jitter = p[:, P.JITTER] > 0.5
    gray = p[:, P.GRAYSCALE] > 0.5

    def column(values, dtype=np.float32):
        return [np.array(v, dtype=dtype) for v in values]

    return {
        "crops": [np.ascontiguousarray(c.permute(1, 2, 0).numpy()) for c in crops],
        "flip": column(p[:, P.FLIP], np.int32),
        "brightness": column(np.where(jitter, p[:, P.BRIGHTNESS], 1.0)),
        "contrast": column(np.where(jitter, p[:, P.CONTRAST], 1.0)),
        "saturation": column(np.where(gray, 0.0, np.where(jitter, p[:, P.SATURATION], 1.0))),
        "hue": column(np.where(jitter, p[:, P.HUE] * 360.0, 0.0)),
        "sigma": column(p[:, P.SIGMA]),
        "blur": column(p[:, P.BLUR], np.uint8),
    }


def device_contenders(jpegs, batch: int) -> dict:
    from scale_ssl.data.device_augment import DeviceViewAugment

    views = device_batch(jpegs, batch)
    ours = DeviceViewAugment(MEAN, STD)
    contenders = {"ours: DeviceViewAugment": lambda _: ours(views)}
    try:
        kornia = kornia_pipeline()
        floats = [crops.float() / 255 for crops, _ in views]
        contenders["kornia 0.9 (kornia.augmentation)"] = lambda _: [kornia(x) for x in floats]
    except ImportError as error:
        print(f"[device] kornia not installed ({error}); skipped", flush=True)
    try:
        pipeline = dali_pipeline(batch)
        feeds = [dali_feed(*view) for view in views]

        def run_dali(_):
            out = []
            for feed in feeds:
                for name, data in feed.items():
                    pipeline.feed_input(name, data)
                out.append(pipeline.run()[0].as_tensor())
            return out
        contenders["NVIDIA DALI 2.4 (CPU, device_id=None)"] = run_dali
    except ImportError as error:
        print(f"[device] DALI not installed ({error}); skipped", flush=True)
    return contenders


class _TrafficCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes read + written, convolution FLOPs and kernel launches of every aten op that computes
    (views move nothing; an indexed write moves only the rows it writes): what a GPU would do."""

    def __init__(self):
        super().__init__()
        self.bytes, self.flops, self.kernels = 0, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        if returns and returns[0].alias_info is not None and not returns[0].alias_info.is_write:
            return out  # a view
        if any(isinstance(a, torch.Tensor) and a.device.type == "cpu" and a.dtype == torch.float64
               for a in torch.utils._pytree.tree_leaves(args)):
            return out  # the host copy of the parameter rows
        if func in (torch.ops.aten.index_put_.default, torch.ops.aten._index_put_impl_.default):
            values = args[2]
            self.bytes += 2 * values.numel() * values.element_size()
        elif func is torch.ops.aten.index.Tensor:  # a gather reads only the rows it returns
            self.bytes += 2 * out.numel() * out.element_size()
        else:
            tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(a, torch.Tensor)]
            self.bytes += sum(t.numel() * t.element_size() for t in tensors)
        self.kernels += 1
        if func is torch.ops.aten.convolution.default:
            self.flops += 2 * out.numel() * args[1][0].numel()
        return out


GPU_BATCH = 256  # images per GPU step the model is stated for


def cost_model(jpegs, batch: int, ours_rate: float, loader_rate: float, cpu_rate: float) -> dict:
    """One A100-40GB SXM's time for the device half at 256 images per step, from the bytes and
    FLOPs DeviceViewAugment moves per image (counted op by op on a batch of ``batch``; both grow
    with the batch) and its kernel launches per step (which do not), at stated efficiencies; and
    the CPU cores per GPU each path needs to feed 1,000 images/s."""
    from scale_ssl.data.device_augment import DeviceViewAugment

    views = device_batch(jpegs, batch)
    counter = _TrafficCounter()
    with counter:
        DeviceViewAugment(MEAN, STD)(views)
    bandwidth, flops_peak, launch = 1.555e12, 19.5e12, 5e-6  # HBM2 B/s, fp32 FLOP/s, s per kernel launch
    efficiency = 0.5
    per_image = counter.bytes / batch / (bandwidth * efficiency) + counter.flops / batch / (flops_peak * efficiency)
    seconds = GPU_BATCH * per_image + counter.kernels * launch
    return {"batch": batch, "gpu_batch": GPU_BATCH, "bytes_per_image": counter.bytes / batch,
            "flops_per_image": counter.flops / batch, "kernels_per_batch": counter.kernels,
            "gpu_images_per_s": GPU_BATCH / seconds, "cores_per_1000_cpu_path": 1000.0 / cpu_rate,
            "cores_per_1000_device_path": 1000.0 / loader_rate, "gpu_share_at_1000": 1000.0 / (GPU_BATCH / seconds),
            "cpu_device_half_rate": ours_rate}


def run_device(args, jpegs, views_result) -> dict:
    contenders = device_contenders(jpegs, args.batch)
    rates = interleaved_rates(contenders, list(range(2)), args.repeats)
    result = {"batch": args.batch,
              "images_per_s": {name: [r * args.batch for r in values] for name, values in rates.items()}}
    for name, values in result["images_per_s"].items():
        print(f"[device] {name:40s} {statistics.median(values):8.1f} images/s (2 views of 224) per core", flush=True)
    two = views_result["two views"]["rates"] if views_result else None
    loader = statistics.median(two["ours, augment_on=device (loader half)"]) if two else float("nan")
    cpu = statistics.median(two["ours, augment_on=cpu"]) if two else float("nan")
    result["cost_model"] = cost_model(jpegs, args.batch, statistics.median(result["images_per_s"]["ours: DeviceViewAugment"]),
                                      loader, cpu)
    print(f"[device] cost model: {json.dumps(result['cost_model'])}", flush=True)
    return result


# -- report ---------------------------------------------------------------------------------------------
def facts() -> dict:
    versions = {"torch": torch.__version__, "opencv": cv2.__version__, "pillow": PIL.__version__}
    for package in ("lightly", "kornia", "torchvision"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            pass
    try:
        import nvidia.dali

        versions["dali"] = nvidia.dali.__version__
    except ImportError:
        pass
    return {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "cores": os.cpu_count(), "cpu": _cpu_model(),
            "python": platform.python_version(), "versions": versions,
            "load": " / ".join(f"{x:.2f}" for x in os.getloadavg())}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def markdown(results: dict, args, info: dict, origin: str) -> dict[str, str]:
    header = (f"Measured {info['date']} on {info['cores']} cores ({info['cpu']}), Python {info['python']}, "
              + ", ".join(f"{k} {v}" for k, v in info["versions"].items())
              + f"; load average (1/5/15 min) {info['load']} at the start, {info.get('load_end', '?')} at the end. "
              f"Command: `{args.command}`. {origin}. One thread; medians over {args.repeats} rotations.")
    regions = {}
    if "views" in results:
        lines = [header, "", "| pipeline | images/s per core: median (min-max) | ours (cpu) / this: median (min-max) |",
                 "|---|---|---|"]
        verdicts = []
        for kind, data in results["views"].items():
            rates = data["rates"]
            ours = rates["ours, augment_on=cpu"]
            for name, values in rates.items():
                med, lo, hi = spread(values)
                ratio = spread([a / b for a, b in zip(ours, values)])
                lines.append(f"| {kind}: {name} | {med:.1f} ({lo:.1f}-{hi:.1f}) | {ratio[0]:.2f} ({ratio[1]:.2f}-{ratio[2]:.2f}) |")
            ratio = spread([a / b for a, b in zip(ours, rates["lightly"])])
            verdicts.append(f"- Goal (a), {kind}: ours >= 2.0x lightly per core: {ratio[0]:.2f}x "
                            f"({ratio[1]:.2f}-{ratio[2]:.2f}) -> **{'met' if ratio[1] >= 2.0 else 'not met'}**"
                            + (" (on the median only)" if ratio[0] >= 2.0 > ratio[1] else ""))
        regions["augment_views"] = "\n".join(lines + [""] + verdicts)
    if "ops" in results:
        libraries = sorted({lib for row in results["ops"].values() for lib in row})
        lines = [header, "", "| op on a 224 px view | " + " | ".join(f"{lib}, ms" for lib in libraries) + " |",
                 "|---|" + "---|" * len(libraries)]
        for op, row in results["ops"].items():
            lines.append(f"| {op} | " + " | ".join(f"{row[lib]:.3f}" if lib in row else "-" for lib in libraries) + " |")
        regions["augment_ops"] = "\n".join(lines)
    if "device" in results:
        data = results["device"]
        lines = [header, "", f"Batch of {data['batch']} images x 2 views of 224 px uint8 crops with their parameter rows "
                 "(real loader output), on this CPU:", "",
                 "| device half | images/s (2 views) per core: median (min-max) | ours / this |", "|---|---|---|"]
        ours = data["images_per_s"]["ours: DeviceViewAugment"]
        for name, values in data["images_per_s"].items():
            med, lo, hi = spread(values)
            ratio = spread([b / a for a, b in zip(ours, values)])
            lines.append(f"| {name} | {med:.1f} ({lo:.1f}-{hi:.1f}) | {1 / ratio[0]:.2f} |")
        model = data["cost_model"]
        lines += ["", "Cost model of one GPU (A100-40GB SXM: 1.555 TB/s HBM2, 19.5 TFLOP/s fp32, both at 50 % "
                  "efficiency, 5 us per kernel launch), from what `DeviceViewAugment` moves, counted op by op:", "",
                  "| quantity | value |", "|---|---|",
                  f"| bytes read + written per image (2 views) | {model['bytes_per_image'] / 1e6:.1f} MB |",
                  f"| convolution FLOPs per image (blur) | {model['flops_per_image'] / 1e6:.1f} MFLOP |",
                  f"| kernel launches per step | {model['kernels_per_batch']} |",
                  f"| device half on one GPU, {model['gpu_batch']} images per step | {model['gpu_images_per_s']:.0f} images/s |",
                  f"| GPU time share at 1,000 images/s | {100 * model['gpu_share_at_1000']:.1f} % |",
                  f"| CPU cores to feed 1,000 images/s, augment_on=cpu | {model['cores_per_1000_cpu_path']:.1f} |",
                  f"| CPU cores to feed 1,000 images/s, augment_on=device (decode + crop) | "
                  f"{model['cores_per_1000_device_path']:.1f} |"]
        regions["augment_device"] = "\n".join(lines)
    return regions


def write_doc_region(region: str, text: str, path: str = DOC) -> None:
    doc_region.write_doc_region(region, text, path, section=SECTION)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suites", nargs="+", default=["views", "ops", "device"], choices=["views", "ops", "device"])
    p.add_argument("--images", type=int, default=64, help="JPEGs per rotation")
    p.add_argument("--repeats", type=int, default=3, help="rotations")
    p.add_argument("--batch", type=int, default=32, help="device suite: images per batch")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--write-doc", action="store_true", help="rewrite the tables in docs/BENCHMARKS.md")
    args = p.parse_args(argv)
    args.command = "python benchmarks/augment_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    random.seed(0)
    torch.manual_seed(0)
    jpegs, origin = benchmark_jpegs(args.images)
    print(origin, flush=True)
    info = facts()
    results = {}
    if "views" in args.suites:
        results["views"] = run_views(args, jpegs)
    if "ops" in args.suites:
        results["ops"] = run_ops(args, jpegs)
    if "device" in args.suites:
        results["device"] = run_device(args, jpegs, results.get("views"))
    info["load_end"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    regions = markdown(results, args, info, origin)
    for text in regions.values():
        print(text + "\n")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"facts": info, "origin": origin, "results": results}, f, indent=1)
    if args.write_doc:
        for region, text in regions.items():
            write_doc_region(region, text)


if __name__ == "__main__":
    main()
