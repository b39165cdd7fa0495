"""EVA against PEFT 0.21.2 (same model and batch): PEFT's components come from a randomised,
incremental PCA, so the test compares subspaces (principal angles) and the rank redistribution,
which must be equal, also where layers share their input; and by hand: PCA of the masked
inputs, rank-0 layers dropped."""

import copy

import peft
import pytest
import torch
from torch import nn

import lorafit
from lorafit import ConfigError, LoraConfig
from lorafit.inits import prepare

from init_data import token_batches

# One target per distinct input.
EVA_TARGETS = ["q_proj", "o_proj", "up_proj", "down_proj"]
# All linear layers: q/k/v share their input, as gate/up do, so each group offers equal ratios.
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHARED_INPUTS = [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")]


def masked_batch(seed=1):
    """One batch with padding and prompt tokens (labels -100) that EVA must leave out."""
    batch = token_batches(count=1, rows=4, length=16, seed=seed)[0]
    batch["labels"][:, :3] = -100
    batch["attention_mask"][0, -2:] = 0
    return batch


def group_of(path, paths):
    """The layers among `paths` that share `path`'s input (its siblings in SHARED_INPUTS), `path` included."""
    parent, name = path.rsplit(".", 1)
    names = next((group for group in SHARED_INPUTS if name in group), (name,))
    return [f"{parent}.{n}" for n in names if f"{parent}.{n}" in paths]


def cosines(ours, theirs):
    """Cosines of the principal angles between the row spaces of two [k, in] matrices."""
    q_ours, q_theirs = torch.linalg.qr(ours.T).Q, torch.linalg.qr(theirs.T).Q
    return torch.linalg.svdvals(q_ours.T @ q_theirs)


@pytest.mark.parametrize("targets, seed", [(EVA_TARGETS, 1), (ALL_LINEAR, 5)], ids=["one_per_input", "all_linear"])
@pytest.mark.parametrize("whiten", [False, True])
def test_eva_matches_peft(base, targets, seed, whiten):
    """PEFT sees the one batch twice before its estimate settles (which doubles its whitening
    singular values, hence the factor 2^¼ between the row norms); lorafit sees it once. With
    all linear layers and this batch the budget's cut falls among the equal ratios of a group of
    layers sharing their input, and PEFT's unstable sort decides which members keep one. PEFT
    also whitens a group's shared components in place once per member whose rank exceeds the
    row (m members), so its row i is (2^¼·√σ_i)^(m−1) smaller than once-whitened (√σ_i = 1/|A_i|)."""
    batches = [masked_batch(seed)]
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights="eva",
        eva_config=peft.EvaConfig(whiten=whiten)))
    peft.initialize_lora_eva_weights(theirs, batches, show_progress_bar=False)
    config = prepare(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="eva",
                                      eva_config={"whiten": whiten}), batches)
    peft_config = theirs.peft_config["default"]
    assert config.rank_pattern == peft_config.rank_pattern and len(set(config.rank_pattern.values())) > 1
    assert config.alpha_pattern == peft_config.alpha_pattern
    ours = lorafit.wrap(base, config)
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
    layers = dict(ours.lora_layers())
    assert sorted(layers) == sorted(peft_layers)
    ranks = {path: layer.lora["default"].A.shape[0] for path, layer in layers.items()}
    if targets == ALL_LINEAR:  # some group's members got different ranks: the order of equal ratios decided them
        assert any(len({ranks[member] for member in group_of(path, ranks)}) > 1 for path in ranks)
    for path, layer in layers.items():
        w, p = layer.lora["default"], peft_layers[path]
        A, P = w.A.detach(), p.lora_A["default"].weight.detach()
        assert A.shape == P.shape and w.scaling == p.scaling["default"]
        assert float(cosines(A, P).min()) > 0.9999, path
        for k in range(1, A.shape[0] + 1):  # the same nested subspaces: component by component
            assert float(cosines(A[:k], P[:k]).min()) > 0.999, (path, k)
        ratio = A.norm(dim=1) / P.norm(dim=1)
        expected = torch.ones_like(ratio)
        if whiten:
            m = torch.tensor([sum(ranks[member] > i for member in group_of(path, ranks)) for i in range(len(ratio))])
            expected = 2 ** 0.25 * (2 ** 0.25 / A.norm(dim=1)) ** (m - 1)
        torch.testing.assert_close(ratio, expected, rtol=1e-4, atol=0)
        assert not w.B.any()


class ThreeBranches(nn.Module):
    """``a(x) + b(x P) + c(x P)``: a sees isotropic inputs, b and c isotropic inputs of rank 3."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 4), nn.Linear(8, 4), nn.Linear(8, 4)
        Q = torch.linalg.qr(torch.randn(8, 3)).Q
        self.register_buffer("P", Q @ Q.T)  # projection onto 3 dimensions

    def forward(self, x):
        return self.a(x) + self.b(x @ self.P) + self.c(x @ self.P)


def test_eva_by_hand_and_rank_zero():
    """Budget 3·2 = 6; a's ratios are ~1/8 each, b's and c's three ratios ~1/3: b and c take 3
    each (ρ = 2 caps them at 4) and a gets rank 0, so it gets no adapter."""
    torch.manual_seed(0)
    model = ThreeBranches()
    xs = [torch.randn(64, 8) for _ in range(3)]
    config = prepare(model, LoraConfig(r=2, lora_alpha=4, target_modules=["a", "b", "c"],
                                       init_lora_weights="eva"), xs)
    assert config.target_modules == ["b", "c"]
    assert config.rank_pattern == {"b": 3, "c": 3} and config.alpha_pattern == {"b": 6.0, "c": 6.0}
    wrapped = lorafit.wrap(model, config)
    assert [path for path, _ in wrapped.lora_layers()] == ["b", "c"]
    inputs = torch.cat(xs) @ model.P
    _, _, Vh = torch.linalg.svd(inputs - inputs.mean(0), full_matrices=False)
    A = wrapped.model.b.lora["default"].A.detach()
    assert float(cosines(A, Vh[:3]).min()) > 0.99999
    assert wrapped.model.b.lora["default"].scaling == 2.0  # alpha 6 / rank 3 = the configured 4 / 2
    x = torch.randn(5, 8)
    torch.testing.assert_close(wrapped(x), model.a(x) + model.b.base_layer(x @ model.P)
                               + model.c.base_layer(x @ model.P))


def test_eva_settings_and_refusals(base):
    with pytest.raises(ConfigError, match=r"eva_config\.rho = 0\.5"):
        LoraConfig(init_lora_weights="eva", eva_config={"rho": 0.5})
    with pytest.raises(ConfigError, match=r"LoraConfig\.eva_config: unknown key 'rh'"):
        LoraConfig(init_lora_weights="eva", eva_config={"rh": 2})
    with pytest.raises(ConfigError, match="needs data"):
        prepare(base, LoraConfig(target_modules=EVA_TARGETS, init_lora_weights="eva"))
    with pytest.raises(ConfigError, match="only linear layers"):
        prepare(base, LoraConfig(target_modules=["embed_tokens"], init_lora_weights="eva"), [masked_batch()])
