"""The adapter pool: safe names, discovery, lazy loading, LRU eviction that spares adapters in use."""

import pytest

from lorafit.errors import AdapterError, AdapterFileError
from lorafit.serve.adapters import (AdapterExists, AdapterPool, SlotsBusy, UnknownAdapter,
                                    check_adapter_name, discover)


class RecordingModel:
    """Stands in for a LoraModel: records loads and unloads; paths named 'broken*' fail to load."""

    def __init__(self):
        self.adapter_names: list[str] = []
        self.calls: list[str] = []

    def load_adapter(self, path, adapter_name, strict=False):
        self.adapter_names.append(adapter_name)
        if "broken" in path:
            raise ValueError("bad tensor")
        self.calls.append(f"load {adapter_name}")

    def delete_adapter(self, adapter_name):
        self.adapter_names.remove(adapter_name)
        self.calls.append(f"unload {adapter_name}")


@pytest.fixture
def folders(tmp_path):
    for name in ("a", "b", "c", "broken"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text("{}")
    (tmp_path / "no-config").mkdir()
    (tmp_path / "bad.name").mkdir()
    (tmp_path / "bad.name" / "adapter_config.json").write_text("{}")
    return tmp_path


@pytest.mark.parametrize("name", ["../x", "a/b", "a\\b", "..", ".", "", "-a", "a.b", "x" * 65, None, 3])
def test_unsafe_names_are_refused(name):
    with pytest.raises(AdapterError):
        check_adapter_name(name)


def test_reserved_names_are_refused():
    with pytest.raises(AdapterError, match="reserved"):
        check_adapter_name("base", reserved=("base",))
    assert check_adapter_name("sql-v2_1") == "sql-v2_1"


def test_discover_keeps_folders_with_a_config_and_a_safe_name(folders):
    assert sorted(discover(folders)) == ["a", "b", "broken", "c"]
    assert sorted(discover(folders, reserved=("a",))) == ["b", "broken", "c"]
    with pytest.raises(AdapterFileError):
        discover(folders / "missing")


def test_lru_evicts_the_least_recently_used_idle_adapter(folders):
    model = RecordingModel()
    pool = AdapterPool(model, discover(folders), capacity=2)
    for name in ("a", "b", "a", "c"):  # c evicts b: a was used more recently
        pool.acquire(name)
        pool.release(name)
    assert model.calls == ["load a", "load b", "unload b", "load c"]
    assert pool.loaded == ["a", "c"]


def test_adapters_in_use_are_never_evicted(folders):
    pool = AdapterPool(RecordingModel(), discover(folders), capacity=2)
    pool.acquire("a")
    pool.acquire("b")
    with pytest.raises(SlotsBusy):
        pool.acquire("c")
    pool.release("a")
    pool.acquire("c")
    assert pool.loaded == ["b", "c"]


def test_remove_waits_for_the_last_user(folders):
    model = RecordingModel()
    pool = AdapterPool(model, discover(folders), capacity=2)
    pool.acquire("a")
    pool.remove("a")
    assert "a" not in pool.names() and model.adapter_names == ["a"]
    with pytest.raises(AdapterExists):
        pool.add("a", folders / "a")  # still unloading
    pool.release("a")
    assert model.adapter_names == []
    with pytest.raises(UnknownAdapter):
        pool.remove("a")


def test_add_loads_at_once_and_a_broken_adapter_leaves_no_trace(folders):
    model = RecordingModel()
    pool = AdapterPool(model, {}, capacity=2)
    pool.add("x", folders / "a")
    assert pool.names() == ["x"] and pool.loaded == ["x"]
    with pytest.raises(AdapterFileError, match="bad tensor"):
        pool.add("y", folders / "broken")
    with pytest.raises(AdapterFileError, match="not an adapter directory"):
        pool.add("z", folders / "no-config")
    assert pool.names() == ["x"] and model.adapter_names == ["x"]
    with pytest.raises(UnknownAdapter):
        pool.acquire("y")
