"""The package's shape: imports point one way, private names stay home, extensions are one file."""

import ast
import re
import sys
import textwrap
from pathlib import Path
from typing import Optional

import pytest
import torch
from torch import nn

import lorafit
from lorafit import LoraConfig, registry

SRC = Path(lorafit.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path):
    """(imported module, names) of every import statement in the file, at any depth (functions
    included), except those under ``if TYPE_CHECKING:``, which never run."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, []) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                found.append((base, [alias.name for alias in child.names]))
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def _graph():
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        targets = set()
        for module, names in _imports(path):
            if not module.startswith("lorafit"):
                continue
            for imported in names or [None]:
                full = f"{module}.{imported}" if imported and f"{module}.{imported}" in modules else module
                while full not in modules and "." in full:
                    full = full.rpartition(".")[0]
                # importing a.b.c also runs the package a.b
                parts = full.split(".")
                targets.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
        # a module's own packages are already running when it runs
        ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        edges[name] = {t for t in targets if t in modules and t != name and t not in ancestors}
    return edges


def test_no_import_cycles():
    edges = _graph()
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_the_core_imports_nothing_above_it():
    """functional, routing, registry, layers, kinds, variants, inits, surgery: no model, files,
    training, serving or CLI."""
    edges = _graph()
    core = [m for m in edges if m.split(".")[1:2] and m.split(".")[1] in
            ("functional", "routing", "registry", "layers", "kinds", "variants", "inits", "surgery", "config")]
    above = ("lorafit.model", "lorafit.adapter_files", "lorafit.train", "lorafit.serve", "lorafit.cli",
             "lorafit.data", "lorafit.export")
    bad = {m: sorted(t for t in edges[m] if t.startswith(above)) for m in core}
    assert not any(bad.values()), bad


def _layers() -> dict[str, int]:
    """ARCHITECTURE.md's layer table: module or package (``lorafit.kinds``) -> layer number."""
    text = (SRC.parents[1] / "ARCHITECTURE.md").read_text()
    layers = {}
    for number, modules in re.findall(r"^\| (\d+) \| ([^|]+) \|", text, re.M):
        for name in re.findall(r"`([\w/.]+)`", modules):
            layers["lorafit." + name.removesuffix("/").removesuffix(".py")] = int(number)
    return layers


def _layer_of(module: str, layers: dict[str, int]) -> Optional[int]:
    while module not in layers and "." in module:
        module = module.rpartition(".")[0]
    return layers.get(module)


def test_imports_follow_the_layer_table():
    """Every module is in ARCHITECTURE.md's table (testing and demo aside) and imports only from its
    own layer or a lower-numbered one."""
    layers = _layers()
    edges = _graph()
    beside = ("lorafit", "lorafit.__main__", "lorafit.testing", "lorafit.demo")
    unmapped = sorted(m for m in edges if _layer_of(m, layers) is None and not m.startswith(beside))
    assert not unmapped, f"modules missing from ARCHITECTURE.md's layer table: {unmapped}"
    upward = sorted(f"{m} (layer {_layer_of(m, layers)}) imports {t} (layer {_layer_of(t, layers)})"
                    for m, targets in edges.items() if _layer_of(m, layers) is not None
                    for t in targets if (_layer_of(t, layers) or 0) > _layer_of(m, layers))
    assert not upward, upward


def test_no_private_name_is_imported_across_modules():
    offences = []
    for path in SRC.rglob("*.py"):
        for module, names in _imports(path):
            if module.startswith("lorafit"):
                offences += [f"{_module_name(path)}: from {module} import {n}" for n in names
                             if n.startswith("_") and n != "__version__"]
    assert not offences, offences


TOY_VARIANT = '''
    """A test variant: a learned gain per rank component, ΔW = s · B diag(g) A."""
    import torch
    from torch import nn

    from lorafit.layers import LoraWeights
    from lorafit.registry import Variant


    class GainWeights(LoraWeights):
        fusable = False
        gatherable = False

        def __init__(self, A, B, scaling, dropout_p=0.0):
            super().__init__(A, B, scaling, dropout_p)
            self.gain = nn.Parameter(torch.full((A.shape[0],), 2.0, dtype=A.dtype, device=A.device))

        def apply(self, layer, x, result, result_is_base):
            h = torch.nn.functional.linear(self.dropped(x), self.A) * self.gain
            return result + (self.scaling * torch.nn.functional.linear(h, self.B)).to(result.dtype)

        def delta(self):
            return self.scaling * (self.B.float() * self.gain.float()) @ self.A.float()


    VARIANT = Variant("kasa_config", GainWeights, tensor_keys={"gain": "lora_gain"})
'''


@pytest.fixture
def toy_variant(tmp_path, monkeypatch):
    """A file dropped into the variants package (here: a second directory of it)."""
    import lorafit.variants

    (tmp_path / "toy_gain.py").write_text(textwrap.dedent(TOY_VARIANT))
    monkeypatch.setattr(lorafit.variants, "__path__", [*lorafit.variants.__path__, str(tmp_path)])
    registry.extensions.cache_clear()
    yield
    registry.extensions.cache_clear()
    sys.modules.pop("lorafit.variants.toy_gain", None)


def test_a_variant_is_one_file(toy_variant, tmp_path):
    """Selected by its config field, built by wrap, saved under its tensor name, loaded back,
    merged: all from the one record, with no edit elsewhere."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    config = LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False, kasa_config={"on": True})
    model = lorafit.wrap(base, config)
    layer = model.model[0]
    assert type(layer.lora["default"]).__name__ == "GainWeights"
    x = torch.randn(3, 8)
    y = model(x)
    w = layer.lora["default"]
    hidden = torch.relu(x @ base[0].base_layer.weight.T + base[0].base_layer.bias
                        + w.scaling * (x @ w.A.T * 2.0) @ w.B.T)
    w2 = model.model[2].lora["default"]
    expected = hidden @ model.model[2].base_layer.weight.T + model.model[2].base_layer.bias + \
        w2.scaling * (hidden @ w2.A.T * 2.0) @ w2.B.T
    torch.testing.assert_close(y, expected)
    out = model.save_adapter(tmp_path / "ad")[0]
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert "base_model.model.0.lora_gain" in set(f.keys())
    from lorafit.adapter_files.report import describe_adapter, format_report

    report = describe_adapter(out)
    assert report["variant"] == "kasa_config" and "   variant kasa_config   " in format_report(report)
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    fresh.load_state_dict({k.replace("base_layer.", ""): v for k, v in model.model.state_dict().items()
                           if ".lora." not in k})
    loaded = lorafit.load(fresh, out)
    torch.testing.assert_close(loaded(x), y)
    merged = loaded.merge_and_unload()
    torch.testing.assert_close(merged(x), y, rtol=1e-5, atol=1e-5)


def test_a_variant_is_refused_by_name_where_it_cannot_apply(toy_variant, tmp_path):
    """Features that only know plain LoRA refuse the dropped-in variant by its field rather than
    building or writing plain factors: LoRA on bare parameters, and llama.cpp's adapter GGUF."""
    base = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(lorafit.ConfigError,
                       match=r"kasa_config = \{'on': True\} cannot be used with target_parameters"):
        lorafit.wrap(base, LoraConfig(r=2, target_parameters=["0.weight"], kasa_config={"on": True}))
    assert not any(isinstance(m, lorafit.layers.LoraLayer) for m in base.modules())
    pytest.importorskip("gguf")
    from lorafit.errors import ExportError
    from lorafit.export import adapter_to_gguf
    from lorafit.testing import tiny_llama

    model = lorafit.wrap(tiny_llama(vocab_size=64, hidden=16, layers=1, heads=2),
                         LoraConfig(r=2, target_modules=["q_proj"], kasa_config={"on": True}))
    with pytest.raises(ExportError, match="kasa_config.*Export the merged model"):
        adapter_to_gguf(model, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_without_the_variant_file_its_field_is_refused():
    with pytest.raises(lorafit.ConfigError, match=r"kasa_config = \{'on': True\} \(KaSA"):
        LoraConfig(kasa_config={"on": True})
