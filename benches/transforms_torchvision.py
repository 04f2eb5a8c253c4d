"""Throughput of the ALBEF training transform in PIL/torchvision, to compare with `alignfuse bench`.

Decode (alpha composited on white) + RandomResizedCrop(res, scale=(0.2, 1.0), bicubic) + horizontal flip
+ RandAugment(2, 7) over ALBEF's ten ops, each applied with p = 0.5 + ToTensor + CLIP Normalize, run by a
torch DataLoader with N worker processes (as ALBEF trains). The RandAugment ops are PIL's versions of the
operations ALBEF's OpenCV code performs, at ALBEF's magnitudes.

usage: python benches/transforms_torchvision.py IMAGE_DIR [--res 256] [--workers 2] [--rounds 2]
"""
import argparse
import pathlib
import random
import time

import torch
import torchvision
from PIL import Image, ImageEnhance, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

FILL = (128, 128, 128)


def load_rgb(path):
    img = Image.open(path)
    img.load()
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def signed(v):
    return -v if random.random() > 0.5 else v


class RandAugment:
    """ALBEF's RandomAugment(N, M): N ops drawn with replacement, each applied with p = 0.5."""

    OPS = ["Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness",
           "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"]

    def __init__(self, n=2, m=7):
        self.n, self.level = n, m / 10.0

    def __call__(self, img):
        for op in random.choices(self.OPS, k=self.n):
            if random.random() > 0.5:
                continue
            if op == "AutoContrast":
                img = ImageOps.autocontrast(img)
            elif op == "Equalize":
                img = ImageOps.equalize(img)
            elif op == "Brightness":
                img = ImageEnhance.Brightness(img).enhance(self.level * 1.8 + 0.1)
            elif op == "Sharpness":
                img = ImageEnhance.Sharpness(img).enhance(self.level * 1.8 + 0.1)
            elif op == "ShearX":
                img = img.transform(img.size, Image.AFFINE, (1, signed(self.level * 0.3), 0, 0, 1, 0), Image.BILINEAR, fillcolor=FILL)
            elif op == "ShearY":
                img = img.transform(img.size, Image.AFFINE, (1, 0, 0, signed(self.level * 0.3), 1, 0), Image.BILINEAR, fillcolor=FILL)
            elif op == "TranslateX":
                img = img.transform(img.size, Image.AFFINE, (1, 0, signed(self.level * 10), 0, 1, 0), Image.BILINEAR, fillcolor=FILL)
            elif op == "TranslateY":
                img = img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, signed(self.level * 10)), Image.BILINEAR, fillcolor=FILL)
            elif op == "Rotate":
                img = img.rotate(signed(self.level * 30), Image.BILINEAR, fillcolor=FILL)
        return img


class Images(Dataset):
    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(load_rgb(self.paths[i]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("image_dir")
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    paths = sorted(str(p) for p in pathlib.Path(args.image_dir).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    transform = transforms.Compose([
        transforms.RandomResizedCrop(args.res, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        RandAugment(2, 7),
        transforms.ToTensor(),
        transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    ])
    loader = DataLoader(Images(paths, transform), batch_size=32, num_workers=args.workers, persistent_workers=args.workers > 0)
    n = 0
    start = time.perf_counter()
    for _ in range(args.rounds):
        for batch in loader:
            n += batch.shape[0]
    seconds = time.perf_counter() - start
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}: decode + train transform: {n} images in {seconds:.2f} s "
          f"with {args.workers} workers = {n / seconds:.1f} images/s")


if __name__ == "__main__":
    main()
