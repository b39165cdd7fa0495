"""A bounded load test: 32 concurrent clients x 10 requests over three adapters, zero errors."""

from lorafit.serve.loadtest import run_load
from serve_setup import ADAPTERS, API_KEY


def test_32_clients_x_10_requests_over_three_adapters(server, capsys):
    report = run_load(server.base_url, ADAPTERS, api_key=API_KEY, clients=32, requests_per_client=10,
                      max_tokens=8)
    with capsys.disabled():
        print(f"\nserve load: {report.summary()}")
    assert report.errors == 0, report.error_messages
    assert report.requests == 320
    assert 0 < report.p50_s <= report.p95_s <= report.max_s
