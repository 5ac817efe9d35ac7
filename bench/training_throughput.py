"""Training throughput on this machine, side by side in one run: (1) the batched augmentation training/network/augment.py
does against the per-image torchvision transforms it replaced, and (2) whole ResNet18 training steps in each
precision: fp32 in the NCHW layout, fp32 channels_last, and bf16 autocast + channels_last (on a CPU with AMX or
AVX512-BF16, oneDNN's bf16 kernels; --precision auto picks it there).

    .venv/bin/python bench/training_throughput.py [--device auto] [--img-size 112] [--batch-size 64] [--steps 5]
    .venv/bin/python bench/training_throughput.py --img-size 128 --skip-augmentation   # the precision rows only

On a CPU the network dominates a step and the augmentation's share is what changes; on a GPU the per-image path
would leave the device idle (the ratio printed is what to compare, not the absolute numbers of a noisy machine).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

from skinmodel.networks import build_model  # noqa: E402
from skinmodel.preprocessing import normalize  # noqa: E402
from training.network.augment import augment, draw, step_generator  # noqa: E402
from training.common.device import Runtime, describe_cpu, native_bf16, resolve_device  # noqa: E402
from training.common.data import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402


def per_image(crop: int):
    """The transforms training used before training/network/augment.py, one image at a time (the reference)."""
    t = v2.Compose([v2.RandomResizedCrop(crop, scale=(0.5, 1.0), ratio=(0.8, 1.25), antialias=True),
                    v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(), v2.RandomRotation(30),
                    v2.ColorJitter(brightness=0.15, contrast=0.15, saturation=0.1, hue=0.02)])
    return lambda x: normalize(torch.stack([t(img) for img in x.cpu()]), IMAGENET_MEAN, IMAGENET_STD).to(x.device)


def batched(crop: int):
    return lambda x: augment(x, draw(len(x), step_generator(0, 0, 0)), crop, IMAGENET_MEAN, IMAGENET_STD)


def timed(fn, repeats: int, sync) -> float:
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeats


def precision_rows(device, h: int, b: int, steps: int, sync) -> list[tuple[str, float]]:
    """Images/s of a whole training step (batched augmentation, forward, backward, AdamW) per precision and layout."""
    images = torch.randint(0, 256, (b, 3, h, round(h * 4 / 3)), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 7, (b,), device=device)
    make = batched(h)
    rows = []
    for name, precision, channels_last in (("fp32, NCHW", "fp32", False), ("fp32, channels_last", "fp32", True),
                                           ("bf16 autocast, channels_last", "bf16", True)):
        rt = Runtime(device, precision)
        torch.manual_seed(0)
        model = build_model("resnet18", 7).to(device).train()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step():
            x = make(images)
            x = rt.layout(x) if channels_last else x
            with rt.autocast():
                loss = F.cross_entropy(model(x).float(), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        rows.append((name, b / timed(step, steps, sync)))
    return rows


def augmentation_rows(rt: Runtime, h: int, b: int, steps: int, sync) -> list[tuple[str, float, float]]:
    images = torch.randint(0, 256, (b, 3, h, round(h * 4 / 3)), dtype=torch.uint8, device=rt.device)
    labels = torch.randint(0, 7, (b,), device=rt.device)
    model = rt.prepare(build_model("resnet18", 7)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(make):
        x = rt.layout(make(images))
        with rt.autocast():
            loss = F.cross_entropy(model(x).float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    rows = []
    for name, make in (("per-image torchvision", per_image(h)), ("batched (training/network/augment.py)", batched(h))):
        rows.append((name, b / timed(lambda: make(images), steps, sync), b / timed(lambda: step(make), steps, sync)))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="timed repeats of each measurement")
    p.add_argument("--skip-augmentation", action="store_true", help="only the precision rows")
    args = p.parse_args()
    device = resolve_device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    h, b = args.img_size, args.batch_size
    print(f"device {device} ({describe_cpu()}), torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, ResNet18 at {h} px, batch {b}, {args.steps} timed repeats; "
          f"native bf16 here: {native_bf16(device)}")
    if not args.skip_augmentation:
        rows = augmentation_rows(Runtime(device, "fp32"), h, b, args.steps, sync)
        print(f"{'augmentation (fp32 step)':32} {'augment img/s':>14} {'train step img/s':>17}")
        for name, a, s in rows:
            print(f"{name:32} {a:14.0f} {s:17.1f}")
        print(f"ratio batched / per-image: augmentation {rows[1][1] / rows[0][1]:.1f}x, "
              f"training step {rows[1][2] / rows[0][2]:.2f}x")
    rows = precision_rows(device, h, b, args.steps, sync)
    print(f"{'precision':32} {'train step img/s':>17} {'vs fp32 NCHW':>13}")
    for name, s in rows:
        print(f"{name:32} {s:17.1f} {s / rows[0][1]:12.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
