"""A second seeded, long-tailed SKU world: apparel photographed flat-lay, with Taobao-style titles.

It exists so that a finding about co-training is not a property of one generator (the packaged-goods
world, sicot.data.synthetic). It differs from that world in what is drawn, how it is photographed and how
sellers write:
- objects: soft goods (T-shirts, hoodies, shirts, sweaters, down jackets, dresses, skirts, jeans, shorts,
  sneakers, boots, backpacks, totes, caps, socks, scarves) as flat silhouettes with sleeves, legs, hoods,
  collars, soles and straps instead of rigid bottles, tubes and boxes;
- surfaces: the variant's fabric fills the garment (solid, stripes, plaid, knit rib, gradient, camouflage
  blots, polka dots, tie-dye, colour-block), where the packaged world has a flat body with a label;
- scenes: the garment lies on wooden planks, bed linen, floor tiles, a rug or a studio sweep, with a soft
  drop shadow, a hanger, a price tag or a hand; the packaged world stands on flat colour with clutter;
- titles: unspaced Taobao/JD titles ("SEMIR森马2024新款连帽条纹卫衣宽松秋冬黑色 XL"): Chinese words are
  never separated, so the words only come back through jieba; spec tokens such as "XL", "42码", "15.6英寸",
  "56cm"; the brand in Latin, Chinese or both at varying places; a style number; promotional and
  irrelevant words anywhere.

A SKU is brand x category x variant, like the packaged world: the brand gives the trim colour (collars,
cuffs, soles, straps), a logo mark, its placement and a signature stripe or band; the category gives the
silhouette; the variant gives the fabric colour, the fabric pattern and the size (a scale cue and a size
token). Product lines share brand and category across a few variants, so a tail SKU shares most of its
words and look with head SKUs. `data.title_noise` means what it means there (sicot.data.worldgen): the
share of noise words, and how often each variant word (colour, pattern, size) is dropped or wrong.
`data.world: apparel` selects it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from sicot.data.worldgen import (
    MARKS,
    Product,
    World,
    assign_ids,
    camera,
    clamp_noise,
    draw_mark,
    extend_kinds,
    hsv,
    keep_core,
    maybe_misspell,
    mix,
    noise_word_count,
    product_lines,
    render_catalog,
    seller_variant,
    write_world,
)

# --- vocabulary -----------------------------------------------------------------------------------

COLOURS = [("黑色", (32, 32, 35)), ("白色", (238, 238, 232)), ("灰色", (135, 135, 140)), ("藏青色", (28, 38, 82)),
           ("卡其色", (190, 165, 115)), ("军绿色", (85, 95, 55)), ("杏色", (235, 205, 165)), ("驼色", (170, 125, 80)),
           ("粉色", (240, 160, 185)), ("天蓝色", (110, 175, 230)), ("墨绿色", (25, 80, 58)), ("红色", (195, 35, 45)),
           ("黄色", (240, 200, 50)), ("紫色", (120, 70, 160)), ("橙色", (240, 125, 40)), ("咖啡色", (105, 70, 45)),
           ("宝蓝色", (30, 80, 190)), ("酒红", (120, 25, 48))]
# How the fabric is patterned; the words are what a seller calls it.
TEXTURES = ["纯色", "条纹", "格子", "针织", "渐变", "迷彩", "波点", "扎染", "拼色"]
SIZES = {
    "top": ["S", "M", "L", "XL", "XXL", "3XL"],
    "waist": ["26码", "27码", "28码", "29码", "30码", "31码", "32码", "34码"],
    "shoe": ["36码", "37码", "38码", "39码", "40码", "41码", "42码", "43码", "44码", "45码"],
    "laptop": ["13英寸", "14英寸", "15.6英寸", "17英寸"],
    "bag": ["mini", "小号", "中号", "大号"],
    "head": ["54cm", "56cm", "58cm", "60cm"],
    "pack": ["3双装", "5双装", "7双装", "10双装"],
    "length": ["150cm", "180cm", "200cm"],
}


@dataclass(frozen=True)
class Garment:
    word: str
    shape: str                   # a key of SHAPES
    length: float                # height / width of the silhouette
    tags: tuple[str, str]        # department, kind
    descriptors: tuple[str, ...]  # cut and material words sellers add (圆领, 加绒, 减震 ...)
    sizes: str                   # a key of SIZES
    detail: str = "none"         # none | pocket | zip | hem | yoke: a small construction cue


BASE_GARMENTS = [  # kinds interleaved, so a world of a few categories already mixes tops, legs, shoes, bags
    Garment("T恤", "tee", 1.0, ("上装", "T恤"), ("圆领", "短袖", "纯棉"), "top"),
    Garment("牛仔裤", "trousers", 1.45, ("下装", "牛仔裤"), ("直筒", "高腰", "阔腿"), "waist", "pocket"),
    Garment("运动鞋", "sneaker", 0.5, ("鞋靴", "运动鞋"), ("透气", "减震", "跑步"), "shoe"),
    Garment("卫衣", "hoodie", 0.95, ("上装", "卫衣"), ("连帽", "加绒", "套头"), "top", "pocket"),
    Garment("连衣裙", "dress", 1.55, ("裙装", "连衣裙"), ("收腰", "法式", "长款"), "top"),
    Garment("双肩包", "backpack", 1.2, ("箱包", "背包"), ("大容量", "电脑", "防水"), "laptop", "pocket"),
    Garment("棒球帽", "cap", 0.62, ("配饰", "帽子"), ("遮阳", "鸭舌", "刺绣"), "head"),
    Garment("衬衫", "shirt", 1.1, ("上装", "衬衫"), ("长袖", "翻领", "商务"), "top"),
    Garment("短裤", "shorts", 0.75, ("下装", "短裤"), ("五分", "冰丝", "运动"), "waist"),
    Garment("马丁靴", "boot", 1.0, ("鞋靴", "靴子"), ("防滑", "真皮", "加绒"), "shoe"),
    Garment("毛衣", "sweater", 0.95, ("上装", "毛衣"), ("高领", "毛线", "保暖"), "top", "hem"),
    Garment("手提包", "tote", 0.85, ("箱包", "包包"), ("真皮", "托特", "单肩"), "bag"),
    Garment("半身裙", "skirt", 0.95, ("裙装", "半身裙"), ("百褶", "高腰", "半身"), "top"),
    Garment("羽绒服", "puffer", 1.05, ("外套", "羽绒服"), ("加厚", "保暖", "鸭绒"), "top", "zip"),
    Garment("袜子", "socks", 1.25, ("配饰", "袜子"), ("纯棉", "中筒", "吸汗"), "pack"),
    Garment("围巾", "scarf", 2.4, ("配饰", "围巾"), ("羊绒", "流苏", "保暖"), "length"),
]
# Categories beyond the base list: a base garment for another wearer or cut (new word, length, detail).
GARMENT_MODIFIERS = ["男款", "女款", "儿童", "短款", "长款", "加厚", "轻薄", "宽版", "修身", "亲子", "加大", "高端",
                     "户外", "工装", "学院", "商务"]
DETAILS = ["none", "pocket", "zip", "hem", "yoke"]

CN_BRAND_CHARS = list("森马拉夏依曼莎迪佰尚度索娅梵伦熙璐诺轩澜逸朵骆驼羽衫锦颂琦蔻杉野岚熊狼鹰帆途川木子")
LATIN_SYLLABLES = ["ka", "ro", "mi", "se", "lu", "va", "no", "zi", "ta", "be", "do", "ri", "sa", "mo", "ve", "ly",
                   "xo", "qi", "pe", "ga"]
LATIN_CODAS = ["", "", "n", "r", "x", "s", "k", "l"]
SIGNATURES = ["none", "stripes", "band"]

PROMO_WORDS = ["2024新款", "2025新款", "新款", "包邮", "正品", "官方", "旗舰店", "爆款", "热卖", "清仓", "特价", "限时",
               "折扣", "秒杀", "现货", "顺丰", "满减", "直播", "抢购", "潮牌", "网红", "明星同款", "同款", "反季",
               "断码", "特惠", "hot sale", "new"]
IRRELEVANT_WORDS = ["学生", "男生", "女生", "情侣", "休闲", "日系", "港风", "复古", "时尚", "简约", "潮流", "百搭",
                    "显瘦", "宽松", "韩版", "秋冬", "春季", "夏季", "春秋", "高级感", "小众", "设计感", "外穿",
                    "ins风", "oversize", "vintage", "洋气", "气质", "青少年"]


# --- the world: brands, garments, product lines, SKUs ---------------------------------------------

@dataclass(frozen=True)
class Brand:
    latin: str
    chinese: str
    trim: tuple[int, int, int]    # collars, cuffs, soles, straps; the second colour of two-colour fabrics
    accent: tuple[int, int, int]  # logo and signature
    mark: str
    logo: str                     # chest | centre: where tops carry the mark
    signature: str                # one of SIGNATURES


@dataclass(frozen=True)
class Sku:
    id: str
    brand: int
    category: int
    style: str     # style number of its product line (货号), shared by the line's variants
    colour: int    # index into COLOURS
    texture: int   # index into TEXTURES
    size: int      # index into SIZES[garment.sizes]
    look: int      # seed of the fabric's details: stripe pitch, blot layout, dye centre

    def named(self, sku_id: str) -> Sku:
        return replace(self, id=sku_id)


def make_brands(n: int, rng: np.random.Generator) -> list[Brand]:
    latin_seen, chinese_seen, brands = set(), set(), []
    cn_len = 2 if n <= len(CN_BRAND_CHARS) ** 2 // 2 else 3
    while len(brands) < n:
        syllables = rng.integers(len(LATIN_SYLLABLES), size=int(rng.integers(2, 4)))
        latin = "".join(LATIN_SYLLABLES[i] for i in syllables) + LATIN_CODAS[rng.integers(len(LATIN_CODAS))]
        latin = latin.upper() if rng.random() < 0.4 else latin.capitalize()  # SEMIR, Peacebird
        chinese = "".join(CN_BRAND_CHARS[i] for i in rng.integers(len(CN_BRAND_CHARS), size=cn_len))
        if latin.lower() in latin_seen or chinese in chinese_seen:
            continue
        latin_seen.add(latin.lower())
        chinese_seen.add(chinese)
        hue = rng.random()
        brands.append(Brand(
            latin=latin, chinese=chinese,
            trim=hsv(hue, rng.uniform(0.0, 0.8), rng.uniform(0.15, 0.95)),
            accent=hsv(hue + rng.uniform(0.3, 0.7), rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.0)),
            mark=MARKS[rng.integers(len(MARKS))], logo="chest" if rng.random() < 0.5 else "centre",
            signature=SIGNATURES[rng.integers(len(SIGNATURES))]))
    return brands


def make_garments(n: int) -> list[Garment]:
    """Beyond the base list: a modified base garment, longer or shorter, with another detail."""
    return extend_kinds(BASE_GARMENTS, GARMENT_MODIFIERS, n, lambda kind, round_: replace(
        kind, length=kind.length * (0.8 + 0.1 * (round_ % 5)),
        detail=DETAILS[(DETAILS.index(kind.detail) + round_) % len(DETAILS)]))


def _style_number(rng: np.random.Generator) -> str:
    letters = "ABCDFHJKLMNPQRSTWXYZ"
    head = "".join(letters[i] for i in rng.integers(len(letters), size=int(rng.integers(1, 3))))
    return f"{head}{int(rng.integers(100, 10000))}" if rng.random() < 0.6 else f"{head}-{int(rng.integers(10, 1000))}"


def make_skus(total: int, brands: list[Brand], garments: list[Garment], rng: np.random.Generator,
              variants_per_line: int = 3) -> list[Sku]:
    """`total` SKUs grouped into product lines (a brand x garment pair) of a few variants each."""
    skus = []
    for brand, category, n_variants in product_lines(total, len(brands), len(garments), rng, variants_per_line):
        n_sizes = len(SIZES[garments[category].sizes])
        n_combos = len(COLOURS) * len(TEXTURES) * n_sizes
        if n_variants > n_combos:
            raise ValueError(f"{total} SKUs need {n_variants} variants per product line, more than the "
                             f"{n_combos} a garment offers: raise data.brands or data.categories")
        style = _style_number(rng)
        for combo in rng.choice(n_combos, size=n_variants, replace=False).tolist():
            colour, rest = divmod(combo, len(TEXTURES) * n_sizes)
            texture, size = divmod(rest, n_sizes)
            skus.append(Sku("", brand, category, style, colour, texture, size, int(rng.integers(2 ** 31))))
    return assign_ids(skus, rng, total)


# --- fabric ---------------------------------------------------------------------------------------

def fabric(texture: str, colour, partner, px: int, rng: np.random.Generator) -> np.ndarray:
    """A px x px float RGB swatch of the fabric: `colour` patterned as `texture`, `partner` the second colour."""
    c, p = np.array(colour, np.float32), np.array(partner, np.float32)
    light = np.array(mix(colour, (255, 255, 255), 0.75), np.float32)
    y, x = np.mgrid[0:px, 0:px].astype(np.float32) / px
    if texture == "纯色":
        t, second = np.zeros_like(x), c
    elif texture == "条纹":
        pitch = rng.uniform(0.07, 0.14)
        t, second = (((y + rng.random()) / pitch) % 1.0 < 0.4).astype(np.float32), p
    elif texture == "格子":
        pitch = rng.uniform(0.12, 0.22)
        bands = (((x / pitch) % 1.0 < 0.35).astype(np.float32) + ((y / pitch) % 1.0 < 0.35)) * 0.45
        fine = (((x / pitch) % 0.5 < 0.04) | ((y / pitch) % 0.5 < 0.04)) * 0.3
        t, second = np.clip(bands + fine, 0, 1), p
    elif texture == "针织":  # rows of knit stitches: V shapes, shaded
        w = rng.uniform(0.035, 0.06)
        v = (y / (w * 0.8) + np.abs((x / w) % 1.0 - 0.5)) % 1.0
        t, second = 0.5 + 0.5 * np.cos(2 * math.pi * v), np.array(mix(colour, (0, 0, 0), 0.35), np.float32)
    elif texture == "渐变":
        t, second = np.clip(y * rng.uniform(0.9, 1.3), 0, 1), light
    elif texture == "迷彩":  # blots: coarse random field, upsampled smoothly, cut into three tones
        cells = rng.random((6, 6)).astype(np.float32)
        field = np.asarray(Image.fromarray((cells * 255).astype(np.uint8)).resize((px, px), Image.BICUBIC),
                           np.float32) / 255
        dark = np.array(mix(colour, (0, 0, 0), 0.45), np.float32)
        blend = np.array(mix(colour, partner, 0.5), np.float32)
        return np.where(field[..., None] < 0.4, dark, np.where(field[..., None] < 0.65, c, blend))
    elif texture == "波点":
        pitch = rng.uniform(0.09, 0.15)
        dx, dy = (x / pitch) % 1.0 - 0.5, (y / pitch) % 1.0 - 0.5
        t, second = (dx * dx + dy * dy < 0.07).astype(np.float32), light
    elif texture == "扎染":  # rings of dye around a centre, wobbling
        cx, cy = rng.uniform(0.3, 0.7, size=2)
        r = np.hypot(x - cx, y - cy) + 0.03 * np.sin(np.arctan2(y - cy, x - cx) * int(rng.integers(3, 7)))
        t, second = 0.5 + 0.5 * np.sin(2 * math.pi * r / rng.uniform(0.1, 0.18)), light
    elif texture == "拼色":  # colour-block: a diagonal or straight split
        slope = rng.choice([0.0, 0.6, -0.6])
        t, second = ((y + slope * (x - 0.5)) > rng.uniform(0.4, 0.6)).astype(np.float32), p
    else:
        raise ValueError(f"unknown texture {texture!r}")
    return c * (1 - t[..., None]) + second * t[..., None]


# --- silhouettes ----------------------------------------------------------------------------------
# Each draws the garment into `body` (fabric) and `trim` (brand trim colour) masks inside the box
# (x0, y0, x1, y1) and returns where the logo goes: {"chest": (x, y, r), "centre": (x, y, r)}.

def _top(b: ImageDraw.ImageDraw, t: ImageDraw.ImageDraw, box, sleeve: float, neck: str) -> dict:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    tx0, tx1, sy = x0 + 0.22 * w, x1 - 0.22 * w, y0 + 0.08 * h
    b.rectangle((tx0, sy, tx1, y1), fill=255)
    reach = 0.2 + 0.62 * sleeve  # how far down the sleeve's end lies
    end = y0 + reach * h
    for side, shoulder, outer in ((-1, tx0, x0), (1, tx1, x1)):
        b.polygon([(shoulder, sy), (outer, end - 0.1 * h), (outer - side * 0.12 * w, end),
                   (shoulder - side * 0.02 * w, y0 + 0.32 * h)], fill=255)
        if sleeve > 0.5:  # a cuff
            t.polygon([(outer, end - 0.1 * h), (outer - side * 0.12 * w, end),
                       (outer - side * 0.1 * w, end - 0.05 * h), (outer + side * 0.01 * w, end - 0.14 * h)], fill=255)
    cx = (x0 + x1) / 2
    if neck == "round":
        b.ellipse((cx - 0.1 * w, sy - 0.05 * h, cx + 0.1 * w, sy + 0.08 * h), fill=0)
        t.arc((cx - 0.11 * w, sy - 0.06 * h, cx + 0.11 * w, sy + 0.09 * h), 0, 180, fill=255,
              width=max(1, int(0.025 * w)))
    elif neck == "hood":
        b.ellipse((cx - 0.17 * w, y0 - 0.1 * h, cx + 0.17 * w, sy + 0.12 * h), fill=255)
        t.ellipse((cx - 0.1 * w, y0 - 0.04 * h, cx + 0.1 * w, sy + 0.08 * h), fill=255)
    elif neck == "collar":
        t.polygon([(cx, sy + 0.1 * h), (cx - 0.14 * w, sy - 0.02 * h), (cx - 0.02 * w, sy - 0.03 * h)], fill=255)
        t.polygon([(cx, sy + 0.1 * h), (cx + 0.14 * w, sy - 0.02 * h), (cx + 0.02 * w, sy - 0.03 * h)], fill=255)
        t.line([(cx, sy + 0.1 * h), (cx, y1)], fill=255, width=max(1, int(0.02 * w)))
    elif neck == "turtle":
        t.rectangle((cx - 0.1 * w, y0 - 0.02 * h, cx + 0.1 * w, sy + 0.03 * h), fill=255)
    elif neck == "stand":
        t.rectangle((cx - 0.13 * w, y0 - 0.04 * h, cx + 0.13 * w, sy + 0.04 * h), fill=255)
    r = 0.07 * w
    return {"chest": (tx0 + 0.3 * (tx1 - tx0), y0 + 0.3 * h, r), "centre": (cx, y0 + 0.42 * h, 1.4 * r)}


def _tee(b, t, box):
    return _top(b, t, box, sleeve=0.0, neck="round")


def _hoodie(b, t, box):
    return _top(b, t, box, sleeve=1.0, neck="hood")


def _shirt(b, t, box):
    return _top(b, t, box, sleeve=1.0, neck="collar")


def _sweater(b, t, box):
    return _top(b, t, box, sleeve=1.0, neck="turtle")


def _puffer(b, t, box):
    out = _top(b, t, box, sleeve=1.0, neck="stand")
    x0, y0, x1, y1 = box
    for k in range(1, 6):  # quilting seams
        y = y0 + (0.12 + 0.17 * k) * (y1 - y0)
        t.line([(x0 + 0.23 * (x1 - x0), y), (x1 - 0.23 * (x1 - x0), y)], fill=160, width=max(1, int(0.012 * (x1 - x0))))
    return out


def _dress(b, t, box):
    x0, y0, x1, y1 = box
    w, h, cx = x1 - x0, y1 - y0, (x0 + x1) / 2
    waist = y0 + 0.38 * h
    b.rectangle((cx - 0.2 * w, y0 + 0.08 * h, cx + 0.2 * w, waist), fill=255)
    b.polygon([(cx - 0.2 * w, waist), (cx + 0.2 * w, waist), (x1, y1), (x0, y1)], fill=255)
    t.rectangle((cx - 0.21 * w, waist - 0.025 * h, cx + 0.21 * w, waist + 0.01 * h), fill=255)
    for side in (-1, 1):
        t.line([(cx + side * 0.14 * w, y0), (cx + side * 0.16 * w, y0 + 0.09 * h)], fill=255,
               width=max(1, int(0.03 * w)))
    return {"chest": (cx - 0.08 * w, y0 + 0.2 * h, 0.05 * w), "centre": (cx, y0 + 0.23 * h, 0.08 * w)}


def _skirt(b, t, box):
    x0, y0, x1, y1 = box
    w, h, cx = x1 - x0, y1 - y0, (x0 + x1) / 2
    b.polygon([(cx - 0.3 * w, y0 + 0.1 * h), (cx + 0.3 * w, y0 + 0.1 * h), (x1, y1), (x0, y1)], fill=255)
    t.rectangle((cx - 0.31 * w, y0, cx + 0.31 * w, y0 + 0.12 * h), fill=255)
    for k in range(-3, 4):  # pleats
        t.line([(cx + k * 0.08 * w, y0 + 0.14 * h), (cx + k * 0.14 * w, y1)], fill=90, width=1)
    return {"chest": (cx - 0.2 * w, y0 + 0.3 * h, 0.06 * w), "centre": (cx, y0 + 0.45 * h, 0.09 * w)}


def _legs(b, t, box, leg: float):
    x0, y0, x1, y1 = box
    w, h, cx = x1 - x0, y1 - y0, (x0 + x1) / 2
    crotch = y0 + (0.3 if leg > 0.6 else 0.55) * h
    b.rectangle((x0 + 0.05 * w, y0 + 0.08 * h, x1 - 0.05 * w, crotch), fill=255)
    b.polygon([(x0 + 0.05 * w, crotch), (cx - 0.02 * w, crotch), (cx - 0.06 * w, y1), (x0, y1)], fill=255)
    b.polygon([(cx + 0.02 * w, crotch), (x1 - 0.05 * w, crotch), (x1, y1), (cx + 0.06 * w, y1)], fill=255)
    t.rectangle((x0 + 0.04 * w, y0, x1 - 0.04 * w, y0 + 0.08 * h), fill=255)
    line = max(1, int(0.02 * w))
    t.arc((x0 - 0.1 * w, y0 - 0.05 * h, x0 + 0.35 * w, y0 + 0.25 * h), 0, 90, fill=200, width=line)
    t.arc((x1 - 0.35 * w, y0 - 0.05 * h, x1 + 0.1 * w, y0 + 0.25 * h), 90, 180, fill=200, width=line)
    return {"chest": (x0 + 0.25 * w, y0 + 0.2 * h, 0.06 * w), "centre": (x1 - 0.25 * w, y0 + 0.2 * h, 0.06 * w)}


def _trousers(b, t, box):
    return _legs(b, t, box, leg=1.0)


def _shorts(b, t, box):
    return _legs(b, t, box, leg=0.4)


def _sneaker(b, t, box):
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    sole = y1 - 0.2 * h
    b.polygon([(x0 + 0.02 * w, sole), (x0, y0 + 0.2 * h), (x0 + 0.3 * w, y0), (x0 + 0.45 * w, y0 + 0.15 * h),
               (x1 - 0.15 * w, y0 + 0.45 * h), (x1, sole)], fill=255)
    t.rounded_rectangle((x0 - 0.01 * w, sole, x1 + 0.01 * w, y1), radius=0.08 * h, fill=255)
    for k in range(4):  # laces
        lx = x0 + (0.38 + 0.09 * k) * w
        t.line([(lx, y0 + (0.12 + 0.09 * k) * h), (lx + 0.06 * w, y0 + (0.2 + 0.09 * k) * h)], fill=230,
               width=max(1, int(0.03 * h)))
    spot = (x0 + 0.55 * w, y0 + 0.6 * h, 0.12 * h)
    return {"chest": spot, "centre": spot}


def _boot(b, t, box):
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    sole = y1 - 0.1 * h
    b.polygon([(x0 + 0.1 * w, y0), (x0 + 0.55 * w, y0), (x0 + 0.6 * w, y0 + 0.55 * h), (x1, y0 + 0.72 * h),
               (x1, sole), (x0 + 0.08 * w, sole)], fill=255)
    t.rectangle((x0 + 0.06 * w, sole, x1 + 0.01 * w, y1), fill=255)
    t.rectangle((x0 + 0.1 * w, y0, x0 + 0.55 * w, y0 + 0.07 * h), fill=255)
    spot = (x0 + 0.33 * w, y0 + 0.35 * h, 0.1 * w)
    return {"chest": spot, "centre": spot}


def _backpack(b, t, box):
    x0, y0, x1, y1 = box
    w, h, cx = x1 - x0, y1 - y0, (x0 + x1) / 2
    b.rounded_rectangle((x0, y0 + 0.1 * h, x1, y1), radius=0.25 * w, fill=255)
    t.arc((cx - 0.15 * w, y0, cx + 0.15 * w, y0 + 0.2 * h), 180, 360, fill=255, width=max(1, int(0.04 * w)))
    t.rounded_rectangle((x0 + 0.15 * w, y0 + 0.58 * h, x1 - 0.15 * w, y1 - 0.06 * h), radius=0.1 * w, fill=255)
    spot = (cx, y0 + 0.4 * h, 0.1 * w)
    return {"chest": spot, "centre": spot}


def _tote(b, t, box):
    x0, y0, x1, y1 = box
    w, h, cx = x1 - x0, y1 - y0, (x0 + x1) / 2
    b.polygon([(x0 + 0.1 * w, y0 + 0.35 * h), (x1 - 0.1 * w, y0 + 0.35 * h), (x1, y1), (x0, y1)], fill=255)
    for side in (-1, 1):
        t.arc((cx + side * 0.18 * w - 0.2 * w, y0, cx + side * 0.18 * w + 0.2 * w, y0 + 0.7 * h), 180, 360,
              fill=255, width=max(1, int(0.035 * w)))
    spot = (cx, y0 + 0.62 * h, 0.09 * w)
    return {"chest": spot, "centre": spot}


def _cap(b, t, box):
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    b.pieslice((x0, y0, x0 + 0.75 * w, y1 + 0.75 * h), 180, 360, fill=255)
    t.ellipse((x0 + 0.45 * w, y0 + 0.62 * h, x1, y1 + 0.05 * h), fill=255)
    t.ellipse((x0 + 0.34 * w, y0 - 0.04 * h, x0 + 0.41 * w, y0 + 0.06 * h), fill=255)
    spot = (x0 + 0.37 * w, y0 + 0.45 * h, 0.1 * w)
    return {"chest": spot, "centre": spot}


def _socks(b, t, box):
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    b.rectangle((x0 + 0.15 * w, y0, x0 + 0.6 * w, y0 + 0.7 * h), fill=255)
    b.rounded_rectangle((x0 + 0.15 * w, y0 + 0.55 * h, x1, y1), radius=0.2 * w, fill=255)
    t.rectangle((x0 + 0.13 * w, y0, x0 + 0.62 * w, y0 + 0.12 * h), fill=255)
    t.pieslice((x1 - 0.4 * w, y0 + 0.55 * h, x1, y1), 270, 90, fill=255)
    spot = (x0 + 0.38 * w, y0 + 0.3 * h, 0.1 * w)
    return {"chest": spot, "centre": spot}


def _scarf(b, t, box):
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    b.rectangle((x0, y0 + 0.06 * h, x1, y1 - 0.06 * h), fill=255)
    for k in range(7):  # fringe
        fx = x0 + (k + 0.5) * w / 7
        t.line([(fx, y0), (fx, y0 + 0.07 * h)], fill=255, width=max(1, int(0.05 * w)))
        t.line([(fx, y1 - 0.07 * h), (fx, y1)], fill=255, width=max(1, int(0.05 * w)))
    spot = (x0 + 0.5 * w, y1 - 0.18 * h, 0.16 * w)
    return {"chest": spot, "centre": spot}


SHAPES = {"tee": _tee, "hoodie": _hoodie, "shirt": _shirt, "sweater": _sweater, "puffer": _puffer, "dress": _dress,
          "skirt": _skirt, "trousers": _trousers, "shorts": _shorts, "sneaker": _sneaker, "boot": _boot,
          "backpack": _backpack, "tote": _tote, "cap": _cap, "socks": _socks, "scarf": _scarf}


def _detail(t: ImageDraw.ImageDraw, kind: str, box) -> None:
    x0, y0, x1, y1 = box
    w, h, cx = x1 - x0, y1 - y0, (x0 + x1) / 2
    line = max(1, int(0.02 * w))
    if kind == "pocket":
        t.rectangle((cx - 0.16 * w, y0 + 0.62 * h, cx + 0.16 * w, y0 + 0.8 * h), outline=255, width=line)
    elif kind == "zip":
        t.line([(cx, y0 + 0.1 * h), (cx, y1)], fill=255, width=line)
    elif kind == "hem":
        t.rectangle((x0 + 0.2 * w, y1 - 0.07 * h, x1 - 0.2 * w, y1), fill=255)
    elif kind == "yoke":
        t.line([(x0 + 0.22 * w, y0 + 0.2 * h), (x1 - 0.22 * w, y0 + 0.2 * h)], fill=255, width=line)


def render_sprite(sku: Sku, brand: Brand, kind: Garment, px: int) -> Image.Image:
    """The item laid flat on a transparent px x px canvas, upright and centred; the size cue scales it."""
    n_sizes = len(SIZES[kind.sizes])
    extent = 0.8 * px * (0.76 + 0.24 * sku.size / max(1, n_sizes - 1))
    h = extent if kind.length >= 1 else extent * kind.length
    w = h / kind.length
    box = (px / 2 - w / 2, px / 2 - h / 2 + 0.03 * px, px / 2 + w / 2, px / 2 + h / 2 + 0.03 * px)
    body, trim = Image.new("L", (px, px), 0), Image.new("L", (px, px), 0)
    b, t = ImageDraw.Draw(body), ImageDraw.Draw(trim)
    logo = SHAPES[kind.shape](b, t, box)
    _detail(t, kind.detail, box)
    colour = COLOURS[sku.colour][1]
    cloth = fabric(TEXTURES[sku.texture], colour, brand.trim, px, np.random.default_rng(sku.look))
    x0, y0, x1, y1 = box
    if brand.signature == "stripes":  # two accent stripes down the sides of the body
        for sx in (x0 + 0.27 * (x1 - x0), x1 - 0.27 * (x1 - x0)):
            cloth[int(y0):int(y1), int(sx):int(sx + max(1, 0.025 * px))] = brand.accent
    elif brand.signature == "band":
        yb = int(y0 + 0.55 * (y1 - y0))
        cloth[yb:yb + max(1, int(0.035 * px)), :] = brand.accent
    b_mask = np.asarray(body, np.float32)[..., None] / 255
    t_mask = np.asarray(trim, np.float32)[..., None] / 255
    rgb = cloth * (1 - t_mask) + np.array(brand.trim, np.float32) * t_mask
    alpha = np.maximum(b_mask, (t_mask > 0).astype(np.float32))[..., 0] * 255
    img = Image.fromarray(np.dstack([np.clip(rgb, 0, 255), alpha]).astype(np.uint8), "RGBA")
    cx, cy, r = logo[brand.logo]
    draw_mark(ImageDraw.Draw(img), brand.mark, cx, cy, max(1.0, r), brand.accent + (255,))
    return img


# --- the scene ------------------------------------------------------------------------------------

def _background(size: int, rng: np.random.Generator) -> Image.Image:
    """A surface to lay the item on: wooden planks, bed linen, floor tiles, a rug or a studio sweep."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    kind = rng.integers(5)
    if kind == 0:  # planks with grain
        base = np.array(hsv(rng.uniform(0.04, 0.11), rng.uniform(0.25, 0.6), rng.uniform(0.35, 0.85)), np.float32)
        pitch = rng.uniform(0.15, 0.3)
        plank = np.floor((y + rng.random()) / pitch)
        shade = 0.85 + 0.3 * ((plank * 0.618 + rng.random()) % 1.0)
        grain = 1 + 0.08 * np.sin(2 * math.pi * (x * rng.uniform(2, 5) + 3 * np.sin(plank + y * 7)))
        seam = np.where(((y + rng.random()) / pitch) % 1.0 < 0.04, 0.6, 1.0)
        pixels = base * (shade * grain * seam)[..., None]
    elif kind == 1:  # linen: a weave and soft folds
        base = np.array(hsv(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.7, 0.98)), np.float32)
        pitch = rng.uniform(0.02, 0.04)
        weave = 1 + 0.05 * np.sin(2 * math.pi * x / pitch) * np.sin(2 * math.pi * y / pitch)
        folds = 1 - 0.1 * np.sin(2 * math.pi * (x * rng.uniform(0.5, 2) + y * rng.uniform(0.5, 2) + rng.random()))
        pixels = base * (weave * folds)[..., None]
    elif kind == 2:  # floor tiles
        base = np.array(hsv(rng.random(), rng.uniform(0.0, 0.2), rng.uniform(0.55, 0.95)), np.float32)
        pitch = rng.uniform(0.2, 0.4)
        u, v = (x + rng.random()) / pitch, (y + rng.random()) / pitch
        tile = 0.93 + 0.14 * ((np.floor(u) * 0.37 + np.floor(v) * 0.71) % 1.0)
        grout = np.where((u % 1.0 < 0.05) | (v % 1.0 < 0.05), 0.7, 1.0)
        pixels = base * (tile * grout)[..., None]
    elif kind == 3:  # a rug: two colours in a coarse random pattern
        a = np.array(hsv(rng.random(), rng.uniform(0.2, 0.7), rng.uniform(0.3, 0.8)), np.float32)
        c = np.array(hsv(rng.random(), rng.uniform(0.1, 0.6), rng.uniform(0.4, 0.95)), np.float32)
        cells = (rng.random((5, 5)) * 255).astype(np.uint8)
        field = np.asarray(Image.fromarray(cells).resize((size, size), Image.BILINEAR), np.float32)[..., None] / 255
        pixels = a * (1 - field) + c * field
    else:  # studio sweep: a vertical gradient and a vignette
        top = np.array(hsv(rng.random(), rng.uniform(0.0, 0.15), rng.uniform(0.85, 1.0)), np.float32)
        bottom = np.array(hsv(rng.random(), rng.uniform(0.0, 0.2), rng.uniform(0.6, 0.85)), np.float32)
        vignette = 1 - 0.35 * ((x - 0.5) ** 2 + (y - 0.5) ** 2)
        pixels = (top * (1 - y[..., None]) + bottom * y[..., None]) * vignette[..., None]
    fine = rng.normal(0, 4, size=(size, size, 1)).astype(np.float32)
    return Image.fromarray(np.clip(pixels + fine, 0, 255).astype(np.uint8), "RGB")


def render_photo(sprite: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    """One seller photo: the item laid on a surface, turned, scaled, shifted, with a drop shadow,
    sometimes a hanger, a price tag or a hand over it, then the camera."""
    img = _background(size, rng)
    part = sprite.rotate(float(rng.uniform(-25, 25)), resample=Image.BILINEAR, expand=True)
    k = rng.uniform(0.6, 0.95) * size / sprite.width
    part = part.resize((max(1, round(part.width * k)), max(1, round(part.height * k))), Image.BILINEAR)
    x = int(round((size - part.width) / 2 + rng.normal(0, 0.08) * size))
    y = int(round((size - part.height) / 2 + rng.normal(0, 0.08) * size))
    if rng.random() < 0.7:  # a soft shadow under the item
        shadow = part.getchannel("A").filter(ImageFilter.GaussianBlur(max(1.0, 0.03 * size)))
        shadow = shadow.point(lambda a: int(a * 0.45))
        offset = (rng.uniform(0.01, 0.05, size=2) * size).astype(int)
        img.paste((0, 0, 0), (x + int(offset[0]), y + int(offset[1])), shadow)
    img.paste(part, (x, y), part)
    if rng.random() < 0.3:
        d = ImageDraw.Draw(img)
        what = rng.integers(3)
        ox, oy = x + rng.uniform(0, 1) * part.width, y + rng.uniform(0, 1) * part.height
        if what == 0:  # a hanger's hook and bar at the top
            hx, hy = x + part.width / 2, y + 0.05 * size
            d.arc((hx - 0.06 * size, hy - 0.12 * size, hx + 0.06 * size, hy), 180, 360, fill=(60, 60, 60),
                  width=max(1, size // 40))
            d.line([(hx - 0.3 * size, hy + 0.06 * size), (hx, hy), (hx + 0.3 * size, hy + 0.06 * size)],
                   fill=(70, 50, 30), width=max(1, size // 25))
        elif what == 1:  # a price tag on a string
            tw, th = 0.1 * size, 0.15 * size
            d.line([(ox, oy), (ox + 0.05 * size, oy + 0.05 * size)], fill=(40, 40, 40), width=1)
            d.rectangle((ox + 0.05 * size, oy + 0.05 * size, ox + 0.05 * size + tw, oy + 0.05 * size + th),
                        fill=(245, 245, 240))
        else:  # a hand smoothing the fabric
            skin = hsv(rng.uniform(0.03, 0.09), rng.uniform(0.25, 0.55), rng.uniform(0.55, 0.95))
            r = rng.uniform(0.1, 0.18) * size
            d.ellipse((ox - r, oy - 0.7 * r, ox + r, oy + 0.7 * r), fill=skin)
    return camera(img, rng)


# --- titles ---------------------------------------------------------------------------------------

def _is_cjk(char: str) -> bool:
    return "\u3400" <= char <= "\u9fff"


def _join(pieces: list[str], rng: np.random.Generator | None = None) -> str:
    """Pieces typed the way sellers type them: Chinese glued to Chinese, a space between Latin or digit
    pieces, and between Chinese and Latin a space now and then (always, without an rng)."""
    out = pieces[0]
    for piece in pieces[1:]:
        left, right = _is_cjk(out[-1]), _is_cjk(piece[0])
        if left and right:
            sep = ""
        elif not left and not right:
            sep = " "
        else:
            sep = " " if rng is None or rng.random() < 0.3 else ""
        out += sep + piece
    return out


def product_title(sku: Sku, brand: Brand, kind: Garment) -> str:
    """The clean catalog title: brand, style number, pattern, garment, colour, size."""
    return _join([brand.latin, brand.chinese, sku.style, TEXTURES[sku.texture], kind.word, COLOURS[sku.colour][0],
                  SIZES[kind.sizes][sku.size]])


def seller_title(sku: Sku, brand: Brand, kind: Garment, noise: float, empty_rate: float,
                 rng: np.random.Generator) -> str:
    """A noisy unspaced seller title. As in the packaged world, `noise` is the share of noise words and
    the chance each variant word (colour, pattern, size) is dropped or wrong; brand, style number and
    garment words are dropped with chance noise**2."""
    if rng.random() < empty_rate:
        return ""
    noise = clamp_noise(noise)
    core = keep_core(noise)
    brand_words = []
    if rng.random() < core:  # Latin, Chinese, or both glued in either order
        form = rng.integers(4)
        brand_words = [[brand.latin], [brand.chinese], [brand.latin, brand.chinese], [brand.chinese, brand.latin]][form]
    body = []
    if rng.random() < 0.6:
        body.append(kind.descriptors[int(rng.integers(len(kind.descriptors)))])
    texture = seller_variant(sku.texture, len(TEXTURES), noise, rng)
    if texture is not None:
        body.append(TEXTURES[texture])
    body = [body[i] for i in rng.permutation(len(body))]  # "连帽条纹" or "条纹连帽"
    if rng.random() < core:
        body.append(kind.word)
    if rng.random() < 0.3:
        body.append(kind.tags[0])
    spec = []
    colour = seller_variant(sku.colour, len(COLOURS), noise, rng)
    if colour is not None:
        spec.append(COLOURS[colour][0])
    sizes = SIZES[kind.sizes]
    size = seller_variant(sku.size, len(sizes), noise, rng)
    if size is not None:
        spec.append(sizes[size])
    if colour is not None and rng.random() < 0.35:  # the colour up front ("黑色条纹卫衣"), the size stays last
        body.insert(0, spec.pop(0))
    words = body + spec
    if rng.random() < 0.35 and rng.random() < core:
        words.insert(int(rng.integers(len(words) + 1)), sku.style)
    n_real = len(words) + len(brand_words)
    for _ in range(noise_word_count(n_real, noise, rng)):
        pool = PROMO_WORDS if rng.random() < 0.6 else IRRELEVANT_WORDS
        words.insert(int(rng.integers(len(words) + 1)), pool[int(rng.integers(len(pool)))])
    if brand_words:  # mostly first, sometimes anywhere
        at = 0 if rng.random() < 0.7 else int(rng.integers(len(words) + 1))
        words[at:at] = brand_words
    words = [maybe_misspell(w, noise, rng) for w in words]
    return _join(words, rng) if words else ""


# --- the generator --------------------------------------------------------------------------------

def build(cfg, rng: np.random.Generator) -> World:
    """The apparel world `cfg` (a `sicot.config.Data`) describes, drawn from `rng`."""
    brands = make_brands(cfg.brands, rng)
    garments = make_garments(cfg.categories)
    skus = make_skus(cfg.skus + cfg.holdout_skus, brands, garments, rng)
    size = cfg.image_size

    def product(sku: Sku) -> Product:
        brand, kind = brands[sku.brand], garments[sku.category]
        sprite = render_sprite(sku, brand, kind, 2 * size)  # twice the size: the downscaled photo is anti-aliased
        return Product(
            photo=lambda rng: render_photo(sprite, size, rng),
            title=lambda rng: seller_title(sku, brand, kind, cfg.title_noise, cfg.empty_title_rate, rng),
            tags=list(kind.tags), catalog_image=render_catalog(sprite, size),
            catalog_title=product_title(sku, brand, kind),
            catalog_tags=[*kind.tags, brand.latin, COLOURS[sku.colour][0], TEXTURES[sku.texture]])

    return World(skus=skus, brands=len(brands), categories=len(garments),
                 noise_words=PROMO_WORDS + IRRELEVANT_WORDS, product=product)


def generate(out_dir: str | Path, cfg) -> dict:
    """Write the apparel world described by `cfg` (a `sicot.config.Data`) to the local directory `out_dir`,
    atomically; returns its statistics (sicot.data.worldgen.write_world)."""
    return write_world(out_dir, cfg, build)
