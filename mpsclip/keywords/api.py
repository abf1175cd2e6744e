"""Noun extraction through an OpenAI-compatible chat-completions endpoint (standard library HTTP only).

Replies that parse are cached on disk, one JSON file per sha256(model + prompt + caption), so re-runs and
crashed runs never pay twice for the same caption.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from mpsclip.errors import MPSCLIPError
from mpsclip.io import atomic_write
from mpsclip.keywords.llm import DEFAULT_PROMPT, NounListError, build_prompt, parse_noun_list
from mpsclip.keywords.records import Outcome, json_text

RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


class RequestError(Exception):
    """A request that failed for good (after retries, or with a status that retrying cannot fix)."""


@dataclass(frozen=True)
class ApiConfig:
    url: str
    model: str
    api_key: str | None
    cache_dir: Path
    prompt: str = DEFAULT_PROMPT
    concurrency: int = 8
    retries: int = 4
    backoff_s: float = 1.0
    timeout_s: float = 60.0

    @classmethod
    def from_options(
        cls,
        url: str | None,
        model: str | None,
        api_key: str | None,
        cache_dir: Path,
        prompt: str = DEFAULT_PROMPT,
        concurrency: int = 8,
    ) -> ApiConfig:
        """Fill missing options from MPSCLIP_API_URL, MPSCLIP_API_MODEL and OPENAI_API_KEY."""
        url = url or os.environ.get("MPSCLIP_API_URL")
        model = model or os.environ.get("MPSCLIP_API_MODEL")
        if not url:
            raise MPSCLIPError("the api backend needs an endpoint: pass --api-url or set MPSCLIP_API_URL")
        if not model:
            raise MPSCLIPError("the api backend needs a model name: pass --api-model or set MPSCLIP_API_MODEL")
        return cls(
            url=chat_completions_url(url),
            model=model,
            api_key=api_key or os.environ.get("OPENAI_API_KEY"),
            cache_dir=Path(cache_dir),
            prompt=prompt,
            concurrency=concurrency,
        )


def chat_completions_url(url: str) -> str:
    """Accept a base URL (``http://host/v1``) or the full ``.../chat/completions`` URL."""
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else f"{url}/chat/completions"


def cache_key(model: str, prompt: str) -> str:
    return hashlib.sha256(f"{model}\n{prompt}".encode()).hexdigest()


class ApiBackend:
    """Extract nouns with concurrent, retried, cached chat-completion requests."""

    name = "api"

    def __init__(self, config: ApiConfig, progress: bool = True, sleep: Callable[[float], None] = time.sleep) -> None:
        self.config = config
        self.progress = progress
        self.sleep = sleep
        self.requests_made = 0
        self.cache_hits = 0
        self._lock = threading.Lock()

    def _cache_file(self, prompt: str) -> Path:
        return self.config.cache_dir / f"{cache_key(self.config.model, prompt)}.json"

    def _post(self, prompt: str) -> str:
        body = json.dumps(
            {"model": self.config.model, "messages": [{"role": "user", "content": prompt}], "temperature": 0}
        ).encode()
        headers = {"Content-Type": "application/json"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        request = urllib.request.Request(self.config.url, data=body, headers=headers, method="POST")
        with self._lock:
            self.requests_made += 1
        with urllib.request.urlopen(request, timeout=self.config.timeout_s) as response:
            payload = json.loads(response.read().decode("utf-8"))
        try:
            return str(payload["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError) as err:
            raise RequestError(f"response has no choices[0].message.content: {str(payload)[:120]}") from err

    def _post_with_retries(self, prompt: str) -> str:
        for attempt in range(self.config.retries + 1):
            try:
                return self._post(prompt)
            except urllib.error.HTTPError as err:
                if err.code not in RETRY_STATUS or attempt == self.config.retries:
                    raise RequestError(f"HTTP {err.code} from {self.config.url}: {err.reason}") from err
            except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as err:
                if attempt == self.config.retries:
                    raise RequestError(f"request to {self.config.url} failed: {err}") from err
            self.sleep(self.config.backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    def extract_one(self, caption: str) -> Outcome:
        prompt = build_prompt(self.config.prompt, caption)
        cached = self._cache_file(prompt)
        if cached.is_file():
            try:
                nouns = json.loads(cached.read_text(encoding="utf-8"))["nouns"]
                with self._lock:
                    self.cache_hits += 1
                return Outcome(nouns=nouns)
            except (OSError, ValueError, KeyError, TypeError):
                pass  # a damaged cache entry is simply fetched again
        error = ""
        for _ in range(2):  # one re-prompt when the reply is not a JSON list
            try:
                reply = self._post_with_retries(prompt)
                nouns = parse_noun_list(reply)
            except RequestError as err:
                return Outcome(error=str(err))
            except NounListError as err:
                error = str(err)
                continue
            atomic_write(cached, json_text({"model": self.config.model, "caption": caption, "nouns": nouns}))
            return Outcome(nouns=nouns)
        return Outcome(error=error)

    def extract(self, captions: list[str]) -> list[Outcome]:
        unique = list(dict.fromkeys(captions))
        results: dict[str, Outcome] = {}
        bar = tqdm(total=len(unique), desc="api", unit="caption", disable=not self.progress)
        with ThreadPoolExecutor(max_workers=max(1, self.config.concurrency)) as pool:
            futures = {pool.submit(self.extract_one, caption): caption for caption in unique}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update(1)
        bar.close()
        return [results[caption] for caption in captions]
