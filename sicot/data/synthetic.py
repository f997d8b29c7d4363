"""A seeded, long-tailed SKU-level product world in the dataset contract's format.

It stands in for marketplace data. A SKU is brand x category x variant:
- the brand gives a colour palette and a brand mark, the category a package shape, the variant smaller
  cues (a colour band, the package size, a label pattern), so SKUs of one product line look alike and a
  tail SKU shares most of its look with head SKUs of the same brand or category;
- each photo varies pose, scale, position, background clutter, lighting, blur and occlusion;
- each photo has a noisy Chinese seller title with Latin brand/model tokens. `title_noise` sets both the
  share of promotional/irrelevant words and how often a variant word is dropped or replaced by a wrong
  one, so titles range from nearly decisive (0.2) to mostly noise (0.9).

`data.world: packaged` selects it. The long tail, the streamed writing and the title-noise mechanics are
shared with the other worlds (sicot.data.worldgen).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

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
    is_latin,
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

# attribute kind -> [(word, rgb)]: the word goes in the title, the colour onto the package's band.
ATTRIBUTES = {
    "colour": [("红色", (200, 30, 40)), ("蓝色", (30, 70, 200)), ("绿色", (40, 150, 60)),
               ("黄色", (240, 210, 40)), ("紫色", (120, 50, 160)), ("粉色", (240, 140, 180)),
               ("黑色", (25, 25, 25)), ("白色", (245, 245, 245)), ("橙色", (245, 130, 30)),
               ("棕色", (120, 75, 40)), ("灰色", (130, 130, 130)), ("金色", (210, 170, 60)),
               ("银色", (190, 195, 200)), ("青色", (40, 180, 180)), ("酒红色", (120, 20, 40)),
               ("藏青色", (20, 30, 80))],
    "flavour": [("草莓味", (220, 40, 70)), ("柠檬味", (245, 225, 60)), ("原味", (235, 225, 200)),
                ("巧克力味", (90, 50, 30)), ("抹茶味", (110, 160, 70)), ("香草味", (240, 230, 170)),
                ("芒果味", (250, 170, 30)), ("蓝莓味", (70, 60, 150)), ("海盐味", (150, 200, 230)),
                ("烧烤味", (170, 70, 30)), ("番茄味", (230, 60, 40)), ("葡萄味", (120, 40, 120)),
                ("椰子味", (250, 250, 240)), ("桃子味", (250, 170, 150)), ("青苹果味", (150, 210, 60)),
                ("黑糖味", (60, 35, 25))],
    "scent": [("玫瑰", (210, 60, 100)), ("薰衣草", (150, 120, 200)), ("茉莉", (250, 250, 220)),
              ("柑橘", (250, 150, 40)), ("海洋", (40, 130, 200)), ("檀香", (160, 110, 70)),
              ("樱花", (250, 190, 210)), ("绿茶", (120, 170, 80)), ("薄荷", (120, 220, 190)),
              ("栀子", (240, 240, 200)), ("白桃", (250, 210, 190)), ("雪松", (80, 100, 70)),
              ("琥珀", (200, 130, 40)), ("无香", (220, 220, 220))],
}

SIZES = {
    "ml": ["30ml", "50ml", "100ml", "150ml", "200ml", "250ml", "300ml", "400ml", "500ml", "750ml", "1000ml"],
    "g": ["15g", "30g", "50g", "80g", "100g", "120g", "150g", "200g", "250g", "500g"],
    "片": ["5片", "10片", "15片", "20片", "30片"],
    "kg": ["1kg", "1.5kg", "2kg", "2.5kg", "5kg", "10kg"],
    "抽": ["80抽", "100抽", "120抽", "130抽", "200抽"],
}


@dataclass(frozen=True)
class CategoryKind:
    word: str
    body: str      # rect | round | cylinder | trap_up | trap_down | pillow
    top: str       # none | neck | pump | nozzle | lid | crimp | gable | dropper
    bottom: str    # none | cap | crimp
    aspect: float  # body width / height
    tags: tuple[str, str]
    attribute: str
    unit: str


BASE_CATEGORIES = [
    CategoryKind("精华液", "round", "dropper", "none", 0.55, ("护肤", "精华"), "scent", "ml"),
    CategoryKind("洗发水", "round", "neck", "none", 0.5, ("洗护", "洗发"), "scent", "ml"),
    CategoryKind("沐浴露", "rect", "pump", "none", 0.6, ("洗护", "沐浴"), "scent", "ml"),
    CategoryKind("面霜", "rect", "lid", "none", 1.5, ("护肤", "面霜"), "scent", "g"),
    CategoryKind("洗面奶", "trap_down", "crimp", "cap", 0.45, ("护肤", "洁面"), "scent", "g"),
    CategoryKind("牙膏", "trap_down", "crimp", "cap", 0.3, ("口腔", "牙膏"), "flavour", "g"),
    CategoryKind("口红", "rect", "gable", "cap", 0.28, ("彩妆", "口红"), "colour", "g"),
    CategoryKind("香水", "rect", "nozzle", "none", 0.9, ("香水", "香氛"), "scent", "ml"),
    CategoryKind("薯片", "pillow", "crimp", "crimp", 0.75, ("零食", "膨化"), "flavour", "g"),
    CategoryKind("饼干", "rect", "none", "none", 1.4, ("零食", "饼干"), "flavour", "g"),
    CategoryKind("巧克力", "rect", "crimp", "crimp", 0.35, ("零食", "巧克力"), "flavour", "g"),
    CategoryKind("咖啡", "cylinder", "none", "none", 0.6, ("饮品", "咖啡"), "flavour", "ml"),
    CategoryKind("果汁", "rect", "gable", "none", 0.55, ("饮品", "果汁"), "flavour", "ml"),
    CategoryKind("矿泉水", "round", "neck", "none", 0.38, ("饮品", "饮用水"), "flavour", "ml"),
    CategoryKind("茶叶", "cylinder", "lid", "none", 0.85, ("茶饮", "茶叶"), "flavour", "g"),
    CategoryKind("洗衣液", "round", "lid", "none", 0.8, ("家清", "洗衣"), "scent", "ml"),
    CategoryKind("纸巾", "round", "none", "none", 1.8, ("家居", "纸品"), "scent", "抽"),
    CategoryKind("护手霜", "trap_down", "crimp", "cap", 0.5, ("护肤", "护手"), "scent", "g"),
    CategoryKind("面膜", "pillow", "none", "none", 0.7, ("护肤", "面膜"), "scent", "片"),
    CategoryKind("酸奶", "trap_up", "lid", "none", 0.9, ("乳品", "酸奶"), "flavour", "g"),
    CategoryKind("洗洁精", "rect", "neck", "none", 0.45, ("家清", "洗碗"), "scent", "ml"),
    CategoryKind("猫粮", "pillow", "crimp", "none", 0.65, ("宠物", "猫粮"), "flavour", "kg"),
    CategoryKind("指甲油", "round", "neck", "none", 0.7, ("彩妆", "美甲"), "colour", "ml"),
    CategoryKind("防晒霜", "trap_down", "none", "cap", 0.42, ("护肤", "防晒"), "scent", "ml"),
]
# Categories beyond the base list: a modified base category (new word, proportions and top).
CATEGORY_MODIFIERS = ["男士", "儿童", "旅行装", "家庭装", "高端", "迷你", "植物", "无糖", "有机", "专业",
                      "经典", "清爽", "滋润", "敏感肌", "大师", "轻盈"]
TOPS = ["none", "neck", "pump", "nozzle", "lid", "crimp", "gable", "dropper"]

PATTERNS = ["plain", "hstripes", "vstripes", "dots", "checks", "diagonal"]

CN_BRAND_CHARS = list("露米卡莎雅诗兰黛欧莱美佳洁丽馨娜斯帝维尔思朗博康宝格林安泰瑞凯森贝蒂芙婷妮蓝月星花源清润"
                      "颜优品悦川禾田本和乐家福金银天云菲奥伊芝薇")
LATIN_ONSETS = ["b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
                "br", "ch", "tr", "fl", "gr", "st"]
LATIN_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "io"]
MODEL_WORDS = ["Pro", "Max", "Plus", "Lite", "Air", "Mini", "Ultra", "Neo"]

PROMO_WORDS = ["包邮", "新款", "正品", "折扣", "热卖", "2024新款", "free shipping", "限时特价", "官方旗舰店",
               "买一送一", "爆款", "清仓", "现货", "秒杀", "特惠", "促销", "限量", "正品保证", "假一赔十", "顺丰",
               "厂家直销", "批发", "礼盒装", "新品", "hot sale", "sale", "new", "official", "2023款", "网红",
               "同款", "推荐", "优惠", "满减", "旗舰", "直播", "抢购", "best seller"]
IRRELEVANT_WORDS = ["家用", "办公室", "学生", "男女通用", "大容量", "便携", "日常", "夏季", "冬季", "宿舍",
                    "旅行", "情侣", "成人", "囤货", "实惠", "好用", "高颜值", "日本", "韩国", "进口", "国产",
                    "天然", "温和", "持久", "清爽", "经典", "简约", "时尚", "质量好", "送女友", "必备", "套装"]


# --- the world: brands, categories, product lines, SKUs -------------------------------------------

@dataclass(frozen=True)
class Brand:
    latin: str
    chinese: str
    primary: tuple[int, int, int]
    secondary: tuple[int, int, int]
    accent: tuple[int, int, int]
    mark: str


@dataclass(frozen=True)
class Sku:
    id: str
    brand: int
    category: int
    model: str        # model token of its product line, shared by the line's variants
    attribute: int    # index into ATTRIBUTES[category.attribute]
    size: int         # index into SIZES[category.unit]
    pattern: str

    def named(self, sku_id: str) -> Sku:
        return replace(self, id=sku_id)


def make_brands(n: int, rng: np.random.Generator) -> list[Brand]:
    latin_seen, chinese_seen, brands = set(), set(), []
    cn_len = 2 if n <= len(CN_BRAND_CHARS) ** 2 // 2 else 3
    while len(brands) < n:
        syllables = 2 if rng.random() < 0.75 else 3
        latin = "".join(LATIN_ONSETS[rng.integers(len(LATIN_ONSETS))] + LATIN_VOWELS[rng.integers(len(LATIN_VOWELS))]
                        for _ in range(syllables)).capitalize()
        chinese = "".join(CN_BRAND_CHARS[i] for i in rng.integers(len(CN_BRAND_CHARS), size=cn_len))
        if latin in latin_seen or chinese in chinese_seen:
            continue
        latin_seen.add(latin)
        chinese_seen.add(chinese)
        hue = rng.random()
        brands.append(Brand(
            latin=latin, chinese=chinese,
            primary=hsv(hue, rng.uniform(0.45, 0.95), rng.uniform(0.45, 0.9)),
            secondary=hsv(hue + rng.choice([0.0, 0.5, 0.08]), rng.uniform(0.05, 0.35), rng.uniform(0.85, 1.0)),
            accent=hsv(hue + rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.9), rng.uniform(0.2, 0.9)),
            mark=MARKS[rng.integers(len(MARKS))]))
    return brands


def make_categories(n: int) -> list[CategoryKind]:
    """Beyond the base list: a modified base category with new proportions and another top."""
    return extend_kinds(BASE_CATEGORIES, CATEGORY_MODIFIERS, n, lambda kind, round_: replace(
        kind, top=TOPS[(TOPS.index(kind.top) + round_) % len(TOPS)], aspect=kind.aspect * (0.75 + 0.1 * (round_ % 6))))


def _model_token(rng: np.random.Generator) -> str:
    if rng.random() < 0.35:
        return MODEL_WORDS[rng.integers(len(MODEL_WORDS))]
    letters = "ABCDEFGHKLMNPRSTVXZ"
    head = "".join(letters[i] for i in rng.integers(len(letters), size=int(rng.integers(1, 3))))
    return f"{head}{int(rng.integers(1, 1000))}" if rng.random() < 0.5 else f"{head}-{int(rng.integers(1, 100)) * 10}"


def make_skus(total: int, brands: list[Brand], categories: list[CategoryKind], rng: np.random.Generator,
              variants_per_line: int = 3) -> list[Sku]:
    """`total` SKUs grouped into product lines (a brand x category pair) of a few variants each."""
    skus = []
    for brand, category, n_variants in product_lines(total, len(brands), len(categories), rng, variants_per_line):
        kind = categories[category]
        n_attr, n_size = len(ATTRIBUTES[kind.attribute]), len(SIZES[kind.unit])
        if n_variants > n_attr * n_size:
            raise ValueError(f"{total} SKUs need {n_variants} variants per product line, more than the "
                             f"{n_attr * n_size} a category offers: raise data.brands or data.categories")
        model = _model_token(rng)
        for combo in rng.choice(n_attr * n_size, size=n_variants, replace=False).tolist():
            attribute, size = divmod(combo, n_size)
            skus.append(Sku("", brand, category, model, attribute, size, PATTERNS[rng.integers(len(PATTERNS))]))
    return assign_ids(skus, rng, total)


# --- rendering ------------------------------------------------------------------------------------

def _pattern(draw: ImageDraw.ImageDraw, kind: str, box, fill) -> None:
    x0, y0, x1, y1 = box
    step = max(2.0, (x1 - x0) / 5)
    width = max(1, int(step * 0.35))
    if kind == "hstripes":
        y = y0 + step / 2
        while y < y1:
            draw.line([(x0, y), (x1, y)], fill=fill, width=width)
            y += step
    elif kind == "vstripes":
        x = x0 + step / 2
        while x < x1:
            draw.line([(x, y0), (x, y1)], fill=fill, width=width)
            x += step
    elif kind == "dots":
        for yy in np.arange(y0 + step / 2, y1, step):
            for xx in np.arange(x0 + step / 2, x1, step):
                draw.ellipse((xx - width, yy - width, xx + width, yy + width), fill=fill)
    elif kind == "checks":
        for j, yy in enumerate(np.arange(y0, y1, step)):
            for i, xx in enumerate(np.arange(x0, x1, step)):
                if (i + j) % 2:
                    draw.rectangle((xx, yy, min(x1, xx + step), min(y1, yy + step)), fill=fill)
    elif kind == "diagonal":
        span = y1 - y0
        for k in np.arange(-span, x1 - x0, step):  # lines of slope -1, clipped to the box
            lo, hi = max(0.0, -k / span), min(1.0, (x1 - x0 - k) / span)
            if lo < hi:
                draw.line([(x0 + k + lo * span, y1 - lo * span), (x0 + k + hi * span, y1 - hi * span)],
                          fill=fill, width=width)


def render_sprite(sku: Sku, brand: Brand, kind: CategoryKind, px: int) -> Image.Image:
    """The product on a transparent px x px canvas, upright and centred; the size cue scales it."""
    img = Image.new("RGBA", (px, px), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    band = ATTRIBUTES[kind.attribute][sku.attribute][1]
    n_sizes = len(SIZES[kind.unit])
    scale = 0.72 + 0.28 * sku.size / max(1, n_sizes - 1)
    extent = 0.62 * px * scale  # the longer side of the body
    h = extent if kind.aspect <= 1 else extent / kind.aspect
    w = h * kind.aspect
    cx, cy = px / 2, px / 2 + 0.06 * px
    x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    body, accent = brand.primary + (255,), brand.accent + (255,)

    if kind.body == "round":
        d.rounded_rectangle((x0, y0, x1, y1), radius=0.22 * w, fill=body)
    elif kind.body == "cylinder":
        d.rectangle((x0, y0 + 0.06 * h, x1, y1 - 0.06 * h), fill=body)
        d.ellipse((x0, y1 - 0.12 * h, x1, y1), fill=body)
        d.ellipse((x0, y0, x1, y0 + 0.12 * h), fill=mix(brand.primary, (255, 255, 255), 0.3))
    elif kind.body == "trap_up":
        d.polygon([(x0, y0), (x1, y0), (x1 - 0.15 * w, y1), (x0 + 0.15 * w, y1)], fill=body)
    elif kind.body == "trap_down":
        d.polygon([(x0 + 0.12 * w, y0), (x1 - 0.12 * w, y0), (x1, y1), (x0, y1)], fill=body)
    elif kind.body == "pillow":
        d.rounded_rectangle((x0, y0, x1, y1), radius=0.12 * w, fill=body)
    else:
        d.rectangle((x0, y0, x1, y1), fill=body)

    def crimp(y: float, up: bool) -> None:
        teeth = 6
        tooth = 0.05 * h
        pts = [(x0 + (x1 - x0) * i / teeth, y + (-tooth if (i % 2) == up else 0)) for i in range(teeth + 1)]
        d.polygon([(x0, y), *pts, (x1, y)], fill=mix(brand.primary, (0, 0, 0), 0.25))
        d.rectangle((x0, min(y, y + (-tooth if up else tooth)), x1, max(y, y + (-tooth if up else tooth))),
                    fill=mix(brand.primary, (0, 0, 0), 0.25))

    neck_w = 0.34 * w
    if kind.top in ("neck", "pump", "dropper", "nozzle"):
        d.rectangle((cx - neck_w / 2, y0 - 0.1 * h, cx + neck_w / 2, y0 + 1), fill=body)
        d.rectangle((cx - neck_w * 0.65, y0 - 0.2 * h, cx + neck_w * 0.65, y0 - 0.09 * h), fill=accent)
        if kind.top == "pump":
            d.rectangle((cx - 0.06 * w, y0 - 0.3 * h, cx + 0.06 * w, y0 - 0.2 * h), fill=accent)
            d.rectangle((cx - 0.06 * w, y0 - 0.33 * h, cx + 0.4 * w, y0 - 0.28 * h), fill=accent)
        elif kind.top == "dropper":
            d.ellipse((cx - neck_w * 0.5, y0 - 0.36 * h, cx + neck_w * 0.5, y0 - 0.18 * h), fill=accent)
        elif kind.top == "nozzle":
            d.rectangle((cx - neck_w * 0.3, y0 - 0.28 * h, cx + neck_w * 0.3, y0 - 0.2 * h), fill=(40, 40, 40, 255))
    elif kind.top == "lid":
        d.rectangle((x0 - 0.03 * w, y0 - 0.14 * h, x1 + 0.03 * w, y0 + 0.02 * h), fill=accent)
    elif kind.top == "crimp":
        crimp(y0, up=True)
    elif kind.top == "gable":
        roof = mix(brand.primary, (255, 255, 255), 0.25)
        d.polygon([(x0, y0), (cx, y0 - 0.25 * h * min(1.0, w / h)), (x1, y0)], fill=roof)
    if kind.bottom == "cap":
        d.rectangle((cx - 0.3 * w, y1 - 1, cx + 0.3 * w, y1 + 0.12 * h), fill=accent)
    elif kind.bottom == "crimp":
        crimp(y1, up=False)

    # The label: brand secondary colour, the variant's pattern and band, the brand mark.
    lx0, ly0, lx1, ly1 = x0 + 0.14 * w, y0 + 0.22 * h, x1 - 0.14 * w, y0 + 0.7 * h
    d.rectangle((lx0, ly0, lx1, ly1), fill=brand.secondary + (255,))
    _pattern(d, sku.pattern, (lx0, ly0, lx1, ly1), mix(brand.secondary, band, 0.45) + (255,))
    d.rectangle((x0 + 0.04 * w, y0 + 0.74 * h, x1 - 0.04 * w, y0 + 0.88 * h), fill=band + (255,))
    r = 0.2 * min(lx1 - lx0, ly1 - ly0) + 0.6
    draw_mark(d, brand.mark, cx, (ly0 + ly1) / 2, max(1.0, r * 1.6), accent)
    return img


def _background(size: int, rng: np.random.Generator) -> Image.Image:
    base = hsv(rng.random(), rng.uniform(0.0, 0.35), rng.uniform(0.35, 0.95))
    img = Image.new("RGB", (size, size), base)
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 7))):  # clutter: shelves, other objects, table edges
        color = hsv(rng.random(), rng.uniform(0.0, 0.6), rng.uniform(0.2, 1.0))
        x0, y0 = rng.uniform(-0.2, 1.0, size=2) * size
        w, h = rng.uniform(0.1, 0.7, size=2) * size
        shape = rng.integers(3)
        if shape == 0:
            d.rectangle((x0, y0, x0 + w, y0 + h), fill=color)
        elif shape == 1:
            d.ellipse((x0, y0, x0 + w, y0 + h), fill=color)
        else:
            d.line([(x0, y0), (x0 + w, y0 + h)], fill=color, width=max(1, int(rng.integers(1, 4)) * size // 32))
    return img


def render_photo(sprite: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    """One seller photo of the product: pose, scale, position, clutter, occlusion, lighting, blur, noise."""
    img = _background(size, rng)
    angle = float(np.clip(rng.normal(0, 12), -35, 35))
    part = sprite.rotate(angle, resample=Image.BILINEAR, expand=True)
    k = rng.uniform(0.62, 0.95) * size / sprite.width
    part = part.resize((max(1, round(part.width * k)), max(1, round(part.height * k))), Image.BILINEAR)
    x = int(round((size - part.width) / 2 + rng.normal(0, 0.1) * size))
    y = int(round((size - part.height) / 2 + rng.normal(0, 0.08) * size))
    img.paste(part, (x, y), part)
    if rng.random() < 0.3:  # something in front of the product: a hand, a price tag, another item
        d = ImageDraw.Draw(img)
        ow, oh = rng.uniform(0.15, 0.35, size=2) * size
        ox = x + rng.uniform(0, 1) * part.width - ow / 2
        oy = y + rng.uniform(0, 1) * part.height - oh / 2
        color = hsv(rng.random(), rng.uniform(0.0, 0.5), rng.uniform(0.3, 1.0))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)((ox, oy, ox + ow, oy + oh), fill=color)
    return camera(img, rng)


# --- titles ---------------------------------------------------------------------------------------

def product_title(sku: Sku, brand: Brand, kind: CategoryKind) -> str:
    """The clean catalog title: brand, model, category, variant, size."""
    return " ".join([brand.latin, brand.chinese, sku.model, kind.word,
                     ATTRIBUTES[kind.attribute][sku.attribute][0], SIZES[kind.unit][sku.size]])


def seller_title(sku: Sku, brand: Brand, kind: CategoryKind, noise: float, empty_rate: float,
                 rng: np.random.Generator) -> str:
    """A noisy seller title. `noise` is the share of noise words and the chance each variant word is
    dropped or swapped for a wrong one; brand and category words are dropped with chance noise**2."""
    if rng.random() < empty_rate:
        return ""
    noise = clamp_noise(noise)
    core = keep_core(noise)
    words = []
    if rng.random() < 0.8 and rng.random() < core:
        words.append(brand.latin)
    if rng.random() < 0.6 and rng.random() < core:
        words.append(brand.chinese)
    if rng.random() < 0.5 and rng.random() < core:
        words.append(sku.model)
    if rng.random() < core:
        words.append(kind.word)
    if rng.random() < 0.3:
        words.append(kind.tags[int(rng.integers(2))])
    for values, value in ((ATTRIBUTES[kind.attribute], sku.attribute), (SIZES[kind.unit], sku.size)):
        chosen = seller_variant(value, len(values), noise, rng)
        if chosen is not None:
            item = values[chosen]
            words.append(item[0] if isinstance(item, tuple) else item)
    for _ in range(noise_word_count(len(words), noise, rng)):
        pool = PROMO_WORDS if rng.random() < 0.6 else IRRELEVANT_WORDS
        words.append(pool[int(rng.integers(len(pool)))])
    words = [maybe_misspell(w, noise, rng) for w in words]
    order = rng.permutation(len(words))
    words = [words[i] for i in order]
    out = words[:1]
    for word in words[1:]:  # sellers often glue Chinese words together
        glue = not is_latin(word) and not is_latin(out[-1]) and rng.random() < 0.25
        out[-1:] = [out[-1] + word] if glue else [out[-1], word]
    return " ".join(out)


# --- the generator --------------------------------------------------------------------------------

def build(cfg, rng: np.random.Generator) -> World:
    """The packaged-goods world `cfg` (a `sicot.config.Data`) describes, drawn from `rng`."""
    brands = make_brands(cfg.brands, rng)
    categories = make_categories(cfg.categories)
    skus = make_skus(cfg.skus + cfg.holdout_skus, brands, categories, rng)
    size = cfg.image_size

    def product(sku: Sku) -> Product:
        brand, kind = brands[sku.brand], categories[sku.category]
        sprite = render_sprite(sku, brand, kind, 2 * size)  # twice the size: the downscaled photo is anti-aliased
        return Product(
            photo=lambda rng: render_photo(sprite, size, rng),
            title=lambda rng: seller_title(sku, brand, kind, cfg.title_noise, cfg.empty_title_rate, rng),
            tags=list(kind.tags), catalog_image=render_catalog(sprite, size),
            catalog_title=product_title(sku, brand, kind),
            catalog_tags=[*kind.tags, brand.latin, ATTRIBUTES[kind.attribute][sku.attribute][0]])

    return World(skus=skus, brands=len(brands), categories=len(categories),
                 noise_words=PROMO_WORDS + IRRELEVANT_WORDS, product=product)


def generate(out_dir: str | Path, cfg) -> dict:
    """Write the packaged-goods world described by `cfg` (a `sicot.config.Data`) to the local directory
    `out_dir`, atomically; returns its statistics (sicot.data.worldgen.write_world)."""
    return write_world(out_dir, cfg, build)
