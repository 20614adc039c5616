"""Write a small synthetic catalogue in the Kaggle "Fashion Product Images" layout.

Each class is a PIL drawing with its own shape, colour family and texture, jittered in
position, size and hue, on an off-white background, at the real catalogue's 60x80 px.
It is the embedded default for the demo and the tests: a model learns it in about a minute.
--outside-per-class adds products of article types outside the refund categories (sunglasses,
wallets, perfume), as the real catalogue has them.

    python -m training.make_sample_catalogue --out runs/sample --per-class 40 --seed 0 [--outside-per-class 20]
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

WIDTH, HEIGHT = 60, 80
HEADER = ["id", "gender", "masterCategory", "subCategory", "articleType", "baseColour", "season", "year", "usage", "productDisplayName"]


def _jitter(rng: random.Random, rgb: tuple[int, int, int], amount: int = 30) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def _box(rng: random.Random, w: float, h: float) -> tuple[int, int, int, int]:
    """A box of about w x h (fractions of the canvas), jittered in size and place."""
    bw = int(WIDTH * w * rng.uniform(0.8, 1.1))
    bh = int(HEIGHT * h * rng.uniform(0.8, 1.1))
    x0 = rng.randint(2, max(2, WIDTH - bw - 2))
    y0 = rng.randint(2, max(2, HEIGHT - bh - 2))
    return x0, y0, x0 + bw, y0 + bh


def draw_tshirt(d: ImageDraw.ImageDraw, rng: random.Random) -> None:
    x0, y0, x1, y1 = _box(rng, 0.6, 0.5)
    colour = _jitter(rng, (200, 40, 40))
    d.rectangle((x0 + 8, y0, x1 - 8, y1), fill=colour)  # body
    d.polygon([(x0, y0 + 10), (x0 + 8, y0), (x0 + 8, y0 + 16)], fill=colour)  # sleeves
    d.polygon([(x1, y0 + 10), (x1 - 8, y0), (x1 - 8, y0 + 16)], fill=colour)


def draw_watch(d: ImageDraw.ImageDraw, rng: random.Random) -> None:
    x0, y0, x1, y1 = _box(rng, 0.55, 0.4)
    r = min(x1 - x0, y1 - y0)
    d.rectangle((x0 + r // 2 - 4, 2, x0 + r // 2 + 4, HEIGHT - 2), fill=_jitter(rng, (60, 40, 20)))  # strap
    d.ellipse((x0, y0, x0 + r, y0 + r), fill=_jitter(rng, (220, 200, 60)), outline=(30, 30, 30), width=2)


def draw_jeans(d: ImageDraw.ImageDraw, rng: random.Random) -> None:
    x0, y0, x1, y1 = _box(rng, 0.6, 0.85)
    colour = _jitter(rng, (40, 60, 160))
    mid = (x0 + x1) // 2
    d.rectangle((x0, y0, x1, y0 + 12), fill=colour)
    d.rectangle((x0, y0, mid - 2, y1), fill=colour)
    d.rectangle((mid + 2, y0, x1, y1), fill=colour)
    for y in range(y0, y1, 4):  # denim texture
        d.line((x0, y, x1, y), fill=_jitter(rng, (70, 90, 190), 10))


def draw_shoe(d: ImageDraw.ImageDraw, rng: random.Random) -> None:
    x0, y0, x1, y1 = _box(rng, 0.9, 0.3)
    d.pieslice((x0, y0, x1, y1 + (y1 - y0)), 180, 360, fill=_jitter(rng, (40, 40, 40)))
    d.rectangle((x0, y1 - 4, x1, y1), fill=_jitter(rng, (240, 240, 240), 10), outline=(0, 0, 0))


def draw_handbag(d: ImageDraw.ImageDraw, rng: random.Random) -> None:
    x0, y0, x1, y1 = _box(rng, 0.7, 0.5)
    colour = _jitter(rng, (150, 80, 30))
    d.arc((x0 + 8, y0 - 14, x1 - 8, y0 + 14), 180, 360, fill=colour, width=3)  # handle
    d.polygon([(x0, y1), (x1, y1), (x1 - 6, y0), (x0 + 6, y0)], fill=colour)
    for x in range(x0 + 4, x1 - 4, 6):  # quilted texture
        d.line((x, y0 + 2, x, y1 - 2), fill=_jitter(rng, (110, 50, 20), 10))


def draw_socks(d: ImageDraw.ImageDraw, rng: random.Random) -> None:
    x0, y0, x1, y1 = _box(rng, 0.45, 0.8)
    base, stripe = _jitter(rng, (40, 160, 60)), _jitter(rng, (250, 250, 120))
    d.rectangle((x0, y0, x0 + (x1 - x0) // 2, y1), fill=base)
    d.rectangle((x0, y1 - 10, x1, y1), fill=base)  # foot
    for y in range(y0, y1 - 12, 8):
        d.rectangle((x0, y, x0 + (x1 - x0) // 2, y + 3), fill=stripe)


def draw_sunglasses(d: ImageDraw.ImageDraw, rng: random.Random) -> None:
    x0, y0, x1, y1 = _box(rng, 0.9, 0.2)
    mid = (x0 + x1) // 2
    lens = _jitter(rng, (20, 20, 20), 15)
    d.ellipse((x0, y0, mid - 3, y1), fill=lens)
    d.ellipse((mid + 3, y0, x1, y1), fill=lens)
    d.line((mid - 4, y0 + 3, mid + 4, y0 + 3), fill=lens, width=2)  # bridge


def draw_wallet(d: ImageDraw.ImageDraw, rng: random.Random) -> None:
    x0, y0, x1, y1 = _box(rng, 0.7, 0.35)
    d.rectangle((x0, y0, x1, y1), fill=_jitter(rng, (110, 30, 120)), outline=(20, 20, 20))
    d.line((x0, (y0 + y1) // 2, x1, (y0 + y1) // 2), fill=_jitter(rng, (220, 220, 220), 10), width=2)  # the fold


def draw_perfume(d: ImageDraw.ImageDraw, rng: random.Random) -> None:
    x0, y0, x1, y1 = _box(rng, 0.4, 0.6)
    cx = (x0 + x1) // 2
    d.rectangle((cx - 4, y0, cx + 4, y0 + 8), fill=_jitter(rng, (200, 170, 40)))  # cap
    d.rounded_rectangle((x0, y0 + 8, x1, y1), radius=6, fill=_jitter(rng, (120, 200, 220)), outline=(60, 90, 110))


DRAWERS = {
    "Tshirts": ("Apparel", "Topwear", draw_tshirt),
    "Watches": ("Accessories", "Watches", draw_watch),
    "Jeans": ("Apparel", "Bottomwear", draw_jeans),
    "Casual Shoes": ("Footwear", "Shoes", draw_shoe),
    "Handbags": ("Accessories", "Bags", draw_handbag),
    "Socks": ("Apparel", "Innerwear", draw_socks),
}
# Article types the refund department does not take (not in training/categories.txt).
OUTSIDE_DRAWERS = {
    "Sunglasses": ("Accessories", "Eyewear", draw_sunglasses),
    "Wallets": ("Accessories", "Wallets", draw_wallet),
    "Perfume and Body Mist": ("Personal Care", "Fragrance", draw_perfume),
}
ALL_DRAWERS = DRAWERS | OUTSIDE_DRAWERS


def draw_product(article_type: str, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (WIDTH, HEIGHT), _jitter(rng, (245, 245, 245), 8))
    ALL_DRAWERS[article_type][2](ImageDraw.Draw(img), rng)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.6)))


def write_catalogue(out: Path, *, per_class: int, seed: int, first_id: int = 10000, outside_per_class: int = 0) -> list[dict]:
    """Write styles.csv and images/<id>.jpg under `out`; returns the rows written. The refund
    categories' images do not depend on outside_per_class (theirs are drawn first)."""
    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    next_id = first_id
    counts = [(t, per_class) for t in DRAWERS] + [(t, outside_per_class) for t in OUTSIDE_DRAWERS]
    for article_type, n in counts:
        master, sub, _ = ALL_DRAWERS[article_type]
        for _ in range(n):
            img = draw_product(article_type, rng)
            img.save(out / "images" / f"{next_id}.jpg", quality=90)
            rows.append({
                "id": next_id, "gender": rng.choice(["Men", "Women", "Unisex"]), "masterCategory": master,
                "subCategory": sub, "articleType": article_type, "baseColour": "NA", "season": "Summer",
                "year": 2020, "usage": "Casual", "productDisplayName": f"Sample {article_type}, style {next_id}",
            })
            next_id += 1
    rng.shuffle(rows)
    with open(out / "styles.csv", "w", newline="") as f:
        # Like Kaggle's file: unquoted, so a comma in the name makes an extra field.
        f.write(",".join(HEADER) + "\n")
        for row in rows:
            f.write(",".join(str(row[h]) for h in HEADER) + "\n")
    return rows


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder to write styles.csv and images/ into")
    parser.add_argument("--per-class", type=int, default=40, help="images per class")
    parser.add_argument("--seed", type=int, default=0, help="random seed; another seed gives unseen images")
    parser.add_argument("--first-id", type=int, default=10000, help="id of the first product")
    parser.add_argument("--outside-per-class", type=int, default=0,
                        help=f"images per article type outside the refund categories ({', '.join(OUTSIDE_DRAWERS)})")
    return parser


def main(args: argparse.Namespace) -> None:
    rows = write_catalogue(args.out, per_class=args.per_class, seed=args.seed, first_id=args.first_id,
                           outside_per_class=args.outside_per_class)
    kinds = len(DRAWERS) + (len(OUTSIDE_DRAWERS) if args.outside_per_class else 0)
    print(f"wrote {len(rows)} images of {kinds} article types to {args.out}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
