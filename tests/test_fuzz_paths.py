"""Hypothesis: a provider path the gateway accepts reads the same to every reader, so it is priced as it is sent."""
from __future__ import annotations

import posixpath
from urllib.parse import unquote, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from yarl import URL

from aipipe.errors import ApiError
from aipipe.providers.openai import FREE_POST
from aipipe.request_path import checked_path, checked_query

# Segments drawn from what makes paths ambiguous as well as from plain text.
PIECES = st.sampled_from(["v1", "chat", "completions", "files", "..", ".", "", "%2e", "%2f", "%2F", "%23", "%3f", "%3B",
                          "%00", "%0a", "\\", ";", "#", "?", "%", "%25", "a b", "\t", "é", "~", "ft:gpt-4o:org::x",
                          "cancel", "moderations", "uploads", "file-abc"])
SEGMENTS = st.lists(st.one_of(PIECES, st.text(max_size=6)), max_size=7)


def accepted(path: str) -> bool:
    try:
        checked_path(path)
    except ApiError as e:
        assert e.status_code == 400
        return False
    return True


@settings(max_examples=400, deadline=None)
@given(SEGMENTS, st.booleans())
def test_an_accepted_path_is_read_the_same_by_every_reader(segments, trailing):
    path = "/" + "/".join(segments) + ("/" if trailing else "")
    if not accepted(path):
        return
    assert path.isascii() and path.isprintable()
    assert unquote(path) == path  # no escape a reader could decode into something else
    assert "\\" not in path and ";" not in path
    normalised = posixpath.normpath(path) + ("/" if path.endswith("/") and path != "/" else "")
    assert normalised == path or path == "/"  # no dot or empty segment a reader could fold
    base = "https://api.example.com"
    assert URL(base + path, encoded=True).path == path  # what the gateway sends
    assert URL(base + path).path == path  # what a normalising client would send
    assert urlsplit(base + path).path == path  # no "?" or "#" inside


@settings(max_examples=300, deadline=None)
@given(SEGMENTS)
def test_a_path_judged_free_is_free_in_every_reading(segments):
    path = "/" + "/".join(segments)
    if not accepted(path) or FREE_POST.fullmatch(path) is None:
        return
    # free only by its exact segments: the same text decoded or normalised is still the same free endpoint
    assert FREE_POST.fullmatch(posixpath.normpath(unquote(path))) is not None


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_an_accepted_query_goes_upstream_unchanged(query):
    try:
        checked_query(query)
    except ApiError as e:
        assert e.status_code == 400
        return
    url = URL("https://api.example.com/v1/models?" + query, encoded=True) if query else None
    if url is not None:
        assert url.raw_query_string == query and url.fragment == ""


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/models/gemini-2.5-flash:streamGenerateContent",
                                  "/v1/models/ft:gpt-4o-mini:org::abc", "/v1/files/file-abc/content", "/"])
def test_real_provider_paths_are_accepted(path):
    assert checked_path(path) == path
