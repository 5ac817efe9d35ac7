"""Training throughput on this machine: the batched augmentation training/augment.py does against the per-image
torchvision transforms it replaced, and whole ResNet18 training steps, side by side in one run.

    .venv/bin/python bench/training_throughput.py [--device auto] [--img-size 112] [--batch-size 64] [--steps 5]

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
from training.augment import augment, draw, step_generator  # noqa: E402
from training.device import Runtime, resolve_device  # noqa: E402
from training.data import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402


def per_image(crop: int):
    """The transforms training used before training/augment.py, one image at a time (the reference)."""
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="timed repeats of each measurement")
    args = p.parse_args()
    rt = Runtime(resolve_device(args.device))
    sync = torch.cuda.synchronize if rt.cuda else (lambda: None)
    h, crop, b = args.img_size, args.img_size, args.batch_size
    images = torch.randint(0, 256, (b, 3, h, round(h * 4 / 3)), dtype=torch.uint8, device=rt.device)
    labels = torch.randint(0, 7, (b,), device=rt.device)
    model = rt.prepare(build_model("resnet18", 7)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(make):
        x = make(images)
        if rt.cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with rt.autocast():
            loss = F.cross_entropy(model(x).float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    rows = []
    for name, make in (("per-image torchvision", per_image(crop)), ("batched (training/augment.py)", batched(crop))):
        aug = timed(lambda: make(images), args.steps, sync)
        full = timed(lambda: step(make), args.steps, sync)
        rows.append((name, b / aug, b / full))
    print(f"device {rt.device}, torch threads {torch.get_num_threads()}, ResNet18 at {crop} px, batch {b}, "
          f"{args.steps} timed repeats")
    print(f"{'augmentation':32} {'augment img/s':>14} {'train step img/s':>17}")
    for name, a, s in rows:
        print(f"{name:32} {a:14.0f} {s:17.1f}")
    print(f"ratio batched / per-image: augmentation {rows[1][1] / rows[0][1]:.1f}x, "
          f"training step {rows[1][2] / rows[0][2]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
