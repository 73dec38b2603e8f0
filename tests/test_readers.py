"""Readers: RadImageNet tree and split CSVs, generic CSV, DICOM headers (pydicom's own sample
files, renamed and truncated copies), downstream fold CSVs; path checks, sources without images,
and error messages that name the file (and row)."""
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from modan_ext.data.images import load_grayscale, load_image_set
from modan_ext.data.metadata import UnknownValueError, paper_vocabulary
from modan_ext.data.readers import (load_downstream_task, read_any, read_dicom_headers,
                                    read_fold_csvs, read_metadata_csv,
                                    read_radimagenet_split_csv, read_radimagenet_tree, us_anatomy)
from modan_ext.data.records import (ImageReadError, MetadataReadError, NoImagesError,
                                    resolve_image_path)


def _png(path: Path, value: int = 128, size: int = 8) -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(path)


@pytest.fixture
def radimagenet(tmp_path):
    root = tmp_path / "radiology_ai"
    _png(root / "CT" / "abd" / "normal" / "a.png")
    _png(root / "MR" / "knee" / "acl_pathology" / "b.png", 200)
    _png(root / "US" / "thyroid_nodule" / "c.png", 50)
    _png(root / "US" / "liver" / "d.png", 60)
    (root / "CT" / "abd" / "normal" / "notes.txt").write_text("not an image")
    return tmp_path


def test_tree_reads_fields_and_leaves_with_ultrasound_one_level_shallower(radimagenet):
    records = read_radimagenet_tree(radimagenet)  # the folder containing radiology_ai/
    got = {Path(r.path).name: (r.fields, r.leaf) for r in records}
    assert got == {
        "a.png": ({"modality": "CT", "anatomy": "abd"}, "CT/abd/normal"),
        "b.png": ({"modality": "MR", "anatomy": "knee"}, "MR/knee/acl_pathology"),
        "c.png": ({"modality": "US", "anatomy": "thyroid"}, "US/thyroid_nodule"),
        "d.png": ({"modality": "US", "anatomy": "abd"}, "US/liver"),
    }
    vocab = paper_vocabulary()
    assert vocab.encode_many([r.fields for r in records]).sum(1).tolist() == [2, 2, 2, 2]


def test_tree_rejects_wrong_depth_naming_the_file(radimagenet):
    _png(radimagenet / "radiology_ai" / "MR" / "knee" / "stray.png")
    with pytest.raises(MetadataReadError, match=r"stray\.png.*MR/<anatomy>/<pathology>/<file>"):
        read_radimagenet_tree(radimagenet)


def test_unknown_ultrasound_label_needs_a_mapping_or_fallback(radimagenet):
    _png(radimagenet / "radiology_ai" / "US" / "testis" / "e.png")
    with pytest.raises(MetadataReadError, match="'testis' has no anatomy mapping"):
        read_radimagenet_tree(radimagenet)
    records = read_radimagenet_tree(radimagenet, us_fallback="abd")
    assert {r.fields["anatomy"] for r in records if "testis" in r.path} == {"abd"}
    assert us_anatomy("Thyroid-Nodule") == "thyroid"


def test_split_csv_uses_paths_relative_to_the_data_folder(radimagenet):
    csv_path = radimagenet / "RadiologyAI_train.csv"
    csv_path.write_text("filename,label\n"
                        "radiology_ai/MR/knee/acl_pathology/b.png,MR-knee-acl_pathology\n"
                        "radiology_ai/US/liver/d.png,US-liver\n")
    records = read_radimagenet_split_csv(csv_path)
    assert [r.fields for r in records] == [{"modality": "MR", "anatomy": "knee"},
                                           {"modality": "US", "anatomy": "abd"}]
    assert [r.leaf for r in records] == ["MR-knee-acl_pathology", "US-liver"]
    assert records[1].source.endswith("row 3")


@pytest.mark.parametrize("filename, message", [
    ("radiology_ai/CT/abd/normal/missing.png", "row 2: image file not found"),
    ("../outside.png", "row 2: path '../outside.png' leaves the root folder"),
    ("/etc/passwd", "row 2: absolute path"),
    ("", "row 2: empty image path"),
])
def test_split_csv_errors_name_file_and_row(radimagenet, filename, message):
    csv_path = radimagenet / "RadiologyAI_val.csv"
    csv_path.write_text(f"filename,label\n{filename},x\n")
    with pytest.raises(MetadataReadError, match=message) as err:
        read_radimagenet_split_csv(csv_path)
    assert "RadiologyAI_val.csv" in str(err.value)


def test_split_csv_missing_column_is_reported(tmp_path):
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text("file,label\nx.png,y\n")
    with pytest.raises(MetadataReadError, match=r"missing column\(s\) \['filename'\]"):
        read_radimagenet_split_csv(csv_path)


def test_generic_csv_with_named_columns_and_multi_values(tmp_path):
    _png(tmp_path / "img" / "1.png")
    _png(tmp_path / "img" / "2.png")
    csv_path = tmp_path / "meta.csv"
    csv_path.write_text("image,mod,body,contrast,cls\n"
                        "img/1.png,MRI,Head,none,glioma\n"
                        "img/2.png,CT,ABDOMEN,iv|oral,\n")
    records = read_metadata_csv(csv_path, path_column="image",
                                field_columns={"modality": "mod", "anatomy": "body",
                                               "contrast": "contrast"}, leaf_column="cls")
    assert records[0].fields == {"modality": "MRI", "anatomy": "Head", "contrast": "none"}
    assert records[1].fields["contrast"] == ["iv", "oral"] and records[1].leaf is None
    vocab = paper_vocabulary().with_field("contrast", ["none", "iv", "oral"])
    decoded = [vocab.decode(v) for v in vocab.encode_many([r.fields for r in records])]
    assert decoded[0] == {"modality": ["MR"], "anatomy": ["brain"], "contrast": ["none"]}
    assert decoded[1]["contrast"] == ["iv", "oral"]


def test_generic_csv_unknown_value_error_points_at_the_row(tmp_path):
    _png(tmp_path / "1.png")
    csv_path = tmp_path / "meta.csv"
    csv_path.write_text("path,modality,anatomy\n1.png,PET,knee\n")
    records = read_metadata_csv(csv_path)
    with pytest.raises(UnknownValueError, match=r"meta\.csv, row 2"):
        paper_vocabulary().encode_many([r.fields for r in records], [r.source for r in records])


def test_resolve_image_path_without_root_accepts_absolute(tmp_path):
    _png(tmp_path / "x.png")
    assert resolve_image_path(str(tmp_path / "x.png"), None, "here") == str((tmp_path / "x.png").resolve())
    with pytest.raises(MetadataReadError, match="NUL"):
        resolve_image_path("a\x00b", tmp_path, "here")


def test_tree_refuses_a_file_symlink_out_of_the_root_like_the_csv_readers(radimagenet, tmp_path_factory):
    outside = tmp_path_factory.mktemp("elsewhere") / "secret.png"
    _png(outside)
    link = radimagenet / "radiology_ai" / "CT" / "abd" / "normal" / "link.png"
    link.symlink_to(outside)
    with pytest.raises(MetadataReadError, match=r"link\.png: path .* leaves the root folder"):
        read_radimagenet_tree(radimagenet)
    csv_path = radimagenet / "RadiologyAI_train.csv"
    csv_path.write_text("filename,label\nradiology_ai/CT/abd/normal/link.png,x\n")
    with pytest.raises(MetadataReadError, match="row 2: path .* leaves the root folder"):
        read_radimagenet_split_csv(csv_path)
    link.unlink()
    link.symlink_to(radimagenet / "radiology_ai" / "CT" / "abd" / "normal" / "a.png")
    inside = {Path(r.source).name: r.path for r in read_radimagenet_tree(radimagenet)}
    assert inside["link.png"] == inside["a.png"]  # a link inside the root is followed


def test_sources_without_images_say_so_at_read_time_naming_them(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoImagesError, match=r"empty: no images: .*no files at all.*RadImageNet"):
        read_any(tmp_path / "empty")
    _png(tmp_path / "pngs" / "a.png")  # images, but no CT/MR/US folders
    with pytest.raises(NoImagesError, match=r"pngs: no images: no DICOM files in it "
                                            r"\(1 other files: a\.png\).*no CT/, MR/, US/"):
        read_any(tmp_path / "pngs")
    (tmp_path / "tree" / "MR" / "knee" / "acl").mkdir(parents=True)
    with pytest.raises(NoImagesError, match=r"tree: no images: no files with extensions"):
        read_any(tmp_path / "tree")
    for name, header in (("meta.csv", "path,modality,anatomy"), ("split.csv", "filename,label")):
        (tmp_path / name).write_text(header + "\n\n")
        with pytest.raises(NoImagesError, match=rf"{name}: no images: .* header and no rows"):
            read_any(tmp_path / name)
    task = _fold_task(tmp_path)
    (task / "dataframe" / "thyroid_test_fold2.csv").write_text("img_dir,label\n")
    with pytest.raises(NoImagesError, match=r"thyroid_test_fold2\.csv: no images"):
        read_fold_csvs(task)


@pytest.mark.parametrize("reader", ["metadata", "split", "folds", "any"])
def test_a_csv_not_in_utf8_is_named_with_its_line(tmp_path, reader):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    if reader == "folds":
        task = _fold_task(tmp_path)
        path = task / "dataframe" / "thyroid_train_fold1.csv"
        path.write_bytes("img_dir,label\nimages/1.png,benign\nimages/caf\xe9.png,benign\n"
                         .encode("latin-1"))
        call = lambda: read_fold_csvs(task)  # noqa: E731
    else:
        header = "filename,label" if reader == "split" else "path,modality,anatomy"
        path = tmp_path / "latin.csv"
        path.write_bytes(f"{header}\na.png,CT,abd\nb.png,CT,abdom\xe9n\n".encode("latin-1"))
        call = {"metadata": lambda: read_metadata_csv(path),
                "split": lambda: read_radimagenet_split_csv(path),
                "any": lambda: read_any(path)}[reader]
    with pytest.raises(MetadataReadError, match=r"\.csv, line 3: not UTF-8 text \(byte 0xe9"):
        call()


def test_an_unreadable_image_is_named_with_the_row_that_listed_it(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (tmp_path / "meta.csv").write_text("path,modality,anatomy\nbroken.png,CT,abd\n")
    records = read_metadata_csv(tmp_path / "meta.csv")
    with pytest.raises(ImageReadError, match=r"meta\.csv, row 2: .*broken\.png: cannot read"):
        load_image_set(records, 8)


# ---- DICOM: the real sample files that pydicom ships ------------------------------------------

try:
    import pydicom
except ImportError:  # optional extra: only the DICOM tests need it
    pydicom = None
needs_pydicom = pytest.mark.skipif(pydicom is None,
                                   reason="pydicom is not installed (optional extra 'dicom')")


def _sample(name: str) -> str:
    # The files live inside the pydicom package; looking them up there avoids
    # get_testdata_file's network download of files that are not bundled.
    path = Path(pydicom.__file__).parent / "data" / "test_files" / name
    if not path.is_file():
        pytest.skip(f"pydicom's sample {name} is not bundled with this pydicom version")
    return str(path)


@needs_pydicom
def test_dicom_modality_from_real_ct_and_mr_samples():
    records = read_dicom_headers([_sample("CT_small.dcm"), _sample("MR_small.dcm")])
    assert [r.fields["modality"] for r in records] == ["CT", "MR"]
    # these two samples have no BodyPartExamined: missing, which the vocabulary must handle
    assert [r.fields["anatomy"] for r in records] == [None, None]
    with pytest.raises(UnknownValueError, match=r"missing value.*CT_small\.dcm"):
        paper_vocabulary().encode(records[0].fields, records[0].source)
    zeros = paper_vocabulary(unknown="zeros")
    assert zeros.decode(zeros.encode(records[1].fields)) == {"modality": ["MR"], "anatomy": []}


@needs_pydicom
def test_dicom_body_part_maps_through_synonyms():
    records = read_dicom_headers([_sample("examples_overlay.dcm"), _sample("J2K_pixelrep_mismatch.dcm")])
    assert [(r.fields["modality"], r.fields["anatomy"]) for r in records] == \
        [("MR", "ABDOMEN"), ("CT", "HEAD")]
    vocab = paper_vocabulary()
    assert [vocab.decode(vocab.encode(r.fields)) for r in records] == \
        [{"modality": ["MR"], "anatomy": ["abd"]}, {"modality": ["CT"], "anatomy": ["brain"]}]


@needs_pydicom
def test_dicom_folder_scan_and_edited_header(tmp_path):
    dataset = pydicom.dcmread(_sample("CT_small.dcm"))
    dataset.BodyPartExamined = "KNEE"
    dataset.Modality = "MR"
    dataset.save_as(tmp_path / "knee.dcm")
    shutil.copy(_sample("MR_small.dcm"), tmp_path / "sub_mr.dcm")
    records = read_dicom_headers(tmp_path)
    assert [(Path(r.path).name, r.fields["modality"], r.fields["anatomy"]) for r in records] == \
        [("knee.dcm", "MR", "KNEE"), ("sub_mr.dcm", "MR", None)]
    assert load_grayscale(str(tmp_path / "knee.dcm"), 16).shape == (16, 16)


def _ct(path: Path, keep_bytes: int | None = None) -> Path:
    """CT_small.dcm copied to `path`, cut after `keep_bytes` bytes."""
    data = Path(_sample("CT_small.dcm")).read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[:keep_bytes])
    return path


@needs_pydicom
def test_dicom_files_named_by_uid_or_without_extension_are_read_and_loaded(tmp_path):
    uid = _ct(tmp_path / "study" / "1.2.840.113619.2.55.3.604688.320")
    shutil.copy(_sample("MR_small.dcm"), tmp_path / "study" / "IM0001")
    (tmp_path / "study" / "notes.txt").write_text("scanned on Tuesday")
    shutil.copy(_sample("dicomdirtests/DICOMDIR"), tmp_path / "study" / "DICOMDIR")
    messages = []
    records = read_any(tmp_path / "study", log=messages.append)
    assert [(Path(r.path).name, r.fields["modality"]) for r in records] == \
        [(uid.name, "CT"), ("IM0001", "MR")]
    assert messages == [f"{tmp_path / 'study'}: skipped 2 files that are not DICOM images (no "
                        "'DICM' marker at byte 128, or the DICOMDIR index): DICOMDIR, notes.txt"]
    images = load_image_set(records, 16).images  # pixels through pydicom, not PIL
    assert images.shape == (2, 1, 16, 16)
    assert np.array_equal(images[1, 0].numpy(), load_grayscale(_sample("MR_small.dcm"), 16))


@needs_pydicom
def test_dicom_folder_refuses_a_file_symlink_out_of_the_root_like_the_tree(tmp_path):
    outside = _ct(tmp_path / "elsewhere" / "1.2.3.9")
    _ct(tmp_path / "study" / "1.2.3.1")
    (tmp_path / "study" / "1.2.3.2").symlink_to(outside)
    with pytest.raises(MetadataReadError, match=r"1\.2\.3\.2: path .* leaves the root folder"):
        read_any(tmp_path / "study")
    (tmp_path / "study" / "1.2.3.2").unlink()
    (tmp_path / "study" / "1.2.3.2").symlink_to(tmp_path / "study" / "1.2.3.1")
    assert len(read_any(tmp_path / "study")) == 2  # a link inside the root is read


@needs_pydicom
@pytest.mark.parametrize("keep_bytes, message", [
    (1000, r"no pixel data: a truncated file, or a DICOM object that is not an image "
           r"\(SOP class 'CT Image Storage'"),            # cut inside the header
    (38000, r"truncated: its pixel data needs 32768 bytes from byte 6300, the file ends at "
            r"byte 38000"),                                 # cut inside the pixel data
])
def test_a_truncated_dicom_raises_naming_the_file(tmp_path, keep_bytes, message):
    cut = _ct(tmp_path / "scans" / "1.2.3.4", keep_bytes)
    with pytest.raises(MetadataReadError, match=rf"1\.2\.3\.4: {message}"):
        read_dicom_headers(tmp_path / "scans")
    with pytest.raises(MetadataReadError, match=message):  # an explicit file, too
        read_dicom_headers(cut)
    zeros = paper_vocabulary(unknown="zeros")  # it never becomes an all-zero label row
    with pytest.raises(MetadataReadError, match=message):
        zeros.encode_many([r.fields for r in read_any(tmp_path / "scans")])


@needs_pydicom
def test_dicom_pixel_data_that_cannot_be_decoded_names_the_file(tmp_path):
    dataset = pydicom.dcmread(_sample("CT_small.dcm"))
    dataset.Rows = 4 * dataset.Rows  # the header promises more pixels than the data holds
    dataset.save_as(tmp_path / "IM7")
    assert [Path(r.path).name for r in read_dicom_headers(tmp_path)] == ["IM7"]
    with pytest.raises(ImageReadError, match=r"IM7: cannot read the image's pixels \("):
        load_grayscale(str(tmp_path / "IM7"), 16)


@needs_pydicom
def test_non_dicom_and_missing_files_are_named(tmp_path):
    bogus = tmp_path / "fake.dcm"
    bogus.write_bytes(b"this is not a DICOM file at all" * 10)
    with pytest.raises(MetadataReadError, match=r"fake\.dcm: not a readable DICOM file"):
        read_dicom_headers(bogus)
    with pytest.raises(MetadataReadError, match="not found"):
        read_dicom_headers(tmp_path / "nope.dcm")
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.move(bogus, folder / "fake.dcm")  # named as DICOM in a folder: not skipped
    with pytest.raises(MetadataReadError, match=r"fake\.dcm: not a readable DICOM file \(no 'DICM'"):
        read_dicom_headers(folder)


# ---- downstream folds --------------------------------------------------------------------------

def _fold_task(tmp_path, label_column="label"):
    task = tmp_path / "thyroid"
    for i in range(6):
        _png(task / "images" / f"{i}.png", 40 * i)
    frames = task / "dataframe"
    frames.mkdir()
    for k in (1, 2):
        for split, ids in (("train", [0, 1, 2, 3]), ("val", [4]), ("test", [5])):
            ids = [(i + k) % 6 for i in ids]
            rows = "".join(f"images/{i}.png,{'malignant' if i % 2 else 'benign'}\n" for i in ids)
            (frames / f"thyroid_{split}_fold{k}.csv").write_text(f"img_dir,{label_column}\n" + rows)
    return task


def test_fold_csvs_in_radimagenet_repository_format(tmp_path):
    task_dir = _fold_task(tmp_path)
    folds = read_fold_csvs(task_dir)
    assert len(folds) == 2 and len(folds[0].train[0]) == 4
    np.testing.assert_array_equal(folds[0].test[1], [0])   # image 0: benign
    task = load_downstream_task(task_dir, size=8)
    assert task.name == "thyroid" and task.images.shape == (6, 1, 8, 8)
    for train, val, test in task.folds:
        assert len(set(train) | set(val) | set(test)) == 6
    # images are numbered in first-seen order: fold 1's train, val, test CSVs
    first = folds[0]
    seen = first.train[0] + first.val[0] + first.test[0]
    assert task.targets.tolist() == [int(Path(p).stem) % 2 for p in seen]


def test_fold_csv_bad_label_and_missing_split_are_reported(tmp_path):
    task_dir = _fold_task(tmp_path)
    (task_dir / "dataframe" / "thyroid_val_fold2.csv").write_text("img_dir,label\nimages/1.png,maybe\n")
    with pytest.raises(MetadataReadError, match=r"thyroid_val_fold2\.csv, row 2: label 'maybe'"):
        read_fold_csvs(task_dir)
    os.remove(task_dir / "dataframe" / "thyroid_val_fold2.csv")
    with pytest.raises(MetadataReadError, match=r"fold 2 lacks its \['val'\]"):
        read_fold_csvs(task_dir)


def test_load_image_set_from_tree(radimagenet):
    image_set = load_image_set(read_radimagenet_tree(radimagenet), size=16)
    assert image_set.images.shape == (4, 1, 16, 16) and len(image_set) == 4
    assert image_set.images[1].float().mean() == 200  # b.png is flat 200


# ---- read_any: which reader a source needs -----------------------------------------------------

def test_read_any_picks_the_reader_from_the_source(radimagenet):
    assert len(read_any(radimagenet)) == 4                        # folder holding radiology_ai/
    assert len(read_any(radimagenet / "radiology_ai")) == 4       # the tree itself
    split = radimagenet / "RadiologyAI_train.csv"
    split.write_text("filename,label\nradiology_ai/US/liver/d.png,US-liver\n")
    assert [r.leaf for r in read_any(split)] == ["US-liver"]      # RadImageNet split CSV
    generic = radimagenet / "meta.csv"
    generic.write_text("path,modality,anatomy\nradiology_ai/US/liver/d.png,US,abd\n")
    assert [r.fields for r in read_any(generic)] == [{"modality": "US", "anatomy": "abd"}]
    # a split-style header read as a generic CSV when columns are named
    assert [r.fields for r in read_any(split, path_column="filename",
                                       field_columns={"modality": "label"})] == [{"modality": "US-liver"}]
    with pytest.raises(MetadataReadError, match="not a folder, CSV or DICOM file"):
        read_any(radimagenet / "nothing_here")


def test_read_any_passes_the_ultrasound_fallback(radimagenet):
    _png(radimagenet / "radiology_ai" / "US" / "testis" / "e.png")
    with pytest.raises(MetadataReadError, match="no anatomy mapping"):
        read_any(radimagenet)
    assert len(read_any(radimagenet, us_fallback="abd")) == 5


@needs_pydicom
def test_read_any_reads_dicom_folders_and_files(tmp_path):
    shutil.copy(_sample("MR_small.dcm"), tmp_path / "mr.dcm")
    assert [r.fields["modality"] for r in read_any(tmp_path)] == ["MR"]
    assert [r.fields["modality"] for r in read_any(tmp_path / "mr.dcm")] == ["MR"]
