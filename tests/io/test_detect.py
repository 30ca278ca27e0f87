"""detect_faces: OpenCV's Haar cascades evaluated by fastface, checked against OpenCV 4.10's boxes."""
import os

import numpy as np
import pytest

from fastface.io import detect_faces, landmark_frame, read_image, read_pts
from fastface.io.crop import box_to_landmark_frame

# cv2.CascadeClassifier(...).detectMultiScale(grey, scaleFactor=1.1, minNeighbors=3) of OpenCV
# 4.10.0 (opencv-python-headless 4.10.0.84) on cv2.cvtColor(round(read_image(path) * 255),
# COLOR_RGB2GRAY), as (x, y, w, h), sorted.
OPENCV_410 = {
    "2086996835_5": {"default": [(189, 158, 173, 173), (339, 176, 149, 149)],
                     "alt2": [(182, 154, 181, 181), (337, 176, 152, 152)]},
    "2406586388_3": {"default": [(169, 139, 181, 181)], "alt2": [(176, 144, 170, 170)]},
    "3346359383_3": {"default": [(187, 163, 224, 224)], "alt2": [(188, 163, 228, 228)]},
    "3854178896_1": {"default": [(276, 104, 219, 219), (612, 47, 70, 70)], "alt2": [(276, 110, 209, 209)]},
    "einstein": {"default": [(11, 353, 57, 57), (85, 365, 36, 36), (102, 134, 44, 44), (133, 624, 55, 55)],
                 "alt2": [(9, 352, 60, 60), (136, 623, 57, 57), (263, 607, 85, 85)]},
    "image_0001": {"default": [(91, 157, 213, 213), (127, 398, 120, 120)], "alt2": [(90, 158, 209, 209)]},
    "image_0005": {"default": [(249, 230, 298, 298)], "alt2": [(236, 218, 318, 318)]},
    "image_0010": {"default": [(236, 123, 333, 333)], "alt2": [(231, 119, 338, 338)]},
}


def _stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def _inside(points, box):
    x0, y0, x1, y1 = box
    return float(np.mean((points[:, 0] >= x0 - 0.5) & (points[:, 0] <= x1 - 0.5)
                         & (points[:, 1] >= y0 - 0.5) & (points[:, 1] <= y1 - 0.5)))


def test_boxes_equal_opencv_410_on_the_real_photos(photos):
    compared = 0
    for image_path, _ in photos:
        expect = OPENCV_410.get(_stem(image_path))
        if expect is None:
            continue
        image = read_image(image_path)
        for cascade in ("default", "alt2"):
            got = detect_faces(image, cascade=cascade, fallback=None, min_size=0)
            got = sorted((x0, y0, x1 - x0, y1 - y0) for x0, y0, x1, y1 in got)
            assert got == expect[cascade], (image_path, cascade)
            compared += 1
    assert compared == 2 * len(OPENCV_410)


def test_boxes_equal_cv2_cascade_classifier_where_opencv_has_it(photos):
    cv2 = pytest.importorskip("cv2")
    if not hasattr(cv2, "CascadeClassifier"):
        pytest.skip(f"OpenCV {cv2.__version__} has no CascadeClassifier (moved to contrib in OpenCV 5)")
    from fastface.io import CASCADES
    classifier = cv2.CascadeClassifier(CASCADES["default"])
    for image_path, _ in photos[:3]:
        image = read_image(image_path)
        grey = cv2.cvtColor(np.round(image * 255).astype(np.uint8), cv2.COLOR_RGB2GRAY)
        want = sorted(tuple(int(v) for v in r) for r in classifier.detectMultiScale(grey, 1.1, 3))
        got = sorted((x0, y0, x1 - x0, y1 - y0) for x0, y0, x1, y1 in
                     detect_faces(image, fallback=None, min_size=0))
        assert got == want, image_path


def test_largest_box_holds_the_annotated_face_on_most_photos(photos):
    found = []
    for image_path, pts_path in photos:
        boxes = detect_faces(read_image(image_path))
        points = read_pts(pts_path)
        fraction = _inside(points, boxes[0]) if boxes else 0.0
        found.append((_stem(image_path), len(boxes), round(fraction, 2)))
    print("\n(photo, boxes, share of landmarks in the largest box):", found)
    good = sum(f >= 0.8 for _, _, f in found)
    # Measured: 7 of 8 (85-97% of the 68 points inside); Einstein's small, lowered face is found
    # by neither cascade, in OpenCV 4.10 either.
    assert good >= min(7, len(found) - 1), found


def test_a_well_supported_face_comes_before_a_larger_false_box(photos):
    # einstein.jpg: the default cascade finds a wall medallion (57 px, 7 grouped detections) and the
    # seated man's face (55 px, 13); by area alone the medallion came first and was fitted.
    path = next((p for p, _ in photos if _stem(p) == "einstein"), None)
    assert path is not None, "einstein.jpg is missing from the annotated photos (OPENCV_410 lists it)"
    boxes = detect_faces(read_image(path))
    assert boxes[0] == (133, 624, 188, 679) and (11, 353, 68, 410) in boxes[1:]


def test_boxes_are_ranked_by_support_then_area(monkeypatch):
    import fastface.io.detect as detect  # noqa: PLC0415
    grouped = [((0, 0, 50, 50), 7), ((100, 0, 40, 40), 20), ((0, 100, 30, 30), 11), ((200, 0, 45, 45), 11)]
    monkeypatch.setattr(detect, "_raw_detections", lambda *args: [])
    monkeypatch.setattr(detect, "_group_rectangles", lambda raw, threshold: list(grouped))
    assert detect_faces(np.zeros((300, 300), np.uint8)) == [(100, 0, 140, 40), (200, 0, 245, 45),
                                                            (0, 100, 30, 130), (0, 0, 50, 50)]


def test_box_predicts_the_landmark_frame_within_the_documented_spread(photos):
    for image_path, pts_path in photos:
        boxes = detect_faces(read_image(image_path))
        points = read_pts(pts_path)
        if not boxes or _inside(points, boxes[0]) < 0.8:
            continue
        w = boxes[0][2] - boxes[0][0]
        centre, size = landmark_frame(points)
        est_centre, est_size = box_to_landmark_frame(boxes[0])
        # crop.py: vertical spread 0.028 w, horizontal 0.08 w, size 0.047 w over the photos
        assert abs(est_centre[1] - centre[1]) < 0.1 * w, image_path
        assert abs(est_centre[0] - centre[0]) < 0.2 * w, image_path
        assert abs(est_size - size) < 0.12 * w, image_path


def test_no_face_in_a_flat_or_noisy_image():
    assert detect_faces(np.full((120, 160, 3), 0.5, np.float32)) == []
    noise = np.random.default_rng(0).uniform(0, 1, size=(120, 160, 3)).astype(np.float32)
    assert detect_faces(noise) == []


def test_missing_cascade_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nocascade\.xml"):
        detect_faces(np.zeros((50, 50, 3), np.float32), cascade=str(tmp_path / "nocascade.xml"))
    bad = tmp_path / "bad.xml"
    bad.write_text("<opencv_storage><cascade><featureType>LBP</featureType></cascade></opencv_storage>")
    with pytest.raises(ValueError, match=r"bad\.xml"):
        detect_faces(np.zeros((50, 50, 3), np.float32), cascade=str(bad))


def test_bad_images_are_refused():
    with pytest.raises(ValueError, match="image"):
        detect_faces(np.zeros((5, 5, 4), np.float32))
    with pytest.raises(TypeError, match="image"):
        detect_faces([[0.0]])
