"""Re-captioning. The default captioner cleans alt text: it trims and collapses whitespace and
blanks what is not a description (file names, camera names, shop boilerplate), so a demo's caption
is either words about the picture or empty."""
from __future__ import annotations

import re

BOILERPLATE = re.compile(
    r"^(img|dsc|dscn|pxl|photo|image|picture|untitled|thumbnail|thumb|product image|click to enlarge|buy now|"
    r"sale!?|image \d+ of \d+|[\w-]+\.(jpe?g|png|gif|webp))[\s_\-\d]*$|^(img|dsc|dscn|pxl)_?\d+(\.\w+)?$",
    re.IGNORECASE)


def clean_caption(text) -> str:
    text = " ".join(str(text or "").split())
    return "" if not text or BOILERPLATE.match(text) else text
