"""Product titles to words: jieba for Chinese, whole latin words and numbers-with-units for the rest.

Titles mix scripts freely ("2024新款 雅诗兰黛 小棕瓶 精华液 50ml 包邮"). The text is NFKC-normalised first,
so full-width letters and digits ("５０ＭＬ") read like their ASCII forms, then lower-cased. Runs of Chinese
characters go to jieba; every other run of letters and digits is one token, so "500ml", "iphone15",
"1.5l" and "ev-910" stay whole: a quantity with its unit or a model number is a strong product cue.
Other punctuation and whitespace only separate tokens.
"""
from __future__ import annotations

import functools
import logging
import re
import unicodedata

_CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
# A Chinese run, or a run of other letters/digits, joined across "." and "-" inside it ("1.5l", "v2.0",
# model numbers such as "ev-910").
_TOKEN = re.compile(rf"(?P<cjk>[{_CJK}]+)|(?P<word>[^\W_{_CJK}]+(?:[.\-][^\W_{_CJK}]+)*)")


@functools.cache
def _jieba():
    import jieba  # lazy: loading its dictionary takes ~2 s on first use

    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()
    return jieba


def tokenize(title: str) -> list[str]:
    """Split a title into lower-cased words; an empty or punctuation-only title gives []."""
    text = unicodedata.normalize("NFKC", title or "").lower()
    tokens: list[str] = []
    for match in _TOKEN.finditer(text):
        if match.group("cjk"):
            tokens += [w for w in _jieba().lcut(match.group("cjk")) if w.strip()]
        else:
            tokens.append(match.group("word"))
    return tokens
