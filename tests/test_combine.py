"""Adapter combination: `cat` is the exact weighted delta, `svd` reports a bounded error."""

import math

import pytest
import torch

import lorafit
from lorafit import AdapterError, LoraConfig
from lorafit.testing import tiny_llama

from test_model import IDS


def _model():
    model = lorafit.wrap(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=3, use_rslora=True, init_lora_weights=False,
                                      target_modules=["q_proj", "o_proj"], rank_pattern={r"layers\.1\.self_attn\.q_proj": 6},
                                      alpha_pattern={"o_proj": 5}))
    return model


def _delta(layer, name):
    return layer.lora[name].delta() if name in layer.lora else 0


def test_cat_is_exact_weighted_sum_of_deltas():
    model = _model()
    report = model.combine({"default": 0.7, "b": 0.3}, name="ab", method="cat")
    for path, layer in model.lora_layers():
        expected = 0.7 * _delta(layer, "default") + 0.3 * _delta(layer, "b")
        assert (layer.lora["ab"].delta() - expected).abs().max() <= 1e-5, path
    assert report.ranks["model.layers.1.self_attn.q_proj"] == 4 + 6
    assert report.ranks["model.layers.0.self_attn.o_proj"] == 2


def test_cat_adapter_outputs_match_and_config_scaling_is_one():
    model = _model()
    model.combine({"default": 1.0, "b": 1.0}, name="ab")
    cfg = model.peft_config["ab"]
    for path, layer in model.lora_layers():
        assert cfg.scaling_for(path) == 1.0 and cfg.rank_for(path) == layer.lora["ab"].rank
    model.set_adapter(["default", "b"])
    both = model(input_ids=IDS).logits
    model.set_adapter("ab")
    torch.testing.assert_close(model(input_ids=IDS).logits, both, rtol=0, atol=1e-5)


def test_svd_error_reported_and_bounded_by_discarded_singular_values():
    model = _model()
    report = model.combine({"default": 0.5, "b": -1.5}, name="s", method="svd", rank=3)
    assert all(r == 3 for r in report.ranks.values())
    num = den = 0.0
    for path, layer in model.lora_layers():
        exact = 0.5 * _delta(layer, "default") - 1.5 * _delta(layer, "b")
        if not torch.is_tensor(exact):
            continue
        exact = exact.detach()
        sv = torch.linalg.svdvals(exact.double())
        err = (layer.lora["s"].delta().detach().double() - exact.double()).norm()
        assert err <= sv[3:].pow(2).sum().sqrt() + 1e-5 * sv.norm(), path  # Eckart-Young: error = discarded energy
        num, den = num + float(err) ** 2, den + float(exact.double().norm()) ** 2
    assert 0 < report.relative_error < 1
    assert report.relative_error == pytest.approx(math.sqrt(num / den), rel=1e-4)


def test_svd_at_full_rank_is_exact():
    model = _model()
    report = model.combine({"default": 0.7, "b": 0.3}, name="s", method="svd", rank=10)
    assert report.relative_error < 1e-6


def test_linear_documents_cross_terms():
    model = lorafit.wrap(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.combine({"default": 0.5, "b": 0.5}, name="lin", method="linear")
    layer = dict(model.lora_layers())["model.layers.0.self_attn.q_proj"]
    assert layer.lora["lin"].rank == 2
    exact = 0.5 * layer.lora["default"].delta() + 0.5 * layer.lora["b"].delta()
    assert (layer.lora["lin"].delta() - exact).abs().max() > 1e-4  # not the weighted delta


@pytest.mark.parametrize("kwargs,message", [
    (dict(weights={"default": 1.0}, name="x", method="mean"), "method 'mean' is unknown"),
    (dict(weights={}, name="x"), "no adapters"),
    (dict(weights={"nope": 1.0}, name="x"), "unknown adapter 'nope'"),
    (dict(weights={"default": 1.0}, name="default"), "already exists"),
    (dict(weights={"default": 1.0}, name="x", method="svd"), "positive integer rank"),
    (dict(weights={"default": 1.0, "b": 1.0}, name="x", method="linear"), "one rank"),
])
def test_refused_combinations(kwargs, message):
    with pytest.raises(AdapterError, match=message):
        _model().combine(**kwargs)


def test_modules_to_save_refused():
    from test_model import tiny_bert_cls

    model = lorafit.wrap(tiny_bert_cls(), LoraConfig(target_modules=["query"], modules_to_save=["classifier"]))
    with pytest.raises(AdapterError, match="modules_to_save"):
        model.combine({"default": 1.0}, name="x")


# -- PEFT's add_weighted_adapter methods -------------------------------------------------------

PEFT_METHODS = ["linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd"]


@pytest.fixture(scope="module")
def peft_pair(tmp_path_factory):
    """The same two adapters (rank 4, different alphas, targets overlapping on q_proj) in PEFT and
    in lorafit, on the same tiny Llama."""
    import peft

    directory = tmp_path_factory.mktemp("pair")
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                               target_modules=["q_proj", "v_proj"]))
    theirs.add_adapter("b", peft.LoraConfig(r=4, lora_alpha=3, init_lora_weights=False,
                                            target_modules=["q_proj", "o_proj"]))
    theirs.save_pretrained(directory)
    ours = lorafit.load(tiny_llama(), directory)
    ours.load_adapter(directory / "b", adapter_name="b")
    return theirs.eval(), ours.eval()


def _logits(model, adapter):
    model.set_adapter(adapter)
    with torch.no_grad():
        return model(input_ids=IDS).logits


class BernoulliLog:
    """Records the masks torch.bernoulli draws (PEFT's DARE) and replays them, in order and
    checking each shape, to the next caller (lorafit's DARE): the same masks must give the same
    adapter. PEFT's draws also follow the random initialisation of the adapter it creates, so a
    seed alone cannot line the two up."""

    def __init__(self, monkeypatch):
        self.masks, self.replay, self.monkeypatch = [], None, monkeypatch
        self.draw = torch.bernoulli
        monkeypatch.setattr(torch, "bernoulli", self)

    def __call__(self, probabilities, *args, **kwargs):
        if self.replay is None:
            self.masks.append(self.draw(probabilities, *args, **kwargs))
            return self.masks[-1]
        mask = next(self.replay)
        assert mask.shape == probabilities.shape and torch.all(probabilities == probabilities.flatten()[0])
        return mask

    def start_replay(self):
        self.replay = iter(self.masks)

    def replayed_all(self) -> bool:
        return next(self.replay, None) is None


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_each_method_matches_peft_add_weighted_adapter(peft_pair, method, monkeypatch):
    theirs, ours = peft_pair
    options = dict(density=0.5, majority_sign_method="frequency" if method.startswith("ties") else "total")
    name = f"m_{method}"
    masks = BernoulliLog(monkeypatch)
    theirs.add_weighted_adapter(["default", "b"], [0.7, -1.3], name, combination_type=method, svd_rank=3,
                                **options)
    masks.start_replay()
    report = ours.combine({"default": 0.7, "b": -1.3}, name=name, method=method,
                          rank=3 if method.endswith("svd") else None, **options)
    assert masks.replayed_all() and (len(masks.masks) > 0) == method.startswith("dare")
    expected = _logits(theirs, name)
    assert (_logits(ours, name) - expected).abs().max() <= 1e-5
    assert (expected - _logits(theirs, "default")).abs().max() > 1e-3  # the combination changes the output
    ranks = {4, 8} if method == "cat" else {3} if method.endswith("svd") else {4}  # cat: q_proj has both
    assert report.method == method and set(report.ranks.values()) == ranks


def test_dare_keeps_the_expected_update():
    """DARE's documented property: E[t ⊙ m / density] = t, so the mean over many draws of a
    dare_linear merge tends to the linear merge (standard error ~ 1/sqrt(draws))."""
    from lorafit.merge_methods import dare_linear, linear

    tensors = [torch.randn(6, 5), torch.randn(6, 5)]
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([dare_linear(tensors, [0.6, -0.4], 0.5, "total", generator) for _ in range(4000)])
    expected = linear(tensors, [0.6, -0.4], 1.0, "total", None)
    assert (draws.mean(0) - expected).abs().max() <= 5 * draws.std(0).max() / 4000 ** 0.5
    assert (draws[0] - expected).abs().max() > 1e-2  # one draw is not the mean


def test_merge_rules_by_hand():
    from lorafit.merge_methods import magnitude_prune, ties

    t1 = torch.tensor([3.0, -1.0, 0.5, -4.0])
    t2 = torch.tensor([-2.0, 2.0, 0.25, 1.0])
    # density 0.5 keeps 2 entries each: t1 -> [3, 0, 0, -4], t2 -> [-2, 2, 0, 0]
    torch.testing.assert_close(magnitude_prune([t1, t2], [1.0, 0.5], 0.5, "total", None),
                               torch.tensor([3.0 - 1.0, 1.0, 0.0, -4.0]))
    # total: votes [1, 2, 0, -4] -> signs [+, +, +, -]; entry 0 keeps only t1 (3), entry 1 only t2 (2·0.5)
    torch.testing.assert_close(ties([t1, t2], [1.0, 0.5], 0.5, "total", None), torch.tensor([3.0, 1.0, 0.0, -4.0]))
    # one large + against two small -: total elects + (keeps 5), frequency elects - (mean of -1, -2)
    votes = [torch.tensor([5.0]), torch.tensor([-1.0]), torch.tensor([-2.0])]
    assert ties(votes, [1.0, 1.0, 1.0], 1.0, "total", None).item() == 5.0
    assert ties(votes, [1.0, 1.0, 1.0], 1.0, "frequency", None).item() == -1.5


def test_pruning_methods_differ_from_linear(peft_pair):
    _, ours = peft_pair
    weights = {"default": 0.7, "b": -1.3}
    for method in ("linear", "ties", "dare_linear", "magnitude_prune"):
        ours.combine(weights, name=f"d_{method}", method=method, density=0.3, seed=1)
    base = _logits(ours, "d_linear")
    for method in ("ties", "dare_linear", "magnitude_prune"):
        assert (_logits(ours, f"d_{method}") - base).abs().max() > 1e-3, method


def test_dare_seed_none_draws_from_the_global_generator(peft_pair):
    _, ours = peft_pair
    ours.combine({"default": 1.0, "b": 1.0}, name="seeded", method="dare_ties", density=0.4, seed=11)
    torch.manual_seed(11)
    ours.combine({"default": 1.0, "b": 1.0}, name="global", method="dare_ties", density=0.4)
    torch.testing.assert_close(_logits(ours, "global"), _logits(ours, "seeded"), rtol=0, atol=0)


def test_combine_report_metadata_names_the_settings_the_method_reads(peft_pair):
    _, ours = peft_pair
    report = ours.combine({"default": 0.5, "b": 0.5}, name="meta", method="dare_ties_svd", rank=2, density=0.5,
                          seed=3)
    meta = report.as_metadata()["combined"]
    assert meta == {"method": "dare_ties_svd", "weights": {"default": 0.5, "b": 0.5}, "rank": 2, "density": 0.5,
                    "majority_sign_method": "total", "seed": 3, "ranks": [2, 2],
                    "relative_error": report.relative_error}
    assert 0 < report.relative_error < 1
    assert ours.combine({"default": 1.0}, name="meta_cat").as_metadata() == {
        "combined": {"method": "cat", "weights": {"default": 1.0}, "ranks": [4, 4]}}


@pytest.mark.parametrize("kwargs,message", [
    (dict(method="ties"), "needs density"),
    (dict(method="dare_linear", density=0.0), "needs density"),
    (dict(method="magnitude_prune", density=1.5), "needs density"),
    (dict(method="ties", density=0.5, majority_sign_method="mean"), "majority_sign_method"),
    (dict(method="ties_svd", density=0.5), "positive integer rank"),
])
def test_refused_merge_options(kwargs, message):
    with pytest.raises(AdapterError, match=message):
        _model().combine({"default": 1.0, "b": 1.0}, name="x", **kwargs)
