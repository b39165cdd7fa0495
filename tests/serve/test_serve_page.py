"""The comparison page in headless Chromium: type a prompt, pick an adapter, see both answers."""

import json

import pytest

from serve_chromium import Chromium, find_chromium
from serve_setup import API_KEY, BASE

CARDS = """(() => {
  const cards = [...document.querySelectorAll('.answer')];
  const settled = cards.length && cards.every(c => c.dataset.done || c.classList.contains('failed'));
  return settled && cards.map(c => ({model: c.dataset.model, text: c.querySelector('.text').textContent,
                                     failed: c.classList.contains('failed')}));
})()"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    binary = find_chromium()
    if binary is None:
        pytest.skip("chromium is not installed (scripts/ensure-chromium.sh installs it)")
    with Chromium(binary, tmp_path_factory.mktemp("chromium-profile")) as running:
        yield running


def test_page_shows_the_base_and_the_chosen_adapter_side_by_side(server, client, browser):
    page = browser.open(f"{server.url}/")
    page.wait_for("document.readyState === 'complete' && !!document.getElementById('api-key')")
    page.type("#api-key", API_KEY)  # the key unlocks /v1/: the page then lists the models
    page.evaluate("document.getElementById('api-key').blur()")  # fires the change event
    adapters = page.wait_for("(() => { const a = [...document.querySelectorAll('input[name=adapter]')]"
                             ".map(e => e.value); return a.length && a; })()")
    assert adapters == ["alpha", "beta", "gamma"]
    page.click("input[value=alpha]")  # checked by default: uncheck it
    page.click("input[value=beta]")
    page.type("#prompt", "Write a short poem about the sea.")
    page.click("#run")
    cards = page.wait_for(CARDS)

    assert [c["model"] for c in cards] == [BASE, "beta"]
    assert not any(c["failed"] for c in cards), json.dumps(cards)
    messages = [{"role": "user", "content": "Write a short poem about the sea."}]
    for card in cards:  # the page's defaults: chat, 64 tokens, temperature 0
        api = client.chat.completions.create(model=card["model"], messages=messages, max_tokens=64, temperature=0)
        assert card["text"] == api.choices[0].message.content
    assert cards[0]["text"] != cards[1]["text"]
