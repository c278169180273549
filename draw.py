"""Small drawing helpers shared by predict.py, atlas.py and toy2d.py: PIL and numpy only, PIL's default bitmap font.

Panels are PIL RGB images; `titled`, `row` and `column` put them together; `legend` draws swatches with names;
`scale_bar` the brightness scale of a prototype map; `scatter` points in [-1, 1]^2; `bars` a small bar chart;
`heatmap` a matrix of values in [-1, 1]; `line_chart` a curve with its axes. A leaf: imports nothing of the project.
"""
import colorsys

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (120, 120, 120)
LINE = 13                                  # text line height (the bitmap font is 11 px high)


def font():
    return ImageFont.load_default_imagefont()                  # bitmap, no file, no network


def text_width(text):
    return int(font().getbbox(text)[2])


def prototype_colours(k):
    """k well-separated hues (HSV wheel), full saturation and value. (k, 3) float in [0, 1]."""
    return np.array([colorsys.hsv_to_rgb(i / k, 1.0, 1.0) for i in range(k)], np.float32)


def rgb(colour):
    """A colour in [0, 1] floats or 0..255 ints -> tuple of 3 ints."""
    c = np.asarray(colour, np.float64)
    return tuple(int(v) for v in (c * 255 if c.max() <= 1 and c.dtype.kind == "f" else c).round())


def wrap(text, width):
    """Words of `text` broken into lines of at most `width` px."""
    lines = [""]
    for word in text.split():
        if lines[-1] and text_width(lines[-1] + " " + word) > width - 6:
            lines.append(word)
        else:
            lines[-1] = (lines[-1] + " " + word).strip()
    return lines


def text_panel(lines, width, fill=BLACK, bg=WHITE):
    """Lines of text (each wrapped to `width`) on a plain panel `width` wide."""
    lines = [part for line in lines for part in wrap(line, width)]
    img = Image.new("RGB", (max(width, 1), LINE * len(lines) + 4), bg)
    d = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        d.text((3, 2 + i * LINE), line, fill=fill, font=font())
    return img


def titled(panel, title, bg=WHITE):
    """The panel with a line of text above it (widened to fit the text)."""
    width = max(panel.width, text_width(title) + 6)
    out = Image.new("RGB", (width, panel.height + LINE + 3), bg)
    ImageDraw.Draw(out).text((3, 1), title, fill=BLACK, font=font())
    out.paste(panel, (0, LINE + 3))
    return out


def row(panels, gap=6, bg=WHITE):
    """Panels side by side, tops aligned."""
    out = Image.new("RGB", (sum(p.width for p in panels) + gap * (len(panels) - 1), max(p.height for p in panels)), bg)
    x = 0
    for p in panels:
        out.paste(p, (x, 0))
        x += p.width + gap
    return out


def column(panels, gap=6, bg=WHITE):
    """Panels one under another, left aligned."""
    out = Image.new("RGB", (max(p.width for p in panels), sum(p.height for p in panels) + gap * (len(panels) - 1)), bg)
    y = 0
    for p in panels:
        out.paste(p, (0, y))
        y += p.height + gap
    return out


def grid(panels, per_row, gap=6):
    """Panels in rows of `per_row`."""
    return column([row(panels[i:i + per_row], gap) for i in range(0, len(panels), per_row)], gap)


def resize_height(img, height, nearest=False):
    """Scaled to `height` px (nearest for label maps, bilinear for photos)."""
    width = max(1, round(img.width * height / img.height))
    return img.resize((width, height), Image.NEAREST if nearest else Image.BILINEAR)


def legend(entries, width, title=None, box=10):
    """Rows of [swatch name] entries, wrapped to `width`. entries: [(colour, name)]."""
    items = [(rgb(c), str(n)) for c, n in entries]
    lines, line, x = [], [], 3 + (text_width(title) + 8 if title else 0)
    for c, n in items:
        w = box + 4 + text_width(n) + 10
        if line and x + w > width:
            lines.append(line)
            line, x = [], 3
        line.append((x, c, n))
        x += w
    lines.append(line)
    img = Image.new("RGB", (max(width, 1), LINE * len(lines) + 4), WHITE)
    d = ImageDraw.Draw(img)
    if title:
        d.text((3, 2), title, fill=BLACK, font=font())
    for i, line in enumerate(lines):
        y = 2 + i * LINE
        for x, c, n in line:
            d.rectangle([x, y + 1, x + box, y + box], fill=c, outline=BLACK)
            d.text((x + box + 4, y), n, fill=BLACK, font=font())
    return img


def scale_bar(width, hue=(1.0, 1.0, 1.0), label="similarity to the nearest prototype"):
    """Brightness scale of the prototype map: black (cosine <= 0) to full hue (cosine 1)."""
    ramp = np.linspace(0, 1, max(width - 60, 10))[None, :, None] * np.asarray(hue, np.float32)
    bar = Image.fromarray((np.repeat(ramp, 10, 0) * 255).astype(np.uint8))
    out = Image.new("RGB", (width, LINE * 2 + 14), WHITE)
    d = ImageDraw.Draw(out)
    d.text((3, 1), label, fill=BLACK, font=font())
    out.paste(bar, (20, LINE + 2))
    d.text((3, LINE + 1), "0", fill=BLACK, font=font())
    d.text((bar.width + 24, LINE + 1), "1", fill=BLACK, font=font())
    return out


def scatter(points, colours, size=220, radius=2, marks=None, outline=None, circle=False, axes=None, bg=WHITE):
    """Points (N, 2) in [-1, 1]^2 (y up) as dots; marks: [(xy, colour)] drawn as large outlined crosses;
    outline: (N,) colour per dot's rim or None; circle: draw the unit circle; axes: (x name, y name) drawn as grey
    lines through 0 with their names at the ends."""
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    to_px = lambda p: ((p[0] + 1) * (size - 1) / 2, (1 - p[1]) * (size - 1) / 2)
    if circle:
        d.ellipse([0, 0, size - 1, size - 1], outline=(200, 200, 200))
    if axes:
        mid = (size - 1) / 2
        d.line([0, mid, size - 1, mid], fill=(200, 200, 200))
        d.line([mid, 0, mid, size - 1], fill=(200, 200, 200))
        d.text((size - 3 - text_width(axes[0]), mid + 2), axes[0], fill=GREY, font=font())
        d.text((mid + 3, 1), axes[1], fill=GREY, font=font())
    for i, (p, c) in enumerate(zip(np.asarray(points, np.float64), colours)):
        x, y = to_px(p)
        d.ellipse([x - radius, y - radius, x + radius, y + radius], fill=rgb(c),
                  outline=None if outline is None else rgb(outline[i]))
    for p, c in marks or []:
        x, y = to_px(p)
        for w, col in ((5, BLACK), (3, rgb(c))):
            d.line([x - 7, y - 7, x + 7, y + 7], fill=col, width=w)
            d.line([x - 7, y + 7, x + 7, y - 7], fill=col, width=w)
    return img


def bars(values, colours, labels, height=90, bar=22):
    """A bar chart of values in [0, 1], each bar labelled underneath and its value (%) above."""
    img = Image.new("RGB", (len(values) * (bar + 6) + 6, height + 2 * LINE + 4), WHITE)
    d = ImageDraw.Draw(img)
    for i, (v, c, name) in enumerate(zip(values, colours, labels)):
        x, h = 6 + i * (bar + 6), int(round(height * float(v)))
        d.rectangle([x, LINE + height - h, x + bar, LINE + height], fill=rgb(c), outline=BLACK)
        d.text((x, LINE + height - h - LINE), f"{100 * v:.0f}", fill=BLACK, font=font())
        d.text((x + 2, LINE + height + 2), str(name), fill=BLACK, font=font())
    return img


def line_chart(points, width=250, height=120, colour=(30, 90, 200), xlabel="iteration"):
    """A line through points [(x, y)] with its axes: y from min to max (labelled), x from first to last."""
    left, bottom = 52, 2 * LINE + 2
    img = Image.new("RGB", (left + width + 8, height + bottom + 6), WHITE)
    d = ImageDraw.Draw(img)
    xs, ys = [float(p[0]) for p in points], [float(p[1]) for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-12 * max(1.0, abs(y0)):                  # a flat line: give it a band to sit in
        y0, y1 = y0 - max(abs(y0) * 0.1, 1e-3), y1 + max(abs(y1) * 0.1, 1e-3)
    at = lambda x, y: (left + (x - x0) / (x1 - x0) * width, 4 + (y1 - y) / (y1 - y0) * height)
    d.rectangle([left, 4, left + width, 4 + height], outline=GREY)
    for y, label in ((y1, f"{y1:.3g}"), (y0, f"{y0:.3g}")):
        d.text((left - 4 - text_width(label), at(x0, y)[1] - 6), label, fill=BLACK, font=font())
    for x in (x0, max(xs)):
        label = f"{x:g}"
        d.text((at(x, y0)[0] - text_width(label) // 2, 6 + height), label, fill=BLACK, font=font())
    d.text((left + (width - text_width(xlabel)) // 2, 6 + height + LINE), xlabel, fill=GREY, font=font())
    line = [at(x, y) for x, y in zip(xs, ys)]
    if len(line) > 1:
        d.line(line, fill=rgb(colour), width=2)
    for x, y in line[-1:] if len(line) > 1 else line:         # the last value, or a lone point, as a dot
        d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=rgb(colour))
    return img


def diverging(values):
    """Values in [-1, 1] -> RGB uint8: blue (-1), white (0), red (1)."""
    v = np.clip(np.asarray(values, np.float32), -1, 1)[..., None]
    red, blue = np.array([200, 30, 30], np.float32), np.array([30, 60, 200], np.float32)
    return np.where(v >= 0, 255 + v * (red - 255), 255 - v * (blue - 255)).astype(np.uint8)


def heatmap(matrix, cell=18, labels=None):
    """A matrix of values in [-1, 1] as coloured cells (blue - white - red), row / column labels."""
    m = np.asarray(matrix, np.float32)
    pad = 0 if labels is None else max(text_width(str(s)) for s in labels) + 4
    cells = Image.fromarray(diverging(m)).resize((m.shape[1] * cell, m.shape[0] * cell), Image.NEAREST)
    img = Image.new("RGB", (pad + cells.width + 1, pad + cells.height + 1), WHITE)
    img.paste(cells, (pad, pad))
    d = ImageDraw.Draw(img)
    for i, s in enumerate(labels or []):
        d.text((2, pad + i * cell + (cell - 11) // 2), str(s), fill=BLACK, font=font())
        d.text((pad + i * cell + 2, 1), str(s), fill=BLACK, font=font())
    return img
