"""A bounded load test: many concurrent OpenAI clients against a running ``lorafit serve``.

Each client sends its requests one after another, cycling through the given models, so requests
for different adapters are in flight together and share the engine's batches.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field


@dataclass
class LoadReport:
    """Latencies are seconds per request, from sending it to its last byte."""

    clients: int
    requests: int
    errors: int
    wall_s: float
    p50_s: float
    p95_s: float
    max_s: float
    requests_per_s: float
    completion_tokens_per_s: float
    error_messages: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"{self.requests} requests from {self.clients} clients, {self.errors} errors, "
                f"p50 {self.p50_s * 1000:.0f} ms, p95 {self.p95_s * 1000:.0f} ms, "
                f"{self.requests_per_s:.1f} req/s, {self.completion_tokens_per_s:.0f} tokens/s")


def percentile(values: list[float], q: float) -> float:
    """The `q`-th percentile (0-100), interpolating linearly between ranks; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def run_load(base_url: str, models: list[str], api_key: str = "none", clients: int = 32,
             requests_per_client: int = 10, max_tokens: int = 8,
             prompt: str = "Write a short poem about the sea.") -> LoadReport:
    """Send ``clients x requests_per_client`` completions concurrently; measure each one."""
    import openai

    latencies: list[float] = []
    errors: list[str] = []
    tokens = [0]
    lock = threading.Lock()

    def client(number: int) -> None:
        api = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)
        for i in range(requests_per_client):
            model = models[(number + i) % len(models)]
            start = time.perf_counter()
            try:
                answer = api.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                                temperature=0)
            except openai.OpenAIError as exc:
                with lock:
                    errors.append(f"{model}: {exc}")
                continue
            with lock:
                latencies.append(time.perf_counter() - start)
                tokens[0] += answer.usage.completion_tokens

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - started
    return LoadReport(
        clients=clients, requests=clients * requests_per_client, errors=len(errors), wall_s=wall,
        p50_s=percentile(latencies, 50), p95_s=percentile(latencies, 95),
        max_s=max(latencies, default=0.0), requests_per_s=len(latencies) / wall,
        completion_tokens_per_s=tokens[0] / wall, error_messages=errors[:10],
    )
