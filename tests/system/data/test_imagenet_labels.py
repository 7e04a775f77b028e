"""make_shards reads ImageNet's own validation label files (tiny fakes in the real formats):
Kaggle's LOC_val_solution.csv, and the devkit's ILSVRC2012_validation_ground_truth.txt with its
meta.mat (a real MATLAB file, as scipy writes it) or a synset map file."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.io import savemat

from system.data.imagenet_labels import read_synsets, read_val_labels
from system.data.shards import list_split

# sorted wnids -> class index, as find_classes makes it from the train folders
CLASSES = {"n01440764": 0, "n01443537": 1, "n02119789": 2}
# the devkit's own order (ILSVRC2012_ID 1..3), not the sorted one; 4: an internal node
DEVKIT = [(1, "n02119789", "kit fox", 0), (2, "n01440764", "tench", 0), (3, "n01443537", "goldfish", 0),
          (4, "n00001740", "entity", 3)]


def meta_mat(path):
    """The devkit's data/meta.mat layout: a struct array `synsets` with ILSVRC2012_ID, WNID, words,
    num_children (1x1 struct fields, as MATLAB saves them)."""
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    table = np.zeros((len(DEVKIT), 1), dtype=dtype)
    for i, (sid, wnid, words, children) in enumerate(DEVKIT):
        table[i, 0] = (np.array([[sid]], dtype=np.uint16), np.array([wnid]), np.array([words]),
                       np.array([[children]], dtype=np.uint8))
    savemat(path, {"synsets": table})
    return path


def test_kaggle_loc_val_solution(tmp_path):
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text("ImageId,PredictionString\n"
                   "ILSVRC2012_val_00008726,n02119789 255 142 454 329 n02119789 44 21 322 295 \n"
                   "ILSVRC2012_val_00000001,n01440764 10 10 100 100 \n")
    assert read_val_labels(str(csv), CLASSES) == {"ILSVRC2012_val_00008726": 2, "ILSVRC2012_val_00000001": 0}
    csv.write_text("ImageId,PredictionString\nILSVRC2012_val_00000002,n09999999 1 2 3 4\n")
    with pytest.raises(ValueError, match="n09999999.*not one of the 3 train classes"):
        read_val_labels(str(csv), CLASSES)


def test_devkit_ground_truth_with_meta_mat(tmp_path):
    gt = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text("1\n3\n2\n")  # val_00000001: kit fox (devkit id 1), 00000002: goldfish, 00000003: tench
    mat = str(meta_mat(tmp_path / "meta.mat"))
    assert read_synsets(mat) == {1: "n02119789", 2: "n01440764", 3: "n01443537", 4: "n00001740"}
    want = {"ILSVRC2012_val_00000001": 2, "ILSVRC2012_val_00000002": 1, "ILSVRC2012_val_00000003": 0}
    assert read_val_labels(str(gt), CLASSES, synsets=mat) == want
    with pytest.raises(ValueError, match="val_synsets"):
        read_val_labels(str(gt), CLASSES)
    gt.write_text("1\n7\n")
    with pytest.raises(ValueError, match="line 2: ILSVRC2012_ID '7' is not in"):
        read_val_labels(str(gt), CLASSES, synsets=mat)


def test_devkit_ground_truth_with_a_map_file(tmp_path):
    gt = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text("2\n1\n")
    mapping = tmp_path / "map_clsloc.txt"
    mapping.write_text("n02119789 1 kit_fox\nn01440764 2 tench\nn01443537 3 goldfish\n")
    assert read_val_labels(str(gt), CLASSES, synsets=str(mapping)) == \
        {"ILSVRC2012_val_00000001": 0, "ILSVRC2012_val_00000002": 2}
    (tmp_path / "bad.txt").write_text("kit_fox\n")
    with pytest.raises(ValueError, match="expected a wnid and its ILSVRC2012_ID"):
        read_synsets(str(tmp_path / "bad.txt"))
    (tmp_path / "bad.mat").write_bytes(b"not a mat file")
    savemat(tmp_path / "other.mat", {"x": np.ones(2)})
    with pytest.raises(ValueError, match="not the devkit's meta.mat"):
        read_synsets(str(tmp_path / "other.mat"))


def test_a_flat_val_folder_with_the_standard_files(tmp_path):
    """list_split on the official flat val/ with each standard label file: the same labels."""
    for wnid in CLASSES:
        (tmp_path / "train" / wnid).mkdir(parents=True)
        (tmp_path / "train" / wnid / "a.JPEG").write_bytes(b"x")
    (tmp_path / "val").mkdir()
    for i in (1, 2, 3):
        (tmp_path / "val" / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(b"x")
    (tmp_path / "gt.txt").write_text("1\n3\n2\n")
    mat = str(meta_mat(tmp_path / "meta.mat"))
    (tmp_path / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\nILSVRC2012_val_00000003,n01440764 1 1 5 5\n"
        "ILSVRC2012_val_00000001,n02119789 1 1 5 5\nILSVRC2012_val_00000002,n01443537 1 1 5 5\n")
    devkit = list_split(str(tmp_path), "val", CLASSES, str(tmp_path / "gt.txt"), val_synsets=mat)
    kaggle = list_split(str(tmp_path), "val", CLASSES, str(tmp_path / "LOC_val_solution.csv"))
    assert devkit == kaggle
    assert [(k, label) for _, k, label in devkit] == [("n02119789_ILSVRC2012_val_00000001", 2),
                                                      ("n01443537_ILSVRC2012_val_00000002", 1),
                                                      ("n01440764_ILSVRC2012_val_00000003", 0)]
    (tmp_path / "gt.txt").write_text("1\n3\n")
    with pytest.raises(ValueError, match="ILSVRC2012_val_00000003.JPEG in .* has no entry"):
        list_split(str(tmp_path), "val", CLASSES, str(tmp_path / "gt.txt"), val_synsets=mat)
