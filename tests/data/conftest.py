"""Shared fixtures for the data pipeline tests: a local tokenizer and a file writer."""

import json
from pathlib import Path

import pytest

from lorafit.testing import build_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


@pytest.fixture
def shared_data():
    """The public data sets beside the checkout; tests using it skip when the folder is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not beside the checkout")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tok():
    return build_tokenizer()


@pytest.fixture
def write(tmp_path):
    """write(name, content) -> path; content is text, or a list of JSON-able rows written as JSONL."""

    def _write(name, content):
        path = tmp_path / name
        if not isinstance(content, str):
            content = "".join(json.dumps(row) + "\n" for row in content)
        path.write_text(content, encoding="utf-8")
        return str(path)

    return _write
