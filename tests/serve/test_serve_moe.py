"""The serving engine runs a target_parameters (MoE experts) adapter, a trainable-tokens adapter
and the base in one batch; each answer equals Hugging Face's greedy generate with that adapter alone."""

import threading

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lorafit
from lorafit import LoraModel
from lorafit.serve.adapters import AdapterPool
from lorafit.serve.engine import Delta, Engine, Finished, Request
from lorafit.serve.sampling import SamplingParams
from lorafit.testing import tiny_moe_dir

CONFIGS = {
    "experts": dict(r=2, target_modules=["q_proj"], target_parameters=["experts.gate_up_proj", "experts.down_proj"],
                    init_lora_weights=False),
    "tokens": dict(r=2, target_modules=["v_proj"], trainable_token_indices=[20, 21, 22, 23], init_lora_weights=False),
}
PROMPT = "The quick brown fox"


class Answer:
    def __init__(self):
        self.text, self.end, self.done = "", None, threading.Event()

    def __call__(self, event):
        if isinstance(event, Delta):
            self.text += event.text
        else:
            self.end = event
            self.done.set()


def test_moe_and_token_adapters_serve_in_one_batch(tmp_path):
    base_dir = tiny_moe_dir(tmp_path / "base")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    paths = {}
    for name, kwargs in CONFIGS.items():
        torch.manual_seed(1)
        model = lorafit.wrap(AutoModelForCausalLM.from_pretrained(base_dir), lorafit.LoraConfig(**kwargs))
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if param_name.endswith(".values"):
                    param.normal_()
        paths[name] = model.save_adapter(tmp_path / name)[0]
    model = LoraModel(AutoModelForCausalLM.from_pretrained(base_dir).eval())
    engine = Engine(model, tokenizer, AdapterPool(model, paths, capacity=2), max_batch=4)
    engine.start()
    prompt = tokenizer(PROMPT)["input_ids"]
    try:
        answers = {name: Answer() for name in [None, *CONFIGS]}
        for name, answer in answers.items():
            engine.submit(Request(prompt, SamplingParams(max_tokens=8, temperature=0.0), answer, name))
        for answer in answers.values():
            assert answer.done.wait(60)
    finally:
        engine.stop()
    for name, answer in answers.items():
        assert isinstance(answer.end, Finished), (name, answer.end)
        reference = AutoModelForCausalLM.from_pretrained(base_dir).eval()
        if name is not None:
            reference = lorafit.load(reference, paths[name])
        ids = torch.tensor([prompt])
        out = reference.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
        assert answer.text == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), name
    assert len({a.text for a in answers.values()}) == 3  # the adapters change the answers
