"""The paper's benchmarks read from tiny copies of their official layouts, made here, through the real loaders."""
from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cgil.data import get_dataset
from runtime.errors import CgilError


def _img(path: Path, seed: int, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


# ---------------------------------------------------------------- CIFAR-100 (python pickles)

CIFAR_NAMES = [f"class_{i:02d}" for i in range(100)]
CIFAR_NAMES[1] = "aquarium_fish"


def make_cifar100(root: Path, per_class=(2, 1)) -> Path:
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    with open(d / "meta", "wb") as f:
        pickle.dump({"fine_label_names": CIFAR_NAMES, "coarse_label_names": ["x"] * 20}, f, protocol=2)
    rng = np.random.RandomState(0)
    for split, n in zip(("train", "test"), per_class):
        labels = [c for c in range(100) for _ in range(n)]
        data = rng.randint(0, 256, (len(labels), 3072), dtype=np.uint8)
        with open(d / split, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels, "coarse_labels": [0] * len(labels)}, f, protocol=2)
    return root


def test_cifar100_official_pickles(tmp_path):
    ds = get_dataset("cifar100", make_cifar100(tmp_path))
    assert ds.num_classes == 100 and ds.classnames[1] == "aquarium fish"
    assert len(ds.train) == 200 and len(ds.test) == 100
    assert ds.task_sizes == [10] * 10
    assert ds.train.items[0].shape == (32, 32, 3) and ds.train.items[0].dtype == np.uint8
    # channel-planar rows become HWC images: pixel (0, 0) takes bytes 0, 1024, 2048
    with open(tmp_path / "cifar-100-python" / "train", "rb") as f:
        raw = pickle.load(f)["data"][0]
    assert list(ds.train.items[0][0, 0]) == [raw[0], raw[1024], raw[2048]]
    # the dataset folder itself works as --data-dir too, and the id is the same
    assert get_dataset("cifar100", tmp_path / "cifar-100-python").dataset_id == ds.dataset_id


def test_cifar100_missing_file_is_named(tmp_path):
    make_cifar100(tmp_path)
    (tmp_path / "cifar-100-python" / "test").unlink()
    with pytest.raises(CgilError, match=r"missing file .*cifar-100-python/test.*cs\.toronto\.edu"):
        get_dataset("cifar100", tmp_path)


def test_missing_data_dir_says_how_to_get_it(tmp_path):
    with pytest.raises(CgilError, match=r"does not exist.*cgil data download cub200"):
        get_dataset("cub200", tmp_path / "nowhere")


# ---------------------------------------------------------------- ImageNet-R (folder per wnid + shipped split)

def make_imagenet_r(root: Path, per_class: int = 2) -> tuple[Path, list[str]]:
    from cgil.data.imagenet_r import classes

    wnids, _ = classes()
    test = []
    for i, w in enumerate(wnids):
        for k in range(per_class):
            _img(root / "imagenet-r" / w / f"art_{k}.jpg", i * 10 + k, size=4)
        test.append(f"{w}/art_0.jpg")
    return root, test


def test_imagenet_r_split_and_names(tmp_path):
    from cgil.data.imagenet_r import load_imagenet_r

    root, test = make_imagenet_r(tmp_path)
    ds = load_imagenet_r(root, test_list=test)
    ds.check()
    assert ds.num_classes == 200 and ds.task_sizes == [20] * 10
    # the reference's label order (not sorted wnids): label 0 is n02165456, label 153 n01910747
    assert ds.classnames[:3] == ["ladybug", "jeep", "wood rabbit"] and ds.meta["wnids"][0] == "n02165456"
    assert ds.classnames[153] == "jellyfish" and sorted(ds.classnames)[:2] == ["African chameleon", "Granny Smith"]
    assert len(ds.test) == 200 and len(ds.train) == 200
    assert all(p.endswith("art_0.jpg") for p in ds.test.items)
    assert all(p.endswith("art_1.jpg") for p in ds.train.items)  # train = every image not in the test list
    jelly = [i for i, p in enumerate(ds.test.items) if "/n01910747/" in p]
    assert len(jelly) == 1 and ds.test.labels[jelly[0]] == 153
    # another split is another dataset id (the feature cache must not mix them)
    other = load_imagenet_r(root, test_list=[f"{w.split('/')[0]}/art_1.jpg" for w in test])
    assert other.dataset_id != ds.dataset_id


def test_imagenet_r_shipped_reference_split():
    from cgil.data.imagenet_r import classes, reference_test_list

    entries = reference_test_list()
    wnids = set(classes()[0])
    assert len(entries) == len(set(entries)) == 6000
    assert {e.split("/")[0] for e in entries} == wnids
    assert all(e.endswith(".jpg") for e in entries)


@pytest.mark.slow
def test_imagenet_r_reference_split_on_disk(tmp_path):
    """The shipped 6,000-image test list against a copy holding those files plus one more image per class."""
    from cgil.data.commands import check_report
    from cgil.data.imagenet_r import classes, load_imagenet_r, reference_test_list

    root = tmp_path / "imagenet-r"
    for entry in reference_test_list():
        (root / entry).parent.mkdir(parents=True, exist_ok=True)
        (root / entry).write_bytes(b"")  # the loader reads images lazily; presence is what it checks
    for w in classes()[0]:
        (root / w / "extra_0.jpg").write_bytes(b"")
    ds = load_imagenet_r(tmp_path)
    assert len(ds.test) == 6000 and len(ds.train) == 200
    assert all(p.endswith("extra_0.jpg") for p in ds.train.items)
    assert ds.dataset_id.startswith("imagenet-r:split-ref-v1:")
    report = check_report("imagenet-r", tmp_path)
    assert report["splits"]["test"]["total"] == report["splits"]["test"]["expected_total"] == 6000
    assert any("train: 200 images in all, expected 24000" in p for p in report["problems"])


def test_imagenet_r_incomplete_copy_names_missing(tmp_path):
    from cgil.data.imagenet_r import load_imagenet_r

    root, test = make_imagenet_r(tmp_path, per_class=1)
    with pytest.raises(CgilError, match=r"test image file\(s\) missing"):
        load_imagenet_r(root)  # the shipped reference list names files this copy lacks
    import shutil

    shutil.rmtree(root / "imagenet-r" / "n01443537")
    with pytest.raises(CgilError, match=r"1 of the 200 class folders missing \(n01443537\)"):
        load_imagenet_r(root, test_list=test)
    (root / "imagenet-r" / "n01443537").mkdir()
    shutil.rmtree(root / "imagenet-r" / "n02165456")  # the folder the root is recognised by
    with pytest.raises(CgilError, match=r"cannot find n02165456"):
        load_imagenet_r(root, test_list=test)


# ---------------------------------------------------------------- CUB-200-2011 (metadata txt files)

CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "017.Cardinal", "141.Artic_Tern"]


def make_cub(root: Path) -> Path:
    d = root / "CUB_200_2011"
    lines = {"images.txt": [], "image_class_labels.txt": [], "train_test_split.txt": [], "classes.txt": []}
    img_id = 0
    for c, folder in enumerate(CUB_CLASSES, 1):
        lines["classes.txt"].append(f"{c} {folder}")
        for k in range(3):
            img_id += 1
            rel = f"{folder}/{folder.split('.')[1]}_{k:04d}_{img_id}.jpg"
            _img(d / "images" / rel, img_id)
            lines["images.txt"].append(f"{img_id} {rel}")
            lines["image_class_labels.txt"].append(f"{img_id} {c}")
            lines["train_test_split.txt"].append(f"{img_id} {1 if k < 2 else 0}")
    for name, rows in lines.items():
        (d / name).write_text("\n".join(rows) + "\n")
    return root


def test_cub200_official_split_and_names(tmp_path):
    ds = get_dataset("cub200", make_cub(tmp_path))
    assert ds.classnames == ["black footed albatross", "laysan albatross", "cardinal", "artic tern"]
    assert len(ds.train) == 8 and len(ds.test) == 4
    assert list(np.bincount(ds.train.labels)) == [2, 2, 2, 2]
    assert all("_0002_" in p for p in ds.test.items)
    assert ds.task_sizes == [20] * 10


def test_cub200_reference_names_match_official_folders():
    from cgil.data.cub200 import official_name

    assert official_name("022.Chuck_will_Widow") == "chuck will widow"
    assert official_name("179.Tennessee_Warbler") == "tennessee warbler"


@pytest.mark.parametrize("piece", ["train_test_split.txt", "classes.txt", "image"])
def test_cub200_missing_pieces_are_named(tmp_path, piece):
    root = make_cub(tmp_path)
    d = root / "CUB_200_2011"
    if piece == "image":
        victim = next((d / "images").rglob("*.jpg"))
        victim.unlink()
        pattern = rf"1 of 12 image file\(s\) missing \({victim}"
    else:
        (d / piece).unlink()
        pattern = rf"missing file {d / piece}.*CUB_200_2011.tgz"
    with pytest.raises(CgilError, match=pattern):
        get_dataset("cub200", root)


# ---------------------------------------------------------------- Stanford Cars (.mat annotations)

CAR_NAMES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Volvo XC90 SUV 2007"]


def _annotations(rows: list[dict]) -> np.ndarray:
    fields = list(rows[0])
    arr = np.empty((1, len(rows)), dtype=[(f, object) for f in fields])
    for i, r in enumerate(rows):
        for f in fields:
            arr[0, i][f] = np.array([[r[f]]]) if not isinstance(r[f], str) else np.array([r[f]])
    return arr


def make_cars_split_release(root: Path) -> Path:
    from scipy.io import savemat

    d = root / "stanford_cars"
    (d / "devkit").mkdir(parents=True)
    savemat(d / "devkit" / "cars_meta.mat", {"class_names": np.array([CAR_NAMES], dtype=object)})
    n = 0
    for split, per, target in (("train", 2, d / "devkit" / "cars_train_annos.mat"),
                               ("test", 1, d / "cars_test_annos_withlabels.mat")):
        rows = []
        for c in range(len(CAR_NAMES)):
            for _ in range(per):
                n += 1
                fname = f"{n:05d}.jpg"
                _img(d / f"cars_{split}" / fname, n)
                rows.append({"bbox_x1": 1, "bbox_y1": 1, "bbox_x2": 5, "bbox_y2": 5, "class": c + 1, "fname": fname})
        savemat(target, {"annotations": _annotations(rows)})
    return root


def make_cars_all_in_one(root: Path) -> Path:
    from scipy.io import savemat

    rows = []
    for i in range(9):
        rel = f"car_ims/{i + 1:06d}.jpg"
        _img(root / rel, i)
        rows.append({"relative_im_path": rel, "bbox_x1": 1, "bbox_y1": 1, "bbox_x2": 5, "bbox_y2": 5,
                     "class": i % 3 + 1, "test": int(i >= 6)})
    savemat(root / "cars_annos.mat", {"annotations": _annotations(rows),
                                      "class_names": np.array([CAR_NAMES], dtype=object)})
    return root


def test_cars196_split_release(tmp_path):
    ds = get_dataset("cars196", make_cars_split_release(tmp_path))
    assert ds.classnames == CAR_NAMES
    assert len(ds.train) == 6 and len(ds.test) == 3
    assert list(ds.train.labels) == [0, 0, 1, 1, 2, 2] and list(ds.test.labels) == [0, 1, 2]
    assert all("/cars_test/" in p for p in ds.test.items)
    assert ds.task_sizes == [20] * 9 + [16]


def test_cars196_all_in_one_release(tmp_path):
    ds = get_dataset("cars196", make_cars_all_in_one(tmp_path))
    assert ds.classnames == CAR_NAMES
    assert len(ds.train) == 6 and len(ds.test) == 3 and list(ds.test.labels) == [0, 1, 2]


def test_cars196_missing_test_labels_named(tmp_path):
    root = make_cars_split_release(tmp_path)
    (root / "stanford_cars" / "cars_test_annos_withlabels.mat").unlink()
    with pytest.raises(CgilError, match=r"cars_test_annos_withlabels\.mat"):
        get_dataset("cars196", root)


# ---------------------------------------------------------------- EuroSAT-RGB (folder per class)

def make_eurosat(root: Path, per_class: int = 10, split_file: bool = False) -> Path:
    from cgil.data.eurosat import FOLDERS, NAMES

    d = root / "EuroSAT_RGB"
    split = {"train": [], "val": [], "test": []}
    for label, folder in enumerate(FOLDERS):
        for k in range(per_class):
            rel = f"{folder}/{folder}_{k + 1}.jpg"
            _img(d / rel, label * 100 + k)
            which = "train" if k < 5 else "val" if k < 7 else "test"
            split[which].append([rel, label, NAMES[label]])
    if split_file:
        (root / "split_zhou_EuroSAT.json").write_text(json.dumps(split))
    return root


def test_eurosat_fallback_split(tmp_path):
    ds = get_dataset("eurosat-rgb", make_eurosat(tmp_path))
    assert ds.classnames[:4] == ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Highway or Road"]
    assert ds.classnames[-1] == "Sea or Lake" and ds.task_sizes == [2] * 5
    assert list(np.bincount(ds.train.labels)) == [5] * 10  # 50 % train, 20 % val (unused), 30 % test
    assert list(np.bincount(ds.test.labels)) == [3] * 10
    assert not set(ds.train.items) & set(ds.test.items)
    assert ds.meta["split"] == "fallback-seed0" and "fallback" in ds.dataset_id
    assert get_dataset("eurosat-rgb", tmp_path).train.items == ds.train.items  # deterministic


def test_eurosat_reference_split_file(tmp_path):
    ds = get_dataset("eurosat-rgb", make_eurosat(tmp_path, split_file=True))
    assert ds.meta["split"] == "coop-split-file"
    assert len(ds.train) == 50 and len(ds.test) == 30
    assert ds.test.items[0].endswith("AnnualCrop/AnnualCrop_8.jpg")
    assert ds.dataset_id != get_dataset("eurosat-rgb", make_eurosat(tmp_path / "b")).dataset_id


def test_eurosat_missing_class_folder(tmp_path):
    import shutil

    root = make_eurosat(tmp_path, per_class=2)
    shutil.rmtree(root / "EuroSAT_RGB" / "River")
    with pytest.raises(CgilError, match=r"missing class folder\(s\) River.*zenodo"):
        get_dataset("eurosat-rgb", root)


# ---------------------------------------------------------------- ISIC 2018 Task 3 (CSV ground truth)

ISIC_COLS = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]


def make_isic(root: Path, per_class=(3, 2)) -> Path:
    n = 0
    for (inp, gt), per in zip((("ISIC2018_Task3_Training_Input", "ISIC2018_Task3_Training_GroundTruth"),
                               ("ISIC2018_Task3_Test_Input", "ISIC2018_Task3_Test_GroundTruth")), per_class):
        (root / gt).mkdir(parents=True)
        with open(root / gt / f"{gt}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", *ISIC_COLS])
            for col in ISIC_COLS:
                for _ in range(per):
                    n += 1
                    name = f"ISIC_{n:07d}"
                    _img(root / inp / f"{name}.jpg", n)
                    w.writerow([name, *("1.0" if c == col else "0.0" for c in ISIC_COLS)])
    return root


def test_isic_six_classes_without_nevus(tmp_path):
    ds = get_dataset("isic", make_isic(tmp_path))
    assert ds.classnames == ["melanoma", "basal cell carcinoma", "actinic keratosis or intraepithelial carcinoma",
                             "benign keratosis", "dermatofibroma", "vascular skin lesion"]
    assert len(ds.train) == 18 and len(ds.test) == 12  # the NV rows are dropped
    assert list(np.bincount(ds.train.labels)) == [3] * 6
    assert ds.task_sizes == [2] * 3
    # MEL is column 1, NV (dropped) column 2, BCC column 3: labels follow the kept columns' order
    assert ds.train.items[3].endswith("ISIC_0000007.jpg") and ds.train.labels[3] == 1


def test_isic_missing_ground_truth_named(tmp_path):
    root = make_isic(tmp_path)
    gt = root / "ISIC2018_Task3_Test_GroundTruth" / "ISIC2018_Task3_Test_GroundTruth.csv"
    gt.unlink()
    with pytest.raises(CgilError, match=rf"missing file {gt}.*challenge\.isic-archive\.com"):
        get_dataset("isic", root)
