"""The core works with torch alone: numpy, an optional dependency of torch, is made absent in a
subprocess before torch is imported (torch then runs without its numpy bridge)."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import importlib.util
    import sys

    # What an environment without numpy looks like to every importer: `import numpy` raises
    # ModuleNotFoundError and importlib.util.find_spec("numpy") is None.
    sys.modules["numpy"] = None
    import torch
    from torch import nn

    import lorafit
    from lorafit.adapter_files import read_adapter_dir

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(8, 16)
            self.down = nn.Linear(16, 4)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    def base():
        torch.manual_seed(1)
        return Net()

    x, y = torch.randn(32, 8), torch.randn(32, 4)
    model = lorafit.wrap(base(), lorafit.LoraConfig(r=2, target_modules=["up", "down"]))
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
    out = sys.argv[1]
    model.save_adapter(out)
    files = read_adapter_dir(out)
    assert "lorafit.tensors_sha256" in files.metadata and files.fingerprint["sample_sha256"]
    loaded = lorafit.load(base(), out, strict=True)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(loaded(x), expected)
        merged = loaded.merge_and_unload()
        assert (merged(x) - expected).abs().max() < 1e-5
    assert sys.modules["numpy"] is None and importlib.util.find_spec("numpy") is None
    try:
        torch.zeros(1).numpy()
    except RuntimeError as exc:  # torch itself runs without numpy
        assert "Numpy is not available" in str(exc)
    else:
        raise AssertionError("torch found numpy")
    print("core without numpy: ok")
''')


def test_core_saves_loads_and_merges_without_numpy(tmp_path):
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "adapter")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "core without numpy: ok" in result.stdout


def test_checksum_is_the_sha256_of_the_raw_bytes():
    """The numpy-free bytes are the tensor's memory, so checksums of earlier files still match."""
    import hashlib

    import torch

    from lorafit.adapter_files.reading import tensors_checksum

    tensor = torch.arange(6, dtype=torch.float32).reshape(2, 3).t()  # not contiguous
    digest = hashlib.sha256(b"w|torch.float32|[3, 2]|" + tensor.contiguous().numpy().tobytes()).hexdigest()
    assert tensors_checksum({"w": tensor}) == digest
