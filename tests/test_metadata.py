"""The label encoder: paper layout, synonyms, unknown-value policies, round trips, JSON."""
import json

import numpy as np
import pytest

from modan_ext.data.metadata import (LabelVocabulary, PAPER_ANATOMIES, PAPER_MODALITIES,
                                UnknownValueError, paper_vocabulary)


def test_paper_vocabulary_has_the_papers_12_columns_in_order():
    vocab = paper_vocabulary()
    assert vocab.size == 12
    assert vocab.columns[:3] == ["modality:CT", "modality:MR", "modality:US"]
    assert vocab.columns[3:] == [f"anatomy:{a}" for a in PAPER_ANATOMIES]
    assert vocab.field_slice("anatomy") == slice(3, 12)


def test_encode_sets_exactly_one_bit_per_field():
    vocab = paper_vocabulary()
    vector = vocab.encode({"modality": "MR", "anatomy": "knee"})
    assert vector.dtype == bool and vector.sum() == 2
    assert vector[vocab.columns.index("modality:MR")] and vector[vocab.columns.index("anatomy:knee")]


def test_matching_is_case_insensitive_and_uses_synonyms():
    vocab = paper_vocabulary()
    expected = vocab.encode({"modality": "MR", "anatomy": "brain"})
    for record in ({"modality": "mr", "anatomy": "BRAIN"}, {"modality": "MRI", "anatomy": "HEAD"},
                   {"modality": " mr ", "anatomy": "Head"}):
        np.testing.assert_array_equal(vocab.encode(record), expected)
    assert vocab.decode(vocab.encode({"modality": "CT", "anatomy": "CHEST"})) == \
        {"modality": ["CT"], "anatomy": ["lung"]}
    assert vocab.decode(vocab.encode({"modality": "MR", "anatomy": "LSPINE"}))["anatomy"] == ["spine"]


@pytest.mark.parametrize("modality", PAPER_MODALITIES)
@pytest.mark.parametrize("anatomy", PAPER_ANATOMIES)
def test_round_trip_of_every_paper_label(modality, anatomy):
    vocab = paper_vocabulary()
    record = {"modality": modality, "anatomy": anatomy}
    assert vocab.decode(vocab.encode(record)) == {"modality": [modality], "anatomy": [anatomy]}


def test_unknown_value_error_names_field_value_and_place():
    vocab = paper_vocabulary()
    with pytest.raises(UnknownValueError) as err:
        vocab.encode({"modality": "PET", "anatomy": "knee"}, where="scans.csv, row 7")
    text = str(err.value)
    assert "'modality'" in text and "'PET'" in text and "scans.csv, row 7" in text and "CT" in text
    with pytest.raises(UnknownValueError, match="missing value"):
        vocab.encode({"modality": "CT"}, where="x.dcm")


def test_unknown_policy_zeros_drops_only_that_field():
    vocab = paper_vocabulary(unknown="zeros")
    vector = vocab.encode({"modality": "PET", "anatomy": "knee"})
    assert vector.sum() == 1 and vocab.decode(vector) == {"modality": [], "anatomy": ["knee"]}
    assert vocab.encode({"modality": None, "anatomy": None}).sum() == 0


def test_unknown_policy_column_adds_one_unknown_column_per_field():
    vocab = paper_vocabulary(unknown="column")
    assert vocab.size == 14
    assert "modality:unknown" in vocab.columns and "anatomy:unknown" in vocab.columns
    decoded = vocab.decode(vocab.encode({"modality": "PET", "anatomy": ""}))
    assert decoded == {"modality": ["unknown"], "anatomy": ["unknown"]}


def test_bad_policy_and_bad_layouts_are_rejected():
    with pytest.raises(ValueError, match="unknown must be one of"):
        paper_vocabulary(unknown="skip")
    with pytest.raises(ValueError, match="duplicate"):
        LabelVocabulary({"modality": ["CT", "ct"]})
    with pytest.raises(ValueError, match="not one of"):
        LabelVocabulary({"modality": ["CT"]}, {"modality": {"MRI": "MR"}})
    with pytest.raises(ValueError, match="lacks"):
        LabelVocabulary({"modality": ["CT"]}, {"view": {"AX": "axial"}})
    with pytest.raises(TypeError):
        LabelVocabulary({"modality": "CT"})


def test_extra_fields_extend_the_columns_and_multi_values_set_several_bits():
    vocab = paper_vocabulary().with_field("contrast", ["none", "iv", "oral"],
                                          synonyms={"IV CONTRAST": "iv"})
    assert vocab.size == 15 and vocab.columns[-3:] == ["contrast:none", "contrast:iv", "contrast:oral"]
    record = {"modality": "CT", "anatomy": "abd", "contrast": ["IV contrast", "oral"]}
    assert vocab.decode(vocab.encode(record)) == \
        {"modality": ["CT"], "anatomy": ["abd"], "contrast": ["iv", "oral"]}
    with pytest.raises(ValueError, match="already exists"):
        vocab.with_field("modality", ["X"])


def test_json_round_trip_keeps_columns_synonyms_and_policy(tmp_path):
    vocab = paper_vocabulary(unknown="column").with_field("view", ["axial", "sagittal"])
    path = tmp_path / "vocabulary.json"
    vocab.save(path)
    loaded = LabelVocabulary.load(path)
    assert loaded.columns == vocab.columns and loaded.unknown == "column"
    record = {"modality": "MRI", "anatomy": "HEAD", "view": "Sagittal"}
    np.testing.assert_array_equal(loaded.encode(record), vocab.encode(record))
    data = json.loads(path.read_text())
    assert data["format"] == "modan_ext.LabelVocabulary" and data["version"] == 1
    with pytest.raises(ValueError, match="not a modan_ext"):
        LabelVocabulary.from_dict({"fields": []})
    with pytest.raises(ValueError, match="version"):
        LabelVocabulary.from_dict({**data, "version": 99})


HEAD = '{"format": "modan_ext.LabelVocabulary", "version": 1, '


@pytest.mark.parametrize("text, problem", [
    (HEAD + '"fields": [{"name": "modality", "values": ["CT"]}]',  # cut short
     r"Expecting ',' delimiter: line 1 column \d+"),
    ('["modality", "anatomy"]', "a vocabulary is a JSON object; got list"),
    (HEAD + '"field": []}', "'fields' must be a list"),
    (HEAD + '"fields": [{"name": "modality"}]}', r"fields\[0\] must be \{\"name\": string"),
    (HEAD + '"fields": [{"name": "m", "values": "CT"}]}', r"fields\[0\] must be"),
    (HEAD + '"fields": [{"name": "m", "values": ["CT"]}, {"name": "m", "values": ["MR"]}]}',
     r"fields\[1\]: field 'm' appears twice"),
    (HEAD + '"fields": [{"name": "m", "values": ["CT"]}], "synonyms": ["CT"]}',
     "'synonyms' must be"),
    (HEAD + '"fields": [{"name": "m", "values": ["CT"]}], "synonyms": {"m": {"CAT": "PET"}}}',
     "'PET' is not one of"),
    (HEAD + '"fields": [{"name": "m", "values": ["CT"]}], "unknown": "skip"}', "unknown must be"),
])
def test_a_malformed_vocabulary_file_is_named_with_the_problem(tmp_path, text, problem):
    path = tmp_path / "my_vocabulary.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"my_vocabulary\.json: not a valid label vocabulary: "
                                         rf".*{problem}"):
        LabelVocabulary.load(path)


def test_a_vocabulary_file_not_in_utf8_is_named(tmp_path):
    path = tmp_path / "latin.json"
    path.write_bytes((HEAD + '"fields": [{"name": "m", "values": ["\xe9"]}]}').encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.json: not a valid label vocabulary: .*utf-8"):
        LabelVocabulary.load(path)


def test_encode_many_names_the_failing_record_and_field_index_works():
    vocab = paper_vocabulary()
    rows = vocab.encode_many([{"modality": "CT", "anatomy": "lung"}, {"modality": "US", "anatomy": "thyroid"}])
    assert rows.shape == (2, 12)
    np.testing.assert_array_equal(vocab.field_index(rows, "modality"), [0, 2])
    np.testing.assert_array_equal(vocab.field_index(rows, "anatomy"), [1, 8])
    with pytest.raises(UnknownValueError, match="record 1"):
        vocab.encode_many([{"modality": "CT", "anatomy": "lung"}, {"modality": "XR", "anatomy": "lung"}])
    with pytest.raises(ValueError, match="entries"):
        vocab.decode(np.zeros(5))
