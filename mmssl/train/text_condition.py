"""Text-conditioned training: the image tower conditioned on a prompt given in the recipe.

With `model.condition.source: text`, every objective that reads images names the prompt its
images are conditioned on::

    model:
      overrides:
        vision: {cond_dim: 32}        # adaLN-Zero in the blocks (or cond_tokens: prefix tokens)
        condition: {source: text, dim: 32}
    objectives:
      clip: {source: digits, condition_prompt: "a photo of a digit"}

Each step, the prompt runs through the model's own text tower (in the same call as the
captions of equal length, so the tower still runs once per step), its pooled features go
through `TextConditioner` to c (1, C), and every image of the objective's source, every view,
is conditioned on that c.  Gradients reach the conditioner and the text tower through c.

- One prompt per source: objectives on the same source share the vision call, so they must
  agree on the prompt.
- The prompt is tokenized with `data.tokenizer`, as the data's captions are (`[bos] + ids +
  [eos]`, cut to the caption length with eos kept).
- CLIP and SigLIP compare `visual.proj(pooled)`, which the SSL projector does not touch, so
  the prompt must reach the backbone (`vision.cond_dim` or `vision.cond_tokens`).
- adaLN-Zero conditioning (`vision.cond_dim`) is neutral at init (zero-initialised), so
  such a model starts equal to the unconditioned one; prefix tokens (`vision.cond_tokens`)
  are not: they join the attention from the first step (`mmssl.models.condition`; the one
  exception to DESIGN's "neutral at init").
- Downstream: `mmssl export` records each source's prompt and its ids in config.json
  ("condition": {"prompts": {source: {"text", "ids"}}}).  A model loaded from it whose
  sources shared one prompt gives that prompt's features for `cond=None` (as a
  descriptor-conditioned one gives the neutral descriptor's): training never ran its tower
  without the prompt.  With several prompts `cond=None` runs the unconditioned path, and
  `model.condition(cond_text=ids, cond_text_mask=mask)` gives a prompt's features.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mmssl.schema import ConfigError

# objectives whose images are conditioned (they read the vision tower)
IMAGE_OBJECTIVES = ("simclr", "augself", "clip", "siglip", "captioning", "hssl")


def source_prompts(objectives: dict[str, Any]) -> dict[str, str]:
    """{source: prompt} of the objectives that set `condition_prompt`."""
    return {o.source: o.condition_prompt for o in objectives.values() if o.condition_prompt}


def check_condition(recipe: Any, cfg: Any) -> None:
    """ConfigError naming the key unless the recipe's prompts fit the model's conditioning."""
    source = cfg.condition.source if cfg.condition is not None else None
    prompts: dict[str, tuple[str, str]] = {}  # source -> (objective key, prompt)
    for key, obj in recipe.objectives.items():
        where = f"objectives.{key}.condition_prompt"
        kind = obj.type or key
        if obj.condition_prompt is not None and source != "text":
            raise ConfigError(
                f"{where}: the model is not conditioned on text; set "
                f"model.overrides.condition.source=text (now {source!r})"
            )
        if source != "text" or kind not in IMAGE_OBJECTIVES:
            continue
        if not obj.condition_prompt:
            raise ConfigError(
                f"{where}: the model conditions its image tower on text "
                "(model.condition.source text); give the prompt the images of this objective "
                "are conditioned on"
            )
        other = prompts.setdefault(obj.source, (key, obj.condition_prompt))
        if other[1] != obj.condition_prompt:
            raise ConfigError(
                f"{where}: source {obj.source!r} is already conditioned on {other[1]!r} by "
                f"objectives.{other[0]}; objectives on one source share one prompt"
            )
        if kind in ("clip", "siglip") and not (cfg.vision.cond_dim or cfg.vision.cond_tokens):
            raise ConfigError(
                f"{where}: {kind} compares the image projection, which only a conditioned "
                "backbone changes; set model.overrides.vision.cond_dim (adaLN-Zero) or "
                "vision.cond_tokens"
            )
    if not prompts:
        return
    from mmssl.train.streams import tokenizer

    tok = tokenizer(recipe)
    for key, prompt in prompts.values():
        ids = tok.encode(prompt, add_bos=True, add_eos=True)
        if max(ids) >= cfg.text.vocab_size:
            raise ConfigError(
                f"objectives.{key}.condition_prompt: token id {max(ids)} of {prompt!r} is out "
                f"of range for the model's text vocab_size {cfg.text.vocab_size}; set "
                f"model.overrides.text.vocab_size={tok.vocab_size}"
            )


def prompt_tokenizer() -> Any:
    """The default tokenizer (recipes pass `data.tokenizer` to `Task` instead)."""
    from mmssl.tokenizer import get_tokenizer

    return get_tokenizer("default")


class PromptTokens:
    """Token ids of each source's prompt, cached per length: (1, T) int64 and (1, T) bool."""

    def __init__(self, prompts: dict[str, str], tokenizer: Any, context_length: int) -> None:
        self.prompts = dict(prompts)
        self.tokenizer = tokenizer
        self.context_length = context_length
        self._cache: dict[tuple[str, int], tuple[Tensor, Tensor]] = {}

    def natural_length(self, source: str) -> int:
        """[bos] + ids + [eos], capped at the text context length."""
        n = len(self.tokenizer.encode(self.prompts[source])) + 2
        return min(n, self.context_length)

    def get(self, source: str, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Ids (1, length) int64 and mask (1, length) bool of `source`'s prompt, on `device`."""
        key = (source, length)
        if key not in self._cache:
            self._cache[key] = self.tokenizer.batch_encode([self.prompts[source]], length)
        ids, mask = self._cache[key]
        return ids.to(device), mask.to(device)


def export_record(recipe: Any, context_length: int) -> dict[str, Any] | None:
    """config.json's "condition" of a text-conditioned run: {"prompts": {source: {"text":
    prompt, "ids": [...]}}}, the ids as training encoded the prompt alone (`PromptTokens`,
    with `data.tokenizer`); None for a run without prompts."""
    prompts = source_prompts(recipe.objectives)
    if not prompts:
        return None
    from mmssl.train.streams import tokenizer

    tokens = PromptTokens(prompts, tokenizer(recipe), context_length)
    cpu = torch.device("cpu")
    return {
        "prompts": {
            source: {
                "text": text,
                "ids": tokens.get(source, tokens.natural_length(source), cpu)[0][0].tolist(),
            }
            for source, text in sorted(prompts.items())
        }
    }
