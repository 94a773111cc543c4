"""The phantom as DICOM series and NIfTI scans: the same views as its PNGs, and no patient data
anywhere in a run folder."""

from __future__ import annotations

import csv
from pathlib import Path

import pydicom
import pytest
import torch
from kd_sos.volumes import ensure_volumes

from kdtoolkit.data.bank import BankDataset, ImageBank
from kdtoolkit.data.dataset import KdDataset
from kdtoolkit.data.manifest import read_manifest
from kdtoolkit.data.scan import ReadSpec
from kdtoolkit.data.view import ViewConfig, student_view
from kdtoolkit.data.volume import clear_cache
from kdtoolkit.testing import kd_in_process

N, SIZE = 8, 64
CFG = ViewConfig(image_size=(48, 48), crop_size=(16, 32), channels=1)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scans")
    dicom = ensure_volumes(root / "dicom", "dicom", n=N, size=SIZE)
    nifti = ensure_volumes(root / "nifti", "nifti", n=N, size=SIZE)
    return {"png": dicom.parent / "png" / "manifest.csv", "dicom": dicom, "nifti": nifti}


def views(manifest: Path, bank: bool = False) -> list[dict[str, torch.Tensor]]:
    samples = read_manifest(manifest).samples
    indices = range(len(samples))
    if bank:
        images = ImageBank(samples, CFG.channels, torch.device("cpu"))
        dataset = BankDataset(images, None, samples, indices, CFG, train=False, seed=0)
    else:
        dataset = KdDataset(samples, indices, CFG, train=False, seed=0)
    return [dataset[i] for i in range(len(dataset))]


@pytest.mark.parametrize("fmt", ["dicom", "nifti"])
def test_scan_gives_the_png_views(phantoms, fmt):
    clear_cache()
    png, scan = read_manifest(phantoms["png"]), read_manifest(phantoms[fmt])
    for a, b in zip(png.samples, scan.samples, strict=True):
        assert (a.box, a.angle, a.width, a.height) == (b.box, b.angle, b.width, b.height)
        assert b.slice == "mid" and b.spacing == (200 / SIZE, 200 / SIZE)
        diff = student_view(a.image, CFG) - student_view(b, CFG)
        assert diff.abs().max() < 1e-4
    for bank in (False, True):
        for a, b in zip(views(phantoms["png"], bank), views(phantoms[fmt], bank), strict=True):
            for key in ("image", "crop", "mask", "box"):
                assert (a[key] - b[key]).abs().max() < 1e-4, (key, bank)


def test_other_slices_differ_and_the_slice_column_picks_them(phantoms, tmp_path):
    rows = list(csv.DictReader(phantoms["dicom"].open()))
    for row in rows:
        row["image"] = str(phantoms["dicom"].parent / row["image"])
        row["slice"] = "2"
    edited = tmp_path / "manifest.csv"
    with edited.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    a = views(phantoms["dicom"])[0]["image"]
    b = views(edited)[0]["image"]
    assert read_manifest(edited).samples[0].read == ReadSpec(slice=2)
    assert (a - b).abs().max() > 0.05


def test_no_patient_data_in_the_run_folder(phantoms, tmp_path):
    """A DICOM series carrying a patient's name and ID: neither reaches any file of a run."""
    name, patient_id = "Doe^Janet", "PID-40417"
    folder = tmp_path / "data"
    n = 30
    manifest = ensure_volumes(folder, "dicom", n=n, size=SIZE)
    for file in (folder / "images").rglob("*.dcm"):
        ds = pydicom.dcmread(file)
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = name, patient_id, "19700101"
        ds.save_as(file, enforce_file_format=True)
    run = tmp_path / "run"
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(
        f'[experiment]\noutput = "{run}"\ndevice = "cpu"\n'
        f'[data]\nmanifest = "{manifest}"\nimage_size = 32\ncrop_size = [16, 32]\n'
        "[cv]\nfolds = 2\nval_fraction = 0.2\n"
        '[teacher]\nbackbone = "resnet10t"\nepochs = 1\nbatch_size = 8\n'
        '[student]\nbackbone = "resnet10t"\nepochs = 1\nbatch_size = 8\n'
        '[[loss]]\nname = "ce"\n[[loss]]\nname = "kl"\n'
        "[evaluate]\nbaseline = false\ncam_examples = 2\n"
    )
    done = kd_in_process("run", str(recipe), "--quiet")
    assert done.returncode == 0, done.stderr
    sheet = run / "check.png"
    checked = kd_in_process("data", "check", str(manifest), "--folds", "2", "--sheet", str(sheet))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    files = [p for p in run.rglob("*") if p.is_file()]
    assert sheet in files and len(files) > 10
    outputs = (done.stdout + done.stderr + checked.stdout + checked.stderr).encode()
    for secret in (name, patient_id, "Janet", "19700101"):
        for data in (outputs, *(p.read_bytes() for p in files)):
            assert secret.encode() not in data
            assert secret.encode("utf-16-le") not in data
