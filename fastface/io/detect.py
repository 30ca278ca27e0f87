"""Face detection with OpenCV's frontal-face Haar cascades (Viola-Jones), evaluated by fastface.

OpenCV 5 moved `cv2.CascadeClassifier` out of the main package (into contrib) and no longer ships
the cascade files under `cv2.data`. fastface therefore carries the two cascade files OpenCV 4
shipped (fastface/io/cascades/, Intel License Agreement, unchanged) and evaluates them with the
Numba kernel below, which follows OpenCV 4's `CascadeClassifier::detectMultiScale` step by step:
the image pyramid (scale factor 1.1, bilinear resize), windows every 2 pixels below scale 2 and
every pixel above (skipping one more after a window fails the first stage), the variance
normalisation over the inner 22x22 window (windows whose standard deviation is at most 10 grey
levels are rejected), the boosted trees, and `groupRectangles` (3 neighbours, eps 0.2) with
its removal of boxes inside larger ones. On the eight iBUG photos of shared/data/faces it gives
the same boxes as OpenCV 4.10 (tests/io/test_detect.py).

Nothing is downloaded: the cascade is read from the package (or, for a named file, from there).
"""
import functools
import math
import os
import xml.etree.ElementTree as ET

import numba
import numpy as np

__all__ = ["detect_faces", "CASCADES"]

_HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cascades")
CASCADES = {
    "default": os.path.join(_HERE, "haarcascade_frontalface_default.xml"),
    "alt2": os.path.join(_HERE, "haarcascade_frontalface_alt2.xml"),
}


class _Cascade:
    """A boosted cascade of trees over Haar features, in flat arrays for the kernel."""

    def __init__(self, path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: the Haar cascade file is missing (it ships with fastface "
                                    f"in fastface/io/cascades; reinstall fastface)")
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError as e:
            raise ValueError(f"{path}: not a readable OpenCV cascade XML file ({e})") from None
        cascade = root.find("cascade")
        if cascade is None or (cascade.findtext("featureType") or "").strip() != "HAAR":
            raise ValueError(f"{path}: not an OpenCV Haar cascade in the new XML format "
                             f"(<cascade> with <featureType>HAAR</featureType>)")
        self.window = (int(cascade.findtext("height")), int(cascade.findtext("width")))
        stage_threshold, stage_first = [], [0]
        weak_first_node, weak_first_leaf = [0], [0]
        nodes, leaves = [], []
        for stage in cascade.find("stages"):
            stage_threshold.append(float(stage.findtext("stageThreshold")))
            weak = stage.find("weakClassifiers")
            for classifier in weak:
                values = classifier.findtext("internalNodes").split()
                for k in range(0, len(values), 4):
                    nodes.append((int(values[k]), int(values[k + 1]), int(values[k + 2]), float(values[k + 3])))
                leaves.extend(float(v) for v in classifier.findtext("leafValues").split())
                weak_first_node.append(len(nodes))
                weak_first_leaf.append(len(leaves))
            stage_first.append(len(weak_first_node) - 1)
        features = cascade.find("features")
        rects = np.zeros((len(features), 3, 4), np.int32)
        weights = np.zeros((len(features), 3), np.float32)
        for i, feature in enumerate(features):
            if (feature.findtext("tilted") or "0").strip() not in ("0", ""):
                raise ValueError(f"{path}: tilted Haar features are not supported")
            for j, rect in enumerate(feature.find("rects")):
                x, y, w, h, weight = rect.text.split()
                rects[i, j] = (int(x), int(y), int(w), int(h))
                weights[i, j] = float(weight)
        nodes = np.array(nodes, dtype=np.float64).reshape(-1, 4)
        self.stage_threshold = np.array(stage_threshold, np.float32)
        self.stage_first = np.array(stage_first, np.int32)
        self.weak_first_node = np.array(weak_first_node, np.int32)
        self.weak_first_leaf = np.array(weak_first_leaf, np.int32)
        self.node_left = nodes[:, 0].astype(np.int32)
        self.node_right = nodes[:, 1].astype(np.int32)
        self.node_feature = nodes[:, 2].astype(np.int32)
        self.node_threshold = nodes[:, 3].astype(np.float32)
        self.leaves = np.array(leaves, np.float32)
        self.rects = rects
        self.weights = weights


@functools.lru_cache(maxsize=4)
def _load(path):
    return _Cascade(path)


@numba.njit(cache=True, parallel=True)
def _scan(s, sq, win_h, win_w, step, stage_threshold, stage_first, weak_first_node, weak_first_leaf,
          node_left, node_right, node_feature, node_threshold, leaves, rects, weights):
    """Runs the cascade on every window of one pyramid level; returns (rows, W) uint8 hits.

    s, sq: (H+1, W+1) integral images of the grey level and its square (int64, float64).
    hit[r, x] = 1 where the window at (x, y = r * step) passes every stage. A window's features
    are sums over rectangles of the integral image, weighted, times the window's
    1 / (area * standard deviation) over its inner (win - 2) square, as OpenCV does. Rows are
    independent (prange); within a row the scan skips one more step after a window fails the
    first stage, as OpenCV's does, so it runs left to right.
    """
    h = s.shape[0] - 1
    w = s.shape[1] - 1
    ny = max(h - win_h + 1, 0)
    nx = max(w - win_w + 1, 0)
    n_rows = (ny + step - 1) // step
    hit = np.zeros((n_rows, max(nx, 1)), np.uint8)
    area = (win_h - 2) * (win_w - 2)
    n_stages = stage_threshold.shape[0]
    for row in numba.prange(n_rows):
        y = row * step
        x = 0
        while x < nx:
            y0, x0 = y + 1, x + 1
            y1, x1 = y + win_h - 1, x + win_w - 1
            valsum = s[y1, x1] - s[y0, x1] - s[y1, x0] + s[y0, x0]
            valsq = sq[y1, x1] - sq[y0, x1] - sq[y1, x0] + sq[y0, x0]
            nf = area * valsq - float(valsum) * float(valsum)
            result = -1
            if nf > 0.0:
                nf = math.sqrt(nf)
                inv = np.float32(1.0 / nf)
                if area * inv < 0.1:  # OpenCV rejects windows with a standard deviation <= 10
                    result = 1
                    for si in range(n_stages):
                        total = np.float32(0.0)
                        for wi in range(stage_first[si], stage_first[si + 1]):
                            base = weak_first_node[wi]
                            idx = 0
                            while True:  # a tree: idx > 0 is a node, idx <= 0 the leaf -idx
                                node = base + idx
                                f = node_feature[node]
                                value = np.float32(0.0)
                                for r in range(3):
                                    wt = weights[f, r]
                                    if wt != 0.0:
                                        rx = x + rects[f, r, 0]
                                        ry = y + rects[f, r, 1]
                                        rw = rects[f, r, 2]
                                        rh = rects[f, r, 3]
                                        rs = s[ry + rh, rx + rw] - s[ry, rx + rw] - s[ry + rh, rx] + s[ry, rx]
                                        value += wt * np.float32(rs)
                                value = value * inv
                                if value < node_threshold[node]:
                                    idx = node_left[node]
                                else:
                                    idx = node_right[node]
                                if idx <= 0:
                                    break
                            total += leaves[weak_first_leaf[wi] - idx]
                        if total < stage_threshold[si]:
                            result = -si
                            break
            if result > 0:
                hit[row, x] = 1
            if result == 0:
                x += step
            x += step
    return hit


def _raw_detections(grey, cascade, scale_factor, min_size, max_size):
    import cv2

    win_h, win_w = cascade.window
    img_h, img_w = grey.shape
    max_w, max_h = max_size if max_size is not None else (img_w, img_h)
    found = []
    factor = 1.0
    while True:
        window = (int(round(win_w * factor)), int(round(win_h * factor)))
        if window[0] > max_w or window[1] > max_h:
            break
        if window[0] >= min_size and window[1] >= min_size:
            size = (int(round(img_w / factor)), int(round(img_h / factor)))
            if size[0] < win_w or size[1] < win_h:
                break
            scaled = grey if size == (img_w, img_h) else cv2.resize(grey, size, interpolation=cv2.INTER_LINEAR_EXACT)
            s = cv2.integral(scaled, sdepth=cv2.CV_32S).astype(np.int64)
            sq = cv2.integral(scaled.astype(np.float64) ** 2, sdepth=cv2.CV_64F)
            step = 1 if factor > 2 else 2
            hits = _scan(s, sq, win_h, win_w, step, cascade.stage_threshold, cascade.stage_first,
                         cascade.weak_first_node, cascade.weak_first_leaf, cascade.node_left,
                         cascade.node_right, cascade.node_feature, cascade.node_threshold,
                         cascade.leaves, cascade.rects, cascade.weights)
            for row, x in zip(*np.nonzero(hits)):
                y = row * step
                found.append((int(round(x * factor)), int(round(y * factor)), window[0], window[1]))
        factor *= scale_factor
    return found


def _group_rectangles(rects, group_threshold, eps=0.2):
    """OpenCV's groupRectangles: cluster similar boxes, average them, keep clusters of more than
    `group_threshold`, and drop a box lying inside a larger box with more support. Returns
    (box, support) pairs, support the number of raw detections in the box's cluster."""
    n = len(rects)
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(n):
        for j in range(i + 1, n):
            a, b = rects[i], rects[j]
            delta = eps * (min(a[2], b[2]) + min(a[3], b[3])) * 0.5
            if (abs(a[0] - b[0]) <= delta and abs(a[1] - b[1]) <= delta
                    and abs(a[0] + a[2] - b[0] - b[2]) <= delta and abs(a[1] + a[3] - b[1] - b[3]) <= delta):
                ri, rj = find(i), find(j)
                if ri != rj:
                    parent[rj] = ri
    # cluster labels in order of first appearance, as cv::partition numbers them
    labels, order = {}, []
    sums, counts = [], []
    for i in range(n):
        root = find(i)
        if root not in labels:
            labels[root] = len(order)
            order.append(root)
            sums.append([0, 0, 0, 0])
            counts.append(0)
        k = labels[root]
        for c in range(4):
            sums[k][c] += rects[i][c]
        counts[k] += 1
    averaged = []
    for k in range(len(order)):
        s = 1.0 / counts[k]
        averaged.append(tuple(int(round(v * s)) for v in sums[k]))
    kept = []
    for i, r1 in enumerate(averaged):
        n1 = counts[i]
        if n1 <= group_threshold:
            continue
        inside = False
        for j, r2 in enumerate(averaged):
            n2 = counts[j]
            if j == i or n2 <= group_threshold:
                continue
            dx, dy = int(round(r2[2] * eps)), int(round(r2[3] * eps))
            if (r1[0] >= r2[0] - dx and r1[1] >= r2[1] - dy and r1[0] + r1[2] <= r2[0] + r2[2] + dx
                    and r1[1] + r1[3] <= r2[1] + r2[3] + dy and (n2 > max(3, n1) or n1 < 3)):
                inside = True
                break
        if not inside:
            kept.append((r1, n1))
    return kept


def _grey_uint8(image):
    import cv2

    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy array; got {type(image).__name__}")
    if image.ndim == 3 and image.shape[2] == 3:
        if image.dtype != np.uint8:
            if image.dtype.kind != "f":
                raise ValueError(f"image must be float in [0, 1] or uint8; got {image.dtype}")
            image = np.round(np.clip(np.nan_to_num(image), 0, 1) * 255).astype(np.uint8)
        return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    if image.ndim == 2:
        if image.dtype.kind == "f":
            return np.round(np.clip(np.nan_to_num(image), 0, 1) * 255).astype(np.uint8)
        if image.dtype == np.uint8:
            return np.ascontiguousarray(image)
    raise ValueError(f"image must be (H, W, 3) RGB or (H, W) grey, float in [0, 1] or uint8; got "
                     f"{image.dtype} {image.shape}")


def detect_faces(image, cascade="default", fallback="alt2", min_size=40, scale_factor=1.1,
                 min_neighbors=3):
    """Finds frontal faces with a Haar cascade; the best supported first.

    Args:
        image: (H, W, 3) RGB float in [0, 1] (read_image) or uint8; or (H, W) grey.
        cascade: "default" (haarcascade_frontalface_default) or "alt2", or a path to another
            OpenCV Haar cascade XML file.
        fallback: a second cascade tried when the first finds nothing ("alt2" by default;
            None for none).
        min_size: the smallest face (box side, pixels) to look for.
        scale_factor, min_neighbors: as in OpenCV's detectMultiScale.

    Returns:
        A list of boxes (x0, y0, x1, y1), ints, the best supported first: the support of a box is
        the number of raw detections (over positions and scales) grouped into it; ties: the larger
        first, then top-left first. A face gathers many detections (and a larger face more), a
        face-like pattern few: on the annotated test photos the faces had 13 to 103, the three
        false boxes 6 to 8, and ordering by area put a wall medallion (7) before a face (13) in
        einstein.jpg. A box covers the pixel columns x0 .. x1 - 1 and rows y0 .. y1 - 1; its centre
        in pixel-centre coordinates is ((x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2). An empty list when
        no face is found.

    Raises:
        FileNotFoundError: the cascade file is missing (naming it).
    """
    grey = _grey_uint8(image)
    if not (scale_factor > 1.0):
        raise ValueError(f"scale_factor must be > 1; got {scale_factor!r}")
    boxes = []
    for name in (cascade, fallback):
        if name is None:
            continue
        path = CASCADES.get(name, name)
        raw = _raw_detections(grey, _load(os.path.abspath(path)), float(scale_factor), int(min_size), None)
        boxes = _group_rectangles(raw, int(min_neighbors))
        if boxes:
            break
    ranked = sorted(((-support, -w * h, y, x), (x, y, x + w, y + h)) for (x, y, w, h), support in boxes)
    return [box for _, box in ranked]
