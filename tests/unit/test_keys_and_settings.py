import re
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from config.settings import load_settings
from config.errors import BadInput
from worker.store.keys import ID_PATTERN, key_for_id, validate_id, validate_key


@pytest.mark.parametrize("media_id", ["a", "wamid.HBgL-abc_123", "x" * 128, "1.2.3"])
def test_ids_of_the_documented_alphabet_are_accepted(media_id):
    """1-128 characters of A-Za-z0-9._- are valid media IDs."""
    assert validate_id(media_id) == media_id


@pytest.mark.parametrize("media_id", ["", "x" * 129, "a/b", "..", ".", "a..b", "a\x00b", "a b", "é", "../etc"])
def test_ids_with_slashes_dots_nul_or_foreign_characters_are_refused(media_id):
    """Anything that could read as a path, or is outside the alphabet, is bad input."""
    with pytest.raises(BadInput):
        validate_id(media_id)


@hypothesis_settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab.-_Z9/ é\x00"), max_size=140) | st.text(alphabet="a.", min_size=120, max_size=135))
def test_the_published_id_pattern_accepts_exactly_the_ids_lookups_accept(media_id):
    """The OpenAPI description's pattern for a media ID and `validate_id` agree on every string."""
    try:
        validate_id(media_id)
        accepted = True
    except BadInput:
        accepted = False
    assert (re.search(ID_PATTERN, media_id) is not None) == accepted


def test_a_huge_bad_id_is_quoted_cut_short_with_its_length():
    """A 100 KB ID makes an error of one short sentence, naming how long it was."""
    with pytest.raises(BadInput) as refused:
        validate_id("x" * 100_000 + "!")
    assert len(str(refused.value)) < 250 and "(100001 characters)" in str(refused.value)


@pytest.mark.parametrize("key", ["a", "ab/cd/id-1", "tenant/2026/01/photo.jpg", "a..b/c"])
def test_relative_normalised_keys_are_accepted(key):
    """Ordinary nested keys, including names that merely contain two dots, are valid."""
    assert validate_key(key) == key


@pytest.mark.parametrize("key", ["", "/etc/passwd", "../x", "a/../../x", "a/./b", "a//b", "a/", "a\x00b", "a\\..\\b", "x" * 1025])
def test_absolute_traversing_empty_or_nul_keys_are_refused(key):
    """Keys that are absolute, step out with '..', contain NUL or are not normalised are bad input."""
    with pytest.raises(BadInput):
        validate_key(key)


def test_new_keys_are_sharded_two_levels_deep_by_hash():
    """Keys look like ab/cd/<id>, stable for an ID and spread across shards."""
    key = key_for_id("photo-1")
    first, second, name = key.split("/")
    assert (len(first), len(second), name) == (2, 2, "photo-1")
    assert key_for_id("photo-1") == key
    assert len({key_for_id(f"id-{n}").split("/")[0] for n in range(2000)}) > 200


def test_settings_fill_every_embedded_default_from_the_data_dir(tmp_path, monkeypatch):
    """With only the data dir set, database, broker and store all live inside it."""
    monkeypatch.setenv("MEDIA_RETENTION_DATA_DIR", str(tmp_path))
    settings = load_settings()
    assert settings.database_url == f"sqlite:///{tmp_path / 'catalog.sqlite3'}"
    assert settings.storage_url == (tmp_path / "media").as_uri()
    assert settings.embedded_broker
    assert settings.default_retention == timedelta(days=90)
    assert settings.sweep_interval == timedelta(seconds=60)
    assert settings.claim_lease == timedelta(minutes=5)


def test_settings_parse_durations_from_the_environment(monkeypatch):
    """Duration settings accept the short and ISO-8601 forms."""
    monkeypatch.setenv("MEDIA_RETENTION_SWEEP_INTERVAL", "PT2M")
    monkeypatch.setenv("MEDIA_RETENTION_DEFAULT_RETENTION", "2w")
    settings = load_settings()
    assert settings.sweep_interval == timedelta(minutes=2)
    assert settings.default_retention == timedelta(weeks=2)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [("MEDIA_RETENTION_SWEEP_INTERVAL", "soon", "MEDIA_RETENTION_SWEEP_INTERVAL"),
     ("MEDIA_RETENTION_DEFAULT_RETENTION", "30m", "at least 1h"),
     ("MEDIA_RETENTION_VOLUME_WARN", "0.95", "below"),
     ("MEDIA_RETENTION_VOLUME_CRITICAL", "2", "MEDIA_RETENTION_VOLUME_CRITICAL")],
)
def test_bad_settings_are_one_sentence_naming_the_variable(monkeypatch, name, value, message):
    """A malformed setting is BadInput whose message says which variable is wrong."""
    monkeypatch.setenv(name, value)
    with pytest.raises(BadInput, match=message) as error:
        load_settings()
    assert "\n" not in str(error.value)


def test_every_setting_is_documented_in_the_readme():
    """Each field of the settings object appears in README.md as its MEDIA_RETENTION_* variable."""
    from pathlib import Path

    from config.settings import Settings

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [f"MEDIA_RETENTION_{name.upper()}" for name in Settings.model_fields if f"MEDIA_RETENTION_{name.upper()}" not in readme]
    assert not missing, f"undocumented settings: {missing}"
