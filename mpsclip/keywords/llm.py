"""Noun extraction with a local causal language model (``transformers``, optional), plus the JSON-list parsing
shared with the API backend."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tqdm import tqdm

from mpsclip.errors import MPSCLIPError
from mpsclip.keywords.records import Outcome

DEFAULT_PROMPT = (
    "Extract all nouns (objects and places) in the following remote sensing image caption. "
    "Return only a JSON list of lower-case strings.\n\nCaption: {caption}"
)
_FENCE = re.compile(r"```[a-zA-Z]*")


class NounListError(ValueError):
    """A model reply that is not a JSON list of strings, even after repair."""


def _strict_list(text: str) -> list[str]:
    value = json.loads(text)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise NounListError(f"expected a JSON list of strings, got {text[:80]!r}")
    return list(dict.fromkeys(item.strip().lower() for item in value if item.strip()))


def parse_noun_list(reply: str) -> list[str]:
    """Parse a reply as a JSON list of strings; on failure, repair once (drop code fences, keep the first
    ``[...]``) and parse again. Returns distinct lower-case strings; raises :class:`NounListError`."""
    try:
        return _strict_list(reply.strip())
    except (json.JSONDecodeError, NounListError):
        pass
    text = _FENCE.sub("", reply)
    start = text.find("[")
    end = text.find("]", start)
    if start < 0 or end < 0:
        raise NounListError(f"no JSON list in reply {reply[:80]!r}")
    try:
        return _strict_list(text[start : end + 1])
    except json.JSONDecodeError as err:
        raise NounListError(f"unparseable list in reply {reply[:80]!r}: {err}") from err


def build_prompt(template: str, caption: str) -> str:
    """Fill ``{caption}`` in the template, or append the caption when the template has no placeholder."""
    if "{caption}" in template:
        return template.replace("{caption}", caption)
    return f"{template.rstrip()}\n\nCaption: {caption}"


def read_prompt(path: Path | None) -> str:
    if path is None:
        return DEFAULT_PROMPT
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError as err:
        raise MPSCLIPError(f"cannot read prompt file {path}: {err}; pass an existing text file") from err
    if not text:
        raise MPSCLIPError(f"prompt file {path} is empty; write the instruction, optionally with {{caption}}")
    return text


class Generator(Protocol):
    def generate(self, prompts: list[str]) -> list[str]:
        """One reply per user message, in order."""
        ...


class TransformersGenerator:
    """Batched greedy generation with a local causal LM and its chat template."""

    def __init__(self, model_path: str, device: str = "cpu", max_new_tokens: int = 96) -> None:
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as err:
            raise MPSCLIPError(
                "the llm backend needs transformers; install it with: pip install 'mpsclip[llm]'"
            ) from err
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
            self.model = AutoModelForCausalLM.from_pretrained(model_path).to(device).eval()
        except (OSError, ValueError) as err:
            raise MPSCLIPError(
                f"cannot load language model {model_path!r}: {err}; pass --llm-model with a local model "
                "folder or a model already in the Hugging Face cache"
            ) from err
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.torch = torch
        self.device = device
        self.max_new_tokens = max_new_tokens

    def _chat(self, prompt: str) -> str:
        messages = [{"role": "user", "content": prompt}]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return prompt

    def generate(self, prompts: list[str]) -> list[str]:
        batch = self.tokenizer([self._chat(p) for p in prompts], return_tensors="pt", padding=True)
        batch = batch.to(self.device)
        with self.torch.inference_mode():
            output = self.model.generate(
                **batch,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


@dataclass
class LlmBackend:
    """Extract nouns by prompting a generator in batches; unparseable replies are re-prompted once."""

    generator: Generator
    prompt: str = DEFAULT_PROMPT
    batch_size: int = 8
    progress: bool = True
    name: str = "llm"

    def _run_batch(self, captions: list[str]) -> list[Outcome]:
        try:
            replies = self.generator.generate([build_prompt(self.prompt, c) for c in captions])
        except Exception as err:  # one bad batch must not end the run
            return [Outcome(error=f"generation failed: {err}") for _ in captions]
        if len(replies) != len(captions):
            return [Outcome(error=f"generator returned {len(replies)} replies for {len(captions)}")] * len(captions)
        return [_parse_outcome(reply) for reply in replies]

    def extract(self, captions: list[str]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        bar = tqdm(total=len(captions), desc="llm", unit="caption", disable=not self.progress)
        for start in range(0, len(captions), self.batch_size):
            batch = captions[start : start + self.batch_size]
            results = self._run_batch(batch)
            retry = [i for i, out in enumerate(results) if out.error]
            if retry:
                for i, out in zip(retry, self._run_batch([batch[i] for i in retry]), strict=True):
                    results[i] = out
            outcomes.extend(results)
            bar.update(len(batch))
        bar.close()
        return outcomes


def _parse_outcome(reply: str) -> Outcome:
    try:
        return Outcome(nouns=parse_noun_list(reply))
    except NounListError as err:
        return Outcome(error=str(err))


def load_llm_backend(model_path: str | None, prompt: str, batch_size: int, device: str) -> LlmBackend:
    if not model_path:
        raise MPSCLIPError("the llm backend needs --llm-model PATH (a local model folder or a cached model id)")
    return LlmBackend(TransformersGenerator(model_path, device=device), prompt=prompt, batch_size=batch_size)
